//! Model files: GGUF round trips (F32, Q8_0, Q4_0) from every fixture model, and corrupt or
//! inconsistent files (GGUF, safetensors, config.json) giving typed errors, never panics.

use std::path::{Path, PathBuf};

use llama_core::DType;
use llama_fixtures::{assert_close, fixtures_dir, Fixture};
use llama_model::gguf::GgufFile;
use llama_model::{load, save_gguf, LlamaModel, LoadedModel, Precision};
use proptest::prelude::*;

fn model_dirs() -> Vec<PathBuf> {
    let dir = fixtures_dir().join("models");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

fn load_quiet(path: &Path) -> llama_model::Result<LoadedModel> {
    load(path, Precision::Exact, &mut |_, _| {})
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fastllama-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn name_of(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every matrix of the model converted to `dtype`, in memory.
fn convert_all(model: &mut LlamaModel, dtype: DType) {
    model.convert_embeddings(dtype).unwrap();
    model.convert_projections(dtype).unwrap();
}

#[test]
fn gguf_round_trip_gives_the_same_model() {
    let out = scratch("roundtrip");
    for dir in model_dirs() {
        let name = name_of(&dir);
        let fixture = Fixture::open(&format!("models/{name}/reference"));
        let (ids, shape) = fixture.i64("input_ids");
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        for dtype in [DType::F32, DType::Q8_0, DType::Q4_0] {
            let mut original = load_quiet(&dir).unwrap().model;
            let path = out.join(format!("{name}-{dtype}.gguf"));
            save_gguf(&original, &path, Some(dtype)).unwrap();
            let mut loaded = load_quiet(&path)
                .unwrap_or_else(|e| panic!("{name} {dtype}: {e}"))
                .model;
            assert_eq!(loaded.config.rope, original.config.rope, "{name}");
            assert_eq!(
                loaded.config.tie_word_embeddings,
                original.config.tie_word_embeddings
            );
            assert_eq!(loaded.layers[0].self_attn.q_proj.dtype(), dtype, "{name}");
            let logits = loaded.forward(&ids, shape[0]).unwrap();
            if dtype == DType::F32 {
                let (expected, logits_shape) = fixture.f32("logits");
                assert_close(
                    &format!("{name} via GGUF"),
                    &logits,
                    &expected,
                    &logits_shape,
                    1e-4,
                );
            }
            // The file holds exactly the converted weights: the same logits, bit for bit.
            convert_all(&mut original, dtype);
            assert_eq!(
                logits,
                original.forward(&ids, shape[0]).unwrap(),
                "{name} {dtype}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = &model_dirs()[0];
    let out = scratch("named");
    let model = load_quiet(dir).unwrap().model;
    let path = out.join("m.gguf");
    save_gguf(&model, &path, None).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert!(file.tensor("blk.0.attn_q.weight").is_some());

    // A config whose sizes disagree with the weights.
    let hf = out.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] =
        serde_json::json!(config["intermediate_size"].as_u64().unwrap() * 2);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(dir.join("model.safetensors"), hf.join("model.safetensors")).unwrap();
    let err = load_quiet(&hf)
        .err()
        .expect("mis-shaped weights")
        .to_string();
    assert!(
        err.contains("mlp.gate_proj.weight")
            && err.contains("expected shape")
            && err.contains("holds shape"),
        "{err}"
    );

    // More layers than the file holds.
    config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] =
        serde_json::json!(config["num_hidden_layers"].as_u64().unwrap() + 1);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let err = load_quiet(&hf).err().expect("a missing layer").to_string();
    assert!(err.contains("is missing from"), "{err}");

    // Another architecture.
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let err = load_quiet(&hf).err().expect("unsupported").to_string();
    assert!(err.contains("MistralForCausalLM"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// How a valid file is damaged.
#[derive(Clone, Debug)]
enum Damage {
    Truncate(usize),
    Flip(Vec<(usize, u8)>),
    /// Writes a huge little-endian u64 at an offset (counts, lengths, dimensions).
    Huge(usize),
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        proptest::collection::vec((any::<usize>(), 1u8..=255), 1..8).prop_map(Damage::Flip),
        any::<usize>().prop_map(Damage::Huge),
    ]
}

fn apply(bytes: &[u8], damage: &Damage, header_len: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    match damage {
        Damage::Truncate(at) => out.truncate(at % bytes.len()),
        // Most damage goes to the header, where the structure is.
        Damage::Flip(flips) => flips
            .iter()
            .for_each(|&(at, x)| out[at % header_len.min(bytes.len())] ^= x),
        Damage::Huge(at) => {
            let at = at % header_len.min(bytes.len() - 8);
            out[at..at + 8].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
        }
    }
    out
}

/// A small valid GGUF (Q8_0) and its bytes.
fn sample_gguf(dir: &Path) -> Vec<u8> {
    let model = load_quiet(&model_dirs()[0]).unwrap().model;
    let path = dir.join("sample.gguf");
    save_gguf(&model, &path, Some(DType::Q8_0)).unwrap();
    std::fs::read(&path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn damaged_gguf_files_are_errors_not_panics(damage in damage_strategy()) {
        let dir = scratch("gguf-damage");
        let bytes = sample_gguf(&dir);
        let path = dir.join("damaged.gguf");
        std::fs::write(&path, apply(&bytes, &damage, 4096)).unwrap();
        // Either outcome is fine; a panic fails the test.
        if let Ok(loaded) = load_quiet(&path) {
            let mut model = loaded.model;
            let _ = model.forward(&[1, 2, 3], 1);
        }
    }

    #[test]
    fn damaged_safetensors_and_configs_are_errors_not_panics(damage in damage_strategy(), in_config: bool) {
        let src = &model_dirs()[0];
        let dir = scratch("st-damage");
        for file in ["config.json", "model.safetensors"] {
            let bytes = std::fs::read(src.join(file)).unwrap();
            let damaged = if (file == "config.json") == in_config { apply(&bytes, &damage, bytes.len().min(2048)) } else { bytes };
            std::fs::write(dir.join(file), damaged).unwrap();
        }
        if let Ok(loaded) = load_quiet(&dir) {
            let mut model = loaded.model;
            let _ = model.forward(&[1, 2, 3], 1);
        }
    }
}
