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

/// `base.join(path)` with `.` and `dir/..` removed lexically, so that the paths the tools print read
/// as the user would write them (`runs/default`, not `runs/default/data/..`). Lexical on purpose: a
/// config's relative paths are relative to its folder as written, the way the user reads them.
pub fn join_normalized(base: &Path, path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::RootDir)) => {}
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::join_normalized;
    use std::path::Path;

    #[test]
    fn joined_paths_lose_dot_and_dot_dot() {
        let j = |b: &str, p: &str| join_normalized(Path::new(b), Path::new(p)).display().to_string();
        assert_eq!(j("runs/default/data", ".."), "runs/default");
        assert_eq!(j("runs/default/data", "../stage-a/./x"), "runs/default/stage-a/x");
        assert_eq!(j("data", "../.."), "..");
        assert_eq!(j("/a/b", "../../.."), "/");
        assert_eq!(j(".", "shards"), "shards");
        assert_eq!(j("a", ".."), ".");
        assert_eq!(j("x", "/abs/../y"), "/y");
    }
}
