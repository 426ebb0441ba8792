//! The reference rotation: HF's formula written out, no cache, no threads.
//!
//!   cos, sin = cat(freqs, freqs).cos() · s, … with freqs = position · inv_freq
//!   q_embed  = q · cos + rotate_half(q) · sin,  rotate_half(x) = cat(−x₂, x₁)
//!   backward: dq = dy · cos − rotate_half(dy · sin)   (rotate_halfᵀ = −rotate_half)

use crate::freqs::Frequencies;
use crate::shape::QkShape;
use crate::Result;

/// HF's full-width cos and sin rows, [positions.len(), d].
pub fn cos_sin(freqs: &Frequencies, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let d = freqs.inv_freq.len() * 2;
    let (mut cos, mut sin) = (
        vec![0.0; positions.len() * d],
        vec![0.0; positions.len() * d],
    );
    for (row, &p) in positions.iter().enumerate() {
        for j in 0..d {
            let angle = f64::from(p as f32 * freqs.inv_freq[j % (d / 2)]);
            cos[row * d + j] = angle.cos() as f32 * freqs.attention_scaling;
            sin[row * d + j] = angle.sin() as f32 * freqs.attention_scaling;
        }
    }
    (cos, sin)
}

/// y = x · cos + rotate_half(x) · sin on the first d dimensions of each head; `cos`/`sin` are
/// full-width rows indexed by position. Mismatched sizes or positions are errors.
pub fn apply(
    x: &[f32],
    shape: QkShape,
    cos: &[f32],
    sin: &[f32],
    d: usize,
    positions: &[u32],
) -> Result<Vec<f32>> {
    shape.check(x.len(), d, positions, table_rows(cos, sin, d))?;
    let mut y = x.to_vec();
    for_each_row(shape, positions, |offset, p| {
        let row = &x[offset..offset + shape.head_dim];
        for j in 0..d {
            let rotated = rotate_half(|i| row[i], j, d);
            y[offset + j] = row[j] * cos[p * d + j] + rotated * sin[p * d + j];
        }
    });
    Ok(y)
}

/// dx = dy · cos − rotate_half(dy · sin).
pub fn apply_backward(
    dy: &[f32],
    shape: QkShape,
    cos: &[f32],
    sin: &[f32],
    d: usize,
    positions: &[u32],
) -> Result<Vec<f32>> {
    shape.check(dy.len(), d, positions, table_rows(cos, sin, d))?;
    let mut dx = dy.to_vec();
    for_each_row(shape, positions, |offset, p| {
        let row = &dy[offset..offset + shape.head_dim];
        let ds = |j: usize| row[j] * sin[p * d + j];
        for j in 0..d {
            dx[offset + j] = row[j] * cos[p * d + j] - rotate_half(ds, j, d);
        }
    });
    Ok(dx)
}

/// Positions that full-width `cos`/`sin` rows of width d cover (both tables must hold them).
fn table_rows(cos: &[f32], sin: &[f32], d: usize) -> usize {
    cos.len().min(sin.len()) / d.max(1)
}

/// rotate_half(v)[j] = −v[j + d/2] for j < d/2, v[j − d/2] otherwise.
fn rotate_half(v: impl Fn(usize) -> f32, j: usize, d: usize) -> f32 {
    if j < d / 2 {
        -v(j + d / 2)
    } else {
        v(j - d / 2)
    }
}

/// Calls `f(offset of the row, its position)` for every (batch, head, token) row.
fn for_each_row(shape: QkShape, positions: &[u32], mut f: impl FnMut(usize, usize)) {
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for t in 0..shape.seq {
                let p = if positions.len() == shape.seq {
                    positions[t]
                } else {
                    positions[b * shape.seq + t]
                };
                let offset = ((b * shape.heads + h) * shape.seq + t) * shape.head_dim;
                f(offset, p as usize);
            }
        }
    }
}
