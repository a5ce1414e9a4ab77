//! File writes that never leave a half-written file behind.
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(anyhow::Error::from)
        .and_then(|()| commit(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Syncs the finished file `tmp` and renames it over `path` (removing `tmp` if that fails).
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let result = std::fs::File::open(tmp).and_then(|f| f.sync_all()).and_then(|()| std::fs::rename(tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result.with_context(|| format!("moving {} to {}", tmp.display(), path.display()))
}
