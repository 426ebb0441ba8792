//! LoRA training on one CUDA device: bf16 base weights ([`CudaLlamaModel`]), f32 LoRA masters
//! and AdamW state ([`CudaLoraGroup`]: the pairs that read one input together), bf16
//! activations, cuBLAS products with f32 accumulation.
//! The same step as the CPU's ([`crate::Trainer`]), with gradient checkpointing always on (as
//! Unsloth trains): the forward keeps each layer's input and its attention — output, inputs
//! (q, k, v rotated in heads) and log-sum-exp —, offloaded to pinned host memory by copies
//! that run beside the work ([`HostStash`]), and the last layer's tape and input; the
//! backward brings them back while the layer above runs, recomputes the rest of the layer's
//! tape (all but the last: the norms and the o, gate and up projections, their LoRA branches
//! from the xs = s·(x·Aᵀ) each kept on the device; neither the q/k/v projections nor the
//! attention run again) and runs the layer's backward (see layer.rs for the formulas). The head — final norm, lm_head and loss — runs a chunk of rows
//! at a time, forward and backward; the loss is read back once, at the step's end.
//! Residual adds ride on the products (cuBLAS adding onto a copy of the residual) and the
//! norms' backward kernels. modules_to_save (embed_tokens, lm_head) train whole beside the
//! adapter as [`CudaTrainable`]s: the lookup reads the trained embedding's bf16 copy and its
//! gradient takes dh₀ row by row; the loss reads the trained lm_head and adds
//! dlogitsᵀ·normed to its gradient chunk by chunk.
//! Letters: N = B·T rows, C hidden, F intermediate, V vocabulary.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use llama_attn::{AttendBuffers, CudaAttendSaved};
use llama_core::cuda::{CudaDevice, HostStash, Transfer};
use llama_core::{bf16, DType};
use llama_ops::cuda::CudaNf4DoubleQuant;
use llama_ops::cuda::{
    cross_entropy, cross_entropy_backward, gated_backward_in_place, gated_forward, linear,
    linear_backward_input, linear_backward_input_into, linear_backward_weight, linear_into,
    rms_norm, rms_norm_backward_input,
};
use llama_ops::Weight;
use llama_ops::{CrossEntropyOptions, QuantMatrix};
use llama_peft::cuda::{CudaLoraGroup, CudaLoraSaved, CudaTrainable, TrainableTable};
use llama_peft::{
    AdapterGrads, LayerLora, LoraAdapter, LoraConfig, ModelDims, OptimizerKind, SavedModules,
    Target,
};

use crate::config::LlamaConfig;
use crate::cuda_model::{CudaLayer, CudaLlamaModel};
use crate::error::{ModelError, Result};
use crate::model::shift_labels;
use crate::train::head_chunk_rows;
use crate::trainer::{write_checkpoint, Batch, OptimizerState, StepReport, TrainConfig};

/// The projections that read each of a layer's inputs — n₁ (q, k, v), the merged heads (o),
/// n₂ (gate, up) and h (down) —, in [`Target`] order: each input's LoRA pairs train as one
/// [`CudaLoraGroup`] (one product over the input for all their branches).
const INPUTS: [&[Target]; 4] = [
    &[Target::QProj, Target::KProj, Target::VProj],
    &[Target::OProj],
    &[Target::GateProj, Target::UpProj],
    &[Target::DownProj],
];
/// Indices into [`INPUTS`] (and a layer's groups).
const NORMED1: usize = 0;
const MERGED: usize = 1;
const NORMED2: usize = 2;
const HIDDEN: usize = 3;

/// A layer's LoRA pairs, grouped by the input they read ([`INPUTS`]).
type Groups = [Option<CudaLoraGroup>; 4];

/// A layer's attention as the step's forward keeps it for the backward, on its way to or from
/// the host: its output (the merged heads o_proj reads) and what its backward reads (q, k, v
/// rotated in heads and the log-sum-exp), so that the recompute runs neither the attention nor
/// the q, k and v projections.
struct KeptAttention {
    merged: Transfer<bf16>,
    qkv: [Transfer<bf16>; 3],
    lse: Transfer<f32>,
    /// The residual after the attention, mid = x + o(merged), where the forward keeps it too
    /// ([`keeps_mid`]): the recompute then skips the o projection as well.
    mid: Option<Transfer<bf16>>,
}

/// A [`KeptAttention`] back on the device: the merged heads, what the attention's backward
/// reads, and mid when kept.
type Kept = (
    CudaSlice<bf16>,
    AttendBuffers<bf16>,
    Option<CudaSlice<bf16>>,
);

impl KeptAttention {
    /// The buffers, with the device's stream ordered after their copies.
    fn wait(self) -> Result<Kept> {
        let [q, k, v] = self.qkv;
        let buffers = AttendBuffers {
            q: q.wait()?,
            k: k.wait()?,
            v: v.wait()?,
            lse: self.lse.wait()?,
        };
        let mid = self.mid.map(Transfer::wait).transpose()?;
        Ok((self.merged.wait()?, buffers, mid))
    }
}

/// How many FLOPs of products a layer's forward must run per byte it keeps on the host for the
/// copies to hide behind it. Host copies run at ~55 GB/s and the frozen products at 750–850
/// TFLOP/s on H100s and H200s (~14k FLOPs a byte), less what the forward's other kernels add:
/// at Llama-3.2-1B's shape the input, attention output, q, k, v and log-sum-exp (9.0k FLOPs a
/// byte) just keep up (a CUPTI timeline on an H200: the last copy ends with the forward).
const PRODUCT_FLOPS_PER_KEPT_BYTE: usize = 9_000;

/// Whether the forward keeps each layer's mid on the host too, at `seq` positions a row: when
/// its products cover the copies ([`PRODUCT_FLOPS_PER_KEPT_BYTE`]). Llama-3-8B's shape does
/// (12.2k FLOPs a kept byte), Llama-3.2-1B's does not (7.0k).
fn keeps_mid(cfg: &LlamaConfig, seq: usize) -> bool {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    // a token's products (2 FLOPs a weight) and causal attention (Q·Kᵀ and P·V over seq/2
    // keys on average)
    let flops = 2 * c * (2 * q + 2 * kv + 3 * f) + 2 * seq * q;
    // bf16 x, mid, merged, q, k, v and the f32 log-sum-exps
    let bytes = 2 * (2 * c + 2 * q + 2 * kv) + 4 * cfg.num_attention_heads;
    flops >= PRODUCT_FLOPS_PER_KEPT_BYTE * bytes
}

/// The gradients of `group`'s branches among `dys`, one for each projection of `targets`.
fn branch_grads<'a>(
    group: &CudaLoraGroup,
    targets: &[Target],
    dys: &[&'a CudaSlice<bf16>],
) -> Vec<&'a CudaSlice<bf16>> {
    let position = |t: &Target| targets.iter().position(|u| u == t);
    group
        .targets()
        .iter()
        .filter_map(|t| position(t).and_then(|i| dys.get(i).copied()))
        .collect()
}

/// A layer's input and (when it will be recomputed: all but the last, which keeps its tape and
/// input from the forward) its kept attention, on their way back from the host.
type Fetched = (Transfer<bf16>, Option<KeptAttention>);

/// Each LoRA group's xs = s·(x·Aᵀ) [N, g·r] (by input, [`INPUTS`]), kept from the step's
/// forward to its backward (r/C of the input's size a branch): the recompute runs no rank-r
/// product of an input.
type LoraKept = [Option<CudaLoraSaved>; 4];

/// A projection's LoRA: its input's group (if any pair reads that input) and the group's xs
/// (kept from the forward, or computed and kept now).
type Lora<'a> = (Option<&'a CudaLoraGroup>, &'a mut Option<CudaLoraSaved>);

/// What one layer's forward (or its recompute) keeps for its backward.
struct Tape {
    attention: AttentionTape,
    /// The merged heads, o_proj's input.
    merged: CudaSlice<bf16>,
    mlp: MlpTape,
    lora: LoraKept,
}

/// The tape of the layer's first half, up to the attention's output.
struct AttentionTape {
    normed1: CudaSlice<bf16>,
    attend: CudaAttendSaved<bf16>,
}

/// The tape of the rest, from the o projection on.
struct MlpTape {
    mid: CudaSlice<bf16>,
    normed2: CudaSlice<bf16>,
    gate: CudaSlice<bf16>,
    up: CudaSlice<bf16>,
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> ModelError + '_ {
    move |e| llama_core::Error::cuda(what, e).into()
}

/// One layer's frozen projections as its forward and backward read them, each by [`Target`]:
/// the model's bf16 matrices, or (QLoRA) their NF4 copies dequantised on the way.
struct FrozenWeights<'a> {
    d: &'a CudaDevice,
    layer: &'a CudaLayer,
    nf4: Option<&'a mut Nf4Base>,
    index: usize,
    dims: ModelDims,
}

impl<'a> FrozenWeights<'a> {
    fn new(
        d: &'a CudaDevice,
        layer: &'a CudaLayer,
        nf4: Option<&'a mut Nf4Base>,
        index: usize,
        dims: ModelDims,
    ) -> Self {
        FrozenWeights {
            d,
            layer,
            nf4,
            index,
            dims,
        }
    }

    /// The weight of `target`, [out, in].
    fn weight(&mut self, target: Target) -> Result<&CudaSlice<bf16>> {
        frozen(
            self.d,
            self.layer,
            self.nf4.as_deref_mut(),
            self.index,
            target,
        )
    }

    /// y [N, out] = x·Wᵀ (+ the branch, as [`Self::forward_into`]).
    fn forward(
        &mut self,
        target: Target,
        lora: Lora,
        x: &CudaSlice<bf16>,
    ) -> Result<CudaSlice<bf16>> {
        let (out, in_features) = target.shape(&self.dims);
        let mut y = self.d.uninit::<bf16>(x.len() / in_features * out)?;
        self.forward_into(target, lora, x, &mut y, false)?;
        Ok(y)
    }

    /// y [N, out] (+ when `accumulate`)= x·Wᵀ + the target's LoRA branch, if it has one: a
    /// residual add done by the product itself. The branch goes first and the frozen product
    /// adds onto it (y is read once, in the big product's epilogue, not again by a rank-r
    /// product). The group's xs comes from the slot when it holds one (a recompute, or a
    /// sibling branch's call), else is computed and kept there.
    fn forward_into(
        &mut self,
        target: Target,
        (group, kept): Lora,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let in_features = target.shape(&self.dims).1;
        let branch = group.and_then(|g| g.branch(target).map(|j| (g, j)));
        if let Some((group, j)) = branch {
            if kept.is_none() {
                *kept = Some(group.saved(x)?);
            }
            if let Some(saved) = kept {
                group.forward_branch(j, saved, y, accumulate)?;
            }
        }
        let accumulate = accumulate || branch.is_some();
        linear_into(self.d, x, self.weight(target)?, in_features, y, accumulate)?;
        Ok(())
    }

    /// dx [N, in] (+ when `accumulate`)= Σ dyₜ·Wₜ over the projections that read x (`dys` in
    /// [`INPUTS`] order) + their group's share, whose gradients accumulate (with the xs its
    /// forward kept); the group's product first, as in [`Self::forward_into`].
    fn backward(
        &mut self,
        targets: &[Target],
        (group, saved): (Option<&mut CudaLoraGroup>, &Option<CudaLoraSaved>),
        x: &CudaSlice<bf16>,
        dys: &[&CudaSlice<bf16>],
        dx: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let mut accumulate = accumulate;
        if let (Some(group), Some(saved)) = (group, saved) {
            let branch_dys = branch_grads(group, targets, dys);
            group.backward(x, saved, &branch_dys, dx, accumulate)?;
            accumulate = true;
        }
        for (&target, dy) in targets.iter().zip(dys) {
            self.backward_input(target, dy, dx, accumulate)?;
            accumulate = true;
        }
        Ok(())
    }

    /// dx (+ when `accumulate`)= dy·W, the frozen part of a projection's input gradient.
    fn backward_input(
        &mut self,
        target: Target,
        dy: &CudaSlice<bf16>,
        dx: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let in_features = target.shape(&self.dims).1;
        let (d, w) = (self.d, self.weight(target)?);
        Ok(linear_backward_input_into(
            d,
            dy,
            w,
            in_features,
            dx,
            accumulate,
        )?)
    }
}

/// A LoRA training run on the GPU.
pub struct CudaTrainer {
    model: CudaLlamaModel,
    lora: Vec<Groups>,
    /// modules_to_save trained whole: [embed_tokens, lm_head] ([V, C] each, f32 masters).
    modules: [Option<CudaTrainable>; 2],
    lora_config: LoraConfig,
    pub config: TrainConfig,
    step: u64,
    /// QLoRA: the frozen projections in NF4 (the model's bf16 copies freed).
    nf4: Option<Nf4Base>,
    /// The layer inputs the forward keeps for the backward, in pinned host memory.
    checkpoints: HostStash<bf16>,
    /// Each layer's [`KeptAttention`] beside its input: the merged heads, q, k and v in slots
    /// 4i to 4i + 3, the log-sum-exp [B, H, T] and mid in slot i of `lses` and `mids`.
    attention: HostStash<bf16>,
    lses: HostStash<f32>,
    mids: HostStash<bf16>,
    /// The most logits one chunk of the head holds ([`Self::set_head_chunk_logits`]).
    head_chunk_logits: usize,
    /// Whether each layer's mid goes to the host ([`Self::set_keep_mid`]); None: as the
    /// shape decides ([`keeps_mid`]).
    keep_mid: Option<bool>,
}

/// The most logits a chunk of the GPU's head holds by default: 64 M (128 MiB in bf16), small
/// enough that the last layer's tape, kept through the head, leaves the step's peak memory
/// where the layers' backward puts it (Llama-3.2-1B and -3-8B shapes: 512-row chunks; 256-row
/// ones ran 2% slower at 1B).
const HEAD_CHUNK_LOGITS: usize = 1 << 26;

/// The frozen projections of every layer in NF4 with double-quantised absmaxes (as
/// bitsandbytes keeps QLoRA's base), dequantised into a bf16 buffer of their size just before
/// each product.
struct Nf4Base {
    layers: Vec<[CudaNf4DoubleQuant; 7]>,
    /// One bf16 buffer per element count (gate, up and down share one: [F, C] and [C, F]);
    /// the stream's order keeps a product's read before the next dequantisation's write.
    copies: HashMap<usize, CudaSlice<bf16>>,
}

/// The frozen weight of `target` in layer `i` as the products read it: the model's bf16
/// matrix, or (QLoRA) its NF4 copy dequantised into the bf16 buffer of its size.
fn frozen<'a>(
    d: &CudaDevice,
    layer: &'a CudaLayer,
    nf4: Option<&'a mut Nf4Base>,
    i: usize,
    target: Target,
) -> Result<&'a CudaSlice<bf16>> {
    let Some(base) = nf4 else {
        let [q, k, v, o] = layer.self_attn.weights();
        return Ok(match target {
            Target::QProj => q,
            Target::KProj => k,
            Target::VProj => v,
            Target::OProj => o,
            Target::GateProj => &layer.gate_proj,
            Target::UpProj => &layer.up_proj,
            Target::DownProj => &layer.down_proj,
        });
    };
    let matrix = &base.layers[i][target as usize];
    let (rows, cols) = matrix.shape();
    let copy = match base.copies.entry(rows * cols) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(d.uninit(rows * cols)?),
    };
    matrix.dequantize_into_bf16(d, copy)?;
    Ok(copy)
}

/// A bf16 device matrix [rows, cols] quantised to NF4 and its absmaxes double-quantised (on
/// the host), then uploaded.
fn to_nf4(
    d: &CudaDevice,
    w: &CudaSlice<bf16>,
    rows: usize,
    cols: usize,
) -> Result<CudaNf4DoubleQuant> {
    let values: Vec<f32> = d.dtoh(w)?.iter().map(|v| v.to_f32()).collect();
    let bytes = llama_ops::quantize(DType::Nf4, &values, cols)?;
    Ok(CudaNf4DoubleQuant::upload(
        d,
        &QuantMatrix::new(DType::Nf4, rows, cols, &bytes)?,
    )?)
}

impl CudaTrainer {
    /// `adapter`'s pairs uploaded beside `model`'s weights.
    pub fn new(
        model: CudaLlamaModel,
        adapter: &LoraAdapter,
        config: TrainConfig,
    ) -> Result<CudaTrainer> {
        if adapter.layers.len() != model.layers.len() {
            return Err(ModelError::input(
                "adapter",
                "its layers do not match the model's".to_string(),
            ));
        }
        config.optimizer.validate()?;
        if adapter.config.lora_dropout > 0.0 {
            return Err(ModelError::input(
                "lora_dropout",
                format!(
                    "{} > 0: the GPU trainer runs the fused LoRA path, which needs 0 \
                     (as Unsloth's); train with dropout on the CPU",
                    adapter.config.lora_dropout
                ),
            ));
        }
        let mut model = model;
        // The step looks up a few thousand rows of the table once: it stays in host memory.
        model.embeddings_to_host()?;
        let device = model.device().clone();
        let lora = adapter
            .layers
            .iter()
            .map(|l| {
                let mut groups: Groups = Default::default();
                for (group, targets) in groups.iter_mut().zip(INPUTS) {
                    let (targets, pairs): (Vec<Target>, Vec<_>) = targets
                        .iter()
                        .filter_map(|&t| l.get(t).map(|p| (t, p)))
                        .unzip();
                    if !pairs.is_empty() {
                        *group = Some(CudaLoraGroup::upload(&device, &targets, &pairs)?);
                    }
                }
                Ok(groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let upload = |w: &Option<Weight>| -> Result<Option<CudaTrainable>> {
            w.as_ref()
                .map(|w| Ok(CudaTrainable::upload(&device, &w.to_f32()?)?))
                .transpose()
        };
        let modules = [
            upload(&adapter.modules.embed_tokens)?,
            upload(&adapter.modules.lm_head)?,
        ];
        Ok(CudaTrainer {
            model,
            lora,
            modules,
            lora_config: adapter.config.clone(),
            config,
            step: 0,
            nf4: None,
            checkpoints: HostStash::new(&device)?,
            attention: HostStash::new(&device)?,
            lses: HostStash::new(&device)?,
            mids: HostStash::new(&device)?,
            head_chunk_logits: HEAD_CHUNK_LOGITS,
            keep_mid: None,
        })
    }

    /// Sets the most logits one chunk of the head holds (memory against launches: the head's
    /// [rows, V] logits exist a chunk at a time); 0 means the default.
    pub fn set_head_chunk_logits(&mut self, logits: usize) {
        self.head_chunk_logits = if logits == 0 {
            HEAD_CHUNK_LOGITS
        } else {
            logits
        };
    }

    /// Whether the forward keeps each layer's residual after the attention on the host, so
    /// that the recompute skips the o projection (copies against a product: the same numbers
    /// either way); None (the default) decides by the model's shape: where its products cover
    /// the copies' time.
    pub fn set_keep_mid(&mut self, keep: Option<bool>) {
        self.keep_mid = keep;
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> usize {
        self.step as usize
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        self.model.device()
    }

    /// Bytes of pinned host memory the trainer holds: the offloaded layer inputs and
    /// attentions (kept between steps) and an untied embedding table.
    pub fn host_pinned_bytes(&self) -> usize {
        let attention =
            self.attention.host_bytes() + self.lses.host_bytes() + self.mids.host_bytes();
        self.checkpoints.host_bytes() + attention + self.model.embeddings_host_bytes()
    }

    /// QLoRA: stores the frozen projections in NF4 on the device (quantised from their bf16
    /// values, the absmaxes double-quantised as bitsandbytes does: 0.52 bytes a weight) and
    /// frees the bf16 ones; each product then dequantises its matrix first. The model can no
    /// longer run inference afterwards (its projections are gone).
    pub fn quantize_base_nf4(&mut self) -> Result<()> {
        if self.nf4.is_some() {
            return Ok(());
        }
        let d = self.device().clone();
        let dims = self.model.config.lora_dims();
        let empty = || d.zeros::<bf16>(1);
        let mut layers = Vec::with_capacity(self.model.layers.len());
        for layer in &mut self.model.layers {
            let [q, k, v, o] =
                layer
                    .self_attn
                    .replace_weights([empty()?, empty()?, empty()?, empty()?]);
            let gate = std::mem::replace(&mut layer.gate_proj, empty()?);
            let up = std::mem::replace(&mut layer.up_proj, empty()?);
            let down = std::mem::replace(&mut layer.down_proj, empty()?);
            let weights = [q, k, v, o, gate, up, down];
            let [q, k, v, o, gate, up, down] = std::array::from_fn(|i| {
                let (rows, cols) = Target::ALL[i].shape(&dims);
                to_nf4(&d, &weights[i], rows, cols)
            });
            layers.push([q?, k?, v?, o?, gate?, up?, down?]);
        }
        self.nf4 = Some(Nf4Base {
            layers,
            copies: HashMap::new(),
        });
        Ok(())
    }

    /// The adapter as trained so far, on the host.
    pub fn adapter(&self) -> Result<LoraAdapter> {
        let layers = self
            .lora
            .iter()
            .map(|groups| {
                let mut layer = LayerLora::default();
                for group in groups.iter().flatten() {
                    for (&t, pair) in group.targets().iter().zip(group.download()?) {
                        layer.0[t as usize] = Some(pair);
                    }
                }
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        let (v, c) = (self.model.config.vocab_size, self.model.config.hidden_size);
        let d = self.device();
        let download = |m: &Option<CudaTrainable>| -> Result<Option<Weight>> {
            m.as_ref()
                .map(|m| Ok(Weight::dense(m.download(d)?, v, c)?))
                .transpose()
        };
        Ok(LoraAdapter {
            config: self.lora_config.clone(),
            layers,
            modules: SavedModules {
                embed_tokens: download(&self.modules[0])?,
                lm_head: download(&self.modules[1])?,
            },
        })
    }

    /// The optimizer's step and AdamW moments on the host, in the CPU trainer's order (A then
    /// B of each pair, layer by layer), as a checkpoint holds them.
    pub fn optimizer_state(&self) -> Result<OptimizerState> {
        let (mut exp_avg, mut exp_avg_sq) = (Vec::new(), Vec::new());
        if matches!(self.config.optimizer, OptimizerKind::AdamW { .. }) {
            let d = self.device();
            let modules = self.modules.iter().flatten().map(|m| m.moments(d));
            let groups = self.groups().map(CudaLoraGroup::moments);
            for moments in groups.chain(modules.map(|m| m.map(|m| vec![m]))) {
                for (m, v) in moments? {
                    exp_avg.push(m);
                    exp_avg_sq.push(v);
                }
            }
        }
        Ok(OptimizerState {
            step: self.step,
            exp_avg,
            exp_avg_sq,
        })
    }

    /// Writes a checkpoint (adapter, optimizer state, trainer_state.json) that either trainer
    /// can resume from.
    pub fn save_checkpoint(&self, dir: &std::path::Path) -> Result<()> {
        write_checkpoint(dir, &self.adapter()?, &self.optimizer_state()?)
    }

    /// Continues from a checkpoint: its step and moments (the adapter's weights are the ones
    /// this trainer was made with, loaded from the same checkpoint).
    pub fn load_state(&mut self, dir: &std::path::Path) -> Result<()> {
        let adamw = matches!(self.config.optimizer, OptimizerKind::AdamW { .. });
        let pairs = self.groups().flat_map(CudaLoraGroup::matrix_sizes);
        let modules = self.modules.iter().flatten().map(CudaTrainable::len);
        let sizes: Vec<usize> = pairs.chain(modules).filter(|_| adamw).collect();
        let state = OptimizerState::load(dir, &sizes)?;
        let d = self.device().clone();
        let mut moments = state.exp_avg.into_iter().zip(state.exp_avg_sq);
        for group in self.lora.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
            let mine: Vec<_> = moments.by_ref().take(2 * group.branches()).collect();
            group.set_moments(&mine)?;
        }
        for (module, (m, v)) in self.modules.iter_mut().flatten().zip(moments) {
            module.set_moments(&d, &m, &v)?;
        }
        self.step = state.step;
        Ok(())
    }

    /// The gradients accumulated since they were last zeroed, on the host.
    pub fn grads(&self) -> Result<AdapterGrads> {
        let layers = self
            .lora
            .iter()
            .map(|groups| {
                let mut out: [Option<llama_peft::LoraGrads>; 7] = Default::default();
                for group in groups.iter().flatten() {
                    for (&t, grads) in group.targets().iter().zip(group.grads()?) {
                        out[t as usize] = Some(grads);
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        let d = self.device();
        let grad = |m: &Option<CudaTrainable>| m.as_ref().map(|m| m.grad(d)).transpose();
        Ok(AdapterGrads {
            layers,
            modules: [grad(&self.modules[0])?, grad(&self.modules[1])?],
        })
    }

    /// Every LoRA group, layer by layer, input by input: the checkpoint's order of the pairs.
    fn groups(&self) -> impl Iterator<Item = &CudaLoraGroup> {
        self.lora.iter().flat_map(|l| l.iter().flatten())
    }

    /// Every trained matrix, for the optimizer: each group's A (stacked) and B's, then the
    /// saved modules (embed_tokens, lm_head).
    fn trainables_mut(&mut self) -> impl Iterator<Item = &mut CudaTrainable> {
        let groups = self.lora.iter_mut().flat_map(|l| l.iter_mut().flatten());
        groups
            .flat_map(CudaLoraGroup::trainables_mut)
            .chain(self.modules.iter_mut().flatten())
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) -> Result<()> {
        let d = self.device().clone();
        Ok(TrainableTable::new(&d, self.trainables_mut(), false)?.zero_grads()?)
    }

    /// One optimizer step over `micro_batches` (each weighted 1/count), as [`crate::Trainer::step`].
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepReport> {
        if micro_batches.is_empty() {
            return Err(ModelError::input(
                "micro_batches",
                "a step needs at least one batch".to_string(),
            ));
        }
        self.zero_grads()?;
        let (mut loss, mut tokens) = (0f32, 0usize);
        let scale = 1.0 / micro_batches.len() as f32;
        for b in micro_batches {
            loss += self.loss_and_grads(b, scale)? * scale;
            tokens += b.ids.len();
        }
        let lr = self.config.schedule.lr_at(self.step as usize);
        let (kind, step, max_norm) = (
            self.config.optimizer,
            self.step + 1,
            self.config.max_grad_norm,
        );
        let adamw = matches!(kind, OptimizerKind::AdamW { .. });
        let d = self.device().clone();
        let table = TrainableTable::new(&d, self.trainables_mut(), adamw)?;
        let grad_norm = table.grad_sumsq()?.sqrt();
        if let Some(max) = max_norm {
            let factor = max / (grad_norm + 1e-6);
            if factor < 1.0 {
                table.scale_grads(factor)?;
            }
        }
        table.update(kind, step, lr)?;
        self.step = step;
        Ok(StepReport {
            step: step as usize,
            loss,
            lr,
            grad_norm,
            tokens,
        })
    }

    /// The batch's loss (HF's shift, mean over scored tokens) and its LoRA gradients times
    /// `scale`, accumulated on the device.
    pub fn loss_and_grads(&mut self, b: &Batch, scale: f32) -> Result<f32> {
        let cfg = self.model.config.clone();
        if b.batch == 0
            || b.ids.is_empty()
            || !b.ids.len().is_multiple_of(b.batch)
            || b.labels.len() != b.ids.len()
        {
            return Err(ModelError::input(
                "batch",
                format!(
                    "{} ids and {} labels do not form {} rows",
                    b.ids.len(),
                    b.labels.len(),
                    b.batch
                ),
            ));
        }
        let seq = b.ids.len() / b.batch;
        if seq > self.model.max_seq_length {
            return Err(ModelError::input(
                "input_ids",
                format!(
                    "{seq} positions do not fit the context of {}",
                    self.model.max_seq_length
                ),
            ));
        }
        let positions: Vec<u32> = (0..seq as u32).collect();
        let d = self.device().clone();
        let mut h = d.uninit::<bf16>(b.ids.len() * cfg.hidden_size)?;
        let embed = self.modules[0].as_ref().map(CudaTrainable::copy);
        self.model.embed_into(embed, &b.ids, &mut h)?;
        // forward, keeping each layer's input and attention, offloaded to the host while the
        // layer runs, and the last layer's tape and input (its backward comes next: no
        // recompute for it)
        let layers = self.lora.len();
        let keep_mid = self.keep_mid.unwrap_or_else(|| keeps_mid(&cfg, seq));
        let (mut last_tape, mut last_input) = (None, None);
        let mut lora_kept: Vec<LoraKept> = Vec::with_capacity(layers);
        // The layer below's copies, waited for (dropped) once this layer's work is queued.
        let mut copying = None;
        for i in 0..layers {
            let input = self.checkpoints.put(i, h)?;
            let mut lora = LoraKept::default();
            let (attention, merged) =
                self.attention_forward(i, input.buffer(), b.batch, &positions, &mut lora)?;
            if i + 1 == layers {
                let mlp = self.mlp_forward(i, input.buffer(), &merged, None, &mut lora)?;
                h = self.layer_output(i, &mlp, &mut lora)?;
                // its input stays too: bringing it back would hold the backward's start
                let tape = Tape {
                    attention,
                    merged,
                    mlp,
                    lora,
                };
                (last_tape, last_input) = (Some(tape), Some(input));
            } else {
                let mut kept = self.keep_attention(i, attention.attend, merged)?;
                // n₁ is read again only by the backward, which recomputes it
                drop(attention.normed1);
                let merged = kept.merged.buffer();
                let mlp = self.mlp_forward(i, input.buffer(), merged, None, &mut lora)?;
                h = self.layer_output(i, &mlp, &mut lora)?;
                if keep_mid {
                    kept.mid = Some(self.mids.put(i, mlp.mid)?);
                }
                lora_kept.push(lora);
                copying = Some((input, kept));
            }
        }
        drop(copying);
        // head
        let targets = shift_labels(&b.labels, seq);
        let (row_losses, mut dh) = self.head_backward(&h, &targets, scale)?;
        drop(h);
        // backward, last layer first, each recomputed from its input and kept attention;
        // those of the layer below come back from the host while this one runs (its mid only
        // once this layer's MLP backward has freed its [N, F] buffers, where the peak is)
        let (mut i, mut next) = (layers, last_input.map(|input| (input, None)));
        while let Some((input, kept)) = next.take() {
            i -= 1;
            next = self.fetch_below(i)?;
            let input = input.wait()?;
            let tape = match (last_tape.take(), kept) {
                (Some(tape), _) => tape,
                (None, kept) => {
                    let kept = kept.ok_or(llama_core::Error::EmptyStashSlot(i))?;
                    let lora = std::mem::take(&mut lora_kept[i]);
                    self.recompute(i, &input, b.batch, &positions, kept, lora)?
                }
            };
            let below = next.as_mut().and_then(|(_, kept)| kept.as_mut());
            let mid_below = below.filter(|_| keep_mid);
            dh = self.layer_backward(i, &input, tape, &dh, mid_below)?;
        }
        // dh is now the gradient of the embeddings: a trained embed_tokens takes it row by row.
        if let Some(embed) = &mut self.modules[0] {
            embed.add_rows(&d, &b.ids, &dh, cfg.hidden_size)?;
        }
        // The loss is read back once the whole step is queued: the one wait is at its end.
        let ignored = CrossEntropyOptions::default().ignore_index;
        let scored = targets.iter().filter(|&&t| t != ignored).count();
        let loss_sum: f64 = d.dtoh(&row_losses)?.iter().map(|&l| f64::from(l)).sum();
        Ok(if scored == 0 {
            0.0
        } else {
            (loss_sum / scored as f64) as f32
        })
    }

    /// Starts bringing back the input of the layer below layer i (none below layer 0) and its
    /// kept attention (but for mid: [`Self::layer_backward`]).
    fn fetch_below(&mut self, i: usize) -> Result<Option<Fetched>> {
        let Some(j) = i.checked_sub(1) else {
            return Ok(None);
        };
        let get = |slot: usize| self.attention.get(4 * j + slot);
        let kept = KeptAttention {
            merged: get(0)?,
            qkv: [get(1)?, get(2)?, get(3)?],
            lse: self.lses.get(j)?,
            mid: None,
        };
        Ok(Some((self.checkpoints.get(j)?, Some(kept))))
    }

    /// Starts layer i's attention output and saved buffers on their way to the host; the
    /// output stays readable while its copy runs.
    fn keep_attention(
        &mut self,
        i: usize,
        attend: CudaAttendSaved<bf16>,
        merged: CudaSlice<bf16>,
    ) -> Result<KeptAttention> {
        let AttendBuffers { q, k, v, lse } = attend.into_buffers();
        let mut put = |slot: usize, buffer| self.attention.put(4 * i + slot, buffer);
        let (merged, qkv) = (put(0, merged)?, [put(1, q)?, put(2, k)?, put(3, v)?]);
        Ok(KeptAttention {
            merged,
            qkv,
            lse: self.lses.put(i, lse)?,
            mid: None,
        })
    }

    /// Layer i's first half over x [N, C]: n₁ = rms_norm(x), q, k, v = its projections of n₁
    /// (their branches' xs kept in `lora`) and the attention over them → its tape and the
    /// merged heads.
    fn attention_forward(
        &mut self,
        i: usize,
        x: &CudaSlice<bf16>,
        batch: usize,
        positions: &[u32],
        lora: &mut LoraKept,
    ) -> Result<(AttentionTape, CudaSlice<bf16>)> {
        let dims = self.model.config.lora_dims();
        let d = self.model.device().clone();
        let normed1 = self.normed1(i, x)?;
        let layer: &mut CudaLayer = &mut self.model.layers[i];
        let group = self.lora[i][NORMED1].as_ref();
        let mut w = FrozenWeights::new(&d, layer, self.nf4.as_mut(), i, dims);
        let kept = &mut lora[NORMED1];
        let [q, k, v] = [Target::QProj, Target::KProj, Target::VProj]
            .map(|t| w.forward(t, (group, &mut *kept), &normed1));
        let (merged, attend) = layer.self_attn.attend([&q?, &k?, &v?], batch, positions)?;
        Ok((AttentionTape { normed1, attend }, merged))
    }

    /// n₁ = rms_norm(x), layer i's attention input.
    fn normed1(&self, i: usize, x: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
        let d = self.model.device();
        let mut normed1 = d.uninit::<bf16>(x.len())?;
        let (weight, eps) = (
            &self.model.layers[i].input_layernorm,
            self.model.config.rms_norm_eps,
        );
        rms_norm(d, x, weight, eps, &mut normed1)?;
        Ok(normed1)
    }

    /// Layer i's tape again for its backward, from its input x, its kept attention and its
    /// branches' kept xs: n₁ (what the q, k, v branches' gradients read), then the second half
    /// as the forward ran it.
    fn recompute(
        &mut self,
        i: usize,
        x: &CudaSlice<bf16>,
        batch: usize,
        positions: &[u32],
        kept: KeptAttention,
        mut lora: LoraKept,
    ) -> Result<Tape> {
        let (merged, buffers, mid) = kept.wait()?;
        let normed1 = self.normed1(i, x)?;
        let attend = self.model.layers[i]
            .self_attn
            .attend_saved(buffers, batch, positions)?;
        let mlp = self.mlp_forward(i, x, &merged, mid, &mut lora)?;
        Ok(Tape {
            attention: AttentionTape { normed1, attend },
            merged,
            mlp,
            lora,
        })
    }

    /// Layer i's second half up to the down projection, over its input x [N, C] and the
    /// merged heads: mid = x + o(merged) (unless the forward kept it: `kept_mid`),
    /// n₂ = rms_norm(mid), gate and up of n₂ (their branches' xs taken from `lora`, or kept
    /// there). The layer's output is left to [`Self::layer_output`] (a recompute for the
    /// backward never reads it).
    fn mlp_forward(
        &mut self,
        i: usize,
        x: &CudaSlice<bf16>,
        merged: &CudaSlice<bf16>,
        kept_mid: Option<CudaSlice<bf16>>,
        lora: &mut LoraKept,
    ) -> Result<MlpTape> {
        let eps = self.model.config.rms_norm_eps;
        let dims = self.model.config.lora_dims();
        let d = self.model.device().clone();
        let layer: &CudaLayer = &self.model.layers[i];
        let [o_group, mlp_group] = [MERGED, NORMED2].map(|j| self.lora[i][j].as_ref());
        let mut w = FrozenWeights::new(&d, layer, self.nf4.as_mut(), i, dims);
        let mid = match kept_mid {
            Some(mid) => mid,
            None => {
                // mid = x + o(merged): the product adds onto a copy of x
                let mut mid = d.stream().clone_dtod(x).map_err(cuda_err("clone_dtod"))?;
                let o = (o_group, &mut lora[MERGED]);
                w.forward_into(Target::OProj, o, merged, &mut mid, true)?;
                mid
            }
        };
        let mut normed2 = d.uninit::<bf16>(x.len())?;
        rms_norm(&d, &mid, &layer.post_attention_layernorm, eps, &mut normed2)?;
        let kept = &mut lora[NORMED2];
        let [gate, up] = [Target::GateProj, Target::UpProj]
            .map(|t| w.forward(t, (mlp_group, &mut *kept), &normed2));
        Ok(MlpTape {
            mid,
            normed2,
            gate: gate?,
            up: up?,
        })
    }

    /// Layer i's output from its tape: mid + down(h), h = act(gate) ⊙ up, the product adding
    /// onto a copy of mid (the down branch's xs kept in `lora`).
    fn layer_output(
        &mut self,
        i: usize,
        tape: &MlpTape,
        lora: &mut LoraKept,
    ) -> Result<CudaSlice<bf16>> {
        let dims = self.model.config.lora_dims();
        let act = self.model.config.hidden_act;
        let d = self.model.device().clone();
        let mut h = d.uninit::<bf16>(tape.gate.len())?;
        gated_forward(&d, act, &tape.gate, &tape.up, &mut h)?;
        let mut out = d
            .stream()
            .clone_dtod(&tape.mid)
            .map_err(cuda_err("clone_dtod"))?;
        let layer = &self.model.layers[i];
        let mut w = FrozenWeights::new(&d, layer, self.nf4.as_mut(), i, dims);
        let down = (self.lora[i][HIDDEN].as_ref(), &mut lora[HIDDEN]);
        w.forward_into(Target::DownProj, down, &h, &mut out, true)?;
        Ok(out)
    }

    /// Backward of layer i for dout [N, C] (the gradient of its output), given its input x:
    /// returns the gradient of x; LoRA gradients accumulated. The tape is used up: the MLP's
    /// [N, F] buffers turn into their own gradients. Once they are freed, `mid_below` (the
    /// layer below's kept attention, when its mid was kept) starts bringing mid back.
    fn layer_backward(
        &mut self,
        i: usize,
        x: &CudaSlice<bf16>,
        tape: Tape,
        dout: &CudaSlice<bf16>,
        mid_below: Option<&mut KeptAttention>,
    ) -> Result<CudaSlice<bf16>> {
        let (eps, act) = (self.model.config.rms_norm_eps, self.model.config.hidden_act);
        let dims = self.model.config.lora_dims();
        let d = self.model.device().clone();
        let layer: &mut CudaLayer = &mut self.model.layers[i];
        let nf4 = &mut self.nf4;
        let [qkv_group, o_group, mlp_group, down_group] =
            self.lora[i].each_mut().map(Option::as_mut);
        let Tape {
            attention,
            merged,
            mlp: tape,
            lora,
        } = tape;
        let [qkv_s, o_s, mlp_s, down_s] = &lora;
        let mut w = FrozenWeights::new(&d, layer, nf4.as_mut(), i, dims);
        // out = mid + down(h), h = act(gate(n₂)) ⊙ up(n₂), n₂ = rms_norm(mid). As Unsloth's
        // LoRA_MLP: dh first (the down branch's part of it needs no h), then one kernel turns
        // gate, up and dh into d_gate, d_up and h, which the down branch's gradients read.
        let mut d_h = d.uninit::<bf16>(tape.gate.len())?;
        let g_down = down_group
            .as_ref()
            .map(|g| g.backward_input(&[dout], &mut d_h, false));
        let g_down = g_down.transpose()?;
        w.backward_input(Target::DownProj, dout, &mut d_h, g_down.is_some())?;
        let (mut d_gate, mut d_up) = (tape.gate, tape.up);
        gated_backward_in_place(&d, act, &mut d_gate, &mut d_up, &mut d_h)?;
        let h = d_h;
        if let (Some(group), Some(g), Some(saved)) = (down_group, &g_down, down_s) {
            group.backward_weights(&h, saved, g, &[dout])?;
        }
        drop((h, g_down));
        let mut d_normed = d.uninit::<bf16>(dout.len())?;
        let mlp = (mlp_group, mlp_s);
        let d_mlp = [&d_gate, &d_up];
        w.backward(
            INPUTS[NORMED2],
            mlp,
            &tape.normed2,
            &d_mlp,
            &mut d_normed,
            false,
        )?;
        drop((d_gate, d_up));
        if let (Some(kept), Some(below)) = (mid_below, i.checked_sub(1)) {
            kept.mid = Some(self.mids.get(below)?);
        }
        // d_mid = the norm's input gradient + dout (the residual path), in one kernel
        let mut d_mid = d.uninit::<bf16>(dout.len())?;
        let ln2 = &layer.post_attention_layernorm;
        rms_norm_backward_input(&d, &tape.mid, ln2, &d_normed, Some(dout), eps, &mut d_mid)?;
        // mid = x + o(attend(qkv(n₁))), n₁ = rms_norm(x)
        let mut d_merged = d.uninit::<bf16>(merged.len())?;
        let o = (o_group, o_s);
        w.backward(INPUTS[MERGED], o, &merged, &[&d_mid], &mut d_merged, false)?;
        let [dq, dk, dv] =
            layer
                .self_attn
                .attend_backward(&attention.attend, &merged, &d_merged)?;
        drop(d_merged);
        let mut w = FrozenWeights::new(&d, layer, nf4.as_mut(), i, dims);
        let (n1, qkv) = (&attention.normed1, (qkv_group, qkv_s));
        w.backward(
            INPUTS[NORMED1],
            qkv,
            n1,
            &[&dq, &dk, &dv],
            &mut d_normed,
            false,
        )?;
        let mut dx = d.uninit::<bf16>(dout.len())?;
        let ln1 = &layer.input_layernorm;
        rms_norm_backward_input(&d, x, ln1, &d_normed, Some(&d_mid), eps, &mut dx)?;
        Ok(dx)
    }

    /// The lm_head the loss reads: the trained copy (modules_to_save) or the model's.
    fn lm_head(&self) -> &CudaSlice<bf16> {
        self.modules[1]
            .as_ref()
            .map_or(&self.model.lm_head, CudaTrainable::copy)
    }

    /// The final norm, the lm_head and cross entropy of the last hidden states h [N, C]
    /// against `targets` [N]: each row's loss [N] (0 where not scored; left on the device) and
    /// the gradient of h [N, C] times `scale`, a chunk of rows at a time: neither the [N, V]
    /// logits nor the normed rows and their gradient exist beyond a chunk (rows of chunks with
    /// no scored target get a zero gradient). A trained lm_head's gradient
    /// (dW += dlogitsᵀ·normed) accumulates chunk by chunk.
    fn head_backward(
        &mut self,
        h: &CudaSlice<bf16>,
        targets: &[i64],
        scale: f32,
    ) -> Result<(CudaSlice<f32>, CudaSlice<bf16>)> {
        let d = &self.model.device().clone();
        let (c, v) = (self.model.config.hidden_size, self.model.config.vocab_size);
        let eps = self.model.config.rms_norm_eps;
        let opts = CrossEntropyOptions::default();
        let scored = targets.iter().filter(|&&t| t != opts.ignore_index).count();
        let mut dh = d.zeros::<bf16>(h.len())?;
        let mut row_losses = d.zeros::<f32>(targets.len().max(1))?;
        let rows = head_chunk_rows(v, targets.len(), self.head_chunk_logits, 128);
        for (chunk, t) in targets.chunks(rows).enumerate() {
            if t.iter().all(|&t| t == opts.ignore_index) {
                continue;
            }
            let (first, n) = (chunk * rows, t.len());
            let span = first * c..(first + n) * c;
            let mut h_rows = d.uninit::<bf16>(n * c)?;
            d.stream()
                .memcpy_dtod(&h.slice(span.clone()), &mut h_rows)
                .map_err(cuda_err("memcpy_dtod"))?;
            let mut x = d.uninit::<bf16>(n * c)?;
            rms_norm(d, &h_rows, &self.model.norm, eps, &mut x)?;
            let mut logits = d.uninit::<bf16>(n * v)?;
            linear(d, &x, self.lm_head(), c, &mut logits)?;
            let ce = cross_entropy(d, &logits, t, &opts)?;
            cross_entropy_backward(
                d,
                &mut logits,
                &ce,
                scale * ce.n_valid as f32 / scored as f32,
                &opts,
            )?;
            if let Some(head) = &mut self.modules[1] {
                linear_backward_weight(d, &logits, &x, c, head.grad_mut())?;
            }
            // x becomes the normed rows' gradient
            linear_backward_input(d, &logits, self.lm_head(), c, &mut x)?;
            let mut dh_rows = d.uninit::<bf16>(n * c)?;
            let norm = &self.model.norm;
            rms_norm_backward_input(d, &h_rows, norm, &x, None, eps, &mut dh_rows)?;
            d.stream()
                .memcpy_dtod(&dh_rows, &mut dh.slice_mut(span))
                .map_err(cuda_err("memcpy_dtod"))?;
            d.stream()
                .memcpy_dtod(
                    &ce.row_losses().slice(..n),
                    &mut row_losses.slice_mut(first..first + n),
                )
                .map_err(cuda_err("memcpy_dtod"))?;
        }
        Ok((row_losses, dh))
    }
}

#[cfg(test)]
mod tests {
    use super::keeps_mid;
    use crate::ModelShape;

    #[test]
    fn mid_is_kept_where_the_products_cover_its_copy() {
        let config = |shape: ModelShape| shape.config().expect("a built-in shape's config");
        assert!(keeps_mid(&config(ModelShape::Llama3_8b), 2048));
        assert!(!keeps_mid(&config(ModelShape::Llama32_1b), 2048));
        assert!(!keeps_mid(&config(ModelShape::Smollm2_135m), 512));
    }
}
