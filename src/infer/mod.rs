//! Test-time segmentation of whole volumes with a trained model: the stage-2 net's CAM on
//! every slice (and the stage-3 U-Net's map when the model has one), brought to the native
//! grid and refined into a mask ([`crate::seg`]); the outputs written with the input's
//! geometry; and a pipelined batch over archives (decode and
//! write on CPU threads while the backend computes, bounded queues so memory stays flat).
//!
//! This is the one place that joins the model, the refinement and the files; it knows no
//! op and no kernel (the backend does that) and no training.

pub mod batch;
pub mod inputs;
pub mod memory;
pub mod outputs;
pub mod segmenter;
pub mod slabs;

pub use batch::{segment_all, segment_all_with, BatchReport};
pub use inputs::{expand_inputs, expand_inputs_with, ExpandOptions, Expanded, InputItem};
pub use outputs::{write_outputs, write_outputs_with, OutputOptions, VolumeSummary};
pub use segmenter::{
    Fuse, ModelPass, Oracle, RefineOnBackend, SegmentOptions, Segmentation, Segmenter,
    SliceClassifier,
};
pub use slabs::segment_volume;

/// Everything that can go wrong segmenting a volume.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Seg(#[from] crate::seg::SegError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("{}: {detail}", path.display())]
    ModelMetadata {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("{0}")]
    Input(String),
}
