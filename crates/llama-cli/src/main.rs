//! `fastllama`: the command-line front end. Library crates return values and errors; this
//! binary is the only place that prints.

mod bench_table;
mod chat;
mod commands;
mod finetune;
mod model_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llama_core::cuda::{self, CudaDevice};
use llama_core::{cache_dir, CpuFeatures};

#[derive(Parser)]
#[command(
    name = "fastllama",
    version,
    about = "Run and fine-tune Llama-family models, fast"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt, streaming it as it comes.
    Generate(commands::GenerateArgs),
    /// Chat with the model on its chat template, turn after turn (stdin: a terminal or a pipe).
    Chat(chat::ChatArgs),
    /// Write the logits of every position of a prompt to a safetensors file.
    Logits(commands::LogitsArgs),
    /// Print the token ids of a text as a JSON list.
    Tokenize(commands::TokenizeArgs),
    /// Fine-tune a LoRA (or QLoRA) adapter on a JSONL file.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Time LoRA training steps (tokens/s) and report the peak memory.
    BenchTrain(finetune::BenchTrainArgs),
    /// Merge an adapter into the base weights and write the model (HF directory or GGUF).
    Merge(finetune::MergeArgs),
    /// Describe a model: architecture, sizes, dtypes, quantisation, context, RoPE.
    Info(commands::InfoArgs),
    /// Time prefill and decode (tokens/s) and report the peak memory.
    Bench(commands::BenchArgs),
    /// Fetch a model by name into the cache (the default model unless --model names another)
    /// and print its path.
    Fetch {
        #[arg(long, default_value = llama_model::DEFAULT_MODEL)]
        model: String,
    },
    /// Show the compute devices fastllama can use: CPU SIMD features and threads, CUDA devices
    /// (or why there are none), and the cache directory.
    Devices,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Everything runs on a worker of the pool, so that each parallel section of a decode step
    // is shared with the other workers instead of handed off by a thread that then sleeps
    // (two context switches per section otherwise, a third of a CPU decode step).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .build();
    let result = match pool {
        Ok(pool) => pool.install(|| run(&cli)),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    match &cli.command {
        Command::Generate(args) => commands::generate_cmd(args),
        Command::Chat(args) => chat::chat_cmd(args),
        Command::Logits(args) => commands::logits_cmd(args),
        Command::Tokenize(args) => commands::tokenize_cmd(args),
        Command::Info(args) => commands::info_cmd(args),
        Command::Finetune(args) => finetune::finetune_cmd(args),
        Command::Merge(args) => finetune::merge_cmd(args),
        Command::BenchTrain(args) => finetune::bench_train_cmd(args),
        Command::Bench(args) => commands::bench_cmd(args),
        Command::Fetch { model } => {
            model_args::fetch(model).map(|path| println!("{}", path.display()))
        }
        Command::Devices => {
            devices();
            Ok(())
        }
    }
}

fn devices() {
    println!(
        "cpu: {} threads; {}",
        rayon::current_num_threads(),
        CpuFeatures::get()
    );
    match cuda::device_count() {
        Ok(count) => {
            for ordinal in 0..count {
                match CudaDevice::get(ordinal).and_then(|d| Ok((d.memory()?, d))) {
                    Ok(((total, free), d)) => println!(
                        "cuda:{ordinal}: {} ({}), {:.1} GiB, {:.1} GiB free",
                        d.name(),
                        d.arch(),
                        gib(total),
                        gib(free)
                    ),
                    Err(e) => println!("cuda:{ordinal}: {e}"),
                }
            }
        }
        Err(e) => println!("cuda: {e}"),
    }
    println!("cache: {}", cache_dir().display());
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
