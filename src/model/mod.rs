//! The ResNet-LSTM topology over any [`crate::engine::Backend`]: torchvision's ResNet
//! (basic and bottleneck blocks), the stage-1 net (ResNet -> GAP -> LSTM -> 128-64-1 head per
//! slice), the stage-2 net (ResNet -> GAP -> fc), the stage-3 U-Net ([`unet`]), parameters
//! with PyTorch's names, safetensors checkpoints and the model file's own metadata
//! ([`meta`]). Nothing here knows about CT or files other than checkpoints.

pub mod checkpoint;
pub mod config;
pub mod eval_plan;
pub mod grad_plan;
pub mod memory;
pub mod meta;
pub mod net;
pub mod net_graph;
pub mod optim;
pub mod params;
pub mod parity;
mod resnet;
pub mod unet;

pub use config::{BlockKind, ModelConfig};
pub use meta::{HeadPooling, ModelMeta, Provenance};
pub use net::{
    CamChunking, CamKind, CamPassBufs, FeatureMaps, IchNet, OptState, Stage1Step, Stage2DeviceOut,
    Stage2Out, CAM_PASS_BUDGET,
};
pub use optim::OptimizerConfig;
pub use params::{Group, ParamGroup, ParamKind};

use crate::engine::EngineError;
use std::fmt;
use std::path::PathBuf;

/// A tensor whose shape differs between the model and a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Everything that keeps a file's tensors from fitting the model, all of it at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MismatchReport {
    /// In the model, not in the file: (name, expected shape).
    pub missing: Vec<(String, Vec<usize>)>,
    /// In the file, not in the model: (name, shape in the file).
    pub unexpected: Vec<(String, Vec<usize>)>,
    pub mismatched: Vec<ShapeMismatch>,
}

impl MismatchReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut line = |f: &mut fmt::Formatter<'_>, s: String| -> fmt::Result {
            if !first {
                writeln!(f)?;
            }
            first = false;
            write!(f, "  {s}")
        };
        for m in &self.mismatched {
            line(
                f,
                format!(
                    "shape mismatch: {} expected {:?}, found {:?}",
                    m.name, m.expected, m.found
                ),
            )?;
        }
        for (n, s) in &self.missing {
            line(f, format!("missing: {n} (expected shape {s:?})"))?;
        }
        for (n, s) in &self.unexpected {
            line(f, format!("unexpected: {n} (shape {s:?})"))?;
        }
        Ok(())
    }
}

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("no parameter named `{0}`")]
    UnknownParam(String),
    #[error("`{name}` has no gradient (it is a running statistic)")]
    NoGradient { name: String },
    #[error("`{name}` has shape {shape:?} ({} values), got {found} values", shape.iter().product::<usize>())]
    ParamLen {
        name: String,
        shape: Vec<usize>,
        found: usize,
    },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("{}: {detail}", path.display())]
    Checkpoint { path: PathBuf, detail: String },
    #[error("{}: the tensors do not fit the model:\n{report}", path.display())]
    Mismatch {
        path: PathBuf,
        report: MismatchReport,
    },
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    /// Buffers made for one shape or activation storage used with another (the storage is
    /// fixed when a model's buffers are made).
    #[error("buffers do not match: {0}")]
    BuffersMismatch(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ModelError {
    pub(crate) fn checkpoint(path: &std::path::Path, detail: impl Into<String>) -> Self {
        ModelError::Checkpoint {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}
