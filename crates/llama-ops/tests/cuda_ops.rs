//! The CUDA kernels against the CPU path (suite `optimization`): the HF fixtures through the
//! kernels, and random inputs of awkward sizes in f32 and bf16. Dequantisation must give the
//! same bits as the CPU; reductions may round differently, so the rest is held to the
//! fixture tolerances (1e-5 relative in f32, bf16 to its own precision). Skipped, and counted,
//! without a GPU.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use llama_core::cuda::{CudaDevice, HostTable};
use llama_core::{bf16, DType};
use llama_fixtures::{assert_close, cuda_or_skip, Fixture, TestRng};
use llama_ops::cuda::{self, CudaQuantMatrix};
use llama_ops::{CrossEntropyOptions, GatedAct, Gelu, QuantMatrix};

/// CUDA's expf/erff/tanhf and Rust's differ by an ulp or two, and GELU's derivative cancels in
/// its negative tail, which magnifies that on a lone element.
const ACT_TOL: f64 = 5e-5;

const ACTS: [GatedAct; 3] = [
    GatedAct::Silu,
    GatedAct::Gelu(Gelu::Exact),
    GatedAct::Gelu(Gelu::Tanh),
];

fn up<T: cudarc::driver::DeviceRepr>(gpu: &Arc<CudaDevice>, v: &[T]) -> CudaSlice<T> {
    gpu.htod(v).unwrap()
}

fn down(gpu: &Arc<CudaDevice>, v: &CudaSlice<f32>) -> Vec<f32> {
    gpu.dtoh(v).unwrap()
}

fn down_bf16(gpu: &Arc<CudaDevice>, v: &CudaSlice<bf16>) -> Vec<f32> {
    gpu.dtoh(v).unwrap().iter().map(|v| v.to_f32()).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&v| bf16::from_f32(v)).collect()
}

#[test]
fn fixture_ops_on_the_gpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let f = Fixture::open("ops/ops");
    let eps = f.json()["rms_eps"].as_f64().unwrap() as f32;
    let (x, shape) = f.f32("rms_x");
    let (w, dy) = (f.f32("rms_w").0, f.f32("rms_dy").0);
    let (xd, wd, dyd) = (up(&gpu, &x), up(&gpu, &w), up(&gpu, &dy));
    let mut y = gpu.zeros::<f32>(x.len()).unwrap();
    cuda::rms_norm(&gpu, &xd, &wd, eps, &mut y).unwrap();
    assert_close("rms_y", &down(&gpu, &y), &f.f32("rms_y").0, &shape, 1e-5);
    cuda::gemma_rms_norm(&gpu, &xd, &wd, eps, &mut y).unwrap();
    assert_close(
        "gemma_y",
        &down(&gpu, &y),
        &f.f32("gemma_y").0,
        &shape,
        1e-5,
    );
    let (mut dx, mut dw) = (
        gpu.zeros::<f32>(x.len()).unwrap(),
        gpu.zeros::<f32>(w.len()).unwrap(),
    );
    cuda::rms_norm_backward(&gpu, &xd, &wd, &dyd, eps, &mut dx, &mut dw).unwrap();
    assert_close("rms_dx", &down(&gpu, &dx), &f.f32("rms_dx").0, &shape, 1e-5);
    assert_close(
        "rms_dw",
        &down(&gpu, &dw),
        &f.f32("rms_dw").0,
        &[w.len()],
        1e-5,
    );
    let ln_eps = f.json()["layer_norm_eps"].as_f64().unwrap() as f32;
    let (lw, lb) = (up(&gpu, &f.f32("ln_w").0), up(&gpu, &f.f32("ln_b").0));
    cuda::layer_norm(&gpu, &xd, &lw, &lb, ln_eps, &mut y).unwrap();
    assert_close("ln_y", &down(&gpu, &y), &f.f32("ln_y").0, &shape, 1e-5);

    let (gate, gshape) = f.f32("sw_gate");
    let (gd, ud, dhd) = (
        up(&gpu, &gate),
        up(&gpu, &f.f32("sw_up").0),
        up(&gpu, &f.f32("sw_dh").0),
    );
    let mut h = gpu.zeros::<f32>(gate.len()).unwrap();
    cuda::gated_forward(&gpu, GatedAct::Silu, &gd, &ud, &mut h).unwrap();
    assert_close("sw_h", &down(&gpu, &h), &f.f32("sw_h").0, &gshape, 1e-5);
    let (mut dg, mut du) = (
        gpu.zeros::<f32>(gate.len()).unwrap(),
        gpu.zeros::<f32>(gate.len()).unwrap(),
    );
    cuda::gated_backward(&gpu, GatedAct::Silu, &gd, &ud, &dhd, &mut dg, &mut du).unwrap();
    assert_close(
        "sw_dgate",
        &down(&gpu, &dg),
        &f.f32("sw_dgate").0,
        &gshape,
        1e-5,
    );
    assert_close(
        "sw_dup",
        &down(&gpu, &du),
        &f.f32("sw_dup").0,
        &gshape,
        1e-5,
    );
    for (name, gelu) in [("geglu_exact_h", Gelu::Exact), ("geglu_tanh_h", Gelu::Tanh)] {
        cuda::gated_forward(&gpu, GatedAct::Gelu(gelu), &gd, &ud, &mut h).unwrap();
        assert_close(name, &down(&gpu, &h), &f.f32(name).0, &gshape, 1e-5);
    }

    let (logits, lshape) = f.f32("ce_logits");
    let (labels, _) = f.i64("ce_labels");
    let softcap = f.json()["softcap"].as_f64().unwrap() as f32;
    for (opts, loss, grad) in [
        (CrossEntropyOptions::default(), "ce_loss", "ce_dlogits"),
        (
            CrossEntropyOptions {
                softcap: Some(softcap),
                chunk: lshape[1] / 3 + 1,
                ..Default::default()
            },
            "ce_softcap_loss",
            "ce_softcap_dlogits",
        ),
    ] {
        let mut ld = up(&gpu, &logits);
        let fwd = cuda::cross_entropy(&gpu, &ld, &labels, &opts).unwrap();
        assert_close(loss, &[fwd.loss(&gpu).unwrap()], &f.f32(loss).0, &[1], 1e-5);
        cuda::cross_entropy_backward(&gpu, &mut ld, &fwd, 1.0, &opts).unwrap();
        assert_close(grad, &down(&gpu, &ld), &f.f32(grad).0, &lshape, 1e-5);
    }
}

#[test]
fn norms_and_activations_match_the_cpu_in_f32_and_bf16() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(5);
    for (rows, dim) in [
        (1, 1),
        (3, 37),
        (300, 576),
        (4, 2048),
        (2, 4096),
        (17, 4099),
        (5, 16_384),
    ] {
        let (x, w, b, dy) = (
            rng.vec(rows * dim, 3.0),
            rng.vec(dim, 1.0),
            rng.vec(dim, 1.0),
            rng.vec(rows * dim, 1.0),
        );
        let name = format!("[{rows}, {dim}]");
        // f32: forward and backward of both norms.
        let (xd, wd, bd, dyd) = (up(&gpu, &x), up(&gpu, &w), up(&gpu, &b), up(&gpu, &dy));
        let mut cpu = vec![0f32; x.len()];
        let mut y = gpu.zeros::<f32>(x.len()).unwrap();
        llama_ops::rms_norm(&x, &w, 1e-6, &mut cpu).unwrap();
        cuda::rms_norm(&gpu, &xd, &wd, 1e-6, &mut y).unwrap();
        assert_close(
            &format!("rms {name}"),
            &down(&gpu, &y),
            &cpu,
            &[rows, dim],
            1e-5,
        );
        llama_ops::layer_norm(&x, &w, &b, 1e-5, &mut cpu).unwrap();
        cuda::layer_norm(&gpu, &xd, &wd, &bd, 1e-5, &mut y).unwrap();
        assert_close(
            &format!("ln {name}"),
            &down(&gpu, &y),
            &cpu,
            &[rows, dim],
            1e-5,
        );
        if dim > 3 {
            let (mut cdx, mut cdw, mut cdb) =
                (vec![0f32; x.len()], vec![0f32; dim], vec![0f32; dim]);
            let mut dx = gpu.zeros::<f32>(x.len()).unwrap();
            let (mut dw, mut db) = (
                gpu.zeros::<f32>(dim).unwrap(),
                gpu.zeros::<f32>(dim).unwrap(),
            );
            llama_ops::rms_norm_backward(&x, &w, &dy, 1e-6, &mut cdx, &mut cdw).unwrap();
            cuda::rms_norm_backward(&gpu, &xd, &wd, &dyd, 1e-6, &mut dx, &mut dw).unwrap();
            assert_close(
                &format!("rms dx {name}"),
                &down(&gpu, &dx),
                &cdx,
                &[rows, dim],
                1e-4,
            );
            assert_close(
                &format!("rms dw {name}"),
                &down(&gpu, &dw),
                &cdw,
                &[dim],
                1e-4,
            );
            // The input-only backward adds a residual's gradient in the same kernel.
            let residual = rng.vec(rows * dim, 1.0);
            let with_residual: Vec<f32> = cdx.iter().zip(&residual).map(|(a, b)| a + b).collect();
            let rd = up(&gpu, &residual);
            cuda::rms_norm_backward_input(&gpu, &xd, &wd, &dyd, Some(&rd), 1e-6, &mut dx).unwrap();
            let label = format!("rms dx + residual {name}");
            assert_close(&label, &down(&gpu, &dx), &with_residual, &[rows, dim], 1e-4);
            cuda::rms_norm_backward_input(&gpu, &xd, &wd, &dyd, None, 1e-6, &mut dx).unwrap();
            let label = format!("rms dx alone {name}");
            assert_close(&label, &down(&gpu, &dx), &cdx, &[rows, dim], 1e-4);
            llama_ops::layer_norm_backward(&x, &w, &dy, 1e-5, &mut cdx, &mut cdw, &mut cdb)
                .unwrap();
            cuda::layer_norm_backward(&gpu, &xd, &wd, &dyd, 1e-5, &mut dx, &mut dw, &mut db)
                .unwrap();
            assert_close(
                &format!("ln dx {name}"),
                &down(&gpu, &dx),
                &cdx,
                &[rows, dim],
                1e-4,
            );
            assert_close(
                &format!("ln dw {name}"),
                &down(&gpu, &dw),
                &cdw,
                &[dim],
                1e-4,
            );
            assert_close(
                &format!("ln db {name}"),
                &down(&gpu, &db),
                &cdb,
                &[dim],
                1e-5,
            );
        }
        // bf16 RMSNorm in HF's rounding order.
        let (xb, wb) = (to_bf16(&x), to_bf16(&w));
        let mut cpu_b = vec![bf16::ZERO; x.len()];
        llama_ops::rms_norm(&xb, &wb, 1e-6, &mut cpu_b).unwrap();
        let mut yb = gpu.zeros::<bf16>(x.len()).unwrap();
        cuda::rms_norm(&gpu, &up(&gpu, &xb), &up(&gpu, &wb), 1e-6, &mut yb).unwrap();
        let cpu_bf: Vec<f32> = cpu_b.iter().map(|v| v.to_f32()).collect();
        assert_close(
            &format!("rms bf16 {name}"),
            &down_bf16(&gpu, &yb),
            &cpu_bf,
            &[rows, dim],
            4e-3,
        );

        // Gated activations, f32 and bf16, forward (both forms) and backward.
        let n = rows * dim;
        let (g, u, dh) = (rng.vec(n, 5.0), rng.vec(n, 2.0), rng.vec(n, 1.0));
        let (gd, ud, dhd) = (up(&gpu, &g), up(&gpu, &u), up(&gpu, &dh));
        for act in ACTS {
            let (mut ch, mut cdg, mut cdu) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            llama_ops::gated_forward(act, &g, &u, &mut ch).unwrap();
            llama_ops::gated_backward(act, &g, &u, &dh, &mut cdg, &mut cdu).unwrap();
            let mut h = gpu.zeros::<f32>(n).unwrap();
            cuda::gated_forward(&gpu, act, &gd, &ud, &mut h).unwrap();
            assert_close(
                &format!("{act:?} h {name}"),
                &down(&gpu, &h),
                &ch,
                &[n],
                ACT_TOL,
            );
            let mut in_place = up(&gpu, &g);
            cuda::gated_forward_in_place(&gpu, act, &mut in_place, &ud).unwrap();
            assert_eq!(
                down(&gpu, &in_place),
                down(&gpu, &h),
                "{act:?} in place {name}"
            );
            let (mut dg, mut du) = (gpu.zeros::<f32>(n).unwrap(), gpu.zeros::<f32>(n).unwrap());
            cuda::gated_backward(&gpu, act, &gd, &ud, &dhd, &mut dg, &mut du).unwrap();
            assert_close(
                &format!("{act:?} dgate {name}"),
                &down(&gpu, &dg),
                &cdg,
                &[n],
                ACT_TOL,
            );
            assert_close(
                &format!("{act:?} dup {name}"),
                &down(&gpu, &du),
                &cdu,
                &[n],
                ACT_TOL,
            );
            let (mut dg_in, mut du_in, mut dh_in) = (up(&gpu, &g), up(&gpu, &u), up(&gpu, &dh));
            cuda::gated_backward_in_place(&gpu, act, &mut dg_in, &mut du_in, &mut dh_in).unwrap();
            assert_eq!(
                down(&gpu, &dh_in),
                down(&gpu, &h),
                "{act:?} h recomputed in place {name}"
            );
            assert_eq!(
                down(&gpu, &dg_in),
                down(&gpu, &dg),
                "{act:?} dgate in place {name}"
            );
            assert_eq!(
                down(&gpu, &du_in),
                down(&gpu, &du),
                "{act:?} dup in place {name}"
            );
            let (gb, ub) = (to_bf16(&g), to_bf16(&u));
            let mut cb = vec![bf16::ZERO; n];
            llama_ops::gated_forward(act, &gb, &ub, &mut cb).unwrap();
            let mut hb = gpu.zeros::<bf16>(n).unwrap();
            cuda::gated_forward(&gpu, act, &up(&gpu, &gb), &up(&gpu, &ub), &mut hb).unwrap();
            let cbf: Vec<f32> = cb.iter().map(|v| v.to_f32()).collect();
            assert_close(
                &format!("{act:?} bf16 h {name}"),
                &down_bf16(&gpu, &hb),
                &cbf,
                &[n],
                4e-3,
            );
            let (mut gbd, mut ubd) = (up(&gpu, &gb), up(&gpu, &ub));
            let mut dhb = up(&gpu, &to_bf16(&dh));
            cuda::gated_backward_in_place(&gpu, act, &mut gbd, &mut ubd, &mut dhb).unwrap();
            assert_eq!(
                down_bf16(&gpu, &dhb),
                down_bf16(&gpu, &hb),
                "{act:?} bf16 h recomputed in place {name}"
            );
        }
    }
}

#[test]
fn cross_entropy_over_a_large_vocabulary_matches_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(9);
    let (rows, vocab) = (13, 50_257);
    let logits = rng.vec(rows * vocab, 12.0);
    let labels: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 5 == 4 {
                -100
            } else {
                (r * 3877 % vocab) as i64
            }
        })
        .collect();
    for opts in [
        CrossEntropyOptions {
            chunk: 8192,
            ..Default::default()
        },
        CrossEntropyOptions {
            chunk: 65_536,
            softcap: Some(30.0),
            logit_scale: Some(0.7),
            ..Default::default()
        },
    ] {
        let cpu = llama_ops::cross_entropy(&logits, &labels, &opts).unwrap();
        let mut cpu_grad = logits.clone();
        llama_ops::cross_entropy_backward(&mut cpu_grad, &labels, &cpu, 0.5, &opts).unwrap();
        let mut ld = up(&gpu, &logits);
        let fwd = cuda::cross_entropy(&gpu, &ld, &labels, &opts).unwrap();
        assert_close("loss", &[fwd.loss(&gpu).unwrap()], &[cpu.loss], &[1], 1e-5);
        assert_close(
            "lse",
            &down(&gpu, &fwd.logsumexp),
            &cpu.logsumexp,
            &[rows],
            1e-5,
        );
        cuda::cross_entropy_backward(&gpu, &mut ld, &fwd, 0.5, &opts).unwrap();
        assert_close("dlogits", &down(&gpu, &ld), &cpu_grad, &[rows, vocab], 1e-5);

        let lb = to_bf16(&logits);
        let cpu_b = llama_ops::cross_entropy(&lb, &labels, &opts).unwrap();
        let fwd_b = cuda::cross_entropy(&gpu, &up(&gpu, &lb), &labels, &opts).unwrap();
        assert_close(
            "bf16 loss",
            &[fwd_b.loss(&gpu).unwrap()],
            &[cpu_b.loss],
            &[1],
            1e-5,
        );
    }
    let err = cuda::cross_entropy(
        &gpu,
        &up(&gpu, &logits),
        &vec![vocab as i64; rows],
        &Default::default(),
    );
    assert!(err.is_err(), "labels past the vocabulary are an error");
}

#[test]
fn linear_layers_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(13);
    for (m, k, n) in [(1, 576, 1536), (7, 33, 65), (128, 576, 576)] {
        let (x, w, dy) = (
            rng.vec(m * k, 1.0),
            rng.vec(n * k, 0.1),
            rng.vec(m * n, 1.0),
        );
        let name = format!("[{m}, {k}] x [{n}, {k}]");
        let (mut y, mut dx, mut dw) = (vec![0f32; m * n], vec![0f32; m * k], vec![0f32; n * k]);
        llama_ops::linear(&x, &w, k, &mut y).unwrap();
        llama_ops::linear_backward_input(&dy, &w, k, &mut dx).unwrap();
        llama_ops::linear_backward_weight(&dy, &x, k, &mut dw).unwrap();
        let (xd, wd, dyd) = (up(&gpu, &x), up(&gpu, &w), up(&gpu, &dy));
        let mut yd = gpu.zeros::<f32>(m * n).unwrap();
        cuda::linear(&gpu, &xd, &wd, k, &mut yd).unwrap();
        assert_close(&format!("y {name}"), &down(&gpu, &yd), &y, &[m, n], 1e-5);
        let mut dxd = gpu.zeros::<f32>(m * k).unwrap();
        cuda::linear_backward_input(&gpu, &dyd, &wd, k, &mut dxd).unwrap();
        assert_close(&format!("dx {name}"), &down(&gpu, &dxd), &dx, &[m, k], 1e-5);
        let mut dwd = gpu.zeros::<f32>(n * k).unwrap();
        cuda::linear_backward_weight(&gpu, &dyd, &xd, k, &mut dwd).unwrap();
        assert_close(&format!("dw {name}"), &down(&gpu, &dwd), &dw, &[n, k], 1e-5);
        // bf16 operands, f32 accumulation: against the CPU on the same rounded inputs.
        let (xb, wb) = (to_bf16(&x), to_bf16(&w));
        let mut yb = vec![bf16::ZERO; m * n];
        llama_ops::linear(&xb, &wb, k, &mut yb).unwrap();
        let mut ybd = gpu.zeros::<bf16>(m * n).unwrap();
        cuda::linear(&gpu, &up(&gpu, &xb), &up(&gpu, &wb), k, &mut ybd).unwrap();
        let ybf: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
        assert_close(
            &format!("bf16 y {name}"),
            &down_bf16(&gpu, &ybd),
            &ybf,
            &[m, n],
            4e-3,
        );
    }
}

/// Large products run through the algorithm tuned for their shape (`gemm_tune.rs`): equal to
/// the same product through cuBLAS's default (x read from a column window 8 bytes into a
/// wider buffer, too little aligned to be tuned) within bf16 rounding, the same bits every
/// time, and an accumulating one adds the product once (its candidates were timed on a scratch
/// output), again the same bits every time.
/// The choice lands in the cache's `gemm/` file.
#[test]
fn tuned_products_match_the_default_algorithm() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(29);
    // Llama-3.2-1B's gate projection at 2,048 tokens: 2^35 multiply-adds.
    let (m, k, n, pad) = (2048, 2048, 8192, 4);
    let wide = to_bf16(&rng.vec(m * (k + pad), 1.0));
    let dense: Vec<bf16> = wide
        .chunks(k + pad)
        .flat_map(|r| r[pad..].to_vec())
        .collect();
    let (w, y0) = (
        to_bf16(&rng.vec(n * k, 0.05)),
        to_bf16(&rng.vec(m * n, 1.0)),
    );
    let (wide_d, dense_d, wd) = (up(&gpu, &wide), up(&gpu, &dense), up(&gpu, &w));
    let window = cuda::Cols {
        first: pad,
        width: k,
        stride: k + pad,
    };
    let mut want = gpu.zeros::<bf16>(m * n).unwrap();
    cuda::linear_cols_into(&gpu, (&wide_d, window), &wd, &mut want, false).unwrap();
    let want = down_bf16(&gpu, &want);
    let mut got = gpu.zeros::<bf16>(m * n).unwrap();
    cuda::linear(&gpu, &dense_d, &wd, k, &mut got).unwrap();
    let first = down_bf16(&gpu, &got);
    assert_close("tuned y = x·Wᵀ", &first, &want, &[m, n], 4e-3);
    cuda::linear(&gpu, &dense_d, &wd, k, &mut got).unwrap();
    assert!(
        down_bf16(&gpu, &got) == first,
        "a tuned product changed bits"
    );
    let add_once = || {
        let mut y = up(&gpu, &y0);
        cuda::linear_into(&gpu, &dense_d, &wd, k, &mut y, true).unwrap();
        down_bf16(&gpu, &y)
    };
    let expected: Vec<f32> = y0.iter().zip(&want).map(|(a, b)| a.to_f32() + b).collect();
    let added = add_once();
    assert_close("tuned y += x·Wᵀ", &added, &expected, &[m, n], 8e-3);
    assert!(
        add_once() == added,
        "a tuned accumulating product changed bits"
    );
    if std::env::var("FASTLLAMA_GEMM_TUNING").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    let files = std::fs::read_dir(llama_core::cache_dir().join("gemm")).unwrap();
    let lines: String = files
        .filter_map(|f| std::fs::read_to_string(f.unwrap().path()).ok())
        .collect();
    for accumulate in [0, 1] {
        let key = format!("{n} {m} {k} 1 0 {k} {k} {n} BF16 BF16 {accumulate} 256 ");
        assert!(lines.contains(&key), "no tuned choice for {key}in {lines}");
    }
}

/// Products reading or writing columns of a wider buffer (a LoRA group's branches side by
/// side) equal those of the columns copied out; the other columns are left as they were.
#[test]
fn column_views_match_dense_products() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(19);
    for (m, stride, first, width, n) in [(5, 48, 16, 16, 40), (33, 7, 0, 3, 9), (64, 96, 80, 16, 1)]
    {
        let name = format!("[{m}, {stride}] columns {first}+{width}, {n} outputs");
        let cols = cuda::Cols {
            first,
            width,
            stride,
        };
        let (wide, w, dy) = (
            rng.vec(m * stride, 1.0),
            rng.vec(n * width, 0.1),
            rng.vec(m * n, 1.0),
        );
        let dense: Vec<f32> = wide
            .chunks(stride)
            .flat_map(|row| row[first..first + width].to_vec())
            .collect();
        let (wide_d, dense_d, wd, dyd) = (
            up(&gpu, &wide),
            up(&gpu, &dense),
            up(&gpu, &w),
            up(&gpu, &dy),
        );
        // (want, got) buffers of [rows, cols], compared once filled
        let outputs = |rows: usize, cols: usize| {
            let zeros = || gpu.zeros::<f32>(rows * cols).unwrap();
            (zeros(), zeros(), [rows, cols])
        };
        let same = |what: &str, want: &CudaSlice<f32>, got: &CudaSlice<f32>, shape: [usize; 2]| {
            let label = format!("{what} {name}");
            assert_close(&label, &down(&gpu, got), &down(&gpu, want), &shape, 1e-6);
        };
        // y = x[:, cols]·Wᵀ
        let (mut want, mut got, shape) = outputs(m, n);
        cuda::linear(&gpu, &dense_d, &wd, width, &mut want).unwrap();
        cuda::linear_cols_into(&gpu, (&wide_d, cols), &wd, &mut got, false).unwrap();
        same("y", &want, &got, shape);
        // dw += dyᵀ·x[:, cols]
        let (mut want, mut got, shape) = outputs(n, width);
        cuda::linear_backward_weight(&gpu, &dyd, &dense_d, width, &mut want).unwrap();
        cuda::linear_backward_weight_cols(&gpu, &dyd, (&wide_d, cols), &mut got).unwrap();
        same("dw", &want, &got, shape);
        // dx[:, cols] = 0.5·dy·W, the other columns untouched
        let mut dx = up(&gpu, &wide);
        cuda::linear_backward_input_scaled(&gpu, &dyd, &wd, (&mut dx, cols), 0.5).unwrap();
        let mut part = gpu.zeros::<f32>(m * width).unwrap();
        cuda::linear_backward_input(&gpu, &dyd, &wd, width, &mut part).unwrap();
        let part: Vec<f32> = down(&gpu, &part).iter().map(|v| 0.5 * v).collect();
        let mut expected = wide.clone();
        for (row, p) in expected.chunks_mut(stride).zip(part.chunks(width)) {
            row[first..first + width].copy_from_slice(p);
        }
        assert_close(
            &format!("dx {name}"),
            &down(&gpu, &dx),
            &expected,
            &[m, stride],
            1e-6,
        );
    }
    let past = cuda::Cols {
        first: 5,
        width: 4,
        stride: 8,
    };
    let x = gpu.zeros::<f32>(16).unwrap();
    let (w, mut y) = (gpu.zeros::<f32>(4).unwrap(), gpu.zeros::<f32>(2).unwrap());
    let err = cuda::linear_cols_into(&gpu, (&x, past), &w, &mut y, false);
    assert!(err.is_err(), "columns past the row were read");
}

#[test]
fn quantised_kernels_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(17);
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Nf4] {
        for (rows, blocks) in [(1, 1), (45, 3), (1536, 576 / dtype.block_len()), (4099, 2)] {
            let cols = blocks * dtype.block_len();
            let dense = rng.vec(rows * cols, 0.1);
            let bytes = llama_ops::quantize(dtype, &dense, cols).unwrap();
            let w = QuantMatrix::new(dtype, rows, cols, &bytes).unwrap();
            if dtype == DType::Nf4 {
                check_nf4_double_quant(&gpu, &w);
            }
            check_quant(&gpu, w, &mut rng);
        }
    }
    // K-quants: random bytes with small scales (no quantiser for them here).
    for dtype in [DType::Q4K, DType::Q5K, DType::Q6K] {
        for (rows, blocks) in [(1, 1), (37, 3), (4097, 1)] {
            let bytes = k_quant_blocks(dtype, rows * blocks, &mut rng);
            let cols = blocks * dtype.block_len();
            check_quant(
                &gpu,
                QuantMatrix::new(dtype, rows, cols, &bytes).unwrap(),
                &mut rng,
            );
        }
    }
}

/// QLoRA's double-quantised NF4 on the device dequantises to the CPU's values of the
/// expanded blocks, rounded to bf16, bit for bit (blocks run across rows and 256-block groups).
fn check_nf4_double_quant(gpu: &Arc<CudaDevice>, w: &QuantMatrix) {
    let (rows, cols) = w.shape();
    let expanded = llama_ops::quant::Nf4DoubleQuant::compress(w)
        .unwrap()
        .expand();
    let cpu = QuantMatrix::new(DType::Nf4, rows, cols, &expanded)
        .unwrap()
        .dequantize();
    let wd = cuda::CudaNf4DoubleQuant::upload(gpu, w).unwrap();
    let mut bf = gpu.zeros::<bf16>(rows * cols).unwrap();
    wd.dequantize_into_bf16(gpu, &mut bf).unwrap();
    let name = format!("NF4 double quant [{rows}, {cols}]");
    assert_rounded_from(gpu, &name, &bf, &cpu);
}

/// The bf16 buffer holds the f32 values rounded, bit for bit.
fn assert_rounded_from(gpu: &Arc<CudaDevice>, name: &str, bf: &CudaSlice<bf16>, f32s: &[f32]) {
    let rounded = f32s.iter().map(|&v| bf16::from_f32(v).to_bits());
    let got = gpu.dtoh(bf).unwrap();
    assert!(
        got.iter().map(|v| v.to_bits()).eq(rounded),
        "{name}: bf16 dequantisation differs from the CPU's values rounded"
    );
}

fn check_quant(gpu: &Arc<CudaDevice>, w: QuantMatrix, rng: &mut TestRng) {
    let (rows, cols) = w.shape();
    let name = format!("{} [{rows}, {cols}]", w.dtype());
    let wd = CudaQuantMatrix::upload(gpu, &w).unwrap();
    let cpu = w.dequantize();
    let gpu_dense = down(gpu, &wd.dequantize(gpu).unwrap());
    let same = cpu
        .iter()
        .zip(&gpu_dense)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{name}: dequantised values differ from the CPU's");
    let mut bf = gpu.zeros::<bf16>(rows * cols).unwrap();
    wd.dequantize_into_bf16(gpu, &mut bf).unwrap();
    assert_rounded_from(gpu, &name, &bf, &cpu);
    let x = rng.vec(cols, 1.0);
    let mut y = vec![0f32; rows];
    w.matvec(&x, &mut y).unwrap();
    let mut yd = gpu.zeros::<f32>(rows).unwrap();
    wd.matvec(gpu, &up(gpu, &x), &mut yd).unwrap();
    assert_close(
        &format!("matvec {name}"),
        &down(gpu, &yd),
        &y,
        &[rows],
        1e-5,
    );
}

fn k_quant_blocks(dtype: DType, n: usize, rng: &mut TestRng) -> Vec<u8> {
    let size = dtype.block_bytes();
    let mut bytes: Vec<u8> = (0..n * size).map(|_| rng.next_u64() as u8).collect();
    let fields: &[usize] = if dtype == DType::Q6K { &[208] } else { &[0, 2] };
    for block in bytes.chunks_exact_mut(size) {
        for &at in fields {
            let v = half::f16::from_f32(rng.uniform() * 0.05);
            block[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    bytes
}

/// The embedding row lookup copies the rows the ids name, bit for bit: f32 rows of 5 values
/// (the element path), bf16 rows of 3 and of 72 values (elements, and 16-byte chunks), repeated
/// and last ids, from a device table and from one in mapped host memory; an id past the table
/// is an error.
#[test]
fn gather_rows_copies_the_named_rows() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(41);
    let ids: Vec<u32> = vec![0, 6, 6, 2, 6, 1];
    for cols in [3, 5, 72] {
        let table = rng.vec(7 * cols, 1.0);
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * cols..(i as usize + 1) * cols].to_vec())
            .collect();
        let mut out = gpu.zeros::<f32>(ids.len() * cols).unwrap();
        cuda::gather_rows(&gpu, &up(&gpu, &table), cols, &ids, &mut out).unwrap();
        assert_eq!(down(&gpu, &out), want, "f32 rows of {cols}");
        let mut out = gpu.zeros::<bf16>(ids.len() * cols).unwrap();
        cuda::gather_rows(&gpu, &up(&gpu, &to_bf16(&table)), cols, &ids, &mut out).unwrap();
        let want: Vec<f32> = to_bf16(&want).iter().map(|v| v.to_f32()).collect();
        assert_eq!(down_bf16(&gpu, &out), want, "bf16 rows of {cols}");
        // The same rows from a table in mapped pinned host memory, read in place.
        let host = HostTable::new(&gpu, &to_bf16(&table)).unwrap();
        let mut from_host = gpu.zeros::<bf16>(ids.len() * cols).unwrap();
        cuda::gather_rows(&gpu, &host, cols, &ids, &mut from_host).unwrap();
        assert_eq!(
            down_bf16(&gpu, &from_host),
            want,
            "bf16 rows of {cols} from the host"
        );
        let mut row = gpu.zeros::<f32>(cols).unwrap();
        let err = cuda::gather_rows(&gpu, &up(&gpu, &table), cols, &[7], &mut row);
        assert!(err.is_err(), "row 7 of 7 rows");
        let mut row = gpu.zeros::<bf16>(cols).unwrap();
        let err = cuda::gather_rows(&gpu, &host, cols, &[7], &mut row);
        assert!(err.is_err(), "row 7 of 7 host rows");
    }
}
