//! Stage 3: the U-Net on pseudo-masks. After stage 2, every training and validation volume
//! is segmented the way `ichcam segment` would (the stage-2 CAM brought to the native grid,
//! [`crate::seg::refine()`] with the config's rules) on the slices [`PseudoFlags`] picks: the
//! volume's own slice labels, or the stage-2 head's flags. Each refined mask is cut to the
//! model's input box and resized to its input size (a soft target: the mask's fraction of
//! each input pixel). The U-Net then learns on those slices plus a share of negative slices
//! with empty masks (drawn anew each epoch), on the model's own input planes, augmented
//! (the same geometry on the input and the target); its loss on the validation patients'
//! pseudo-masks picks the best epoch. Only slice labels and images are read: never a mask.
//! On CUDA every training step of a repeating batch shape is replayed from a captured graph
//! ([`UNet::train_step_queued`]); the first step of a shape and a partial last batch run
//! eagerly, and a replayed step's loss is read after the next step is enqueued
//! ([`super::LossReadback`]; the same losses in the same order as an immediate read).
//! Knows nothing about files beyond reading the training volumes again, or the CLI.

use super::augment::{mix_seed, AugmentConfig, Rng, Transform};
use super::config::{PseudoFlags, UNetTrainConfig};
use super::prep::{self, Native, Prepared};
use super::stage1::to_t;
use super::{LossReadback, TrainError};
use crate::data::crop;
use crate::data::resample::{resize_volume, ResizeMode};
use crate::engine::cpu::CpuBackend;
use crate::engine::cuda::CudaBackend;
use crate::engine::{Backend, Real};
use crate::model::net_graph::StepLoss;
use crate::model::unet::graph::UNetSteps;
use crate::model::unet::UNet;
use crate::model::{CamKind, IchNet};
use ndarray::{Array3, Axis};
use std::any::Any;

/// What a slice is to stage 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Flagged, with a non-empty pseudo-mask: a positive example.
    Positive,
    /// Neither labelled nor flagged (or flagged without any pseudo-mask while labelled
    /// negative): an empty mask.
    Negative,
    /// Labelled positive but without a pseudo-mask (or not flagged): where the blood is,
    /// nothing says; not used.
    Skip,
}

/// The pseudo-masks of some cases.
#[derive(Clone, Debug, Default)]
pub struct Pseudo {
    /// Per case (all cases; empty for those not computed), per slice: the soft target
    /// `[size, size]` of a positive slice.
    pub targets: Vec<Vec<Option<Vec<f32>>>>,
    pub roles: Vec<Vec<Role>>,
}

impl Pseudo {
    /// `(case, z)` of every slice of `which` with this role.
    pub fn items(&self, which: &[usize], role: Role) -> Vec<(usize, usize)> {
        which
            .iter()
            .flat_map(|&c| {
                self.roles[c]
                    .iter()
                    .enumerate()
                    .filter(move |(_, &r)| r == role)
                    .map(move |(z, _)| (c, z))
            })
            .collect()
    }
}

/// Counts for the log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PseudoStats {
    pub positive: usize,
    pub negative: usize,
    pub skipped: usize,
}

/// A native mask `[d, h, w]` as the model sees its input: cut to the box `b` (`side` 0:
/// the whole field) and resized to `size` (area averaging when shrinking, bilinear when
/// enlarging, as [`crate::data::InputSpec::prepare_in`]).
pub fn target_in_box(mask: &crate::io::Mask, b: crop::CropBox, size: usize) -> Array3<f32> {
    let m = mask.mapv(|v| f32::from(u8::from(v != 0)));
    let boxed = if b.side == 0 {
        m
    } else {
        crop::extract(m.view(), b, 0.0)
    };
    let (_, ih, iw) = boxed.dim();
    let mode = if ih >= size && iw >= size {
        ResizeMode::Area
    } else {
        ResizeMode::Bilinear
    };
    resize_volume(boxed.view(), size, size, mode)
}

/// The pseudo-masks of cases `which` (see the module doc). `threshold` is the stage-2
/// head's slice threshold (for [`PseudoFlags::Stage2`]).
#[allow(clippy::too_many_arguments)]
pub fn pseudo_masks<B: Backend>(
    net: &mut IchNet<B>,
    cases: &[Prepared],
    which: &[usize],
    native: &Native<'_>,
    ucfg: &UNetTrainConfig,
    size: usize,
    batch: usize,
    threshold: f64,
    progress: &indicatif::ProgressBar,
) -> Result<(Pseudo, PseudoStats), TrainError> {
    let mut p = Pseudo {
        targets: vec![Vec::new(); cases.len()],
        roles: vec![Vec::new(); cases.len()],
    };
    let mut stats = PseudoStats::default();
    progress.set_length(which.len() as u64);
    net.set_train(false);
    let host = CpuBackend::<f32>::new();
    for &c in which {
        let case = &cases[c];
        let d = case.depth;
        let plane = case.channels * size * size;
        let mut logits = Vec::with_capacity(d);
        let mut cam_small: Vec<f32> = Vec::with_capacity(d);
        let mut fhw = (0, 0);
        for z0 in (0..d).step_by(batch.max(1)) {
            let n = batch.max(1).min(d - z0);
            let x = to_t::<B::T>(&case.x[z0 * plane..(z0 + n) * plane]);
            let (l, cam, hw) = net.stage2_cam(&x, n, size, size, CamKind::Vanilla)?;
            logits.extend(l);
            cam_small.extend(cam.iter().map(|&v| v as f32));
            fhw = hw;
        }
        let flags: Vec<bool> = match ucfg.flags {
            PseudoFlags::Labels => case.labels.clone(),
            PseudoFlags::Stage2 => logits
                .iter()
                .map(|&l| 1.0 / (1.0 + (-l).exp()) >= threshold)
                .collect(),
        };
        let mut targets: Vec<Option<Vec<f32>>> = vec![None; d];
        if flags.iter().any(|&f| f) {
            let (hu, spacing) = native.volume(c)?;
            let (_, h, w) = hu.dim();
            let cam =
                crate::seg::field::to_field(&host, &cam_small, d, fhw, case.crop, (h, w), true)
                    .map_err(|e| TrainError::Data(format!("case {}: {e}", case.id)))?;
            let rcfg = crate::seg::volume_config(
                &ucfg.refine,
                ucfg.min_component_ml,
                ucfg.adapt_saturation,
                &hu,
                spacing,
            );
            let out = crate::seg::refine(&hu, &cam, &flags, &rcfg)
                .map_err(|e| TrainError::Data(format!("case {}: {e}", case.id)))?;
            drop((hu, cam));
            let t = target_in_box(&out.mask, case.crop, size);
            for (z, tz) in t.axis_iter(Axis(0)).enumerate() {
                if flags[z] && tz.iter().any(|&v| v > 0.0) {
                    targets[z] = Some(tz.iter().copied().collect());
                }
            }
        }
        let roles: Vec<Role> = (0..d)
            .map(|z| {
                if targets[z].is_some() {
                    Role::Positive
                } else if !case.labels[z] {
                    Role::Negative
                } else {
                    Role::Skip
                }
            })
            .collect();
        for r in &roles {
            match r {
                Role::Positive => stats.positive += 1,
                Role::Negative => stats.negative += 1,
                Role::Skip => stats.skipped += 1,
            }
        }
        p.targets[c] = targets;
        p.roles[c] = roles;
        progress.inc(1);
    }
    Ok((p, stats))
}

/// The slices of one epoch: every positive of `which` (drawn again, in shuffled rounds,
/// until the positives and their negatives reach `slices_per_epoch`), and
/// `negatives_per_positive` times as many negatives drawn (without replacement), all from
/// (seed, epoch).
pub fn epoch_items(
    pseudo: &Pseudo,
    which: &[usize],
    ucfg: &UNetTrainConfig,
    seed: u64,
    epoch: u64,
) -> Vec<(usize, usize)> {
    let pos = pseudo.items(which, Role::Positive);
    let mut neg = pseudo.items(which, Role::Negative);
    let mut rng = Rng::new(mix_seed(seed, &[0x0057_A6E3, epoch]));
    let ratio = ucfg.negatives_per_positive;
    let want = (ucfg.slices_per_epoch as f64 / (1.0 + ratio)).ceil() as usize;
    let mut items = pos.clone();
    if !pos.is_empty() {
        while items.len() < want {
            let mut round = pos.clone();
            rng.shuffle(&mut round);
            let n = (want - items.len()).min(round.len());
            items.extend(round.into_iter().take(n));
        }
    }
    let k = ((ratio * items.len() as f64).round() as usize).min(neg.len());
    rng.shuffle(&mut neg);
    items.extend(neg.into_iter().take(k));
    items
}

/// Gathers slices into the U-Net's input `[n, channels, size, size]` and targets
/// `[n, 1, size, size]`, each augmented when `aug` (one transform per slice, seeded by the
/// slice's index in the epoch; the target gets the same geometry, no intensity change).
pub fn gather(
    cases: &[Prepared],
    pseudo: &Pseudo,
    items: &[(usize, usize)],
    ids: &[u64],
    size: usize,
    aug: Option<(&AugmentConfig, u64, u64)>,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    use rayon::prelude::*;
    let ch = cases.first().map(|c| c.channels).unwrap_or(1);
    let plane = ch * size * size;
    let hw = size * size;
    let mut x = vec![0f32; items.len() * plane];
    let mut t = vec![0f32; items.len() * hw];
    x.par_chunks_mut(plane.max(1))
        .zip(t.par_chunks_mut(hw.max(1)))
        .zip(items.par_iter().zip(ids.par_iter()))
        .try_for_each(|((xb, tb), (&(c, z), &id))| -> Result<(), TrainError> {
            xb.copy_from_slice(cases[c].slice(z, size));
            if let Some(m) = &pseudo.targets[c][z] {
                tb.copy_from_slice(m);
            }
            if let Some((cfg, seed, epoch)) = aug {
                let tr = Transform::for_sequence(cfg, seed, epoch, id, size, size);
                tr.apply(xb, ch, size, size)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                let geometric = Transform {
                    intensity: 1.0,
                    ..tr
                };
                geometric
                    .apply(tb, 1, size, size)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                for v in tb.iter_mut() {
                    *v = v.clamp(0.0, 1.0);
                }
            }
            Ok(())
        })?;
    Ok((x, t))
}

/// The epochs' augmentation stream of stage 3 (apart from stages 1 and 2).
pub fn epoch_stream(epoch: usize) -> u64 {
    (3u64 << 32) + epoch as u64
}

/// One training epoch; returns the mean batch loss. On CUDA the steps run as a captured
/// graph and `readback` says when their losses are read (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn train_epoch<B: Backend + 'static>(
    unet: &mut UNet<B>,
    cases: &[Prepared],
    pseudo: &Pseudo,
    train: &[usize],
    ucfg: &UNetTrainConfig,
    augment: &AugmentConfig,
    size: usize,
    seed: u64,
    epoch: usize,
    readback: LossReadback,
    progress: &indicatif::ProgressBar,
) -> Result<f64, TrainError> {
    let stream = epoch_stream(epoch);
    let items = epoch_items(pseudo, train, ucfg, seed, stream);
    let batches = prep::epoch_batches(items.len(), ucfg.batch, Some((seed, stream)));
    progress.set_length(batches.len() as u64);
    let aug = if ucfg.augment && augment.enabled {
        Some((augment, seed, stream))
    } else {
        None
    };
    let mut sum = 0.0;
    let mut graphs = UNetSteps::default();
    let mut account = |j: usize, loss: f64| -> Result<(), TrainError> {
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!(
                "stage-3 loss became {loss} at batch {} (lower the learning rate)",
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
        let (x, t) = gather(cases, pseudo, &its, &ids, size, aug)?;
        let loss = if let Some(cuda) = (unet as &mut dyn Any).downcast_mut::<UNet<CudaBackend>>() {
            // The training pass and the optimizer step, as below.
            cuda.train_step_queued(&mut graphs, &x, &t, b.len(), size, size, &ucfg.optimizer)?
        } else {
            let l =
                unet.forward_backward(&to_t::<B::T>(&x), &to_t::<B::T>(&t), b.len(), size, size)?;
            if l.loss.is_finite() {
                unet.step(&ucfg.optimizer)?;
            }
            StepLoss::Ready(l.loss)
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

/// The loss on every usable validation slice (positives and negatives), pooled: one soft
/// Dice over all of them (plus `bce_weight` times the mean BCE), as training computes it on
/// a batch. `None` when the validation set has no usable slice.
pub fn validate<B: Backend>(
    unet: &mut UNet<B>,
    cases: &[Prepared],
    pseudo: &Pseudo,
    val: &[usize],
    ucfg: &UNetTrainConfig,
    size: usize,
) -> Result<Option<f64>, TrainError> {
    let mut items = pseudo.items(val, Role::Positive);
    items.extend(pseudo.items(val, Role::Negative));
    if items.is_empty() {
        return Ok(None);
    }
    let (mut inter, mut total, mut bce, mut n) = (0f64, 0f64, 0f64, 0usize);
    for chunk in items.chunks(ucfg.batch.max(1)) {
        let ids = vec![0u64; chunk.len()];
        let (x, t) = gather(cases, pseudo, chunk, &ids, size, None)?;
        let p = unet.predict(&to_t::<B::T>(&x), chunk.len(), size, size)?;
        for (&pv, &tv) in p.iter().zip(&t) {
            let (pv, tv) = (pv.as_f64(), tv as f64);
            inter += pv * tv;
            total += pv + tv;
            let q = pv.clamp(1e-7, 1.0 - 1e-7);
            bce -= tv * q.ln() + (1.0 - tv) * (1.0 - q).ln();
            n += 1;
        }
    }
    let dice = 1.0 - 2.0 * inter / (total + 1e-7);
    let bce = if n > 0 { bce / n as f64 } else { 0.0 };
    Ok(Some(dice + ucfg.bce_weight * bce))
}
