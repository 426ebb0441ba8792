//! Read-only memory maps of weight files: the one place this crate uses `unsafe`.

use std::path::Path;

use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// Maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only and owned by the caller for as long as it is used; a file
    // truncated by another process while mapped is outside what any mmap reader can defend.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}
