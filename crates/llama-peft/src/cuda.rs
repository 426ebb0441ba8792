//! LoRA on a CUDA device, as Unsloth trains it: f32 master weights and AdamW state, bf16 copies
//! for the products (cuBLAS, f32 accumulation), bf16 activations, f32 gradients. The same
//! arithmetic as [`crate::LoraPair`], step for step, for the pairs that read one input at once
//! ([`CudaLoraGroup`]; `kernels/lora.cu` for the rest):
//!
//!   forward:  xs = s·(x·Aᵀ) [M, r];  y (+)= xs·Bᵀ
//!   backward: g = s·(dy·B) [M, r];  dA += gᵀ·x,  dB += dyᵀ·xs,  dx (+)= g·A

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};
use llama_core::bf16;
use llama_core::cuda::{CudaDevice, KernelSource};
use llama_ops::cuda::{
    linear_backward_input_into, linear_backward_input_scaled, linear_backward_weight,
    linear_backward_weight_cols, linear_cols_into, linear_scaled, Cols,
};

use crate::error::{shape_error, Result};
use crate::lora::{LoraGrads, LoraPair};
use crate::optim::OptimizerKind;
use crate::Target;

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

    /// Blocks a launch over the table runs: one per chunk, at most [`TABLE_BLOCKS`].
    fn blocks(&self) -> usize {
        self.chunks.min(TABLE_BLOCKS)
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
            grid_dim: (self.blocks() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every entry holds the addresses of buffers the table borrows for its
        // lifetime, each of n values (master, grad, copy; the moments when not 0, and the
        // update kernel that reads them runs only on an AdamW table); the chunks cover each
        // entry's n values and no more; the arguments after the table's are the kernel's (the
        // sum's output holds a value for each of the launch's blocks).
        launched(kernel, unsafe { launch.launch(config) }.map(|_| ()))
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&self) -> Result<()> {
        self.launch("lora_zero_grads", &[])
    }

    /// Σ g² over every gradient, on the host (waits for the device): each block's sum, added
    /// in block order (the same from run to run).
    pub fn grad_sumsq(&self) -> Result<f32> {
        if self.chunks == 0 {
            return Ok(0.0);
        }
        let mut partial = self.device.uninit::<f32>(self.blocks())?;
        self.launch("lora_grad_sumsq", &[&Out(&mut partial)])?;
        let sums = self.device.dtoh(&partial)?;
        Ok(sums.iter().map(|&s| f64::from(s)).sum::<f64>() as f32)
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

/// LoRA pairs of one layer that read the same input x [M, K] — q, k and v; gate and up; or one
/// projection alone — on a device, with their gradients and optimizer state: Unsloth's
/// LoRA_QKV and LoRA_MLP steps, with the A matrices also stacked, A = [A₁; …; A_g] [g·r, K], so
/// that one product gives every branch's xs, one their dA and one their share of dx (x read
/// once, dx written once):
///
///   forward:  xs = s·(x·Aᵀ) [M, g·r];  yⱼ (+)= xsⱼ·Bⱼᵀ
///   backward: gⱼ = s·(dyⱼ·Bⱼ), side by side in G [M, g·r];  dx (+)= G·A;  dA += Gᵀ·x;
///             dBⱼ += dyⱼᵀ·xsⱼ
pub struct CudaLoraGroup {
    device: Arc<CudaDevice>,
    pub rank: usize,
    pub in_features: usize,
    pub scaling: f32,
    /// Each branch's projection and output width.
    targets: Vec<Target>,
    outs: Vec<usize>,
    a: CudaTrainable,
    b: Vec<CudaTrainable>,
}

/// What [`CudaLoraGroup::saved`] keeps: xs = s·(x·Aᵀ), [M, g·r] in bf16.
pub struct CudaLoraSaved {
    xs: CudaSlice<bf16>,
}

/// What [`CudaLoraGroup::backward_input`] hands on: G, each branch's g = s·(dy·B) side by side,
/// [M, g·r] in bf16.
pub struct CudaLoraDy {
    g: CudaSlice<bf16>,
}

impl CudaLoraGroup {
    /// The pairs of `targets` (one rank, input width and scaling) as one group, in their order.
    pub fn upload(
        device: &Arc<CudaDevice>,
        targets: &[Target],
        pairs: &[&LoraPair],
    ) -> Result<CudaLoraGroup> {
        let op = "CudaLoraGroup::upload";
        let Some(first) = pairs.first() else {
            return shape_error(op, "a group of no pairs".to_string());
        };
        if targets.len() != pairs.len() {
            return shape_error(
                op,
                format!("{} targets for {} pairs", targets.len(), pairs.len()),
            );
        }
        let (rank, in_features, scaling) = (first.rank, first.in_features, first.scaling);
        if pairs
            .iter()
            .any(|p| p.rank != rank || p.in_features != in_features || p.scaling != scaling)
        {
            return shape_error(
                op,
                "pairs of different ranks, inputs or scalings".to_string(),
            );
        }
        let a: Vec<f32> = pairs.iter().flat_map(|p| p.a.iter().copied()).collect();
        let b = pairs.iter().map(|p| CudaTrainable::upload(device, &p.b));
        Ok(CudaLoraGroup {
            device: device.clone(),
            rank,
            in_features,
            scaling,
            targets: targets.to_vec(),
            outs: pairs.iter().map(|p| p.out_features).collect(),
            a: CudaTrainable::upload(device, &a)?,
            b: b.collect::<Result<_>>()?,
        })
    }

    /// How many branches it holds.
    pub fn branches(&self) -> usize {
        self.outs.len()
    }

    /// The branches' projections, in order.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The branch of `target`, if the group holds one.
    pub fn branch(&self, target: Target) -> Option<usize> {
        self.targets.iter().position(|&t| t == target)
    }

    /// Values of one branch's A.
    fn a_len(&self) -> usize {
        self.rank * self.in_features
    }

    /// The pairs' master weights, back on the host, in the group's order.
    pub fn download(&self) -> Result<Vec<LoraPair>> {
        let d = &self.device;
        let a = self.a.download(d)?;
        let parts = a.chunks(self.a_len()).zip(&self.b).zip(&self.outs);
        parts
            .map(|((a, b), &out)| {
                let (r, k) = (self.rank, self.in_features);
                LoraPair::from_parts(a.to_vec(), b.download(d)?, r, k, out, self.scaling)
            })
            .collect()
    }

    /// The pairs' accumulated gradients, on the host.
    pub fn grads(&self) -> Result<Vec<LoraGrads>> {
        let d = &self.device;
        let a = self.a.grad(d)?;
        let parts = a.chunks(self.a_len()).zip(&self.b);
        parts
            .map(|(a, b)| {
                Ok(LoraGrads {
                    a: a.to_vec(),
                    b: b.grad(d)?,
                })
            })
            .collect()
    }

    /// The pairs' matrices' sizes, A then B of each, as a checkpoint lists them.
    pub fn matrix_sizes(&self) -> Vec<usize> {
        let a = self.a_len();
        self.outs.iter().flat_map(|o| [a, o * self.rank]).collect()
    }

    /// The AdamW moments (m, v) of A then B of each pair, as a checkpoint lists them.
    pub fn moments(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let d = &self.device;
        let (m, v) = self.a.moments(d)?;
        let a_parts = m.chunks(self.a_len()).zip(v.chunks(self.a_len()));
        let mut out = Vec::with_capacity(2 * self.branches());
        for ((m, v), b) in a_parts.zip(&self.b) {
            out.push((m.to_vec(), v.to_vec()));
            out.push(b.moments(d)?);
        }
        Ok(out)
    }

    /// Restores the moments [`Self::moments`] gave (a checkpoint's).
    pub fn set_moments(&mut self, moments: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        if moments.len() != 2 * self.branches() {
            return shape_error(
                "CudaLoraGroup::set_moments",
                format!("{} moments for {} pairs", moments.len(), self.branches()),
            );
        }
        let (mut a_m, mut a_v) = (Vec::new(), Vec::new());
        for (pair, b) in moments.chunks(2).zip(&mut self.b) {
            a_m.extend_from_slice(&pair[0].0);
            a_v.extend_from_slice(&pair[0].1);
            b.set_moments(&self.device, &pair[1].0, &pair[1].1)?;
        }
        self.a.set_moments(&self.device, &a_m, &a_v)
    }

    /// A (stacked) and each B, for the optimizer.
    pub fn trainables_mut(&mut self) -> impl Iterator<Item = &mut CudaTrainable> {
        std::iter::once(&mut self.a).chain(&mut self.b)
    }

    /// M of an input x [M, K] of `len` values.
    fn rows(&self, op: &'static str, len: usize) -> Result<usize> {
        let k = self.in_features;
        if !len.is_multiple_of(k) {
            return shape_error(op, format!("an input of {len} values for {k} features"));
        }
        Ok(len / k)
    }

    /// Branch j's columns of xs or G.
    fn branch_cols(&self, j: usize) -> Cols {
        Cols {
            first: j * self.rank,
            width: self.rank,
            stride: self.branches() * self.rank,
        }
    }

    /// Checks that `dys` hold one gradient [M, Nⱼ] per branch.
    fn check_branches(&self, op: &'static str, m: usize, dys: &[&CudaSlice<bf16>]) -> Result<()> {
        let fits = dys.len() == self.branches()
            && dys
                .iter()
                .zip(&self.outs)
                .all(|(dy, out)| dy.len() == m * out);
        if !fits {
            let lens: Vec<usize> = dys.iter().map(|dy| dy.len()).collect();
            return shape_error(
                op,
                format!(
                    "gradients of {lens:?} values for {m} rows of {:?}",
                    self.outs
                ),
            );
        }
        Ok(())
    }

    /// xs = s·(x·Aᵀ) [M, g·r] for x [M, K]: every branch's input product, which the forward's
    /// branches and the backward's dB read.
    pub fn saved(&self, x: &CudaSlice<bf16>) -> Result<CudaLoraSaved> {
        let m = self.rows("CudaLoraGroup::saved", x.len())?;
        let d = &*self.device;
        let mut xs = d.uninit::<bf16>(m * self.branches() * self.rank)?;
        linear_scaled(d, x, &self.a.copy, self.in_features, &mut xs, self.scaling)?;
        Ok(CudaLoraSaved { xs })
    }

    /// Branch j: y [M, Nⱼ] (+ when `accumulate`)= xsⱼ·Bⱼᵀ. The trainer writes the branch first
    /// and lets the frozen product add onto it (cuBLAS reads y once, in the big product's
    /// epilogue), so the rank-r product only writes y.
    pub fn forward_branch(
        &self,
        j: usize,
        saved: &CudaLoraSaved,
        y: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let Some(b) = self.b.get(j) else {
            return shape_error(
                "CudaLoraGroup::forward_branch",
                format!("branch {j} of {}", self.branches()),
            );
        };
        let xs = (&saved.xs, self.branch_cols(j));
        linear_cols_into(&self.device, xs, &b.copy, y, accumulate)?;
        Ok(())
    }

    /// The part of the backward that needs no input (the MLP's h is recomputed later, in the
    /// buffer of its gradient): gⱼ = s·(dyⱼ·Bⱼ) for every branch's dyⱼ [M, Nⱼ], then dx [M, K]
    /// (+ when `accumulate`)= G·A. Returns G for [`Self::backward_weights`].
    pub fn backward_input(
        &self,
        dys: &[&CudaSlice<bf16>],
        dx: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<CudaLoraDy> {
        let op = "CudaLoraGroup::backward_input";
        let m = self.rows(op, dx.len())?;
        self.check_branches(op, m, dys)?;
        let d = &*self.device;
        let mut g = d.uninit::<bf16>(m * self.branches() * self.rank)?;
        for (j, (dy, b)) in dys.iter().zip(&self.b).enumerate() {
            // dy [M, Nⱼ] times Bⱼ [Nⱼ, r]: dy·Wᵀ with W = Bⱼᵀ, i.e. a backward-input product
            // with Bⱼ read as [Nⱼ, r]
            let cols = (&mut g, self.branch_cols(j));
            linear_backward_input_scaled(d, dy, &b.copy, cols, self.scaling)?;
        }
        linear_backward_input_into(d, &g, &self.a.copy, self.in_features, dx, accumulate)?;
        Ok(CudaLoraDy { g })
    }

    /// The rest of the backward once the input x [M, K] is there: dA += Gᵀ·x, dBⱼ += dyⱼᵀ·xsⱼ
    /// (f32), with the xs the forward kept.
    pub fn backward_weights(
        &mut self,
        x: &CudaSlice<bf16>,
        saved: &CudaLoraSaved,
        g: &CudaLoraDy,
        dys: &[&CudaSlice<bf16>],
    ) -> Result<()> {
        let op = "CudaLoraGroup::backward_weights";
        let m = self.rows(op, x.len())?;
        self.check_branches(op, m, dys)?;
        let d = &*self.device;
        linear_backward_weight(d, &g.g, x, self.in_features, &mut self.a.grad)?;
        let cols: Vec<Cols> = (0..self.branches()).map(|j| self.branch_cols(j)).collect();
        for ((dy, b), cols) in dys.iter().zip(&mut self.b).zip(cols) {
            linear_backward_weight_cols(d, dy, (&saved.xs, cols), &mut b.grad)?;
        }
        Ok(())
    }

    /// The whole backward for the input x [M, K]: [`Self::backward_input`] then
    /// [`Self::backward_weights`].
    pub fn backward(
        &mut self,
        x: &CudaSlice<bf16>,
        saved: &CudaLoraSaved,
        dys: &[&CudaSlice<bf16>],
        dx: &mut CudaSlice<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let g = self.backward_input(dys, dx, accumulate)?;
        self.backward_weights(x, saved, &g, dys)
    }
}
