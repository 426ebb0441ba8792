//! The ops a decoder layer runs, each by the [`Kernel`] llama-patch chose for it: `Fast` calls
//! the optimised function of the same name, `Reference` converts to f64, runs the formula of
//! [`crate::reference`] and rounds back to f32 once. Shapes and errors are the fast functions'.

use llama_core::Kernel;

use crate::activation::{self, GatedAct};
use crate::error::{check_len, rows_of, Result};
use crate::loss::{check_labels, CrossEntropy, CrossEntropyOptions};
use crate::weight::{Activations, Weight};
use crate::{norm, reference};

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow_into(values: &[f64], out: &mut [f32]) {
    out.iter_mut().zip(values).for_each(|(o, &v)| *o = v as f32);
}

/// [`crate::rms_norm`]: x [N, C], weight [C] → y [N, C].
pub fn rms_norm(kernel: Kernel, x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) -> Result<()> {
    match kernel {
        Kernel::Fast => crate::rms_norm(x, weight, eps, y),
        Kernel::Reference => {
            norm::check_rows("rms_norm", x.len(), weight.len(), y.len())?;
            let out = reference::rms_norm(&wide(x), &wide(weight), eps as f64);
            narrow_into(&out, y);
            Ok(())
        }
    }
}

/// [`crate::rms_norm_backward`]: dx [N, C] and dw [C] (both overwritten).
pub fn rms_norm_backward(
    kernel: Kernel,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
) -> Result<()> {
    match kernel {
        Kernel::Fast => crate::rms_norm_backward(x, weight, dy, eps, dx, dw),
        Kernel::Reference => {
            norm::check_backward(x.len(), weight.len(), dy.len(), dx.len(), dw.len())?;
            let (gx, gw) =
                reference::rms_norm_backward(&wide(x), &wide(weight), &wide(dy), eps as f64);
            narrow_into(&gx, dx);
            narrow_into(&gw, dw);
            Ok(())
        }
    }
}

/// [`crate::gated_forward`]: h = act(gate) ⊙ up.
pub fn gated_forward(
    kernel: Kernel,
    act: GatedAct,
    gate: &[f32],
    up: &[f32],
    h: &mut [f32],
) -> Result<()> {
    match kernel {
        Kernel::Fast => crate::gated_forward(act, gate, up, h),
        Kernel::Reference => {
            activation::check_forward(gate.len(), up.len(), h.len())?;
            narrow_into(&reference::gated_forward(act, &wide(gate), &wide(up)), h);
            Ok(())
        }
    }
}

/// [`crate::gated_backward`]: dgate, dup from dh.
pub fn gated_backward(
    kernel: Kernel,
    act: GatedAct,
    gate: &[f32],
    up: &[f32],
    dh: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) -> Result<()> {
    match kernel {
        Kernel::Fast => crate::gated_backward(act, gate, up, dh, dgate, dup),
        Kernel::Reference => {
            let others = [up.len(), dh.len(), dgate.len(), dup.len()];
            activation::check_backward(gate.len(), others)?;
            let (dg, du) = reference::gated_backward(act, &wide(gate), &wide(up), &wide(dh));
            narrow_into(&dg, dgate);
            narrow_into(&du, dup);
            Ok(())
        }
    }
}

/// y [M, N] = x [M, K] · Wᵀ ([`Weight::forward_with`]); the reference dequantises W exactly.
pub fn linear(
    kernel: Kernel,
    w: &Weight,
    x: &[f32],
    y: &mut [f32],
    mode: Activations,
) -> Result<()> {
    match kernel {
        Kernel::Fast => w.forward_with(x, y, mode),
        Kernel::Reference => {
            let (n, k) = w.shape();
            let m = rows_of("linear", "x", x.len(), k)?;
            check_len("linear", "y", y.len(), m * n)?;
            narrow_into(&reference::linear(&wide(x), &wide(&w.to_f32()?), k), y);
            Ok(())
        }
    }
}

/// dx [M, K] = dy [M, N] · W ([`Weight::backward_input`]), overwritten.
pub fn linear_backward_input(kernel: Kernel, w: &Weight, dy: &[f32], dx: &mut [f32]) -> Result<()> {
    match kernel {
        Kernel::Fast => w.backward_input(dy, dx),
        Kernel::Reference => {
            let (n, k) = w.shape();
            let m = rows_of("linear_backward_input", "dy", dy.len(), n)?;
            check_len("linear_backward_input", "dx", dx.len(), m * k)?;
            // dy · W = dy · (Wᵀ)ᵀ: the reference product with Wᵀ [K, N].
            let values = w.to_f32()?;
            let wt: Vec<f64> = (0..k)
                .flat_map(|c| (0..n).map(move |o| (o, c)))
                .map(|(o, c)| values[o * k + c] as f64)
                .collect();
            narrow_into(&reference::linear(&wide(dy), &wt, n), dx);
            Ok(())
        }
    }
}

/// [`crate::cross_entropy`] of logits [N, V] against labels [N].
pub fn cross_entropy(
    kernel: Kernel,
    logits: &[f32],
    labels: &[i64],
    opts: &CrossEntropyOptions,
) -> Result<CrossEntropy> {
    match kernel {
        Kernel::Fast => crate::cross_entropy(logits, labels, opts),
        Kernel::Reference => {
            check_labels("cross_entropy", logits.len(), labels, opts)?;
            let loss = reference::cross_entropy(&wide(logits), labels, opts);
            let n_valid = labels.iter().filter(|&&l| l != opts.ignore_index).count();
            Ok(CrossEntropy {
                loss: loss as f32,
                n_valid,
                // The reference backward recomputes the softmax; nothing to keep.
                logsumexp: vec![0.0; labels.len()],
            })
        }
    }
}

/// [`crate::cross_entropy_backward`]: logits ← dloss · d(mean loss)/d logits, in place.
pub fn cross_entropy_backward(
    kernel: Kernel,
    logits: &mut [f32],
    labels: &[i64],
    forward: &CrossEntropy,
    dloss: f32,
    opts: &CrossEntropyOptions,
) -> Result<()> {
    match kernel {
        Kernel::Fast => crate::cross_entropy_backward(logits, labels, forward, dloss, opts),
        Kernel::Reference => {
            check_labels("cross_entropy_backward", logits.len(), labels, opts)?;
            let grad = reference::cross_entropy_backward(&wide(logits), labels, opts);
            logits
                .iter_mut()
                .zip(&grad)
                .for_each(|(l, &g)| *l = (dloss as f64 * g) as f32);
            Ok(())
        }
    }
}
