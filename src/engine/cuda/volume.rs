//! The elementwise and in-plane volume ops on the device (`kernels/volume.cu`, mirroring
//! `cpu/volume.rs` bit for bit): per-slice thresholds, the clamped linear window, the
//! in-plane box mean, a region cut below a level, the band of a segment's values, counts;
//! and [`VolumeOps`] for the CUDA backend over these and the k-means, morphology and
//! labelling of `kmeans.rs`, `morph.rs` and `ccl.rs`. Knows nothing beyond values, masks
//! and labels.

use cudarc::driver::CudaSlice;

use super::launch::{grid, kernels};
use super::{ccl, kmeans, morph, CudaBackend};
use crate::engine::volume::{
    check, Clusters, ComponentStats, Connectivity, Dims, Structuring, VolumeOps,
};
use crate::engine::{Backend, EngineError, Result};

kernels!("volume" {
    threshold_slices: "vol_threshold_slices",
    window: "vol_window",
    count_nonzero: "vol_count_nonzero",
    box_mean: "vol_box_mean",
    keep_below: "vol_keep_below",
    band: "vol_band",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.volume.get(|| Kernels::load(be.modules()))
}

/// `out = 1` where slice `z` is on and `x >= threshold` (`[z, y, x]`).
pub fn threshold_slices(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    dims: Dims,
    slice_on: &[bool],
    threshold: f32,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let n = check::threshold_slices(dims, x.len(), slice_on.len(), out.len())?;
    if n == 0 {
        return Ok(());
    }
    let on: Vec<u8> = slice_on.iter().map(|&p| u8::from(p)).collect();
    let on = be.upload_any(&on)?;
    let (plane, n64) = ((dims.1 * dims.2) as u64, n as u64);
    // SAFETY: x and out hold n voxels, `on` one flag per slice (checked).
    unsafe {
        kernels(be)?
            .threshold_slices
            .on(be.stream())
            .arg(x)
            .arg(&on)
            .arg(&threshold)
            .arg(&plane)
            .arg(&n64)
            .arg(out)
            .launch(grid(n))
    }
}

/// `out = clamp((x - lo) / width, 0, 1)`.
pub fn window(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    lo: f32,
    width: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    check::window(x.len(), width, out.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let n64 = x.len() as u64;
    // SAFETY: x and out hold the same number of values (checked).
    unsafe {
        kernels(be)?
            .window
            .on(be.stream())
            .arg(x)
            .arg(&lo)
            .arg(&width)
            .arg(&n64)
            .arg(out)
            .launch(grid(x.len()))
    }
}

/// In-plane box mean of radius `r` (see [`VolumeOps::box_mean`]).
#[allow(clippy::too_many_arguments)]
pub fn box_mean(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    dims: Dims,
    r: usize,
    lo: f32,
    width: f32,
    saturation: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = check::same_volume("box_mean", dims, x.len(), out.len())?;
    if n == 0 {
        return Ok(());
    }
    let r = i32::try_from(r).map_err(|_| EngineError::Shape {
        op: "box_mean",
        detail: format!("radius {r}"),
    })?;
    let (nz, ny, nx) = (dims.0 as u64, dims.1 as u64, dims.2 as u64);
    // SAFETY: x and out hold nz*ny*nx voxels (checked).
    unsafe {
        kernels(be)?
            .box_mean
            .on(be.stream())
            .arg(x)
            .arg(&nz)
            .arg(&ny)
            .arg(&nx)
            .arg(&r)
            .arg(&lo)
            .arg(&width)
            .arg(&saturation)
            .arg(out)
            .launch(grid(n))
    }
}

/// `region[i] = 0` unless `values[i] < level`.
pub fn keep_below(
    be: &CudaBackend,
    values: &CudaSlice<f32>,
    level: f32,
    region: &mut CudaSlice<u8>,
) -> Result<()> {
    check::keep_below(values.len(), region.len())?;
    if values.is_empty() {
        return Ok(());
    }
    let n64 = values.len() as u64;
    // SAFETY: values and region hold the same number of voxels (checked).
    unsafe {
        kernels(be)?
            .keep_below
            .on(be.stream())
            .arg(values)
            .arg(&level)
            .arg(&n64)
            .arg(region)
            .launch(grid(values.len()))
    }
}

/// `out = 1` where `grow != 0`, the value reaches its segment's floor and, when given,
/// stays below `below`.
pub fn band(
    be: &CudaBackend,
    values: &CudaSlice<f32>,
    grow: &CudaSlice<u8>,
    seg_len: usize,
    lo: &[f32],
    below: Option<f32>,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let n = values.len();
    check::band(n, grow.len(), seg_len, lo.len(), out.len())?;
    if n == 0 {
        return Ok(());
    }
    let lo = be.upload_any(lo)?;
    let (seg64, n64) = (seg_len.max(1) as u64, n as u64);
    let (level, has) = (below.unwrap_or(0.0), i32::from(below.is_some()));
    // SAFETY: values, grow and out hold n voxels, `lo` one floor per segment (checked).
    unsafe {
        kernels(be)?
            .band
            .on(be.stream())
            .arg(values)
            .arg(grow)
            .arg(&lo)
            .arg(&seg64)
            .arg(&n64)
            .arg(&level)
            .arg(&has)
            .arg(out)
            .launch(grid(n))
    }
}

/// Non-zero bytes of `mask` (waits for the device).
pub fn count_nonzero(be: &CudaBackend, mask: &CudaSlice<u8>) -> Result<usize> {
    if mask.is_empty() {
        return Ok(0);
    }
    let mut count = be.alloc_zeros::<u64>(1)?;
    let n64 = mask.len() as u64;
    // SAFETY: mask holds n64 bytes, count one value.
    unsafe {
        kernels(be)?
            .count_nonzero
            .on(be.stream())
            .arg(mask)
            .arg(&n64)
            .arg(&mut count)
            .launch(grid(mask.len()))?;
    }
    Ok(be.download_prefix(&count, 1)?[0] as usize)
}

impl VolumeOps for CudaBackend {
    type Vol = CudaSlice<f32>;
    type Mask = CudaSlice<u8>;
    type MaskBuf = CudaSlice<u8>;
    type Labels = CudaSlice<u32>;

    fn vol<'a>(&self, buf: &'a CudaSlice<f32>) -> &'a CudaSlice<f32> {
        buf
    }
    fn vol_mut<'a>(&self, buf: &'a mut CudaSlice<f32>) -> &'a mut CudaSlice<f32> {
        buf
    }
    fn with_host_vol<R>(
        &self,
        host: &[f32],
        f: impl FnOnce(&CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        f(&self.upload(host)?)
    }
    fn vol_to_host(&self, v: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.download_prefix(v, v.len())
    }
    fn mask(&self, len: usize) -> Result<CudaSlice<u8>> {
        self.alloc(len)
    }
    fn mask_to_host(&self, m: CudaSlice<u8>) -> Result<Vec<u8>> {
        self.download_prefix(&m, m.len())
    }
    fn max_clusters(&self) -> usize {
        kmeans::MAX_DEVICE_K
    }

    fn threshold_slices(
        &self,
        x: &CudaSlice<f32>,
        dims: Dims,
        slice_on: &[bool],
        threshold: f32,
        out: &mut CudaSlice<u8>,
    ) -> Result<()> {
        threshold_slices(self, x, dims, slice_on, threshold, out)
    }
    fn window(
        &self,
        x: &CudaSlice<f32>,
        lo: f32,
        width: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        window(self, x, lo, width, out)
    }
    fn box_mean(
        &self,
        x: &CudaSlice<f32>,
        dims: Dims,
        radius: usize,
        lo: f32,
        width: f32,
        saturation: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        box_mean(self, x, dims, radius, lo, width, saturation, out)
    }
    fn keep_below(
        &self,
        values: &CudaSlice<f32>,
        level: f32,
        region: &mut CudaSlice<u8>,
    ) -> Result<()> {
        keep_below(self, values, level, region)
    }
    fn kmeans_segments(
        &self,
        values: &CudaSlice<f32>,
        region: &CudaSlice<u8>,
        segments: usize,
        seg_len: usize,
        k: usize,
        max_iter: usize,
    ) -> Result<Clusters> {
        // The assignments are not needed, only the clusters.
        let mut labels = self.alloc::<u8>(values.len())?;
        kmeans::kmeans_segments(
            self,
            values,
            region,
            segments,
            seg_len,
            k,
            max_iter,
            &mut labels,
        )
    }
    fn band(
        &self,
        values: &CudaSlice<f32>,
        grow: &CudaSlice<u8>,
        seg_len: usize,
        lo: &[f32],
        below: Option<f32>,
        out: &mut CudaSlice<u8>,
    ) -> Result<()> {
        band(self, values, grow, seg_len, lo, below, out)
    }
    fn count_nonzero(&self, m: &CudaSlice<u8>) -> Result<usize> {
        count_nonzero(self, m)
    }
    fn morph2d(
        &self,
        m: &CudaSlice<u8>,
        dims: Dims,
        radius: usize,
        shape: Structuring,
        dilate: bool,
        out: &mut CudaSlice<u8>,
    ) -> Result<()> {
        morph::morph2d(self, m, dims, radius, shape, dilate, out)
    }
    fn components(
        &self,
        m: &CudaSlice<u8>,
        dims: Dims,
        conn: Connectivity,
    ) -> Result<(CudaSlice<u32>, Vec<usize>)> {
        let (labels, _n, sizes) = ccl::ccl3d(self, m, dims, conn)?;
        Ok((labels, sizes))
    }
    fn component_stats(
        &self,
        labels: &CudaSlice<u32>,
        n: usize,
        x: &CudaSlice<f32>,
        threshold: f32,
    ) -> Result<ComponentStats> {
        ccl::component_stats(self, labels, n, x, threshold)
    }
    fn select_components(
        &self,
        labels: &CudaSlice<u32>,
        keep: &[u32],
        out: &mut CudaSlice<u8>,
    ) -> Result<()> {
        ccl::select(self, labels, keep, out)
    }
}
