//! Stage 2: the backbone frozen, the single-slice `fc` head trained on batches of single
//! slices (augmented like stage 1), and its validation pass over every validation slice.
//! This head is what segmentation uses at test time (its weights make the CAM). On CUDA the
//! steps replay a captured graph and their losses are read a step late, as in stage 1.
//! Knows nothing about files or checkpoints.

use super::config::HeadPooling;
use super::prep::{self, AugmentCtx, Prepared};
use super::stage1::to_t;
use super::{EpochStats, LossReadback, TrainError};
use crate::engine::cuda::CudaBackend;
use crate::engine::{Backend, Real};
use crate::model::net_graph::{GraphSteps, StepLoss};
use crate::model::{CamKind, IchNet, OptimizerConfig, ParamGroup};
use std::any::Any;

/// One pass over the training slices; returns the mean batch loss.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch<B: Backend + 'static>(
    net: &mut IchNet<B>,
    cases: &[Prepared],
    items: &[(usize, usize)],
    batch: usize,
    size: usize,
    opt: &OptimizerConfig,
    pos_weight: f64,
    aug: AugmentCtx<'_>,
    readback: LossReadback,
    progress: &indicatif::ProgressBar,
) -> Result<f64, TrainError> {
    let batches = prep::epoch_batches(items.len(), batch, Some((aug.seed, aug.epoch)));
    progress.set_length(batches.len() as u64);
    let mut sum = 0.0;
    let mut graphs = GraphSteps::default();
    let mut account = |j: usize, loss: f64| -> Result<(), TrainError> {
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "stage-2 loss became {loss} at batch {} (lower the learning rate)",
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
        let its: Vec<(usize, usize)> = b.iter().map(|&i| items[i]).collect();
        let ids: Vec<u64> = b.iter().map(|&i| i as u64).collect();
        let (x, y) = prep::gather_slices(cases, &its, &ids, size, Some(aug))?;
        let loss = if let Some(cuda) = (net as &mut dyn Any).downcast_mut::<IchNet<CudaBackend>>() {
            // On CUDA the whole step, optimizer included, replayed from a captured graph
            // when the batch shape repeats ([`IchNet::stage2_step_queued`]).
            cuda.stage2_step_queued(&mut graphs, &x, &y, b.len(), size, size, pos_weight, opt)?
        } else {
            net.zero_grads()?;
            let loss = net.stage2_forward_backward(
                &to_t::<B::T>(&x),
                &to_t::<B::T>(&y),
                b.len(),
                size,
                size,
                pos_weight,
            )?;
            if loss.is_finite() {
                net.step(opt, ParamGroup::Fc)?;
            }
            StepLoss::Ready(loss)
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
        let logits = net.stage2_logits(&to_t::<B::T>(&x), b.len(), size, size)?;
        for (j, &i) in b.iter().enumerate() {
            scores[i] = logits[j];
        }
    }
    let labels: Vec<bool> = items.iter().map(|&(c, z)| cases[c].labels[z]).collect();
    Ok(EpochStats::from_scores(&scores, &labels, pos_weight))
}

/// The stage-2 head trained on the host when its class map is pooled otherwise than by the
/// mean ([`HeadPooling::TopK`]): the backbone is frozen, so only the fc weights and bias
/// learn, from the features the backend computes. Adam (the optimizer's learning rate,
/// PyTorch's betas); written back into the network's `fc` after every epoch.
#[derive(Clone, Debug)]
pub struct HostHead {
    pub w: Vec<f64>,
    pub b: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    mb: f64,
    vb: f64,
    t: u64,
}

impl HostHead {
    /// Starts from the network's current `fc` weights.
    pub fn from_net<B: Backend>(net: &IchNet<B>) -> Result<Self, TrainError> {
        let w: Vec<f64> = net
            .param("fc.weight")?
            .into_iter()
            .map(|v| v.as_f64())
            .collect();
        let b = net
            .param("fc.bias")?
            .first()
            .map(|v| v.as_f64())
            .unwrap_or(0.0);
        let c = w.len();
        Ok(HostHead {
            w,
            b,
            m: vec![0.0; c],
            v: vec![0.0; c],
            mb: 0.0,
            vb: 0.0,
            t: 0,
        })
    }

    /// Writes the weights into the network's `fc`.
    pub fn write<B: Backend>(&self, net: &mut IchNet<B>) -> Result<(), TrainError> {
        let w: Vec<B::T> = self.w.iter().map(|&v| B::T::from_f64_lossy(v)).collect();
        net.set_param("fc.weight", &w)?;
        net.set_param("fc.bias", &[B::T::from_f64_lossy(self.b)])?;
        Ok(())
    }

    fn adam(&mut self, gw: &[f64], gb: f64, lr: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (((w, m), v), &g) in self.w.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(gw) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
        self.mb = b1 * self.mb + (1.0 - b1) * gb;
        self.vb = b2 * self.vb + (1.0 - b2) * gb * gb;
        self.b -= lr * (self.mb / c1) / ((self.vb / c2).sqrt() + eps);
    }
}

/// Class maps `[n, hw]` of the head over features `[n, c, hw]`.
fn class_maps(f: &crate::model::FeatureMaps, w: &[f64]) -> Vec<f32> {
    let hw = f.h * f.w;
    let n = f.data.len() / (f.c * hw).max(1);
    let mut out = vec![0f32; n * hw];
    for i in 0..n {
        for (c, &wc) in w.iter().enumerate() {
            let src = &f.data[(i * f.c + c) * hw..(i * f.c + c + 1) * hw];
            for (o, &v) in out[i * hw..(i + 1) * hw].iter_mut().zip(src) {
                *o += (wc * v) as f32;
            }
        }
    }
    out
}

/// One stage-2 epoch with a pooled class map ([`HostHead`]); returns the mean batch loss.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch_pooled<B: Backend>(
    net: &mut IchNet<B>,
    head: &mut HostHead,
    pooling: HeadPooling,
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
        let f = net.stage2_features(&to_t::<B::T>(&x), b.len(), size, size)?;
        let hw = f.h * f.w;
        let maps = class_maps(&f, &head.w);
        let n = b.len();
        let mut gw = vec![0f64; head.w.len()];
        let mut gb = 0.0;
        let mut loss = 0.0;
        for i in 0..n {
            let (p, idx) = pooling.pool(&maps[i * hw..(i + 1) * hw]);
            let z = p + head.b;
            let yi = y[i] as f64;
            let sp_neg = (-z).max(0.0) + (-z.abs()).exp().ln_1p(); // -log sigmoid(z)
            let sp_pos = z.max(0.0) + (-z.abs()).exp().ln_1p(); // -log(1 - sigmoid(z))
            loss += pos_weight * yi * sp_neg + (1.0 - yi) * sp_pos;
            let s = 1.0 / (1.0 + (-z).exp());
            let dz = ((1.0 - yi) * s - pos_weight * yi * (1.0 - s)) / n as f64;
            gb += dz;
            let kk = idx.len().max(1) as f64;
            for (c, g) in gw.iter_mut().enumerate() {
                let src = &f.data[(i * f.c + c) * hw..(i * f.c + c + 1) * hw];
                let m: f64 = idx.iter().map(|&q| src[q]).sum::<f64>() / kk;
                *g += dz * m;
            }
        }
        let loss = loss / n as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "stage-2 loss became {loss} at batch {} (lower the learning rate)",
                k + 1
            )));
        }
        head.adam(&gw, gb, opt.lr());
        sum += loss;
        progress.inc(1);
        progress.set_message(format!("loss {:.4}", sum / (k + 1) as f64));
    }
    head.write(net)?;
    Ok(if batches.is_empty() {
        f64::NAN
    } else {
        sum / batches.len() as f64
    })
}

/// [`validate`] for a pooled head: the logit of a slice is the pooled class map plus the bias.
pub fn validate_pooled<B: Backend>(
    net: &mut IchNet<B>,
    pooling: HeadPooling,
    cases: &[Prepared],
    val: &[usize],
    batch: usize,
    size: usize,
    pos_weight: f64,
) -> Result<EpochStats, TrainError> {
    let items = prep::slices(cases, val);
    let bias = net
        .param("fc.bias")?
        .first()
        .map(|v| v.as_f64())
        .unwrap_or(0.0);
    let mut scores = vec![0f64; items.len()];
    for b in prep::epoch_batches(items.len(), batch, None) {
        let its: Vec<(usize, usize)> = b.iter().map(|&i| items[i]).collect();
        let ids: Vec<u64> = b.iter().map(|&i| i as u64).collect();
        let (x, _) = prep::gather_slices(cases, &its, &ids, size, None)?;
        let (_, cam, (fh, fw)) =
            net.stage2_cam(&to_t::<B::T>(&x), b.len(), size, size, CamKind::Vanilla)?;
        let hw = fh * fw;
        for (j, &i) in b.iter().enumerate() {
            let m: Vec<f32> = cam[j * hw..(j + 1) * hw]
                .iter()
                .map(|&v| v as f32)
                .collect();
            scores[i] = pooling.pool(&m).0 + bias;
        }
    }
    let labels: Vec<bool> = items.iter().map(|&(c, z)| cases[c].labels[z]).collect();
    Ok(EpochStats::from_scores(&scores, &labels, pos_weight))
}
