//! Training presets ([`TrainConfig`]): the network ([`ModelConfig`]), the input (windows,
//! head crop, size), the sequence length, batch sizes, epochs, optimizer, augmentation and
//! validation split. `paper` is the authors' setup and `small` a GPU-sized one (both for a
//! GPU); `cpu` is the default on a CPU (real head CT, well under 45 minutes for 51 patients
//! on two cores); `tiny` is the demo's (phantoms, about a minute). A config's [`TrainConfig::fingerprint`]
//! is stored in the resume checkpoint: a run only resumes under the same fingerprint.
//! Knows nothing about files or backends.

use super::augment::AugmentConfig;
use crate::data::InputSpec;
pub use crate::model::HeadPooling;
use crate::model::{ModelConfig, OptimizerConfig};
use crate::seg::RefineConfig;
use serde::{Deserialize, Serialize};

/// `--optimizer sgd|adam`: the same learning rate and weight decay under another optimizer
/// (SGD gets the authors' momentum 0.9, Adam PyTorch's defaults). `None` for another name.
pub fn switch_optimizer(o: &OptimizerConfig, kind: &str) -> Option<OptimizerConfig> {
    let (lr, weight_decay) = match *o {
        OptimizerConfig::Sgd {
            lr, weight_decay, ..
        }
        | OptimizerConfig::Adam {
            lr, weight_decay, ..
        } => (lr, weight_decay),
    };
    match (kind, o) {
        ("sgd", OptimizerConfig::Sgd { .. }) | ("adam", OptimizerConfig::Adam { .. }) => {
            Some(o.clone())
        }
        ("sgd", _) => Some(OptimizerConfig::Sgd {
            lr,
            momentum: 0.9,
            weight_decay,
        }),
        ("adam", _) => {
            let mut a = OptimizerConfig::adam(lr);
            if let OptimizerConfig::Adam {
                weight_decay: wd, ..
            } = &mut a
            {
                *wd = weight_decay;
            }
            Some(a)
        }
        _ => None,
    }
}

/// The optimizer's name as `--optimizer` spells it.
pub fn optimizer_name(o: &OptimizerConfig) -> &'static str {
    match o {
        OptimizerConfig::Sgd { .. } => "sgd",
        OptimizerConfig::Adam { .. } => "adam",
    }
}

/// Everything that defines a training run except the data, the seed and the device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The preset's name ("tiny", "small", "paper") or "custom".
    pub name: String,
    pub model: ModelConfig,
    /// In-plane input size (square): slices are resized to `size x size`.
    pub size: usize,
    /// Slices per stage-1 sequence (the authors: 32).
    pub slices: usize,
    /// Stride of the sliding windows over a volume (`slices` = no overlap); every slice is
    /// covered whatever the volume's length.
    pub seq_stride: usize,
    /// Sequences per stage-1 batch.
    pub batch: usize,
    pub epochs: usize,
    pub optimizer: OptimizerConfig,
    /// Single slices per stage-2 batch.
    pub stage2_batch: usize,
    pub stage2_epochs: usize,
    pub stage2_optimizer: OptimizerConfig,
    /// Fraction of the patients held out for validation.
    pub val_fraction: f64,
    /// `pos_weight` = negatives / positives of the training slices, clamped to this range.
    pub pos_weight_min: f64,
    pub pos_weight_max: f64,
    pub augment: AugmentConfig,
    /// How a volume becomes the model's input (windows, head crop); the authors' three
    /// windows of the whole field for configs written before it existed.
    #[serde(default)]
    pub input: InputSpec,
    /// How the stage-2 head pools its class map (the authors': the mean).
    #[serde(default)]
    pub stage2_pooling: HeadPooling,
    /// Stage 3: the U-Net on pseudo-masks (`None`: no stage 3, `--no-unet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet: Option<UNetTrainConfig>,
}

/// Which slices of a training volume get a pseudo-mask (and which are the U-Net's
/// negatives, with empty masks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PseudoFlags {
    /// The training set's own slice labels (the weak labels themselves): positive slices
    /// get the refinement of the stage-2 CAM, negative slices empty masks.
    #[default]
    Labels,
    /// The stage-2 head's flags (at its calibrated threshold), as the authors' test-time net
    /// would give them; negatives are slices neither labelled nor flagged.
    Stage2,
}

/// Stage 3: the authors' U-Net (conv-ReLU-BN blocks, transposed-conv up, skip concat,
/// sigmoid) trained on pseudo-masks: for every training volume, the stage-2 CAM refined
/// into a mask ([`RefineConfig`], as `ichcam segment` does) on the slices [`PseudoFlags`]
/// picks, empty masks on negative slices; the model's own input (windows, head box, size);
/// soft Dice (+ BCE); Adam; the validation patients' pseudo-masks decide the best epoch.
/// No ground-truth mask is ever read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetTrainConfig {
    pub features: usize,
    pub depth: usize,
    pub epochs: usize,
    /// Slices per batch.
    pub batch: usize,
    pub optimizer: OptimizerConfig,
    /// Weight of the mean BCE beside the soft Dice (0: Dice alone, the authors').
    pub bce_weight: f64,
    /// Negative slices (empty masks) drawn per positive slice in each epoch.
    pub negatives_per_positive: f64,
    /// Slices per epoch at least: when the positives and their share of negatives are
    /// fewer, the positives are drawn again (each draw augmented anew), so that a fold
    /// with few pseudo-masks still gets more optimizer steps (0: every positive once, the
    /// default: 512 measured worse by cross-validation, docs/accuracy.md).
    #[serde(default)]
    pub slices_per_epoch: usize,
    pub flags: PseudoFlags,
    /// The pseudo-masks' refinement, and its per-volume adjustments (component size in mL,
    /// saturation under the clip of clipped data).
    pub refine: RefineConfig,
    pub min_component_ml: Option<f64>,
    pub adapt_saturation: bool,
    /// Flips, shifts, rotations and intensity (the stage-1 ranges), the same geometry on
    /// the pseudo-mask.
    pub augment: bool,
}

impl UNetTrainConfig {
    /// For real head CT on a CPU (the `cpu` preset): features 8, depth 4, on the model's
    /// input; pseudo-masks of the real-CT refinement on the labelled positive slices.
    pub fn cpu() -> Self {
        UNetTrainConfig {
            features: 8,
            depth: 4,
            epochs: 20,
            batch: 8,
            optimizer: OptimizerConfig::adam(1e-3),
            bce_weight: 1.0,
            negatives_per_positive: 1.0,
            slices_per_epoch: 0,
            flags: PseudoFlags::Labels,
            refine: RefineConfig::real_ct(),
            min_component_ml: Some(crate::seg::refine::REAL_CT_MIN_COMPONENT_ML),
            adapt_saturation: true,
            augment: true,
        }
    }

    /// The authors' network (features 16) for a GPU preset.
    pub fn gpu() -> Self {
        UNetTrainConfig {
            features: 16,
            epochs: 30,
            batch: 16,
            ..Self::cpu()
        }
    }

    /// The U-Net for `in_channels` input windows.
    pub fn net(&self, in_channels: usize) -> crate::model::unet::UNetConfig {
        crate::model::unet::UNetConfig {
            features: self.features,
            depth: self.depth,
            bce_weight: self.bce_weight,
            ..crate::model::unet::UNetConfig::authors(in_channels)
        }
    }

    /// What must match for stage 3 to resume (everything but the epochs) with the run's seed.
    pub fn fingerprint(&self, seed: u64) -> String {
        let mut c = self.clone();
        c.epochs = 0;
        format!(
            "seed={seed};{}",
            serde_json::to_string(&c).unwrap_or_default()
        )
    }
}

/// A preset name that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown training config `{0}` (expected cpu, tiny, small or paper)")]
pub struct UnknownPreset(pub String);

/// The preset `--config auto` picks for a device: `small` on a GPU, `cpu` on a CPU.
pub fn default_preset_for(gpu: bool) -> &'static str {
    if gpu {
        "small"
    } else {
        "cpu"
    }
}

impl TrainConfig {
    /// `cpu`, `tiny`, `small` or `paper`.
    pub fn preset(name: &str) -> Result<Self, UnknownPreset> {
        match name {
            "cpu" => Ok(Self::cpu()),
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "paper" => Ok(Self::paper()),
            other => Err(UnknownPreset(other.to_string())),
        }
    }

    /// The CPU default: two basic stages of one block, width 16 (stride 8: a 12x12 CAM at
    /// 96x96 input; on phantoms it localises better than stride 16's 6x6, and 128x128 or
    /// three stages gave a lower demo Dice), LSTM 1x32, 16-slice sequences every 4 slices
    /// (more overlapping sequences per epoch: stage 1 starts to separate by epoch 3-7
    /// instead of 8-20); Adam 2e-3, 30 + 4 epochs (about a minute on two cores).
    pub fn tiny() -> Self {
        let mut model = ModelConfig::tiny();
        model.layers = vec![1, 1];
        model.base_width = 16;
        model.lstm_hidden = 32;
        TrainConfig {
            name: "tiny".into(),
            model,
            size: 96,
            slices: 16,
            seq_stride: 4,
            batch: 2,
            epochs: 30,
            optimizer: OptimizerConfig::adam(2e-3),
            stage2_batch: 32,
            stage2_epochs: 4,
            stage2_optimizer: OptimizerConfig::adam(1e-2),
            val_fraction: 0.2,
            pos_weight_min: 1.0,
            pos_weight_max: 10.0,
            augment: AugmentConfig::paper(),
            input: InputSpec::default(),
            stage2_pooling: HeadPooling::Mean,
            unet: None,
        }
    }

    /// The CPU default for real head CT: the slices cropped to the head and seen at
    /// 160x160 in three windows that suit brain-windowed data (brain, blood 50-90 HU,
    /// wide; [`InputSpec::head_ct`]); two basic stages of one block, width 16 (stride 8: a
    /// 20x20 CAM over the head), LSTM 1x32, 16-slice sequences every 8 slices; Adam 2e-3,
    /// 16 + 4 epochs.
    pub fn cpu() -> Self {
        let mut model = ModelConfig::tiny();
        model.layers = vec![1, 1];
        model.base_width = 16;
        model.lstm_hidden = 32;
        let input = InputSpec::head_ct();
        model.in_channels = input.channels();
        TrainConfig {
            name: "cpu".into(),
            model,
            size: 160,
            slices: 16,
            seq_stride: 8,
            batch: 2,
            epochs: 16,
            optimizer: OptimizerConfig::adam(2e-3),
            stage2_batch: 32,
            stage2_epochs: 4,
            stage2_optimizer: OptimizerConfig::adam(1e-2),
            val_fraction: 0.2,
            pos_weight_min: 1.0,
            pos_weight_max: 10.0,
            augment: AugmentConfig::paper(),
            input,
            stage2_pooling: HeadPooling::Mean,
            unet: Some(UNetTrainConfig::cpu()),
        }
    }

    /// A GPU-sized default: ResNet-18, LSTM 2x256, 32 slices at 256x256 of the head
    /// ([`InputSpec::head_ct`]).
    pub fn small() -> Self {
        let mut model = ModelConfig::resnet101_lstm();
        model.block = crate::model::BlockKind::Basic;
        model.layers = vec![2, 2, 2, 2];
        model.base_width = 64;
        model.lstm_hidden = 256;
        model.lstm_layers = 2;
        let input = InputSpec::head_ct();
        model.in_channels = input.channels();
        TrainConfig {
            name: "small".into(),
            model,
            size: 256,
            slices: 32,
            seq_stride: 16,
            batch: 4,
            epochs: 30,
            optimizer: OptimizerConfig::adam(1e-3),
            stage2_batch: 128,
            stage2_epochs: 5,
            stage2_optimizer: OptimizerConfig::adam(1e-3),
            val_fraction: 0.2,
            pos_weight_min: 1.0,
            pos_weight_max: 10.0,
            augment: AugmentConfig::paper(),
            input,
            stage2_pooling: HeadPooling::Mean,
            unet: Some(UNetTrainConfig::gpu()),
        }
    }

    /// The authors' setup: ResNet-101, LSTM 3x256, 32 slices at 512x512, SGD lr 1e-3
    /// momentum 0.9.
    pub fn paper() -> Self {
        TrainConfig {
            name: "paper".into(),
            model: ModelConfig::resnet101_lstm(),
            size: 512,
            slices: 32,
            seq_stride: 32,
            batch: 1,
            epochs: 30,
            optimizer: OptimizerConfig::paper_sgd(),
            stage2_batch: 32,
            stage2_epochs: 5,
            stage2_optimizer: OptimizerConfig::paper_sgd(),
            val_fraction: 0.2,
            pos_weight_min: 1.0,
            pos_weight_max: 10.0,
            augment: AugmentConfig::paper(),
            input: InputSpec::default(),
            stage2_pooling: HeadPooling::Mean,
            unet: Some(UNetTrainConfig::gpu()),
        }
    }

    /// Checks the numbers a user can set; a message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| e.to_string())?;
        if self.input.channels() != self.model.in_channels {
            return Err(format!(
                "the input has {} channel windows but the model takes {} channels",
                self.input.channels(),
                self.model.in_channels
            ));
        }
        if !(0.0..=0.5).contains(&self.input.crop_margin) {
            return Err(format!(
                "crop margin {} must be in [0, 0.5]",
                self.input.crop_margin
            ));
        }
        if let HeadPooling::TopK { frac } = self.stage2_pooling {
            if !(frac > 0.0 && frac <= 1.0) {
                return Err(format!("top-k pooling fraction {frac} must be in (0, 1]"));
            }
        }
        if self.size < 16 {
            return Err(format!("input size {} is below 16 pixels", self.size));
        }
        if self.slices == 0 || self.batch == 0 || self.stage2_batch == 0 {
            return Err("slices, batch and stage-2 batch must be at least 1".into());
        }
        if self.seq_stride == 0 || self.seq_stride > self.slices {
            return Err(format!(
                "sequence stride {} must be in 1..={}",
                self.seq_stride, self.slices
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(format!(
                "validation fraction {} must be in [0, 1)",
                self.val_fraction
            ));
        }
        for o in [&self.optimizer, &self.stage2_optimizer] {
            if !(o.lr() > 0.0 && o.lr().is_finite()) {
                return Err(format!("learning rate {} must be positive", o.lr()));
            }
        }
        if !(self.pos_weight_min > 0.0 && self.pos_weight_min <= self.pos_weight_max) {
            return Err("pos_weight range must be positive and ordered".into());
        }
        if let Some(u) = &self.unet {
            u.net(self.input.channels())
                .check_bounds()
                .map_err(|e| format!("stage-3 U-Net: {e}"))?;
            u.net(self.input.channels())
                .check_size(self.size, self.size)
                .map_err(|e| format!("stage-3 U-Net at the input size: {e}"))?;
            if u.batch < 2 {
                return Err("stage-3 batch must be at least 2 (batch norm)".into());
            }
            if !(u.negatives_per_positive >= 0.0 && u.negatives_per_positive.is_finite()) {
                return Err(
                    "stage-3 negatives per positive must be finite and not negative".into(),
                );
            }
            if !(u.optimizer.lr() > 0.0 && u.optimizer.lr().is_finite()) {
                return Err(format!(
                    "stage-3 learning rate {} must be positive",
                    u.optimizer.lr()
                ));
            }
        }
        Ok(())
    }

    /// What must match for a checkpoint of stages 1 and 2 to be resumed: everything but the
    /// epoch counts (which may be raised to train longer) and stage 3. Includes the run's seed.
    pub fn fingerprint(&self, seed: u64) -> String {
        let mut c = self.clone();
        c.epochs = 0;
        c.stage2_epochs = 0;
        // Stage 3 has its own fingerprint (`UNetTrainConfig::fingerprint`): a finished
        // two-stage run can go on to stage 3.
        c.unet = None;
        let body = serde_json::to_string(&c).unwrap_or_default();
        format!("seed={seed};{body}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_fingerprint_ignores_epochs() {
        for n in ["cpu", "tiny", "small", "paper"] {
            let c = TrainConfig::preset(n).unwrap();
            c.validate().unwrap();
            let mut d = c.clone();
            d.epochs += 5;
            assert_eq!(c.fingerprint(1), d.fingerprint(1));
            assert_ne!(c.fingerprint(1), c.fingerprint(2));
            d.size += 16;
            assert_ne!(c.fingerprint(1), d.fingerprint(1));
        }
        assert!(TrainConfig::preset("huge").is_err());
        assert_eq!(TrainConfig::paper().model.layers, vec![3, 4, 23, 3]);
    }

    #[test]
    fn cpu_preset_channels_follow_its_input() {
        assert_eq!(
            TrainConfig::preset("cpu").unwrap().model.in_channels,
            TrainConfig::cpu().input.channels()
        );
    }

    #[test]
    fn optimizer_switch() {
        let o = OptimizerConfig::adam(0.01);
        let s = switch_optimizer(&o, "sgd").unwrap();
        assert_eq!(optimizer_name(&s), "sgd");
        assert_eq!(s.lr(), 0.01);
        assert_eq!(switch_optimizer(&s, "adam").unwrap(), o);
        assert!(switch_optimizer(&o, "rmsprop").is_none());
    }
}
