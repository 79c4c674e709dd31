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
