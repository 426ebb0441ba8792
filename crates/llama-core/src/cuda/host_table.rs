//! A read-only table in pinned host memory that kernels read in place: the allocation is
//! mapped into the device's address space (`CU_MEMHOSTALLOC_DEVICEMAP`), so a kernel given
//! [`HostTable::device_ptr`] fetches the rows it touches over the bus and the table takes no
//! device memory. For tables that are large and read sparsely: a training step looks up a few
//! thousand rows of Llama-3-8B's 1 GiB embedding table once.

use cudarc::driver::{sys, PinnedHostSlice};

use super::CudaDevice;
use crate::{Element, Error, Result};

/// A [len] table in mapped pinned host memory, written once at creation.
pub struct HostTable<T> {
    /// At least one value long (an allocation of zero bytes is an error).
    host: PinnedHostSlice<T>,
    len: usize,
    device_ptr: sys::CUdeviceptr,
}

impl<T: Element> HostTable<T> {
    /// A copy of `values` in mapped pinned memory of `device`'s context.
    pub fn new(device: &CudaDevice, values: &[T]) -> Result<HostTable<T>> {
        let err = |what: &'static str| move |e| Error::cuda(what, e);
        // SAFETY: T is Pod (Element), so any bytes are valid values; every value is written
        // below before the table is used.
        let mut host = unsafe {
            device
                .context
                .alloc_pinned_with_flags::<T>(values.len().max(1), sys::CU_MEMHOSTALLOC_DEVICEMAP)
        }
        .map_err(err("cuMemHostAlloc"))?;
        host.as_mut_slice().map_err(err("cuEventSynchronize"))?[..values.len()]
            .copy_from_slice(values);
        let host_ptr = host.as_ptr().map_err(err("cuEventSynchronize"))?;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: host_ptr is the start of a live cuMemHostAlloc allocation made with
        // DEVICEMAP in this context (flags must be 0); device_ptr is a valid out-pointer.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, host_ptr as *mut _, 0) }
            .result()
            .map_err(err("cuMemHostGetDevicePointer"))?;
        Ok(HostTable {
            host,
            len: values.len(),
            device_ptr,
        })
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of pinned host memory it holds.
    pub fn host_bytes(&self) -> usize {
        self.host.num_bytes()
    }

    /// The table's address for kernels (read-only: it is never written after creation).
    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }
}
