//! The reference attention: the formula with the whole score matrix, in f64 loops. Quadratic in
//! memory and slow, for tests only; shapes and the mask as in [`crate::forward`].
//!   S = scale · Q Kᵀ (masked entries −∞),  P = softmax(S) by rows,  O = P V
//! Backward, with dO given:
//!   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = scale · dS K,  dK = scale · dSᵀ Q
//! A query that sees no key gets O = 0 and no gradient.

use crate::shape::{AttnShape, Mask};

/// Softmax probabilities of query (b, h, i) over its visible keys, with their indices.
fn probabilities(
    q: &[f64],
    k: &[f64],
    s: &AttnShape,
    mask: &Mask,
    b: usize,
    h: usize,
    i: usize,
) -> Vec<(usize, f64)> {
    let d = s.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let g = h / s.group();
    let qi = &q[s.q_row(b, h, i)..][..d];
    let scores: Vec<(usize, f64)> = mask
        .keys(s, b, i)
        .map(|j| {
            let kj = &k[s.kv_row(b, g, j)..][..d];
            (
                j,
                scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>(),
            )
        })
        .collect();
    let max = scores.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = scores.iter().map(|p| (p.1 - max).exp()).sum();
    scores
        .into_iter()
        .map(|(j, sc)| (j, (sc - max).exp() / total))
        .collect()
}

/// O [B, H, Tq, D].
pub fn forward(q: &[f64], k: &[f64], v: &[f64], s: &AttnShape, mask: &Mask) -> Vec<f64> {
    let d = s.head_dim;
    let mut out = vec![0.0; s.q_len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.seq_q {
                let o = &mut out[s.q_row(b, h, i)..][..d];
                for (j, p) in probabilities(q, k, s, mask, b, h, i) {
                    let vj = &v[s.kv_row(b, h / s.group(), j)..][..d];
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                }
            }
        }
    }
    out
}

/// (dQ, dK, dV) of Σ O · dO.
pub fn backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    s: &AttnShape,
    mask: &Mask,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / s.group();
            for i in 0..s.seq_q {
                let at = s.q_row(b, h, i);
                let probs = probabilities(q, k, s, mask, b, h, i);
                let doi = &dout[at..][..d];
                let dp: Vec<f64> = probs
                    .iter()
                    .map(|&(j, _)| {
                        doi.iter()
                            .zip(&v[s.kv_row(b, g, j)..][..d])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let weighted: f64 = probs.iter().zip(&dp).map(|(p, dp)| p.1 * dp).sum();
                for (&(j, p), dp) in probs.iter().zip(&dp) {
                    let ds = p * (dp - weighted);
                    let kv = s.kv_row(b, g, j);
                    for c in 0..d {
                        dv[kv + c] += p * doi[c];
                        dq[at + c] += scale * ds * k[kv + c];
                        dk[kv + c] += scale * ds * q[at + c];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}
