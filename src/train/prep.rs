//! The training input pipeline, up to batches: every volume is windowed, cropped and
//! resized in-plane as the config's [`InputSpec`] says, once per run, and cached in memory; stage 1 reads
//! it as sliding-window sequences of S slices (every slice seen), stage 2 as single slices;
//! a batch is gathered from the cache and augmented on the fly (one transform per
//! sequence, deterministic from the seed, the epoch and the item's index).
//! Stage 3 reads the native volumes again ([`Native`]: images only, never masks).
//! Knows nothing about the network: it produces host buffers and labels.

use super::augment::{AugmentConfig, Transform};
use super::TrainError;
use crate::data::crop::CropBox;
use crate::data::dataset::Dataset;
use crate::data::sequence::{self, SeqMode, SeqWindow};
use crate::data::InputSpec;
use ndarray::Array3;
use rayon::prelude::*;

/// A labelled volume in memory (what the demo hands over when it already holds its cases).
#[derive(Clone, Debug)]
pub struct TrainCase {
    pub id: String,
    /// The unit of the train/validation split.
    pub patient: String,
    /// HU, `[z, y, x]`.
    pub hu: Array3<f32>,
    /// One label per slice (length = depth).
    pub labels: Vec<bool>,
    /// Voxel spacing `[z, y, x]` in mm (stage 3's pseudo-masks size components in mL).
    pub spacing: [f64; 3],
}

/// Where the training cases come from.
pub enum TrainInput<'a> {
    /// A dataset folder (any layout `Dataset::open` knows); slice labels from its CSV, else
    /// from its masks.
    Dir(&'a std::path::Path),
    /// An opened dataset, optionally restricted to some of its cases (by index).
    Dataset {
        dataset: &'a Dataset,
        indices: Option<&'a [usize]>,
    },
    /// Volumes already in memory.
    Cases(Vec<TrainCase>),
}

/// A case windowed and resized: `x` is `[z, channels, size, size]`, row-major.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub id: String,
    pub patient: String,
    pub depth: usize,
    pub channels: usize,
    pub x: Vec<f32>,
    pub labels: Vec<bool>,
    /// The box of the native slice the input was cut from (see [`InputSpec::prepare`]).
    pub crop: CropBox,
}

impl Prepared {
    /// Windows, crops and resizes one volume ([`InputSpec::model_input`]: area averaging
    /// when shrinking, so the thin bright rims a hemorrhage can be do not alias).
    pub fn from_hu(
        id: &str,
        patient: &str,
        hu: &Array3<f32>,
        labels: &[bool],
        size: usize,
        spec: &InputSpec,
    ) -> Result<Self, TrainError> {
        let m = spec
            .model_input(hu.view(), size)
            .map_err(|e| TrainError::Data(format!("case {id}: {e}")))?;
        if labels.len() != m.depth {
            return Err(TrainError::Data(format!(
                "case {id}: {} slice labels for {} slices",
                labels.len(),
                m.depth
            )));
        }
        Ok(Prepared {
            id: id.to_string(),
            patient: patient.to_string(),
            depth: m.depth,
            channels: m.channels,
            x: m.x,
            labels: labels.to_vec(),
            crop: m.crop,
        })
    }

    /// The planes (channels) of slice z.
    pub fn slice(&self, z: usize, size: usize) -> &[f32] {
        let n = self.channels * size * size;
        &self.x[z * n..(z + 1) * n]
    }
}

/// Where the native volumes of the prepared cases are read again (stage 3 refines
/// pseudo-masks at the native resolution): the dataset (only the images are read), or the
/// volumes handed over in memory.
pub enum Native<'a> {
    /// Case `k` is the dataset's case `indices[k]`.
    Dataset {
        dataset: DatasetRef<'a>,
        indices: Vec<usize>,
    },
    Cases(Vec<TrainCase>),
}

/// An opened dataset, owned or borrowed.
pub enum DatasetRef<'a> {
    Owned(Dataset),
    Borrowed(&'a Dataset),
}

impl Native<'_> {
    /// The HU volume `[z, y, x]` and spacing of prepared case `k` (never its mask).
    pub fn volume(&self, k: usize) -> Result<(Array3<f32>, [f64; 3]), TrainError> {
        match self {
            Native::Cases(c) => {
                let c = c
                    .get(k)
                    .ok_or_else(|| TrainError::Data(format!("case index {k} out of range")))?;
                Ok((c.hu.clone(), c.spacing))
            }
            Native::Dataset { dataset, indices } => {
                let ds = match dataset {
                    DatasetRef::Owned(d) => d,
                    DatasetRef::Borrowed(d) => *d,
                };
                let case = indices
                    .get(k)
                    .and_then(|&i| ds.cases.get(i))
                    .ok_or_else(|| TrainError::Data(format!("case index {k} out of range")))?;
                let v = crate::io::read_volume(&case.image)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                Ok((v.data, v.spacing))
            }
        }
    }
}

/// Loads and prepares every case of `input` (in parallel); the order is the input's. Also
/// returns where the native volumes can be read again.
pub fn load_input<'a>(
    input: TrainInput<'a>,
    size: usize,
    spec: &InputSpec,
) -> Result<(Vec<Prepared>, Native<'a>), TrainError> {
    match input {
        TrainInput::Cases(cases) => {
            let p = cases
                .par_iter()
                .map(|c| Prepared::from_hu(&c.id, &c.patient, &c.hu, &c.labels, size, spec))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((p, Native::Cases(cases)))
        }
        TrainInput::Dir(dir) => {
            let ds = Dataset::open(dir).map_err(|e| TrainError::Data(e.to_string()))?;
            let p = load_dataset(&ds, None, size, spec)?;
            let indices = (0..ds.len()).collect();
            Ok((
                p,
                Native::Dataset {
                    dataset: DatasetRef::Owned(ds),
                    indices,
                },
            ))
        }
        TrainInput::Dataset { dataset, indices } => {
            let p = load_dataset(dataset, indices, size, spec)?;
            let indices = indices.map_or_else(|| (0..dataset.len()).collect(), |i| i.to_vec());
            Ok((
                p,
                Native::Dataset {
                    dataset: DatasetRef::Borrowed(dataset),
                    indices,
                },
            ))
        }
    }
}

fn load_dataset(
    ds: &Dataset,
    indices: Option<&[usize]>,
    size: usize,
    spec: &InputSpec,
) -> Result<Vec<Prepared>, TrainError> {
    let idx: Vec<usize> = match indices {
        Some(i) => i.to_vec(),
        None => (0..ds.len()).collect(),
    };
    // Labels are checked before any volume is read, so a missing CSV fails fast.
    for &i in &idx {
        let c = ds.cases.get(i).ok_or_else(|| {
            TrainError::Data(format!("case index {i} out of range ({} cases)", ds.len()))
        })?;
        if !c.has_labels() {
            return Err(TrainError::Data(
                crate::data::error::DataError::NoLabels {
                    id: c.id.clone(),
                    image: c.image.clone(),
                }
                .to_string(),
            ));
        }
    }
    idx.par_iter()
        .map(|&i| {
            let c = ds
                .load(i, true)
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let patient = ds.cases[i].patient.clone();
            let labels: Vec<bool> = c.slice_labels.iter().map(|&l| l > 0).collect();
            Prepared::from_hu(&c.id, &patient, &c.volume.data, &labels, size, spec)
        })
        .collect()
}

/// A stage-1 training/validation item: one sequence of one case.
#[derive(Clone, Debug)]
pub struct SeqItem {
    pub case: usize,
    pub win: SeqWindow,
}

/// The sliding-window sequences of the given cases.
pub fn sequences(
    cases: &[Prepared],
    which: &[usize],
    slices: usize,
    stride: usize,
) -> Result<Vec<SeqItem>, TrainError> {
    let mut out = Vec::new();
    for &c in which {
        let wins = sequence::plan(cases[c].depth, slices, SeqMode::Sliding { stride })
            .map_err(|e| TrainError::Data(format!("case {}: {e}", cases[c].id)))?;
        out.extend(wins.into_iter().map(|win| SeqItem { case: c, win }));
    }
    Ok(out)
}

/// `(case, z)` of every slice of the given cases.
pub fn slices(cases: &[Prepared], which: &[usize]) -> Vec<(usize, usize)> {
    which
        .iter()
        .flat_map(|&c| (0..cases[c].depth).map(move |z| (c, z)))
        .collect()
}

/// Augmentation of one batch: the run's seed, the epoch, and the config (disabled for
/// validation).
#[derive(Clone, Copy, Debug)]
pub struct AugmentCtx<'a> {
    pub cfg: &'a AugmentConfig,
    pub seed: u64,
    pub epoch: u64,
}

/// Gathers sequences `items[order[k]]` for k in `ks` into `x` `[B, S, 3, size, size]` and
/// `labels` `[B, S]` (0/1). `ids` are the items' global indices, used to seed augmentation.
pub fn gather_sequences(
    cases: &[Prepared],
    items: &[&SeqItem],
    ids: &[u64],
    size: usize,
    aug: Option<AugmentCtx<'_>>,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let s = items.first().map(|i| i.win.len()).unwrap_or(0);
    let ch = cases.first().map(|c| c.channels).unwrap_or(3);
    let plane = ch * size * size;
    let mut x = vec![0f32; items.len() * s * plane];
    let mut labels = vec![0f32; items.len() * s];
    x.par_chunks_mut(s * plane.max(1))
        .zip(labels.par_chunks_mut(s.max(1)))
        .zip(items.par_iter().zip(ids.par_iter()))
        .try_for_each(|((xb, lb), (item, &id))| -> Result<(), TrainError> {
            let c = &cases[item.case];
            for (p, &z) in item.win.z.iter().enumerate() {
                xb[p * plane..(p + 1) * plane].copy_from_slice(c.slice(z, size));
                lb[p] = if c.labels[z] { 1.0 } else { 0.0 };
            }
            if let Some(a) = aug {
                Transform::for_sequence(a.cfg, a.seed, a.epoch, id, size, size)
                    .apply(xb, s * ch, size, size)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
            }
            Ok(())
        })?;
    Ok((x, labels))
}

/// Gathers single slices into `x` `[N, 3, size, size]` and `labels` `[N]`.
pub fn gather_slices(
    cases: &[Prepared],
    items: &[(usize, usize)],
    ids: &[u64],
    size: usize,
    aug: Option<AugmentCtx<'_>>,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let ch = cases.first().map(|c| c.channels).unwrap_or(3);
    let plane = ch * size * size;
    let mut x = vec![0f32; items.len() * plane];
    let labels = items
        .iter()
        .map(|&(c, z)| if cases[c].labels[z] { 1.0 } else { 0.0 })
        .collect();
    x.par_chunks_mut(plane)
        .zip(items.par_iter().zip(ids.par_iter()))
        .try_for_each(|(xb, (&(c, z), &id))| -> Result<(), TrainError> {
            xb.copy_from_slice(cases[c].slice(z, size));
            if let Some(a) = aug {
                Transform::for_sequence(a.cfg, a.seed, a.epoch, id, size, size)
                    .apply(xb, ch, size, size)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
            }
            Ok(())
        })?;
    Ok((x, labels))
}

/// The batches of one epoch: indices into the items, shuffled from (seed, epoch) when
/// `shuffle`, cut into batches of exactly `batch`; the last batch is topped up with the
/// epoch's first items so every batch has the shape the model was planned for.
pub fn epoch_batches(n: usize, batch: usize, shuffle: Option<(u64, u64)>) -> Vec<Vec<usize>> {
    if n == 0 || batch == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    if let Some((seed, epoch)) = shuffle {
        super::augment::Rng::new(super::augment::mix_seed(seed, &[0x5_4FF1E, epoch]))
            .shuffle(&mut order);
    }
    let mut out: Vec<Vec<usize>> = order.chunks(batch).map(|c| c.to_vec()).collect();
    if let Some(last) = out.last_mut() {
        let mut k = 0;
        while last.len() < batch {
            last.push(order[k % n]);
            k += 1;
        }
    }
    out
}

/// Training-slice `pos_weight`: negatives / positives, clamped (1 when there are none).
pub fn pos_weight(cases: &[Prepared], which: &[usize], lo: f64, hi: f64) -> f64 {
    let (mut pos, mut neg) = (0usize, 0usize);
    for &c in which {
        for &l in &cases[c].labels {
            if l {
                pos += 1
            } else {
                neg += 1
            }
        }
    }
    if pos == 0 {
        return lo;
    }
    (neg as f64 / pos as f64).clamp(lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_everything_with_full_shapes() {
        let b = epoch_batches(7, 3, Some((1, 2)));
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|x| x.len() == 3));
        let mut seen: Vec<usize> = b.concat();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert_eq!(epoch_batches(7, 3, Some((1, 2))), b);
        assert_ne!(
            epoch_batches(70, 3, Some((1, 3))),
            epoch_batches(70, 3, Some((1, 2)))
        );
        assert_eq!(epoch_batches(2, 4, None), vec![vec![0, 1, 0, 1]]);
    }

    #[test]
    fn prepare_windows_and_resizes() {
        let hu = Array3::from_shape_fn(
            (3, 32, 32),
            |(z, y, _)| if y < 16 { 40.0 } else { z as f32 * 1000.0 },
        );
        let spec = InputSpec::default();
        let p = Prepared::from_hu("a", "a", &hu, &[false, true, false], 16, &spec).unwrap();
        assert_eq!(p.x.len(), 3 * 3 * 16 * 16);
        // Brain window of 40 HU is 0.5.
        assert!((p.slice(0, 16)[0] - 0.5).abs() < 1e-6);
        assert!(Prepared::from_hu("a", "a", &hu, &[true], 16, &spec).is_err());
    }
}
