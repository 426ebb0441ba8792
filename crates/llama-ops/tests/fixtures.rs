//! Every tensor of `$LLAMA_FIXTURES/ops` (HF transformers' numbers), through the fast CPU path
//! and through the reference, within the fixture README's tolerances (1e-5 for f32 single
//! ops, 1e-2 for bf16). Sizes and settings come from the files.

use llama_core::bf16;
use llama_fixtures::{assert_close, to_f32, to_f64, Fixture};
use llama_ops::{reference, CrossEntropyOptions, GatedAct, Gelu};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

fn ops() -> Fixture {
    Fixture::open("ops/ops")
}

fn setting(f: &Fixture, key: &str) -> f64 {
    f.json()[key]
        .as_f64()
        .unwrap_or_else(|| panic!("ops.json lacks {key}"))
}

#[test]
fn rms_norm_forward_and_backward() {
    let f = ops();
    let eps = setting(&f, "rms_eps");
    let (x, shape) = f.f32("rms_x");
    let (w, _) = f.f32("rms_w");
    let (dy, _) = f.f32("rms_dy");
    let (y_ref, dx_ref, dw_ref) = (f.f32("rms_y").0, f.f32("rms_dx").0, f.f32("rms_dw").0);

    let mut y = vec![0f32; x.len()];
    llama_ops::rms_norm(&x, &w, eps as f32, &mut y).unwrap();
    assert_close("rms_y (fast)", &y, &y_ref, &shape, F32_TOL);
    let y64 = reference::rms_norm(&to_f64(&x), &to_f64(&w), eps);
    assert_close("rms_y (reference)", &to_f32(&y64), &y_ref, &shape, F32_TOL);

    let (mut dx, mut dw) = (vec![0f32; x.len()], vec![0f32; w.len()]);
    llama_ops::rms_norm_backward(&x, &w, &dy, eps as f32, &mut dx, &mut dw).unwrap();
    assert_close("rms_dx (fast)", &dx, &dx_ref, &shape, F32_TOL);
    assert_close("rms_dw (fast)", &dw, &dw_ref, &[w.len()], F32_TOL);
    let (dx64, dw64) = reference::rms_norm_backward(&to_f64(&x), &to_f64(&w), &to_f64(&dy), eps);
    assert_close(
        "rms_dx (reference)",
        &to_f32(&dx64),
        &dx_ref,
        &shape,
        F32_TOL,
    );
    assert_close(
        "rms_dw (reference)",
        &to_f32(&dw64),
        &dw_ref,
        &[w.len()],
        F32_TOL,
    );
}

#[test]
fn gemma_rms_norm_forward() {
    let f = ops();
    let eps = setting(&f, "rms_eps");
    let (x, shape) = f.f32("rms_x");
    let (w, _) = f.f32("rms_w");
    let (y_ref, _) = f.f32("gemma_y");
    let mut y = vec![0f32; x.len()];
    llama_ops::gemma_rms_norm(&x, &w, eps as f32, &mut y).unwrap();
    assert_close("gemma_y (fast)", &y, &y_ref, &shape, F32_TOL);
    let y64 = reference::gemma_rms_norm(&to_f64(&x), &to_f64(&w), eps);
    assert_close(
        "gemma_y (reference)",
        &to_f32(&y64),
        &y_ref,
        &shape,
        F32_TOL,
    );
}

#[test]
fn rms_norm_bf16_rounds_like_hf() {
    let f = ops();
    let eps = setting(&f, "rms_eps");
    let x: Vec<bf16> = f.tensor("rms_bf16_x").to_vec().unwrap();
    let w: Vec<bf16> = f.tensor("rms_bf16_w").to_vec().unwrap();
    let (y_ref, shape) = f.f32("rms_bf16_y");
    let mut y = vec![bf16::ZERO; x.len()];
    llama_ops::rms_norm(&x, &w, eps as f32, &mut y).unwrap();
    let widen = |v: &[bf16]| v.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    assert_close("rms_bf16_y (fast)", &widen(&y), &y_ref, &shape, BF16_TOL);
    let y_rounded = reference::rms_norm_rounded(&x, &w, eps);
    assert_close(
        "rms_bf16_y (reference)",
        &widen(&y_rounded),
        &y_ref,
        &shape,
        BF16_TOL,
    );
}

#[test]
fn layer_norm_forward() {
    let f = ops();
    let eps = setting(&f, "layer_norm_eps");
    let (x, shape) = f.f32("rms_x");
    let (w, b) = (f.f32("ln_w").0, f.f32("ln_b").0);
    let (y_ref, _) = f.f32("ln_y");
    let mut y = vec![0f32; x.len()];
    llama_ops::layer_norm(&x, &w, &b, eps as f32, &mut y).unwrap();
    assert_close("ln_y (fast)", &y, &y_ref, &shape, F32_TOL);
    let y64 = reference::layer_norm(&to_f64(&x), &to_f64(&w), &to_f64(&b), eps);
    assert_close("ln_y (reference)", &to_f32(&y64), &y_ref, &shape, F32_TOL);
}

#[test]
fn swiglu_forward_in_place_and_backward() {
    let f = ops();
    let (gate, shape) = f.f32("sw_gate");
    let (up, dh) = (f.f32("sw_up").0, f.f32("sw_dh").0);
    let (h_ref, dgate_ref, dup_ref) = (f.f32("sw_h").0, f.f32("sw_dgate").0, f.f32("sw_dup").0);
    let act = GatedAct::Silu;

    let mut h = vec![0f32; gate.len()];
    llama_ops::gated_forward(act, &gate, &up, &mut h).unwrap();
    assert_close("sw_h (fast)", &h, &h_ref, &shape, F32_TOL);
    let mut in_place = gate.clone();
    llama_ops::gated_forward_in_place(act, &mut in_place, &up).unwrap();
    assert_eq!(
        in_place, h,
        "the in-place forward differs from the out-of-place one"
    );
    let h64 = reference::gated_forward(act, &to_f64(&gate), &to_f64(&up));
    assert_close("sw_h (reference)", &to_f32(&h64), &h_ref, &shape, F32_TOL);

    let (mut dgate, mut dup) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
    llama_ops::gated_backward(act, &gate, &up, &dh, &mut dgate, &mut dup).unwrap();
    assert_close("sw_dgate (fast)", &dgate, &dgate_ref, &shape, F32_TOL);
    assert_close("sw_dup (fast)", &dup, &dup_ref, &shape, F32_TOL);
    let (dg64, du64) = reference::gated_backward(act, &to_f64(&gate), &to_f64(&up), &to_f64(&dh));
    assert_close(
        "sw_dgate (reference)",
        &to_f32(&dg64),
        &dgate_ref,
        &shape,
        F32_TOL,
    );
    assert_close(
        "sw_dup (reference)",
        &to_f32(&du64),
        &dup_ref,
        &shape,
        F32_TOL,
    );
}

#[test]
fn geglu_exact_and_tanh() {
    let f = ops();
    let (gate, shape) = f.f32("sw_gate");
    let (up, _) = f.f32("sw_up");
    for (name, gelu) in [("geglu_exact_h", Gelu::Exact), ("geglu_tanh_h", Gelu::Tanh)] {
        let (h_ref, _) = f.f32(name);
        let mut h = vec![0f32; gate.len()];
        llama_ops::gated_forward(GatedAct::Gelu(gelu), &gate, &up, &mut h).unwrap();
        assert_close(&format!("{name} (fast)"), &h, &h_ref, &shape, F32_TOL);
        let h64 = reference::gated_forward(GatedAct::Gelu(gelu), &to_f64(&gate), &to_f64(&up));
        assert_close(
            &format!("{name} (reference)"),
            &to_f32(&h64),
            &h_ref,
            &shape,
            F32_TOL,
        );
    }
}

#[test]
fn cross_entropy_plain_and_softcapped() {
    let f = ops();
    let (logits, shape) = f.f32("ce_logits");
    let (labels, _) = f.i64("ce_labels");
    let ignore_index = f.json()["ignore_index"].as_i64().expect("ignore_index");
    let softcap = setting(&f, "softcap") as f32;
    let plain = CrossEntropyOptions {
        ignore_index,
        ..CrossEntropyOptions::default()
    };
    let capped = CrossEntropyOptions {
        softcap: Some(softcap),
        ..plain
    };
    for (opts, loss_name, grad_name) in [
        (plain, "ce_loss", "ce_dlogits"),
        (capped, "ce_softcap_loss", "ce_softcap_dlogits"),
    ] {
        let (loss_ref, _) = f.f32(loss_name);
        let (grad_ref, _) = f.f32(grad_name);
        // A chunk smaller than the vocabulary exercises the merging of chunks.
        let chunked = CrossEntropyOptions {
            chunk: shape[1] / 3 + 1,
            ..opts
        };
        for opts in [opts, chunked] {
            let forward = llama_ops::cross_entropy(&logits, &labels, &opts).unwrap();
            assert_close(loss_name, &[forward.loss], &loss_ref, &[1], F32_TOL);
            let mut grad = logits.clone();
            llama_ops::cross_entropy_backward(&mut grad, &labels, &forward, 1.0, &opts).unwrap();
            assert_close(grad_name, &grad, &grad_ref, &shape, F32_TOL);
        }
        let loss64 = reference::cross_entropy(&to_f64(&logits), &labels, &opts);
        assert_close(loss_name, &[loss64 as f32], &loss_ref, &[1], F32_TOL);
        let grad64 = reference::cross_entropy_backward(&to_f64(&logits), &labels, &opts);
        assert_close(grad_name, &to_f32(&grad64), &grad_ref, &shape, F32_TOL);
    }
}
