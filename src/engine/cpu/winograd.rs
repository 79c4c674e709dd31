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

use super::gemm::{matmul, Mat, MatMut, Par};
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

/// Whether Winograd beats the direct product for this shape: the per-call weight transform
/// (36 / 9 = 4x the weights) must be paid back by enough tiles.
pub fn worth_it(s: &Conv2d) -> bool {
    if !applies(s) || s.n == 0 || s.c_in < 4 || s.c_out < 4 {
        return false;
    }
    let tiles = s.n * s.h.div_ceil(M4) * s.w.div_ceil(M4);
    // Measured on the ResNet stages (docs/perf.md): a win from about 64 tiles at 64
    // channels; the weight transform grows with c_in*c_out, the savings with tiles.
    tiles >= 64 && tiles * 8 >= s.c_in.max(s.c_out)
}

fn t<T: Real>(v: f64) -> T {
    T::from_f64_lossy(v)
}

/// A raw pointer that may cross threads: blocks write disjoint output tiles of one buffer.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

/// `out_i = sum_y G[i][y] in_y` over vectors: the 1-D kernel transform, 3 -> 6.
#[inline(always)]
fn g_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (q, s6, s12, s24) = (
        t::<T>(0.25),
        t::<T>(1.0 / 6.0),
        t::<T>(1.0 / 12.0),
        t::<T>(1.0 / 24.0),
    );
    for l in 0..len {
        let k0 = src[l];
        let k1 = src[ss + l];
        let k2 = src[2 * ss + l];
        let (e, o) = (k0 + k2, k1);
        dst[l] = q * k0;
        dst[ds + l] = -s6 * (e + o);
        dst[2 * ds + l] = s6 * (o - e);
        dst[3 * ds + l] = s24 * k0 + s12 * k1 + s6 * k2;
        dst[4 * ds + l] = s24 * k0 - s12 * k1 + s6 * k2;
        dst[5 * ds + l] = k2;
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
    for l in 0..len {
        let u0 = src[l];
        let u1 = src[ss + l];
        let u2 = src[2 * ss + l];
        let u3 = src[3 * ss + l];
        let u4 = src[4 * ss + l];
        let u5 = src[5 * ss + l];
        dst[l] = q * u0 - s6 * (u1 + u2) + s24 * (u3 + u4);
        dst[ds + l] = s6 * (u2 - u1) + s12 * (u3 - u4);
        dst[2 * ds + l] = s6 * (u3 + u4 - u1 - u2) + u5;
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
            let up = up;
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
                        up.0.add(xi * plane + r * cols),
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
    for l in 0..len {
        let d0 = src[l];
        let d1 = src[ss + l];
        let d2 = src[2 * ss + l];
        let d3 = src[3 * ss + l];
        let d4 = src[4 * ss + l];
        let d5 = src[5 * ss + l];
        dst[l] = c4 * d0 - c5 * d2 + d4;
        dst[ds + l] = d3 + d4 - c4 * (d1 + d2);
        dst[2 * ds + l] = c4 * (d1 - d2) + d4 - d3;
        dst[3 * ds + l] = c2 * (d3 - d1) + d4 - d2;
        dst[4 * ds + l] = c2 * (d1 - d3) + d4 - d2;
        dst[5 * ds + l] = c4 * d1 - c5 * d3 + d5;
    }
}

/// `out_k = sum_j A^T[k][j] in_j`: the 1-D output transform, 6 -> 4.
#[inline(always)]
fn at_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (c2, c4, c8) = (t::<T>(2.0), t::<T>(4.0), t::<T>(8.0));
    for l in 0..len {
        let m0 = src[l];
        let m1 = src[ss + l];
        let m2 = src[2 * ss + l];
        let m3 = src[3 * ss + l];
        let m4 = src[4 * ss + l];
        let m5 = src[5 * ss + l];
        let (p12, n12, p34, n34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        dst[l] = m0 + p12 + p34;
        dst[ds + l] = n12 + c2 * n34;
        dst[2 * ds + l] = p12 + c4 * p34;
        dst[3 * ds + l] = n12 + c8 * n34 + m5;
    }
}

/// `out_k = sum_j A[k][j] in_j` (A = (A^T)^T, 4 -> 6): the adjoint of [`at_vec`], for the
/// weight gradient's transform of dy.
#[inline(always)]
fn a_vec<T: Real>(src: &[T], ss: usize, dst: &mut [T], ds: usize, len: usize) {
    let (c2, c4, c8) = (t::<T>(2.0), t::<T>(4.0), t::<T>(8.0));
    for l in 0..len {
        let y0 = src[l];
        let y1 = src[ss + l];
        let y2 = src[2 * ss + l];
        let y3 = src[3 * ss + l];
        let (a, b) = (y1 + y3, y2);
        let (p, q) = (c2 * y1 + c8 * y3, c4 * y2);
        dst[l] = y0;
        dst[ds + l] = y0 + a + b;
        dst[2 * ds + l] = y0 - a + b;
        dst[3 * ds + l] = y0 + p + q;
        dst[4 * ds + l] = y0 - p + q;
        dst[5 * ds + l] = y3;
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
    /// The tile's 6x6 input window lies inside the image (no padding needed).
    fn interior(&self, t: Tile) -> bool {
        t.oy >= 1 && t.ox >= 1 && t.oy + 5 <= self.h && t.ox + 5 <= self.w
    }
}

/// Gathers the 6x6 windows (top-left at (oy-1, ox-1), zero outside) of the tiles of one
/// channel plane into `d[36][len]`.
#[inline(always)]
fn gather<T: Real>(
    g: &Geometry,
    plane_of: impl Fn(usize) -> usize,
    x: &[T],
    tiles: &[Tile],
    d: &mut [T],
) {
    let len = tiles.len();
    let (h, w) = (g.h as isize, g.w as isize);
    for (l, &tl) in tiles.iter().enumerate() {
        let base = plane_of(tl.img);
        if g.interior(tl) {
            let o = base + (tl.oy - 1) * g.w + tl.ox - 1;
            for r in 0..A6 {
                let row = &x[o + r * g.w..o + r * g.w + A6];
                for c in 0..A6 {
                    d[(r * A6 + c) * len + l] = row[c];
                }
            }
        } else {
            for r in 0..A6 {
                let iy = tl.oy as isize - 1 + r as isize;
                for c in 0..A6 {
                    let ix = tl.ox as isize - 1 + c as isize;
                    d[(r * A6 + c) * len + l] = if iy >= 0 && iy < h && ix >= 0 && ix < w {
                        x[base + iy as usize * g.w + ix as usize]
                    } else {
                        T::zero()
                    };
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

/// Scratch of one worker.
#[derive(Default)]
struct Scratch<T> {
    d: Vec<T>,
    tmp: Vec<T>,
    v: Vec<T>,
    m: Vec<T>,
    o: Vec<T>,
}

fn sized<T: Real>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::zero());
    }
    &mut v[..len]
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
            let d = sized(&mut sc.d, XI * len);
            let tmp = sized(&mut sc.tmp, XI * len);
            let v = sized(&mut sc.v, XI * c_in * len);
            in_stage(&g, x, tiles, c_in, d, tmp, v);
            let m = sized(&mut sc.m, XI * c_out * len);
            for xi in 0..XI {
                let a = Mat::new(&u[xi * c_out * c_in..(xi + 1) * c_out * c_in], c_out, c_in);
                let bm = Mat::new(&v[xi * c_in * len..(xi + 1) * c_in * len], c_in, len);
                let dst = MatMut::new(&mut m[xi * c_out * len..(xi + 1) * c_out * len], c_out, len);
                // Shapes are consistent by construction.
                let _ = matmul(dst, a, bm, false, Par::Seq);
            }
            let o = sized(&mut sc.o, M4 * M4 * len);
            // SAFETY: yp points at y (n*c_out*h*w elements, the output of this shape); the
            // tiles of different blocks cover disjoint output pixels.
            unsafe { out_stage(&g, m, c_out, tiles, tmp, o, &ep, yp) };
        },
    );
}

/// Gathers and transforms the input tiles of every channel into `v` `[36][c_in][len]`.
#[inline(always)]
fn in_stage_body<T: Real>(
    g: &Geometry,
    x: &[T],
    tiles: &[Tile],
    c_in: usize,
    d: &mut [T],
    tmp: &mut [T],
    v: &mut [T],
) {
    let len = tiles.len();
    let hw = g.h * g.w;
    for ci in 0..c_in {
        gather(g, |img| (img * c_in + ci) * hw, x, tiles, d);
        input_transform(d, tmp, &mut v[ci * len..], c_in * len, len);
    }
}
crate::multiversion!(in_stage, in_stage_body, <T: Real>, (
    g: &Geometry, x: &[T], tiles: &[Tile], c_in: usize, d: &mut [T], tmp: &mut [T], v: &mut [T]
));

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
    tiles: &[Tile],
    tmp: &mut [T],
    o: &mut [T],
    ep: &Epilogue<'_, T>,
    yp: SyncPtr<T>,
) {
    let len = tiles.len();
    let hw = g.h * g.w;
    for co in 0..c_out {
        output_transform(&m[co * len..], c_out * len, tmp, o, len);
        let (sc_, sh) = match ep.affine {
            Some((a, b)) => (a[co], b[co]),
            None => (T::one(), T::zero()),
        };
        for (l, &tl) in tiles.iter().enumerate() {
            let plane = (tl.img * c_out + co) * hw;
            for p in 0..M4.min(g.h - tl.oy) {
                let row = plane + (tl.oy + p) * g.w + tl.ox;
                for q in 0..M4.min(g.w - tl.ox) {
                    let mut val = o[(p * M4 + q) * len + l];
                    if ep.affine.is_some() {
                        val = val * sc_ + sh;
                    }
                    if let Some(r) = ep.residual {
                        val = val + r[row + q];
                    }
                    if ep.relu {
                        val = val.max(T::zero());
                    }
                    // SAFETY: see the function's contract; `row + q` is inside the plane.
                    unsafe { *yp.0.add(row + q) = val };
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
    tiles: &[Tile],
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
        tiles: &[Tile],
        tmp: &mut [T],
        o: &mut [T],
        ep: &Epilogue<'_, T>,
        yp: SyncPtr<T>,
    ) {
        // SAFETY: forwarded from out_stage's contract.
        unsafe { out_stage_body(g, m, c_out, tiles, tmp, o, ep, yp) }
    }
    crate::multiversion!(run, inl, <T: Real>, (
        g: &Geometry, m: &[T], c_out: usize, tiles: &[Tile], tmp: &mut [T], o: &mut [T],
        ep: &Epilogue<'_, T>, yp: SyncPtr<T>
    ));
    run(g, m, c_out, tiles, tmp, o, ep, yp)
}

/// `dM = A dy A^T` of every output channel's tiles into `m` `[36][c_out][len]` (dy zero
/// outside the image).
#[inline(always)]
fn dy_stage_body<T: Real>(
    g: &Geometry,
    dy: &[T],
    c_out: usize,
    tiles: &[Tile],
    tmp: &mut [T],
    o: &mut [T],
    m: &mut [T],
) {
    let len = tiles.len();
    let hw = g.h * g.w;
    for co in 0..c_out {
        for (l, &tl) in tiles.iter().enumerate() {
            let plane = (tl.img * c_out + co) * hw;
            for p_ in 0..M4 {
                for q in 0..M4 {
                    let (yy, xx) = (tl.oy + p_, tl.ox + q);
                    o[(p_ * M4 + q) * len + l] = if yy < g.h && xx < g.w {
                        dy[plane + yy * g.w + xx]
                    } else {
                        T::zero()
                    };
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
    g: &Geometry, dy: &[T], c_out: usize, tiles: &[Tile], tmp: &mut [T], o: &mut [T], m: &mut [T]
));

/// y = conv3x3(x, w) (stride 1, pad 1), with an optional fused epilogue. Lengths must have
/// been checked by the caller.
pub fn conv3x3_fwd<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T], ep: Epilogue<'_, T>) {
    debug_assert!(applies(s));
    let mut u = vec![T::zero(); XI * s.c_out * s.c_in];
    transform_weights(w, s.c_out, s.c_in, false, &mut u);
    forward_with(s, x, &u, y, ep);
}

/// dx = conv_transpose(dy, w): the same convolution of dy with flipped, transposed kernels.
pub fn conv3x3_bwd_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T]) {
    debug_assert!(applies(s));
    let mut u = vec![T::zero(); XI * s.c_in * s.c_out];
    transform_weights(w, s.c_out, s.c_in, true, &mut u);
    let st = Conv2d {
        c_in: s.c_out,
        c_out: s.c_in,
        ..*s
    };
    forward_with(&st, dy, &u, dx, Epilogue::none());
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
    let parts: Vec<Vec<T>> = (0..blocks.div_ceil(per_part))
        .into_par_iter()
        .map(|p| {
            let mut du = vec![T::zero(); du_len];
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
                in_stage(&g, x, &tiles, c_in, d, tmp, v);
                let m = sized(&mut sc.m, XI * c_out * len);
                let o = sized(&mut sc.o, M4 * M4 * len);
                dy_stage(&g, dy, c_out, &tiles, tmp, o, m);
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
            du
        })
        .collect();
    // Sum the partials in order, then dw = G^T dU G per kernel.
    let mut du = vec![T::zero(); du_len];
    for part in &parts {
        for (a, b) in du.iter_mut().zip(part) {
            *a = *a + *b;
        }
    }
    let plane = c_out * c_in;
    dw.par_chunks_mut(c_in * 9).enumerate().for_each_init(
        || (vec![T::zero(); 18 * c_in], vec![T::zero(); 9 * c_in]),
        |(tmp, out), (co, dwc)| weight_grad_row(&du[co * c_in..], plane, tmp, out, dwc, c_in),
    );
}
