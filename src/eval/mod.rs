//! Metrics (Dice, IoU, precision, recall, HD95, relative volume difference, per-slice Dice)
//! and reports. `metrics` and `report` know masks and spacings, nothing of the network or of
//! files; `dirs` matches and reads the mask files (through `io`).

pub mod dirs;
pub mod metrics;
pub mod report;

pub use metrics::{hd95, volume_metrics, VolumeMetrics};
pub use report::{
    build_report, summarize, CamPointing, Report, SliceScores, Summary, VolumeReport,
};

/// Errors of the metrics: masks that cannot be compared.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("shape mismatch: prediction is {pred:?} (z, y, x), truth is {truth:?}")]
    Shape { pred: [usize; 3], truth: [usize; 3] },
    #[error("invalid voxel spacing {0:?} mm (must be finite and > 0)")]
    Spacing([f64; 3]),
}

pub type Result<T> = std::result::Result<T, EvalError>;
