//! The rotation, fast CPU path: in place on Q or K, rayon over (batch, head) slabs, the inner
//! loop over the d/2 frequency pairs written so that it vectorises.
//!
//! Rotate-half convention (HF's `rotate_half`): dimension i pairs with i + d/2, and
//!   forward:  y₁ = x₁·cos − x₂·sin,  y₂ = x₂·cos + x₁·sin
//!   backward: the transpose, i.e. the rotation by −angle:
//!             dx₁ = dy₁·cos + dy₂·sin,  dx₂ = dy₂·cos − dy₁·sin
//! Dimensions past rotary_dim pass through. Each product is rounded before the sum, as in HF's
//! `q * cos + rotate_half(q) * sin`, so this path equals [`crate::reference`] bit for bit.

use llama_core::Element;
use rayon::prelude::*;

use crate::cache::RopeTables;
use crate::shape::QkShape;
use crate::Result;

/// Below this many elements one thread is faster than the pool.
const PAR_MIN: usize = 1 << 14;

/// Rotates `x` ([batch, heads, seq, head_dim]) in place by the angles of `positions`.
pub fn apply<T: Element>(
    x: &mut [T],
    shape: QkShape,
    tables: &RopeTables,
    positions: &[u32],
) -> Result<()> {
    rotate(x, shape, tables, positions, 1.0)
}

/// The backward of [`apply`]: rotates the gradient `grad` in place by the negative angles.
pub fn apply_backward<T: Element>(
    grad: &mut [T],
    shape: QkShape,
    tables: &RopeTables,
    positions: &[u32],
) -> Result<()> {
    rotate(grad, shape, tables, positions, -1.0)
}

fn rotate<T: Element>(
    x: &mut [T],
    shape: QkShape,
    tables: &RopeTables,
    positions: &[u32],
    sign: f32,
) -> Result<()> {
    shape.check(x.len(), tables.half * 2, positions, tables.len)?;
    if x.is_empty() {
        return Ok(());
    }
    let slab = shape.seq * shape.head_dim;
    let rotate_slab = |(index, slab): (usize, &mut [T])| {
        let positions = shape.positions_of(positions, index / shape.heads);
        for (row, &p) in slab.chunks_exact_mut(shape.head_dim).zip(positions) {
            let at = p as usize * tables.half..(p as usize + 1) * tables.half;
            rotate_row(row, &tables.cos[at.clone()], &tables.sin[at], sign);
        }
    };
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(slab).enumerate().for_each(rotate_slab);
    } else {
        x.chunks_mut(slab).enumerate().for_each(rotate_slab);
    }
    Ok(())
}

/// One head-row: the d/2 pairs (x[i], x[i + d/2]). `sign` = −1 negates sin (the backward).
#[inline]
fn rotate_row<T: Element>(row: &mut [T], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    let (x1, rest) = row.split_at_mut(half);
    let x2 = &mut rest[..half];
    for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
        let s = sign * s;
        let (va, vb) = (a.to_f32(), b.to_f32());
        *a = T::from_f32(va * c - vb * s);
        *b = T::from_f32(vb * c + va * s);
    }
}
