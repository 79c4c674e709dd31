//! Stage 1: the ResNet-LSTM on slice sequences. One training epoch (shuffled sliding-window
//! sequences, augmented, BCE with the training slices' pos_weight, an optimizer step per
//! batch over the backbone + LSTM + head) and the validation pass (eval mode, the sliding
//! windows' per-slice logits averaged back onto each volume's slices). On CUDA every step
//! of a repeating batch shape is replayed from a captured graph
//! ([`IchNet::stage1_step_queued`]); the first step of a shape and a partial last batch run
//! eagerly. A replayed step's loss is read after the next step is enqueued
//! ([`super::LossReadback`]; the same losses in the same order as an immediate read).
//! Knows nothing about files or checkpoints.

use super::auc;
use super::prep::{self, AugmentCtx, Prepared, SeqItem};
use super::{EpochStats, LossReadback, TrainError};
use crate::data::sequence::merge_scores;
use crate::engine::cuda::CudaBackend;
use crate::engine::{Backend, Real};
use crate::model::net_graph::{GraphSteps, StepLoss};
use crate::model::{IchNet, OptimizerConfig, ParamGroup};
use std::any::Any;

/// One pass over the training sequences; returns the mean batch loss.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch<B: Backend + 'static>(
    net: &mut IchNet<B>,
    cases: &[Prepared],
    items: &[SeqItem],
    batch: usize,
    size: usize,
    opt: &OptimizerConfig,
    pos_weight: f64,
    aug: AugmentCtx<'_>,
    readback: LossReadback,
    progress: &indicatif::ProgressBar,
) -> Result<f64, TrainError> {
    let batches = prep::epoch_batches(items.len(), batch, Some((aug.seed, aug.epoch)));
    let seq = items.first().map(|i| i.win.len()).unwrap_or(0);
    progress.set_length(batches.len() as u64);
    let mut sum = 0.0;
    let mut graphs = GraphSteps::default();
    let mut account = |j: usize, loss: f64| -> Result<(), TrainError> {
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "stage-1 loss became {loss} at batch {} (lower the learning rate)",
                j + 1
            )));
        }
        sum += loss;
        progress.inc(1);
        progress.set_message(format!("loss {:.4}", sum / (j + 1) as f64));
        Ok(())
    };
    // On CUDA (late readback) step k's loss is read after step k+1 is enqueued.
    let mut queued: Option<(usize, StepLoss)> = None;
    for (k, b) in batches.iter().enumerate() {
        let refs: Vec<&SeqItem> = b.iter().map(|&i| &items[i]).collect();
        let ids: Vec<u64> = b.iter().map(|&i| i as u64).collect();
        let (x, y) = prep::gather_sequences(cases, &refs, &ids, size, Some(aug))?;
        let loss = if let Some(cuda) = (net as &mut dyn Any).downcast_mut::<IchNet<CudaBackend>>() {
            // Gradients zeroed, forward, backward and the optimizer step, as below.
            cuda.stage1_step_queued(
                &mut graphs,
                &x,
                &y,
                b.len(),
                seq,
                size,
                size,
                pos_weight,
                opt,
            )?
        } else {
            let x = to_t::<B::T>(&x);
            let y = to_t::<B::T>(&y);
            net.zero_grads()?;
            let s = net.stage1_forward_backward(&x, &y, b.len(), seq, size, size, pos_weight)?;
            if s.loss.is_finite() {
                net.step(opt, ParamGroup::Stage1)?;
            }
            StepLoss::Ready(s.loss)
        };
        readback.account(&mut graphs, &mut queued, k, loss, &mut account)?;
    }
    readback.finish(&mut graphs, &mut queued, &mut account)?;
    Ok(if batches.is_empty() {
        f64::NAN
    } else {
        sum / batches.len() as f64
    })
}

/// Per-slice logits of the validation cases (eval mode, no augmentation), merged from the
/// overlapping windows; the metrics over all their slices.
#[allow(clippy::too_many_arguments)]
pub fn validate<B: Backend>(
    net: &mut IchNet<B>,
    cases: &[Prepared],
    val: &[usize],
    slices: usize,
    stride: usize,
    batch: usize,
    size: usize,
    pos_weight: f64,
) -> Result<EpochStats, TrainError> {
    let items = prep::sequences(cases, val, slices, stride)?;
    let mut preds: Vec<Vec<f32>> = vec![Vec::new(); items.len()];
    // Fixed-size batches (topped up with repeats) so the model keeps one plan.
    for b in prep::epoch_batches(items.len(), batch, None) {
        let refs: Vec<&SeqItem> = b.iter().map(|&i| &items[i]).collect();
        let ids: Vec<u64> = b.iter().map(|&i| i as u64).collect();
        let (x, _) = prep::gather_sequences(cases, &refs, &ids, size, None)?;
        let logits = net.stage1_logits(&to_t::<B::T>(&x), b.len(), slices, size, size)?;
        for (j, &i) in b.iter().enumerate() {
            if preds[i].is_empty() {
                preds[i] = logits[j * slices..(j + 1) * slices]
                    .iter()
                    .map(|v| v.as_f64() as f32)
                    .collect();
            }
        }
    }
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for &c in val {
        let (wins, p): (Vec<_>, Vec<_>) = items
            .iter()
            .zip(&preds)
            .filter(|(it, _)| it.case == c)
            .map(|(it, p)| (it.win.clone(), p.clone()))
            .unzip();
        let (merged, _) =
            merge_scores(cases[c].depth, &wins, &p).map_err(|e| TrainError::Data(e.to_string()))?;
        scores.extend(merged.iter().map(|&v| v as f64));
        labels.extend_from_slice(&cases[c].labels);
    }
    Ok(EpochStats::from_scores(&scores, &labels, pos_weight))
}

impl EpochStats {
    pub(crate) fn from_scores(logits: &[f64], labels: &[bool], pos_weight: f64) -> Self {
        EpochStats {
            loss: auc::bce_with_logits(logits, labels, pos_weight),
            auc: auc::roc_auc(logits, labels),
            accuracy: auc::accuracy_from_logits(logits, labels),
            threshold: auc::youden_threshold(logits, labels),
        }
    }
}

pub(crate) fn to_t<T: Real>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64_lossy(x as f64)).collect()
}
