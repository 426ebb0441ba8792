//! The Llama attention layer (HF `LlamaAttention`), forward and backward side by side.
//! Letters: B batch, T positions, C hidden size, H / Hkv heads, D head_dim.
//!
//!   forward:  q = x Wqᵀ, k = x Wkᵀ, v = x Wvᵀ      x [B, T, C] → [B, T, H·D], [B, T, Hkv·D]
//!             split heads → [B, H, T, D]; RoPE on q, k
//!             a = attention(q, k, v)               [B, H, T, D]
//!             out = merge(a) Woᵀ                   [B, T, C]
//!   backward: dWo = doutᵀ merge(a), da = split(dout Wo)
//!             dq, dk, dv = attention backward; RoPE backward on dq, dk; merge
//!             dWq = dqᵀ x (likewise k, v), dx = dq Wq + dk Wk + dv Wv
//!   decode:   the same forward for the new positions, with k, v appended to a [`KvCache`]
//!             and attention over all its positions.

use llama_core::Kernel;
use llama_ops::{linear_backward_weight, Activations, Weight};
use llama_rope::{
    apply, apply_backward, reference as rope_ref, QkShape, RopeConfig, RotaryEmbedding,
};
use serde_json::Value;

use crate::error::{shape_error, AttnError, Result};
use crate::flash;
use crate::kv_cache::KvCache;
use crate::reference;
use crate::shape::{AttnShape, Mask};

/// The sizes of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionConfig {
    /// Checks that the heads fit together.
    pub fn new(
        hidden_size: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let bad = |field, value: usize, reason: &str| {
            Err(AttnError::Config {
                field,
                value: value.to_string(),
                reason: reason.into(),
            })
        };
        for (field, value) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_heads),
            ("head_dim", head_dim),
        ] {
            if value == 0 {
                return bad(field, value, "must be at least 1");
            }
        }
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return bad(
                "num_key_value_heads",
                num_kv_heads,
                &format!("must divide num_attention_heads = {num_heads}"),
            );
        }
        Ok(AttentionConfig {
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// From an HF `config.json` (head_dim defaults to hidden_size / num_attention_heads,
    /// num_key_value_heads to num_attention_heads).
    pub fn from_hf_config(config: &Value) -> Result<Self> {
        let get = |key: &'static str| -> Result<Option<usize>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|v| Some(v as usize))
                    .ok_or_else(|| AttnError::Config {
                        field: key,
                        value: v.to_string(),
                        reason: "must be a non-negative integer".into(),
                    }),
            }
        };
        let need = |key: &'static str| -> Result<usize> {
            get(key)?.ok_or_else(|| AttnError::Config {
                field: key,
                value: "missing".into(),
                reason: "config.json lacks it".into(),
            })
        };
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let kv_heads = get("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = get("head_dim")?.unwrap_or(hidden / heads.max(1));
        AttentionConfig::new(hidden, heads, kv_heads, head_dim)
    }

    /// T, the positions per sequence of an input x [B, T, C] of `len` values, or a shape error.
    pub(crate) fn positions_in(&self, op: &'static str, len: usize, batch: usize) -> Result<usize> {
        let row = self.hidden_size * batch;
        if batch == 0 || !len.is_multiple_of(row) {
            return shape_error(
                op,
                format!(
                    "x holds {len} values, not [batch {batch}, T, hidden {}]",
                    self.hidden_size
                ),
            );
        }
        Ok(len / row)
    }

    fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// One attention layer: HF's weights ([out, in], dense or quantised), activations in f32, and
/// the rotary embedding.
pub struct LlamaAttention {
    pub config: AttentionConfig,
    pub q_proj: Weight,
    pub k_proj: Weight,
    pub v_proj: Weight,
    pub o_proj: Weight,
    /// How activations enter the projections (8-bit for the `fast` decode path).
    pub activations: Activations,
    /// The implementation of the attention itself (llama-patch's choice): flash tiles, or
    /// the whole score matrix in f64.
    pub kernel: Kernel,
    /// The implementation of RoPE: cached tables, or HF's formula from the frequencies.
    pub rope_kernel: Kernel,
    rope: RotaryEmbedding,
}

/// What [`LlamaAttention::attend`] keeps for [`LlamaAttention::attend_backward`]: the rotated
/// q, k and v, the attention output and its logsumexp.
pub struct AttendSaved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    positions: Vec<u32>,
    padding: Option<Vec<usize>>,
    batch: usize,
    seq: usize,
}

/// What the forward keeps for the backward.
pub struct Saved {
    x: Vec<f32>,
    merged: Vec<f32>,
    core: AttendSaved,
}

/// Weight gradients of one backward, [out, in] like the weights.
#[derive(Clone, Debug)]
pub struct AttentionGrads {
    pub q_proj: Vec<f32>,
    pub k_proj: Vec<f32>,
    pub v_proj: Vec<f32>,
    pub o_proj: Vec<f32>,
}

/// Swaps the T and heads axes of [B, T, heads, D] (split: `to_heads` true, giving
/// [B, heads, T, D]) or of [B, heads, T, D] (merge: `to_heads` false).
fn swap_axes(
    x: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
    to_heads: bool,
) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for b in 0..batch {
        for t in 0..seq {
            for h in 0..heads {
                let token_major = ((b * seq + t) * heads + h) * d;
                let head_major = ((b * heads + h) * seq + t) * d;
                let (src, dst) = if to_heads {
                    (token_major, head_major)
                } else {
                    (head_major, token_major)
                };
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The length of the RoPE table that covers `positions`.
fn table_len(positions: &[u32]) -> usize {
    positions.iter().max().map_or(0, |&p| p as usize + 1)
}

/// [B, T, heads·D] → [B, heads, T, D].
fn split_heads(y: &[f32], batch: usize, seq: usize, heads: usize, d: usize) -> Vec<f32> {
    swap_axes(y, batch, seq, heads, d, true)
}

/// [B, heads, T, D] → [B, T, heads·D].
fn merge_heads(a: &[f32], batch: usize, seq: usize, heads: usize, d: usize) -> Vec<f32> {
    swap_axes(a, batch, seq, heads, d, false)
}

impl LlamaAttention {
    /// A layer from its four f32 weights (HF's [out, in] layout) and RoPE settings.
    pub fn new(
        config: AttentionConfig,
        q_proj: Vec<f32>,
        k_proj: Vec<f32>,
        v_proj: Vec<f32>,
        o_proj: Vec<f32>,
        rope: RopeConfig,
    ) -> Result<LlamaAttention> {
        let (c, q, kv) = (config.hidden_size, config.q_width(), config.kv_width());
        let dense = |w: Vec<f32>, rows: usize, cols: usize| Weight::dense(w, rows, cols);
        LlamaAttention::with_weights(
            config,
            [
                dense(q_proj, q, c)?,
                dense(k_proj, kv, c)?,
                dense(v_proj, kv, c)?,
                dense(o_proj, c, q)?,
            ],
            rope,
        )
    }

    /// A layer from its weights `[q_proj, k_proj, v_proj, o_proj]`, each dense or quantised.
    pub fn with_weights(
        config: AttentionConfig,
        weights: [Weight; 4],
        rope: RopeConfig,
    ) -> Result<LlamaAttention> {
        let (c, q, kv) = (config.hidden_size, config.q_width(), config.kv_width());
        let names = ["q_proj", "k_proj", "v_proj", "o_proj"];
        let shapes = [(q, c), (kv, c), (kv, c), (c, q)];
        for ((name, w), shape) in names.iter().zip(&weights).zip(shapes) {
            if w.shape() != shape {
                return shape_error(
                    "LlamaAttention::with_weights",
                    format!("{name} is {:?}, {config:?} needs {shape:?}", w.shape()),
                );
            }
        }
        let [q_proj, k_proj, v_proj, o_proj] = weights;
        Ok(LlamaAttention {
            config,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            activations: Activations::F32,
            kernel: Kernel::Fast,
            rope_kernel: Kernel::Fast,
            rope: RotaryEmbedding::new(rope),
        })
    }

    /// The projections q, k, v [B·T, H·D], [B·T, Hkv·D] × 2 of x [B, T, C].
    pub fn project_qkv(&self, x: &[f32]) -> Result<[Vec<f32>; 3]> {
        let cfg = self.config;
        let rows = x.len() / cfg.hidden_size;
        let (mut q, mut k, mut v) = (
            vec![0.0; rows * cfg.q_width()],
            vec![0.0; rows * cfg.kv_width()],
            vec![0.0; rows * cfg.kv_width()],
        );
        Weight::forward_group(
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            x,
            vec![&mut q, &mut k, &mut v],
            self.activations,
        )?;
        Ok([q, k, v])
    }

    /// Projected q, k, v ([B·T, heads·D] each) split into heads and rotated:
    /// [B, H, T, D], [B, Hkv, T, D] × 2.
    fn rotate(
        &mut self,
        [q, k, v]: [&[f32]; 3],
        batch: usize,
        positions: &[u32],
    ) -> Result<[Vec<f32>; 3]> {
        let cfg = self.config;
        let d = cfg.head_dim;
        let seq = self.rows_in("rotate", q.len(), cfg.q_width(), batch)?;
        for (what, got) in [("k", k.len()), ("v", v.len())] {
            if got != batch * seq * cfg.kv_width() {
                return shape_error(
                    "rotate",
                    format!(
                        "{what} holds {got} values, not {batch}·{seq} rows of {}",
                        cfg.kv_width()
                    ),
                );
            }
        }
        let (mut q, mut k, v) = (
            split_heads(q, batch, seq, cfg.num_heads, d),
            split_heads(k, batch, seq, cfg.num_kv_heads, d),
            split_heads(v, batch, seq, cfg.num_kv_heads, d),
        );
        let [q_shape, k_shape] = self.qk_shapes(batch, seq);
        self.rope_apply(&mut q, q_shape, positions, false)?;
        self.rope_apply(&mut k, k_shape, positions, false)?;
        Ok([q, k, v])
    }

    /// Rotates x [B, heads, T, D] in place by the angles of `positions` (by their negatives,
    /// the transpose, when `backward`), with the kernel's implementation.
    fn rope_apply(
        &mut self,
        x: &mut Vec<f32>,
        shape: QkShape,
        positions: &[u32],
        backward: bool,
    ) -> Result<()> {
        let tables = self.rope.tables(table_len(positions))?;
        match (self.rope_kernel, backward) {
            (Kernel::Fast, false) => apply(x, shape, &tables, positions)?,
            (Kernel::Fast, true) => apply_backward(x, shape, &tables, positions)?,
            (Kernel::Reference, _) => {
                let len = tables.len;
                let every: Vec<usize> = (0..len).collect();
                let (cos, sin) = rope_ref::cos_sin(self.rope.frequencies(), &every);
                let d = self.rope.config().rotary_dim;
                let rotate = if backward {
                    rope_ref::apply_backward
                } else {
                    rope_ref::apply
                };
                *x = rotate(x, shape, &cos, &sin, d, positions)?;
            }
        }
        Ok(())
    }

    /// o [B, H, Tq, D] and its logsumexp of attention over k, v, with the kernel's
    /// implementation (the reference leaves the logsumexp at 0: its backward recomputes).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: &AttnShape,
        mask: &Mask,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        match self.kernel {
            Kernel::Fast => flash::forward(q, k, v, shape, mask, out, lse),
            Kernel::Reference => {
                let op = "reference attention";
                shape.check_forward(op, q.len(), k.len(), v.len(), out.len(), lse.len())?;
                mask.check(op, shape)?;
                let o = reference::forward(&wide(q), &wide(k), &wide(v), shape, mask);
                out.iter_mut().zip(o).for_each(|(a, b)| *a = b as f32);
                Ok(())
            }
        }
    }

    /// The shapes of q and of k ([B, heads, T, D]) for RoPE.
    fn qk_shapes(&self, batch: usize, seq: usize) -> [QkShape; 2] {
        let cfg = self.config;
        [cfg.num_heads, cfg.num_kv_heads].map(|heads| QkShape {
            batch,
            heads,
            seq,
            head_dim: cfg.head_dim,
        })
    }

    /// T for `len` values of [B, T, width].
    fn rows_in(&self, op: &'static str, len: usize, width: usize, batch: usize) -> Result<usize> {
        if batch == 0 || len == 0 || !len.is_multiple_of(batch * width) {
            return shape_error(
                op,
                format!("{len} values are not {batch} sequences of rows of {width}"),
            );
        }
        Ok(len / (batch * width))
    }

    /// The attention between the projections: q, k, v [B·T, heads·D] (as [`Self::project_qkv`]
    /// gives them) at `positions` (T ids, or B·T for left-padded batches), causal, keys before
    /// `padding[b]` masked → the merged heads [B·T, H·D] that o_proj reads, and what
    /// [`Self::attend_backward`] needs.
    pub fn attend(
        &mut self,
        qkv: [&[f32]; 3],
        batch: usize,
        positions: &[u32],
        padding: Option<&[usize]>,
    ) -> Result<(Vec<f32>, AttendSaved)> {
        let cfg = self.config;
        let [q, k, v] = self.rotate(qkv, batch, positions)?;
        let seq = q.len() / (batch * cfg.q_width());
        let shape =
            AttnShape::self_attention(batch, cfg.num_heads, cfg.num_kv_heads, seq, cfg.head_dim);
        let mask = Mask {
            causal: true,
            padding,
        };
        let mut attn = vec![0.0; shape.q_len()];
        let mut lse = vec![0.0; shape.q_rows()];
        self.attention(&q, &k, &v, &shape, &mask, &mut attn, &mut lse)?;
        let merged = merge_heads(&attn, batch, seq, cfg.num_heads, cfg.head_dim);
        let saved = AttendSaved {
            q,
            k,
            v,
            attn,
            lse,
            positions: positions.to_vec(),
            padding: padding.map(<[usize]>::to_vec),
            batch,
            seq,
        };
        Ok((merged, saved))
    }

    /// Backward of [`Self::attend`]: d_merged [B·T, H·D] → dq, dk, dv [B·T, heads·D] (the
    /// gradients of the projections' outputs).
    pub fn attend_backward(
        &mut self,
        saved: &AttendSaved,
        d_merged: &[f32],
    ) -> Result<[Vec<f32>; 3]> {
        let cfg = self.config;
        let (batch, seq, d) = (saved.batch, saved.seq, cfg.head_dim);
        if d_merged.len() != saved.attn.len() {
            return shape_error(
                "attend_backward",
                format!(
                    "d_merged holds {} values, the forward gave {}",
                    d_merged.len(),
                    saved.attn.len()
                ),
            );
        }
        let shape = AttnShape::self_attention(batch, cfg.num_heads, cfg.num_kv_heads, seq, d);
        let mask = Mask {
            causal: true,
            padding: saved.padding.as_deref(),
        };
        let d_attn = split_heads(d_merged, batch, seq, cfg.num_heads, d);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; saved.q.len()],
            vec![0.0; saved.k.len()],
            vec![0.0; saved.v.len()],
        );
        match self.kernel {
            Kernel::Fast => flash::backward(
                &saved.q,
                &saved.k,
                &saved.v,
                &saved.attn,
                &saved.lse,
                &d_attn,
                &shape,
                &mask,
                &mut dq,
                &mut dk,
                &mut dv,
            )?,
            Kernel::Reference => {
                let [q, k, v, d_attn] = [&saved.q, &saved.k, &saved.v, &d_attn].map(|x| wide(x));
                let grads = reference::backward(&q, &k, &v, &d_attn, &shape, &mask);
                for (out, g) in [(&mut dq, grads.0), (&mut dk, grads.1), (&mut dv, grads.2)] {
                    out.iter_mut().zip(g).for_each(|(a, b)| *a = b as f32);
                }
            }
        }
        // q and k were rotated after the projection: rotate their gradients back.
        let [q_shape, k_shape] = self.qk_shapes(batch, seq);
        self.rope_apply(&mut dq, q_shape, &saved.positions, true)?;
        self.rope_apply(&mut dk, k_shape, &saved.positions, true)?;
        Ok([
            merge_heads(&dq, batch, seq, cfg.num_heads, d),
            merge_heads(&dk, batch, seq, cfg.num_kv_heads, d),
            merge_heads(&dv, batch, seq, cfg.num_kv_heads, d),
        ])
    }

    /// Prefill or decode against a cache with projected q, k, v [B·T, heads·D]: the keys and
    /// values are appended to `cache` and the queries attend to everything it holds → the
    /// merged heads [B·T, H·D].
    pub fn attend_cached(
        &mut self,
        qkv: [&[f32]; 3],
        batch: usize,
        positions: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let cfg = self.config;
        let [q, k, v] = self.rotate(qkv, batch, positions)?;
        let seq = q.len() / (batch * cfg.q_width());
        cache.append(&k, &v, seq)?;
        let shape = cache.shape(cfg.num_heads, seq);
        let mut attn = vec![0.0; shape.q_len()];
        let mut lse = vec![0.0; shape.q_rows()];
        self.attention(
            &q,
            cache.keys(),
            cache.values(),
            &shape,
            &cache.mask(),
            &mut attn,
            &mut lse,
        )?;
        Ok(merge_heads(&attn, batch, seq, cfg.num_heads, cfg.head_dim))
    }

    /// out [B·T, C] = merged Woᵀ.
    fn output(&self, merged: &[f32]) -> Result<Vec<f32>> {
        let rows = merged.len() / self.config.q_width();
        let mut out = vec![0.0; rows * self.config.hidden_size];
        self.o_proj
            .forward_with(merged, &mut out, self.activations)?;
        Ok(out)
    }

    /// Training/prefill forward: x [B, T, C] at `positions` (T ids, or B·T for left-padded
    /// batches), causal, keys before `padding[b]` masked. Returns out [B, T, C] and what the
    /// backward needs.
    pub fn forward(
        &mut self,
        x: &[f32],
        batch: usize,
        positions: &[u32],
        padding: Option<&[usize]>,
    ) -> Result<(Vec<f32>, Saved)> {
        self.config.positions_in("forward", x.len(), batch)?;
        let [q, k, v] = self.project_qkv(x)?;
        let (merged, core) = self.attend([&q, &k, &v], batch, positions, padding)?;
        let out = self.output(&merged)?;
        let saved = Saved {
            x: x.to_vec(),
            merged,
            core,
        };
        Ok((out, saved))
    }

    /// Backward of [`Self::forward`] for upstream dout [B, T, C]: dx [B, T, C] and the weight
    /// gradients.
    pub fn backward(&mut self, saved: &Saved, dout: &[f32]) -> Result<(Vec<f32>, AttentionGrads)> {
        let cfg = self.config;
        let c = cfg.hidden_size;
        if dout.len() != saved.x.len() {
            return shape_error(
                "backward",
                format!("dout holds {} values, x held {}", dout.len(), saved.x.len()),
            );
        }
        // out = merged Woᵀ
        let mut o_grad = vec![0.0; c * cfg.q_width()];
        linear_backward_weight(dout, &saved.merged, cfg.q_width(), &mut o_grad)?;
        let mut d_merged = vec![0.0; saved.merged.len()];
        self.o_proj.backward_input(dout, &mut d_merged)?;
        let [dq, dk, dv] = self.attend_backward(&saved.core, &d_merged)?;
        // q = x Wqᵀ (likewise k, v): dW = dqᵀ x, dx = Σ dq Wq
        let mut dx = vec![0.0; saved.x.len()];
        let mut grads = AttentionGrads {
            q_proj: vec![0.0; cfg.q_width() * c],
            k_proj: vec![0.0; cfg.kv_width() * c],
            v_proj: vec![0.0; cfg.kv_width() * c],
            o_proj: o_grad,
        };
        let mut part = vec![0.0; dx.len()];
        for (g, w, grad) in [
            (dq, &self.q_proj, &mut grads.q_proj),
            (dk, &self.k_proj, &mut grads.k_proj),
            (dv, &self.v_proj, &mut grads.v_proj),
        ] {
            linear_backward_weight(&g, &saved.x, c, grad)?;
            w.backward_input(&g, &mut part)?;
            dx.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        Ok((dx, grads))
    }

    /// Prefill or decode against a cache: x [B, T, C] are the next T positions of each
    /// sequence (`positions`: T ids, or B·T with left padding); their keys and values are
    /// appended to `cache` and they attend to everything it holds. T = 1 is one decode step.
    pub fn forward_cached(
        &mut self,
        x: &[f32],
        batch: usize,
        positions: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        self.config.positions_in("forward_cached", x.len(), batch)?;
        let [q, k, v] = self.project_qkv(x)?;
        let merged = self.attend_cached([&q, &k, &v], batch, positions, cache)?;
        self.output(&merged)
    }

    /// The rotary embedding's settings.
    pub fn rope_config(&self) -> &RopeConfig {
        self.rope.config()
    }

    /// Rotates by `rope` from now on (e.g. linear scaling for a longer context); the cached
    /// tables are dropped.
    pub fn set_rope(&mut self, rope: RopeConfig) {
        self.rope = RotaryEmbedding::new(rope);
    }

    /// A cache sized for this layer: `capacity` positions to start, growing by `increment`.
    pub fn new_cache(
        &self,
        batch: usize,
        capacity: usize,
        increment: usize,
        max_len: usize,
    ) -> Result<KvCache> {
        KvCache::new(
            batch,
            self.config.num_kv_heads,
            self.config.head_dim,
            capacity,
            increment,
            max_len,
        )
    }
}
