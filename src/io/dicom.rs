//! DICOM CT in and out: a series folder of single-frame slices, or one multi-frame image.
//!
//! Reading: every file in the folder (not its subfolders) is tried as DICOM; files that
//! are not DICOM, or DICOM without an image (a DICOMDIR, a report), are skipped with a
//! warning in the [`ReadReport`]. [`read_file_with`] reads one multi-frame file the same
//! way, and [`probe_image`] says from a file's header alone whether it is such a volume, a
//! slice or no image (how a folder of volumes lists loose multi-frame files). All headers
//! are read and checked before any pixel is decoded: one SeriesInstanceUID (a folder holding
//! several is an error listing them, unless [`ReadOptions::series`] picks one: the other
//! series' images are then left out; [`list_series`] lists a folder's series from the
//! headers alone: UID, number, description, modality, localizer, slices, size), one Rows x
//! Columns, one ImageOrientationPatient, grayscale, no two slices at the same position, and
//! no gap (a step between neighbouring slices more than 10 % off the median step). Slices
//! are sorted by ImagePositionPatient projected on the slice normal (row cosine x column
//! cosine), and RescaleSlope/RescaleIntercept (per slice, or per frame) turn stored values
//! into HU.
//!
//! A multi-frame image (Enhanced CT, or any image with a Per-frame Functional Groups
//! Sequence) becomes one slice record per frame, checked and sorted as a folder's slices
//! are: each frame's ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
//! SliceThickness and RescaleSlope/Intercept come from its per-frame functional groups, else
//! from the shared ones (rescale also from the top level). It must be alone in its folder
//! (other images beside it are an error, not merged), have one per-frame item per frame
//! (which bounds NumberOfFrames by the file before anything per frame is allocated) and
//! pixel data for every frame (checked before decoding). A multi-frame image without
//! functional groups (legacy multi-frame CT, whose frame positions are not standardised)
//! is refused. Pixel data is decoded by the `dicom-pixeldata` crate (native, RLE and JPEG;
//! deflated data sets); another transfer syntax is an error that names it.
//!
//! Before the DICOM library sees a file, its element lengths are walked and checked against
//! the file (`scan_lengths`): the library allocates a claimed length before reading it. The
//! series' memory (for a multi-frame image: the file and its decoded frames too) is checked
//! against the budget, and an implausible pixel spacing or slice step is an error.
//! The volume gets a NIfTI header whose sform and qform (code 1, scanner) map voxels to
//! RAS+ world coordinates: DICOM's LPS with x and y negated.
//!
//! The volume keeps the first image's patient, study and series identifiers and, per slice in
//! `z` order, its SOP instance (and frame) and position ([`DicomSource`]), for a DICOM
//! Segmentation of it (`dicom_seg.rs`).
//!
//! Writing ([`write_series`], used by tests and converters): one CT Image Storage file per
//! `z` slice, int16 pixels with a rescale intercept of -1024, and the positions,
//! orientation, pixel spacing and series UID of the volume's geometry.
//! Knows nothing about the network.

use super::atomic::write_atomic;
use super::geometry::{self, Affine};
use super::nii::{check_spacing, read_full};
use super::nii::{replace_nonfinite, ReadOptions, ReadReport};
use super::volume::{DicomSlice, DicomSource, Volume};
use super::IoError;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, DecodedPixelData, ModalityLutOption, PixelDecoder};
use ndarray::Array3;
use std::path::{Path, PathBuf};

/// CT Image Storage SOP class.
const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub(crate) const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Largest relative deviation of one slice step from the median step.
const MAX_STEP_DEVIATION: f64 = 0.10;
/// Stored value = HU - WRITE_INTERCEPT.
const WRITE_INTERCEPT: f64 = -1024.0;

/// What one slice's header says: a single-frame file, or one frame of a multi-frame file.
struct SliceInfo {
    path: PathBuf,
    /// The frame's index (from 0) in a multi-frame file; `None` for a single-frame file.
    frame: Option<u32>,
    series: Option<String>,
    /// SOPClassUID and SOPInstanceUID of the file (a SEG references them).
    sop_class: String,
    sop_instance: String,
    rows: usize,
    cols: usize,
    position: [f64; 3],
    orientation: [f64; 6],
    spacing: [f64; 2],
    slope: f64,
    intercept: f64,
    thickness: Option<f64>,
    /// The file's NumberOfFrames.
    frames: u32,
    samples: u16,
    bits: u16,
    signed: bool,
}

impl SliceInfo {
    /// The file, and for a multi-frame file the frame (numbered from 1, as DICOM does).
    fn name(&self) -> String {
        match self.frame {
            None => self.path.display().to_string(),
            Some(f) => format!("{} frame {}", self.path.display(), f as u64 + 1),
        }
    }
}

/// Reads a folder of CT slices as one volume with the default limits.
pub fn read_series(dir: &Path) -> Result<(Volume, ReadReport), IoError> {
    read_series_with(dir, &ReadOptions::default())
}

/// The files of a series folder, sorted (not its subfolders).
fn series_files(dir: &Path) -> Result<Vec<PathBuf>, IoError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| IoError::read(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// `(slices, rows, columns)` of a series folder from the first DICOM image's header: an
/// upper bound of the volume's `(z, y, x)` for planning memory (the files, or the frames of
/// a multi-frame image).
pub fn probe_series(dir: &Path) -> Result<(usize, usize, usize), IoError> {
    probe_files(dir, &series_files(dir)?)
}

/// As [`probe_series`], for the series `series` (a SeriesInstanceUID) of the folder when
/// given: its slice count and size from every image's header ([`list_series`]), pixel data
/// unread; an error listing the folder's series when it holds none of that series.
pub fn probe_series_with(
    dir: &Path,
    series: Option<&str>,
) -> Result<(usize, usize, usize), IoError> {
    let Some(want) = series else {
        return probe_series(dir);
    };
    let found = list_series(dir)?;
    match found.iter().find(|s| s.uid.as_deref() == Some(want)) {
        Some(s) => Ok((s.slices, s.rows, s.cols)),
        None => Err(no_such_series(dir, want, &found)),
    }
}

/// One series of a folder, from its images' headers alone ([`list_series`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesInfo {
    /// SeriesInstanceUID; `None` for images that carry none.
    pub uid: Option<String>,
    /// SeriesNumber.
    pub number: Option<i64>,
    /// SeriesDescription.
    pub description: Option<String>,
    /// Modality (`CT`, ...).
    pub modality: Option<String>,
    /// ImageType names LOCALIZER: a scout (topogram), not a volume.
    pub localizer: bool,
    /// Slices: single-frame images plus the frames of multi-frame images.
    pub slices: usize,
    /// Files holding them.
    pub files: usize,
    /// The first image's size.
    pub rows: usize,
    pub cols: usize,
}

impl SeriesInfo {
    /// One line: `#3 "Brain 5mm" CT, 40 slices of 512x512 (cols x rows), UID 1.2.3`.
    pub fn line(&self) -> String {
        format!(
            "#{} {} {}{}, {} slice(s) of {}x{}, UID {}",
            self.number
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            self.description
                .as_deref()
                .map(|d| format!("{d:?}"))
                .unwrap_or_else(|| "(no description)".into()),
            self.modality.as_deref().unwrap_or("(no modality)"),
            if self.localizer { " LOCALIZER" } else { "" },
            self.slices,
            self.cols,
            self.rows,
            self.uid.as_deref().unwrap_or("(none)")
        )
    }
}

/// The series of the DICOM images in `dir` (not its subfolders), sorted by SeriesNumber
/// then UID, from the headers alone (pixel data is never read). Files that are not DICOM or
/// hold no image are left out; a file with the `DICM` code whose header is corrupt or
/// refused is the reader's error. An empty list: no DICOM image in the folder.
pub fn list_series(dir: &Path) -> Result<Vec<SeriesInfo>, IoError> {
    series_of_files(&series_files(dir)?)
}

/// The series of `files`: see [`list_series`].
fn series_of_files(files: &[PathBuf]) -> Result<Vec<SeriesInfo>, IoError> {
    let mut out: Vec<SeriesInfo> = Vec::new();
    for p in files {
        let Some(obj) = open_header(p)? else {
            continue;
        };
        let found = image_info(p, &obj)?;
        let Some(first) = found.first() else {
            continue;
        };
        match out.iter_mut().find(|s| s.uid == first.series) {
            Some(s) => {
                s.slices += found.len();
                s.files += 1;
            }
            None => {
                let text = |tag| {
                    Some(
                        text_of(&obj, tag)
                            .trim_start_matches(['\0', ' '])
                            .to_string(),
                    )
                    .filter(|v| !v.is_empty())
                };
                let localizer = obj
                    .element_opt(tags::IMAGE_TYPE)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_multi_str().ok().map(|v| v.to_vec()))
                    .is_some_and(|v| {
                        v.iter().any(|t| {
                            t.trim_matches(['\0', ' '])
                                .eq_ignore_ascii_case("LOCALIZER")
                        })
                    });
                out.push(SeriesInfo {
                    uid: first.series.clone(),
                    number: text(tags::SERIES_NUMBER).and_then(|n| n.parse().ok()),
                    description: text(tags::SERIES_DESCRIPTION),
                    modality: text(tags::MODALITY),
                    localizer,
                    slices: found.len(),
                    files: 1,
                    rows: first.rows,
                    cols: first.cols,
                })
            }
        }
    }
    out.sort_by(|a, b| (a.number, &a.uid).cmp(&(b.number, &b.uid)));
    Ok(out)
}

/// The series' [`SeriesInfo::line`]s joined by `; `, for one-line error messages.
fn series_lines(found: &[SeriesInfo]) -> String {
    found
        .iter()
        .map(|s| s.line())
        .collect::<Vec<_>>()
        .join("; ")
}

/// How to read one series of a folder holding several.
const PICK_ONE: &str = "read one series by its SeriesInstanceUID (`ichcam segment --series UID`; \
     `ichcam segment --recursive` takes each CT series)";

fn no_such_series(dir: &Path, want: &str, found: &[SeriesInfo]) -> IoError {
    IoError::invalid(
        dir,
        format!(
            "no images of the series {want} (SeriesInstanceUID); the folder holds {} series: {}",
            found.len(),
            series_lines(found)
        ),
    )
}

/// As [`probe_series`] for one DICOM file.
pub fn probe_file(path: &Path) -> Result<(usize, usize, usize), IoError> {
    probe_files(path, &[path.to_path_buf()])
}

fn probe_files(source: &Path, files: &[PathBuf]) -> Result<(usize, usize, usize), IoError> {
    for p in files {
        let Some(obj) = open_header(p)? else {
            continue;
        };
        let s = image_info(p, &obj)?;
        if let Some(first) = s.first() {
            return Ok((files.len() - 1 + s.len(), first.rows, first.cols));
        }
    }
    Err(IoError::invalid(source, "no DICOM images"))
}

/// Whether the file at `p` carries DICOM's `DICM` code (after the 128-byte preamble).
pub fn is_dicom_file(p: &Path) -> bool {
    has_dicm_magic(p)
}

/// What one file holds as DICOM, from its header alone: [`probe_image`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileImage {
    /// No `DICM` code: not a DICOM file (as a series folder's reader skips it).
    NotDicom,
    /// DICOM without an image (no Rows/Columns: a DICOMDIR, a report).
    NoImage,
    /// One slice: a single-frame image, or a multi-frame image of one frame.
    Slice,
    /// A multi-frame image of more than one frame (with functional groups): a volume on its
    /// own, as [`read_file_with`] reads it.
    MultiFrame { frames: usize },
}

/// Says what the file at `p` holds ([`FileImage`]) from its header, without reading its
/// pixel data: the cheap look that lists a loose multi-frame file as a volume. A file with
/// the `DICM` code whose header is corrupt, or that [`read_file_with`] would refuse from
/// the header alone (a legacy multi-frame image, a NumberOfFrames the per-frame groups
/// contradict, a frame without a position), is the error the reader would give.
pub fn probe_image(p: &Path) -> Result<FileImage, IoError> {
    if !has_dicm_magic(p) {
        return Ok(FileImage::NotDicom);
    }
    let Some(obj) = open_header(p)? else {
        return Ok(FileImage::NotDicom);
    };
    let s = image_info(p, &obj)?;
    Ok(match s.first() {
        None => FileImage::NoImage,
        Some(f) if f.frame.is_some() && s.len() > 1 => FileImage::MultiFrame { frames: s.len() },
        Some(_) => FileImage::Slice,
    })
}

/// Reads a folder of CT slices (or one multi-frame image) as one volume; see the module doc
/// for what is checked.
pub fn read_series_with(dir: &Path, opts: &ReadOptions) -> Result<(Volume, ReadReport), IoError> {
    let files = series_files(dir)?;
    if files.is_empty() {
        let has_subdirs = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().any(|e| e.path().is_dir()))
            .unwrap_or(false);
        return Err(IoError::invalid(
            dir,
            if has_subdirs {
                "no files in the folder to read as a DICOM series (subfolders are not searched)"
            } else {
                "empty folder: no files to read as a DICOM series"
            },
        ));
    }
    read_files(dir, &files, opts)
}

/// Reads one multi-frame DICOM file as a volume, with the checks of [`read_series_with`];
/// a single-frame file (one slice of a series) is an error naming the folder to read.
pub fn read_file_with(path: &Path, opts: &ReadOptions) -> Result<(Volume, ReadReport), IoError> {
    if !has_dicm_magic(path) {
        return Err(IoError::invalid(path, "not a DICOM file (no DICM code)"));
    }
    read_files(path, &[path.to_path_buf()], opts)
}

/// Reads `files` (a folder's, or one file: `source`) as one volume.
fn read_files(
    source: &Path,
    files: &[PathBuf],
    opts: &ReadOptions,
) -> Result<(Volume, ReadReport), IoError> {
    let dir = source;
    let mut report = ReadReport::default();
    let mut slices = Vec::new();
    // The patient and study of the first image (a SEG copies them).
    let mut study: Option<DicomSource> = None;
    let budget = super::budget::budget();
    for p in files {
        // The library holds a whole file in memory, and allocates each element's claimed
        // length before reading it: both are bounded before it sees the file.
        let flen = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        budget.check(p, flen as u128 * 2, || "reading a DICOM file".into())?;
        let Some(obj) = open_header(p)? else {
            report
                .warnings
                .push(format!("{}: skipped, not a DICOM file", p.display()));
            continue;
        };
        let found = image_info(p, &obj)?;
        if study.is_none() && !found.is_empty() {
            study = Some(study_of(&obj));
        }
        if found.is_empty() {
            report.warnings.push(format!(
                "{}: skipped, DICOM without an image (no Rows/Columns)",
                p.display()
            ));
        }
        slices.extend(found);
    }
    if files.len() == 1 && files[0] == source {
        // A file named on its own must be a whole volume: one slice of a series is not.
        match slices.first() {
            None => {
                return Err(IoError::invalid(
                    source,
                    "DICOM without an image (no Rows/Columns)",
                ))
            }
            Some(s) if s.frame.is_none() => {
                return Err(IoError::invalid(
                    source,
                    "a single-frame DICOM image is one slice of a series: read the series' folder",
                ))
            }
            Some(_) => {}
        }
    }
    if slices.is_empty() {
        return Err(IoError::invalid(
            dir,
            format!(
                "no DICOM images among the {} files in the folder{}",
                files.len(),
                if files.iter().any(|f| {
                    f.file_name()
                        .is_some_and(|n| super::volume_stem(&n.to_string_lossy()).is_some())
                }) {
                    " (it holds NIfTI files: read one of them instead)"
                } else {
                    ""
                }
            ),
        ));
    }
    if let Some(want) = &opts.series {
        slices.retain(|s| s.series.as_deref() == Some(want.as_str()));
        if slices.is_empty() {
            return Err(no_such_series(dir, want, &series_of_files(files)?));
        }
    }
    let mut uids: Vec<&str> = slices.iter().filter_map(|x| x.series.as_deref()).collect();
    uids.sort_unstable();
    uids.dedup();
    if uids.len() > 1 {
        let found = series_of_files(files)?;
        return Err(IoError::invalid(
            dir,
            format!(
                "mixed series: {} different SeriesInstanceUIDs in the folder; {PICK_ONE}, or \
                 put one series per folder: {}",
                uids.len(),
                series_lines(&found)
            ),
        ));
    }
    let (slices, dz) = check_and_sort(dir, slices)?;

    let first = &slices[0];
    let (rows, cols, n) = (first.rows, first.cols, slices.len());
    let nvox = rows as u128 * cols as u128 * n as u128;
    let plane_bytes = rows as u128 * cols as u128;
    // The volume, plus one slice decoded (stored values and their f32 copy); a multi-frame
    // image is held whole (the file, and its frames decoded).
    let held = match first.frame {
        None => plane_bytes * 12,
        Some(_) => {
            let file = std::fs::metadata(&first.path).map(|m| m.len()).unwrap_or(0);
            file as u128
                + nvox * first.samples.max(1) as u128 * first.bits.div_ceil(8) as u128
                + plane_bytes * 4
        }
    };
    let need = nvox * 4 + held;
    let what = match first.frame {
        None => format!("{n} slices of {cols}x{rows}"),
        Some(_) => format!("{n} frames of {cols}x{rows}"),
    };
    if need > opts.max_bytes as u128 {
        return Err(IoError::TooLarge {
            path: dir.to_path_buf(),
            claim: what,
            bytes: need,
            cap: opts.max_bytes as u128,
        });
    }
    budget.check(dir, need, || format!("reading {what} of DICOM"))?;
    check_spacing(
        dir,
        &format!("PixelSpacing {}", first.spacing[0]),
        first.spacing[0],
        &mut report.warnings,
    )
    .and_then(|_| {
        check_spacing(
            dir,
            &format!("PixelSpacing {}", first.spacing[1]),
            first.spacing[1],
            &mut report.warnings,
        )
    })
    .and_then(|_| {
        check_spacing(
            dir,
            &format!("the slice step {dz}"),
            dz.abs(),
            &mut report.warnings,
        )
    })
    .map_err(|r| IoError::invalid(dir, r))?;
    let mut data = Array3::<f32>::zeros((n, rows, cols));
    let no_lut = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
    // Slice `k` (`s`) from frame `frame` of its decoded file, rescaled to HU.
    let mut put = |k: usize, s: &SliceInfo, decoded: &DecodedPixelData, frame: u32| {
        let px: Vec<f32> = decoded
            .to_vec_frame_with_options(frame, &no_lut)
            .map_err(|e| IoError::invalid(&s.path, format!("cannot convert pixel data: {e}")))?;
        if px.len() != rows * cols {
            return Err(IoError::invalid(
                &s.path,
                format!(
                    "pixel data holds {} values, expected {rows}x{cols}",
                    px.len()
                ),
            ));
        }
        let mut plane = data.index_axis_mut(ndarray::Axis(0), k);
        for (dst, &v) in plane.iter_mut().zip(px.iter()) {
            *dst = (v as f64 * s.slope + s.intercept) as f32;
        }
        Ok(())
    };
    if first.frame.is_some() {
        // One multi-frame file (check_and_sort refused any other file beside it).
        let obj = open_image(first)?;
        let decoded = decode_pixels(first, &obj)?;
        for (k, s) in slices.iter().enumerate() {
            put(k, s, &decoded, s.frame.unwrap_or(0))?;
        }
    } else {
        for (k, s) in slices.iter().enumerate() {
            let obj = open_image(s)?;
            put(k, s, &decode_pixels(s, &obj)?, 0)?;
        }
    }
    let (nonfinite, fill) = match data.as_slice_mut() {
        Some(vals) => replace_nonfinite(vals),
        None => (0, 0.0),
    };
    report.nonfinite = nonfinite;
    report.fill = fill;
    report.datatype = format!(
        "{}{} (DICOM, {n} {})",
        if first.signed { "int" } else { "uint" },
        first.bits,
        if first.frame.is_some() {
            "frames of one multi-frame image"
        } else {
            "slices"
        }
    );

    let aff = series_affine(first, dz);
    let spacing = [dz, first.spacing[0], first.spacing[1]];
    let mut header = geometry::synthetic_header((n, rows, cols), spacing);
    geometry::set_sform(&mut header, &aff, geometry::XFORM_SCANNER);
    geometry::set_qform(&mut header, &aff, geometry::XFORM_SCANNER);
    header.datatype = 4;
    header.bitpix = 16;
    let dicom = DicomSource {
        slices: slices
            .iter()
            .map(|s| DicomSlice {
                sop_class_uid: s.sop_class.clone(),
                sop_instance_uid: s.sop_instance.clone(),
                frame: s.frame.map(|f| f + 1),
                position: s.position,
            })
            .collect(),
        orientation: first.orientation,
        pixel_spacing: first.spacing,
        slice_thickness: first.thickness,
        slice_step: dz,
        ..study.unwrap_or_default()
    };
    Ok((
        Volume {
            data,
            spacing,
            header,
            source: dir.to_path_buf(),
            dicom: Some(Box::new(dicom)),
        },
        report,
    ))
}

/// The whole file of slice `s`, pixel data included.
fn open_image(s: &SliceInfo) -> Result<Obj, IoError> {
    dicom_object::open_file(&s.path)
        .map_err(|e| IoError::invalid(&s.path, format!("cannot read DICOM file: {e}")))
}

/// The decoded pixel data of the file of slice `s`, once its pixel data is found to hold
/// all the file's frames: native data at least NumberOfFrames x Rows x Columns samples,
/// encapsulated data at least one fragment per frame.
fn decode_pixels<'a>(s: &SliceInfo, obj: &'a Obj) -> Result<DecodedPixelData<'a>, IoError> {
    use dicom_core::value::Value;
    let bad = |r: String| IoError::invalid(&s.path, r);
    let ts = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    let frames = s.frames as u128;
    let pixel = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| bad("no PixelData".into()))?;
    match pixel.value() {
        Value::Primitive(v) => {
            let have = v.calculate_byte_len() as u128;
            let frame =
                (s.rows as u128 * s.cols as u128 * s.samples as u128 * s.bits as u128).div_ceil(8);
            if have < frames * frame {
                return Err(bad(format!(
                    "pixel data holds {have} bytes but {frames} frame(s) of {}x{} at {} bits need {} \
                     (NumberOfFrames larger than the pixel data?)",
                    s.cols,
                    s.rows,
                    s.bits,
                    frames * frame
                )));
            }
        }
        Value::PixelSequence(seq) => {
            let have = seq.fragments().len() as u128;
            if have < frames {
                return Err(bad(format!(
                    "encapsulated pixel data holds {have} fragments for {frames} frame(s) \
                     (NumberOfFrames larger than the pixel data?)"
                )));
            }
        }
        Value::Sequence(_) => return Err(bad("PixelData is a sequence".into())),
    }
    obj.decode_pixel_data().map_err(|e| {
        bad(format!(
            "cannot decode pixel data (transfer syntax {ts}; this build decodes native, RLE, \
             deflated and JPEG pixel data): {e}"
        ))
    })
}

/// Most nested sequences and items the length scan follows (deeper is refused: real CT
/// headers nest a few levels; a parser would recurse once per level).
const MAX_NESTING: usize = 64;
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// How the elements of a container are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Syntax {
    ExplicitLe,
    ExplicitBe,
    ImplicitLe,
}

/// One open sequence or item during [`scan_lengths`].
struct Open {
    /// End offset of a defined-length container, `None` for one closed by a delimiter.
    end: Option<u64>,
    syntax: Syntax,
    /// An encapsulated pixel data sequence: its items are opaque fragments.
    fragments: bool,
}

/// Walks every data element of the DICOM file at `p` (file meta group, data set, nested
/// sequences and items) without reading any value, and fails when an element claims more
/// bytes than are left in the file or its enclosing item: the DICOM library allocates an
/// element's claimed length before reading it, so a 9 KB file claiming a 4 GB element would
/// cost 4 GB. Files without the `DICM` code, deflated data sets and structures the walk does
/// not follow are left to the library (which refuses them or reads them within the file).
fn scan_lengths(p: &Path) -> Result<(), String> {
    use std::io::{BufReader, Seek, SeekFrom};
    let mut f = BufReader::new(std::fs::File::open(p).map_err(|e| format!("cannot read: {e}"))?);
    let len = f
        .get_ref()
        .metadata()
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    let mut head = [0u8; 132];
    let got = read_full(&mut f, &mut head).map_err(|e| format!("cannot read: {e}"))?;
    let mut pos: u64 = if got >= 132 && &head[128..132] == b"DICM" {
        132
    } else if got >= 4 && &head[0..4] == b"DICM" {
        4
    } else {
        return Ok(());
    };
    f.seek(SeekFrom::Start(pos))
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut buf = [0u8; 12];
    let mut read =
        |f: &mut BufReader<std::fs::File>, n: usize, pos: &mut u64| -> Option<[u8; 12]> {
            if read_full(f, &mut buf[..n]).ok()? < n {
                return None;
            }
            *pos += n as u64;
            Some(buf)
        };
    let u16_of = |b: &[u8], big: bool| {
        if big {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        }
    };
    let u32_of = |b: &[u8], big: bool| {
        if big {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    };
    let too_long = |tag: (u16, u16), claim: u64, left: u64, within: &str| {
        format!(
            "element ({:04X},{:04X}) claims {claim} bytes but only {left} are left in the {within} (corrupt or hostile DICOM)",
            tag.0, tag.1
        )
    };
    let dict = dicom_dictionary_std::StandardDataDictionary;
    let mut stack: Vec<Open> = Vec::new();
    let mut syntax = Syntax::ExplicitLe;
    let mut in_meta = true;
    let mut ts = String::new();
    loop {
        // Close the defined-length containers that end here.
        while let Some(o) = stack.last() {
            match o.end {
                Some(e) if pos >= e => {
                    stack.pop();
                }
                _ => break,
            }
        }
        let cur = stack.last().map(|o| o.syntax).unwrap_or(syntax);
        let big = cur == Syntax::ExplicitBe;
        // The tag is peeked first: the meta group ends at the first non-0002 tag.
        let Some(b) = read(&mut f, 4, &mut pos) else {
            return Ok(());
        };
        let mut tag = (u16_of(&b[0..2], big), u16_of(&b[2..4], big));
        if in_meta && stack.is_empty() && tag.0 != 0x0002 {
            in_meta = false;
            let t = ts.trim_end_matches(['\0', ' ']);
            syntax = match t {
                "1.2.840.10008.1.2" => Syntax::ImplicitLe,
                "1.2.840.10008.1.2.2" => Syntax::ExplicitBe,
                // Deflated: the data set is compressed, its lengths cannot be walked.
                "1.2.840.10008.1.2.1.99" => return Ok(()),
                _ => Syntax::ExplicitLe,
            };
            if syntax == Syntax::ExplicitBe {
                tag = (u16_of(&b[0..2], true), u16_of(&b[2..4], true));
            }
        }
        let cur = stack.last().map(|o| o.syntax).unwrap_or(syntax);
        let big = cur == Syntax::ExplicitBe;
        let left_in = |pos: u64, stack: &Vec<Open>| -> (u64, &'static str) {
            match stack.iter().rev().find_map(|o| o.end) {
                Some(e) => (e.saturating_sub(pos), "enclosing item"),
                None => (len.saturating_sub(pos), "file"),
            }
        };
        if tag.0 == 0xFFFE {
            let Some(b) = read(&mut f, 4, &mut pos) else {
                return Ok(());
            };
            let l = u32_of(&b[0..4], big);
            match tag.1 {
                0xE000 => {
                    let fragments = stack.last().is_some_and(|o| o.fragments);
                    if l == UNDEFINED {
                        if fragments {
                            return Err("a pixel data fragment of undefined length".into());
                        }
                        stack.push(Open {
                            end: None,
                            syntax: cur,
                            fragments: false,
                        });
                    } else {
                        let (left, within) = left_in(pos, &stack);
                        if l as u64 > left {
                            return Err(too_long(tag, l as u64, left, within));
                        }
                        if fragments {
                            f.seek_relative(l as i64)
                                .map_err(|e| format!("cannot read: {e}"))?;
                            pos += l as u64;
                        } else {
                            stack.push(Open {
                                end: Some(pos + l as u64),
                                syntax: cur,
                                fragments: false,
                            });
                        }
                    }
                }
                // Item and sequence delimiters close the innermost undefined-length
                // container (a stray one is the library's to judge).
                0xE00D | 0xE0DD if stack.last().is_some_and(|o| o.end.is_none()) => {
                    stack.pop();
                }
                _ => {}
            }
            if stack.len() > MAX_NESTING {
                return Err(format!("sequences nested more than {MAX_NESTING} deep"));
            }
            continue;
        }
        let (vr, l) = if cur == Syntax::ImplicitLe {
            let Some(b) = read(&mut f, 4, &mut pos) else {
                return Ok(());
            };
            let vr = match dict.by_tag(dicom_core::Tag(tag.0, tag.1)).map(|e| e.vr()) {
                Some(VirtualVr::Exact(v)) => Some(v),
                _ => None,
            };
            (vr, u32_of(&b[0..4], false))
        } else {
            let Some(b) = read(&mut f, 2, &mut pos) else {
                return Ok(());
            };
            let vr = VR::from_binary([b[0], b[1]]).unwrap_or(VR::UN);
            let short = matches!(
                vr,
                VR::AE
                    | VR::AS
                    | VR::AT
                    | VR::CS
                    | VR::DA
                    | VR::DS
                    | VR::DT
                    | VR::FL
                    | VR::FD
                    | VR::IS
                    | VR::LO
                    | VR::LT
                    | VR::PN
                    | VR::SH
                    | VR::SL
                    | VR::SS
                    | VR::ST
                    | VR::TM
                    | VR::UI
                    | VR::UL
                    | VR::US
            );
            let l = if short {
                let Some(b) = read(&mut f, 2, &mut pos) else {
                    return Ok(());
                };
                u16_of(&b[0..2], big) as u32
            } else {
                let Some(b) = read(&mut f, 6, &mut pos) else {
                    return Ok(());
                };
                u32_of(&b[2..6], big)
            };
            (Some(vr), l)
        };
        if l == UNDEFINED {
            // A sequence, encapsulated pixel data, or UN holding an implicit-VR sequence.
            let pixel = tag == (0x7FE0, 0x0010);
            stack.push(Open {
                end: None,
                syntax: if vr == Some(VR::UN) {
                    Syntax::ImplicitLe
                } else {
                    cur
                },
                fragments: pixel,
            });
            if stack.len() > MAX_NESTING {
                return Err(format!("sequences nested more than {MAX_NESTING} deep"));
            }
            continue;
        }
        let (left, within) = left_in(pos, &stack);
        if l as u64 > left {
            return Err(too_long(tag, l as u64, left, within));
        }
        if vr == Some(VR::SQ) {
            stack.push(Open {
                end: Some(pos + l as u64),
                syntax: cur,
                fragments: false,
            });
            if stack.len() > MAX_NESTING {
                return Err(format!("sequences nested more than {MAX_NESTING} deep"));
            }
            continue;
        }
        if in_meta && tag == (0x0002, 0x0010) && l <= 256 {
            let mut v = vec![0u8; l as usize];
            if read_full(&mut f, &mut v).map_err(|e| format!("cannot read: {e}"))? < v.len() {
                return Ok(());
            }
            pos += l as u64;
            ts = String::from_utf8_lossy(&v).into_owned();
            continue;
        }
        f.seek_relative(l as i64)
            .map_err(|e| format!("cannot read: {e}"))?;
        pos += l as u64;
    }
}

fn has_dicm_magic(p: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut b = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(128))?;
            f.read_exact(&mut b)
        })
        .is_ok()
        && &b == b"DICM"
}

type Obj = dicom_object::FileDicomObject<InMemDicomObject>;

/// The header of the DICOM file `p` (up to its pixel data), its element lengths checked
/// against the file first ([`scan_lengths`]): `None` when it is not DICOM (no `DICM` code and
/// not readable as DICOM); an error naming the file when its lengths are impossible or it
/// has the code but a corrupt header. The one way every reader and probe here opens a file.
fn open_header(p: &Path) -> Result<Option<Obj>, IoError> {
    scan_lengths(p).map_err(|reason| IoError::invalid(p, reason))?;
    match OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(p)
    {
        Ok(o) => Ok(Some(o)),
        Err(e) if has_dicm_magic(p) => Err(IoError::invalid(p, format!("corrupt DICOM file: {e}"))),
        Err(_) => Ok(None),
    }
}

/// The numbers of `tag` in `set` (`None` when absent); an error unless there are `n`
/// finite ones. `at` prefixes the message (`"frame 3: "`).
fn floats_of(
    p: &Path,
    at: &str,
    set: &InMemDicomObject,
    tag: Tag,
    name: &str,
    n: usize,
) -> Result<Option<Vec<f64>>, IoError> {
    let Some(e) = set.element_opt(tag).ok().flatten() else {
        return Ok(None);
    };
    let v = e
        .to_multi_float64()
        .map_err(|e| IoError::invalid(p, format!("{at}bad {name}: {e}")))?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(IoError::invalid(
            p,
            format!("{at}bad {name}: {v:?} (expected {n} numbers)"),
        ));
    }
    Ok(Some(v))
}

/// The first number of `tag` in `set` (`None` when absent); non-finite values are the
/// caller's to judge.
fn float_of(
    p: &Path,
    at: &str,
    set: &InMemDicomObject,
    tag: Tag,
    name: &str,
) -> Result<Option<f64>, IoError> {
    match set.element_opt(tag).ok().flatten() {
        None => Ok(None),
        Some(e) => e
            .to_float64()
            .map(Some)
            .map_err(|e| IoError::invalid(p, format!("{at}bad {name}: {e}"))),
    }
}

/// The one item of functional group `seq` in a functional groups item.
fn group(groups: &InMemDicomObject, seq: Tag) -> Option<&InMemDicomObject> {
    groups.get(seq)?.items()?.first()
}

/// Where one slice's attributes are: the data set itself (a single-frame image), or a
/// frame's per-frame functional groups item, then the shared one (a multi-frame image).
enum Source<'a> {
    Plain(&'a InMemDicomObject),
    Frame {
        per_frame: &'a InMemDicomObject,
        shared: Option<&'a InMemDicomObject>,
        top: &'a InMemDicomObject,
    },
}

impl Source<'_> {
    /// The data sets to look in for an attribute of functional group `seq`, first first.
    fn sets(&self, seq: Tag) -> Vec<&InMemDicomObject> {
        match self {
            Source::Plain(s) => vec![s],
            Source::Frame {
                per_frame, shared, ..
            } => [Some(*per_frame), *shared]
                .into_iter()
                .flatten()
                .filter_map(|g| group(g, seq))
                .collect(),
        }
    }
}

/// One slice record from its attributes' [`Source`]: position, orientation and pixel
/// spacing are required, thickness and rescale optional.
fn slice_record(
    p: &Path,
    base: &SliceInfo,
    frame: Option<u32>,
    src: &Source,
) -> Result<SliceInfo, IoError> {
    let at = match frame {
        None => String::new(),
        Some(f) => format!("frame {}: ", f as u64 + 1),
    };
    let in_group = |seq_name: &str| match src {
        Source::Plain(_) => String::new(),
        Source::Frame { .. } => format!(" (in the {seq_name}, per-frame or shared)"),
    };
    let floats = |seq: Tag, seq_name: &str, tag: Tag, name: &str, n: usize| {
        for set in src.sets(seq) {
            if let Some(v) = floats_of(p, &at, set, tag, name, n)? {
                return Ok(v);
            }
        }
        Err(IoError::invalid(
            p,
            format!("{at}missing {name}{}", in_group(seq_name)),
        ))
    };
    let float = |seq: Tag, tag: Tag, name: &str| -> Result<Option<f64>, IoError> {
        for set in src.sets(seq) {
            if let Some(v) = float_of(p, &at, set, tag, name)? {
                return Ok(Some(v));
            }
        }
        match src {
            // Rescale may sit at the top level of a converted image.
            Source::Frame { top, .. } if seq == tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE => {
                float_of(p, &at, top, tag, name)
            }
            _ => Ok(None),
        }
    };
    const POS: (Tag, &str) = (tags::PLANE_POSITION_SEQUENCE, "PlanePositionSequence");
    const ORI: (Tag, &str) = (tags::PLANE_ORIENTATION_SEQUENCE, "PlaneOrientationSequence");
    const PIX: (Tag, &str) = (tags::PIXEL_MEASURES_SEQUENCE, "PixelMeasuresSequence");
    const VAL: Tag = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
    let pos = floats(
        POS.0,
        POS.1,
        tags::IMAGE_POSITION_PATIENT,
        "ImagePositionPatient",
        3,
    )?;
    let ori = floats(
        ORI.0,
        ORI.1,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let sp = floats(PIX.0, PIX.1, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    if sp.iter().any(|&s| s <= 0.0) {
        return Err(IoError::invalid(p, format!("{at}bad PixelSpacing {sp:?}")));
    }
    let slope = float(VAL, tags::RESCALE_SLOPE, "RescaleSlope")?.unwrap_or(1.0);
    let intercept = float(VAL, tags::RESCALE_INTERCEPT, "RescaleIntercept")?.unwrap_or(0.0);
    let thickness = float(PIX.0, tags::SLICE_THICKNESS, "SliceThickness")?.filter(|t| *t > 0.0);
    Ok(SliceInfo {
        path: p.to_path_buf(),
        frame,
        series: base.series.clone(),
        sop_class: base.sop_class.clone(),
        sop_instance: base.sop_instance.clone(),
        position: [pos[0], pos[1], pos[2]],
        orientation: [ori[0], ori[1], ori[2], ori[3], ori[4], ori[5]],
        spacing: [sp[0], sp[1]],
        slope: if slope.is_finite() && slope != 0.0 {
            slope
        } else {
            1.0
        },
        intercept: if intercept.is_finite() {
            intercept
        } else {
            0.0
        },
        thickness,
        ..*base
    })
}

/// The slices of one DICOM file: one for a single-frame image, one per frame for a
/// multi-frame image, none for DICOM without an image (no Rows/Columns).
fn image_info(p: &Path, obj: &Obj) -> Result<Vec<SliceInfo>, IoError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| IoError::invalid(p, format!("bad {what}: {e}"));
    let get = |tag| obj.element_opt(tag).ok().flatten();
    let (Some(r), Some(c)) = (get(tags::ROWS), get(tags::COLUMNS)) else {
        return Ok(Vec::new());
    };
    let rows: u16 = r.to_int().map_err(|e| bad("Rows", &e))?;
    let cols: u16 = c.to_int().map_err(|e| bad("Columns", &e))?;
    if rows == 0 || cols == 0 {
        return Err(IoError::invalid(
            p,
            format!("empty image ({rows} rows, {cols} columns)"),
        ));
    }
    let frames = match get(tags::NUMBER_OF_FRAMES) {
        None => 1,
        Some(e)
            if e.to_str()
                .is_ok_and(|s| s.trim_matches(['\0', ' ']).is_empty()) =>
        {
            1
        }
        Some(e) => match e.to_int::<u32>() {
            Ok(0) => return Err(IoError::invalid(p, "NumberOfFrames is 0")),
            Ok(n) => n,
            Err(err) => {
                let v = e.to_str().map(|s| s.into_owned()).unwrap_or_default();
                return Err(bad(&format!("NumberOfFrames `{}`", v.trim()), &err));
            }
        },
    };
    let int = |tag, default: u32| -> u32 {
        get(tag)
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(default)
    };
    let series = get(tags::SERIES_INSTANCE_UID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string());
    let base = SliceInfo {
        path: p.to_path_buf(),
        frame: None,
        series,
        sop_class: text_of(obj, tags::SOP_CLASS_UID),
        sop_instance: text_of(obj, tags::SOP_INSTANCE_UID),
        rows: rows as usize,
        cols: cols as usize,
        position: [0.0; 3],
        orientation: [0.0; 6],
        spacing: [0.0; 2],
        slope: 1.0,
        intercept: 0.0,
        thickness: None,
        frames,
        samples: int(tags::SAMPLES_PER_PIXEL, 1) as u16,
        bits: int(tags::BITS_ALLOCATED, 16) as u16,
        signed: int(tags::PIXEL_REPRESENTATION, 0) == 1,
    };
    let Some(per_frame) = get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE) else {
        if frames != 1 {
            return Err(IoError::invalid(
                p,
                format!(
                    "legacy multi-frame image ({frames} frames without a Per-frame Functional \
                     Groups Sequence) is not supported: its frame positions are not \
                     standardised; convert it to single-frame slices or Enhanced CT"
                ),
            ));
        }
        return Ok(vec![slice_record(p, &base, None, &Source::Plain(obj))?]);
    };
    // One item per frame: the items are in the file, so this bounds the frame count
    // before anything per frame is allocated.
    let items = per_frame.items().unwrap_or(&[]);
    if items.len() as u64 != frames as u64 {
        return Err(IoError::invalid(
            p,
            format!(
                "NumberOfFrames is {frames} but the Per-frame Functional Groups Sequence has {} items",
                items.len()
            ),
        ));
    }
    let shared = get(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|i| i.first());
    items
        .iter()
        .enumerate()
        .map(|(f, item)| {
            let src = Source::Frame {
                per_frame: item,
                shared,
                top: obj,
            };
            slice_record(p, &base, Some(f as u32), &src)
        })
        .collect()
}

/// The text of `tag` in `obj` without DICOM's padding; empty when absent.
fn text_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        })
        .unwrap_or_default()
}

/// The patient, study and series identifiers of an image (its slices are filled later).
fn study_of(obj: &InMemDicomObject) -> DicomSource {
    let t = |tag| text_of(obj, tag);
    DicomSource {
        study_uid: t(tags::STUDY_INSTANCE_UID),
        series_uid: t(tags::SERIES_INSTANCE_UID),
        frame_of_reference_uid: t(tags::FRAME_OF_REFERENCE_UID),
        patient_name: t(tags::PATIENT_NAME),
        patient_id: t(tags::PATIENT_ID),
        patient_birth_date: t(tags::PATIENT_BIRTH_DATE),
        patient_sex: t(tags::PATIENT_SEX),
        study_date: t(tags::STUDY_DATE),
        study_time: t(tags::STUDY_TIME),
        study_id: t(tags::STUDY_ID),
        accession_number: t(tags::ACCESSION_NUMBER),
        referring_physician: t(tags::REFERRING_PHYSICIAN_NAME),
        charset: t(tags::SPECIFIC_CHARACTER_SET),
        ..DicomSource::default()
    }
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn normal(o: &[f64; 6]) -> [f64; 3] {
    cross([o[0], o[1], o[2]], [o[3], o[4], o[5]])
}

/// Checks the slices (of one series: the caller checks the UIDs) form one regular series and sorts them along the normal; returns
/// them with the slice step (mm).
fn check_and_sort(dir: &Path, mut s: Vec<SliceInfo>) -> Result<(Vec<SliceInfo>, f64), IoError> {
    let first = &s[0];
    // A multi-frame image is a whole series: nothing is merged with it.
    if let Some(m) = s.iter().find(|x| x.frame.is_some()) {
        let mut others: Vec<&Path> = s
            .iter()
            .filter(|x| x.path != m.path)
            .map(|x| x.path.as_path())
            .collect();
        others.dedup();
        if let Some(o) = others.first() {
            return Err(IoError::invalid(
                dir,
                format!(
                    "mixed folder: {} is a multi-frame image ({} frames) but the folder holds {} other DICOM image file(s) too ({}{}); put a multi-frame image in a folder of its own",
                    m.path.display(),
                    m.frames,
                    others.len(),
                    o.display(),
                    if others.len() > 1 { ", ..." } else { "" }
                ),
            ));
        }
    }
    for x in &s[1..] {
        if (x.rows, x.cols) != (first.rows, first.cols) {
            return Err(IoError::invalid(
                dir,
                format!(
                    "inconsistent slice size: {} is {}x{} (rows x columns) but {} is {}x{}",
                    first.name(),
                    first.rows,
                    first.cols,
                    x.name(),
                    x.rows,
                    x.cols
                ),
            ));
        }
        if x.orientation
            .iter()
            .zip(first.orientation.iter())
            .any(|(a, b)| (a - b).abs() > 1e-3)
        {
            return Err(IoError::invalid(
                dir,
                format!(
                    "inconsistent ImageOrientationPatient between {} and {}",
                    first.name(),
                    x.name()
                ),
            ));
        }
        if x.spacing
            .iter()
            .zip(first.spacing.iter())
            .any(|(a, b)| (a - b).abs() > 1e-3 * b)
        {
            return Err(IoError::invalid(
                dir,
                format!(
                    "inconsistent PixelSpacing between {} ({:?}) and {} ({:?})",
                    first.name(),
                    first.spacing,
                    x.name(),
                    x.spacing
                ),
            ));
        }
    }
    if let Some(x) = s.iter().find(|x| x.samples != 1) {
        return Err(IoError::invalid(
            &x.path,
            format!(
                "{} samples per pixel: only grayscale CT is supported",
                x.samples
            ),
        ));
    }
    let nrm = normal(&first.orientation);
    let len = dot(nrm, nrm).sqrt();
    if len.is_nan() || len <= 0.5 {
        return Err(IoError::invalid(
            &first.path,
            format!(
                "ImageOrientationPatient {:?} has parallel or zero rows/columns",
                first.orientation
            ),
        ));
    }
    let nrm = nrm.map(|v| v / len);
    let key = |x: &SliceInfo| dot(x.position, nrm);
    s.sort_by(|a, b| key(a).total_cmp(&key(b)));
    if s.len() == 1 {
        let dz = s[0].thickness.unwrap_or(1.0);
        return Ok((s, dz));
    }
    let steps: Vec<f64> = s.windows(2).map(|w| key(&w[1]) - key(&w[0])).collect();
    if let Some(k) = steps.iter().position(|&d| d.abs() < 1e-4) {
        return Err(IoError::invalid(
            dir,
            format!(
                "two slices at the same position ({:.3} mm along the normal): {} and {}",
                key(&s[k]),
                s[k].name(),
                s[k + 1].name()
            ),
        ));
    }
    let mut sorted = steps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    if let Some(k) = steps
        .iter()
        .position(|&d| (d - median).abs() > MAX_STEP_DEVIATION * median)
    {
        return Err(IoError::invalid(
            dir,
            format!(
                "gap in slice positions: {:.3} mm between {} and {} where the median step is {:.3} mm (missing slices?)",
                steps[k],
                s[k].name(),
                s[k + 1].name(),
                median
            ),
        ));
    }
    let dz = (key(&s[s.len() - 1]) - key(&s[0])) / (s.len() - 1) as f64;
    Ok((s, dz))
}

/// Voxel `(column, row, slice)` -> RAS+ world (mm).
fn series_affine(first: &SliceInfo, dz: f64) -> Affine {
    let o = &first.orientation;
    let rowcos = [o[0], o[1], o[2]];
    let colcos = [o[3], o[4], o[5]];
    let n = normal(o);
    let nl = dot(n, n).sqrt();
    let n = n.map(|v| v / nl);
    // PixelSpacing is (between rows, between columns).
    let (dr, dc) = (first.spacing[0], first.spacing[1]);
    let mut lps = [[0.0; 4]; 3];
    for a in 0..3 {
        lps[a] = [rowcos[a] * dc, colcos[a] * dr, n[a] * dz, first.position[a]];
    }
    // LPS -> RAS: negate x and y.
    for row in lps.iter_mut().take(2) {
        for v in row.iter_mut() {
            *v = -*v;
        }
    }
    lps
}

/// A fresh `2.25.<decimal>` UID.
pub(crate) fn new_uid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed) as u128;
    let v =
        (t << 24) ^ ((std::process::id() as u128) << 100) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("2.25.{}", v & ((1u128 << 127) - 1))
}

pub(crate) fn ds(v: f64) -> String {
    // DS values are at most 16 characters.
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    if s.len() <= 16 {
        s
    } else {
        format!("{v:.6e}").chars().take(16).collect()
    }
}

pub(crate) fn strs(v: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(v.iter().map(|&x| ds(x)).collect())
}

/// Options of [`write_series_with`].
#[derive(Clone, Debug)]
pub struct SeriesOptions {
    /// SeriesInstanceUID to use; a fresh one when `None`.
    pub series_uid: Option<String>,
    /// File names are `<prefix>NNNN.dcm`.
    pub prefix: String,
    /// SeriesNumber.
    pub series_number: u32,
    /// SeriesDescription, when given.
    pub description: Option<String>,
    /// Modality.
    pub modality: String,
    /// ImageType `ORIGINAL\PRIMARY\LOCALIZER` (a scout) instead of `ORIGINAL\PRIMARY\AXIAL`.
    pub localizer: bool,
}

impl Default for SeriesOptions {
    fn default() -> Self {
        SeriesOptions {
            series_uid: None,
            prefix: "slice_".into(),
            series_number: 1,
            description: None,
            modality: "CT".into(),
            localizer: false,
        }
    }
}

/// Writes `vol` as a DICOM CT series in `dir` (created if needed): one file
/// `slice_NNNN.dcm` per `z`, int16 pixels (HU + 1024, rounded and clamped) with
/// RescaleIntercept -1024, and positions, orientation and spacing from the volume's
/// affine (RAS+ converted to DICOM's LPS).
pub fn write_series(dir: &Path, vol: &Volume) -> Result<(), IoError> {
    write_series_with(dir, vol, &SeriesOptions::default())
}

/// As [`write_series`], with a chosen series UID, file prefix and series attributes.
pub fn write_series_with(dir: &Path, vol: &Volume, opts: &SeriesOptions) -> Result<(), IoError> {
    let (nz, ny, nx) = vol.dims();
    if nx > u16::MAX as usize || ny > u16::MAX as usize {
        return Err(IoError::invalid(
            dir,
            format!("slices of {nx}x{ny} are too large for DICOM"),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| IoError::write(dir, e))?;
    let mut a = vol.affine();
    for row in a.iter_mut().take(2) {
        for v in row.iter_mut() {
            *v = -*v;
        }
    }
    let col = |k: usize| [a[0][k], a[1][k], a[2][k]];
    let norm = |v: [f64; 3]| dot(v, v).sqrt();
    let (cx, cy, cz) = (col(0), col(1), col(2));
    let (sx, sy, sz) = (norm(cx), norm(cy), norm(cz));
    if !(sx > 0.0 && sy > 0.0 && sz > 0.0) {
        return Err(IoError::invalid(
            &vol.source,
            "degenerate affine: cannot write DICOM",
        ));
    }
    let rowcos = cx.map(|v| v / sx);
    let colcos = cy.map(|v| v / sy);
    let study = new_uid();
    let series = opts.series_uid.clone().unwrap_or_else(new_uid);
    let frame_of_ref = new_uid();
    for z in 0..nz {
        let pos = [0, 1, 2].map(|r| a[r][3] + cz[r] * z as f64);
        let px: Vec<u16> = vol
            .data
            .index_axis(ndarray::Axis(0), z)
            .iter()
            .map(|&v| {
                ((v as f64 - WRITE_INTERCEPT)
                    .round()
                    .clamp(-32768.0, 32767.0) as i16) as u16
            })
            .collect();
        let sop = new_uid();
        let el = |tag, vr, v: PrimitiveValue| DataElement::new(tag, vr, v);
        let s = |v: &str| PrimitiveValue::from(v);
        let image_type = if opts.localizer { "LOCALIZER" } else { "AXIAL" };
        let mut obj = InMemDicomObject::from_element_iter([
            el(tags::SOP_CLASS_UID, VR::UI, s(CT_IMAGE_STORAGE)),
            el(tags::SOP_INSTANCE_UID, VR::UI, s(&sop)),
            el(
                tags::IMAGE_TYPE,
                VR::CS,
                PrimitiveValue::Strs(
                    ["ORIGINAL", "PRIMARY", image_type]
                        .map(String::from)
                        .into_iter()
                        .collect(),
                ),
            ),
            el(tags::MODALITY, VR::CS, s(&opts.modality)),
            el(tags::PATIENT_NAME, VR::PN, s("ichcam^export")),
            el(tags::PATIENT_ID, VR::LO, s("ichcam")),
            el(tags::STUDY_INSTANCE_UID, VR::UI, s(&study)),
            el(tags::SERIES_INSTANCE_UID, VR::UI, s(&series)),
            el(tags::FRAME_OF_REFERENCE_UID, VR::UI, s(&frame_of_ref)),
            el(
                tags::SERIES_NUMBER,
                VR::IS,
                s(&opts.series_number.to_string()),
            ),
            el(tags::INSTANCE_NUMBER, VR::IS, s(&(z + 1).to_string())),
            el(tags::IMAGE_POSITION_PATIENT, VR::DS, strs(&pos)),
            el(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                strs(&[
                    rowcos[0], rowcos[1], rowcos[2], colcos[0], colcos[1], colcos[2],
                ]),
            ),
            el(tags::SLICE_THICKNESS, VR::DS, strs(&[sz])),
            el(tags::PIXEL_SPACING, VR::DS, strs(&[sy, sx])),
            el(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
            el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, s("MONOCHROME2")),
            el(tags::ROWS, VR::US, PrimitiveValue::from(ny as u16)),
            el(tags::COLUMNS, VR::US, PrimitiveValue::from(nx as u16)),
            el(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
            el(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16)),
            el(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)),
            el(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(1u16),
            ),
            el(tags::RESCALE_INTERCEPT, VR::DS, strs(&[WRITE_INTERCEPT])),
            el(tags::RESCALE_SLOPE, VR::DS, strs(&[1.0])),
            el(tags::RESCALE_TYPE, VR::LO, s("HU")),
            el(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(px.into())),
        ]);
        if let Some(d) = &opts.description {
            obj.put(el(tags::SERIES_DESCRIPTION, VR::LO, s(d)));
        }
        let path = dir.join(format!("{}{:04}.dcm", opts.prefix, z + 1));
        let file = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_VR_LE))
            .map_err(|e| IoError::invalid(&path, format!("cannot build DICOM meta: {e}")))?;
        write_atomic(&path, |w| file.write_all(w).map_err(std::io::Error::other))?;
    }
    Ok(())
}
