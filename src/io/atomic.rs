//! Outputs that are never half-written and never replace what is not a regular file.
//!
//! [`write_atomic`] writes one file: to a temporary file in the destination folder, renamed
//! into place only once complete, so a failed or interrupted write leaves the previous file
//! (or nothing) under the final name. A symbolic link is followed: the file it points to is
//! replaced and the link kept. A FIFO is written into (it cannot be replaced: a reader is
//! waiting on it) and `-` is standard output. Anything else under the name (a folder, a
//! device, a socket, a dangling link or a link loop) is an error, and nothing is written.
//!
//! [`AtomicDir`] writes a set of files (one volume's outputs): into a hidden temporary
//! folder beside the destination, renamed into place as one on [`AtomicDir::commit`] (an
//! atomic exchange with a previous folder of the same name where the file system allows), so
//! a failure half-way leaves nothing new and the previous outputs whole. It refuses to
//! replace a folder holding files it would not write itself.
//! Knows nothing about file formats.

use super::IoError;
use std::fs::{File, FileType};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a path names, in words: `"a folder"`, `"a character device"`, ...
pub fn kind_name(t: &FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a folder"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Where a write goes.
enum Target {
    Stdout,
    /// Written into, never replaced.
    Fifo(PathBuf),
    /// Replaced through a temporary file next to it (the link's target for a link).
    File(PathBuf),
}

fn resolve(path: &Path) -> Result<Target, IoError> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str() == "-" {
        return Ok(Target::Stdout);
    }
    let lmeta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::File(path.to_path_buf()))
        }
        Err(e) => return Err(super::path_error(path, e, true)),
    };
    let meta = if lmeta.file_type().is_symlink() {
        // Follows the link; a loop or a dangling link is named as such.
        super::metadata(path).map_err(|e| match e {
            IoError::Read { path, err } => IoError::Write { path, err },
            other => other,
        })?
    } else {
        lmeta.clone()
    };
    let t = meta.file_type();
    if t.is_fifo() {
        return Ok(Target::Fifo(path.to_path_buf()));
    }
    if !t.is_file() {
        return Err(IoError::invalid(
            path,
            format!(
                "cannot write: is {}{}, not a regular file (nothing was written)",
                kind_name(&t),
                if lmeta.file_type().is_symlink() {
                    " behind a symbolic link"
                } else {
                    ""
                }
            ),
        ));
    }
    if lmeta.file_type().is_symlink() {
        let real = std::fs::canonicalize(path).map_err(|e| super::path_error(path, e, true))?;
        return Ok(Target::File(real));
    }
    Ok(Target::File(path.to_path_buf()))
}

/// What [`write_atomic`]'s closure writes into (through a `BufWriter`).
pub enum Out {
    /// The temporary file of a replacement.
    File(File),
    /// A FIFO, written into.
    Fifo(File),
    Stdout(std::io::StdoutLock<'static>),
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::File(f) | Out::Fifo(f) => f.write(buf),
            Out::Stdout(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File(f) | Out::Fifo(f) => f.flush(),
            Out::Stdout(s) => s.flush(),
        }
    }
}

/// Writes `path` through `f`; see the module doc. For a regular file: creates the parent
/// folders, writes a temporary file next to it, flushes and syncs it, then renames it over
/// `path`. On any error the temporary file is removed and `path` is left untouched.
pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<Out>) -> std::io::Result<()>,
) -> Result<(), IoError> {
    match resolve(path)? {
        Target::Stdout => {
            let mut w = BufWriter::new(Out::Stdout(std::io::stdout().lock()));
            f(&mut w).map_err(|e| IoError::write(path, e))?;
            w.flush().map_err(|e| IoError::write(path, e))
        }
        Target::Fifo(p) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| IoError::write(path, e))?;
            let mut w = BufWriter::new(Out::Fifo(file));
            f(&mut w).map_err(|e| IoError::write(path, e))?;
            w.flush().map_err(|e| IoError::write(path, e))
        }
        Target::File(real) => replace_file(path, &real, f),
    }
}

fn replace_file(
    path: &Path,
    real: &Path,
    f: impl FnOnce(&mut BufWriter<Out>) -> std::io::Result<()>,
) -> Result<(), IoError> {
    let name = real
        .file_name()
        .ok_or_else(|| IoError::invalid(path, "not a file path (no file name)"))?;
    let dir = match real.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| IoError::write(path, e))?;
    let tmp = dir.join(temp_name(name, "tmp"));
    let file = File::create(&tmp).map_err(|e| IoError::write(path, e))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut w = BufWriter::new(Out::File(file));
    f(&mut w).map_err(|e| IoError::write(path, e))?;
    w.flush().map_err(|e| IoError::write(path, e))?;
    let out = w
        .into_inner()
        .map_err(|e| IoError::write(path, e.into_error()))?;
    let Out::File(file) = out else {
        return Err(IoError::invalid(path, "internal: not a file writer"));
    };
    file.sync_all().map_err(|e| IoError::write(path, e))?;
    drop(file);
    // The name may have become something else meanwhile: check again just before.
    if let Ok(m) = std::fs::symlink_metadata(real) {
        if !m.file_type().is_file() {
            return Err(IoError::invalid(
                path,
                format!(
                    "cannot write: became {} while writing (nothing was replaced)",
                    kind_name(&m.file_type())
                ),
            ));
        }
    }
    std::fs::rename(&tmp, real).map_err(|e| IoError::write(path, e))?;
    guard.0 = None;
    Ok(())
}

/// A hidden name unique within this process and across processes.
fn temp_name(name: &std::ffi::OsStr, what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        ".{}.{}-{}.{what}",
        name.to_string_lossy(),
        std::process::id(),
        n
    )
}

/// Whether `name` is one of the hidden temporary names of this module.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && (name.ends_with(".tmp") || name.ends_with(".tmpdir") || name.ends_with(".old"))
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

/// A folder of outputs written as one; see the module doc.
#[derive(Debug)]
pub struct AtomicDir {
    dest: PathBuf,
    tmp: PathBuf,
    owned: Vec<String>,
    committed: bool,
}

impl AtomicDir {
    /// Starts the folder `dest`: it must be absent, or a folder holding only files named in
    /// `owned` (the names this writer produces), so replacing it destroys nothing else.
    /// Creates the parent folders and an empty hidden temporary folder beside `dest`.
    pub fn create(dest: &Path, owned: &[&str]) -> Result<Self, IoError> {
        let owned: Vec<String> = owned.iter().map(|s| s.to_string()).collect();
        check_replaceable(dest, &owned)?;
        let name = dest
            .file_name()
            .ok_or_else(|| IoError::invalid(dest, "not a folder path (no name)"))?;
        let parent = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| IoError::write(&parent, e))?;
        let tmp = parent.join(temp_name(name, "tmpdir"));
        std::fs::create_dir(&tmp).map_err(|e| IoError::write(dest, e))?;
        Ok(AtomicDir {
            dest: dest.to_path_buf(),
            tmp,
            owned,
            committed: false,
        })
    }

    /// The folder to write the files into (the temporary one).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final folder.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Puts the written folder in place of `dest` in one step and removes the previous one.
    pub fn commit(mut self) -> Result<(), IoError> {
        check_replaceable(&self.dest, &self.owned)?;
        let exists = std::fs::symlink_metadata(&self.dest).is_ok();
        if !exists {
            std::fs::rename(&self.tmp, &self.dest).map_err(|e| IoError::write(&self.dest, e))?;
            self.committed = true;
            return Ok(());
        }
        match exchange(&self.tmp, &self.dest) {
            Ok(()) => {
                // `tmp` now holds the previous outputs.
                self.committed = true;
                let _ = std::fs::remove_dir_all(&self.tmp);
                Ok(())
            }
            Err(_) => {
                // No atomic exchange here: move the old folder aside, the new one in, and the
                // old one back if that fails.
                let name = self.dest.file_name().unwrap_or_default();
                let old = self
                    .tmp
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(temp_name(name, "old"));
                std::fs::rename(&self.dest, &old).map_err(|e| IoError::write(&self.dest, e))?;
                if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
                    let _ = std::fs::rename(&old, &self.dest);
                    return Err(IoError::write(&self.dest, e));
                }
                self.committed = true;
                let _ = std::fs::remove_dir_all(&old);
                Ok(())
            }
        }
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// An error unless `dest` is absent or a real folder holding only `owned` names (and
/// temporary leftovers).
fn check_replaceable(dest: &Path, owned: &[String]) -> Result<(), IoError> {
    let m = match std::fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(super::path_error(dest, e, true)),
    };
    if !m.file_type().is_dir() {
        return Err(IoError::invalid(
            dest,
            format!(
                "cannot write the outputs here: is {}, not a folder (nothing was replaced)",
                kind_name(&m.file_type())
            ),
        ));
    }
    let rd = std::fs::read_dir(dest).map_err(|e| IoError::read(dest, e))?;
    let mut foreign = Vec::new();
    for e in rd {
        let e = e.map_err(|e| IoError::read(dest, e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !(is_file && (owned.contains(&n) || is_temp_name(&n))) {
            foreign.push(n);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        return Err(IoError::invalid(
            dest,
            format!(
                "holds {} that ichcam would not write ({}): move them away or choose another output folder (nothing was replaced)",
                if foreign.len() == 1 { "an entry" } else { "entries" },
                foreign.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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

    #[test]
    fn a_link_is_followed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.json");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("target.json", &link).unwrap();
        write_atomic(&link, |w| w.write_all(b"new")).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn folders_links_loops_and_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let e = write_atomic(&sub, |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = write_atomic(&a, |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("symbolic link loop"), "{e}");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere/x"), &dangling).unwrap();
        let e = write_atomic(&dangling, |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("dangling"), "{e}");
        let null = Path::new("/dev/null");
        if null.exists() {
            let e = write_atomic(null, |w| w.write_all(b"x")).unwrap_err();
            assert!(e.to_string().contains("character device"), "{e}");
            use std::os::unix::fs::FileTypeExt;
            let t = std::fs::symlink_metadata(null).unwrap().file_type();
            assert!(t.is_char_device());
        }
    }

    #[test]
    fn atomic_dir_replaces_as_one_and_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out/001");
        let owned = ["a.txt", "b.txt"];
        // A failed first attempt leaves nothing.
        {
            let d = AtomicDir::create(&dest, &owned).unwrap();
            write_atomic(&d.path().join("a.txt"), |w| w.write_all(b"1")).unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            0
        );
        // A good one.
        let d = AtomicDir::create(&dest, &owned).unwrap();
        write_atomic(&d.path().join("a.txt"), |w| w.write_all(b"1")).unwrap();
        write_atomic(&d.path().join("b.txt"), |w| w.write_all(b"1")).unwrap();
        d.commit().unwrap();
        // A failed second one leaves the first whole.
        {
            let d = AtomicDir::create(&dest, &owned).unwrap();
            write_atomic(&d.path().join("a.txt"), |w| w.write_all(b"2")).unwrap();
        }
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"1");
        assert_eq!(std::fs::read(dest.join("b.txt")).unwrap(), b"1");
        // A good second one replaces it.
        let d = AtomicDir::create(&dest, &owned).unwrap();
        write_atomic(&d.path().join("a.txt"), |w| w.write_all(b"2")).unwrap();
        d.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"2");
        assert!(!dest.join("b.txt").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            1
        );
        // A folder holding someone else's file is not replaced.
        std::fs::write(dest.join("notes.txt"), b"mine").unwrap();
        let e = AtomicDir::create(&dest, &owned).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        // Nor is a file where the folder should be.
        let f = dir.path().join("out/002");
        std::fs::write(&f, b"x").unwrap();
        let e = AtomicDir::create(&f, &owned).unwrap_err();
        assert!(e.to_string().contains("not a folder"), "{e}");
    }
}
