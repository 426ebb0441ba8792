//! `cargo xtask`: fastllama's runner, the Rust counterpart of the guide's `run_tests.py`.
//!
//! - `cargo xtask test [--suite …] [--cpu] [--set key=value …] [--list]` runs the test suites
//!   and ends with cargo's summary line;
//! - `cargo xtask bench` times SmolLM2 prefill and decode beside llama.cpp;
//! - `cargo xtask bench-train` times SmolLM2 LoRA training beside HF transformers + peft;
//! - `cargo xtask experiment <name|all> [--device cuda] [--quick]` runs the four experiments
//!   (crates/llama-experiments) and writes their pages to docs/experiments/;
//! - `cargo xtask fetch-model` fetches the default model into the cache ahead of time;
//! - `cargo xtask kernels` compiles the CUDA kernels without a GPU (NVRTC from PyPI) and
//!   prints their registers and spills;
//! - `cargo xtask gpu-bundle` builds every CUDA test and bench binary plus `fastllama` into
//!   `target/gpu-bundle/` with the kernels, the fixtures and a `run.sh` for the GPU machine.

mod bench;
mod bench_train;
mod bundle;
mod cargo;
mod experiment;
mod kernels;
// The parameter table shared with the tests; `param` itself is only for the tests.
#[allow(dead_code)]
#[path = "../../crates/llama-fixtures/src/params.rs"]
mod params;
mod suites;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "fastllama's test, bench and bundle runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run test suites (all by default) and print cargo's test summary.
    Test(test::TestArgs),
    /// Build the CUDA tests, benches and `fastllama` into target/gpu-bundle/ with a run.sh.
    GpuBundle(bundle::BundleArgs),
    /// Benchmark SmolLM2 on the CPU beside llama.cpp (prefill, decode, peak memory).
    Bench(bench::BenchArgs),
    /// Benchmark LoRA training of SmolLM2 on the CPU beside HF transformers + peft.
    BenchTrain(bench_train::BenchTrainArgs),
    /// Run an experiment (long-context, kv-cache, lora, quantization, all): tables and plots.
    Experiment(experiment::ExperimentArgs),
    /// Fetch the default model (SmolLM2-135M-Instruct) into the cache ahead of first use.
    FetchModel,
    /// Compile the CUDA kernels without a GPU (NVRTC from PyPI): registers, spills, errors.
    Kernels(kernels::KernelsArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Test(args) => test::run(args),
        Command::GpuBundle(args) => bundle::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::Experiment(args) => experiment::run(args),
        Command::FetchModel => fetch_model(),
        Command::Kernels(args) => kernels::run(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// `fastllama fetch`, built and run by cargo (the xtask itself stays free of model code).
fn fetch_model() -> Result<ExitCode, String> {
    let status = cargo::command()
        .args(["run", "--release", "-p", "llama-cli", "--", "fetch"])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
