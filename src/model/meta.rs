//! What a trained model file says about itself besides its tensors, for whoever uses it:
//! the square input size and the sequence length it was trained at, the calibrated slice
//! threshold, its input recipe (the data layer's `InputSpec` as JSON, decoded by the
//! caller), how its stage-2 head pools the class map ([`HeadPooling`]) and how it was
//! trained ([`Provenance`]). One module writes and reads these safetensors metadata keys
//! ([`ModelMeta`]). Knows nothing about CT, datasets or the training loop.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The square input size the model was trained at.
pub const META_INPUT_SIZE: &str = "ichcam.input_size";
/// The stage-1 sequence length.
pub const META_SLICES: &str = "ichcam.slices";
/// The calibrated slice probability threshold (absent: 0.5).
pub const META_SLICE_THRESHOLD: &str = "ichcam.slice_threshold";
/// The input recipe JSON (windows, head crop; absent: the authors' input).
pub const META_INPUT: &str = "ichcam.input";
/// How the stage-2 head pools its class map ([`HeadPooling`] JSON; absent: the mean, fc on
/// the averaged features).
pub const META_HEAD_POOLING: &str = "ichcam.head_pooling";
/// How the model was trained: the [`Provenance`] JSON (preset, data, slice counts, date).
pub const META_PROVENANCE: &str = "ichcam.provenance";

/// How the stage-2 head turns its class map (the fc weights applied at every location of the
/// last block's features: the CAM before normalisation) into the slice's logit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadPooling {
    /// The authors': fc on the globally averaged features (= the class map's mean).
    #[default]
    Mean,
    /// The mean of the class map's highest `frac` of locations (at least one): the logit
    /// cannot grow with the area of brain in the slice, only with local evidence, so the
    /// class map has to peak where the evidence is.
    TopK { frac: f64 },
}

impl HeadPooling {
    /// The pooled value of one class map and the locations it took (for the gradient).
    pub fn pool(&self, map: &[f32]) -> (f64, Vec<usize>) {
        let n = map.len();
        if n == 0 {
            return (0.0, Vec::new());
        }
        let k = match *self {
            HeadPooling::Mean => n,
            HeadPooling::TopK { frac } => ((frac * n as f64).round() as usize).clamp(1, n),
        };
        let mut idx: Vec<usize> = (0..n).collect();
        if k < n {
            idx.select_nth_unstable_by(k - 1, |&a, &b| map[b].total_cmp(&map[a]));
            idx.truncate(k);
        }
        let s: f64 = idx.iter().map(|&i| map[i] as f64).sum();
        (s / k as f64, idx)
    }
}

/// How a model was trained, recorded in its metadata.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The training preset's name (`cpu`, `tiny`, `small`, `paper`, `custom`).
    pub preset: String,
    /// The data's name (the dataset folder's name), when known.
    pub data: Option<String>,
    pub train_volumes: usize,
    pub train_slices: usize,
    pub train_positive_slices: usize,
    pub val_volumes: usize,
    pub val_slices: usize,
    pub val_positive_slices: usize,
    /// UTC start of the run, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started: String,
}

/// A metadata value that is missing or unreadable.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no `{0}` in the metadata: is this a model written by `ichcam train`?")]
    Missing(&'static str),
    #[error("unreadable `{key}`: {err}")]
    Unreadable { key: &'static str, err: String },
}

/// The metadata of a trained model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMeta {
    pub input_size: usize,
    pub slices: usize,
    /// The slice threshold training calibrated (None: not recorded, or outside [0, 1]).
    pub slice_threshold: Option<f64>,
    /// The input recipe's JSON as written (None: the authors' input); see [`ModelMeta::input`].
    pub input_json: Option<String>,
    pub head_pooling: HeadPooling,
    pub provenance: Option<Provenance>,
}

impl ModelMeta {
    /// Reads the keys from a file's metadata: the input size and the sequence length must be
    /// positive integers; the others may be absent.
    pub fn read(meta: &HashMap<String, String>) -> Result<Self, MetaError> {
        let positive = |k: &'static str| {
            meta.get(k)
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
                .ok_or(MetaError::Missing(k))
        };
        let input_size = positive(META_INPUT_SIZE)?;
        let slices = positive(META_SLICES)?;
        let slice_threshold = meta
            .get(META_SLICE_THRESHOLD)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|t| (0.0..=1.0).contains(t));
        Ok(ModelMeta {
            input_size,
            slices,
            slice_threshold,
            input_json: meta.get(META_INPUT).cloned(),
            head_pooling: json(meta, META_HEAD_POOLING)?.unwrap_or_default(),
            // A record for people: an unreadable one does not make the model unusable.
            provenance: json(meta, META_PROVENANCE).ok().flatten(),
        })
    }

    /// The input recipe decoded as `T` (the data layer's `InputSpec`); None when the file
    /// records none.
    pub fn input<T: DeserializeOwned>(&self) -> Result<Option<T>, MetaError> {
        self.input_json
            .as_deref()
            .map(|j| decode(META_INPUT, j))
            .transpose()
    }

    /// Writes the keys into `meta`.
    pub fn write(&self, meta: &mut HashMap<String, String>) {
        meta.insert(META_INPUT_SIZE.into(), self.input_size.to_string());
        meta.insert(META_SLICES.into(), self.slices.to_string());
        if let Some(t) = self.slice_threshold {
            meta.insert(META_SLICE_THRESHOLD.into(), format!("{t}"));
        }
        if let Some(j) = &self.input_json {
            meta.insert(META_INPUT.into(), j.clone());
        }
        meta.insert(
            META_HEAD_POOLING.into(),
            serde_json::to_string(&self.head_pooling).unwrap_or_default(),
        );
        if let Some(p) = &self.provenance {
            meta.insert(
                META_PROVENANCE.into(),
                serde_json::to_string(p).unwrap_or_default(),
            );
        }
    }
}

fn decode<T: DeserializeOwned>(key: &'static str, j: &str) -> Result<T, MetaError> {
    serde_json::from_str(j).map_err(|e| MetaError::Unreadable {
        key,
        err: e.to_string(),
    })
}

fn json<T: DeserializeOwned>(
    meta: &HashMap<String, String>,
    key: &'static str,
) -> Result<Option<T>, MetaError> {
    meta.get(key).map(|j| decode(key, j)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_pooling_takes_the_top_fraction() {
        let m = [0.0f32, 5.0, 1.0, 4.0, 2.0, 3.0, -1.0, 0.5, 0.0, 0.0];
        let (v, idx) = HeadPooling::Mean.pool(&m);
        assert!((v - 1.45).abs() < 1e-9 && idx.len() == 10);
        let (v, mut idx) = HeadPooling::TopK { frac: 0.2 }.pool(&m);
        idx.sort();
        assert_eq!(idx, vec![1, 3]);
        assert!((v - 4.5).abs() < 1e-9);
        // At least one location.
        assert_eq!(HeadPooling::TopK { frac: 0.01 }.pool(&m).0, 5.0);
    }

    #[test]
    fn written_metadata_reads_back_and_bad_values_are_named() {
        let m = ModelMeta {
            input_size: 128,
            slices: 8,
            slice_threshold: Some(0.625),
            input_json: Some("{\"windows\":[]}".into()),
            head_pooling: HeadPooling::TopK { frac: 0.25 },
            provenance: Some(Provenance {
                preset: "tiny".into(),
                ..Provenance::default()
            }),
        };
        let mut map = HashMap::new();
        m.write(&mut map);
        assert_eq!(ModelMeta::read(&map).unwrap(), m);
        let mut bad = map.clone();
        bad.remove(META_SLICES);
        let e = ModelMeta::read(&bad).unwrap_err();
        assert!(e.to_string().contains("ichcam.slices"), "{e}");
        bad = map.clone();
        bad.insert(META_HEAD_POOLING.into(), "\"median\"".into());
        let e = ModelMeta::read(&bad).unwrap_err();
        assert!(
            e.to_string().contains("unreadable `ichcam.head_pooling`"),
            "{e}"
        );
        // An out-of-range threshold is ignored, not an error.
        bad = map;
        bad.insert(META_SLICE_THRESHOLD.into(), "1.5".into());
        assert_eq!(ModelMeta::read(&bad).unwrap().slice_threshold, None);
    }
}
