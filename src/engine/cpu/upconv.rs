//! Transposed convolution whose kernel equals its stride (the U-Net's `ConvTranspose2d`
//! 2x2/2), with bias, writing into a channel slice of a wider output buffer.
//!
//! Windows do not overlap, so per image the op is one GEMM and a scatter:
//! `Z[(co, a, b), p] = sum_ci W[ci, (co, a, b)] * x[ci, p]`, then
//! `y[y_offset + co, k*i + a, k*j + b] = Z[(co, a, b), (i, j)] + bias[co]`. The backward
//! gathers one image's slice of dy into the same layout G, then `dx = W . G`,
//! `dW += x . G^T` and `db[co]` += the sum of G's rows of `co`. Parallel over fixed blocks of
//! images (partials summed in block order: deterministic) when there are enough images,
//! otherwise inside the products.
//! Knows only shapes.

use rayon::prelude::*;

use super::bias::sum_f64;
use super::gemm::{matmul, Mat, MatMut, Par};
use crate::engine::shapes::UpConv2d;
use crate::engine::{Real, Result};

/// The plane of output rows `(co, a, b)` of image `img` of y, scattered from/to `z`.
fn scatter_add_bias<T: Real>(s: &UpConv2d, z: &[T], bias: &[T], y_img: &mut [T]) {
    let (k, h, w) = (s.k, s.h, s.w);
    let (ow, plane) = (s.out_w(), s.out_h() * s.out_w());
    let hw = h * w;
    for co in 0..s.c_out {
        let yp = &mut y_img[(s.y_offset + co) * plane..(s.y_offset + co + 1) * plane];
        let bv = bias[co];
        for a in 0..k {
            for b in 0..k {
                let zr = &z[((co * k + a) * k + b) * hw..((co * k + a) * k + b + 1) * hw];
                for i in 0..h {
                    let row = &mut yp[(k * i + a) * ow..(k * i + a + 1) * ow];
                    for (o, v) in row[b..].iter_mut().step_by(k).zip(&zr[i * w..(i + 1) * w]) {
                        *o = *v + bv;
                    }
                }
            }
        }
    }
}

/// The inverse layout: g[(co, a, b), (i, j)] = dy[y_offset + co, k*i + a, k*j + b].
fn gather<T: Real>(s: &UpConv2d, dy_img: &[T], g: &mut [T]) {
    let (k, h, w) = (s.k, s.h, s.w);
    let (ow, plane) = (s.out_w(), s.out_h() * s.out_w());
    let hw = h * w;
    for co in 0..s.c_out {
        let yp = &dy_img[(s.y_offset + co) * plane..(s.y_offset + co + 1) * plane];
        for a in 0..k {
            for b in 0..k {
                let gr = &mut g[((co * k + a) * k + b) * hw..((co * k + a) * k + b + 1) * hw];
                for i in 0..h {
                    let row = &yp[(k * i + a) * ow..(k * i + a + 1) * ow];
                    for (o, v) in gr[i * w..(i + 1) * w]
                        .iter_mut()
                        .zip(row[b..].iter().step_by(k))
                    {
                        *o = *v;
                    }
                }
            }
        }
    }
}

fn parallel_images(n: usize) -> bool {
    let t = rayon::current_num_threads();
    t > 1 && n >= t
}

/// Forward; see [`crate::engine::Backend::upconv2d_fwd`].
pub fn upconv2d_fwd<T: Real>(s: &UpConv2d, x: &[T], w: &[T], b: &[T], y: &mut [T]) -> Result<()> {
    let hw = s.h * s.w;
    let ckk = s.c_out * s.k * s.k;
    let (x_img, y_img) = (s.c_in * hw, s.y_channels * s.out_h() * s.out_w());
    if s.n == 0 || y_img == 0 || ckk == 0 {
        return Ok(());
    }
    let wt = Mat::new(w, s.c_in, ckk).t();
    let one = |xi: &[T], yi: &mut [T], z: &mut Vec<T>, par: Par| -> Result<()> {
        z.resize(ckk * hw, T::zero());
        if s.c_in == 0 {
            z.fill(T::zero());
        } else {
            matmul(
                MatMut::new(z, ckk, hw),
                wt,
                Mat::new(xi, s.c_in, hw),
                false,
                par,
            )?;
        }
        scatter_add_bias(s, z, b, yi);
        Ok(())
    };
    if parallel_images(s.n) {
        y.par_chunks_mut(y_img)
            .enumerate()
            .try_for_each_init(Vec::new, |z, (i, yi)| {
                one(&x[i * x_img..(i + 1) * x_img], yi, z, Par::Seq)
            })
    } else {
        let mut z = Vec::new();
        for (i, yi) in y.chunks_mut(y_img).enumerate() {
            one(&x[i * x_img..(i + 1) * x_img], yi, &mut z, Par::Rayon)?;
        }
        Ok(())
    }
}

/// Backward; see [`crate::engine::Backend::upconv2d_bwd`].
#[allow(clippy::too_many_arguments)]
pub fn upconv2d_bwd<T: Real>(
    s: &UpConv2d,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
) -> Result<()> {
    let hw = s.h * s.w;
    let ckk = s.c_out * s.k * s.k;
    let (x_img, y_img) = (s.c_in * hw, s.y_channels * s.out_h() * s.out_w());
    dw.fill(T::zero());
    db.fill(T::zero());
    let g_img = ckk * hw;
    if s.n == 0 || g_img == 0 {
        dx.fill(T::zero());
        return Ok(());
    }
    let wm = Mat::new(w, s.c_in, ckk);
    let rows = s.k * s.k * hw;
    // One image: G, dx = W . G, dW_acc += x . G^T, db_acc[co] += the sum of G's rows of co.
    let one = |i: usize,
               dxi: &mut [T],
               g: &mut Vec<T>,
               dw_acc: &mut [T],
               db_acc: &mut [f64],
               par: Par|
     -> Result<()> {
        g.resize(g_img, T::zero());
        gather(s, &dy[i * y_img..(i + 1) * y_img], g);
        if x_img > 0 {
            let gm = Mat::new(g.as_slice(), ckk, hw);
            matmul(MatMut::new(dxi, s.c_in, hw), wm, gm, false, par)?;
            let xi = Mat::new(&x[i * x_img..(i + 1) * x_img], s.c_in, hw);
            matmul(MatMut::new(dw_acc, s.c_in, ckk), xi, gm.t(), true, par)?;
        }
        for (co, d) in db_acc.iter_mut().enumerate() {
            *d += sum_f64(&g[co * rows..(co + 1) * rows]);
        }
        Ok(())
    };
    let mut db64 = vec![0.0f64; s.c_out];
    if parallel_images(s.n) && x_img > 0 {
        // A fixed number of blocks of images, each folded in order into its own partial dW
        // and db, the partials then summed in block order: the result does not depend on
        // rayon's scheduling.
        const BLOCKS: usize = 8;
        let per = s.n.div_ceil(BLOCKS);
        let wl = dw.len();
        let partials: Vec<(Vec<T>, Vec<f64>)> = dx
            .par_chunks_mut(per * x_img)
            .enumerate()
            .map(|(bi, dxb)| {
                let (mut pw, mut pb, mut g) = (vec![T::zero(); wl], vec![0.0; s.c_out], Vec::new());
                let first = bi * per;
                for i in first..(first + per).min(s.n) {
                    let dxi = &mut dxb[(i - first) * x_img..(i - first + 1) * x_img];
                    one(i, dxi, &mut g, &mut pw, &mut pb, Par::Seq)?;
                }
                Ok((pw, pb))
            })
            .collect::<Result<_>>()?;
        for (pw, pb) in partials {
            for (d, v) in dw.iter_mut().zip(&pw) {
                *d = *d + *v;
            }
            for (d, v) in db64.iter_mut().zip(&pb) {
                *d += v;
            }
        }
    } else {
        let mut g = Vec::new();
        for i in 0..s.n {
            let dxi = if x_img > 0 {
                &mut dx[i * x_img..(i + 1) * x_img]
            } else {
                &mut []
            };
            one(i, dxi, &mut g, dw, &mut db64, Par::Rayon)?;
        }
    }
    for (d, v) in db.iter_mut().zip(&db64) {
        *d = T::from_f64_lossy(*v);
    }
    Ok(())
}
