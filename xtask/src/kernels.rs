//! `cargo xtask kernels [--arch sm_90] [FILE.cu …]`: compiles the CUDA kernels without a GPU
//! (NVRTC from PyPI's `nvidia-cuda-nvrtc` wheel, in target/nvrtc-venv) and prints each
//! kernel's registers, spills and shared memory; fails on a compile error, a warning or a
//! spill. What a kernel change should pass before it spends device time.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::Args;

use crate::bench::venv_python;

#[derive(Args)]
pub struct KernelsArgs {
    /// GPU architecture to compile for.
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// Kernel sources to check (default: every kernels/*.cu).
    files: Vec<PathBuf>,
}

pub fn run(args: KernelsArgs) -> Result<ExitCode, String> {
    let root = crate::cargo::root();
    let python = venv_python(
        &root,
        "nvrtc-venv",
        "nvidia.cu13",
        &["nvidia-cuda-nvrtc>=13,<14"],
        &[],
    )?;
    let status = Command::new(python)
        .arg(root.join("xtask/tools/kernel_check.py"))
        .arg(&root)
        .args(["--arch", &args.arch])
        .args(&args.files)
        .status()
        .map_err(|e| format!("running kernel_check.py: {e}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
