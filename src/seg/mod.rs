//! From a trained stage-2 net's CAM to a hemorrhage mask: thresholding, k-means pseudo-masks
//! on the subdural window, dilation, 3-D connected components and their filter.
//!
//! Everything here works on `[z, y, x]` arrays (HU, normalised CAM, 0/1 masks) and knows
//! nothing of the network or of files: the maps come in as arrays (the CAM min-max
//! normalised; [`field`] brings a model-resolution map to the native grid on a backend),
//! the slice decisions come in as booleans.

pub mod ccl;
pub mod choose;
pub mod field;
pub mod kmeans;
pub mod morph;
pub mod refine;
pub mod threshold;

pub use ccl::{
    connected_components, filter_components, CclOutput, ComponentFilter, Connectivity, FilterOutput,
};
pub use refine::{
    effective_saturation, refine, refine_authors, volume_config, RefineConfig, RefineMode,
    RefineOutput,
};

/// Errors of the segmentation steps: inputs whose shapes do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum SegError {
    #[error("shape mismatch: {what} is {got:?}, expected {expected:?}")]
    Shape {
        what: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("volume too large for 32-bit labels: {0} voxels")]
    TooLarge(usize),
    #[error("invalid parameter: {0}")]
    Param(String),
}

pub type Result<T> = std::result::Result<T, SegError>;
