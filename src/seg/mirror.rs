//! The mirror-pair filter (off by default): drops the 3-D components of a mask that lie
//! opposite another component across the head's mid-sagittal line. On real head CT many of
//! the refinement's large false positives are bilateral anatomy (the scalp and temporal
//! muscles of both sides, which [`super::skull`] removes as well) found as a left and a
//! right component; a hemorrhage is a lesion of one side, or one component across the
//! midline (which mirrors onto itself, not onto another component, and is kept). The midline is the major axis of the head's
//! tissue over the whole volume. Works on `[z, y, x]` HU volumes and 0/1 masks on the host;
//! knows nothing of the network or of files.

use super::ccl::Pruned;
use super::{Connectivity, Result, SegError};
use crate::data::crop::TISSUE_HU;
use crate::io::Mask;
use ndarray::Array3;

/// What the filter drops (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MirrorFilter {
    /// A component is dropped when more than this fraction of its voxels have, at their
    /// mirror image across the midline (same slice), a voxel of another component within
    /// `tolerance_mm`. 1 keeps everything.
    pub max_pair_fraction: f32,
    /// In-plane search radius around the mirror image (mm): heads are not exactly symmetric.
    pub tolerance_mm: f64,
}

/// The fraction chosen by nested cross-validation when the filter was measured alone
/// (docs/accuracy.md; `ichcam segment` now leaves it off: `--mirror-pairs 0.16`).
pub const DEFAULT_MAX_PAIR_FRACTION: f32 = 0.16;
/// The default search radius (4 px at ct-ich's 0.5 mm).
pub const DEFAULT_TOLERANCE_MM: f64 = 2.0;

impl Default for MirrorFilter {
    fn default() -> Self {
        MirrorFilter {
            max_pair_fraction: DEFAULT_MAX_PAIR_FRACTION,
            tolerance_mm: DEFAULT_TOLERANCE_MM,
        }
    }
}

/// The head's mid-sagittal line in the slice plane, in mm (`y * spacing_y`, `x * spacing_x`):
/// a point on it and its unit direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Midline {
    pub cy: f64,
    pub cx: f64,
    pub uy: f64,
    pub ux: f64,
}

impl Midline {
    /// The mirror image of pixel `(y, x)`, in pixels (rounded).
    pub fn mirror(&self, y: usize, x: usize, (sy, sx): (f64, f64)) -> (i64, i64) {
        let (b, a) = (y as f64 * sy - self.cy, x as f64 * sx - self.cx);
        let t = a * self.ux + b * self.uy;
        let (mx, my) = (
            self.cx + 2.0 * t * self.ux - a,
            self.cy + 2.0 * t * self.uy - b,
        );
        ((my / sy).round() as i64, (mx / sx).round() as i64)
    }
}

/// The major axis of the tissue (HU above [`TISSUE_HU`]) of every slice together, through
/// its centroid; `None` without tissue or when the tissue is nearly round (eigenvalue ratio
/// under 1.1: no axis to trust).
pub fn head_midline(hu: &Array3<f32>, spacing_zyx: [f64; 3]) -> Option<Midline> {
    let (sy, sx) = (spacing_zyx[1], spacing_zyx[2]);
    let (mut n, mut my, mut mx) = (0f64, 0f64, 0f64);
    for ((_, y, x), &v) in hu.indexed_iter() {
        if v > TISSUE_HU {
            n += 1.0;
            my += y as f64 * sy;
            mx += x as f64 * sx;
        }
    }
    if n < 3.0 {
        return None;
    }
    let (cy, cx) = (my / n, mx / n);
    let (mut syy, mut sxx, mut sxy) = (0f64, 0f64, 0f64);
    for ((_, y, x), &v) in hu.indexed_iter() {
        if v > TISSUE_HU {
            let (b, a) = (y as f64 * sy - cy, x as f64 * sx - cx);
            syy += b * b;
            sxx += a * a;
            sxy += a * b;
        }
    }
    let tr = sxx + syy;
    let det = sxx * syy - sxy * sxy;
    let disc = (tr * tr / 4.0 - det).max(0.0).sqrt();
    let (l1, l2) = (tr / 2.0 + disc, tr / 2.0 - disc);
    if !(l1.is_finite() && l2 > 0.0 && l1 / l2 >= 1.1) {
        return None;
    }
    let theta = 0.5 * (2.0 * sxy).atan2(sxx - syy);
    Some(Midline {
        cy,
        cx,
        uy: theta.sin(),
        ux: theta.cos(),
    })
}

/// For every component `1..=n` of `labels`, the fraction of its voxels whose mirror image
/// has a voxel of another component within `tol` pixels on the same slice (`[0]` = 0).
pub fn pair_fractions(
    labels: &Array3<u32>,
    n: usize,
    mid: &Midline,
    spacing_yx: (f64, f64),
    tol: usize,
) -> Vec<f32> {
    let (_, h, w) = labels.dim();
    let r = tol as i64;
    let mut hits = vec![0usize; n + 1];
    let mut sizes = vec![0usize; n + 1];
    for ((z, y, x), &l) in labels.indexed_iter() {
        if l == 0 || l as usize > n {
            continue;
        }
        sizes[l as usize] += 1;
        let (my, mx) = mid.mirror(y, x, spacing_yx);
        let found =
            (my.saturating_sub(r).max(0)..=my.saturating_add(r).min(h as i64 - 1)).any(|yy| {
                (mx.saturating_sub(r).max(0)..=mx.saturating_add(r).min(w as i64 - 1)).any(|xx| {
                    let m = labels[[z, yy as usize, xx as usize]];
                    m != 0 && m != l
                })
            });
        hits[l as usize] += found as usize;
    }
    (0..=n)
        .map(|l| {
            if sizes[l] == 0 {
                0.0
            } else {
                hits[l] as f32 / sizes[l] as f32
            }
        })
        .collect()
}

/// Drops the components of `mask` (`connectivity`) that pair with another across the
/// head's midline (see [`MirrorFilter`]); the mask unchanged when no midline is found.
pub fn drop_mirror_pairs(
    hu: &Array3<f32>,
    spacing_zyx: [f64; 3],
    mask: Mask,
    connectivity: Connectivity,
    filter: &MirrorFilter,
) -> Result<Pruned> {
    super::ccl::check_same_grid(hu, &mask)?;
    if !(filter.max_pair_fraction.is_finite() && filter.tolerance_mm.is_finite())
        || filter.tolerance_mm < 0.0
    {
        return Err(SegError::Param(
            "the mirror filter's fraction and tolerance must be finite, the tolerance >= 0".into(),
        ));
    }
    let cc = super::connected_components(&mask, connectivity)?;
    let n = cc.n_components();
    let (sy, sx) = (spacing_zyx[1], spacing_zyx[2]);
    let mid = match head_midline(hu, spacing_zyx) {
        Some(m) if n >= 2 && filter.max_pair_fraction < 1.0 => m,
        _ => {
            return Ok(Pruned {
                mask,
                n_components: n,
                dropped: 0,
            })
        }
    };
    let px = sy.min(sx);
    let tol = if px > 0.0 {
        (filter.tolerance_mm / px).round().min(64.0) as usize
    } else {
        0
    };
    let frac = pair_fractions(&cc.labels, n, &mid, (sy, sx), tol);
    let drop: Vec<bool> = frac
        .iter()
        .enumerate()
        .map(|(l, &f)| l > 0 && f > filter.max_pair_fraction)
        .collect();
    Ok(super::ccl::prune(mask, &cc.labels, &drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An elliptic head (long axis along y, or along a tilted line) of brain on air.
    fn head(d: usize, h: usize, w: usize, tilt: f64) -> Array3<f32> {
        let (cy, cx) = (h as f64 / 2.0, w as f64 / 2.0);
        let (c, s) = (tilt.cos(), tilt.sin());
        Array3::from_shape_fn((d, h, w), |(_, y, x)| {
            let (dy, dx) = (y as f64 - cy, x as f64 - cx);
            // Coordinates along the long axis (u) and across it (v).
            let u = dy * c + dx * s;
            let v = -dy * s + dx * c;
            if (u / 28.0).powi(2) + (v / 20.0).powi(2) <= 1.0 {
                35.0
            } else {
                -20.0
            }
        })
    }

    fn blob(m: &mut Mask, z: usize, y: usize, x: usize, r: usize) {
        for yy in y - r..=y + r {
            for xx in x - r..=x + r {
                m[[z, yy, xx]] = 1;
            }
        }
    }

    #[test]
    fn the_midline_is_the_heads_long_axis() {
        let m = head_midline(&head(2, 64, 64, 0.0), [5.0, 1.0, 1.0]).expect("midline");
        assert!(m.uy.abs() > 0.999, "{m:?}");
        assert!((m.cx - 32.0).abs() < 0.6, "{m:?}");
        // A pixel left of the line mirrors to the right at the same height.
        assert_eq!(m.mirror(30, 20, (1.0, 1.0)), (30, 44));
        // Round tissue: no axis; no tissue: none.
        let round = Array3::from_shape_fn((1, 40, 40), |(_, y, x)| {
            if (y as f64 - 20.0).powi(2) + (x as f64 - 20.0).powi(2) < 150.0 {
                35.0
            } else {
                -20.0
            }
        });
        assert!(head_midline(&round, [1.0; 3]).is_none());
        assert!(head_midline(&Array3::from_elem((1, 8, 8), -20.0), [1.0; 3]).is_none());
    }

    #[test]
    fn drops_a_bilateral_pair_and_keeps_a_one_sided_lesion() {
        for tilt in [0.0, 0.3] {
            let hu = head(3, 64, 64, tilt);
            let mid = head_midline(&hu, [5.0, 1.0, 1.0]).expect("midline");
            let mut mask = Mask::zeros(hu.dim());
            // A pair: a blob and its mirror image (mirrored by the found line).
            blob(&mut mask, 1, 22, 22, 2);
            let (my, mx) = mid.mirror(22, 22, (1.0, 1.0));
            blob(&mut mask, 1, my as usize, mx as usize, 2);
            // A lesion of one side, on another slice, and one across the midline.
            blob(&mut mask, 0, 40, 24, 3);
            blob(&mut mask, 2, 32, 32, 3);
            let out = drop_mirror_pairs(
                &hu,
                [5.0, 1.0, 1.0],
                mask.clone(),
                Connectivity::TwentySix,
                &MirrorFilter::default(),
            )
            .expect("filter");
            assert_eq!(out.dropped, 2, "tilt {tilt}");
            assert_eq!(out.n_components, 2);
            assert_eq!(out.mask[[1, 22, 22]], 0);
            assert_eq!(out.mask[[0, 40, 24]], 1);
            assert_eq!(out.mask[[2, 32, 32]], 1);
            // A fraction of 1 keeps everything.
            let keep = drop_mirror_pairs(
                &hu,
                [5.0, 1.0, 1.0],
                mask.clone(),
                Connectivity::TwentySix,
                &MirrorFilter {
                    max_pair_fraction: 1.0,
                    ..MirrorFilter::default()
                },
            )
            .expect("filter");
            assert_eq!(keep.mask, mask);
            assert_eq!(keep.dropped, 0);
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let hu = head(1, 16, 16, 0.0);
        let f = MirrorFilter {
            tolerance_mm: f64::NAN,
            ..MirrorFilter::default()
        };
        let m = Mask::zeros(hu.dim());
        assert!(drop_mirror_pairs(&hu, [1.0; 3], m, Connectivity::Six, &f).is_err());
        let wrong = Mask::zeros((1, 8, 8));
        let e = drop_mirror_pairs(
            &hu,
            [1.0; 3],
            wrong,
            Connectivity::Six,
            &MirrorFilter::default(),
        );
        assert!(matches!(e, Err(SegError::Shape { .. })));
    }
}
