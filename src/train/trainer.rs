//! The training run: loads and caches the cases, splits them by patient, then runs stage 1
//! (ResNet-LSTM) and stage 2 (fc head on the frozen best stage-1 backbone) epoch by epoch,
//! validating each epoch, keeping the best checkpoint (`MODEL`, by validation AUC) and the
//! last one (`MODEL.last.safetensors`, with the optimizer state) so a killed run resumes
//! where it stopped, and writing the log (`MODEL.log.json`) and plot (`MODEL.plot.png`).
//! When the config has one, stage 3 follows ([`super::stage3`]): pseudo-masks from the best
//! stage-2 model, then the U-Net epoch by epoch (best by validation loss on the validation
//! patients' pseudo-masks), saved into the same files under `unet.*`.
//! Generic over the backend: CPU and CUDA share this code path.
//! Knows nothing about the CLI.

use super::checkpoint::{self, TrainState};
use super::config::{HeadPooling, TrainConfig};
use super::log::{EpochRecord, TrainLog};
use super::prep::{self, AugmentCtx, Prepared, TrainInput};
use super::{stage1, stage2, stage3, EpochStats, LossReadback, TrainError};
use crate::data::split::split_patients;
use crate::engine::Backend;
use crate::model::unet::{SecondHandle, UNet};
use crate::model::IchNet;
use crate::model::Provenance;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a run behaves (not what it trains: that is [`TrainConfig`]).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Seeds the weights, the split, the shuffles and the augmentation.
    pub seed: u64,
    /// Resume from `MODEL.last.safetensors` when it exists (and matches); `false` = fresh.
    pub resume: bool,
    /// Stop after this many epochs in this call (both stages counted), as if killed: the
    /// run resumes from there next time. `None` = run to the end.
    pub stop_after_epochs: Option<usize>,
    /// Progress bars and one line per epoch on stderr.
    pub progress: bool,
    /// The name of the data (e.g. the dataset folder's), recorded in the model file.
    pub data_name: Option<String>,
    /// Development: skip stage 1 and train only the stage-2 head on the backbone of this
    /// model file (same network config), e.g. to compare head poolings on one backbone.
    pub stage2_from: Option<PathBuf>,
    /// Start from this finished two-stage model file (written by a run of the same training
    /// config and seed, stage 3 aside) and train stage 3 alone on it.
    pub stage3_from: Option<PathBuf>,
    /// When the CUDA stage-1/2/3 loops read a step's loss back (same results either way).
    pub loss_readback: LossReadback,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            seed: 0,
            resume: true,
            stop_after_epochs: None,
            progress: false,
            data_name: None,
            stage2_from: None,
            stage3_from: None,
            loss_readback: LossReadback::Late,
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub model: PathBuf,
    pub last_checkpoint: PathBuf,
    pub log_json: PathBuf,
    pub plot_png: PathBuf,
    pub log: TrainLog,
    /// Best validation AUC of stage 1 and stage 2 (None: no validation set or one class).
    pub best_auc_stage1: Option<f64>,
    pub best_auc_stage2: Option<f64>,
    /// Best validation loss of stage 3 (None: no stage 3, no validation set, or no usable
    /// validation slice).
    pub best_val_loss_stage3: Option<f64>,
    /// Stage-3 epochs done, and the slices of its pseudo-masks (positive, negative,
    /// skipped) when it ran in this call.
    pub unet_epochs: usize,
    pub pseudo: Option<stage3::PseudoStats>,
    /// Stage 3 was skipped: no training slice got a pseudo-mask.
    pub unet_skipped: bool,
    /// Whether every stage ran to its last epoch (false after `stop_after_epochs`).
    pub finished: bool,
    /// The epoch the run resumed after, `(stage, epoch)`, if it resumed.
    pub resumed_from: Option<(u8, usize)>,
    pub train_cases: usize,
    pub val_cases: usize,
    pub pos_weight: f64,
    pub seconds: f64,
    pub device: String,
}

/// The files of a run, derived from the model path: `X.safetensors` gives `X.last.safetensors`,
/// `X.log.json`, `X.plot.png`.
#[derive(Clone, Debug)]
pub struct RunPaths {
    pub model: PathBuf,
    pub last: PathBuf,
    pub log: PathBuf,
    pub plot: PathBuf,
}

impl RunPaths {
    pub fn new(model: &Path) -> Self {
        let name = model
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let stem = name
            .strip_suffix(".safetensors")
            .unwrap_or(&name)
            .to_string();
        let sib = |suffix: &str| model.with_file_name(format!("{stem}{suffix}"));
        RunPaths {
            model: model.to_path_buf(),
            last: sib(".last.safetensors"),
            log: sib(".log.json"),
            plot: sib(".plot.png"),
        }
    }
}

/// Loads a finished two-stage model file into `net` and marks stages 1 and 2 done in
/// `state` (with the file's calibrated slice threshold), after checking that the file was
/// trained with this config (epochs included, stage 3 aside) and seed.
fn adopt_two_stage_model<B: Backend>(
    net: &mut IchNet<B>,
    from: &Path,
    cfg: &TrainConfig,
    fingerprint: &str,
    state: &mut TrainState,
) -> Result<(), TrainError> {
    let bad =
        |detail: String| TrainError::Config(format!("--stage3-from {}: {detail}", from.display()));
    if cfg.unet.is_none() {
        return Err(bad("the config has no stage 3 (--no-unet)".into()));
    }
    let meta = checkpoint::read_metadata(from)?;
    let saved: TrainConfig = meta
        .get(checkpoint::META_TRAIN_CONFIG)
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| bad("no readable training config in its metadata".into()))?;
    let saved_seed: u64 = meta
        .get(checkpoint::META_SEED)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no seed in its metadata".into()))?;
    if meta.get(checkpoint::META_STAGE).map(String::as_str) != Some("2") {
        return Err(bad("it is not a finished two-stage model".into()));
    }
    let saved_fp = saved.fingerprint(saved_seed);
    if !checkpoint::fingerprints_match(&saved_fp, fingerprint) {
        return Err(bad(format!(
            "trained with another config ({})",
            checkpoint::describe_mismatch(&saved_fp, fingerprint)
        )));
    }
    if (saved.epochs, saved.stage2_epochs) != (cfg.epochs, cfg.stage2_epochs) {
        return Err(bad(format!(
            "trained for {} + {} epochs, this run asks for {} + {}",
            saved.epochs, saved.stage2_epochs, cfg.epochs, cfg.stage2_epochs
        )));
    }
    checkpoint::load_params(net, from)?;
    state.epochs_done = [cfg.epochs, cfg.stage2_epochs];
    state.best_epoch = [cfg.epochs, cfg.stage2_epochs];
    state.backbone_reloaded = true;
    state.slice_threshold = meta
        .get(crate::model::meta::META_SLICE_THRESHOLD)
        .and_then(|v| v.parse().ok());
    Ok(())
}

/// Trains on `backend`. See the module doc for the files written.
pub fn train_with<B: Backend + SecondHandle + 'static>(
    backend: B,
    input: TrainInput<'_>,
    out_model: &Path,
    cfg: &TrainConfig,
    opts: &TrainOptions,
) -> Result<TrainReport, TrainError> {
    let t0 = Instant::now();
    cfg.validate().map_err(TrainError::Config)?;
    let paths = RunPaths::new(out_model);
    if out_model.is_dir() {
        return Err(TrainError::Config(format!(
            "{} is a folder, expected a model file path",
            out_model.display()
        )));
    }
    let fingerprint = cfg.fingerprint(opts.seed);

    // A mismatched checkpoint is refused before any data is read: a fast, clear failure.
    let resume_state = if opts.resume && paths.last.is_file() {
        let st = checkpoint::read_state(&paths.last)?;
        if !checkpoint::fingerprints_match(&st.fingerprint, &fingerprint) {
            return Err(TrainError::ResumeMismatch {
                path: paths.last.clone(),
                detail: checkpoint::describe_mismatch(&st.fingerprint, &fingerprint),
            });
        }
        if st.unet.epochs_done > 0 {
            let detail = match &cfg.unet {
                None => {
                    Some("stage 3 (the U-Net) has started: resume it, or pass --fresh".to_string())
                }
                Some(u) if u.fingerprint(opts.seed) != st.unet.fingerprint => Some(format!(
                    "the interrupted run's stage 3 used another U-Net config ({})",
                    checkpoint::describe_mismatch(&st.unet.fingerprint, &u.fingerprint(opts.seed))
                )),
                Some(_) if cfg.stage2_epochs > st.epochs_done[1] => Some(format!(
                    "stage 3 has started, so stage 2 cannot be extended from {} to {} epochs",
                    st.epochs_done[1], cfg.stage2_epochs
                )),
                Some(_) => None,
            };
            if let Some(detail) = detail {
                return Err(TrainError::ResumeMismatch {
                    path: paths.last.clone(),
                    detail,
                });
            }
        }
        if st.epochs_done[1] > 0 && cfg.epochs > st.epochs_done[0] {
            // The fc head was fitted to the old backbone: more stage-1 epochs would leave
            // a model whose two heads disagree.
            return Err(TrainError::ResumeMismatch {
                path: paths.last.clone(),
                detail: format!(
                    "stage 2 has started, so stage 1 cannot be extended from {} to {} epochs",
                    st.epochs_done[0], cfg.epochs
                ),
            });
        }
        Some(st)
    } else {
        None
    };

    let (cases, native) = prep::load_input(input, cfg.size, &cfg.input)?;
    if cases.is_empty() {
        return Err(TrainError::Data("no training cases".into()));
    }
    let (train_idx, val_idx) = stratified_split(&cases, cfg.val_fraction, opts.seed)?;
    let pos_weight = prep::pos_weight(&cases, &train_idx, cfg.pos_weight_min, cfg.pos_weight_max);
    let ids = |ix: &[usize]| ix.iter().map(|&i| cases[i].id.clone()).collect::<Vec<_>>();

    let device = backend.name();
    let mut net = IchNet::new(backend, cfg.model.clone(), opts.seed)?;
    let mut state = match resume_state {
        Some(st) => {
            if st.train_ids != ids(&train_idx) || st.val_ids != ids(&val_idx) {
                return Err(TrainError::ResumeMismatch {
                    path: paths.last.clone(),
                    detail: "the training cases differ from those of the interrupted run".into(),
                });
            }
            checkpoint::load_resume(&mut net, &paths.last)?;
            st
        }
        None => TrainState {
            version: checkpoint::STATE_VERSION,
            fingerprint: fingerprint.clone(),
            seed: opts.seed,
            epochs_done: [0, 0],
            best_auc: [None, None],
            best_val_loss: [None, None],
            best_epoch: [0, 0],
            slice_threshold: None,
            backbone_reloaded: false,
            pos_weight,
            train_ids: ids(&train_idx),
            val_ids: ids(&val_idx),
            provenance: Provenance::new(cfg, opts, &cases, &train_idx, &val_idx),
            log: TrainLog {
                config: cfg.name.clone(),
                device: device.clone(),
                epochs: Vec::new(),
            },
            unet: Default::default(),
        },
    };
    let resumed_from = (state.epochs_done != [0, 0]).then(|| {
        if state.epochs_done[1] > 0 {
            (2, state.epochs_done[1])
        } else {
            (1, state.epochs_done[0])
        }
    });
    state.log.device = device.clone();
    if let (true, Some((s, e))) = (opts.progress, resumed_from) {
        eprintln!(
            "resuming from {} (stage {s}, epoch {e} done)",
            paths.last.display()
        );
    }
    if opts.progress {
        eprintln!(
            "training `{}` on {device}: {} train / {} validation volumes, {}x{} px, {} slices per sequence, pos_weight {:.2}",
            cfg.name,
            train_idx.len(),
            val_idx.len(),
            cfg.size,
            cfg.size,
            cfg.slices,
            pos_weight
        );
    }

    if let (Some(from), None) = (&opts.stage2_from, resumed_from) {
        checkpoint::load_params(&mut net, from)?;
        state.epochs_done[0] = cfg.epochs;
        state.best_epoch[0] = cfg.epochs;
        state.backbone_reloaded = true;
        checkpoint::save_model(&net, None, &paths.model, cfg, &state)?;
    }
    if let (Some(from), None) = (&opts.stage3_from, resumed_from) {
        adopt_two_stage_model(&mut net, from, cfg, &fingerprint, &mut state)?;
        checkpoint::save_model(&net, None, &paths.model, cfg, &state)?;
    }
    let mut budget = opts.stop_after_epochs.unwrap_or(usize::MAX);
    let seq_items = prep::sequences(&cases, &train_idx, cfg.slices, cfg.seq_stride)?;
    let slice_items = prep::slices(&cases, &train_idx);
    let ctx = RunCtx {
        cfg,
        val: &val_idx,
        paths: &paths,
        opts,
        pos_weight: state.pos_weight,
    };

    // ---- stage 1 ---------------------------------------------------------------------
    while state.epochs_done[0] < cfg.epochs && budget > 0 {
        let epoch = state.epochs_done[0] + 1;
        let t = Instant::now();
        let pb = ctx.bar(1, epoch, cfg.epochs);
        let aug = AugmentCtx {
            cfg: &cfg.augment,
            seed: opts.seed,
            epoch: epoch as u64,
        };
        let loss = stage1::train_epoch(
            &mut net,
            &cases,
            &seq_items,
            cfg.batch,
            cfg.size,
            &cfg.optimizer,
            ctx.pos_weight,
            aug,
            opts.loss_readback,
            &pb,
        )?;
        pb.finish_and_clear();
        let stats = if val_idx.is_empty() {
            EpochStats::default()
        } else {
            stage1::validate(
                &mut net,
                &cases,
                &val_idx,
                cfg.slices,
                cfg.seq_stride,
                cfg.batch,
                cfg.size,
                ctx.pos_weight,
            )?
        };
        ctx.finish_epoch(&mut net, &mut state, 1, epoch, loss, stats, t)?;
        budget -= 1;
    }

    // ---- stage 2 ---------------------------------------------------------------------
    if state.epochs_done[0] >= cfg.epochs
        && cfg.stage2_epochs > 0
        && budget > 0
        && !state.backbone_reloaded
    {
        // The fc head learns on the best stage-1 backbone, not the last one.
        if state.best_epoch[0] > 0
            && state.best_epoch[0] != state.epochs_done[0]
            && paths.model.is_file()
        {
            checkpoint::load_params(&mut net, &paths.model)?;
        }
        state.backbone_reloaded = true;
    }
    let mut host_head = None;
    while state.epochs_done[0] >= cfg.epochs
        && state.epochs_done[1] < cfg.stage2_epochs
        && budget > 0
    {
        let epoch = state.epochs_done[1] + 1;
        let t = Instant::now();
        let pb = ctx.bar(2, epoch, cfg.stage2_epochs);
        let aug = AugmentCtx {
            cfg: &cfg.augment,
            seed: opts.seed,
            // Stage 2's epochs draw other transforms than stage 1's.
            epoch: (1u64 << 32) + epoch as u64,
        };
        let pooled = cfg.stage2_pooling != HeadPooling::Mean;
        let loss = if pooled {
            if host_head.is_none() {
                host_head = Some(stage2::HostHead::from_net(&net)?);
            }
            let head = host_head
                .as_mut()
                .ok_or_else(|| TrainError::Config("stage-2 head".into()))?;
            stage2::train_epoch_pooled(
                &mut net,
                head,
                cfg.stage2_pooling,
                &cases,
                &slice_items,
                cfg.stage2_batch,
                cfg.size,
                &cfg.stage2_optimizer,
                ctx.pos_weight,
                aug,
                &pb,
            )?
        } else {
            stage2::train_epoch(
                &mut net,
                &cases,
                &slice_items,
                cfg.stage2_batch,
                cfg.size,
                &cfg.stage2_optimizer,
                ctx.pos_weight,
                aug,
                opts.loss_readback,
                &pb,
            )?
        };
        pb.finish_and_clear();
        let stats = if val_idx.is_empty() {
            EpochStats::default()
        } else if pooled {
            stage2::validate_pooled(
                &mut net,
                cfg.stage2_pooling,
                &cases,
                &val_idx,
                cfg.stage2_batch,
                cfg.size,
                ctx.pos_weight,
            )?
        } else {
            stage2::validate(
                &mut net,
                &cases,
                &val_idx,
                cfg.stage2_batch,
                cfg.size,
                ctx.pos_weight,
            )?
        };
        ctx.finish_epoch(&mut net, &mut state, 2, epoch, loss, stats, t)?;
        budget -= 1;
    }

    // ---- stage 3 ---------------------------------------------------------------------
    let stage12_done =
        state.epochs_done[0] >= cfg.epochs && state.epochs_done[1] >= cfg.stage2_epochs;
    let mut pseudo_stats = None;
    if let Some(ucfg) = &cfg.unet {
        if stage12_done && !state.unet.skipped && state.unet.epochs_done < ucfg.epochs && budget > 0
        {
            if state.unet.epochs_done == 0 {
                state.unet.fingerprint = ucfg.fingerprint(opts.seed);
            }
            // The pseudo-masks come from the best model (stage 2's best epoch).
            if paths.model.is_file() {
                checkpoint::load_params(&mut net, &paths.model)?;
            }
            let t = Instant::now();
            let pb = ctx.bar(3, 0, ucfg.epochs);
            pb.set_prefix("stage 3 pseudo-masks");
            let mut all: Vec<usize> = train_idx.iter().chain(&val_idx).copied().collect();
            all.sort_unstable();
            let threshold = state.slice_threshold.map_or(0.5, |t| t.max(0.5));
            let (pseudo, pst) = stage3::pseudo_masks(
                &mut net,
                &cases,
                &all,
                &native,
                ucfg,
                cfg.size,
                cfg.stage2_batch,
                threshold,
                &pb,
            )?;
            pb.finish_and_clear();
            pseudo_stats = Some(pst);
            if opts.progress {
                eprintln!(
                    "stage 3: pseudo-masks of {} volumes in {:.1}s: {} positive slices, {} negative, {} labelled positive without one (unused); U-Net features {}, depth {}",
                    all.len(),
                    t.elapsed().as_secs_f64(),
                    pst.positive,
                    pst.negative,
                    pst.skipped,
                    ucfg.features,
                    ucfg.depth
                );
            }
            if pst.positive == 0 {
                // Nothing to learn the blood from: the model stays the two-stage one.
                state.unet.skipped = true;
                checkpoint::save_resume(&net, None, &paths.last, cfg, &state)?;
                if opts.progress {
                    eprintln!("stage 3 skipped: no training slice got a pseudo-mask");
                }
            } else {
                let handle = net
                    .backend()
                    .second_handle()
                    .map_err(|e| TrainError::Model(e.into()))?;
                let mut unet = UNet::new(handle, ucfg.net(cfg.input.channels()), opts.seed)?;
                if state.unet.epochs_done > 0 {
                    checkpoint::load_unet_resume(&mut unet, &paths.last)?;
                }
                while state.unet.epochs_done < ucfg.epochs && budget > 0 {
                    let epoch = state.unet.epochs_done + 1;
                    let t = Instant::now();
                    let pb = ctx.bar(3, epoch, ucfg.epochs);
                    let loss = stage3::train_epoch(
                        &mut unet,
                        &cases,
                        &pseudo,
                        &train_idx,
                        ucfg,
                        &cfg.augment,
                        cfg.size,
                        opts.seed,
                        epoch,
                        opts.loss_readback,
                        &pb,
                    )?;
                    pb.finish_and_clear();
                    let val =
                        stage3::validate(&mut unet, &cases, &pseudo, &val_idx, ucfg, cfg.size)?;
                    let better = match (val, state.unet.best_val_loss) {
                        (Some(v), Some(b)) => v < b,
                        (Some(_), None) => true,
                        // No usable validation slice: every epoch replaces the best.
                        (None, _) => true,
                    };
                    if better {
                        state.unet.best_epoch = epoch;
                        state.unet.best_val_loss = val;
                    }
                    state.unet.epochs_done = epoch;
                    state.log.epochs.push(EpochRecord {
                        stage: 3,
                        epoch,
                        train_loss: loss,
                        val_loss: val,
                        val_auc: None,
                        val_accuracy: None,
                        seconds: t.elapsed().as_secs_f64(),
                        best: better,
                    });
                    if better {
                        checkpoint::save_model(&net, Some(&unet), &paths.model, cfg, &state)?;
                    }
                    checkpoint::save_resume(&net, Some(&unet), &paths.last, cfg, &state)?;
                    state.log.write_json(&paths.log)?;
                    state.log.write_plot(&paths.plot)?;
                    if opts.progress {
                        eprintln!(
                            "stage 3 epoch {epoch}: train loss {loss:.4}, val loss {}, {:.1}s{}",
                            val.map_or("-".into(), |v| format!("{v:.4}")),
                            t.elapsed().as_secs_f64(),
                            if better { " (best)" } else { "" }
                        );
                    }
                    budget -= 1;
                }
            }
        }
    }

    let finished = stage12_done
        && cfg
            .unet
            .as_ref()
            .is_none_or(|u| state.unet.skipped || state.unet.epochs_done >= u.epochs);
    // A run with zero epochs left still leaves a model behind (e.g. epochs raised to 0).
    if !paths.model.is_file() {
        checkpoint::save_model(&net, None, &paths.model, cfg, &state)?;
    }
    Ok(TrainReport {
        model: paths.model.clone(),
        last_checkpoint: paths.last.clone(),
        log_json: paths.log.clone(),
        plot_png: paths.plot.clone(),
        best_auc_stage1: state.best_auc[0],
        best_auc_stage2: state.best_auc[1],
        best_val_loss_stage3: state.unet.best_val_loss,
        unet_epochs: state.unet.epochs_done,
        unet_skipped: state.unet.skipped,
        pseudo: pseudo_stats,
        log: state.log,
        finished,
        resumed_from,
        train_cases: train_idx.len(),
        val_cases: val_idx.len(),
        pos_weight: ctx.pos_weight,
        seconds: t0.elapsed().as_secs_f64(),
        device,
    })
}

/// Patient-wise split, stratified: patients with and without a positive slice are split
/// separately, so that (given two of each) the validation set holds both classes and its
/// AUC is defined.
fn stratified_split(
    cases: &[Prepared],
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), TrainError> {
    let positive_patient = |p: &str| {
        cases
            .iter()
            .any(|c| c.patient == p && c.labels.iter().any(|&l| l))
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for class in [true, false] {
        let members: Vec<usize> = (0..cases.len())
            .filter(|&i| positive_patient(&cases[i].patient) == class)
            .collect();
        let patients: Vec<&str> = members.iter().map(|&i| cases[i].patient.as_str()).collect();
        let split = split_patients(&patients, val_fraction, seed)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        train.extend(split.train.iter().map(|&k| members[k]));
        val.extend(split.val.iter().map(|&k| members[k]));
    }
    if val_fraction == 0.0 {
        train.append(&mut val);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok((train, val))
}

struct RunCtx<'a> {
    cfg: &'a TrainConfig,
    val: &'a [usize],
    paths: &'a RunPaths,
    opts: &'a TrainOptions,
    pos_weight: f64,
}

impl RunCtx<'_> {
    fn bar(&self, stage: u8, epoch: usize, of: usize) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(
            Some(0),
            if self.opts.progress {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ETA {eta})",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_prefix(format!("stage {stage} epoch {epoch}/{of}"));
        pb
    }

    /// Logs the epoch, keeps the best model, writes the last checkpoint, the log and the plot.
    #[allow(clippy::too_many_arguments)]
    fn finish_epoch<B: Backend>(
        &self,
        net: &mut IchNet<B>,
        state: &mut TrainState,
        stage: u8,
        epoch: usize,
        loss: f64,
        stats: EpochStats,
        t: Instant,
    ) -> Result<(), TrainError> {
        let s = (stage - 1) as usize;
        // Without a validation set (or with one class only) every epoch replaces the best.
        // With one class only in validation the AUC is undefined: the lowest loss decides.
        let better = self.val.is_empty()
            || match (stats.auc, state.best_auc[s]) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => true,
                (None, _) => match (stats.loss, state.best_val_loss[s]) {
                    (Some(l), Some(b)) => l < b,
                    (Some(_), None) => true,
                    (None, _) => state.best_epoch[s] == 0,
                },
            };
        if better {
            if stage == 2 {
                state.slice_threshold = stats.threshold;
            }
            state.best_auc[s] = stats.auc;
            state.best_val_loss[s] = stats.loss;
            state.best_epoch[s] = epoch;
        }
        state.epochs_done[s] = epoch;
        state.log.epochs.push(EpochRecord {
            stage,
            epoch,
            train_loss: loss,
            val_loss: stats.loss,
            val_auc: stats.auc,
            val_accuracy: stats.accuracy,
            seconds: t.elapsed().as_secs_f64(),
            best: better,
        });
        if better {
            checkpoint::save_model(net, None, &self.paths.model, self.cfg, state)?;
        }
        checkpoint::save_resume(net, None, &self.paths.last, self.cfg, state)?;
        state.log.write_json(&self.paths.log)?;
        state.log.write_plot(&self.paths.plot)?;
        if self.opts.progress {
            let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            eprintln!(
                "stage {stage} epoch {epoch}: train loss {loss:.4}, val loss {}, val AUC {}, accuracy {}, {:.1}s{}",
                f(stats.loss),
                f(stats.auc),
                f(stats.accuracy),
                t.elapsed().as_secs_f64(),
                if better { " (best)" } else { "" }
            );
        }
        Ok(())
    }
}
