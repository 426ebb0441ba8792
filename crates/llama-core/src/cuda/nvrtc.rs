//! Run-time compilation of CUDA C to a cubin with NVRTC (FFI through `cudarc::nvrtc`).

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use crate::{Error, Result};

/// NVRTC options for `arch` (e.g. `sm_90`): real-architecture code, so the image is SASS that
/// loads without a JIT step.
pub(super) fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
    ]
}

/// NVRTC's version as "major.minor", or why NVRTC is unusable.
pub(super) fn version() -> Result<String> {
    ensure_present()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::cuda("nvrtcVersion", e))?;
    Ok(format!("{major}.{minor}"))
}

fn ensure_present() -> Result<()> {
    // SAFETY: only tries to dlopen the NVRTC library under its usual names and closes it.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(
            "the NVRTC library (libnvrtc.so.13) was not found: add the CUDA toolkit's lib64 \
             directory to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// Compiles `code` for `arch` and returns the cubin; a failed compile returns NVRTC's log.
pub(super) fn compile_cubin(name: &str, code: &str, arch: &str) -> Result<Vec<u8>> {
    ensure_present()?;
    let fail = |message: String, log: String| Error::KernelCompile {
        kernel: name.to_string(),
        arch: arch.to_string(),
        message,
        log,
    };
    let src =
        CString::new(code).map_err(|_| fail("source holds a NUL byte".into(), String::new()))?;
    let file =
        CString::new(format!("{name}.cu")).map_err(|_| fail("bad name".into(), String::new()))?;
    let program = result::create_program(&src, Some(&file))
        .map_err(|e| fail(e.to_string(), String::new()))?;
    let options = options(arch);
    // SAFETY: `program` is a live program created above; it is destroyed exactly once below.
    let compiled = unsafe { result::compile_program(program, &options) };
    let outcome = match compiled {
        Ok(()) => read_cubin(program).map_err(|e| fail(e.to_string(), String::new())),
        Err(e) => Err(fail(e.to_string(), program_log(program))),
    };
    // SAFETY: `program` came from create_program and is not used after this call.
    let _ = unsafe { result::destroy_program(program) };
    outcome
}

fn read_cubin(program: sys::nvrtcProgram) -> std::result::Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: `program` compiled successfully; NVRTC writes the image size through `size`.
    unsafe { sys::nvrtcGetCUBINSize(program, &mut size) }.result()?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the `size` bytes NVRTC reported for the image.
    unsafe { sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast::<c_char>()) }.result()?;
    Ok(cubin)
}

fn program_log(program: sys::nvrtcProgram) -> String {
    // SAFETY: `program` is live; the log is a NUL-terminated C string that NVRTC returns.
    match unsafe { result::get_program_log(program) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(no log: {e})"),
    }
}
