//! The shapes of one attention call and the mask that says which keys a query sees.
//!
//! Letters: B batch, H query heads, Hkv key/value heads (H = G · Hkv, G the group size),
//! Tq query positions, Tk key positions, D head_dim. Layouts, row-major:
//!   Q, O, dQ, dO: [B, H, Tq, D]        logsumexp L: [B, H, Tq]
//!   K, V, dK, dV: [B, Hkv, S, D]       of which positions 0..Tk are used (S = kv_stride ≥ Tk,
//!                                      so a preallocated KV cache is read in place)
//! Query i sits at absolute position Tk − Tq + i (the queries are the last Tq of the keys').

use crate::error::{shape_error, Result};

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    /// Positions allocated per (batch, kv head) in K and V; ≥ seq_k.
    pub kv_stride: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Self-attention over `seq` positions (Tq = Tk = S = seq).
    pub fn self_attention(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        seq: usize,
        head_dim: usize,
    ) -> Self {
        AttnShape {
            batch,
            heads,
            kv_heads,
            seq_q: seq,
            seq_k: seq,
            kv_stride: seq,
            head_dim,
        }
    }

    /// G = H / Hkv, the query heads that share one key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Absolute position of query 0: Tk − Tq.
    pub fn q_offset(&self) -> usize {
        self.seq_k - self.seq_q
    }

    /// Elements of Q (and O).
    pub fn q_len(&self) -> usize {
        self.batch * self.heads * self.seq_q * self.head_dim
    }

    /// Elements of K (and V), including unused stride.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.kv_stride * self.head_dim
    }

    /// Rows of Q: B · H · Tq (the length of the logsumexp buffer).
    pub fn q_rows(&self) -> usize {
        self.batch * self.heads * self.seq_q
    }

    /// Checks the sizes and the buffers' lengths.
    pub fn check(&self, op: &'static str, q: usize, k: usize, v: usize) -> Result<()> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return shape_error(
                op,
                format!(
                    "{} heads are not a multiple of {} kv heads",
                    self.heads, self.kv_heads
                ),
            );
        }
        if self.head_dim == 0 {
            return shape_error(op, "head_dim is 0");
        }
        if self.seq_q > self.seq_k || self.seq_k > self.kv_stride {
            return shape_error(
                op,
                format!(
                    "need seq_q ≤ seq_k ≤ kv_stride, got {} / {} / {}",
                    self.seq_q, self.seq_k, self.kv_stride
                ),
            );
        }
        for (what, got, want) in [
            ("q", q, self.q_len()),
            ("k", k, self.kv_len()),
            ("v", v, self.kv_len()),
        ] {
            if got != want {
                return shape_error(
                    op,
                    format!("{what} holds {got} elements, {self:?} needs {want}"),
                );
            }
        }
        Ok(())
    }

    /// Checks the forward's buffers: Q, K, V as in [`Self::check`], O like Q, L one per row.
    pub fn check_forward(
        &self,
        op: &'static str,
        q: usize,
        k: usize,
        v: usize,
        out: usize,
        lse: usize,
    ) -> Result<()> {
        self.check(op, q, k, v)?;
        if out != self.q_len() || lse != self.q_rows() {
            return shape_error(
                op,
                format!(
                    "out/lse hold {out}/{lse} values, need {}/{}",
                    self.q_len(),
                    self.q_rows()
                ),
            );
        }
        Ok(())
    }

    /// Checks a backward's buffers, `[Q, K, V, O, dO, dQ, L, dK, dV]` lengths in that order.
    pub fn check_backward(&self, op: &'static str, sizes: [usize; 9]) -> Result<()> {
        self.check(op, sizes[0], sizes[1], sizes[2])?;
        let (q, kv) = (self.q_len(), self.kv_len());
        if sizes[3..] != [q, q, q, self.q_rows(), kv, kv] {
            return shape_error(
                op,
                format!(
                    "out, dout, dq, lse, dk, dv hold {:?} values for {self:?}",
                    &sizes[3..]
                ),
            );
        }
        Ok(())
    }

    /// Offset of query row (b, h, i) in Q.
    #[inline]
    pub(crate) fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.heads + h) * self.seq_q + i) * self.head_dim
    }

    /// Offset of key row (b, kv head g, j) in K or V.
    #[inline]
    pub(crate) fn kv_row(&self, b: usize, g: usize, j: usize) -> usize {
        ((b * self.kv_heads + g) * self.kv_stride + j) * self.head_dim
    }
}

/// Which keys each query sees: keys j with start(b) ≤ j, and, when causal, j ≤ the query's
/// absolute position.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mask<'a> {
    pub causal: bool,
    /// Left padding per sequence: keys before `padding[b]` are masked (None: no padding).
    pub padding: Option<&'a [usize]>,
}

impl<'a> Mask<'a> {
    /// The causal mask without padding (Llama's training and prefill).
    pub fn causal() -> Mask<'static> {
        Mask {
            causal: true,
            padding: None,
        }
    }

    /// Checks the padding against the batch.
    pub fn check(&self, op: &'static str, shape: &AttnShape) -> Result<()> {
        match self.padding {
            Some(p) if p.len() != shape.batch => shape_error(
                op,
                format!("{} padding lengths for a batch of {}", p.len(), shape.batch),
            ),
            _ => Ok(()),
        }
    }

    /// The keys query i of sequence b sees: start..end (empty when all are masked).
    #[inline]
    pub fn keys(&self, shape: &AttnShape, b: usize, i: usize) -> std::ops::Range<usize> {
        let start = self.padding.map_or(0, |p| p[b]).min(shape.seq_k);
        let end = if self.causal {
            shape.q_offset() + i + 1
        } else {
            shape.seq_k
        };
        start..end.max(start)
    }
}
