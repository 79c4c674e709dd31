//! The elementwise and in-plane volume ops on the CPU, mirroring `cuda/volume.rs` and
//! `kernels/volume.cu` bit for bit (plain IEEE f32, comparisons that NaN never passes):
//! per-slice thresholds, the clamped linear window, the in-plane box mean, the band of a
//! segment's values, counts; and [`VolumeOps`] for the CPU backend, over these and the
//! k-means, morphology and labelling of `kmeans.rs`, `morph.rs` and `ccl.rs`. Knows
//! nothing beyond values and masks.

use ndarray::ArrayView3;
use rayon::prelude::*;

use super::{ccl, kmeans, morph, CpuBackend};
use crate::engine::volume::{
    check, Clusters, ComponentStats, Connectivity, Dims, Structuring, VolumeOps,
};
use crate::engine::{EngineError, Result};

/// `clamp((v - lo) / width, 0, 1)`; NaN stays NaN.
#[inline]
pub fn window_value(v: f32, lo: f32, width: f32) -> f32 {
    ((v - lo) / width).clamp(0.0, 1.0)
}

/// `out[i] = 1` where `slice_on[z]` and `x[i] >= threshold`.
pub fn threshold_slices(
    x: &[f32],
    dims: Dims,
    slice_on: &[bool],
    threshold: f32,
    out: &mut [u8],
) -> Result<()> {
    check::threshold_slices(dims, x.len(), slice_on.len(), out.len())?;
    let plane = (dims.1 * dims.2).max(1);
    out.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .zip(slice_on.par_iter())
        .for_each(|((o, xs), &on)| {
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = u8::from(on && v >= threshold);
            }
        });
    Ok(())
}

/// `out = window_value(x, lo, width)` elementwise.
pub fn window(x: &[f32], lo: f32, width: f32, out: &mut [f32]) -> Result<()> {
    check::window(x.len(), width, out.len())?;
    out.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &v)| *o = window_value(v, lo, width));
    Ok(())
}

/// In-plane box mean of radius `r` (see [`VolumeOps::box_mean`]).
#[allow(clippy::too_many_arguments)]
pub fn box_mean(
    x: &[f32],
    dims: Dims,
    r: usize,
    lo: f32,
    width: f32,
    saturation: f32,
    out: &mut [f32],
) -> Result<()> {
    check::same_volume("box_mean", dims, x.len(), out.len())?;
    let (h, w) = (dims.1, dims.2);
    if h * w == 0 {
        return Ok(());
    }
    let r = r as isize;
    out.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, src)| {
            for y in 0..h as isize {
                for xx0 in 0..w as isize {
                    let (mut sum, mut cnt, mut hot) = (0.0f32, 0u32, false);
                    for yy in (y - r).max(0)..=(y + r).min(h as isize - 1) {
                        for xx in (xx0 - r).max(0)..=(xx0 + r).min(w as isize - 1) {
                            let v = src[yy as usize * w + xx as usize];
                            hot |= window_value(v, lo, width) >= saturation;
                            sum += v;
                            cnt += 1;
                        }
                    }
                    o[y as usize * w + xx0 as usize] =
                        if hot { f32::INFINITY } else { sum / cnt as f32 };
                }
            }
        });
    Ok(())
}

/// `region[i] = 0` unless `values[i] < level`.
pub fn keep_below(values: &[f32], level: f32, region: &mut [u8]) -> Result<()> {
    check::keep_below(values.len(), region.len())?;
    region
        .par_iter_mut()
        .zip(values.par_iter())
        .for_each(|(r, &v)| {
            // NaN is never below the level.
            let below = v < level;
            if !below {
                *r = 0;
            }
        });
    Ok(())
}

/// `out[i] = 1` where `grow[i] != 0`, `values[i] >= lo[i / seg_len]` and, when given,
/// `values[i] < below`.
pub fn band(
    values: &[f32],
    grow: &[u8],
    seg_len: usize,
    lo: &[f32],
    below: Option<f32>,
    out: &mut [u8],
) -> Result<()> {
    check::band(values.len(), grow.len(), seg_len, lo.len(), out.len())?;
    let seg_len = seg_len.max(1);
    out.par_chunks_mut(seg_len)
        .zip(values.par_chunks(seg_len).zip(grow.par_chunks(seg_len)))
        .zip(lo.par_iter())
        .for_each(|((o, (vs, gs)), &floor)| {
            for ((o, &v), &g) in o.iter_mut().zip(vs).zip(gs) {
                let take = g != 0 && below.is_none_or(|b| v < b);
                *o = u8::from(take && v >= floor);
            }
        });
    Ok(())
}

/// The number of non-zero bytes.
pub fn count_nonzero(m: &[u8]) -> usize {
    m.par_iter().filter(|&&v| v != 0).count()
}

impl VolumeOps for CpuBackend<f32> {
    type Vol = [f32];
    type Mask = [u8];
    type MaskBuf = Vec<u8>;
    type Labels = Vec<u32>;

    fn vol<'a>(&self, buf: &'a Vec<f32>) -> &'a [f32] {
        buf
    }
    fn vol_mut<'a>(&self, buf: &'a mut Vec<f32>) -> &'a mut [f32] {
        buf
    }
    fn with_host_vol<R>(&self, host: &[f32], f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        f(host)
    }
    fn vol_to_host(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn mask(&self, len: usize) -> Result<Vec<u8>> {
        Ok(vec![0; len])
    }
    fn mask_to_host(&self, m: Vec<u8>) -> Result<Vec<u8>> {
        Ok(m)
    }
    fn max_clusters(&self) -> usize {
        255
    }

    fn threshold_slices(
        &self,
        x: &[f32],
        dims: Dims,
        slice_on: &[bool],
        threshold: f32,
        out: &mut [u8],
    ) -> Result<()> {
        threshold_slices(x, dims, slice_on, threshold, out)
    }
    fn window(&self, x: &[f32], lo: f32, width: f32, out: &mut [f32]) -> Result<()> {
        window(x, lo, width, out)
    }
    fn box_mean(
        &self,
        x: &[f32],
        dims: Dims,
        radius: usize,
        lo: f32,
        width: f32,
        saturation: f32,
        out: &mut [f32],
    ) -> Result<()> {
        box_mean(x, dims, radius, lo, width, saturation, out)
    }
    fn keep_below(&self, values: &[f32], level: f32, region: &mut [u8]) -> Result<()> {
        keep_below(values, level, region)
    }
    fn kmeans_segments(
        &self,
        values: &[f32],
        region: &[u8],
        segments: usize,
        seg_len: usize,
        k: usize,
        max_iter: usize,
    ) -> Result<Clusters> {
        kmeans::kmeans_segments(values, region, segments, seg_len, k, max_iter)
    }
    fn band(
        &self,
        values: &[f32],
        grow: &[u8],
        seg_len: usize,
        lo: &[f32],
        below: Option<f32>,
        out: &mut [u8],
    ) -> Result<()> {
        band(values, grow, seg_len, lo, below, out)
    }
    fn count_nonzero(&self, m: &[u8]) -> Result<usize> {
        Ok(count_nonzero(m))
    }
    fn morph2d(
        &self,
        m: &[u8],
        dims: Dims,
        radius: usize,
        shape: Structuring,
        dilate: bool,
        out: &mut [u8],
    ) -> Result<()> {
        morph::morph2d(m, dims, radius, shape, dilate, out)
    }
    fn components(
        &self,
        m: &[u8],
        dims: Dims,
        conn: Connectivity,
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        let view = ArrayView3::from_shape(dims, m).map_err(|e| EngineError::Shape {
            op: "ccl",
            detail: e.to_string(),
        })?;
        let slabs = (rayon::current_num_threads() * 2).max(1);
        let out = ccl::connected_components_slabs(view, conn, slabs)?;
        Ok((out.labels.into_raw_vec_and_offset().0, out.sizes))
    }
    fn component_stats(
        &self,
        labels: &Vec<u32>,
        n: usize,
        x: &[f32],
        threshold: f32,
    ) -> Result<ComponentStats> {
        ccl::component_stats(labels, n, x, threshold)
    }
    fn select_components(&self, labels: &Vec<u32>, keep: &[u32], out: &mut [u8]) -> Result<()> {
        ccl::select_components(labels, keep, None, out)
    }
}
