//! `ichcam train`: stage 1 (ResNet-LSTM), stage 2 (fc head) and stage 3 (the U-Net on
//! pseudo-masks) from slice labels only.
//! Picks a preset, applies the overrides, and hands over to [`ichcam::train::train`].

use anyhow::Context;
use ichcam::data::Dataset;
use ichcam::train::{config, train, TrainConfig, TrainInput, TrainOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset folder (INSTANCE `data/`, ct-ich `images/` + `slice_labels.csv`, or a folder
    /// of volumes with a label CSV); only slice labels are used.
    #[arg(long)]
    data: PathBuf,
    /// Output model file (`.safetensors`); `X.last.safetensors`, `X.log.json` and
    /// `X.plot.png` are written beside it.
    #[arg(long)]
    model: PathBuf,
    /// Slice-label CSV overriding the one the dataset layout provides.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Preset: auto (cpu on a CPU, small on a GPU), cpu (real head CT on a CPU, under 45
    /// minutes for 51 patients on two cores), small (GPU ResNet-18, 256 px), paper (the
    /// authors' ResNet-101 at 512 px, GPU), tiny (the demo's phantoms, a minute).
    #[arg(long, default_value = "auto")]
    config: String,
    /// Stage-1 epochs (default: the preset's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Stage-2 (fc head) epochs (default: the preset's).
    #[arg(long)]
    stage2_epochs: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto (a GPU when there is one), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Convolution arithmetic on CUDA: f32 (the reference), tf32 or bf16 (tensor cores,
    /// f32 accumulation; compute capability 8.0+). The CPU takes f32 only.
    #[arg(long, default_value = "f32")]
    precision: ichcam::engine::Precision,
    /// Fraction of the patients held out for validation.
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Stage-1 learning rate (default: the preset's).
    #[arg(long)]
    lr: Option<f64>,
    /// Stage-1 optimizer: sgd (momentum 0.9) or adam.
    #[arg(long)]
    optimizer: Option<String>,
    /// Sequences per stage-1 batch (default: the preset's).
    #[arg(long)]
    batch: Option<usize>,
    /// The model's input: head-ct (brain, blood and wide windows of the head's box) or
    /// authors (brain, subdural and bone windows of the whole field, as SWICH-Seg's code).
    /// Default: the preset's (cpu and small: head-ct; paper and tiny: authors).
    #[arg(long)]
    input: Option<String>,
    /// In-plane input size in pixels (default: the preset's).
    #[arg(long)]
    size: Option<usize>,
    /// Stage-2 head pooling of its class map: mean (the authors') or topk:F (the mean of
    /// the highest fraction F of locations). Default: the preset's.
    #[arg(long)]
    head_pooling: Option<String>,
    /// Skip stage 3 (the U-Net on the pseudo-masks): the model segments with the CAM alone.
    #[arg(long)]
    no_unet: bool,
    /// Stage-3 epochs (default: the preset's).
    #[arg(long)]
    unet_epochs: Option<usize>,
    /// Stage-3 U-Net features (channels of the first level; the authors: 16).
    #[arg(long)]
    unet_features: Option<usize>,
    /// Which slices get a pseudo-mask: labels (the volume's own slice labels: the default)
    /// or stage2 (the stage-2 head's flags, as the authors' test-time net gives them).
    #[arg(long)]
    unet_flags: Option<String>,
    /// Negative slices (empty masks) per positive slice in each stage-3 epoch.
    #[arg(long)]
    unet_negatives: Option<f64>,
    /// Stage-3 learning rate (Adam).
    #[arg(long)]
    unet_lr: Option<f64>,
    /// Stage-3 slices per epoch at least (positives drawn again when they and their
    /// negatives are fewer; 0: every positive once).
    #[arg(long)]
    unet_slices_per_epoch: Option<usize>,
    /// Development: train only the stage-2 head on the backbone of this model file.
    #[arg(long, hide = true)]
    stage2_from: Option<PathBuf>,
    /// Train stage 3 alone on this finished two-stage model file (trained with the same
    /// config and seed): the output model is that model plus the U-Net.
    #[arg(long, conflicts_with_all = ["stage2_from", "no_unet"])]
    stage3_from: Option<PathBuf>,
    /// Ignore an existing `X.last.safetensors` and start over.
    #[arg(long, conflicts_with = "resume")]
    fresh: bool,
    /// Resume from `X.last.safetensors` (the default when it exists and matches).
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs, as if interrupted (resume later).
    #[arg(long, hide = true)]
    stop_after_epochs: Option<usize>,
    /// No progress bars or per-epoch lines.
    #[arg(long, short)]
    quiet: bool,
}

/// The preset to run and why (`--config auto` follows the device).
fn choose_preset(config: &str, gpu: bool) -> anyhow::Result<(String, String)> {
    if !config.eq_ignore_ascii_case("auto") {
        return Ok((config.to_string(), "chosen with --config".into()));
    }
    let name = config::default_preset_for(gpu);
    let why = if gpu {
        "the default on a GPU".to_string()
    } else {
        "the default on a CPU; `small` and `paper` are for a GPU".to_string()
    };
    Ok((name.to_string(), why))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut device = super::open_device(&a.device, a.quiet)?;
    device.set_precision(a.precision)?;
    let (preset, why) = choose_preset(&a.config, device.is_gpu())?;
    let mut cfg = TrainConfig::preset(&preset)?;
    if let Some(e) = a.epochs {
        cfg.epochs = e;
    }
    if let Some(e) = a.stage2_epochs {
        cfg.stage2_epochs = e;
    }
    if let Some(v) = a.val_fraction {
        cfg.val_fraction = v;
    }
    if let Some(b) = a.batch {
        cfg.batch = b;
    }
    if let Some(i) = &a.input {
        cfg.input = match i.to_ascii_lowercase().as_str() {
            "head-ct" => ichcam::data::InputSpec::head_ct(),
            "authors" => ichcam::data::InputSpec::default(),
            other => anyhow::bail!("unknown --input `{other}` (expected head-ct or authors)"),
        };
        cfg.model.in_channels = cfg.input.channels();
    }
    if let Some(s) = a.size {
        cfg.size = s;
    }
    if let Some(p) = &a.head_pooling {
        cfg.stage2_pooling = match p.split_once(':') {
            None if p == "mean" => config::HeadPooling::Mean,
            Some(("topk", f)) => config::HeadPooling::TopK {
                frac: f
                    .parse()
                    .with_context(|| format!("--head-pooling {p}: bad fraction"))?,
            },
            _ => anyhow::bail!("unknown --head-pooling `{p}` (expected mean or topk:F)"),
        };
    }
    if let Some(o) = &a.optimizer {
        cfg.optimizer = config::switch_optimizer(&cfg.optimizer, &o.to_ascii_lowercase())
            .with_context(|| format!("unknown optimizer `{o}` (expected sgd or adam)"))?;
    }
    if let Some(lr) = a.lr {
        cfg.optimizer = cfg.optimizer.with_lr(lr);
    }
    if a.no_unet {
        cfg.unet = None;
    }
    if let Some(u) = cfg.unet.as_mut() {
        if let Some(e) = a.unet_epochs {
            u.epochs = e;
        }
        if let Some(f) = a.unet_features {
            u.features = f;
        }
        if let Some(f) = &a.unet_flags {
            u.flags = match f.to_ascii_lowercase().as_str() {
                "labels" => config::PseudoFlags::Labels,
                "stage2" => config::PseudoFlags::Stage2,
                other => {
                    anyhow::bail!("unknown --unet-flags `{other}` (expected labels or stage2)")
                }
            };
        }
        if let Some(n) = a.unet_negatives {
            u.negatives_per_positive = n;
        }
        if let Some(lr) = a.unet_lr {
            u.optimizer = u.optimizer.with_lr(lr);
        }
        if let Some(n) = a.unet_slices_per_epoch {
            u.slices_per_epoch = n;
        }
    } else if a.unet_epochs.is_some()
        || a.unet_features.is_some()
        || a.unet_flags.is_some()
        || a.unet_negatives.is_some()
        || a.unet_lr.is_some()
        || a.unet_slices_per_epoch.is_some()
    {
        anyhow::bail!("--unet-* options given without stage 3 (--no-unet, or a preset without it)");
    }
    let last = ichcam::train::RunPaths::new(&a.model).last;
    if a.resume && !last.is_file() {
        anyhow::bail!("--resume: no checkpoint {} to resume from", last.display());
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid training config: {e}"))?;
    let opts = TrainOptions {
        seed: a.seed,
        resume: !a.fresh,
        stop_after_epochs: a.stop_after_epochs,
        progress: !a.quiet,
        data_name: a
            .data
            .canonicalize()
            .unwrap_or_else(|_| a.data.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        stage2_from: a.stage2_from.clone(),
        stage3_from: a.stage3_from.clone(),
        loss_readback: Default::default(),
    };
    eprintln!(
        "preset `{}` ({why}): {}x{} px{}, {} windows, ResNet {:?} width {}, {} + {} epochs, {}",
        cfg.name,
        cfg.size,
        cfg.size,
        if cfg.input.crop_head {
            " of the head's box"
        } else {
            " of the whole field"
        },
        cfg.input.channels(),
        cfg.model.layers,
        cfg.model.base_width,
        cfg.epochs,
        cfg.stage2_epochs,
        match &cfg.unet {
            Some(u) => format!(
                "stage 3: U-Net features {}, {} epochs on {} pseudo-masks",
                u.features,
                u.epochs,
                match u.flags {
                    config::PseudoFlags::Labels => "labelled slices'",
                    config::PseudoFlags::Stage2 => "stage-2 flagged slices'",
                }
            ),
            None => "no stage 3".into(),
        }
    );
    let ds = Dataset::open_with_csv(&a.data, a.labels.as_deref())
        .with_context(|| format!("opening the dataset {}", a.data.display()))?;
    ds.require_labels()
        .context("training needs slice labels for every volume")?;
    // Memory, before loading anything: the model's training state (parameters, gradients,
    // optimizer moments, a batch's activations) and every volume's prepared input planes
    // must fit the budget.
    let prepared: u128 = ds
        .cases
        .iter()
        .filter_map(|c| ichcam::io::probe_dims(&c.image).ok())
        .map(|(d, _, _)| d as u128 * 12 * (cfg.size as u128).pow(2))
        .sum();
    let mut model =
        ichcam::model::memory::training_bytes(&cfg.model, cfg.batch, cfg.slices, cfg.size, 4);
    if let Some(u) = &cfg.unet {
        // Stage 3 adds the U-Net's training state (parameters and two moments, a batch's
        // activations and gradients), a pseudo-mask per slice at the input size and one
        // native volume being refined at a time (about 40 bytes per voxel).
        let net = u.net(cfg.input.channels());
        let largest = ds
            .cases
            .iter()
            .filter_map(|c| ichcam::io::probe_dims(&c.image).ok())
            .map(|(d, h, w)| d as u128 * h as u128 * w as u128)
            .max()
            .unwrap_or(0);
        let slices: u128 = prepared / (12 * (cfg.size as u128).pow(2)).max(1);
        let extra = net
            .tensor_count()
            .and_then(|n| n.checked_mul(4 * 4))
            .zip(net.activation_bytes(u.batch, cfg.size, cfg.size, 4))
            .map(|(p, a)| {
                p.saturating_add(2 * a)
                    .saturating_add(slices * 4 * (cfg.size as u128).pow(2))
                    .saturating_add(40 * largest)
            });
        model = model.zip(extra).map(|(m, e)| m.saturating_add(e));
    }
    ichcam::io::budget::budget().check(
        &a.data,
        model.unwrap_or(u128::MAX).saturating_add(prepared),
        || format!("training `{}` on {} volumes", cfg.name, ds.cases.len()),
    )?;
    let report = train(
        &device,
        TrainInput::Dataset {
            dataset: &ds,
            indices: None,
        },
        &a.model,
        &cfg,
        &opts,
    )
    .with_context(|| format!("training {}", a.model.display()))?;
    let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "{} {} on {} ({} train / {} validation volumes) in {:.1}s: best validation AUC stage 1 {}, stage 2 {}",
        if report.finished { "trained" } else { "stopped early:" },
        cfg.name,
        report.device,
        report.train_cases,
        report.val_cases,
        report.seconds,
        f(report.best_auc_stage1),
        f(report.best_auc_stage2),
    );
    if let Some(u) = &cfg.unet {
        println!(
            "stage 3: {}{} of {} U-Net epochs, best validation loss {}{}",
            if report.unet_skipped {
                "skipped (no training slice got a pseudo-mask): "
            } else {
                ""
            },
            report.unet_epochs,
            u.epochs,
            f(report.best_val_loss_stage3),
            report.pseudo.map_or(String::new(), |p| format!(
                " ({} positive / {} negative pseudo-mask slices)",
                p.positive, p.negative
            ))
        );
    }
    println!("model: {}", report.model.display());
    println!("resume checkpoint: {}", report.last_checkpoint.display());
    println!(
        "log: {}  plot: {}",
        report.log_json.display(),
        report.plot_png.display()
    );
    Ok(())
}
