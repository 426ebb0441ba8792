//! CPU benchmarks of attention at SmolLM2-135M's shape (9 query heads, 3 kv heads, head_dim 64):
//! - `prefill/T`: causal attention of T positions (tiled, working memory O(T)), GFLOP/s
//!   counting 4·T²/2·H·D for the causal half of QKᵀ and PV;
//! - `backward/T`: its backward (dQ, dK, dV), GFLOP/s counting the 7 products it computes;
//! - `decode_cached/L`: one decode step of the whole attention layer against a KV cache
//!   holding L positions (projections, RoPE, attention, output);
//! - `decode_recompute/L`: the same step without a cache, recomputing the layer over all
//!   L + 1 positions, as a model without a cache must.
//!   cargo bench -p llama-attn --bench attention [-- FILTER]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_attn::{AttentionConfig, AttnShape, LlamaAttention, Mask};
use llama_rope::RopeConfig;

const HIDDEN: usize = 576;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919) % 1000) as f32 * 0.002 - 1.0)
        .collect()
}

fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for seq in [512, 1024, 2048, 4096] {
        let s = AttnShape::self_attention(1, HEADS, KV_HEADS, seq, HEAD_DIM);
        let (q, k, v) = (
            values(s.q_len(), 1),
            values(s.kv_len(), 2),
            values(s.kv_len(), 3),
        );
        let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
        g.throughput(Throughput::Elements(
            (2 * seq * seq * HEADS * HEAD_DIM) as u64,
        ));
        g.bench_function(format!("{seq}_flops"), |b| {
            b.iter(|| {
                llama_attn::forward(
                    black_box(&q),
                    &k,
                    &v,
                    &s,
                    &Mask::causal(),
                    &mut out,
                    &mut lse,
                )
                .unwrap()
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("backward");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for seq in [512, 1024, 2048] {
        let s = AttnShape::self_attention(1, HEADS, KV_HEADS, seq, HEAD_DIM);
        let (q, k, v) = (
            values(s.q_len(), 1),
            values(s.kv_len(), 2),
            values(s.kv_len(), 3),
        );
        let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
        llama_attn::forward(&q, &k, &v, &s, &Mask::causal(), &mut out, &mut lse).unwrap();
        let dout = values(s.q_len(), 4);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; s.q_len()],
            vec![0f32; s.kv_len()],
            vec![0f32; s.kv_len()],
        );
        // QKᵀ twice, dO Vᵀ twice, Pᵀ dO, dSᵀ Q, dS K: 7 products over the causal half.
        g.throughput(Throughput::Elements(
            (7 * seq * seq * HEADS * HEAD_DIM) as u64,
        ));
        g.bench_function(format!("{seq}_flops"), |b| {
            b.iter(|| {
                llama_attn::backward(
                    black_box(&q),
                    &k,
                    &v,
                    &out,
                    &lse,
                    &dout,
                    &s,
                    &Mask::causal(),
                    &mut dq,
                    &mut dk,
                    &mut dv,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn layer() -> LlamaAttention {
    let config = AttentionConfig::new(HIDDEN, HEADS, KV_HEADS, HEAD_DIM).unwrap();
    let w = |rows: usize, seed| {
        values(rows * HIDDEN, seed)
            .iter()
            .map(|v| v * 0.05)
            .collect()
    };
    LlamaAttention::new(
        config,
        w(HEADS * HEAD_DIM, 4),
        w(KV_HEADS * HEAD_DIM, 5),
        w(KV_HEADS * HEAD_DIM, 6),
        w(HIDDEN, 7),
        RopeConfig::new(100000.0, HEAD_DIM, 40_000).unwrap(),
    )
    .unwrap()
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    let mut attn = layer();
    for context in [1024, 4096, 16384, 32768] {
        // Fill a cache with `context` positions once, then time one more step, truncating
        // back so every iteration sees the same length.
        let mut cache = attn.new_cache(1, context + 1, 256, context + 1).unwrap();
        let ids: Vec<u32> = (0..context as u32).collect();
        attn.forward_cached(&values(context * HIDDEN, 8), 1, &ids, &mut cache)
            .unwrap();
        let x = values(HIDDEN, 9);
        g.bench_function(format!("cached_{context}"), |b| {
            b.iter(|| {
                cache.truncate(context);
                attn.forward_cached(black_box(&x), 1, &[context as u32], &mut cache)
                    .unwrap()
            })
        });
        if context <= 4096 {
            let xs = values((context + 1) * HIDDEN, 10);
            let all: Vec<u32> = (0..=context as u32).collect();
            g.bench_function(format!("recompute_{context}"), |b| {
                b.iter(|| attn.forward(black_box(&xs), 1, &all, None).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, prefill, decode);
criterion_main!(benches);
