//! The in-memory volume: HU voxels indexed `[z, y, x]` plus the geometry every output is
//! written back with. `Volume::from_array`, `affine` and `orientation` live in
//! `geometry.rs`, next to the header arithmetic they use.

use ndarray::Array3;
use std::path::PathBuf;

/// A CT volume in Hounsfield units.
#[derive(Clone, Debug)]
pub struct Volume {
    /// Voxels in HU, indexed `[z, y, x]`.
    pub data: Array3<f32>,
    /// Voxel size in mm, in `[z, y, x]` order.
    pub spacing: [f64; 3],
    /// The NIfTI header the volume came with (or was derived from a DICOM series): dims,
    /// pixdim, qform/sform and units are copied from it into every mask or map written
    /// for this volume, so outputs overlay the input exactly.
    pub header: nifti::NiftiHeader,
    /// Where it was read from (a file or a DICOM folder), for messages.
    pub source: PathBuf,
    /// What a DICOM input said about its patient, study, series and slices (what a DICOM
    /// Segmentation of this volume must reference); `None` for a NIfTI input.
    pub dicom: Option<Box<DicomSource>>,
}

/// The identifiers and geometry of a DICOM source, as read (values trimmed of DICOM's
/// padding; an absent attribute is an empty string).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DicomSource {
    pub study_uid: String,
    pub series_uid: String,
    pub frame_of_reference_uid: String,
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_date: String,
    pub study_time: String,
    pub study_id: String,
    pub accession_number: String,
    pub referring_physician: String,
    /// SpecificCharacterSet of the source (how its names were encoded).
    pub charset: String,
    /// One per slice, in the volume's `z` order.
    pub slices: Vec<DicomSlice>,
    /// ImageOrientationPatient (row cosines, then column cosines; LPS).
    pub orientation: [f64; 6],
    /// PixelSpacing: between rows, between columns (mm).
    pub pixel_spacing: [f64; 2],
    /// SliceThickness (mm), when the source gave one.
    pub slice_thickness: Option<f64>,
    /// The step between neighbouring slices along the slice normal (mm).
    pub slice_step: f64,
}

/// The DICOM instance (and frame) a slice of the volume came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DicomSlice {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// The frame number (from 1) in a multi-frame instance; `None` for a single-frame one.
    pub frame: Option<u32>,
    /// ImagePositionPatient (LPS, mm) of the slice's first pixel.
    pub position: [f64; 3],
}

/// A binary mask `[z, y, x]`, 0/1.
pub type Mask = Array3<u8>;

impl Volume {
    /// `(z, y, x)` extents.
    pub fn dims(&self) -> (usize, usize, usize) {
        self.data.dim()
    }
    /// Volume of one voxel in mL.
    pub fn voxel_ml(&self) -> f64 {
        self.spacing.iter().product::<f64>() / 1000.0
    }
}
