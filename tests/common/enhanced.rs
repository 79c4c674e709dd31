//! A test writer of multi-frame DICOM CT ([`write_enhanced`]): one Enhanced CT Image Storage
//! file holding a volume's slices as frames, its geometry and rescale in the shared or the
//! per-frame functional groups, frames in any order, native or RLE pixel data, and the
//! defects the hostile cases need (a short per-frame sequence, too little pixel data, a frame
//! without a position, a NumberOfFrames claim, a legacy multi-frame file without functional
//! groups). Written with the `dicom-object` crate directly, not with the reader's module.

use dicom_core::value::{DataSetSequence, PixelFragmentSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use ichcam::io::Volume;
use std::path::Path;

pub const ENHANCED_CT: &str = "1.2.840.10008.5.1.4.1.1.2.1";
pub const CT_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
pub const JPEG_2000: &str = "1.2.840.10008.1.2.4.90";

/// How [`write_enhanced`] writes the file; the default is a plain Enhanced CT file with
/// orientation, pixel measures and rescale shared and one position per frame, in `z` order.
#[derive(Clone, Debug, Default)]
pub struct Enhanced {
    /// Frame `f` holds slice `order[f]` of the volume (default `0..nz`).
    pub order: Option<Vec<usize>>,
    /// Orientation and pixel measures in every per-frame item instead of the shared item.
    pub per_frame_geometry: bool,
    /// A different rescale (slope 1 or 0.5, intercept -1024 - 8 f) in every per-frame item
    /// instead of one shared (slope 1, intercept -1024).
    pub per_frame_rescale: bool,
    /// SeriesInstanceUID (default: a fixed one).
    pub series_uid: Option<String>,
    /// NumberOfFrames written instead of the frame count.
    pub number_of_frames: Option<String>,
    /// Per-frame items written (default: one per frame).
    pub per_frame_items: Option<usize>,
    /// Frames of pixel data written (default: all).
    pub pixel_frames: Option<usize>,
    /// The frame whose PlanePositionSequence is left out.
    pub no_position: Option<usize>,
    /// Encapsulated pixel data under this transfer syntax, one fragment per frame: RLE
    /// Lossless encoded for [`RLE_LOSSLESS`], the raw bytes for anything else.
    pub encapsulated: Option<&'static str>,
    /// A legacy multi-frame CT Image Storage file: top-level orientation, position (of the
    /// first frame), spacing and rescale, SpacingBetweenSlices, no functional groups.
    pub legacy: bool,
}

/// DS text (at most 16 characters).
fn ds(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn strs(v: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(v.iter().map(|&x| ds(x)).collect())
}

fn el(tag: Tag, vr: VR, v: PrimitiveValue) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v)
}

fn seq(tag: Tag, item: InMemDicomObject) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(vec![item]))
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// The rescale of frame `f`: `(slope, intercept)`.
pub fn frame_rescale(spec: &Enhanced, f: usize) -> (f64, f64) {
    if spec.per_frame_rescale {
        (if f % 2 == 1 { 0.5 } else { 1.0 }, -1024.0 - 8.0 * f as f64)
    } else {
        (1.0, -1024.0)
    }
}

/// PackBits of one byte plane as literal runs, padded to an even length with no-ops.
fn packbits(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for run in bytes.chunks(128) {
        out.push((run.len() - 1) as u8);
        out.extend_from_slice(run);
    }
    if out.len() % 2 == 1 {
        out.push(0x80);
    }
    out
}

/// One RLE Lossless fragment of 16-bit samples: the high-byte segment, then the low-byte one.
fn rle_frame(px: &[i16]) -> Vec<u8> {
    let hi: Vec<u8> = px.iter().map(|v| (*v as u16 >> 8) as u8).collect();
    let lo: Vec<u8> = px.iter().map(|v| *v as u16 as u8).collect();
    let (a, b) = (packbits(&hi), packbits(&lo));
    let mut header = [0u32; 16];
    header[0] = 2;
    header[1] = 64;
    header[2] = 64 + a.len() as u32;
    let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.extend(a);
    out.extend(b);
    out
}

/// Writes `vol` as one multi-frame DICOM file at `path` as `spec` says.
pub fn write_enhanced(path: &Path, vol: &Volume, spec: &Enhanced) {
    let (nz, ny, nx) = vol.dims();
    // RAS+ -> LPS.
    let mut a = vol.affine();
    for row in a.iter_mut().take(2) {
        for v in row.iter_mut() {
            *v = -*v;
        }
    }
    let col = |k: usize| [a[0][k], a[1][k], a[2][k]];
    let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let (cx, cy, cz) = (col(0), col(1), col(2));
    let (sx, sy, sz) = (norm(cx), norm(cy), norm(cz));
    let ori = [
        cx[0] / sx,
        cx[1] / sx,
        cx[2] / sx,
        cy[0] / sy,
        cy[1] / sy,
        cy[2] / sy,
    ];
    let position = |z: usize| [0, 1, 2].map(|r| a[r][3] + cz[r] * z as f64);
    let order: Vec<usize> = spec.order.clone().unwrap_or_else(|| (0..nz).collect());
    let frames = order.len();
    let s = |v: &str| PrimitiveValue::from(v);
    let orientation = || {
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            item(vec![el(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                strs(&ori),
            )]),
        )
    };
    let measures = || {
        seq(
            tags::PIXEL_MEASURES_SEQUENCE,
            item(vec![
                el(tags::PIXEL_SPACING, VR::DS, strs(&[sy, sx])),
                el(tags::SLICE_THICKNESS, VR::DS, strs(&[sz])),
            ]),
        )
    };
    let rescale = |f: usize| {
        let (slope, intercept) = frame_rescale(spec, f);
        seq(
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            item(vec![
                el(tags::RESCALE_INTERCEPT, VR::DS, strs(&[intercept])),
                el(tags::RESCALE_SLOPE, VR::DS, strs(&[slope])),
                el(tags::RESCALE_TYPE, VR::LO, s("HU")),
            ]),
        )
    };
    // Stored values, frame by frame.
    let pixels: Vec<Vec<i16>> = order
        .iter()
        .enumerate()
        .map(|(f, &z)| {
            let (slope, intercept) = frame_rescale(spec, f);
            vol.data
                .index_axis(ndarray::Axis(0), z)
                .iter()
                .map(|&v| ((v as f64 - intercept) / slope).round() as i16)
                .collect()
        })
        .collect();
    let pixel_frames = spec.pixel_frames.unwrap_or(frames).min(frames);
    let mut elements = vec![
        el(
            tags::SOP_CLASS_UID,
            VR::UI,
            s(if spec.legacy { CT_IMAGE } else { ENHANCED_CT }),
        ),
        el(tags::SOP_INSTANCE_UID, VR::UI, s("2.25.4242")),
        el(tags::MODALITY, VR::CS, s("CT")),
        el(tags::STUDY_INSTANCE_UID, VR::UI, s("2.25.4243")),
        el(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            s(spec.series_uid.as_deref().unwrap_or("2.25.4244")),
        ),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, s("2.25.4245")),
        el(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            s(&spec
                .number_of_frames
                .clone()
                .unwrap_or_else(|| frames.to_string())),
        ),
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
    ];
    if spec.legacy {
        let (slope, intercept) = frame_rescale(spec, 0);
        elements.extend([
            el(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                strs(&position(order[0])),
            ),
            el(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, strs(&ori)),
            el(tags::PIXEL_SPACING, VR::DS, strs(&[sy, sx])),
            el(tags::SLICE_THICKNESS, VR::DS, strs(&[sz])),
            el(tags::SPACING_BETWEEN_SLICES, VR::DS, strs(&[sz])),
            el(tags::RESCALE_INTERCEPT, VR::DS, strs(&[intercept])),
            el(tags::RESCALE_SLOPE, VR::DS, strs(&[slope])),
        ]);
    } else {
        let mut shared = Vec::new();
        if !spec.per_frame_geometry {
            shared.push(orientation());
            shared.push(measures());
        }
        if !spec.per_frame_rescale {
            shared.push(rescale(0));
        }
        elements.push(seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, item(shared)));
        let items: Vec<InMemDicomObject> = (0..spec.per_frame_items.unwrap_or(frames))
            .map(|f| {
                let mut groups = Vec::new();
                if spec.no_position != Some(f) {
                    let z = order[f.min(frames - 1)];
                    groups.push(seq(
                        tags::PLANE_POSITION_SEQUENCE,
                        item(vec![el(
                            tags::IMAGE_POSITION_PATIENT,
                            VR::DS,
                            strs(&position(z)),
                        )]),
                    ));
                }
                if spec.per_frame_geometry {
                    groups.push(orientation());
                    groups.push(measures());
                }
                if spec.per_frame_rescale {
                    groups.push(rescale(f));
                }
                item(groups)
            })
            .collect();
        elements.push(DataElement::new(
            tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
    }
    let ts = spec.encapsulated.unwrap_or(EXPLICIT_VR_LE);
    match spec.encapsulated {
        None => {
            let words: Vec<u16> = pixels[..pixel_frames]
                .iter()
                .flatten()
                .map(|&v| v as u16)
                .collect();
            elements.push(el(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(words.into()),
            ));
        }
        Some(t) => {
            let fragments: Vec<Vec<u8>> = pixels[..pixel_frames]
                .iter()
                .map(|px| {
                    if t == RLE_LOSSLESS {
                        rle_frame(px)
                    } else {
                        px.iter().flat_map(|v| v.to_le_bytes()).collect()
                    }
                })
                .collect();
            elements.push(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PixelFragmentSequence::new(Vec::<u32>::new(), fragments),
            ));
        }
    }
    let file = InMemDicomObject::from_element_iter(elements)
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(ts))
        .unwrap();
    file.write_to_file(path).unwrap();
}
