//! The crate graph of DESIGN.md holds: core ← rope, ops ← attn ← peft ← patch ← model ← cli.
//! A library crate may depend only on crates of a lower layer (read from `cargo metadata`).

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;

/// The layer of each workspace crate; a normal dependency must point to a lower layer.
const LAYERS: &[(&str, u32)] = &[
    ("llama-core", 0),
    ("llama-rope", 1),
    ("llama-ops", 1),
    ("llama-attn", 2),
    ("llama-peft", 3),
    ("llama-patch", 4),
    ("llama-model", 5),
    ("llama-cli", 6),
    ("llama-experiments", 6),
];

fn metadata() -> Value {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// (crate, dependency) pairs among workspace crates, normal dependencies only.
fn workspace_edges(meta: &Value) -> Vec<(String, String)> {
    let packages = meta["packages"].as_array().expect("packages");
    let names: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut edges = Vec::new();
    for p in packages {
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or_default();
            if d["kind"].is_null() && names.contains(&dep) {
                edges.push((
                    p["name"].as_str().unwrap_or_default().to_string(),
                    dep.to_string(),
                ));
            }
        }
    }
    edges
}

#[test]
fn every_library_crate_has_a_layer() {
    let meta = metadata();
    let layers: HashMap<_, _> = LAYERS.iter().copied().collect();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().unwrap_or_default();
        if name.starts_with("llama-") && name != "llama-fixtures" {
            assert!(
                layers.contains_key(name),
                "{name} is not in LAYERS: place it in the graph"
            );
        }
    }
}

#[test]
fn dependencies_point_down_the_layers() {
    let meta = metadata();
    let layers: HashMap<_, _> = LAYERS.iter().copied().collect();
    let edges = workspace_edges(&meta);
    assert!(
        !edges.is_empty(),
        "no workspace dependencies found: is cargo metadata right?"
    );
    for (krate, dep) in edges {
        let (Some(&from), Some(&to)) = (layers.get(krate.as_str()), layers.get(dep.as_str()))
        else {
            continue;
        };
        assert!(
            to < from,
            "{krate} (layer {from}) must not depend on {dep} (layer {to})"
        );
    }
}

#[test]
fn test_support_is_a_dev_dependency_only() {
    let meta = metadata();
    for (krate, dep) in workspace_edges(&meta) {
        assert_ne!(
            dep, "llama-fixtures",
            "{krate} depends on llama-fixtures outside [dev-dependencies]"
        );
    }
}
