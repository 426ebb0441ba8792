//! One LoRA pair on a frozen projection, forward and backward side by side.
//! Letters: M rows, K in_features, N out_features, r rank, s the scaling.
//!
//!   forward:  y [M, N] = x·Wᵀ + s·(x·Aᵀ)·Bᵀ        A [r, K], B [N, r]
//!             saved: xs = s·(x·Aᵀ) [M, r]
//!   backward: g = dy·B [M, r]
//!             dA += s·gᵀ·x, dB += dyᵀ·xs, dx += s·g·A (+ dy·W, the frozen part, by the caller)
//! W's own gradient is never formed.

use llama_core::{Kernel, SplitMix64};
use llama_ops::math::{gemm, Operand};

use crate::config::LoraInit;
use crate::error::{shape_error, Result};
use crate::reference;

/// The trainable pair of one projection: A [r, in], B [out, r], and the scaling s.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scaling: f32,
}

/// Gradients of a [`LoraPair`], the same shapes; accumulated by each backward.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// What the LoRA forward keeps for the backward.
pub struct LoraSaved {
    /// s·(x·Aᵀ), [M, r].
    xs: Vec<f32>,
    /// With dropout, each input's factor: 0 (dropped) or 1/(1 − p), [M, K].
    mask: Option<Vec<f32>>,
}

/// Inverted dropout on LoRA inputs (peft's `lora_dropout`): each value is kept with
/// probability 1 − p and scaled by 1/(1 − p).
pub struct Dropout {
    pub p: f32,
    pub rng: SplitMix64,
}

impl Dropout {
    /// A fresh mask of `len` factors, 0 or 1/(1 − p).
    fn mask(&mut self, len: usize) -> Vec<f32> {
        let keep = 1.0 / (1.0 - self.p);
        (0..len)
            .map(|_| {
                if self.rng.next_f64() < self.p as f64 {
                    0.0
                } else {
                    keep
                }
            })
            .collect()
    }
}

/// x ⊙ mask, the LoRA branch's input under dropout.
fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    x.iter().zip(mask).map(|(x, m)| x * m).collect()
}

impl LoraPair {
    /// A new pair: A initialised as `init` says from `rng`, B zero.
    pub fn init(
        rank: usize,
        in_features: usize,
        out_features: usize,
        scaling: f32,
        init: LoraInit,
        rng: &mut SplitMix64,
    ) -> LoraPair {
        let a = match init {
            LoraInit::Kaiming => {
                // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound = √3·gain/√fan_in = 1/√in.
                let bound = 1.0 / (in_features as f64).sqrt();
                (0..rank * in_features)
                    .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                    .collect()
            }
            LoraInit::Gaussian => {
                let std = 1.0 / rank as f64;
                (0..rank * in_features)
                    .map(|_| (normal(rng) * std) as f32)
                    .collect()
            }
        };
        LoraPair {
            a,
            b: vec![0.0; out_features * rank],
            rank,
            in_features,
            out_features,
            scaling,
        }
    }

    /// A pair from its matrices, checking their sizes.
    pub fn from_parts(
        a: Vec<f32>,
        b: Vec<f32>,
        rank: usize,
        in_features: usize,
        out_features: usize,
        scaling: f32,
    ) -> Result<LoraPair> {
        if rank == 0 || a.len() != rank * in_features || b.len() != out_features * rank {
            return shape_error(
                "LoraPair::from_parts",
                format!("A holds {} and B {} values; rank {rank}, in {in_features}, out {out_features} need {} and {}", a.len(), b.len(), rank * in_features, out_features * rank),
            );
        }
        Ok(LoraPair {
            a,
            b,
            rank,
            in_features,
            out_features,
            scaling,
        })
    }

    /// Zero gradients of this pair's shape.
    pub fn zero_grads(&self) -> LoraGrads {
        LoraGrads {
            a: vec![0.0; self.a.len()],
            b: vec![0.0; self.b.len()],
        }
    }

    /// s·B·A, [out, in]: what merging adds to W.
    pub fn delta_weight(&self) -> Vec<f32> {
        let mut delta = vec![0.0; self.out_features * self.in_features];
        gemm(
            Operand::Plain(&self.b, self.out_features, self.rank),
            Operand::Plain(&self.a, self.rank, self.in_features),
            &mut delta,
            false,
        );
        delta.iter_mut().for_each(|v| *v *= self.scaling);
        delta
    }

    fn rows(&self, op: &'static str, x: &[f32], y: usize) -> Result<usize> {
        let k = self.in_features;
        if !x.len().is_multiple_of(k) || y != x.len() / k * self.out_features {
            return shape_error(
                op,
                format!(
                    "x holds {} and y {y} values for a [{}, {k}] projection",
                    x.len(),
                    self.out_features
                ),
            );
        }
        Ok(x.len() / k)
    }

    /// y [M, N] += s·(x·Aᵀ)·Bᵀ for x [M, K] (after dropout when `dropout` is given).
    pub fn forward_add(
        &self,
        x: &[f32],
        y: &mut [f32],
        dropout: Option<&mut Dropout>,
    ) -> Result<LoraSaved> {
        let m = self.rows("LoraPair::forward_add", x, y.len())?;
        let mask = dropout.filter(|d| d.p > 0.0).map(|d| d.mask(x.len()));
        let dropped = mask.as_deref().map(|mask| masked(x, mask));
        let input = dropped.as_deref().unwrap_or(x);
        let mut xs = vec![0.0; m * self.rank];
        gemm(
            Operand::Plain(input, m, self.in_features),
            Operand::Transposed(&self.a, self.in_features, self.rank),
            &mut xs,
            false,
        );
        xs.iter_mut().for_each(|v| *v *= self.scaling);
        gemm(
            Operand::Plain(&xs, m, self.rank),
            Operand::Transposed(&self.b, self.rank, self.out_features),
            y,
            true,
        );
        Ok(LoraSaved { xs, mask })
    }

    /// [`Self::forward_add`] by `kernel`: the reference runs [`reference::lora_branch`] in
    /// f64 (keeping only the mask: its backward recomputes).
    pub fn forward_add_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        y: &mut [f32],
        dropout: Option<&mut Dropout>,
    ) -> Result<LoraSaved> {
        if kernel == Kernel::Fast {
            return self.forward_add(x, y, dropout);
        }
        let m = self.rows("LoraPair::forward_add", x, y.len())?;
        let mask = dropout.filter(|d| d.p > 0.0).map(|d| d.mask(x.len()));
        let input = masked_f64(wide(x), mask.as_deref());
        let branch = reference::lora_branch(
            &input,
            &wide(&self.a),
            &wide(&self.b),
            self.dims(m),
            self.scaling as f64,
        );
        y.iter_mut()
            .zip(branch)
            .for_each(|(y, d)| *y = (*y as f64 + d) as f32);
        Ok(LoraSaved {
            xs: Vec::new(),
            mask,
        })
    }

    /// [`Self::backward`] by `kernel` ([`reference::lora_branch_backward`] in f64).
    pub fn backward_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        saved: &LoraSaved,
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        if kernel == Kernel::Fast {
            return self.backward(x, saved, dy, dx, grads);
        }
        let m = self.rows("LoraPair::backward", x, dy.len())?;
        if grads.a.len() != self.a.len() || grads.b.len() != self.b.len() {
            return shape_error("LoraPair::backward", "gradients do not fit this pair");
        }
        let input = masked_f64(wide(x), saved.mask.as_deref());
        let (d_input, da, db) = reference::lora_branch_backward(
            &input,
            &wide(&self.a),
            &wide(&self.b),
            &wide(dy),
            self.dims(m),
            self.scaling as f64,
        );
        let add = |acc: &mut [f32], part: &[f64]| {
            acc.iter_mut()
                .zip(part)
                .for_each(|(a, &p)| *a = (*a as f64 + p) as f32)
        };
        add(&mut grads.a, &da);
        add(&mut grads.b, &db);
        if let Some(dx) = dx {
            if dx.len() != x.len() {
                return shape_error("LoraPair::backward", "dx does not fit x");
            }
            // Under dropout the branch read x ⊙ mask: its gradient is masked the same way.
            let masked = masked_f64(d_input, saved.mask.as_deref());
            add(dx, &masked);
        }
        Ok(())
    }

    /// (M, K, N, r) for M rows.
    fn dims(&self, m: usize) -> (usize, usize, usize, usize) {
        (m, self.in_features, self.out_features, self.rank)
    }

    /// Backward of [`Self::forward_add`] for upstream dy [M, N]: dx [M, K] += s·(dy·B)·A
    /// (when given) and the pair's gradients accumulated into `grads`.
    pub fn backward(
        &self,
        x: &[f32],
        saved: &LoraSaved,
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let m = self.rows("LoraPair::backward", x, dy.len())?;
        if saved.xs.len() != m * self.rank
            || grads.a.len() != self.a.len()
            || grads.b.len() != self.b.len()
        {
            return shape_error(
                "LoraPair::backward",
                "saved values or gradients do not fit this pair",
            );
        }
        let dropped = saved.mask.as_deref().map(|mask| masked(x, mask));
        let input = dropped.as_deref().unwrap_or(x);
        let (r, k, n) = (self.rank, self.in_features, self.out_features);
        // g = s·dy·B [M, r]
        let mut g = vec![0.0; m * r];
        gemm(
            Operand::Plain(dy, m, n),
            Operand::Plain(&self.b, n, r),
            &mut g,
            false,
        );
        g.iter_mut().for_each(|v| *v *= self.scaling);
        // dA += gᵀ·x, dB += dyᵀ·xs
        gemm(
            Operand::Transposed(&g, r, m),
            Operand::Plain(input, m, k),
            &mut grads.a,
            true,
        );
        gemm(
            Operand::Transposed(dy, n, m),
            Operand::Plain(&saved.xs, m, r),
            &mut grads.b,
            true,
        );
        if let Some(dx) = dx {
            if dx.len() != m * k {
                return shape_error(
                    "LoraPair::backward",
                    format!("dx holds {} values, not {m}·{k}", dx.len()),
                );
            }
            // Under dropout the branch read x ⊙ mask: its gradient is masked the same way.
            match &saved.mask {
                None => gemm(
                    Operand::Plain(&g, m, r),
                    Operand::Plain(&self.a, r, k),
                    dx,
                    true,
                ),
                Some(mask) => {
                    let mut d_input = vec![0.0; m * k];
                    gemm(
                        Operand::Plain(&g, m, r),
                        Operand::Plain(&self.a, r, k),
                        &mut d_input,
                        false,
                    );
                    dx.iter_mut()
                        .zip(&d_input)
                        .zip(mask)
                        .for_each(|((dx, d), m)| *dx += d * m);
                }
            }
        }
        Ok(())
    }
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// x ⊙ mask (x itself without a mask), in f64.
fn masked_f64(x: Vec<f64>, mask: Option<&[f32]>) -> Vec<f64> {
    match mask {
        Some(mask) => x.iter().zip(mask).map(|(&x, &m)| x * m as f64).collect(),
        None => x,
    }
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
