//! The LoRA product and its gradients as plain f64 loops: the spec that the fast path is
//! tested against.

/// y [M, N] = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with x [M, K], W [N, K], A [r, K], B [N, r].
pub fn lora_forward(
    x: &[f64],
    w: &[f64],
    a: &[f64],
    b: &[f64],
    dims: (usize, usize, usize, usize),
    s: f64,
) -> Vec<f64> {
    let (m, k, n, r) = dims;
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        let xa: Vec<f64> = (0..r)
            .map(|j| (0..k).map(|c| x[i * k + c] * a[j * k + c]).sum())
            .collect();
        for o in 0..n {
            let base: f64 = (0..k).map(|c| x[i * k + c] * w[o * k + c]).sum();
            let delta: f64 = (0..r).map(|j| xa[j] * b[o * r + j]).sum();
            y[i * n + o] = base + s * delta;
        }
    }
    y
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
    let (m, k, n, r) = dims;
    let (mut dx, mut da, mut db) = (vec![0.0; m * k], vec![0.0; r * k], vec![0.0; n * r]);
    for i in 0..m {
        let xa: Vec<f64> = (0..r)
            .map(|j| (0..k).map(|c| x[i * k + c] * a[j * k + c]).sum())
            .collect();
        // g_j = Σ_o dy_o B_oj
        let g: Vec<f64> = (0..r)
            .map(|j| (0..n).map(|o| dy[i * n + o] * b[o * r + j]).sum())
            .collect();
        for c in 0..k {
            let frozen: f64 = (0..n).map(|o| dy[i * n + o] * w[o * k + c]).sum();
            let lora: f64 = (0..r).map(|j| g[j] * a[j * k + c]).sum();
            dx[i * k + c] = frozen + s * lora;
            for j in 0..r {
                da[j * k + c] += s * g[j] * x[i * k + c];
            }
        }
        for o in 0..n {
            for j in 0..r {
                db[o * r + j] += s * dy[i * n + o] * xa[j];
            }
        }
    }
    (dx, da, db)
}
