//! Norms on CUDA (`kernels/norm.cu`): the CUDA counterparts of `crate::norm`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use llama_core::cuda::{CudaDevice, KernelSource};

use super::{
    alloc, grid_for, grid_rows, kernel_source, launched, to_u32, typed_kernel, CudaElement, BLOCK,
};
use crate::error::{check_len, rows_of, Result};

const NORM: KernelSource = kernel_source!("norm");

/// Rows summed per slab of the weight-gradient reduction.
const SLAB_ROWS: usize = 256;

/// 16-byte packs of a row each thread of the RMSNorm forward holds in registers (`ROW_PACKS`
/// in kernels/norm.cu).
const ROW_PACKS: usize = 8;

/// One block per row for the RMSNorm forward, of as few warps as hold a row of `dim` values of
/// T in ROW_PACKS packs a thread (up to [`BLOCK`] threads): every thread has that many loads in
/// flight and the row's sums reduce within a warp or two.
fn row_blocks<T>(rows: usize, dim: usize) -> Result<LaunchConfig> {
    let pack = (16 / std::mem::size_of::<T>()).max(1);
    let warps = dim
        .div_ceil(pack * 32 * ROW_PACKS)
        .clamp(1, BLOCK as usize / 32);
    Ok(LaunchConfig {
        block_dim: (32 * warps as u32, 1, 1),
        ..grid_rows(rows)?
    })
}

fn check(op: &'static str, x: usize, weight: usize, out: usize) -> Result<usize> {
    let rows = rows_of(op, "x", x, weight)?;
    check_len(op, "output", out, x)?;
    Ok(rows)
}

fn rms<T: CudaElement>(
    device: &CudaDevice,
    op: &'static str,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    eps: f32,
    y: &mut CudaSlice<T>,
    gemma: i32,
) -> Result<()> {
    let rows = check(op, x.len(), weight.len(), y.len())?;
    if rows == 0 {
        return Ok(());
    }
    let dim = to_u32("dim", weight.len())?;
    let (f, name) = typed_kernel::<T>(device, &NORM, "rms_norm")?;
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(x)
        .arg(weight)
        .arg(y)
        .arg(&dim)
        .arg(&eps)
        .arg(&gemma);
    // SAFETY: x and y hold rows · dim elements, weight dim (checked); one block per row.
    launched(&name, unsafe {
        launch.launch(row_blocks::<T>(rows, dim as usize)?)
    })
}

/// RMSNorm forward, x [N, C], weight [C] → y [N, C]: y = w · T(x · r).
pub fn rms_norm<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    eps: f32,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    rms(device, "cuda rms_norm", x, weight, eps, y, 0)
}

/// Gemma's RMSNorm: y = T(x · r · (1 + w)).
pub fn gemma_rms_norm<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    eps: f32,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    rms(device, "cuda gemma_rms_norm", x, weight, eps, y, 1)
}

/// LayerNorm forward: y = T((x − μ) · rstd · w + b).
pub fn layer_norm<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: &CudaSlice<T>,
    eps: f32,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    let op = "cuda layer_norm";
    let rows = check(op, x.len(), weight.len(), y.len())?;
    check_len(op, "bias", bias.len(), weight.len())?;
    if rows == 0 {
        return Ok(());
    }
    let dim = to_u32("dim", weight.len())?;
    let (f, name) = typed_kernel::<T>(device, &NORM, "layer_norm")?;
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(x)
        .arg(weight)
        .arg(bias)
        .arg(y)
        .arg(&dim)
        .arg(&eps);
    // SAFETY: x and y hold rows · dim elements, weight and bias dim (checked).
    launched(&name, unsafe { launch.launch(grid_rows(rows)?) })
}

/// RMSNorm backward → dx [N, C], dw [C] (overwritten, f32).
pub fn rms_norm_backward<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    eps: f32,
    dx: &mut CudaSlice<T>,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "cuda rms_norm_backward";
    check_len(op, "dw", dw.len(), weight.len())?;
    let rows = rows_of(op, "x", x.len(), weight.len())?;
    let mut rstd = alloc::<f32>(device, rows.max(1))?;
    let backward = RmsBackward { x, weight, dy, eps };
    backward.dx(device, op, None, dx, Some(&mut rstd))?;
    let dim = to_u32("dim", weight.len())?;
    weight_grads::<T>(device, x, dy, None, &rstd, rows, dim, dw, None)
}

/// RMSNorm backward for the input alone (a frozen weight): dx [N, C] = the norm's input
/// gradient, plus `residual` [N, C] when given (the gradient that reaches the norm's input
/// through a residual branch), in one kernel.
pub fn rms_norm_backward_input<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    residual: Option<&CudaSlice<T>>,
    eps: f32,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    let op = "cuda rms_norm_backward_input";
    let backward = RmsBackward { x, weight, dy, eps };
    backward.dx(device, op, residual, dx, None)
}

/// The operands of an RMSNorm backward.
struct RmsBackward<'a, T> {
    x: &'a CudaSlice<T>,
    weight: &'a CudaSlice<T>,
    dy: &'a CudaSlice<T>,
    eps: f32,
}

impl<T: CudaElement> RmsBackward<'_, T> {
    /// dx (+ residual), and each row's r into `rstd` when given (rows values).
    fn dx(
        &self,
        device: &CudaDevice,
        op: &'static str,
        residual: Option<&CudaSlice<T>>,
        dx: &mut CudaSlice<T>,
        rstd: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let rows = check(op, self.x.len(), self.weight.len(), dx.len())?;
        check_len(op, "dy", self.dy.len(), self.x.len())?;
        if let Some(r) = residual {
            check_len(op, "residual", r.len(), self.x.len())?;
        }
        if rows == 0 {
            return Ok(());
        }
        let dim = to_u32("dim", self.weight.len())?;
        let (f, name) = typed_kernel::<T>(device, &NORM, "rms_norm_backward")?;
        let null = 0u64;
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(self.x).arg(self.weight).arg(self.dy);
        match residual {
            Some(r) => launch.arg(r),
            None => launch.arg(&null),
        };
        launch.arg(dx);
        match rstd {
            Some(r) => launch.arg(r),
            None => launch.arg(&null),
        };
        launch.arg(&dim).arg(&self.eps);
        // SAFETY: x, dy, dx (and a residual) hold rows · dim elements, weight dim, a given
        // rstd at least rows (checked by the callers); null pointers are checked in the kernel.
        launched(&name, unsafe { launch.launch(grid_rows(rows)?) })
    }
}

/// LayerNorm backward → dx [N, C], dw [C], db [C] (overwritten, f32).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    eps: f32,
    dx: &mut CudaSlice<T>,
    dw: &mut CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "cuda layer_norm_backward";
    let rows = check(op, x.len(), weight.len(), dx.len())?;
    check_len(op, "dy", dy.len(), x.len())?;
    check_len(op, "dw", dw.len(), weight.len())?;
    check_len(op, "db", db.len(), weight.len())?;
    let dim = to_u32("dim", weight.len())?;
    let mut mean = alloc::<f32>(device, rows.max(1))?;
    let mut rstd = alloc::<f32>(device, rows.max(1))?;
    if rows > 0 {
        let (f, name) = typed_kernel::<T>(device, &NORM, "layer_norm_backward")?;
        let mut launch = device.stream().launch_builder(&f);
        launch
            .arg(x)
            .arg(weight)
            .arg(dy)
            .arg(dx)
            .arg(&mut mean)
            .arg(&mut rstd)
            .arg(&dim)
            .arg(&eps);
        // SAFETY: as for rms_norm_backward, plus mean holding rows values.
        launched(&name, unsafe { launch.launch(grid_rows(rows)?) })?;
    }
    weight_grads::<T>(device, x, dy, Some(&mean), &rstd, rows, dim, dw, Some(db))
}

/// dw[c] = Σ_rows dy · x̂ (and db[c] = Σ_rows dy) in two deterministic passes: column sums over
/// slabs of SLAB_ROWS rows, then the sum over slabs.
#[allow(clippy::too_many_arguments)]
fn weight_grads<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    mean: Option<&CudaSlice<f32>>,
    rstd: &CudaSlice<f32>,
    rows: usize,
    dim: u32,
    dw: &mut CudaSlice<f32>,
    db: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    if dim == 0 {
        return Ok(());
    }
    let slabs = rows.div_ceil(SLAB_ROWS).max(1);
    let cols = dim as usize;
    let mut dw_part = device.zeros::<f32>(slabs * cols)?;
    let mut db_part = device.zeros::<f32>(if db.is_some() { slabs * cols } else { 1 })?;
    if rows > 0 {
        let (f, name) = typed_kernel::<T>(device, &NORM, "norm_dw_partial")?;
        let null = 0u64;
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(x).arg(dy);
        match mean {
            Some(m) => launch.arg(m),
            None => launch.arg(&null),
        };
        launch.arg(rstd).arg(&mut dw_part);
        if db.is_some() {
            launch.arg(&mut db_part);
        } else {
            launch.arg(&null);
        }
        let (rows_u, slab_rows) = (rows, SLAB_ROWS);
        launch.arg(&rows_u).arg(&dim).arg(&slab_rows);
        let config = LaunchConfig {
            grid_dim: (dim.div_ceil(super::BLOCK), to_u32("slabs", slabs)?, 1),
            block_dim: (super::BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x and dy hold rows · dim elements, mean/rstd rows values (or a null mean,
        // which the kernel checks), the partial buffers slabs · dim; threads past dim return.
        launched(&name, unsafe { launch.launch(config) })?;
    }
    finish(device, &dw_part, slabs, dim, dw)?;
    if let Some(db) = db {
        finish(device, &db_part, slabs, dim, db)?;
    }
    Ok(())
}

fn finish(
    device: &CudaDevice,
    part: &CudaSlice<f32>,
    slabs: usize,
    dim: u32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let f = device.function(&NORM, "norm_dw_finish")?;
    let slabs = to_u32("slabs", slabs)?;
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(part).arg(out).arg(&slabs).arg(&dim);
    // SAFETY: part holds slabs · dim values and out dim.
    launched("norm_dw_finish", unsafe {
        launch.launch(grid_for(dim as usize))
    })
}
