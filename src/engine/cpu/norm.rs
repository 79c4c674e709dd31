//! Batch normalisation over `[n, c, hw]` (statistics per channel), training and eval forward
//! and the training backward, each with an optional fused ReLU on the output (the training
//! forward also with a residual added before it: a residual block's join). Running
//! statistics follow PyTorch: `running = (1 - momentum) * running + momentum * batch`, with
//! the unbiased batch variance there and the biased one for normalising.
//!
//! Statistics are accumulated in f64 (cheap next to the memory traffic, and it keeps f32
//! batch statistics exact enough at large n*hw). Knows nothing about layers.

use rayon::prelude::*;

use crate::engine::shapes::BatchNorm2d;
use crate::engine::{Real, Result};

/// Elements summed in `T` before the partial sum moves to f64: long enough for SIMD, short
/// enough that f32 rounding stays at the 1e-7 level.
const BLOCK: usize = 1024;
const LANES: usize = 8;

/// Sum of `f(a[i], b[i], c[i])` over equal-length slices: eight independent accumulators
/// in `T` (the compiler vectorises them), folded into f64 every [`BLOCK`] elements.
#[inline(always)]
fn lane_sum<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> f64 {
    let mut total = 0.0;
    for ((ab, bb), cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(c.chunks(BLOCK)) {
        let mut acc = [T::zero(); LANES];
        let n = ab.len() / LANES * LANES;
        for ((ca, cb), cc) in ab[..n]
            .chunks_exact(LANES)
            .zip(bb[..n].chunks_exact(LANES))
            .zip(cb[..n].chunks_exact(LANES))
        {
            for i in 0..LANES {
                acc[i] = acc[i] + f(ca[i], cb[i], cc[i]);
            }
        }
        for ((va, vb), vc) in ab[n..].iter().zip(&bb[n..]).zip(&cb[n..]) {
            acc[0] = acc[0] + f(*va, *vb, *vc);
        }
        total += acc.iter().map(|v| v.as_f64()).sum::<f64>();
    }
    total
}

/// The `n` planes of channel `ch` in a `[n, c, hw]` buffer.
fn planes<'a, T>(s: &BatchNorm2d, ch: usize, a: &'a [T]) -> impl Iterator<Item = &'a [T]> + 'a {
    let (c, hw) = (s.c, s.hw);
    (0..s.n).map(move |i| &a[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

/// Writes `y = max?(x * scale[ch] + shift[ch] (+ residual))` plane by plane, each step
/// rounded on its own (with a residual, what the separate [`super::elementwise::add_relu_fwd`]
/// or `add_assign` after the affine map gives, bit for bit).
fn affine<T: Real>(
    s: &BatchNorm2d,
    x: &[T],
    scale: &[T],
    shift: &[T],
    residual: Option<&[T]>,
    y: &mut [T],
    relu: bool,
) {
    if s.hw == 0 {
        return;
    }
    y.par_chunks_mut(s.hw)
        .zip(x.par_chunks(s.hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let ch = p % s.c;
            match residual {
                None => affine_plane(yp, xp, scale[ch], shift[ch], relu),
                Some(r) => {
                    let rp = &r[p * s.hw..(p + 1) * s.hw];
                    affine_res_plane(yp, xp, rp, scale[ch], shift[ch], relu)
                }
            }
        });
}

#[inline(always)]
fn affine_plane_body<T: Real>(yp: &mut [T], xp: &[T], a: T, b: T, relu: bool) {
    if relu {
        for (o, v) in yp.iter_mut().zip(xp) {
            *o = (*v * a + b).max(T::zero());
        }
    } else {
        for (o, v) in yp.iter_mut().zip(xp) {
            *o = *v * a + b;
        }
    }
}
crate::multiversion!(affine_plane, affine_plane_body, <T: Real>, (
    yp: &mut [T], xp: &[T], a: T, b: T, relu: bool
));

#[inline(always)]
fn affine_res_plane_body<T: Real>(yp: &mut [T], xp: &[T], rp: &[T], a: T, b: T, relu: bool) {
    if relu {
        for ((o, v), r) in yp.iter_mut().zip(xp).zip(rp) {
            *o = ((*v * a + b) + *r).max(T::zero());
        }
    } else {
        for ((o, v), r) in yp.iter_mut().zip(xp).zip(rp) {
            *o = (*v * a + b) + *r;
        }
    }
}
crate::multiversion!(affine_res_plane, affine_res_plane_body, <T: Real>, (
    yp: &mut [T], xp: &[T], rp: &[T], a: T, b: T, relu: bool
));

/// (mean, biased variance) of channel `ch`.
#[inline(always)]
fn channel_stats_body<T: Real>(s: &BatchNorm2d, ch: usize, x: &[T], count: usize) -> (f64, f64) {
    let sum: f64 = planes(s, ch, x)
        .map(|p| lane_sum(p, p, p, |v, _, _| v))
        .sum();
    let mean = sum / count as f64;
    // Two passes: the sum of squared deviations does not cancel like E[x^2] - mean^2.
    let mt = T::from_f64_lossy(mean);
    let ss: f64 = planes(s, ch, x)
        .map(|p| lane_sum(p, p, p, |v, _, _| (v - mt) * (v - mt)))
        .sum();
    (mean, ss / count as f64)
}

fn channel_stats<T: Real>(s: &BatchNorm2d, ch: usize, x: &[T], count: usize) -> (f64, f64) {
    #[inline(always)]
    fn inner<T: Real>(s: &BatchNorm2d, ch: usize, x: &[T], count: usize, out: &mut (f64, f64)) {
        *out = channel_stats_body(s, ch, x, count);
    }
    crate::multiversion!(run, inner, <T: Real>, (
        s: &BatchNorm2d, ch: usize, x: &[T], count: usize, out: &mut (f64, f64)
    ));
    let mut out = (0.0, 0.0);
    run(s, ch, x, count, &mut out);
    out
}

/// Training-mode forward; see [`crate::engine::Backend::batchnorm_train_fwd`]. With a
/// `residual` (x's shape) the output is `act(bn(x) + residual)`, the residual join of
/// [`crate::engine::Backend::conv2d_bn_train_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_fwd<T: Real>(
    s: &BatchNorm2d,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &mut [T],
    running_var: &mut [T],
    save_mean: &mut [T],
    save_invstd: &mut [T],
    y: &mut [T],
    residual: Option<&[T]>,
    relu: bool,
) -> Result<()> {
    let count = s.n * s.hw;
    let stats: Vec<(f64, f64)> = (0..s.c)
        .into_par_iter()
        .map(|ch| channel_stats(s, ch, x, count))
        .collect();
    let m = s.momentum;
    let unbias = count as f64 / (count as f64 - 1.0);
    let mut scale = vec![T::zero(); s.c];
    let mut shift = vec![T::zero(); s.c];
    for (ch, &(mean, var)) in stats.iter().enumerate() {
        let invstd = 1.0 / (var + s.eps).sqrt();
        save_mean[ch] = T::from_f64_lossy(mean);
        save_invstd[ch] = T::from_f64_lossy(invstd);
        running_mean[ch] = T::from_f64_lossy((1.0 - m) * running_mean[ch].as_f64() + m * mean);
        running_var[ch] =
            T::from_f64_lossy((1.0 - m) * running_var[ch].as_f64() + m * var * unbias);
        let g = gamma[ch].as_f64() * invstd;
        scale[ch] = T::from_f64_lossy(g);
        shift[ch] = T::from_f64_lossy(beta[ch].as_f64() - mean * g);
    }
    affine(s, x, &scale, &shift, residual, y, relu);
    Ok(())
}

/// Eval-mode forward with the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_fwd<T: Real>(
    s: &BatchNorm2d,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    y: &mut [T],
    relu: bool,
) -> Result<()> {
    let (scale, shift) = eval_scale_shift(s, gamma, beta, running_mean, running_var)?;
    affine(s, x, &scale, &shift, None, y, relu);
    Ok(())
}

/// The eval-mode normalisation as a per-channel affine map `x * scale + shift` (what
/// [`batchnorm_eval_fwd`] applies, and what a fused convolution folds into its output).
pub fn eval_scale_shift<T: Real>(
    s: &BatchNorm2d,
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    let mut scale = vec![T::zero(); s.c];
    let mut shift = vec![T::zero(); s.c];
    for ch in 0..s.c {
        let g = gamma[ch].as_f64() / (running_var[ch].as_f64() + s.eps).sqrt();
        scale[ch] = T::from_f64_lossy(g);
        shift[ch] = T::from_f64_lossy(beta[ch].as_f64() - running_mean[ch].as_f64() * g);
    }
    Ok((scale, shift))
}

/// Per channel: (sum of g, sum of g * (x - mean)), g being dy masked by the fused ReLU.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_sums_body<T: Real>(
    s: &BatchNorm2d,
    ch: usize,
    x: &[T],
    y: &[T],
    dy: &[T],
    mean: T,
    relu: bool,
    out: &mut (f64, f64),
) {
    let zero = T::zero();
    let (mut sg, mut sgx) = (0.0, 0.0);
    for ((xp, yp), dyp) in planes(s, ch, x)
        .zip(planes(s, ch, y))
        .zip(planes(s, ch, dy))
    {
        // The gradient reaching the normalised output: dy, zeroed where the fused
        // ReLU clipped (selects, not branches, so the loop still vectorises).
        let g = |yv: T, d: T| if relu && yv <= zero { zero } else { d };
        sg += lane_sum(yp, dyp, dyp, |yv, d, _| g(yv, d));
        sgx += lane_sum(yp, dyp, xp, |yv, d, xv| g(yv, d) * (xv - mean));
    }
    *out = (sg, sgx);
}
crate::multiversion!(bwd_sums, bwd_sums_body, <T: Real>, (
    s: &BatchNorm2d, ch: usize, x: &[T], y: &[T], dy: &[T], mean: T, relu: bool,
    out: &mut (f64, f64)
));

/// Backward of the training-mode forward (y is used only to mask dy when `relu`).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_bwd<T: Real>(
    s: &BatchNorm2d,
    x: &[T],
    y: &[T],
    dy: &[T],
    gamma: &[T],
    save_mean: &[T],
    save_invstd: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    relu: bool,
) -> Result<()> {
    let count = (s.n * s.hw) as f64;
    let sums: Vec<(f64, f64)> = (0..s.c)
        .into_par_iter()
        .map(|ch| {
            let mut out = (0.0, 0.0);
            bwd_sums(s, ch, x, y, dy, save_mean[ch], relu, &mut out);
            (out.0, out.1 * save_invstd[ch].as_f64())
        })
        .collect();
    // dx = gamma*invstd * (g - mean(g) - xhat * mean(g*xhat)), rewritten per channel as
    // dx = a*g + b*(x - mean) + c so that the element loop runs in T without conversions.
    let mut coef = vec![(T::zero(), T::zero(), T::zero(), T::zero()); s.c];
    for (ch, &(sg, sgx)) in sums.iter().enumerate() {
        dbeta[ch] = T::from_f64_lossy(sg);
        dgamma[ch] = T::from_f64_lossy(sgx);
        let invstd = save_invstd[ch].as_f64();
        let k = gamma[ch].as_f64() * invstd;
        let (mean_g, mean_gx) = (sg / count, sgx / count);
        let b = -k * invstd * mean_gx;
        coef[ch] = (
            T::from_f64_lossy(k),
            T::from_f64_lossy(b),
            T::from_f64_lossy(-k * mean_g),
            save_mean[ch],
        );
    }
    if s.hw == 0 {
        return Ok(());
    }
    dx.par_chunks_mut(s.hw).enumerate().for_each(|(pl, dxp)| {
        let (a, b, c, mean) = coef[pl % s.c];
        let r = pl * s.hw..(pl + 1) * s.hw;
        let (xp, yp, dyp) = (&x[r.clone()], &y[r.clone()], &dy[r]);
        bwd_plane(dxp, xp, yp, dyp, [a, b, c, mean], relu);
    });
    Ok(())
}

#[inline(always)]
fn bwd_plane_body<T: Real>(dxp: &mut [T], xp: &[T], yp: &[T], dyp: &[T], k: [T; 4], relu: bool) {
    let [a, b, c, mean] = k;
    if relu {
        for (((d, xv), yv), g) in dxp.iter_mut().zip(xp).zip(yp).zip(dyp) {
            let g = if *yv > T::zero() { *g } else { T::zero() };
            *d = a * g + b * (*xv - mean) + c;
        }
    } else {
        for ((d, xv), g) in dxp.iter_mut().zip(xp).zip(dyp) {
            *d = a * *g + b * (*xv - mean) + c;
        }
    }
}
crate::multiversion!(bwd_plane, bwd_plane_body, <T: Real>, (
    dxp: &mut [T], xp: &[T], yp: &[T], dyp: &[T], k: [T; 4], relu: bool
));
