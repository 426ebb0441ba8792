//! CPU benchmarks of llama-ops at SmolLM2-135M shapes (hidden 576, intermediate 1536, vocab
//! 49152) and Llama-3-8B shapes (4096, 14336, 128256). Memory-bound ops report GB/s (bytes
//! read + written); products report GFLOP/s as "elem/s" (2·M·N·K per product) or, for the
//! decode matrix-vector products, GB/s of weight read. `memory_bandwidth/copy` is this
//! machine's own limit to compare the GB/s against: a 256 MiB buffer copied (read + write).
//!   cargo bench -p llama-ops --bench ops [-- FILTER]

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use llama_core::{bf16, DType};
use llama_ops::{CrossEntropyOptions, GatedAct, QuantMatrix};

/// (name, hidden, intermediate, vocab)
const SHAPES: [(&str, usize, usize, usize); 2] = [
    ("smollm2", 576, 1536, 49_152),
    ("llama3_8b", 4096, 14_336, 128_256),
];

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.002 - 1.0)
        .collect()
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    g
}

fn memory_bandwidth(c: &mut Criterion) {
    let mut g = group(c, "memory_bandwidth");
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    g.throughput(Throughput::Bytes(2 * src.len() as u64));
    g.bench_function("copy_256MiB", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();
}

fn norms(c: &mut Criterion) {
    let mut g = group(c, "rms_norm");
    for (name, hidden, _, _) in SHAPES {
        let rows = (8 << 20) / (4 * hidden); // 8 MiB of f32 activations
        let (x, w) = (values(rows * hidden), values(hidden));
        let mut y = vec![0f32; x.len()];
        g.throughput(Throughput::Bytes((2 * 4 * x.len()) as u64));
        g.bench_function(format!("{name}_f32_{rows}x{hidden}"), |b| {
            b.iter(|| llama_ops::rms_norm(black_box(&x), &w, 1e-5, &mut y).unwrap())
        });
        let (xb, wb): (Vec<bf16>, Vec<bf16>) = (
            x.iter().map(|&v| bf16::from_f32(v)).collect(),
            w.iter().map(|&v| bf16::from_f32(v)).collect(),
        );
        let mut yb = vec![bf16::ZERO; x.len()];
        g.throughput(Throughput::Bytes((2 * 2 * x.len()) as u64));
        g.bench_function(format!("{name}_bf16_{rows}x{hidden}"), |b| {
            b.iter(|| llama_ops::rms_norm(black_box(&xb), &wb, 1e-5, &mut yb).unwrap())
        });
        let dy = values(x.len());
        let (mut dx, mut dw) = (vec![0f32; x.len()], vec![0f32; hidden]);
        g.throughput(Throughput::Bytes((3 * 4 * x.len()) as u64));
        g.bench_function(format!("{name}_backward_f32_{rows}x{hidden}"), |b| {
            b.iter(|| {
                llama_ops::rms_norm_backward(black_box(&x), &w, &dy, 1e-5, &mut dx, &mut dw)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn swiglu(c: &mut Criterion) {
    let mut g = group(c, "swiglu");
    for (name, _, inter, _) in SHAPES {
        let rows = (8 << 20) / (4 * inter);
        let n = rows * inter;
        let (mut gate, up) = (values(n), values(n));
        g.throughput(Throughput::Bytes((3 * 4 * n) as u64));
        g.bench_function(format!("{name}_in_place_f32_{rows}x{inter}"), |b| {
            b.iter(|| {
                llama_ops::gated_forward_in_place(GatedAct::Silu, black_box(&mut gate), &up)
                    .unwrap()
            })
        });
        let (gate, dh) = (values(n), values(n));
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        g.throughput(Throughput::Bytes((5 * 4 * n) as u64));
        g.bench_function(format!("{name}_backward_f32_{rows}x{inter}"), |b| {
            b.iter(|| {
                llama_ops::gated_backward(
                    GatedAct::Silu,
                    black_box(&gate),
                    &up,
                    &dh,
                    &mut dg,
                    &mut du,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn cross_entropy(c: &mut Criterion) {
    let mut g = group(c, "cross_entropy");
    for (name, _, _, vocab) in SHAPES {
        let rows = 16;
        let logits: Vec<f32> = values(rows * vocab).iter().map(|v| v * 10.0).collect();
        let labels: Vec<i64> = (0..rows as i64).map(|r| r * 31).collect();
        let opts = CrossEntropyOptions::default();
        g.throughput(Throughput::Bytes((4 * logits.len()) as u64));
        g.bench_function(format!("{name}_forward_{rows}x{vocab}"), |b| {
            b.iter(|| llama_ops::cross_entropy(black_box(&logits), &labels, &opts).unwrap())
        });
        let fwd = llama_ops::cross_entropy(&logits, &labels, &opts).unwrap();
        let mut grad = logits.clone();
        g.throughput(Throughput::Bytes((2 * 4 * logits.len()) as u64));
        g.bench_function(format!("{name}_backward_in_place_{rows}x{vocab}"), |b| {
            b.iter(|| {
                llama_ops::cross_entropy_backward(black_box(&mut grad), &labels, &fwd, 1.0, &opts)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn linear(c: &mut Criterion) {
    let mut g = group(c, "linear");
    for (name, hidden, inter, _) in SHAPES {
        let w = values(inter * hidden);
        // Prefill: 64 tokens through the gate projection, GFLOP/s.
        let m = 64;
        let x = values(m * hidden);
        let mut y = vec![0f32; m * inter];
        g.throughput(Throughput::Elements((2 * m * hidden * inter) as u64));
        g.bench_function(format!("{name}_gemm_f32_{m}x{hidden}x{inter}_flops"), |b| {
            b.iter(|| llama_ops::linear(black_box(&x), &w, hidden, &mut y).unwrap())
        });
        // Decode: one token, GB/s of weight read.
        let (xv, mut yv) = (values(hidden), vec![0f32; inter]);
        g.throughput(Throughput::Bytes((4 * w.len()) as u64));
        g.bench_function(format!("{name}_matvec_f32_{inter}x{hidden}"), |b| {
            b.iter(|| llama_ops::matvec(black_box(&w), &xv, &mut yv).unwrap())
        });
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        g.throughput(Throughput::Bytes((2 * w.len()) as u64));
        g.bench_function(format!("{name}_matvec_bf16_{inter}x{hidden}"), |b| {
            b.iter(|| llama_ops::matvec(black_box(&wb), &xv, &mut yv).unwrap())
        });
    }
    g.finish();
}

fn quantised(c: &mut Criterion) {
    let mut g = group(c, "quant_matvec");
    for (name, hidden, inter, _) in SHAPES {
        let dense = values(inter * hidden);
        let x = values(hidden);
        let mut y = vec![0f32; inter];
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Nf4] {
            let bytes = llama_ops::quantize(dtype, &dense, hidden).unwrap();
            let w = QuantMatrix::new(dtype, inter, hidden, &bytes).unwrap();
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            g.bench_function(format!("{name}_{dtype}_{inter}x{hidden}"), |b| {
                b.iter(|| w.matvec(black_box(&x), &mut y).unwrap())
            });
        }
        // K-quants (rows of whole 256-weight blocks, so not SmolLM2's 576): any bytes decode;
        // only the speed is measured here.
        if hidden % 256 != 0 {
            continue;
        }
        for dtype in [DType::Q4K, DType::Q5K, DType::Q6K] {
            let bytes: Vec<u8> = (0..dtype.storage_bytes(inter * hidden).unwrap())
                .map(|i| (i * 13) as u8)
                .collect();
            let w = QuantMatrix::new(dtype, inter, hidden, &bytes).unwrap();
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            g.bench_function(format!("{name}_{dtype}_{inter}x{hidden}"), |b| {
                b.iter(|| w.matvec(black_box(&x), &mut y).unwrap())
            });
        }
    }
    g.finish();
    let mut g = group(c, "dequantize");
    let (hidden, inter) = (576, 1536);
    let dense = values(inter * hidden);
    for dtype in [DType::Q4_0, DType::Q8_0, DType::Nf4] {
        let bytes = llama_ops::quantize(dtype, &dense, hidden).unwrap();
        let w = QuantMatrix::new(dtype, inter, hidden, &bytes).unwrap();
        let mut out = vec![0f32; inter * hidden];
        g.throughput(Throughput::Bytes((bytes.len() + 4 * out.len()) as u64));
        g.bench_function(format!("smollm2_{dtype}_{inter}x{hidden}"), |b| {
            b.iter(|| w.dequantize_rows(0, black_box(&mut out)).unwrap())
        });
        g.throughput(Throughput::Bytes((4 * dense.len() + bytes.len()) as u64));
        g.bench_function(format!("quantize_smollm2_{dtype}_{inter}x{hidden}"), |b| {
            b.iter(|| llama_ops::quantize(dtype, black_box(&dense), hidden).unwrap())
        });
    }
    g.finish();
}

/// Training's frozen products at SmolLM2's shapes (512 tokens, the bench-train batch): the f32
/// GEMM (`exact`) beside the bf16 panels (`fast` on CPUs with AVX512-BF16; elsewhere their
/// plain-code kernel), forward x · Wᵀ and input gradient dy · W of the gate projection, and the
/// lm_head's forward over a 256-row chunk. GFLOP/s as elem/s.
fn training_products(c: &mut Criterion) {
    let mut g = group(c, "training_products");
    let (_, hidden, inter, vocab) = SHAPES[0];
    let m = 512;
    for (what, rows, cols, m) in [("gate", inter, hidden, m), ("lm_head", vocab, hidden, 256)] {
        let dense = llama_ops::Weight::dense(values(rows * cols), rows, cols).unwrap();
        let panels = dense.pack_bf16().unwrap();
        let (x, dy) = (values(m * cols), values(m * rows));
        let (mut y, mut dx) = (vec![0f32; m * rows], vec![0f32; m * cols]);
        g.throughput(Throughput::Elements((2 * m * rows * cols) as u64));
        for (kind, w) in [("f32", &dense), ("bf16_panels", &panels)] {
            g.bench_function(format!("{what}_forward_{kind}_{m}x{cols}x{rows}"), |b| {
                b.iter(|| w.forward(black_box(&x), &mut y).unwrap())
            });
            g.bench_function(
                format!("{what}_backward_input_{kind}_{m}x{rows}x{cols}"),
                |b| b.iter(|| w.backward_input(black_box(&dy), &mut dx).unwrap()),
            );
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    memory_bandwidth,
    norms,
    swiglu,
    cross_entropy,
    linear,
    training_products,
    quantised
);
criterion_main!(benches);
