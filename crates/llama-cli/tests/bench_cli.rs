//! `fastllama bench` on a fixture model: the table (the one `cargo xtask bench` prints, with
//! the same columns) and the JSON object it is made from.

use std::process::Command;

use llama_fixtures::{fixture_names, fixtures_dir};

fn bench(extra: &[&str]) -> String {
    let model = fixtures_dir()
        .join("models")
        .join(fixture_names("models", "config.json").remove(0));
    let out = Command::new(env!("CARGO_BIN_EXE_fastllama"))
        .args(["bench", "--device", "cpu", "--model"])
        .arg(&model)
        .args([
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeats",
            "1",
        ])
        .args(extra)
        .output()
        .expect("fastllama runs");
    assert!(
        out.status.success(),
        "fastllama bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bench_prints_the_shared_table_and_its_json() {
    let table = bench(&[]);
    let lines: Vec<&str> = table.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(
        lines[0],
        "| engine | device | threads | prefill 8 tok/s | decode 4 tok/s | peak RSS MiB | device MiB |"
    );
    let cells: Vec<&str> = lines[2].split('|').map(str::trim).collect();
    assert_eq!(cells[1], "fastllama (fast)", "{}", lines[2]);
    assert_eq!(cells[2], "cpu");
    for rate in [cells[4], cells[5]] {
        assert!(rate.parse::<f64>().is_ok_and(|r| r > 0.0), "{}", lines[2]);
    }

    let json: serde_json::Value =
        serde_json::from_str(bench(&["--json", "--precision", "exact"]).trim()).unwrap();
    assert_eq!(json["engine"], "fastllama (exact)");
    assert_eq!(json["prompt_tokens"], 8);
    assert!(json["decode_tokens_per_s"]
        .as_f64()
        .is_some_and(|r| r > 0.0));
}
