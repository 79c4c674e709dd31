//! Which 3-D components the refinement keeps ([`ComponentFilter`]: big enough, mostly inside
//! the CAM and reaching into its core), the filter applied to a labelling on the host, and
//! the post-filter of components on too few slices ([`drop_thin_components`]).
//! The labelling and the per-component statistics are the engine's volume ops.

pub use crate::engine::Connectivity;

use super::{Result, SegError};
use crate::engine::cpu::ccl::{component_stats, select_components};
use crate::engine::volume::ComponentStats;
use crate::io::Mask;
use ndarray::Array3;

/// What a component needs to be kept.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ComponentFilter {
    /// Components with fewer voxels are dropped.
    pub min_voxels: usize,
    /// A voxel is "inside the CAM" when its normalised CAM is at least this.
    pub cam_threshold: f32,
    /// Fraction of the component's voxels that must be inside the CAM (0 = no requirement).
    pub min_cam_fraction: f32,
    /// The component's largest CAM value must reach this (0 = no requirement).
    pub min_peak_cam: f32,
}

/// The filter's decision over the components `1..=n` of a labelling.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// `keep[l]`: the kept component's new label (`1..=kept`, in the old order), 0 if
    /// dropped; `keep[0] = 0`.
    pub keep: Vec<u32>,
    /// The kept components' sizes, in label order.
    pub sizes: Vec<usize>,
    /// Components dropped for their size.
    pub dropped_small: usize,
    /// Components (of sufficient size) dropped for lack of CAM support.
    pub dropped_cam: usize,
}

impl ComponentFilter {
    /// Decides every component from its size (`sizes[l]`, `sizes[0]` the background) and,
    /// when given, its CAM statistics (voxels at or above `cam_threshold`, CAM peak).
    pub fn select(&self, sizes: &[usize], cam: Option<&ComponentStats>) -> Selection {
        let n = sizes.len().saturating_sub(1);
        let mut keep = vec![0u32; n + 1];
        let mut kept = Vec::new();
        let (mut dropped_small, mut dropped_cam) = (0, 0);
        for l in 1..=n {
            let size = sizes[l];
            if size == 0 || size < self.min_voxels {
                dropped_small += 1;
                continue;
            }
            if let Some(st) = cam {
                let frac = st.inside[l] as f64 / size as f64;
                let peak = st.peak[l];
                // A peak of -inf (no CAM value, or only NaN) never passes.
                if frac < self.min_cam_fraction as f64
                    || peak < self.min_peak_cam
                    || peak == f32::NEG_INFINITY
                {
                    dropped_cam += 1;
                    continue;
                }
            }
            kept.push(size);
            keep[l] = kept.len() as u32;
        }
        Selection {
            keep,
            sizes: kept,
            dropped_small,
            dropped_cam,
        }
    }
}

/// The kept components.
#[derive(Clone, Debug)]
pub struct FilterOutput {
    /// 0/1 mask of the kept components.
    pub mask: Mask,
    /// Kept components relabelled `1..=kept` in their original order (0 elsewhere).
    pub labels: Array3<u32>,
    /// `sizes[l]` of the relabelled components (`sizes[0]` = background).
    pub sizes: Vec<usize>,
    /// Components dropped for their size.
    pub dropped_small: usize,
    /// Components (of sufficient size) dropped for lack of CAM support.
    pub dropped_cam: usize,
}

impl FilterOutput {
    pub fn n_components(&self) -> usize {
        self.sizes.len().saturating_sub(1)
    }
}

/// Drops the components smaller than `filter.min_voxels` and, when a CAM is given, those
/// with too few voxels inside the CAM or too low a CAM peak.
pub fn filter_components(
    labels: &Array3<u32>,
    sizes: &[usize],
    cam: Option<&Array3<f32>>,
    filter: &ComponentFilter,
) -> Result<FilterOutput> {
    if let Some(c) = cam {
        if c.dim() != labels.dim() {
            let (a, b) = (c.dim(), labels.dim());
            return Err(SegError::Shape {
                what: "CAM",
                got: vec![a.0, a.1, a.2],
                expected: vec![b.0, b.1, b.2],
            });
        }
    }
    let n = sizes.len().saturating_sub(1);
    let lab_std = labels.as_standard_layout();
    let lab = lab_std
        .as_slice()
        .ok_or_else(|| SegError::Param("labels not contiguous".into()))?;
    let stats = match cam {
        None => None,
        Some(c) => {
            let cam_std = c.as_standard_layout();
            let cv = cam_std
                .as_slice()
                .ok_or_else(|| SegError::Param("CAM not contiguous".into()))?;
            Some(component_stats(lab, n, cv, filter.cam_threshold)?)
        }
    };
    let sel = filter.select(sizes, stats.as_ref());
    let mut out_labels = Array3::<u32>::zeros(labels.raw_dim());
    let mut mask = Mask::zeros(labels.raw_dim());
    let (Some(ol), Some(om)) = (out_labels.as_slice_mut(), mask.as_slice_mut()) else {
        return Err(SegError::Param("output not contiguous".into()));
    };
    select_components(lab, &sel.keep, Some(ol), om)?;
    let mut new_sizes = Vec::with_capacity(sel.sizes.len() + 1);
    new_sizes.push(out_labels.len() - sel.sizes.iter().sum::<usize>());
    new_sizes.extend(sel.sizes);
    Ok(FilterOutput {
        mask,
        labels: out_labels,
        sizes: new_sizes,
        dropped_small: sel.dropped_small,
        dropped_cam: sel.dropped_cam,
    })
}

/// A mask after a component filter ([`drop_thin_components`], [`super::drop_outside_skull`],
/// [`super::drop_mirror_pairs`]): the mask, the components kept and those dropped.
#[derive(Clone, Debug)]
pub struct Pruned {
    pub mask: Mask,
    pub n_components: usize,
    pub dropped: usize,
}

/// Zeroes in `mask` the components `labels` of which `drop[label]` is set (label 0, the
/// background, is never dropped): the one way the component filters remove components.
pub(crate) fn prune(mask: Mask, labels: &Array3<u32>, drop: &[bool]) -> Pruned {
    let n = drop.len().saturating_sub(1);
    let dropped = drop.iter().skip(1).filter(|&&d| d).count();
    let mut mask = mask;
    if dropped > 0 {
        mask.zip_mut_with(labels, |m, &l| {
            if l > 0 && drop[l as usize] {
                *m = 0;
            }
        });
    }
    Pruned {
        mask,
        n_components: n - dropped,
        dropped,
    }
}

/// The error when a mask is not on the grid of the volume `hu` it filters.
pub(crate) fn check_same_grid(hu: &Array3<f32>, mask: &Mask) -> Result<()> {
    if hu.dim() == mask.dim() {
        return Ok(());
    }
    let (a, b) = (mask.dim(), hu.dim());
    Err(SegError::Shape {
        what: "mask",
        got: vec![a.0, a.1, a.2],
        expected: vec![b.0, b.1, b.2],
    })
}

/// Drops the components of `mask` (`connectivity`) that lie on fewer than `min_slices`
/// slices.
pub fn drop_thin_components(
    mask: Mask,
    connectivity: Connectivity,
    min_slices: usize,
) -> Result<Pruned> {
    let cc = crate::engine::cpu::ccl::connected_components(&mask, connectivity)?;
    let n = cc.n_components();
    if n == 0 || min_slices <= 1 {
        return Ok(Pruned {
            mask,
            n_components: n,
            dropped: 0,
        });
    }
    let mut slices = vec![0usize; n + 1];
    for lab in cc.labels.axis_iter(ndarray::Axis(0)) {
        let mut seen = vec![false; n + 1];
        for &l in lab.iter() {
            seen[l as usize] = true;
        }
        for (c, s) in slices.iter_mut().zip(&seen) {
            *c += *s as usize;
        }
    }
    let drop: Vec<bool> = (0..=n).map(|l| l > 0 && slices[l] < min_slices).collect();
    Ok(prune(mask, &cc.labels, &drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_components_on_too_few_slices() {
        let mut m = Mask::zeros((4, 8, 8));
        // Two slices thick, and one slice alone (far from it).
        m[[0, 1, 1]] = 1;
        m[[1, 1, 1]] = 1;
        m[[3, 6, 6]] = 1;
        m[[3, 6, 7]] = 1;
        let r = drop_thin_components(m.clone(), Connectivity::TwentySix, 2).expect("filter");
        assert_eq!((r.n_components, r.dropped), (1, 1));
        assert_eq!(r.mask[[1, 1, 1]], 1);
        assert_eq!(r.mask[[3, 6, 6]], 0);
        let r = drop_thin_components(m.clone(), Connectivity::TwentySix, 1).expect("filter");
        assert_eq!((r.mask, r.n_components, r.dropped), (m, 2, 0));
    }
}
