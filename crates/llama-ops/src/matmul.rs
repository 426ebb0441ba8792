//! Dense linear layers on the CPU. Letters: M rows of activations, K input features, N output
//! features. Weights keep HF's [N, K] layout and a linear layer computes y = x · Wᵀ.
//!
//! Matrices go through the `gemm` crate in f32; f16/bf16 operands are widened to f32 first and
//! the product accumulates in f32 either way. A single row (decoding) goes through our own
//! matrix-vector kernel instead, which reads the weight once in its stored type.

use llama_core::Element;
use rayon::prelude::*;

use crate::error::{check_len, rows_of, Result};
use crate::gemm_ffi::{matmul, View};
use crate::simd::{self, Fma, HwFma, NoFma, LANES};

/// Output rows per parallel task of the matrix-vector product.
const ROWS_PER_TASK: usize = 16;

/// Sizes of y = x · Wᵀ from the buffer lengths: (M, N).
fn linear_dims(op: &'static str, x: usize, w: usize, k: usize, y: usize) -> Result<(usize, usize)> {
    let m = rows_of(op, "x", x, k)?;
    let n = rows_of(op, "weight", w, k)?;
    check_len(op, "output", y, m * n)?;
    Ok((m, n))
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.par_iter()
        .with_min_len(4096)
        .map(|v| v.to_f32())
        .collect()
}

/// Linear forward: x [M, K], weight [N, K] → y [M, N] = x · Wᵀ (f32 accumulation).
pub fn linear<T: Element>(x: &[T], weight: &[T], in_features: usize, y: &mut [T]) -> Result<()> {
    let (m, n) = linear_dims("linear", x.len(), weight.len(), in_features, y.len())?;
    let k = in_features;
    if m == 1 {
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut yf = vec![0f32; n];
        matvec(weight, &xf, &mut yf)?;
        y.iter_mut()
            .zip(&yf)
            .for_each(|(y, v)| *y = T::from_f32(*v));
        return Ok(());
    }
    with_f32(y, |yf| {
        let (xf, wf) = (as_f32(x), as_f32(weight));
        matmul(
            View::row_major(&xf, m, k),
            View::transposed(&wf, k, n),
            yf,
            false,
        );
    });
    Ok(())
}

/// Linear backward for the input: dy [M, N], weight [N, K] → dx [M, K] = dy · W.
pub fn linear_backward_input<T: Element>(
    dy: &[T],
    weight: &[T],
    in_features: usize,
    dx: &mut [T],
) -> Result<()> {
    let op = "linear_backward_input";
    let k = in_features;
    let n = rows_of(op, "weight", weight.len(), k)?;
    let m = rows_of(op, "dy", dy.len(), n)?;
    check_len(op, "dx", dx.len(), m * k)?;
    with_f32(dx, |dxf| {
        let (dyf, wf) = (as_f32(dy), as_f32(weight));
        matmul(
            View::row_major(&dyf, m, n),
            View::row_major(&wf, n, k),
            dxf,
            false,
        );
    });
    Ok(())
}

/// Linear backward for the weight: dy [M, N], x [M, K] → dw [N, K] += dyᵀ · x (accumulated,
/// in f32, so gradient accumulation over micro-batches needs no extra buffer).
pub fn linear_backward_weight<T: Element>(
    dy: &[T],
    x: &[T],
    in_features: usize,
    dw: &mut [f32],
) -> Result<()> {
    let op = "linear_backward_weight";
    let k = in_features;
    let m = rows_of(op, "x", x.len(), k)?;
    let n = rows_of(op, "dy", dy.len(), m.max(1))?;
    check_len(op, "dw", dw.len(), n * k)?;
    let (dyf, xf) = (as_f32(dy), as_f32(x));
    matmul(
        View::transposed(&dyf, n, m),
        View::row_major(&xf, m, k),
        dw,
        true,
    );
    Ok(())
}

/// The f32 view of a buffer: borrowed when it is f32 already, else widened.
fn as_f32<T: Element>(v: &[T]) -> std::borrow::Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<T, f32>(v) {
        Ok(f) if T::DTYPE == llama_core::DType::F32 => std::borrow::Cow::Borrowed(f),
        _ => std::borrow::Cow::Owned(widen(v)),
    }
}

/// Runs `f` on an f32 output buffer: `out` itself when T is f32, else a temporary rounded
/// into `out` afterwards.
fn with_f32<T: Element>(out: &mut [T], f: impl FnOnce(&mut [f32])) {
    if T::DTYPE == llama_core::DType::F32 {
        f(bytemuck::cast_slice_mut(out));
    } else {
        let mut tmp = vec![0f32; out.len()];
        f(&mut tmp);
        out.par_iter_mut()
            .with_min_len(4096)
            .zip(&tmp)
            .for_each(|(o, v)| *o = T::from_f32(*v));
    }
}

/// Matrix-vector product for decoding: weight [N, K] in its stored type, x [K] → y [N] f32.
/// Rayon over blocks of output rows, each a SIMD dot product that widens W as it reads.
pub fn matvec<W: Element>(weight: &[W], x: &[f32], y: &mut [f32]) -> Result<()> {
    let op = "matvec";
    let n = rows_of(op, "weight", weight.len(), x.len().max(1))?;
    check_len(op, "y", y.len(), if x.is_empty() { y.len() } else { n })?;
    if x.is_empty() {
        y.fill(0.0);
        return Ok(());
    }
    let k = x.len();
    let task = |(t, ys): (usize, &mut [f32])| {
        for (r, y) in ys.iter_mut().enumerate() {
            let row = t * ROWS_PER_TASK + r;
            *y = dot_widen(&weight[row * k..(row + 1) * k], x);
        }
    };
    if weight.len() < 1 << 15 {
        y.chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
    } else {
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
    }
    Ok(())
}

/// Σ w[i] · x[i] with w widened to f32 on the fly.
fn dot_widen<W: Element>(w: &[W], x: &[f32]) -> f32 {
    if let Ok(wf) = bytemuck::try_cast_slice::<W, f32>(w) {
        if W::DTYPE == llama_core::DType::F32 {
            return simd::dot(wf, x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_widen_avx2(w, x) };
    }
    dot_widen_lanes::<W, NoFma>(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_widen_avx2<W: Element>(w: &[W], x: &[f32]) -> f32 {
    dot_widen_lanes::<W, HwFma>(w, x)
}

/// Each 32-element chunk of w is widened into a buffer first, then multiplied like f32: in one
/// loop the widening made LLVM vectorise across the accumulators instead of along the row.
#[inline(always)]
fn dot_widen_lanes<W: Element, M: Fma>(w: &[W], x: &[f32]) -> f32 {
    const CHUNK: usize = 4 * LANES;
    let mut acc = [[0f32; LANES]; 4];
    let mut buf = [0f32; CHUNK];
    let body = w.len() / CHUNK * CHUNK;
    for (cw, cx) in w[..body]
        .chunks_exact(CHUNK)
        .zip(x[..body].chunks_exact(CHUNK))
    {
        for (b, v) in buf.iter_mut().zip(cw) {
            *b = v.to_f32();
        }
        for (k, acc) in acc.iter_mut().enumerate() {
            for (l, acc) in acc.iter_mut().enumerate() {
                *acc = M::fma(buf[k * LANES + l], cx[k * LANES + l], *acc);
            }
        }
    }
    let mut sum = simd::reduce(&acc);
    for (a, b) in w[body..].iter().zip(&x[body..]) {
        sum = M::fma(a.to_f32(), *b, sum);
    }
    sum
}
