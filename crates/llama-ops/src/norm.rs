//! RMSNorm (Llama), Gemma's RMSNorm and LayerNorm: forward and backward, the fast CPU path
//! (rayon over rows, SIMD reductions). Letters: N rows (batch × tokens), C channels.
//! The statistics are always taken in f32, whatever the element type `T`.

use llama_core::Element;

use crate::error::{check_len, rows_of, Result};
use crate::rows::{for_each_row, for_each_row_sum};
use crate::simd::{dot_lanes, simd_fn, NoFma, LANES};

/// Widens a row into the f32 scratch row.
#[inline(always)]
fn widen<T: Element>(row: &[T], out: &mut [f32]) {
    out.iter_mut().zip(row).for_each(|(o, v)| *o = v.to_f32());
}

/// r = 1 / sqrt(mean(x²) + eps).
#[inline(always)]
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot_lanes::<NoFma>(x, x) / x.len() as f32 + eps).sqrt()
}

// The per-row bodies, compiled for AVX2 where the CPU has it (see `simd_fn!`).
simd_fn! {
    /// One RMSNorm row: Llama's order (`gemma` false) or Gemma's.
    fn rms_row<T>(x: &[T], weight: &[T], eps: f32, gemma: bool, y: &mut [T], xf: &mut [f32]) {
        widen(x, xf);
        let scale = rms_scale(xf, eps);
        let (xf, weight) = (&xf[..y.len()], &weight[..y.len()]);
        if gemma {
            for i in 0..y.len() {
                y[i] = T::from_f32(xf[i] * scale * (1.0 + weight[i].to_f32()));
            }
        } else {
            for i in 0..y.len() {
                y[i] = T::from_f32(weight[i].to_f32() * T::from_f32(xf[i] * scale).to_f32());
            }
        }
    }
}

simd_fn! {
    /// One RMSNorm backward row: dx, and dy ⊙ x̂ added into dw.
    fn rms_backward_row<T>(x: &[T], weight: &[T], dy: &[T], eps: f32, dx: &mut [T], dw: &mut [f32], xf: &mut [f32]) {
        let dim = dx.len();
        widen(x, xf);
        let scale = rms_scale(xf, eps);
        let (xf, weight, dy, dw) = (&xf[..dim], &weight[..dim], &dy[..dim], &mut dw[..dim]);
        let mut g_dot_x = [0f32; LANES];
        for i in 0..dim {
            g_dot_x[i % LANES] += weight[i].to_f32() * dy[i].to_f32() * xf[i];
        }
        let coef = scale * scale * scale * g_dot_x.iter().sum::<f32>() / dim as f32;
        for i in 0..dim {
            let dyi = dy[i].to_f32();
            dx[i] = T::from_f32(scale * weight[i].to_f32() * dyi - xf[i] * coef);
            dw[i] += dyi * xf[i] * scale;
        }
    }
}

/// Checks x [N, C], weight [C] and an output like x; returns N.
/// rms_norm_backward's buffers: x, dy and dx of whole rows of the weight's length, dw one row.
pub(crate) fn check_backward(
    x: usize,
    weight: usize,
    dy: usize,
    dx: usize,
    dw: usize,
) -> Result<()> {
    let op = "rms_norm_backward";
    check_rows(op, x, weight, dx)?;
    check_len(op, "dy", dy, x)?;
    check_len(op, "dw", dw, weight)
}

pub(crate) fn check_rows(op: &'static str, x: usize, weight: usize, out: usize) -> Result<usize> {
    let rows = rows_of(op, "x", x, weight)?;
    check_len(op, "output", out, x)?;
    Ok(rows)
}

/// RMSNorm forward (HF `LlamaRMSNorm`, `fast_rms_layernorm_inference`):
/// x [N, C], weight [C] → y [N, C] with
///   r = 1 / sqrt(mean(x²) + eps)       (f32)
///   y = w · T(x · r)                   (normalised, cast back to T, then weighted)
pub fn rms_norm<T: Element>(x: &[T], weight: &[T], eps: f32, y: &mut [T]) -> Result<()> {
    check_rows("rms_norm", x.len(), weight.len(), y.len())?;
    let dim = weight.len();
    for_each_row(y, dim, |r, y_row, xf| {
        rms_row(&x[r * dim..(r + 1) * dim], weight, eps, false, y_row, xf)
    });
    Ok(())
}

/// Gemma's RMSNorm (`fast_rms_layernorm_inference_gemma`): all in f32 and the weight enters
/// as (1 + w):  y = T((x · r) · (1 + w)).
pub fn gemma_rms_norm<T: Element>(x: &[T], weight: &[T], eps: f32, y: &mut [T]) -> Result<()> {
    check_rows("gemma_rms_norm", x.len(), weight.len(), y.len())?;
    let dim = weight.len();
    for_each_row(y, dim, |r, y_row, xf| {
        rms_row(&x[r * dim..(r + 1) * dim], weight, eps, true, y_row, xf)
    });
    Ok(())
}

/// RMSNorm backward, x [N, C], weight [C], dy [N, C] → dx [N, C], dw [C] (overwritten).
/// With g = w ⊙ dy and r as in the forward (x̂ = x · r):
///   dx = r · g − x · r³ · Σ(g ⊙ x) / C
///   dw = Σ_rows dy ⊙ x̂
pub fn rms_norm_backward<T: Element>(
    x: &[T],
    weight: &[T],
    dy: &[T],
    eps: f32,
    dx: &mut [T],
    dw: &mut [f32],
) -> Result<()> {
    check_backward(x.len(), weight.len(), dy.len(), dx.len(), dw.len())?;
    let dim = weight.len();
    let sums = for_each_row_sum(dx, dim, dim, |r, dx_row, xf, dw_acc| {
        let at = r * dim..(r + 1) * dim;
        rms_backward_row(&x[at.clone()], weight, &dy[at], eps, dx_row, dw_acc, xf)
    });
    dw.copy_from_slice(&sums);
    Ok(())
}

/// LayerNorm forward (`fast_layernorm_compiled`), in f32 whatever T:
///   μ = mean(x), σ² = mean((x − μ)²), x̂ = (x − μ) / sqrt(σ² + eps), y = T(x̂ · w + b)
pub fn layer_norm<T: Element>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    eps: f32,
    y: &mut [T],
) -> Result<()> {
    let op = "layer_norm";
    check_rows(op, x.len(), weight.len(), y.len())?;
    check_len(op, "bias", bias.len(), weight.len())?;
    let dim = weight.len();
    for_each_row(y, dim, |r, y_row, xf| {
        widen(&x[r * dim..(r + 1) * dim], xf);
        let (mean, rstd) = centre(xf, eps);
        for (((y, &v), w), b) in y_row.iter_mut().zip(xf.iter()).zip(weight).zip(bias) {
            *y = T::from_f32((v - mean) * rstd * w.to_f32() + b.to_f32());
        }
    });
    Ok(())
}

/// Mean and 1 / sqrt(variance + eps) of a row (biased variance, two passes).
#[inline]
fn centre(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm backward, x [N, C], weight [C], dy [N, C] → dx [N, C], dw [C], db [C]
/// (overwritten). With g = w ⊙ dy and x̂ as in the forward:
///   dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)),  dw = Σ_rows dy ⊙ x̂,  db = Σ_rows dy
pub fn layer_norm_backward<T: Element>(
    x: &[T],
    weight: &[T],
    dy: &[T],
    eps: f32,
    dx: &mut [T],
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<()> {
    let op = "layer_norm_backward";
    check_rows(op, x.len(), weight.len(), dx.len())?;
    check_len(op, "dy", dy.len(), x.len())?;
    check_len(op, "dw", dw.len(), weight.len())?;
    check_len(op, "db", db.len(), weight.len())?;
    let dim = weight.len();
    // The accumulator holds dw in [0, C) and db in [C, 2C).
    let sums = for_each_row_sum(dx, dim, 2 * dim, |r, dx_row, xf, acc| {
        let at = r * dim..(r + 1) * dim;
        widen(&x[at.clone()], xf);
        let (mean, rstd) = centre(xf, eps);
        let dy = &dy[at];
        let (mut g_mean, mut gx_mean) = (0f32, 0f32);
        for i in 0..dim {
            let xhat = (xf[i] - mean) * rstd;
            let g = weight[i].to_f32() * dy[i].to_f32();
            g_mean += g;
            gx_mean += g * xhat;
            xf[i] = xhat;
        }
        let (g_mean, gx_mean) = (g_mean / dim as f32, gx_mean / dim as f32);
        for i in 0..dim {
            let dyi = dy[i].to_f32();
            let g = weight[i].to_f32() * dyi;
            dx_row[i] = T::from_f32(rstd * (g - g_mean - xf[i] * gx_mean));
            acc[i] += dyi * xf[i];
            acc[dim + i] += dyi;
        }
    });
    dw.copy_from_slice(&sums[..dim]);
    db.copy_from_slice(&sums[dim..]);
    Ok(())
}
