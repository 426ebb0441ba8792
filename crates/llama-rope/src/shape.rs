//! The layout of a query or key buffer and its position ids.

use crate::cache::out_of_range;
use crate::{Result, RopeError};

/// A Q or K buffer: [batch, heads, seq, head_dim], row-major (HF's layout after the head split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkShape {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl QkShape {
    /// Number of elements (saturating: a shape too large to exist fails [`QkShape::check`]).
    pub fn len(&self) -> usize {
        [self.heads, self.seq, self.head_dim]
            .iter()
            .try_fold(self.batch, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// True when the buffer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a buffer of `len` elements, rotary width `rotary_dim`, and the position ids: one
    /// per token of the sequence (`seq`, shared by the batch) or per token of each sequence
    /// (`batch · seq`, e.g. left-padded batches), each below `table_len`.
    pub fn check(
        &self,
        len: usize,
        rotary_dim: usize,
        positions: &[u32],
        table_len: usize,
    ) -> Result<()> {
        let bad = |reason: String| {
            Err(RopeError::Shape {
                op: "apply",
                reason,
            })
        };
        if len != self.len() {
            return bad(format!(
                "buffer has {len} elements, shape {self:?} needs {}",
                self.len()
            ));
        }
        if rotary_dim > self.head_dim {
            return bad(format!(
                "rotary_dim {rotary_dim} exceeds head_dim {}",
                self.head_dim
            ));
        }
        if positions.len() != self.seq && positions.len() != self.batch.saturating_mul(self.seq) {
            return bad(format!(
                "{} position ids for batch {} × seq {}: need seq or batch · seq",
                positions.len(),
                self.batch,
                self.seq
            ));
        }
        match positions.iter().find(|&&p| p as usize >= table_len) {
            Some(&p) => Err(out_of_range(p as usize, table_len)),
            None => Ok(()),
        }
    }

    /// The position ids of sequence `b` of the batch.
    pub(crate) fn positions_of<'p>(&self, positions: &'p [u32], b: usize) -> &'p [u32] {
        if positions.len() == self.seq {
            positions
        } else {
            &positions[b * self.seq..(b + 1) * self.seq]
        }
    }
}
