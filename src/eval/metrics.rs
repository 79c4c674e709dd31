//! Per-volume segmentation metrics of a predicted mask against the truth, with the voxel
//! spacing for volumes and distances. Knows only 0/1 masks `[z, y, x]` (non-zero counts as
//! foreground) and spacings in mm.
//!
//! Conventions for empty masks (P = prediction, T = truth):
//! - Dice and IoU: both empty -> 1 (a correct "no hemorrhage"); one empty -> 0.
//! - precision = TP/|P|: `None` when P is empty; recall = TP/|T|: `None` when T is empty.
//! - relative volume difference (|P| - |T|) / |T|: `None` when T is empty.
//! - HD95: `None` when either mask is empty.
//! - per-slice Dice: the mean 2-D Dice over the slices where T has voxels: `None` when T is
//!   empty.
//!
//! HD95 is the larger of the two directed 95th percentiles (linear interpolation, as
//! `numpy.percentile`) of the distances from each surface voxel of one mask to the nearest
//! surface voxel of the other, in mm (MONAI's `compute_hausdorff_distance(percentile=95)`).
//! A surface voxel is a mask voxel with a 6-neighbour outside the mask (outside the volume
//! counts as outside). Distances come from an exact separable Euclidean distance transform
//! (Felzenszwalb & Huttenlocher) with anisotropic spacing, on the bounding box of the two
//! masks (exact there: every feature and every query voxel lies inside it).

use super::{EvalError, Result};
use crate::io::Mask;
use ndarray::{s, Array3, Axis};
use rayon::prelude::*;

/// The metrics of one volume. Optional values are `None` (JSON `null`) when undefined.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeMetrics {
    pub truth_voxels: usize,
    pub pred_voxels: usize,
    pub true_positives: usize,
    pub truth_ml: f64,
    pub pred_ml: f64,
    pub dice: f64,
    pub iou: f64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// mm.
    pub hd95: Option<f64>,
    pub rvd: Option<f64>,
    /// Mean 2-D Dice over the slices with hemorrhage in the truth.
    pub dice_slice: Option<f64>,
    /// Slices with hemorrhage in the truth.
    pub truth_slices: usize,
}

impl VolumeMetrics {
    /// The truth has hemorrhage.
    pub fn positive(&self) -> bool {
        self.truth_voxels > 0
    }
    /// Empty truth, non-empty prediction: a false-positive volume.
    pub fn false_positive_volume(&self) -> bool {
        self.truth_voxels == 0 && self.pred_voxels > 0
    }
}

fn check(pred: &Mask, truth: &Mask, spacing: [f64; 3]) -> Result<()> {
    if pred.dim() != truth.dim() {
        let (a, b) = (pred.dim(), truth.dim());
        return Err(EvalError::Shape {
            pred: [a.0, a.1, a.2],
            truth: [b.0, b.1, b.2],
        });
    }
    if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(EvalError::Spacing(spacing));
    }
    Ok(())
}

/// All metrics of one volume; `spacing` is `[z, y, x]` in mm.
pub fn volume_metrics(pred: &Mask, truth: &Mask, spacing: [f64; 3]) -> Result<VolumeMetrics> {
    check(pred, truth, spacing)?;
    // Per-slice counts (pred, truth, both) in one pass; the volume counts are their sums.
    let per_slice: Vec<(usize, usize, usize)> = pred
        .axis_iter(Axis(0))
        .zip(truth.axis_iter(Axis(0)))
        .map(|(p, t)| {
            let mut c = (0, 0, 0);
            for (&a, &b) in p.iter().zip(t.iter()) {
                let (a, b) = (a != 0, b != 0);
                c.0 += a as usize;
                c.1 += b as usize;
                c.2 += (a && b) as usize;
            }
            c
        })
        .collect();
    let np: usize = per_slice.iter().map(|c| c.0).sum();
    let nt: usize = per_slice.iter().map(|c| c.1).sum();
    let tp: usize = per_slice.iter().map(|c| c.2).sum();
    let voxel_ml = spacing.iter().product::<f64>() / 1000.0;
    let (dice, iou) = if np + nt == 0 {
        (1.0, 1.0)
    } else {
        (
            2.0 * tp as f64 / (np + nt) as f64,
            tp as f64 / (np + nt - tp) as f64,
        )
    };
    let slice_dices: Vec<f64> = per_slice
        .iter()
        .filter(|c| c.1 > 0)
        .map(|c| 2.0 * c.2 as f64 / (c.0 + c.1) as f64)
        .collect();
    Ok(VolumeMetrics {
        truth_voxels: nt,
        pred_voxels: np,
        true_positives: tp,
        truth_ml: nt as f64 * voxel_ml,
        pred_ml: np as f64 * voxel_ml,
        dice,
        iou,
        precision: (np > 0).then(|| tp as f64 / np as f64),
        recall: (nt > 0).then(|| tp as f64 / nt as f64),
        hd95: hd95(pred, truth, spacing)?,
        rvd: (nt > 0).then(|| (np as f64 - nt as f64) / nt as f64),
        dice_slice: (!slice_dices.is_empty())
            .then(|| slice_dices.iter().sum::<f64>() / slice_dices.len() as f64),
        truth_slices: slice_dices.len(),
    })
}

/// The 95th-percentile symmetric Hausdorff distance in mm; `None` if either mask is empty.
pub fn hd95(pred: &Mask, truth: &Mask, spacing: [f64; 3]) -> Result<Option<f64>> {
    hausdorff_percentile(pred, truth, spacing, 95.0)
}

/// The larger of the two directed `q`-th percentiles (0..=100) of the surface distances.
pub fn hausdorff_percentile(a: &Mask, b: &Mask, spacing: [f64; 3], q: f64) -> Result<Option<f64>> {
    Ok(surface_distances(a, b, spacing)?.map(|(ab, ba)| percentile(ab, q).max(percentile(ba, q))))
}

/// Distances (mm) from every surface voxel of `a` to the surface of `b`, and from `b`'s to
/// `a`'s; `None` if either mask is empty.
pub fn surface_distances(
    a: &Mask,
    b: &Mask,
    spacing: [f64; 3],
) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
    check(a, b, spacing)?;
    let (Some(ba), Some(bb)) = (bbox(a), bbox(b)) else {
        return Ok(None);
    };
    let lo = [
        ba.0[0].min(bb.0[0]),
        ba.0[1].min(bb.0[1]),
        ba.0[2].min(bb.0[2]),
    ];
    let hi = [
        ba.1[0].max(bb.1[0]),
        ba.1[1].max(bb.1[1]),
        ba.1[2].max(bb.1[2]),
    ];
    let crop = |m: &Mask| {
        m.slice(s![lo[0]..=hi[0], lo[1]..=hi[1], lo[2]..=hi[2]])
            .to_owned()
    };
    let (ca, cb) = (crop(a), crop(b));
    // Outside the box both masks are empty, so surfaces computed in the box are exact.
    let (sa, sb) = (surface(&ca), surface(&cb));
    let da = edt_squared(&sa, spacing);
    let db = edt_squared(&sb, spacing);
    let gather = |s: &Mask, d: &Array3<f64>| -> Vec<f64> {
        s.iter()
            .zip(d.iter())
            .filter(|(&v, _)| v != 0)
            .map(|(_, &d2)| d2.sqrt())
            .collect()
    };
    Ok(Some((gather(&sa, &db), gather(&sb, &da))))
}

/// Mask voxels with at least one 6-neighbour outside the mask (or outside the volume).
pub fn surface(m: &Mask) -> Mask {
    let (nz, ny, nx) = m.dim();
    let mut out = Mask::zeros(m.raw_dim());
    let on = |z: isize, y: isize, x: isize| -> bool {
        z >= 0
            && y >= 0
            && x >= 0
            && (z as usize) < nz
            && (y as usize) < ny
            && (x as usize) < nx
            && m[[z as usize, y as usize, x as usize]] != 0
    };
    for ((z, y, x), o) in out.indexed_iter_mut() {
        if m[[z, y, x]] == 0 {
            continue;
        }
        let (z, y, x) = (z as isize, y as isize, x as isize);
        let inner = on(z - 1, y, x)
            && on(z + 1, y, x)
            && on(z, y - 1, x)
            && on(z, y + 1, x)
            && on(z, y, x - 1)
            && on(z, y, x + 1);
        *o = u8::from(!inner);
    }
    out
}

/// Squared Euclidean distance in mm² from every voxel to the nearest non-zero voxel of
/// `features` (`f64::INFINITY` everywhere if there is none). Exact: Felzenszwalb &
/// Huttenlocher's lower envelope of parabolas, one pass per axis, weighted by the spacing.
pub fn edt_squared(features: &Mask, spacing: [f64; 3]) -> Array3<f64> {
    let mut d = features.mapv(|v| if v != 0 { 0.0 } else { f64::INFINITY });
    for axis in [2usize, 1, 0] {
        let w = spacing[axis] * spacing[axis];
        let n = d.len_of(Axis(axis));
        if n <= 1 {
            continue;
        }
        let lanes: Vec<_> = d.lanes_mut(Axis(axis)).into_iter().collect();
        lanes.into_par_iter().for_each_init(
            || {
                (
                    vec![0.0f64; n],
                    vec![0.0f64; n],
                    vec![0usize; n],
                    vec![0.0f64; n + 1],
                )
            },
            |(f, out, v, z), mut lane| {
                for (fi, &x) in f.iter_mut().zip(lane.iter()) {
                    *fi = x;
                }
                dt1d(f, w, out, v, z);
                for (x, &o) in lane.iter_mut().zip(out.iter()) {
                    *x = o;
                }
            },
        );
    }
    d
}

/// 1-D squared distance transform of the sampled function `f` (INFINITY = no feature) with
/// squared sample spacing `w`: `d[q] = min_p w (q - p)^2 + f[p]`.
fn dt1d(f: &[f64], w: f64, d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k: usize = 0;
    let mut any = false;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        if !any {
            any = true;
            k = 0;
            v[0] = q;
            z[0] = f64::NEG_INFINITY;
            z[1] = f64::INFINITY;
            continue;
        }
        let fq = f[q] + w * (q * q) as f64;
        let mut s;
        loop {
            let p = v[k];
            s = (fq - (f[p] + w * (p * p) as f64)) / (2.0 * w * (q - p) as f64);
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                break;
            }
        }
        // z[0] is -inf, so `s <= z[0]` never holds and k stays >= 0.
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    if !any {
        d.iter_mut().for_each(|x| *x = f64::INFINITY);
        return;
    }
    let mut j = 0;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[j + 1] < q as f64 {
            j += 1;
        }
        let p = v[j];
        let dist = q as f64 - p as f64;
        *dq = w * dist * dist + f[p];
    }
}

/// `q`-th percentile (0..=100) with linear interpolation between the sorted values, as
/// `numpy.percentile`'s default. The input must not be empty.
pub fn percentile(mut x: Vec<f64>, q: f64) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_unstable_by(|a, b| a.total_cmp(b));
    let h = (x.len() - 1) as f64 * (q / 100.0).clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(x.len() - 1);
    x[lo] + (h - lo as f64) * (x[hi] - x[lo])
}

/// Inclusive bounding box `([z0, y0, x0], [z1, y1, x1])` of the non-zero voxels.
pub fn bbox(m: &Mask) -> Option<([usize; 3], [usize; 3])> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut any = false;
    for ((z, y, x), &v) in m.indexed_iter() {
        if v != 0 {
            any = true;
            for (i, c) in [z, y, x].into_iter().enumerate() {
                lo[i] = lo[i].min(c);
                hi[i] = hi[i].max(c);
            }
        }
    }
    any.then_some((lo, hi))
}
