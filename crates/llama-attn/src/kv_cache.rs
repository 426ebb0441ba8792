//! The KV cache of one layer: post-RoPE keys and values of a batch of sequences,
//! [B, Hkv, capacity, D] each, positions 0..len filled. It is preallocated and grows by a fixed
//! increment of positions, copying once per increment rather than once per token (Unsloth grows
//! its cache the same way). Sequences of different lengths share it by left padding: sequence b
//! starts at position `padding[b]`, and attention masks the keys before that.

use crate::error::{shape_error, AttnError, Result};
use crate::shape::{AttnShape, Mask};

/// Keys and values of one layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    increment: usize,
    max_len: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    padding: Option<Vec<usize>>,
    grows: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions, growing by `increment` positions up
    /// to `max_len` (the model's context).
    pub fn new(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        increment: usize,
        max_len: usize,
    ) -> Result<KvCache> {
        for (field, value) in [
            ("batch", batch),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("increment", increment),
        ] {
            if value == 0 {
                return Err(AttnError::Config {
                    field,
                    value: "0".into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        if capacity > max_len {
            return Err(AttnError::Cache(format!(
                "capacity {capacity} exceeds the maximum length {max_len}"
            )));
        }
        let size = batch * kv_heads * capacity * head_dim;
        Ok(KvCache {
            batch,
            kv_heads,
            head_dim,
            capacity,
            increment,
            max_len,
            len: 0,
            k: vec![0.0; size],
            v: vec![0.0; size],
            padding: None,
            grows: 0,
        })
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many times the cache has grown (each growth copies it once).
    pub fn grows(&self) -> usize {
        self.grows
    }

    /// Bytes held by keys and values.
    pub fn memory_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Keys, [B, Hkv, capacity, D].
    pub fn keys(&self) -> &[f32] {
        &self.k
    }

    /// Values, [B, Hkv, capacity, D].
    pub fn values(&self) -> &[f32] {
        &self.v
    }

    /// Left padding per sequence (None: all sequences start at position 0).
    pub fn padding(&self) -> Option<&[usize]> {
        self.padding.as_deref()
    }

    /// Sets the left padding of each sequence (before the first append).
    pub fn set_padding(&mut self, padding: Vec<usize>) -> Result<()> {
        if padding.len() != self.batch {
            return shape_error(
                "KvCache::set_padding",
                format!("{} lengths for a batch of {}", padding.len(), self.batch),
            );
        }
        self.padding = Some(padding);
        Ok(())
    }

    /// Appends `tokens` positions: k_new and v_new are [B, Hkv, tokens, D].
    pub fn append(&mut self, k_new: &[f32], v_new: &[f32], tokens: usize) -> Result<()> {
        let expected = self.batch * self.kv_heads * tokens * self.head_dim;
        if k_new.len() != expected || v_new.len() != expected {
            return shape_error(
                "KvCache::append",
                format!(
                    "k/v hold {}/{} values, {tokens} tokens need {expected}",
                    k_new.len(),
                    v_new.len()
                ),
            );
        }
        let needed = self.len + tokens;
        if needed > self.max_len {
            return Err(AttnError::Cache(format!(
                "{} positions held + {tokens} new exceed the context of {}",
                self.len, self.max_len
            )));
        }
        if needed > self.capacity {
            self.grow(needed.div_ceil(self.increment) * self.increment);
        }
        let d = self.head_dim;
        for slab in 0..self.batch * self.kv_heads {
            let dst = (slab * self.capacity + self.len) * d;
            let src = slab * tokens * d;
            self.k[dst..dst + tokens * d].copy_from_slice(&k_new[src..src + tokens * d]);
            self.v[dst..dst + tokens * d].copy_from_slice(&v_new[src..src + tokens * d]);
        }
        self.len = needed;
        Ok(())
    }

    /// Reallocates for `capacity` positions (≤ max_len), copying what is held.
    fn grow(&mut self, capacity: usize) {
        let capacity = capacity.min(self.max_len);
        let d = self.head_dim;
        let copy = |old: &[f32]| {
            let mut new = vec![0.0; self.batch * self.kv_heads * capacity * d];
            for slab in 0..self.batch * self.kv_heads {
                let (from, to) = (slab * self.capacity * d, slab * capacity * d);
                new[to..to + self.len * d].copy_from_slice(&old[from..from + self.len * d]);
            }
            new
        };
        self.k = copy(&self.k);
        self.v = copy(&self.v);
        self.capacity = capacity;
        self.grows += 1;
    }

    /// Forgets positions from `len` on (keeps the memory).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Empties the cache and clears the padding (keeps the memory).
    pub fn reset(&mut self) {
        self.len = 0;
        self.padding = None;
    }

    /// The attention shape of `seq_q` new queries of `heads` heads against the cache.
    pub fn shape(&self, heads: usize, seq_q: usize) -> AttnShape {
        AttnShape {
            batch: self.batch,
            heads,
            kv_heads: self.kv_heads,
            seq_q,
            seq_k: self.len,
            kv_stride: self.capacity,
            head_dim: self.head_dim,
        }
    }

    /// The causal mask with this cache's padding.
    pub fn mask(&self) -> Mask<'_> {
        Mask {
            causal: true,
            padding: self.padding.as_deref(),
        }
    }
}
