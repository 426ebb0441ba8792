//! float32 `pow` exactly as PyTorch's CPU kernels compute it, so that inverse frequencies match
//! HF to the last bit.
//!
//! torch evaluates `base ** exponents` (a float32 tensor op) with SLEEF's `powf_u10` on whole
//! SIMD chunks and with libm's `powf` on the tail that does not fill a chunk. SLEEF's result is
//! within 1 ulp but not always correctly rounded, and one ulp of inv_freq becomes a visible
//! error in cos(p · inv_freq) at long positions, so both are reproduced here:
//! [`sleef_powf`] follows SLEEF 3.6 `xpowf` (double-float log and exp, FMA variant, as built for
//! AVX2/AVX-512), and the tail uses the correctly rounded power.
//!
//! The chunk is two vectors of 16 floats (AVX-512, what the machines that made the fixtures
//! run): `cpu_kernel_vec` processes `2 · Vec::size()` elements per step.

// The polynomial constants are written as SLEEF writes them, so they can be checked against it.
#![allow(clippy::excessive_precision)]

/// Elements per vectorised step of torch's CPU kernels (2 × 16 lanes with AVX-512).
const TORCH_CHUNK: usize = 32;

/// `base ** exponents` as torch computes it on the CPU for a float32 tensor of exponents.
pub(crate) fn torch_pow_tensor(base: f32, exponents: &[f32]) -> Vec<f32> {
    let vectorised = exponents.len() / TORCH_CHUNK * TORCH_CHUNK;
    exponents
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            if i < vectorised {
                sleef_powf(base, e)
            } else {
                libm_powf(base, e)
            }
        })
        .collect()
}

/// libm's correctly rounded float power (torch's scalar path, `std::pow(float, float)`).
pub(crate) fn libm_powf(x: f32, y: f32) -> f32 {
    f64::from(x).powf(f64::from(y)) as f32
}

/// A float as an unevaluated sum hi + lo ("double-float").
#[derive(Clone, Copy)]
struct Df {
    x: f32,
    y: f32,
}

fn df(x: f32, y: f32) -> Df {
    Df { x, y }
}

// Fused operations as SLEEF names them: fma = x·y + z, fmapn = x·y − z, fmanp = z − x·y.
fn fma(x: f32, y: f32, z: f32) -> f32 {
    x.mul_add(y, z)
}
fn fmapn(x: f32, y: f32, z: f32) -> f32 {
    x.mul_add(y, -z)
}
fn fmanp(x: f32, y: f32, z: f32) -> f32 {
    (-x).mul_add(y, z)
}

fn dfadd2_f_f(x: f32, y: f32) -> Df {
    let s = x + y;
    let v = s - x;
    df(s, (x - (s - v)) + (y - v))
}

fn dfadd2_df_f(x: Df, y: f32) -> Df {
    let s = x.x + y;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y - v);
    df(s, t + x.y)
}

fn dfadd2_df_df(x: Df, y: Df) -> Df {
    let s = x.x + y.x;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y.x - v);
    df(s, t + (x.y + y.y))
}

fn dfadd_df_df(x: Df, y: Df) -> Df {
    let s = x.x + y.x;
    df(s, (((x.x - s) + y.x) + x.y) + y.y)
}

fn dfadd_f_df(x: f32, y: Df) -> Df {
    let s = x + y.x;
    df(s, ((x - s) + y.x) + y.y)
}

fn dfnormalize(t: Df) -> Df {
    let s = t.x + t.y;
    df(s, (t.x - s) + t.y)
}

fn dfscale(d: Df, s: f32) -> Df {
    df(d.x * s, d.y * s)
}

fn dfdiv(n: Df, d: Df) -> Df {
    let t = 1.0 / d.x;
    let s = n.x * t;
    let u = fmapn(t, n.x, s);
    let v = fmanp(d.y, t, fmanp(d.x, t, 1.0));
    df(s, fma(s, v, fma(n.y, t, u)))
}

fn dfsqu(x: Df) -> Df {
    let s = x.x * x.x;
    df(s, fma(x.x + x.x, x.y, fmapn(x.x, x.x, s)))
}

fn dfmul_df_df(x: Df, y: Df) -> Df {
    let s = x.x * y.x;
    df(s, fma(x.x, y.y, fma(x.y, y.x, fmapn(x.x, y.x, s))))
}

fn dfmul_df_f(x: Df, y: f32) -> Df {
    let s = x.x * y;
    df(s, fma(x.y, y, fmapn(x.x, y, s)))
}

/// Unbiased exponent of a positive normal float.
fn ilogb(d: f32) -> i32 {
    ((d.to_bits() >> 23) & 0xff) as i32 - 0x7f
}

/// x · 2^q for the exponents that occur here.
fn ldexp(x: f32, q: i32) -> f32 {
    (f64::from(x) * 2f64.powi(q)) as f32
}

/// ln(d) as a double-float (SLEEF `logkf`), for positive normal d.
fn logkf(d: f32) -> Df {
    let e = ilogb(d * (1.0 / 0.75));
    let m = ldexp(d, -e);
    let x = dfdiv(dfadd2_f_f(-1.0, m), dfadd2_f_f(1.0, m));
    let x2 = dfsqu(x);
    let mut t = 0.240_320_354_700_088_500_976_562_f32;
    t = fma(t, x2.x, 0.285_112_679_004_669_189_453_125);
    t = fma(t, x2.x, 0.400_007_992_982_864_379_882_812);
    let c = df(
        0.666_666_626_930_236_816_406_25,
        3.691_838_612_596_143_320_843_11e-9,
    );
    let ln2 = df(0.693_147_182_464_599_609_38, -1.904_654_323_148_236_017e-9);
    dfadd2_df_df(
        dfmul_df_f(ln2, e as f32),
        dfadd2_df_df(
            dfscale(x, 2.0),
            dfmul_df_df(dfmul_df_df(x2, x), dfadd2_df_df(dfmul_df_f(x2, t), c)),
        ),
    )
}

/// e^d for a double-float d (SLEEF `expkf`).
fn expkf(d: Df) -> f32 {
    const R_LN2: f32 = std::f32::consts::LOG2_E;
    const L2U: f32 = 0.693_145_751_953_125;
    const L2L: f32 = 1.428_606_765_330_187_045e-6;
    let q = ((d.x + d.y) * R_LN2).round_ties_even() as i32;
    let mut s = dfadd2_df_f(d, q as f32 * -L2U);
    s = dfadd2_df_f(s, q as f32 * -L2L);
    s = dfnormalize(s);
    let mut u = 0.001_363_246_468_827_128_410_339_36_f32;
    u = fma(u, s.x, 0.008_365_969_173_610_210_418_701_17);
    u = fma(u, s.x, 0.041_671_082_377_433_776_855_468_8);
    u = fma(u, s.x, 0.166_665_524_244_308_471_679_688);
    u = fma(u, s.x, 0.499_999_850_988_388_061_523_438);
    let t = dfadd_df_df(s, dfmul_df_f(dfsqu(s), u));
    let t = dfadd_f_df(1.0, t);
    if d.x < -104.0 {
        0.0
    } else {
        ldexp(t.x + t.y, q)
    }
}

/// SLEEF `xpowf` (u10) for a positive finite base: exp(y · ln x) in double-float arithmetic.
pub(crate) fn sleef_powf(x: f32, y: f32) -> f32 {
    if y == 0.0 || x == 1.0 {
        return 1.0;
    }
    if !(x.is_finite() && x > 0.0 && x.is_normal() && y.is_finite()) {
        return libm_powf(x, y);
    }
    expkf(dfmul_df_f(logkf(x), y))
}
