//! `cargo xtask bench-train`: LoRA training of SmolLM2-135M (r=16 on all seven projections,
//! AdamW, batch 1 × 512) on the CPU, with and without gradient checkpointing, in `exact` (f32)
//! and `fast` precision (bf16 products on CPUs with AVX512-BF16) — tokens/s and peak memory of
//! `fastllama bench-train`, side by side with HF transformers + peft
//! (`../shared/bench/hf_cpu_train.py`, f32, in a venv under target/) in the same run.

use std::path::Path;
use std::process::{Command, ExitCode};

use clap::Args;
use serde_json::Value;

use crate::bench::{fastllama_and_model, run_json, venv_python};
use crate::cargo;

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Optimizer steps per run (the first is a warm-up).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Leave out the HF + peft peer.
    #[arg(long)]
    no_peer: bool,
}

/// The HF + peft anchor: `hf_cpu_train.py` from the shared bench folder, on the same file.
fn hf_peer(root: &Path, model: &str) -> Result<Value, String> {
    let python = venv_python(
        root,
        "train-venv",
        "torch, transformers, peft, gguf",
        &["torch", "transformers", "peft", "gguf"],
        &[],
    )?;
    let script = root.join("../shared/bench/hf_cpu_train.py");
    let dir = Path::new(model)
        .parent()
        .ok_or("the model path has no directory")?;
    run_json(
        Command::new(python).arg(script).arg(dir),
        "the HF + peft peer",
    )
}

/// fastllama's precisions, each run with and without checkpointing.
const PRECISIONS: [&str; 2] = ["exact", "fast"];

pub fn run(args: BenchTrainArgs) -> Result<ExitCode, String> {
    let root = cargo::root();
    let (fastllama, model) = fastllama_and_model(&root)?;
    let mut ours = Vec::new();
    for (precision, checkpointing) in PRECISIONS.iter().flat_map(|&p| [(p, false), (p, true)]) {
        let mut cmd = Command::new(&fastllama);
        cmd.args(["bench-train", "--json", "--device", "cpu"])
            .args(["--precision", precision])
            .args(["--model", &model, "--threads", &args.threads.to_string()])
            .args(["--steps", &args.steps.to_string()]);
        if checkpointing {
            cmd.arg("--gradient-checkpointing");
        }
        ours.push((precision, run_json(&mut cmd, "fastllama bench-train")?));
    }
    let peer = if args.no_peer {
        None
    } else {
        hf_peer(&root, &model)
            .map_err(|e| eprintln!("HF + peft peer unavailable: {e}"))
            .ok()
    };
    println!(
        "LoRA r=16 (all seven projections), AdamW, batch 1 × 512, SmolLM2-135M ({model}), {} threads",
        args.threads
    );
    println!();
    println!("| engine | precision | checkpointing | tok/s (× HF + peft) | peak RSS MiB |");
    println!("| --- | --- | --- | --- | --- |");
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if let Some(p) = &peer {
        for (key, ckpt) in [("ckpt=False", false), ("ckpt=True", true)] {
            println!(
                "| HF transformers + peft (torch {}) | f32 | {ckpt} | {:.1} | {:.0} (both runs) |",
                p["torch"].as_str().unwrap_or("?"),
                num(&p[key], "tok_s"),
                num(p, "peak_rss_MB"),
            );
        }
    }
    for (precision, r) in &ours {
        let ckpt = r["gradient_checkpointing"].as_bool().unwrap_or(false);
        let key = if ckpt { "ckpt=True" } else { "ckpt=False" };
        let ratio = peer.as_ref().map_or(String::new(), |p| {
            format!(" ({:.2}×)", num(r, "tokens_per_s") / num(&p[key], "tok_s"))
        });
        println!(
            "| fastllama | {precision} | {ckpt} | {:.1}{ratio} | {:.0} |",
            num(r, "tokens_per_s"),
            num(r, "peak_rss_mib"),
        );
    }
    Ok(ExitCode::SUCCESS)
}
