//! LoRA on a CUDA device, as Unsloth trains it: f32 master weights and AdamW state, bf16 copies
//! for the products (cuBLAS, f32 accumulation), bf16 activations, f32 gradients. The same
//! arithmetic as [`crate::LoraPair`], step for step (`kernels/lora.cu` for the rest):
//!
//!   forward:  xs = s·(x·Aᵀ) [M, r];  y += xs·Bᵀ
//!   backward: g = s·(dy·B) [M, r];  dA += gᵀ·x,  dB += dyᵀ·xs,  dx += g·A

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
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

    pub fn zero_grad(&mut self, device: &CudaDevice) -> Result<()> {
        device
            .stream()
            .memset_zeros(&mut self.grad)
            .map_err(|e| llama_core::Error::cuda("memset", e).into())
    }

    /// Σ of the squared gradient into `acc` (one f32 on the device).
    pub fn grad_sumsq(&self, device: &CudaDevice, acc: &mut CudaSlice<f32>) -> Result<()> {
        let f = device.function(&LORA, "lora_sumsq_f32")?;
        let n = self.grad.len();
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(&self.grad).arg(&n).arg(acc);
        // SAFETY: grad holds n values, acc one.
        launched(
            "lora_sumsq_f32",
            unsafe { launch.launch(grid(n)) }.map(|_| ()),
        )
    }

    /// Multiplies the gradient by `factor` (clipping).
    pub fn scale_grad(&mut self, device: &CudaDevice, factor: f32) -> Result<()> {
        let f = device.function(&LORA, "lora_scale_f32")?;
        let n = self.grad.len();
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(&mut self.grad).arg(&n).arg(&factor);
        // SAFETY: grad holds n values.
        launched(
            "lora_scale_f32",
            unsafe { launch.launch(grid(n)) }.map(|_| ()),
        )
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

    /// One optimizer update (step counts from 1), then a fresh bf16 copy.
    pub fn update(
        &mut self,
        device: &CudaDevice,
        kind: OptimizerKind,
        step: u64,
        lr: f32,
    ) -> Result<()> {
        let n = self.master.len();
        match kind {
            OptimizerKind::AdamW {
                betas: (b1, b2),
                eps,
                weight_decay,
            } => {
                if self.moments.is_none() {
                    self.moments = Some((device.zeros(n)?, device.zeros(n)?));
                }
                let (m, v) = self.moments.as_mut().expect("set above");
                let t = step as i32;
                let step_size = lr / (1.0 - b1.powi(t));
                let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
                let f = device.function(&LORA, "lora_adamw")?;
                let mut launch = device.stream().launch_builder(&f);
                launch
                    .arg(&mut self.master)
                    .arg(&self.grad)
                    .arg(m)
                    .arg(v)
                    .arg(&n);
                launch
                    .arg(&lr)
                    .arg(&b1)
                    .arg(&b2)
                    .arg(&eps)
                    .arg(&weight_decay)
                    .arg(&step_size)
                    .arg(&bias2_sqrt);
                // SAFETY: master, grad and both moments hold n values each.
                launched("lora_adamw", unsafe { launch.launch(grid(n)) }.map(|_| ()))?;
            }
            OptimizerKind::Sgd { weight_decay } => {
                let f = device.function(&LORA, "lora_sgd")?;
                let mut launch = device.stream().launch_builder(&f);
                launch
                    .arg(&mut self.master)
                    .arg(&self.grad)
                    .arg(&n)
                    .arg(&lr)
                    .arg(&weight_decay);
                // SAFETY: master and grad hold n values each.
                launched("lora_sgd", unsafe { launch.launch(grid(n)) }.map(|_| ()))?;
            }
        }
        self.refresh(device)
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

/// What [`CudaLoraPair::forward_add`] keeps: xs = s·(x·Aᵀ), [M, r] in bf16.
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

    /// y [M, N] += s·(x·Aᵀ)·Bᵀ for x [M, K].
    pub fn forward_add(
        &self,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
    ) -> Result<CudaLoraSaved> {
        self.rows("CudaLoraPair::forward_add", x.len(), y.len())?;
        let saved = self.forward_saved(x)?;
        let d = &*self.device;
        linear_into(d, &saved.xs, &self.b.copy, self.rank, y, true)?;
        Ok(saved)
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

    /// Backward of [`Self::forward_add`] for dy [M, N]: dx [M, K] += s·(dy·B)·A; the
    /// gradients of A and B accumulated (f32).
    pub fn backward(
        &mut self,
        x: &CudaSlice<bf16>,
        saved: &CudaLoraSaved,
        dy: &CudaSlice<bf16>,
        dx: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        self.rows("CudaLoraPair::backward", x.len(), dy.len())?;
        let g = self.backward_input(dy, dx)?;
        self.weight_grads(x, &g, &saved.xs, dy)
    }

    /// The part of the backward that needs no input, for a forward whose input is not kept
    /// (the MLP's h, recomputed later in the buffer of its gradient): dx [M, K] += s·(dy·B)·A.
    /// Returns g = s·dy·B for [`Self::backward_recomputing`].
    pub fn backward_input(
        &self,
        dy: &CudaSlice<bf16>,
        dx: &mut CudaSlice<bf16>,
    ) -> Result<CudaLoraDy> {
        let m = self.rows("CudaLoraPair::backward_input", dx.len(), dy.len())?;
        let d = &*self.device;
        let (r, k) = (self.rank, self.in_features);
        // g = s·dy·B [M, r]: dy [M, N] times B [N, r] is dy·Wᵀ with W = Bᵀ; as a backward-input
        // product it is dy · B with B read as [N, r].
        let mut g = d.uninit::<bf16>(m * r)?;
        linear_backward_input_scaled(d, dy, &self.b.copy, r, &mut g, self.scaling)?;
        linear_backward_input_into(d, &g, &self.a.copy, k, dx, true)?;
        Ok(CudaLoraDy { g })
    }

    /// The rest of the backward once the input x is back: dA += gᵀ·x and dB += dyᵀ·xs with
    /// xs = s·(x·Aᵀ) recomputed from x.
    pub fn backward_recomputing(
        &mut self,
        x: &CudaSlice<bf16>,
        g: &CudaLoraDy,
        dy: &CudaSlice<bf16>,
    ) -> Result<()> {
        self.rows("CudaLoraPair::backward_recomputing", x.len(), dy.len())?;
        let saved = self.forward_saved(x)?;
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
