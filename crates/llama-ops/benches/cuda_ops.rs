//! CUDA benchmarks of llama-ops at training/prefill sizes (4096 token rows) of Llama-3-8B
//! (hidden 4096, intermediate 14336, vocab 128256) and decode matrix-vector products, each
//! iteration launching and synchronising. GB/s counts bytes read + written; compare with
//! `cuda_memory/copy`, a 1 GiB device-to-device copy (this GPU's practical bandwidth).
//! Prints a skip line without a GPU. Run through `cargo xtask gpu-bundle` on the GPU machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_core::cuda::CudaDevice;
use llama_core::{bf16, DType};
use llama_ops::cuda::{self, CudaQuantMatrix};
use llama_ops::{CrossEntropyOptions, GatedAct, QuantMatrix};

const ROWS: usize = 4096;
const HIDDEN: usize = 4096;
const INTER: usize = 14_336;
const VOCAB: usize = 128_256;

fn bf16s(n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 * 0.002 - 1.0))
        .collect()
}

fn bench(c: &mut Criterion) {
    let gpu = match CudaDevice::get(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("skipped: cuda_ops benchmark: {e}");
            return;
        }
    };
    let sync = || gpu.synchronize().expect("sync");
    let mut g = c.benchmark_group("cuda_ops");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));

    let src = gpu.zeros::<u8>(1 << 30).unwrap();
    let mut dst = gpu.zeros::<u8>(1 << 30).unwrap();
    g.throughput(Throughput::Bytes(2 << 30));
    g.bench_function("cuda_memory/copy_1GiB", |b| {
        b.iter(|| {
            gpu.stream().memcpy_dtod(&src, &mut dst).unwrap();
            sync()
        })
    });
    drop((src, dst));

    // The fixed cost of one op: host-side launch plus synchronisation, on a single tiny row.
    let (tiny_x, tiny_w) = (gpu.htod(&bf16s(64)).unwrap(), gpu.htod(&bf16s(64)).unwrap());
    let mut tiny_y = gpu.zeros::<bf16>(64).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("launch_and_sync_overhead", |b| {
        b.iter(|| {
            cuda::rms_norm(&gpu, &tiny_x, &tiny_w, 1e-5, &mut tiny_y).unwrap();
            sync()
        })
    });

    let x = gpu.htod(&bf16s(ROWS * HIDDEN)).unwrap();
    let w = gpu.htod(&bf16s(HIDDEN)).unwrap();
    let mut y = gpu.zeros::<bf16>(ROWS * HIDDEN).unwrap();
    g.throughput(Throughput::Bytes((2 * 2 * ROWS * HIDDEN) as u64));
    g.bench_function("rms_norm_bf16_4096x4096", |b| {
        b.iter(|| {
            cuda::rms_norm(&gpu, &x, &w, 1e-5, &mut y).unwrap();
            sync()
        })
    });
    let dy = gpu.htod(&bf16s(ROWS * HIDDEN)).unwrap();
    let mut dw = gpu.zeros::<f32>(HIDDEN).unwrap();
    g.throughput(Throughput::Bytes((3 * 2 * ROWS * HIDDEN) as u64));
    g.bench_function("rms_norm_backward_bf16_4096x4096", |b| {
        b.iter(|| {
            cuda::rms_norm_backward(&gpu, &x, &w, &dy, 1e-5, &mut y, &mut dw).unwrap();
            sync()
        })
    });
    drop((x, y, dy));

    // Distinct gate, up and output buffers: repeating an in-place SwiGLU on one buffer would
    // drive the values to denormals, where the IEEE division takes its slow path.
    let n = ROWS * INTER;
    let gate = gpu.htod(&bf16s(n)).unwrap();
    let up = gpu
        .htod(&bf16s(n).iter().rev().copied().collect::<Vec<_>>())
        .unwrap();
    let mut h = gpu.zeros::<bf16>(n).unwrap();
    g.throughput(Throughput::Bytes((3 * 2 * n) as u64));
    g.bench_function("swiglu_bf16_4096x14336", |b| {
        b.iter(|| {
            cuda::gated_forward(&gpu, GatedAct::Silu, &gate, &up, &mut h).unwrap();
            sync()
        })
    });
    let (mut dg, mut du) = (gpu.zeros::<bf16>(n).unwrap(), gpu.zeros::<bf16>(n).unwrap());
    g.throughput(Throughput::Bytes((5 * 2 * n) as u64));
    g.bench_function("swiglu_backward_bf16_4096x14336", |b| {
        b.iter(|| {
            cuda::gated_backward(&gpu, GatedAct::Silu, &gate, &up, &h, &mut dg, &mut du).unwrap();
            sync()
        })
    });
    drop((gate, up, h, dg, du));

    let ce_rows = 2048;
    let mut logits = gpu.htod(&bf16s(ce_rows * VOCAB)).unwrap();
    let labels: Vec<i64> = (0..ce_rows as i64).map(|r| r * 61 % VOCAB as i64).collect();
    let opts = CrossEntropyOptions::default();
    g.throughput(Throughput::Bytes((2 * ce_rows * VOCAB) as u64));
    g.bench_function("cross_entropy_forward_bf16_2048x128256", |b| {
        b.iter(|| {
            black_box(
                cuda::cross_entropy(&gpu, &logits, &labels, &opts)
                    .unwrap()
                    .loss(&gpu),
            )
        })
    });
    let fwd = cuda::cross_entropy(&gpu, &logits, &labels, &opts).unwrap();
    g.throughput(Throughput::Bytes((2 * 2 * ce_rows * VOCAB) as u64));
    g.bench_function("cross_entropy_backward_bf16_2048x128256", |b| {
        b.iter(|| {
            cuda::cross_entropy_backward(&gpu, &mut logits, &fwd, 1.0, &opts).unwrap();
            sync()
        })
    });
    drop(logits);

    let xs = gpu.htod(&bf16s(ROWS * HIDDEN)).unwrap();
    let ws = gpu.htod(&bf16s(INTER * HIDDEN)).unwrap();
    let mut ys = gpu.zeros::<bf16>(ROWS * INTER).unwrap();
    g.throughput(Throughput::Elements((2 * ROWS * HIDDEN * INTER) as u64));
    g.bench_function("linear_bf16_4096x4096x14336_flops", |b| {
        b.iter(|| {
            cuda::linear(&gpu, &xs, &ws, HIDDEN, &mut ys).unwrap();
            sync()
        })
    });
    drop((xs, ys));

    let dense: Vec<f32> = bf16s(INTER * HIDDEN)
        .iter()
        .map(|v| v.to_f32() * 0.05)
        .collect();
    let xv = gpu.htod(&dense[..HIDDEN]).unwrap();
    let mut yv = gpu.zeros::<f32>(INTER).unwrap();
    let mut scratch = gpu.zeros::<f32>(INTER * HIDDEN).unwrap();
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Nf4] {
        let bytes = llama_ops::quantize(dtype, &dense, HIDDEN).unwrap();
        let w = CudaQuantMatrix::upload(
            &gpu,
            &QuantMatrix::new(dtype, INTER, HIDDEN, &bytes).unwrap(),
        )
        .unwrap();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("matvec_{dtype}_14336x4096"), |b| {
            b.iter(|| {
                w.matvec(&gpu, &xv, &mut yv).unwrap();
                sync()
            })
        });
        g.throughput(Throughput::Bytes((bytes.len() + 4 * dense.len()) as u64));
        g.bench_function(format!("dequantize_{dtype}_14336x4096"), |b| {
            b.iter(|| {
                w.dequantize_into(&gpu, &mut scratch).unwrap();
                sync()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
