//! Gated activations on CUDA (`kernels/activation.cu`): the counterparts of `crate::activation`;
//! beside them the residual add, the embedding row lookup and random fills.

use cudarc::driver::{CudaSlice, PushKernelArg};
use llama_core::cuda::{CudaDevice, HostTable, KernelSource};

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

/// The [V, C] table [`gather_rows`] reads: on the device, or in mapped pinned host memory
/// (read in place over the bus: no device memory).
#[derive(Clone, Copy)]
pub enum RowTable<'a, T> {
    Device(&'a CudaSlice<T>),
    Host(&'a HostTable<T>),
}

impl<'a, T> From<&'a CudaSlice<T>> for RowTable<'a, T> {
    fn from(table: &'a CudaSlice<T>) -> RowTable<'a, T> {
        RowTable::Device(table)
    }
}

impl<'a, T> From<&'a HostTable<T>> for RowTable<'a, T> {
    fn from(table: &'a HostTable<T>) -> RowTable<'a, T> {
        RowTable::Host(table)
    }
}

impl<T: CudaElement> RowTable<'_, T> {
    fn len(&self) -> usize {
        match self {
            RowTable::Device(t) => t.len(),
            RowTable::Host(t) => t.len(),
        }
    }

    /// The kernel's address of a host table (0 for a device one, which passes itself).
    fn host_ptr(&self) -> u64 {
        match self {
            RowTable::Device(_) => 0,
            RowTable::Host(t) => t.device_ptr(),
        }
    }
}

/// Row lookup (token embeddings): out [N, cols] row r = table [V, cols] row ids[r]. Every id
/// must be below V (an error otherwise, checked on the host before anything is read).
pub fn gather_rows<'a, T: CudaElement>(
    device: &CudaDevice,
    table: impl Into<RowTable<'a, T>>,
    cols: usize,
    ids: &[u32],
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let op = "cuda gather_rows";
    let table = table.into();
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
    let host_ptr = table.host_ptr();
    match (table, &host_ptr) {
        (RowTable::Device(t), _) => launch.arg(t),
        (RowTable::Host(_), ptr) => launch.arg(ptr),
    };
    launch.arg(&ids_dev).arg(out).arg(&rows).arg(&cols_arg);
    // SAFETY: table holds vocab · cols elements (a host table through its device mapping, which
    // no one writes after its creation) and every id is below vocab (checked); out holds rows ·
    // cols; the kernel reads ids[0..rows).
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
