//! The kernel cache: CUDA C sources from `kernels/`, compiled by NVRTC for the device's exact
//! architecture on first use, kept on disk (keyed by a hash of the source, the architecture,
//! NVRTC's version and the options) and in memory (one module per source and device).

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::{nvrtc, CudaDevice};
use crate::cache::{cache_dir, fnv1a64, write_atomic};
use crate::{Error, Result};

/// Definitions every kernel file may use (element types, conversions); prepended to each source.
const PRELUDE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../kernels/common.cuh"
));

/// One `.cu` file of `kernels/`, embedded in the binary with `include_str!`.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// The file's stem, e.g. `elementwise` for `kernels/elementwise.cu`.
    pub name: &'static str,
    /// The CUDA C source.
    pub code: &'static str,
}

impl CudaDevice {
    /// The kernel `function` of `source`, compiling and loading the module on first use.
    pub fn function(&self, source: &KernelSource, function: &str) -> Result<CudaFunction> {
        let module = self.module(source)?;
        module.load_function(function).map_err(|e| {
            Error::cuda(
                format!("loading {function} from kernels/{}.cu", source.name),
                e,
            )
        })
    }

    fn module(&self, source: &KernelSource) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = modules.get(source.name) {
            return Ok(module.clone());
        }
        let cubin = self.cubin(source)?;
        let module = self
            .context
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| Error::cuda(format!("loading kernels/{}.cu", source.name), e))?;
        modules.insert(source.name, module.clone());
        Ok(module)
    }

    /// The compiled image: read from the disk cache when a valid one is there, else compiled
    /// and written there (a cache that cannot be written only costs a recompile next time).
    fn cubin(&self, source: &KernelSource) -> Result<Vec<u8>> {
        let arch = self.arch();
        let path = cubin_path(source, &arch)?;
        if let Ok(bytes) = std::fs::read(&path) {
            if is_elf(&bytes) {
                return Ok(bytes);
            }
        }
        let code = format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", source.name, source.code);
        let cubin = nvrtc::compile_cubin(source.name, &code, &arch)?;
        let _ = write_atomic(&path, &cubin);
        Ok(cubin)
    }
}

/// `$FASTLLAMA_CACHE/kernels/<name>-<arch>-<hash>.cubin`.
fn cubin_path(source: &KernelSource, arch: &str) -> Result<PathBuf> {
    let version = nvrtc::version()?;
    let options = nvrtc::options(arch).join(" ");
    let key = fnv1a64(&[
        PRELUDE.as_bytes(),
        source.code.as_bytes(),
        arch.as_bytes(),
        version.as_bytes(),
        options.as_bytes(),
    ]);
    Ok(cache_dir()
        .join("kernels")
        .join(format!("{}-{arch}-{key:016x}.cubin", source.name)))
}

/// A cubin is an ELF image; anything else in the cache is a truncated or foreign file.
fn is_elf(bytes: &[u8]) -> bool {
    bytes.len() > 64 && bytes.starts_with(b"\x7fELF")
}
