//! LoRA on a CUDA device, as Unsloth trains it: f32 master weights and AdamW state, bf16 copies
//! for the products (cuBLAS, f32 accumulation), bf16 activations, f32 gradients. The same
//! arithmetic as [`crate::LoraPair`], step for step (`kernels/lora.cu` for the rest):
//!
//!   forward:  xs = s·(x·Aᵀ) [M, r];  y (+)= xs·Bᵀ
//!   backward: g = s·(dy·B) [M, r];  dA += gᵀ·x,  dB += dyᵀ·xs,  dx (+)= g·A

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};
use llama_core::bf16;
use llama_core::cuda::{CudaDevice, KernelSource};
use llama_ops::cuda::{
    linear_backward_input_into, linear_backward_input_scaled, linear_backward_weight, linear_into,
    linear_scaled,
};

use crate::error::{shape_error, Result};
use crate::lora::{LoraGrads, LoraPair};
use crate::optim::OptimizerKind;

static LORA: KernelSource = KernelSource {
    name: "lora",
    code: include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../kernels/lora.cu"
    )),
};

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launched(kernel: &str, r: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
    r.map_err(|e| llama_core::Error::cuda(kernel, e).into())
}

/// dst[..n] = bf16(src[..n]).
fn to_bf16(
    device: &CudaDevice,
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<bf16>,
    n: usize,
) -> Result<()> {
    if n > src.len() || n > dst.len() {
        return shape_error(
            "to_bf16",
            format!("{n} values from {} into {}", src.len(), dst.len()),
        );
    }
    let f = device.function(&LORA, "lora_to_bf16")?;
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(src).arg(dst).arg(&n);
    // SAFETY: both buffers hold at least n values (checked).
    launched(
        "lora_to_bf16",
        unsafe { launch.launch(grid(n)) }.map(|_| ()),
    )
}

/// A trained matrix on a device: the f32 master, its bf16 copy for the products, its f32
/// gradient and AdamW moments. Each of a LoRA pair's A and B is one, and so is each module of
/// `modules_to_save` (embed_tokens, lm_head) the GPU trainer trains.
pub struct CudaTrainable {
    master: CudaSlice<f32>,
    copy: CudaSlice<bf16>,
    grad: CudaSlice<f32>,
    moments: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

impl CudaTrainable {
    pub fn upload(device: &CudaDevice, values: &[f32]) -> Result<CudaTrainable> {
        let mut m = CudaTrainable {
            master: device.htod(values)?,
            copy: device.zeros(values.len())?,
            grad: device.zeros(values.len())?,
            moments: None,
        };
        m.refresh(device)?;
        Ok(m)
    }

    /// How many weights it holds.
    pub fn len(&self) -> usize {
        self.master.len()
    }

    pub fn is_empty(&self) -> bool {
        self.master.is_empty()
    }

    /// The bf16 copy of the master weights the products read.
    pub fn copy(&self) -> &CudaSlice<bf16> {
        &self.copy
    }

    /// The f32 gradient, accumulated into by the backward.
    pub fn grad_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.grad
    }

    /// The master weights on the host.
    pub fn download(&self, device: &CudaDevice) -> Result<Vec<f32>> {
        Ok(device.dtoh(&self.master)?)
    }

    /// The gradient on the host.
    pub fn grad(&self, device: &CudaDevice) -> Result<Vec<f32>> {
        Ok(device.dtoh(&self.grad)?)
    }

    /// AdamW's moments (m, v) on the host; zeros before the first AdamW update.
    pub fn moments(&self, device: &CudaDevice) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(match &self.moments {
            Some((m, v)) => (device.dtoh(m)?, device.dtoh(v)?),
            None => (vec![0.0; self.master.len()], vec![0.0; self.master.len()]),
        })
    }

    /// Restores the moments [`Self::moments`] gave (a checkpoint's).
    pub fn set_moments(&mut self, device: &CudaDevice, m: &[f32], v: &[f32]) -> Result<()> {
        let n = self.master.len();
        if m.len() != n || v.len() != n {
            return shape_error(
                "CudaTrainable::set_moments",
                format!(
                    "moments of {} and {} values for {n} weights",
                    m.len(),
                    v.len()
                ),
            );
        }
        self.moments = Some((device.htod(m)?, device.htod(v)?));
        Ok(())
    }

    /// copy = bf16(master).
    fn refresh(&mut self, device: &CudaDevice) -> Result<()> {
        to_bf16(device, &self.master, &mut self.copy, self.master.len())
    }

    /// The gradient of an embedding lookup: row ids[r] of this [vocab, cols] gradient += row r
    /// of dh [N, cols]. Ids past the table are an error.
    pub fn add_rows(
        &mut self,
        device: &CudaDevice,
        ids: &[u32],
        dh: &CudaSlice<bf16>,
        cols: usize,
    ) -> Result<()> {
        let vocab = self.grad.len() / cols.max(1);
        if dh.len() != ids.len() * cols || ids.iter().any(|&id| id as usize >= vocab) {
            return shape_error(
                "CudaTrainable::add_rows",
                format!(
                    "{} ids and {} gradient values for a [{vocab}, {cols}] table",
                    ids.len(),
                    dh.len()
                ),
            );
        }
        if dh.is_empty() {
            return Ok(());
        }
        let ids_dev = device.htod(ids)?;
        let f = device.function(&LORA, "lora_add_rows")?;
        let rows = ids.len();
        let mut launch = device.stream().launch_builder(&f);
        launch
            .arg(&mut self.grad)
            .arg(&ids_dev)
            .arg(dh)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: grad holds vocab · cols values and every id is below vocab; dh holds rows ·
        // cols (checked).
        launched(
            "lora_add_rows",
            unsafe { launch.launch(grid(rows * cols)) }.map(|_| ()),
        )
    }
}

/// Values per chunk of a [`TrainableTable`] launch (`TABLE_CHUNK` in kernels/lora.cu).
const TABLE_CHUNK: usize = 4096;
/// Blocks per table launch at most; each strides over the chunks.
const TABLE_BLOCKS: usize = 4096;

/// Trained matrices' device buffers as one table on the device: zeroing the gradients, their
/// squared norm, clipping and the optimizer's update (with the bf16 copies' refresh) are one
/// launch each over all of them, PyTorch's multi-tensor apply, where one per matrix took ~900
/// launches a step at Llama-3.2-1B. The table holds the buffers' addresses, so it borrows the
/// matrices for as long as it lives.
pub struct TrainableTable<'a> {
    device: &'a CudaDevice,
    /// Per matrix: master, grad, m, v (0 without AdamW moments), copy, n, first chunk.
    entries: CudaSlice<u64>,
    count: u32,
    chunks: usize,
    adamw: bool,
    _trainables: PhantomData<&'a mut CudaTrainable>,
}

/// A buffer's device address.
fn address<T>(buffer: &CudaSlice<T>, device: &CudaDevice) -> u64 {
    buffer.device_ptr(device.stream()).0
}

impl<'a> TrainableTable<'a> {
    /// The table of `trainables` (empty ones left out); with `adamw`, AdamW moments are made
    /// first where missing (zeros, as torch starts them).
    pub fn new(
        device: &'a CudaDevice,
        trainables: impl Iterator<Item = &'a mut CudaTrainable>,
        adamw: bool,
    ) -> Result<TrainableTable<'a>> {
        let (mut entries, mut chunks, mut count) = (Vec::new(), 0usize, 0u32);
        for t in trainables.filter(|t| !t.is_empty()) {
            let n = t.len();
            if adamw && t.moments.is_none() {
                t.moments = Some((device.zeros(n)?, device.zeros(n)?));
            }
            let (m, v) = t
                .moments
                .as_ref()
                .map_or((0, 0), |(m, v)| (address(m, device), address(v, device)));
            let (master, grad) = (address(&t.master, device), address(&t.grad, device));
            let copy = address(&t.copy, device);
            entries.extend([master, grad, m, v, copy, n as u64, chunks as u64]);
            chunks += n.div_ceil(TABLE_CHUNK);
            count += 1;
        }
        Ok(TrainableTable {
            device,
            entries: device.htod(&entries)?,
            count,
            chunks,
            adamw,
            _trainables: PhantomData,
        })
    }

    /// Runs `kernel` over the table with `args` after the table's own.
    fn launch(&self, kernel: &str, args: &[&dyn Arg]) -> Result<()> {
        if self.chunks == 0 {
            return Ok(());
        }
        let f = self.device.function(&LORA, kernel)?;
        let mut launch = self.device.stream().launch_builder(&f);
        launch.arg(&self.entries).arg(&self.count).arg(&self.chunks);
        for a in args {
            a.push(&mut launch);
        }
        let config = LaunchConfig {
            grid_dim: (self.chunks.min(TABLE_BLOCKS) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every entry holds the addresses of buffers the table borrows for its
        // lifetime, each of n values (master, grad, copy; the moments when not 0, and the
        // update kernel that reads them runs only on an AdamW table); the chunks cover each
        // entry's n values and no more; the arguments after the table's are the kernel's.
        launched(kernel, unsafe { launch.launch(config) }.map(|_| ()))
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&self) -> Result<()> {
        self.launch("lora_zero_grads", &[])
    }

    /// Σ g² over every gradient, on the host (waits for the device).
    pub fn grad_sumsq(&self) -> Result<f32> {
        let mut acc = self.device.zeros::<f32>(1)?;
        self.launch("lora_grad_sumsq", &[&Out(&mut acc)])?;
        Ok(self.device.dtoh(&acc)?[0])
    }

    /// Multiplies every gradient by `factor` (clipping).
    pub fn scale_grads(&self, factor: f32) -> Result<()> {
        self.launch("lora_scale_grads", &[&factor])
    }

    /// One optimizer update of every matrix (step counts from 1), each bf16 copy refreshed.
    pub fn update(&self, kind: OptimizerKind, step: u64, lr: f32) -> Result<()> {
        match kind {
            OptimizerKind::AdamW {
                betas: (b1, b2),
                eps,
                weight_decay,
            } => {
                if !self.adamw {
                    return shape_error(
                        "TrainableTable::update",
                        "an AdamW update on a table made without moments".to_string(),
                    );
                }
                let t = step as i32;
                let step_size = lr / (1.0 - b1.powi(t));
                let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
                let args: [&dyn Arg; 7] =
                    [&lr, &b1, &b2, &eps, &weight_decay, &step_size, &bias2_sqrt];
                self.launch("lora_adamw", &args)
            }
            OptimizerKind::Sgd { weight_decay } => self.launch("lora_sgd", &[&lr, &weight_decay]),
        }
    }
}

/// A kernel argument after the table's: an f32 value or an f32 output buffer.
trait Arg {
    fn push<'b>(&'b self, launch: &mut LaunchArgs<'b>);
}

impl Arg for f32 {
    fn push<'b>(&'b self, launch: &mut LaunchArgs<'b>) {
        launch.arg(self);
    }
}

/// An output buffer argument: held exclusively while the kernel writes it (cudarc passes a
/// buffer's address the same way for either borrow).
struct Out<'a>(&'a mut CudaSlice<f32>);

impl Arg for Out<'_> {
    fn push<'b>(&'b self, launch: &mut LaunchArgs<'b>) {
        launch.arg(&*self.0);
    }
}

/// A [`LoraPair`] on a device, with its gradients and optimizer state.
pub struct CudaLoraPair {
    device: Arc<CudaDevice>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scaling: f32,
    a: CudaTrainable,
    b: CudaTrainable,
}

/// What [`CudaLoraPair::forward_into`] keeps: xs = s·(x·Aᵀ), [M, r] in bf16.
pub struct CudaLoraSaved {
    xs: CudaSlice<bf16>,
}

/// What [`CudaLoraPair::backward_input`] hands on: g = s·(dy·B), [M, r] in bf16.
pub struct CudaLoraDy {
    g: CudaSlice<bf16>,
}

impl CudaLoraPair {
    pub fn upload(device: &Arc<CudaDevice>, pair: &LoraPair) -> Result<CudaLoraPair> {
        Ok(CudaLoraPair {
            device: device.clone(),
            rank: pair.rank,
            in_features: pair.in_features,
            out_features: pair.out_features,
            scaling: pair.scaling,
            a: CudaTrainable::upload(device, &pair.a)?,
            b: CudaTrainable::upload(device, &pair.b)?,
        })
    }

    /// The master weights, back on the host.
    pub fn download(&self) -> Result<LoraPair> {
        let d = &self.device;
        let (a, b) = (self.a.download(d)?, self.b.download(d)?);
        LoraPair::from_parts(
            a,
            b,
            self.rank,
            self.in_features,
            self.out_features,
            self.scaling,
        )
    }

    /// The accumulated gradients, on the host.
    pub fn grads(&self) -> Result<LoraGrads> {
        Ok(LoraGrads {
            a: self.a.grad(&self.device)?,
            b: self.b.grad(&self.device)?,
        })
    }

    /// A and B, for the optimizer.
    pub fn trainables(&self) -> [&CudaTrainable; 2] {
        [&self.a, &self.b]
    }

    pub fn trainables_mut(&mut self) -> [&mut CudaTrainable; 2] {
        [&mut self.a, &mut self.b]
    }

    fn rows(&self, op: &'static str, x: usize, y: usize) -> Result<usize> {
        let (k, n) = (self.in_features, self.out_features);
        if x % k != 0 || y != x / k * n {
            return shape_error(
                op,
                format!("x holds {x} and y {y} values for a [{n}, {k}] projection"),
            );
        }
        Ok(x / k)
    }

    /// y [M, N] (+ when `accumulate`)= s·(x·Aᵀ)·Bᵀ for x [M, K]. The trainer writes the branch
    /// first and lets the frozen product add onto it (cuBLAS reads y once, in the big product's
    /// epilogue), so the rank-r product only writes y.
    pub fn forward_into(
        &self,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<CudaLoraSaved> {
        self.rows("CudaLoraPair::forward_into", x.len(), y.len())?;
        let saved = self.forward_saved(x)?;
        self.forward_kept(&saved, y, accumulate)?;
        Ok(saved)
    }

    /// y [M, N] (+ when `accumulate`)= xs·Bᵀ from the xs an earlier [`Self::forward_into`]
    /// kept: a recomputed forward, whose input product need not run again.
    pub fn forward_kept(
        &self,
        saved: &CudaLoraSaved,
        y: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let (r, n) = (self.rank, self.out_features);
        let m = saved.xs.len() / r.max(1);
        if saved.xs.len() != m * r || y.len() != m * n {
            return shape_error(
                "CudaLoraPair::forward_kept",
                format!(
                    "xs holds {} and y {} values for rank {r} and {n} outputs",
                    saved.xs.len(),
                    y.len()
                ),
            );
        }
        linear_into(&self.device, &saved.xs, &self.b.copy, r, y, accumulate)?;
        Ok(())
    }

    /// Only what [`Self::backward`] reads of the forward, xs = s·(x·Aᵀ).
    fn forward_saved(&self, x: &CudaSlice<bf16>) -> Result<CudaLoraSaved> {
        let rows = x.len() / self.in_features.max(1);
        let m = self.rows(
            "CudaLoraPair::forward_saved",
            x.len(),
            rows * self.out_features,
        )?;
        let d = &*self.device;
        let mut xs = d.uninit::<bf16>(m * self.rank)?;
        linear_scaled(d, x, &self.a.copy, self.in_features, &mut xs, self.scaling)?;
        Ok(CudaLoraSaved { xs })
    }

    /// Backward of [`Self::forward_into`] for dy [M, N]: dx [M, K] (+ when `accumulate`)=
    /// s·(dy·B)·A; the gradients of A and B accumulated (f32).
    pub fn backward(
        &mut self,
        x: &CudaSlice<bf16>,
        saved: &CudaLoraSaved,
        dy: &CudaSlice<bf16>,
        dx: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        self.rows("CudaLoraPair::backward", x.len(), dy.len())?;
        let g = self.backward_input(dy, dx, accumulate)?;
        self.weight_grads(x, &g, &saved.xs, dy)
    }

    /// The part of the backward that needs no input, for a forward whose input is not kept
    /// (the MLP's h, recomputed later in the buffer of its gradient): dx [M, K] (+ when
    /// `accumulate`)= s·(dy·B)·A. Returns g = s·dy·B for [`Self::backward_weights`].
    pub fn backward_input(
        &self,
        dy: &CudaSlice<bf16>,
        dx: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<CudaLoraDy> {
        let m = self.rows("CudaLoraPair::backward_input", dx.len(), dy.len())?;
        let d = &*self.device;
        let (r, k) = (self.rank, self.in_features);
        // g = s·dy·B [M, r]: dy [M, N] times B [N, r] is dy·Wᵀ with W = Bᵀ; as a backward-input
        // product it is dy · B with B read as [N, r].
        let mut g = d.uninit::<bf16>(m * r)?;
        linear_backward_input_scaled(d, dy, &self.b.copy, r, &mut g, self.scaling)?;
        linear_backward_input_into(d, &g, &self.a.copy, k, dx, accumulate)?;
        Ok(CudaLoraDy { g })
    }

    /// The rest of the backward once the input x is back: dA += gᵀ·x and dB += dyᵀ·xs, with
    /// the xs the forward kept.
    pub fn backward_weights(
        &mut self,
        x: &CudaSlice<bf16>,
        saved: &CudaLoraSaved,
        g: &CudaLoraDy,
        dy: &CudaSlice<bf16>,
    ) -> Result<()> {
        self.rows("CudaLoraPair::backward_weights", x.len(), dy.len())?;
        self.weight_grads(x, g, &saved.xs, dy)
    }

    /// dA += gᵀ·x, dB += dyᵀ·xs (f32).
    fn weight_grads(
        &mut self,
        x: &CudaSlice<bf16>,
        g: &CudaLoraDy,
        xs: &CudaSlice<bf16>,
        dy: &CudaSlice<bf16>,
    ) -> Result<()> {
        let d = &*self.device;
        linear_backward_weight(d, &g.g, x, self.in_features, &mut self.a.grad)?;
        linear_backward_weight(d, dy, xs, self.rank, &mut self.b.grad)?;
        Ok(())
    }
}
