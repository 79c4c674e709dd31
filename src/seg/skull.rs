//! The intracranial filter: drops the 3-D components of a mask that reach outside the skull.
//! Intracranial hemorrhage lies inside the skull by definition, but the scalp, the temporal
//! muscles and a scalp swelling share its HU (50-80): on real head CT they are most of the
//! refinement's large false positives. Outside = the pixels of a slice reached from its
//! border without crossing the bone (HU at or above [`bone_level`], dilated by
//! `close_mm` to seal the sutures and thin spots); a slice whose enclosed inside is under
//! [`MIN_INSIDE_FRACTION`] of it (the skull base, an open skull, no bone) is not judged.
//! Works on `[z, y, x]` HU volumes and 0/1 masks on the host; knows nothing of the network
//! or of files.

use super::ccl::Pruned;
use super::{Connectivity, Result, SegError};
use crate::io::Mask;
use ndarray::{Array3, ArrayView2, Axis};

/// What the filter drops (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SkullFilter {
    /// A component is dropped when more than this fraction of its voxels lie outside the
    /// skull (0: any voxel outside drops it). 1 keeps everything.
    pub max_outside_fraction: f32,
    /// The bone is dilated in-plane by this radius (mm) before the outside is flooded.
    pub close_mm: f64,
}

/// `ichcam segment`'s default fraction, chosen by nested cross-validation (docs/accuracy.md).
pub const DEFAULT_MAX_OUTSIDE_FRACTION: f32 = 0.0;
/// The default closing radius (2 px at ct-ich's 0.5 mm).
pub const DEFAULT_CLOSE_MM: f64 = 1.0;
/// A slice whose inside is smaller than this fraction of its area is not judged.
pub const MIN_INSIDE_FRACTION: f64 = 0.05;

impl Default for SkullFilter {
    fn default() -> Self {
        SkullFilter {
            max_outside_fraction: DEFAULT_MAX_OUTSIDE_FRACTION,
            close_mm: DEFAULT_CLOSE_MM,
        }
    }
}

/// The HU from which a voxel is bone: 300, or just under the maximum of data clipped below
/// it (ct-ich is clipped at 100 HU, where the skull piles up).
pub fn bone_level(hu: &Array3<f32>) -> f32 {
    let max = hu
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if max.is_finite() {
        (max - 1.0).min(300.0)
    } else {
        300.0
    }
}

/// 1 where a voxel lies outside the skull (see the module doc), 0 elsewhere and on the
/// slices that are not judged.
pub fn outside_skull(hu: &Array3<f32>, bone_hu: f32, close_px: usize) -> Mask {
    let mut outside = Mask::zeros(hu.dim());
    for (z, mut o) in outside.axis_iter_mut(Axis(0)).enumerate() {
        if let Some(out) = outside_slice(hu.index_axis(Axis(0), z), bone_hu, close_px) {
            for (a, &b) in o.iter_mut().zip(&out) {
                *a = b;
            }
        }
    }
    outside
}

/// One slice's outside (row-major, 1 = outside), or `None` when the slice is not judged.
pub fn outside_slice(sl: ArrayView2<f32>, bone_hu: f32, close_px: usize) -> Option<Vec<u8>> {
    let (h, w) = sl.dim();
    if h == 0 || w == 0 {
        return None;
    }
    let r = close_px;
    // Bone dilated by a (2r+1)^2 square, by rows then by columns.
    let mut rows = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            if sl[[y, x]] >= bone_hu {
                for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                    rows[y * w + xx] = 1;
                }
            }
        }
    }
    let mut bone = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            if rows[y * w + x] != 0 {
                for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                    bone[yy * w + x] = 1;
                }
            }
        }
    }
    // Flood from the border through what is not bone.
    let mut out = vec![0u8; h * w];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let border = y == 0 || x == 0 || y == h - 1 || x == w - 1;
            if border && bone[y * w + x] == 0 {
                out[y * w + x] = 1;
                stack.push((y, x));
            }
        }
    }
    while let Some((y, x)) = stack.pop() {
        let next = [
            (y.wrapping_sub(1), x),
            (y + 1, x),
            (y, x.wrapping_sub(1)),
            (y, x + 1),
        ];
        for (ny, nx) in next {
            if ny < h && nx < w && bone[ny * w + nx] == 0 && out[ny * w + nx] == 0 {
                out[ny * w + nx] = 1;
                stack.push((ny, nx));
            }
        }
    }
    let inside = out
        .iter()
        .zip(&bone)
        .filter(|(&o, &b)| o == 0 && b == 0)
        .count();
    ((inside as f64) >= MIN_INSIDE_FRACTION * (h * w) as f64).then_some(out)
}

/// Drops the components of `mask` (`connectivity`) of which more than
/// `filter.max_outside_fraction` lies outside the skull (see the module doc).
pub fn drop_outside_skull(
    hu: &Array3<f32>,
    spacing_zyx: [f64; 3],
    mask: Mask,
    connectivity: Connectivity,
    filter: &SkullFilter,
) -> Result<Pruned> {
    super::ccl::check_same_grid(hu, &mask)?;
    if !(filter.max_outside_fraction.is_finite() && filter.close_mm.is_finite())
        || filter.close_mm < 0.0
    {
        return Err(SegError::Param(
            "the skull filter's fraction and closing radius must be finite, the radius >= 0".into(),
        ));
    }
    let cc = super::connected_components(&mask, connectivity)?;
    let n = cc.n_components();
    if n == 0 || filter.max_outside_fraction >= 1.0 {
        return Ok(Pruned {
            mask,
            n_components: n,
            dropped: 0,
        });
    }
    let px = spacing_zyx[1].min(spacing_zyx[2]);
    let close = if px > 0.0 {
        (filter.close_mm / px).round().min(64.0) as usize
    } else {
        0
    };
    // Slice by slice: the outside of one slice at a time (no volume-sized mask).
    let bone_hu = bone_level(hu);
    let mut sizes = vec![0usize; n + 1];
    let mut out = vec![0usize; n + 1];
    for (z, labels) in cc.labels.axis_iter(Axis(0)).enumerate() {
        let outside = outside_slice(hu.index_axis(Axis(0), z), bone_hu, close);
        for (i, &l) in labels.iter().enumerate() {
            sizes[l as usize] += 1;
            if let Some(o) = &outside {
                out[l as usize] += o[i] as usize;
            }
        }
    }
    let drop: Vec<bool> = (0..=n)
        .map(|l| {
            l > 0
                && sizes[l] > 0
                && out[l] as f64 / sizes[l] as f64 > filter.max_outside_fraction as f64
        })
        .collect();
    Ok(super::ccl::prune(mask, &cc.labels, &drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring of bone (100 HU, clipped data) around brain, scalp outside it, air beyond.
    fn head(d: usize, n: usize) -> Array3<f32> {
        let c = n as f64 / 2.0;
        Array3::from_shape_fn((d, n, n), |(_, y, x)| {
            let r = ((y as f64 - c).powi(2) + (x as f64 - c).powi(2)).sqrt();
            if r < 20.0 {
                35.0
            } else if r < 23.0 {
                100.0
            } else if r < 27.0 {
                60.0
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
    fn outside_is_beyond_the_bone_and_open_slices_are_not_judged() {
        let mut hu = head(2, 64);
        assert_eq!(bone_level(&hu), 99.0);
        // Slice 1 without bone: nothing is enclosed, so it is not judged.
        hu.index_axis_mut(Axis(0), 1)
            .mapv_inplace(|v| if v >= 99.0 { 35.0 } else { v });
        let o = outside_skull(&hu, 99.0, 1);
        assert_eq!(o[[0, 32, 32]], 0, "brain");
        assert_eq!(o[[0, 32, 32 + 25]], 1, "scalp");
        assert_eq!(o[[0, 0, 0]], 1, "air");
        assert!(o.index_axis(Axis(0), 1).iter().all(|&v| v == 0));
        // Natural CT: bone from 300 HU.
        let mut n = head(1, 32);
        n[[0, 0, 0]] = 2000.0;
        assert_eq!(bone_level(&n), 300.0);
    }

    #[test]
    fn drops_a_scalp_component_and_keeps_an_intracranial_one() {
        let hu = head(3, 64);
        let mut mask = Mask::zeros(hu.dim());
        blob(&mut mask, 1, 32, 25, 3); // inside the skull
        blob(&mut mask, 1, 32, 57, 1); // in the scalp
        let out = drop_outside_skull(
            &hu,
            [5.0, 0.5, 0.5],
            mask.clone(),
            Connectivity::TwentySix,
            &SkullFilter::default(),
        )
        .expect("filter");
        assert_eq!(out.dropped, 1);
        assert_eq!(out.n_components, 1);
        assert_eq!(out.mask[[1, 32, 25]], 1);
        assert_eq!(out.mask[[1, 32, 57]], 0);
        let keep = drop_outside_skull(
            &hu,
            [5.0, 0.5, 0.5],
            mask.clone(),
            Connectivity::TwentySix,
            &SkullFilter {
                max_outside_fraction: 1.0,
                ..SkullFilter::default()
            },
        )
        .expect("filter");
        assert_eq!(keep.mask, mask);
    }

    #[test]
    fn bad_input_is_an_error() {
        let hu = head(1, 16);
        let f = SkullFilter {
            close_mm: -1.0,
            ..SkullFilter::default()
        };
        assert!(
            drop_outside_skull(&hu, [1.0; 3], Mask::zeros(hu.dim()), Connectivity::Six, &f)
                .is_err()
        );
        let e = drop_outside_skull(
            &hu,
            [1.0; 3],
            Mask::zeros((1, 4, 4)),
            Connectivity::Six,
            &SkullFilter::default(),
        );
        assert!(matches!(e, Err(SegError::Shape { .. })));
    }
}
