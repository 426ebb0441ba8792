//! Unsloth's fast LoRA (`LoRA_QKV`, `LoRA_W`, `LoRA_MLP`) on the CPU: the frozen products and
//! the LoRA branches of the projections that read the same input, forward and backward
//! together, with the frozen weights' gradients never formed.
//! Letters: M rows, C hidden, F intermediate.
//!
//!   group forward:   yᵢ = x·Wᵢᵀ + sᵢ·(x·Aᵢᵀ)·Bᵢᵀ        (q, k, v; gate, up; o or down alone)
//!   group backward:  dx = Σᵢ dyᵢ·Wᵢ + sᵢ·(dyᵢ·Bᵢ)·Aᵢ, dAᵢ, dBᵢ as in [`LoraPair::backward`]
//!   MLP forward:     g = gate(x), u = up(x), h = act(g) ⊙ u, out = down(h)
//!   MLP backward:    dh = down backward(dout); dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g);
//!                    dx = group backward(dg, du)      (h is recomputed from g and u)

use llama_core::Kernel;
use llama_ops::{kernel, Activations, GatedAct, Weight};

use crate::error::{shape_error, Result};
use crate::lora::{Dropout, LoraGrads, LoraPair, LoraSaved};

/// A frozen projection and the LoRA pair on it, if any.
#[derive(Clone, Copy)]
pub struct Projection<'a> {
    pub base: &'a Weight,
    pub lora: Option<&'a LoraPair>,
}

impl Projection<'_> {
    fn out_features(&self) -> usize {
        self.base.shape().0
    }
}

/// How a group of projections runs: llama-patch's choice for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupMode {
    /// The implementation of the frozen products and the LoRA branches.
    pub kernel: Kernel,
    /// The members' frozen products in one call (Unsloth's fused LoRA: one quantisation of
    /// a decode row for all of them) rather than one projection after another (the plain
    /// path). The same numbers either way.
    pub fused: bool,
    pub activations: Activations,
}

impl GroupMode {
    /// The fast kernels, fused, with `activations`.
    pub fn fast(activations: Activations) -> GroupMode {
        GroupMode {
            kernel: Kernel::Fast,
            fused: true,
            activations,
        }
    }
}

/// What [`group_forward`] keeps: each member's LoRA values.
pub struct GroupSaved {
    loras: Vec<Option<LoraSaved>>,
}

/// The outputs of projections that read the same x [M, K], each written into its `outs`
/// buffer [M, Nᵢ]. Fused, the frozen products run together ([`Weight::forward_group`]: one
/// pass in 8-bit decode mode); each LoRA branch is added after (dropout drawn per member).
pub fn group_forward(
    projections: &[Projection],
    x: &[f32],
    mut outs: Vec<&mut [f32]>,
    mode: GroupMode,
    mut dropout: Option<&mut Dropout>,
) -> Result<GroupSaved> {
    if outs.len() != projections.len() {
        return shape_error(
            "group_forward",
            format!(
                "{} outputs for {} projections",
                outs.len(),
                projections.len()
            ),
        );
    }
    if mode.fused && mode.kernel == Kernel::Fast {
        let bases: Vec<&Weight> = projections.iter().map(|p| p.base).collect();
        let base_outs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut **o).collect();
        Weight::forward_group(&bases, x, base_outs, mode.activations)?;
    } else {
        for (p, y) in projections.iter().zip(outs.iter_mut()) {
            kernel::linear(mode.kernel, p.base, x, y, mode.activations)?;
        }
    }
    let loras = projections
        .iter()
        .zip(outs)
        .map(|(p, y)| {
            p.lora
                .map(|l| l.forward_add_with(mode.kernel, x, y, dropout.as_deref_mut()))
                .transpose()
        })
        .collect::<Result<_>>()?;
    Ok(GroupSaved { loras })
}

/// Backward of [`group_forward`]: upstream dyᵢ [M, Nᵢ] → dx [M, K] (overwritten), LoRA
/// gradients accumulated into `grads` (one entry per projection; None where the projection
/// has no LoRA or its gradient is not wanted).
pub fn group_backward(
    projections: &[Projection],
    mode: GroupMode,
    x: &[f32],
    saved: &GroupSaved,
    dys: &[&[f32]],
    dx: &mut [f32],
    grads: &mut [Option<&mut LoraGrads>],
) -> Result<()> {
    let n = projections.len();
    if dys.len() != n || grads.len() != n || saved.loras.len() != n {
        return shape_error(
            "group_backward",
            format!(
                "{n} projections need as many upstream gradients, saved values and gradient slots"
            ),
        );
    }
    let mut part = vec![0.0; dx.len()];
    for (i, (p, dy)) in projections.iter().zip(dys).enumerate() {
        // dx += dy·W (the frozen product)
        if i == 0 {
            kernel::linear_backward_input(mode.kernel, p.base, dy, dx)?;
        } else {
            kernel::linear_backward_input(mode.kernel, p.base, dy, &mut part)?;
            dx.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        if let (Some(lora), Some(lora_saved)) = (p.lora, &saved.loras[i]) {
            let mut unwanted = None;
            let g = match grads[i].as_deref_mut() {
                Some(g) => g,
                None => unwanted.insert(lora.zero_grads()),
            };
            lora.backward_with(mode.kernel, x, lora_saved, dy, Some(&mut *dx), g)?;
        }
    }
    Ok(())
}

/// One projection alone (o_proj, down_proj; Unsloth's `LoRA_W`): y [M, N] for x [M, K].
pub fn projection_forward(
    p: Projection,
    x: &[f32],
    mode: GroupMode,
    dropout: Option<&mut Dropout>,
) -> Result<(Vec<f32>, GroupSaved)> {
    let rows = x.len() / p.base.shape().1.max(1);
    let mut y = vec![0.0; rows * p.out_features()];
    let saved = group_forward(&[p], x, vec![&mut y], mode, dropout)?;
    Ok((y, saved))
}

/// What [`group_backward`] reads of one projection's forward, without its output: the LoRA
/// branch runs (into a scratch output, drawing the same dropout mask), the frozen product not.
fn lora_saved_only(
    p: Projection,
    x: &[f32],
    mode: GroupMode,
    dropout: Option<&mut Dropout>,
) -> Result<GroupSaved> {
    let lora = p
        .lora
        .map(|l| {
            let mut scratch = vec![0.0; x.len() / p.base.shape().1.max(1) * p.out_features()];
            l.forward_add_with(mode.kernel, x, &mut scratch, dropout)
        })
        .transpose()?;
    Ok(GroupSaved { loras: vec![lora] })
}

/// The gated MLP's three projections and its activation (with the activation's kernel).
#[derive(Clone, Copy)]
pub struct MlpProjections<'a> {
    pub gate: Projection<'a>,
    pub up: Projection<'a>,
    pub down: Projection<'a>,
    pub act: GatedAct,
    pub act_kernel: Kernel,
}

/// What [`mlp_forward`] keeps: the gate and up outputs [M, F] and the LoRA values.
pub struct MlpSaved {
    gate: Vec<f32>,
    up: Vec<f32>,
    gate_up: GroupSaved,
    down: GroupSaved,
}

/// out [M, C] = down(act(gate(x)) ⊙ up(x)) for x [M, C] (Unsloth's `LoRA_MLP`), or, when
/// `output` is false, only what [`mlp_backward`] reads: a forward recomputed for its backward
/// (gradient checkpointing) never uses its output, so the down projection's frozen product,
/// the largest of the three, is skipped (its LoRA branch still runs for the saved values).
pub fn mlp_forward(
    mlp: MlpProjections,
    x: &[f32],
    mode: GroupMode,
    mut dropout: Option<&mut Dropout>,
    output: bool,
) -> Result<(Option<Vec<f32>>, MlpSaved)> {
    let (f, c) = mlp.gate.base.shape();
    let rows = x.len() / c.max(1);
    let mut gate = vec![0.0; rows * f];
    let mut up = vec![0.0; rows * f];
    let gate_up = group_forward(
        &[mlp.gate, mlp.up],
        x,
        vec![&mut gate, &mut up],
        mode,
        dropout.as_deref_mut(),
    )?;
    let mut h = vec![0.0; rows * f];
    kernel::gated_forward(mlp.act_kernel, mlp.act, &gate, &up, &mut h)?;
    let (out, down) = if output {
        let (out, down) = projection_forward(mlp.down, &h, mode, dropout)?;
        (Some(out), down)
    } else {
        (None, lora_saved_only(mlp.down, &h, mode, dropout)?)
    };
    Ok((
        out,
        MlpSaved {
            gate,
            up,
            gate_up,
            down,
        },
    ))
}

/// Backward of [`mlp_forward`] for dout [M, C]: dx [M, C]; LoRA gradients accumulated into
/// `grads` = [gate, up, down].
pub fn mlp_backward(
    mlp: MlpProjections,
    mode: GroupMode,
    x: &[f32],
    saved: &MlpSaved,
    dout: &[f32],
    grads: [Option<&mut LoraGrads>; 3],
) -> Result<Vec<f32>> {
    let [g_gate, g_up, g_down] = grads;
    // out = down(h): dh = dout·W_down (+ LoRA), with h recomputed from gate and up.
    let mut h = vec![0.0; saved.gate.len()];
    kernel::gated_forward(mlp.act_kernel, mlp.act, &saved.gate, &saved.up, &mut h)?;
    let mut dh = vec![0.0; h.len()];
    group_backward(
        &[mlp.down],
        mode,
        &h,
        &saved.down,
        &[dout],
        &mut dh,
        &mut [g_down],
    )?;
    // h = act(gate) ⊙ up
    let mut dgate = vec![0.0; h.len()];
    let mut dup = h;
    kernel::gated_backward(
        mlp.act_kernel,
        mlp.act,
        &saved.gate,
        &saved.up,
        &dh,
        &mut dgate,
        &mut dup,
    )?;
    let mut dx = vec![0.0; x.len()];
    group_backward(
        &[mlp.gate, mlp.up],
        mode,
        x,
        &saved.gate_up,
        &[&dgate, &dup],
        &mut dx,
        &mut [g_gate, g_up],
    )?;
    Ok(dx)
}
