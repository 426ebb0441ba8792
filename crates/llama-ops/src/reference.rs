//! The reference implementations: each op as the formula says, in simple loops over f64
//! (except where an op is defined by its roundings, like HF's bf16 RMSNorm). Slow and obvious;
//! the tests hold the fast CPU and CUDA paths to these, and these to HF's fixtures. Shapes are
//! those of the fast functions of the same name.

use llama_core::Element;

use crate::activation::{GatedAct, Gelu};
use crate::loss::CrossEntropyOptions;
use crate::quant::blocks::{with_block, Block};
use crate::quant::QuantMatrix;

/// 1 / sqrt(mean(x²) + eps).
fn rms_scale(x: &[f64], eps: f64) -> f64 {
    1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt()
}

/// RMSNorm: y = w · x / sqrt(mean(x²) + eps), per row of C = w.len().
pub fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|row| {
            let r = rms_scale(row, eps);
            row.iter().zip(w).map(move |(v, w)| w * v * r)
        })
        .collect()
}

/// RMSNorm with HF's roundings in the element type T: y = T(w · T(x · r)), r in f64.
pub fn rms_norm_rounded<T: Element>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    x.chunks(w.len())
        .flat_map(|row| {
            let xf: Vec<f64> = row.iter().map(|v| v.to_f32() as f64).collect();
            let r = rms_scale(&xf, eps);
            xf.into_iter().zip(w).map(move |(v, w)| {
                let normed = T::from_f32((v * r) as f32).to_f32() as f64;
                T::from_f32((w.to_f32() as f64 * normed) as f32)
            })
        })
        .collect()
}

/// RMSNorm backward: (dx, dw) from the derivative of Σ y·dy.
pub fn rms_norm_backward(x: &[f64], w: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let c = w.len();
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; c];
    for (row, (xr, dyr)) in x.chunks(c).zip(dy.chunks(c)).enumerate() {
        let r = rms_scale(xr, eps);
        // d/dx_i of Σ_j w_j dy_j x_j r = w_i dy_i r − x_i r³/C · Σ_j w_j dy_j x_j
        let s: f64 = (0..c).map(|j| w[j] * dyr[j] * xr[j]).sum();
        for i in 0..c {
            dx[row * c + i] = w[i] * dyr[i] * r - xr[i] * r * r * r * s / c as f64;
            dw[i] += dyr[i] * xr[i] * r;
        }
    }
    (dx, dw)
}

/// Gemma's RMSNorm: y = (1 + w) · x / sqrt(mean(x²) + eps).
pub fn gemma_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let shifted: Vec<f64> = w.iter().map(|w| 1.0 + w).collect();
    rms_norm(x, &shifted, eps)
}

/// Mean and 1 / sqrt(biased variance + eps).
fn moments(x: &[f64], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm: y = (x − μ) / sqrt(σ² + eps) · w + b.
pub fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|row| {
            let (mean, rstd) = moments(row, eps);
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(v, (w, b))| (v - mean) * rstd * w + b)
        })
        .collect()
}

/// LayerNorm backward: (dx, dw, db) from the derivative of Σ y·dy.
pub fn layer_norm_backward(
    x: &[f64],
    w: &[f64],
    dy: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = w.len();
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
    for (row, (xr, dyr)) in x.chunks(c).zip(dy.chunks(c)).enumerate() {
        let (mean, rstd) = moments(xr, eps);
        let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * rstd).collect();
        let g: Vec<f64> = (0..c).map(|i| w[i] * dyr[i]).collect();
        let g_mean = g.iter().sum::<f64>() / c as f64;
        let gx_mean = g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / c as f64;
        for i in 0..c {
            dx[row * c + i] = rstd * (g[i] - g_mean - xhat[i] * gx_mean);
            dw[i] += dyr[i] * xhat[i];
            db[i] += dyr[i];
        }
    }
    (dx, dw, db)
}

/// f(x) of a gated activation, in f64.
pub fn act(act: GatedAct, x: f64) -> f64 {
    match act {
        GatedAct::Silu => x / (1.0 + (-x).exp()),
        GatedAct::Gelu(Gelu::Exact) => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        GatedAct::Gelu(Gelu::Tanh) => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

/// f'(x) by the analytic formulas (see `activation.rs`), in f64.
pub fn act_slope(act: GatedAct, x: f64) -> f64 {
    match act {
        GatedAct::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        GatedAct::Gelu(Gelu::Exact) => {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
        GatedAct::Gelu(Gelu::Tanh) => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let t = (k * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
        }
    }
}

/// Gated forward: h = f(gate) · up.
pub fn gated_forward(a: GatedAct, gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter().zip(up).map(|(g, u)| act(a, *g) * u).collect()
}

/// Gated forward with HF's roundings in T: h = T(T(f(gate)) · up).
pub fn gated_forward_rounded<T: Element>(a: GatedAct, gate: &[T], up: &[T]) -> Vec<T> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| {
            let f = T::from_f32(act(a, g.to_f32() as f64) as f32).to_f32() as f64;
            T::from_f32((f * u.to_f32() as f64) as f32)
        })
        .collect()
}

/// Gated backward: (dgate, dup).
pub fn gated_backward(a: GatedAct, gate: &[f64], up: &[f64], dh: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let dgate = (0..gate.len())
        .map(|i| dh[i] * up[i] * act_slope(a, gate[i]))
        .collect();
    let dup = (0..gate.len()).map(|i| dh[i] * act(a, gate[i])).collect();
    (dgate, dup)
}

/// The logit transform z(x) in f64.
fn transform(opts: &CrossEntropyOptions, x: f64) -> f64 {
    let z = opts.logit_scale.map_or(x, |s| s as f64 * x);
    opts.softcap
        .map_or(z, |cap| cap as f64 * (z / cap as f64).tanh())
}

/// Cross entropy, mean over labels ≠ ignore_index (0 when none count), by a full softmax.
pub fn cross_entropy(logits: &[f64], labels: &[i64], opts: &CrossEntropyOptions) -> f64 {
    let vocab = logits.len() / labels.len().max(1);
    let (mut sum, mut n) = (0.0, 0usize);
    for (row, &label) in labels.iter().enumerate() {
        if label == opts.ignore_index {
            continue;
        }
        let z: Vec<f64> = logits[row * vocab..(row + 1) * vocab]
            .iter()
            .map(|&x| transform(opts, x))
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        sum += lse - z[label as usize];
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// d loss / d logits by the chain rule through softmax and the transform.
pub fn cross_entropy_backward(
    logits: &[f64],
    labels: &[i64],
    opts: &CrossEntropyOptions,
) -> Vec<f64> {
    let vocab = logits.len() / labels.len().max(1);
    let n = labels.iter().filter(|&&l| l != opts.ignore_index).count();
    let mut grad = vec![0.0; logits.len()];
    for (row, &label) in labels.iter().enumerate() {
        if label == opts.ignore_index {
            continue;
        }
        let x = &logits[row * vocab..(row + 1) * vocab];
        let z: Vec<f64> = x.iter().map(|&v| transform(opts, v)).collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = z.iter().map(|v| (v - max).exp()).sum();
        for j in 0..vocab {
            let p = (z[j] - max).exp() / total;
            let target = if j as i64 == label { 1.0 } else { 0.0 };
            // dz/dx: s for the scale, then 1 − tanh² for the cap
            let s = opts.logit_scale.map_or(1.0, |s| s as f64);
            let cap_slope = opts.softcap.map_or(1.0, |cap| {
                let t = (s * x[j] / cap as f64).tanh();
                1.0 - t * t
            });
            grad[row * vocab + j] = (p - target) * s * cap_slope / n as f64;
        }
    }
    grad
}

/// y [M, N] = x [M, K] · Wᵀ with W [N, K], summed in f64.
pub fn linear(x: &[f64], w: &[f64], k: usize) -> Vec<f64> {
    let mut y = Vec::new();
    for xr in x.chunks(k) {
        for wr in w.chunks(k) {
            y.push(xr.iter().zip(wr).map(|(a, b)| a * b).sum());
        }
    }
    y
}

/// Dequantises a quantised matrix block after block, in one loop (no threads, no SIMD).
pub fn dequantize(w: &QuantMatrix) -> Vec<f32> {
    fn blocks<F: Block>(bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; bytes.len() / F::BYTES * F::LEN];
        for (b, o) in bytes
            .chunks_exact(F::BYTES)
            .zip(out.chunks_exact_mut(F::LEN))
        {
            F::decode(b, o);
        }
        out
    }
    // QuantMatrix::new refuses the float dtypes.
    with_block!(w.dtype(), F => blocks::<F>(w.bytes()), float => unreachable!("QuantMatrix holds quantised kinds"))
}
