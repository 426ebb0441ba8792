//! `fastllama-experiments all --quick` (what `cargo xtask experiment all --quick` runs) into a
//! temporary directory: every experiment writes a well-formed page, figure and JSON section.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const EXPERIMENTS: [&str; 4] = ["long-context", "kv-cache", "lora", "quantization"];

fn pip_available() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_experiment_writes_its_page_figure_and_numbers() {
    if !pip_available() {
        eprintln!("skipped: pip is unavailable, so the default model cannot be fetched");
        return;
    }
    let dir = std::env::temp_dir().join(format!("fastllama-experiments-{}", std::process::id()));
    let (data, docs) = (dir.join("data"), dir.join("docs"));
    let out = Command::new(env!("CARGO_BIN_EXE_fastllama-experiments"))
        .args(["all", "--quick", "--data"])
        .arg(&data)
        .arg("--docs")
        .arg(&docs)
        .output()
        .expect("running fastllama-experiments");
    assert!(
        out.status.success(),
        "fastllama-experiments failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in EXPERIMENTS {
        check_page(&docs, name);
        check_figure(&docs, name);
        check_section(&data, name);
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A title, the command, at least one table whose rows have as many cells as its header,
/// findings and the figure's link.
fn check_page(docs: &Path, name: &str) {
    let page = read(&docs.join(format!("{name}.md")));
    assert!(page.starts_with("# Experiment: "), "{name}: {page}");
    assert!(
        page.contains(&format!("`cargo xtask experiment {name} --quick`")),
        "{name}"
    );
    assert!(
        page.contains(&format!("({name}.svg)")),
        "{name}: no figure link"
    );
    assert!(page.contains("Reading:\n\n- "), "{name}: no findings");
    let tables: Vec<Vec<&str>> = page
        .split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| l.starts_with('|'))
                .collect::<Vec<_>>()
        })
        .filter(|rows| !rows.is_empty())
        .collect();
    assert!(!tables.is_empty(), "{name}: no table");
    for rows in tables {
        assert!(rows.len() >= 3, "{name}: a table without rows: {rows:?}");
        let cells = |l: &str| l.matches('|').count();
        assert!(
            rows.iter().all(|r| cells(r) == cells(rows[0])),
            "{name}: ragged table {rows:?}"
        );
        assert!(
            !rows.iter().any(|r| r.contains("NaN") || r.contains("inf")),
            "{name}: {rows:?}"
        );
    }
}

/// An SVG document with labelled axes and at least one drawn line.
fn check_figure(docs: &Path, name: &str) {
    let svg = read(&docs.join(format!("{name}.svg")));
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{name}"
    );
    assert!(svg.contains("<polyline"), "{name}: no line drawn");
    assert!(svg.matches("<text").count() > 10, "{name}: no axis labels");
}

/// The JSON section: this experiment, the CPU, the quick grid, tables and raw numbers.
fn check_section(data: &Path, name: &str) {
    let path = data.join(format!("{name}.cpu.quick.json"));
    let section: Value = serde_json::from_str(&read(&path)).expect("JSON");
    assert_eq!(section["experiment"], name);
    assert_eq!(section["device"], "cpu");
    assert_eq!(section["quick"], true);
    assert!(
        section["tables"].as_array().is_some_and(|t| !t.is_empty()),
        "{name}"
    );
    assert!(section["raw"].is_object(), "{name}");
}
