//! The gated MLP activations: SwiGLU (Llama) and GeGLU (Gemma), forward and backward, the fast
//! CPU path (rayon over chunks of elements). gate, up, h: [N, I] with I the intermediate size.
//!
//! The forward rounds as HF does in low precision: act = T(f(gate)), then h = T(act · up).
//! In f32 the two roundings are no-ops.

use llama_core::Element;
use rayon::prelude::*;

use crate::error::{check_len, Result};
use crate::simd::{self, simd_fn};

/// Elements per parallel task.
const TASK: usize = 1 << 14;

/// The GELU of GeGLU: exact (erf) or the tanh approximation (`approximate="tanh"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// gelu(x) = x · Φ(x) = ½ x (1 + erf(x / √2)).
    Exact,
    /// gelu(x) ≈ ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))).
    Tanh,
}

/// The gate nonlinearity of a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatedAct {
    /// silu(x) = x · σ(x): SwiGLU.
    Silu,
    /// GeGLU with the given GELU.
    Gelu(Gelu),
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const TANH_COEF: f32 = 0.044_715;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / √(2π), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

impl GatedAct {
    /// f(x).
    #[inline(always)]
    pub fn value(self, x: f32) -> f32 {
        match self {
            GatedAct::Silu => x / (1.0 + simd::exp(-x)),
            GatedAct::Gelu(Gelu::Exact) => 0.5 * x * (1.0 + libm::erff(x * INV_SQRT_2)),
            GatedAct::Gelu(Gelu::Tanh) => {
                let inner = SQRT_2_OVER_PI * (x + TANH_COEF * x * x * x);
                0.5 * x * (1.0 + inner.tanh())
            }
        }
    }

    /// f(x) and f'(x).
    #[inline(always)]
    pub fn value_and_slope(self, x: f32) -> (f32, f32) {
        match self {
            // silu' = σ(x) · (1 + x (1 − σ(x)))
            GatedAct::Silu => {
                let s = 1.0 / (1.0 + simd::exp(-x));
                (x * s, s * (1.0 + x * (1.0 - s)))
            }
            // gelu' = Φ(x) + x φ(x)
            GatedAct::Gelu(Gelu::Exact) => {
                let cdf = 0.5 * (1.0 + libm::erff(x * INV_SQRT_2));
                let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
                (x * cdf, cdf + x * pdf)
            }
            // d/dx ½x(1 + t) = ½(1 + t) + ½x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²)
            GatedAct::Gelu(Gelu::Tanh) => {
                let t = (SQRT_2_OVER_PI * (x + TANH_COEF * x * x * x)).tanh();
                let dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_COEF * x * x);
                (
                    0.5 * x * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner,
                )
            }
        }
    }
}

/// h = T(T(f(gate)) · up), element-wise.
#[inline(always)]
fn gated<T: Element>(act: GatedAct, g: T, u: T) -> T {
    T::from_f32(T::from_f32(act.value(g.to_f32())).to_f32() * u.to_f32())
}

/// (dgate, dup) = (dh · up · f'(gate), dh · f(gate)).
#[inline(always)]
fn gated_grads<T: Element>(act: GatedAct, g: T, u: T, d: T) -> (T, T) {
    let (f, slope) = act.value_and_slope(g.to_f32());
    let d = d.to_f32();
    (T::from_f32(d * u.to_f32() * slope), T::from_f32(d * f))
}

/// One chunk of the forward for one activation (a plain loop, inlined into the callers below).
#[inline(always)]
fn forward_loop<T: Element>(act: GatedAct, gate: &[T], up: &[T], h: &mut [T]) {
    for ((h, &g), &u) in h.iter_mut().zip(gate).zip(up) {
        *h = gated(act, g, u);
    }
}

/// One chunk of the backward for one activation.
#[inline(always)]
fn backward_loop<T: Element>(
    act: GatedAct,
    gate: &[T],
    up: &[T],
    dh: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) {
    for i in 0..dgate.len() {
        (dgate[i], dup[i]) = gated_grads(act, gate[i], up[i], dh[i]);
    }
}

// One task's chunk of each op. The `match` sits outside the loops so that each loop has one
// activation and vectorises (SiLU fully; GELU calls erf/tanh per element). No closures in
// these bodies: a closure would not inherit the AVX2 target features.
simd_fn! {
    fn forward_chunk<T>(act: GatedAct, gate: &[T], up: &[T], h: &mut [T]) {
        match act {
            GatedAct::Silu => forward_loop(GatedAct::Silu, gate, up, h),
            GatedAct::Gelu(g) => forward_loop(GatedAct::Gelu(g), gate, up, h),
        }
    }
}

simd_fn! {
    fn in_place_chunk<T>(act: GatedAct, gate: &mut [T], up: &[T]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = match act {
                GatedAct::Silu => gated(GatedAct::Silu, *g, u),
                GatedAct::Gelu(x) => gated(GatedAct::Gelu(x), *g, u),
            };
        }
    }
}

simd_fn! {
    fn backward_chunk<T>(act: GatedAct, gate: &[T], up: &[T], dh: &[T], dgate: &mut [T], dup: &mut [T]) {
        match act {
            GatedAct::Silu => backward_loop(GatedAct::Silu, gate, up, dh, dgate, dup),
            GatedAct::Gelu(g) => backward_loop(GatedAct::Gelu(g), gate, up, dh, dgate, dup),
        }
    }
}

/// gated_forward's buffers all hold as many values as gate.
pub(crate) fn check_forward(gate: usize, up: usize, h: usize) -> Result<()> {
    check_len("gated_forward", "up", up, gate)?;
    check_len("gated_forward", "h", h, gate)
}

/// gated_backward's buffers [up, dh, dgate, dup] all hold as many values as gate.
pub(crate) fn check_backward(gate: usize, others: [usize; 4]) -> Result<()> {
    for (what, len) in ["up", "dh", "dgate", "dup"].into_iter().zip(others) {
        check_len("gated_backward", what, len, gate)?;
    }
    Ok(())
}

/// Gated forward: h = f(gate) ⊙ up.
pub fn gated_forward<T: Element>(act: GatedAct, gate: &[T], up: &[T], h: &mut [T]) -> Result<()> {
    check_forward(gate.len(), up.len(), h.len())?;
    if h.len() <= TASK {
        forward_chunk(act, gate, up, h);
    } else {
        h.par_chunks_mut(TASK)
            .zip(gate.par_chunks(TASK).zip(up.par_chunks(TASK)))
            .for_each(|(h, (g, u))| forward_chunk(act, g, u, h));
    }
    Ok(())
}

/// Gated forward in place (`fast_swiglu_inference`): h = f(gate) ⊙ up is written over `gate`,
/// so the MLP needs no third intermediate-size buffer.
pub fn gated_forward_in_place<T: Element>(act: GatedAct, gate: &mut [T], up: &[T]) -> Result<()> {
    check_len("gated_forward_in_place", "up", up.len(), gate.len())?;
    if gate.len() <= TASK {
        in_place_chunk(act, gate, up);
    } else {
        gate.par_chunks_mut(TASK)
            .zip(up.par_chunks(TASK))
            .for_each(|(g, u)| in_place_chunk(act, g, u));
    }
    Ok(())
}

/// Gated backward, upstream dh → dgate = dh ⊙ up ⊙ f'(gate), dup = dh ⊙ f(gate).
pub fn gated_backward<T: Element>(
    act: GatedAct,
    gate: &[T],
    up: &[T],
    dh: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) -> Result<()> {
    check_backward(gate.len(), [up.len(), dh.len(), dgate.len(), dup.len()])?;
    if gate.len() <= TASK {
        backward_chunk(act, gate, up, dh, dgate, dup);
    } else {
        dgate
            .par_chunks_mut(TASK)
            .zip(dup.par_chunks_mut(TASK))
            .zip(
                gate.par_chunks(TASK)
                    .zip(up.par_chunks(TASK).zip(dh.par_chunks(TASK))),
            )
            .for_each(|((dg, du), (g, (u, d)))| backward_chunk(act, g, u, d, dg, du));
    }
    Ok(())
}
