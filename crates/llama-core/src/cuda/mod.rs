//! The CUDA side of `llama-core`: probing for a driver, one context and stream per device,
//! host/device copies (and [`HostStash`], buffers parked in pinned host memory), and the
//! kernel cache.
//!
//! Everything goes through `cudarc` with dynamic loading, so the crate builds without a CUDA
//! toolkit. `cudarc` panics on first use when `libcuda.so` is missing; [`device_count`] probes
//! for the library first, and every entry point here goes through it, so a machine without a
//! driver gets an [`Error::CudaUnavailable`] value instead.

mod host_table;
mod kernels;
mod nvrtc;
pub(crate) mod ops;
mod stash;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUmemPool_attribute as PoolAttribute;
use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

pub use host_table::HostTable;
pub use kernels::KernelSource;
pub use stash::{HostStash, Transfer};

use crate::storage::{CpuStorage, CudaStorage};
use crate::{Error, Result, DEVICE_ENV};

/// Number of CUDA devices, or why there are none: CPU mode forced by `FASTLLAMA_DEVICE=cpu`,
/// no driver library, a driver that fails to initialise, or zero devices. Never panics.
pub fn device_count() -> Result<usize> {
    if cpu_forced() {
        return Err(Error::CudaUnavailable(format!(
            "CPU mode forced by {DEVICE_ENV}=cpu"
        )));
    }
    static PROBE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // cudarc panics when a symbol is missing from an older driver; keep that a value.
            std::panic::catch_unwind(probe_driver)
                .unwrap_or_else(|_| Err("the CUDA driver library lacks a needed symbol".into()))
        })
        .clone()
        .map_err(Error::CudaUnavailable)
}

/// True when [`device_count`] finds at least one device.
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

fn cpu_forced() -> bool {
    std::env::var(DEVICE_ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("cpu"))
}

fn probe_driver() -> std::result::Result<usize, String> {
    // SAFETY: only tries to dlopen the driver library under its usual names and closes it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) was not found".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    let count = CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
    match usize::try_from(count) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("the driver reports no CUDA device".into()),
    }
}

/// One CUDA device as fastllama uses it: its primary context, one stream on which all work is
/// queued in order, and the kernels compiled for it so far.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}: {}, {})",
            self.ordinal,
            self.name,
            self.arch()
        )
    }
}

impl CudaDevice {
    /// The device with this ordinal, created on first use and shared afterwards.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::CudaUnavailable(format!(
                "device cuda:{ordinal} requested, but only {count} present"
            )));
        }
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(device) = devices.get(&ordinal) {
            return Ok(device.clone());
        }
        let device = Arc::new(CudaDevice::open(ordinal)?);
        devices.insert(ordinal, device.clone());
        Ok(device)
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let context = CudaContext::new(ordinal).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        let name = context
            .name()
            .map_err(|e| Error::cuda("cuDeviceGetName", e))?;
        let compute_capability = context
            .compute_capability()
            .map_err(|e| Error::cuda("cuDeviceGetAttribute", e))?;
        // SAFETY: every allocation, kernel and cuBLAS call of this device goes to its one
        // stream (below), whose order alone orders each buffer's uses; the one other stream,
        // a HostStash's copies, orders itself against it with explicit events (stash.rs).
        // cudarc's per-buffer events would add driver calls to every allocation and launch
        // (thousands per training step) and order nothing more.
        unsafe { context.disable_event_tracking() };
        let stream = context
            .new_stream()
            .map_err(|e| Error::cuda("cuStreamCreate", e))?;
        let device = CudaDevice {
            ordinal,
            name,
            compute_capability,
            context,
            stream,
            modules: Mutex::new(HashMap::new()),
        };
        // The pool keeps what is freed for the next allocation instead of handing it back to
        // the driver at every synchronisation (its default threshold, 0): a training step
        // frees and takes back gigabytes, and synchronises on every loss chunk.
        device.set_pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
        Ok(device)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// NVRTC's architecture name for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("sm_{major}{minor}")
    }

    /// Total and free device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        let (free, total) = self
            .context
            .mem_get_info()
            .map_err(|e| Error::cuda("cuMemGetInfo", e))?;
        Ok((total, free))
    }

    /// The most bytes the device's default memory pool (which serves every allocation made
    /// here, stream-ordered) has had handed out at once since the last [`Self::reset_peak`];
    /// None where the device allocates without a pool. Unlike `memory()`'s free count, it sees
    /// through the pool keeping freed blocks for reuse.
    pub fn pool_peak(&self) -> Result<Option<usize>> {
        self.pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Bytes the default memory pool has handed out and not yet had back.
    pub fn pool_in_use(&self) -> Result<Option<usize>> {
        self.pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// Restarts [`Self::pool_peak`] (the driver's documented reset: the watermark set to 0).
    pub fn reset_peak(&self) -> Result<()> {
        self.set_pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
    }

    /// Sets a u64 attribute of the default pool (nothing without a pool).
    fn set_pool_attribute(&self, attr: PoolAttribute, value: u64) -> Result<()> {
        if !self.context.has_async_alloc() {
            return Ok(());
        }
        let mut value = value;
        // SAFETY: the default pool lives as long as the context; the attributes set here
        // (USED_MEM_HIGH, RELEASE_THRESHOLD) are cuuint64_t, read from a u64.
        unsafe {
            let pool = self.default_pool()?;
            cudarc::driver::result::mem_pool::set_attribute(
                pool,
                attr,
                (&mut value as *mut u64).cast(),
            )
        }
        .map_err(|e| Error::cuda("cuMemPoolSetAttribute", e))
    }

    /// A u64 attribute of the default pool; None without a pool.
    fn pool_attribute(&self, attr: PoolAttribute) -> Result<Option<usize>> {
        if !self.context.has_async_alloc() {
            return Ok(None);
        }
        let mut value: u64 = 0;
        // SAFETY: the default pool lives as long as the context; the attributes read here
        // (USED_MEM_HIGH, USED_MEM_CURRENT) are cuuint64_t, written into a u64.
        unsafe {
            let pool = self.default_pool()?;
            cudarc::driver::result::mem_pool::get_attribute(
                pool,
                attr,
                (&mut value as *mut u64).cast(),
            )
        }
        .map_err(|e| Error::cuda("cuMemPoolGetAttribute", e))?;
        Ok(Some(value as usize))
    }

    /// The device's default memory pool.
    ///
    /// # Safety
    /// The handle is valid while the context lives.
    unsafe fn default_pool(&self) -> Result<cudarc::driver::sys::CUmemoryPool> {
        self.context
            .bind_to_thread()
            .map_err(|e| Error::cuda("cuCtxSetCurrent", e))?;
        // SAFETY: the device handle comes from the live context.
        unsafe { cudarc::driver::result::device::get_default_mem_pool(self.context.cu_device()) }
            .map_err(|e| Error::cuda("cuDeviceGetDefaultMemPool", e))
    }

    /// The stream that every op on this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work and reports any asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("cuStreamSynchronize", e))
    }

    /// A zero-filled device buffer.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(|e| Error::cuda("cuMemAlloc", e))
    }

    /// A device buffer left as the pool hands it out, for an output that a kernel or product
    /// then writes whole (the memset of [`Self::zeros`] costs a training step gigabytes of
    /// writes). Reading it before that write gives unspecified numbers, never invalid values.
    pub fn uninit<T: crate::Element>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: T is Pod (Element requires it), so every bit pattern the memory may hold is
        // a valid T; the allocation itself is an ordinary stream-ordered one.
        unsafe { self.stream.alloc::<T>(len) }.map_err(|e| Error::cuda("cuMemAlloc", e))
    }

    /// Copies a host slice to a new device buffer.
    pub fn htod<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| Error::cuda("cuMemcpyHtoD", e))
    }

    /// Copies a device buffer to a new host vector (waits for queued work).
    pub fn dtoh<T: DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(data)
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))
    }

    pub(crate) fn upload(&self, host: &CpuStorage) -> Result<CudaStorage> {
        Ok(match host {
            CpuStorage::F32(v) => CudaStorage::F32(self.htod(v)?),
            CpuStorage::F16(v) => CudaStorage::F16(self.htod(v)?),
            CpuStorage::BF16(v) => CudaStorage::BF16(self.htod(v)?),
            CpuStorage::Blocks(v) => CudaStorage::Blocks(self.htod(v)?),
        })
    }

    pub(crate) fn download(&self, device: &CudaStorage) -> Result<CpuStorage> {
        Ok(match device {
            CudaStorage::F32(v) => CpuStorage::F32(self.dtoh(v)?),
            CudaStorage::F16(v) => CpuStorage::F16(self.dtoh(v)?),
            CudaStorage::BF16(v) => CpuStorage::BF16(self.dtoh(v)?),
            CudaStorage::Blocks(v) => CpuStorage::Blocks(
                self.stream
                    .clone_dtoh(v)
                    .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?,
            ),
        })
    }
}
