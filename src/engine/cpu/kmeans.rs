//! 1-D k-means (Lloyd) on the CPU, mirroring `cuda/kmeans.rs` and `kernels/kmeans.cu`:
//! values in, cluster centroids and assignments out, also per segment of a volume over the
//! voxels of a region. Knows nothing beyond "a list of f32 values".
//!
//! The steps are split into [`init_centroids`], [`assign`] and [`update`] so that the GPU
//! version mirrors them and reaches the same result: `assign` picks the nearest centroid by
//! `|v - c|` in f32 with ties going to the lowest index, `update` sums in f64 and stores the
//! mean as f32, and an empty cluster keeps its centroid.

use rayon::prelude::*;

use crate::engine::volume::Clusters;
use crate::engine::{check_len, Result};

/// The outcome of one k-means run.
#[derive(Clone, Debug, PartialEq)]
pub struct KMeans {
    /// One centroid per cluster (not sorted: cluster `i` started at the `(i+0.5)/k` quantile,
    /// so they usually come out ascending).
    pub centroids: Vec<f32>,
    /// Voxels per cluster.
    pub counts: Vec<usize>,
    /// Cluster of each input value.
    pub labels: Vec<u8>,
    /// Lloyd iterations run (assignment + update pairs).
    pub iterations: usize,
    /// True when the assignments stopped changing before `max_iter`.
    pub converged: bool,
}

/// Deterministic start: the values' quantiles at `(i + 0.5) / k` (nearest rank on the sorted
/// values). Equal quantiles give equal centroids; the tie rule of [`assign`] then leaves the
/// later duplicates empty. An empty input gives `k` zeros.
pub fn init_centroids(values: &[f32], k: usize) -> Vec<f32> {
    if values.is_empty() {
        return vec![0.0; k];
    }
    let mut sorted: Vec<f32> = values.to_vec();
    sorted.sort_unstable_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    (0..k)
        .map(|i| {
            let idx = (((i as f64 + 0.5) / k as f64) * n as f64).floor() as usize;
            sorted[idx.min(n - 1)]
        })
        .collect()
}

/// The nearest centroid of `v` (ties: lowest index).
#[inline]
pub fn nearest(v: f32, centroids: &[f32]) -> u8 {
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &c) in centroids.iter().enumerate() {
        let d = (v - c).abs();
        if d < best_d {
            best_d = d;
            best = i;
        }
    }
    best as u8
}

/// Assignment step: `labels[i] = nearest(values[i])`. Returns how many labels changed.
/// `values` and `labels` must have the same length (only the common prefix is touched).
pub fn assign(values: &[f32], centroids: &[f32], labels: &mut [u8]) -> usize {
    let mut changed = 0;
    for (l, &v) in labels.iter_mut().zip(values) {
        let n = nearest(v, centroids);
        if n != *l {
            changed += 1;
            *l = n;
        }
    }
    changed
}

/// Update step: each centroid becomes the mean of its values (summed in f64); an empty
/// cluster keeps its centroid. Returns the counts per cluster.
pub fn update(values: &[f32], labels: &[u8], centroids: &mut [f32]) -> Vec<usize> {
    let k = centroids.len();
    let mut sums = vec![0f64; k];
    let mut counts = vec![0usize; k];
    for (&v, &l) in values.iter().zip(labels) {
        let l = l as usize;
        if l < k {
            sums[l] += v as f64;
            counts[l] += 1;
        }
    }
    for i in 0..k {
        if counts[i] > 0 {
            centroids[i] = (sums[i] / counts[i] as f64) as f32;
        }
    }
    counts
}

/// Lloyd's k-means on `values` with `k` clusters (1..=255), at most `max_iter` iterations.
/// Labels start at `u8::MAX` (no cluster) so that the first assignment always counts as a
/// change; the loop stops when an assignment changes nothing.
pub fn kmeans_1d(values: &[f32], k: usize, max_iter: usize) -> KMeans {
    let k = k.clamp(1, 255);
    kmeans_1d_from(values, init_centroids(values, k), max_iter)
}

/// Evenly spaced start: `min + (i + 0.5) / k * (max - min)` (distinct centroids even when
/// most values are equal, as on a slice that is mostly zero).
pub fn init_even(values: &[f32], k: usize) -> Vec<f32> {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        return vec![0.0; k];
    }
    (0..k)
        .map(|i| lo + (i as f32 + 0.5) / k as f32 * (hi - lo))
        .collect()
}

/// Lloyd's k-means from the given centroids (at most 255 of them).
pub fn kmeans_1d_from(values: &[f32], init: Vec<f32>, max_iter: usize) -> KMeans {
    let mut centroids = init;
    centroids.truncate(255);
    let k = centroids.len();
    let mut labels = vec![u8::MAX; values.len()];
    let mut counts = vec![0usize; k];
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter.max(1) {
        let changed = assign(values, &centroids, &mut labels);
        if changed == 0 && iterations > 0 {
            converged = true;
            break;
        }
        counts = update(values, &labels, &mut centroids);
        iterations += 1;
    }
    if !converged {
        // The centroids moved in the last update: make the labels agree with them.
        converged = assign(values, &centroids, &mut labels) == 0;
        counts = update(values, &labels, &mut centroids.clone());
    }
    KMeans {
        centroids,
        counts,
        labels,
        iterations,
        converged,
    }
}

/// [`kmeans_1d`] on each of `segments` runs of `seg_len` consecutive values (in parallel),
/// over the values whose `region` byte is non-zero, in order.
pub fn kmeans_segments(
    values: &[f32],
    region: &[u8],
    segments: usize,
    seg_len: usize,
    k: usize,
    max_iter: usize,
) -> Result<Clusters> {
    const OP: &str = "kmeans";
    let n = segments.saturating_mul(seg_len);
    check_len(OP, "values", values.len(), n)?;
    check_len(OP, "region", region.len(), n)?;
    let k = k.clamp(1, 255);
    let per: Vec<KMeans> = (0..segments)
        .into_par_iter()
        .map(|s| {
            let r = s * seg_len..(s + 1) * seg_len;
            let v: Vec<f32> = values[r.clone()]
                .iter()
                .zip(&region[r])
                .filter(|(_, &m)| m != 0)
                .map(|(&v, _)| v)
                .collect();
            kmeans_1d(&v, k, max_iter)
        })
        .collect();
    Ok(Clusters {
        k,
        centroids: per
            .iter()
            .flat_map(|m| m.centroids.iter().copied())
            .collect(),
        counts: per.iter().flat_map(|m| m.counts.iter().copied()).collect(),
    })
}
