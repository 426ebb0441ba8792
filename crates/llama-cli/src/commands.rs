//! The model commands: generate, logits, tokenize, info.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use llama_core::Device;
use llama_model::{
    generate, CudaLlamaModel, Decoder, Engine, GenerationConfig, LlamaConfig, LlamaModel,
    LoadedModel, ModelFormat, ModelShape, SamplingConfig, TextStream,
};
use serde_json::json;

use crate::model_args::{prompt_ids, ModelArgs, PromptArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Render the prompt through the model's chat template as one user turn.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object with the ids, the text and the speeds instead of streaming.
    #[arg(long)]
    json: bool,
}

/// How the next token is chosen (generate and chat).
#[derive(Args, Debug)]
pub struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    pub fn config(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
        }
    }
}

pub fn generate_cmd(args: &GenerateArgs) -> Result<(), String> {
    let loaded = args.model.load()?;
    let prompt_ids = args.prompt.ids(&loaded, args.chat)?;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.config(),
        eos_token_ids: loaded.model.config.eos_token_ids.clone(),
    };
    let LoadedModel {
        model, tokenizer, ..
    } = loaded;
    let mut engine = args.model.engine(model)?;
    let tokenizer = tokenizer.as_ref().ok();
    let mut stream = tokenizer.map(|t| TextStream::new(t, &args.stop));
    let mut stdout = std::io::stdout();
    let mut stream_error = None;
    let prompts = std::slice::from_ref(&prompt_ids);
    let out = generate(&mut engine, prompts, &config, &mut |_, id| {
        let Some(stream) = stream.as_mut() else {
            return true;
        };
        match stream.push(id) {
            Ok(piece) if !args.json => {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            Ok(_) => {}
            Err(e) => stream_error = Some(e.to_string()),
        }
        !stream.stopped()
    })
    .map_err(|e| e.to_string())?;
    if let Some(e) = stream_error {
        return Err(e);
    }
    let text = match &mut stream {
        Some(s) => {
            // Text held back as a possible stop string's start.
            let tail = s.finish().map_err(|e| e.to_string())?;
            if !args.json {
                print!("{tail}");
            }
            s.text().map_err(|e| e.to_string())?
        }
        None => String::new(),
    };
    let prefill_tps = out.prefill_tokens as f64 / out.prefill_seconds.max(1e-9);
    let decode_tps = out.decode_tokens as f64 / out.decode_seconds.max(1e-9);
    if args.json {
        let object = json!({
            "prompt_ids": prompt_ids,
            "ids": out.ids[0],
            "text": text,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
        });
        println!("{object}");
    } else {
        if stream.is_none() {
            println!("{:?}", out.ids[0]);
        } else {
            println!();
        }
        eprintln!(
            "prefill: {} tokens at {prefill_tps:.1} tok/s; decode: {} tokens at {decode_tps:.1} tok/s; stopped by {:?}",
            out.prefill_tokens, out.decode_tokens, out.finish[0]
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The safetensors file to write: `ids` (i64 [T]) and `logits` (f32 [T, vocab]).
    #[arg(long)]
    out: PathBuf,
}

pub fn logits_cmd(args: &LogitsArgs) -> Result<(), String> {
    let mut loaded = args.model.load()?;
    let ids = args.prompt.ids(&loaded, false)?;
    let logits = loaded.model.forward(&ids, 1).map_err(|e| e.to_string())?;
    write_logits(&args.out, &ids, &logits, loaded.model.config.vocab_size)?;
    eprintln!(
        "wrote {} positions × {} logits to {}",
        ids.len(),
        loaded.model.config.vocab_size,
        args.out.display()
    );
    Ok(())
}

/// A safetensors file of `ids` [T] (i64) and `logits` [T, V] (f32), written atomically.
fn write_logits(path: &Path, ids: &[u32], logits: &[f32], vocab: usize) -> Result<(), String> {
    let ids_bytes = ids.len() * 8;
    let header = json!({
        "ids": {"dtype": "I64", "shape": [ids.len()], "data_offsets": [0, ids_bytes]},
        "logits": {"dtype": "F32", "shape": [ids.len(), vocab], "data_offsets": [ids_bytes, ids_bytes + logits.len() * 4]},
    })
    .to_string();
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + header.len() + ids_bytes + logits.len() * 4);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    ids.iter()
        .for_each(|&i| bytes.extend_from_slice(&i64::from(i).to_le_bytes()));
    logits
        .iter()
        .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    llama_core::write_atomic(path, &bytes).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    text: String,
    /// Render the text through the chat template as one user turn first.
    #[arg(long)]
    chat: bool,
}

pub fn tokenize_cmd(args: &TokenizeArgs) -> Result<(), String> {
    let loaded = args.model.load()?;
    println!("{}", json!(prompt_ids(&loaded, &args.text, args.chat)?));
    Ok(())
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn info_cmd(args: &InfoArgs) -> Result<(), String> {
    let mut loaded = args.model.load()?;
    let patch = patch_reports(&mut loaded.model, &args.model)?;
    let m = &loaded.model;
    let c = &m.config;
    let format = match loaded.format {
        ModelFormat::Gguf => "GGUF",
        ModelFormat::Safetensors => "safetensors",
    };
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    for layer in &m.layers {
        for w in layer.weights() {
            *dtypes.entry(w.dtype().to_string()).or_default() += 1;
        }
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{n} × {d}")).collect();
    println!("model:          {} ({format})", loaded.path.display());
    println!("architecture:   {}", c.architecture);
    println!("parameters:     {:.1} M", c.parameter_count() as f64 / 1e6);
    println!(
        "layers:         {}, hidden {}, intermediate {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size
    );
    println!(
        "heads:          {} query, {} key/value, head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocabulary:     {}", c.vocab_size);
    println!("context:        {} positions", c.max_position_embeddings);
    println!(
        "rope:           {} (theta {})",
        c.rope.scaling.rope_type(),
        c.rope.theta
    );
    println!("norm eps:       {}", c.rms_norm_eps);
    println!("tied embedding: {}", c.tie_word_embeddings);
    println!(
        "weights:        {}; embeddings {}; lm_head {}",
        dtypes.join(", "),
        m.embed_tokens.dtype(),
        m.lm_head().dtype()
    );
    println!(
        "memory:         {:.1} MiB",
        m.memory_bytes() as f64 / (1 << 20) as f64
    );
    println!("precision:      {}", loaded.model.precision());
    println!("device:         {}", m.patch_plan().device);
    for (i, line) in patch.lines().enumerate() {
        let label = if i == 0 { "patch:" } else { "" };
        println!("{label:<16}{line}");
    }
    match &loaded.tokenizer {
        Ok(t) => println!(
            "tokenizer:      {} tokens, chat template: {}",
            t.vocab_size(),
            if t.chat_template().is_some() {
                "yes"
            } else {
                "no"
            }
        ),
        Err(e) => println!("tokenizer:      none ({e})"),
    }
    println!("eos ids:        {:?}", c.eos_token_ids);
    Ok(())
}

/// llama-patch's reports for the model where --device would run it (and for its adapter).
fn patch_reports(model: &mut LlamaModel, args: &ModelArgs) -> Result<String, String> {
    let mut text = if args.unpatched {
        model.unpatch().to_string()
    } else {
        let device = args
            .cuda_device()?
            .map_or(Device::Cpu, |d| Device::Cuda(d.ordinal()));
        model.pre_patch(device).to_string()
    };
    if model.adapter().is_some() {
        text += &model
            .patch_peft_model()
            .map_err(|e| e.to_string())?
            .to_string();
    }
    Ok(text)
}

/// Model shapes for `bench --random-weights` (see [`ModelShape`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256.
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    /// hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256.
    #[value(name = "llama-3-8b")]
    Llama3_8b,
}

impl Shape {
    /// The config of the shape.
    pub(crate) fn config(self) -> llama_model::Result<LlamaConfig> {
        match self {
            Shape::Smollm2_135m => ModelShape::Smollm2_135m,
            Shape::Llama32_1b => ModelShape::Llama32_1b,
            Shape::Llama3_8b => ModelShape::Llama3_8b,
        }
        .config()
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens processed in one prefill.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one decode step at a time after the prefill.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Random weights of a known shape instead of --model (GPU only).
    #[arg(long)]
    random_weights: bool,
    #[arg(long, value_enum, default_value_t = Shape::Llama32_1b)]
    shape: Shape,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Best-of-`repeats` seconds of one prefill of `prompt` and of `gen` greedy decode steps.
fn time_generation(
    engine: &mut Engine,
    prompt: &[u32],
    gen: usize,
    repeats: usize,
) -> llama_model::Result<(f64, f64)> {
    let (mut prefill, mut decode) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeats.max(1) {
        let mut cache = engine.new_cache(1, prompt.len() + gen, None)?;
        let start = std::time::Instant::now();
        let mut logits = engine.forward_cached(prompt, 1, &mut cache)?;
        prefill = prefill.min(start.elapsed().as_secs_f64());
        let start = std::time::Instant::now();
        for _ in 0..gen {
            let next = llama_model::generate::argmax(&logits) as u32;
            logits = engine.forward_cached(&[next], 1, &mut cache)?;
        }
        decode = decode.min(start.elapsed().as_secs_f64());
    }
    Ok((prefill, decode))
}

pub fn bench_cmd(args: &BenchArgs) -> Result<(), String> {
    let (mut engine, model_name, precision) = if args.random_weights {
        let device = args
            .model
            .cuda_device()?
            .ok_or("--random-weights runs on a CUDA device (--device cuda)")?;
        let config = args.shape.config().map_err(|e| e.to_string())?;
        let model = CudaLlamaModel::random(&device, &config, 7).map_err(|e| e.to_string())?;
        (
            Engine::Cuda(Box::new(model)),
            format!("random {:?}", args.shape),
            "bf16".to_string(),
        )
    } else {
        let loaded = args.model.load()?;
        let name = loaded.path.display().to_string();
        let precision = loaded.model.precision().to_string();
        (args.model.engine(loaded.model)?, name, precision)
    };
    // Token ids drawn from the ordinary part of the vocabulary (past the first 100, which
    // hold special tokens in most vocabularies), the same every run.
    let mut rng = llama_model::generate::Rng::new(7);
    let vocab = engine.config().vocab_size as u64;
    let skip = if vocab > 200 { 100 } else { 0 };
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| (skip + rng.next_u64() % (vocab - skip)) as u32)
        .collect();
    let (prefill, decode) = time_generation(&mut engine, &prompt, args.gen_tokens, args.repeats)
        .map_err(|e| e.to_string())?;
    let prefill_tps = args.prompt_tokens as f64 / prefill;
    let decode_tps = args.gen_tokens as f64 / decode;
    let peak_mib = peak_rss().map(|b| b as f64 / (1 << 20) as f64);
    let device_mib = match &engine {
        Engine::Cuda(m) => m
            .device()
            .memory()
            .ok()
            .map(|(total, free)| (total - free) as f64 / (1 << 20) as f64),
        Engine::Cpu(_) => None,
    };
    let threads = rayon::current_num_threads();
    let device = engine.device_name();
    let object = json!({
        "engine": format!("fastllama ({precision})"),
        "model": model_name,
        "device": device,
        "precision": precision,
        "threads": threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "peak_rss_mib": peak_mib,
        "device_used_mib": device_mib,
    });
    if args.json {
        println!("{object}");
    } else {
        println!("model: {model_name}");
        println!();
        print!(
            "{}",
            crate::bench_table::table(args.prompt_tokens, args.gen_tokens, &[object], None)
        );
    }
    Ok(())
}
