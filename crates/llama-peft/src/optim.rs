//! Optimizers with torch's semantics, learning-rate schedules with HF's formulas, and
//! gradient-norm clipping as `torch.nn.utils.clip_grad_norm_` does it.

use crate::error::{config_error, shape_error, Result};

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// torch.optim.AdamW: decoupled weight decay p ← p·(1 − lr·wd), then
    /// m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε).
    AdamW {
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
    },
    /// torch.optim.SGD without momentum: g ← g + wd·p, p ← p − lr·g.
    Sgd { weight_decay: f32 },
}

impl OptimizerKind {
    /// Checks the settings (betas in [0, 1), eps > 0, weight decay ≥ 0).
    pub fn validate(&self) -> Result<()> {
        let wd = match *self {
            OptimizerKind::AdamW {
                betas,
                eps,
                weight_decay,
            } => {
                for (arg, b) in [("betas", betas.0), ("betas", betas.1)] {
                    if !(0.0..1.0).contains(&b) {
                        return config_error(
                            arg,
                            format!("{},{}", betas.0, betas.1),
                            "each must be in [0, 1)",
                        );
                    }
                }
                if !(eps > 0.0 && eps.is_finite()) {
                    return config_error("eps", eps, "must be a positive number");
                }
                weight_decay
            }
            OptimizerKind::Sgd { weight_decay } => weight_decay,
        };
        if !(wd >= 0.0 && wd.is_finite()) {
            return config_error("weight_decay", wd, "must be ≥ 0");
        }
        Ok(())
    }
}

/// An optimizer over a fixed list of parameter matrices, with its state.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// Steps taken.
    pub step: u64,
    /// AdamW's first and second moments, one per parameter matrix (empty for SGD).
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl Optimizer {
    /// A fresh optimizer for parameters of the given sizes.
    pub fn new(kind: OptimizerKind, sizes: &[usize]) -> Result<Optimizer> {
        kind.validate()?;
        let zeros = || match kind {
            OptimizerKind::AdamW { .. } => sizes.iter().map(|&n| vec![0.0; n]).collect(),
            OptimizerKind::Sgd { .. } => Vec::new(),
        };
        Ok(Optimizer {
            kind,
            step: 0,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
        })
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn step(&mut self, params: Vec<&mut [f32]>, grads: &[&[f32]], lr: f32) -> Result<()> {
        if params.len() != grads.len() || params.iter().zip(grads).any(|(p, g)| p.len() != g.len())
        {
            return shape_error(
                "Optimizer::step",
                "parameters and gradients differ in count or size",
            );
        }
        self.step += 1;
        match self.kind {
            OptimizerKind::Sgd { weight_decay } => {
                for (p, g) in params.into_iter().zip(grads) {
                    p.iter_mut()
                        .zip(*g)
                        .for_each(|(p, g)| *p -= lr * (g + weight_decay * *p));
                }
            }
            OptimizerKind::AdamW {
                betas: (b1, b2),
                eps,
                weight_decay,
            } => {
                if self.exp_avg.len() != params.len()
                    || self
                        .exp_avg
                        .iter()
                        .zip(&params)
                        .any(|(m, p)| m.len() != p.len())
                {
                    return shape_error(
                        "Optimizer::step",
                        "the optimizer state was made for other parameters",
                    );
                }
                let t = self.step as i32;
                let bias1 = 1.0 - b1.powi(t);
                let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
                let step_size = lr / bias1;
                for ((p, g), (m, v)) in params
                    .into_iter()
                    .zip(grads)
                    .zip(self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq))
                {
                    for i in 0..p.len() {
                        p[i] *= 1.0 - lr * weight_decay;
                        m[i] += (g[i] - m[i]) * (1.0 - b1);
                        v[i] = v[i] * b2 + (1.0 - b2) * g[i] * g[i];
                        let denom = v[i].sqrt() / bias2_sqrt + eps;
                        p[i] -= step_size * m[i] / denom;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The learning rate's shape over training (HF `get_*_schedule_with_warmup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = crate::PeftError;

    fn from_str(s: &str) -> Result<ScheduleKind> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => config_error(
                "lr_scheduler",
                format!("{other:?}"),
                "must be constant, linear or cosine",
            ),
        }
    }
}

/// A schedule: peak `lr`, linear warm-up over `warmup` steps, then `kind` over the rest of
/// `total` steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f32,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0 for the first), HF's LambdaLR factors:
    /// warm-up step/warmup; linear (total − step)/(total − warmup); cosine
    /// ½(1 + cos(π·progress)).
    pub fn lr_at(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.lr * step as f32 / self.warmup.max(1) as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let done = (step - self.warmup) as f64;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((self.total as f64 - step as f64) / span).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * done / span).cos())).max(0.0)
            }
        };
        (self.lr as f64 * factor) as f32
    }
}

/// Scales every gradient so that their joint L2 norm is at most `max_norm` (torch: factor
/// max_norm / (norm + 1e-6) when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: Vec<&mut [f32]>, max_norm: f32) -> f32 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32;
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        grads
            .into_iter()
            .for_each(|g| g.iter_mut().for_each(|v| *v *= factor));
    }
    norm
}
