//! The block layouts of the quantised formats and their decoding: one block of bytes to its
//! `LEN` f32 values. These functions are the specification (the layouts of ggml's
//! `ggml-common.h` and bitsandbytes' NF4) and also the inner loop of every fast path, so the
//! dequantised values are the same bits everywhere. Each multiply and add is rounded
//! separately, as in gguf-py's numpy dequantisation that transformers uses.

use llama_core::DType;

use super::nf4::NF4_TABLE;

/// One block-quantised format.
pub(crate) trait Block {
    const DTYPE: DType;
    /// Weights per block.
    const LEN: usize = Self::DTYPE.block_len();
    /// Bytes per block.
    const BYTES: usize = Self::DTYPE.block_bytes();
    /// Decodes `block` (`BYTES` bytes) into `out` (`LEN` values).
    fn decode(block: &[u8], out: &mut [f32]);
}

/// The little-endian f16 at `at`, widened.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml `block_q4_0`: { f16 d; u8 qs[16] }, w = d · (q − 8); weight j in the low nibble of
/// qs[j], weight j + 16 in the high nibble.
pub(crate) struct Q4_0;
impl Block for Q4_0 {
    const DTYPE: DType = DType::Q4_0;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        let (lo, hi) = out[..32].split_at_mut(16);
        for (j, &q) in b[2..18].iter().enumerate() {
            lo[j] = ((q & 0xf) as i32 - 8) as f32 * d;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// ggml `block_q4_1`: { f16 d; f16 m; u8 qs[16] }, w = d · q + m.
pub(crate) struct Q4_1;
impl Block for Q4_1 {
    const DTYPE: DType = DType::Q4_1;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let (lo, hi) = out[..32].split_at_mut(16);
        for (j, &q) in b[4..20].iter().enumerate() {
            lo[j] = (q & 0xf) as f32 * d + m;
            hi[j] = (q >> 4) as f32 * d + m;
        }
    }
}

/// ggml `block_q8_0`: { f16 d; i8 qs[32] }, w = d · q.
pub(crate) struct Q8_0;
impl Block for Q8_0 {
    const DTYPE: DType = DType::Q8_0;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, &q) in out[..32].iter_mut().zip(&b[2..34]) {
            *o = q as i8 as f32 * d;
        }
    }
}

/// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (ggml
/// `get_scale_min_k4`): 8 pairs packed into 12 bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// ggml `block_q4_K`: { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }: 8 sub-blocks of 32,
/// w = d·sc · q − dmin·m; sub-blocks 2i and 2i+1 share qs[32i..32i+32] (low, high nibbles).
pub(crate) struct Q4K;
impl Block for Q4K {
    const DTYPE: DType = DType::Q4K;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for (pair, (q, y)) in qs
            .chunks_exact(32)
            .zip(out.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * pair, scales);
            let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0xf) as f32 - min1;
                hi[l] = d2 * (q[l] >> 4) as f32 - min2;
            }
        }
    }
}

/// ggml `block_q5_K`: { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }: as Q4_K
/// with a fifth bit per weight, bit 2i (low nibbles) and 2i+1 (high) of qh[l] for pair i.
pub(crate) struct Q5K;
impl Block for Q5K {
    const DTYPE: DType = DType::Q5K;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for (pair, (q, y)) in qs
            .chunks_exact(32)
            .zip(out.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * pair, scales);
            let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * ((q[l] & 0xf) + h1) as f32 - min1;
                hi[l] = d2 * ((q[l] >> 4) + h2) as f32 - min2;
            }
        }
    }
}

/// ggml `block_q6_K`: { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }: 16 sub-blocks of 16,
/// w = d·sc · (q − 32) with q 6 bits (4 from ql, 2 from qh); two halves of 128 weights.
pub(crate) struct Q6K;
impl Block for Q6K {
    const DTYPE: DType = DType::Q6K;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 208);
        for half in 0..2 {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let sc = &b[192 + 8 * half..192 + 8 * half + 8];
            let y = &mut out[128 * half..128 * half + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// bitsandbytes NF4, one block of 64: { u8 codes[32]; f32 absmax }, w = NF4[code] · absmax;
/// weight 2j in the high nibble of codes[j], weight 2j + 1 in the low nibble.
pub(crate) struct Nf4;
impl Block for Nf4 {
    const DTYPE: DType = DType::Nf4;
    #[inline(always)]
    fn decode(b: &[u8], out: &mut [f32]) {
        let absmax = f32::from_le_bytes([b[32], b[33], b[34], b[35]]);
        for (pair, &q) in out[..64].chunks_exact_mut(2).zip(&b[..32]) {
            pair[0] = NF4_TABLE[(q >> 4) as usize] * absmax;
            pair[1] = NF4_TABLE[(q & 0xf) as usize] * absmax;
        }
    }
}

/// Calls `$body` with `$F` bound to the block type of `$dtype`, or evaluates `$float` for the
/// float dtypes.
macro_rules! with_block {
    ($dtype:expr, $F:ident => $body:expr, float => $float:expr) => {
        match $dtype {
            llama_core::DType::Q4_0 => {
                type $F = $crate::quant::blocks::Q4_0;
                $body
            }
            llama_core::DType::Q4_1 => {
                type $F = $crate::quant::blocks::Q4_1;
                $body
            }
            llama_core::DType::Q8_0 => {
                type $F = $crate::quant::blocks::Q8_0;
                $body
            }
            llama_core::DType::Q4K => {
                type $F = $crate::quant::blocks::Q4K;
                $body
            }
            llama_core::DType::Q5K => {
                type $F = $crate::quant::blocks::Q5K;
                $body
            }
            llama_core::DType::Q6K => {
                type $F = $crate::quant::blocks::Q6K;
                $body
            }
            llama_core::DType::Nf4 => {
                type $F = $crate::quant::blocks::Nf4;
                $body
            }
            llama_core::DType::F32 | llama_core::DType::F16 | llama_core::DType::BF16 => $float,
        }
    };
}
pub(crate) use with_block;
