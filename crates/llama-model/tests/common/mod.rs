//! What the LoRA fixture tests share: checking every pair's matrices against peft's numbers.

use llama_fixtures::{assert_close, Fixture};
use llama_peft::{peft_name, AdapterGrads, LoraAdapter};

/// The A and B matrices of every pair of `adapter`, by (layer, target).
pub fn adapter_matrices(adapter: &LoraAdapter) -> Vec<(String, Vec<f32>)> {
    adapter
        .pairs()
        .flat_map(|(i, t, p)| {
            [
                (peft_name(i, t, "A", true), p.a.clone()),
                (peft_name(i, t, "B", true), p.b.clone()),
            ]
        })
        .collect()
}

/// The gradients of every pair of `adapter`, named like its matrices.
pub fn grad_matrices(adapter: &LoraAdapter, grads: &AdapterGrads) -> Vec<(String, Vec<f32>)> {
    adapter
        .pairs()
        .flat_map(|(i, t, _)| {
            let g = grads.get(i, t).expect("a gradient for every pair");
            [
                (peft_name(i, t, "A", true), g.a.clone()),
                (peft_name(i, t, "B", true), g.b.clone()),
            ]
        })
        .collect()
}

/// Each named matrix against the fixture's `{prefix}.{name}` within `tol`.
pub fn check_matrices(
    label: &str,
    fixture: &Fixture,
    prefix: &str,
    matrices: &[(String, Vec<f32>)],
    tol: f64,
) {
    for (name, values) in matrices {
        let key = format!("{prefix}.{name}");
        let (expected, shape) = fixture.f32(&key);
        assert_close(&format!("{label} {key}"), values, &expected, &shape, tol);
    }
}
