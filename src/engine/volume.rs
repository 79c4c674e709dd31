//! The ops on `[z, y, x]` volumes that a mask refinement is built from, as one trait
//! ([`VolumeOps`]) that the CPU reference (`cpu/{volume,kmeans,morph,ccl}.rs`) and the CUDA
//! backend (`cuda/` twins of the same names, `kernels/` likewise) both implement, so the
//! refinement itself is written once above the engine: per-slice thresholds, a clamped
//! linear window, an in-plane box mean, 1-D k-means per segment of voxels, an intensity
//! band, in-plane binary morphology, 3-D connected components and per-component statistics.
//!
//! Volumes are contiguous and row-major; a mask holds 0/1 bytes. Knows nothing about CT,
//! CAMs or what a refinement keeps: only values, masks and labels.

use std::borrow::BorrowMut;

use super::{Backend, EngineError, Result};

/// The dimensions `(nz, ny, nx)` of a `[z, y, x]` volume.
pub type Dims = (usize, usize, usize);

/// Which neighbours touch in 3-D.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Connectivity {
    /// Faces.
    Six,
    /// Faces and edges.
    Eighteen,
    /// Faces, edges and corners.
    TwentySix,
}

impl Connectivity {
    /// 6, 18 or 26.
    pub fn neighbours(self) -> u32 {
        match self {
            Connectivity::Six => 6,
            Connectivity::Eighteen => 18,
            Connectivity::TwentySix => 26,
        }
    }
    /// From 6, 18 or 26.
    pub fn from_neighbours(n: u32) -> Result<Self> {
        match n {
            6 => Ok(Connectivity::Six),
            18 => Ok(Connectivity::Eighteen),
            26 => Ok(Connectivity::TwentySix),
            _ => Err(EngineError::Param(format!(
                "connectivity must be 6, 18 or 26, got {n}"
            ))),
        }
    }
    /// Whether the offset `(dz, dy, dx)` (each in -1..=1, not all zero) is a neighbour.
    pub fn touches(self, dz: i32, dy: i32, dx: i32) -> bool {
        let m = dz.abs() + dy.abs() + dx.abs();
        m >= 1
            && match self {
                Connectivity::Six => m == 1,
                Connectivity::Eighteen => m <= 2,
                Connectivity::TwentySix => m <= 3,
            }
    }
}

/// In-plane structuring element of radius `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Structuring {
    /// The 4-neighbour cross applied `r` times (a diamond, `|dy| + |dx| <= r`).
    Cross,
    /// The `(2r+1) x (2r+1)` square (8-neighbour for `r = 1`).
    Square,
}

/// The clusters of a k-means per segment: `[segment, cluster]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Clusters {
    pub k: usize,
    pub centroids: Vec<f32>,
    pub counts: Vec<usize>,
}

impl Clusters {
    pub fn centroids_of(&self, seg: usize) -> &[f32] {
        &self.centroids[seg * self.k..(seg + 1) * self.k]
    }
    pub fn counts_of(&self, seg: usize) -> &[usize] {
        &self.counts[seg * self.k..(seg + 1) * self.k]
    }
}

/// Per component `l` of a labelling (index 0, the background, unused): the voxels whose
/// value reaches a threshold, and the largest value (`-inf` when the component has no
/// number).
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentStats {
    pub inside: Vec<usize>,
    pub peak: Vec<f32>,
}

/// The volume ops on one backend's buffers. f32 volumes are the backend's own buffers
/// ([`Backend::Buf`]) or views of them ([`VolumeOps::Vol`]); masks and labels have their own
/// types. Every op checks its lengths and writes every element of its output.
pub trait VolumeOps: Backend<T = f32> {
    /// An f32 volume as the ops read it (`[f32]` on the host, the device buffer on a GPU).
    type Vol: ?Sized + Sync;
    /// A 0/1 mask as the ops read it (`[u8]`, a device buffer).
    type Mask: ?Sized + Sync;
    /// An owned mask.
    type MaskBuf: BorrowMut<Self::Mask> + Send;
    /// The labels of a connected-component labelling (a u32 per voxel).
    type Labels: Send;

    /// A buffer as a volume.
    fn vol<'a>(&self, buf: &'a Self::Buf) -> &'a Self::Vol;
    /// A buffer as a volume to write.
    fn vol_mut<'a>(&self, buf: &'a mut Self::Buf) -> &'a mut Self::Vol;
    /// Runs `f` on `host` as a volume of this backend (the CPU reads it in place, a GPU
    /// uploads it first).
    fn with_host_vol<R>(&self, host: &[f32], f: impl FnOnce(&Self::Vol) -> Result<R>) -> Result<R>;
    /// The volume's values on the host.
    fn vol_to_host(&self, v: &Self::Vol) -> Result<Vec<f32>>;
    /// A mask of `len` voxels (its contents are written by the op that fills it).
    fn mask(&self, len: usize) -> Result<Self::MaskBuf>;
    /// The mask's bytes on the host.
    fn mask_to_host(&self, m: Self::MaskBuf) -> Result<Vec<u8>>;
    /// The largest `k` of [`VolumeOps::kmeans_segments`].
    fn max_clusters(&self) -> usize;

    /// `out[i] = 1` where the slice of voxel `i` is on and `x[i] >= threshold` (NaN fails).
    fn threshold_slices(
        &self,
        x: &Self::Vol,
        dims: Dims,
        slice_on: &[bool],
        threshold: f32,
        out: &mut Self::Mask,
    ) -> Result<()>;
    /// `out = clamp((x - lo) / width, 0, 1)` (NaN stays NaN); `width > 0`.
    fn window(&self, x: &Self::Vol, lo: f32, width: f32, out: &mut Self::Vol) -> Result<()>;
    /// In-plane box mean of radius `radius` over the in-bounds neighbours (summed rows,
    /// then columns, in f32), `+inf` where the box holds a value whose
    /// [`VolumeOps::window`]`(lo, width)` reaches `saturation`.
    #[allow(clippy::too_many_arguments)]
    fn box_mean(
        &self,
        x: &Self::Vol,
        dims: Dims,
        radius: usize,
        lo: f32,
        width: f32,
        saturation: f32,
        out: &mut Self::Vol,
    ) -> Result<()>;
    /// `region[i] = 0` unless `values[i] < level` (NaN never is).
    fn keep_below(&self, values: &Self::Vol, level: f32, region: &mut Self::Mask) -> Result<()>;
    /// 1-D k-means (the CPU reference's quantile start, ties and stopping rule) on each of
    /// `segments` runs of `seg_len` consecutive voxels, over the voxels with `region != 0`.
    #[allow(clippy::too_many_arguments)]
    fn kmeans_segments(
        &self,
        values: &Self::Vol,
        region: &Self::Mask,
        segments: usize,
        seg_len: usize,
        k: usize,
        max_iter: usize,
    ) -> Result<Clusters>;
    /// `out[i] = 1` where `grow[i] != 0`, `values[i] >= lo[segment of i]` and, when
    /// `below` is given, `values[i] < below`.
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        values: &Self::Vol,
        grow: &Self::Mask,
        seg_len: usize,
        lo: &[f32],
        below: Option<f32>,
        out: &mut Self::Mask,
    ) -> Result<()>;
    /// The number of non-zero bytes.
    fn count_nonzero(&self, m: &Self::Mask) -> Result<usize>;
    /// In-plane binary dilation (`dilate`) or erosion of every slice; outside the slice is
    /// background.
    #[allow(clippy::too_many_arguments)]
    fn morph2d(
        &self,
        m: &Self::Mask,
        dims: Dims,
        radius: usize,
        shape: Structuring,
        dilate: bool,
        out: &mut Self::Mask,
    ) -> Result<()>;
    /// 3-D connected components of the non-zero voxels: labels `1..=n` in raster order of
    /// each component's first voxel (0 = background), and the sizes (`sizes[0]` = the
    /// background, `len = n + 1`).
    fn components(
        &self,
        m: &Self::Mask,
        dims: Dims,
        conn: Connectivity,
    ) -> Result<(Self::Labels, Vec<usize>)>;
    /// Per component of `labels` (`1..=n`): voxels with `x >= threshold`, largest `x`.
    fn component_stats(
        &self,
        labels: &Self::Labels,
        n: usize,
        x: &Self::Vol,
        threshold: f32,
    ) -> Result<ComponentStats>;
    /// `out[i] = 1` where `keep[labels[i]] != 0` (`keep[0]` is 0: the background).
    fn select_components(
        &self,
        labels: &Self::Labels,
        keep: &[u32],
        out: &mut Self::Mask,
    ) -> Result<()>;
}

/// The length checks of the volume ops, written once: both backends run them before any
/// work (each returns the voxel count where the op has dimensions).
pub mod check {
    use super::{voxels, Dims};
    use crate::engine::{check_len, EngineError, Result};

    /// [`super::VolumeOps::threshold_slices`]: `x` and `out` hold `dims`, one flag a slice.
    pub fn threshold_slices(dims: Dims, x: usize, flags: usize, out: usize) -> Result<usize> {
        const OP: &str = "threshold_slices";
        let n = voxels(OP, dims)?;
        check_len(OP, "x", x, n)?;
        check_len(OP, "out", out, n)?;
        check_len(OP, "slice flags", flags, dims.0)?;
        Ok(n)
    }

    /// [`super::VolumeOps::window`]: `out` as long as `x`, a positive width.
    pub fn window(x: usize, width: f32, out: usize) -> Result<()> {
        check_len("window", "out", out, x)?;
        // NaN is not positive either.
        let positive = width > 0.0;
        if !positive {
            return Err(EngineError::Param(format!(
                "a window needs a positive width, got {width}"
            )));
        }
        Ok(())
    }

    /// [`super::VolumeOps::box_mean`] and [`super::VolumeOps::morph2d`]: `x` and `out`
    /// hold `dims`.
    pub fn same_volume(op: &'static str, dims: Dims, x: usize, out: usize) -> Result<usize> {
        let n = voxels(op, dims)?;
        check_len(op, "input", x, n)?;
        check_len(op, "out", out, n)?;
        Ok(n)
    }

    /// [`super::VolumeOps::keep_below`]: a region byte per value.
    pub fn keep_below(values: usize, region: usize) -> Result<()> {
        check_len("keep_below", "region", region, values)
    }

    /// [`super::VolumeOps::band`]: `grow` and `out` as long as `values`, a floor per
    /// segment of `seg_len` (at least 1).
    pub fn band(values: usize, grow: usize, seg_len: usize, lo: usize, out: usize) -> Result<()> {
        const OP: &str = "band";
        check_len(OP, "grow", grow, values)?;
        check_len(OP, "out", out, values)?;
        check_len(OP, "band floors", lo, values.div_ceil(seg_len.max(1)))
    }
}

/// The voxels of `dims`, refused when they overflow or do not fit 32-bit labels (the
/// labellings' limit, on both backends).
pub fn voxels(op: &'static str, dims: Dims) -> Result<usize> {
    let n = dims
        .0
        .checked_mul(dims.1)
        .and_then(|v| v.checked_mul(dims.2));
    match n {
        Some(n) if n < u32::MAX as usize => Ok(n),
        Some(n) => Err(EngineError::TooLarge(n)),
        None => Err(EngineError::Shape {
            op,
            detail: format!("volume {dims:?} overflows"),
        }),
    }
}
