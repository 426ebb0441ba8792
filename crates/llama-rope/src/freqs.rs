//! Inverse frequencies and attention scaling, computed the way HF transformers 5 computes them
//! (`modeling_rope_utils.py`, one function per `rope_type`).
//!
//! HF does this arithmetic on float32 tensors with Python floats as scalars, so every step here
//! is an f32 operation in the same order, with the scalar rounded to f32 first: the frequencies
//! must agree to the last bit, because an error of one ulp in inv_freq grows with the position
//! (pos · inv_freq) and shows in cos/sin at long contexts. Scalars that HF computes in Python
//! (correction ranges, attention factors, the dynamic base) are computed in f64 here too.
//!
//! Notation: d = rotary_dim, i = 0 … d/2 − 1, θ = rope_theta.

use std::f64::consts::PI;

use crate::config::{RopeConfig, RopeScaling};
use crate::torch_pow::{libm_powf, torch_pow_tensor};

/// The inverse frequencies (d/2 of them) and the factor cos and sin are multiplied by.
#[derive(Clone, Debug, PartialEq)]
pub struct Frequencies {
    pub inv_freq: Vec<f32>,
    pub attention_scaling: f32,
}

impl RopeConfig {
    /// The frequencies for a sequence of `seq_len` positions (dynamic NTK and LongRoPE choose
    /// them from the length; the other kinds ignore it).
    pub fn frequencies(&self, seq_len: usize) -> Frequencies {
        let d = self.rotary_dim;
        let (inv_freq, attention_scaling) = match &self.scaling {
            RopeScaling::Default => (default_inv_freq(self.theta, d), 1.0),
            RopeScaling::Linear { factor } => {
                let factor = *factor as f32;
                let inv = default_inv_freq(self.theta, d)
                    .iter()
                    .map(|v| v / factor)
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Dynamic { factor } => (self.dynamic_inv_freq(*factor, seq_len), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => (
                llama3_inv_freq(
                    default_inv_freq(self.theta, d),
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings as f64,
                ),
                1.0,
            ),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                factor,
                attention_factor,
                original_max_position_embeddings,
            } => {
                let original = *original_max_position_embeddings;
                let factor =
                    factor.unwrap_or(self.max_position_embeddings as f64 / original as f64);
                // sqrt(1 + ln(factor) / ln(original)) unless the config gives it (Phi-3).
                let scaling = attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                });
                let ext = if seq_len > original {
                    long_factor
                } else {
                    short_factor
                };
                // inv_freq = 1 / (ext_i · θ^(2i/d))
                let inv = pos_freqs(self.theta, d)
                    .iter()
                    .zip(ext)
                    .map(|(p, &e)| recip((e as f32) * p))
                    .collect();
                (inv, scaling)
            }
            RopeScaling::Yarn { .. } => self.yarn(),
        };
        Frequencies {
            inv_freq,
            attention_scaling: attention_scaling as f32,
        }
    }

    /// A key that is equal for two sequence lengths exactly when their frequencies are: the
    /// cache recomputes its tables only when the key changes.
    pub fn frequency_regime(&self, seq_len: usize) -> usize {
        match &self.scaling {
            RopeScaling::Dynamic { .. } if seq_len > self.max_position_embeddings => seq_len,
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => usize::from(seq_len > *original_max_position_embeddings),
            _ => 0,
        }
    }

    /// Dynamic NTK: θ' = θ · (factor · s / max − (factor − 1))^(d / (d − 2)) with
    /// s = max(seq_len, max_position_embeddings), then the default formula with θ'. In HF's
    /// forward, s is a tensor (max position id + 1), so θ' is computed in f32, step by step.
    fn dynamic_inv_freq(&self, factor: f64, seq_len: usize) -> Vec<f32> {
        let s = seq_len.max(self.max_position_embeddings) as f32;
        let max = self.max_position_embeddings as f32;
        let d = self.rotary_dim as f64;
        let ratio = (factor as f32 * s) / max - (factor - 1.0) as f32;
        let grown = libm_powf(ratio, (d / (d - 2.0)) as f32);
        let base = self.theta as f32 * grown;
        default_inv_freq(f64::from(base), self.rotary_dim)
    }

    /// YaRN: a linear ramp over the dimensions between the correction range [low, high] blends
    /// interpolated (1 / (factor · θ^(2i/d))) and extrapolated (1 / θ^(2i/d)) frequencies.
    fn yarn(&self) -> (Vec<f32>, f64) {
        let RopeScaling::Yarn {
            factor,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            original_max_position_embeddings,
            truncate,
        } = &self.scaling
        else {
            unreachable!("yarn() is called for RopeScaling::Yarn only")
        };
        let original = *original_max_position_embeddings as f64;
        let factor = factor.unwrap_or(self.max_position_embeddings as f64 / original);
        // get_mscale(s, m) = 0.1 · m · ln(s) + 1 for s > 1, else 1.
        let get_mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let scaling = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
            (Some(m), Some(m_all)) if *m != 0.0 && *m_all != 0.0 => {
                get_mscale(factor, *m) / get_mscale(factor, *m_all)
            }
            _ => get_mscale(factor, 1.0),
        });

        let d = self.rotary_dim;
        // find_correction_dim(n) = d · ln(original / (n · 2π)) / (2 · ln θ)
        let correction_dim = |rotations: f64| {
            (d as f64 * (original / (rotations * 2.0 * PI)).ln()) / (2.0 * self.theta.ln())
        };
        let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
        if *truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min((d - 1) as f64));
        if low == high {
            high += 0.001; // HF's guard against a zero-width ramp
        }
        let (low_f, span_f) = (low as f32, (high - low) as f32);

        let factor_f = factor as f32;
        let inv = pos_freqs(self.theta, d)
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = ((i as f32 - low_f) / span_f).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let extrapolation = recip(p);
                let interpolation = recip(factor_f * p);
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect();
        (inv, scaling)
    }
}

/// θ^(2i/d) as torch evaluates `base ** (arange(0, d, 2).float() / d)`: θ rounded to f32, the
/// exponent an f32 division, the power by torch's own float32 pow.
fn pos_freqs(theta: f64, d: usize) -> Vec<f32> {
    let exponents: Vec<f32> = (0..d / 2).map(|i| (2 * i) as f32 / d as f32).collect();
    torch_pow_tensor(theta as f32, &exponents)
}

/// torch's `1.0 / t` is `t.reciprocal() * 1.0`: one f32 division.
fn recip(x: f32) -> f32 {
    1.0 / x
}

/// inv_freq_i = 1 / θ^(2i/d).
fn default_inv_freq(theta: f64, d: usize) -> Vec<f32> {
    pos_freqs(theta, d).into_iter().map(recip).collect()
}

/// Llama 3.1: with wavelen = 2π / inv_freq, wavelengths above original / low_freq_factor are
/// divided by `factor`, those below original / high_freq_factor kept, and those between blended
/// with smooth = (original / wavelen − low) / (high − low):
/// (1 − smooth) · inv / factor + smooth · inv.
fn llama3_inv_freq(
    inv_freq: Vec<f32>,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f32> {
    let low_wavelen = (original / low) as f32;
    let high_wavelen = (original / high) as f32;
    let (factor, low_f, span) = (factor as f32, low as f32, (high - low) as f32);
    let (two_pi, original_f) = ((2.0 * PI) as f32, original as f32);
    inv_freq
        .into_iter()
        .map(|inv| {
            // `2 * math.pi / inv_freq` is reciprocal(inv_freq) * 2π in torch.
            let wavelen = recip(inv) * two_pi;
            let scaled = if wavelen > low_wavelen {
                inv / factor
            } else {
                inv
            };
            let smooth = (recip(wavelen) * original_f - low_f) / span;
            let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
            // HF's `~(wavelen < high) * ~(wavelen > low)`, kept literally (NaN included).
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
            if medium {
                smoothed
            } else {
                scaled
            }
        })
        .collect()
}
