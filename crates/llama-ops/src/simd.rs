//! Vector kernels with run-time dispatch: each hot loop is written once, generic over [`Fma`],
//! as plain lane arithmetic on `[f32; LANES]` accumulators that LLVM turns into vector code. It
//! is compiled twice: inside a `#[target_feature(enable = "avx2,fma")]` function (chosen at run
//! time when the CPU has AVX2 and FMA; `mul_add` becomes `vfmadd`) and as a portable fallback
//! (multiply then add, SSE2 on x86-64).

/// f32 lanes per accumulator: one 256-bit register.
pub(crate) const LANES: usize = 8;

/// Fused or plain multiply-add, chosen by the instantiation.
pub(crate) trait Fma {
    /// a · b + c.
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// Hardware FMA: only instantiated inside functions compiled with the `fma` target feature.
pub(crate) struct HwFma;
/// Multiply then add, for CPUs without FMA.
pub(crate) struct NoFma;

impl Fma for HwFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Fma for NoFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// True when the AVX2 + FMA instantiations may run on this CPU.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Σ a[i] · b[i] over the common length, in f32 with 4 × LANES partial sums.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes::<NoFma>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<HwFma>(a, b)
}

#[inline(always)]
pub(crate) fn dot_lanes<M: Fma>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0f32; LANES]; 4];
    let (a_body, b_body) = (a.chunks_exact(4 * LANES), b.chunks_exact(4 * LANES));
    let tail = a_body.remainder().len();
    for (ca, cb) in a_body.zip(b_body) {
        for (k, acc) in acc.iter_mut().enumerate() {
            for (l, acc) in acc.iter_mut().enumerate() {
                *acc = M::fma(ca[k * LANES + l], cb[k * LANES + l], *acc);
            }
        }
    }
    let mut sum = reduce(&acc);
    for (x, y) in a[n - tail..].iter().zip(&b[n - tail..]) {
        sum = M::fma(*x, *y, sum);
    }
    sum
}

/// Adds up 4 × LANES partial sums pairwise.
#[inline(always)]
pub(crate) fn reduce(acc: &[[f32; LANES]; 4]) -> f32 {
    let mut lanes = [0f32; LANES];
    for (l, lane) in lanes.iter_mut().enumerate() {
        *lane = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    let quad = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (quad[0] + quad[2]) + (quad[1] + quad[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64_sum_at_every_tail_length() {
        for n in 0..80 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            for got in [dot(&a, &b), dot_lanes::<NoFma>(&a, &b)] {
                assert!((got as f64 - exact).abs() < 1e-5, "n={n}: {got} vs {exact}");
            }
        }
    }
}
