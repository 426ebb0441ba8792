//! Activations quantised to 8 bits for integer dot products with quantised weights (the
//! `fast` precision's decode path, as llama.cpp's `Q8_0`/`Q8_1` activations): x [K] in blocks
//! of 32, each with scale d = max|x| / 127, codes q = round(x / d) and s = d · Σ q (for
//! Q4_1's minimum term). The product W · x̂ with x̂ = d · q is what the fast path computes;
//! its difference from W · x is the activations' rounding, at most d/2 per element.

use llama_core::DType;
use rayon::prelude::*;

use super::blocks::{with_block, Block};
use super::QuantMatrix;
use crate::error::{OpsError, Result};
use crate::simd;

/// Activations in 8-bit blocks of 32.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Vector {
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
}

impl Q8Vector {
    /// Quantises x (a whole number of blocks of 32).
    pub fn quantize(x: &[f32]) -> Result<Q8Vector> {
        if !x.len().is_multiple_of(32) {
            return Err(OpsError::Shape {
                op: "Q8Vector::quantize",
                reason: format!("{} values are not a whole number of blocks of 32", x.len()),
            });
        }
        let blocks = x.len() / 32;
        let mut out = Q8Vector {
            qs: vec![0; x.len()],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
        };
        for (((xs, qs), d), s) in x
            .chunks_exact(32)
            .zip(out.qs.chunks_exact_mut(32))
            .zip(&mut out.d)
            .zip(&mut out.s)
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = (v * inv).round() as i8;
                sum += i32::from(*q);
            }
            *s = *d * sum as f32;
        }
        Ok(out)
    }

    /// The values the codes stand for, x̂ = d · q.
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(32)
            .zip(&self.d)
            .flat_map(|(qs, &d)| qs.iter().map(move |&q| d * f32::from(q)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.qs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }
}

/// True for the weight dtypes with an integer dot product against [`Q8Vector`]s.
pub fn supports_q8(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
}

/// Parallel tasks per worker thread: few, since a task is microseconds of work and each
/// hand-off between threads costs about as much.
const TASKS_PER_THREAD: usize = 2;
/// Below this many weight bytes a product runs on the calling thread: waking the pool costs
/// more than the work (a 192 × 576 Q4_1 projection is 62 KB, about 5 µs).
const SEQUENTIAL_BYTES: usize = 1 << 17;

/// y = W · x̂ for each (W, y) of `parts`, all in one parallel pass (a layer's q, k and v
/// projections share one hand-off to the pool). Sizes are the caller's to check.
pub(crate) fn matvec_q8_group(parts: Vec<(QuantMatrix<'_>, &mut [f32])>, x: &Q8Vector) {
    let rows: usize = parts.iter().map(|(_, y)| y.len()).sum();
    let bytes: usize = parts.iter().map(|(w, _)| w.bytes().len()).sum();
    let rows_per_task = rows
        .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD)
        .max(8);
    let mut tasks = Vec::new();
    for (w, y) in parts {
        for (t, ys) in y.chunks_mut(rows_per_task).enumerate() {
            tasks.push((w, t * rows_per_task, ys));
        }
    }
    let run = |(w, first, ys): (QuantMatrix<'_>, usize, &mut [f32])| {
        let row_bytes = w.bytes().len() / w.shape().0;
        for (r, y) in ys.iter_mut().enumerate() {
            let row = first + r;
            *y = row_dot(
                w.dtype(),
                &w.bytes()[row * row_bytes..(row + 1) * row_bytes],
                x,
            );
        }
    };
    if bytes < SEQUENTIAL_BYTES {
        tasks.into_iter().for_each(run);
    } else {
        tasks.into_par_iter().for_each(run);
    }
}

fn row_dot(dtype: DType, row: &[u8], x: &Q8Vector) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        use super::avx2;
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        unsafe {
            match dtype {
                DType::Q4_0 => return avx2::row_q4_0_q8(row, &x.qs, &x.d),
                DType::Q4_1 => return avx2::row_q4_1_q8(row, &x.qs, &x.d, &x.s),
                DType::Q8_0 => return avx2::row_q8_0_q8(row, &x.qs, &x.d),
                _ => {}
            }
        }
    }
    row_dot_plain(dtype, row, x)
}

/// The portable path: decode each weight block and multiply by x̂ in f32.
fn row_dot_plain(dtype: DType, row: &[u8], x: &Q8Vector) -> f32 {
    fn dot<F: Block>(row: &[u8], x: &Q8Vector) -> f32 {
        let mut buf = [0f32; 256];
        let buf = &mut buf[..F::LEN];
        let mut total = 0f32;
        for (block, b) in row.chunks_exact(F::BYTES).enumerate() {
            F::decode(b, buf);
            for (i, &w) in buf.iter().enumerate() {
                let k = block * F::LEN + i;
                total += w * x.d[k / 32] * f32::from(x.qs[k]);
            }
        }
        total
    }
    with_block!(dtype, F => dot::<F>(row, x), float => 0.0)
}
