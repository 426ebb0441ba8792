//! bitsandbytes' NF4 (QLoRA's 4-bit NormalFloat): the 16-value code table, blockwise
//! quantisation with one absmax per 64 weights, and double quantisation of the absmaxes
//! (8-bit codes of bitsandbytes' signed dynamic map in blocks of 256, after subtracting their
//! mean), as `bnb.functional.quantize_4bit(quant_type="nf4", compress_statistics=True)` does.

use llama_core::DType;

use super::blocks::{Block, Nf4};
use super::QuantMatrix;
use crate::error::{OpsError, Result};

/// The NF4 code values (bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to
/// [−1, 1], with an exact 0.
// The literals are bitsandbytes' own (as in kernels/quant.cu), rounded to f32 by the compiler.
#[allow(clippy::excessive_precision)]
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The code of the table entry nearest to `x` (|x| ≤ 1): the decision thresholds are the
/// midpoints between neighbouring entries, as in bitsandbytes' `dQuantizeNF4`.
#[inline]
pub(crate) fn nearest_code(x: f32) -> u8 {
    let mut code = 0u8;
    for i in 0..15 {
        let midpoint = ((NF4_TABLE[i] as f64 + NF4_TABLE[i + 1] as f64) / 2.0) as f32;
        if x > midpoint {
            code = i as u8 + 1;
        }
    }
    code
}

/// Quantises one block of 64 weights into `out` (36 bytes): absmax = max |w|, then each
/// w / absmax to its nearest code, two codes per byte, the first in the high nibble.
pub(crate) fn encode_block(w: &[f32], out: &mut [u8]) {
    let absmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
    for (byte, pair) in out[..32].iter_mut().zip(w.chunks_exact(2)) {
        *byte = (nearest_code(pair[0] * inv) << 4) | nearest_code(pair[1] * inv);
    }
    out[32..36].copy_from_slice(&absmax.to_le_bytes());
}

/// Blocks of absmaxes per second-level scale.
pub const DOUBLE_QUANT_BLOCK: usize = 256;

/// NF4 weights with double-quantised statistics: the 4-bit codes, and each block's absmax as
/// an 8-bit code of [`dynamic_map`] times its group's f32 scale, plus the mean of all absmaxes.
/// Takes 33 bytes per 64 weights instead of 36 (0.37 bits per weight less).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4DoubleQuant {
    /// 32 bytes of codes per block.
    pub codes: Vec<u8>,
    /// One 8-bit code per block.
    pub absmax_codes: Vec<u8>,
    /// One scale per [`DOUBLE_QUANT_BLOCK`] blocks.
    pub absmax_scales: Vec<f32>,
    /// The mean absmax, subtracted before quantising them.
    pub offset: f32,
}

impl Nf4DoubleQuant {
    /// Compresses an NF4 matrix (36-byte blocks with f32 absmaxes).
    pub fn compress(w: &QuantMatrix) -> Result<Nf4DoubleQuant> {
        if w.dtype() != DType::Nf4 {
            return Err(OpsError::UnsupportedDType {
                op: "Nf4DoubleQuant::compress",
                dtype: w.dtype(),
                supported: "NF4",
            });
        }
        let blocks = w.bytes();
        let n = blocks.len() / Nf4::BYTES;
        let block = |i: usize| &blocks[i * Nf4::BYTES..(i + 1) * Nf4::BYTES];
        let absmax: Vec<f32> = (0..n)
            .map(|i| {
                let b = block(i);
                f32::from_le_bytes([b[32], b[33], b[34], b[35]])
            })
            .collect();
        let codes = (0..n)
            .flat_map(|i| block(i)[..32].iter().copied())
            .collect();
        let offset = if n == 0 {
            0.0
        } else {
            (absmax.iter().map(|&a| a as f64).sum::<f64>() / n as f64) as f32
        };
        let map = dynamic_map();
        let mut absmax_codes = Vec::with_capacity(n);
        let mut absmax_scales = Vec::with_capacity(n.div_ceil(DOUBLE_QUANT_BLOCK));
        for group in absmax.chunks(DOUBLE_QUANT_BLOCK) {
            let scale = group.iter().fold(0f32, |m, a| m.max((a - offset).abs()));
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            absmax_scales.push(scale);
            absmax_codes.extend(group.iter().map(|a| nearest_in(&map, (a - offset) * inv)));
        }
        Ok(Nf4DoubleQuant {
            codes,
            absmax_codes,
            absmax_scales,
            offset,
        })
    }

    /// The absmax of block `i`: map[code] · scale + offset.
    pub fn absmax(&self, i: usize, map: &[f32; 256]) -> f32 {
        map[self.absmax_codes[i] as usize] * self.absmax_scales[i / DOUBLE_QUANT_BLOCK]
            + self.offset
    }

    /// Back to NF4 blocks with f32 absmaxes (the form the kernels read).
    pub fn expand(&self) -> Vec<u8> {
        let map = dynamic_map();
        let mut out = Vec::with_capacity(self.absmax_codes.len() * Nf4::BYTES);
        for (i, codes) in self.codes.chunks_exact(32).enumerate() {
            out.extend_from_slice(codes);
            out.extend_from_slice(&self.absmax(i, &map).to_le_bytes());
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.absmax_codes.len() + 4 * self.absmax_scales.len() + 4
    }
}

/// bitsandbytes' signed dynamic quantisation map (`create_dynamic_map(signed=True)`, 8 bits):
/// for exponents i = 0..7, 2^i fraction values (midpoints of linspace(0.1, 1, 2^i + 1)) times
/// ±10^(i−6), plus 0 and 1, sorted.
pub fn dynamic_map() -> [f32; 256] {
    let mut values = Vec::with_capacity(256);
    for i in 0..7 {
        let items = (1usize << i) + 1;
        let step = 0.9f32 / (items - 1) as f32;
        let scale = 10f32.powi(i - 6);
        for j in 0..items - 1 {
            let (lo, hi) = (0.1 + step * j as f32, 0.1 + step * (j + 1) as f32);
            let mean = (lo + hi) / 2.0;
            values.push(scale * mean);
            values.push(-scale * mean);
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    // 2 · (1 + 2 + … + 64) = 254 fraction values, plus 0 and 1: always 256.
    values.try_into().expect("the dynamic map has 256 entries")
}

/// The index of the entry of the sorted `map` nearest to `x`.
fn nearest_in(map: &[f32; 256], x: f32) -> u8 {
    let above = map.partition_point(|&v| v < x).min(255);
    let below = above.saturating_sub(1);
    if (x - map[below]).abs() <= (map[above] - x).abs() {
        below as u8
    } else {
        above as u8
    }
}
