//! What the integration tests (and, by path, the benches) share: [`rng`] (the one seeded
//! generator of tests and benches), [`files`] (seed files, the binary under an address-space
//! limit, output checks: the hostile-input tests and the fuzz harness), [`shapes`] (op shapes),
//! [`nhwc`] (the channels-last eval forward's cases and CPU reference),
//! [`cuda`] (the harness of the CUDA test binaries: device tests ignored at run time
//! without a device), [`enhanced`] (a multi-frame DICOM writer), [`train`] (phantom training
//! cases), [`nifti2`] (NIfTI-2 files written by hand), [`pair`] (NIfTI-1 `.hdr`/`.img` pairs
//! split by hand from a `.nii`) and [`archive`] (a DICOM folder holding several series).
#![allow(dead_code)]

pub mod archive;
pub mod cuda;
pub mod enhanced;
pub mod files;
pub mod nhwc;
pub mod nifti2;
pub mod pair;
pub mod rng;
pub mod shapes;
pub mod train;
