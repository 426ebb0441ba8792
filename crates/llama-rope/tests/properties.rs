//! Invariants of the rotation on random inputs of awkward sizes (suite `rope`): the fast path
//! equals the reference bit for bit, rotations preserve norms, attention scores depend only on
//! relative positions, backward ∘ forward is the identity, position 0 is the identity.

use llama_core::bf16;
use llama_fixtures::TestRng;
use llama_rope::{apply, apply_backward, reference, QkShape, RopeConfig, RotaryEmbedding};
use proptest::prelude::*;
use serde_json::json;

/// A config of each kind for heads of `head_dim` (with `rotary_dim` ≤ head_dim rotating).
fn config(kind: usize, head_dim: usize, rotary_dim: usize) -> RopeConfig {
    let half = rotary_dim / 2;
    let partial = rotary_dim as f64 / head_dim as f64;
    let factors: Vec<f64> = (0..half).map(|i| 1.0 + i as f64 * 0.37).collect();
    let params = match kind % 6 {
        0 => json!({"rope_type": "default", "rope_theta": 10000.0}),
        1 => json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}),
        2 => json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        3 => json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}),
        4 => {
            json!({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors.clone(),
                    "long_factor": factors.iter().map(|f| f * 2.0).collect::<Vec<_>>(),
                    "original_max_position_embeddings": 32})
        }
        _ => json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": 32}),
    };
    let mut params = params;
    params["partial_rotary_factor"] = json!(partial);
    RopeConfig::from_rope_parameters(&params, head_dim, 128).unwrap()
}

/// A random shape, rotary width, position ids (shared or per sequence) and seed.
fn case() -> impl Strategy<Value = (usize, QkShape, usize, bool, u64)> {
    (
        0usize..6,
        1usize..3,
        1usize..4,
        1usize..37,
        1usize..36,
        0usize..3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(kind, batch, heads, seq, half, cut, per_sequence, seed)| {
            let head_dim = 2 * half + cut;
            let shape = QkShape {
                batch,
                heads,
                seq,
                head_dim,
            };
            (kind, shape, 2 * half, per_sequence, seed)
        })
}

fn positions(shape: QkShape, per_sequence: bool, max: u32, rng: &mut TestRng) -> Vec<u32> {
    let n = if per_sequence {
        shape.batch * shape.seq
    } else {
        shape.seq
    };
    (0..n)
        .map(|_| (rng.next_u64() % u64::from(max)) as u32)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fast_equals_reference_bit_for_bit((kind, shape, rotary, per_sequence, seed) in case()) {
        let config = config(kind, shape.head_dim, rotary);
        let mut rng = TestRng::new(seed);
        let x = rng.vec(shape.len(), 3.0);
        let ids = positions(shape, per_sequence, 200, &mut rng);
        let mut rope = RotaryEmbedding::new(config.clone());
        let tables = rope.tables(200).unwrap();
        let (cos, sin) = reference::cos_sin(&config.frequencies(200), &(0..200).collect::<Vec<_>>());

        let mut fast = x.clone();
        apply(&mut fast, shape, &tables, &ids).unwrap();
        let slow = reference::apply(&x, shape, &cos, &sin, rotary, &ids).unwrap();
        prop_assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()));

        let mut fast_back = x.clone();
        apply_backward(&mut fast_back, shape, &tables, &ids).unwrap();
        let slow_back = reference::apply_backward(&x, shape, &cos, &sin, rotary, &ids).unwrap();
        prop_assert!(fast_back.iter().zip(&slow_back).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn rotation_preserves_norms_and_backward_undoes_it((kind, shape, rotary, per_sequence, seed) in case()) {
        let config = config(kind, shape.head_dim, rotary);
        let mut rng = TestRng::new(seed);
        let x = rng.vec(shape.len(), 1.0);
        let ids = positions(shape, per_sequence, 5000, &mut rng);
        let s = f64::from(config.frequencies(5000).attention_scaling);
        let mut rope = RotaryEmbedding::new(config);
        let tables = rope.tables(5000).unwrap();

        let mut y = x.clone();
        apply(&mut y, shape, &tables, &ids).unwrap();
        for (row_x, row_y) in x.chunks(shape.head_dim).zip(y.chunks(shape.head_dim)) {
            let (nx, ny) = (dot(row_x, row_x).sqrt(), dot(row_y, row_y).sqrt());
            let rotated = dot(&row_x[..rotary], &row_x[..rotary]).sqrt();
            let expected = (nx * nx + (s * s - 1.0) * rotated * rotated).sqrt();
            prop_assert!((ny - expected).abs() <= 1e-5 * expected.max(1e-3), "{ny} vs {expected}");
        }
        apply_backward(&mut y, shape, &tables, &ids).unwrap();
        // Rᵀ(s·R) = s² on the rotated dimensions.
        let mut expected = x.clone();
        for row in expected.chunks_mut(shape.head_dim) {
            row[..rotary].iter_mut().for_each(|v| *v = (f64::from(*v) * s * s) as f32);
        }
        let err = llama_fixtures::rel_error(&y, &expected);
        prop_assert!(err < 1e-5, "backward ∘ forward off by {err}");
    }

    #[test]
    fn scores_depend_only_on_relative_position(
        kind in prop::sample::select(vec![0usize, 1, 3, 5]), half in 1usize..40,
        m in 0u32..1500, n in 0u32..1500, shift in 0u32..1500, seed in any::<u64>(),
    ) {
        let head_dim = 2 * half;
        let config = config(kind, head_dim, head_dim);
        let mut rng = TestRng::new(seed);
        let (q, k) = (rng.vec(head_dim, 1.0), rng.vec(head_dim, 1.0));
        let mut rope = RotaryEmbedding::new(config);
        let tables = rope.tables(3000).unwrap();
        let one = QkShape { batch: 1, heads: 1, seq: 1, head_dim };
        let rotated = |x: &[f32], p: u32| {
            let mut y = x.to_vec();
            apply(&mut y, one, &tables, &[p]).unwrap();
            y
        };
        let before = dot(&rotated(&q, m), &rotated(&k, n));
        let after = dot(&rotated(&q, m + shift), &rotated(&k, n + shift));
        let scale = dot(&q, &q).sqrt() * dot(&k, &k).sqrt();
        // f32 angles at positions up to 3000 carry ~3000 · 2⁻²⁴ rad of rounding.
        prop_assert!((before - after).abs() <= 2e-3 * scale, "{before} vs {after}");
    }
}

#[test]
fn position_zero_is_the_identity_times_the_scaling() {
    for kind in 0..6 {
        let config = config(kind, 10, 8);
        let s = config.frequencies(1).attention_scaling;
        let mut rope = RotaryEmbedding::new(config);
        let tables = rope.tables(1).unwrap();
        let x: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
        let mut y = x.clone();
        let shape = QkShape {
            batch: 1,
            heads: 1,
            seq: 1,
            head_dim: 10,
        };
        apply(&mut y, shape, &tables, &[0]).unwrap();
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let expected = if i < 8 { a * s } else { *a };
            assert_eq!(*b, expected, "kind {kind}, dim {i}");
        }
    }
}

#[test]
fn bf16_rotation_rounds_the_f32_rotation_once() {
    let shape = QkShape {
        batch: 2,
        heads: 3,
        seq: 17,
        head_dim: 12,
    };
    let mut rng = TestRng::new(5);
    let x16: Vec<bf16> = rng
        .vec(shape.len(), 2.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let mut rope = RotaryEmbedding::new(config(3, 12, 12));
    let tables = rope.tables(300).unwrap();
    let ids: Vec<u32> = (0..17).map(|t| t * 13).collect();
    let mut wide: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    apply(&mut wide, shape, &tables, &ids).unwrap();
    let mut narrow = x16.clone();
    apply(&mut narrow, shape, &tables, &ids).unwrap();
    for (a, b) in narrow.iter().zip(&wide) {
        assert_eq!(a.to_bits(), bf16::from_f32(*b).to_bits());
    }
}

#[test]
fn the_cache_grows_in_blocks_and_keeps_its_rows() {
    let config = config(3, 64, 64);
    let mut grown = RotaryEmbedding::new(config.clone());
    grown.tables(100).unwrap();
    assert_eq!(grown.cached_positions(), llama_rope::CACHE_BLOCK);
    let generation = grown.generation();
    grown.tables(llama_rope::CACHE_BLOCK).unwrap();
    assert_eq!(
        grown.generation(),
        generation,
        "a call within the cache must not rebuild it"
    );
    let long = grown.tables(llama_rope::CACHE_BLOCK + 1).unwrap();
    let (cos, sin) = (long.cos.to_vec(), long.sin.to_vec());
    assert_eq!(grown.cached_positions(), 2 * llama_rope::CACHE_BLOCK);
    assert_eq!(
        grown.memory_bytes(),
        2 * 4 * 32 * 2 * llama_rope::CACHE_BLOCK
    );

    let mut fresh = RotaryEmbedding::new(config);
    let once = fresh.tables(llama_rope::CACHE_BLOCK + 1).unwrap();
    assert_eq!(cos, once.cos);
    assert_eq!(sin, once.sin);
}

#[test]
fn longrope_switches_factors_past_the_original_context() {
    let config = config(4, 16, 16);
    let mut rope = RotaryEmbedding::new(config.clone());
    rope.tables(32).unwrap();
    let short = rope.frequencies().inv_freq.clone();
    rope.tables(33).unwrap();
    let long = rope.frequencies().inv_freq.clone();
    assert_eq!(short, config.frequencies(32).inv_freq);
    assert_eq!(long, config.frequencies(33).inv_freq);
    assert_ne!(short, long);
}

#[test]
fn bad_shapes_and_positions_are_errors() {
    let mut rope = RotaryEmbedding::new(config(0, 8, 8));
    let tables = rope.tables(10).unwrap();
    let shape = QkShape {
        batch: 1,
        heads: 2,
        seq: 3,
        head_dim: 8,
    };
    let mut x = vec![0.0f32; shape.len()];
    let err = apply(&mut x[1..], shape, &tables, &[0, 1, 2]).unwrap_err();
    assert!(err.to_string().contains("buffer has 47 elements"), "{err}");
    let err = apply(&mut x, shape, &tables, &[0, 1]).unwrap_err();
    assert!(err.to_string().contains("2 position ids"), "{err}");
    let err = apply(&mut x, shape, &tables, &[0, 1, 10]).unwrap_err();
    assert!(err.to_string().contains("position 10"), "{err}");
    let wide = QkShape {
        head_dim: 6,
        ..shape
    };
    let err = apply(&mut x[..wide.len()], wide, &tables, &[0, 1, 2]).unwrap_err();
    assert!(
        err.to_string().contains("rotary_dim 8 exceeds head_dim 6"),
        "{err}"
    );
}
