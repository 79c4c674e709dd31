//! 1-D k-means on the device (`kernels/kmeans.cu`, mirroring `cpu/kmeans.rs`): every segment
//! of a volume at once (one per slice, or the whole volume), over the voxels of a region;
//! the CPU's quantile start (a radix select), tie rule and stopping rule. Only the sums are
//! added in another (fixed, deterministic) order: exact in f64, so the centroids agree bit
//! for bit with the CPU's whenever every value is 0 or >= 2^-8 and a segment holds fewer
//! than 2^22 of them; otherwise a centroid can differ in its last bit, which moves an
//! assignment only on a tie.

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, kernels};
use super::CudaBackend;
use crate::engine::volume::Clusters;
use crate::engine::{check_len, EngineError, Result};

kernels!("kmeans" {
    init: "km_init",
    radix_hist: "km_radix_hist",
    radix_pick: "km_radix_pick",
    labels_init: "km_labels_init",
    assign: "km_assign",
    partial: "km_partial",
    finish: "km_finish",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.kmeans.get(|| Kernels::load(be.modules()))
}

/// The largest k the device k-means takes (its per-thread sums live in registers).
pub const MAX_DEVICE_K: usize = 16;
/// `KM_THREADS` in kernels/kmeans.cu.
const KM_THREADS: u32 = 256;
/// Values a k-means block covers at least before the grid grows another chunk.
const KM_CHUNK: usize = 256 * 8;
const KM_MAX_CHUNKS: usize = 1024;

/// `cpu::kmeans::kmeans_1d` on each of `nseg` segments of `seg_len` consecutive voxels at
/// once, over the voxels with `region != 0`. `labels` (same length as `values`) gets each
/// region voxel's cluster and 255 elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn kmeans_segments(
    be: &CudaBackend,
    values: &CudaSlice<f32>,
    region: &CudaSlice<u8>,
    nseg: usize,
    seg_len: usize,
    k: usize,
    max_iter: usize,
    labels: &mut CudaSlice<u8>,
) -> Result<Clusters> {
    const OP: &str = "kmeans";
    let shape = |detail: String| EngineError::Shape { op: OP, detail };
    let n = nseg
        .checked_mul(seg_len)
        .ok_or_else(|| shape("size overflows".into()))?;
    check_len(OP, "values", values.len(), n)?;
    check_len(OP, "region", region.len(), n)?;
    check_len(OP, "labels", labels.len(), n)?;
    if k == 0 || k > MAX_DEVICE_K {
        return Err(shape(format!(
            "k = {k}: the GPU k-means takes 1..={MAX_DEVICE_K}"
        )));
    }
    if nseg > 65_535 {
        return Err(shape(format!("{nseg} segments exceed the grid's 65535")));
    }
    if seg_len > u32::MAX as usize {
        return Err(shape(format!(
            "segments of {seg_len} values exceed u32 counts"
        )));
    }
    if n == 0 {
        return Ok(Clusters {
            k,
            centroids: vec![0.0; nseg * k],
            counts: vec![0; nseg * k],
        });
    }
    let chunks = seg_len.div_ceil(KM_CHUNK).clamp(1, KM_MAX_CHUNKS);
    let nk = nseg * k;
    let mut n_seg = be.alloc::<u32>(nseg)?;
    let mut rank = be.alloc::<u32>(nk)?;
    let mut prefix = be.alloc::<u32>(nk)?;
    let mut centroids = be.alloc::<f32>(nk)?;
    let mut done = be.alloc::<u32>(nseg)?;
    let mut changed = be.alloc_zeros::<u32>(nseg)?;
    let mut hist = be.alloc_zeros::<u32>(nk * 256)?;
    let mut psum = be.alloc::<f64>(nseg * chunks * k)?;
    let mut pcnt = be.alloc::<u32>(nseg * chunks * k)?;
    let mut counts = be.alloc::<u32>(nk)?;
    let small = blocks(OP, (nk.div_ceil(128), 1, 1), 128)?;
    let seg_grid = blocks(OP, (chunks, nseg, 1), KM_THREADS)?;
    let (seg_len64, n64) = (seg_len as u64, n as u64);
    let (ki, nsegi, chunksi) = (dim(k)?, dim(nseg)?, dim(chunks)?);
    let ks = kernels(be)?;
    let st = be.stream();
    // SAFETY (every launch below): values, region and labels hold nseg*seg_len elements
    // (checked); the per-segment buffers nseg, the per-cluster ones nseg*k, `hist` 256 per
    // cluster, the partial sums nseg*chunks*k; grids of nseg segments and `chunks` chunks.
    unsafe {
        ks.init
            .on(st)
            .arg(region)
            .arg(&seg_len64)
            .arg(&ki)
            .arg(&mut n_seg)
            .arg(&mut rank)
            .arg(&mut prefix)
            .arg(&mut centroids)
            .arg(&mut done)
            .launch(blocks(OP, (nseg, 1, 1), KM_THREADS)?)?;
        for pass in 0..4i32 {
            ks.radix_hist
                .on(st)
                .arg(values)
                .arg(region)
                .arg(&seg_len64)
                .arg(&ki)
                .arg(&pass)
                .arg(&prefix)
                .arg(&done)
                .arg(&mut hist)
                .launch(seg_grid)?;
            ks.radix_pick
                .on(st)
                .arg(&nsegi)
                .arg(&ki)
                .arg(&pass)
                .arg(&mut hist)
                .arg(&mut prefix)
                .arg(&mut rank)
                .arg(&done)
                .arg(&mut centroids)
                .launch(small)?;
        }
        ks.labels_init
            .on(st)
            .arg(&n64)
            .arg(&mut *labels)
            .launch(grid(n))?;
    }
    // The CPU's loop, for every segment at once; a segment that has converged is skipped by
    // the kernels (its `done` flag), so no iteration waits on the host.
    let mut step = |labels: &mut CudaSlice<u8>,
                    changed: &mut CudaSlice<u32>,
                    iter: usize,
                    counts_only: bool|
     -> Result<()> {
        let (it, only) = (dim(iter)?, counts_only as i32);
        // SAFETY: as above.
        unsafe {
            ks.assign
                .on(st)
                .arg(values)
                .arg(region)
                .arg(&seg_len64)
                .arg(&ki)
                .arg(&centroids)
                .arg(&done)
                .arg(&mut *labels)
                .arg(&mut *changed)
                .launch(seg_grid)?;
            ks.partial
                .on(st)
                .arg(values)
                .arg(&*labels)
                .arg(&seg_len64)
                .arg(&ki)
                .arg(&it)
                .arg(&only)
                .arg(&done)
                .arg(&*changed)
                .arg(&mut psum)
                .arg(&mut pcnt)
                .launch(seg_grid)?;
            ks.finish
                .on(st)
                .arg(&nsegi)
                .arg(&ki)
                .arg(&chunksi)
                .arg(&it)
                .arg(&only)
                .arg(&psum)
                .arg(&pcnt)
                .arg(&mut done)
                .arg(&*changed)
                .arg(&mut centroids)
                .arg(&mut counts)
                .launch(small)
        }
    };
    for iter in 0..max_iter.max(1) {
        st.memset_zeros(&mut changed)
            .map_err(|e| super::device::cuda("memset", e))?;
        step(labels, &mut changed, iter, false)?;
    }
    // Segments that ran out of iterations: labels to match the last centroids.
    step(labels, &mut changed, 0, true)?;
    let centroids = be.download_prefix(&centroids, nk)?;
    let counts = be
        .download_prefix(&counts, nk)?
        .into_iter()
        .map(|c| c as usize)
        .collect();
    Ok(Clusters {
        k,
        centroids,
        counts,
    })
}
