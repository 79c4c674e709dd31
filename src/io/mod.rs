//! Volumes in and out: NIfTI (`.nii`, `.nii.gz`), DICOM series, PNG overlays.
//! Converts the nifti crate's column-major `(x, y, z)` to `[z, y, x]` here and nowhere else.
//! Nothing here knows about the network.

pub mod volume;

pub use volume::{Mask, Volume};
