//! 3x3 stride-1 pad-1 convolutions by Winograd F(4x4, 3x3) (Lavin & Gray 2016): every 4x4
//! output tile comes from a 6x6 input tile through 36 independent channel products, so the
//! multiply count drops 4x against the direct (im2col) product, for a few transforms.
//!
//! - weights: `U = G g G^T` per (c_out, c_in) pair, laid out `[36][c_out][c_in]`;
//! - a block of tiles (flat over images, tile rows, tile columns) is gathered from the
//!   zero-padded input and transformed, `V = B^T d B`, into `[36][c_in][tiles]`;
//! - 36 GEMMs `M_xi = U_xi . V_xi` (through [`super::gemm::matmul`]);
//! - `Y = A^T M A` per (c_out, tile), written into the output tile (clipped at the border),
//!   optionally followed by a per-channel affine map, a residual and a ReLU (the fused
//!   inference epilogue).
//!
//! The data gradient of such a convolution is the same convolution of dy with the kernels
//! flipped and c_in/c_out swapped; the weight gradient is `dw = G^T (sum over tiles of
//! (A dy A^T) (x) V) G`. The transforms run over whole blocks of tiles as flat vectors, so
//! they vectorise; blocks run in parallel, each with its own scratch. Knows only NCHW shapes.

use rayon::prelude::*;

use super::gemm::{matmul, matmul_f32_rowmajor_small, Mat, MatMut, Par};
use super::scratch::PoolVec;
use crate::engine::shapes::Conv2d;
use crate::engine::Real;

/// Input tile side.
const A6: usize = 6;
/// Transform positions per tile.
const XI: usize = 36;
/// Output tile side.
const M4: usize = 4;

/// Whether the shape is a 3x3 stride-1 pad-1 convolution (what this file computes).
pub fn applies(s: &Conv2d) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1 && s.h > 0 && s.w > 0
}

/// Tiles of the whole batch.
fn tiles_of(s: &Conv2d) -> usize {
    s.n * s.h.div_ceil(M4) * s.w.div_ceil(M4)
}

/// Whether Winograd beats the direct product for the forward and data-gradient passes of
/// this shape: the per-call weight transform (36 / 9 = 4x the weights) and the GEMMs of
/// width `tiles` must be paid back by enough tiles. Measured with `cargo bench --bench
/// conv_paths` (docs/perf.md): 0.6-0.8x the direct time from 128 tiles at 64-256
/// channels, even at 32 tiles of 256 channels, 2x slower at 32 tiles of 512; at 16
/// channels (the CPU default's first stage) the transforms cost more than they save. Not
/// below 64 channels: the CPU default (16 and 32) stays on the direct product (its demo's
/// Dice bar proved sensitive to Winograd's f32 rounding, about 1e-6 relative, through 30
/// epochs of training).
pub fn worth_it(s: &Conv2d) -> bool {
    applies(s)
        && s.c_in.min(s.c_out) >= 64
        && tiles_of(s) >= 64
        && 2 * tiles_of(s) >= s.c_in.max(s.c_out)
}

/// The same for the weight gradient, whose per-position products accumulate
/// `c_out x c_in` matrices over the tiles: a win up to 128 channels with at least as many
/// tiles, a loss at 256.
pub fn worth_it_wgrad(s: &Conv2d) -> bool {
    worth_it(s) && s.c_in.max(s.c_out) <= 128 && tiles_of(s) >= s.c_in.max(s.c_out)
}

fn t<T: Real>(v: f64) -> T {
    T::from_f64_lossy(v)
}

/// A raw pointer that may cross threads: blocks write disjoint output tiles of one buffer.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole Send + Sync wrapper).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// `N` rows of `len` elements, `ss` apart, of `src` (checked once, so the loops over them
/// run without bounds checks and vectorise).
#[inline(always)]
fn rows<T, const N: usize>(src: &[T], ss: usize, len: usize) -> [&[T]; N] {
    std::array::from_fn(|i| &src[i * ss..i * ss + len])
}

/// `N` disjoint mutable rows of `len` elements, `ds` apart (`ds >= len`), of `dst`.
#[inline(always)]
fn rows_mut<T, const N: usize>(dst: &mut [T], ds: usize, len: usize) -> [&mut [T]; N] {
    assert!(
        N == 0 || (ds >= len && (N - 1) * ds + len <= dst.len()),
        "row views"
    );
    let p = dst.as_mut_ptr();
    // SAFETY: the rows [i*ds, i*ds+len) are inside dst (asserted) and pairwise disjoint
    // (ds >= len); they borrow dst mutably for the returned lifetime.
    std::array::from_fn(|i| unsafe { std::slice::from_raw_parts_mut(p.add(i * ds), len) })
}

/// `out_i = sum_y G[i][y] in_y` over vectors: the 1-D kernel transform, 3 -> 6.
#[inline(always)]
fn g_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (q, s6, s12, s24) = (
        t::<T>(0.25),
        t::<T>(1.0 / 6.0),
        t::<T>(1.0 / 12.0),
        t::<T>(1.0 / 24.0),
    );
    let i_: [&[T]; 3] = rows(src, ss, len);
    let o_: [&mut [T]; 6] = rows_mut(dst, ds, len);
    let [o0, o1, o2, o3, o4, o5] = o_;
    for l in 0..len {
        let k0 = i_[0][l];
        let k1 = i_[1][l];
        let k2 = i_[2][l];
        let (e, o) = (k0 + k2, k1);
        o0[l] = q * k0;
        o1[l] = -s6 * (e + o);
        o2[l] = s6 * (o - e);
        o3[l] = s24 * k0 + s12 * k1 + s6 * k2;
        o4[l] = s24 * k0 - s12 * k1 + s6 * k2;
        o5[l] = k2;
    }
}

/// `out_x = sum_j G[j][x] in_j`: the adjoint of [`g_vec`], 6 -> 3.
#[inline(always)]
fn gt_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (q, s6, s12, s24) = (
        t::<T>(0.25),
        t::<T>(1.0 / 6.0),
        t::<T>(1.0 / 12.0),
        t::<T>(1.0 / 24.0),
    );
    let i_: [&[T]; 6] = rows(src, ss, len);
    let o_: [&mut [T]; 3] = rows_mut(dst, ds, len);
    let [o0, o1, o2] = o_;
    for l in 0..len {
        let u0 = i_[0][l];
        let u1 = i_[1][l];
        let u2 = i_[2][l];
        let u3 = i_[3][l];
        let u4 = i_[4][l];
        let u5 = i_[5][l];
        o0[l] = q * u0 - s6 * (u1 + u2) + s24 * (u3 + u4);
        o1[l] = s6 * (u2 - u1) + s12 * (u3 - u4);
        o2[l] = s6 * (u3 + u4 - u1 - u2) + u5;
    }
}

/// One row of transformed weights: `k` `[9][cols]` (the 3x3 kernels of that row, tap-major)
/// -> `out` `[36][cols]`, through `tmp` `[18][cols]`.
#[inline(always)]
fn weight_row_body<T: Real>(k: &[T], tmp: &mut [T], out: &mut [T], cols: usize) {
    // Along ky: tmp[i][kx] = sum_ky G[i][ky] k[ky][kx].
    for kx in 0..3 {
        g_vec(
            &k[kx * cols..],
            3 * cols,
            &mut tmp[kx * cols..],
            3 * cols,
            cols,
        );
    }
    // Along kx: out[i][j] = sum_kx G[j][kx] tmp[i][kx].
    for i in 0..6 {
        g_vec(
            &tmp[i * 3 * cols..],
            cols,
            &mut out[i * 6 * cols..],
            cols,
            cols,
        );
    }
}
crate::multiversion!(weight_row, weight_row_body, <T: Real>, (
    k: &[T], tmp: &mut [T], out: &mut [T], cols: usize
));

/// One output channel of the weight gradient: `du` rows `[36][c_in]` (strided by
/// `plane`) -> `dw` `[c_in][9]`, through `tmp` `[18][c_in]` and `out` `[9][c_in]`.
#[inline(always)]
fn weight_grad_row_body<T: Real>(
    du: &[T],
    plane: usize,
    tmp: &mut [T],
    out: &mut [T],
    dw: &mut [T],
    c_in: usize,
) {
    // Along j: tmp[i][x] = sum_j G[j][x] dU[i][j].
    for i in 0..6 {
        gt_vec(
            &du[i * 6 * plane..],
            plane,
            &mut tmp[i * 3 * c_in..],
            c_in,
            c_in,
        );
    }
    // Along i: out[y][x] = sum_i G[i][y] tmp[i][x].
    for x in 0..3 {
        gt_vec(
            &tmp[x * c_in..],
            3 * c_in,
            &mut out[x * c_in..],
            3 * c_in,
            c_in,
        );
    }
    for ci in 0..c_in {
        for tap in 0..9 {
            dw[ci * 9 + tap] = out[tap * c_in + ci];
        }
    }
}
crate::multiversion!(weight_grad_row, weight_grad_row_body, <T: Real>, (
    du: &[T], plane: usize, tmp: &mut [T], out: &mut [T], dw: &mut [T], c_in: usize
));

/// `U = G g G^T` for every kernel, laid out `[36][c_out][c_in]` (each position's matrix
/// contiguous). `flip` computes the kernels of the data gradient instead: the 3x3 kernel
/// rotated by 180 degrees and c_in/c_out swapped, laid out `[36][c_in][c_out]`.
pub fn transform_weights<T: Real>(w: &[T], c_out: usize, c_in: usize, flip: bool, u: &mut [T]) {
    let (rows, cols) = if flip { (c_in, c_out) } else { (c_out, c_in) };
    assert_eq!(u.len(), rows * XI * cols, "transformed weight buffer");
    assert_eq!(w.len(), c_out * c_in * 9, "weights");
    let up = SyncPtr(u.as_mut_ptr());
    let plane = rows * cols;
    (0..rows).into_par_iter().for_each_init(
        || {
            (
                vec![T::zero(); 9 * cols],
                vec![T::zero(); 18 * cols],
                vec![T::zero(); XI * cols],
            )
        },
        |(k, tmp, out), r| {
            for c in 0..cols {
                let (co, ci) = if flip { (c, r) } else { (r, c) };
                let src = &w[(co * c_in + ci) * 9..(co * c_in + ci + 1) * 9];
                for tap in 0..9 {
                    let from = if flip { 8 - tap } else { tap };
                    k[tap * cols + c] = src[from];
                }
            }
            weight_row(k, tmp, out, cols);
            for xi in 0..XI {
                let row = &out[xi * cols..(xi + 1) * cols];
                // SAFETY: row r of position xi lies inside u (length 36*rows*cols, asserted
                // above), and each r is written by one task only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        up.get().add(xi * plane + r * cols),
                        cols,
                    )
                };
            }
        },
    );
}

/// `out_k = sum_j B^T[k][j] in_j` over vectors: the 1-D input transform, 6 -> 6.
#[inline(always)]
fn bt_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (c4, c5, c2) = (t::<T>(4.0), t::<T>(5.0), t::<T>(2.0));
    let i_: [&[T]; 6] = rows(src, ss, len);
    let o_: [&mut [T]; 6] = rows_mut(dst, ds, len);
    let [o0, o1, o2, o3, o4, o5] = o_;
    for l in 0..len {
        let d0 = i_[0][l];
        let d1 = i_[1][l];
        let d2 = i_[2][l];
        let d3 = i_[3][l];
        let d4 = i_[4][l];
        let d5 = i_[5][l];
        o0[l] = c4 * d0 - c5 * d2 + d4;
        o1[l] = d3 + d4 - c4 * (d1 + d2);
        o2[l] = c4 * (d1 - d2) + d4 - d3;
        o3[l] = c2 * (d3 - d1) + d4 - d2;
        o4[l] = c2 * (d1 - d3) + d4 - d2;
        o5[l] = c4 * d1 - c5 * d3 + d5;
    }
}

/// `out_k = sum_j A^T[k][j] in_j`: the 1-D output transform, 6 -> 4.
#[inline(always)]
fn at_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (c2, c4, c8) = (t::<T>(2.0), t::<T>(4.0), t::<T>(8.0));
    let i_: [&[T]; 6] = rows(src, ss, len);
    let o_: [&mut [T]; 4] = rows_mut(dst, ds, len);
    let [o0, o1, o2, o3] = o_;
    for l in 0..len {
        let m0 = i_[0][l];
        let m1 = i_[1][l];
        let m2 = i_[2][l];
        let m3 = i_[3][l];
        let m4 = i_[4][l];
        let m5 = i_[5][l];
        let (p12, n12, p34, n34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o0[l] = m0 + p12 + p34;
        o1[l] = n12 + c2 * n34;
        o2[l] = p12 + c4 * p34;
        o3[l] = n12 + c8 * n34 + m5;
    }
}

/// `out_k = sum_j A[k][j] in_j` (A = (A^T)^T, 4 -> 6): the adjoint of [`at_vec`], for the
/// weight gradient's transform of dy.
#[inline(always)]
fn a_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (c2, c4, c8) = (t::<T>(2.0), t::<T>(4.0), t::<T>(8.0));
    let i_: [&[T]; 4] = rows(src, ss, len);
    let o_: [&mut [T]; 6] = rows_mut(dst, ds, len);
    let [o0, o1, o2, o3, o4, o5] = o_;
    for l in 0..len {
        let y0 = i_[0][l];
        let y1 = i_[1][l];
        let y2 = i_[2][l];
        let y3 = i_[3][l];
        let (a, b) = (y1 + y3, y2);
        let (p, q) = (c2 * y1 + c8 * y3, c4 * y2);
        o0[l] = y0;
        o1[l] = y0 + a + b;
        o2[l] = y0 - a + b;
        o3[l] = y0 + p + q;
        o4[l] = y0 - p + q;
        o5[l] = y3;
    }
}

/// Where a flat tile index lands: the image and the top-left output pixel.
#[derive(Clone, Copy)]
struct Tile {
    img: usize,
    oy: usize,
    ox: usize,
}

struct Geometry {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Geometry {
    fn new(s: &Conv2d) -> Self {
        Geometry {
            h: s.h,
            w: s.w,
            th: s.h.div_ceil(M4),
            tw: s.w.div_ceil(M4),
        }
    }
    fn tiles_per_image(&self) -> usize {
        self.th * self.tw
    }
    fn tile(&self, i: usize) -> Tile {
        let per = self.tiles_per_image();
        let (img, r) = (i / per, i % per);
        Tile {
            img,
            oy: (r / self.tw) * M4,
            ox: (r % self.tw) * M4,
        }
    }
}

/// The runs of a block: maximal ranges `[l0, l1)` of tiles in one tile row of one image
/// (an iterator, so the loop bodies stay in their caller's instruction-set version).
#[inline(always)]
fn runs(tiles: &[Tile]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut l0 = 0;
    std::iter::from_fn(move || {
        if l0 >= tiles.len() {
            return None;
        }
        let (img, oy) = (tiles[l0].img, tiles[l0].oy);
        let mut l1 = l0 + 1;
        while l1 < tiles.len() && tiles[l1].img == img && tiles[l1].oy == oy {
            l1 += 1;
        }
        let r = (l0, l1);
        l0 = l1;
        Some(r)
    })
}

/// Width of a zero-padded row: input columns -1 .. 4*tw+4, plus slack for the strided reads.
fn pad_width(g: &Geometry) -> usize {
    M4 * g.tw + 8
}

/// Gathers the 6x6 windows (top-left at (oy-1, ox-1), zero outside) of the tiles of one
/// channel plane into `d[36][len]`: per run of tiles, the six input rows are copied into
/// zero-padded rows `pad` (`[6][pad_width]`), from which each of the 36 window positions is
/// a stride-4 read.
#[inline(always)]
fn gather<T: Real>(
    g: &Geometry,
    plane: usize,
    img_stride: usize,
    x: &[T],
    tiles: &[Tile],
    pad: &mut [T],
    d: &mut [T],
) {
    let len = tiles.len();
    let pw = pad_width(g);
    for (l0, l1) in runs(tiles) {
        let t0 = tiles[l0];
        let base = plane + t0.img * img_stride;
        let n = l1 - l0;
        for r in 0..A6 {
            let prow = &mut pad[r * pw..(r + 1) * pw];
            let iy = t0.oy as isize - 1 + r as isize;
            if iy < 0 || iy >= g.h as isize {
                prow.fill(T::zero());
            } else {
                prow[0] = T::zero();
                let src = &x[base + iy as usize * g.w..base + (iy as usize + 1) * g.w];
                prow[1..=g.w].copy_from_slice(src);
                prow[g.w + 1..].fill(T::zero());
            }
        }
        for r in 0..A6 {
            for c in 0..A6 {
                // Window column c of tile l sits at padded column ox_l + c = 4*(tx0+l) + c.
                let start = r * pw + t0.ox + c;
                let src = &pad[start..start + M4 * n];
                let dst = &mut d[(r * A6 + c) * len + l0..(r * A6 + c) * len + l1];
                for (o, q) in dst.iter_mut().zip(src.chunks_exact(M4)) {
                    *o = q[0];
                }
            }
        }
    }
}

/// `B^T d B` of every tile: `d[36][len]` (row-major 6x6 per tile) -> `v` at
/// `v[xi * vs + l]`, using `tmp[36][len]`.
#[inline(always)]
fn input_transform<T: Real>(d: &[T], tmp: &mut [T], v: &mut [T], vs: usize, len: usize) {
    // Along each row (over columns c): tmp[r][j] = sum_c BT[j][c] d[r][c].
    for r in 0..A6 {
        bt_vec(&d[r * A6 * len..], len, &mut tmp[r * A6 * len..], len, len);
    }
    // Along each column (over rows r): v[i][j] = sum_r BT[i][r] tmp[r][j].
    for j in 0..A6 {
        bt_vec(&tmp[j * len..], A6 * len, &mut v[j * vs..], A6 * vs, len);
    }
}

/// `A^T m A` of every tile: `m` at `m[xi * ms + l]` -> `o[16][len]` (row-major 4x4).
#[inline(always)]
fn output_transform<T: Real>(m: &[T], ms: usize, tmp: &mut [T], o: &mut [T], len: usize) {
    // Along each row i (over j): tmp[i][q] = sum_j AT[q][j] m[i][j].
    for i in 0..A6 {
        at_vec(&m[i * A6 * ms..], ms, &mut tmp[i * M4 * len..], len, len);
    }
    // Along each column q (over i): o[p][q] = sum_i AT[p][i] tmp[i][q].
    for q in 0..M4 {
        at_vec(&tmp[q * len..], M4 * len, &mut o[q * len..], M4 * len, len);
    }
}

/// The fused epilogue of the forward: `y = act(conv * scale[c] + shift[c] (+ residual))`.
#[derive(Clone, Copy)]
pub struct Epilogue<'a, T> {
    /// Per output channel (scale, shift), or None for the plain convolution.
    pub affine: Option<(&'a [T], &'a [T])>,
    /// Added after the affine map (same shape as y).
    pub residual: Option<&'a [T]>,
    pub relu: bool,
}

impl<T> Epilogue<'_, T> {
    pub fn none() -> Self {
        Epilogue {
            affine: None,
            residual: None,
            relu: false,
        }
    }
}

/// Scratch of one worker (pooled: reused across calls).
struct Scratch<T: Real> {
    pad: PoolVec<T>,
    d: PoolVec<T>,
    tmp: PoolVec<T>,
    v: PoolVec<T>,
    m: PoolVec<T>,
    o: PoolVec<T>,
}

impl<T: Real> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            pad: PoolVec::default(),
            d: PoolVec::default(),
            tmp: PoolVec::default(),
            v: PoolVec::default(),
            m: PoolVec::default(),
            o: PoolVec::default(),
        }
    }
}

/// The first `len` elements of a scratch buffer (contents unspecified: callers overwrite).
fn sized<T: Real>(v: &mut PoolVec<T>, len: usize) -> &mut [T] {
    v.sized(len)
}

/// Tiles per block: V and M of one block near the L2 cache.
fn block_tiles(c_in: usize, c_out: usize, total: usize) -> usize {
    let budget = 256 * 1024; // elements of V + M (1 MiB in f32: half an L2)
    let per = XI * (c_in + c_out);
    let b = (budget / per).clamp(16, 256) / 16 * 16;
    // Enough blocks for both cores.
    let threads = rayon::current_num_threads().max(1);
    let cap = total.div_ceil(threads * 2).max(16).div_ceil(16) * 16;
    b.min(cap).max(1)
}

/// The forward over transformed weights `u` (`[36][c_out][c_in]`).
fn forward_with<T: Real>(s: &Conv2d, x: &[T], u: &[T], y: &mut [T], ep: Epilogue<'_, T>) {
    let g = Geometry::new(s);
    let total = s.n * g.tiles_per_image();
    let bt = block_tiles(s.c_in, s.c_out, total);
    let (c_in, c_out) = (s.c_in, s.c_out);
    let yp = SyncPtr(y.as_mut_ptr());
    let blocks = total.div_ceil(bt);
    (0..blocks).into_par_iter().for_each_init(
        || (Scratch::<T>::default(), Vec::<Tile>::new()),
        |(sc, tiles), b| {
            let t0 = b * bt;
            let len = bt.min(total - t0);
            tiles.clear();
            tiles.extend((t0..t0 + len).map(|i| g.tile(i)));
            // Rows of V and M padded to a multiple of 16 (the small-product kernel's width).
            let ld = len.div_ceil(16) * 16;
            let d = sized(&mut sc.d, XI * len);
            let tmp = sized(&mut sc.tmp, XI * len);
            let v = sized(&mut sc.v, XI * c_in * ld);
            let pad = sized(&mut sc.pad, A6 * pad_width(&g));
            in_stage(&g, x, tiles, c_in, ld, pad, d, tmp, v);
            let m = sized(&mut sc.m, XI * c_out * ld);
            for xi in 0..XI {
                let a = &u[xi * c_out * c_in..(xi + 1) * c_out * c_in];
                let bm = &v[xi * c_in * ld..(xi + 1) * c_in * ld];
                let dst = &mut m[xi * c_out * ld..(xi + 1) * c_out * ld];
                small_product(c_out, ld, c_in, a, bm, dst);
            }
            let o = sized(&mut sc.o, M4 * M4 * len);
            // SAFETY: yp points at y (n*c_out*h*w elements, the output of this shape); the
            // tiles of different blocks cover disjoint output pixels.
            let pad = sized(&mut sc.pad, A6 * pad_width(&g));
            unsafe { out_stage(&g, m, c_out, ld, tiles, pad, tmp, o, &ep, yp) };
        },
    );
}

/// Gathers and transforms the input tiles of every channel into `v` `[36][c_in][len]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn in_stage_body<T: Real>(
    g: &Geometry,
    x: &[T],
    tiles: &[Tile],
    c_in: usize,
    ld: usize,
    pad: &mut [T],
    d: &mut [T],
    tmp: &mut [T],
    v: &mut [T],
) {
    let len = tiles.len();
    let hw = g.h * g.w;
    for ci in 0..c_in {
        gather(g, ci * hw, c_in * hw, x, tiles, pad, d);
        input_transform(d, tmp, &mut v[ci * ld..], c_in * ld, len);
    }
}
crate::multiversion!(in_stage, in_stage_body, <T: Real>, (
    g: &Geometry, x: &[T], tiles: &[Tile], c_in: usize, ld: usize, pad: &mut [T], d: &mut [T],
    tmp: &mut [T], v: &mut [T]
));

/// `c = a . b` for one transform position: row-major `a` (m x k), `b` (k x n), `c` (m x n).
fn small_product<T: Real>(m: usize, n: usize, k: usize, a: &[T], b: &[T], c: &mut [T]) {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32 (checked just above), so the slices are f32 slices.
        let (a32, b32, c32) = unsafe {
            (
                std::slice::from_raw_parts(a.as_ptr() as *const f32, a.len()),
                std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len()),
                std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, c.len()),
            )
        };
        if matmul_f32_rowmajor_small(m, n, k, a32, b32, c32) {
            return;
        }
    }
    // Shapes are consistent by construction.
    let _ = matmul(
        MatMut::new(c, m, n),
        Mat::new(a, m, k),
        Mat::new(b, k, n),
        false,
        Par::Seq,
    );
}

/// Output transform of every channel of `m` `[36][c_out][len]`, epilogue, and the write
/// into the output tiles (clipped at the border).
///
/// # Safety
/// `yp` must point at an output of `n * c_out * h * w` elements that no one else writes
/// at these tiles' pixels meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn out_stage_body<T: Real>(
    g: &Geometry,
    m: &[T],
    c_out: usize,
    ld: usize,
    tiles: &[Tile],
    pad: &mut [T],
    tmp: &mut [T],
    o: &mut [T],
    ep: &Epilogue<'_, T>,
    yp: SyncPtr<T>,
) {
    let len = tiles.len();
    let hw = g.h * g.w;
    let rb = &mut pad[..M4 * g.tw + 8];
    for co in 0..c_out {
        output_transform(&m[co * ld..], c_out * ld, tmp, o, len);
        let (a, b) = match ep.affine {
            Some((a, b)) => (a[co], b[co]),
            None => (T::one(), T::zero()),
        };
        for (l0, l1) in runs(tiles) {
            let t0 = tiles[l0];
            let n = l1 - l0;
            let plane = (t0.img * c_out + co) * hw;
            let cnt = (M4 * n).min(g.w - t0.ox);
            for p in 0..M4.min(g.h - t0.oy) {
                // Interleave the run's four columns of output row p into one image row.
                let src: [&[T]; 4] = rows(&o[p * M4 * len + l0..], len, n);
                for (l, q) in rb[..M4 * n].chunks_exact_mut(M4).enumerate() {
                    q[0] = src[0][l];
                    q[1] = src[1][l];
                    q[2] = src[2][l];
                    q[3] = src[3][l];
                }
                let row = plane + (t0.oy + p) * g.w + t0.ox;
                // SAFETY: see the function's contract; [row, row + cnt) is inside the plane.
                let out = unsafe { std::slice::from_raw_parts_mut(yp.get().add(row), cnt) };
                let vals = &rb[..cnt];
                match (ep.residual, ep.relu) {
                    (None, false) => {
                        for (y, v) in out.iter_mut().zip(vals) {
                            *y = *v * a + b;
                        }
                    }
                    (None, true) => {
                        for (y, v) in out.iter_mut().zip(vals) {
                            *y = (*v * a + b).max(T::zero());
                        }
                    }
                    (Some(r), relu) => {
                        let r = &r[row..row + cnt];
                        for ((y, v), rv) in out.iter_mut().zip(vals).zip(r) {
                            let z = *v * a + b + *rv;
                            *y = if relu { z.max(T::zero()) } else { z };
                        }
                    }
                }
            }
        }
    }
}

/// [`out_stage_body`] for the processor's widest instruction set.
///
/// # Safety
/// As [`out_stage_body`].
#[allow(clippy::too_many_arguments)]
unsafe fn out_stage<T: Real>(
    g: &Geometry,
    m: &[T],
    c_out: usize,
    ld: usize,
    tiles: &[Tile],
    pad: &mut [T],
    tmp: &mut [T],
    o: &mut [T],
    ep: &Epilogue<'_, T>,
    yp: SyncPtr<T>,
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn inl<T: Real>(
        g: &Geometry,
        m: &[T],
        c_out: usize,
        ld: usize,
        tiles: &[Tile],
        pad: &mut [T],
        tmp: &mut [T],
        o: &mut [T],
        ep: &Epilogue<'_, T>,
        yp: SyncPtr<T>,
    ) {
        // SAFETY: forwarded from out_stage's contract.
        unsafe { out_stage_body(g, m, c_out, ld, tiles, pad, tmp, o, ep, yp) }
    }
    crate::multiversion!(run, inl, <T: Real>, (
        g: &Geometry, m: &[T], c_out: usize, ld: usize, tiles: &[Tile], pad: &mut [T],
        tmp: &mut [T], o: &mut [T], ep: &Epilogue<'_, T>, yp: SyncPtr<T>
    ));
    run(g, m, c_out, ld, tiles, pad, tmp, o, ep, yp)
}

/// `dM = A dy A^T` of every output channel's tiles into `m` `[36][c_out][len]` (dy zero
/// outside the image).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dy_stage_body<T: Real>(
    g: &Geometry,
    dy: &[T],
    c_out: usize,
    tiles: &[Tile],
    pad: &mut [T],
    tmp: &mut [T],
    o: &mut [T],
    m: &mut [T],
) {
    let len = tiles.len();
    let hw = g.h * g.w;
    let rb = &mut pad[..M4 * g.tw + 8];
    for co in 0..c_out {
        for (l0, l1) in runs(tiles) {
            let t0 = tiles[l0];
            let n = l1 - l0;
            let plane = (t0.img * c_out + co) * hw;
            let cnt = (M4 * n).min(g.w - t0.ox);
            for p_ in 0..M4 {
                let yy = t0.oy + p_;
                if yy < g.h {
                    let row = plane + yy * g.w + t0.ox;
                    rb[..cnt].copy_from_slice(&dy[row..row + cnt]);
                    rb[cnt..M4 * n].fill(T::zero());
                } else {
                    rb[..M4 * n].fill(T::zero());
                }
                let dst: [&mut [T]; 4] = rows_mut(&mut o[p_ * M4 * len + l0..], len, n);
                let [d0, d1, d2, d3] = dst;
                for (l, q) in rb[..M4 * n].chunks_exact(M4).enumerate() {
                    d0[l] = q[0];
                    d1[l] = q[1];
                    d2[l] = q[2];
                    d3[l] = q[3];
                }
            }
        }
        // Along rows: tmp[p][j] = sum_q A[j][q] o[p][q]  (4 rows -> 6 columns).
        for p_ in 0..M4 {
            a_vec(
                &o[p_ * M4 * len..],
                len,
                &mut tmp[p_ * A6 * len..],
                len,
                len,
            );
        }
        // Along columns: m[i][j] = sum_p A[i][p] tmp[p][j].
        for j in 0..A6 {
            a_vec(
                &tmp[j * len..],
                A6 * len,
                &mut m[(j * c_out + co) * len..],
                A6 * c_out * len,
                len,
            );
        }
    }
}
crate::multiversion!(dy_stage, dy_stage_body, <T: Real>, (
    g: &Geometry, dy: &[T], c_out: usize, tiles: &[Tile], pad: &mut [T], tmp: &mut [T],
    o: &mut [T], m: &mut [T]
));

/// y = conv3x3(x, w) (stride 1, pad 1), with an optional fused epilogue. Lengths must have
/// been checked by the caller.
pub fn conv3x3_fwd<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T], ep: Epilogue<'_, T>) {
    debug_assert!(applies(s));
    let mut ub = PoolVec::<T>::default();
    let u = ub.sized(XI * s.c_out * s.c_in);
    transform_weights(w, s.c_out, s.c_in, false, u);
    forward_with(s, x, u, y, ep);
}

/// dx = conv_transpose(dy, w): the same convolution of dy with flipped, transposed kernels.
pub fn conv3x3_bwd_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T]) {
    debug_assert!(applies(s));
    let mut ub = PoolVec::<T>::default();
    let u = ub.sized(XI * s.c_in * s.c_out);
    transform_weights(w, s.c_out, s.c_in, true, u);
    let st = Conv2d {
        c_in: s.c_out,
        c_out: s.c_in,
        ..*s
    };
    forward_with(&st, dy, u, dx, Epilogue::none());
}

/// Fixed number of partial sums of the weight gradient (independent of the thread count,
/// so results do not depend on scheduling).
const WGRAD_PARTS: usize = 4;

/// dw = sum over the batch of x (*) dy, by Winograd: `dU_xi = (A dy A^T)_xi . V_xi^T`
/// summed over tiles, then `dw = G^T dU G`.
pub fn conv3x3_bwd_weight<T: Real>(s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T]) {
    debug_assert!(applies(s));
    let g = Geometry::new(s);
    let total = s.n * g.tiles_per_image();
    let (c_in, c_out) = (s.c_in, s.c_out);
    let bt = block_tiles(c_in, c_out, total);
    let blocks = total.div_ceil(bt);
    let per_part = blocks.div_ceil(WGRAD_PARTS).max(1);
    let du_len = XI * c_out * c_in;
    let parts: Vec<PoolVec<T>> = (0..blocks.div_ceil(per_part))
        .into_par_iter()
        .map(|p| {
            let mut dub = PoolVec::<T>::default();
            let du = dub.zeroed(du_len);
            let mut sc = Scratch::<T>::default();
            let mut tiles = Vec::new();
            for b in p * per_part..((p + 1) * per_part).min(blocks) {
                let t0 = b * bt;
                let len = bt.min(total - t0);
                tiles.clear();
                tiles.extend((t0..t0 + len).map(|i| g.tile(i)));
                let d = sized(&mut sc.d, XI * len);
                let tmp = sized(&mut sc.tmp, XI * len);
                let v = sized(&mut sc.v, XI * c_in * len);
                let pad = sized(&mut sc.pad, A6 * pad_width(&g));
                in_stage(&g, x, &tiles, c_in, len, pad, d, tmp, v);
                let m = sized(&mut sc.m, XI * c_out * len);
                let o = sized(&mut sc.o, M4 * M4 * len);
                let pad = sized(&mut sc.pad, A6 * pad_width(&g));
                dy_stage(&g, dy, c_out, &tiles, pad, tmp, o, m);
                for xi in 0..XI {
                    let dm = Mat::new(&m[xi * c_out * len..(xi + 1) * c_out * len], c_out, len);
                    let vt = Mat::new(&v[xi * c_in * len..(xi + 1) * c_in * len], c_in, len).t();
                    let dst = MatMut::new(
                        &mut du[xi * c_out * c_in..(xi + 1) * c_out * c_in],
                        c_out,
                        c_in,
                    );
                    let _ = matmul(dst, dm, vt, true, Par::Seq);
                }
            }
            dub
        })
        .collect();
    // Sum the partials in order, then dw = G^T dU G per kernel.
    let mut parts = parts.into_iter();
    let mut dub = parts.next().unwrap_or_else(|| {
        let mut z = PoolVec::<T>::default();
        z.zeroed(du_len);
        z
    });
    let du = dub.sized(du_len);
    for mut part in parts {
        for (a, b) in du.iter_mut().zip(part.sized(du_len).iter()) {
            *a = *a + *b;
        }
    }
    let du = &*du;
    let plane = c_out * c_in;
    dw.par_chunks_mut(c_in * 9).enumerate().for_each_init(
        || (vec![T::zero(); 18 * c_in], vec![T::zero(); 9 * c_in]),
        |(tmp, out), (co, dwc)| weight_grad_row(&du[co * c_in..], plane, tmp, out, dwc, c_in),
    );
}
