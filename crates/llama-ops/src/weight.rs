//! [`Weight`]: the owned weight of a linear layer, [N, K] in HF's [out, in] layout, dense f32,
//! bf16 or block-quantised. Layers hold `Weight`s and call [`Weight::forward`] without caring which
//! kind they hold: a quantised weight stays quantised and is dequantised inside the product.

use std::borrow::Cow;

use llama_core::{bf16, DType};
use rayon::prelude::*;

use crate::bf16_gemm::{self, Panels};
use crate::error::{check_len, rows_of, OpsError, Result};
use crate::matmul::{linear, linear_backward_input, matvec};
use crate::quant::{
    matvec_q8_group, quantize, supports_q8, tiled_backward_input, tiled_matmul, Q8Vector,
    QuantMatrix,
};

/// How activations enter products with quantised weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// f32, multiplied by the exactly dequantised weights.
    #[default]
    F32,
    /// A single row (decoding) is quantised to 8 bits ([`Q8Vector`]) for integer dot products
    /// with Q4_0, Q4_1 and Q8_0 weights; everything else as `F32`.
    Q8,
}

/// A [N, K] linear weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Weight {
    /// Row-major f32 values.
    Dense {
        data: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    /// Row-major bf16 values: half the memory of `Dense`; widened to f32 as a product reads
    /// them (one row: a SIMD dot product per output; more rows: the whole matrix, then the
    /// f32 GEMM).
    Bf16 {
        data: Vec<bf16>,
        rows: usize,
        cols: usize,
    },
    /// bf16 values packed twice for the AVX512-BF16 product ([`bf16_gemm`]): as Wᵀ [K, N] for
    /// the forward's x · Wᵀ and as W [N, K] for the input gradient's dy · W. Its products round
    /// the activations to bf16 too (sums in f32): `fast` precision's CPU training on CPUs that
    /// have AVX512-BF16 ([`Weight::pack_bf16`]). The memory of `Dense`.
    Bf16Panels { forward: Panels, backward: Panels },
    /// Blocks of a quantised dtype along each row (see [`QuantMatrix`]).
    Quant {
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    },
}

impl Weight {
    /// A dense [rows, cols] weight; `data` must hold rows · cols values.
    pub fn dense(data: Vec<f32>, rows: usize, cols: usize) -> Result<Weight> {
        check_len("Weight::dense", "data", data.len(), rows * cols)?;
        Ok(Weight::Dense { data, rows, cols })
    }

    /// A quantised [rows, cols] weight; `bytes` must hold exactly its blocks.
    pub fn quantized(dtype: DType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Weight> {
        QuantMatrix::new(dtype, rows, cols, &bytes)?;
        Ok(Weight::Quant {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    /// (N, K).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Weight::Dense { rows, cols, .. }
            | Weight::Bf16 { rows, cols, .. }
            | Weight::Quant { rows, cols, .. } => (*rows, *cols),
            Weight::Bf16Panels { forward, .. } => (forward.shape().1, forward.shape().0),
        }
    }

    /// F32 for dense weights, BF16, else the block dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense { .. } => DType::F32,
            Weight::Bf16 { .. } | Weight::Bf16Panels { .. } => DType::BF16,
            Weight::Quant { dtype, .. } => *dtype,
        }
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Weight::Dense { data, .. } => std::mem::size_of_val(data.as_slice()),
            Weight::Bf16 { data, .. } => std::mem::size_of_val(data.as_slice()),
            Weight::Bf16Panels { forward, backward } => {
                forward.memory_bytes() + backward.memory_bytes()
            }
            Weight::Quant { bytes, .. } => bytes.len(),
        }
    }

    /// The quantised view, for quantised weights.
    pub fn as_quant(&self) -> Option<QuantMatrix<'_>> {
        self.quant().ok()
    }

    /// The quantised view (its sizes were checked when the weight was built).
    fn quant(&self) -> Result<QuantMatrix<'_>> {
        match self {
            Weight::Dense { .. } | Weight::Bf16 { .. } | Weight::Bf16Panels { .. } => {
                Err(OpsError::UnsupportedDType {
                    op: "Weight::quant",
                    dtype: self.dtype(),
                    supported: "quantised dtypes",
                })
            }
            Weight::Quant {
                dtype,
                rows,
                cols,
                bytes,
            } => QuantMatrix::new(*dtype, *rows, *cols, bytes),
        }
    }

    /// The values in f32, [N, K]: borrowed when dense, widened from bf16, dequantised when
    /// quantised.
    pub fn to_f32(&self) -> Result<Cow<'_, [f32]>> {
        Ok(match self {
            Weight::Dense { data, .. } => Cow::Borrowed(data),
            Weight::Bf16 { data, .. } => Cow::Owned(widen(data)),
            Weight::Bf16Panels { forward, .. } => {
                let (rows, cols) = self.shape();
                Cow::Owned(
                    (0..rows * cols)
                        .into_par_iter()
                        .map(|i| forward.get(i % cols, i / cols))
                        .collect(),
                )
            }
            Weight::Quant { .. } => Cow::Owned(self.quant()?.dequantize()),
        })
    }

    /// The weight packed for the AVX512-BF16 product ([`Weight::Bf16Panels`]): its values
    /// rounded to bf16 (to nearest even), and every product with it then rounds the activations
    /// to bf16 as well — for `fast` precision only, and fast only where
    /// [`llama_core::CpuFeatures`] reports `avx512bf16` (elsewhere a plain-code kernel runs).
    pub fn pack_bf16(&self) -> Result<Weight> {
        if let Weight::Bf16Panels { .. } = self {
            return Ok(self.clone());
        }
        let (rows, cols) = self.shape();
        let values = self.to_f32()?;
        Ok(Weight::Bf16Panels {
            forward: Panels::pack(cols, rows, |k, n| values[n * cols + k]),
            backward: Panels::pack(rows, cols, |n, k| values[n * cols + k]),
        })
    }

    /// The same weight stored as `dtype`: F32 dequantises, BF16 rounds the f32 values to
    /// nearest even, a block dtype quantises them (Q4_0, Q4_1, Q8_0, NF4; see [`quantize`]).
    pub fn convert(&self, dtype: DType) -> Result<Weight> {
        let (rows, cols) = self.shape();
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let values = self.to_f32()?;
        match dtype {
            DType::F32 => Weight::dense(values.into_owned(), rows, cols),
            DType::BF16 => Ok(Weight::Bf16 {
                data: values.iter().map(|&v| bf16::from_f32(v)).collect(),
                rows,
                cols,
            }),
            _ => Weight::quantized(dtype, rows, cols, quantize(dtype, &values, cols)?),
        }
    }

    /// y [M, N] = x [M, K] · Wᵀ.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.forward_with(x, y, Activations::F32)
    }

    /// y [M, N] = x [M, K] · Wᵀ with the activations treated as `mode` says.
    pub fn forward_with(&self, x: &[f32], y: &mut [f32], mode: Activations) -> Result<()> {
        let (_, cols) = self.shape();
        if mode == Activations::Q8 && x.len() == cols && supports_q8(self.dtype()) {
            return self.quant()?.matvec_q8(&Q8Vector::quantize(x)?, y);
        }
        match self {
            Weight::Dense { data, cols, .. } => linear(x, data, *cols, y),
            Weight::Bf16 { data, cols, .. } if x.len() == *cols => matvec(data, x, y),
            Weight::Bf16 { data, rows, cols } => {
                let m = rows_of("Weight::forward", "x", x.len(), *cols)?;
                check_len("Weight::forward", "y", y.len(), m * rows)?;
                tiled_matmul(*rows, *cols, x, y, |first, tile| {
                    widen_rows(data, *cols, first, tile)
                })
            }
            Weight::Bf16Panels { forward, .. } => {
                let m = rows_of("Weight::forward", "x", x.len(), cols)?;
                check_len("Weight::forward", "y", y.len(), m * forward.shape().1)?;
                bf16_gemm::matmul(x, forward, y);
                Ok(())
            }
            Weight::Quant { .. } => self.quant()?.matmul(x, y),
        }
    }

    /// y_i = x · W_iᵀ for several weights that read the same x [M, K] (q, k and v; gate and
    /// up): in `Q8` mode a single row is quantised once and every product runs in one
    /// parallel pass; otherwise one [`Self::forward_with`] each.
    pub fn forward_group(
        weights: &[&Weight],
        x: &[f32],
        outs: Vec<&mut [f32]>,
        mode: Activations,
    ) -> Result<()> {
        let single_row = weights
            .iter()
            .all(|w| w.shape().1 == x.len() && supports_q8(w.dtype()));
        if mode == Activations::Q8 && single_row && weights.len() == outs.len() {
            let views = weights
                .iter()
                .map(|w| w.quant())
                .collect::<Result<Vec<_>>>()?;
            let xq = Q8Vector::quantize(x)?;
            return matvec_q8_group(views.into_iter().zip(outs).collect(), &xq);
        }
        check_len("Weight::forward_group", "outs", outs.len(), weights.len())?;
        for (w, y) in weights.iter().zip(outs) {
            w.forward_with(x, y, mode)?;
        }
        Ok(())
    }

    /// dx [M, K] = dy [M, N] · W, the input gradient of [`Self::forward`].
    pub fn backward_input(&self, dy: &[f32], dx: &mut [f32]) -> Result<()> {
        match self {
            Weight::Dense { data, cols, .. } => linear_backward_input(dy, data, *cols, dx),
            Weight::Bf16 { data, rows, cols } => {
                let m = rows_of("Weight::backward_input", "dy", dy.len(), *rows)?;
                check_len("Weight::backward_input", "dx", dx.len(), m * cols)?;
                tiled_backward_input(*rows, *cols, dy, dx, |first, tile| {
                    widen_rows(data, *cols, first, tile)
                })
            }
            Weight::Bf16Panels { backward, .. } => {
                let (rows, cols) = backward.shape();
                let m = rows_of("Weight::backward_input", "dy", dy.len(), rows)?;
                check_len("Weight::backward_input", "dx", dx.len(), m * cols)?;
                bf16_gemm::matmul(dy, backward, dx);
                Ok(())
            }
            Weight::Quant { .. } => self.quant()?.backward_input(dy, dx),
        }
    }

    /// Row `index` in f32 into `out` [K]: an embedding lookup.
    pub fn row(&self, index: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.shape();
        check_len("Weight::row", "out", out.len(), cols)?;
        if index >= rows {
            return Err(OpsError::InvalidArgument {
                op: "Weight::row",
                arg: "index",
                value: index.to_string(),
                reason: "past the last row",
            });
        }
        match self {
            Weight::Dense { data, .. } => {
                out.copy_from_slice(&data[index * cols..(index + 1) * cols]);
                Ok(())
            }
            Weight::Bf16 { data, .. } => widen_rows(data, cols, index, out),
            Weight::Bf16Panels { forward, .. } => {
                out.iter_mut()
                    .enumerate()
                    .for_each(|(k, o)| *o = forward.get(k, index));
                Ok(())
            }
            Weight::Quant { .. } => self.quant()?.dequantize_rows(index, out),
        }
    }
}

/// bf16 values widened to f32 (exact), in parallel.
fn widen(data: &[bf16]) -> Vec<f32> {
    data.par_iter()
        .with_min_len(1 << 14)
        .map(|v| v.to_f32())
        .collect()
}

/// Rows first.. of a [_, cols] bf16 matrix widened into `out` (whole rows; the caller keeps
/// them in range).
fn widen_rows(data: &[bf16], cols: usize, first: usize, out: &mut [f32]) -> Result<()> {
    let src = &data[first * cols..first * cols + out.len()];
    out.iter_mut().zip(src).for_each(|(o, v)| *o = v.to_f32());
    Ok(())
}
