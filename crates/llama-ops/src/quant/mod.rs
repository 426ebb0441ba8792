//! Quantised weights: GGUF's Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K and bitsandbytes' NF4.
//! Letters: N rows (output features), K columns (input features), M activation rows.
//!
//! A [`QuantMatrix`] is a view of a [N, K] weight stored as blocks along each row (K a whole
//! number of blocks). It dequantises ([`QuantMatrix::dequantize`]), multiplies a vector with
//! the dequantisation fused into the dot product ([`QuantMatrix::matvec`], the decode path:
//! the weight is read once, in its quantised size), and multiplies a matrix by dequantising
//! tiles of rows into f32 and handing them to the GEMM ([`QuantMatrix::matmul`], prefill).

#[cfg(target_arch = "x86_64")]
mod avx2;
pub(crate) mod blocks;
mod encode;
mod matvec;
pub mod nf4;
mod q8;

use llama_core::DType;
use rayon::prelude::*;

use crate::error::{check_len, rows_of, OpsError, Result};
use crate::gemm_ffi::{matmul, View};
use blocks::{with_block, Block};

pub use nf4::{Nf4DoubleQuant, NF4_TABLE};
pub use q8::{supports_q8, Q8Vector};

/// A [N, K] block-quantised weight, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    dtype: DType,
    rows: usize,
    cols: usize,
    bytes: &'a [u8],
}

/// Output rows dequantised at a time by [`QuantMatrix::matmul`].
const MATMUL_TILE_ROWS: usize = 256;

impl<'a> QuantMatrix<'a> {
    /// Checks that `bytes` hold a [rows, cols] matrix of `dtype` blocks, each row a whole
    /// number of blocks.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self> {
        let op = "QuantMatrix::new";
        if dtype.is_float() {
            return Err(OpsError::UnsupportedDType {
                op,
                dtype,
                supported: "Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, NF4",
            });
        }
        if !cols.is_multiple_of(dtype.block_len()) {
            return Err(OpsError::Shape {
                op,
                reason: format!(
                    "{dtype} rows hold whole blocks of {}, but a row has {cols} columns",
                    dtype.block_len()
                ),
            });
        }
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| dtype.storage_bytes(n))
            .ok_or_else(|| OpsError::Shape {
                op,
                reason: format!("[{rows}, {cols}] overflows"),
            })?;
        if bytes.len() != expected {
            return Err(OpsError::Shape {
                op,
                reason: format!(
                    "a [{rows}, {cols}] {dtype} matrix takes {expected} bytes, {} were given",
                    bytes.len()
                ),
            });
        }
        Ok(QuantMatrix {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// (N, K).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_len() * self.dtype.block_bytes()
    }

    /// Dequantises rows `first..first + out.len() / K` into `out`.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) -> Result<()> {
        let op = "QuantMatrix::dequantize_rows";
        let n = rows_of(op, "out", out.len(), self.cols)?;
        if first.checked_add(n).is_none_or(|end| end > self.rows) {
            return Err(OpsError::Shape {
                op,
                reason: format!("rows {first}..{} of {}", first + n, self.rows),
            });
        }
        let row_bytes = self.row_bytes();
        let src = &self.bytes[first * row_bytes..(first + n) * row_bytes];
        with_block!(self.dtype, F => decode_all::<F>(src, out), float => unreachable!("checked in new"));
        Ok(())
    }

    /// The whole matrix in f32, [N, K].
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out)
            .expect("sizes checked in new");
        out
    }

    /// y [N] = W · x, x [K], dequantising inside the dot product.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        check_len("QuantMatrix::matvec", "x", x.len(), self.cols)?;
        check_len("QuantMatrix::matvec", "y", y.len(), self.rows)?;
        with_block!(self.dtype, F => matvec::matvec::<F>(self.bytes, self.row_bytes(), x, y), float => unreachable!("checked in new"));
        Ok(())
    }

    /// y [N] = W · x̂ for activations quantised to 8 bits: integer dot products (the `fast`
    /// decode path). Q4_0, Q4_1 and Q8_0 weights ([`supports_q8`]).
    pub fn matvec_q8(&self, x: &Q8Vector, y: &mut [f32]) -> Result<()> {
        let op = "QuantMatrix::matvec_q8";
        if !supports_q8(self.dtype) {
            return Err(OpsError::UnsupportedDType {
                op,
                dtype: self.dtype,
                supported: "Q4_0, Q4_1, Q8_0",
            });
        }
        matvec_q8_group(vec![(*self, y)], x)
    }

    /// y [M, N] = x [M, K] · Wᵀ: a single row goes through [`Self::matvec`]; more rows
    /// dequantise W a tile of rows at a time and multiply in f32.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let op = "QuantMatrix::matmul";
        let m = rows_of(op, "x", x.len(), self.cols)?;
        check_len(op, "y", y.len(), m * self.rows)?;
        if m == 1 {
            return self.matvec(x, y);
        }
        tiled_matmul(self.rows, self.cols, x, y, |first, tile| {
            self.dequantize_rows(first, tile)
        })
    }
}

/// y [M, N] = x [M, K] · Wᵀ for a W [N, K] stored in another format: `fill(first, tile)`
/// writes rows first.. of W in f32 into `tile`, a tile of rows at a time, each multiplied in
/// f32 — the f32 weight is never whole in memory. The caller has checked the lengths.
pub(crate) fn tiled_matmul(
    n: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    fill: impl Fn(usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let m = x.len() / k.max(1);
    let mut tile = vec![0f32; MATMUL_TILE_ROWS.min(n) * k];
    let mut tile_out = vec![0f32; m * MATMUL_TILE_ROWS.min(n)];
    for first in (0..n).step_by(MATMUL_TILE_ROWS) {
        let rows = MATMUL_TILE_ROWS.min(n - first);
        fill(first, &mut tile[..rows * k])?;
        matmul(
            View::row_major(x, m, k),
            View::transposed(&tile[..rows * k], k, rows),
            &mut tile_out[..m * rows],
            false,
        );
        for (y_row, t_row) in y.chunks_exact_mut(n).zip(tile_out.chunks_exact(rows)) {
            y_row[first..first + rows].copy_from_slice(t_row);
        }
    }
    Ok(())
}

/// dx [M, K] = dy [M, N] · W for a W filled a tile of rows at a time (see [`tiled_matmul`]),
/// each tile's product accumulated. The caller has checked the lengths.
pub(crate) fn tiled_backward_input(
    n: usize,
    k: usize,
    dy: &[f32],
    dx: &mut [f32],
    fill: impl Fn(usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let m = dy.len() / n.max(1);
    dx.fill(0.0);
    let mut tile = vec![0f32; MATMUL_TILE_ROWS.min(n) * k];
    for first in (0..n).step_by(MATMUL_TILE_ROWS) {
        let rows = MATMUL_TILE_ROWS.min(n - first);
        fill(first, &mut tile[..rows * k])?;
        // dy[:, first..first + rows], a strided view of dy's columns.
        let dy_cols = View {
            data: &dy[first..],
            rows: m,
            cols: rows,
            row_stride: n,
            col_stride: 1,
        };
        matmul(
            dy_cols,
            View::row_major(&tile[..rows * k], rows, k),
            dx,
            true,
        );
    }
    Ok(())
}

impl QuantMatrix<'_> {
    /// dx [M, K] = dy [M, N] · W, the input gradient of [`Self::matmul`]: W is dequantised a
    /// tile of rows at a time and each tile's product accumulated, so the f32 weight is never
    /// whole in memory.
    pub fn backward_input(&self, dy: &[f32], dx: &mut [f32]) -> Result<()> {
        let op = "QuantMatrix::backward_input";
        let (n, k) = (self.rows, self.cols);
        let m = rows_of(op, "dy", dy.len(), n)?;
        check_len(op, "dx", dx.len(), m * k)?;
        tiled_backward_input(n, k, dy, dx, |first, tile| {
            self.dequantize_rows(first, tile)
        })
    }
}

/// y = W · x̂ for each (W, y) of `parts` (see [`QuantMatrix::matvec_q8`]) in one parallel
/// pass: the projections that read the same activations share one hand-off to the threads.
pub fn matvec_q8_group(parts: Vec<(QuantMatrix<'_>, &mut [f32])>, x: &Q8Vector) -> Result<()> {
    let op = "matvec_q8_group";
    for (w, y) in &parts {
        if !supports_q8(w.dtype) {
            return Err(OpsError::UnsupportedDType {
                op,
                dtype: w.dtype,
                supported: "Q4_0, Q4_1, Q8_0",
            });
        }
        check_len(op, "x", x.len(), w.cols)?;
        check_len(op, "y", y.len(), w.rows)?;
    }
    q8::matvec_q8_group(parts, x);
    Ok(())
}

/// Decodes consecutive blocks in parallel.
fn decode_all<F: Block>(src: &[u8], out: &mut [f32]) {
    out.par_chunks_mut(F::LEN)
        .with_min_len(64)
        .zip(src.par_chunks(F::BYTES))
        .for_each(|(o, b)| F::decode(b, o));
}

/// Quantises a [rows, cols] f32 matrix (cols a whole number of blocks) to Q4_0, Q4_1, Q8_0 or
/// NF4, returning the blocks.
pub fn quantize(dtype: DType, data: &[f32], cols: usize) -> Result<Vec<u8>> {
    let op = "quantize";
    let encode: fn(&[f32], &mut [u8]) = match dtype {
        DType::Q4_0 => encode::q4_0,
        DType::Q4_1 => encode::q4_1,
        DType::Q8_0 => encode::q8_0,
        DType::Nf4 => nf4::encode_block,
        _ => {
            return Err(OpsError::UnsupportedDType {
                op,
                dtype,
                supported: "Q4_0, Q4_1, Q8_0, NF4",
            })
        }
    };
    let rows = rows_of(op, "data", data.len(), cols)?;
    // Validates the row length against the block size.
    QuantMatrix::new(dtype, 0, cols, &[])?;
    let mut out = vec![0u8; dtype.storage_bytes(rows * cols).unwrap_or(0)];
    out.par_chunks_mut(dtype.block_bytes())
        .with_min_len(64)
        .zip(data.par_chunks(dtype.block_len()))
        .for_each(|(o, w)| encode(w, o));
    Ok(out)
}
