//! The guide's tunable RoPE test (suite `rope`): `dim`, `max_position_embeddings` and `seq_len`
//! from `cargo xtask test --set …` (defaults 32, 2048, 128). `--set seq_len=100000` runs
//! LongRoPE past its original context with tables linear in the length.

use llama_fixtures::{param, Suite, TestRng};
use llama_rope::{apply, reference, QkShape, RopeConfig, RotaryEmbedding, CACHE_BLOCK};
use serde_json::json;

fn configs(dim: usize, max_pos: usize) -> Vec<RopeConfig> {
    let half = dim / 2;
    let short: Vec<f64> = (0..half).map(|i| 1.0 + i as f64 / half as f64).collect();
    let long: Vec<f64> = short.iter().map(|f| f * 4.0).collect();
    let params = [
        json!({"rope_type": "default", "rope_theta": 10000.0}),
        json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": max_pos}),
        json!({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": max_pos}),
    ];
    // The model's context is 32× the original, as in Phi-3's 4K → 128K.
    params
        .iter()
        .map(|p| RopeConfig::from_rope_parameters(p, dim, 32 * max_pos).unwrap())
        .collect()
}

#[test]
fn rotation_at_the_tuned_sizes_matches_the_reference() {
    let dim = param("dim", Suite::Rope);
    let max_pos = param("max_position_embeddings", Suite::Rope);
    let seq_len = param("seq_len", Suite::Rope);
    assert!(
        dim >= 2 && dim.is_multiple_of(2),
        "dim must be even, got {dim}"
    );
    let shape = QkShape {
        batch: 1,
        heads: 2,
        seq: seq_len,
        head_dim: dim,
    };
    let x = TestRng::new(seq_len as u64).vec(shape.len(), 1.0);
    let ids: Vec<u32> = (0..seq_len as u32).collect();
    // The reference builds full-width tables for a sample of rows only, to keep memory small.
    let sample: Vec<usize> = (0..seq_len)
        .step_by((seq_len / 64).max(1))
        .chain([seq_len - 1])
        .collect();

    for config in configs(dim, max_pos) {
        let kind = config.scaling.rope_type();
        let mut rope = RotaryEmbedding::new(config.clone());
        let tables = rope.tables(seq_len).unwrap();
        let mut y = x.clone();
        apply(&mut y, shape, &tables, &ids).unwrap();

        let freqs = config.frequencies(seq_len);
        let (cos, sin) = reference::cos_sin(&freqs, &sample);
        for (row, &t) in sample.iter().enumerate() {
            for h in 0..shape.heads {
                let at = (h * seq_len + t) * dim..(h * seq_len + t + 1) * dim;
                let one = QkShape {
                    batch: 1,
                    heads: 1,
                    seq: 1,
                    head_dim: dim,
                };
                let cos_row = &cos[row * dim..(row + 1) * dim];
                let sin_row = &sin[row * dim..(row + 1) * dim];
                let expected =
                    reference::apply(&x[at.clone()], one, cos_row, sin_row, dim, &[0]).unwrap();
                assert_eq!(&y[at], &expected[..], "{kind}: head {h}, position {t}");
            }
        }

        let rows = seq_len.div_ceil(CACHE_BLOCK) * CACHE_BLOCK;
        assert_eq!(
            rope.memory_bytes(),
            2 * 4 * (dim / 2) * rows,
            "{kind}: tables not linear in the length"
        );
    }
}
