//! The on-disk cache shared by compiled kernels and fetched models.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "FASTLLAMA_CACHE";

/// `$FASTLLAMA_CACHE`, else `$XDG_CACHE_HOME/fastllama`, else `~/.cache/fastllama`, else a
/// directory under the system's temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("fastllama");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("fastllama"),
        None => std::env::temp_dir().join("fastllama-cache"),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// that a reader never sees a half-written file and a crash loses nothing that was there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// 64-bit FNV-1a hash of several byte strings, each followed by a separator byte so that
/// ("ab", "c") and ("a", "bc") differ. Used as a stable cache key (std's hasher is not stable
/// across Rust releases).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}
