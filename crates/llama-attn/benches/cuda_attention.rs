//! CUDA attention benchmarks at Llama-3-8B's attention shape (32 query heads, 8 kv heads,
//! head_dim 128, bf16, batch 1), each iteration launching and synchronising:
//! - `prefill/T`: the causal forward over T positions, GFLOP/s counting 2·T²·H·D (memory: the
//!   Q/K/V/O buffers and T log-sum-exps, linear in T);
//! - `backward/T`: its backward as training runs it (`backward_tc`: FlashAttention-2 on the
//!   tensor cores), GFLOP/s counting the 7·T²·H·D of its seven products over the causal half;
//! - `decode/L`: one query per head against L cached positions (split-K), GiB/s of K and V read.
//!
//! Prints a skip line without a GPU. Run through `cargo xtask gpu-bundle` on the GPU machine.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_attn::{cuda, AttnShape, Mask};
use llama_core::bf16;
use llama_core::cuda::CudaDevice;

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const D: usize = 128;

fn values(n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 * 0.002 - 1.0))
        .collect()
}

fn bench(c: &mut Criterion) {
    let gpu = match CudaDevice::get(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("skipped: cuda_attention benchmark: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_attention");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for seq in [512, 2048, 8192, 16384] {
        let s = AttnShape::self_attention(1, HEADS, KV_HEADS, seq, D);
        let (q, k, v) = (
            gpu.htod(&values(s.q_len())).unwrap(),
            gpu.htod(&values(s.kv_len())).unwrap(),
            gpu.htod(&values(s.kv_len())).unwrap(),
        );
        let (mut out, mut lse) = (
            gpu.zeros::<bf16>(s.q_len()).unwrap(),
            gpu.zeros::<f32>(s.q_rows()).unwrap(),
        );
        g.throughput(Throughput::Elements((2 * seq * seq * HEADS * D) as u64));
        g.bench_function(format!("prefill/{seq}_flops"), |b| {
            b.iter(|| {
                cuda::forward(&gpu, &q, &k, &v, &s, &Mask::causal(), &mut out, &mut lse).unwrap();
                gpu.synchronize().unwrap()
            })
        });
        let dout = gpu.htod(&values(s.q_len())).unwrap();
        let mut dq = gpu.zeros::<bf16>(s.q_len()).unwrap();
        let (mut dk, mut dv) = (
            gpu.zeros::<bf16>(s.kv_len()).unwrap(),
            gpu.zeros::<bf16>(s.kv_len()).unwrap(),
        );
        g.throughput(Throughput::Elements((7 * seq * seq * HEADS * D) as u64));
        g.bench_function(format!("backward/{seq}_flops"), |b| {
            b.iter(|| {
                cuda::backward_tc(
                    &gpu,
                    &q,
                    &k,
                    &v,
                    cuda::AttnOutput::Heads(&out),
                    &lse,
                    &dout,
                    &s,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                )
                .unwrap();
                gpu.synchronize().unwrap()
            })
        });
    }
    for context in [1024, 4096, 16384, 32768] {
        let s = AttnShape {
            seq_q: 1,
            ..AttnShape::self_attention(1, HEADS, KV_HEADS, context, D)
        };
        let (q, k, v) = (
            gpu.htod(&values(s.q_len())).unwrap(),
            gpu.htod(&values(s.kv_len())).unwrap(),
            gpu.htod(&values(s.kv_len())).unwrap(),
        );
        let (mut out, mut lse) = (
            gpu.zeros::<bf16>(s.q_len()).unwrap(),
            gpu.zeros::<f32>(s.q_rows()).unwrap(),
        );
        g.throughput(Throughput::Bytes((2 * 2 * s.kv_len()) as u64));
        g.bench_function(format!("decode/{context}"), |b| {
            b.iter(|| {
                cuda::forward(&gpu, &q, &k, &v, &s, &Mask::causal(), &mut out, &mut lse).unwrap();
                gpu.synchronize().unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
