//! The `FastLlamaModel` flow end to end, as Unsloth's notebooks do it: load the default model
//! (SmolLM2-135M-Instruct, fetched on first use), ask it a question, attach LoRA, train a few
//! steps on the repository's tiny instruction set (every answer there starts "In short:"),
//! and ask again.
//!
//!   cargo run --release -p llama-model --example fast_llama [-- STEPS [cpu|cuda]]

use std::path::Path;
use std::time::Instant;

use llama_core::Device;
use llama_model::data::{batches, read_jsonl, tokenize};
use llama_model::{
    ChatMessage, FastLlamaModel, GenerationConfig, LoadOptions, Tokenizer, TrainConfig,
    DEFAULT_MODEL,
};
use llama_peft::LoraConfig;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map_or(Ok(30), |s| s.parse())?;
    let device = match args.next() {
        Some(name) => name.parse()?,
        None => Device::cuda_if_available(),
    };
    // The CPU kernels run on rayon's pool; generating from inside it keeps every thread busy.
    rayon::ThreadPoolBuilder::new()
        .build()?
        .install(|| run(steps, device))
}

fn run(steps: usize, device: Device) -> Result<(), Error> {
    let options = LoadOptions {
        max_seq_length: Some(1024),
        device,
        ..LoadOptions::default()
    };
    let (mut model, tokenizer) = FastLlamaModel::from_pretrained(DEFAULT_MODEL, options)?;
    println!("loaded {DEFAULT_MODEL} on {}", model.device());
    for line in model.notes() {
        println!("note: {line}");
    }
    print!("{}", model.patch_reports()[0]);

    let question = "What is the capital of Italy?";
    println!("\nbefore: {}", answer(&mut model, &tokenizer, question)?);

    let mut lora = LoraConfig::new(16, 16.0);
    lora.random_state = 3407;
    print!("\n{}", model.get_peft_model(lora)?);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let data = root.join("data/tiny-instructions.jsonl");
    let eos = model.model().config.eos_token_ids.first().copied();
    let examples = read_jsonl(&data)?
        .iter()
        .map(|r| tokenize(r, Some(&tokenizer), eos, 256))
        .collect::<Result<Vec<_>, _>>()?;
    let pad = model.model().config.pad_token_id.or(eos).unwrap_or(0);
    let data = batches(&examples, 4, 256, false, pad)?;

    // 135M parameters: the activations fit without recomputing each layer.
    model.for_training(false);
    // AdamW, lr 1e-3 after 2 warm-up steps, linear decay, gradient norm clipped at 1;
    // gradient checkpointing follows for_training's choice.
    let config = TrainConfig::adamw_linear(1e-3, 2, steps);
    let mut trainer = model.trainer(config)?;
    let started = Instant::now();
    for step in 0..steps {
        let batch = &data[step % data.len()];
        let report = model.train_step(&mut trainer, std::slice::from_ref(batch))?;
        if step % 5 == 0 || step + 1 == steps {
            println!("step {:>3}  loss {:.4}", step + 1, report.loss);
        }
    }
    println!("{steps} steps in {:.1} s", started.elapsed().as_secs_f64());

    println!("\nafter:  {}", answer(&mut model, &tokenizer, question)?);
    let out = root.join("target/example-adapter");
    model.save_adapter(&out)?;
    println!("adapter saved to {}", out.display());
    Ok(())
}

/// The model's greedy answer to one user turn.
fn answer(
    model: &mut FastLlamaModel,
    tokenizer: &Tokenizer,
    question: &str,
) -> Result<String, Error> {
    let prompt = tokenizer.apply_chat_template(&[ChatMessage::new("user", question)], true)?;
    let ids = tokenizer.encode(&prompt, false)?;
    let config = GenerationConfig {
        max_new_tokens: 24,
        eos_token_ids: model.model().config.eos_token_ids.clone(),
        ..GenerationConfig::default()
    };
    let out = model.generate(&[ids], &config, &mut |_, _| true)?;
    Ok(tokenizer.decode(&out.ids[0], true)?.trim().to_string())
}
