//! The network's hyper-parameters ([`ModelConfig`]): block type, blocks per stage, widths,
//! LSTM and head sizes, batch-norm constants. Serialised as JSON into checkpoints and read
//! from the PyTorch fixtures' metadata. Knows nothing about buffers or backends.

use super::ModelError;
use serde::{Deserialize, Serialize};

/// Upper bounds of the config's sizes. A model file is input, and every size is allocated:
/// a `base_width` of 10^6 asks for 36 TB. The bounds leave room far beyond ResNet-152
/// (`[3, 8, 36, 3]`, width 64) and the paper's LSTM (3 x 256); [`MAX_PARAMETERS`] bounds
/// the total.
pub const MAX_BASE_WIDTH: usize = 1024;
pub const MAX_BLOCKS_PER_STAGE: usize = 256;
pub const MAX_STAGES: usize = 8;
pub const MAX_LSTM_HIDDEN: usize = 16384;
pub const MAX_LSTM_LAYERS: usize = 64;
pub const MAX_HEAD_LAYERS: usize = 16;
pub const MAX_HEAD_WIDTH: usize = 1 << 16;
pub const MAX_IN_CHANNELS: usize = 64;
/// Most parameters (trainables and running statistics) of a network: 2^30, 4 GiB in f32.
pub const MAX_PARAMETERS: u128 = 1 << 30;

/// torchvision's two residual block types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-10/18/34), expansion 1.
    Basic,
    /// 1x1 -> 3x3 (strided) -> 1x1 with expansion 4 (ResNet-50/101). The fixtures' writer
    /// names it after its Python class, `bottle`.
    #[serde(alias = "bottle")]
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of stage width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

fn default_head() -> Vec<usize> {
    vec![128, 64]
}
fn default_eps() -> f64 {
    1e-5
}
fn default_momentum() -> f64 {
    0.1
}
fn default_in_channels() -> usize {
    3
}
fn default_lstm_layers() -> usize {
    1
}

/// The whole topology. `layers` holds the number of blocks per stage (torchvision:
/// `[2,2,2,2]` = ResNet-18, `[3,4,6,3]` = 34 basic / 50 bottleneck, `[3,4,23,3]` = 101);
/// fewer than four stages end the striding earlier (larger feature maps for the CAM).
/// `head` holds the hidden widths of the per-slice head; its final `Linear(.., 1)` is
/// implicit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub block: BlockKind,
    pub layers: Vec<usize>,
    pub base_width: usize,
    pub lstm_hidden: usize,
    #[serde(default = "default_lstm_layers")]
    pub lstm_layers: usize,
    #[serde(default = "default_head")]
    pub head: Vec<usize>,
    #[serde(default = "default_eps")]
    pub bn_eps: f64,
    #[serde(default = "default_momentum")]
    pub bn_momentum: f64,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
}

/// The format of the `config` metadata of the PyTorch fixtures (extra keys are ignored);
/// `head` there includes the final output width 1.
#[derive(Deserialize)]
struct FixtureConfig {
    block: BlockKind,
    layers: Vec<usize>,
    base_width: usize,
    lstm_hidden: usize,
    #[serde(default = "default_lstm_layers")]
    lstm_layers: usize,
    #[serde(default)]
    head: Option<Vec<usize>>,
    #[serde(default = "default_eps")]
    bn_eps: f64,
    #[serde(default = "default_momentum")]
    bn_momentum: f64,
    #[serde(default = "default_in_channels")]
    in_channels: usize,
}

impl ModelConfig {
    /// The small CPU configuration: three basic stages of one block, base width 8, LSTM 1x32.
    pub fn tiny() -> Self {
        ModelConfig {
            block: BlockKind::Basic,
            layers: vec![1, 1, 1],
            base_width: 8,
            lstm_hidden: 32,
            lstm_layers: 1,
            head: default_head(),
            bn_eps: default_eps(),
            bn_momentum: default_momentum(),
            in_channels: 3,
        }
    }

    /// The authors' configuration: ResNet-101, LSTM 3x256.
    pub fn resnet101_lstm() -> Self {
        ModelConfig {
            block: BlockKind::Bottleneck,
            layers: vec![3, 4, 23, 3],
            base_width: 64,
            lstm_hidden: 256,
            lstm_layers: 3,
            head: default_head(),
            bn_eps: default_eps(),
            bn_momentum: default_momentum(),
            in_channels: 3,
        }
    }

    /// Reads the fixture / checkpoint metadata format: keys `block`, `layers`, `base_width`,
    /// `lstm_hidden`, `lstm_layers`, `head` (ending in the output width 1), `bn_eps`,
    /// `bn_momentum`, optionally `in_channels`; other keys are ignored.
    pub fn from_fixture_json(json: &str) -> Result<Self, ModelError> {
        let f: FixtureConfig = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("cannot parse the model config JSON: {e}")))?;
        let head = match f.head {
            None => default_head(),
            Some(mut h) => {
                if h.last() != Some(&1) {
                    return Err(ModelError::Config(format!(
                        "`head` {h:?} must end with the output width 1"
                    )));
                }
                h.pop();
                h
            }
        };
        let cfg = ModelConfig {
            block: f.block,
            layers: f.layers,
            base_width: f.base_width,
            lstm_hidden: f.lstm_hidden,
            lstm_layers: f.lstm_layers,
            head,
            bn_eps: f.bn_eps,
            bn_momentum: f.bn_momentum,
            in_channels: f.in_channels,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the fixture format (the one [`ModelConfig::from_fixture_json`] reads).
    pub fn to_fixture_json(&self) -> String {
        let mut head = self.head.clone();
        head.push(1);
        serde_json::json!({
            "block": self.block,
            "layers": self.layers,
            "base_width": self.base_width,
            "lstm_hidden": self.lstm_hidden,
            "lstm_layers": self.lstm_layers,
            "head": head,
            "bn_eps": self.bn_eps,
            "bn_momentum": self.bn_momentum,
            "in_channels": self.in_channels,
        })
        .to_string()
    }

    /// Checks that every size is positive and within its bound (`MAX_*`), that the total
    /// parameter count is at most [`MAX_PARAMETERS`] (checked arithmetic, before anything is
    /// allocated), and that the constants are usable.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.layers.is_empty() || self.layers.len() > MAX_STAGES {
            return bad(format!(
                "`layers` must list 1 to {MAX_STAGES} stages, got {:?}",
                self.layers
            ));
        }
        if self.layers.contains(&0) {
            return bad(format!(
                "every stage needs at least one block, got {:?}",
                self.layers
            ));
        }
        if self.base_width == 0
            || self.lstm_hidden == 0
            || self.lstm_layers == 0
            || self.in_channels == 0
        {
            return bad(
                "base_width, lstm_hidden, lstm_layers and in_channels must be at least 1".into(),
            );
        }
        if self.head.contains(&0) {
            return bad(format!(
                "head widths must be at least 1, got {:?}",
                self.head
            ));
        }
        let over = |name: &str, v: usize, max: usize| {
            (v > max).then(|| format!("`{name}` is {v}, more than the most allowed, {max}"))
        };
        let too_big = over("base_width", self.base_width, MAX_BASE_WIDTH)
            .or_else(|| {
                let m = self.layers.iter().copied().max().unwrap_or(0);
                over("layers", m, MAX_BLOCKS_PER_STAGE)
            })
            .or_else(|| over("lstm_hidden", self.lstm_hidden, MAX_LSTM_HIDDEN))
            .or_else(|| over("lstm_layers", self.lstm_layers, MAX_LSTM_LAYERS))
            .or_else(|| over("in_channels", self.in_channels, MAX_IN_CHANNELS))
            .or_else(|| over("head` length (`head", self.head.len(), MAX_HEAD_LAYERS))
            .or_else(|| {
                let m = self.head.iter().copied().max().unwrap_or(0);
                over("head", m, MAX_HEAD_WIDTH)
            });
        if let Some(m) = too_big {
            return bad(m);
        }
        match super::memory::param_counts(self) {
            Some(c) if c.total <= MAX_PARAMETERS => {}
            Some(c) => {
                return bad(format!(
                    "{} parameters, more than the most allowed, {MAX_PARAMETERS}",
                    c.total
                ))
            }
            None => return bad("the parameter count overflows".into()),
        }
        if !(self.bn_eps > 0.0 && self.bn_eps.is_finite()) {
            return bad(format!("bn_eps must be positive, got {}", self.bn_eps));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return bad(format!(
                "bn_momentum must be in [0, 1], got {}",
                self.bn_momentum
            ));
        }
        Ok(())
    }

    /// Channels of the last stage (the pooled feature length, the fc's input).
    pub fn feature_channels(&self) -> usize {
        self.base_width * (1usize << (self.layers.len() - 1)) * self.block.expansion()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_json_round_trip() {
        let j = r#"{"block": "bottleneck", "layers": [1, 1, 1, 1], "base_width": 4, "lstm_hidden": 8,
            "lstm_layers": 1, "head": [128, 64, 1], "batch": 1, "bn_eps": 1e-05, "bn_momentum": 0.1}"#;
        let c = ModelConfig::from_fixture_json(j).unwrap();
        assert_eq!(c.block, BlockKind::Bottleneck);
        assert_eq!(c.head, vec![128, 64]);
        assert_eq!(c.feature_channels(), 4 * 8 * 4);
        assert_eq!(
            ModelConfig::from_fixture_json(&c.to_fixture_json()).unwrap(),
            c
        );
    }

    #[test]
    fn rejects_bad_configs() {
        let j = r#"{"block": "basic", "layers": [], "base_width": 4, "lstm_hidden": 8}"#;
        assert!(ModelConfig::from_fixture_json(j).is_err());
        let j = r#"{"block": "wide", "layers": [1], "base_width": 4, "lstm_hidden": 8}"#;
        assert!(ModelConfig::from_fixture_json(j).is_err());
        let j =
            r#"{"block": "basic", "layers": [1], "base_width": 4, "lstm_hidden": 8, "head": [3]}"#;
        assert!(ModelConfig::from_fixture_json(j).is_err());
    }

    #[test]
    fn rejects_sizes_past_their_bounds_before_allocating() {
        let with = |k: &str, v: serde_json::Value| {
            let mut j = serde_json::json!({"block": "basic", "layers": [1, 1], "base_width": 4,
                "lstm_hidden": 8});
            j[k] = v;
            j
        };
        let mut whole = with("base_width", 1024.into());
        whole["lstm_hidden"] = 16384.into();
        whole["lstm_layers"] = 64.into();
        for (j, what) in [
            (with("base_width", 1_000_000.into()), "base_width"),
            (with("base_width", u64::MAX.into()), "base_width"),
            (with("in_channels", 10_000_000.into()), "in_channels"),
            (with("lstm_layers", 1_000_000.into()), "lstm_layers"),
            (with("lstm_hidden", u64::MAX.into()), "lstm_hidden"),
            (with("layers", serde_json::json!([1_000_000, 1])), "layers"),
            (with("head", serde_json::json!([1_000_000_000, 1])), "head"),
            // Each size within its bound, the whole too large.
            (whole, "parameters"),
        ] {
            let e = ModelConfig::from_fixture_json(&j.to_string())
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{j}: {e}");
        }
        assert!(ModelConfig::resnet101_lstm().validate().is_ok());
    }
}
