//! The U-Net's hyper-parameters ([`UNetConfig`]) and their JSON form, the `config` metadata
//! of the unet-parity fixtures (`kind = "unet2d"`) and the `unet_config` metadata of a model
//! file. Knows nothing about buffers or backends.

use crate::model::ModelError;
use serde::Deserialize;

/// The `kind` of a U-Net config.
pub const UNET_KIND: &str = "unet2d";
/// The loss names of the JSON form.
const LOSS_DICE: &str = "soft_dice";
const LOSS_DICE_BCE: &str = "soft_dice+bce";

/// The authors' `UNet2D`: `depth` encoder levels of `features * 2^l` channels (conv3x3 with
/// bias -> ReLU -> BatchNorm, twice), a bottleneck of `features * 2^depth`, transposed-conv
/// 2x2/2 up, `[up, skip]` concatenation, the same blocks back up, a 1x1 conv and a sigmoid.
/// The loss is the soft Dice (`dice_eps`), plus `bce_weight` times the mean BCE of the
/// logits when `bce_weight > 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub features: usize,
    pub depth: usize,
    pub bn_eps: f64,
    pub bn_momentum: f64,
    pub dice_eps: f64,
    pub bce_weight: f64,
}

/// The JSON form: the unet-parity fixtures' `config` metadata (other keys are ignored).
#[derive(Deserialize)]
struct Json {
    kind: String,
    in_channels: usize,
    #[serde(default = "one")]
    out_channels: usize,
    features: usize,
    #[serde(default = "four")]
    depth: usize,
    #[serde(default = "eps")]
    bn_eps: f64,
    #[serde(default = "momentum")]
    bn_momentum: f64,
    #[serde(default = "dice_loss")]
    loss: String,
    #[serde(default = "dice_eps")]
    dice_eps: f64,
    #[serde(default)]
    bce_weight: Option<f64>,
}

fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn eps() -> f64 {
    1e-5
}
fn momentum() -> f64 {
    0.1
}
fn dice_loss() -> String {
    LOSS_DICE.into()
}
fn dice_eps() -> f64 {
    1e-7
}

/// The `kind` field of a config JSON, if it has one (`"unet2d"` for a U-Net).
pub fn config_kind(json: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    serde_json::from_str::<Kind>(json).ok().and_then(|k| k.kind)
}

impl UNetConfig {
    /// The authors' network: one input channel (the brain window), features 16, depth 4.
    pub fn authors(in_channels: usize) -> Self {
        UNetConfig {
            in_channels,
            out_channels: 1,
            features: 16,
            depth: 4,
            bn_eps: eps(),
            bn_momentum: momentum(),
            dice_eps: dice_eps(),
            bce_weight: 0.0,
        }
    }

    /// Reads the JSON form (`kind` must be `"unet2d"`; `loss` `"soft_dice"` or
    /// `"soft_dice+bce"`, the latter with `bce_weight`, default 1).
    pub fn from_json(json: &str) -> Result<Self, ModelError> {
        let j: Json = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("cannot parse the U-Net config JSON: {e}")))?;
        if j.kind != UNET_KIND {
            return Err(ModelError::Config(format!(
                "`kind` is {:?}, not {UNET_KIND:?}",
                j.kind
            )));
        }
        let bce_weight = match (j.loss.as_str(), j.bce_weight) {
            (LOSS_DICE, None) => 0.0,
            (LOSS_DICE, Some(0.0)) => 0.0,
            (LOSS_DICE, Some(w)) => {
                return Err(ModelError::Config(format!(
                    "loss {LOSS_DICE:?} with bce_weight {w}: use {LOSS_DICE_BCE:?}"
                )))
            }
            (LOSS_DICE_BCE, w) => w.unwrap_or(1.0),
            (other, _) => {
                return Err(ModelError::Config(format!(
                    "unknown loss {other:?}: use {LOSS_DICE:?} or {LOSS_DICE_BCE:?}"
                )))
            }
        };
        let cfg = UNetConfig {
            in_channels: j.in_channels,
            out_channels: j.out_channels,
            features: j.features,
            depth: j.depth,
            bn_eps: j.bn_eps,
            bn_momentum: j.bn_momentum,
            dice_eps: j.dice_eps,
            bce_weight,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the JSON form ([`UNetConfig::from_json`] reads it back).
    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "kind": UNET_KIND,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "features": self.features,
            "depth": self.depth,
            "bn_eps": self.bn_eps,
            "bn_momentum": self.bn_momentum,
            "loss": if self.bce_weight > 0.0 { LOSS_DICE_BCE } else { LOSS_DICE },
            "dice_eps": self.dice_eps,
        });
        if self.bce_weight > 0.0 {
            v["bce_weight"] = serde_json::json!(self.bce_weight);
        }
        v.to_string()
    }

    /// Checks sizes and constants.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.in_channels == 0 || self.out_channels == 0 || self.features == 0 {
            return bad("in_channels, out_channels and features must be at least 1".into());
        }
        if !(1..=MAX_DEPTH).contains(&self.depth) {
            return bad(format!(
                "depth must be 1 to {MAX_DEPTH}, got {}",
                self.depth
            ));
        }
        if self
            .features
            .checked_mul(1 << self.depth)
            .is_none_or(|c| c > 1 << 16)
        {
            return bad(format!(
                "features {} * 2^{} channels at the bottleneck is too many",
                self.features, self.depth
            ));
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
        if !(self.dice_eps >= 0.0 && self.dice_eps.is_finite()) {
            return bad(format!(
                "dice_eps must be finite and not negative, got {}",
                self.dice_eps
            ));
        }
        if !(self.bce_weight >= 0.0 && self.bce_weight.is_finite()) {
            return bad(format!(
                "bce_weight must be finite and not negative, got {}",
                self.bce_weight
            ));
        }
        Ok(())
    }

    /// Channels of level `l` (0 = full resolution; `depth` = the bottleneck).
    pub fn channels(&self, l: usize) -> usize {
        self.features << l
    }

    /// What H and W must be divisible by: 2^depth (one 2x2 pooling per level).
    pub fn size_multiple(&self) -> usize {
        1 << self.depth
    }

    /// Checks an input size: H and W positive multiples of 2^depth.
    pub fn check_size(&self, h: usize, w: usize) -> Result<(), ModelError> {
        let m = self.size_multiple();
        if h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
            return Err(ModelError::Input(format!(
                "the U-Net of depth {} needs H and W divisible by {m} (one 2x2 pooling per level), got {h}x{w}",
                self.depth
            )));
        }
        Ok(())
    }
}

/// Bounds of a U-Net read from a model file (hostile input): the features and channels
/// must stay small enough that its parameters are allocated only after the budget check.
pub const MAX_FEATURES: usize = 1024;
pub const MAX_CHANNELS: usize = 64;

impl UNetConfig {
    /// Trainable scalars plus running statistics (checked arithmetic; `None` on overflow).
    pub fn tensor_count(&self) -> Option<u128> {
        let mut n: u128 = 0;
        let specs = super::tensors::Weights::<()>::specs(self)
            .into_iter()
            .chain(super::tensors::Stats::<()>::specs(self));
        for s in specs {
            let k = s
                .shape
                .iter()
                .try_fold(1u128, |a, &d| a.checked_mul(d as u128))?;
            n = n.checked_add(k)?;
        }
        Some(n)
    }

    /// Bytes of an eval-mode forward's activations for `n` images of `h x w` (elements of
    /// `elem` bytes): per level, the encoder's and decoder's two units (ReLU output and batch
    /// norm output each), the pooled map and the concatenation, about `21 * features` planes
    /// of the image's size in all, plus the input and the output. Training keeps about as
    /// much again for the gradients.
    pub fn activation_bytes(&self, n: usize, h: usize, w: usize, elem: usize) -> Option<u128> {
        let planes = 22u128
            .checked_mul(self.features as u128)?
            .checked_add(self.in_channels as u128 + 2 * self.out_channels as u128)?;
        planes
            .checked_mul(n as u128)?
            .checked_mul(h as u128)?
            .checked_mul(w as u128)?
            .checked_mul(elem as u128)
    }

    /// Checks the bounds of a config read from a file (before anything is allocated).
    pub fn check_bounds(&self) -> Result<(), ModelError> {
        self.validate()?;
        if self.features > MAX_FEATURES {
            return Err(ModelError::Config(format!(
                "features {} is over {MAX_FEATURES}",
                self.features
            )));
        }
        if self.in_channels > MAX_CHANNELS || self.out_channels > MAX_CHANNELS {
            return Err(ModelError::Config(format!(
                "{} input / {} output channels: at most {MAX_CHANNELS}",
                self.in_channels, self.out_channels
            )));
        }
        match self.tensor_count() {
            Some(n) if n <= 1 << 30 => Ok(()),
            _ => Err(ModelError::Config("more than 2^30 parameters".to_string())),
        }
    }
}

/// The deepest U-Net accepted (2^6 = 64: H and W multiples of 64).
pub const MAX_DEPTH: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_json_round_trip() {
        let j = r#"{"kind": "unet2d", "in_channels": 1, "out_channels": 1, "features": 4, "depth": 4,
            "bn_eps": 1e-05, "bn_momentum": 0.1, "loss": "soft_dice", "dice_eps": 1e-07}"#;
        let c = UNetConfig::from_json(j).unwrap();
        assert_eq!(c.features, 4);
        assert_eq!(c.bce_weight, 0.0);
        assert_eq!(UNetConfig::from_json(&c.to_json()).unwrap(), c);
        let b = UNetConfig {
            bce_weight: 0.5,
            ..c.clone()
        };
        assert_eq!(UNetConfig::from_json(&b.to_json()).unwrap(), b);
        assert_eq!(config_kind(j).as_deref(), Some("unet2d"));
        assert_eq!(config_kind(r#"{"block": "basic"}"#), None);
    }

    #[test]
    fn rejects_bad_configs_and_sizes() {
        for j in [
            r#"{"kind": "resnet", "in_channels": 1, "features": 4}"#,
            r#"{"kind": "unet2d", "in_channels": 0, "features": 4}"#,
            r#"{"kind": "unet2d", "in_channels": 1, "features": 4, "depth": 0}"#,
            r#"{"kind": "unet2d", "in_channels": 1, "features": 4, "depth": 9}"#,
            r#"{"kind": "unet2d", "in_channels": 1, "features": 4, "loss": "focal"}"#,
            r#"{"kind": "unet2d", "in_channels": 1, "features": 4, "loss": "soft_dice", "bce_weight": 1}"#,
            r#"{"kind": "unet2d", "in_channels": 1, "features": 4, "bn_eps": -1}"#,
            r#"{"kind": "unet2d", "in_channels": 1}"#,
        ] {
            assert!(UNetConfig::from_json(j).is_err(), "{j}");
        }
        let c = UNetConfig::authors(1);
        assert!(c.check_size(256, 48).is_ok());
        for (h, w) in [(0, 16), (24, 16), (16, 40), (8, 8)] {
            let e = c.check_size(h, w).unwrap_err().to_string();
            assert!(e.contains("divisible by 16"), "{e}");
        }
    }
}
