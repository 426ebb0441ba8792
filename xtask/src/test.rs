//! `cargo xtask test`: the suites of the guide, in CPU mode or not, with tunable parameters.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use clap::Args;

use crate::cargo::{self, Counts};
use crate::params::{self, Suite, PARAMS};
use crate::suites;

/// Environment variables the tests read (kept equal to llama-core's and llama-fixtures').
const DEVICE_ENV: &str = "FASTLLAMA_DEVICE";
const SKIP_LOG_ENV: &str = "FASTLLAMA_SKIP_LOG";

#[derive(Args)]
pub struct TestArgs {
    /// Suites to run (default: all): core, rope, attention, optimization, fast-model, integration.
    #[arg(long, num_args = 1.., value_name = "SUITE")]
    suite: Vec<String>,
    /// CPU mode: sets FASTLLAMA_DEVICE=cpu, so CUDA tests are skipped and counted as skipped.
    #[arg(long)]
    cpu: bool,
    /// A tunable test parameter, e.g. --set seq_len=1024 (see --list).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// List the suites, their packages and the tunable parameters with their defaults.
    #[arg(long)]
    list: bool,
    /// Arguments for the test binaries after `--`, e.g. a test-name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

pub fn run(args: TestArgs) -> Result<ExitCode, String> {
    if args.list {
        print_list();
        return Ok(ExitCode::SUCCESS);
    }
    let suites = suites::parse(&args.suite)?;
    let settings = parse_settings(&args.set)?;

    let skip_log = cargo::root().join("target/xtask/skipped.log");
    if let Some(dir) = skip_log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&skip_log, "").map_err(|e| format!("{}: {e}", skip_log.display()))?;

    let env = |cmd: &mut std::process::Command| {
        cmd.env(SKIP_LOG_ENV, &skip_log);
        if args.cpu {
            cmd.env(DEVICE_ENV, "cpu");
        }
        for (key, value) in &settings {
            cmd.env(params::env_name(key), value.to_string());
        }
    };

    let started = Instant::now();
    let mut total = Counts::default();
    let mut rows = Vec::new();
    let mut all_ok = true;
    for &suite in &suites {
        let skipped_before = count_lines(&skip_log);
        let mut cmd = cargo::command();
        cmd.args(["test", "--no-fail-fast"])
            .args(target_args(suites::packages(suite)));
        cmd.arg("--").args(&args.test_args);
        env(&mut cmd);
        let (counts, ok) = run_streaming(cmd)?;
        all_ok &= ok;
        let skipped = count_lines(&skip_log).saturating_sub(skipped_before);
        rows.push((suite, counts, skipped));
        total.add(counts);
    }

    let skipped = count_lines(&skip_log);
    print_table(&rows);
    println!("skipped: no CUDA device: {skipped} (returned early; counted as ignored below)");
    let failed = total.failed > 0 || !all_ok;
    println!(
        "test result: {}. {} passed; {} failed; {} ignored; {} measured; {} filtered out; finished in {:.2}s",
        if failed { "FAILED" } else { "ok" },
        total.passed.saturating_sub(skipped),
        total.failed,
        total.ignored + skipped,
        total.measured,
        total.filtered,
        started.elapsed().as_secs_f64()
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `-p A -p B --lib --bins --tests`: unit tests, binaries' tests and integration tests, but not
/// doc tests or benches (criterion benches are run by `cargo bench`).
fn target_args(packages: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for p in packages {
        out.push("-p".to_string());
        out.push(p.to_string());
    }
    out.extend(["--lib", "--bins", "--tests"].map(String::from));
    out
}

/// Runs cargo test, echoing its output, and sums its summary lines; `ok` is cargo's exit status.
fn run_streaming(mut cmd: std::process::Command) -> Result<(Counts, bool), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running cargo: {e}"))?;
    let mut counts = Counts::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
            println!("{line}");
            if let Some(c) = Counts::parse(&line) {
                counts.add(c);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo: {e}"))?;
    Ok((counts, status.success()))
}

fn count_lines(path: &Path) -> u64 {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count() as u64)
}

/// Parses `key=value` settings; unknown keys and non-integer values are errors.
fn parse_settings(settings: &[String]) -> Result<Vec<(String, usize)>, String> {
    let valid = || PARAMS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
    settings
        .iter()
        .map(|s| {
            let (key, value) = s
                .split_once('=')
                .ok_or_else(|| format!("--set {s:?}: expected KEY=VALUE"))?;
            let key = key.trim();
            if params::lookup(key).is_none() {
                return Err(format!(
                    "unknown parameter {key:?}; valid parameters: {}",
                    valid()
                ));
            }
            let value = value.trim().parse().map_err(|_| {
                format!("--set {key}={value}: the value must be a non-negative integer")
            })?;
            Ok((key.to_string(), value))
        })
        .collect()
}

fn print_table(rows: &[(Suite, Counts, u64)]) {
    println!();
    println!(
        "{:<14} {:>7} {:>7} {:>8} {:>8}",
        "suite", "passed", "failed", "ignored", "skipped"
    );
    for (suite, c, skipped) in rows {
        println!(
            "{:<14} {:>7} {:>7} {:>8} {:>8}",
            suite.name(),
            c.passed.saturating_sub(*skipped),
            c.failed,
            c.ignored,
            skipped
        );
    }
}

fn print_list() {
    println!("suites (cargo xtask test --suite NAME …):");
    for suite in Suite::ALL {
        println!(
            "  {:<14} packages: {}",
            suite.name(),
            suites::packages(suite).join(", ")
        );
    }
    println!();
    println!("tunable parameters (--set KEY=VALUE, read by the tests as FASTLLAMA_TEST_<KEY>):");
    for p in PARAMS {
        let defaults: Vec<String> = p
            .defaults
            .iter()
            .map(|(s, v)| format!("{v} ({})", s.name()))
            .collect();
        println!(
            "  {:<24} default {:<32} {}",
            p.name,
            defaults.join(", "),
            p.help
        );
    }
    println!();
    println!("--cpu sets {DEVICE_ENV}=cpu: CUDA tests skip and are counted as skipped.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_reject_unknown_keys_and_bad_values() {
        let got = parse_settings(&["seq_len=1024".into(), "dim = 64".into()]).unwrap();
        assert_eq!(got, vec![("seq_len".into(), 1024), ("dim".into(), 64)]);
        let err = parse_settings(&["seqlen=4".into()]).unwrap_err();
        assert!(
            err.contains("\"seqlen\"") && err.contains("seq_len"),
            "{err}"
        );
        assert!(parse_settings(&["dim=-1".into()]).is_err());
        assert!(parse_settings(&["dim".into()]).is_err());
    }
}
