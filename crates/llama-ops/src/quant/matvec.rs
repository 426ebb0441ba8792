//! The fused dequantise-and-dot matrix-vector product (decoding): each block of a weight row is
//! decoded into a stack buffer and multiplied into 4 × LANES running sums at once, so the
//! weight is read once in its quantised size and no f32 copy of it is made.

use llama_core::DType;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::blocks::Block;
use crate::simd::{self, Fma, HwFma, NoFma, LANES};

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 8;
/// The largest block (K-quants).
const MAX_BLOCK: usize = 256;

/// y[r] = Σ_k decode(W)[r, k] · x[k] for every row r; `row_bytes` bytes per row.
pub(crate) fn matvec<F: Block>(w: &[u8], row_bytes: usize, x: &[f32], y: &mut [f32]) {
    // Q4_1's and the K-quants' minimums multiply Σ x over each 32 weights: computed once for all rows.
    let x_sums: Vec<f32> = if matches!(F::DTYPE, DType::Q4_1 | DType::Q4K | DType::Q5K) {
        x.chunks_exact(32).map(|c| c.iter().sum()).collect()
    } else {
        Vec::new()
    };
    let task = |(t, ys): (usize, &mut [f32])| {
        for (r, y) in ys.iter_mut().enumerate() {
            let row = t * ROWS_PER_TASK + r;
            *y = row_dot::<F>(&w[row * row_bytes..(row + 1) * row_bytes], x, &x_sums);
        }
    };
    if w.len() < 1 << 14 {
        y.chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
    } else {
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
    }
}

fn row_dot<F: Block>(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        unsafe {
            return match F::DTYPE {
                DType::Q4_0 => avx2::row_q4_0(row, x),
                DType::Q4_1 => avx2::row_q4_1(row, x, x_sums),
                DType::Q8_0 => avx2::row_q8_0(row, x),
                DType::Q4K => avx2::row_q4_k(row, x, x_sums),
                DType::Q5K => avx2::row_q5_k(row, x, x_sums),
                DType::Q6K => avx2::row_q6_k(row, x),
                DType::Nf4 => avx2::row_nf4(row, x),
                _ => row_dot_avx2::<F>(row, x),
            };
        }
    }
    row_dot_lanes::<F, NoFma>(row, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_dot_avx2<F: Block>(row: &[u8], x: &[f32]) -> f32 {
    row_dot_lanes::<F, HwFma>(row, x)
}

/// Every block length is a multiple of 4 × LANES = 32.
#[inline(always)]
fn row_dot_lanes<F: Block, M: Fma>(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [[0f32; LANES]; 4];
    let mut buf = [0f32; MAX_BLOCK];
    let buf = &mut buf[..F::LEN];
    for (block, xs) in row.chunks_exact(F::BYTES).zip(x.chunks_exact(F::LEN)) {
        F::decode(block, buf);
        for (cw, cx) in buf.chunks_exact(4 * LANES).zip(xs.chunks_exact(4 * LANES)) {
            for (k, acc) in acc.iter_mut().enumerate() {
                for (l, acc) in acc.iter_mut().enumerate() {
                    *acc = M::fma(cw[k * LANES + l], cx[k * LANES + l], *acc);
                }
            }
        }
    }
    simd::reduce(&acc)
}
