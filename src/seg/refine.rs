//! The whole refinement from a normalised CAM to the final mask: CAM region, k-means on the
//! subdural window inside it, the chosen cluster, dilation, 3-D connected components and
//! their filter. Knows nothing of the network or of files.

use super::ccl::{connected_components, filter_components, ComponentFilter, Connectivity};
use super::choose::{
    choose_cluster, DEFAULT_MIN_BLOOD_HU, DEFAULT_MIN_CLUSTER_VOXELS, DEFAULT_SATURATION,
};
use super::kmeans::{init_even, kmeans_1d, kmeans_1d_from, DEFAULT_K, DEFAULT_MAX_ITER};
use super::morph::{dilate, Structuring};
use super::threshold::{cam_region, DEFAULT_CAM_THRESHOLD};
use super::{Result, SegError};
use crate::data::window::Window;
use crate::io::Mask;
use ndarray::{Array3, Axis, Zip};
use rayon::prelude::*;

/// The refinement's knobs. `Default` holds the authors' values where their code fixes one
/// (CAM threshold 0.7, k = 4, per-slice k-means, a 3x3 dilation, 26-connectivity) and
/// ours elsewhere (saturation level, the blood floor, smoothing before k-means, growing into
/// the CAM's 0.4 level, minimum sizes, CAM support). On the demo's phantoms these additions
/// took the held-out Dice from 0.35 to 0.74 with the same model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefineConfig {
    /// Binary CAM = normalised CAM >= this.
    pub cam_threshold: f32,
    /// k-means clusters.
    pub k: usize,
    /// Lloyd iterations at most.
    pub max_kmeans_iter: usize,
    /// Clusters whose centroid (subdural window, [0, 1]) reaches this are bone, its
    /// partial-volume rim or calcification, not blood (default 0.6 = 100 HU, see
    /// `choose::DEFAULT_SATURATION`). Data clipped at or below it needs a lower level: the
    /// ct-ich release is clipped at 100 HU, so `infer` lowers it to 0.575 there.
    pub saturation: f32,
    /// Leave the voxels at or above `saturation` out of the k-means (ours; `false` = the
    /// authors' literal version). With them in, a few saturated voxels (a calcification)
    /// can share a cluster with the blood when the quantile start puts three centroids in
    /// the brain: their mean stays below `saturation` and the calcification is chosen.
    /// They can never be blood, so leaving them out loses nothing.
    pub exclude_saturated: bool,
    /// Clusters with fewer voxels (per slice when `per_slice_kmeans`) are not chosen.
    pub min_cluster_voxels: usize,
    /// The darkest cluster centroid (HU) that can be acute blood (ours). Without it a CAM
    /// region holding only brain still gives its brightest quarter as a lesion: the upper
    /// tail of gray-matter noise. Acute blood is 50-90 HU, brain 25-45 HU.
    pub min_blood_hu: f32,
    /// In-plane box filter radius applied to the HU before clustering (ours; 0 = the
    /// authors' raw intensities). CT noise (sigma 4-10 HU) spreads brain into the blood
    /// range voxel by voxel; a 3x3 mean cuts it threefold and leaves blobs of blood intact.
    pub smooth_radius: usize,
    /// Grow the lesion beyond the binary CAM (ours): k-means inside the CAM (>= `cam_threshold`)
    /// fixes the blood's intensity band per slice (from the boundary below the chosen cluster
    /// up to `saturation`); the mask is then every voxel in that band where the CAM reaches
    /// this lower threshold. The CAM is coarse (one value per 8-32 input pixels) and its
    /// 0.7 level covers only the core of a large hematoma. Equal to `cam_threshold` = off.
    pub grow_cam_threshold: f32,
    /// In-plane dilation radius of the chosen cluster (0 = none).
    pub dilate_radius: usize,
    /// Structuring element of the dilation.
    pub dilate_shape: Structuring,
    /// 3-D connectivity of the components.
    pub connectivity: Connectivity,
    /// Components with fewer voxels are dropped (see [`RefineConfig::with_min_component_ml`]).
    pub min_component_voxels: usize,
    /// Fraction of a component's voxels that must lie where the CAM reaches
    /// `grow_cam_threshold` (the binary CAM itself when growth is off); the component must
    /// also reach `cam_threshold` somewhere.
    pub min_cam_support: f32,
    /// k-means per slice (the authors) or once over the whole volume.
    pub per_slice_kmeans: bool,
    /// Ours, or the authors' literal pseudo-mask ([`refine_authors`]).
    #[serde(default)]
    pub mode: RefineMode,
    /// The lowest HU of the kept band (ours): `Some` = this fixed value (the k-means still
    /// decides whether a slice's CAM region holds a blood cluster at all), `None` = halfway
    /// between the chosen cluster and the one below it. Inside a CAM region that is mostly
    /// blood, k-means splits the blood itself and the halfway edge keeps only its brighter
    /// part.
    #[serde(default)]
    pub band_floor_hu: Option<f32>,
    /// In-plane opening radius (erosion then dilation with a square) of the band mask
    /// before the dilation (ours; 0 = off): removes what is thinner than `2r + 1` pixels,
    /// the cortical ribbon and the partial-volume rim along the inner table that share the
    /// blood's HU, and keeps blobs and hematomas thicker than that.
    #[serde(default)]
    pub open_radius: usize,
}

/// Which refinement runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefineMode {
    /// The rules of [`refine`] (CAM region, blood band, growth, components).
    #[default]
    Ours,
    /// SWICH-Seg's code, literally: [`refine_authors`].
    Authors,
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
            min_blood_hu: DEFAULT_MIN_BLOOD_HU,
            smooth_radius: 1,
            grow_cam_threshold: DEFAULT_GROW_CAM_THRESHOLD,
            dilate_radius: 1,
            dilate_shape: Structuring::Square,
            connectivity: Connectivity::TwentySix,
            min_component_voxels: 50,
            min_cam_support: 0.5,
            per_slice_kmeans: true,
            mode: RefineMode::Ours,
            band_floor_hu: None,
            open_radius: 0,
        }
    }
}

/// The smallest component (mL) of the real-CT refinement ([`RefineConfig::real_ct`]).
pub const REAL_CT_MIN_COMPONENT_ML: f64 = 0.3;

impl RefineConfig {
    /// The rules re-tuned on real head CT by 5-fold patient cross-validation on ct-ich
    /// (docs/accuracy.md; `ichcam segment`'s defaults and the stage-3 pseudo-masks of the
    /// `cpu` preset): k-means inside CAM >= 0.4; where it finds a blood cluster, every
    /// voxel from 55 HU up to the saturation where the CAM reaches 0.1, opened by 2 px;
    /// components of at least [`REAL_CT_MIN_COMPONENT_ML`] (set from the spacing by
    /// [`volume_config`]). `Default` keeps the phantom-tuned rules.
    pub fn real_ct() -> Self {
        RefineConfig {
            cam_threshold: 0.4,
            grow_cam_threshold: 0.1,
            band_floor_hu: Some(55.0),
            open_radius: 2,
            ..RefineConfig::default()
        }
    }

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
            || !self.min_blood_hu.is_finite()
            || !self.saturation.is_finite()
            || !self.min_cam_support.is_finite()
        {
            return Err(SegError::Param("thresholds must be finite".into()));
        }
        Ok(())
    }
}

/// The saturation level for a volume: `configured`, or just under the clip value of data
/// clipped below 180 HU (the top of the 80/200 window), as the ct-ich release is at 100
/// HU: otherwise clipped bone is the "brightest non-saturated" cluster.
pub fn effective_saturation(hu: &Array3<f32>, configured: f32) -> f32 {
    let max = hu
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || max >= 180.0 {
        return configured;
    }
    let at_max = hu.iter().filter(|&&v| v >= max - 0.5).count();
    // Clipped data piles up at its maximum; natural data does not (0.1 % of the voxels).
    if (at_max as f64) < 1e-3 * hu.len() as f64 {
        return configured;
    }
    configured.min(subdural(max) - 0.025)
}

/// The rules as applied to one volume: the minimum component size from millilitres and the
/// voxel spacing (when `min_component_ml` is set) and, when `adapt_saturation`, the
/// saturation lowered under the clip value of clipped data ([`effective_saturation`]).
pub fn volume_config(
    rules: &RefineConfig,
    min_component_ml: Option<f64>,
    adapt_saturation: bool,
    hu: &Array3<f32>,
    spacing: [f64; 3],
) -> RefineConfig {
    let mut cfg = rules.clone();
    if let Some(ml) = min_component_ml {
        cfg = cfg.with_min_component_ml(ml, spacing);
    }
    if adapt_saturation {
        cfg.saturation = effective_saturation(hu, cfg.saturation);
    }
    cfg
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

/// The CAM level the lesion may grow to (see [`RefineConfig::grow_cam_threshold`]).
pub const DEFAULT_GROW_CAM_THRESHOLD: f32 = 0.4;

/// In-plane box mean of radius `r` over the in-bounds neighbours, per slice. A voxel whose
/// window holds a saturated voxel (subdural window >= `saturation`: bone, calcification)
/// becomes +inf, i.e. saturated itself: its mean is a partial-volume halo that would land in
/// the blood band around every calcification and along the inner skull. The sum runs in a
/// fixed order (rows, then columns, in f32) so that the device kernel gives the same bits.
pub fn box_smooth(hu: &Array3<f32>, r: usize, saturation: f32) -> Array3<f32> {
    let (d, h, w) = hu.dim();
    let mut out = Array3::<f32>::zeros((d, h, w));
    let r = r as isize;
    let jobs: Vec<_> = out
        .axis_iter_mut(Axis(0))
        .zip(hu.axis_iter(Axis(0)))
        .collect();
    jobs.into_par_iter().for_each(|(mut o, src)| {
        for y in 0..h as isize {
            for x in 0..w as isize {
                let (mut sum, mut n, mut hot) = (0.0f32, 0u32, false);
                for yy in (y - r).max(0)..=(y + r).min(h as isize - 1) {
                    for xx in (x - r).max(0)..=(x + r).min(w as isize - 1) {
                        let v = src[[yy as usize, xx as usize]];
                        hot |= subdural(v) >= saturation;
                        sum += v;
                        n += 1;
                    }
                }
                o[[y as usize, x as usize]] = if hot { f32::INFINITY } else { sum / n as f32 };
            }
        }
    });
    out
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
    pseudo_mask_grown(hu, region, region, cfg)
}

/// The lower edge of the chosen cluster `c`: halfway to the brightest populated cluster
/// below it, or `floor` when nothing lies below (1-D clusters are intervals). Voxels from
/// there up to the saturation level are what k-means calls this cluster, wherever the CAM
/// reaches the grow level.
pub fn band_low(centroids: &[f32], counts: &[usize], c: usize, floor: f32) -> f32 {
    let top = centroids[c];
    let below = centroids
        .iter()
        .zip(counts)
        .filter(|(&v, &n)| n > 0 && v < top)
        .map(|(&v, _)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    if below.is_finite() {
        0.5 * (below + top)
    } else {
        floor.min(top)
    }
}

/// The lower edge of the kept band for chosen cluster `c`, in subdural-window units:
/// `cfg.band_floor_hu` when set, else [`band_low`] with the blood floor. (The device
/// refinement calls this too.)
pub fn band_edge(cfg: &RefineConfig, centroids: &[f32], counts: &[usize], c: usize) -> f32 {
    match cfg.band_floor_hu {
        Some(hu) => subdural(hu),
        None => band_low(centroids, counts, c, subdural(cfg.min_blood_hu)),
    }
}

/// [`pseudo_mask`] that clusters inside `region` and keeps the chosen band inside `grow`
/// (a superset of `region`; pass `region` itself for the authors' version).
pub fn pseudo_mask_grown(
    hu: &Array3<f32>,
    region: &Mask,
    grow: &Mask,
    cfg: &RefineConfig,
) -> Result<Mask> {
    cfg.check()?;
    same_shape("region", region.dim(), hu.dim())?;
    same_shape("grow region", grow.dim(), hu.dim())?;
    let smoothed;
    let hu = if cfg.smooth_radius > 0 {
        smoothed = box_smooth(hu, cfg.smooth_radius, cfg.saturation);
        &smoothed
    } else {
        hu
    };
    let floor = subdural(cfg.min_blood_hu);
    let mut out = Mask::zeros(hu.raw_dim());
    // The voxels k-means sees: the region, less the saturated ones if so configured.
    let takes = |h: f32, r: u8| r != 0 && (!cfg.exclude_saturated || subdural(h) < cfg.saturation);
    let cluster = |hu: ndarray::ArrayView3<f32>,
                   region: ndarray::ArrayView3<u8>,
                   grow: ndarray::ArrayView3<u8>,
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
            floor,
            cfg.saturation,
            cfg.min_cluster_voxels,
        ) else {
            return;
        };
        let lo = band_edge(cfg, &km.centroids, &km.counts, c);
        Zip::from(&mut out)
            .and(&hu)
            .and(&grow)
            .for_each(|o, &h, &g| {
                *o = u8::from(takes(h, g) && subdural(h) >= lo);
            });
    };
    if cfg.per_slice_kmeans {
        let jobs: Vec<_> = out
            .axis_iter_mut(Axis(0))
            .zip(hu.axis_iter(Axis(0)).zip(region.axis_iter(Axis(0))))
            .zip(grow.axis_iter(Axis(0)))
            .collect();
        jobs.into_par_iter().for_each(|((o, (h, r)), g)| {
            cluster(
                h.insert_axis(Axis(0)),
                r.insert_axis(Axis(0)),
                g.insert_axis(Axis(0)),
                o.insert_axis(Axis(0)),
            );
        });
    } else {
        cluster(hu.view(), region.view(), grow.view(), out.view_mut());
    }
    Ok(out)
}

/// The authors' brightest-cluster ceiling: 140 of 255 (subdural-window units x 255).
pub const AUTHORS_MAX_CLUSTER: f32 = 140.0;

/// SWICH-Seg's pseudo-mask, literally, on every positive slice: the product of the
/// normalised CAM and the subdural window (scaled to 0-255) over the whole slice, k-means
/// (`cfg.k`, the authors' 4) on all its pixels (started from evenly spaced centroids: a
/// quantile start collapses on a slice that is mostly dark, where the authors' k-means++
/// does not), the brightest cluster whose mean is below
/// 140, then two dilations with a 4x4 square (OpenCV's default anchor: an object grows 1
/// pixel up/left and 2 down/right per pass); no smoothing, no blood floor, no connected components.
/// `cfg.cam_threshold` and the component rules are not used.
pub fn refine_authors(
    hu: &Array3<f32>,
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> Result<RefineOutput> {
    let (_, h, w) = hu.dim();
    let mut mask = Mask::zeros(hu.raw_dim());
    let mut cluster_voxels = 0usize;
    for (z, mut out) in mask.axis_iter_mut(Axis(0)).enumerate() {
        if !slice_positive[z] {
            continue;
        }
        let img: Vec<f32> = hu
            .index_axis(Axis(0), z)
            .iter()
            .zip(cam_norm.index_axis(Axis(0), z).iter())
            .map(|(&v, &c)| subdural(v) * 255.0 * c.clamp(0.0, 1.0))
            .collect();
        let k = cfg.k.clamp(1, 255);
        let km = kmeans_1d_from(&img, init_even(&img, k), cfg.max_kmeans_iter);
        let Some(c) = km
            .centroids
            .iter()
            .zip(&km.counts)
            .enumerate()
            .filter(|(_, (&m, &n))| n > 0 && m < AUTHORS_MAX_CLUSTER)
            .max_by(|a, b| a.1 .0.total_cmp(b.1 .0))
            .map(|(i, _)| i)
        else {
            continue;
        };
        let mut m: Vec<u8> = km
            .labels
            .iter()
            .map(|&l| u8::from(l as usize == c))
            .collect();
        cluster_voxels += m.iter().filter(|&&v| v != 0).count();
        for _ in 0..2 {
            m = dilate_anchor(&m, h, w, 2, 1);
        }
        for (o, &v) in out.iter_mut().zip(&m) {
            *o = v;
        }
    }
    let n = mask.iter().filter(|&&v| v != 0).count();
    Ok(RefineOutput {
        n_components: usize::from(n > 0),
        component_sizes: if n > 0 { vec![n] } else { Vec::new() },
        mask,
        cam_voxels: 0,
        cluster_voxels,
        dropped_small: 0,
        dropped_cam: 0,
    })
}

/// Binary dilation of an `h x w` slice: `dst(y, x) = max src(y - before ..= y + after,
/// x - before ..= x + after)` (OpenCV's 4x4 kernel with its default anchor: before 2,
/// after 1).
pub fn dilate_anchor(m: &[u8], h: usize, w: usize, before: usize, after: usize) -> Vec<u8> {
    let mut rows = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            let r = x.saturating_sub(before)..=(x + after).min(w - 1);
            rows[y * w + x] = u8::from(r.into_iter().any(|xx| m[y * w + xx] != 0));
        }
    }
    let mut out = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            let r = y.saturating_sub(before)..=(y + after).min(h - 1);
            out[y * w + x] = u8::from(r.into_iter().any(|yy| rows[yy * w + x] != 0));
        }
    }
    out
}

/// The whole refinement. `cam_norm` is the min-max normalised CAM upsampled to the slices,
/// `slice_positive[z]` the classifier's decision for slice `z` (negative slices get an empty
/// mask). `cfg.mode` picks ours or [`refine_authors`].
pub fn refine(
    hu: &Array3<f32>,
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> Result<RefineOutput> {
    cfg.check()?;
    if cfg.mode == RefineMode::Authors {
        same_shape("CAM", cam_norm.dim(), hu.dim())?;
        if slice_positive.len() != hu.dim().0 {
            return Err(SegError::Shape {
                what: "slice decisions",
                got: vec![slice_positive.len()],
                expected: vec![hu.dim().0],
            });
        }
        return refine_authors(hu, cam_norm, slice_positive, cfg);
    }
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
    let grow_threshold = cfg.grow_cam_threshold.min(cfg.cam_threshold);
    let grow = positive_cam_region(cam_norm, slice_positive, grow_threshold);
    let mut clusters = pseudo_mask_grown(hu, &region, &grow, cfg)?;
    if cfg.open_radius > 0 {
        let eroded = super::morph::erode(&clusters, cfg.open_radius, Structuring::Square);
        clusters = dilate(&eroded, cfg.open_radius, Structuring::Square);
    }
    let cluster_voxels = clusters.iter().filter(|&&v| v != 0).count();
    let grown = dilate(&clusters, cfg.dilate_radius, cfg.dilate_shape);
    let ccl = connected_components(&grown, cfg.connectivity)?;
    // A component must lie mostly inside the CAM's grow level and reach into its core.
    let filter = ComponentFilter {
        min_voxels: cfg.min_component_voxels,
        cam_threshold: grow_threshold,
        min_cam_fraction: cfg.min_cam_support,
        min_peak_cam: cfg.cam_threshold,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_drops_below_the_clip_of_clipped_data_only() {
        // Brain-windowed data clipped at 100 HU, bone piled up at the clip value.
        let mut clipped = Array3::<f32>::from_elem((2, 20, 20), 35.0);
        clipped.slice_mut(ndarray::s![.., 0..4, ..]).fill(100.0);
        let s = effective_saturation(&clipped, 0.6);
        assert!((s - 0.575).abs() < 1e-6, "{s}");
        // Natural CT reaches far past the window's top: unchanged.
        let mut natural = clipped.clone();
        natural[[0, 0, 0]] = 1200.0;
        assert_eq!(effective_saturation(&natural, 0.6), 0.6);
        // A maximum below 180 HU that is not piled up (no clipping): unchanged.
        let mut soft = Array3::<f32>::from_elem((2, 40, 40), 35.0);
        soft[[1, 5, 5]] = 90.0;
        assert_eq!(effective_saturation(&soft, 0.6), 0.6);
        let c = volume_config(
            &RefineConfig::real_ct(),
            Some(0.3),
            true,
            &clipped,
            [5.0, 0.5, 0.5],
        );
        assert_eq!(c.min_component_voxels, 240);
        assert!((c.saturation - 0.575).abs() < 1e-6);
    }
}
