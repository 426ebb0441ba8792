//! The attention layer on a CUDA device, for prefill and decoding against a [`CudaKvCache`]:
//! the forward of [`crate::LlamaAttention::forward_cached`] with cuBLAS projections
//! (llama-ops), the RoPE kernel (llama-rope) and the attention kernels, in f32 or bf16.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use llama_core::cuda::CudaDevice;
use llama_ops::cuda::{linear, CudaElement};
use llama_rope::cuda::{apply, DeviceTables, RopeElement};
use llama_rope::{QkShape, RotaryEmbedding};

use crate::cuda::{forward, CudaKvCache, ATTENTION};
use crate::error::{shape_error, Result};
use crate::layer::{AttentionConfig, LlamaAttention};

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
}

impl<T: CudaElement + RopeElement> CudaLlamaAttention<T> {
    /// Copies `layer`'s weights to `device`, rounded to T.
    pub fn upload(device: &Arc<CudaDevice>, layer: &LlamaAttention) -> Result<Self> {
        let up = |w: &[f32]| -> Result<CudaSlice<T>> {
            let rounded: Vec<T> = w.iter().map(|&v| T::from_f32(v)).collect();
            Ok(device.htod(&rounded)?)
        };
        Ok(CudaLlamaAttention {
            config: layer.config,
            device: device.clone(),
            q_proj: up(&layer.q_proj)?,
            k_proj: up(&layer.k_proj)?,
            v_proj: up(&layer.v_proj)?,
            o_proj: up(&layer.o_proj)?,
            rope: RotaryEmbedding::new(layer.rope_config().clone()),
            tables: None,
        })
    }

    /// The device's cos/sin tables, uploaded again only when positions past them are needed.
    fn tables(&mut self, positions: &[u32]) -> Result<&DeviceTables> {
        let needed = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let stale = match &self.tables {
            Some((generation, len, _)) => *generation != self.rope.generation() || *len < needed,
            None => true,
        };
        if stale {
            let host = self.rope.tables(needed)?;
            let len = host.len;
            let device_tables = DeviceTables::upload(&self.device, &host)?;
            self.tables = Some((self.rope.generation(), len, device_tables));
        }
        Ok(&self.tables.as_ref().expect("set above").2)
    }

    /// [B, T, heads·D] → [B, heads, T, D] (`to_heads`) or back.
    fn swap_axes(
        &self,
        x: &CudaSlice<T>,
        batch: usize,
        seq: usize,
        heads: usize,
        to_heads: bool,
    ) -> Result<CudaSlice<T>> {
        let d = self.config.head_dim;
        let mut out = self.device.zeros::<T>(x.len().max(1))?;
        if x.is_empty() {
            return Ok(out);
        }
        let name = format!("swap_axes_{}", T::SUFFIX);
        let f = self.device.function(&ATTENTION, &name)?;
        let (b, t, h, d32, flag) = (
            batch as u32,
            seq as u32,
            heads as u32,
            d as u32,
            i32::from(to_heads),
        );
        let mut launch = self.device.stream().launch_builder(&f);
        launch
            .arg(x)
            .arg(&mut out)
            .arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&d32)
            .arg(&flag);
        let config = LaunchConfig {
            grid_dim: (x.len().div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x and out hold batch · seq · heads · D elements (x by the callers' shapes,
        // out allocated so); the kernel indexes below that.
        unsafe { launch.launch(config) }.map_err(|e| llama_core::Error::cuda(&name, e))?;
        Ok(out)
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
        let cfg = self.config;
        let (c, d) = (cfg.hidden_size, cfg.head_dim);
        if batch == 0 || x.len() % (batch * c) != 0 {
            return shape_error(
                "cuda forward_cached",
                format!("x holds {} values, not [batch {batch}, T, {c}]", x.len()),
            );
        }
        let seq = x.len() / (batch * c);
        let device = self.device.clone();
        let project = |w: &CudaSlice<T>, heads: usize| -> Result<CudaSlice<T>> {
            let mut y = device.zeros::<T>(batch * seq * heads * d)?;
            linear(&device, x, w, c, &mut y)?;
            Ok(y)
        };
        let (q_lin, k_lin, v_lin) = (
            project(&self.q_proj, cfg.num_heads)?,
            project(&self.k_proj, cfg.num_kv_heads)?,
            project(&self.v_proj, cfg.num_kv_heads)?,
        );
        let mut q = self.swap_axes(&q_lin, batch, seq, cfg.num_heads, true)?;
        let mut k = self.swap_axes(&k_lin, batch, seq, cfg.num_kv_heads, true)?;
        let v = self.swap_axes(&v_lin, batch, seq, cfg.num_kv_heads, true)?;
        let tables = self.tables(positions)?;
        apply(
            &mut q,
            QkShape {
                batch,
                heads: cfg.num_heads,
                seq,
                head_dim: d,
            },
            tables,
            positions,
            false,
        )?;
        apply(
            &mut k,
            QkShape {
                batch,
                heads: cfg.num_kv_heads,
                seq,
                head_dim: d,
            },
            tables,
            positions,
            false,
        )?;
        cache.append(&self.device, &k, &v, seq)?;
        let shape = cache.shape(cfg.num_heads, seq);
        let mut attn = self.device.zeros::<T>(shape.q_len())?;
        let mut lse = self.device.zeros::<f32>(shape.q_rows())?;
        forward(
            &self.device,
            &q,
            cache.keys(),
            cache.values(),
            &shape,
            &cache.mask(),
            &mut attn,
            &mut lse,
        )?;
        let merged = self.swap_axes(&attn, batch, seq, cfg.num_heads, false)?;
        let mut out = self.device.zeros::<T>(batch * seq * c)?;
        linear(
            &self.device,
            &merged,
            &self.o_proj,
            cfg.num_heads * d,
            &mut out,
        )?;
        Ok(out)
    }
}
