//! 3-D connected components on the device (`kernels/ccl.cu`, mirroring `cpu/ccl.rs`):
//! block-based union-find (2x2x2 blocks for 26-connectivity, voxels otherwise), component
//! ids in raster order of each component's first voxel (the CPU's numbering) through a
//! chunked scan, and the per-component statistics and selection of `cpu/ccl.rs`.
//!
//! Volumes are `[z, y, x]`, contiguous, at most `u32::MAX - 1` voxels (the CPU's limit too).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::volume::{voxels, ComponentStats, Connectivity, Dims};
use crate::engine::{check_len, EngineError, Result};

kernels!("ccl" {
    init_blocks: "ccl_init_blocks",
    merge_blocks26: "ccl_merge_blocks26",
    init_vox: "ccl_init_vox",
    merge_vox: "ccl_merge_vox",
    compress: "ccl_compress",
    block_stats: "ccl_block_stats",
    vox_stats: "ccl_vox_stats",
    root_count: "ccl_root_count",
    root_ids: "ccl_root_ids",
    first_count: "ccl_first_count",
    first_ids: "ccl_first_ids",
    scan_chunks: "ccl_scan_chunks",
    finalize_blocks: "ccl_finalize_blocks",
    finalize_vox: "ccl_finalize_vox",
    component_stats: "ccl_component_stats",
    select: "ccl_select",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.ccl.get(|| Kernels::load(be.modules()))
}

/// Threads of the chunked scan kernels (`SCAN_THREADS` in kernels/ccl.cu) and the nodes one
/// of their blocks covers (`CHUNK`).
const SCAN_THREADS: u32 = 256;
const SCAN_CHUNK: usize = 256 * 8;

/// Buffers of one labelling, allocated once: [`CclRun::launch`] queues the kernels only (no
/// host wait, so it can be timed with a stream sync), [`CclRun::collect`] reads back the
/// count and the sizes.
pub struct CclRun {
    dims: Dims,
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
        dims: Dims,
        conn: Connectivity,
        force_voxel_path: bool,
    ) -> Result<Self> {
        let n = voxels("ccl3d", dims)?;
        super::launch::int_args([dims.0, dims.1, dims.2])?;
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
            occ: be.alloc(if blocks { nodes } else { 0 })?,
            parent: be.alloc(nodes)?,
            first: be.alloc(if blocks { nodes } else { 0 })?,
            size_root: be.alloc(nodes)?,
            ids: be.alloc(nodes)?,
            // At most one component per node.
            sizes: be.alloc(nodes)?,
            chunk_counts: be.alloc(nchunks)?,
            offsets: be.alloc(nchunks)?,
            total: be.alloc(1)?,
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
        let vol = int_args([nz, ny, nx])?;
        let blk = int_args([nbz, nby, nbx])?;
        let (n64, nb64) = (n as u64, self.nodes as u64);
        let nchunks = n.div_ceil(SCAN_CHUNK);
        let chunk_grid = blocks(OP, (nchunks, 1, 1), SCAN_THREADS)?;
        let k = kernels(be)?;
        let st = be.stream();
        let s = self;
        // SAFETY (every launch below): mask and labels hold n voxels (checked), the node
        // buffers one element per node (a 2x2x2 block or a voxel), the chunk buffers one per
        // scan chunk, `total` one; grids of nodes, voxels or chunks.
        unsafe {
            if s.blocks {
                let nb = s.nodes;
                k.init_blocks
                    .on(st)
                    .arg(mask)
                    .ints(&vol)
                    .ints(&blk)
                    .arg(&mut s.occ)
                    .arg(&mut s.parent)
                    .arg(&mut s.first)
                    .arg(&mut s.size_root)
                    .launch(grid(nb))?;
                k.merge_blocks26
                    .on(st)
                    .arg(&s.occ)
                    .arg(&mut s.parent)
                    .ints(&blk)
                    .launch(grid(nb))?;
                k.compress
                    .on(st)
                    .arg(&s.occ)
                    .arg(&mut s.parent)
                    .arg(&nb64)
                    .launch(grid(nb))?;
                k.block_stats
                    .on(st)
                    .arg(&s.occ)
                    .arg(&s.parent)
                    .ints(&vol[1..])
                    .ints(&blk)
                    .arg(&mut s.first)
                    .arg(&mut s.size_root)
                    .launch(grid(nb))?;
                k.first_count
                    .on(st)
                    .arg(mask)
                    .arg(&s.parent)
                    .arg(&s.first)
                    .ints(&vol)
                    .ints(&blk[1..])
                    .arg(&mut s.chunk_counts)
                    .launch(chunk_grid)?;
                s.scan(be, nchunks)?;
                k.first_ids
                    .on(st)
                    .arg(mask)
                    .arg(&s.parent)
                    .arg(&s.first)
                    .ints(&vol)
                    .ints(&blk[1..])
                    .arg(&s.offsets)
                    .arg(&s.size_root)
                    .arg(&mut s.ids)
                    .arg(&mut s.sizes)
                    .launch(chunk_grid)?;
                k.finalize_blocks
                    .on(st)
                    .arg(&s.occ)
                    .arg(&s.parent)
                    .arg(&s.ids)
                    .ints(&vol)
                    .ints(&blk)
                    .arg(labels)
                    .launch(grid(nb))?;
            } else {
                let conn = s.conn.neighbours() as i32;
                k.init_vox
                    .on(st)
                    .arg(&n64)
                    .arg(&mut s.parent)
                    .arg(&mut s.size_root)
                    .launch(grid(n))?;
                k.merge_vox
                    .on(st)
                    .arg(mask)
                    .arg(&mut s.parent)
                    .ints(&vol)
                    .arg(&conn)
                    .launch(grid(n))?;
                k.compress
                    .on(st)
                    .arg(mask)
                    .arg(&mut s.parent)
                    .arg(&n64)
                    .launch(grid(n))?;
                k.vox_stats
                    .on(st)
                    .arg(mask)
                    .arg(&s.parent)
                    .arg(&n64)
                    .arg(&mut s.size_root)
                    .launch(grid(n))?;
                k.root_count
                    .on(st)
                    .arg(mask)
                    .arg(&s.parent)
                    .arg(&n64)
                    .arg(&mut s.chunk_counts)
                    .launch(chunk_grid)?;
                s.scan(be, nchunks)?;
                k.root_ids
                    .on(st)
                    .arg(mask)
                    .arg(&s.parent)
                    .arg(&n64)
                    .arg(&s.offsets)
                    .arg(&s.size_root)
                    .arg(&mut s.ids)
                    .arg(&mut s.sizes)
                    .launch(chunk_grid)?;
                k.finalize_vox
                    .on(st)
                    .arg(mask)
                    .arg(&s.parent)
                    .arg(&s.ids)
                    .arg(&n64)
                    .arg(labels)
                    .launch(grid(n))?;
            }
        }
        Ok(())
    }

    /// The exclusive scan of the chunks' root counts into `offsets`, the total into `total`.
    fn scan(&mut self, be: &CudaBackend, nchunks: usize) -> Result<()> {
        let nc = dim(nchunks)?;
        // SAFETY: chunk_counts and offsets hold nchunks values, total one.
        unsafe {
            kernels(be)?
                .scan_chunks
                .on(be.stream())
                .arg(&self.chunk_counts)
                .arg(&nc)
                .arg(&mut self.offsets)
                .arg(&mut self.total)
                .launch(blocks("ccl3d", (1, 1, 1), SCAN_THREADS)?)
        }
    }

    /// After [`CclRun::launch`]: the number of components and the sizes in the CPU's
    /// convention (`sizes[0]` = background, `sizes[l]` = voxels of label `l`). Waits.
    pub fn collect(&self, be: &CudaBackend) -> Result<(usize, Vec<usize>)> {
        let n_vox = self.dims.0 * self.dims.1 * self.dims.2;
        if n_vox == 0 {
            return Ok((0, vec![0]));
        }
        let n = be.download_prefix(&self.total, 1)?[0] as usize;
        if n > self.nodes {
            return Err(EngineError::Cuda {
                op: "ccl3d".into(),
                msg: format!("{n} components from {} nodes", self.nodes),
            });
        }
        let comp = be.download_prefix(&self.sizes, n)?;
        let mut sizes = Vec::with_capacity(n + 1);
        let fg: usize = comp.iter().map(|&s| s as usize).sum();
        sizes.push(n_vox.saturating_sub(fg));
        sizes.extend(comp.into_iter().map(|s| s as usize));
        Ok((n, sizes))
    }
}

/// 3-D connected components of `mask` (`[z, y, x]`, non-zero = foreground): labels `1..=n`
/// in raster order of each component's first voxel (0 = background), identical to
/// `cpu::ccl::connected_components`, the count and the sizes (`sizes[0]` = background).
pub fn ccl3d(
    be: &CudaBackend,
    mask: &CudaSlice<u8>,
    dims: Dims,
    conn: Connectivity,
) -> Result<(CudaSlice<u32>, usize, Vec<usize>)> {
    let mut labels = be.alloc::<u32>(voxels("ccl3d", dims)?)?;
    let (n, sizes) = ccl3d_into(be, mask, dims, conn, &mut labels)?;
    Ok((labels, n, sizes))
}

/// As [`ccl3d`] into a given buffer.
pub fn ccl3d_into(
    be: &CudaBackend,
    mask: &CudaSlice<u8>,
    dims: Dims,
    conn: Connectivity,
    labels: &mut CudaSlice<u32>,
) -> Result<(usize, Vec<usize>)> {
    let mut run = CclRun::new(be, dims, conn, false)?;
    run.launch(be, mask, labels)?;
    run.collect(be)
}

/// `cpu::ccl::component_stats` on the device: per component `1..=n`, the voxels with
/// `x >= threshold` and the largest `x` (`-inf` for none).
pub fn component_stats(
    be: &CudaBackend,
    labels: &CudaSlice<u32>,
    n: usize,
    x: &CudaSlice<f32>,
    threshold: f32,
) -> Result<ComponentStats> {
    let nv = labels.len();
    check_len("component_stats", "values", x.len(), nv)?;
    let mut stats = ComponentStats {
        inside: vec![0; n + 1],
        peak: vec![f32::NEG_INFINITY; n + 1],
    };
    if n == 0 || nv == 0 {
        return Ok(stats);
    }
    let mut inside = be.alloc_zeros::<u32>(n)?;
    let mut peak = be.alloc_zeros::<u32>(n)?;
    let nv64 = nv as u64;
    // SAFETY: labels and x hold nv values, inside and peak one per component; every label
    // is at most n (a labelling of n components).
    unsafe {
        kernels(be)?
            .component_stats
            .on(be.stream())
            .arg(labels)
            .arg(x)
            .arg(&threshold)
            .arg(&nv64)
            .arg(&mut inside)
            .arg(&mut peak)
            .launch(grid(nv))?;
    }
    for (s, v) in stats.inside[1..]
        .iter_mut()
        .zip(be.download_prefix(&inside, n)?)
    {
        *s = v as usize;
    }
    for (s, key) in stats.peak[1..]
        .iter_mut()
        .zip(be.download_prefix(&peak, n)?)
    {
        *s = peak_value(key);
    }
    Ok(stats)
}

/// `out[i] = 1` where `keep[labels[i]] != 0`.
pub fn select(
    be: &CudaBackend,
    labels: &CudaSlice<u32>,
    keep: &[u32],
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let nv = labels.len();
    check_len("select_components", "out", out.len(), nv)?;
    if nv == 0 {
        return Ok(());
    }
    let lut = be.upload_any(keep)?;
    let nv64 = nv as u64;
    // SAFETY: labels and out hold nv values; every label indexes `keep` (the labelling's
    // components, `keep` one entry per component and the background).
    unsafe {
        kernels(be)?
            .select
            .on(be.stream())
            .arg(labels)
            .arg(&lut)
            .arg(&nv64)
            .arg(out)
            .launch(grid(nv))
    }
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
