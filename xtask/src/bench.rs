//! `cargo xtask bench`: SmolLM2-135M-Instruct Q4_1 on the CPU — prefill and decode tokens/s and
//! peak memory of `fastllama bench`, side by side with llama.cpp (llama-cpp-python, built for
//! this CPU in a venv under target/) on the same file, in the same run, as a Markdown table.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;
use serde_json::Value;

use crate::cargo;

// The table `fastllama bench` prints, shared so that both print the same one.
#[path = "../../crates/llama-cli/src/bench_table.rs"]
mod bench_table;

const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";

/// CMake flags for llama.cpp on this CPU: its default native build segfaults on the AMX units
/// of some of these machines, so the ISA is named explicitly — AVX-512 (VNNI, BF16) where the
/// CPU has it, else AVX2 — and AMX is off.
fn cmake_args() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |flag: &str| cpuinfo.split_whitespace().any(|f| f == flag);
    let mut args = vec![
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
    ];
    if has("avx512f") {
        args.push("-DGGML_AVX512=ON");
        if has("avx512_vnni") {
            args.push("-DGGML_AVX512_VNNI=ON");
        }
        if has("avx512_bf16") {
            args.push("-DGGML_AVX512_BF16=ON");
        }
    }
    args.extend([
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ]);
    args.join(" ")
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Leave out the llama.cpp peer.
    #[arg(long)]
    no_peer: bool,
}

pub(crate) fn run_json(cmd: &mut Command, what: &str) -> Result<Value, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| format!("{what}: no JSON result ({e}): {stdout}"))
}

/// A venv under target/ in which `import` succeeds, created with `packages` on first use.
pub(crate) fn venv_python(
    root: &Path,
    name: &str,
    import: &str,
    packages: &[&str],
    envs: &[(&str, String)],
) -> Result<PathBuf, String> {
    let venv = root.join("target").join(name);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", &format!("import {import}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(python);
    }
    eprintln!(
        "installing {} into {} (once; several minutes)",
        packages.join(" "),
        venv.display()
    );
    let ok = |status: std::io::Result<std::process::ExitStatus>| status.is_ok_and(|s| s.success());
    if !ok(Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status())
    {
        return Err("python3 -m venv failed".into());
    }
    let installed = Command::new(&python)
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(packages)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .status();
    if !ok(installed) {
        return Err(format!("pip install {} failed", packages.join(" ")));
    }
    Ok(python)
}

/// target/bench-venv with llama-cpp-python built for this CPU (a few minutes of C++).
fn peer_python(root: &Path) -> Result<PathBuf, String> {
    venv_python(
        root,
        "bench-venv",
        "llama_cpp, numpy",
        &["numpy", LLAMA_CPP_PYTHON],
        &[
            ("CMAKE_ARGS", cmake_args()),
            ("CMAKE_BUILD_PARALLEL_LEVEL", "2".into()),
        ],
    )
}

/// Builds fastllama (release) and fetches the default model: (the binary, the model's path).
pub(crate) fn fastllama_and_model(root: &Path) -> Result<(PathBuf, String), String> {
    let built = cargo::command()
        .args(["build", "--release", "-p", "llama-cli"])
        .status();
    if !built.is_ok_and(|s| s.success()) {
        return Err("building fastllama failed".into());
    }
    let fastllama = root.join("target/release/fastllama");
    let fetched = Command::new(&fastllama)
        .arg("fetch")
        .output()
        .map_err(|e| e.to_string())?;
    if !fetched.status.success() {
        return Err(format!(
            "fetching the model: {}",
            String::from_utf8_lossy(&fetched.stderr)
        ));
    }
    let model = String::from_utf8_lossy(&fetched.stdout).trim().to_string();
    Ok((fastllama, model))
}

pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let root = cargo::root();
    let (fastllama, model) = fastllama_and_model(&root)?;
    let numbers = |n: usize| n.to_string();
    let mut ours = Vec::new();
    for precision in ["fast", "exact"] {
        let mut cmd = Command::new(&fastllama);
        cmd.args([
            "bench",
            "--json",
            "--device",
            "cpu",
            "--model",
            &model,
            "--precision",
            precision,
        ])
        .args([
            "--prompt-tokens",
            &numbers(args.prompt_tokens),
            "--gen-tokens",
            &numbers(args.gen_tokens),
        ])
        .args([
            "--threads",
            &numbers(args.threads),
            "--repeats",
            &numbers(args.repeats),
        ]);
        ours.push(run_json(&mut cmd, "fastllama bench")?);
    }
    let peer = if args.no_peer {
        None
    } else {
        let script = root.join("xtask/peers/llama_cpp_peer.py");
        match peer_python(&root).and_then(|python| {
            let mut cmd = Command::new(python);
            cmd.arg(&script).arg(&model);
            for n in [
                args.prompt_tokens,
                args.gen_tokens,
                args.threads,
                args.repeats,
            ] {
                cmd.arg(n.to_string());
            }
            run_json(&mut cmd, "the llama.cpp peer")
        }) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("llama.cpp peer unavailable: {e}");
                None
            }
        }
    };
    println!(
        "SmolLM2-135M-Instruct Q4_1 ({model}), {} threads, best of {}",
        args.threads, args.repeats
    );
    println!();
    print!(
        "{}",
        bench_table::table(args.prompt_tokens, args.gen_tokens, &ours, peer.as_ref())
    );
    Ok(ExitCode::SUCCESS)
}
