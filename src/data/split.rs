//! Patient-wise train/validation splits from a seed: deterministic (the same ids, fraction
//! and seed give the same split whatever the listing order), never one patient on both
//! sides, and at least one patient on each side when there are two or more.
//! Knows nothing about CT or the network.

use super::dataset::Dataset;
use super::error::{DataError, Result};
use crate::rng::Rng;
use std::collections::BTreeMap;

/// Indices of cases, ascending, on each side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// Splits cases by patient: `patients[i]` is the patient of case `i`. About `val_fraction`
/// of the patients (rounded, at least 1 and at most all but 1 when there are two or more)
/// go to validation. A single patient goes to training.
pub fn split_patients<S: AsRef<str>>(
    patients: &[S],
    val_fraction: f64,
    seed: u64,
) -> Result<Split> {
    if !(0.0..=1.0).contains(&val_fraction) {
        return Err(DataError::Invalid(format!(
            "validation fraction {val_fraction} is not in [0, 1]"
        )));
    }
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in patients.iter().enumerate() {
        groups.entry(p.as_ref()).or_default().push(i);
    }
    // BTreeMap order is sorted by patient: the shuffle does not depend on listing order.
    let mut keys: Vec<&str> = groups.keys().copied().collect();
    let n = keys.len();
    let n_val = if n >= 2 {
        ((val_fraction * n as f64).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    Rng::derived(seed, SPLIT_STREAM).shuffle(&mut keys);
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        let side = if k < n_val { &mut val } else { &mut train };
        side.extend_from_slice(&groups[key]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok(Split { train, val })
}

/// A fixed stream id, so that a split does not share random numbers with other uses of
/// the same seed (the phantoms, augmentation).
const SPLIT_STREAM: u64 = 0x5EED_5B17;

impl Dataset {
    /// Patient-wise split of this dataset's cases (see [`split_patients`]).
    pub fn split(&self, val_fraction: f64, seed: u64) -> Result<Split> {
        let p: Vec<&str> = self.cases.iter().map(|c| c.patient.as_str()).collect();
        split_patients(&p, val_fraction, seed)
    }
}
