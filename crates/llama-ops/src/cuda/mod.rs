//! The CUDA paths: kernels in `kernels/{norm,activation,cross_entropy,quant}.cu` (compiled by
//! NVRTC on first use, see `llama_core::cuda`) and cuBLAS for dense products. Each function
//! mirrors the CPU function of the same name over device buffers (`CudaSlice`) on one
//! [`CudaDevice`]'s stream, checks the same shapes, and returns the same errors.

mod activation;
mod gemm_tune;
mod loss;
mod matmul;
mod norm;
mod quant;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig};
use llama_core::cuda::{CudaDevice, KernelSource};
use llama_core::{bf16, f16, Element};

use crate::error::{OpsError, Result};

pub use activation::{
    add_in_place, fill_uniform, gated_backward, gated_backward_in_place, gated_forward,
    gated_forward_in_place, gather_rows, RowTable,
};
pub use loss::{cross_entropy, cross_entropy_backward, CudaCrossEntropy};
pub use matmul::{
    batched_matmul, linear, linear_backward_input, linear_backward_input_into,
    linear_backward_input_scaled, linear_backward_weight, linear_backward_weight_cols,
    linear_cols_into, linear_into, linear_scaled, Cols, Strided,
};
pub use norm::{
    gemma_rms_norm, layer_norm, layer_norm_backward, rms_norm, rms_norm_backward,
    rms_norm_backward_input,
};
pub use quant::{CudaNf4DoubleQuant, CudaQuantMatrix};

/// An element type the ops kernels are instantiated for; `SUFFIX` names the instance.
pub trait CudaElement: Element {
    const SUFFIX: &'static str;
}
impl CudaElement for f32 {
    const SUFFIX: &'static str = "f32";
}
impl CudaElement for f16 {
    const SUFFIX: &'static str = "f16";
}
impl CudaElement for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Embeds `kernels/<name>.cu`.
macro_rules! kernel_source {
    ($name:literal) => {
        llama_core::cuda::KernelSource {
            name: $name,
            code: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../kernels/",
                $name,
                ".cu"
            )),
        }
    };
}
pub(crate) use kernel_source;

/// The kernel `name`, suffixed with T's instance name.
fn typed_kernel<T: CudaElement>(
    device: &CudaDevice,
    source: &KernelSource,
    name: &str,
) -> Result<(CudaFunction, String)> {
    let full = format!("{name}_{}", T::SUFFIX);
    Ok((device.function(source, &full)?, full))
}

/// Threads per block of the element-wise and per-row kernels.
const BLOCK: u32 = 256;

/// A grid-stride launch for `n` elements.
fn grid_for(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per 16-byte pack of `n` elements of T (the element-wise kernels of
/// `activation.cu`), up to the grid-stride cap.
fn grid_for_packs<T>(n: usize) -> LaunchConfig {
    let threads = n.div_ceil((16 / std::mem::size_of::<T>()).max(1));
    LaunchConfig {
        grid_dim: (
            threads.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32,
            1,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row.
fn grid_rows(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_u32("rows", rows)?.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Per-device state (a library handle, a tuner) kept in `cache`: the device's own, made by
/// `make` on first use and shared after.
fn per_device<T>(
    cache: &OnceLock<Mutex<HashMap<usize, Arc<T>>>>,
    device: &CudaDevice,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    let mut states = cache
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(state) = states.get(&device.ordinal()) {
        return Ok(state.clone());
    }
    let state = Arc::new(make()?);
    states.insert(device.ordinal(), state.clone());
    Ok(state)
}

/// A dimension as the kernels' u32, or a shape error.
fn to_u32(what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| OpsError::Shape {
        op: "cuda",
        reason: format!("{what} = {v} exceeds the kernels' 32-bit sizes"),
    })
}

/// A buffer that the kernel about to run writes in full.
fn alloc<T: Element>(device: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialised, but every caller launches a kernel that writes all
    // n elements before the buffer is read.
    unsafe { device.stream().alloc::<T>(n) }
        .map_err(|e| llama_core::Error::cuda("cuMemAlloc", e).into())
}

/// Maps a launch error to the crate error, naming the kernel.
fn launched<T>(kernel: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| llama_core::Error::cuda(kernel, e).into())
}
