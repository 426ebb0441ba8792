//! A bf16 matrix product for `fast` precision on CPUs with AVX512-BF16: c [M, N] = a [M, K] · b
//! [K, N] with both operands rounded to bf16 (to nearest even) and every sum kept in f32.
//! VDPBF16PS adds two bf16 products into each of 16 f32 lanes, twice the multiply-adds of an f32
//! FMA of the same width (on the development machine's AMD EPYC cores one thread ran this
//! kernel at ~215 GFLOP/s against ~85 for the `gemm` crate's f32 kernel).
//!
//! Layout (oneDNN's "VNNI" packing): b is packed once ([`Panels`], the weights) in panels of
//! [`NR`] columns holding, for each pair of rows (2p, 2p+1), each column's two values side by
//! side — [K/2][NR][2]. a is packed per call in panels of [`MR`] rows the same way — [K/2][MR][2]
//! — so the micro-kernel broadcasts one row's pair as a 32-bit lane and multiplies it into two
//! vectors of 16 columns' pairs: MR × NR outputs live in 24 of the 32 vector registers. K is
//! padded with a zero row to even, M and N with zero rows and columns to whole panels, and only
//! the real outputs are stored. Each output is one micro-kernel's full sum over K, so the
//! result does not depend on the number of threads.

use half::bf16;
use llama_core::CpuFeatures;
use rayon::prelude::*;

/// Rows of a (and of c) per micro-kernel call.
pub const MR: usize = 12;
/// Columns of b (and of c) per micro-kernel call: two vectors of 16 f32 lanes.
pub const NR: usize = 32;
/// Micro-kernel calls along M and N in one parallel task (a 96 × 512 tile of c).
const TILE_PANELS: (usize, usize) = (8, 16);

/// Two bf16 values side by side, as VDPBF16PS reads them: the first in the low 16 bits.
type Pair = u32;

fn pair(first: f32, second: f32) -> Pair {
    u32::from(bf16::from_f32(first).to_bits()) | (u32::from(bf16::from_f32(second).to_bits()) << 16)
}

/// The pair's two values, widened (exactly).
fn unpair(p: Pair) -> [f32; 2] {
    [
        bf16::from_bits(p as u16).to_f32(),
        bf16::from_bits((p >> 16) as u16).to_f32(),
    ]
}

/// Pairs of rows along K: ⌈K/2⌉.
fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// A [K, N] right operand packed for [`matmul`]: panel j holds columns j·NR.. as [K/2][NR]
/// pairs (zero past K and N).
#[derive(Clone, Debug, PartialEq)]
pub struct Panels {
    data: Vec<Pair>,
    k: usize,
    n: usize,
}

impl Panels {
    /// Packs the [K, N] matrix whose (r, c) value is `value(r, c)`, rounded to bf16.
    pub fn pack(k: usize, n: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Panels {
        let panel_len = pairs(k) * NR;
        let mut data = vec![0; n.div_ceil(NR) * panel_len];
        if panel_len > 0 {
            data.par_chunks_mut(panel_len)
                .enumerate()
                .for_each(|(panel, out)| {
                    for (slot, v) in out.iter_mut().enumerate() {
                        let (r, c) = (2 * (slot / NR), panel * NR + slot % NR);
                        let at = |r: usize| if r < k && c < n { value(r, c) } else { 0.0 };
                        *v = pair(at(r), at(r + 1));
                    }
                });
        }
        Panels { data, k, n }
    }

    /// (K, N).
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The stored (bf16) value at (r, c), widened (the caller keeps r < K, c < N).
    pub(crate) fn get(&self, r: usize, c: usize) -> f32 {
        let slot = c / NR * pairs(self.k) * NR + r / 2 * NR + c % NR;
        unpair(self.data[slot])[r % 2]
    }

    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// Panel j: ⌈K/2⌉ · NR pairs.
    fn panel(&self, j: usize) -> &[Pair] {
        let len = pairs(self.k) * NR;
        &self.data[j * len..(j + 1) * len]
    }
}

/// a [M, K] row-major f32 rounded to bf16 and packed in panels of MR rows, [K/2][MR] pairs
/// (with VCVTNE2PS2BF16 when `simd`: the same rounding, but subnormal inputs become zero).
fn pack_rows(simd: bool, a: &[f32], m: usize, k: usize) -> Vec<Pair> {
    let panel_len = pairs(k) * MR;
    let mut packed = vec![0; m.div_ceil(MR) * panel_len];
    if panel_len == 0 {
        return packed;
    }
    packed
        .par_chunks_mut(panel_len)
        .zip(a.par_chunks(MR * k))
        .for_each(|(out, rows)| {
            for (i, row) in rows.chunks_exact(k).enumerate() {
                let whole = match simd {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX512-BF16 (the caller asked CpuFeatures); out holds
                    // ⌈K/2⌉ · MR pairs and i < MR, as the function requires.
                    true => unsafe { avx512::pack_row(row, out, i) },
                    _ => 0,
                };
                for (p, two) in row.chunks(2).enumerate().skip(whole) {
                    out[p * MR + i] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                }
            }
        });
    packed
}

/// c [M, N] row-major = a [M, K] row-major · b, both rounded to bf16, sums in f32 (overwritten).
/// Panics when the lengths disagree (callers check the shapes: an internal helper).
pub(crate) fn matmul(a: &[f32], b: &Panels, c: &mut [f32]) {
    matmul_with(CpuFeatures::get().avx512bf16, a, b, c)
}

/// [`matmul`] with the AVX512-BF16 micro-kernel (`simd`, which the CPU must have) or the plain one.
fn matmul_with(simd: bool, a: &[f32], b: &Panels, c: &mut [f32]) {
    let (k, n) = b.shape();
    let m = match (k, n) {
        (0, 0) => 0,
        (0, n) => c.len() / n,
        (k, _) => a.len() / k,
    };
    assert!(
        a.len() == m * k && c.len() == m * n,
        "bf16_gemm::matmul: inconsistent lengths"
    );
    if m == 0 || n == 0 {
        return;
    }
    let packed = pack_rows(simd, a, m, k);
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (row_tiles, col_tiles) = (
        row_panels.div_ceil(TILE_PANELS.0),
        col_panels.div_ceil(TILE_PANELS.1),
    );
    let out = OutPtr(c.as_mut_ptr(), c.len());
    (0..row_tiles * col_tiles).into_par_iter().for_each(|tile| {
        let (row_tile, col_tile) = (tile / col_tiles, tile % col_tiles);
        let rows = row_tile * TILE_PANELS.0..row_panels.min((row_tile + 1) * TILE_PANELS.0);
        for j in col_tile * TILE_PANELS.1..col_panels.min((col_tile + 1) * TILE_PANELS.1) {
            for i in rows.clone() {
                let a_panel = &packed[i * pairs(k) * MR..(i + 1) * pairs(k) * MR];
                let block = Block {
                    first: i * MR * n + j * NR,
                    rows: MR.min(m - i * MR),
                    cols: NR.min(n - j * NR),
                    stride: n,
                };
                block.compute(simd, a_panel, b.panel(j), &out);
            }
        }
    });
}

/// c's base pointer and length, shared by the tasks: each writes only its own blocks.
struct OutPtr(*mut f32, usize);
// SAFETY: the tasks of `matmul` write disjoint blocks of c through this pointer (each block is
// one (row panel, column panel) pair, visited by exactly one task), and c outlives them all.
unsafe impl Sync for OutPtr {}

/// One MR × NR block of c: `rows` × `cols` real outputs from element `first`, rows `stride` apart.
struct Block {
    first: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Block {
    fn compute(&self, simd: bool, a: &[Pair], b: &[Pair], c: &OutPtr) {
        let last = self.first + (self.rows - 1) * self.stride + self.cols;
        assert!(last <= c.1 && a.len() / MR == b.len() / NR);
        let mut sums = [[0f32; NR]; MR];
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX512-BF16 (the caller asked CpuFeatures), and a and b hold
            // the same number of pairs (asserted above).
            true => unsafe { avx512::block(a, b, &mut sums) },
            _ => portable_block(a, b, &mut sums),
        }
        for (i, row) in sums.iter().take(self.rows).enumerate() {
            let at = self.first + i * self.stride;
            // SAFETY: the assert above keeps at..at + cols inside c, and no other task writes
            // this block (see OutPtr).
            let out = unsafe { std::slice::from_raw_parts_mut(c.0.add(at), self.cols) };
            out.copy_from_slice(&row[..self.cols]);
        }
    }
}

/// The micro-kernel in plain code: each output the f32 sum over pairs of (a₀b₀ + a₁b₁).
fn portable_block(a: &[Pair], b: &[Pair], sums: &mut [[f32; NR]; MR]) {
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &a) in sums.iter_mut().zip(ap) {
            let [a0, a1] = unpair(a);
            for (s, &b) in row.iter_mut().zip(bp) {
                let [b0, b1] = unpair(b);
                *s += a0 * b0 + a1 * b1;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Pair, MR, NR};
    use std::arch::x86_64::*;

    /// sums[i][j] = Σ over pairs p of a(i, p) · b(p, j), two bf16 products per lane and pair.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16; a and b must hold the same number of pairs
    /// (MR and NR a pair of rows).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(a: &[Pair], b: &[Pair], sums: &mut [[f32; NR]; MR]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            // SAFETY: bp holds NR = 32 pairs: two 64-byte vectors.
            let (b0, b1) = unsafe { (load(bp.as_ptr()), load(bp.as_ptr().add(16))) };
            for (row, &a) in acc.iter_mut().zip(ap) {
                let a: __m512bh = as_pairs(_mm512_set1_epi32(a as i32));
                row[0] = _mm512_dpbf16_ps(row[0], a, b0);
                row[1] = _mm512_dpbf16_ps(row[1], a, b1);
            }
        }
        for (row, out) in acc.iter().zip(sums.iter_mut()) {
            // SAFETY: out holds NR = 32 f32 values: two vectors.
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr(), row[0]);
                _mm512_storeu_ps(out.as_mut_ptr().add(16), row[1]);
            }
        }
    }

    /// Packs row i of a panel (see `pack_rows`) 16 pairs at a time: out[p · MR + i] = the pair
    /// (row[2p], row[2p + 1]) rounded to bf16. Returns how many pairs it wrote (the rest, fewer
    /// than 16, are the caller's).
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16; out must hold ⌈row.len()/2⌉ · MR pairs and
    /// i < MR.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_row(row: &[f32], out: &mut [Pair], i: usize) -> usize {
        let chunks = row.chunks_exact(32);
        let whole = chunks.len() * 16;
        assert!(i < MR && out.len() >= whole * MR);
        let mut pairs = [0u32; 16];
        for (c, values) in chunks.enumerate() {
            // SAFETY: values holds 32 f32: two vectors; pairs holds 16 u32: one vector.
            unsafe {
                let lo = _mm512_loadu_ps(values.as_ptr());
                let hi = _mm512_loadu_ps(values.as_ptr().add(16));
                // The second operand fills the low half: values 0..16, then 16..32.
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    pairs.as_mut_ptr().cast(),
                    std::mem::transmute::<__m512bh, __m512i>(v),
                );
            }
            for (j, &p) in pairs.iter().enumerate() {
                out[(c * 16 + j) * MR + i] = p;
            }
        }
        whole
    }

    /// 16 pairs from p.
    ///
    /// # Safety
    /// p must point to 16 readable pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load(p: *const Pair) -> __m512bh {
        // SAFETY: the caller keeps p..p + 16 readable.
        as_pairs(unsafe { _mm512_loadu_si512(p.cast()) })
    }

    /// The same 512 bits seen as 32 bf16 values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn as_pairs(v: __m512i) -> __m512bh {
        // SAFETY: both types are 512 plain bits; every bit pattern is a valid value of either.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rounded(v: f32) -> f64 {
        bf16::from_f32(v).to_f32() as f64
    }

    /// The product of the bf16-rounded operands in f64, and the sum of the terms' magnitudes.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<(f64, f64)> {
        let mut out = vec![(0.0, 0.0); m * n];
        for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
            let terms = (0..k).map(|p| rounded(a[i * k + p]) * rounded(b[p * n + j]));
            out[i * n + j] = terms.fold((0.0, 0.0), |(s, t), x| (s + x, t + x.abs()));
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = llama_core::SplitMix64::new(seed);
        (0..len)
            .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        // Awkward sizes: odd K (a zero pair row), partial panels along M and N, tiles of
        // several panels; both micro-kernels where the CPU has AVX512-BF16.
        #[test]
        fn matches_the_rounded_product(m in 1usize..40, k in 0usize..75, n in 1usize..600, seed in 0u64..1000) {
            let (a, b) = (values(m * k, seed), values(k * n, seed + 1));
            let panels = Panels::pack(k, n, |r, c| b[r * n + c]);
            let expected = reference(&a, &b, m, k, n);
            let kernels = [false, CpuFeatures::get().avx512bf16];
            for simd in kernels.into_iter().collect::<std::collections::BTreeSet<_>>() {
                let mut c = vec![f32::NAN; m * n];
                matmul_with(simd, &a, &panels, &mut c);
                for (got, (want, scale)) in c.iter().zip(&expected) {
                    // f32 sums of k terms: at most k + 1 roundings of 2⁻²⁴ of the magnitudes.
                    let bound = (k as f64 + 1.0) * scale * 2f64.powi(-24) + 1e-30;
                    prop_assert!((*got as f64 - want).abs() <= bound, "simd {simd}: {got} vs {want}");
                }
            }
        }

        #[test]
        fn panels_hold_the_rounded_values(k in 0usize..9, n in 1usize..70, seed in 0u64..1000) {
            let b = values(k * n, seed);
            let panels = Panels::pack(k, n, |r, c| b[r * n + c]);
            for (r, c) in (0..k).flat_map(|r| (0..n).map(move |c| (r, c))) {
                prop_assert_eq!(panels.get(r, c) as f64, rounded(b[r * n + c]));
            }
        }
    }

    #[test]
    fn empty_k_gives_zeros() {
        let panels = Panels::pack(0, 5, |_, _| 1.0);
        let mut c = vec![f32::NAN; 3 * 5];
        matmul(&[], &panels, &mut c);
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
