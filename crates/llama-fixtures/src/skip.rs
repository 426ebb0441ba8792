//! Skipping CUDA tests where there is no CUDA device, visibly and countably.
//!
//! Rust's test harness cannot mark a test skipped at run time, so a GPU test returns early and
//! records the skip: one line on stderr and one line appended to `$FASTLLAMA_SKIP_LOG`, which
//! `cargo xtask test` and the GPU bundle's `run.sh` count into "skipped: no CUDA device: N".

use std::io::Write;
use std::sync::Arc;

use llama_core::cuda::CudaDevice;

/// Environment variable naming the file that skipped tests are appended to.
pub const SKIP_LOG_ENV: &str = "FASTLLAMA_SKIP_LOG";

/// The first CUDA device, or `None` after recording that `test` was skipped and why.
/// Use through the [`cuda_or_skip!`](crate::cuda_or_skip) macro, which fills in the test's name.
pub fn cuda_device_or_skip(test: &str) -> Option<Arc<CudaDevice>> {
    match CudaDevice::get(0) {
        Ok(device) => Some(device),
        Err(e) => {
            record_skip(test, &e.to_string());
            None
        }
    }
}

fn record_skip(test: &str, reason: &str) {
    eprintln!("skipped: {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
        // One short line per write with O_APPEND: parallel tests do not interleave.
        let line = format!("{test}\t{reason}\n");
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!(
                "could not record the skip in {}: {e}",
                path.to_string_lossy()
            );
        }
    }
}

/// `let Some(device) = cuda_or_skip!() else { return };` — the first CUDA device, or a recorded
/// skip (named after the enclosing test function) and an early return.
#[macro_export]
macro_rules! cuda_or_skip {
    () => {{
        fn here() {}
        let name = ::std::any::type_name_of_val(&here);
        $crate::cuda_device_or_skip(name.trim_end_matches("::here"))
    }};
}
