//! 2-D convolution without bias (forward, backward-data, backward-weight) as GEMMs:
//! im2col over tiles of output rows (so the column buffer stays in cache), one product per
//! tile, col2im for the data gradient. A 1x1 stride-1 unpadded convolution is a plain GEMM
//! on the image itself.
//!
//! Parallel over images with single-threaded products when the batch can keep every core
//! busy, otherwise images in turn with the product itself split over the cores.
//! Knows only NCHW shapes.

use rayon::prelude::*;

use super::gemm::{matmul, Mat, MatMut, Par};
use crate::engine::shapes::Conv2d;
use crate::engine::{check_len, EngineError, Real, Result};

/// Elements of one im2col tile to aim for (about 256 KiB in f32: an L2-sized working set).
const TILE_ELEMS: usize = 64 * 1024;

/// Rejects shapes for which the output size is undefined (the formulas would underflow).
pub fn check_shape(op: &'static str, s: &Conv2d) -> Result<()> {
    let bad = |detail: String| Err(EngineError::Shape { op, detail });
    if s.stride == 0 {
        return bad("stride must be at least 1".into());
    }
    if s.kh == 0 || s.kw == 0 {
        return bad("kernel size must be at least 1".into());
    }
    if s.kh > s.h + 2 * s.pad || s.kw > s.w + 2 * s.pad {
        return bad(format!(
            "kernel {}x{} larger than the padded input {}x{}",
            s.kh,
            s.kw,
            s.h + 2 * s.pad,
            s.w + 2 * s.pad
        ));
    }
    Ok(())
}

fn is_pointwise(s: &Conv2d) -> bool {
    s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == 0
}

/// Output rows per im2col tile.
fn tile_rows(s: &Conv2d) -> usize {
    let k = s.c_in * s.kh * s.kw;
    let ow = s.out_w().max(1);
    (TILE_ELEMS / (k * ow).max(1)).clamp(1, s.out_h().max(1))
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

/// col[(ci*kh + ky)*kw + kx, (oy - oy0)*ow + ox] = x[ci, oy*stride + ky - pad, ox*stride + kx - pad] (0 outside).
fn im2col<T: Real>(s: &Conv2d, x: &[T], oy0: usize, oy1: usize, col: &mut [T]) {
    let ow = s.out_w();
    let cols = (oy1 - oy0) * ow;
    let mut row = 0;
    for ci in 0..s.c_in {
        let plane = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let dst = &mut col[row * cols..(row + 1) * cols];
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
                            for (o, v) in d[lo..hi]
                                .iter_mut()
                                .zip(src[ix0..].iter().step_by(s.stride))
                            {
                                *o = *v;
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// dx[ci, iy, ix] += col[...]: the adjoint of [`im2col`].
fn col2im_add<T: Real>(s: &Conv2d, col: &[T], oy0: usize, oy1: usize, dx: &mut [T]) {
    let ow = s.out_w();
    let cols = (oy1 - oy0) * ow;
    let mut row = 0;
    for ci in 0..s.c_in {
        let plane = &mut dx[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let src_row = &col[row * cols..(row + 1) * cols];
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
                        for (o, v) in d[ix0..].iter_mut().step_by(s.stride).zip(c) {
                            *o = *o + *v;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// True when the batch alone can keep every rayon thread busy.
fn batch_parallel(n: usize) -> bool {
    n >= rayon::current_num_threads() && rayon::current_num_threads() > 1
}

/// y for one image.
fn fwd_image<T: Real>(
    s: &Conv2d,
    x: &[T],
    w: &[T],
    y: &mut [T],
    col: &mut Vec<T>,
    par: Par,
) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let k = s.c_in * s.kh * s.kw;
    let wm = Mat::new(w, s.c_out, k);
    if is_pointwise(s) {
        return matmul(
            MatMut::new(y, s.c_out, oh * ow),
            wm,
            Mat::new(x, k, oh * ow),
            false,
            par,
        );
    }
    let tr = tile_rows(s);
    col.resize(k * tr * ow, T::zero());
    let mut oy0 = 0;
    while oy0 < oh {
        let oy1 = (oy0 + tr).min(oh);
        let cols = (oy1 - oy0) * ow;
        im2col(s, x, oy0, oy1, &mut col[..k * cols]);
        let dst = MatMut::strided(&mut y[oy0 * ow..], s.c_out, cols, oh * ow, 1);
        matmul(dst, wm, Mat::new(&col[..k * cols], k, cols), false, par)?;
        oy0 = oy1;
    }
    Ok(())
}

/// y = conv(x, w).
pub fn conv2d_fwd<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T]) -> Result<()> {
    const OP: &str = "conv2d_fwd";
    check_shape(OP, s)?;
    check_len(OP, "x", x.len(), s.x_len())?;
    check_len(OP, "w", w.len(), s.w_len())?;
    check_len(OP, "y", y.len(), s.y_len())?;
    let xi = s.c_in * s.h * s.w;
    let yi = s.c_out * s.out_h() * s.out_w();
    if s.n == 0 || yi == 0 {
        return Ok(());
    }
    if xi == 0 {
        y.fill(T::zero());
        return Ok(());
    }
    if batch_parallel(s.n) {
        y.par_chunks_mut(yi)
            .zip(x.par_chunks(xi))
            .try_for_each_init(Vec::new, |col, (yn, xn)| {
                fwd_image(s, xn, w, yn, col, Par::Seq)
            })
    } else {
        let mut col = Vec::new();
        for (yn, xn) in y.chunks_mut(yi).zip(x.chunks(xi)) {
            fwd_image(s, xn, w, yn, &mut col, Par::Rayon)?;
        }
        Ok(())
    }
}

/// dx for one image.
fn bwd_data_image<T: Real>(
    s: &Conv2d,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    col: &mut Vec<T>,
    par: Par,
) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let k = s.c_in * s.kh * s.kw;
    let wt = Mat::new(w, s.c_out, k).t();
    if is_pointwise(s) {
        return matmul(
            MatMut::new(dx, k, oh * ow),
            wt,
            Mat::new(dy, s.c_out, oh * ow),
            false,
            par,
        );
    }
    dx.fill(T::zero());
    let tr = tile_rows(s);
    col.resize(k * tr * ow, T::zero());
    let mut oy0 = 0;
    while oy0 < oh {
        let oy1 = (oy0 + tr).min(oh);
        let cols = (oy1 - oy0) * ow;
        let dyt = Mat::strided(&dy[oy0 * ow..], s.c_out, cols, oh * ow, 1);
        matmul(
            MatMut::new(&mut col[..k * cols], k, cols),
            wt,
            dyt,
            false,
            par,
        )?;
        col2im_add(s, &col[..k * cols], oy0, oy1, dx);
        oy0 = oy1;
    }
    Ok(())
}

/// dx = conv_transpose(dy, w).
pub fn conv2d_bwd_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T]) -> Result<()> {
    const OP: &str = "conv2d_bwd_data";
    check_shape(OP, s)?;
    check_len(OP, "dy", dy.len(), s.y_len())?;
    check_len(OP, "w", w.len(), s.w_len())?;
    check_len(OP, "dx", dx.len(), s.x_len())?;
    let xi = s.c_in * s.h * s.w;
    let yi = s.c_out * s.out_h() * s.out_w();
    if s.n == 0 || xi == 0 {
        return Ok(());
    }
    if yi == 0 {
        dx.fill(T::zero());
        return Ok(());
    }
    if batch_parallel(s.n) {
        dx.par_chunks_mut(xi)
            .zip(dy.par_chunks(yi))
            .try_for_each_init(Vec::new, |col, (dxn, dyn_)| {
                bwd_data_image(s, dyn_, w, dxn, col, Par::Seq)
            })
    } else {
        let mut col = Vec::new();
        for (dxn, dyn_) in dx.chunks_mut(xi).zip(dy.chunks(yi)) {
            bwd_data_image(s, dyn_, w, dxn, &mut col, Par::Rayon)?;
        }
        Ok(())
    }
}

/// dw += x_n (*) dy_n for one image.
fn bwd_weight_image<T: Real>(
    s: &Conv2d,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    col: &mut Vec<T>,
    par: Par,
) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let k = s.c_in * s.kh * s.kw;
    if is_pointwise(s) {
        let xt = Mat::new(x, k, oh * ow).t();
        return matmul(
            MatMut::new(dw, s.c_out, k),
            Mat::new(dy, s.c_out, oh * ow),
            xt,
            true,
            par,
        );
    }
    let tr = tile_rows(s);
    col.resize(k * tr * ow, T::zero());
    let mut oy0 = 0;
    while oy0 < oh {
        let oy1 = (oy0 + tr).min(oh);
        let cols = (oy1 - oy0) * ow;
        im2col(s, x, oy0, oy1, &mut col[..k * cols]);
        let dyt = Mat::strided(&dy[oy0 * ow..], s.c_out, cols, oh * ow, 1);
        let colt = Mat::new(&col[..k * cols], k, cols).t();
        matmul(MatMut::new(dw, s.c_out, k), dyt, colt, true, par)?;
        oy0 = oy1;
    }
    Ok(())
}

/// dw = sum over the batch of x (*) dy.
pub fn conv2d_bwd_weight<T: Real>(s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T]) -> Result<()> {
    const OP: &str = "conv2d_bwd_weight";
    check_shape(OP, s)?;
    check_len(OP, "x", x.len(), s.x_len())?;
    check_len(OP, "dy", dy.len(), s.y_len())?;
    check_len(OP, "dw", dw.len(), s.w_len())?;
    dw.fill(T::zero());
    let xi = s.c_in * s.h * s.w;
    let yi = s.c_out * s.out_h() * s.out_w();
    if s.n == 0 || xi == 0 || yi == 0 {
        return Ok(());
    }
    if batch_parallel(s.n) {
        let wl = dw.len();
        let partials: Vec<Vec<T>> = x
            .par_chunks(xi)
            .zip(dy.par_chunks(yi))
            .try_fold(
                || (vec![T::zero(); wl], Vec::new()),
                |(mut acc, mut col), (xn, dyn_)| {
                    bwd_weight_image(s, xn, dyn_, &mut acc, &mut col, Par::Seq)?;
                    Ok::<_, EngineError>((acc, col))
                },
            )
            .map(|r| r.map(|(acc, _)| acc))
            .collect::<Result<_>>()?;
        for p in partials {
            for (d, v) in dw.iter_mut().zip(&p) {
                *d = *d + *v;
            }
        }
        Ok(())
    } else {
        let mut col = Vec::new();
        for (xn, dyn_) in x.chunks(xi).zip(dy.chunks(yi)) {
            bwd_weight_image(s, xn, dyn_, dw, &mut col, Par::Rayon)?;
        }
        Ok(())
    }
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
