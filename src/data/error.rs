//! The one error type of the data layer. Each message is one line naming the folder, file or
//! case and the problem, so the CLI can print it as is. Knows nothing about the network.

use crate::io::IoError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a volume, mask or file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The folder does not exist or cannot be listed.
    #[error("{}: cannot list folder: {err}", path.display())]
    Folder { path: PathBuf, err: std::io::Error },
    /// The folder holds no volumes (`.nii`, `.nii.gz`, `.hdr`/`.img` pairs, DICOM series or
    /// multi-frame files) where some were expected.
    #[error("{}: no volumes found ({expected})", path.display())]
    Empty { path: PathBuf, expected: String },
    /// A label CSV lacks a column it needs.
    #[error("{}: missing column {wanted} (header has: {found})", path.display())]
    CsvColumns {
        path: PathBuf,
        wanted: String,
        found: String,
    },
    /// A label CSV row cannot be understood.
    #[error("{}:{line}: {reason}", path.display())]
    CsvRow {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// Label rows name slices that the volume does not have.
    #[error(
        "case {id}: label rows for z = {z} but the volume {} has {depth} slices",
        image.display()
    )]
    LabelBeyondVolume {
        id: String,
        image: PathBuf,
        z: usize,
        depth: usize,
    },
    /// Neither a label CSV row nor a mask exists for a volume, and training needs labels.
    #[error(
        "case {id}: no slice labels ({}): no mask file and no rows in a label CSV",
        image.display()
    )]
    NoLabels { id: String, image: PathBuf },
    /// An argument outside its domain (sequence length 0, a split fraction outside [0, 1]...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
