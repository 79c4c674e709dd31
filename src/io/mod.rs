//! Volumes in and out: NIfTI (`.nii`, `.nii.gz`), DICOM series, PNG overlays.
//! NIfTI's column-major `(x, y, z)` voxel order (x fastest) becomes `[z, y, x]` here and
//! nowhere else: the bytes are read straight into a row-major `[z, y, x]` array and
//! written back the same way. Nothing here knows about the network.
//!
//! Bad input never panics: every problem is an [`IoError`] whose one-line message names
//! the file and the problem. NaN/Inf voxels are replaced with the minimum finite value of
//! the volume and counted ([`ReadReport::nonfinite`]); [`read_volume`] prints one
//! `warning:` line on stderr when there were any, [`read_volume_report`] leaves that to the
//! caller. Every file written goes through [`atomic::write_atomic`] (a volume's set of outputs
//! through [`atomic::AtomicDir`]); every read checks its peak memory against the process's
//! [`budget`] before allocating.

pub mod atomic;
pub mod budget;
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

/// Reads a CT volume in HU: a `.nii`/`.nii.gz` file, a DICOM file (a multi-frame image) or
/// a folder of DICOM slices.
/// Prints one `warning:` line per non-fatal problem (NaN/Inf voxels, skipped files).
pub fn read_volume(path: &Path) -> Result<Volume, IoError> {
    read_volume_printing(path, &ReadOptions::default())
}

/// As [`read_volume`] with explicit options (one series of a DICOM folder:
/// [`ReadOptions::series`]).
pub fn read_volume_printing(path: &Path, opts: &ReadOptions) -> Result<Volume, IoError> {
    let (v, report) = read_volume_with(path, opts)?;
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

/// `std::fs::metadata` (following links) whose error names a symbolic-link loop or a
/// dangling link as such, rather than "no such file".
pub fn metadata(path: &Path) -> Result<std::fs::Metadata, IoError> {
    std::fs::metadata(path).map_err(|e| path_error(path, e, false))
}

/// The error for a failed look-up of `path`: a link loop and a dangling link are named.
pub(crate) fn path_error(path: &Path, e: std::io::Error, write: bool) -> IoError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return IoError::invalid(
            path,
            "symbolic link loop (too many levels of symbolic links)",
        );
    }
    if e.kind() == std::io::ErrorKind::NotFound {
        if let Ok(to) = std::fs::read_link(path) {
            return IoError::invalid(
                path,
                format!(
                    "dangling symbolic link to {} (no such file or folder)",
                    to.display()
                ),
            );
        }
    }
    if write {
        IoError::write(path, e)
    } else {
        IoError::read(path, e)
    }
}

/// As [`read_volume_report`] with explicit limits.
pub fn read_volume_with(path: &Path, opts: &ReadOptions) -> Result<(Volume, ReadReport), IoError> {
    let meta = metadata(path)?;
    if meta.is_dir() {
        dicom::read_series_with(path, opts)
    } else if dicom::is_dicom_file(path) {
        dicom::read_file_with(path, opts)
    } else {
        nii::read_nifti_with(path, opts)
    }
}

/// The `(z, y, x)` dimensions of the volume at `path`, from its header alone (a DICOM
/// folder: its number of files, or a multi-frame image's frames, an upper bound of its
/// slices, and the first image's size),
/// so that memory can be planned before the voxels are read.
pub fn probe_dims(path: &Path) -> Result<(usize, usize, usize), IoError> {
    probe_dims_with(path, &ReadOptions::default())
}

/// As [`probe_dims`]; for a DICOM folder and [`ReadOptions::series`], the dimensions of
/// that series (every image's header is read, no pixel data).
pub fn probe_dims_with(path: &Path, opts: &ReadOptions) -> Result<(usize, usize, usize), IoError> {
    if metadata(path)?.is_dir() {
        dicom::probe_series_with(path, opts.series.as_deref())
    } else if dicom::is_dicom_file(path) {
        dicom::probe_file(path)
    } else {
        let h = nii::read_header(path)?;
        nii::header_shape(&h)
            .ok_or_else(|| IoError::invalid(path, "dims are not those of a 3-D volume"))
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
