//! AVX2 + FMA row dot products for the GGUF formats of the CPU decode path (Q4_0, Q4_1, Q8_0,
//! the K-quants Q4_K, Q5_K and Q6_K that GGUF files mix, and QLoRA's NF4),
//! written with intrinsics because the generic decode-then-dot loop (matvec.rs) does not
//! vectorise well for 4-bit unpacking. Each block's 32 codes are widened to f32 lanes and
//! multiplied into x; the block scale is applied once per block:
//!   Q4_0: Σ d·(q − 8)·x = d · Σ (q − 8)·x
//!   Q4_1: Σ (d·q + m)·x = d · Σ q·x + m · Σ x     (Σ x per block precomputed once per call)
//!   Q8_0: Σ d·q·x      = d · Σ q·x
//!   Q4_K, Q5_K: Σ (d·sc·q − dmin·m)·x = Σ_sub d·sc · Σ q·x − dmin·m · Σ x   (sub-blocks of 32)
//!   Q6_K: Σ d·sc·(q − 32)·x = Σ_16 d·sc · Σ (q − 32)·x              (groups of 16)
//!   NF4:  Σ NF4[c]·absmax·x = absmax · Σ NF4[c]·x                    (table lookups by permute)
//! The products are the dequantised weights' up to rounding order: the tests hold these to
//! the reference within 1e-5 relative.
//!
//! Callers must check that the CPU has AVX2, FMA and F16C (`simd::has_avx2_fma`). No closures
//! inside the `#[target_feature]` functions: a closure is compiled without the features, and
//! passing 256-bit vectors through it costs a memory round trip per call.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// The f16 at b[0..2] as f32, through the F16C conversion.
#[inline(always)]
unsafe fn f16_at(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]) as i32;
    // SAFETY (of the caller's context): F16C is enabled in every function that inlines this.
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Horizontal sum of 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// Σ over a block of 32: w0..w3 (8 lanes each) times x[0..32].
#[inline(always)]
unsafe fn dot32(w: [__m256i; 4], x: *const f32) -> __m256 {
    let mut s = _mm256_mul_ps(_mm256_cvtepi32_ps(w[0]), _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w[1]), _mm256_loadu_ps(x.add(8)), s);
    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w[2]), _mm256_loadu_ps(x.add(16)), s);
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(w[3]), _mm256_loadu_ps(x.add(24)), s)
}

/// The 32 4-bit codes of a Q4_0/Q4_1 block's 16 bytes, in weight order (low nibbles are
/// weights 0..16, high nibbles 16..32), as four vectors of 8 i32.
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
    let bytes = _mm_loadu_si128(qs as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(bytes, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
    [
        _mm256_cvtepu8_epi32(lo),
        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
        _mm256_cvtepu8_epi32(hi),
        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
    ]
}

/// One Q4_0 row (18-byte blocks) · x.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q4_0(row: &[u8], x: &[f32]) -> f32 {
    // SAFETY: each step reads the 18 bytes of one block and the 32 floats beside it, both
    // inside their chunks; AVX2/FMA/F16C are enabled on this function (callers check the CPU).
    unsafe {
        let eight = _mm256_set1_epi32(8);
        let mut acc = _mm256_setzero_ps();
        for (b, xs) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
            let [q0, q1, q2, q3] = nibbles(b.as_ptr().add(2));
            let q = [
                _mm256_sub_epi32(q0, eight),
                _mm256_sub_epi32(q1, eight),
                _mm256_sub_epi32(q2, eight),
                _mm256_sub_epi32(q3, eight),
            ];
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), dot32(q, xs.as_ptr()), acc);
        }
        hsum(acc)
    }
}

/// One Q4_1 row (20-byte blocks) · x, with `x_sums` the sums of x over each block of 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q4_1(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    // SAFETY: as in row_q4_0, with 20-byte blocks.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for ((b, xs), &sum) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(x_sums) {
            let q = nibbles(b.as_ptr().add(4));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), dot32(q, xs.as_ptr()), acc);
            mins = f16_at(&b[2..]).mul_add(sum, mins);
        }
        hsum(acc) + mins
    }
}

/// One Q8_0 row (34-byte blocks) · x.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q8_0(row: &[u8], x: &[f32]) -> f32 {
    // SAFETY: as in row_q4_0, with 34-byte blocks; each 8-byte load stays inside qs.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (b, xs) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
            let qs = b.as_ptr().add(2);
            let q = [
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs as *const __m128i)),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(8) as *const __m128i)),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(16) as *const __m128i)),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(24) as *const __m128i)),
            ];
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), dot32(q, xs.as_ptr()), acc);
        }
        hsum(acc)
    }
}

/// 32 signed bytes as four vectors of 8 i32, in order.
#[inline(always)]
unsafe fn widen_i8(v: __m256i) -> [__m256i; 4] {
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    [
        _mm256_cvtepi8_epi32(lo),
        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo)),
        _mm256_cvtepi8_epi32(hi),
        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi)),
    ]
}

/// One Q4_K row (144-byte super-blocks of 256) · x, with `x_sums` the sums of x over each 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q4_k(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    // SAFETY: each step reads one 144-byte block and the 256 floats (8 sums) beside it, inside
    // their chunks; AVX2/FMA/F16C are enabled on this function (callers check the CPU).
    unsafe { row_k4_k5::<144>(row, x, x_sums) }
}

/// One Q5_K row (176-byte super-blocks of 256: Q4_K's layout plus 32 bytes of fifth bits) · x.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q5_k(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    // SAFETY: as row_q4_k, with 176-byte blocks (qh at 16..48, qs at 48..176).
    unsafe { row_k4_k5::<176>(row, x, x_sums) }
}

/// Q4_K (BYTES = 144) and Q5_K (BYTES = 176): sub-block s of a super-block takes nibbles of
/// qs[32·(s/2)..] (low for even s, high for odd) and, for Q5_K, bit s of qh[l] as 16.
/// Safety: only called (inlined) from the `#[target_feature]` functions above, on whole blocks.
#[inline(always)]
unsafe fn row_k4_k5<const BYTES: usize>(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    let five_bit = BYTES == 176;
    let qs_at = if five_bit { 48 } else { 16 };
    let mask = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(0x01);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for ((b, xs), sums) in row
        .chunks_exact(BYTES)
        .zip(x.chunks_exact(256))
        .zip(x_sums.chunks_exact(8))
    {
        let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
        let qh = if five_bit {
            _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        for pair in 0..4 {
            let qs = _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * pair) as *const __m256i);
            let nibbles = [
                _mm256_and_si256(qs, mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(qs), mask),
            ];
            for (half, mut q) in nibbles.into_iter().enumerate() {
                let sub = 2 * pair + half;
                if five_bit {
                    let bit =
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(sub as i32)), one);
                    q = _mm256_or_si256(q, _mm256_slli_epi16::<4>(bit));
                }
                let (sc, m) = super::blocks::scale_min_k4(sub, &b[4..16]);
                let dot = dot32(widen_i8(q), xs.as_ptr().add(32 * sub));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc as f32), dot, acc);
                mins = (dmin * m as f32).mul_add(sums[sub], mins);
            }
        }
    }
    hsum(acc) - mins
}

/// One Q6_K row (210-byte super-blocks of 256) · x.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q6_k(row: &[u8], x: &[f32]) -> f32 {
    // SAFETY: as in row_q4_k, with 210-byte blocks; the 32-byte loads stay inside ql and qh.
    unsafe {
        let (low4, two, thirty_two) = (
            _mm256_set1_epi8(0x0f),
            _mm256_set1_epi8(0x03),
            _mm256_set1_epi8(32),
        );
        let mut acc = _mm256_setzero_ps();
        for (b, xs) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
            let d = f16_at(&b[208..]);
            for half in 0..2 {
                let ql0 = _mm256_loadu_si256(b.as_ptr().add(64 * half) as *const __m256i);
                let ql1 = _mm256_loadu_si256(b.as_ptr().add(64 * half + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * half) as *const __m256i);
                // Quarter k: low or high nibbles of ql0/ql1, two bits of qh from bit 2k (no
                // closure here: it would not inherit this function's target features).
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, two));
                let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), two));
                let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), two));
                let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), two));
                let quarters = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low4), h0),
                    _mm256_or_si256(_mm256_and_si256(ql1, low4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4), h3),
                ];
                for (k, q) in quarters.into_iter().enumerate() {
                    let w = widen_i8(_mm256_sub_epi8(q, thirty_two));
                    let xp = xs.as_ptr().add(128 * half + 32 * k);
                    let scales = b.as_ptr().add(192 + 8 * half + 2 * k) as *const i8;
                    // Weights 0..16 of the quarter take scale 0, 16..32 scale 1.
                    let first = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(w[1]),
                        _mm256_loadu_ps(xp.add(8)),
                        _mm256_mul_ps(_mm256_cvtepi32_ps(w[0]), _mm256_loadu_ps(xp)),
                    );
                    let second = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(w[3]),
                        _mm256_loadu_ps(xp.add(24)),
                        _mm256_mul_ps(_mm256_cvtepi32_ps(w[2]), _mm256_loadu_ps(xp.add(16))),
                    );
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * *scales as f32), first, acc);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * *scales.add(1) as f32), second, acc);
                }
            }
        }
        hsum(acc)
    }
}

/// One NF4 row (36-byte blocks of 64: 32 code bytes, high nibble first, then the f32 absmax) · x.
/// Eight codes at a time become table values through two 8-entry permutes and a blend on bit 3.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_nf4(row: &[u8], x: &[f32]) -> f32 {
    // SAFETY: each step reads one 36-byte block and the 64 floats beside it, inside their
    // chunks (4-byte reads at offsets 0..28 of the codes); AVX2/FMA are enabled on this function.
    unsafe {
        let table = super::nf4::NF4_TABLE.as_ptr();
        let (low_half, high_half) = (_mm256_loadu_ps(table), _mm256_loadu_ps(table.add(8)));
        let low4 = _mm_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_ps();
        for (b, xs) in row.chunks_exact(36).zip(x.chunks_exact(64)) {
            let mut block = _mm256_setzero_ps();
            for k in 0..8 {
                let bytes = _mm_cvtsi32_si128(i32::from_le_bytes([
                    b[4 * k],
                    b[4 * k + 1],
                    b[4 * k + 2],
                    b[4 * k + 3],
                ]));
                let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low4);
                let low = _mm_and_si128(bytes, low4);
                // Weight 2j is the high nibble of byte j, weight 2j + 1 the low one.
                let codes = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(high, low));
                let from_low = _mm256_permutevar8x32_ps(low_half, codes);
                let from_high = _mm256_permutevar8x32_ps(high_half, codes);
                let values = _mm256_blendv_ps(
                    from_low,
                    from_high,
                    _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes)),
                );
                block = _mm256_fmadd_ps(values, _mm256_loadu_ps(xs.as_ptr().add(8 * k)), block);
            }
            let absmax = f32::from_le_bytes([b[32], b[33], b[34], b[35]]);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(absmax), block, acc);
        }
        hsum(acc)
    }
}

// Integer dot products against activations quantised to 8 bits (`Q8Vector`, blocks of 32 with
// scale dx and s = dx·Σq), as llama.cpp's `vec_dot_q4_0_q8_0` family: per block, 32 u8×i8
// products summed in pairs by `maddubs` (i16, no overflow for |w| ≤ 15 or the sign trick
// below), widened to i32 by `madd`, then one f32 FMA with dw·dx. Signed weights (Q4_0 − 8,
// Q8_0) use |w| as the unsigned operand and move w's sign onto x: |w| · sign(w)·x = w·x.

/// Σ over 32 lanes of u8 a × i8 b, as 8 f32 lanes.
#[inline(always)]
unsafe fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(a, b);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// Σ over 32 lanes of i8 a × i8 b (a ≠ −128), as 8 f32 lanes.
#[inline(always)]
unsafe fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256 {
    dot_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

/// A Q4_0/Q4_1 block's 16 bytes as 32 u8 codes in weight order (low nibbles first).
#[inline(always)]
unsafe fn nibbles_u8(qs: *const u8) -> __m256i {
    let bytes = _mm_loadu_si128(qs as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(bytes, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
    _mm256_set_m128i(hi, lo)
}

/// One Q4_0 row · a Q8 vector: Σ_blocks dw·dx · Σ (q − 8)·qx.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q4_0_q8(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    // SAFETY: each step reads one 18-byte block and the 32 codes beside it, both inside their
    // chunks; AVX2/FMA/F16C are enabled on this function (callers check the CPU).
    unsafe {
        let eight = _mm256_set1_epi8(8);
        let mut acc = _mm256_setzero_ps();
        for ((b, xs), &dx) in row.chunks_exact(18).zip(xq.chunks_exact(32)).zip(xd) {
            let w = _mm256_sub_epi8(nibbles_u8(b.as_ptr().add(2)), eight);
            let x = _mm256_loadu_si256(xs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * dx), dot_i8_i8(w, x), acc);
        }
        hsum(acc)
    }
}

/// One Q4_1 row · a Q8 vector: Σ_blocks dw·dx · Σ q·qx + m · sx.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q4_1_q8(row: &[u8], xq: &[i8], xd: &[f32], xs_sum: &[f32]) -> f32 {
    // SAFETY: as in row_q4_0_q8, with 20-byte blocks.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (((b, xs), &dx), &sx) in row
            .chunks_exact(20)
            .zip(xq.chunks_exact(32))
            .zip(xd)
            .zip(xs_sum)
        {
            let w = nibbles_u8(b.as_ptr().add(4));
            let x = _mm256_loadu_si256(xs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * dx), dot_u8_i8(w, x), acc);
            mins = f16_at(&b[2..]).mul_add(sx, mins);
        }
        hsum(acc) + mins
    }
}

/// One Q8_0 row · a Q8 vector: Σ_blocks dw·dx · Σ q·qx.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn row_q8_0_q8(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    // SAFETY: as in row_q4_0_q8, with 34-byte blocks (the 32-byte load stays inside qs).
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for ((b, xs), &dx) in row.chunks_exact(34).zip(xq.chunks_exact(32)).zip(xd) {
            let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
            let x = _mm256_loadu_si256(xs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * dx), dot_i8_i8(w, x), acc);
        }
        hsum(acc)
    }
}
