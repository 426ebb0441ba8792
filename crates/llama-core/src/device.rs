//! Where a tensor lives: host memory or one CUDA device.

use std::fmt;
use std::str::FromStr;

use crate::{cuda, Error, Result};

/// Environment variable that forces CPU mode: `FASTLLAMA_DEVICE=cpu` hides every CUDA device,
/// as `cargo xtask test --cpu` does. `cuda` or `cuda:N` picks the default device.
pub const DEVICE_ENV: &str = "FASTLLAMA_DEVICE";

/// A compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory; ops run on the rayon thread pool.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl Device {
    /// The first CUDA device when a driver and a device are present and CPU mode is not forced;
    /// otherwise the CPU. Never panics, whatever the machine lacks.
    pub fn cuda_if_available() -> Device {
        match cuda::device_count() {
            Ok(n) if n > 0 => Device::Cuda(0),
            _ => Device::Cpu,
        }
    }

    /// The device named by `FASTLLAMA_DEVICE` (`cpu`, `cuda`, `cuda:N`), or
    /// [`Device::cuda_if_available`] when it is unset. A malformed value is an error.
    pub fn from_env() -> Result<Device> {
        match std::env::var(DEVICE_ENV) {
            Ok(name) if !name.trim().is_empty() => name.parse(),
            _ => Ok(Device::cuda_if_available()),
        }
    }

    /// True for `Device::Cuda(_)`.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or(Error::UnknownDevice(s)),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
