//! Properties of attention on random inputs of awkward sizes (proptest): the tiled CPU path
//! equals the f64 reference forward and backward (grouped-query, causal or not, left padding,
//! queries that are a suffix of the keys, a key stride larger than the keys); the reference
//! backward equals finite differences; GQA equals multi-head attention with repeated K/V.

use llama_attn::{reference, AttnShape, Mask};
use llama_fixtures::{to_f32, to_f64, TestRng};
use proptest::prelude::*;

/// ‖a − e‖ ≤ tol · ‖e‖ + 1e-6 · √n (a floor for rows whose values cancel to ~0).
fn close(name: &str, a: &[f32], e: &[f32], tol: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), e.len());
    let diff: f64 = a
        .iter()
        .zip(e)
        .map(|(a, e)| (*a as f64 - *e as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = e.iter().map(|e| (*e as f64).powi(2)).sum::<f64>().sqrt();
    let allowed = tol * norm + 1e-6 * (e.len() as f64).sqrt();
    prop_assert!(diff <= allowed, "{name}: |a − e| = {diff:e} > {allowed:e}");
    Ok(())
}

prop_compose! {
    fn shapes()(batch in 1usize..3, kv_heads in 1usize..3, group in 1usize..4, seq_k in 1usize..80,
                head_dim in 1usize..24, spare in 0usize..5)
               (seq_q in 1..=seq_k, batch in Just(batch), kv_heads in Just(kv_heads), group in Just(group),
                seq_k in Just(seq_k), head_dim in Just(head_dim), spare in Just(spare)) -> AttnShape {
        AttnShape { batch, heads: kv_heads * group, kv_heads, seq_q, seq_k, kv_stride: seq_k + spare, head_dim }
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    padding: Vec<usize>,
}

fn inputs(s: &AttnShape, seed: u64) -> Inputs {
    let mut rng = TestRng::new(seed);
    let padding = (0..s.batch)
        .map(|_| (rng.next_u64() % (s.seq_k as u64 / 2 + 1)) as usize)
        .collect();
    Inputs {
        q: rng.vec(s.q_len(), 2.0),
        k: rng.vec(s.kv_len(), 2.0),
        v: rng.vec(s.kv_len(), 1.0),
        dout: rng.vec(s.q_len(), 1.0),
        padding,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn tiled_forward_and_backward_equal_the_reference(s in shapes(), causal: bool, padded: bool, seed: u64) {
        tiled_matches_reference(&s, causal, padded, seed)?;
    }

    /// Sequences past one query tile (128) and one key tile (256): several blocks per head,
    /// prefill of a suffix (seq_q < seq_k) included.
    #[test]
    fn several_tiles_equal_the_reference(
        seq_k in 200usize..600, seq_q_less in 0usize..150, group in 1usize..3, causal: bool, padded: bool, seed: u64,
    ) {
        let seq_q = seq_k - seq_q_less.min(seq_k - 1);
        let s = AttnShape { batch: 1, heads: 2 * group, kv_heads: 2, seq_q, seq_k, kv_stride: seq_k + 3, head_dim: 8 };
        tiled_matches_reference(&s, causal, padded, seed)?;
    }

    #[test]
    fn reference_backward_matches_finite_differences(
        seq in 1usize..7, head_dim in 1usize..6, group in 1usize..3, causal: bool, seed: u64,
    ) {
        let s = AttnShape::self_attention(1, group, 1, seq, head_dim);
        let x = inputs(&s, seed);
        let mask = Mask { causal, padding: None };
        let (q, k, v, dout) = (to_f64(&x.q), to_f64(&x.k), to_f64(&x.v), to_f64(&x.dout));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            reference::forward(q, k, v, &s, &mask).iter().zip(&dout).map(|(o, g)| o * g).sum()
        };
        let numeric = |x: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
            (0..x.len()).map(|i| {
                let (mut up, mut down) = (x.to_vec(), x.to_vec());
                up[i] += 1e-6;
                down[i] -= 1e-6;
                (f(&up) - f(&down)) / 2e-6
            }).collect()
        };
        let (dq, dk, dv) = reference::backward(&q, &k, &v, &dout, &s, &mask);
        close("dq", &to_f32(&dq), &to_f32(&numeric(&q, &|q| loss(q, &k, &v))), 1e-5)?;
        close("dk", &to_f32(&dk), &to_f32(&numeric(&k, &|k| loss(&q, k, &v))), 1e-5)?;
        close("dv", &to_f32(&dv), &to_f32(&numeric(&v, &|v| loss(&q, &k, v))), 1e-5)?;
    }

    #[test]
    fn grouped_query_attention_equals_multi_head_with_repeated_kv(
        kv_heads in 1usize..3, group in 1usize..4, seq in 1usize..40, head_dim in 1usize..20, seed: u64,
    ) {
        let gqa = AttnShape::self_attention(1, kv_heads * group, kv_heads, seq, head_dim);
        let mha = AttnShape { kv_heads: kv_heads * group, ..gqa };
        let x = inputs(&gqa, seed);
        // Head h of the multi-head version gets kv head h / group's keys and values.
        let repeat = |t: &[f32]| -> Vec<f32> {
            (0..kv_heads * group).flat_map(|h| t[(h / group) * seq * head_dim..][..seq * head_dim].to_vec()).collect()
        };
        let run = |s: &AttnShape, k: &[f32], v: &[f32]| {
            let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
            llama_attn::forward(&x.q, k, v, s, &Mask::causal(), &mut out, &mut lse).unwrap();
            out
        };
        prop_assert_eq!(run(&gqa, &x.k, &x.v), run(&mha, &repeat(&x.k), &repeat(&x.v)));
    }
}

#[test]
fn mismatched_buffers_and_heads_are_errors() {
    let s = AttnShape::self_attention(1, 4, 2, 8, 16);
    let (q, kv) = (vec![0f32; s.q_len()], vec![0f32; s.kv_len()]);
    let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
    assert!(
        llama_attn::forward(&q[1..], &kv, &kv, &s, &Mask::causal(), &mut out, &mut lse).is_err()
    );
    let odd = AttnShape { kv_heads: 3, ..s };
    let msg = llama_attn::forward(&q, &kv, &kv, &odd, &Mask::causal(), &mut out, &mut lse)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a multiple of 3 kv heads"), "{msg}");
    let pad = [0usize; 3];
    let padded = Mask {
        causal: true,
        padding: Some(&pad),
    };
    assert!(llama_attn::forward(&q, &kv, &kv, &s, &padded, &mut out, &mut lse).is_err());
}

#[test]
fn decoding_split_across_tasks_equals_the_reference() {
    // One sequence, one kv group and thousands of keys: the CPU forward splits the keys into
    // several tasks and merges them (see flash.rs, decode_split).
    for (kv_heads, group, seq_k, padded) in
        [(1, 3, 3001, false), (1, 1, 700, true), (2, 2, 1500, true)]
    {
        let s = AttnShape {
            seq_q: 1,
            ..AttnShape::self_attention(1, kv_heads * group, kv_heads, seq_k, 32)
        };
        let x = inputs(&s, seq_k as u64);
        let padding = [seq_k / 3];
        let mask = Mask {
            causal: true,
            padding: padded.then_some(&padding[..]),
        };
        let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
        llama_attn::forward(&x.q, &x.k, &x.v, &s, &mask, &mut out, &mut lse).unwrap();
        let expected = reference::forward(&to_f64(&x.q), &to_f64(&x.k), &to_f64(&x.v), &s, &mask);
        close("split decode", &out, &to_f32(&expected), 1e-5).unwrap();
        // L = log Σ e^s, also through the merge: O from the reference is normalised, so check L
        // against a direct computation for the first row.
        let scale = 1.0 / (32f64).sqrt();
        let first = if padded { padding[0] } else { 0 };
        let scores: Vec<f64> = (first..seq_k)
            .map(|j| {
                scale
                    * (0..32)
                        .map(|c| x.q[c] as f64 * x.k[j * 32 + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = max + scores.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        assert!(
            (lse[0] as f64 - l).abs() < 1e-4 * l.abs().max(1.0),
            "lse {} vs {l}",
            lse[0]
        );
    }
}

/// The tiled forward and backward of random inputs against the f64 reference.
fn tiled_matches_reference(
    s: &AttnShape,
    causal: bool,
    padded: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let x = inputs(s, seed);
    let mask = Mask {
        causal,
        padding: padded.then_some(&x.padding[..]),
    };
    let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
    llama_attn::forward(&x.q, &x.k, &x.v, s, &mask, &mut out, &mut lse).unwrap();
    let (q64, k64, v64) = (to_f64(&x.q), to_f64(&x.k), to_f64(&x.v));
    close(
        "out",
        &out,
        &to_f32(&reference::forward(&q64, &k64, &v64, s, &mask)),
        1e-5,
    )?;

    let (mut dq, mut dk, mut dv) = (
        vec![0f32; s.q_len()],
        vec![0f32; s.kv_len()],
        vec![0f32; s.kv_len()],
    );
    llama_attn::backward(
        &x.q, &x.k, &x.v, &out, &lse, &x.dout, s, &mask, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    let (rq, rk, rv) = reference::backward(&q64, &k64, &v64, &to_f64(&x.dout), s, &mask);
    close("dq", &dq, &to_f32(&rq), 1e-4)?;
    close("dk", &dk, &to_f32(&rk), 1e-4)?;
    close("dv", &dv, &to_f32(&rv), 1e-4)?;
    Ok(())
}
