//! `cargo xtask gpu-bundle`: everything the GPU machine needs to run the CUDA tests and
//! benchmarks, built here (cudarc loads CUDA at run time, so no toolkit is needed to build).
//!
//! Test targets named `cuda*` (e.g. `crates/llama-core/tests/cuda.rs`) and bench targets named
//! `cuda*` are the ones with CUDA cases, and so are the integration flows of [`INTEGRATION`];
//! they go into the bundle with `fastllama`, `kernels/`, the fixtures and `run.sh`.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use clap::Args;
use serde_json::Value;

use crate::cargo;

/// The device tool carries at most 64 MiB.
const MAX_BUNDLE_BYTES: u64 = 64 << 20;
/// Cargo profile of the bundled binaries (its output goes to target/bundle/, apart from the bundle).
const PROFILE: &str = "bundle";
const RUN_SH: &str = include_str!("run.sh");
/// Workspace integration tests with a CUDA case (and no need of the default model, which the
/// GPU machine cannot fetch).
const INTEGRATION: &[&str] = &["model_patching_integration", "peft_model_integration"];

#[derive(Args)]
pub struct BundleArgs {
    /// Fixture directory to include (default: $LLAMA_FIXTURES or ../shared/fixtures).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Instead of the tests and benches: `fastllama-experiments`, whose GPU experiments
    /// (long-context, kv-cache) run.sh then runs, their JSON and pages left in $OUT/experiments.
    #[arg(long)]
    experiments: bool,
}

/// A target to build: package, target name, and whether it is a test (else a bench).
struct Target {
    package: String,
    name: String,
    is_test: bool,
}

pub fn run(args: BundleArgs) -> Result<ExitCode, String> {
    let root = cargo::root();
    let out = root.join("target/gpu-bundle");
    let fixtures = args
        .fixtures
        .or_else(|| std::env::var_os("LLAMA_FIXTURES").map(PathBuf::from))
        .unwrap_or_else(|| root.join("../shared/fixtures"));
    if !fixtures.is_dir() {
        return Err(format!(
            "fixture directory {} not found (--fixtures DIR)",
            fixtures.display()
        ));
    }

    // The bundle must stay under 64 MiB: the experiments binary goes instead of the tests.
    let targets = if args.experiments {
        Vec::new()
    } else {
        cuda_targets()?
    };
    let tests: Vec<&Target> = targets.iter().filter(|t| t.is_test).collect();
    let benches: Vec<&Target> = targets.iter().filter(|t| !t.is_test).collect();

    let test_exes = if tests.is_empty() {
        Vec::new()
    } else {
        let mut test_build = cargo::command();
        test_build.args(["test", "--no-run", "--profile", PROFILE]);
        for t in &tests {
            test_build.args(["-p", &t.package, "--test", &t.name]);
        }
        build(test_build)?
    };

    let mut bin_build = cargo::command();
    bin_build.args([
        "build",
        "--profile",
        PROFILE,
        "-p",
        "llama-cli",
        "--bin",
        "fastllama",
    ]);
    for b in &benches {
        bin_build.args(["-p", &b.package, "--bench", &b.name]);
    }
    if args.experiments {
        bin_build.args(["-p", "llama-experiments", "--bin", "fastllama-experiments"]);
    }
    let bin_exes = build(bin_build)?;

    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    for (name, kind, exe) in test_exes.iter().chain(&bin_exes) {
        let folder = match kind.as_str() {
            "bin" => "bin",
            "bench" => "benches",
            _ => "tests",
        };
        copy(exe, &out.join(folder).join(name))?;
    }
    copy_dir(&root.join("kernels"), &out.join("kernels"))?;
    copy_dir(&fixtures, &out.join("fixtures"))?;
    write_executable(&out.join("run.sh"), RUN_SH)?;

    let bytes = dir_size(&out);
    println!(
        "gpu-bundle: {} ({} test binaries, {} benches, {:.1} MiB)",
        out.display(),
        tests.len(),
        benches.len(),
        bytes as f64 / (1u64 << 20) as f64
    );
    if bytes > MAX_BUNDLE_BYTES {
        return Err(format!(
            "the bundle is {bytes} bytes, over the device tool's 64 MiB"
        ));
    }
    println!("run it on the GPU machine: carry [\"target/gpu-bundle\"], command `bash target/gpu-bundle/run.sh`");
    Ok(ExitCode::SUCCESS)
}

/// Test and bench targets named `cuda*` in the workspace, from `cargo metadata`.
fn cuda_targets() -> Result<Vec<Target>, String> {
    let output = cargo::command()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .map_err(|e| format!("running cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let meta: Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    let mut targets = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        for target in package["targets"].as_array().into_iter().flatten() {
            let name = target["name"].as_str().unwrap_or_default();
            let kinds: Vec<&str> = target["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let is_test = kinds.contains(&"test");
            let cuda = name.starts_with("cuda") || (is_test && INTEGRATION.contains(&name));
            if cuda && (is_test || kinds.contains(&"bench")) {
                targets.push(Target {
                    package: package["name"].as_str().unwrap_or_default().to_string(),
                    name: name.to_string(),
                    is_test,
                });
            }
        }
    }
    Ok(targets)
}

/// Runs a cargo build with JSON messages and returns (target name, target kind, executable).
fn build(mut cmd: std::process::Command) -> Result<Vec<(String, String, PathBuf)>, String> {
    let output = cmd
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !output.status.success() {
        return Err("the bundle build failed".into());
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let target = &msg["target"];
        let kind = target["kind"][0].as_str().unwrap_or_default();
        if let (Some(name), Some(exe)) = (target["name"].as_str(), msg["executable"].as_str()) {
            exes.push((name.to_string(), kind.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            copy(&path, &target)?;
        }
    }
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                dir_size(&path)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}
