//! The training stages of the method: stage 1 (ResNet-LSTM on slice sequences, slice
//! labels only), stage 2 (frozen backbone, single-slice fc head) and stage 3 (the U-Net on
//! the refinement's pseudo-masks); optimizers' schedules, augmentation, validation,
//! checkpoints and resume, logs.
//!
//! The entry point is [`train`] (or [`train_with`] on a given backend): cases in (a dataset
//! folder, an opened dataset, or volumes in memory), a model file out, with its resume
//! checkpoint, JSON log and PNG plot beside it. Knows nothing about the CLI.

pub mod auc;
pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod log;
pub mod prep;
pub mod stage1;
pub mod stage2;
pub mod stage3;
pub mod trainer;

pub use augment::{AugmentConfig, Transform};
pub use config::TrainConfig;
pub use log::{EpochRecord, TrainLog};
pub use prep::{TrainCase, TrainInput};
pub use trainer::{train_with, RunPaths, TrainOptions, TrainReport};

use crate::model::ModelError;
use std::path::{Path, PathBuf};

/// Errors of a training run; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    /// Reading or preparing the cases failed.
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    #[error("{}: {detail}", path.display())]
    Checkpoint { path: PathBuf, detail: String },
    #[error("{}: cannot resume: {detail}; pass --fresh to start over (or use another model path)", path.display())]
    ResumeMismatch { path: PathBuf, detail: String },
    #[error("training diverged: {0}")]
    Diverged(String),
}

/// Validation metrics of one epoch (None: no validation set, or one class only for the AUC).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EpochStats {
    pub loss: Option<f64>,
    pub auc: Option<f64>,
    pub accuracy: Option<f64>,
    /// The probability threshold that best separates the validation slices (Youden's J).
    pub threshold: Option<f64>,
}

/// When a CUDA training loop reads a replayed step's loss back
/// ([`crate::model::net_graph::StepLoss`]): after the next step has been enqueued (`Late`,
/// the default: the next batch is prepared and uploaded while the device runs this step),
/// or right after the step (`Immediate`). The losses, their order in the log and the
/// parameters are the same either way; a loss already known (the CPU, an eager step) is
/// counted at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossReadback {
    #[default]
    Late,
    Immediate,
}

impl LossReadback {
    /// Counts step `k`'s `loss` with `f` (after the queued step before it, if any), or
    /// queues it in `queued` (late readback of a queued loss).
    pub(crate) fn account<K: crate::model::net_graph::StepKey>(
        self,
        graphs: &mut crate::model::net_graph::GraphSteps<K>,
        queued: &mut Option<(usize, crate::model::net_graph::StepLoss)>,
        k: usize,
        loss: crate::model::net_graph::StepLoss,
        f: &mut impl FnMut(usize, f64) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        use crate::model::net_graph::StepLoss;
        if let Some((j, p)) = queued.take() {
            f(j, graphs.read(p)?)?;
        }
        match (self, loss) {
            (LossReadback::Late, StepLoss::Queued(_)) => *queued = Some((k, loss)),
            _ => f(k, graphs.read(loss)?)?,
        }
        Ok(())
    }

    /// Counts the step still queued at the end of an epoch.
    pub(crate) fn finish<K: crate::model::net_graph::StepKey>(
        self,
        graphs: &mut crate::model::net_graph::GraphSteps<K>,
        queued: &mut Option<(usize, crate::model::net_graph::StepLoss)>,
        f: &mut impl FnMut(usize, f64) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        match queued.take() {
            Some((j, p)) => f(j, graphs.read(p)?),
            None => Ok(()),
        }
    }
}

/// Trains `cfg` on `device` (resolved once by the caller, [`crate::engine::Device::open`]).
/// See [`train_with`].
pub fn train(
    device: &crate::engine::Device,
    input: TrainInput<'_>,
    out_model: &Path,
    cfg: &TrainConfig,
    opts: &TrainOptions,
) -> Result<TrainReport, TrainError> {
    // The CPU arm's backend is Copy, the CUDA arm's a shared handle: one clone for both.
    #[allow(clippy::clone_on_copy)]
    let r = crate::on_device!(device, be => train_with(be.clone(), input, out_model, cfg, opts));
    r
}
