//! The training run's checkpoints, written by the model layer's safetensors code. The best
//! model (`MODEL`) carries the metadata segmentation needs ([`ModelMeta`]: input size,
//! sequence length, input recipe, head pooling, provenance) and the training config; the
//! model config is under `config`. The resume checkpoint
//! (`MODEL.last.safetensors`) adds the optimizer state and the [`TrainState`]
//! (epochs done per stage, best AUCs, seed, config fingerprint, the log so far) as JSON
//! metadata, so a killed run resumes bit for bit after its last finished epoch. In stage 3
//! both files also hold the U-Net (`unet.*`; the resume file its optimizer state too).
//! Knows nothing about the CLI or the data beyond case ids.

use super::config::TrainConfig;
use super::log::TrainLog;
use super::TrainError;
use crate::engine::{Backend, Real};
use crate::model::checkpoint::{self as mcheck, DiskDtype, SaveOptions};
use crate::model::meta::{ModelMeta, Provenance};
use crate::model::unet::{checkpoint as unet_ckpt, UNet};
use crate::model::IchNet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Bumped when the layout of [`TrainState`] or the resume file changes.
pub const STATE_VERSION: u32 = 1;

/// Metadata key of the [`TrainState`] JSON.
pub const META_STATE: &str = "ichcam.train_state";
/// Metadata key of the [`TrainConfig`] JSON (in both files).
pub const META_TRAIN_CONFIG: &str = "ichcam.train_config";
/// Training records beside the model's own metadata ([`crate::model::meta`]): the stage the
/// file was written in and the run's seed.
pub const META_STAGE: &str = "ichcam.stage";
pub const META_SEED: &str = "ichcam.seed";
/// How stage 3 was trained (the [`super::config::UNetTrainConfig`] JSON), in a model file
/// with a U-Net.
pub const META_UNET_TRAIN: &str = "ichcam.unet_train";

/// Stage 3's progress in a resume checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UNetState {
    /// [`super::config::UNetTrainConfig::fingerprint`] of the run that started stage 3.
    pub fingerprint: String,
    pub epochs_done: usize,
    /// The best epoch by validation loss (0 = none yet) and its loss.
    pub best_epoch: usize,
    pub best_val_loss: Option<f64>,
    /// Stage 3 found no pseudo-mask to learn from and was skipped (the model has no U-Net).
    #[serde(default)]
    pub skipped: bool,
}

impl Provenance {
    pub(crate) fn new(
        cfg: &TrainConfig,
        opts: &super::TrainOptions,
        cases: &[super::prep::Prepared],
        train: &[usize],
        val: &[usize],
    ) -> Self {
        let count = |ix: &[usize]| {
            let slices: usize = ix.iter().map(|&i| cases[i].depth).sum();
            let pos: usize = ix
                .iter()
                .map(|&i| cases[i].labels.iter().filter(|&&l| l).count())
                .sum();
            (ix.len(), slices, pos)
        };
        let (tv, ts, tp) = count(train);
        let (vv, vs, vp) = count(val);
        Provenance {
            preset: cfg.name.clone(),
            data: opts.data_name.clone(),
            train_volumes: tv,
            train_slices: ts,
            train_positive_slices: tp,
            val_volumes: vv,
            val_slices: vs,
            val_positive_slices: vp,
            started: utc_now(),
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    crate::io::clock::UtcTime::now().iso8601()
}

/// Everything besides tensors that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    /// [`TrainConfig::fingerprint`] with the run's seed.
    pub fingerprint: String,
    pub seed: u64,
    /// Finished epochs of stage 1 and stage 2.
    pub epochs_done: [usize; 2],
    /// Best validation AUC per stage, and the epoch that reached it (0 = none yet).
    pub best_auc: [Option<f64>; 2],
    /// Validation loss of the best epoch (decides when the AUC is undefined).
    #[serde(default)]
    pub best_val_loss: [Option<f64>; 2],
    pub best_epoch: [usize; 2],
    /// Slice probability threshold calibrated on the validation slices by the best stage-2
    /// epoch (written into the model for `ichcam segment`).
    #[serde(default)]
    pub slice_threshold: Option<f64>,
    /// Whether stage 2 has started from the best stage-1 weights.
    pub backbone_reloaded: bool,
    pub pos_weight: f64,
    pub train_ids: Vec<String>,
    pub val_ids: Vec<String>,
    /// How the model was trained (recorded in its metadata).
    #[serde(default)]
    pub provenance: Provenance,
    pub log: TrainLog,
    /// Stage 3 (the U-Net), when the config has one.
    #[serde(default)]
    pub unet: UNetState,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Reads only the safetensors header's metadata (no tensor data).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, TrainError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|e| io_err(path, format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(n);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if n == 0 || n > 100_000_000 || n + 8 > len {
        return Err(io_err(path, "not a safetensors file (bad header length)"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| io_err(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| io_err(path, format!("bad safetensors header: {e}")))?;
    let mut out = HashMap::new();
    if let Some(m) = v.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

/// The [`TrainState`] of a resume checkpoint.
pub fn read_state(path: &Path) -> Result<TrainState, TrainError> {
    let meta = read_metadata(path)?;
    let json = meta.get(META_STATE).ok_or_else(|| {
        io_err(
            path,
            "not a resume checkpoint (no training state); pass --fresh to start over",
        )
    })?;
    let st: TrainState = serde_json::from_str(json).map_err(|e| {
        io_err(
            path,
            format!("unreadable training state ({e}); pass --fresh to start over"),
        )
    })?;
    if st.version != STATE_VERSION {
        return Err(TrainError::ResumeMismatch {
            path: path.to_path_buf(),
            detail: format!(
                "written by checkpoint format {}, this build uses {STATE_VERSION}",
                st.version
            ),
        });
    }
    Ok(st)
}

/// Whether a saved fingerprint and the current one describe the same run: equal strings,
/// or the same seed and configs that read back equal (a checkpoint written before a field
/// with a default existed matches a config holding that default).
pub fn fingerprints_match(saved: &str, now: &str) -> bool {
    if saved == now {
        return true;
    }
    let parse = |s: &str| -> Option<(String, TrainConfig)> {
        let (seed, body) = s.split_once(';')?;
        let mut c: TrainConfig = serde_json::from_str(body).ok()?;
        c.unet = None;
        Some((seed.to_string(), c))
    };
    match (parse(saved), parse(now)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A one-line account of how two fingerprints differ (seed, or which config fields).
pub fn describe_mismatch(saved: &str, now: &str) -> String {
    let split = |s: &str| -> (String, serde_json::Value) {
        let (seed, body) = s.split_once(';').unwrap_or(("", s));
        (
            seed.to_string(),
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    };
    let (s_seed, s_cfg) = split(saved);
    let (n_seed, n_cfg) = split(now);
    let mut diffs = Vec::new();
    if s_seed != n_seed {
        diffs.push(format!(
            "seed ({} vs {})",
            s_seed.trim_start_matches("seed="),
            n_seed.trim_start_matches("seed=")
        ));
    }
    if let (Some(a), Some(b)) = (s_cfg.as_object(), n_cfg.as_object()) {
        for (k, va) in a {
            match b.get(k) {
                Some(vb) if vb == va => {}
                Some(vb) => diffs.push(format!("{k} ({va} vs {vb})")),
                None => diffs.push(k.clone()),
            }
        }
    }
    if diffs.is_empty() {
        diffs.push("the training config".into());
    }
    format!(
        "the interrupted run used a different {} than this one",
        diffs.join(", ")
    )
}

fn disk_dtype<T: Real>() -> DiskDtype {
    // f64 backends (gradient checks, tests) keep every bit across a resume too.
    if T::NAME == "f64" {
        DiskDtype::F64
    } else {
        DiskDtype::F32
    }
}

/// The metadata both files carry (the model layer adds the model config under `config`).
fn common_meta(cfg: &TrainConfig, state: &TrainState) -> HashMap<String, String> {
    let stage = if state.epochs_done[1] > 0 { 2 } else { 1 };
    let mut m = HashMap::new();
    m.insert(
        META_TRAIN_CONFIG.to_string(),
        serde_json::to_string(cfg).unwrap_or_default(),
    );
    m.insert(META_STAGE.to_string(), stage.to_string());
    m.insert(META_SEED.to_string(), state.seed.to_string());
    ModelMeta {
        input_size: cfg.size,
        slices: cfg.slices,
        slice_threshold: state.slice_threshold,
        input_json: Some(serde_json::to_string(&cfg.input).unwrap_or_default()),
        head_pooling: cfg.stage2_pooling,
        provenance: Some(state.provenance.clone()),
    }
    .write(&mut m);
    if let (Some(u), true) = (&cfg.unet, state.unet.epochs_done > 0) {
        m.insert(
            META_UNET_TRAIN.to_string(),
            serde_json::to_string(u).unwrap_or_default(),
        );
    }
    m
}

/// Writes the best model: every tensor under its PyTorch name (the U-Net's under `unet.`
/// when there is one), plus the metadata.
pub fn save_model<B: Backend>(
    net: &IchNet<B>,
    unet: Option<&UNet<B>>,
    path: &Path,
    cfg: &TrainConfig,
    state: &TrainState,
) -> Result<(), TrainError> {
    let opts = SaveOptions {
        dtype: disk_dtype::<B::T>(),
        optimizer: false,
        extra: common_meta(cfg, state),
    };
    let sections = match unet {
        Some(u) => vec![unet_ckpt::section(u)?],
        None => Vec::new(),
    };
    Ok(mcheck::save_with(net, &sections, path, &opts)?)
}

/// Writes the resume checkpoint: the tensors, the optimizer states (the U-Net's too) and
/// the [`TrainState`].
pub fn save_resume<B: Backend>(
    net: &IchNet<B>,
    unet: Option<&UNet<B>>,
    path: &Path,
    cfg: &TrainConfig,
    state: &TrainState,
) -> Result<(), TrainError> {
    let mut extra = common_meta(cfg, state);
    extra.insert(
        META_STATE.into(),
        serde_json::to_string(state).map_err(|e| io_err(path, e))?,
    );
    let opts = SaveOptions {
        dtype: disk_dtype::<B::T>(),
        optimizer: true,
        extra,
    };
    let sections = match unet {
        Some(u) => vec![unet_ckpt::section_with_opt(u)?],
        None => Vec::new(),
    };
    Ok(mcheck::save_with(net, &sections, path, &opts)?)
}

/// Loads the U-Net's tensors and optimizer state from a resume checkpoint into `unet`.
pub fn load_unet_resume<B: Backend>(unet: &mut UNet<B>, path: &Path) -> Result<(), TrainError> {
    let (tensors, metadata) = mcheck::read_tensors(path)?;
    unet_ckpt::assign(unet, &tensors, unet_ckpt::PREFIX, path)?;
    if !unet_ckpt::load_opt(unet, &tensors, &metadata, path)? {
        return Err(io_err(path, "the U-Net's optimizer state is missing"));
    }
    Ok(())
}

/// Loads the model tensors of `path` into `net` (names and shapes must match exactly).
pub fn load_params<B: Backend>(net: &mut IchNet<B>, path: &Path) -> Result<(), TrainError> {
    mcheck::load_into(net, path)?;
    Ok(())
}

/// Loads the tensors and the optimizer state of a resume checkpoint into `net`.
pub fn load_resume<B: Backend>(net: &mut IchNet<B>, path: &Path) -> Result<(), TrainError> {
    let loaded = mcheck::load_into(net, path)?;
    if !loaded.optimizer_restored && loaded.metadata.contains_key("opt_steps") {
        return Err(io_err(path, "the optimizer state did not load"));
    }
    Ok(())
}
