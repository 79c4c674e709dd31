//! DICOM Segmentation (SEG) out: a binary mask of a volume read from DICOM as one
//! Segmentation Storage instance (1.2.840.10008.5.1.4.1.1.66.4) that viewers and PACS
//! (OHIF, 3D Slicer, highdicom) lay over the source series.
//!
//! [`write_seg`] writes SegmentationType BINARY, one segment (SCT 49755003 "Morphologically
//! Altered Structure" / SCT 50960005 "Hemorrhage", algorithm type AUTOMATIC), 1-bit frames
//! packed without padding between frames, one frame per slice that holds mask voxels (a
//! SEG needs at least one frame: an empty mask is written as one empty frame on the first
//! slice). Each frame references the source instance (and for a multi-frame source, its
//! frame) of its slice and carries that slice's ImagePositionPatient; orientation, pixel
//! spacing and thickness are shared. Patient and study attributes, the StudyInstanceUID and
//! the FrameOfReferenceUID are copied from the source ([`crate::io::DicomSource`]); the
//! series and instance UIDs are new. Explicit VR little endian, written with
//! [`write_atomic`]. Knows nothing about the network or the model: the caller names the
//! segment and the algorithm ([`SegmentInfo`]).

use super::atomic::write_atomic;
use super::dicom::{new_uid, strs, EXPLICIT_VR_LE};
use super::volume::{DicomSource, Mask, Volume};
use super::IoError;
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use std::path::Path;

/// Segmentation Storage SOP class.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// What the segment is and what made it.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    /// SegmentLabel (LO, at most 64 characters).
    pub label: String,
    /// SegmentDescription.
    pub description: String,
    /// SegmentAlgorithmName and AlgorithmName.
    pub algorithm: String,
    /// AlgorithmVersion and SoftwareVersions.
    pub version: String,
}

impl Default for SegmentInfo {
    fn default() -> Self {
        SegmentInfo {
            label: "Hemorrhage".into(),
            description: "Intracranial hemorrhage (automatic)".into(),
            algorithm: "ichcam".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// What [`write_seg`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegWritten {
    /// Frames in the file.
    pub frames: usize,
    /// The `z` of each frame's slice, in frame order.
    pub slices: Vec<usize>,
    /// The mask was empty: the one frame written holds no voxel.
    pub empty: bool,
}

/// The DICOM source of `vol` when a SEG can be written for it, else why not (a NIfTI
/// input, or a DICOM source without the identifiers a SEG must reference).
pub fn seg_source(vol: &Volume) -> Result<&DicomSource, String> {
    let Some(d) = vol.dicom.as_deref() else {
        return Err("the input is not DICOM".into());
    };
    for (name, v) in [
        ("StudyInstanceUID", &d.study_uid),
        ("SeriesInstanceUID", &d.series_uid),
        ("FrameOfReferenceUID", &d.frame_of_reference_uid),
    ] {
        if v.is_empty() {
            return Err(format!("the DICOM source has no {name}"));
        }
    }
    if d.slices.len() != vol.dims().0 {
        return Err(format!(
            "the DICOM source lists {} slices for a volume of {}",
            d.slices.len(),
            vol.dims().0
        ));
    }
    if let Some(z) = d
        .slices
        .iter()
        .position(|s| s.sop_class_uid.is_empty() || s.sop_instance_uid.is_empty())
    {
        return Err(format!(
            "slice {z} of the DICOM source has no SOPClassUID/SOPInstanceUID"
        ));
    }
    Ok(d)
}

fn el(tag: Tag, vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v.into())
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A code sequence of one item.
fn code(tag: Tag, value: &str, scheme: &str, meaning: &str) -> DataElement<InMemDicomObject> {
    seq(
        tag,
        vec![item(vec![
            el(tags::CODE_VALUE, VR::SH, value),
            el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
            el(tags::CODE_MEANING, VR::LO, meaning),
        ])],
    )
}

/// `s` cut to at most `n` characters (a DICOM value length).
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Bit `k` of a BINARY segmentation's pixel data is pixel `k % (rows*cols)` of frame
/// `k / (rows*cols)`, row by row; bit 0 of each byte first. The data is padded to an even
/// length.
pub fn pack_frames(mask: &Mask, slices: &[usize]) -> Vec<u8> {
    let (_, ny, nx) = mask.dim();
    let plane = ny * nx;
    let bits = slices.len() * plane;
    let mut out = vec![0u8; bits.div_ceil(8).next_multiple_of(2)];
    for (f, &z) in slices.iter().enumerate() {
        let m = mask.index_axis(ndarray::Axis(0), z);
        for (i, &v) in m.iter().enumerate() {
            if v != 0 {
                let k = f * plane + i;
                out[k / 8] |= 1 << (k % 8);
            }
        }
    }
    out
}

/// Writes `mask` (0/1 over `vol`'s voxels) as a DICOM Segmentation of `vol`'s source series
/// at `path` (see the module doc). `vol` must come from DICOM ([`seg_source`] says why
/// not otherwise) and `mask` have its dims.
pub fn write_seg(
    path: &Path,
    vol: &Volume,
    mask: &Mask,
    info: &SegmentInfo,
) -> Result<SegWritten, IoError> {
    let src = seg_source(vol).map_err(|r| IoError::invalid(&vol.source, r))?;
    let (nz, ny, nx) = vol.dims();
    if mask.dim() != (nz, ny, nx) {
        return Err(IoError::invalid(
            path,
            format!(
                "mask of {:?} for a volume of {:?} (z, y, x)",
                mask.dim(),
                (nz, ny, nx)
            ),
        ));
    }
    if nx > u16::MAX as usize || ny > u16::MAX as usize {
        return Err(IoError::invalid(
            path,
            format!("slices of {nx}x{ny} are too large for DICOM"),
        ));
    }
    let mut zs: Vec<usize> = (0..nz)
        .filter(|&z| mask.index_axis(ndarray::Axis(0), z).iter().any(|&v| v != 0))
        .collect();
    let empty = zs.is_empty();
    if empty {
        // NumberOfFrames is at least 1: one empty frame says "looked, found nothing".
        zs.push(0);
    }
    let pixels = pack_frames(mask, &zs);
    let s = |v: &str| PrimitiveValue::from(v);
    let dim_uid = new_uid();
    let series_uid = new_uid();
    let sop_uid = new_uid();
    let (date, time) = super::clock::UtcTime::now().dicom_da_tm();
    let step = src.slice_step.abs();
    let thickness = src.slice_thickness.unwrap_or(step);

    let shared = item(vec![
        seq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![item(vec![
                el(tags::PIXEL_SPACING, VR::DS, strs(&src.pixel_spacing)),
                el(tags::SLICE_THICKNESS, VR::DS, strs(&[thickness])),
                el(tags::SPACING_BETWEEN_SLICES, VR::DS, strs(&[step])),
            ])],
        ),
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![item(vec![el(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                strs(&src.orientation),
            )])],
        ),
    ]);
    let per_frame: Vec<InMemDicomObject> = zs
        .iter()
        .map(|&z| {
            let sl = &src.slices[z];
            let mut refd = vec![
                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, s(&sl.sop_class_uid)),
                el(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    s(&sl.sop_instance_uid),
                ),
            ];
            if let Some(f) = sl.frame {
                refd.push(el(tags::REFERENCED_FRAME_NUMBER, VR::IS, s(&f.to_string())));
            }
            // Same rows and columns as the source: the mask lies on its pixels.
            refd.push(el(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, s("YES")));
            refd.push(code(
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                "121322",
                "DCM",
                "Source image for image processing operation",
            ));
            item(vec![
                seq(
                    tags::DERIVATION_IMAGE_SEQUENCE,
                    vec![item(vec![
                        code(
                            tags::DERIVATION_CODE_SEQUENCE,
                            "113076",
                            "DCM",
                            "Segmentation",
                        ),
                        seq(tags::SOURCE_IMAGE_SEQUENCE, vec![item(refd)]),
                    ])],
                ),
                seq(
                    tags::FRAME_CONTENT_SEQUENCE,
                    vec![item(vec![el(
                        tags::DIMENSION_INDEX_VALUES,
                        VR::UL,
                        PrimitiveValue::U32(vec![1, z as u32 + 1].into()),
                    )])],
                ),
                seq(
                    tags::PLANE_POSITION_SEQUENCE,
                    vec![item(vec![el(
                        tags::IMAGE_POSITION_PATIENT,
                        VR::DS,
                        strs(&sl.position),
                    )])],
                ),
                seq(
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    vec![item(vec![el(
                        tags::REFERENCED_SEGMENT_NUMBER,
                        VR::US,
                        PrimitiveValue::from(1u16),
                    )])],
                ),
            ])
        })
        .collect();
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        item(vec![
            el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, s(&dim_uid)),
            el(
                tags::DIMENSION_INDEX_POINTER,
                VR::AT,
                PrimitiveValue::Tags(vec![pointer].into()),
            ),
            el(
                tags::FUNCTIONAL_GROUP_POINTER,
                VR::AT,
                PrimitiveValue::Tags(vec![group].into()),
            ),
            el(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, s(label)),
        ])
    };
    // The source instances, each once, in slice order.
    let mut instances: Vec<(&str, &str)> = Vec::new();
    for sl in &src.slices {
        let k = (sl.sop_class_uid.as_str(), sl.sop_instance_uid.as_str());
        if !instances.contains(&k) {
            instances.push(k);
        }
    }
    let referenced = item(vec![
        seq(
            tags::REFERENCED_INSTANCE_SEQUENCE,
            instances
                .iter()
                .map(|(c, i)| {
                    item(vec![
                        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, s(c)),
                        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, s(i)),
                    ])
                })
                .collect(),
        ),
        el(tags::SERIES_INSTANCE_UID, VR::UI, s(&src.series_uid)),
    ]);
    let segment = item(vec![
        el(tags::SEGMENT_NUMBER, VR::US, PrimitiveValue::from(1u16)),
        el(tags::SEGMENT_LABEL, VR::LO, s(&cut(&info.label, 64))),
        el(tags::SEGMENT_DESCRIPTION, VR::ST, s(&info.description)),
        el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, s("AUTOMATIC")),
        el(
            tags::SEGMENT_ALGORITHM_NAME,
            VR::LO,
            s(&cut(&info.algorithm, 64)),
        ),
        seq(
            tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
            vec![item(vec![
                code(
                    tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
                    "123110",
                    "DCM",
                    "Artificial Intelligence",
                ),
                el(tags::ALGORITHM_NAME, VR::LO, s(&cut(&info.algorithm, 64))),
                el(tags::ALGORITHM_VERSION, VR::LO, s(&cut(&info.version, 64))),
            ])],
        ),
        code(
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            "49755003",
            "SCT",
            "Morphologically Altered Structure",
        ),
        code(
            tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
            "50960005",
            "SCT",
            "Hemorrhage",
        ),
        // Red, in DICOM's scaled CIELab.
        el(
            tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE,
            VR::US,
            PrimitiveValue::U16(vec![34891, 53351, 51486].into()),
        ),
    ]);
    let texts = [
        &src.patient_name,
        &src.patient_id,
        &src.study_id,
        &src.accession_number,
        &src.referring_physician,
    ];
    let mut elements = Vec::new();
    if !texts.iter().all(|t| t.is_ascii()) || !info.label.is_ascii() {
        elements.push(el(tags::SPECIFIC_CHARACTER_SET, VR::CS, s("ISO_IR 192")));
    }
    let us = |v: u16| PrimitiveValue::from(v);
    elements.extend([
        el(
            tags::IMAGE_TYPE,
            VR::CS,
            PrimitiveValue::Strs(vec!["DERIVED".to_string(), "PRIMARY".to_string()].into()),
        ),
        el(tags::SOP_CLASS_UID, VR::UI, s(SEGMENTATION_STORAGE)),
        el(tags::SOP_INSTANCE_UID, VR::UI, s(&sop_uid)),
        el(tags::STUDY_DATE, VR::DA, s(&src.study_date)),
        el(tags::SERIES_DATE, VR::DA, s(&date)),
        el(tags::CONTENT_DATE, VR::DA, s(&date)),
        el(tags::STUDY_TIME, VR::TM, s(&src.study_time)),
        el(tags::SERIES_TIME, VR::TM, s(&time)),
        el(tags::CONTENT_TIME, VR::TM, s(&time)),
        el(tags::ACCESSION_NUMBER, VR::SH, s(&src.accession_number)),
        el(tags::MODALITY, VR::CS, s("SEG")),
        el(tags::MANUFACTURER, VR::LO, s("ichcam")),
        el(
            tags::REFERRING_PHYSICIAN_NAME,
            VR::PN,
            s(&src.referring_physician),
        ),
        el(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            s("ichcam hemorrhage segmentation"),
        ),
        el(
            tags::MANUFACTURER_MODEL_NAME,
            VR::LO,
            s(&cut(&info.algorithm, 64)),
        ),
        seq(tags::REFERENCED_SERIES_SEQUENCE, vec![referenced]),
        el(tags::PATIENT_NAME, VR::PN, s(&src.patient_name)),
        el(tags::PATIENT_ID, VR::LO, s(&src.patient_id)),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, s(&src.patient_birth_date)),
        el(tags::PATIENT_SEX, VR::CS, s(&src.patient_sex)),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, s("none")),
        el(tags::SOFTWARE_VERSIONS, VR::LO, s(&cut(&info.version, 64))),
        el(tags::STUDY_INSTANCE_UID, VR::UI, s(&src.study_uid)),
        el(tags::SERIES_INSTANCE_UID, VR::UI, s(&series_uid)),
        el(tags::STUDY_ID, VR::SH, s(&src.study_id)),
        el(tags::SERIES_NUMBER, VR::IS, s("99")),
        el(tags::INSTANCE_NUMBER, VR::IS, s("1")),
        el(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            s(&src.frame_of_reference_uid),
        ),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, s("")),
        el(tags::SAMPLES_PER_PIXEL, VR::US, us(1)),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, s("MONOCHROME2")),
        el(tags::NUMBER_OF_FRAMES, VR::IS, s(&zs.len().to_string())),
        el(tags::ROWS, VR::US, us(ny as u16)),
        el(tags::COLUMNS, VR::US, us(nx as u16)),
        el(tags::BITS_ALLOCATED, VR::US, us(1)),
        el(tags::BITS_STORED, VR::US, us(1)),
        el(tags::HIGH_BIT, VR::US, us(0)),
        el(tags::PIXEL_REPRESENTATION, VR::US, us(0)),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, s("00")),
        seq(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![item(vec![el(
                tags::DIMENSION_ORGANIZATION_UID,
                VR::UI,
                s(&dim_uid),
            )])],
        ),
        seq(
            tags::DIMENSION_INDEX_SEQUENCE,
            vec![
                dimension(
                    tags::REFERENCED_SEGMENT_NUMBER,
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    "Segment Number",
                ),
                dimension(
                    tags::IMAGE_POSITION_PATIENT,
                    tags::PLANE_POSITION_SEQUENCE,
                    "Image Position Patient",
                ),
            ],
        ),
        el(tags::CONTENT_LABEL, VR::CS, s("HEMORRHAGE")),
        el(
            tags::CONTENT_DESCRIPTION,
            VR::LO,
            s(&cut(&info.description, 64)),
        ),
        el(
            tags::CONTENT_CREATOR_NAME,
            VR::PN,
            s(&cut(&info.algorithm, 64)),
        ),
        el(tags::SEGMENTATION_TYPE, VR::CS, s("BINARY")),
        seq(tags::SEGMENT_SEQUENCE, vec![segment]),
        seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
        seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
        el(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(pixels.into())),
    ]);
    let obj = InMemDicomObject::from_element_iter(elements);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .media_storage_sop_class_uid(SEGMENTATION_STORAGE)
                .media_storage_sop_instance_uid(sop_uid.as_str()),
        )
        .map_err(|e| IoError::invalid(path, format!("cannot build DICOM meta: {e}")))?;
    write_atomic(path, |w| file.write_all(w).map_err(std::io::Error::other))?;
    Ok(SegWritten {
        frames: zs.len(),
        slices: zs,
        empty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_runs_across_frames() {
        // 3x3 planes: 9 bits a frame, so frame 1 starts at bit 1 of byte 1.
        let mut m = Mask::zeros((3, 3, 3));
        m[[0, 0, 0]] = 1;
        m[[2, 0, 0]] = 1;
        m[[2, 2, 2]] = 1;
        let p = pack_frames(&m, &[0, 2]);
        assert_eq!(p.len(), 4); // 18 bits -> 3 bytes -> padded to 4
        assert_eq!(p[0], 1);
        assert_eq!(p[1], 1 << 1); // bit 9: frame 1, pixel 0
        assert_eq!(p[2], 1 << 1); // bit 17: frame 1, pixel 8
        assert_eq!(p[3], 0);
    }
}
