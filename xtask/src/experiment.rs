//! `cargo xtask experiment <long-context|kv-cache|lora|quantization|all> [--device cpu|cuda]
//! [--quick] [--render-only]`: builds and runs `fastllama-experiments` (crates/llama-experiments)
//! — optimised (release) for the full grid, whose pages go to docs/experiments/; the test
//! build for `--quick`, whose pages go to target/experiments/quick/.

use std::process::ExitCode;

use clap::Args;

use crate::cargo;

#[derive(Args, Debug)]
pub struct ExperimentArgs {
    /// long-context, kv-cache, lora, quantization or all.
    name: String,
    /// cpu, or cuda (long-context and kv-cache, on the GPU machine through gpu-bundle).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The reduced grid (under two minutes on a 2-core machine).
    #[arg(long)]
    quick: bool,
    /// Redraw the pages from the JSON in target/experiments/ without running anything
    /// (after copying a GPU run's JSON there).
    #[arg(long)]
    render_only: bool,
}

pub fn run(args: ExperimentArgs) -> Result<ExitCode, String> {
    let mut cmd = cargo::command();
    cmd.args(["run", "-p", "llama-experiments"]);
    if !args.quick {
        cmd.arg("--release");
    }
    cmd.args(["--", &args.name, "--device", &args.device]);
    if args.quick {
        cmd.arg("--quick");
    }
    if args.render_only {
        cmd.arg("--render-only");
    }
    let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
