//! Patching (suite `integration`): on every fixture model the patched model (pre_patch: the
//! fast kernels; patch_peft_model: fused LoRA) equals the unpatched one (every op on its
//! reference) on the same weights — logits, loss and every LoRA gradient — and each op alone
//! on its reference changes nothing either; the reports say what was patched and why
//! anything was not; on CUDA (when present) the GPU's plan gives the reference's logits.

mod common;

use common::{fresh_adapter, grads_of, load_model, model_dirs, pattern_batches, randomise};
use llama_core::Device;
use llama_fixtures::{assert_close, cuda_or_skip};
use llama_model::{Decoder, Engine, LlamaModel};
use llama_patch::{Impl, LoraGroup, LoraPath, Op, PatchPlan};
use llama_peft::{LoraConfig, Target};

/// The fast kernels against f64 loops on these sizes: f32 rounding only.
const TOL: f64 = 1e-5;

fn ids_for(model: &LlamaModel) -> Vec<u32> {
    let v = model.config.vocab_size as u32;
    (0..14).map(|i| (i * 11 + 5) % v).collect()
}

#[test]
fn the_unpatched_model_gives_the_patched_logits_and_loss() {
    for dir in model_dirs() {
        let mut patched = load_model(&dir);
        let mut unpatched = load_model(&dir);
        let report = unpatched.unpatch();
        assert!(report.summary.starts_with("unpatched"));
        assert_eq!(
            unpatched.patch_plan(),
            &PatchPlan::reference(patched.layers.len())
        );
        let ids = ids_for(&patched);
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let (a, b) = (
            patched.forward(&ids, 2).unwrap(),
            unpatched.forward(&ids, 2).unwrap(),
        );
        assert_close(
            &format!("{} logits", dir.display()),
            &a,
            &b,
            &[a.len()],
            TOL,
        );
        let (la, lb) = (
            patched.loss(&ids, &labels, 2).unwrap(),
            unpatched.loss(&ids, &labels, 2).unwrap(),
        );
        assert_close(&format!("{} loss", dir.display()), &[la], &[lb], &[1], TOL);
    }
}

#[test]
fn the_unpatched_model_gives_the_patched_lora_gradients() {
    for dir in model_dirs() {
        let mut patched = load_model(&dir);
        fresh_adapter(&mut patched, 0.0);
        randomise(&mut patched);
        let mut unpatched = load_model(&dir);
        unpatched.set_adapter(patched.adapter().cloned()).unwrap();
        unpatched.unpatch();
        let layers = patched.layers.len();
        assert_eq!(
            patched.patch_plan().count(LoraGroup::Qkv, LoraPath::Fused),
            layers
        );
        assert_eq!(
            unpatched
                .patch_plan()
                .count(LoraGroup::Mlp, LoraPath::Plain),
            layers
        );
        let b = &pattern_batches(&patched, 3, 2, 2)[0];
        let (g, r) = (grads_of(&mut patched, b), grads_of(&mut unpatched, b));
        assert_close(
            &format!("{} LoRA grads", dir.display()),
            &g,
            &r,
            &[g.len()],
            TOL,
        );
    }
}

#[test]
fn each_op_alone_on_its_reference_changes_nothing() {
    for dir in model_dirs() {
        let mut patched = load_model(&dir);
        let ids = ids_for(&patched);
        let expected = patched.forward(&ids, 1).unwrap();
        for op in Op::ALL {
            let mut model = load_model(&dir);
            let mut plan = model.patch_plan().clone();
            plan.set(op, Impl::Reference);
            model.set_patch_plan(plan).unwrap();
            assert!(model.patch_plan().uses_reference());
            let got = model.forward(&ids, 1).unwrap();
            let what = format!("{} {} on its reference", dir.display(), op.name());
            assert_close(&what, &got, &expected, &[got.len()], TOL);
        }
    }
}

#[test]
fn reports_say_what_was_patched_and_why_not() {
    for dir in model_dirs() {
        let mut model = load_model(&dir);
        let n = model.layers.len();
        let pre = model.pre_patch(Device::Cpu);
        for op in Op::ALL {
            assert!(
                pre.patched.iter().any(|l| l.starts_with(op.name())),
                "{op:?} in {pre}"
            );
        }
        model.get_peft_model(LoraConfig::new(4, 8.0)).unwrap();
        let all = model.patch_peft_model().unwrap();
        assert_eq!(
            all.summary,
            format!("patched {n} layers: {n} QKV, {n} O, {n} MLP")
        );
        assert!(all.not_patched.is_empty(), "{all}");
        // dropout keeps every group on the plain path, and says why
        let mut config = LoraConfig::new(4, 8.0);
        config.lora_dropout = 0.1;
        model.get_peft_model(config).unwrap();
        let plain = model.patch_peft_model().unwrap();
        assert_eq!(plain.summary, "patched 0 layers: 0 QKV, 0 O, 0 MLP");
        assert!(
            plain
                .not_patched
                .iter()
                .any(|l| l.contains("lora_dropout = 0.1")),
            "{plain}"
        );
        // attention-only targets on the first layer only
        let mut config = LoraConfig::new(4, 8.0);
        config.target_modules = vec![Target::QProj, Target::VProj];
        config.layers_to_transform = Some(vec![0]);
        model.get_peft_model(config).unwrap();
        let partial = model.patch_peft_model().unwrap();
        assert_eq!(partial.summary, "patched 1 layers: 1 QKV, 0 O, 0 MLP");
        let text = partial.to_string();
        assert!(text.contains("O: o_proj not in target_modules"), "{text}");
        assert!(text.contains("MLP: gate_proj, up_proj, down_proj not in target_modules"));
        if n > 1 {
            assert!(
                text.contains("have no LoRA (layers_to_transform)"),
                "{text}"
            );
        }
    }
}

#[test]
fn the_gpu_plan_gives_the_reference_logits() {
    let Some(gpu) = cuda_or_skip!() else { return };
    for dir in model_dirs() {
        let mut reference = load_model(&dir);
        fresh_adapter(&mut reference, 0.0);
        randomise(&mut reference);
        let mut on_gpu = load_model(&dir);
        on_gpu.set_adapter(reference.adapter().cloned()).unwrap();
        reference.unpatch();
        let ids = ids_for(&reference);
        let v = reference.config.vocab_size;
        let expected = reference.forward(&ids, 1).unwrap();
        let mut engine = Engine::new(on_gpu, Some(&gpu)).unwrap();
        assert!(matches!(engine, Engine::Cuda(_)), "{}", dir.display());
        let mut cache = engine.new_cache(1, ids.len(), None).unwrap();
        let last = engine.forward_cached(&ids, 1, &mut cache).unwrap();
        let want = &expected[(ids.len() - 1) * v..];
        // bf16 weights and activations through every layer: the GPU model's own test against
        // the CPU holds the same 2e-2
        assert_close(
            &format!("{} GPU last logits", dir.display()),
            &last,
            want,
            &[v],
            2e-2,
        );
    }
}
