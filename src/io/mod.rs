//! Volumes in and out: NIfTI (`.nii`, `.nii.gz`, and `.hdr`/`.img` pairs, in), DICOM series
//! and multi-frame files, PNG overlays, DICOM Segmentations of a mask ([`dicom_seg`]). A
//! volume read from DICOM keeps its source's identifiers and slice geometry
//! ([`DicomSource`]). [`volume_stem`] is the one place that says which file names are
//! volumes (and [`volume_id`] what a named file's id is); [`clock`] the one UTC clock of the
//! outputs' timestamps.
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
pub mod clock;
pub mod dicom;
pub mod dicom_seg;
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
pub use volume::{DicomSlice, DicomSource, Mask, Volume};

use std::path::Path;

/// Reads a CT volume in HU: a `.nii`/`.nii.gz` file, a NIfTI pair (its `.hdr` or `.img`,
/// either gzipped), a DICOM file (a multi-frame image) or a folder of DICOM slices.
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
    } else if !nii::is_pair_name(path) && dicom::is_dicom_file(path) {
        dicom::read_file_with(path, opts)
    } else {
        nii::read_nifti_with(path, opts)
    }
}

/// The `(z, y, x)` dimensions of the volume at `path`, from its header alone (a NIfTI
/// pair: its `.hdr`; a DICOM
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
    } else if !nii::is_pair_name(path) && dicom::is_dicom_file(path) {
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

/// `s` without the ASCII suffix `suffix`, compared ignoring ASCII case.
pub(crate) fn strip_suffix_ci<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let n = s.len().checked_sub(suffix.len())?;
    (s.is_char_boundary(n) && s[n..].eq_ignore_ascii_case(suffix)).then(|| &s[..n])
}

/// The file name extensions of a volume, the longest first (any case): a single-file NIfTI
/// or a NIfTI pair's header (the pair is listed once, by its `.hdr`).
pub const VOLUME_EXTENSIONS: [&str; 4] = [".nii.gz", ".hdr.gz", ".nii", ".hdr"];

/// The id of a volume's file name in a folder of volumes (`049.nii.gz`, `049.nii`,
/// `049.hdr`, `049.hdr.gz` -> `049`; extensions in any case), or `None` for other names:
/// hidden files, and a pair's `.img`/`.img.gz` (the pair is listed by its header).
pub fn volume_stem(name: &str) -> Option<&str> {
    VOLUME_EXTENSIONS
        .iter()
        .find_map(|e| strip_suffix_ci(name, e))
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
}

/// The id of a volume named on its own (a command's input, a volume's source): its
/// [`volume_stem`], the base name of a pair's `.img`/`.img.gz` or of a DICOM file's `.dcm`
/// (as a folder of volumes names a loose multi-frame file), else the whole file name (a
/// DICOM folder's, or a file's without one of these extensions).
pub fn volume_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "volume".into());
    let img = strip_suffix_ci(&name, ".gz").unwrap_or(&name).to_string();
    let id = volume_stem(&name)
        .or_else(|| strip_suffix_ci(&img, ".img").filter(|s| !s.is_empty()))
        .or_else(|| strip_suffix_ci(&name, ".dcm").filter(|s| !s.is_empty()))
        .map(str::to_string);
    id.unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for (name, want) in [
            ("049.nii.gz", Some("049")),
            ("049.nii", Some("049")),
            ("049.hdr", Some("049")),
            ("049.hdr.gz", Some("049")),
            ("A.NII.GZ", Some("A")),
            ("a.Hdr", Some("a")),
            ("a.b.nii", Some("a.b")),
            ("049.img", None),
            ("049.img.gz", None),
            (".hidden.nii", None),
            (".nii", None),
            ("notes.txt", None),
            ("x.gz", None),
        ] {
            assert_eq!(volume_stem(name), want, "{name}");
        }
        for (name, want) in [
            ("d/049.nii.gz", "049"),
            ("d/049.IMG", "049"),
            ("d/049.img.gz", "049"),
            ("d/049.hdr", "049"),
            ("d/series", "series"),
            ("d/.img", ".img"),
            ("d/scan.dcm", "scan"),
            ("d/SCAN.DCM", "SCAN"),
            ("d/.dcm", ".dcm"),
            ("d/scan", "scan"),
        ] {
            assert_eq!(volume_id(Path::new(name)), want, "{name}");
        }
    }
}
