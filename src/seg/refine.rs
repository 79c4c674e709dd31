//! The whole refinement from a normalised CAM to the final mask: CAM region, k-means on the
//! subdural window inside it, the chosen cluster, dilation, 3-D connected components and
//! their filter. Knows nothing of the network or of files.

use super::ccl::{connected_components, filter_components, ComponentFilter, Connectivity};
use super::choose::{choose_cluster, DEFAULT_MIN_CLUSTER_VOXELS, DEFAULT_SATURATION};
use super::kmeans::{kmeans_1d, DEFAULT_K, DEFAULT_MAX_ITER};
use super::morph::{dilate, Structuring};
use super::threshold::{cam_region, DEFAULT_CAM_THRESHOLD};
use super::{Result, SegError};
use crate::data::window::Window;
use crate::io::Mask;
use ndarray::{Array3, Axis, Zip};
use rayon::prelude::*;

/// The refinement's knobs. `Default` holds the authors' values where their code fixes one
/// (CAM threshold 0.7, k = 4, per-slice k-means, a 3x3 dilation, 26-connectivity) and
/// ours elsewhere (saturation, minimum sizes, CAM support).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefineConfig {
    /// Binary CAM = normalised CAM >= this.
    pub cam_threshold: f32,
    /// k-means clusters.
    pub k: usize,
    /// Lloyd iterations at most.
    pub max_kmeans_iter: usize,
    /// Clusters whose centroid (subdural window, [0, 1]) reaches this are bone or
    /// calcification, not blood. Data clipped below 180 HU needs a lower level: the
    /// ct-ich release is clipped at 100 HU, i.e. 0.6, so use about 0.575 there.
    pub saturation: f32,
    /// Leave the voxels at or above `saturation` out of the k-means (ours; `false` = the
    /// authors' literal version). With them in, a few saturated voxels (a calcification)
    /// can share a cluster with the blood when the quantile start puts three centroids in
    /// the brain: their mean stays below `saturation` and the calcification is chosen.
    /// They can never be blood, so leaving them out loses nothing.
    pub exclude_saturated: bool,
    /// Clusters with fewer voxels (per slice when `per_slice_kmeans`) are not chosen.
    pub min_cluster_voxels: usize,
    /// In-plane dilation radius of the chosen cluster (0 = none).
    pub dilate_radius: usize,
    /// Structuring element of the dilation.
    pub dilate_shape: Structuring,
    /// 3-D connectivity of the components.
    pub connectivity: Connectivity,
    /// Components with fewer voxels are dropped (see [`RefineConfig::with_min_component_ml`]).
    pub min_component_voxels: usize,
    /// Fraction of a component's voxels that must lie inside the binary CAM.
    pub min_cam_support: f32,
    /// k-means per slice (the authors) or once over the whole volume.
    pub per_slice_kmeans: bool,
}

impl Default for RefineConfig {
    fn default() -> Self {
        RefineConfig {
            cam_threshold: DEFAULT_CAM_THRESHOLD,
            k: DEFAULT_K,
            max_kmeans_iter: DEFAULT_MAX_ITER,
            saturation: DEFAULT_SATURATION,
            exclude_saturated: true,
            min_cluster_voxels: DEFAULT_MIN_CLUSTER_VOXELS,
            dilate_radius: 1,
            dilate_shape: Structuring::Square,
            connectivity: Connectivity::TwentySix,
            min_component_voxels: 50,
            min_cam_support: 0.5,
            per_slice_kmeans: true,
        }
    }
}

impl RefineConfig {
    /// Sets the minimum component size from millilitres and the voxel spacing (mm, any
    /// order); at least one voxel.
    pub fn with_min_component_ml(mut self, ml: f64, spacing: [f64; 3]) -> Self {
        let voxel_ml = spacing.iter().product::<f64>() / 1000.0;
        let n = if voxel_ml > 0.0 && ml.is_finite() {
            (ml / voxel_ml).ceil()
        } else {
            1.0
        };
        self.min_component_voxels = n.clamp(1.0, usize::MAX as f64) as usize;
        self
    }

    fn check(&self) -> Result<()> {
        if self.k == 0 || self.k > 255 {
            return Err(SegError::Param(format!(
                "k must be in 1..=255, got {}",
                self.k
            )));
        }
        if !self.cam_threshold.is_finite()
            || !self.saturation.is_finite()
            || !self.min_cam_support.is_finite()
        {
            return Err(SegError::Param("thresholds must be finite".into()));
        }
        Ok(())
    }
}

/// The refined mask and what happened on the way.
#[derive(Clone, Debug)]
pub struct RefineOutput {
    /// Final 0/1 mask `[z, y, x]`.
    pub mask: Mask,
    /// Components kept.
    pub n_components: usize,
    /// Voxels of each kept component (in label order).
    pub component_sizes: Vec<usize>,
    /// Voxels of the binary CAM on the positive slices.
    pub cam_voxels: usize,
    /// Voxels of the chosen k-means clusters (before the dilation).
    pub cluster_voxels: usize,
    /// Components dropped for their size / for lack of CAM support.
    pub dropped_small: usize,
    pub dropped_cam: usize,
}

/// The subdural window (level 80, width 200) to [0, 1], as the model's input channel.
#[inline]
fn subdural(hu: f32) -> f32 {
    Window::SUBDURAL.apply(hu)
}

/// CAM region on the positive slices only.
pub fn positive_cam_region(
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    threshold: f32,
) -> Mask {
    let mut region = cam_region(cam_norm, threshold);
    for (mut s, &pos) in region.axis_iter_mut(Axis(0)).zip(slice_positive) {
        if !pos {
            s.fill(0);
        }
    }
    region
}

/// The pseudo-mask: inside `region` (less the saturated voxels when
/// `cfg.exclude_saturated`), k-means on the subdural window (per slice or over the volume),
/// keeping the chosen cluster's voxels. Returns the mask (not dilated).
pub fn pseudo_mask(hu: &Array3<f32>, region: &Mask, cfg: &RefineConfig) -> Result<Mask> {
    cfg.check()?;
    same_shape("region", region.dim(), hu.dim())?;
    let mut out = Mask::zeros(hu.raw_dim());
    // The voxels k-means sees: the region, less the saturated ones if so configured.
    let takes = |h: f32, r: u8| r != 0 && (!cfg.exclude_saturated || subdural(h) < cfg.saturation);
    let cluster = |hu: ndarray::ArrayView3<f32>,
                   region: ndarray::ArrayView3<u8>,
                   mut out: ndarray::ArrayViewMut3<u8>| {
        let values: Vec<f32> = hu
            .iter()
            .zip(region.iter())
            .filter(|(&h, &r)| takes(h, r))
            .map(|(&h, _)| subdural(h))
            .collect();
        if values.is_empty() {
            return;
        }
        let km = kmeans_1d(&values, cfg.k, cfg.max_kmeans_iter);
        let Some(c) = choose_cluster(
            &km.centroids,
            &km.counts,
            cfg.saturation,
            cfg.min_cluster_voxels,
        ) else {
            return;
        };
        let mut it = km.labels.iter();
        Zip::from(&mut out)
            .and(&hu)
            .and(&region)
            .for_each(|o, &h, &r| {
                if takes(h, r) {
                    if let Some(&l) = it.next() {
                        *o = u8::from(l as usize == c);
                    }
                }
            });
    };
    if cfg.per_slice_kmeans {
        let jobs: Vec<_> = out
            .axis_iter_mut(Axis(0))
            .zip(hu.axis_iter(Axis(0)).zip(region.axis_iter(Axis(0))))
            .collect();
        jobs.into_par_iter().for_each(|(o, (h, r))| {
            cluster(
                h.insert_axis(Axis(0)),
                r.insert_axis(Axis(0)),
                o.insert_axis(Axis(0)),
            );
        });
    } else {
        cluster(hu.view(), region.view(), out.view_mut());
    }
    Ok(out)
}

/// The whole refinement. `cam_norm` is the min-max normalised CAM upsampled to the slices,
/// `slice_positive[z]` the classifier's decision for slice `z` (negative slices get an empty
/// mask).
pub fn refine(
    hu: &Array3<f32>,
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> Result<RefineOutput> {
    cfg.check()?;
    same_shape("CAM", cam_norm.dim(), hu.dim())?;
    if slice_positive.len() != hu.dim().0 {
        return Err(SegError::Shape {
            what: "slice decisions",
            got: vec![slice_positive.len()],
            expected: vec![hu.dim().0],
        });
    }
    let region = positive_cam_region(cam_norm, slice_positive, cfg.cam_threshold);
    let cam_voxels = region.iter().filter(|&&v| v != 0).count();
    let clusters = pseudo_mask(hu, &region, cfg)?;
    let cluster_voxels = clusters.iter().filter(|&&v| v != 0).count();
    let grown = dilate(&clusters, cfg.dilate_radius, cfg.dilate_shape);
    let ccl = connected_components(&grown, cfg.connectivity)?;
    let filter = ComponentFilter {
        min_voxels: cfg.min_component_voxels,
        cam_threshold: cfg.cam_threshold,
        min_cam_fraction: cfg.min_cam_support,
        min_peak_cam: 0.0,
    };
    let f = filter_components(&ccl.labels, &ccl.sizes, Some(cam_norm), &filter)?;
    Ok(RefineOutput {
        n_components: f.n_components(),
        component_sizes: f.sizes[1..].to_vec(),
        mask: f.mask,
        cam_voxels,
        cluster_voxels,
        dropped_small: f.dropped_small,
        dropped_cam: f.dropped_cam,
    })
}

fn same_shape(
    what: &'static str,
    got: (usize, usize, usize),
    expected: (usize, usize, usize),
) -> Result<()> {
    if got != expected {
        return Err(SegError::Shape {
            what,
            got: vec![got.0, got.1, got.2],
            expected: vec![expected.0, expected.1, expected.2],
        });
    }
    Ok(())
}
