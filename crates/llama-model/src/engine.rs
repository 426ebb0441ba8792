//! [`Engine`]: the one place that picks where a model runs — the CPU model in its precision,
//! or its bf16 copy on a CUDA device — behind the [`Decoder`] interface generation uses.

use std::sync::Arc;

use llama_core::cuda::CudaDevice;
use llama_core::Device;

use crate::config::LlamaConfig;
use crate::cuda_model::{CudaLlamaModel, CudaModelCache};
use crate::error::Result;
use crate::generate::Decoder;
use crate::model::{LlamaModel, ModelCache};

/// A model on the CPU or on a CUDA device.
pub enum Engine {
    Cpu(Box<LlamaModel>),
    Cuda(Box<CudaLlamaModel>),
}

/// The caches of an [`Engine`].
pub enum EngineCache {
    Cpu(ModelCache),
    Cuda(CudaModelCache),
}

impl Engine {
    /// `model` on the CPU, or copied to `device` (in bf16) when one is given and llama-patch's
    /// `pre_patch` finds that the CUDA kernels can run it (else it stays on the CPU, as the
    /// model's [`LlamaModel::patch_plan`] then says). A model with any op on its reference
    /// implementation (unpatched) stays on the CPU too. A LoRA adapter runs unmerged on the
    /// CPU and is merged into the GPU's bf16 copies (the host model is left as it is).
    pub fn new(mut model: LlamaModel, device: Option<&Arc<CudaDevice>>) -> Result<Engine> {
        let Some(d) = device.filter(|_| !model.patch_plan().uses_reference()) else {
            return Ok(Engine::Cpu(Box::new(model)));
        };
        model.pre_patch(Device::Cuda(d.ordinal()));
        if !model.patch_plan().device.is_cuda() {
            model.pre_patch(Device::Cpu);
            return Ok(Engine::Cpu(Box::new(model)));
        }
        Ok(Engine::Cuda(Box::new(CudaLlamaModel::upload(d, &model)?)))
    }

    /// "cpu" or "cuda:N (name)".
    pub fn device_name(&self) -> String {
        match self {
            Engine::Cpu(_) => "cpu".into(),
            Engine::Cuda(m) => format!("cuda:{} ({})", m.device().ordinal(), m.device().name()),
        }
    }
}

impl Decoder for Engine {
    type Cache = EngineCache;

    fn config(&self) -> &LlamaConfig {
        match self {
            Engine::Cpu(m) => &m.config,
            Engine::Cuda(m) => &m.config,
        }
    }

    fn max_seq_length(&self) -> usize {
        match self {
            Engine::Cpu(m) => m.max_seq_length,
            Engine::Cuda(m) => m.max_seq_length,
        }
    }

    fn new_cache(
        &self,
        batch: usize,
        capacity: usize,
        padding: Option<Vec<usize>>,
    ) -> Result<EngineCache> {
        Ok(match self {
            Engine::Cpu(m) => {
                EngineCache::Cpu(Decoder::new_cache(m.as_ref(), batch, capacity, padding)?)
            }
            Engine::Cuda(m) => EngineCache::Cuda(m.new_cache(batch, capacity, padding)?),
        })
    }

    fn forward_cached(
        &mut self,
        ids: &[u32],
        batch: usize,
        cache: &mut EngineCache,
    ) -> Result<Vec<f32>> {
        match (self, cache) {
            (Engine::Cpu(m), EngineCache::Cpu(c)) => {
                Decoder::forward_cached(m.as_mut(), ids, batch, c)
            }
            (Engine::Cuda(m), EngineCache::Cuda(c)) => m.forward_cached(ids, batch, c),
            _ => Err(crate::error::ModelError::input(
                "cache",
                "a cache of the other device",
            )),
        }
    }

    fn cache_len(cache: &EngineCache) -> usize {
        match cache {
            EngineCache::Cpu(c) => c.len(),
            EngineCache::Cuda(c) => c.len(),
        }
    }

    fn truncate_cache(cache: &mut EngineCache, len: usize) {
        match cache {
            EngineCache::Cpu(c) => c.truncate(len),
            EngineCache::Cuda(c) => c.truncate(len),
        }
    }
}
