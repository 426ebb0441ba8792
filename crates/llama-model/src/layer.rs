//! One decoder layer, forward and backward side by side (the backward for LoRA training: the
//! frozen weights get no gradients). Letters: N rows (B·T), C hidden, F intermediate.
//!
//!   forward:   n₁ = rms_norm(x)                           x [N, C]
//!              q, k, v = qkv(n₁)                          (frozen W + LoRA, together)
//!              mid = x + o(attend(q, k, v))
//!              n₂ = rms_norm(mid)
//!              out = mid + down(act(gate(n₂)) ⊙ up(n₂))   [N, C]
//!   backward:  dmid = dout + rms_norm_backward(mid, mlp_backward(dout))
//!              dx = dmid + rms_norm_backward(x, qkv_backward(attend_backward(o_backward(dmid))))

use llama_attn::{AttendSaved, KvCache, LlamaAttention};
use llama_core::SplitMix64;
use llama_ops::kernel::{rms_norm, rms_norm_backward};
use llama_ops::{Activations, GatedAct, Weight};
use llama_patch::{LayerPlan, LoraGroup, LoraPath, Op};
use llama_peft::fused::{
    group_backward, group_forward, mlp_backward, mlp_forward, projection_forward, GroupMode,
    GroupSaved, MlpProjections, MlpSaved, Projection,
};
use llama_peft::{Dropout, LayerLora, LoraGrads, Target};

use crate::error::Result;

/// The gated MLP: down(act(x · gateᵀ) ⊙ (x · upᵀ)).
pub struct LlamaMlp {
    pub gate_proj: Weight,
    pub up_proj: Weight,
    pub down_proj: Weight,
    pub act: GatedAct,
    pub activations: Activations,
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual stream.
pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: LlamaAttention,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: LlamaMlp,
    /// Which implementation each op runs (llama-patch's plan for this layer).
    pub(crate) plan: LayerPlan,
}

/// Where a layer's attention gets its keys: the sequence itself (keeping what `keep` says), or
/// a cache it appends to.
pub(crate) enum AttnInput<'a> {
    Sequence {
        padding: Option<&'a [usize]>,
        keep: Keep,
    },
    Cached(&'a mut KvCache),
}

/// What a forward over a sequence leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// The output in h (inference; a checkpointed training forward).
    Output,
    /// The output and the tape (training without checkpointing).
    OutputAndTape,
    /// The tape only: a forward recomputed for its backward, which never reads the output, so
    /// the down projection's frozen product is skipped and h is left holding `mid`.
    Tape,
}

/// What a layer's forward keeps for its backward.
pub(crate) struct LayerTape {
    input: Vec<f32>,
    normed1: Vec<f32>,
    qkv: GroupSaved,
    attend: AttendSaved,
    merged: Vec<f32>,
    o: GroupSaved,
    mid: Vec<f32>,
    normed2: Vec<f32>,
    mlp: MlpSaved,
}

/// The frozen weights of a layer with their LoRA pairs: [q, k, v], o and the MLP.
struct LayerProjections<'a> {
    qkv: [Projection<'a>; 3],
    o: Projection<'a>,
    mlp: MlpProjections<'a>,
}

/// A layer's LoRA pairs (None: the base model alone) and the dropout on their inputs.
#[derive(Default)]
pub(crate) struct LayerAdapter<'a> {
    pub lora: Option<&'a LayerLora>,
    pub dropout: Option<Dropout>,
}

/// Dropout for the LoRA branches of one layer: a fresh generator from `seed`, so that a
/// recomputed forward (gradient checkpointing) draws the same masks.
pub(crate) fn layer_dropout(p: f32, seed: Option<u64>) -> Option<Dropout> {
    seed.filter(|_| p > 0.0).map(|seed| Dropout {
        p,
        rng: SplitMix64::new(seed),
    })
}

impl DecoderLayer {
    /// Runs every op as `plan` says from now on.
    pub(crate) fn set_plan(&mut self, plan: LayerPlan) {
        self.self_attn.kernel = plan.kernel(Op::Attention);
        self.self_attn.rope_kernel = plan.kernel(Op::Rope);
        self.plan = plan;
    }

    /// How `group`'s projections run: the plan's kernel, fused unless its LoRA is plain.
    fn group_mode(&self, group: LoraGroup) -> GroupMode {
        GroupMode {
            kernel: self.plan.kernel(Op::Projections),
            fused: self.plan.lora(group) != LoraPath::Plain,
            activations: self.mlp.activations,
        }
    }

    /// The seven projection weights in [`Target`] order (q, k, v, o, gate, up, down).
    pub fn weights(&self) -> [&Weight; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// [`Self::weights`], mutable.
    pub fn projections_mut(&mut self) -> [&mut Weight; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    fn projections<'a>(&'a self, lora: Option<&'a LayerLora>) -> LayerProjections<'a> {
        let pair = |t: Target| lora.and_then(|l| l.get(t));
        let proj = |base, t| Projection {
            base,
            lora: pair(t),
        };
        let a = &self.self_attn;
        LayerProjections {
            qkv: [
                proj(&a.q_proj, Target::QProj),
                proj(&a.k_proj, Target::KProj),
                proj(&a.v_proj, Target::VProj),
            ],
            o: proj(&a.o_proj, Target::OProj),
            mlp: MlpProjections {
                gate: proj(&self.mlp.gate_proj, Target::GateProj),
                up: proj(&self.mlp.up_proj, Target::UpProj),
                down: proj(&self.mlp.down_proj, Target::DownProj),
                act: self.mlp.act,
                act_kernel: self.plan.kernel(Op::Activation),
            },
        }
    }

    /// h [N, C] ← h + attn(norm(h)); h ← h + mlp(norm(h)), with `lora` on the projections.
    /// Returns the tape for [`Self::backward`] when the input asks to keep it.
    pub(crate) fn forward(
        &mut self,
        h: &mut [f32],
        batch: usize,
        positions: &[u32],
        eps: f32,
        input: AttnInput,
        adapter: LayerAdapter,
    ) -> Result<Option<LayerTape>> {
        let LayerAdapter { lora, mut dropout } = adapter;
        let norm = self.plan.kernel(Op::RmsNorm);
        let c = self.input_layernorm.len();
        let rows = h.len() / c;
        let keep = match input {
            AttnInput::Sequence { keep, .. } => keep,
            AttnInput::Cached(_) => Keep::Output,
        };
        let kept_input = (keep != Keep::Output).then(|| h.to_vec());
        let mut normed1 = vec![0f32; h.len()];
        rms_norm(norm, h, &self.input_layernorm, eps, &mut normed1)?;
        // Split borrows: the projections read the weights, attend needs the layer's RoPE state.
        let widths = [
            &self.self_attn.q_proj,
            &self.self_attn.k_proj,
            &self.self_attn.v_proj,
        ]
        .map(|w| w.shape().0);
        let mut qkv_out = widths.map(|w| vec![0f32; rows * w]);
        let qkv_saved = {
            let p = self.projections(lora);
            let [q, k, v] = &mut qkv_out;
            let mode = self.group_mode(LoraGroup::Qkv);
            group_forward(&p.qkv, &normed1, vec![q, k, v], mode, dropout.as_mut())?
        };
        let [q, k, v] = &qkv_out;
        let (merged, attend) = match input {
            AttnInput::Sequence { padding, .. } => {
                let (merged, saved) =
                    self.self_attn
                        .attend([q, k, v], batch, positions, padding)?;
                (merged, Some(saved))
            }
            AttnInput::Cached(cache) => (
                self.self_attn
                    .attend_cached([q, k, v], batch, positions, cache)?,
                None,
            ),
        };
        drop(qkv_out);
        let p = self.projections(lora);
        let o_mode = self.group_mode(LoraGroup::O);
        let (attn_out, o_saved) = projection_forward(p.o, &merged, o_mode, dropout.as_mut())?;
        add_into(h, &attn_out);
        let mut normed2 = vec![0f32; h.len()];
        rms_norm(norm, h, &self.post_attention_layernorm, eps, &mut normed2)?;
        let mid = kept_input.is_some().then(|| h.to_vec());
        let mlp_mode = self.group_mode(LoraGroup::Mlp);
        let output = keep != Keep::Tape;
        let (mlp_out, mlp_saved) =
            mlp_forward(p.mlp, &normed2, mlp_mode, dropout.as_mut(), output)?;
        if let Some(mlp_out) = mlp_out {
            add_into(h, &mlp_out);
        }
        Ok(match (kept_input, attend, mid) {
            (Some(input), Some(attend), Some(mid)) => Some(LayerTape {
                input,
                normed1,
                qkv: qkv_saved,
                attend,
                merged,
                o: o_saved,
                mid,
                normed2,
                mlp: mlp_saved,
            }),
            _ => None,
        })
    }

    /// Backward of [`Self::forward`]: `dh` holds the gradient of the layer's output and is
    /// replaced by that of its input; LoRA gradients are accumulated into `grads` (indexed by
    /// [`Target`]).
    pub(crate) fn backward(
        &mut self,
        tape: &LayerTape,
        dh: &mut [f32],
        eps: f32,
        lora: Option<&LayerLora>,
        grads: &mut [Option<LoraGrads>; 7],
    ) -> Result<()> {
        let [gq, gk, gv, go, g_gate, g_up, g_down] = grads.each_mut().map(Option::as_mut);
        let norm = self.plan.kernel(Op::RmsNorm);
        let c = self.input_layernorm.len();
        let mut dw = vec![0f32; c];
        // out = mid + mlp(n₂), n₂ = rms_norm(mid)
        let d_normed2 = {
            let p = self.projections(lora);
            let mode = self.group_mode(LoraGroup::Mlp);
            mlp_backward(
                p.mlp,
                mode,
                &tape.normed2,
                &tape.mlp,
                dh,
                [g_gate, g_up, g_down],
            )?
        };
        let mut part = vec![0f32; dh.len()];
        rms_norm_backward(
            norm,
            &tape.mid,
            &self.post_attention_layernorm,
            &d_normed2,
            eps,
            &mut part,
            &mut dw,
        )?;
        add_into(dh, &part);
        // mid = x + o(attend(qkv(n₁))), n₁ = rms_norm(x)
        let mut d_merged = vec![0f32; tape.merged.len()];
        {
            let p = self.projections(lora);
            group_backward(
                &[p.o],
                self.group_mode(LoraGroup::O),
                &tape.merged,
                &tape.o,
                &[dh],
                &mut d_merged,
                &mut [go],
            )?;
        }
        let [dq, dk, dv] = self.self_attn.attend_backward(&tape.attend, &d_merged)?;
        let mut d_normed1 = vec![0f32; dh.len()];
        {
            let p = self.projections(lora);
            group_backward(
                &p.qkv,
                self.group_mode(LoraGroup::Qkv),
                &tape.normed1,
                &tape.qkv,
                &[&dq, &dk, &dv],
                &mut d_normed1,
                &mut [gq, gk, gv],
            )?;
        }
        rms_norm_backward(
            norm,
            &tape.input,
            &self.input_layernorm,
            &d_normed1,
            eps,
            &mut part,
            &mut dw,
        )?;
        add_into(dh, &part);
        Ok(())
    }
}

pub(crate) fn add_into(h: &mut [f32], delta: &[f32]) {
    h.iter_mut().zip(delta).for_each(|(h, d)| *h += d);
}
