//! CPU RoPE benchmarks: the rotation at Llama-3-8B shapes (Q: 32 heads, K: 8 heads, seq 2048,
//! head_dim 128, f32) in GB/s counting bytes read and written, and building the cos/sin tables
//! for 128K positions (llama3 scaling). `cargo bench -p llama-rope --bench rope`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_rope::{apply, QkShape, RopeConfig, RotaryEmbedding};
use serde_json::json;

fn llama3_8b() -> RopeConfig {
    let params = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    RopeConfig::from_rope_parameters(&params, 128, 131072).expect("valid config")
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("rope_apply_llama3_8b_seq2048");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    let mut rope = RotaryEmbedding::new(llama3_8b());
    let ids: Vec<u32> = (0..2048).collect();
    for (name, heads) in [("q_32_heads", 32), ("k_8_heads", 8)] {
        let shape = QkShape {
            batch: 1,
            heads,
            seq: 2048,
            head_dim: 128,
        };
        let mut x: Vec<f32> = (0..shape.len()).map(|i| (i % 97) as f32 * 0.01).collect();
        let tables = rope.tables(2048).expect("tables");
        group.throughput(Throughput::Bytes((2 * 4 * shape.len()) as u64));
        group.bench_function(name, |b| {
            b.iter(|| apply(black_box(&mut x), shape, &tables, &ids).expect("apply"))
        });
    }
    group.finish();
}

fn bench_cache(c: &mut Criterion) {
    let mut group = c.benchmark_group("rope_cache");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("build_131072_positions_head128", |b| {
        b.iter(|| {
            let mut rope = RotaryEmbedding::new(llama3_8b());
            black_box(rope.tables(131072).expect("tables").len)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_apply, bench_cache);
criterion_main!(benches);
