//! Properties on random inputs of awkward sizes (proptest): the fast CPU path equals the
//! reference, and each reference backward equals central finite differences of its forward in
//! f64. Objective: L = Σ y · dy for a random upstream gradient dy.

use llama_core::{bf16, f16, Element};
use llama_fixtures::{to_f32, to_f64, TestRng};
use llama_ops::{reference, CrossEntropyOptions, GatedAct, Gelu};
use proptest::prelude::*;

const ACTS: [GatedAct; 3] = [
    GatedAct::Silu,
    GatedAct::Gelu(Gelu::Exact),
    GatedAct::Gelu(Gelu::Tanh),
];

/// ‖actual − expected‖ ≤ tol · ‖expected‖ + 1e-6 · √n: relative, with a floor for the
/// elements where f32 itself cancels (1 + tanh(x) in GELU's negative tail, softmax − 1 for a
/// confident row), whose absolute error is a few f32 ulps of 1 whatever the value.
fn close(name: &str, actual: &[f32], expected: &[f32], tol: f64) -> Result<(), TestCaseError> {
    let sq = |v: f64| v * v;
    let diff = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| sq(*a as f64 - *e as f64))
        .sum::<f64>();
    let norm = expected.iter().map(|e| sq(*e as f64)).sum::<f64>().sqrt();
    let allowed = tol * norm + 1e-6 * (expected.len() as f64).sqrt();
    prop_assert_eq!(actual.len(), expected.len(), "{}: lengths", name);
    prop_assert!(
        diff.sqrt() <= allowed,
        "{name}: |actual − expected| = {:e} > {allowed:e}",
        diff.sqrt()
    );
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// ∂/∂v[i] of `f` at v by central differences, for every i.
fn numeric_grad(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    (0..v.len())
        .map(|i| {
            let mut p = v.to_vec();
            p[i] += h;
            let up = f(&p);
            p[i] -= 2.0 * h;
            (up - f(&p)) / (2.0 * h)
        })
        .collect()
}

fn fd_close(name: &str, analytic: &[f64], numeric: &[f64]) -> Result<(), TestCaseError> {
    // Relative 1e-5, plus the central differences' own rounding (≈ 1e-16 / h per element) so
    // that gradients that vanish (a LayerNorm of two channels) do not fail on noise.
    let diff = analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| (a - n) * (a - n))
        .sum::<f64>()
        .sqrt();
    let norm = numeric.iter().map(|n| n * n).sum::<f64>().sqrt();
    let allowed = 1e-5 * norm + 1e-8 * (numeric.len() as f64).sqrt();
    prop_assert!(
        diff <= allowed,
        "{name}: |analytic − numeric| = {diff:e} > {allowed:e}"
    );
    Ok(())
}

/// RMSNorm and SwiGLU in a 16-bit type T against the reference with HF's roundings in T.
fn rounds_as_the_reference<T: Element + PartialEq>(
    rows: usize,
    dim: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = TestRng::new(seed);
    let to_t = |v: Vec<f32>| v.into_iter().map(T::from_f32).collect::<Vec<T>>();
    let (x, w) = (to_t(rng.vec(rows * dim, 3.0)), to_t(rng.vec(dim, 1.0)));
    let mut y = vec![T::from_f32(0.0); x.len()];
    llama_ops::rms_norm(&x, &w, 1e-6, &mut y).unwrap();
    let expected = reference::rms_norm_rounded(&x, &w, 1e-6);
    // The f32 and f64 statistics may round a few elements one unit apart; the rest are the
    // same bits, and none is further off.
    let widen = |v: &[T]| v.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let differing = y.iter().zip(&expected).filter(|(a, b)| a != b).count();
    prop_assert!(
        differing <= 1 + x.len() / 64,
        "{differing} of {} elements differ",
        x.len()
    );
    close("rms_norm", &widen(&y), &widen(&expected), 1e-2)?;

    // SiLU through the polynomial exp may round an element differently from f64's exp.
    let (gate, up) = (
        to_t(rng.vec(rows * dim, 4.0)),
        to_t(rng.vec(rows * dim, 2.0)),
    );
    let mut h = vec![T::from_f32(0.0); gate.len()];
    llama_ops::gated_forward(GatedAct::Silu, &gate, &up, &mut h).unwrap();
    let expected = reference::gated_forward_rounded(GatedAct::Silu, &gate, &up);
    let differing = h.iter().zip(&expected).filter(|(a, b)| a != b).count();
    prop_assert!(
        differing <= 1 + h.len() / 64,
        "{differing} of {} elements differ",
        h.len()
    );
    close("swiglu", &widen(&h), &widen(&expected), 1e-2)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    // From 4 channels: a LayerNorm of 2 maps every row to ±1, so its dx is pure rounding noise.
    #[test]
    fn norms_fast_equal_reference(rows in 1usize..9, dim in 4usize..150, seed: u64) {
        let mut rng = TestRng::new(seed);
        let (x, w, b, dy) = (rng.vec(rows * dim, 3.0), rng.vec(dim, 1.0), rng.vec(dim, 1.0), rng.vec(rows * dim, 1.0));
        let eps = 1e-6f32;
        let mut y = vec![0f32; x.len()];
        llama_ops::rms_norm(&x, &w, eps, &mut y).unwrap();
        close("rms_norm", &y, &to_f32(&reference::rms_norm(&to_f64(&x), &to_f64(&w), eps as f64)), 1e-5)?;
        llama_ops::gemma_rms_norm(&x, &w, eps, &mut y).unwrap();
        close("gemma", &y, &to_f32(&reference::gemma_rms_norm(&to_f64(&x), &to_f64(&w), eps as f64)), 1e-5)?;
        llama_ops::layer_norm(&x, &w, &b, 1e-5, &mut y).unwrap();
        close("layer_norm", &y, &to_f32(&reference::layer_norm(&to_f64(&x), &to_f64(&w), &to_f64(&b), 1e-5)), 1e-5)?;

        let (mut dx, mut dw, mut db) = (vec![0f32; x.len()], vec![0f32; dim], vec![0f32; dim]);
        llama_ops::rms_norm_backward(&x, &w, &dy, eps, &mut dx, &mut dw).unwrap();
        let (rdx, rdw) = reference::rms_norm_backward(&to_f64(&x), &to_f64(&w), &to_f64(&dy), eps as f64);
        close("rms dx", &dx, &to_f32(&rdx), 1e-4)?;
        close("rms dw", &dw, &to_f32(&rdw), 1e-4)?;
        llama_ops::layer_norm_backward(&x, &w, &dy, 1e-5, &mut dx, &mut dw, &mut db).unwrap();
        let (rdx, rdw, rdb) = reference::layer_norm_backward(&to_f64(&x), &to_f64(&w), &to_f64(&dy), 1e-5);
        close("ln dx", &dx, &to_f32(&rdx), 1e-4)?;
        close("ln dw", &dw, &to_f32(&rdw), 1e-4)?;
        close("ln db", &db, &to_f32(&rdb), 1e-5)?;
    }

    #[test]
    fn half_precision_norm_and_swiglu_round_as_the_reference(rows in 1usize..6, dim in 1usize..130, seed: u64) {
        rounds_as_the_reference::<bf16>(rows, dim, seed)?;
        rounds_as_the_reference::<f16>(rows, dim, seed)?;
    }

    #[test]
    fn norm_backwards_match_finite_differences(rows in 1usize..4, dim in 3usize..24, seed: u64) {
        let mut rng = TestRng::new(seed);
        let x = to_f64(&rng.vec(rows * dim, 2.0));
        let (w, b, dy) = (to_f64(&rng.vec(dim, 1.0)), to_f64(&rng.vec(dim, 1.0)), to_f64(&rng.vec(rows * dim, 1.0)));
        let eps = 1e-5;
        let (dx, dw) = reference::rms_norm_backward(&x, &w, &dy, eps);
        fd_close("rms dx", &dx, &numeric_grad(&x, |x| dot(&reference::rms_norm(x, &w, eps), &dy)))?;
        fd_close("rms dw", &dw, &numeric_grad(&w, |w| dot(&reference::rms_norm(&x, w, eps), &dy)))?;
        let (dx, dw, db) = reference::layer_norm_backward(&x, &w, &dy, eps);
        fd_close("ln dx", &dx, &numeric_grad(&x, |x| dot(&reference::layer_norm(x, &w, &b, eps), &dy)))?;
        fd_close("ln dw", &dw, &numeric_grad(&w, |w| dot(&reference::layer_norm(&x, w, &b, eps), &dy)))?;
        fd_close("ln db", &db, &numeric_grad(&b, |b| dot(&reference::layer_norm(&x, &w, b, eps), &dy)))?;
    }

    #[test]
    fn gated_fast_equals_reference_and_finite_differences(n in 1usize..300, seed: u64) {
        let mut rng = TestRng::new(seed);
        let (gate, up, dh) = (rng.vec(n, 5.0), rng.vec(n, 2.0), rng.vec(n, 1.0));
        for act in ACTS {
            let mut h = vec![0f32; n];
            llama_ops::gated_forward(act, &gate, &up, &mut h).unwrap();
            close("h", &h, &to_f32(&reference::gated_forward(act, &to_f64(&gate), &to_f64(&up))), 1e-5)?;
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            llama_ops::gated_backward(act, &gate, &up, &dh, &mut dg, &mut du).unwrap();
            let (rdg, rdu) = reference::gated_backward(act, &to_f64(&gate), &to_f64(&up), &to_f64(&dh));
            close("dgate", &dg, &to_f32(&rdg), 1e-5)?;
            close("dup", &du, &to_f32(&rdu), 1e-5)?;
            let (g64, u64_, dh64) = (to_f64(&gate), to_f64(&up), to_f64(&dh));
            fd_close("dgate fd", &rdg, &numeric_grad(&g64, |g| dot(&reference::gated_forward(act, g, &u64_), &dh64)))?;
            fd_close("dup fd", &rdu, &numeric_grad(&u64_, |u| dot(&reference::gated_forward(act, &g64, u), &dh64)))?;
        }
    }

    #[test]
    fn cross_entropy_fast_equals_reference_and_finite_differences(
        rows in 1usize..7, vocab in 2usize..90, chunk in 1usize..40,
        softcap in prop::option::of(5.0f32..40.0), scale in prop::option::of(0.5f32..2.0), seed: u64,
    ) {
        let mut rng = TestRng::new(seed);
        let logits = rng.vec(rows * vocab, 8.0);
        let labels: Vec<i64> = (0..rows)
            .map(|_| match rng.next_u64() % 4 { 0 => -100, r => ((rng.next_u64() ^ r) % vocab as u64) as i64 })
            .collect();
        let opts = CrossEntropyOptions { softcap, logit_scale: scale, chunk, ..Default::default() };
        let forward = llama_ops::cross_entropy(&logits, &labels, &opts).unwrap();
        let loss64 = reference::cross_entropy(&to_f64(&logits), &labels, &opts);
        prop_assert!((forward.loss as f64 - loss64).abs() <= 1e-5 * loss64.abs().max(1.0), "{} vs {loss64}", forward.loss);
        let mut grad = logits.clone();
        llama_ops::cross_entropy_backward(&mut grad, &labels, &forward, 1.0, &opts).unwrap();
        let grad64 = reference::cross_entropy_backward(&to_f64(&logits), &labels, &opts);
        close("dlogits", &grad, &to_f32(&grad64), 1e-5)?;
        let x64 = to_f64(&logits);
        fd_close("dlogits fd", &grad64, &numeric_grad(&x64, |x| reference::cross_entropy(x, &labels, &opts)))?;
    }

    #[test]
    fn linear_fast_equals_reference(m in 1usize..12, k in 1usize..70, n in 1usize..40, seed: u64) {
        let mut rng = TestRng::new(seed);
        let (x, w, dy) = (rng.vec(m * k, 1.0), rng.vec(n * k, 1.0), rng.vec(m * n, 1.0));
        let mut y = vec![0f32; m * n];
        llama_ops::linear(&x, &w, k, &mut y).unwrap();
        close("y", &y, &to_f32(&reference::linear(&to_f64(&x), &to_f64(&w), k)), 1e-5)?;

        // dx = dy · W: the linear map with Wᵀ as its weight.
        let wt: Vec<f64> = (0..k).flat_map(|j| (0..n).map(move |i| (i, j))).map(|(i, j)| w[i * k + j] as f64).collect();
        let mut dx = vec![0f32; m * k];
        llama_ops::linear_backward_input(&dy, &w, k, &mut dx).unwrap();
        close("dx", &dx, &to_f32(&reference::linear(&to_f64(&dy), &wt, n)), 1e-5)?;

        // dW = dyᵀ · x, accumulated onto what is there.
        let dyt: Vec<f64> = (0..n).flat_map(|j| (0..m).map(move |i| (i, j))).map(|(i, j)| dy[i * n + j] as f64).collect();
        let xt: Vec<f64> = (0..k).flat_map(|j| (0..m).map(move |i| (i, j))).map(|(i, j)| x[i * k + j] as f64).collect();
        let mut dw = vec![1f32; n * k];
        llama_ops::linear_backward_weight(&dy, &x, k, &mut dw).unwrap();
        let expected: Vec<f32> = reference::linear(&dyt, &xt, m).iter().map(|v| (v + 1.0) as f32).collect();
        close("dw", &dw, &expected, 1e-5)?;

        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wb64: Vec<f64> = wb.iter().map(|v| v.to_f32() as f64).collect();
        let mut yv = vec![0f32; n];
        llama_ops::matvec(&wb, &x[..k], &mut yv).unwrap();
        close("matvec bf16", &yv, &to_f32(&reference::linear(&to_f64(&x[..k]), &wb64, k)), 1e-5)?;
    }
}

#[test]
fn bad_shapes_and_labels_are_errors() {
    let x = vec![0f32; 10];
    let mut y = vec![0f32; 10];
    assert!(llama_ops::rms_norm(&x, &[1.0; 3], 1e-6, &mut y).is_err());
    assert!(llama_ops::rms_norm(&x, &[1.0; 5], 1e-6, &mut y[..5]).is_err());
    assert!(llama_ops::gated_forward(GatedAct::Silu, &x, &x[..9], &mut y).is_err());
    assert!(llama_ops::linear(&x, &[0.0; 7], 5, &mut y).is_err());
    let opts = CrossEntropyOptions::default();
    let err = llama_ops::cross_entropy(&x, &[1, 5], &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 5 at row 1"), "{err}");
    assert!(llama_ops::cross_entropy(&x, &[1, 2, 3], &opts).is_err());
    let zero_chunk = CrossEntropyOptions { chunk: 0, ..opts };
    assert!(llama_ops::cross_entropy(&x, &[1, 2], &zero_chunk).is_err());
    let all_ignored = llama_ops::cross_entropy(&x, &[-100, -100], &opts).unwrap();
    assert_eq!((all_ignored.loss, all_ignored.n_valid), (0.0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The decode-attention helpers (eight rows at a time on AVX2, a tail after) against f64 loops.
    #[test]
    fn row_products_equal_plain_loops(rows in 0usize..40, d in 1usize..100, seed: u64) {
        use llama_ops::math::{add_weighted_rows, dot_rows};
        let mut rng = TestRng::new(seed);
        let (q, m, w) = (rng.vec(d, 1.0), rng.vec(rows * d, 1.0), rng.vec(rows, 1.0));
        let mut scores = vec![0f32; rows];
        dot_rows(&q, &m, &mut scores);
        let expected: Vec<f32> = m.chunks_exact(d).map(|r| dot(&to_f64(&q), &to_f64(r)) as f32).collect();
        close("dot_rows", &scores, &expected, 1e-6)?;
        let start = rng.vec(d, 1.0);
        let mut y = start.clone();
        add_weighted_rows(&w, &m, &mut y);
        let expected: Vec<f32> = (0..d)
            .map(|i| (start[i] as f64 + (0..rows).map(|j| w[j] as f64 * m[j * d + i] as f64).sum::<f64>()) as f32)
            .collect();
        close("add_weighted_rows", &y, &expected, 1e-6)?;
    }
}
