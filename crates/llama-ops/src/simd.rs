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

/// True when the AVX2 + FMA instantiations (and the F16C conversions that every AVX2 CPU
/// has) may run on this CPU.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn name<T: Element>(args)` whose body is compiled twice — inside a
/// `#[target_feature(enable = "avx2,fma,f16c")]` function, chosen at run time when the CPU has
/// those, and as a portable fallback — so that plain element loops (conversions, `exp`) become
/// 256-bit vector code without being written in intrinsics. The body must call only
/// `#[inline(always)]` helpers (or code the compiler inlines) to get the wider instructions.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn avx2($($arg: $ty),*) $(-> $ret)? $body
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::has_avx2_fma() {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            portable($($arg),*)
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name<$T: llama_core::Element>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn avx2<$T: llama_core::Element>($($arg: $ty),*) $(-> $ret)? $body
            fn portable<$T: llama_core::Element>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::has_avx2_fma() {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Σ a[i] · b[i] over the common length, in f32 with 4 × LANES partial sums.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// out[j] = q · rows[j] for each row of `rows` ([out.len(), q.len()]): many dot products against
/// one vector in one dispatch (a decode step's attention scores over a tile of keys).
pub fn dot_rows(q: &[f32], rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_rows_avx2(q, rows, out) };
    }
    dot_rows_lanes::<NoFma>(q, rows, out)
}

/// Eight rows at a time when the length is a multiple of 8: eight independent FMA chains,
/// then one transposing reduction (hadd, hadd, permute) gives the eight sums in one vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_rows_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    if d == 0 || !d.is_multiple_of(8) {
        return dot_rows_lanes::<HwFma>(q, rows, out);
    }
    let n = out.len().min(rows.len() / d);
    let full = n / 8 * 8;
    for (block, o) in out[..full].chunks_exact_mut(8).enumerate() {
        let base = &rows[block * 8 * d..(block + 1) * 8 * d];
        // SAFETY: every load reads 8 floats at c < d inside q or inside row r < 8 of `base`
        // (8·d floats); the store writes the 8 floats of `o`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..d).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(base.as_ptr().add(r * d + c)), *acc);
                }
            }
            let t0 = _mm256_hadd_ps(acc[0], acc[1]);
            let t1 = _mm256_hadd_ps(acc[2], acc[3]);
            let t2 = _mm256_hadd_ps(acc[4], acc[5]);
            let t3 = _mm256_hadd_ps(acc[6], acc[7]);
            let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
            let sums = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(u0, u1),
                _mm256_permute2f128_ps::<0x31>(u0, u1),
            );
            _mm256_storeu_ps(o.as_mut_ptr(), sums);
        }
    }
    dot_rows_lanes::<HwFma>(q, &rows[full * d..], &mut out[full..n]);
}

#[inline(always)]
fn dot_rows_lanes<M: Fma>(q: &[f32], rows: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(q.len().max(1))) {
        *o = dot_lanes::<M>(q, row);
    }
}

/// y += Σ_j w[j] · rows[j] for the rows of `rows` ([w.len(), y.len()]): a weighted sum of rows
/// in one dispatch (a decode step's P · V over a tile of values).
pub fn add_weighted_rows(w: &[f32], rows: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { add_weighted_rows_avx2(w, rows, y) };
    }
    add_weighted_rows_lanes::<NoFma>(w, rows, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_weighted_rows_avx2(w: &[f32], rows: &[f32], y: &mut [f32]) {
    add_weighted_rows_lanes::<HwFma>(w, rows, y)
}

#[inline(always)]
fn add_weighted_rows_lanes<M: Fma>(w: &[f32], rows: &[f32], y: &mut [f32]) {
    for (&wj, row) in w.iter().zip(rows.chunks_exact(y.len().max(1))) {
        for (y, &x) in y.iter_mut().zip(row) {
            *y = M::fma(wj, x, *y);
        }
    }
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

/// e^x in f32 by Cephes' `expf` (range reduction by ln 2 in two parts, a degree-6 polynomial,
/// the exponent set through the bits): within 2 ulp of the exact value over the normal range,
/// branch-free, so loops over it vectorise (libm's `expf` is a call per element). Inputs are
/// clamped to [−87.3, 88.3]: the result saturates at the largest finite value and the smallest
/// normal one instead of going to inf or 0, which no caller here can tell apart.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer without a call to
    // `round` (which x86-64's baseline lacks).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

simd_fn! {
    /// v ← e^(v − shift) for every element, returning their sum (a softmax row's
    /// denominator), vectorised.
    pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
        let mut lanes = [0f32; LANES];
        let mut body = values.chunks_exact_mut(LANES);
        for chunk in &mut body {
            for (lane, v) in lanes.iter_mut().zip(chunk.iter_mut()) {
                *v = exp(*v - shift);
                *lane += *v;
            }
        }
        let mut tail = 0f32;
        for v in body.into_remainder() {
            *v = exp(*v - shift);
            tail += *v;
        }
        lanes.iter().sum::<f32>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * exact;
            worst = worst.max((exp(x) as f64 - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

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
