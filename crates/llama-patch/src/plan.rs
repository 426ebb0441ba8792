//! A plan: which implementation runs for every op of every layer, and how each layer's LoRA
//! groups run. Built by [`crate::pre_patch`] and [`crate::patch_peft_model`]; read by the model.

use llama_core::{Device, Kernel};

use crate::registry::{Impl, Op};

/// How one group of projections (QKV, O or the MLP) runs its LoRA branches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoraPath {
    /// No LoRA on any member: the frozen products alone.
    #[default]
    Absent,
    /// Unsloth's fast LoRA: the members' frozen products together, then each branch.
    Fused,
    /// peft's LoRA layer: one projection after another, dropout on each branch's input.
    Plain,
}

/// The three LoRA groups of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraGroup {
    Qkv,
    O,
    Mlp,
}

impl LoraGroup {
    pub const ALL: [LoraGroup; 3] = [LoraGroup::Qkv, LoraGroup::O, LoraGroup::Mlp];

    pub fn name(self) -> &'static str {
        match self {
            LoraGroup::Qkv => "QKV",
            LoraGroup::O => "O",
            LoraGroup::Mlp => "MLP",
        }
    }
}

/// What runs in one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    pub rms_norm: Impl,
    pub rope: Impl,
    pub attention: Impl,
    pub projections: Impl,
    pub activation: Impl,
    /// [QKV, O, MLP].
    pub lora: [LoraPath; 3],
}

impl LayerPlan {
    /// Every op on `imp`, no LoRA.
    pub fn uniform(imp: Impl) -> LayerPlan {
        LayerPlan {
            rms_norm: imp,
            rope: imp,
            attention: imp,
            projections: imp,
            activation: imp,
            lora: [LoraPath::Absent; 3],
        }
    }

    /// The implementation of `op` in this layer (cross entropy is the model's, not a layer's).
    pub fn get(&self, op: Op) -> Option<Impl> {
        match op {
            Op::RmsNorm => Some(self.rms_norm),
            Op::Rope => Some(self.rope),
            Op::Attention => Some(self.attention),
            Op::Projections => Some(self.projections),
            Op::Activation => Some(self.activation),
            Op::CrossEntropy => None,
        }
    }

    fn slot(&mut self, op: Op) -> Option<&mut Impl> {
        match op {
            Op::RmsNorm => Some(&mut self.rms_norm),
            Op::Rope => Some(&mut self.rope),
            Op::Attention => Some(&mut self.attention),
            Op::Projections => Some(&mut self.projections),
            Op::Activation => Some(&mut self.activation),
            Op::CrossEntropy => None,
        }
    }

    pub fn lora(&self, group: LoraGroup) -> LoraPath {
        self.lora[group as usize]
    }

    /// The CPU kernel of `op` (Reference or Fast).
    pub fn kernel(&self, op: Op) -> Kernel {
        self.get(op).map_or(Kernel::Fast, Impl::kernel)
    }
}

/// The whole model's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchPlan {
    /// Where the model runs.
    pub device: Device,
    pub layers: Vec<LayerPlan>,
    /// The final norm, the lm_head product and the loss.
    pub final_norm: Impl,
    pub lm_head: Impl,
    pub cross_entropy: Impl,
}

impl PatchPlan {
    /// The unpatched model: every op of `num_layers` layers on its reference implementation,
    /// LoRA (when attached) on the plain path. Slow; the baseline patched models are held to.
    pub fn reference(num_layers: usize) -> PatchPlan {
        PatchPlan::uniform(Device::Cpu, num_layers, Impl::Reference)
    }

    pub(crate) fn uniform(device: Device, num_layers: usize, imp: Impl) -> PatchPlan {
        PatchPlan {
            device,
            layers: vec![LayerPlan::uniform(imp); num_layers],
            final_norm: imp,
            lm_head: imp,
            cross_entropy: imp,
        }
    }

    /// True when any op runs its reference implementation (which only the CPU has).
    pub fn uses_reference(&self) -> bool {
        let layer_ref = |l: &LayerPlan| {
            Op::ALL
                .iter()
                .filter_map(|&op| l.get(op))
                .any(|i| i == Impl::Reference)
        };
        self.layers.iter().any(layer_ref)
            || [self.final_norm, self.lm_head, self.cross_entropy].contains(&Impl::Reference)
    }

    /// Sets `op` to `imp` in every layer (and the model-level op of the same kind: the final
    /// norm for rms_norm, lm_head for projections): e.g. one op back on its reference to
    /// find which one a difference comes from.
    pub fn set(&mut self, op: Op, imp: Impl) {
        for layer in &mut self.layers {
            if let Some(slot) = layer.slot(op) {
                *slot = imp;
            }
        }
        match op {
            Op::RmsNorm => self.final_norm = imp,
            Op::Projections => self.lm_head = imp,
            Op::CrossEntropy => self.cross_entropy = imp,
            _ => {}
        }
    }

    /// Layers whose `group` runs `path`.
    pub fn count(&self, group: LoraGroup, path: LoraPath) -> usize {
        self.layers.iter().filter(|l| l.lora(group) == path).count()
    }
}
