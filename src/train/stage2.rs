//! Stage 2: the backbone frozen, the single-slice `fc` head trained on batches of single
//! slices (augmented like stage 1), and its validation pass over every validation slice.
//! This head is what segmentation uses at test time (its weights make the CAM).
//! Knows nothing about files or checkpoints.

use super::prep::{self, AugmentCtx, Prepared};
use super::stage1::to_t;
use super::{EpochStats, TrainError};
use crate::engine::{Backend, Real};
use crate::model::{CamKind, IchNet, OptimizerConfig, ParamGroup};

/// One pass over the training slices; returns the mean batch loss.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch<B: Backend>(
    net: &mut IchNet<B>,
    cases: &[Prepared],
    items: &[(usize, usize)],
    batch: usize,
    size: usize,
    opt: &OptimizerConfig,
    pos_weight: f64,
    aug: AugmentCtx<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<f64, TrainError> {
    let batches = prep::epoch_batches(items.len(), batch, Some((aug.seed, aug.epoch)));
    progress.set_length(batches.len() as u64);
    let mut sum = 0.0;
    for (k, b) in batches.iter().enumerate() {
        let its: Vec<(usize, usize)> = b.iter().map(|&i| items[i]).collect();
        let ids: Vec<u64> = b.iter().map(|&i| i as u64).collect();
        let (x, y) = prep::gather_slices(cases, &its, &ids, size, Some(aug))?;
        net.zero_grads()?;
        let loss = net.stage2_forward_backward(
            &to_t::<B::T>(&x),
            &to_t::<B::T>(&y),
            b.len(),
            size,
            size,
            pos_weight,
        )?;
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "stage-2 loss became {loss} at batch {} (lower the learning rate)",
                k + 1
            )));
        }
        net.step(opt, ParamGroup::Fc)?;
        sum += loss;
        progress.inc(1);
        progress.set_message(format!("loss {:.4}", sum / (k + 1) as f64));
    }
    Ok(if batches.is_empty() {
        f64::NAN
    } else {
        sum / batches.len() as f64
    })
}

/// The fc head's logits on every validation slice, and the metrics.
pub fn validate<B: Backend>(
    net: &mut IchNet<B>,
    cases: &[Prepared],
    val: &[usize],
    batch: usize,
    size: usize,
    pos_weight: f64,
) -> Result<EpochStats, TrainError> {
    let items = prep::slices(cases, val);
    let mut scores = vec![0f64; items.len()];
    for b in prep::epoch_batches(items.len(), batch, None) {
        let its: Vec<(usize, usize)> = b.iter().map(|&i| items[i]).collect();
        let ids: Vec<u64> = b.iter().map(|&i| i as u64).collect();
        let (x, _) = prep::gather_slices(cases, &its, &ids, size, None)?;
        let out = net.stage2_infer(&to_t::<B::T>(&x), b.len(), size, size, CamKind::Vanilla)?;
        for (j, &i) in b.iter().enumerate() {
            scores[i] = out.logits[j].as_f64();
        }
    }
    let labels: Vec<bool> = items.iter().map(|&(c, z)| cases[c].labels[z]).collect();
    Ok(EpochStats::from_scores(&scores, &labels, pos_weight))
}
