//! CUDA RoPE benchmark: the rotation at Llama-3-8B shapes (seq 2048, head_dim 128) in f32 and
//! bf16, GB/s counting bytes read and written; each iteration uploads the position ids,
//! launches, and synchronises. Prints a skip line without a GPU.
//! Run through `cargo xtask gpu-bundle` on the GPU machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_core::bf16;
use llama_core::cuda::CudaDevice;
use llama_rope::cuda::{apply, DeviceTables};
use llama_rope::{QkShape, RopeConfig, RotaryEmbedding};

fn bench_cuda_apply(c: &mut Criterion) {
    let gpu = match CudaDevice::get(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("skipped: cuda_rope benchmark: {e}");
            return;
        }
    };
    let mut rope = RotaryEmbedding::new(RopeConfig::new(500000.0, 128, 131072).expect("config"));
    let tables = DeviceTables::upload(&gpu, &rope.tables(2048).expect("tables")).expect("upload");
    let ids: Vec<u32> = (0..2048).collect();
    let mut group = c.benchmark_group("cuda_rope_apply_seq2048");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(3));
    for (name, batch, heads) in [("q_b1_32_heads", 1, 32), ("q_b8_32_heads", 8, 32)] {
        let shape = QkShape {
            batch,
            heads,
            seq: 2048,
            head_dim: 128,
        };
        let host: Vec<f32> = (0..shape.len()).map(|i| (i % 97) as f32 * 0.01).collect();
        let mut x32 = gpu.htod(&host).expect("upload");
        group.throughput(Throughput::Bytes((2 * 4 * shape.len()) as u64));
        group.bench_function(format!("{name}_f32"), |b| {
            b.iter(|| {
                apply(black_box(&mut x32), shape, &tables, &ids, false).expect("apply");
                gpu.synchronize().expect("sync");
            })
        });
        let host16: Vec<bf16> = host.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut x16 = gpu.htod(&host16).expect("upload");
        group.throughput(Throughput::Bytes((2 * 2 * shape.len()) as u64));
        group.bench_function(format!("{name}_bf16"), |b| {
            b.iter(|| {
                apply(black_box(&mut x16), shape, &tables, &ids, false).expect("apply");
                gpu.synchronize().expect("sync");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_cuda_apply);
criterion_main!(benches);
