//! Transposed convolution whose kernel equals its stride (the U-Net's `ConvTranspose2d`
//! 2x2/2), with bias, writing into a channel slice of a wider output buffer.
//!
//! Windows do not overlap, so per image the op is one GEMM and a scatter:
//! `Z[(co, a, b), p] = sum_ci W[ci, (co, a, b)] * x[ci, p]`, then
//! `y[y_offset + co, k*i + a, k*j + b] = Z[(co, a, b), (i, j)] + bias[co]`. The backward
//! gathers the slice of dy into the same layout G, then `dx = W . G`, `dW += x . G^T`
//! (images in order: deterministic) and `db[co]` = the sum of G's rows of `co`.
//! Parallel over images when there are enough of them, otherwise inside the products.
//! Knows only shapes.

use rayon::prelude::*;

use super::bias::sum_f64;
use super::gemm::{matmul, Mat, MatMut, Par};
use crate::engine::shapes::UpConv2d;
use crate::engine::{check_len, EngineError, Real, Result};

/// Rejects shapes the op cannot hold.
pub fn check_shape(op: &'static str, s: &UpConv2d) -> Result<()> {
    let bad = |detail: String| Err(EngineError::Shape { op, detail });
    if s.k == 0 {
        return bad("kernel size must be at least 1".into());
    }
    if s.y_offset
        .checked_add(s.c_out)
        .is_none_or(|e| e > s.y_channels)
    {
        return bad(format!(
            "{} output channels at offset {} do not fit {} channels",
            s.c_out, s.y_offset, s.y_channels
        ));
    }
    Ok(())
}

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
    const OP: &str = "upconv2d_fwd";
    check_shape(OP, s)?;
    check_len(OP, "x", x.len(), s.x_len())?;
    check_len(OP, "w", w.len(), s.w_len())?;
    check_len(OP, "b", b.len(), s.c_out)?;
    check_len(OP, "y", y.len(), s.y_len())?;
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
    const OP: &str = "upconv2d_bwd";
    check_shape(OP, s)?;
    check_len(OP, "x", x.len(), s.x_len())?;
    check_len(OP, "w", w.len(), s.w_len())?;
    check_len(OP, "dy", dy.len(), s.y_len())?;
    check_len(OP, "dx", dx.len(), s.x_len())?;
    check_len(OP, "dw", dw.len(), s.w_len())?;
    check_len(OP, "db", db.len(), s.c_out)?;
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
    // G of every image, then dx per image.
    let mut g = vec![T::zero(); s.n * g_img];
    g.par_chunks_mut(g_img)
        .zip(dy.par_chunks(y_img))
        .for_each(|(gi, dyi)| gather(s, dyi, gi));
    let wm = Mat::new(w, s.c_in, ckk);
    if x_img > 0 {
        let dx_one = |gi: &[T], dxi: &mut [T], par: Par| {
            matmul(
                MatMut::new(dxi, s.c_in, hw),
                wm,
                Mat::new(gi, ckk, hw),
                false,
                par,
            )
        };
        if parallel_images(s.n) {
            dx.par_chunks_mut(x_img)
                .zip(g.par_chunks(g_img))
                .try_for_each(|(dxi, gi)| dx_one(gi, dxi, Par::Seq))?;
        } else {
            for (dxi, gi) in dx.chunks_mut(x_img).zip(g.chunks(g_img)) {
                dx_one(gi, dxi, Par::Rayon)?;
            }
        }
    }
    // dW in image order.
    if x_img > 0 {
        for (gi, xi) in g.chunks(g_img).zip(x.chunks(x_img)) {
            let gt = Mat::new(gi, ckk, hw).t();
            matmul(
                MatMut::new(dw, s.c_in, ckk),
                Mat::new(xi, s.c_in, hw),
                gt,
                true,
                Par::Rayon,
            )?;
        }
    }
    // db: the rows (co, a, b) of every image.
    let rows = s.k * s.k * hw;
    db.par_iter_mut().enumerate().for_each(|(co, d)| {
        let t: f64 = g
            .chunks(g_img)
            .map(|gi| sum_f64(&gi[co * rows..(co + 1) * rows]))
            .sum();
        *d = T::from_f64_lossy(t);
    });
    Ok(())
}
