//! The CAM refinement on the GPU: launch wrappers for `kernels/seg.cu` (CAM region, subdural
//! window, chosen cluster), `kernels/kmeans.cu` (per-slice 1-D k-means), `kernels/morph.cu`
//! (in-plane dilation/erosion) and `kernels/ccl.cu` (3-D connected components, block-based
//! union-find), and [`refine_on_device`], which runs `crate::seg::refine` step by step on the
//! device and returns the same [`RefineOutput`].
//!
//! Every step mirrors its CPU twin in `crate::seg` exactly: same window arithmetic, same
//! k-means start (nearest-rank quantiles), tie rules and stopping rule, component ids in
//! raster order of each component's first voxel, the same filter. Only the k-means sums are
//! added in another (fixed, deterministic) order. They are exact in f64, so the centroids
//! agree bit for bit, whenever every value is 0 or >= 2^-8 (window values are: HU outside
//! (-20, -19.2)) and a segment holds fewer than 2^22 of them (always true per slice);
//! otherwise a centroid can differ in its last bit, which moves an assignment only on a tie.
//! The small per-slice decisions (which cluster, which components to keep) run on the host
//! with the CPU's own functions, over a few numbers read back from the device.
//!
//! Volumes are `[z, y, x]`, contiguous, at most `u32::MAX - 1` voxels (the CPU's limit too).
//! Knows nothing of files or of the network.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use ndarray::Array3;

use super::backend::empty_slice;
use super::device::{cuda, synced};
use super::{CudaBackend, KArg};
use crate::engine::{check_len, EngineError, Result};
use crate::io::Mask;
use crate::seg::choose::choose_cluster;
use crate::seg::morph::Structuring;
use crate::seg::refine::band_edge;
use crate::seg::{Connectivity, RefineConfig, RefineOutput, SegError};

/// The largest k the device k-means takes (its per-thread sums live in registers).
pub const MAX_DEVICE_K: usize = 16;

/// Threads of the chunked scan kernels (`SCAN_THREADS` in kernels/ccl.cu) and the nodes one
/// of their blocks covers (`CHUNK`).
const SCAN_THREADS: u32 = 256;
const SCAN_CHUNK: usize = 256 * 8;
/// `KM_THREADS` in kernels/kmeans.cu.
const KM_THREADS: u32 = 256;
/// Values a k-means block covers at least before the grid grows another chunk.
const KM_CHUNK: usize = 256 * 8;
const KM_MAX_CHUNKS: usize = 1024;
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 65_536;

/// Errors of [`refine_on_device`]: the engine's, or the refinement's own checks.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSegError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Seg(#[from] SegError),
}

// ---- small helpers ------------------------------------------------------------------------

fn ptr<T>(be: &CudaBackend, s: &CudaSlice<T>) -> KArg {
    let (p, _sync) = s.device_ptr(be.stream());
    KArg::Ptr(p)
}

/// A 64-bit scalar argument (the kernels' `u64` lengths); pushed like a pointer, same size.
fn u64a(v: usize) -> KArg {
    KArg::Ptr(v as u64)
}

fn i32a(what: &'static str, v: usize) -> Result<KArg> {
    i32::try_from(v)
        .map(KArg::I32)
        .map_err(|_| EngineError::Shape {
            op: what,
            detail: format!("size {v} exceeds the kernels' 32-bit dimension arguments"),
        })
}

fn alloc<T: DeviceRepr>(be: &CudaBackend, len: usize) -> Result<CudaSlice<T>> {
    if len == 0 {
        return empty_slice(be.stream());
    }
    // SAFETY: every caller has a kernel write each element before any is read.
    unsafe { be.stream().alloc::<T>(len) }.map_err(|e| match cuda("alloc", e) {
        EngineError::OutOfMemory { .. } => EngineError::OutOfMemory {
            bytes: len * std::mem::size_of::<T>(),
        },
        other => other,
    })
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(be: &CudaBackend, len: usize) -> Result<CudaSlice<T>> {
    let mut s = alloc::<T>(be, len)?;
    if len > 0 {
        be.stream()
            .memset_zeros(&mut s)
            .map_err(|e| cuda("memset", e))?;
    }
    Ok(s)
}

fn upload<T: DeviceRepr>(be: &CudaBackend, host: &[T]) -> Result<CudaSlice<T>> {
    if host.is_empty() {
        return empty_slice(be.stream());
    }
    be.stream().clone_htod(host).map_err(|e| cuda("upload", e))
}

fn download<T: DeviceRepr + Default + Clone>(
    be: &CudaBackend,
    s: &CudaSlice<T>,
    len: usize,
) -> Result<Vec<T>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let view = s.try_slice(0..len).ok_or_else(|| EngineError::Shape {
        op: "download",
        detail: format!("asked for {len} elements of a buffer of {}", s.len()),
    })?;
    let host = be
        .stream()
        .clone_dtoh(&view)
        .map_err(|e| cuda("download", e))?;
    synced();
    Ok(host)
}

/// Grid-stride launch shape for `n` elements.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks(grid_x: usize, grid_y: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_x as u32, grid_y as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn voxels(op: &'static str, dims: (usize, usize, usize)) -> Result<usize> {
    let n = dims
        .0
        .checked_mul(dims.1)
        .and_then(|v| v.checked_mul(dims.2));
    match n {
        Some(n) if n < u32::MAX as usize => Ok(n),
        _ => Err(EngineError::Shape {
            op,
            detail: format!("volume {dims:?} exceeds the 32-bit label range"),
        }),
    }
}

// ---- elementwise steps --------------------------------------------------------------------

/// `out = 1` where slice `z` is positive and `cam >= threshold` (`[z, y, x]`), as
/// `crate::seg::refine::positive_cam_region`.
pub fn cam_region(
    be: &CudaBackend,
    cam: &CudaSlice<f32>,
    dims: (usize, usize, usize),
    slice_positive: &[bool],
    threshold: f32,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let n = voxels("cam_region", dims)?;
    check_len("cam_region", "cam", cam.len(), n)?;
    check_len("cam_region", "out", out.len(), n)?;
    check_len(
        "cam_region",
        "slice decisions",
        slice_positive.len(),
        dims.0,
    )?;
    if n == 0 {
        return Ok(());
    }
    let pos: Vec<u8> = slice_positive.iter().map(|&p| u8::from(p)).collect();
    let pos = upload(be, &pos)?;
    be.launch(
        "seg",
        "seg_cam_region",
        grid(n),
        &[
            ptr(be, cam),
            ptr(be, &pos),
            KArg::F32(threshold),
            u64a(dims.1 * dims.2),
            u64a(n),
            ptr(be, out),
        ],
    )
}

/// The subdural window of every voxel, as `crate::seg::refine` computes it.
pub fn subdural(be: &CudaBackend, hu: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
    check_len("subdural", "out", out.len(), hu.len())?;
    if hu.is_empty() {
        return Ok(());
    }
    be.launch(
        "seg",
        "seg_subdural",
        grid(hu.len()),
        &[ptr(be, hu), u64a(hu.len()), ptr(be, out)],
    )
}

/// In-plane box mean of radius `r` of a `[z, y, x]` volume (+inf next to saturated voxels), as
/// `crate::seg::refine::box_smooth`.
pub fn box_smooth(
    be: &CudaBackend,
    hu: &CudaSlice<f32>,
    dims: (usize, usize, usize),
    r: usize,
    saturation: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = dims.0 * dims.1 * dims.2;
    check_len("box_smooth", "hu", hu.len(), n)?;
    check_len("box_smooth", "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let r = i32::try_from(r).map_err(|_| EngineError::Shape {
        op: "box_smooth",
        detail: format!("radius {r}"),
    })?;
    be.launch(
        "seg",
        "seg_box_smooth",
        grid(n),
        &[
            ptr(be, hu),
            u64a(dims.0),
            u64a(dims.1),
            u64a(dims.2),
            KArg::I32(r),
            KArg::F32(saturation),
            ptr(be, out),
        ],
    )
}

/// Non-zero bytes of `mask` (waits for the device).
pub fn count_nonzero(be: &CudaBackend, mask: &CudaSlice<u8>) -> Result<usize> {
    if mask.is_empty() {
        return Ok(0);
    }
    let count = zeros::<u64>(be, 1)?;
    be.launch(
        "seg",
        "seg_count_nonzero",
        grid(mask.len()),
        &[ptr(be, mask), u64a(mask.len()), ptr(be, &count)],
    )?;
    Ok(download(be, &count, 1)?[0] as usize)
}

/// In-plane binary dilation (`dilate`) or erosion of every slice, as `crate::seg::morph`.
pub fn morph2d(
    be: &CudaBackend,
    input: &CudaSlice<u8>,
    dims: (usize, usize, usize),
    radius: usize,
    shape: Structuring,
    dilate: bool,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let n = voxels("morph2d", dims)?;
    check_len("morph2d", "input", input.len(), n)?;
    check_len("morph2d", "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    // Beyond ny + nx every window (even the diamond) covers the whole slice: same result.
    let radius = radius.min(dims.1 + dims.2);
    let shape = match shape {
        Structuring::Cross => 0,
        Structuring::Square => 1,
    };
    be.launch(
        "morph",
        "morph2d",
        grid(n),
        &[
            ptr(be, input),
            i32a("morph2d", dims.0)?,
            i32a("morph2d", dims.1)?,
            i32a("morph2d", dims.2)?,
            i32a("morph2d", radius)?,
            KArg::I32(shape),
            KArg::I32(dilate as i32),
            ptr(be, out),
        ],
    )
}

// ---- k-means ------------------------------------------------------------------------------

/// Centroids and counts of a device k-means, `[segment, cluster]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceKMeans {
    pub k: usize,
    pub centroids: Vec<f32>,
    pub counts: Vec<usize>,
}

impl DeviceKMeans {
    pub fn centroids_of(&self, seg: usize) -> &[f32] {
        &self.centroids[seg * self.k..(seg + 1) * self.k]
    }
    pub fn counts_of(&self, seg: usize) -> &[usize] {
        &self.counts[seg * self.k..(seg + 1) * self.k]
    }
}

/// `crate::seg::kmeans::kmeans_1d` on each of `nseg` segments of `seg_len` consecutive
/// voxels at once, over the voxels with `region != 0`. `labels` (same length as `values`)
/// gets each region voxel's cluster and 255 elsewhere.
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
) -> Result<DeviceKMeans> {
    const OP: &str = "kmeans";
    let n = nseg
        .checked_mul(seg_len)
        .ok_or_else(|| EngineError::Shape {
            op: OP,
            detail: "size overflows".into(),
        })?;
    check_len(OP, "values", values.len(), n)?;
    check_len(OP, "region", region.len(), n)?;
    check_len(OP, "labels", labels.len(), n)?;
    if k == 0 || k > MAX_DEVICE_K {
        return Err(EngineError::Shape {
            op: OP,
            detail: format!("k = {k}: the GPU k-means takes 1..={MAX_DEVICE_K}"),
        });
    }
    if nseg > 65_535 {
        return Err(EngineError::Shape {
            op: OP,
            detail: format!("{nseg} segments exceed the grid's 65535"),
        });
    }
    if seg_len > u32::MAX as usize {
        return Err(EngineError::Shape {
            op: OP,
            detail: format!("segments of {seg_len} values exceed u32 counts"),
        });
    }
    if n == 0 {
        return Ok(DeviceKMeans {
            k,
            centroids: vec![0.0; nseg * k],
            counts: vec![0; nseg * k],
        });
    }
    let chunks = seg_len.div_ceil(KM_CHUNK).clamp(1, KM_MAX_CHUNKS);
    let nk = nseg * k;
    let n_seg = alloc::<u32>(be, nseg)?;
    let rank = alloc::<u32>(be, nk)?;
    let prefix = alloc::<u32>(be, nk)?;
    let centroids = alloc::<f32>(be, nk)?;
    let done = alloc::<u32>(be, nseg)?;
    let mut changed = zeros::<u32>(be, nseg)?;
    let hist = zeros::<u32>(be, nk * 256)?;
    let psum = alloc::<f64>(be, nseg * chunks * k)?;
    let pcnt = alloc::<u32>(be, nseg * chunks * k)?;
    let counts = alloc::<u32>(be, nk)?;
    let ki = i32a(OP, k)?;
    let small = blocks(nk.div_ceil(128), 1, 128);
    let seg_grid = blocks(chunks, nseg, KM_THREADS);

    be.launch(
        "kmeans",
        "km_init",
        blocks(nseg, 1, KM_THREADS),
        &[
            ptr(be, region),
            u64a(seg_len),
            ki,
            ptr(be, &n_seg),
            ptr(be, &rank),
            ptr(be, &prefix),
            ptr(be, &centroids),
            ptr(be, &done),
        ],
    )?;
    for pass in 0..4 {
        be.launch(
            "kmeans",
            "km_radix_hist",
            seg_grid,
            &[
                ptr(be, values),
                ptr(be, region),
                u64a(seg_len),
                ki,
                KArg::I32(pass),
                ptr(be, &prefix),
                ptr(be, &done),
                ptr(be, &hist),
            ],
        )?;
        be.launch(
            "kmeans",
            "km_radix_pick",
            small,
            &[
                i32a(OP, nseg)?,
                ki,
                KArg::I32(pass),
                ptr(be, &hist),
                ptr(be, &prefix),
                ptr(be, &rank),
                ptr(be, &done),
                ptr(be, &centroids),
            ],
        )?;
    }
    be.launch(
        "kmeans",
        "km_labels_init",
        grid(n),
        &[u64a(n), ptr(be, labels)],
    )?;
    let assign = |labels: &mut CudaSlice<u8>, changed: &CudaSlice<u32>| {
        be.launch(
            "kmeans",
            "km_assign",
            seg_grid,
            &[
                ptr(be, values),
                ptr(be, region),
                u64a(seg_len),
                ki,
                ptr(be, &centroids),
                ptr(be, &done),
                ptr(be, labels),
                ptr(be, changed),
            ],
        )
    };
    let update = |labels: &CudaSlice<u8>,
                  changed: &CudaSlice<u32>,
                  iter: usize,
                  counts_only: bool|
     -> Result<()> {
        let it = i32a(OP, iter)?;
        be.launch(
            "kmeans",
            "km_partial",
            seg_grid,
            &[
                ptr(be, values),
                ptr(be, labels),
                u64a(seg_len),
                ki,
                it,
                KArg::I32(counts_only as i32),
                ptr(be, &done),
                ptr(be, changed),
                ptr(be, &psum),
                ptr(be, &pcnt),
            ],
        )?;
        be.launch(
            "kmeans",
            "km_finish",
            small,
            &[
                i32a(OP, nseg)?,
                ki,
                i32a(OP, chunks)?,
                it,
                KArg::I32(counts_only as i32),
                ptr(be, &psum),
                ptr(be, &pcnt),
                ptr(be, &done),
                ptr(be, changed),
                ptr(be, &centroids),
                ptr(be, &counts),
            ],
        )
    };
    // The CPU's loop, for every segment at once; a segment that has converged is skipped by
    // the kernels (its `done` flag), so no iteration waits on the host.
    for iter in 0..max_iter.max(1) {
        be.stream()
            .memset_zeros(&mut changed)
            .map_err(|e| cuda("memset", e))?;
        assign(labels, &changed)?;
        update(labels, &changed, iter, false)?;
    }
    // Segments that ran out of iterations: labels to match the last centroids.
    assign(labels, &changed)?;
    update(labels, &changed, 0, true)?;
    let centroids = download(be, &centroids, nk)?;
    let counts = download(be, &counts, nk)?
        .into_iter()
        .map(|c| c as usize)
        .collect();
    Ok(DeviceKMeans {
        k,
        centroids,
        counts,
    })
}

// ---- connected components -----------------------------------------------------------------

/// Buffers of one labelling, allocated once: [`CclRun::launch`] queues the kernels only (no
/// host wait, so it can be timed with a stream sync), [`CclRun::collect`] reads back the
/// count and the sizes.
pub struct CclRun {
    dims: (usize, usize, usize),
    conn: Connectivity,
    /// The 2x2x2 block path (26-connectivity) or the voxel path.
    blocks: bool,
    nodes: usize,
    occ: CudaSlice<u8>,
    parent: CudaSlice<u32>,
    first: CudaSlice<u32>,
    size_root: CudaSlice<u32>,
    ids: CudaSlice<u32>,
    sizes: CudaSlice<u32>,
    chunk_counts: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    total: CudaSlice<u32>,
}

impl CclRun {
    /// Buffers for a `dims` volume; 26-connectivity takes the block path unless
    /// `force_voxel_path` (the tests' second opinion).
    pub fn new(
        be: &CudaBackend,
        dims: (usize, usize, usize),
        conn: Connectivity,
        force_voxel_path: bool,
    ) -> Result<Self> {
        let n = voxels("ccl3d", dims)?;
        for d in [dims.0, dims.1, dims.2] {
            i32a("ccl3d", d)?;
        }
        let blocks = conn == Connectivity::TwentySix && !force_voxel_path;
        let nodes = if blocks {
            dims.0.div_ceil(2) * dims.1.div_ceil(2) * dims.2.div_ceil(2)
        } else {
            n
        };
        let nchunks = n.div_ceil(SCAN_CHUNK);
        Ok(CclRun {
            dims,
            conn,
            blocks,
            nodes,
            occ: alloc(be, if blocks { nodes } else { 0 })?,
            parent: alloc(be, nodes)?,
            first: alloc(be, if blocks { nodes } else { 0 })?,
            size_root: alloc(be, nodes)?,
            ids: alloc(be, nodes)?,
            // At most one component per node.
            sizes: alloc(be, nodes)?,
            chunk_counts: alloc(be, nchunks)?,
            offsets: alloc(be, nchunks)?,
            total: alloc(be, 1)?,
        })
    }

    /// Queues the labelling of `mask` into `labels` (every voxel written).
    pub fn launch(
        &mut self,
        be: &CudaBackend,
        mask: &CudaSlice<u8>,
        labels: &mut CudaSlice<u32>,
    ) -> Result<()> {
        const OP: &str = "ccl3d";
        let (nz, ny, nx) = self.dims;
        let n = nz * ny * nx;
        check_len(OP, "mask", mask.len(), n)?;
        check_len(OP, "labels", labels.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (nbz, nby, nbx) = (nz.div_ceil(2), ny.div_ceil(2), nx.div_ceil(2));
        let d = |v: usize| i32a(OP, v);
        let nchunks = n.div_ceil(SCAN_CHUNK);
        let chunk_grid = blocks(nchunks, 1, SCAN_THREADS);
        if self.blocks {
            let nb = self.nodes;
            let dims_b = [d(nz)?, d(ny)?, d(nx)?, d(nbz)?, d(nby)?, d(nbx)?];
            let mut a = vec![ptr(be, mask)];
            a.extend_from_slice(&dims_b);
            a.extend([
                ptr(be, &self.occ),
                ptr(be, &self.parent),
                ptr(be, &self.first),
                ptr(be, &self.size_root),
            ]);
            be.launch("ccl", "ccl_init_blocks", grid(nb), &a)?;
            be.launch(
                "ccl",
                "ccl_merge_blocks26",
                grid(nb),
                &[
                    ptr(be, &self.occ),
                    ptr(be, &self.parent),
                    d(nbz)?,
                    d(nby)?,
                    d(nbx)?,
                ],
            )?;
            be.launch(
                "ccl",
                "ccl_compress",
                grid(nb),
                &[ptr(be, &self.occ), ptr(be, &self.parent), u64a(nb)],
            )?;
            be.launch(
                "ccl",
                "ccl_block_stats",
                grid(nb),
                &[
                    ptr(be, &self.occ),
                    ptr(be, &self.parent),
                    d(ny)?,
                    d(nx)?,
                    d(nbz)?,
                    d(nby)?,
                    d(nbx)?,
                    ptr(be, &self.first),
                    ptr(be, &self.size_root),
                ],
            )?;
            let flag_args = [
                ptr(be, mask),
                ptr(be, &self.parent),
                ptr(be, &self.first),
                d(nz)?,
                d(ny)?,
                d(nx)?,
                d(nby)?,
                d(nbx)?,
            ];
            let mut a = flag_args.to_vec();
            a.push(ptr(be, &self.chunk_counts));
            be.launch("ccl", "ccl_first_count", chunk_grid, &a)?;
            self.scan(be, nchunks)?;
            let mut a = flag_args.to_vec();
            a.extend([
                ptr(be, &self.offsets),
                ptr(be, &self.size_root),
                ptr(be, &self.ids),
                ptr(be, &self.sizes),
            ]);
            be.launch("ccl", "ccl_first_ids", chunk_grid, &a)?;
            let mut a = vec![
                ptr(be, &self.occ),
                ptr(be, &self.parent),
                ptr(be, &self.ids),
            ];
            a.extend_from_slice(&dims_b);
            a.push(ptr(be, labels));
            be.launch("ccl", "ccl_finalize_blocks", grid(nb), &a)?;
        } else {
            be.launch(
                "ccl",
                "ccl_init_vox",
                grid(n),
                &[u64a(n), ptr(be, &self.parent), ptr(be, &self.size_root)],
            )?;
            be.launch(
                "ccl",
                "ccl_merge_vox",
                grid(n),
                &[
                    ptr(be, mask),
                    ptr(be, &self.parent),
                    d(nz)?,
                    d(ny)?,
                    d(nx)?,
                    KArg::I32(self.conn.neighbours() as i32),
                ],
            )?;
            be.launch(
                "ccl",
                "ccl_compress",
                grid(n),
                &[ptr(be, mask), ptr(be, &self.parent), u64a(n)],
            )?;
            be.launch(
                "ccl",
                "ccl_vox_stats",
                grid(n),
                &[
                    ptr(be, mask),
                    ptr(be, &self.parent),
                    u64a(n),
                    ptr(be, &self.size_root),
                ],
            )?;
            be.launch(
                "ccl",
                "ccl_root_count",
                chunk_grid,
                &[
                    ptr(be, mask),
                    ptr(be, &self.parent),
                    u64a(n),
                    ptr(be, &self.chunk_counts),
                ],
            )?;
            self.scan(be, nchunks)?;
            be.launch(
                "ccl",
                "ccl_root_ids",
                chunk_grid,
                &[
                    ptr(be, mask),
                    ptr(be, &self.parent),
                    u64a(n),
                    ptr(be, &self.offsets),
                    ptr(be, &self.size_root),
                    ptr(be, &self.ids),
                    ptr(be, &self.sizes),
                ],
            )?;
            be.launch(
                "ccl",
                "ccl_finalize_vox",
                grid(n),
                &[
                    ptr(be, mask),
                    ptr(be, &self.parent),
                    ptr(be, &self.ids),
                    u64a(n),
                    ptr(be, labels),
                ],
            )?;
        }
        Ok(())
    }

    fn scan(&self, be: &CudaBackend, nchunks: usize) -> Result<()> {
        be.launch(
            "ccl",
            "ccl_scan_chunks",
            blocks(1, 1, SCAN_THREADS),
            &[
                ptr(be, &self.chunk_counts),
                i32a("ccl3d", nchunks)?,
                ptr(be, &self.offsets),
                ptr(be, &self.total),
            ],
        )
    }

    /// After [`CclRun::launch`]: the number of components and the sizes in the CPU's
    /// convention (`sizes[0]` = background, `sizes[l]` = voxels of label `l`). Waits.
    pub fn collect(&self, be: &CudaBackend) -> Result<(usize, Vec<usize>)> {
        let n_vox = self.dims.0 * self.dims.1 * self.dims.2;
        if n_vox == 0 {
            return Ok((0, vec![0]));
        }
        let n = download(be, &self.total, 1)?[0] as usize;
        if n > self.nodes {
            return Err(EngineError::Cuda {
                op: "ccl3d".into(),
                msg: format!("{n} components from {} nodes", self.nodes),
            });
        }
        let comp = download(be, &self.sizes, n)?;
        let mut sizes = Vec::with_capacity(n + 1);
        let fg: usize = comp.iter().map(|&s| s as usize).sum();
        sizes.push(n_vox.saturating_sub(fg));
        sizes.extend(comp.into_iter().map(|s| s as usize));
        Ok((n, sizes))
    }
}

/// 3-D connected components of `mask` (`[z, y, x]`, non-zero = foreground): labels `1..=n`
/// in raster order of each component's first voxel (0 = background), identical to
/// `crate::seg::connected_components`, the count and the sizes (`sizes[0]` = background).
pub fn ccl3d(
    be: &CudaBackend,
    mask: &CudaSlice<u8>,
    dims: (usize, usize, usize),
    conn: Connectivity,
) -> Result<(CudaSlice<u32>, usize, Vec<usize>)> {
    let mut labels = alloc::<u32>(be, voxels("ccl3d", dims)?)?;
    let (n, sizes) = ccl3d_into(be, mask, dims, conn, &mut labels)?;
    Ok((labels, n, sizes))
}

/// As [`ccl3d`] into a given buffer.
pub fn ccl3d_into(
    be: &CudaBackend,
    mask: &CudaSlice<u8>,
    dims: (usize, usize, usize),
    conn: Connectivity,
    labels: &mut CudaSlice<u32>,
) -> Result<(usize, Vec<usize>)> {
    let mut run = CclRun::new(be, dims, conn, false)?;
    run.launch(be, mask, labels)?;
    run.collect(be)
}

// ---- the whole refinement -----------------------------------------------------------------

/// The component filter of `crate::seg::refine` (`filter_components` with the refinement's
/// `ComponentFilter`): per-component CAM statistics on the device, the decision on the host,
/// the kept voxels as a 0/1 mask in `out`. Returns (kept sizes, dropped small, dropped CAM).
#[allow(clippy::too_many_arguments)]
pub fn filter_components(
    be: &CudaBackend,
    labels: &CudaSlice<u32>,
    sizes: &[usize],
    cam: &CudaSlice<f32>,
    cam_threshold: f32,
    min_voxels: usize,
    min_cam_fraction: f32,
    min_peak_cam: f32,
    out: &mut CudaSlice<u8>,
) -> Result<(Vec<usize>, usize, usize)> {
    const OP: &str = "filter_components";
    let nv = labels.len();
    check_len(OP, "cam", cam.len(), nv)?;
    check_len(OP, "out", out.len(), nv)?;
    let n = sizes.len().saturating_sub(1);
    let (inside, peak) = if n > 0 && nv > 0 {
        let inside = zeros::<u32>(be, n)?;
        let peak = zeros::<u32>(be, n)?;
        be.launch(
            "ccl",
            "ccl_cam_stats",
            grid(nv),
            &[
                ptr(be, labels),
                ptr(be, cam),
                KArg::F32(cam_threshold),
                u64a(nv),
                ptr(be, &inside),
                ptr(be, &peak),
            ],
        )?;
        (download(be, &inside, n)?, download(be, &peak, n)?)
    } else {
        (vec![0; n], vec![0; n])
    };
    let mut lut = vec![0u32; n + 1];
    let mut kept = Vec::new();
    let (mut dropped_small, mut dropped_cam) = (0, 0);
    for l in 1..=n {
        let size = sizes[l];
        if size == 0 || size < min_voxels {
            dropped_small += 1;
            continue;
        }
        let frac = inside[l - 1] as f64 / size as f64;
        // As the CPU: a NaN threshold passes nothing.
        let peak_ok = peak_value(peak[l - 1]) >= min_peak_cam;
        if frac < min_cam_fraction as f64 || !peak_ok {
            dropped_cam += 1;
            continue;
        }
        kept.push(size);
        lut[l] = kept.len() as u32;
    }
    if nv > 0 {
        let lut = upload(be, &lut)?;
        be.launch(
            "ccl",
            "ccl_apply_lut",
            grid(nv),
            &[ptr(be, labels), ptr(be, &lut), u64a(nv), ptr(be, out)],
        )?;
    }
    Ok((kept, dropped_small, dropped_cam))
}

/// A `float_key` of kernels/ccl.cu back to f32; key 0 (no voxel with a number) is -inf.
fn peak_value(key: u32) -> f32 {
    if key == 0 {
        return f32::NEG_INFINITY;
    }
    let bits = if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    };
    f32::from_bits(bits)
}

fn check_config(cfg: &RefineConfig) -> std::result::Result<(), SegError> {
    if cfg.k == 0 || cfg.k > 255 {
        return Err(SegError::Param(format!(
            "k must be in 1..=255, got {}",
            cfg.k
        )));
    }
    if cfg.k > MAX_DEVICE_K {
        return Err(SegError::Param(format!(
            "k = {} exceeds the GPU k-means' limit of {MAX_DEVICE_K}",
            cfg.k
        )));
    }
    if !cfg.cam_threshold.is_finite()
        || !cfg.saturation.is_finite()
        || !cfg.min_cam_support.is_finite()
    {
        return Err(SegError::Param("thresholds must be finite".into()));
    }
    Ok(())
}

/// `crate::seg::refine` on the device, step by step: CAM region on the positive slices,
/// k-means on the subdural window inside it, the chosen cluster, dilation, 3-D components
/// and their filter. `hu` and `cam_norm` are `[z, y, x]` device buffers of `dims`.
pub fn refine_on_device(
    be: &CudaBackend,
    hu: &CudaSlice<f32>,
    cam_norm: &CudaSlice<f32>,
    dims: (usize, usize, usize),
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> std::result::Result<RefineOutput, DeviceSegError> {
    check_config(cfg)?;
    let n = voxels("refine", dims)?;
    let shape = |what: &'static str, got: usize| SegError::Shape {
        what,
        got: vec![got],
        expected: vec![n],
    };
    if hu.len() != n {
        return Err(shape("HU", hu.len()).into());
    }
    if cam_norm.len() != n {
        return Err(shape("CAM", cam_norm.len()).into());
    }
    if slice_positive.len() != dims.0 {
        return Err(SegError::Shape {
            what: "slice decisions",
            got: vec![slice_positive.len()],
            expected: vec![dims.0],
        }
        .into());
    }
    let (nz, ny, nx) = dims;
    if n == 0 {
        return Ok(RefineOutput {
            mask: Mask::zeros((nz, ny, nx)),
            n_components: 0,
            component_sizes: Vec::new(),
            cam_voxels: 0,
            cluster_voxels: 0,
            dropped_small: 0,
            dropped_cam: 0,
        });
    }
    let mut region = alloc::<u8>(be, n)?;
    cam_region(
        be,
        cam_norm,
        dims,
        slice_positive,
        cfg.cam_threshold,
        &mut region,
    )?;
    let cam_voxels = count_nonzero(be, &region)?;

    let mut values = alloc::<f32>(be, n)?;
    if cfg.smooth_radius > 0 {
        let mut smoothed = alloc::<f32>(be, n)?;
        box_smooth(
            be,
            hu,
            dims,
            cfg.smooth_radius,
            cfg.saturation,
            &mut smoothed,
        )?;
        subdural(be, &smoothed, &mut values)?;
    } else {
        subdural(be, hu, &mut values)?;
    }
    if cfg.exclude_saturated {
        be.launch(
            "seg",
            "seg_exclude_saturated",
            grid(n),
            &[
                ptr(be, &values),
                KArg::F32(cfg.saturation),
                u64a(n),
                ptr(be, &region),
            ],
        )
        .map_err(DeviceSegError::from)?;
    }
    let floor = crate::data::window::Window::SUBDURAL.apply(cfg.min_blood_hu);
    let (nseg, seg_len) = if cfg.per_slice_kmeans {
        (nz, ny * nx)
    } else {
        (1, n)
    };
    let mut km_labels = alloc::<u8>(be, n)?;
    let km = kmeans_segments(
        be,
        &values,
        &region,
        nseg,
        seg_len,
        cfg.k,
        cfg.max_kmeans_iter,
        &mut km_labels,
    )?;
    drop(km_labels);
    // The band of each segment's chosen cluster, then every voxel of the grow region in it.
    let lo: Vec<f32> = (0..nseg)
        .map(|s| {
            let (c, n) = (km.centroids_of(s), km.counts_of(s));
            choose_cluster(c, n, floor, cfg.saturation, cfg.min_cluster_voxels)
                .map_or(f32::INFINITY, |k| band_edge(cfg, c, n, k))
        })
        .collect();
    let lo = upload(be, &lo)?;
    let mut grow = alloc::<u8>(be, n)?;
    cam_region(
        be,
        cam_norm,
        dims,
        slice_positive,
        cfg.grow_cam_threshold.min(cfg.cam_threshold),
        &mut grow,
    )?;
    let clusters = alloc::<u8>(be, n)?;
    be.launch(
        "seg",
        "seg_band",
        grid(n),
        &[
            ptr(be, &values),
            ptr(be, &grow),
            ptr(be, &lo),
            u64a(seg_len),
            u64a(n),
            KArg::F32(cfg.saturation),
            KArg::I32(i32::from(cfg.exclude_saturated)),
            ptr(be, &clusters),
        ],
    )
    .map_err(DeviceSegError::from)?;
    drop(values);
    drop(grow);
    let cluster_voxels = count_nonzero(be, &clusters)?;

    let mut grown = alloc::<u8>(be, n)?;
    morph2d(
        be,
        &clusters,
        dims,
        cfg.dilate_radius,
        cfg.dilate_shape,
        true,
        &mut grown,
    )?;
    drop(clusters);
    let (labels, _n_comp, sizes) = ccl3d(be, &grown, dims, cfg.connectivity)?;
    drop(grown);

    let mut out = alloc::<u8>(be, n)?;
    let (kept, dropped_small, dropped_cam) = filter_components(
        be,
        &labels,
        &sizes,
        cam_norm,
        cfg.grow_cam_threshold.min(cfg.cam_threshold),
        cfg.min_component_voxels,
        cfg.min_cam_support,
        cfg.cam_threshold,
        &mut out,
    )?;
    let host = download(be, &out, n)?;
    let mask = Array3::from_shape_vec((nz, ny, nx), host).map_err(|e| EngineError::Shape {
        op: "refine",
        detail: e.to_string(),
    })?;
    Ok(RefineOutput {
        mask,
        n_components: kept.len(),
        component_sizes: kept,
        cam_voxels,
        cluster_voxels,
        dropped_small,
        dropped_cam,
    })
}

/// [`refine_on_device`] from host arrays (uploads `hu` and `cam_norm` once).
pub fn refine_arrays(
    be: &CudaBackend,
    hu: &Array3<f32>,
    cam_norm: &Array3<f32>,
    slice_positive: &[bool],
    cfg: &RefineConfig,
) -> std::result::Result<RefineOutput, DeviceSegError> {
    if cam_norm.dim() != hu.dim() {
        let (a, b) = (cam_norm.dim(), hu.dim());
        return Err(SegError::Shape {
            what: "CAM",
            got: vec![a.0, a.1, a.2],
            expected: vec![b.0, b.1, b.2],
        }
        .into());
    }
    let hu_std = hu.as_standard_layout();
    let cam_std = cam_norm.as_standard_layout();
    let (Some(h), Some(c)) = (hu_std.as_slice(), cam_std.as_slice()) else {
        return Err(SegError::Param("arrays not contiguous".into()).into());
    };
    let hu_d = upload(be, h)?;
    let cam_d = upload(be, c)?;
    refine_on_device(be, &hu_d, &cam_d, hu.dim(), slice_positive, cfg)
}

#[cfg(test)]
mod tests {
    use super::peak_value;

    /// `float_key` of kernels/ccl.cu.
    fn key(v: f32) -> u32 {
        let b = v.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    }

    #[test]
    fn peak_keys_round_trip_and_keep_order() {
        let vals = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.25,
            0.7,
            1.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} vs {}", w[0], w[1]);
        }
        for &v in &vals {
            assert_eq!(peak_value(key(v)).to_bits(), v.to_bits());
            assert!(key(v) > 0, "key 0 is reserved for 'no voxel'");
        }
        assert_eq!(peak_value(0), f32::NEG_INFINITY);
    }
}
