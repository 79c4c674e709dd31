//! From a trained stage-2 net's CAM to a hemorrhage mask: thresholding, k-means pseudo-masks
//! on the subdural window, dilation, 3-D connected components and their filter, and the
//! filters against false positives outside the skull ([`skull`]) and bilateral ones
//! ([`mirror`]).
//!
//! The rules are written once ([`refine::refine_on`]) over the engine's volume ops
//! ([`crate::engine::VolumeOps`]), so they run unchanged on the CPU reference and on the
//! GPU's kernels; the engine knows nothing of these rules. Everything here works on
//! `[z, y, x]` volumes (HU, normalised CAM, 0/1 masks) and knows nothing of the network or of
//! files: the maps come in as arrays or backend volumes (the CAM min-max normalised;
//! [`field`] brings a model-resolution map to the native grid on a backend), the slice
//! decisions come in as booleans.

pub mod ccl;
pub mod choose;
pub mod field;
pub mod mirror;
pub mod refine;
pub mod skull;
pub mod threshold;

pub use crate::engine::cpu::ccl::{connected_components, CclOutput};
pub use crate::engine::{Connectivity, Structuring};
pub use ccl::{drop_thin_components, filter_components, ComponentFilter, FilterOutput, Pruned};
pub use mirror::{drop_mirror_pairs, MirrorFilter};
pub use refine::{
    effective_saturation, refine, refine_authors, refine_on, volume_config, RefineConfig,
    RefineMode, RefineOutput,
};
pub use skull::{drop_outside_skull, SkullFilter};

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
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

pub type Result<T> = std::result::Result<T, SegError>;
