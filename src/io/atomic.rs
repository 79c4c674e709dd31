//! Atomic file writes: every output file (NIfTI, PNG, CSV, JSON) is written to a temporary
//! file in the destination folder and renamed into place only once it is complete, so a
//! failed or interrupted write never leaves a half-written file under the final name.
//! Knows nothing about file formats.

use super::IoError;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `path` through `f`: creates the parent folders, writes a temporary file next to
/// `path`, flushes and syncs it, then renames it over `path`. On any error the temporary
/// file is removed and `path` is left untouched.
pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), IoError> {
    let name = path
        .file_name()
        .ok_or_else(|| IoError::invalid(path, "not a file path (no file name)"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| IoError::write(path, e))?;
    if path.is_dir() {
        return Err(IoError::invalid(path, "cannot write: is a folder"));
    }
    let tmp = dir.join(temp_name(name));
    let file = File::create(&tmp).map_err(|e| IoError::write(path, e))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut w = BufWriter::new(file);
    f(&mut w).map_err(|e| IoError::write(path, e))?;
    w.flush().map_err(|e| IoError::write(path, e))?;
    let file = w
        .into_inner()
        .map_err(|e| IoError::write(path, e.into_error()))?;
    file.sync_all().map_err(|e| IoError::write(path, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| IoError::write(path, e))?;
    guard.0 = None;
    Ok(())
}

/// A hidden name unique within this process and across processes.
fn temp_name(name: &std::ffi::OsStr) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        n
    )
}

/// Removes the temporary file unless the write completed (also on panic in `f`).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_cleans_up_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/out.txt");
        write_atomic(&p, |w| w.write_all(b"hello")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        let q = dir.path().join("a/b/fail.txt");
        let e = write_atomic(&q, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("fail.txt"), "{e}");
        assert!(!q.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("a/b")).unwrap().collect();
        assert_eq!(left.len(), 1, "temp file left behind");
    }
}
