//! The KV cache of one layer: post-RoPE keys and values of a batch of sequences,
//! [B, Hkv, capacity, D] each, positions 0..len filled. It is preallocated and grows by a fixed
//! increment of positions, copying once per increment rather than once per token (Unsloth grows
//! its cache the same way). Sequences of different lengths share it by left padding: sequence b
//! starts at position `padding[b]`, and attention masks the keys before that.
//!
//! [`CacheLayout`] is the bookkeeping (sizes, length, growth, padding) that the host cache here
//! and the device cache ([`crate::cuda::CudaKvCache`]) share; each owns its buffers.

use crate::error::{shape_error, AttnError, Result};
use crate::shape::{AttnShape, Mask};

/// Sizes, fill and growth policy of a KV cache.
#[derive(Clone, Debug)]
pub struct CacheLayout {
    pub(crate) batch: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) capacity: usize,
    increment: usize,
    max_len: usize,
    pub(crate) len: usize,
    padding: Option<Vec<usize>>,
    grows: usize,
}

impl CacheLayout {
    /// An empty layout: `capacity` positions to start, growing by `increment` up to `max_len`.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        increment: usize,
        max_len: usize,
    ) -> Result<Self> {
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
        Ok(CacheLayout {
            batch,
            kv_heads,
            head_dim,
            capacity,
            increment,
            max_len,
            len: 0,
            padding: None,
            grows: 0,
        })
    }

    /// Elements of K (or V) for a capacity.
    pub(crate) fn elements(&self, capacity: usize) -> usize {
        self.batch * self.kv_heads * capacity * self.head_dim
    }

    /// Checks an append of `tokens` positions whose K and V hold `k_len` and `v_len` values;
    /// returns the capacity to grow to first, if the cache must grow.
    pub(crate) fn plan_append(
        &self,
        tokens: usize,
        k_len: usize,
        v_len: usize,
    ) -> Result<Option<usize>> {
        let expected = self.batch * self.kv_heads * tokens * self.head_dim;
        if k_len != expected || v_len != expected {
            return shape_error(
                "KvCache::append",
                format!("k/v hold {k_len}/{v_len} values, {tokens} tokens need {expected}"),
            );
        }
        let needed = self.len + tokens;
        if needed > self.max_len {
            return Err(AttnError::Cache(format!(
                "{} positions held + {tokens} new exceed the context of {}",
                self.len, self.max_len
            )));
        }
        Ok((needed > self.capacity)
            .then(|| (needed.div_ceil(self.increment) * self.increment).min(self.max_len)))
    }

    /// Records a growth to `capacity`.
    pub(crate) fn grown(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.grows += 1;
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

/// Keys and values of one layer in host memory.
#[derive(Clone, Debug)]
pub struct KvCache {
    layout: CacheLayout,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl std::ops::Deref for KvCache {
    type Target = CacheLayout;
    fn deref(&self) -> &CacheLayout {
        &self.layout
    }
}

impl std::ops::DerefMut for KvCache {
    fn deref_mut(&mut self) -> &mut CacheLayout {
        &mut self.layout
    }
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
        let layout = CacheLayout::new(batch, kv_heads, head_dim, capacity, increment, max_len)?;
        let size = layout.elements(capacity);
        Ok(KvCache {
            layout,
            k: vec![0.0; size],
            v: vec![0.0; size],
        })
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

    /// Appends `tokens` positions: k_new and v_new are [B, Hkv, tokens, D].
    pub fn append(&mut self, k_new: &[f32], v_new: &[f32], tokens: usize) -> Result<()> {
        if let Some(capacity) = self.layout.plan_append(tokens, k_new.len(), v_new.len())? {
            self.k = copy_slabs(&self.layout, &self.k, capacity);
            self.v = copy_slabs(&self.layout, &self.v, capacity);
            self.layout.grown(capacity);
        }
        let (d, len, cap) = (self.layout.head_dim, self.layout.len, self.layout.capacity);
        for slab in 0..self.layout.batch * self.layout.kv_heads {
            let dst = (slab * cap + len) * d;
            let src = slab * tokens * d;
            self.k[dst..dst + tokens * d].copy_from_slice(&k_new[src..src + tokens * d]);
            self.v[dst..dst + tokens * d].copy_from_slice(&v_new[src..src + tokens * d]);
        }
        self.layout.len += tokens;
        Ok(())
    }
}

/// The filled positions of every slab, moved into a buffer of `capacity` positions per slab.
fn copy_slabs(layout: &CacheLayout, old: &[f32], capacity: usize) -> Vec<f32> {
    let (d, len) = (layout.head_dim, layout.len);
    let mut new = vec![0.0; layout.elements(capacity)];
    for slab in 0..layout.batch * layout.kv_heads {
        let (from, to) = (slab * layout.capacity * d, slab * capacity * d);
        new[to..to + len * d].copy_from_slice(&old[from..from + len * d]);
    }
    new
}
