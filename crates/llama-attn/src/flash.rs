//! Tiled attention on the CPU (FlashAttention-2's algorithm): memory O(Tq + Tk), never a
//! Tq × Tk matrix. Shapes and the mask as in [`crate::shape`].
//!
//! Forward, per query row, over key tiles of K_TILE (online softmax, Milakov & Gimelshein):
//!   m' = max(m, max_j s_j),  l' = l·e^(m − m') + Σ_j e^(s_j − m'),  o' = o·e^(m − m') + Σ_j e^(s_j − m') v_j
//! and at the end O = o / l, L = m + ln l (the logsumexp the backward recomputes P from).
//! Tasks: one per (batch, head, tile of Q_TILE queries); a single query per sequence (decoding)
//! takes a (batch, kv head) task instead, so the G query heads of a group read their keys once.
//!
//! Backward, with Dᵢ = dOᵢ · Oᵢ and P recomputed as e^(s − L), one pass, one task per (batch,
//! head) over its (key tile, query tile) blocks:
//!   dVⱼ += Σᵢ Pᵢⱼ dOᵢ,  dKⱼ += scale Σᵢ dSᵢⱼ Qᵢ,  dQᵢ += scale Σⱼ dSᵢⱼ Kⱼ
//! with dSᵢⱼ = Pᵢⱼ (dOᵢ · Vⱼ − Dᵢ). Each task owns its head's dQ rows and its own copy of the
//! kv head's dK and dV; a group's copies are then summed in head order — S computed once per
//! block, no atomics, and the same bits at any thread count.

use llama_ops::math::{add_weighted_rows, dot, dot_rows, exp, exp_shifted_sum, gemm, Operand};
use rayon::prelude::*;

use crate::error::Result;
use crate::shape::{AttnShape, Mask};

/// Query positions per forward task and per dQ task.
pub const Q_TILE: usize = 128;
/// Key positions per tile (scores of a tile stay in L1).
pub const K_TILE: usize = 256;
/// Up to this many query rows (a decode step's kv group) a tile is done with dot products and
/// axpys; the GEMM's packing costs more than it saves on so few rows.
const DIRECT_ROWS: usize = 4;

fn scale(s: &AttnShape) -> f32 {
    1.0 / (s.head_dim as f32).sqrt()
}

/// Forward: O [B, H, Tq, D] and L [B, H, Tq] (−∞ for a query that sees no key; its O is 0).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttnShape,
    mask: &Mask,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    s.check_forward("forward", q.len(), k.len(), v.len(), out.len(), lse.len())?;
    mask.check("forward", s)?;
    if s.q_len() == 0 {
        return Ok(());
    }
    let d = s.head_dim;
    let rows = Rows { q, k, v, s, mask };
    if s.seq_q == 1 {
        // Decoding: the G heads of a kv group are consecutive rows of O and of L.
        let g = s.group();
        let splits = decode_splits(s);
        if splits == 1 {
            out.par_chunks_mut(g * d)
                .zip(lse.par_chunks_mut(g))
                .enumerate()
                .for_each(|(bg, (o, l))| {
                    let (b, kv) = (bg / s.kv_heads, bg % s.kv_heads);
                    rows.attend(b, kv * g..(kv + 1) * g, 0..1, 0..s.seq_k, o, l);
                });
        } else {
            rows.decode_split(splits, out, lse);
        }
    } else {
        out.par_chunks_mut(s.seq_q * d)
            .zip(lse.par_chunks_mut(s.seq_q))
            .enumerate()
            .flat_map_iter(|(bh, (o, l))| {
                o.chunks_mut(Q_TILE * d)
                    .zip(l.chunks_mut(Q_TILE))
                    .enumerate()
                    .map(move |(t, pair)| (bh, t, pair))
            })
            .for_each(|(bh, t, (o, l))| {
                let (b, h) = (bh / s.heads, bh % s.heads);
                let first = t * Q_TILE;
                rows.attend(
                    b,
                    h..h + 1,
                    first..(first + Q_TILE).min(s.seq_q),
                    0..s.seq_k,
                    o,
                    l,
                );
            });
    }
    Ok(())
}

/// The inputs every task reads.
#[derive(Clone, Copy)]
struct Rows<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    s: &'a AttnShape,
    mask: &'a Mask<'a>,
}

impl Rows<'_> {
    /// Attention of the query rows (heads × positions) of sequence b, all in kv group
    /// heads.start / G, over the keys in `key_range` that the mask lets them see, into `out`
    /// ([heads, positions, D]) and `lse` ([heads, positions]).
    /// The rows are consecutive in Q (one head's positions, or a group's heads when Tq = 1), so
    /// each key tile is two small GEMMs: S = (scale · Q) Kᵀ and O += P V.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        b: usize,
        heads: std::ops::Range<usize>,
        positions: std::ops::Range<usize>,
        key_range: std::ops::Range<usize>,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let (s, d) = (self.s, self.s.head_dim);
        let kv = heads.start / s.group();
        let n = positions.len();
        let rows = heads.len() * n;
        let q0 = s.q_row(b, heads.start, positions.start);
        let scale = scale(s);
        let q: Vec<f32> = self.q[q0..q0 + rows * d]
            .iter()
            .map(|v| v * scale)
            .collect();
        let keys: Vec<_> = (0..rows)
            .map(|r| {
                let visible = self.mask.keys(s, b, positions.start + r % n);
                let start = visible.start.max(key_range.start);
                start..visible.end.min(key_range.end).max(start)
            })
            .collect();
        let first = keys.iter().map(|k| k.start).min().unwrap_or(0);
        let last = keys.iter().map(|k| k.end).max().unwrap_or(0);
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut scores = vec![0f32; rows * K_TILE];
        out.fill(0.0);
        for tile in (first..last).step_by(K_TILE) {
            let width = K_TILE.min(last - tile);
            let k_tile = &self.k[s.kv_row(b, kv, tile)..][..width * d];
            let v_tile = &self.v[s.kv_row(b, kv, tile)..][..width * d];
            let p = &mut scores[..rows * width];
            if rows <= DIRECT_ROWS {
                for (q_row, p_row) in q.chunks_exact(d).zip(p.chunks_exact_mut(width)) {
                    dot_rows(q_row, k_tile, p_row);
                }
            } else {
                gemm(
                    Operand::Plain(&q, rows, d),
                    Operand::Transposed(k_tile, d, width),
                    p,
                    false,
                );
            }
            for (r, row) in p.chunks_mut(width).enumerate() {
                let (lo, hi) = (
                    keys[r].start.max(tile) - tile,
                    keys[r].end.min(tile + width).saturating_sub(tile),
                );
                if lo >= hi {
                    row.fill(0.0);
                    continue;
                }
                let tile_max = row[lo..hi]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let new_max = max[r].max(tile_max);
                let rescale = exp(max[r] - new_max);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                let added = exp_shifted_sum(&mut row[lo..hi], new_max);
                if rescale != 1.0 {
                    out[r * d..(r + 1) * d]
                        .iter_mut()
                        .for_each(|v| *v *= rescale);
                }
                sum[r] = sum[r] * rescale + added;
                max[r] = new_max;
            }
            if rows <= DIRECT_ROWS {
                for (p_row, o_row) in p.chunks_exact(width).zip(out.chunks_exact_mut(d)) {
                    add_weighted_rows(p_row, v_tile, o_row);
                }
            } else {
                gemm(
                    Operand::Plain(p, rows, width),
                    Operand::Plain(v_tile, width, d),
                    out,
                    true,
                );
            }
        }
        for r in 0..rows {
            if sum[r] > 0.0 {
                out[r * d..(r + 1) * d]
                    .iter_mut()
                    .for_each(|v| *v /= sum[r]);
                lse[r] = max[r] + sum[r].ln();
            } else {
                lse[r] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Key splits for decoding: enough (sequence, kv group, split) tasks for every thread twice
/// over, each split at least one key tile (shorter splits cost more to merge than they save).
fn decode_splits(s: &AttnShape) -> usize {
    let tasks = s.batch * s.kv_heads;
    let wanted = (2 * rayon::current_num_threads()).div_ceil(tasks.max(1));
    wanted.min(s.seq_k / K_TILE).max(1)
}

impl Rows<'_> {
    /// Decoding with the keys split across tasks (flash-decoding on the CPU): each split
    /// attends to its keys, then a row's splits merge by their logsumexps:
    ///   L = log Σₛ e^(Lₛ),  O = Σₛ e^(Lₛ − L) Oₛ
    fn decode_split(&self, splits: usize, out: &mut [f32], lse: &mut [f32]) {
        let s = self.s;
        let (g, d) = (s.group(), s.head_dim);
        let split_len = s.seq_k.div_ceil(splits);
        let mut part_o = vec![0f32; out.len() * splits];
        let mut part_l = vec![0f32; lse.len() * splits];
        part_o
            .par_chunks_mut(g * d)
            .zip(part_l.par_chunks_mut(g))
            .enumerate()
            .for_each(|(task, (o, l))| {
                let (bg, split) = (task / splits, task % splits);
                let (b, kv) = (bg / s.kv_heads, bg % s.kv_heads);
                let keys = split * split_len..((split + 1) * split_len).min(s.seq_k);
                self.attend(b, kv * g..(kv + 1) * g, 0..1, keys, o, l);
            });
        out.par_chunks_mut(g * d)
            .zip(lse.par_chunks_mut(g))
            .enumerate()
            .for_each(|(bg, (o, l))| {
                for r in 0..g {
                    let part = |split: usize| (bg * splits + split) * g + r;
                    let max = (0..splits)
                        .map(|sp| part_l[part(sp)])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let row = &mut o[r * d..(r + 1) * d];
                    row.fill(0.0);
                    if max == f32::NEG_INFINITY {
                        l[r] = f32::NEG_INFINITY;
                        continue;
                    }
                    let weights: Vec<f32> =
                        (0..splits).map(|sp| exp(part_l[part(sp)] - max)).collect();
                    let total: f32 = weights.iter().sum();
                    for (sp, w) in weights.iter().enumerate() {
                        let src = &part_o[part(sp) * d..(part(sp) + 1) * d];
                        row.iter_mut()
                            .zip(src)
                            .for_each(|(o, v)| *o += w / total * v);
                    }
                    l[r] = max + total.ln();
                }
            });
    }
}

/// Backward: dQ [B, H, Tq, D], dK and dV [B, Hkv, S, D] (overwritten; positions ≥ Tk get 0)
/// from the forward's inputs, its O and L, and dO.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: &AttnShape,
    mask: &Mask,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    let buffers = [q, k, v, out, dout, &*dq, lse, &*dk, &*dv];
    s.check_backward("backward", buffers.map(<[f32]>::len))?;
    mask.check("backward", s)?;
    let d = s.head_dim;
    // Dᵢ = dOᵢ · Oᵢ
    let delta: Vec<f32> = out
        .par_chunks(d.max(1))
        .zip(dout.par_chunks(d.max(1)))
        .map(|(o, g)| dot(o, g))
        .collect();
    let grads = Grads {
        rows: Rows { q, k, v, s, mask },
        lse,
        dout,
        delta: &delta,
        scale: scale(s),
    };
    // Per head: its dQ, and its share of its kv head's dK and dV.
    let slab = s.kv_stride * d;
    let mut dk_heads = vec![0f32; s.batch * s.heads * slab];
    let mut dv_heads = vec![0f32; s.batch * s.heads * slab];
    dq.par_chunks_mut(s.seq_q * d)
        .zip(dk_heads.par_chunks_mut(slab))
        .zip(dv_heads.par_chunks_mut(slab))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| grads.head(bh / s.heads, bh % s.heads, dq, dk, dv));
    // dK, dV of (batch, kv head) = the sum over the group's heads, in head order.
    let group = s.group();
    dk.par_chunks_mut(slab)
        .zip(dv.par_chunks_mut(slab))
        .enumerate()
        .for_each(|(bg, (dk, dv))| {
            let heads = bg * group..(bg + 1) * group;
            sum_slabs(dk, &dk_heads, heads.clone(), slab);
            sum_slabs(dv, &dv_heads, heads, slab);
        });
    Ok(())
}

/// The backward's inputs, shared by the tasks.
struct Grads<'a> {
    rows: Rows<'a>,
    lse: &'a [f32],
    dout: &'a [f32],
    delta: &'a [f32],
    scale: f32,
}

impl Grads<'_> {
    /// P and scale · dS of the block of m queries i0.. of (b, h) against the keys tile..tile +
    /// width, [m, width] each: P = e^(scale · q·k − L) on each query's visible keys (0 elsewhere),
    /// dS = P ∘ (dO Vᵀ − D).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        b: usize,
        h: usize,
        i0: usize,
        m: usize,
        tile: usize,
        width: usize,
        p: &mut [f32],
        ds: &mut [f32],
    ) {
        let Rows { q, k, v, s, mask } = self.rows;
        let (d, kv) = (s.head_dim, h / s.group());
        let row0 = (b * s.heads + h) * s.seq_q + i0;
        let (qi, doi) = (&q[row0 * d..][..m * d], &self.dout[row0 * d..][..m * d]);
        let (kj, vj) = (
            &k[s.kv_row(b, kv, tile)..][..width * d],
            &v[s.kv_row(b, kv, tile)..][..width * d],
        );
        gemm(
            Operand::Plain(qi, m, d),
            Operand::Transposed(kj, d, width),
            p,
            false,
        );
        gemm(
            Operand::Plain(doi, m, d),
            Operand::Transposed(vj, d, width),
            ds,
            false,
        );
        for r in 0..m {
            let keys = mask.keys(s, b, i0 + r);
            let (lo, hi) = (
                keys.start.max(tile).min(tile + width) - tile,
                keys.end.clamp(tile, tile + width) - tile,
            );
            let (pr, dr) = (
                &mut p[r * width..(r + 1) * width],
                &mut ds[r * width..(r + 1) * width],
            );
            let (l, delta, scale) = (self.lse[row0 + r], self.delta[row0 + r], self.scale);
            for buf in [&mut *pr, &mut *dr] {
                buf[..lo].fill(0.0);
                buf[hi.max(lo)..].fill(0.0);
            }
            // Visible keys only, in one branch-free loop that vectorises.
            let visible = lo..hi.max(lo);
            for (p, d) in pr[visible.clone()].iter_mut().zip(&mut dr[visible]) {
                *p = exp(scale * *p - l);
                *d = scale * *p * (*d - delta);
            }
        }
    }

    /// One head's gradients: dQ [Tq, D] and its share of dK and dV [S, D] (overwritten), block
    /// by block over the key tiles and, causally, the query tiles that see them.
    fn head(&self, b: usize, h: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let Rows { q, k, s, mask, .. } = self.rows;
        let (d, kv) = (s.head_dim, h / s.group());
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        let mut p = vec![0f32; Q_TILE * K_TILE];
        let mut ds = vec![0f32; Q_TILE * K_TILE];
        let row0 = (b * s.heads + h) * s.seq_q * d;
        for tile in (0..s.seq_k).step_by(K_TILE) {
            let width = K_TILE.min(s.seq_k - tile);
            let keys = &k[s.kv_row(b, kv, tile)..][..width * d];
            let (dk, dv) = (
                &mut dk[tile * d..][..width * d],
                &mut dv[tile * d..][..width * d],
            );
            // Causal: queries before the tile's first key (in absolute positions) see none of it.
            let i_start = if mask.causal {
                tile.saturating_sub(s.q_offset())
            } else {
                0
            };
            for i0 in (i_start..s.seq_q).step_by(Q_TILE) {
                let m = Q_TILE.min(s.seq_q - i0);
                let (p, ds) = (&mut p[..m * width], &mut ds[..m * width]);
                self.block(b, h, i0, m, tile, width, p, ds);
                let rows = row0 + i0 * d..row0 + (i0 + m) * d;
                let (qi, doi) = (&q[rows.clone()], &self.dout[rows]);
                gemm(
                    Operand::Transposed(p, width, m),
                    Operand::Plain(doi, m, d),
                    dv,
                    true,
                );
                gemm(
                    Operand::Transposed(ds, width, m),
                    Operand::Plain(qi, m, d),
                    dk,
                    true,
                );
                let dqi = &mut dq[i0 * d..][..m * d];
                gemm(
                    Operand::Plain(ds, m, width),
                    Operand::Plain(keys, width, d),
                    dqi,
                    true,
                );
            }
        }
    }
}

/// out = Σ over `heads` of their slabs of `parts` ([_, slab] each), added in order.
fn sum_slabs(out: &mut [f32], parts: &[f32], heads: std::ops::Range<usize>, slab: usize) {
    out.fill(0.0);
    for h in heads {
        out.iter_mut()
            .zip(&parts[h * slab..][..slab])
            .for_each(|(o, v)| *o += v);
    }
}
