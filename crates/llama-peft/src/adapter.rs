//! A model's LoRA adapter: every pair, by layer and projection, and peft's file format
//! (adapter_config.json + adapter_model.safetensors, tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`).

use std::path::{Path, PathBuf};

use llama_core::{DType, SplitMix64, Tensor};
use llama_ops::Weight;
use safetensors::SafeTensors;

use crate::config::{LoraConfig, ModelDims, SavedModule, Target};
use crate::error::{PeftError, Result};
use crate::lora::{LoraGrads, LoraPair};

/// The LoRA pairs of one decoder layer, indexed by [`Target`] (None: not adapted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerLora(pub [Option<LoraPair>; 7]);

impl LayerLora {
    pub fn get(&self, target: Target) -> Option<&LoraPair> {
        self.0[target as usize].as_ref()
    }
}

/// Whole modules trained beside the pairs (peft's `modules_to_save`): dense f32 copies of
/// embed_tokens and lm_head, [V, C], that replace the base's in the forward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SavedModules {
    pub embed_tokens: Option<Weight>,
    pub lm_head: Option<Weight>,
}

impl SavedModules {
    /// The copy of `module`, if trained.
    pub fn get(&self, module: SavedModule) -> Option<&Weight> {
        match module {
            SavedModule::EmbedTokens => self.embed_tokens.as_ref(),
            SavedModule::LmHead => self.lm_head.as_ref(),
        }
    }

    fn slot(&mut self, module: SavedModule) -> &mut Option<Weight> {
        match module {
            SavedModule::EmbedTokens => &mut self.embed_tokens,
            SavedModule::LmHead => &mut self.lm_head,
        }
    }

    /// The values of each copy, embed_tokens first.
    fn values_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        [&mut self.embed_tokens, &mut self.lm_head]
            .into_iter()
            .flatten()
            .filter_map(|w| match w {
                Weight::Dense { data, .. } => Some(&mut data[..]),
                Weight::Bf16 { .. } | Weight::Bf16Panels { .. } | Weight::Quant { .. } => None,
            })
    }
}

/// peft's on-disk name of a saved module (`modules_to_save.default` dropped).
pub fn module_name(module: SavedModule) -> &'static str {
    match module {
        SavedModule::EmbedTokens => "base_model.model.model.embed_tokens.weight",
        SavedModule::LmHead => "base_model.model.lm_head.weight",
    }
}

/// Gradients for every pair of an adapter, laid out like it, and for its saved modules
/// ([embed_tokens, lm_head]).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterGrads {
    pub layers: Vec<[Option<LoraGrads>; 7]>,
    pub modules: [Option<Vec<f32>>; 2],
}

impl AdapterGrads {
    /// Every gradient matrix in [`LoraAdapter::parameters_mut`]'s order (per pair: A, B).
    pub fn slices(&self) -> Vec<&[f32]> {
        let pairs = self.layers.iter().flatten().flatten();
        let pairs = pairs.flat_map(|g| [&g.a[..], &g.b[..]]);
        pairs
            .chain(self.modules.iter().flatten().map(|m| &m[..]))
            .collect()
    }

    pub fn slices_mut(&mut self) -> Vec<&mut [f32]> {
        let pairs = self.layers.iter_mut().flatten().flatten();
        let pairs = pairs.flat_map(|g| [&mut g.a[..], &mut g.b[..]]);
        pairs
            .chain(self.modules.iter_mut().flatten().map(|m| &mut m[..]))
            .collect()
    }

    /// Whether these gradients are shaped for `adapter`.
    pub fn fits(&self, adapter: &LoraAdapter) -> bool {
        let size = |w: &Option<Weight>| w.as_ref().map(|w| w.shape().0 * w.shape().1);
        let modules = [
            size(&adapter.modules.embed_tokens),
            size(&adapter.modules.lm_head),
        ];
        self.layers.len() == adapter.layers.len()
            && self.layers.iter().zip(&adapter.layers).all(|(g, l)| {
                g.iter().zip(&l.0).all(|(g, p)| match (g, p) {
                    (Some(g), Some(p)) => g.a.len() == p.a.len() && g.b.len() == p.b.len(),
                    (None, None) => true,
                    _ => false,
                })
            })
            && self
                .modules
                .iter()
                .map(|m| m.as_ref().map(Vec::len))
                .eq(modules)
    }

    /// Sets every gradient to zero (keeps the memory).
    pub fn zero(&mut self) {
        self.slices_mut().into_iter().for_each(|s| s.fill(0.0));
    }

    /// The gradient of `target`'s pair in `layer`.
    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraGrads> {
        self.layers.get(layer)?[target as usize].as_ref()
    }
}

/// peft's name for matrix `which` ("A" or "B") of `target` in `layer`: on disk
/// (`…lora_A.weight`) or in memory (`…lora_A.default.weight`, as peft names parameters).
pub fn peft_name(layer: usize, target: Target, which: &str, in_memory: bool) -> String {
    let adapter = if in_memory { ".default" } else { "" };
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{which}{adapter}.weight",
        target.path()
    )
}

/// A model's LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: Vec<LayerLora>,
    pub modules: SavedModules,
}

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

impl LoraAdapter {
    /// A fresh adapter for a model of `dims` (A initialised from `config.random_state`, B zero,
    /// so the adapted model starts equal to the base).
    pub fn new(config: LoraConfig, dims: ModelDims) -> Result<LoraAdapter> {
        config.validate(dims.num_layers)?;
        let mut rng = SplitMix64::new(config.random_state);
        let scaling = config.scaling();
        let layers = (0..dims.num_layers)
            .map(|i| {
                let mut layer = LayerLora::default();
                if config.transforms_layer(i) {
                    for &t in &config.target_modules {
                        let (out, inp) = t.shape(&dims);
                        layer.0[t as usize] = Some(LoraPair::init(
                            config.r,
                            inp,
                            out,
                            scaling,
                            config.init_lora_weights,
                            &mut rng,
                        ));
                    }
                }
                layer
            })
            .collect();
        Ok(LoraAdapter {
            config,
            layers,
            modules: SavedModules::default(),
        })
    }

    /// Makes the f32 copies of the modules `config.modules_to_save` names that are not there
    /// yet, from the base's embed_tokens and lm_head.
    pub fn init_modules(&mut self, embed_tokens: &Weight, lm_head: &Weight) -> Result<()> {
        for &m in &self.config.modules_to_save {
            let base = match m {
                SavedModule::EmbedTokens => embed_tokens,
                SavedModule::LmHead => lm_head,
            };
            let slot = self.modules.slot(m);
            if slot.is_none() {
                *slot = Some(base.convert(DType::F32)?);
            }
        }
        Ok(())
    }

    /// The pair on `target` in `layer`, if adapted.
    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(layer)?.get(target)
    }

    /// Every (layer, target, pair), in layer order then [`Target::ALL`] order.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| l.get(t).map(|p| (i, t, p)))
        })
    }

    /// Every trainable matrix (per pair: A, B), in [`AdapterGrads::slices`]' order.
    pub fn parameters_mut(&mut self) -> Vec<&mut [f32]> {
        let pairs = self
            .layers
            .iter_mut()
            .flat_map(|l| l.0.iter_mut())
            .flatten()
            .flat_map(|p| [&mut p.a[..], &mut p.b[..]]);
        pairs.chain(self.modules.values_mut()).collect()
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        let modules: usize = [&self.modules.embed_tokens, &self.modules.lm_head]
            .into_iter()
            .flatten()
            .map(|w| w.shape().0 * w.shape().1)
            .sum();
        self.pairs()
            .map(|(_, _, p)| p.a.len() + p.b.len())
            .sum::<usize>()
            + modules
    }

    /// Zero gradients shaped like this adapter.
    pub fn zero_grads(&self) -> AdapterGrads {
        let zeros = |w: &Option<Weight>| w.as_ref().map(|w| vec![0.0; w.shape().0 * w.shape().1]);
        AdapterGrads {
            layers: self
                .layers
                .iter()
                .map(|l| l.0.each_ref().map(|p| p.as_ref().map(LoraPair::zero_grads)))
                .collect(),
            modules: [
                zeros(&self.modules.embed_tokens),
                zeros(&self.modules.lm_head),
            ],
        }
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` as peft does
    /// (f32, on-disk names), each file to a temporary name first and then renamed.
    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors = Vec::new();
        for (i, t, p) in self.pairs() {
            tensors.push((
                peft_name(i, t, "A", false),
                Tensor::from_slice(&p.a, vec![p.rank, p.in_features])?,
            ));
            tensors.push((
                peft_name(i, t, "B", false),
                Tensor::from_slice(&p.b, vec![p.out_features, p.rank])?,
            ));
        }
        for m in [SavedModule::EmbedTokens, SavedModule::LmHead] {
            if let Some(w) = self.modules.get(m) {
                let (rows, cols) = w.shape();
                tensors.push((
                    module_name(m).to_string(),
                    Tensor::from_slice(&w.to_f32()?, vec![rows, cols])?,
                ));
            }
        }
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::save_safetensors(&refs, &dir.join(WEIGHTS_FILE))?;
        let json = serde_json::to_string_pretty(&self.config.to_peft_json(base_model))
            .expect("a JSON value always serialises");
        llama_core::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
        Ok(())
    }

    /// Reads an adapter saved by peft (or [`Self::save`]) for a model of `dims`: every
    /// targeted matrix must be present with its shape; f32, f16 and bf16 are read.
    pub fn load(dir: &Path, dims: ModelDims) -> Result<LoraAdapter> {
        let fail = |path: PathBuf, reason: String| PeftError::Adapter { path, reason };
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| fail(config_path.clone(), format!("cannot read: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| fail(config_path.clone(), format!("not JSON: {e}")))?;
        let config = LoraConfig::from_peft_json(&json)?;
        config.validate(dims.num_layers)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(fail(
                dir.join("adapter_model.bin"),
                "pickled adapters are not read; save with safe_serialization=True".into(),
            ));
        }
        let bytes = std::fs::read(&weights_path)
            .map_err(|e| fail(weights_path.clone(), format!("cannot read: {e}")))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| fail(weights_path.clone(), e.to_string()))?;
        let read = |name: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
            let view = file
                .tensor(name)
                .or_else(|_| file.tensor(&name.replace(".weight", ".default.weight")))
                .map_err(|_| fail(weights_path.clone(), format!("tensor {name} is missing")))?;
            if view.shape() != shape {
                return Err(fail(
                    weights_path.clone(),
                    format!(
                        "tensor {name} is {:?}, the model needs {shape:?}",
                        view.shape()
                    ),
                ));
            }
            Tensor::from_safetensors(&view)
                .and_then(|t| t.to_vec_f32())
                .map_err(|e| fail(weights_path.clone(), format!("tensor {name}: {e}")))
        };
        let mut adapter = LoraAdapter::new(config, dims)?;
        let scaling = adapter.config.scaling();
        for (i, layer) in adapter.layers.iter_mut().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &mut layer.0[t as usize] {
                    let (r, inp, out) = (p.rank, p.in_features, p.out_features);
                    let a = read(&peft_name(i, t, "A", false), [r, inp])?;
                    let b = read(&peft_name(i, t, "B", false), [out, r])?;
                    *p = LoraPair::from_parts(a, b, r, inp, out, scaling)?;
                }
            }
        }
        for m in adapter.config.modules_to_save.clone() {
            let values = read(module_name(m), [dims.vocab, dims.hidden])?;
            *adapter.modules.slot(m) = Some(Weight::dense(values, dims.vocab, dims.hidden)?);
        }
        Ok(adapter)
    }
}
