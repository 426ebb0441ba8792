//! The policy: which implementation each op of each layer gets, from the model's facts, the
//! device and the LoRA settings, and the report of the choice.

use std::fmt;

use llama_attn::cuda::MAX_HEAD_DIM;
use llama_core::{CpuFeatures, DType, Device};
use llama_ops::GatedAct;
use llama_peft::{LoraAdapter, Target};

use crate::plan::{LoraGroup, LoraPath, PatchPlan};
use crate::registry::{Impl, Op};

/// What the policy needs to know about a model (read from its config and weights).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFacts {
    pub num_layers: usize,
    pub head_dim: usize,
    /// HF's name of the RoPE kind (default, linear, dynamic, llama3, longrope, yarn).
    pub rope_type: String,
    pub hidden_act: GatedAct,
    /// How the projections are stored (F32, BF16, Q4_1, NF4, …).
    pub weight_dtype: DType,
}

/// What a patching step did: a headline, what was patched, and why anything was not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatchReport {
    pub summary: String,
    pub patched: Vec<String>,
    pub not_patched: Vec<String>,
}

impl fmt::Display for PatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        for line in &self.patched {
            writeln!(f, "  patched: {line}")?;
        }
        for line in &self.not_patched {
            writeln!(f, "  not patched: {line}")?;
        }
        Ok(())
    }
}

/// Unsloth's `pre_patch`: the fastest implementation of every op for this model on `device`.
/// On the CPU every op has a fast implementation; on CUDA every op runs in a kernel unless
/// the model's shapes are past what the kernels handle, and then the whole model stays on
/// the CPU (a layer cannot run half on each), which the report says.
pub fn pre_patch(facts: &ModelFacts, device: Device) -> (PatchPlan, PatchReport) {
    let mut not_patched = Vec::new();
    let mut target = device;
    if device.is_cuda() && facts.head_dim > MAX_HEAD_DIM {
        not_patched.push(format!(
            "CUDA: head_dim {} exceeds the attention kernels' {MAX_HEAD_DIM}: the model runs on the CPU",
            facts.head_dim
        ));
        target = Device::Cpu;
    }
    let imp = if target.is_cuda() {
        Impl::Cuda
    } else {
        Impl::CpuFast
    };
    let plan = PatchPlan::uniform(target, facts.num_layers, imp);
    let cpu = CpuFeatures::get();
    let simd = cpu.avx2 && cpu.fma;
    if !target.is_cuda() && !simd {
        not_patched.push(
            "SIMD: this CPU lacks AVX2+FMA: the fast CPU kernels run their portable loops"
                .to_string(),
        );
    }
    let where_ = match target {
        Device::Cpu => format!("cpu ({cpu})"),
        Device::Cuda(i) => format!("cuda:{i}"),
    };
    let patched = Op::ALL
        .iter()
        .map(|&op| {
            let scope = match op {
                Op::RmsNorm => format!("{} layers × 2 + final norm", facts.num_layers),
                Op::Projections => format!("{} layers × 7 + lm_head", facts.num_layers),
                Op::CrossEntropy => "the loss".to_string(),
                _ => format!("{} layers", facts.num_layers),
            };
            let detail = match op {
                Op::Rope => format!(", {} scaling", facts.rope_type),
                Op::Projections => format!(", {} weights", facts.weight_dtype),
                Op::Activation => format!(", {}", act_name(facts.hidden_act)),
                _ => String::new(),
            };
            format!(
                "{:<13} {} — {}{detail} ({scope})",
                op.name(),
                imp,
                op.implementation(imp)
            )
        })
        .collect();
    let report = PatchReport {
        summary: format!(
            "pre_patch on {where_}: {} layers, every op on its {imp} implementation",
            facts.num_layers
        ),
        patched,
        not_patched,
    };
    (plan, report)
}

fn act_name(act: GatedAct) -> &'static str {
    match act {
        GatedAct::Silu => "SwiGLU",
        GatedAct::Gelu(_) => "GeGLU",
    }
}

/// The projections of a LoRA group.
fn members(group: LoraGroup) -> &'static [Target] {
    match group {
        LoraGroup::Qkv => &[Target::QProj, Target::KProj, Target::VProj],
        LoraGroup::O => &[Target::OProj],
        LoraGroup::Mlp => &[Target::GateProj, Target::UpProj, Target::DownProj],
    }
}

/// Unsloth's `patch_peft_model`: each layer's QKV, O and MLP groups with LoRA go through the
/// fused path when the settings allow it (lora_dropout 0; bias is always "none", the only
/// value the config accepts) and the model is patched, the plain path otherwise; groups
/// without LoRA run their frozen products alone.
pub fn patch_peft_model(plan: &mut PatchPlan, adapter: &LoraAdapter) -> PatchReport {
    let dropout = adapter.config.lora_dropout;
    let mut untouched = Vec::new();
    for (i, layer) in plan.layers.iter_mut().enumerate() {
        let lora = adapter.layers.get(i);
        let reference = layer.projections == Impl::Reference;
        for group in LoraGroup::ALL {
            let has_lora = members(group)
                .iter()
                .any(|&t| lora.is_some_and(|l| l.get(t).is_some()));
            layer.lora[group as usize] = match (has_lora, dropout > 0.0 || reference) {
                (false, _) => LoraPath::Absent,
                (true, false) => LoraPath::Fused,
                (true, true) => LoraPath::Plain,
            };
        }
        if layer.lora.iter().all(|&p| p == LoraPath::Absent) {
            untouched.push(i);
        }
    }
    let counts = LoraGroup::ALL.map(|g| plan.count(g, LoraPath::Fused));
    let fused_layers = plan
        .layers
        .iter()
        .filter(|l| l.lora.contains(&LoraPath::Fused))
        .count();
    let summary = format!(
        "patched {fused_layers} layers: {} QKV, {} O, {} MLP",
        counts[0], counts[1], counts[2]
    );
    let mut report = PatchReport {
        summary,
        ..PatchReport::default()
    };
    for group in LoraGroup::ALL {
        let fused = plan.count(group, LoraPath::Fused);
        let plain = plan.count(group, LoraPath::Plain);
        if fused > 0 {
            report
                .patched
                .push(format!("{}: fused LoRA in {fused} layers", group.name()));
        }
        if plain > 0 {
            let why = if plan.layers.iter().any(|l| l.projections == Impl::Reference) {
                "the unpatched model runs peft's plain LoRA".to_string()
            } else {
                format!("lora_dropout = {dropout} > 0 (the fused path needs 0, as Unsloth's)")
            };
            report.not_patched.push(format!(
                "{}: plain LoRA in {plain} layers: {why}",
                group.name()
            ));
        }
        let targeted = members(group)
            .iter()
            .any(|t| adapter.config.target_modules.contains(t));
        if !targeted {
            let names: Vec<&str> = members(group).iter().map(|t| t.name()).collect();
            report.not_patched.push(format!(
                "{}: {} not in target_modules: no LoRA",
                group.name(),
                names.join(", ")
            ));
        }
    }
    if !untouched.is_empty() && untouched.len() < plan.layers.len() {
        report.not_patched.push(format!(
            "layers {} have no LoRA (layers_to_transform)",
            ranges(&untouched)
        ));
    }
    if plan.device.is_cuda() && dropout > 0.0 {
        report.not_patched.push(format!(
            "CUDA: the GPU trainer needs lora_dropout 0 (got {dropout}); training with dropout runs on the CPU"
        ));
    }
    report
}

/// "0–3, 7, 9–10" for sorted indices.
fn ranges(indices: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut start = 0;
    while start < indices.len() {
        let mut end = start;
        while end + 1 < indices.len() && indices[end + 1] == indices[end] + 1 {
            end += 1;
        }
        parts.push(if end == start {
            indices[start].to_string()
        } else {
            format!("{}–{}", indices[start], indices[end])
        });
        start = end + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_join_runs() {
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0–3, 7, 9–10");
        assert_eq!(ranges(&[5]), "5");
    }
}
