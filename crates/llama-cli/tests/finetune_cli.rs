//! `fastllama finetune` end to end on a fixture model: the loss in train_log.jsonl falls, and
//! the adapter it writes is the one `logits --adapter` and `generate --adapter` apply.

use std::path::{Path, PathBuf};
use std::process::Command;

use llama_fixtures::{assert_close, fixture_names, fixtures_dir};
use llama_model::{load, Precision};
use llama_peft::LoraAdapter;

fn fastllama(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fastllama"))
        .args(args)
        .env("FASTLLAMA_DEVICE", "cpu")
        .output()
        .expect("fastllama runs");
    assert!(
        out.status.success(),
        "fastllama {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn first_model() -> PathBuf {
    let first = fixture_names("models", "config.json").remove(0);
    fixtures_dir().join("models").join(first)
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("logits").unwrap();
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn finetune_lowers_the_loss_and_its_adapter_is_used_by_logits_and_generate() {
    let model = first_model();
    let vocab = llama_model::LlamaConfig::from_hf_file(&model.join("config.json"))
        .unwrap()
        .vocab_size as u32;
    let work = std::env::temp_dir().join(format!("fastllama-cli-finetune-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let data = work.join("data.jsonl");
    let pattern: Vec<u32> = [23u32, 17, 5, 11, 29].iter().map(|i| i % vocab).collect();
    let lines: Vec<String> = (0..6)
        .map(|i| {
            let ids: Vec<u32> = pattern.iter().cycle().skip(i).take(14).copied().collect();
            serde_json::json!({"input_ids": ids}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = work.join("adapter");
    let m = model.to_str().unwrap();
    fastllama(&[
        "finetune",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "15",
        "--lora-r",
        "4",
        "--lr",
        "2e-2",
        "--lr-scheduler",
        "constant",
        "--batch-size",
        "2",
        "--precision",
        "exact",
        "--device",
        "cpu",
    ]);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 15);
    assert!(losses[14] < 0.5 * losses[0], "loss {losses:?}");

    // logits --adapter equals the library's forward with that adapter, and differs from the base
    let prompt: Vec<u32> = pattern[..4].to_vec();
    let ids = prompt
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let ids = ids.as_str();
    let with = work.join("with.safetensors");
    let without = work.join("without.safetensors");
    let common = [
        "--model",
        m,
        "--ids",
        ids,
        "--precision",
        "exact",
        "--device",
        "cpu",
    ];
    fastllama(
        &[
            &[
                "logits",
                "--adapter",
                out.to_str().unwrap(),
                "--out",
                with.to_str().unwrap(),
            ],
            &common[..],
        ]
        .concat(),
    );
    fastllama(&[&["logits", "--out", without.to_str().unwrap()], &common[..]].concat());
    let mut loaded = load(&model, Precision::Exact, &mut |_, _| {}).unwrap();
    let adapter = LoraAdapter::load(&out, loaded.model.dims()).unwrap();
    loaded.model.set_adapter(Some(adapter)).unwrap();
    let expected = loaded.model.forward(&prompt, 1).unwrap();
    let got = read_logits(&with);
    assert_close("logits --adapter", &got, &expected, &[got.len()], 1e-6);
    assert!(llama_fixtures::rel_error(&read_logits(&without), &expected) > 1e-3);

    // generate --adapter continues the learned pattern
    let json = fastllama(
        &[
            &[
                "generate",
                "--adapter",
                out.to_str().unwrap(),
                "--max-new-tokens",
                "4",
                "--json",
            ],
            &common[..],
        ]
        .concat(),
    );
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let next: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        next,
        vec![pattern[4], pattern[0], pattern[1], pattern[2]],
        "{json}"
    );
    std::fs::remove_dir_all(&work).ok();
}
