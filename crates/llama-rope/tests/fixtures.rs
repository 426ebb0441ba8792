//! Every case of `$LLAMA_FIXTURES/rope/cases.json` (suite `rope`): inverse frequencies,
//! attention scaling, cos/sin rows, and rotated q/k from HF transformers, for the fast path and
//! the reference. New cases in the file are picked up without a code change.

use llama_fixtures::{assert_close, fixtures_dir, Fixture};
use llama_rope::{apply, reference, QkShape, RopeConfig, RotaryEmbedding};
use serde_json::Value;

/// Tolerance for single ops (fixtures README).
const TOL: f64 = 1e-5;

struct Case {
    name: String,
    config: RopeConfig,
    seq_len: usize,
    attention_scaling: f64,
    fixture: Fixture,
}

fn cases() -> Vec<Case> {
    let path = fixtures_dir().join("rope/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let list: Vec<Value> = serde_json::from_str(&text).expect("cases.json is a JSON list");
    assert!(!list.is_empty(), "no RoPE cases in {}", path.display());
    list.iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_string();
            let size =
                |key: &str| c[key].as_u64().unwrap_or_else(|| panic!("{name}: {key}")) as usize;
            let config = RopeConfig::from_rope_parameters(
                &c["rope_parameters"],
                size("head_dim"),
                size("max_position_embeddings"),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            Case {
                seq_len: size("seq_len"),
                attention_scaling: c["attention_scaling"].as_f64().expect("attention_scaling"),
                fixture: Fixture::open(&format!("rope/{name}")),
                config,
                name,
            }
        })
        .collect()
}

fn positions(case: &Case) -> Vec<usize> {
    let (ids, _) = case.fixture.i64("positions");
    ids.into_iter()
        .map(|p| usize::try_from(p).expect("position ≥ 0"))
        .collect()
}

#[test]
fn inverse_frequencies_and_scaling_match_hf() {
    for case in cases() {
        let freqs = case.config.frequencies(case.seq_len);
        let (expected, shape) = case.fixture.f32("inv_freq");
        assert_close(
            &format!("{}: inv_freq", case.name),
            &freqs.inv_freq,
            &expected,
            &shape,
            TOL,
        );
        let scaling = f64::from(freqs.attention_scaling);
        assert!(
            (scaling - case.attention_scaling).abs() <= 1e-6 * case.attention_scaling,
            "{}: attention scaling {scaling}, HF {}",
            case.name,
            case.attention_scaling
        );
    }
}

/// Compares cos and sin rows with the fixture's, labelled by case and path.
fn check_cos_sin(case: &Case, path: &str, cos: Vec<f32>, sin: Vec<f32>) {
    for (name, got) in [("cos", cos), ("sin", sin)] {
        let (expected, shape) = case.fixture.f32(name);
        let label = format!("{}: {path} {name}", case.name);
        assert_close(&label, &got, &expected, &shape, TOL);
    }
}

#[test]
fn cached_cos_sin_match_hf() {
    for case in cases() {
        let mut rope = RotaryEmbedding::new(case.config.clone());
        let tables = rope.tables(case.seq_len).unwrap();
        let (cos, sin) = tables.full_rows(&positions(&case)).unwrap();
        check_cos_sin(&case, "cached", cos, sin);
    }
}

#[test]
fn reference_cos_sin_match_hf() {
    for case in cases() {
        let freqs = case.config.frequencies(case.seq_len);
        let (cos, sin) = reference::cos_sin(&freqs, &positions(&case));
        check_cos_sin(&case, "reference", cos, sin);
    }
}

#[test]
fn rotated_q_and_k_match_hf() {
    for case in cases() {
        let ids: Vec<u32> = positions(&case).iter().map(|&p| p as u32).collect();
        let mut rope = RotaryEmbedding::new(case.config.clone());
        let tables = rope.tables(case.seq_len).unwrap();
        let freqs = case.config.frequencies(case.seq_len);
        let (cos, sin) = reference::cos_sin(&freqs, &(0..case.seq_len).collect::<Vec<_>>());
        for (input, expected_name) in [("q", "q_rot"), ("k", "k_rot")] {
            let (x, dims) = case.fixture.f32(input);
            let shape = QkShape {
                batch: 1,
                heads: dims[0],
                seq: dims[1],
                head_dim: dims[2],
            };
            let (expected, _) = case.fixture.f32(expected_name);

            let mut fast = x.clone();
            apply(&mut fast, shape, &tables, &ids).unwrap();
            assert_close(
                &format!("{}: {expected_name}", case.name),
                &fast,
                &expected,
                &dims,
                TOL,
            );

            let slow =
                reference::apply(&x, shape, &cos, &sin, case.config.rotary_dim, &ids).unwrap();
            assert_close(
                &format!("{}: reference {expected_name}", case.name),
                &slow,
                &expected,
                &dims,
                TOL,
            );
        }
    }
}
