//! The attention layer on a CUDA device, for prefill and decoding against a [`CudaKvCache`]:
//! the forward of [`crate::LlamaAttention::forward_cached`] with cuBLAS projections
//! (llama-ops), the RoPE kernel (llama-rope) and the attention kernels, in f32 or bf16.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use llama_core::cuda::CudaDevice;
use llama_ops::cuda::{linear, CudaElement};
use llama_ops::Weight;
use llama_rope::cuda::{apply, apply_moving, DeviceTables, RopeElement};
use llama_rope::{QkShape, RopeConfig, RotaryEmbedding};

use crate::cuda::{
    backward_gemm, backward_tc, forward, tensor_core_backward, AttnOutput, CudaKvCache, ATTENTION,
    GEMM_BACKWARD_SCORES,
};
use crate::error::{shape_error, Result};
use crate::layer::{AttentionConfig, LlamaAttention};
use crate::shape::{AttnShape, Mask};

/// A [`LlamaAttention`] whose weights live on a device, in T.
pub struct CudaLlamaAttention<T: CudaElement + RopeElement> {
    pub config: AttentionConfig,
    device: Arc<CudaDevice>,
    q_proj: CudaSlice<T>,
    k_proj: CudaSlice<T>,
    v_proj: CudaSlice<T>,
    o_proj: CudaSlice<T>,
    rope: RotaryEmbedding,
    /// The cos/sin tables on the device, with the rope generation and length they cover.
    tables: Option<(u64, usize, DeviceTables)>,
    /// The intermediates of the last call, reused while the token count stays the same (as it
    /// does from one decode step to the next), so that a step allocates only its output.
    scratch: Option<Scratch<T>>,
}

/// What [`CudaLlamaAttention::attend`] keeps for the backward: rotated q, k, v in heads and
/// the attention's log-sum-exp (its output is the merged heads the caller keeps).
pub struct CudaAttendSaved<T: CudaElement> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    lse: CudaSlice<f32>,
    positions: Vec<u32>,
    batch: usize,
    seq: usize,
}

/// The device buffers of a [`CudaAttendSaved`], as gradient checkpointing parks them off the
/// device between the forward and the backward: q, k, v rotated in heads ([B, H, T, D],
/// [B, Hkv, T, D] × 2) and the log-sum-exp per query row [B, H, T].
pub struct AttendBuffers<T: CudaElement> {
    pub q: CudaSlice<T>,
    pub k: CudaSlice<T>,
    pub v: CudaSlice<T>,
    pub lse: CudaSlice<f32>,
}

impl<T: CudaElement> CudaAttendSaved<T> {
    /// Its buffers, for [`CudaLlamaAttention::attend_saved`] to take back.
    pub fn into_buffers(self) -> AttendBuffers<T> {
        AttendBuffers {
            q: self.q,
            k: self.k,
            v: self.v,
            lse: self.lse,
        }
    }
}

/// The intermediate buffers of one [`CudaLlamaAttention::forward_cached`] over `tokens` = B·T.
struct Scratch<T: CudaElement> {
    tokens: usize,
    /// The q projection [B, T, H·D]; reused for the merged attention output before o_proj.
    q_lin: CudaSlice<T>,
    k_lin: CudaSlice<T>,
    v_lin: CudaSlice<T>,
    /// q, k, v split into heads: [B, H, T, D] and [B, Hkv, T, D] × 2.
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    /// The attention output [B, H, T, D] and its logsumexp [B, H, T].
    attn: CudaSlice<T>,
    lse: CudaSlice<f32>,
}

impl<T: CudaElement> Scratch<T> {
    fn new(device: &CudaDevice, tokens: usize, config: &AttentionConfig) -> Result<Self> {
        let q = tokens * config.num_heads * config.head_dim;
        let kv = tokens * config.num_kv_heads * config.head_dim;
        Ok(Scratch {
            tokens,
            q_lin: device.zeros(q)?,
            k_lin: device.zeros(kv)?,
            v_lin: device.zeros(kv)?,
            q: device.zeros(q)?,
            k: device.zeros(kv)?,
            v: device.zeros(kv)?,
            attn: device.zeros(q)?,
            lse: device.zeros(tokens * config.num_heads)?,
        })
    }
}

impl<T: CudaElement + RopeElement> CudaLlamaAttention<T> {
    /// Copies `layer`'s weights to `device`, rounded to T.
    pub fn upload(device: &Arc<CudaDevice>, layer: &LlamaAttention) -> Result<Self> {
        let up = |w: &Weight| -> Result<CudaSlice<T>> {
            let rounded: Vec<T> = w.to_f32()?.iter().map(|&v| T::from_f32(v)).collect();
            Ok(device.htod(&rounded)?)
        };
        let weights = [
            up(&layer.q_proj)?,
            up(&layer.k_proj)?,
            up(&layer.v_proj)?,
            up(&layer.o_proj)?,
        ];
        Self::from_device(device, layer.config, weights, layer.rope_config().clone())
    }

    /// A layer over weights already on `device`: `[q_proj, k_proj, v_proj, o_proj]`, each in
    /// HF's [out, in] layout.
    pub fn from_device(
        device: &Arc<CudaDevice>,
        config: AttentionConfig,
        weights: [CudaSlice<T>; 4],
        rope: RopeConfig,
    ) -> Result<Self> {
        let (c, q, kv) = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        );
        for (w, len) in weights.iter().zip([q * c, kv * c, kv * c, c * q]) {
            if w.len() != len {
                return Err(crate::error::AttnError::Shape {
                    op: "CudaLlamaAttention::from_device",
                    reason: format!("a weight holds {} values, {config:?} needs {len}", w.len()),
                });
            }
        }
        let [q_proj, k_proj, v_proj, o_proj] = weights;
        Ok(CudaLlamaAttention {
            config,
            device: device.clone(),
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            rope: RotaryEmbedding::new(rope),
            tables: None,
            scratch: None,
        })
    }

    /// The device's cos/sin tables, uploaded again only when positions past them are needed.
    fn tables(&mut self, positions: &[u32]) -> Result<&DeviceTables> {
        let needed = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let generation = self.rope.generation();
        let entry = match self.tables.take() {
            Some(entry) if entry.0 == generation && entry.1 >= needed => entry,
            _ => {
                let host = self.rope.tables(needed)?;
                let (len, uploaded) = (host.len, DeviceTables::upload(&self.device, &host)?);
                // Growing the host tables may have moved the generation on.
                (self.rope.generation(), len, uploaded)
            }
        };
        Ok(&self.tables.insert(entry).2)
    }

    /// [B, T, heads·D] → [B, heads, T, D] (`to_heads`) or back, into `out` (same length).
    fn swap_axes(
        &self,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        (batch, seq, heads): (usize, usize, usize),
        to_heads: bool,
    ) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let name = format!("swap_axes_{}", T::SUFFIX);
        let f = self.device.function(&ATTENTION, &name)?;
        let (b, t, h, d) = (
            batch as u32,
            seq as u32,
            heads as u32,
            self.config.head_dim as u32,
        );
        let flag = i32::from(to_heads);
        let mut launch = self.device.stream().launch_builder(&f);
        launch
            .arg(x)
            .arg(out)
            .arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&d)
            .arg(&flag);
        // A thread per 16-byte chunk where rows are whole chunks (the kernel's vector path).
        let size = std::mem::size_of::<T>();
        let per_thread = if (self.config.head_dim * size).is_multiple_of(16) {
            16 / size
        } else {
            1
        };
        let config = LaunchConfig {
            grid_dim: (
                (x.len() / per_thread).div_ceil(256).clamp(1, 65_535) as u32,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x and out both hold batch · seq · heads · D elements (scratch buffers sized
        // from the same batch and seq); the kernel indexes below that.
        unsafe { launch.launch(config) }.map_err(|e| llama_core::Error::cuda(&name, e))?;
        Ok(())
    }

    /// Puts `weights` in place of `[q_proj, k_proj, v_proj, o_proj]` and returns the old ones
    /// (a trainer keeping them quantised elsewhere frees the bf16 copies this way).
    pub fn replace_weights(&mut self, weights: [CudaSlice<T>; 4]) -> [CudaSlice<T>; 4] {
        let [q, k, v, o] = weights;
        [
            std::mem::replace(&mut self.q_proj, q),
            std::mem::replace(&mut self.k_proj, k),
            std::mem::replace(&mut self.v_proj, v),
            std::mem::replace(&mut self.o_proj, o),
        ]
    }

    /// The projection weights `[q_proj, k_proj, v_proj, o_proj]` ([out, in]).
    pub fn weights(&self) -> [&CudaSlice<T>; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// Training forward between the projections (the device twin of
    /// [`LlamaAttention::attend`]): q, k, v [B·T, heads·D] at `positions`, causal →
    /// the merged heads [B·T, H·D] and what [`Self::attend_backward`] needs.
    pub fn attend(
        &mut self,
        qkv_lin: [&CudaSlice<T>; 3],
        batch: usize,
        positions: &[u32],
    ) -> Result<(CudaSlice<T>, CudaAttendSaved<T>)> {
        let (cfg, d) = (self.config, &self.device.clone());
        let seq = self.seq(qkv_lin[0], batch);
        let [q, k, v] = self.moved(qkv_lin, batch, positions, true)?;
        let shape =
            AttnShape::self_attention(batch, cfg.num_heads, cfg.num_kv_heads, seq, cfg.head_dim);
        let mask = Mask {
            causal: true,
            padding: None,
        };
        let mut attn = d.uninit::<T>(q.len())?;
        let mut lse = d.uninit::<f32>(shape.q_rows().max(1))?;
        forward(d, &q, &k, &v, &shape, &mask, &mut attn, &mut lse)?;
        let mut merged = d.uninit::<T>(q.len())?;
        self.swap_axes(&attn, &mut merged, (batch, seq, cfg.num_heads), false)?;
        let saved = CudaAttendSaved {
            q,
            k,
            v,
            lse,
            positions: positions.to_vec(),
            batch,
            seq,
        };
        Ok((merged, saved))
    }

    /// What an earlier [`Self::attend`] at `batch` and `positions` saved, from its buffers
    /// ([`CudaAttendSaved::into_buffers`]), as gradient checkpointing brings them back for the
    /// backward: nothing runs; buffers of the wrong lengths are an error.
    pub fn attend_saved(
        &self,
        buffers: AttendBuffers<T>,
        batch: usize,
        positions: &[u32],
    ) -> Result<CudaAttendSaved<T>> {
        let cfg = self.config;
        let AttendBuffers { q, k, v, lse } = buffers;
        let seq = self.seq(&q, batch);
        let q_rows = batch * cfg.num_heads * seq;
        let kv_len = batch * cfg.num_kv_heads * seq * cfg.head_dim;
        let whole = q.len() == q_rows * cfg.head_dim && q_rows > 0;
        if !whole || k.len() != kv_len || v.len() != kv_len || lse.len() != q_rows {
            return shape_error(
                "cuda attend_saved",
                format!(
                    "q, k, v and log-sum-exp of {}, {}, {} and {} values do not form {batch} \
                     rows of {} query and {} key heads of size {}",
                    q.len(),
                    k.len(),
                    v.len(),
                    lse.len(),
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim
                ),
            );
        }
        Ok(CudaAttendSaved {
            q,
            k,
            v,
            lse,
            positions: positions.to_vec(),
            batch,
            seq,
        })
    }

    /// T of q [B·T, H·D], as the projection leaves it or in heads.
    fn seq(&self, q_lin: &CudaSlice<T>, batch: usize) -> usize {
        let cfg = self.config;
        q_lin.len() / (batch * cfg.num_heads * cfg.head_dim).max(1)
    }

    /// The projections' outputs [B·T, heads·D] split into heads [B, heads, T, D], q and k
    /// rotated in the same pass; or (`to_heads` false: their gradients) back, q and k rotated
    /// back.
    fn moved(
        &mut self,
        [q, k, v]: [&CudaSlice<T>; 3],
        batch: usize,
        positions: &[u32],
        to_heads: bool,
    ) -> Result<[CudaSlice<T>; 3]> {
        let (cfg, d) = (self.config, &self.device.clone());
        let seq = self.seq(q, batch);
        let mut v_moved = d.uninit::<T>(v.len())?;
        self.swap_axes(v, &mut v_moved, (batch, seq, cfg.num_kv_heads), to_heads)?;
        let tables = self.tables(positions)?;
        let rotated = |x: &CudaSlice<T>, heads: usize| -> Result<CudaSlice<T>> {
            let shape = QkShape {
                batch,
                heads,
                seq,
                head_dim: cfg.head_dim,
            };
            let mut moved = d.uninit::<T>(x.len())?;
            apply_moving(x, &mut moved, shape, tables, positions, !to_heads, to_heads)?;
            Ok(moved)
        };
        let (q, k) = (rotated(q, cfg.num_heads)?, rotated(k, cfg.num_kv_heads)?);
        Ok([q, k, v_moved])
    }

    /// Backward of [`Self::attend`], given the merged heads it returned: d_merged [B·T, H·D]
    /// → the gradients of the projections' outputs dq, dk, dv [B·T, heads·D].
    pub fn attend_backward(
        &mut self,
        saved: &CudaAttendSaved<T>,
        merged: &CudaSlice<T>,
        d_merged: &CudaSlice<T>,
    ) -> Result<[CudaSlice<T>; 3]> {
        let cfg = self.config;
        let d = &self.device.clone();
        let (batch, seq) = (saved.batch, saved.seq);
        let shape =
            AttnShape::self_attention(batch, cfg.num_heads, cfg.num_kv_heads, seq, cfg.head_dim);
        let o = AttnOutput::Merged(merged);
        let mut d_attn = d.uninit::<T>(d_merged.len())?;
        self.swap_axes(d_merged, &mut d_attn, (batch, seq, cfg.num_heads), true)?;
        // The tensor-core kernels write every row of the gradients; the GEMM path adds into them.
        let tensor_cores = tensor_core_backward::<T>(&shape);
        let gradient = |len: usize| {
            if tensor_cores {
                d.uninit::<T>(len)
            } else {
                d.zeros::<T>(len)
            }
        };
        let (mut dq, mut dk, mut dv) = (
            gradient(saved.q.len())?,
            gradient(saved.k.len())?,
            gradient(saved.v.len())?,
        );
        let [q, k, v] = [&saved.q, &saved.k, &saved.v];
        if tensor_cores {
            let lse = &saved.lse;
            backward_tc(
                d, q, k, v, o, lse, &d_attn, &shape, &mut dq, &mut dk, &mut dv,
            )?;
        } else {
            backward_gemm(
                d,
                q,
                k,
                v,
                o,
                &saved.lse,
                &d_attn,
                &shape,
                &mut dq,
                &mut dk,
                &mut dv,
                GEMM_BACKWARD_SCORES,
            )?;
        }
        // q and k were rotated after the projection: their gradients are rotated back as they
        // are merged into the projections' layout; dv is merged.
        self.moved([&dq, &dk, &dv], batch, &saved.positions, false)
    }

    /// x [B, T, C] (on the device) are the next T positions of each sequence at `positions`
    /// (T ids, or B·T for left-padded batches); their keys and values join `cache` and they
    /// attend to all of it. Returns out [B, T, C].
    pub fn forward_cached(
        &mut self,
        x: &CudaSlice<T>,
        batch: usize,
        positions: &[u32],
        cache: &mut CudaKvCache<T>,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.device.zeros::<T>(x.len())?;
        self.forward_cached_into(x, batch, positions, cache, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward_cached`] into `out` [B, T, C] (a buffer the caller keeps from step to
    /// step).
    pub fn forward_cached_into(
        &mut self,
        x: &CudaSlice<T>,
        batch: usize,
        positions: &[u32],
        cache: &mut CudaKvCache<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let cfg = self.config;
        let (c, d) = (cfg.hidden_size, cfg.head_dim);
        let seq = cfg.positions_in("cuda forward_cached", x.len(), batch)?;
        let mut bufs = match self.scratch.take() {
            Some(bufs) if bufs.tokens == batch * seq => bufs,
            _ => Scratch::new(&self.device, batch * seq, &cfg)?,
        };
        for (w, lin, split, heads) in [
            (&self.q_proj, &mut bufs.q_lin, &mut bufs.q, cfg.num_heads),
            (&self.k_proj, &mut bufs.k_lin, &mut bufs.k, cfg.num_kv_heads),
            (&self.v_proj, &mut bufs.v_lin, &mut bufs.v, cfg.num_kv_heads),
        ] {
            linear(&self.device, x, w, c, lin)?;
            self.swap_axes(lin, split, (batch, seq, heads), true)?;
        }
        let tables = self.tables(positions)?;
        for (buf, heads) in [
            (&mut bufs.q, cfg.num_heads),
            (&mut bufs.k, cfg.num_kv_heads),
        ] {
            let shape = QkShape {
                batch,
                heads,
                seq,
                head_dim: d,
            };
            apply(buf, shape, tables, positions, false)?;
        }
        cache.append(&self.device, &bufs.k, &bufs.v, seq)?;
        let shape = cache.shape(cfg.num_heads, seq);
        forward(
            &self.device,
            &bufs.q,
            cache.keys(),
            cache.values(),
            &shape,
            &cache.mask(),
            &mut bufs.attn,
            &mut bufs.lse,
        )?;
        // merge(attn) into the q projection's buffer, then o_proj.
        self.swap_axes(
            &bufs.attn,
            &mut bufs.q_lin,
            (batch, seq, cfg.num_heads),
            false,
        )?;
        linear(
            &self.device,
            &bufs.q_lin,
            &self.o_proj,
            cfg.num_heads * d,
            out,
        )?;
        self.scratch = Some(bufs);
        Ok(())
    }
}
