//! Gated activations on CUDA (`kernels/activation.cu`): the counterparts of `crate::activation`;
//! beside them the residual add, the embedding row lookup and random fills.

use cudarc::driver::{CudaSlice, PushKernelArg};
use llama_core::cuda::{CudaDevice, KernelSource};

use super::{grid_for, grid_for_packs, kernel_source, launched, typed_kernel, CudaElement};
use crate::activation::{GatedAct, Gelu};
use crate::error::{check_len, rows_of, OpsError, Result};

const ACTIVATION: KernelSource = kernel_source!("activation");

/// The kernels' activation code.
fn code(act: GatedAct) -> i32 {
    match act {
        GatedAct::Silu => 0,
        GatedAct::Gelu(Gelu::Exact) => 1,
        GatedAct::Gelu(Gelu::Tanh) => 2,
    }
}

/// h = T(T(f(gate)) · up).
pub fn gated_forward<T: CudaElement>(
    device: &CudaDevice,
    act: GatedAct,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
    h: &mut CudaSlice<T>,
) -> Result<()> {
    check_len("cuda gated_forward", "up", up.len(), gate.len())?;
    check_len("cuda gated_forward", "h", h.len(), gate.len())?;
    let n = gate.len();
    if n == 0 {
        return Ok(());
    }
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "gated_forward")?;
    let act = code(act);
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(gate).arg(up).arg(h).arg(&n).arg(&act);
    // SAFETY: gate, up and h hold n elements each (checked).
    launched(&name, unsafe { launch.launch(grid_for_packs::<T>(n)) })
}

/// The in-place forward: h written over `gate`.
pub fn gated_forward_in_place<T: CudaElement>(
    device: &CudaDevice,
    act: GatedAct,
    gate: &mut CudaSlice<T>,
    up: &CudaSlice<T>,
) -> Result<()> {
    check_len("cuda gated_forward_in_place", "up", up.len(), gate.len())?;
    let n = gate.len();
    if n == 0 {
        return Ok(());
    }
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "gated_forward_in_place")?;
    let act = code(act);
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(gate).arg(up).arg(&n).arg(&act);
    // SAFETY: gate and up hold n elements each (checked).
    launched(&name, unsafe { launch.launch(grid_for_packs::<T>(n)) })
}

/// dgate = dh · up · f'(gate), dup = dh · f(gate).
pub fn gated_backward<T: CudaElement>(
    device: &CudaDevice,
    act: GatedAct,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
    dh: &CudaSlice<T>,
    dgate: &mut CudaSlice<T>,
    dup: &mut CudaSlice<T>,
) -> Result<()> {
    let n = gate.len();
    for (what, len) in [
        ("up", up.len()),
        ("dh", dh.len()),
        ("dgate", dgate.len()),
        ("dup", dup.len()),
    ] {
        check_len("cuda gated_backward", what, len, n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "gated_backward")?;
    let act = code(act);
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(gate)
        .arg(up)
        .arg(dh)
        .arg(dgate)
        .arg(dup)
        .arg(&n)
        .arg(&act);
    // SAFETY: all five buffers hold n elements (checked).
    launched(&name, unsafe { launch.launch(grid_for_packs::<T>(n)) })
}

/// [`gated_backward`] in place: gate becomes dgate, up becomes dup (the MLP's backward no
/// longer needs them) and dh becomes the forward's h, recomputed bit for bit (what the down
/// projection's LoRA gradients read), so a training step keeps neither h nor separate
/// gradient buffers: three [N, F] buffers at its peak instead of six.
pub fn gated_backward_in_place<T: CudaElement>(
    device: &CudaDevice,
    act: GatedAct,
    gate: &mut CudaSlice<T>,
    up: &mut CudaSlice<T>,
    dh: &mut CudaSlice<T>,
) -> Result<()> {
    let n = gate.len();
    check_len("cuda gated_backward_in_place", "up", up.len(), n)?;
    check_len("cuda gated_backward_in_place", "dh", dh.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "gated_backward_in_place")?;
    let act = code(act);
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(gate).arg(up).arg(dh).arg(&n).arg(&act);
    // SAFETY: all three buffers hold n elements (checked).
    launched(&name, unsafe { launch.launch(grid_for_packs::<T>(n)) })
}

/// The residual add h = T(h + delta).
pub fn add_in_place<T: CudaElement>(
    device: &CudaDevice,
    h: &mut CudaSlice<T>,
    delta: &CudaSlice<T>,
) -> Result<()> {
    check_len("cuda add_in_place", "delta", delta.len(), h.len())?;
    let n = h.len();
    if n == 0 {
        return Ok(());
    }
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "add_in_place")?;
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(h).arg(delta).arg(&n);
    // SAFETY: h and delta hold n elements each (checked).
    launched(&name, unsafe { launch.launch(grid_for_packs::<T>(n)) })
}

/// Row lookup (token embeddings): out [N, cols] row r = table [V, cols] row ids[r]. Every id
/// must be below V (an error otherwise, checked on the host before anything is read).
pub fn gather_rows<T: CudaElement>(
    device: &CudaDevice,
    table: &CudaSlice<T>,
    cols: usize,
    ids: &[u32],
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let op = "cuda gather_rows";
    let vocab = rows_of(op, "table", table.len(), cols)?;
    check_len(op, "out", out.len(), ids.len() * cols)?;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(OpsError::Shape {
            op,
            reason: format!("row {id} of a table of {vocab} rows"),
        });
    }
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let ids_dev = device.htod(ids)?;
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "gather_rows")?;
    let (rows, cols_arg) = (ids.len(), cols);
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(table)
        .arg(&ids_dev)
        .arg(out)
        .arg(&rows)
        .arg(&cols_arg);
    // SAFETY: table holds vocab · cols elements and every id is below vocab (checked); out holds
    // rows · cols; the kernel reads ids[0..rows).
    launched(&name, unsafe { launch.launch(grid_for_packs::<T>(n)) })
}

/// Fills x with uniform values in [−scale, scale) hashed from (seed, index): random weights
/// for benchmarks of shapes whose real weights are not at hand.
pub fn fill_uniform<T: CudaElement>(
    device: &CudaDevice,
    x: &mut CudaSlice<T>,
    seed: u64,
    scale: f32,
) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let (f, name) = typed_kernel::<T>(device, &ACTIVATION, "fill_uniform")?;
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(x).arg(&n).arg(&seed).arg(&scale);
    // SAFETY: x holds n elements.
    launched(&name, unsafe { launch.launch(grid_for(n)) })
}
