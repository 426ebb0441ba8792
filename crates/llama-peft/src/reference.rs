//! The LoRA product and its gradients as plain f64 loops: the spec that the fast path is
//! tested against, and the `Reference` kernel of an unpatched model.
//! dims = (M, K, N, r): x [M, K], W [N, K], A [r, K], B [N, r].

/// (x·Aᵀ) [M, r].
fn down(x: &[f64], a: &[f64], (m, k, _, r): (usize, usize, usize, usize)) -> Vec<f64> {
    (0..m * r)
        .map(|at| {
            let (i, j) = (at / r, at % r);
            (0..k).map(|c| x[i * k + c] * a[j * k + c]).sum()
        })
        .collect()
}

/// The LoRA branch alone: s·(x·Aᵀ)·Bᵀ [M, N].
pub fn lora_branch(
    x: &[f64],
    a: &[f64],
    b: &[f64],
    dims: (usize, usize, usize, usize),
    s: f64,
) -> Vec<f64> {
    let (m, _, n, r) = dims;
    let xa = down(x, a, dims);
    (0..m * n)
        .map(|at| {
            let (i, o) = (at / n, at % n);
            s * (0..r).map(|j| xa[i * r + j] * b[o * r + j]).sum::<f64>()
        })
        .collect()
}

/// Gradients of sum(branch ⊙ dy) for [`lora_branch`]: (dx [M, K], dA [r, K], dB [N, r]).
pub fn lora_branch_backward(
    x: &[f64],
    a: &[f64],
    b: &[f64],
    dy: &[f64],
    dims: (usize, usize, usize, usize),
    s: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (m, k, n, r) = dims;
    let xa = down(x, a, dims);
    let (mut dx, mut da, mut db) = (vec![0.0; m * k], vec![0.0; r * k], vec![0.0; n * r]);
    for i in 0..m {
        // g_j = Σ_o dy_o B_oj
        let g: Vec<f64> = (0..r)
            .map(|j| (0..n).map(|o| dy[i * n + o] * b[o * r + j]).sum())
            .collect();
        for c in 0..k {
            dx[i * k + c] = s * (0..r).map(|j| g[j] * a[j * k + c]).sum::<f64>();
            for j in 0..r {
                da[j * k + c] += s * g[j] * x[i * k + c];
            }
        }
        for o in 0..n {
            for j in 0..r {
                db[o * r + j] += s * dy[i * n + o] * xa[i * r + j];
            }
        }
    }
    (dx, da, db)
}

/// y [M, N] = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
pub fn lora_forward(
    x: &[f64],
    w: &[f64],
    a: &[f64],
    b: &[f64],
    dims: (usize, usize, usize, usize),
    s: f64,
) -> Vec<f64> {
    let k = dims.1;
    let frozen = llama_ops::reference::linear(x, w, k);
    let branch = lora_branch(x, a, b, dims, s);
    frozen.iter().zip(branch).map(|(f, l)| f + l).collect()
}

/// Gradients of sum(y ⊙ dy) for [`lora_forward`]: (dx [M, K], dA [r, K], dB [N, r]).
pub fn lora_backward(
    x: &[f64],
    w: &[f64],
    a: &[f64],
    b: &[f64],
    dy: &[f64],
    dims: (usize, usize, usize, usize),
    s: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (m, k, n, _) = dims;
    let (mut dx, da, db) = lora_branch_backward(x, a, b, dy, dims, s);
    // the frozen part: dx += dy·W
    for i in 0..m {
        for c in 0..k {
            dx[i * k + c] += (0..n).map(|o| dy[i * n + o] * w[o * k + c]).sum::<f64>();
        }
    }
    (dx, da, db)
}
