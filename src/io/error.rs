//! The one error type of the io layer. Every message is one line that names the file (or
//! folder) and the problem, so the CLI can print it as is.
//! Knows nothing about the network or the pipeline.

use std::path::PathBuf;

/// An error reading or writing a volume, mask, map or image.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The operating system refused a read (missing file, permissions, I/O failure).
    #[error("{}: cannot read: {err}", path.display())]
    Read { path: PathBuf, err: std::io::Error },
    /// The operating system refused a write.
    #[error("{}: cannot write: {err}", path.display())]
    Write { path: PathBuf, err: std::io::Error },
    /// The content is malformed or not supported; `reason` says how.
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The header asks for more memory than the reader may allocate.
    #[error(
        "{}: header claims {claim}, needing {} of memory, over the {} cap \
         (set ICHCAM_MAX_VOLUME_BYTES to raise it)",
        path.display(), human_bytes(*bytes), human_bytes(*cap)
    )]
    TooLarge {
        path: PathBuf,
        claim: String,
        bytes: u128,
        cap: u128,
    },
    /// The work would need more memory than the budget ([`crate::io::budget`]) allows.
    #[error(
        "{}: {what} needs about {}, over the memory budget of {budget}",
        path.display(), human_bytes(*need)
    )]
    OverBudget {
        path: PathBuf,
        /// The work, e.g. `segmenting 4096x4096x24 voxels`.
        what: String,
        need: u128,
        /// The budget and where it comes from ([`crate::io::budget::Budget::describe`]).
        budget: String,
    },
    /// A mask or map does not have its image's shape.
    #[error(
        "{}: shape (z, y, x) = {got:?} differs from the image {} shape {want:?}",
        path.display(), image.display()
    )]
    ShapeMismatch {
        path: PathBuf,
        image: PathBuf,
        got: [usize; 3],
        want: [usize; 3],
    },
}

impl IoError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        IoError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn read(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        IoError::Read {
            path: path.into(),
            err,
        }
    }
    pub(crate) fn write(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        IoError::Write {
            path: path.into(),
            err,
        }
    }
    /// The same error about the same file under `to` instead of `from` (a file written in a
    /// temporary folder is named by its final place).
    pub fn rebase(mut self, from: &std::path::Path, to: &std::path::Path) -> Self {
        let p = match &mut self {
            IoError::Read { path, .. }
            | IoError::Write { path, .. }
            | IoError::Invalid { path, .. }
            | IoError::TooLarge { path, .. }
            | IoError::ShapeMismatch { path, .. }
            | IoError::OverBudget { path, .. } => path,
        };
        if let Ok(rest) = p.strip_prefix(from) {
            *p = to.join(rest);
        }
        self
    }
    /// The file or folder the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            IoError::Read { path, .. }
            | IoError::Write { path, .. }
            | IoError::Invalid { path, .. }
            | IoError::TooLarge { path, .. }
            | IoError::ShapeMismatch { path, .. }
            | IoError::OverBudget { path, .. } => path,
        }
    }
}

/// `1536` -> `"1.5 KiB"`; used in size messages.
pub fn human_bytes(b: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
