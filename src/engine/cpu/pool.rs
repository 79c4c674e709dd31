//! Max pooling (forward, and a backward that routes each gradient to the first maximum of
//! its window in row-major order) and global average pooling. Padding counts as -inf.
//! Parallel over the `n*c` planes. Knows only shapes.

use rayon::prelude::*;

use crate::engine::shapes::Pool2d;
use crate::engine::{Real, Result};

/// The clipped input range `[lo, hi)` of each output position along one axis.
/// [`Pool2d::check`] guarantees every range is non-empty.
fn windows(s: &Pool2d, input: usize, output: usize) -> Vec<(usize, usize)> {
    (0..output)
        .map(|o| {
            let lo = (o * s.stride).saturating_sub(s.pad);
            let hi = (o * s.stride + s.k - s.pad).min(input);
            (lo, hi)
        })
        .collect()
}

/// max that lets a NaN win, as PyTorch's max pooling does.
#[inline]
fn nan_max<T: Real>(a: T, b: T) -> T {
    // Non-short-circuit `|` keeps this a select (no branch), so loops over it vectorise.
    #[allow(clippy::eq_op)]
    let take = (b > a) | (b != b);
    if take {
        b
    } else {
        a
    }
}

/// Flat index into the plane of the first maximum of a window, in row-major order (a NaN
/// wins and stays).
fn argmax<T: Real>(
    plane: &[T],
    w: usize,
    (y0, y1): (usize, usize),
    (x0, x1): (usize, usize),
) -> usize {
    let mut bi = y0 * w + x0;
    let mut best = plane[bi];
    for iy in y0..y1 {
        for ix in x0..x1 {
            let v = plane[iy * w + ix];
            if v > best || (v.is_nan() && !best.is_nan()) {
                best = v;
                bi = iy * w + ix;
            }
        }
    }
    bi
}

/// Forward, separably: the max over each row's horizontal windows, then over the vertical
/// windows of those (contiguous, so it vectorises).
pub fn maxpool2d_fwd<T: Real>(s: &Pool2d, x: &[T], y: &mut [T]) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    if oh * ow == 0 || s.h * s.w == 0 {
        return Ok(());
    }
    let (ry, rx) = (windows(s, s.h, oh), windows(s, s.w, ow));
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(s.h * s.w))
        .for_each_init(Vec::new, |hmax, (yp, xp)| {
            hmax.resize(s.h * ow, T::zero());
            pool_plane(s.w, ow, &rx, &ry, xp, hmax, yp);
        });
    Ok(())
}

/// One plane of the forward: row maxima into `hmax` `[h][ow]`, then vertical maxima.
#[inline(always)]
fn pool_plane_body<T: Real>(
    w: usize,
    ow: usize,
    rx: &[(usize, usize)],
    ry: &[(usize, usize)],
    xp: &[T],
    hmax: &mut [T],
    yp: &mut [T],
) {
    for (row, hrow) in xp.chunks(w).zip(hmax.chunks_mut(ow)) {
        for (o, &(x0, x1)) in hrow.iter_mut().zip(rx) {
            *o = row[x0 + 1..x1].iter().fold(row[x0], |m, v| nan_max(m, *v));
        }
    }
    for (out, &(y0, y1)) in yp.chunks_mut(ow).zip(ry) {
        out.copy_from_slice(&hmax[y0 * ow..(y0 + 1) * ow]);
        for hrow in hmax[(y0 + 1) * ow..y1 * ow].chunks(ow) {
            for (o, v) in out.iter_mut().zip(hrow) {
                *o = nan_max(*o, *v);
            }
        }
    }
}
crate::multiversion!(pool_plane, pool_plane_body, <T: Real>, (
    w: usize, ow: usize, rx: &[(usize, usize)], ry: &[(usize, usize)], xp: &[T],
    hmax: &mut [T], yp: &mut [T]
));

/// Backward: each dy goes to the first element of its window (row-major) that equals the
/// forward's output there, which is the first maximum; if `y` does not match `x` (not the
/// forward's output), the maximum is searched for directly.
pub fn maxpool2d_bwd<T: Real>(s: &Pool2d, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    let (oh, ow) = (s.out_h(), s.out_w());
    if s.h * s.w == 0 {
        return Ok(());
    }
    dx.fill(T::zero());
    if oh * ow == 0 {
        return Ok(());
    }
    let (ry, rx) = (windows(s, s.h, oh), windows(s, s.w, ow));
    dx.par_chunks_mut(s.h * s.w)
        .zip(x.par_chunks(s.h * s.w))
        .zip(y.par_chunks(oh * ow).zip(dy.par_chunks(oh * ow)))
        .for_each(|((dxp, xp), (yp, dyp))| {
            for (oy, &wy) in ry.iter().enumerate() {
                for (ox, &wx) in rx.iter().enumerate() {
                    let target = yp[oy * ow + ox];
                    let hit = (wy.0..wy.1).find_map(|iy| {
                        let row = &xp[iy * s.w + wx.0..iy * s.w + wx.1];
                        let j = if target.is_nan() {
                            row.iter().position(|v| v.is_nan())
                        } else {
                            row.iter().position(|v| *v == target)
                        };
                        j.map(|j| iy * s.w + wx.0 + j)
                    });
                    let i = hit.unwrap_or_else(|| argmax(xp, s.w, wy, wx));
                    dxp[i] = dxp[i] + dyp[oy * ow + ox];
                }
            }
        });
    Ok(())
}

/// `y[i] = mean of x[i, 0..hw]`.
pub fn global_avg_pool_fwd<T: Real>(hw: usize, x: &[T], y: &mut [T]) -> Result<()> {
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::one);
    y.par_iter_mut().zip(x.par_chunks(hw)).for_each(|(o, xr)| {
        *o = xr.iter().copied().sum::<T>() * inv;
    });
    Ok(())
}

/// `dx[i, p] = dy[i] / hw`.
pub fn global_avg_pool_bwd<T: Real>(hw: usize, dy: &[T], dx: &mut [T]) -> Result<()> {
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::one);
    dx.par_chunks_mut(hw)
        .zip(dy.par_iter())
        .for_each(|(dr, g)| dr.fill(*g * inv));
    Ok(())
}
