//! 3-D connected-component labelling (6-, 18- or 26-connectivity) on the CPU, mirroring
//! `cuda/ccl.rs` and `kernels/ccl.cu`, and per-component statistics of a value volume and
//! the selection of components by a lookup table. Knows only 0/1 volumes `[z, y, x]`,
//! labels and values.
//!
//! Algorithm: the volume is cut into slabs of whole z-slices, labelled in parallel by a
//! run-based two-pass union-find: each row's foreground is cut into runs, each run is
//! united with the touching runs of its (up to four) prior rows and labelled as a whole
//! (path halving; the larger root always goes under the smaller one, so a parent index is
//! never above its child). Each slab's provisional labels are compacted; the slabs are then
//! joined by a union-find over the compact ids, looking only across the slab boundaries,
//! and a parallel final pass writes consecutive labels (sizes come from the provisional
//! labels' run lengths, not from a per-voxel count). Because every root is the smallest id
//! of its set, final labels are numbered in raster order of each component's first voxel:
//! the output does not depend on the number of slabs or threads, and equals a flood fill's
//! numbering.

use crate::engine::volume::{ComponentStats, Connectivity};
use crate::engine::{EngineError, Result};
use ndarray::{Array3, ArrayView3};
use rayon::prelude::*;

/// Labels and sizes of the components.
#[derive(Clone, Debug)]
pub struct CclOutput {
    /// 0 = background, components numbered `1..=n` in raster order of their first voxel.
    pub labels: Array3<u32>,
    /// `sizes[l]` = voxels with label `l`; `sizes[0]` counts the background. `len = n + 1`.
    pub sizes: Vec<usize>,
}

impl CclOutput {
    /// The number of components.
    pub fn n_components(&self) -> usize {
        self.sizes.len().saturating_sub(1)
    }
}

/// Labels the foreground (non-zero voxels) of `mask`, slabs chosen from rayon's thread count.
pub fn connected_components(mask: &Array3<u8>, conn: Connectivity) -> Result<CclOutput> {
    let slabs = (rayon::current_num_threads() * 2).max(1);
    connected_components_slabs(mask.view(), conn, slabs)
}

/// As [`connected_components`] with an explicit number of slabs (clamped to `1..=nz`);
/// the result is the same for any number.
pub fn connected_components_slabs(
    mask: ArrayView3<u8>,
    conn: Connectivity,
    slabs: usize,
) -> Result<CclOutput> {
    label(mask, conn, slabs, None)
}

/// As [`connected_components`], writing into `old` (e.g. the `labels` of a previous call)
/// when it has the mask's shape and standard layout: a fresh label volume costs a page
/// fault and a kernel page clear per 4 KiB on first touch, a reused one only a memset.
pub fn connected_components_reusing(
    mask: &Array3<u8>,
    conn: Connectivity,
    old: Array3<u32>,
) -> Result<CclOutput> {
    let slabs = (rayon::current_num_threads() * 2).max(1);
    label(mask.view(), conn, slabs, Some(old))
}

fn label(
    mask: ArrayView3<u8>,
    conn: Connectivity,
    slabs: usize,
    reuse: Option<Array3<u32>>,
) -> Result<CclOutput> {
    let (nz, ny, nx) = mask.dim();
    let total = nz * ny * nx;
    if total >= u32::MAX as usize {
        return Err(EngineError::TooLarge(total));
    }
    // A fresh volume comes zeroed from the allocator; a reused one is cleared slab by
    // slab below, in parallel.
    let (mut labels, dirty) = match reuse {
        Some(a) if a.dim() == (nz, ny, nx) && a.is_standard_layout() => (a, true),
        _ => (Array3::<u32>::zeros((nz, ny, nx)), false),
    };
    if total == 0 {
        return Ok(CclOutput {
            labels,
            sizes: vec![0],
        });
    }
    let mask = mask.as_standard_layout();
    let m = mask
        .as_slice()
        .ok_or_else(|| EngineError::Param("mask not contiguous".into()))?;
    let sz = ny * nx;
    let slabs = slabs.clamp(1, nz);
    let thick = nz.div_ceil(slabs);
    let lab = labels
        .as_slice_mut()
        .ok_or_else(|| EngineError::Param("labels not contiguous".into()))?;

    // Pass 1: each slab on its own; returns the compact id of every provisional label.
    // Per slab: (compact id of each provisional label, number of sets, voxels of each
    // provisional label).
    let compact: Vec<(Vec<u32>, u32, Vec<usize>)> = lab
        .par_chunks_mut(thick * sz)
        .enumerate()
        .map(|(s, chunk)| {
            let z0 = s * thick;
            if dirty {
                chunk.fill(0);
            }
            let (parent, counts) = scan_slab(conn, m, chunk, z0, ny, nx);
            let (c, n) = compact_roots(&parent);
            (c, n, counts)
        })
        .collect();

    // Pass 2: join the slabs across their boundaries.
    let mut offsets = Vec::with_capacity(compact.len());
    let mut acc = 0u32;
    for (_, n, _) in &compact {
        offsets.push(acc);
        acc += n;
    }
    let mut gp: Vec<u32> = (0..=acc).collect();
    let below: Vec<(i32, i32)> = (-1..=1)
        .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
        .filter(|&(dy, dx)| conn.touches(-1, dy, dx))
        .collect();
    for s in 1..compact.len() {
        let z0 = s * thick;
        let cur = z0 * sz;
        let prev = cur - sz;
        let (cs, os) = (&compact[s].0, offsets[s]);
        let (cp, op) = (&compact[s - 1].0, offsets[s - 1]);
        for y in 0..ny {
            for x in 0..nx {
                // Test the mask, not the labels: see the note on untouched pages in `scan_slab`.
                if m[cur + y * nx + x] == 0 {
                    continue;
                }
                let a = lab[cur + y * nx + x];
                let ga = os + cs[a as usize];
                for &(dy, dx) in &below {
                    let (yy, xx) = (y as i64 + dy as i64, x as i64 + dx as i64);
                    if yy < 0 || xx < 0 || yy >= ny as i64 || xx >= nx as i64 {
                        continue;
                    }
                    let j = prev + yy as usize * nx + xx as usize;
                    if m[j] != 0 {
                        union(&mut gp, ga, op + cp[lab[j] as usize]);
                    }
                }
            }
        }
    }
    // Consecutive final ids in increasing root order (= raster order of first voxels).
    let mut fin = vec![0u32; gp.len()];
    let mut n = 0u32;
    for g in 1..gp.len() {
        let p = gp[g] as usize;
        if p == g {
            n += 1;
            fin[g] = n;
        } else {
            fin[g] = fin[p];
        }
    }

    // Sizes from the provisional labels' voxel counts: no per-voxel counting.
    let mut sizes = vec![0usize; n as usize + 1];
    for (s, (cs, _, counts)) in compact.iter().enumerate() {
        for (p, &c) in cs.iter().enumerate().skip(1) {
            sizes[fin[(offsets[s] + c) as usize] as usize] += counts[p];
        }
    }
    sizes[0] = total - sizes[1..].iter().sum::<usize>();

    // Pass 3: final labels.
    lab.par_chunks_mut(thick * sz)
        .enumerate()
        .for_each(|(s, chunk)| {
            let (cs, os) = (&compact[s].0, offsets[s]);
            let lut: Vec<u32> = cs
                .iter()
                .enumerate()
                .map(|(p, &c)| if p == 0 { 0 } else { fin[(os + c) as usize] })
                .collect();
            // Background stays 0: skip it eight voxels at a time by the mask bytes.
            let ms = &m[s * thick * sz..s * thick * sz + chunk.len()];
            for (lg, mg) in chunk.chunks_mut(8).zip(ms.chunks(8)) {
                if mg.len() == 8 && zero8(mg, 0) {
                    continue;
                }
                for v in lg.iter_mut() {
                    *v = lut[*v as usize];
                }
            }
        });
    Ok(CclOutput { labels, sizes })
}

#[inline]
fn find(p: &mut [u32], mut x: u32) -> u32 {
    while p[x as usize] != x {
        let g = p[p[x as usize] as usize];
        p[x as usize] = g;
        x = g;
    }
    x
}

/// Links the larger root under the smaller one; returns the root.
#[inline]
fn union(p: &mut [u32], a: u32, b: u32) -> u32 {
    let ra = find(p, a);
    let rb = find(p, b);
    if ra < rb {
        p[rb as usize] = ra;
        ra
    } else {
        p[ra as usize] = rb;
        rb
    }
}

/// Compact ids `1..=m` for the sets of a union-find whose parents are never above their
/// children; returns the table (index 0 -> 0) and `m`.
fn compact_roots(parent: &[u32]) -> (Vec<u32>, u32) {
    let mut c = vec![0u32; parent.len()];
    let mut m = 0u32;
    for i in 1..parent.len() {
        let p = parent[i] as usize;
        if p == i {
            m += 1;
            c[i] = m;
        } else {
            c[i] = c[p];
        }
    }
    (c, m)
}

/// A run of foreground voxels `[x0, x1)` in one row, with its provisional label.
#[derive(Clone, Copy)]
struct Run {
    x0: u32,
    x1: u32,
    label: u32,
}

/// `true` when all eight bytes at `x` are zero.
#[inline]
fn zero8(row: &[u8], x: usize) -> bool {
    let g = &row[x..x + 8];
    u64::from_ne_bytes([g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]]) == 0
}

/// Labels one slab (`lab` holds slices `z0..z0 + lab.len() / (ny*nx)`) with provisional
/// labels; returns the union-find parent table (index 0 unused) and the voxels of each
/// provisional label.
///
/// Works on runs: each row's foreground is cut into runs of consecutive voxels, and each
/// run is united with the runs it touches in its prior rows 0 = `(z, y-1)`,
/// 1 = `(z-1, y-1)`, 2 = `(z-1, y)`, 3 = `(z-1, y+1)` (a sweep over both sorted run
/// lists), then its voxels get one label. A run touches a prior run when their x ranges
/// overlap, or, where the connectivity allows an x-diagonal step from that row, are
/// adjacent.
fn scan_slab(
    conn: Connectivity,
    m: &[u8],
    lab: &mut [u32],
    z0: usize,
    ny: usize,
    nx: usize,
) -> (Vec<u32>, Vec<usize>) {
    // Per prior row: not a neighbour (None) or a neighbour with (true) or without
    // (false) the x-diagonal.
    let rule: [Option<bool>; 4] = match conn {
        Connectivity::Six => [Some(false), None, Some(false), None],
        Connectivity::Eighteen => [Some(true), Some(false), Some(true), Some(false)],
        Connectivity::TwentySix => [Some(true); 4],
    };
    let sz = ny * nx;
    let nzs = lab.len() / sz;
    let mut parent: Vec<u32> = vec![0];
    let mut counts: Vec<usize> = vec![0];
    let mut prev: Vec<Vec<Run>> = vec![Vec::new(); ny];
    let mut curr: Vec<Vec<Run>> = vec![Vec::new(); ny];
    for zl in 0..nzs {
        let gz = (z0 + zl) * sz;
        for y in 0..ny {
            let cur = zl * sz + y * nx;
            let mrow = &m[gz + y * nx..gz + y * nx + nx];
            let row = &mut lab[cur..cur + nx];
            // The labels start zeroed (calloc'd) and only foreground is ever written or
            // read (the passes skip background by the mask), so the pages of empty rows
            // are never touched: no page fault, no zeroing.
            let mut runs = std::mem::take(&mut curr[y]);
            runs.clear();
            let mut x = 0;
            while x < nx {
                if x + 8 <= nx && zero8(mrow, x) {
                    x += 8;
                    continue;
                }
                if mrow[x] == 0 {
                    x += 1;
                    continue;
                }
                let x0 = x;
                while x < nx && mrow[x] != 0 {
                    x += 1;
                }
                runs.push(Run {
                    x0: x0 as u32,
                    x1: x as u32,
                    label: 0,
                });
            }
            if runs.is_empty() {
                curr[y] = runs;
                continue;
            }
            let empty: &[Run] = &[];
            let priors: [&[Run]; 4] = [
                if y > 0 { &curr[y - 1] } else { empty },
                if zl > 0 && y > 0 { &prev[y - 1] } else { empty },
                if zl > 0 { &prev[y] } else { empty },
                if zl > 0 && y + 1 < ny {
                    &prev[y + 1]
                } else {
                    empty
                },
            ];
            let mut cursor = [0usize; 4];
            for run in runs.iter_mut() {
                let mut l = 0u32;
                for r in 0..4 {
                    let Some(diag) = rule[r] else { continue };
                    let pr = priors[r];
                    let d = diag as u32;
                    // Prior runs ending before this one can touch it cannot touch the later
                    // runs either.
                    let mut j = cursor[r];
                    while j < pr.len() && pr[j].x1 + d <= run.x0 {
                        j += 1;
                    }
                    cursor[r] = j;
                    while j < pr.len() && pr[j].x0 < run.x1 + d {
                        let b = pr[j].label;
                        if l == 0 {
                            l = b;
                        } else if b != l {
                            l = union(&mut parent, l, b);
                        }
                        j += 1;
                    }
                }
                if l == 0 {
                    l = parent.len() as u32;
                    parent.push(l);
                    counts.push(0);
                }
                run.label = l;
                counts[l as usize] += (run.x1 - run.x0) as usize;
                row[run.x0 as usize..run.x1 as usize].fill(l);
            }
            curr[y] = runs;
        }
        std::mem::swap(&mut prev, &mut curr);
    }
    (parent, counts)
}

/// Elements per parallel chunk of the per-voxel passes below.
const CHUNK: usize = 1 << 16;

/// Per component `1..=n` of `labels`: the voxels with `x >= threshold` and the largest `x`
/// (`-inf` for none; NaN never counts). A label above `n` is an error.
pub fn component_stats(
    labels: &[u32],
    n: usize,
    x: &[f32],
    threshold: f32,
) -> Result<ComponentStats> {
    crate::engine::check_len("component_stats", "values", x.len(), labels.len())?;
    if labels.par_iter().any(|&l| l as usize > n) {
        return Err(EngineError::Param(format!(
            "a label is above the {n} components"
        )));
    }
    // Large chunks in parallel; each worker keeps its own per-component counts and peaks.
    let (inside, peak) = labels
        .par_chunks(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .fold(
            || (vec![0usize; n + 1], vec![f32::NEG_INFINITY; n + 1]),
            |(mut inside, mut peak), (ls, vs)| {
                for (&l, &v) in ls.iter().zip(vs) {
                    if l == 0 {
                        continue;
                    }
                    let l = l as usize;
                    inside[l] += usize::from(v >= threshold);
                    if v > peak[l] {
                        peak[l] = v;
                    }
                }
                (inside, peak)
            },
        )
        .reduce(
            || (vec![0usize; n + 1], vec![f32::NEG_INFINITY; n + 1]),
            |(mut ia, mut pa), (ib, pb)| {
                for l in 0..=n {
                    ia[l] += ib[l];
                    pa[l] = pa[l].max(pb[l]);
                }
                (ia, pa)
            },
        );
    Ok(ComponentStats { inside, peak })
}

/// `mask[i] = keep[labels[i]] != 0` and, when given, `relabelled[i] = keep[labels[i]]`
/// (`keep[0]` is 0: the background). A label beyond `keep` is an error.
pub fn select_components(
    labels: &[u32],
    keep: &[u32],
    relabelled: Option<&mut [u32]>,
    mask: &mut [u8],
) -> Result<()> {
    const OP: &str = "select_components";
    crate::engine::check_len(OP, "mask", mask.len(), labels.len())?;
    if labels.par_iter().any(|&l| l as usize >= keep.len()) {
        return Err(EngineError::Param(format!(
            "a label is beyond the {} entries of the lookup table",
            keep.len()
        )));
    }
    let pass = |ls: &[u32], mk: &mut [u8], mut ol: Option<&mut [u32]>| {
        for (i, (&l, m)) in ls.iter().zip(mk.iter_mut()).enumerate() {
            let k = keep[l as usize];
            *m = u8::from(k != 0);
            if let Some(o) = ol.as_deref_mut() {
                o[i] = k;
            }
        }
    };
    match relabelled {
        Some(out) => {
            crate::engine::check_len(OP, "relabelled", out.len(), labels.len())?;
            out.par_chunks_mut(CHUNK)
                .zip(mask.par_chunks_mut(CHUNK))
                .zip(labels.par_chunks(CHUNK))
                .for_each(|((o, mk), ls)| pass(ls, mk, Some(o)));
        }
        None => mask
            .par_chunks_mut(CHUNK)
            .zip(labels.par_chunks(CHUNK))
            .for_each(|(mk, ls)| pass(ls, mk, None)),
    }
    Ok(())
}
