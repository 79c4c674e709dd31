//! 2-D convolution without bias (forward, backward-data, backward-weight) as GEMMs.
//!
//! Forward: im2col, then `y = W . col` (M = c_out, N = output pixels, K = c_in*kh*kw).
//! Data gradient: `dcol = W^T . dy`, then col2im. Weight gradient: `dW += dy . col^T`.
//! A large image is cut into tiles of output rows (the column buffer stays near the cache);
//! small images (deep layers) are grouped so that each product still has at least
//! `MIN_COLS` columns, because every product repacks the weights and a thin one would
//! spend its time packing. A 1x1 stride-1 unpadded convolution of one image is a plain GEMM
//! on the image itself.
//!
//! Parallel over chunks of images with single-threaded products when there are enough
//! chunks for every core, otherwise chunk by chunk with the product split over the cores.
//! Knows only NCHW shapes.

use rayon::prelude::*;

use super::gemm::{matmul, Mat, MatMut, Par};
use super::scratch::PoolVec;
use super::winograd::{self, Epilogue};
use crate::engine::shapes::Conv2d;
use crate::engine::{check_len, Real, Result};

/// Elements of one im2col tile to aim for (1 MiB in f32, about an L2 cache).
const TILE_ELEMS: usize = 256 * 1024;
/// Fewest columns (output pixels) per product worth the repacking of the weights.
const MIN_COLS: usize = 512;

/// 0: not decided yet (read `ICHCAM_CONV`), 1: Winograd where it pays, 2: direct only.
static WINOGRAD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns the Winograd path on or off for the whole process (benchmarks compare the two).
pub fn set_winograd(enabled: bool) {
    WINOGRAD.store(
        if enabled { 1 } else { 2 },
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Whether this pass runs by Winograd ([`winograd`]): f32 only (the f64 reference stays on
/// the direct product), 3x3 stride 1 pad 1, enough tiles to pay for the weight transform.
/// `ICHCAM_CONV=direct` in the environment (or [`set_winograd`]) turns it off.
pub fn use_winograd<T: Real>(s: &Conv2d) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let mut mode = WINOGRAD.load(Relaxed);
    if mode == 0 {
        let off = std::env::var("ICHCAM_CONV").is_ok_and(|v| v == "direct");
        mode = if off { 2 } else { 1 };
        WINOGRAD.store(mode, Relaxed);
    }
    mode == 1
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && winograd::worth_it(s)
}

/// [`use_winograd`] for the weight gradient (a narrower range of shapes pays).
pub fn use_winograd_wgrad<T: Real>(s: &Conv2d) -> bool {
    use_winograd::<T>(s) && winograd::worth_it_wgrad(s)
}

fn is_pointwise(s: &Conv2d) -> bool {
    s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == 0
}

/// How a pass splits its work.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Images per chunk (the last chunk may have fewer).
    group: usize,
    /// Output rows per tile when a chunk holds one image.
    tile_rows: usize,
    /// Chunks in parallel with single-threaded products (else products split over cores).
    parallel: bool,
}

fn plan(s: &Conv2d) -> Plan {
    let k = s.c_in * s.kh * s.kw;
    let (oh, ow) = (s.out_h().max(1), s.out_w().max(1));
    let ohw = oh * ow;
    let threads = rayon::current_num_threads();
    let tile_rows = (TILE_ELEMS / (k * ow).max(1))
        .max(MIN_COLS.div_ceil(ow))
        .clamp(1, oh);
    // Images a product needs to reach MIN_COLS columns.
    let want = MIN_COLS.div_ceil(ohw).max(1);
    if want == 1 {
        return Plan {
            group: 1,
            tile_rows,
            parallel: threads > 1 && s.n >= threads,
        };
    }
    if threads > 1 && s.n >= threads * want {
        // Equal chunks, a whole number of them per thread.
        let per_thread = s.n / (threads * want);
        let group = s.n.div_ceil(threads * per_thread);
        Plan {
            group,
            tile_rows,
            parallel: true,
        }
    } else {
        Plan {
            group: want.min(s.n).max(1),
            tile_rows,
            parallel: false,
        }
    }
}

/// The range of output columns `ox` whose input column `ox*stride + kx - pad` is inside [0, w).
fn valid_ox(s: &Conv2d, kx: usize, ow: usize) -> (usize, usize) {
    // ix = ox*stride + kx - pad >= 0  <=>  ox >= ceil((pad - kx) / stride)
    let lo = if kx >= s.pad {
        0
    } else {
        (s.pad - kx).div_ceil(s.stride)
    };
    // ix <= w - 1  <=>  ox <= (w - 1 + pad - kx) / stride
    let hi = if s.w + s.pad > kx {
        ((s.w - 1 + s.pad - kx) / s.stride + 1).min(ow)
    } else {
        0
    };
    (lo.min(ow), hi.max(lo.min(ow)))
}

/// `dst[i] = src[i * stride]`; the common stride 2 through fixed-size chunks (so it
/// vectorises, unlike a `step_by` iterator).
#[inline(always)]
fn strided_copy<T: Real>(src: &[T], stride: usize, dst: &mut [T]) {
    let n = dst.len();
    if stride == 2 {
        let full = n.min(src.len() / 2);
        for (o, p) in dst[..full].iter_mut().zip(src[..2 * full].chunks_exact(2)) {
            *o = p[0];
        }
        for (i, o) in dst.iter_mut().enumerate().skip(full) {
            *o = src[2 * i];
        }
    } else {
        for (i, o) in dst.iter_mut().enumerate() {
            *o = src[i * stride];
        }
    }
}

/// `dst[i * stride] += src[i]` for i < n (the adjoint of [`strided_copy`]).
#[inline(always)]
fn strided_add<T: Real>(src: &[T], dst: &mut [T], stride: usize, n: usize) {
    let n = n.min(src.len());
    if stride == 2 {
        let full = n.min(dst.len() / 2);
        for (p, v) in dst[..2 * full].chunks_exact_mut(2).zip(&src[..full]) {
            p[0] = p[0] + *v;
        }
        for i in full..n {
            dst[2 * i] = dst[2 * i] + src[i];
        }
    } else {
        for (i, v) in src[..n].iter().enumerate() {
            dst[i * stride] = dst[i * stride] + *v;
        }
    }
}

/// col[(ci*kh + ky)*kw + kx, (oy - oy0)*ow + ox] = x[ci, oy*stride + ky - pad, ox*stride + kx - pad]
/// (0 outside the image), rows of `col` `ld` elements apart.
#[inline(always)]
fn im2col_body<T: Real>(s: &Conv2d, x: &[T], oy0: usize, oy1: usize, col: &mut [T], ld: usize) {
    let ow = s.out_w();
    let cols = (oy1 - oy0) * ow;
    let mut row = 0;
    for ci in 0..s.c_in {
        let plane = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let dst = &mut col[row * ld..row * ld + cols];
                let (lo, hi) = valid_ox(s, kx, ow);
                for oy in oy0..oy1 {
                    let d = &mut dst[(oy - oy0) * ow..(oy - oy0 + 1) * ow];
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    if iy < 0 || iy >= s.h as isize {
                        d.fill(T::zero());
                        continue;
                    }
                    let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                    d[..lo].fill(T::zero());
                    d[hi..].fill(T::zero());
                    if lo < hi {
                        let ix0 = lo * s.stride + kx - s.pad;
                        if s.stride == 1 {
                            d[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                        } else {
                            strided_copy(&src[ix0..], s.stride, &mut d[lo..hi]);
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

crate::multiversion!(im2col, im2col_body, <T: Real>, (
    s: &Conv2d, x: &[T], oy0: usize, oy1: usize, col: &mut [T], ld: usize
));

/// dx[ci, iy, ix] += col[...]: the adjoint of [`im2col`] (same layout, same `ld`).
#[inline(always)]
fn col2im_add_body<T: Real>(
    s: &Conv2d,
    col: &[T],
    oy0: usize,
    oy1: usize,
    dx: &mut [T],
    ld: usize,
) {
    let ow = s.out_w();
    let mut row = 0;
    for ci in 0..s.c_in {
        let plane = &mut dx[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let src_row = &col[row * ld..];
                let (lo, hi) = valid_ox(s, kx, ow);
                for oy in oy0..oy1 {
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    if iy < 0 || iy >= s.h as isize || lo >= hi {
                        continue;
                    }
                    let c = &src_row[(oy - oy0) * ow + lo..(oy - oy0) * ow + hi];
                    let d = &mut plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                    let ix0 = lo * s.stride + kx - s.pad;
                    if s.stride == 1 {
                        for (o, v) in d[ix0..ix0 + (hi - lo)].iter_mut().zip(c) {
                            *o = *o + *v;
                        }
                    } else {
                        strided_add(c, &mut d[ix0..], s.stride, hi - lo);
                    }
                }
                row += 1;
            }
        }
    }
}

crate::multiversion!(col2im_add, col2im_add_body, <T: Real>, (
    s: &Conv2d, col: &[T], oy0: usize, oy1: usize, dx: &mut [T], ld: usize
));

/// Per-thread buffers: the column matrix and a `[c_out, cols]` staging matrix.
struct Scratch<T: Real> {
    col: PoolVec<T>,
    stage: PoolVec<T>,
}

impl<T: Real> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            col: PoolVec::default(),
            stage: PoolVec::default(),
        }
    }
}

/// The first `len` elements of a scratch buffer (contents unspecified: callers overwrite).
fn sized<T: Real>(v: &mut PoolVec<T>, len: usize) -> &mut [T] {
    v.sized(len)
}

/// `stage[co, j*ohw + p] = per_image[j][co, p]`: several images side by side as one matrix.
fn gather<T: Real>(per_image: &[T], c: usize, ohw: usize, stage: &mut [T]) {
    let g = per_image.len() / (c * ohw);
    let ld = g * ohw;
    for (j, img) in per_image.chunks(c * ohw).enumerate() {
        for (ch, src) in img.chunks(ohw).enumerate() {
            stage[ch * ld + j * ohw..ch * ld + (j + 1) * ohw].copy_from_slice(src);
        }
    }
}

/// The inverse of [`gather`].
fn scatter<T: Real>(stage: &[T], c: usize, ohw: usize, per_image: &mut [T]) {
    let g = per_image.len() / (c * ohw);
    let ld = g * ohw;
    for (j, img) in per_image.chunks_mut(c * ohw).enumerate() {
        for (ch, dst) in img.chunks_mut(ohw).enumerate() {
            dst.copy_from_slice(&stage[ch * ld + j * ohw..ch * ld + (j + 1) * ohw]);
        }
    }
}

/// Runs `f(chunk of x-side images, chunk of y-side images, scratch, par)` over the plan's
/// chunks, in parallel or in turn; `a` is split mutably (the pass's output).
fn for_chunks<T: Real>(
    p: Plan,
    a: &mut [T],
    a_img: usize,
    b: &[T],
    b_img: usize,
    f: impl Fn(&mut [T], &[T], &mut Scratch<T>, Par) -> Result<()> + Sync,
) -> Result<()> {
    if p.parallel {
        a.par_chunks_mut(p.group * a_img)
            .zip(b.par_chunks(p.group * b_img))
            .try_for_each_init(Scratch::default, |sc, (ac, bc)| f(ac, bc, sc, Par::Seq))
    } else {
        let mut sc = Scratch::default();
        for (ac, bc) in a.chunks_mut(p.group * a_img).zip(b.chunks(p.group * b_img)) {
            f(ac, bc, &mut sc, Par::Rayon)?;
        }
        Ok(())
    }
}

/// y for a chunk of images.
fn fwd_chunk<T: Real>(
    s: &Conv2d,
    p: Plan,
    x: &[T],
    w: &[T],
    y: &mut [T],
    sc: &mut Scratch<T>,
    par: Par,
) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let ohw = oh * ow;
    let k = s.c_in * s.kh * s.kw;
    let wm = Mat::new(w, s.c_out, k);
    let g = x.len() / (s.c_in * s.h * s.w);
    if g > 1 {
        let ld = g * ohw;
        let col = sized(&mut sc.col, k * ld);
        for (j, xj) in x.chunks(s.c_in * s.h * s.w).enumerate() {
            im2col(s, xj, 0, oh, &mut col[j * ohw..], ld);
        }
        let stage = sized(&mut sc.stage, s.c_out * ld);
        matmul(
            MatMut::new(stage, s.c_out, ld),
            wm,
            Mat::new(col, k, ld),
            false,
            par,
        )?;
        scatter(stage, s.c_out, ohw, y);
        return Ok(());
    }
    if is_pointwise(s) {
        return matmul(
            MatMut::new(y, s.c_out, ohw),
            wm,
            Mat::new(x, k, ohw),
            false,
            par,
        );
    }
    let mut oy0 = 0;
    while oy0 < oh {
        let oy1 = (oy0 + p.tile_rows).min(oh);
        let cols = (oy1 - oy0) * ow;
        let col = sized(&mut sc.col, k * cols);
        im2col(s, x, oy0, oy1, col, cols);
        let dst = MatMut::strided(&mut y[oy0 * ow..], s.c_out, cols, ohw, 1);
        matmul(dst, wm, Mat::new(col, k, cols), false, par)?;
        oy0 = oy1;
    }
    Ok(())
}

/// y = conv(x, w).
pub fn conv2d_fwd<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T]) -> Result<()> {
    conv2d_fwd_fused(s, x, w, y, Epilogue::none())
}

/// Applies `ep` to `y`, a run of whole images of the output starting at element `at` of
/// it (`plane` = out_h*out_w, `c` output channels).
fn apply_epilogue<T: Real>(ep: &Epilogue<'_, T>, c: usize, plane: usize, at: usize, y: &mut [T]) {
    if ep.affine.is_none() && ep.residual.is_none() && !ep.relu {
        return;
    }
    for (pi, yp) in y.chunks_mut(plane).enumerate() {
        let ch = (at / plane + pi) % c;
        let (a, b) = match ep.affine {
            Some((a, b)) => (a[ch], b[ch]),
            None => (T::one(), T::zero()),
        };
        let off = at + pi * plane;
        match ep.residual {
            Some(r) => {
                let r = &r[off..off + yp.len()];
                for (v, rv) in yp.iter_mut().zip(r) {
                    let z = *v * a + b + *rv;
                    *v = if ep.relu { z.max(T::zero()) } else { z };
                }
            }
            None => {
                for v in yp.iter_mut() {
                    let z = *v * a + b;
                    *v = if ep.relu { z.max(T::zero()) } else { z };
                }
            }
        }
    }
}

/// `y = act(conv(x, w) * scale[c] + shift[c] + residual)` (each part optional, see
/// [`Epilogue`]), the epilogue applied to each chunk of images while it is in the cache.
pub fn conv2d_fwd_fused<T: Real>(
    s: &Conv2d,
    x: &[T],
    w: &[T],
    y: &mut [T],
    ep: Epilogue<'_, T>,
) -> Result<()> {
    const OP: &str = "conv2d_fwd";
    if let Some((a, b)) = ep.affine {
        check_len(OP, "scale", a.len(), s.c_out)?;
        check_len(OP, "shift", b.len(), s.c_out)?;
    }
    if let Some(r) = ep.residual {
        check_len(OP, "residual", r.len(), s.y_len())?;
    }
    let xi = s.c_in * s.h * s.w;
    let plane = s.out_h() * s.out_w();
    let yi = s.c_out * plane;
    if s.n == 0 || yi == 0 {
        return Ok(());
    }
    if xi == 0 {
        y.fill(T::zero());
        apply_epilogue(&ep, s.c_out, plane, 0, y);
        return Ok(());
    }
    if use_winograd::<T>(s) {
        winograd::conv3x3_fwd(s, x, w, y, ep);
        return Ok(());
    }
    let p = plan(s);
    let base = y.as_ptr() as usize;
    for_chunks(p, y, yi, x, xi, |yc, xc, sc, par| {
        fwd_chunk(s, p, xc, w, yc, sc, par)?;
        let at = (yc.as_ptr() as usize - base) / std::mem::size_of::<T>();
        apply_epilogue(&ep, s.c_out, plane, at, yc);
        Ok(())
    })
}

/// dx for a chunk of images.
fn bwd_data_chunk<T: Real>(
    s: &Conv2d,
    p: Plan,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    sc: &mut Scratch<T>,
    par: Par,
) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let ohw = oh * ow;
    let k = s.c_in * s.kh * s.kw;
    let wt = Mat::new(w, s.c_out, k).t();
    let g = dy.len() / (s.c_out * ohw);
    if g > 1 {
        let ld = g * ohw;
        let stage = sized(&mut sc.stage, s.c_out * ld);
        gather(dy, s.c_out, ohw, stage);
        let col = sized(&mut sc.col, k * ld);
        matmul(
            MatMut::new(col, k, ld),
            wt,
            Mat::new(stage, s.c_out, ld),
            false,
            par,
        )?;
        dx.fill(T::zero());
        for (j, dxj) in dx.chunks_mut(s.c_in * s.h * s.w).enumerate() {
            col2im_add(s, &col[j * ohw..], 0, oh, dxj, ld);
        }
        return Ok(());
    }
    if is_pointwise(s) {
        return matmul(
            MatMut::new(dx, k, ohw),
            wt,
            Mat::new(dy, s.c_out, ohw),
            false,
            par,
        );
    }
    dx.fill(T::zero());
    let mut oy0 = 0;
    while oy0 < oh {
        let oy1 = (oy0 + p.tile_rows).min(oh);
        let cols = (oy1 - oy0) * ow;
        let dyt = Mat::strided(&dy[oy0 * ow..], s.c_out, cols, ohw, 1);
        let col = sized(&mut sc.col, k * cols);
        matmul(MatMut::new(col, k, cols), wt, dyt, false, par)?;
        col2im_add(s, col, oy0, oy1, dx, cols);
        oy0 = oy1;
    }
    Ok(())
}

/// dx = conv_transpose(dy, w).
pub fn conv2d_bwd_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T]) -> Result<()> {
    let xi = s.c_in * s.h * s.w;
    let yi = s.c_out * s.out_h() * s.out_w();
    if s.n == 0 || xi == 0 {
        return Ok(());
    }
    if yi == 0 {
        dx.fill(T::zero());
        return Ok(());
    }
    if use_winograd::<T>(s) {
        winograd::conv3x3_bwd_data(s, dy, w, dx);
        return Ok(());
    }
    let p = plan(s);
    for_chunks(p, dx, xi, dy, yi, |dxc, dyc, sc, par| {
        bwd_data_chunk(s, p, dyc, w, dxc, sc, par)
    })
}

/// dw += sum over a chunk of images of x (*) dy.
fn bwd_weight_chunk<T: Real>(
    s: &Conv2d,
    p: Plan,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    sc: &mut Scratch<T>,
    par: Par,
) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let ohw = oh * ow;
    let k = s.c_in * s.kh * s.kw;
    let g = x.len() / (s.c_in * s.h * s.w);
    if g > 1 {
        let ld = g * ohw;
        let col = sized(&mut sc.col, k * ld);
        for (j, xj) in x.chunks(s.c_in * s.h * s.w).enumerate() {
            im2col(s, xj, 0, oh, &mut col[j * ohw..], ld);
        }
        let stage = sized(&mut sc.stage, s.c_out * ld);
        gather(dy, s.c_out, ohw, stage);
        let colt = Mat::new(&*col, k, ld).t();
        return matmul(
            MatMut::new(dw, s.c_out, k),
            Mat::new(stage, s.c_out, ld),
            colt,
            true,
            par,
        );
    }
    if is_pointwise(s) {
        let xt = Mat::new(x, k, ohw).t();
        return matmul(
            MatMut::new(dw, s.c_out, k),
            Mat::new(dy, s.c_out, ohw),
            xt,
            true,
            par,
        );
    }
    let mut oy0 = 0;
    while oy0 < oh {
        let oy1 = (oy0 + p.tile_rows).min(oh);
        let cols = (oy1 - oy0) * ow;
        let col = sized(&mut sc.col, k * cols);
        im2col(s, x, oy0, oy1, col, cols);
        let dyt = Mat::strided(&dy[oy0 * ow..], s.c_out, cols, ohw, 1);
        let colt = Mat::new(&*col, k, cols).t();
        matmul(MatMut::new(dw, s.c_out, k), dyt, colt, true, par)?;
        oy0 = oy1;
    }
    Ok(())
}

/// dw = sum over the batch of x (*) dy.
pub fn conv2d_bwd_weight<T: Real>(s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T]) -> Result<()> {
    dw.fill(T::zero());
    let xi = s.c_in * s.h * s.w;
    let yi = s.c_out * s.out_h() * s.out_w();
    if s.n == 0 || xi == 0 || yi == 0 {
        return Ok(());
    }
    if use_winograd_wgrad::<T>(s) {
        winograd::conv3x3_bwd_weight(s, x, dy, dw);
        return Ok(());
    }
    let p = plan(s);
    let chunks = x.chunks(p.group * xi).zip(dy.chunks(p.group * yi));
    if p.parallel {
        // A fixed number of contiguous blocks of chunks, each folded in order into its own
        // partial dW, the partials then summed in block order: the result does not depend
        // on rayon's scheduling (a try_fold would group by work stealing, and training runs
        // would differ in the last bits from run to run).
        const BLOCKS: usize = 8;
        let chunks: Vec<_> = chunks.collect();
        let per = chunks.len().div_ceil(BLOCKS).max(1);
        let wl = dw.len();
        let partials: Vec<Vec<T>> = chunks
            .par_chunks(per)
            .map(|block| {
                let mut acc = vec![T::zero(); wl];
                let mut sc = Scratch::default();
                for &(xc, dyc) in block {
                    bwd_weight_chunk(s, p, xc, dyc, &mut acc, &mut sc, Par::Seq)?;
                }
                Ok(acc)
            })
            .collect::<Result<_>>()?;
        for part in partials {
            for (d, v) in dw.iter_mut().zip(&part) {
                *d = *d + *v;
            }
        }
    } else {
        let mut sc = Scratch::default();
        for (xc, dyc) in chunks {
            bwd_weight_chunk(s, p, xc, dyc, dw, &mut sc, Par::Rayon)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ox_matches_brute_force() {
        for &(w, pad, stride, k) in &[
            (5, 1, 1, 3),
            (7, 3, 2, 7),
            (4, 0, 2, 1),
            (6, 2, 3, 5),
            (1, 1, 1, 3),
        ] {
            let s = Conv2d {
                n: 1,
                c_in: 1,
                h: w,
                w,
                c_out: 1,
                kh: k,
                kw: k,
                stride,
                pad,
            };
            let ow = s.out_w();
            for kx in 0..k {
                let inside: Vec<usize> = (0..ow)
                    .filter(|&ox| {
                        let ix = (ox * stride + kx) as isize - pad as isize;
                        ix >= 0 && ix < w as isize
                    })
                    .collect();
                let (lo, hi) = valid_ox(&s, kx, ow);
                assert_eq!(
                    inside,
                    (lo..hi).collect::<Vec<_>>(),
                    "w {w} pad {pad} stride {stride} kx {kx}"
                );
            }
        }
    }
}
