//! Volumes in and out: NIfTI (`.nii`, `.nii.gz`), DICOM series, PNG overlays.
//! NIfTI's column-major `(x, y, z)` voxel order (x fastest) becomes `[z, y, x]` here and
//! nowhere else: the bytes are read straight into a row-major `[z, y, x]` array and
//! written back the same way. Nothing here knows about the network.
//!
//! Bad input never panics: every problem is an [`IoError`] whose one-line message names
//! the file and the problem. NaN/Inf voxels are replaced with the minimum finite value of
//! the volume and counted ([`ReadReport::nonfinite`]); [`read_volume`] prints one
//! `warning:` line on stderr when there were any, [`read_volume_report`] leaves that to the
//! caller. Every file written goes through [`atomic::write_atomic`].

pub mod atomic;
pub mod dicom;
pub mod error;
pub mod geometry;
pub mod inspect;
pub mod nii;
pub mod overlay;
pub mod png;
pub mod volume;

pub use error::IoError;
pub use nii::{
    check_same_shape, to_mask, write_map, write_mask, write_volume, DataType, ReadOptions,
    ReadReport,
};
pub use volume::{Mask, Volume};

use std::path::Path;

/// Reads a CT volume in HU: a `.nii`/`.nii.gz` file or a folder of DICOM slices.
/// Prints one `warning:` line per non-fatal problem (NaN/Inf voxels, skipped files).
pub fn read_volume(path: &Path) -> Result<Volume, IoError> {
    let (v, report) = read_volume_report(path)?;
    for w in report_warnings(path, &report) {
        eprintln!("warning: {w}");
    }
    Ok(v)
}

/// As [`read_volume`], without printing: the report carries the NaN/Inf count and any
/// warnings.
pub fn read_volume_report(path: &Path) -> Result<(Volume, ReadReport), IoError> {
    read_volume_with(path, &ReadOptions::default())
}

/// As [`read_volume_report`] with explicit limits.
pub fn read_volume_with(path: &Path, opts: &ReadOptions) -> Result<(Volume, ReadReport), IoError> {
    let meta = std::fs::metadata(path).map_err(|e| IoError::read(path, e))?;
    if meta.is_dir() {
        dicom::read_series_with(path, opts)
    } else {
        nii::read_nifti_with(path, opts)
    }
}

/// Reads a mask file (or DICOM folder) as a volume whose voxels are the stored values
/// (after any scaling); [`to_mask`] binarises it.
pub fn read_mask(path: &Path) -> Result<Volume, IoError> {
    read_volume(path)
}

/// One line per non-fatal finding of a read, without the `warning:` prefix.
pub fn report_warnings(path: &Path, r: &ReadReport) -> Vec<String> {
    let mut out = r.warnings.clone();
    if r.nonfinite > 0 {
        out.push(format!(
            "{}: {} NaN/Inf voxels replaced with the minimum finite value {}",
            path.display(),
            r.nonfinite,
            r.fill
        ));
    }
    out
}
