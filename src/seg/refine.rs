//! The whole refinement from a normalised CAM to the final mask, written once over the
//! engine's volume ops ([`VolumeOps`]: the CPU reference or the GPU's kernels): CAM region
//! on the positive slices, k-means on the subdural window inside it, the chosen cluster's
//! band, opening and dilation, 3-D connected components and their filter. The decisions
//! between the ops (which cluster, which band, which components) run on the host over the
//! few numbers the ops return. Knows nothing of the network or of files.

use super::ccl::ComponentFilter;
use super::choose::{
    choose_cluster, DEFAULT_MIN_BLOOD_HU, DEFAULT_MIN_CLUSTER_VOXELS, DEFAULT_SATURATION,
};
use super::threshold::DEFAULT_CAM_THRESHOLD;
use super::{Result, SegError};
use crate::data::window::Window;
use crate::engine::cpu::kmeans::{init_even, kmeans_1d_from};
use crate::engine::cpu::{volume as cpu_volume, CpuBackend};
use crate::engine::volume::{Dims, VolumeOps};
use crate::engine::{Connectivity, Structuring};
use crate::io::Mask;
use ndarray::{Array3, Axis};
use std::borrow::{Borrow, BorrowMut};

/// The authors' number of k-means clusters.
pub const DEFAULT_K: usize = 4;
/// Lloyd iterations at most (k-means stops earlier once no assignment changes).
pub const DEFAULT_MAX_ITER: usize = 50;

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

/// In-plane box mean of radius `r` over the in-bounds neighbours, per slice, on the CPU. A
/// voxel whose window holds a saturated voxel (subdural window >= `saturation`: bone,
/// calcification) becomes +inf, i.e. saturated itself: its mean is a partial-volume halo
/// that would land in the blood band around every calcification and along the inner skull.
/// The refinement runs the same op ([`VolumeOps::box_mean`]) on its backend.
pub fn box_smooth(hu: &Array3<f32>, r: usize, saturation: f32) -> Result<Array3<f32>> {
    let w = Window::SUBDURAL;
    let x = hu.as_standard_layout();
    let mut out = Array3::<f32>::zeros(hu.raw_dim());
    let (Some(xs), Some(os)) = (x.as_slice(), out.as_slice_mut()) else {
        return Err(SegError::Param("array not contiguous".into()));
    };
    cpu_volume::box_mean(xs, hu.dim(), r, w.lo(), w.width, saturation, os)?;
    Ok(out)
}

/// CAM region on the positive slices only (CPU).
pub fn positive_cam_region(
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    threshold: f32,
) -> Result<Mask> {
    let c = cam_norm.as_standard_layout();
    let mut out = Mask::zeros(cam_norm.raw_dim());
    let (Some(cs), Some(os)) = (c.as_slice(), out.as_slice_mut()) else {
        return Err(SegError::Param("array not contiguous".into()));
    };
    cpu_volume::threshold_slices(cs, cam_norm.dim(), slice_positive, threshold, os)?;
    Ok(out)
}

/// The pseudo-mask on the CPU: inside `region` (less the saturated voxels when
/// `cfg.exclude_saturated`), k-means on the (smoothed) subdural window, per slice or over
/// the volume, keeping the chosen cluster's band inside `region`. Not dilated.
pub fn pseudo_mask(hu: &Array3<f32>, region: &Mask, cfg: &RefineConfig) -> Result<Mask> {
    cfg.check()?;
    same_shape("region", region.dim(), hu.dim())?;
    let be = CpuBackend::<f32>::new();
    let dims = hu.dim();
    let hu_std = hu.as_standard_layout();
    let Some(h) = hu_std.as_slice() else {
        return Err(SegError::Param("array not contiguous".into()));
    };
    let mut values = vec![0f32; h.len()];
    subdural_values(&be, h, dims, cfg, &mut values)?;
    let mut clustered = region.iter().copied().collect::<Vec<u8>>();
    let mut out = vec![0u8; h.len()];
    let grow = clustered.clone();
    blood_band(&be, &values, dims, &mut clustered, &grow, cfg, &mut out)?;
    Array3::from_shape_vec(dims, out).map_err(|e| SegError::Param(e.to_string()))
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
/// `cfg.band_floor_hu` when set, else [`band_low`] with the blood floor.
pub fn band_edge(cfg: &RefineConfig, centroids: &[f32], counts: &[usize], c: usize) -> f32 {
    match cfg.band_floor_hu {
        Some(hu) => subdural(hu),
        None => band_low(centroids, counts, c, subdural(cfg.min_blood_hu)),
    }
}

/// `values` = the subdural window of `hu`, box-smoothed first when `cfg.smooth_radius > 0`.
fn subdural_values<B: VolumeOps>(
    be: &B,
    hu: &B::Vol,
    dims: Dims,
    cfg: &RefineConfig,
    values: &mut B::Vol,
) -> crate::engine::Result<()> {
    let w = Window::SUBDURAL;
    if cfg.smooth_radius > 0 {
        let n = dims.0 * dims.1 * dims.2;
        let mut smoothed = be.zeros(n)?;
        let sm = be.vol_mut(&mut smoothed);
        be.box_mean(
            hu,
            dims,
            cfg.smooth_radius,
            w.lo(),
            w.width,
            cfg.saturation,
            sm,
        )?;
        be.window(be.vol(&smoothed), w.lo(), w.width, values)?;
    } else {
        be.window(hu, w.lo(), w.width, values)?;
    }
    Ok(())
}

/// The blood band: k-means on `values` inside `region` (the saturated voxels taken out of
/// `region` first when `cfg.exclude_saturated`), per slice or over the volume; in each
/// segment where [`choose_cluster`] finds a blood cluster, `out` = the voxels of `grow` from
/// the band's edge ([`band_edge`]) up (to the saturation when it is excluded).
fn blood_band<B: VolumeOps>(
    be: &B,
    values: &B::Vol,
    dims: Dims,
    region: &mut B::Mask,
    grow: &B::Mask,
    cfg: &RefineConfig,
    out: &mut B::Mask,
) -> Result<()> {
    if cfg.k > be.max_clusters() {
        return Err(SegError::Param(format!(
            "k = {} exceeds this backend's k-means limit of {}",
            cfg.k,
            be.max_clusters()
        )));
    }
    if cfg.exclude_saturated {
        be.keep_below(values, cfg.saturation, region)?;
    }
    let n = dims.0 * dims.1 * dims.2;
    let (segments, seg_len) = if cfg.per_slice_kmeans {
        (dims.0, dims.1 * dims.2)
    } else {
        (1, n)
    };
    let km = be.kmeans_segments(
        values,
        region,
        segments,
        seg_len,
        cfg.k,
        cfg.max_kmeans_iter,
    )?;
    let floor = subdural(cfg.min_blood_hu);
    // No blood cluster: an edge nothing reaches (the values are in [0, 1] or NaN).
    let lo: Vec<f32> = (0..segments)
        .map(|s| {
            let (c, k) = (km.centroids_of(s), km.counts_of(s));
            choose_cluster(c, k, floor, cfg.saturation, cfg.min_cluster_voxels)
                .map_or(f32::INFINITY, |i| band_edge(cfg, c, k, i))
        })
        .collect();
    let below = cfg.exclude_saturated.then_some(cfg.saturation);
    be.band(values, grow, seg_len, &lo, below, out)?;
    Ok(())
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

/// The whole refinement on the CPU. `cam_norm` is the min-max normalised CAM upsampled to
/// the slices, `slice_positive[z]` the classifier's decision for slice `z` (negative slices
/// get an empty mask). `cfg.mode` picks ours or [`refine_authors`].
pub fn refine(
    hu: &Array3<f32>,
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> Result<RefineOutput> {
    same_shape("CAM", cam_norm.dim(), hu.dim())?;
    let cam = cam_norm.as_standard_layout();
    let Some(c) = cam.as_slice() else {
        return Err(SegError::Param("CAM not contiguous".into()));
    };
    refine_on(&CpuBackend::<f32>::new(), hu, c, slice_positive, cfg)
}

/// The whole refinement on `be`: `hu` the HU volume `[z, y, x]` on the host (the backend
/// reads it as a volume of its own), `cam_norm` the normalised CAM of the same shape on the
/// backend, `slice_positive[z]` the classifier's decision for slice `z`. Ours runs every
/// step on the backend; [`RefineMode::Authors`] runs on the host (the CAM read back).
pub fn refine_on<B: VolumeOps>(
    be: &B,
    hu: &Array3<f32>,
    cam_norm: &B::Vol,
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> Result<RefineOutput> {
    cfg.check()?;
    let dims = hu.dim();
    if slice_positive.len() != dims.0 {
        return Err(SegError::Shape {
            what: "slice decisions",
            got: vec![slice_positive.len()],
            expected: vec![dims.0],
        });
    }
    if cfg.mode == RefineMode::Authors {
        let cam = Array3::from_shape_vec(dims, be.vol_to_host(cam_norm)?).map_err(|_| {
            SegError::Shape {
                what: "CAM",
                got: vec![dims.0 * dims.1 * dims.2],
                expected: vec![dims.0, dims.1, dims.2],
            }
        })?;
        return refine_authors(hu, &cam, slice_positive, cfg);
    }
    let n = crate::engine::volume::voxels("refine", dims)?;
    if n == 0 {
        return Ok(RefineOutput {
            mask: Mask::zeros(dims),
            n_components: 0,
            component_sizes: Vec::new(),
            cam_voxels: 0,
            cluster_voxels: 0,
            dropped_small: 0,
            dropped_cam: 0,
        });
    }
    let hu_std = hu.as_standard_layout();
    let Some(h) = hu_std.as_slice() else {
        return Err(SegError::Param("HU volume not contiguous".into()));
    };
    let grow_threshold = cfg.grow_cam_threshold.min(cfg.cam_threshold);
    // The CAM region on the positive slices, and the wider one the lesion may grow into.
    let mut region = be.mask(n)?;
    be.threshold_slices(
        cam_norm,
        dims,
        slice_positive,
        cfg.cam_threshold,
        region.borrow_mut(),
    )?;
    let cam_voxels = be.count_nonzero(region.borrow())?;
    let mut grow = be.mask(n)?;
    be.threshold_slices(
        cam_norm,
        dims,
        slice_positive,
        grow_threshold,
        grow.borrow_mut(),
    )?;
    // The blood band of the (smoothed) subdural window.
    let mut values = be.zeros(n)?;
    be.with_host_vol(h, |hu| {
        subdural_values(be, hu, dims, cfg, be.vol_mut(&mut values))
    })?;
    let mut clusters = be.mask(n)?;
    blood_band(
        be,
        be.vol(&values),
        dims,
        region.borrow_mut(),
        grow.borrow(),
        cfg,
        clusters.borrow_mut(),
    )?;
    drop((values, region, grow));
    // Opening (erosion, then dilation with a square), then the dilation.
    let mut tmp = be.mask(n)?;
    if cfg.open_radius > 0 {
        let r = cfg.open_radius;
        be.morph2d(
            clusters.borrow(),
            dims,
            r,
            Structuring::Square,
            false,
            tmp.borrow_mut(),
        )?;
        be.morph2d(
            tmp.borrow(),
            dims,
            r,
            Structuring::Square,
            true,
            clusters.borrow_mut(),
        )?;
    }
    let cluster_voxels = be.count_nonzero(clusters.borrow())?;
    be.morph2d(
        clusters.borrow(),
        dims,
        cfg.dilate_radius,
        cfg.dilate_shape,
        true,
        tmp.borrow_mut(),
    )?;
    let grown = tmp;
    // The components, kept when big enough, mostly inside the CAM's grow level and
    // reaching into its core.
    let (labels, sizes) = be.components(grown.borrow(), dims, cfg.connectivity)?;
    drop(grown);
    let filter = ComponentFilter {
        min_voxels: cfg.min_component_voxels,
        cam_threshold: grow_threshold,
        min_cam_fraction: cfg.min_cam_support,
        min_peak_cam: cfg.cam_threshold,
    };
    let n_comp = sizes.len().saturating_sub(1);
    let stats = be.component_stats(&labels, n_comp, cam_norm, grow_threshold)?;
    let sel = filter.select(&sizes, Some(&stats));
    let mut out = clusters;
    be.select_components(&labels, &sel.keep, out.borrow_mut())?;
    let mask = Array3::from_shape_vec(dims, be.mask_to_host(out)?)
        .map_err(|e| SegError::Param(e.to_string()))?;
    Ok(RefineOutput {
        mask,
        n_components: sel.sizes.len(),
        component_sizes: sel.sizes,
        cam_voxels,
        cluster_voxels,
        dropped_small: sel.dropped_small,
        dropped_cam: sel.dropped_cam,
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
