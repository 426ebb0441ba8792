//! The policy on its own (suite `fast-model`): pre_patch per device, the CUDA fallback for
//! heads the kernels cannot take, patch_peft_model's counts for dropout, targets and
//! layers_to_transform, and the plan's per-op edits. The model-level equalities (patched ==
//! unpatched) are in the workspace's `model_patching_integration`.

use llama_core::{DType, Device, Kernel};
use llama_ops::GatedAct;
use llama_patch::{
    patch_peft_model, pre_patch, Impl, LayerPlan, LoraGroup, LoraPath, ModelFacts, Op, PatchPlan,
};
use llama_peft::{LoraAdapter, LoraConfig, ModelDims, Target};

fn facts(layers: usize, head_dim: usize) -> ModelFacts {
    ModelFacts {
        num_layers: layers,
        head_dim,
        rope_type: "llama3".into(),
        hidden_act: GatedAct::Silu,
        weight_dtype: DType::Q4_1,
    }
}

fn adapter(layers: usize, config: LoraConfig) -> LoraAdapter {
    let dims = ModelDims {
        num_layers: layers,
        hidden: 16,
        intermediate: 24,
        q_width: 16,
        kv_width: 8,
        vocab: 32,
    };
    LoraAdapter::new(config, dims).unwrap()
}

#[test]
fn pre_patch_picks_the_devices_fast_implementations() {
    let (cpu, report) = pre_patch(&facts(5, 64), Device::Cpu);
    assert_eq!(cpu.device, Device::Cpu);
    assert_eq!(cpu.layers, vec![LayerPlan::uniform(Impl::CpuFast); 5]);
    assert!(!cpu.uses_reference());
    assert!(report.summary.contains("5 layers"), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("llama3 scaling") && text.contains("Q4_1 weights"),
        "{text}"
    );
    let (gpu, report) = pre_patch(&facts(5, 64), Device::Cuda(1));
    assert_eq!(gpu.device, Device::Cuda(1));
    assert!(gpu.layers.iter().all(|l| l.attention == Impl::Cuda));
    assert_eq!(gpu.cross_entropy, Impl::Cuda);
    assert!(report.not_patched.is_empty(), "{report}");
}

#[test]
fn heads_past_the_cuda_kernels_keep_the_model_on_the_cpu() {
    let (plan, report) = pre_patch(&facts(2, 512), Device::Cuda(0));
    assert_eq!(plan.device, Device::Cpu);
    assert_eq!(plan.layers[0].attention, Impl::CpuFast);
    assert!(
        report.not_patched[0].contains("head_dim 512 exceeds"),
        "{report}"
    );
}

#[test]
fn patch_peft_model_counts_fused_and_plain_groups() {
    let (mut plan, _) = pre_patch(&facts(4, 8), Device::Cpu);
    let report = patch_peft_model(&mut plan, &adapter(4, LoraConfig::new(4, 4.0)));
    assert_eq!(report.summary, "patched 4 layers: 4 QKV, 4 O, 4 MLP");
    assert!(report.not_patched.is_empty());
    // dropout: every group plain, with the reason
    let mut dropout = LoraConfig::new(4, 4.0);
    dropout.lora_dropout = 0.05;
    let report = patch_peft_model(&mut plan, &adapter(4, dropout));
    assert_eq!(report.summary, "patched 0 layers: 0 QKV, 0 O, 0 MLP");
    assert_eq!(plan.count(LoraGroup::Mlp, LoraPath::Plain), 4);
    assert!(
        report.not_patched[0].contains("lora_dropout = 0.05 > 0"),
        "{report}"
    );
    // MLP only, layers 1 and 2: the rest absent, and said so
    let mut partial = LoraConfig::new(4, 4.0);
    partial.target_modules = vec![Target::GateProj, Target::UpProj, Target::DownProj];
    partial.layers_to_transform = Some(vec![1, 2]);
    let report = patch_peft_model(&mut plan, &adapter(4, partial));
    assert_eq!(report.summary, "patched 2 layers: 0 QKV, 0 O, 2 MLP");
    assert_eq!(plan.layers[0].lora, [LoraPath::Absent; 3]);
    assert_eq!(plan.layers[1].lora(LoraGroup::Mlp), LoraPath::Fused);
    let text = report.to_string();
    assert!(
        text.contains("QKV: q_proj, k_proj, v_proj not in target_modules"),
        "{text}"
    );
    assert!(text.contains("layers 0, 3 have no LoRA"), "{text}");
}

#[test]
fn the_unpatched_plan_runs_lora_on_the_plain_path() {
    let mut plan = PatchPlan::reference(3);
    assert!(plan.uses_reference());
    let report = patch_peft_model(&mut plan, &adapter(3, LoraConfig::new(2, 2.0)));
    assert_eq!(plan.count(LoraGroup::Qkv, LoraPath::Plain), 3);
    assert!(
        report.not_patched[0].contains("the unpatched model runs peft's plain LoRA"),
        "{report}"
    );
}

#[test]
fn one_op_can_go_back_to_its_reference() {
    let (mut plan, _) = pre_patch(&facts(2, 8), Device::Cpu);
    plan.set(Op::RmsNorm, Impl::Reference);
    assert!(plan.uses_reference());
    assert_eq!(plan.final_norm, Impl::Reference);
    let layer = plan.layers[1];
    assert_eq!(layer.kernel(Op::RmsNorm), Kernel::Reference);
    assert_eq!(layer.kernel(Op::Attention), Kernel::Fast);
    assert_eq!(plan.lm_head, Impl::CpuFast);
    plan.set(Op::Projections, Impl::Reference);
    assert_eq!(plan.lm_head, Impl::Reference);
    assert_eq!(Impl::Cuda.kernel(), Kernel::Fast);
}
