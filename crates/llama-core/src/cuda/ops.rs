//! Launches of the element-wise kernels in `kernels/elementwise.cu` (add, cast).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaDevice, KernelSource};
use crate::storage::{CudaStorage, Element};
use crate::{DType, Error, Result};

const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    code: include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../kernels/elementwise.cu"
    )),
};

/// Threads per block for the grid-stride element-wise kernels.
const BLOCK: u32 = 256;
/// Enough blocks to fill any current GPU many times over; the grid-stride loop does the rest.
const MAX_BLOCKS: u32 = 8192;

/// A grid for `n` elements with a grid-stride loop.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).min(MAX_BLOCKS as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out = a + b, element-wise, computed in f32.
pub(crate) fn add(
    device: &CudaDevice,
    a: &CudaStorage,
    b: &CudaStorage,
    dtype: DType,
) -> Result<CudaStorage> {
    match (a, b) {
        (CudaStorage::F32(a), CudaStorage::F32(b)) => add_typed(device, "add_f32", a, b),
        (CudaStorage::F16(a), CudaStorage::F16(b)) => add_typed(device, "add_f16", a, b),
        (CudaStorage::BF16(a), CudaStorage::BF16(b)) => add_typed(device, "add_bf16", a, b),
        _ => Err(Error::UnsupportedDType { op: "add", dtype }),
    }
}

fn add_typed<T: Element>(
    device: &CudaDevice,
    kernel: &str,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
) -> Result<CudaStorage> {
    let n = a.len();
    let mut out = alloc_for_kernel::<T>(device, n)?;
    if n > 0 {
        let function = device.function(&ELEMENTWISE, kernel)?;
        let mut launch = device.stream().launch_builder(&function);
        launch.arg(a).arg(b).arg(&mut out).arg(&n);
        // SAFETY: a, b and out hold n elements of the kernel's element type; the kernel reads
        // and writes indices below n only.
        unsafe { launch.launch(grid(n)) }.map_err(|e| Error::cuda(kernel, e))?;
    }
    Ok(T::into_cuda(out))
}

/// A copy of `src` converted to the float dtype `dst`.
pub(crate) fn cast(device: &CudaDevice, src: &CudaStorage, dst: DType) -> Result<CudaStorage> {
    match src {
        CudaStorage::F32(s) => cast_from(device, s, "f32", dst),
        CudaStorage::F16(s) => cast_from(device, s, "f16", dst),
        CudaStorage::BF16(s) => cast_from(device, s, "bf16", dst),
        CudaStorage::Blocks(_) => Err(Error::UnsupportedDType {
            op: "cast",
            dtype: dst,
        }),
    }
}

fn cast_from<S: Element>(
    device: &CudaDevice,
    src: &CudaSlice<S>,
    src_name: &str,
    dst: DType,
) -> Result<CudaStorage> {
    match dst {
        DType::F32 => cast_typed::<S, f32>(device, src, src_name, "f32"),
        DType::F16 => cast_typed::<S, half::f16>(device, src, src_name, "f16"),
        DType::BF16 => cast_typed::<S, half::bf16>(device, src, src_name, "bf16"),
        _ => Err(Error::UnsupportedDType {
            op: "cast",
            dtype: dst,
        }),
    }
}

fn cast_typed<S: Element, D: Element>(
    device: &CudaDevice,
    src: &CudaSlice<S>,
    src_name: &str,
    dst_name: &str,
) -> Result<CudaStorage> {
    if S::DTYPE == D::DTYPE {
        let copy = device
            .stream()
            .clone_dtod(src)
            .map_err(|e| Error::cuda("cuMemcpyDtoD", e))?;
        return Ok(S::into_cuda(copy));
    }
    let n = src.len();
    let mut out = alloc_for_kernel::<D>(device, n)?;
    if n > 0 {
        let kernel = format!("cast_{src_name}_{dst_name}");
        let function = device.function(&ELEMENTWISE, &kernel)?;
        let mut launch = device.stream().launch_builder(&function);
        launch.arg(src).arg(&mut out).arg(&n);
        // SAFETY: src holds n elements of S and out n elements of D, as the kernel expects.
        unsafe { launch.launch(grid(n)) }.map_err(|e| Error::cuda(&kernel, e))?;
    }
    Ok(D::into_cuda(out))
}

/// An output buffer that the kernel about to run writes in full.
fn alloc_for_kernel<T: Element>(device: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialised, but every caller launches a kernel that writes all
    // n elements before the buffer is read.
    unsafe { device.stream().alloc::<T>(n) }.map_err(|e| Error::cuda("cuMemAlloc", e))
}
