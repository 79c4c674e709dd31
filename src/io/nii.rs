//! NIfTI-1 and NIfTI-2 volumes in, single files (`.nii`, `.nii.gz`) and `.hdr`/`.img` pairs;
//! NIfTI-1 single files out.
//!
//! A **pair** is read from either of its names (`x.hdr`, `x.img`, or gzipped `x.hdr.gz`,
//! `x.img.gz` as nibabel writes them; extensions in any case): the header from the `.hdr`
//! (magic `ni1`, or `ni2` for NIfTI-2), the voxels from the `.img` beside it (the same
//! compression looked for first, then the other) at `vox_offset` (usually 0), with exactly
//! the checks, datatypes, byte orders, scaling and reports of a single file. A missing
//! partner file is an error naming the path expected; a `.hdr` without NIfTI magic (plain
//! Analyze 7.5, whose orientation is undefined) is refused with a hint to convert it, and so
//! is a single-file magic in a pair's name or a pair's magic in a `.nii`.
//!
//! The header (348 bytes for NIfTI-1, 540 for NIfTI-2, told apart by its size field) is
//! parsed and validated here, byte by byte and in either byte order, *before* anything is
//! allocated: size field, magic (NIfTI-2's with its `\r\n\x1a\n` check bytes), dims
//! (signed, so negative dims are caught), datatype, vox_offset, and the voxel count times
//! the bytes per voxel against both the data the file holds, a per-volume cap
//! ([`DEFAULT_MAX_BYTES`], or `ICHCAM_MAX_VOLUME_BYTES`) and the memory budget
//! ([`crate::io::budget`]). A truncated or non-gzip `.gz` is an error, never a panic; a
//! `.gz` is read to the end of its stream so that the decoder checks the CRC-32 and length
//! of every member (damage is an error, not changed voxels). The voxels are decoded block by
//! block (no second whole-volume buffer).
//! A voxel size outside [`SPACING_MM_LIMITS`] (after `xyzt_units`' metres or microns) is an
//! error; outside [`SPACING_MM_USUAL`], zero, or a `bitpix` that contradicts the datatype is
//! a warning in the [`ReadReport`].
//! The parsed fields are kept in a [`nifti::NiftiHeader`] so that outputs are written back
//! with exactly the input's geometry.
//!
//! **NIfTI-2** is parsed into that same NIfTI-1 header and layout (then decoded, scaled and
//! checked by the same code), so its outputs are NIfTI-1 with the same dims, pixdim,
//! qform/sform and units. Its `i64`/`i32`/`f64` fields must therefore fit NIfTI-1's: dims at
//! most 32767 per axis, codes and slice fields in range, finite `f64`s within `f32`'s range
//! (and not rounded to 0); otherwise the *read* is an error naming the field (before any
//! voxel is read, so a batch never segments a volume whose outputs it could not write).
//! The `f64` geometry is rounded to `f32` (as a NIfTI-1 file of it would hold); `scl_slope`
//! and `scl_inter` are applied at `f64`. The kept header's `sizeof_hdr` (540) and magic
//! (`n+2`) say it came from NIfTI-2 (`ichcam inspect` prints the format).
//!
//! Voxels: every integer and float datatype (u8, i8, i16, u16, i32, u32, i64, u64, f32,
//! f64) is read as `f32` after `scl_slope`/`scl_inter` (a slope of 0 or a non-finite slope
//! means no scaling). NIfTI stores x fastest, then y, then z, so the file's byte order is
//! already row-major `[z, y, x]`: no transpose is needed in either direction.
//! 3-D, 4-D with one volume, 5-D to 7-D whose extra dims are all 1, and 2-D (one slice) or
//! 1-D (one row) images are accepted.
//!
//! **NaN/Inf voxels** are counted and replaced with the volume's minimum finite value (0 if
//! none is finite); [`ReadReport::nonfinite`] carries the count so the caller can say so.
//! [`crate::io::read_volume`] prints one `warning:` line when the count is not zero.
//!
//! Writers always produce little-endian NIfTI-1 with a 352-byte offset, gzip-compressed
//! when the path ends in `.gz`, through [`crate::io::atomic::write_atomic`].
//! Knows nothing about the network.

use super::atomic::write_atomic;
use super::error::human_bytes;
use super::volume::{Mask, Volume};
use super::IoError;
use ndarray::Array3;
use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Size of a NIfTI-1 header.
pub const HEADER_SIZE: usize = 348;
/// Size of a NIfTI-2 header.
pub const HEADER_SIZE_2: usize = 540;
/// Bytes a reader may allocate for one volume (raw data plus the `f32` copy): 4 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;
/// Deflate cannot expand data by more than about 1032:1, so a gzip file of `n` bytes
/// cannot hold more than this many times `n` bytes of voxels.
const MAX_GZIP_RATIO: u64 = 1100;
/// Raw bytes decoded at a time.
const DECODE_BLOCK: usize = 1 << 20;
/// Most decompressed bytes allowed after the voxels (read only to reach the gzip trailer).
const MAX_GZIP_TRAILING: u64 = 16 << 20;

/// The voxel types a CT volume comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl DataType {
    /// From a NIfTI `datatype` code; the error says what the code is when it is not a
    /// supported scalar type.
    pub fn from_code(code: i16) -> Result<DataType, String> {
        Ok(match code {
            2 => DataType::U8,
            4 => DataType::I16,
            8 => DataType::I32,
            16 => DataType::F32,
            64 => DataType::F64,
            256 => DataType::I8,
            512 => DataType::U16,
            768 => DataType::U32,
            1024 => DataType::I64,
            1280 => DataType::U64,
            32 | 1792 | 2048 => {
                return Err(format!(
                    "complex datatype (code {code}) is not supported: CT volumes are real scalars"
                ))
            }
            128 | 2304 => {
                return Err(format!(
                    "RGB datatype (code {code}) is not supported: CT volumes are scalar"
                ))
            }
            1 => return Err("binary (1-bit) datatype is not supported".into()),
            1536 => return Err("float128 datatype is not supported".into()),
            0 => return Err("datatype is 0 (unknown)".into()),
            c => return Err(format!("unknown datatype code {c}")),
        })
    }

    /// The NIfTI `datatype` code.
    pub fn code(self) -> i16 {
        match self {
            DataType::U8 => 2,
            DataType::I16 => 4,
            DataType::I32 => 8,
            DataType::F32 => 16,
            DataType::F64 => 64,
            DataType::I8 => 256,
            DataType::U16 => 512,
            DataType::U32 => 768,
            DataType::I64 => 1024,
            DataType::U64 => 1280,
        }
    }

    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            DataType::U8 | DataType::I8 => 1,
            DataType::I16 | DataType::U16 => 2,
            DataType::I32 | DataType::U32 | DataType::F32 => 4,
            DataType::I64 | DataType::U64 | DataType::F64 => 8,
        }
    }

    /// `"uint8"`, `"int16"`, ...
    pub fn name(self) -> &'static str {
        match self {
            DataType::U8 => "uint8",
            DataType::I8 => "int8",
            DataType::I16 => "int16",
            DataType::U16 => "uint16",
            DataType::I32 => "int32",
            DataType::U32 => "uint32",
            DataType::I64 => "int64",
            DataType::U64 => "uint64",
            DataType::F32 => "float32",
            DataType::F64 => "float64",
        }
    }
}

/// Limits for a read.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Most bytes one volume may need (raw voxels plus the `f32` array).
    pub max_bytes: u64,
    /// DICOM folders: read only the slices of this SeriesInstanceUID (a folder holding
    /// several series is otherwise an error); `None` reads the folder's one series. Unused
    /// for NIfTI.
    pub series: Option<String>,
}

impl Default for ReadOptions {
    /// The cap from `ICHCAM_MAX_VOLUME_BYTES` if set to a number, else 4 GiB.
    fn default() -> Self {
        let max_bytes = std::env::var("ICHCAM_MAX_VOLUME_BYTES")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_MAX_BYTES);
        ReadOptions {
            max_bytes,
            series: None,
        }
    }
}

/// What a read found besides the voxels.
#[derive(Clone, Debug, Default)]
pub struct ReadReport {
    /// Stored voxel type, e.g. `"uint8"` or `"int16 (DICOM)"`.
    pub datatype: String,
    /// Count of NaN/Inf voxels, each replaced with [`ReadReport::fill`].
    pub nonfinite: usize,
    /// The value NaN/Inf voxels were replaced with (the minimum finite value).
    pub fill: f32,
    /// Non-fatal problems, one line each (e.g. skipped non-DICOM files).
    pub warnings: Vec<String>,
}

/// The validated layout a header describes.
#[derive(Clone, Debug)]
struct Layout {
    /// `(z, y, x)`.
    shape: (usize, usize, usize),
    dtype: DataType,
    /// Byte offset of the voxels.
    offset: u64,
    /// Bytes of voxel data.
    nbytes: u64,
    big_endian: bool,
    /// 348 (NIfTI-1) or 540 (NIfTI-2).
    header_size: usize,
    /// As stored (NIfTI-2's are `f64`); see [`scaling`].
    scl_slope: f64,
    scl_inter: f64,
}

/// Reads a `.nii`/`.nii.gz` file (or a `.hdr`/`.img` pair) with the default limits.
pub fn read_nifti(path: &Path) -> Result<(Volume, ReadReport), IoError> {
    read_nifti_with(path, &ReadOptions::default())
}

/// Reads a `.nii`/`.nii.gz` file, or the `.hdr`/`.img` pair whose header or voxel file
/// `path` names; see the module doc for what is checked.
pub fn read_nifti_with(path: &Path, opts: &ReadOptions) -> Result<(Volume, ReadReport), IoError> {
    match pair_paths(path) {
        Some(pair) => read_pair_with(path, &pair?, opts),
        None => read_single_with(path, opts),
    }
}

/// The two files of a NIfTI pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairPaths {
    /// The `.hdr` (or `.hdr.gz`): the 348-byte NIfTI-1 or 540-byte NIfTI-2 header.
    pub header: PathBuf,
    /// The `.img` (or `.img.gz`): the voxels, from the header's `vox_offset` (usually 0).
    pub image: PathBuf,
}

/// Which file of a pair a name gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PairPart {
    Header,
    Image,
}

/// Whether `path` is named as a file of a NIfTI pair: `.hdr`, `.img`, `.hdr.gz` or
/// `.img.gz` (any case).
pub fn is_pair_name(path: &Path) -> bool {
    partner_candidates(path).is_some()
}

/// The part of a pair `path` names and the two names its other file may have beside it:
/// the same base name with `.hdr` and `.img` swapped (in the extension's own case), with
/// `path`'s compression first, then the other. `None` for names of other files.
fn partner_candidates(path: &Path) -> Option<(PairPart, [PathBuf; 2])> {
    let name = path.file_name()?.to_str()?;
    let (rest, gz) = match super::strip_suffix_ci(name, ".gz") {
        Some(r) => (r, &name[r.len()..]),
        None => (name, ""),
    };
    let (part, other) = if let Some(base) = super::strip_suffix_ci(rest, ".hdr") {
        (PairPart::Header, (base, "img"))
    } else if let Some(base) = super::strip_suffix_ci(rest, ".img") {
        (PairPart::Image, (base, "hdr"))
    } else {
        return None;
    };
    let (base, ext) = other;
    if base.is_empty() {
        return None;
    }
    let ext = if rest[base.len() + 1..]
        .chars()
        .all(|c| c.is_ascii_uppercase())
    {
        ext.to_ascii_uppercase()
    } else {
        ext.to_string()
    };
    let (same, alt) = if gz.is_empty() { ("", ".gz") } else { (gz, "") };
    Some((
        part,
        [
            path.with_file_name(format!("{base}.{ext}{same}")),
            path.with_file_name(format!("{base}.{ext}{alt}")),
        ],
    ))
}

/// The other file of the pair `path` names (`part`), found beside it; an error naming the
/// expected path when neither candidate is there.
fn find_partner(path: &Path, part: PairPart, cands: &[PathBuf; 2]) -> Result<PathBuf, IoError> {
    // A dangling link counts as there: its read names the problem.
    if let Some(p) = cands.iter().find(|p| std::fs::symlink_metadata(p).is_ok()) {
        return Ok(p.clone());
    }
    let (missing, given) = match part {
        PairPart::Header => ("voxel file (.img)", "header"),
        PairPart::Image => ("header (.hdr)", "voxel file"),
    };
    Err(IoError::invalid(
        &cands[0],
        format!(
            "no such file: the {missing} of the NIfTI pair whose {given} is {} (nor {})",
            path.display(),
            cands[1]
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
    ))
}

/// The files of the pair whose header or voxel file `path` names, both there; `None` when
/// `path` is not named as a pair's file (`.hdr`, `.img`, `.hdr.gz`, `.img.gz`).
pub fn pair_paths(path: &Path) -> Option<Result<PairPaths, IoError>> {
    let (part, cands) = partner_candidates(path)?;
    Some(find_partner(path, part, &cands).map(|other| match part {
        PairPart::Header => PairPaths {
            header: path.to_path_buf(),
            image: other,
        },
        PairPart::Image => PairPaths {
            header: other,
            image: path.to_path_buf(),
        },
    }))
}

/// The header file of the pair `path` names (itself for a `.hdr`; the voxel file need not
/// be there); `None` when `path` is not named as a pair's file.
fn pair_header(path: &Path) -> Option<Result<PathBuf, IoError>> {
    let (part, cands) = partner_candidates(path)?;
    Some(match part {
        PairPart::Header => Ok(path.to_path_buf()),
        PairPart::Image => find_partner(path, part, &cands),
    })
}

/// What a file to open should be, for messages: `(file, content)`.
const SINGLE_FILE: (&str, &str) = ("a .nii or .nii.gz file", "a NIfTI volume");
const PAIR_HEADER: (&str, &str) = ("a NIfTI pair's .hdr file", "a NIfTI header");
const PAIR_IMAGE: (&str, &str) = ("a NIfTI pair's .img file", "the pair's voxels");

/// Opens a NIfTI file (`expected`: what it should be, for messages) as a stream, gunzipped
/// when it starts with the gzip magic (a name ending in `.gz` must). Returns the stream,
/// whether it is gzip and the file's size.
fn open_stream(
    path: &Path,
    (file, content): (&str, &str),
) -> Result<(Box<dyn Read>, bool, u64), IoError> {
    let meta = super::metadata(path)?;
    if meta.is_dir() {
        return Err(IoError::invalid(
            path,
            format!("is a folder, expected {file}"),
        ));
    }
    if !meta.is_file() {
        return Err(IoError::invalid(
            path,
            format!(
                "is {}, expected {file}",
                super::atomic::kind_name(&meta.file_type())
            ),
        ));
    }
    let file_len = meta.len();
    if file_len == 0 {
        return Err(IoError::invalid(
            path,
            format!("empty file (0 bytes), expected {content}"),
        ));
    }
    let mut f = File::open(path).map_err(|e| IoError::read(path, e))?;
    let mut magic = [0u8; 2];
    let got = read_full(&mut f, &mut magic).map_err(|e| IoError::read(path, e))?;
    let gz = got == 2 && magic == [0x1f, 0x8b];
    let named_gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    if named_gz && !gz {
        return Err(IoError::invalid(
            path,
            format!(
                "named .gz but is not a gzip stream (starts with {:02x?})",
                &magic[..got]
            ),
        ));
    }
    f.rewind().map_err(|e| IoError::read(path, e))?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    Ok((reader, gz, file_len))
}

/// The error of a failed read of `path`'s stream: a gzip stream's is named as corrupt.
fn stream_err(path: &Path, gz: bool) -> impl Fn(std::io::Error) -> IoError + '_ {
    move |e| {
        if gz {
            IoError::invalid(path, format!("corrupt or truncated gzip stream: {e}"))
        } else {
            IoError::read(path, e)
        }
    }
}

/// Reads a gzip stream to its end: the decoder checks the CRC-32 and the length (ISIZE) of
/// every gzip member there, so a damaged stream is an error, not changed voxels.
fn drain_gzip(reader: &mut dyn Read, path: &Path) -> Result<(), IoError> {
    let extra = std::io::copy(
        &mut reader.take(MAX_GZIP_TRAILING + 1),
        &mut std::io::sink(),
    )
    .map_err(stream_err(path, true))?;
    if extra > MAX_GZIP_TRAILING {
        return Err(IoError::invalid(
            path,
            format!(
                "more than {} of data after the voxels in the gzip stream",
                human_bytes(MAX_GZIP_TRAILING as u128)
            ),
        ));
    }
    Ok(())
}

/// Reads a single-file `.nii`/`.nii.gz`.
fn read_single_with(path: &Path, opts: &ReadOptions) -> Result<(Volume, ReadReport), IoError> {
    let (mut reader, gz, file_len) = open_stream(path, SINGLE_FILE)?;
    let (header, layout) = read_and_parse_header(&mut reader, gz, false)
        .map_err(stream_err(path, gz))?
        .map_err(|r| IoError::invalid(path, r))?;
    let (spacing, warnings) = check_header(path, &header, &layout, opts)?;
    let data = DataFile {
        path,
        len: file_len,
        gz,
        at: layout.header_size as u64,
        header: None,
    };
    let vals = read_voxels(&mut reader, &data, &layout)?;
    finish(path, header, &layout, spacing, warnings, vals)
}

/// Reads a `.hdr`/`.img` pair: the header from `pair.header`, the voxels from `pair.image`
/// at the header's `vox_offset`, with the checks of a single file. The volume's source is
/// `path`, the name it was asked for by.
fn read_pair_with(
    path: &Path,
    pair: &PairPaths,
    opts: &ReadOptions,
) -> Result<(Volume, ReadReport), IoError> {
    let hp = pair.header.as_path();
    let (mut reader, gz, _) = open_stream(hp, PAIR_HEADER)?;
    let (header, layout) = read_and_parse_header(&mut reader, gz, true)
        .map_err(stream_err(hp, gz))?
        .map_err(|r| IoError::invalid(hp, r))?;
    if gz {
        drain_gzip(&mut reader, hp)?;
    }
    drop(reader);
    let (spacing, warnings) = check_header(hp, &header, &layout, opts)?;
    let ip = pair.image.as_path();
    let (mut reader, gz, len) = open_stream(ip, PAIR_IMAGE)?;
    let data = DataFile {
        path: ip,
        len,
        gz,
        at: 0,
        header: Some(hp),
    };
    let vals = read_voxels(&mut reader, &data, &layout)?;
    finish(path, header, &layout, spacing, warnings, vals)
}

/// The checks of a parsed header before any voxel is read: the voxel size (an error when
/// implausible), `bitpix` (a warning), the memory the read needs. Returns the spacing and
/// the warnings.
fn check_header(
    path: &Path,
    header: &nifti::NiftiHeader,
    layout: &Layout,
    opts: &ReadOptions,
) -> Result<([f64; 3], Vec<String>), IoError> {
    let mut warnings = Vec::new();
    let spacing =
        checked_spacing(path, header, &mut warnings).map_err(|r| IoError::invalid(path, r))?;
    let bits = layout.dtype.size() as i16 * 8;
    if header.bitpix != bits {
        warnings.push(format!(
            "{}: bitpix {} disagrees with datatype {} ({bits} bits): the datatype is used",
            path.display(),
            header.bitpix,
            layout.dtype.name()
        ));
    }
    check_memory(path, layout, opts)?;
    Ok((spacing, warnings))
}

/// The file the voxels are read from.
struct DataFile<'a> {
    path: &'a Path,
    /// Its size on disk.
    len: u64,
    gz: bool,
    /// Bytes of its (decompressed) stream already read: the header of a single file, 0 for
    /// a pair's `.img`.
    at: u64,
    /// A pair's header file (named in messages about the voxels it promised).
    header: Option<&'a Path>,
}

/// Reads and decodes the voxels `layout` describes from `reader` (positioned `data.at`
/// bytes into `data`'s stream), block by block; a gzip stream is read to its end.
fn read_voxels(
    reader: &mut dyn Read,
    data: &DataFile,
    layout: &Layout,
) -> Result<Vec<f32>, IoError> {
    let path = data.path;
    let (file_len, gz) = (data.len, data.gz);
    let stream_err = stream_err(path, gz);
    let end = layout.offset.saturating_add(layout.nbytes);
    let claim = || {
        let (nz, ny, nx) = layout.shape;
        let who = match data.header {
            Some(h) => format!("the header {}", h.display()),
            None => "header".into(),
        };
        format!(
            "{who} claims {nx}x{ny}x{nz} voxels of {} = {} bytes at offset {}",
            layout.dtype.name(),
            layout.nbytes,
            layout.offset
        )
    };
    if !gz {
        if layout.offset > file_len {
            return Err(IoError::invalid(
                path,
                format!(
                    "vox_offset {} is past the end of the file ({file_len} bytes)",
                    layout.offset
                ),
            ));
        }
        if end > file_len {
            return Err(IoError::invalid(
                path,
                format!(
                    "{} but the file holds only {} bytes of voxel data",
                    claim(),
                    file_len - layout.offset
                ),
            ));
        }
    } else if layout.offset > file_len.saturating_mul(MAX_GZIP_RATIO) {
        return Err(IoError::invalid(
            path,
            format!(
                "vox_offset {} is past the end of the data: a {file_len}-byte gzip file cannot hold that much",
                layout.offset
            ),
        ));
    } else if end > file_len.saturating_mul(MAX_GZIP_RATIO) {
        return Err(IoError::invalid(
            path,
            format!(
                "{} but a {file_len}-byte gzip file cannot hold that much",
                claim()
            ),
        ));
    }

    let skip = layout.offset - data.at;
    let skipped =
        std::io::copy(&mut (&mut *reader).take(skip), &mut std::io::sink()).map_err(&stream_err)?;
    if skipped < skip {
        return Err(IoError::invalid(
            path,
            format!(
                "vox_offset {} is past the end of the data ({} bytes)",
                layout.offset,
                data.at + skipped
            ),
        ));
    }
    let (slope, inter) = scaling(layout.scl_slope, layout.scl_inter);
    let (nz, ny, nx) = layout.shape;
    let nvox = nx * ny * nz;
    let mut vals = Vec::new();
    vals.try_reserve_exact(nvox)
        .map_err(|_| IoError::invalid(path, format!("cannot allocate {nvox} voxels")))?;
    // Decoded block by block: only one block of raw bytes is held beside the voxels.
    let size = layout.dtype.size();
    let mut block = vec![0u8; (DECODE_BLOCK / size) * size];
    let mut left = layout.nbytes as usize;
    while left > 0 {
        let want = left.min(block.len());
        let got = read_full(reader, &mut block[..want]).map_err(&stream_err)?;
        if got < want {
            return Err(IoError::invalid(
                path,
                format!(
                    "{} but the file holds only {} bytes of voxel data",
                    claim(),
                    layout.nbytes as usize - left + got
                ),
            ));
        }
        decode(
            &block[..got],
            layout.dtype,
            layout.big_endian,
            slope,
            inter,
            &mut vals,
        );
        left -= got;
    }
    drop(block);
    if gz {
        drain_gzip(reader, path)?;
    }
    Ok(vals)
}

/// The volume and report of a read: NaN/Inf replaced and counted, the voxels shaped
/// `[z, y, x]`.
fn finish(
    path: &Path,
    header: nifti::NiftiHeader,
    layout: &Layout,
    spacing: [f64; 3],
    warnings: Vec<String>,
    mut vals: Vec<f32>,
) -> Result<(Volume, ReadReport), IoError> {
    let (nonfinite, fill) = replace_nonfinite(&mut vals);
    let data = Array3::from_shape_vec(layout.shape, vals)
        .map_err(|e| IoError::invalid(path, format!("internal shape error: {e}")))?;
    let report = ReadReport {
        datatype: layout.dtype.name().to_string(),
        nonfinite,
        fill,
        warnings,
    };
    Ok((
        Volume {
            data,
            spacing,
            header,
            source: path.to_path_buf(),
            dicom: None,
        },
        report,
    ))
}

/// Reads as many bytes as the stream has, up to `buf.len()`.
pub(crate) fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn check_memory(path: &Path, l: &Layout, opts: &ReadOptions) -> Result<(), IoError> {
    let (nz, ny, nx) = l.shape;
    let need = read_bytes(l.shape, l.dtype);
    let claim = || format!("{nx}x{ny}x{nz} voxels of {}", l.dtype.name());
    if need > opts.max_bytes as u128 || need > usize::MAX as u128 / 2 {
        return Err(IoError::TooLarge {
            path: path.to_path_buf(),
            claim: claim(),
            bytes: need,
            cap: opts.max_bytes as u128,
        });
    }
    super::budget::budget().check(path, need, || format!("reading {}", claim()))
}

/// Peak bytes of reading a volume of `shape` (z, y, x) stored as `dt`: the `f32` voxels
/// plus one block of raw bytes.
pub fn read_bytes(shape: (usize, usize, usize), dt: DataType) -> u128 {
    let nvox = shape.0 as u128 * shape.1 as u128 * shape.2 as u128;
    nvox * 4 + (DECODE_BLOCK as u128).min(nvox * dt.size() as u128)
}

/// Slope and intercept to apply, from the header's `scl_slope` and `scl_inter`: NIfTI
/// says a slope of 0 means "no scaling".
fn scaling(s: f64, i: f64) -> (f64, f64) {
    if s == 0.0 || !s.is_finite() {
        (1.0, 0.0)
    } else {
        (s, if i.is_finite() { i } else { 0.0 })
    }
}

/// `[z, y, x]` spacing in mm from pixdim (the xyzt_units' metres or microns converted);
/// missing, zero or non-finite entries become 1.
pub fn spacing_zyx(h: &nifti::NiftiHeader) -> [f64; 3] {
    let unit = unit_to_mm(h.xyzt_units);
    let p = |i: usize| {
        let v = (h.pixdim[i] as f64).abs() * unit;
        if v.is_finite() && v > 0.0 {
            v
        } else {
            1.0
        }
    };
    [p(3), p(2), p(1)]
}

/// Millimetres per unit of the header's spatial unit (NIfTI: 1 metre, 2 mm, 3 micron;
/// 0, "unknown", is taken as mm).
fn unit_to_mm(xyzt_units: u8) -> f64 {
    match xyzt_units & 7 {
        1 => 1000.0,
        3 => 0.001,
        _ => 1.0,
    }
}

/// Spacing outside this range (mm) is an error: no CT has such voxels.
pub const SPACING_MM_LIMITS: (f64, f64) = (1e-3, 1e3);
/// Spacing outside this range (mm) gets a warning: possible, but not a head CT.
pub const SPACING_MM_USUAL: (f64, f64) = (0.05, 30.0);

/// [`spacing_zyx`], after checking the pixdim of every used axis with [`check_spacing`];
/// a zero or non-finite one gets a warning (1 mm is used).
fn checked_spacing(
    path: &Path,
    h: &nifti::NiftiHeader,
    warnings: &mut Vec<String>,
) -> Result<[f64; 3], String> {
    let ndim = (h.dim[0] as usize).clamp(1, 7);
    let unit = unit_to_mm(h.xyzt_units);
    for k in 1..=ndim.min(3) {
        let raw = h.pixdim[k];
        if raw == 0.0 || !raw.is_finite() {
            warnings.push(format!(
                "{}: pixdim[{k}] is {raw}: using 1 mm",
                path.display()
            ));
        } else {
            check_spacing(
                path,
                &format!("pixdim[{k}] = {raw}"),
                (raw as f64).abs() * unit,
                warnings,
            )?;
        }
    }
    Ok(spacing_zyx(h))
}

/// A voxel size `mm` (named `what` in messages): an error outside [`SPACING_MM_LIMITS`],
/// a warning outside [`SPACING_MM_USUAL`].
pub(crate) fn check_spacing(
    path: &Path,
    what: &str,
    mm: f64,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    if !(SPACING_MM_LIMITS.0..=SPACING_MM_LIMITS.1).contains(&mm) {
        return Err(format!(
            "{what} ({mm:e} mm) is not a plausible voxel size (must be {} to {} mm)",
            SPACING_MM_LIMITS.0, SPACING_MM_LIMITS.1
        ));
    }
    if !(SPACING_MM_USUAL.0..=SPACING_MM_USUAL.1).contains(&mm) {
        warnings.push(format!(
            "{}: {what} ({mm} mm) is an unusual voxel size for a head CT",
            path.display()
        ));
    }
    Ok(())
}

fn decode(raw: &[u8], dt: DataType, big: bool, slope: f64, inter: f64, out: &mut Vec<f32>) {
    macro_rules! conv {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            out.extend(raw.chunks_exact(N).map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                let v = if big {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                };
                (v as f64 * slope + inter) as f32
            }))
        }};
    }
    match dt {
        DataType::U8 => conv!(u8),
        DataType::I8 => conv!(i8),
        DataType::I16 => conv!(i16),
        DataType::U16 => conv!(u16),
        DataType::I32 => conv!(i32),
        DataType::U32 => conv!(u32),
        DataType::I64 => conv!(i64),
        DataType::U64 => conv!(u64),
        DataType::F32 => conv!(f32),
        DataType::F64 => conv!(f64),
    }
}

/// Replaces NaN/Inf with the minimum finite value (0 if there is none); returns the count
/// and the fill value.
pub fn replace_nonfinite(vals: &mut [f32]) -> (usize, f32) {
    let mut count = 0usize;
    let mut min = f32::INFINITY;
    for &v in vals.iter() {
        if v.is_finite() {
            min = min.min(v);
        } else {
            count += 1;
        }
    }
    let fill = if min.is_finite() { min } else { 0.0 };
    if count > 0 {
        for v in vals.iter_mut() {
            if !v.is_finite() {
                *v = fill;
            }
        }
    }
    (count, fill)
}

/// Reads the header at the start of `r` (348 bytes for NIfTI-1, 540 for NIfTI-2, told
/// apart by the size field) and validates it with [`parse_header`] (`pair`: as a `.hdr`'s).
/// The outer error is the stream's; the inner one is the reason a header is short or
/// invalid, without the path.
fn read_and_parse_header(
    r: &mut impl Read,
    gz: bool,
    pair: bool,
) -> std::io::Result<Result<(nifti::NiftiHeader, Layout), String>> {
    let mut b = [0u8; HEADER_SIZE_2];
    let mut got = read_full(r, &mut b[..HEADER_SIZE])?;
    let (size, kind) = match header_kind(&b[..got]) {
        Some((HEADER_SIZE_2, _)) => (HEADER_SIZE_2, "NIfTI-2"),
        _ => (HEADER_SIZE, "NIfTI-1"),
    };
    if got == HEADER_SIZE && size == HEADER_SIZE_2 {
        got += read_full(r, &mut b[HEADER_SIZE..])?;
    }
    if got < size {
        let what = if gz { "decompresses to" } else { "is" };
        return Ok(Err(format!(
            "{what} only {got} bytes, shorter than the {size}-byte {kind} header"
        )));
    }
    Ok(parse_header(&b[..size], pair))
}

/// The header size (348: NIfTI-1, 540: NIfTI-2) and byte order (`true`: big-endian) that
/// the `sizeof_hdr` field at the start of `b` gives.
fn header_kind(b: &[u8]) -> Option<(usize, bool)> {
    let first: [u8; 4] = b.get(..4)?.try_into().ok()?;
    let (le, be) = (i32::from_le_bytes(first), i32::from_be_bytes(first));
    [HEADER_SIZE, HEADER_SIZE_2].into_iter().find_map(|n| {
        if le == n as i32 {
            Some((n, false))
        } else if be == n as i32 {
            Some((n, true))
        } else {
            None
        }
    })
}

/// Parses and validates a whole NIfTI-1 or NIfTI-2 header (by its size field): a single
/// file's, or with `pair` a `.hdr`'s (magic `ni1`/`ni2`, voxels in the `.img` from
/// `vox_offset`); the error is the reason, without the path.
fn parse_header(b: &[u8], pair: bool) -> Result<(nifti::NiftiHeader, Layout), String> {
    match header_kind(b) {
        Some((n, big)) if n == b.len() && n == HEADER_SIZE => parse_nifti1(b, big, pair),
        Some((n, big)) if n == b.len() && n == HEADER_SIZE_2 => parse_nifti2(b, big, pair),
        _ => Err(format!(
            "not a NIfTI-1 file: header size field is {}, expected 348 (or 540 for NIfTI-2; first bytes {:02x?})",
            b.get(..4)
                .map_or(0, |f| i32::from_le_bytes([f[0], f[1], f[2], f[3]])),
            &b[..b.len().min(8)]
        )),
    }
}

/// The fixed-offset fields of a header, in its byte order. Offsets are constants within
/// the header's fixed length.
struct Fields<'a> {
    b: &'a [u8],
    big: bool,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, o: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[o..o + N]);
        a
    }
    fn i16(&self, o: usize) -> i16 {
        let a = self.bytes(o);
        if self.big {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }
    fn i32(&self, o: usize) -> i32 {
        let a = self.bytes(o);
        if self.big {
            i32::from_be_bytes(a)
        } else {
            i32::from_le_bytes(a)
        }
    }
    fn i64(&self, o: usize) -> i64 {
        let a = self.bytes(o);
        if self.big {
            i64::from_be_bytes(a)
        } else {
            i64::from_le_bytes(a)
        }
    }
    fn f32(&self, o: usize) -> f32 {
        f32::from_bits(self.i32(o) as u32)
    }
    fn f64(&self, o: usize) -> f64 {
        f64::from_bits(self.i64(o) as u64)
    }
    fn endianness(&self) -> nifti::Endianness {
        if self.big {
            nifti::Endianness::Big
        } else {
            nifti::Endianness::Little
        }
    }
}

/// The `(z, y, x)` shape of a header's `dim` array, validated: `dim[0]` is 1 to 7, the
/// used dims are positive, and those past the third are 1.
fn shape_of(dims: &[i64; 8]) -> Result<(usize, usize, usize), String> {
    let ndim = dims[0];
    if !(1..=7).contains(&ndim) {
        return Err(format!(
            "invalid number of dimensions dim[0] = {ndim} (must be 1 to 7)"
        ));
    }
    let ndim = ndim as usize;
    let used = &dims[1..=ndim];
    if let Some(k) = used.iter().position(|&d| d <= 0) {
        return Err(format!(
            "invalid dims {:?}: dim[{}] = {} (must be positive)",
            used,
            k + 1,
            used[k]
        ));
    }
    if ndim >= 4 && used[3..].iter().any(|&d| d != 1) {
        return Err(if ndim == 4 {
            format!(
                "4-D image with {} volumes (dims {used:?}): only 3-D volumes (or 4-D with one volume) are supported",
                used[3]
            )
        } else {
            format!("{ndim}-D data (dims {used:?}): only 3-D volumes are supported")
        });
    }
    let d = |k: usize| {
        if k <= ndim {
            usize::try_from(dims[k]).map_err(|_| format!("dim[{k}] = {} is too large", dims[k]))
        } else {
            Ok(1)
        }
    };
    Ok((d(3)?, d(2)?, d(1)?))
}

/// The layout of a validated shape, datatype and vox_offset. In a single file, a
/// vox_offset inside the header (old writers leave 0) means the data follows the header and
/// its 4 extension bytes; in a pair (`pair`), vox_offset is the offset in the `.img`. The
/// shape's voxel count times 8 must fit a `u64` (NIfTI-1 dims do).
fn layout_of(
    shape: (usize, usize, usize),
    dtype: DataType,
    vox_offset: u64,
    (header_size, pair): (usize, bool),
    big_endian: bool,
    (scl_slope, scl_inter): (f64, f64),
) -> Layout {
    let offset = if !pair && vox_offset < header_size as u64 {
        header_size as u64 + 4
    } else {
        vox_offset
    };
    let nvox = shape.0 as u64 * shape.1 as u64 * shape.2 as u64;
    Layout {
        shape,
        dtype,
        offset,
        nbytes: nvox * dtype.size() as u64,
        big_endian,
        header_size,
        scl_slope,
        scl_inter,
    }
}

/// Parses and validates a NIfTI-1 header (348 bytes, byte order `big`): a single file's
/// (magic `n+1`) or, with `pair`, a `.hdr`'s (magic `ni1`).
fn parse_nifti1(b: &[u8], big: bool, pair: bool) -> Result<(nifti::NiftiHeader, Layout), String> {
    let f = Fields { b, big };
    let magic = [b[344], b[345], b[346], b[347]];
    check_magic(&magic, 1, pair)?;

    let dims: [i16; 8] = std::array::from_fn(|k| f.i16(40 + 2 * k));
    let shape = shape_of(&dims.map(i64::from))?;

    let datatype = f.i16(70);
    let dtype = DataType::from_code(datatype)?;

    let vox_offset = f.f32(108);
    if !vox_offset.is_finite() || vox_offset < 0.0 || vox_offset.fract() != 0.0 {
        return Err(format!("invalid vox_offset {vox_offset}"));
    }
    let (scl_slope, scl_inter) = (f.f32(112), f.f32(116));
    let layout = layout_of(
        shape,
        dtype,
        vox_offset as u64,
        (HEADER_SIZE, pair),
        big,
        (scl_slope as f64, scl_inter as f64),
    );

    let mut h = nifti::NiftiHeader {
        sizeof_hdr: 348,
        extents: f.i32(32),
        session_error: f.i16(36),
        regular: b[38],
        dim_info: b[39],
        dim: dims.map(|v| v.max(0) as u16),
        intent_p1: f.f32(56),
        intent_p2: f.f32(60),
        intent_p3: f.f32(64),
        intent_code: f.i16(68),
        datatype,
        bitpix: f.i16(72),
        slice_start: f.i16(74),
        pixdim: std::array::from_fn(|k| f.f32(76 + 4 * k)),
        vox_offset,
        scl_slope,
        scl_inter,
        slice_end: f.i16(120),
        slice_code: b[122],
        xyzt_units: b[123],
        cal_max: f.f32(124),
        cal_min: f.f32(128),
        slice_duration: f.f32(132),
        toffset: f.f32(136),
        glmax: f.i32(140),
        glmin: f.i32(144),
        descrip: b[148..228].to_vec(),
        qform_code: f.i16(252),
        sform_code: f.i16(254),
        quatern_b: f.f32(256),
        quatern_c: f.f32(260),
        quatern_d: f.f32(264),
        quatern_x: f.f32(268),
        quatern_y: f.f32(272),
        quatern_z: f.f32(276),
        srow_x: std::array::from_fn(|k| f.f32(280 + 4 * k)),
        srow_y: std::array::from_fn(|k| f.f32(296 + 4 * k)),
        srow_z: std::array::from_fn(|k| f.f32(312 + 4 * k)),
        magic,
        endianness: f.endianness(),
        ..Default::default()
    };
    h.data_type.copy_from_slice(&b[4..14]);
    h.db_name.copy_from_slice(&b[14..32]);
    h.aux_file.copy_from_slice(&b[228..252]);
    h.intent_name.copy_from_slice(&b[328..344]);
    Ok((h, layout))
}

/// Checks a NIfTI-`version` header's magic: `n+1`/`n+2` in a single file, `ni1`/`ni2` in
/// a pair's `.hdr` (`pair`). A `.hdr` without NIfTI magic is a plain Analyze 7.5 header.
fn check_magic(magic: &[u8; 4], version: u8, pair: bool) -> Result<(), String> {
    let single = [b'n', b'+', b'0' + version, 0];
    let paired = [b'n', b'i', b'0' + version, 0];
    let shown = |m: &[u8; 4]| {
        String::from_utf8_lossy(m)
            .trim_end_matches('\0')
            .to_string()
    };
    match (pair, *magic == single, *magic == paired) {
        (false, true, _) | (true, _, true) => Ok(()),
        (false, _, true) => Err(format!(
            "has the magic \"{}\" of the header of a .hdr/.img pair, whose voxels are in a separate .img file: name it .hdr, beside its .img, to read the pair",
            shown(&paired)
        )),
        (true, true, _) => Err(format!(
            "has the magic \"{}\" of a single-file NIfTI-{version} (voxels after the header), not that of a .hdr/.img pair's header (\"{}\"): name it .nii",
            shown(&single),
            shown(&paired)
        )),
        (true, false, false) if version == 1 => Err(format!(
            "no NIfTI magic (bytes 344-347 are {magic:02x?}, \"ni1\" expected): a plain Analyze 7.5 header, whose orientation is undefined (left and right may be swapped); convert it to NIfTI (e.g. with nibabel or FSL's fslchfiletype), checking its orientation, and read that"
        )),
        (true, false, false) => Err(format!(
            "wrong magic {:?}, expected \"{}\" (not a NIfTI-2 pair's header)",
            shown(magic),
            shown(&paired)
        )),
        (false, false, false) => Err(format!(
            "wrong magic {:?}, expected \"{}\" (not a NIfTI-{version} file)",
            shown(magic),
            shown(&single)
        )),
    }
}

/// The error for a NIfTI-2 field whose value NIfTI-1's field cannot hold.
fn not_nifti1(name: &str, v: impl std::fmt::Display) -> String {
    format!(
        "{name} = {v} does not fit NIfTI-1's field, and the outputs (masks, maps) are written as NIfTI-1"
    )
}

/// Parses and validates a NIfTI-2 header (540 bytes, byte order `big`; with `pair` a
/// `.hdr`'s, magic `ni2`) into the NIfTI-1
/// header every volume keeps (`sizeof_hdr` 540 and magic `n+2`/`ni2` there say where it came
/// from): every field the outputs carry must fit its NIfTI-1 field (dims at most 32767,
/// codes and slice fields in range, finite `f64`s within `f32`'s range and not rounded to
/// 0); `f64`s are rounded to `f32`. `scl_slope`/`scl_inter` are applied at `f64`.
fn parse_nifti2(b: &[u8], big: bool, pair: bool) -> Result<(nifti::NiftiHeader, Layout), String> {
    let f = Fields { b, big };
    let magic = [b[4], b[5], b[6], b[7]];
    check_magic(&magic, 2, pair)?;
    if b[8..12] != *b"\r\n\x1a\n" {
        return Err(format!(
            "NIfTI-2 magic's check bytes are {:02x?}, expected [0d, 0a, 1a, 0a]: the file was changed (e.g. by a text-mode transfer)",
            &b[8..12]
        ));
    }

    let dims: [i64; 8] = std::array::from_fn(|k| f.i64(16 + 8 * k));
    let shape = shape_of(&dims)?;
    // Before the voxel count is computed: NIfTI-1 dims cannot overflow it.
    let max = i16::MAX as usize;
    if [shape.0, shape.1, shape.2].iter().any(|&d| d > max) {
        let used = &dims[1..=dims[0] as usize];
        return Err(format!(
            "dims {used:?} do not fit NIfTI-1 (at most {max} per axis), and the outputs (masks, maps) are written as NIfTI-1"
        ));
    }

    let datatype = f.i16(12);
    let dtype = DataType::from_code(datatype)?;

    let vox_offset = f.i64(168);
    let vox_offset =
        u64::try_from(vox_offset).map_err(|_| format!("invalid vox_offset {vox_offset}"))?;
    let layout = layout_of(
        shape,
        dtype,
        vox_offset,
        (HEADER_SIZE_2, pair),
        big,
        (f.f64(176), f.f64(184)),
    );

    let f32_field = |name: &str, o: usize| -> Result<f32, String> {
        let v = f.f64(o);
        let r = v as f32;
        if v.is_finite() && (r.is_infinite() || (r == 0.0 && v != 0.0)) {
            Err(not_nifti1(name, format_args!("{v:e}")))
        } else {
            Ok(r)
        }
    };
    let f32_fields = |name: &str, o: usize, out: &mut [f32]| -> Result<(), String> {
        for (k, v) in out.iter_mut().enumerate() {
            *v = f32_field(&format!("{name}[{k}]"), o + 8 * k)?;
        }
        Ok(())
    };
    fn int<T: TryFrom<i64>>(name: &str, v: impl Into<i64>) -> Result<T, String> {
        let v = v.into();
        T::try_from(v).map_err(|_| not_nifti1(name, v))
    }

    let mut h = nifti::NiftiHeader {
        sizeof_hdr: HEADER_SIZE_2 as i32,
        dim_info: b[524],
        dim: dims.map(|v| v.clamp(0, i16::MAX as i64) as u16),
        intent_p1: f32_field("intent_p1", 80)?,
        intent_p2: f32_field("intent_p2", 88)?,
        intent_p3: f32_field("intent_p3", 96)?,
        intent_code: int("intent_code", f.i32(504))?,
        datatype,
        bitpix: f.i16(14),
        slice_start: int("slice_start", f.i64(224))?,
        vox_offset: vox_offset as f32,
        scl_slope: f32_field("scl_slope", 176)?,
        scl_inter: f32_field("scl_inter", 184)?,
        slice_end: int("slice_end", f.i64(232))?,
        slice_code: int("slice_code", f.i32(496))?,
        xyzt_units: int("xyzt_units", f.i32(500))?,
        cal_max: f32_field("cal_max", 192)?,
        cal_min: f32_field("cal_min", 200)?,
        slice_duration: f32_field("slice_duration", 208)?,
        toffset: f32_field("toffset", 216)?,
        descrip: b[240..320].to_vec(),
        qform_code: int("qform_code", f.i32(344))?,
        sform_code: int("sform_code", f.i32(348))?,
        quatern_b: f32_field("quatern_b", 352)?,
        quatern_c: f32_field("quatern_c", 360)?,
        quatern_d: f32_field("quatern_d", 368)?,
        quatern_x: f32_field("qoffset_x", 376)?,
        quatern_y: f32_field("qoffset_y", 384)?,
        quatern_z: f32_field("qoffset_z", 392)?,
        magic,
        endianness: f.endianness(),
        ..Default::default()
    };
    f32_fields("pixdim", 104, &mut h.pixdim)?;
    f32_fields("srow_x", 400, &mut h.srow_x)?;
    f32_fields("srow_y", 432, &mut h.srow_y)?;
    f32_fields("srow_z", 464, &mut h.srow_z)?;
    h.aux_file.copy_from_slice(&b[320..344]);
    h.intent_name.copy_from_slice(&b[508..524]);
    Ok((h, layout))
}

/// Reads only the header of a `.nii`/`.nii.gz` file (or of a pair: its `.hdr`, when
/// `path` names either file; the `.img` is not opened), validated as for a full read.
pub fn read_header(path: &Path) -> Result<nifti::NiftiHeader, IoError> {
    let (hp, pair) = match pair_header(path) {
        Some(h) => (h?, true),
        None => (path.to_path_buf(), false),
    };
    let path = hp.as_path();
    let mut file = File::open(path).map_err(|e| IoError::read(path, e))?;
    let mut magic = [0u8; 2];
    let got = read_full(&mut file, &mut magic).map_err(|e| IoError::read(path, e))?;
    file.rewind().map_err(|e| IoError::read(path, e))?;
    let gz = got == 2 && magic == [0x1f, 0x8b];
    let mut reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    read_and_parse_header(&mut reader, gz, pair)
        .map_err(|e| IoError::invalid(path, format!("cannot read the header: {e}")))?
        .map(|(h, _)| h)
        .map_err(|r| IoError::invalid(path, r))
}

/// The `[z, y, x]` shape a header's dims describe (missing dims count as 1).
pub(crate) fn header_shape(h: &nifti::NiftiHeader) -> Option<(usize, usize, usize)> {
    let n = h.dim[0] as usize;
    if !(1..=7).contains(&n) {
        return None;
    }
    let d = |k: usize| if k <= n { h.dim[k] as usize } else { 1 };
    if (4..=n).any(|k| h.dim[k] != 1) {
        return None;
    }
    Some((d(3), d(2), d(1)))
}

/// The header of an output of `shape` written like `like`: its geometry (pixdim,
/// qform/sform codes and parameters, units, dims when they agree with `shape`), with the
/// datatype and scaling of the output.
fn output_header(
    path: &Path,
    like: &nifti::NiftiHeader,
    shape: (usize, usize, usize),
    dt: DataType,
    slope: f32,
    inter: f32,
) -> Result<nifti::NiftiHeader, IoError> {
    let (nz, ny, nx) = shape;
    let max = i16::MAX as usize;
    if nx > max || ny > max || nz > max {
        return Err(IoError::invalid(
            path,
            format!("shape {nx}x{ny}x{nz} is too large for NIfTI-1 (max {max} per axis)"),
        ));
    }
    let mut h = like.clone();
    if header_shape(like) == Some(shape) {
        let n = like.dim[0] as usize;
        for k in n + 1..8 {
            h.dim[k] = 1;
        }
    } else {
        h.dim = [3, nx as u16, ny as u16, nz as u16, 1, 1, 1, 1];
    }
    h.sizeof_hdr = 348;
    h.datatype = dt.code();
    h.bitpix = (dt.size() * 8) as i16;
    h.vox_offset = 352.0;
    h.scl_slope = slope;
    h.scl_inter = inter;
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    h.glmin = 0;
    h.glmax = 0;
    h.magic = *b"n+1\0";
    h.endianness = nifti::Endianness::Little;
    if h.descrip.len() != 80 {
        h.descrip.resize(80, 0);
    }
    Ok(h)
}

/// The 348 header bytes (little-endian) plus 4 zero extension bytes.
pub fn header_bytes(h: &nifti::NiftiHeader) -> Vec<u8> {
    let mut b = Vec::with_capacity(352);
    b.extend_from_slice(&348i32.to_le_bytes());
    b.extend_from_slice(&h.data_type);
    b.extend_from_slice(&h.db_name);
    b.extend_from_slice(&h.extents.to_le_bytes());
    b.extend_from_slice(&h.session_error.to_le_bytes());
    b.push(h.regular);
    b.push(h.dim_info);
    for d in h.dim {
        b.extend_from_slice(&(d as i16).to_le_bytes());
    }
    for v in [h.intent_p1, h.intent_p2, h.intent_p3] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in [h.intent_code, h.datatype, h.bitpix, h.slice_start] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in h.pixdim {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in [h.vox_offset, h.scl_slope, h.scl_inter] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&h.slice_end.to_le_bytes());
    b.push(h.slice_code);
    b.push(h.xyzt_units);
    for v in [h.cal_max, h.cal_min, h.slice_duration, h.toffset] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&h.glmax.to_le_bytes());
    b.extend_from_slice(&h.glmin.to_le_bytes());
    let mut descrip = [0u8; 80];
    let n = h.descrip.len().min(80);
    descrip[..n].copy_from_slice(&h.descrip[..n]);
    b.extend_from_slice(&descrip);
    b.extend_from_slice(&h.aux_file);
    b.extend_from_slice(&h.qform_code.to_le_bytes());
    b.extend_from_slice(&h.sform_code.to_le_bytes());
    for v in [
        h.quatern_b,
        h.quatern_c,
        h.quatern_d,
        h.quatern_x,
        h.quatern_y,
        h.quatern_z,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for row in [h.srow_x, h.srow_y, h.srow_z] {
        for v in row {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b.extend_from_slice(&h.intent_name);
    b.extend_from_slice(&h.magic);
    debug_assert_eq!(b.len(), HEADER_SIZE);
    b.extend_from_slice(&[0u8; 4]);
    b
}

/// Writes a header and voxel bytes (already little-endian, in `[z, y, x]` order), gzipped
/// when the path ends in `.gz`.
fn write_nifti_file(
    path: &Path,
    h: &nifti::NiftiHeader,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), IoError> {
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let head = header_bytes(h);
    write_atomic(path, |w| {
        if gz {
            let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::new(6));
            enc.write_all(&head)?;
            body(&mut enc)?;
            enc.finish()?;
        } else {
            w.write_all(&head)?;
            body(w)?;
        }
        Ok(())
    })
}

/// Writes the values of `it` (in `[z, y, x]` order) through `enc`, in blocks.
fn write_values<T, const N: usize>(
    w: &mut dyn Write,
    it: impl Iterator<Item = T>,
    enc: impl Fn(T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    for v in it {
        buf.extend_from_slice(&enc(v));
        if buf.len() >= (1 << 16) {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)
}

fn check_like(path: &Path, got: (usize, usize, usize), like: &Volume) -> Result<(), IoError> {
    let want = like.data.dim();
    if got != want {
        return Err(IoError::ShapeMismatch {
            path: path.to_path_buf(),
            image: like.source.clone(),
            got: [got.0, got.1, got.2],
            want: [want.0, want.1, want.2],
        });
    }
    Ok(())
}

/// Writes a `u8` mask with exactly `like`'s geometry; errors if the shapes differ.
pub fn write_mask(path: &Path, mask: &Mask, like: &Volume) -> Result<(), IoError> {
    check_like(path, mask.dim(), like)?;
    let h = output_header(path, &like.header, mask.dim(), DataType::U8, 1.0, 0.0)?;
    write_nifti_file(path, &h, |w| match mask.as_slice() {
        Some(s) => w.write_all(s),
        None => write_values(w, mask.iter().copied(), |v: u8| [v]),
    })
}

/// Writes an `f32` map (e.g. a CAM) with exactly `like`'s geometry; errors if the shapes
/// differ.
pub fn write_map(path: &Path, map: &Array3<f32>, like: &Volume) -> Result<(), IoError> {
    check_like(path, map.dim(), like)?;
    let h = output_header(path, &like.header, map.dim(), DataType::F32, 1.0, 0.0)?;
    write_nifti_file(path, &h, |w| {
        write_values(w, map.iter().copied(), f32::to_le_bytes)
    })
}

/// Writes a volume as `int16` HU (rounded, clamped to the int16 range) with `scl_slope` 1
/// and `scl_inter` 0, keeping its geometry.
pub fn write_volume(path: &Path, vol: &Volume) -> Result<(), IoError> {
    let h = output_header(path, &vol.header, vol.data.dim(), DataType::I16, 1.0, 0.0)?;
    write_nifti_file(path, &h, |w| {
        write_values(w, vol.data.iter().copied(), |v: f32| {
            // `as` saturates and maps NaN to 0.
            (v.round() as i16).to_le_bytes()
        })
    })
}

/// Writes `[z, y, x]` voxels of any supported type with `like`'s geometry and the given
/// scaling; the stored values are `v` converted with `as` (callers pick a type that holds
/// them). Used by tests and converters.
pub fn write_typed(
    path: &Path,
    data: &Array3<f64>,
    dt: DataType,
    slope: f32,
    inter: f32,
    like: &nifti::NiftiHeader,
) -> Result<(), IoError> {
    let h = output_header(path, like, data.dim(), dt, slope, inter)?;
    let it = data.iter().copied();
    write_nifti_file(path, &h, |w| match dt {
        DataType::U8 => write_values(w, it, |v| (v as u8).to_le_bytes()),
        DataType::I8 => write_values(w, it, |v| (v as i8).to_le_bytes()),
        DataType::I16 => write_values(w, it, |v| (v as i16).to_le_bytes()),
        DataType::U16 => write_values(w, it, |v| (v as u16).to_le_bytes()),
        DataType::I32 => write_values(w, it, |v| (v as i32).to_le_bytes()),
        DataType::U32 => write_values(w, it, |v| (v as u32).to_le_bytes()),
        DataType::I64 => write_values(w, it, |v| (v as i64).to_le_bytes()),
        DataType::U64 => write_values(w, it, |v| (v as u64).to_le_bytes()),
        DataType::F32 => write_values(w, it, |v| (v as f32).to_le_bytes()),
        DataType::F64 => write_values(w, it, |v| v.to_le_bytes()),
    })
}

/// Binarises a mask volume: value > 0.5 -> 1.
pub fn to_mask(v: &Volume) -> Mask {
    v.data.mapv(|x| u8::from(x > 0.5))
}

/// An error unless `mask` (read from `mask_path`) has `image`'s shape.
pub fn check_same_shape(image: &Volume, mask_path: &Path, mask: &Volume) -> Result<(), IoError> {
    check_like(mask_path, mask.data.dim(), image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_parse_back() {
        let v = Volume::from_array(Array3::zeros((3, 4, 5)), [5.0, 0.5, 0.6], "x".into());
        let b = header_bytes(&v.header);
        let arr: [u8; HEADER_SIZE] = b[..HEADER_SIZE].try_into().unwrap();
        let (h, l) = parse_header(&arr, false).unwrap();
        assert_eq!(l.shape, (3, 4, 5));
        assert_eq!(h, v.header);
    }

    #[test]
    fn nonfinite_replaced_with_min() {
        let mut v = vec![3.0, f32::NAN, -2.0, f32::INFINITY, 7.0];
        assert_eq!(replace_nonfinite(&mut v), (2, -2.0));
        assert_eq!(v, vec![3.0, -2.0, -2.0, -2.0, 7.0]);
    }
}
