//! The guide's tunable ops test (suite `optimization`): one Llama MLP block and the loss at
//! the sizes of `cargo xtask test --set …` — `seq_len` token rows, `hidden_size`,
//! `intermediate_size`, `vocab_size` (defaults 7, 576, 1536, 49152: SmolLM2-135M) — fast path
//! against the reference, dense and Q4_0/Q8_0/NF4-quantised. Try `--set hidden_size=4096 --set
//! intermediate_size=14336 --set vocab_size=128256` for Llama-3-8B's widths.

use llama_core::DType;
use llama_fixtures::{assert_close, param, to_f32, to_f64, Suite, TestRng};
use llama_ops::{reference, CrossEntropyOptions, GatedAct, QuantMatrix};

#[test]
fn mlp_block_and_loss_at_the_tuned_sizes() {
    let rows = param("seq_len", Suite::Optimization);
    let hidden = param("hidden_size", Suite::Optimization);
    let inter = param("intermediate_size", Suite::Optimization);
    let vocab = param("vocab_size", Suite::Optimization);
    let mut rng = TestRng::new(42);
    let x = rng.vec(rows * hidden, 2.0);
    let norm_w = rng.vec(hidden, 1.0);
    let gate_w = rng.vec(inter * hidden, 0.05);
    let up_w = rng.vec(inter * hidden, 0.05);

    // norm → gate, up projections → SwiGLU, each against the reference.
    let mut normed = vec![0f32; x.len()];
    llama_ops::rms_norm(&x, &norm_w, 1e-5, &mut normed).unwrap();
    let normed_ref = reference::rms_norm(&to_f64(&x), &to_f64(&norm_w), 1e-5);
    assert_close(
        "rms_norm",
        &normed,
        &to_f32(&normed_ref),
        &[rows, hidden],
        1e-5,
    );
    let (mut gate, mut up) = (vec![0f32; rows * inter], vec![0f32; rows * inter]);
    llama_ops::linear(&normed, &gate_w, hidden, &mut gate).unwrap();
    llama_ops::linear(&normed, &up_w, hidden, &mut up).unwrap();
    let gate_ref = reference::linear(&to_f64(&normed), &to_f64(&gate_w), hidden);
    assert_close("gate_proj", &gate, &to_f32(&gate_ref), &[rows, inter], 1e-5);
    llama_ops::gated_forward_in_place(GatedAct::Silu, &mut gate, &up).unwrap();
    let h_ref = reference::gated_forward(GatedAct::Silu, &gate_ref, &to_f64(&up));
    assert_close("swiglu", &gate, &to_f32(&h_ref), &[rows, inter], 1e-5);

    // The same projection from quantised weights: fused product == dequantise + reference.
    for dtype in [DType::Q4_0, DType::Q8_0, DType::Nf4] {
        if !hidden.is_multiple_of(dtype.block_len()) {
            continue;
        }
        let bytes = llama_ops::quantize(dtype, &gate_w, hidden).unwrap();
        let w = QuantMatrix::new(dtype, inter, hidden, &bytes).unwrap();
        let mut y = vec![0f32; rows * inter];
        w.matmul(&normed, &mut y).unwrap();
        let dense = to_f64(&w.dequantize());
        let expected = to_f32(&reference::linear(&to_f64(&normed), &dense, hidden));
        assert_close(
            &format!("{dtype} gate_proj"),
            &y,
            &expected,
            &[rows, inter],
            1e-5,
        );
    }

    // Cross entropy over the vocabulary, chunked, with ignored rows.
    let logits = rng.vec(rows * vocab, 10.0);
    let labels: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 3 == 2 {
                -100
            } else {
                ((r * 7919) % vocab) as i64
            }
        })
        .collect();
    let opts = CrossEntropyOptions {
        chunk: 4096,
        softcap: Some(30.0),
        ..Default::default()
    };
    let forward = llama_ops::cross_entropy(&logits, &labels, &opts).unwrap();
    let loss_ref = reference::cross_entropy(&to_f64(&logits), &labels, &opts);
    assert_close("loss", &[forward.loss], &[loss_ref as f32], &[1], 1e-5);
    let mut grad = logits.clone();
    llama_ops::cross_entropy_backward(&mut grad, &labels, &forward, 1.0, &opts).unwrap();
    let grad_ref = reference::cross_entropy_backward(&to_f64(&logits), &labels, &opts);
    assert_close("dlogits", &grad, &to_f32(&grad_ref), &[rows, vocab], 1e-5);
}
