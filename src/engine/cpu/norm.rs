//! Batch normalisation over `[n, c, hw]` (statistics per channel), training and eval forward
//! and the training backward, each with an optional fused ReLU on the output. Running
//! statistics follow PyTorch: `running = (1 - momentum) * running + momentum * batch`, with
//! the unbiased batch variance there and the biased one for normalising.
//!
//! Statistics are accumulated in f64 (cheap next to the memory traffic, and it keeps f32
//! batch statistics exact enough at large n*hw). Knows nothing about layers.

use rayon::prelude::*;

use crate::engine::shapes::BatchNorm2d;
use crate::engine::{check_len, EngineError, Real, Result};

fn check_params<T>(op: &'static str, s: &BatchNorm2d, per_channel: &[(&str, &[T])]) -> Result<()> {
    for (what, b) in per_channel {
        check_len(op, what, b.len(), s.c)?;
    }
    if !s.eps.is_finite() || s.eps <= 0.0 {
        return Err(EngineError::Shape {
            op,
            detail: format!("eps must be positive, got {}", s.eps),
        });
    }
    Ok(())
}

/// Sum over the `n` planes of channel `ch` of `f(plane_a, plane_b)`.
fn channel_sum<T: Real>(
    s: &BatchNorm2d,
    ch: usize,
    a: &[T],
    b: &[T],
    f: impl Fn(&[T], &[T]) -> f64,
) -> f64 {
    (0..s.n)
        .map(|i| {
            let o = (i * s.c + ch) * s.hw;
            f(&a[o..o + s.hw], &b[o..o + s.hw])
        })
        .sum()
}

/// Writes `y = max?(x * scale[ch] + shift[ch])` plane by plane.
fn affine<T: Real>(s: &BatchNorm2d, x: &[T], scale: &[T], shift: &[T], y: &mut [T], relu: bool) {
    if s.hw == 0 {
        return;
    }
    y.par_chunks_mut(s.hw)
        .zip(x.par_chunks(s.hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let ch = p % s.c;
            let (a, b) = (scale[ch], shift[ch]);
            if relu {
                for (o, v) in yp.iter_mut().zip(xp) {
                    *o = (*v * a + b).max(T::zero());
                }
            } else {
                for (o, v) in yp.iter_mut().zip(xp) {
                    *o = *v * a + b;
                }
            }
        });
}

/// Training-mode forward; see [`crate::engine::Backend::batchnorm_train_fwd`].
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
    relu: bool,
) -> Result<()> {
    const OP: &str = "batchnorm_train_fwd";
    check_len(OP, "x", x.len(), s.len())?;
    check_len(OP, "y", y.len(), s.len())?;
    check_params(
        OP,
        s,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("save_mean", save_mean),
            ("save_invstd", save_invstd),
        ],
    )?;
    let count = s.n * s.hw;
    if count < 2 {
        return Err(EngineError::Shape {
            op: OP,
            detail: format!("training needs more than one value per channel, got n*hw = {count}"),
        });
    }
    let stats: Vec<(f64, f64)> = (0..s.c)
        .into_par_iter()
        .map(|ch| {
            let sum = channel_sum(s, ch, x, x, |a, _| a.iter().map(|v| v.as_f64()).sum());
            let mean = sum / count as f64;
            let ss = channel_sum(s, ch, x, x, |a, _| {
                a.iter()
                    .map(|v| {
                        let d = v.as_f64() - mean;
                        d * d
                    })
                    .sum()
            });
            (mean, ss / count as f64)
        })
        .collect();
    let m = s.momentum;
    let unbias = 1.0;
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
    affine(s, x, &scale, &shift, y, relu);
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
    const OP: &str = "batchnorm_eval_fwd";
    check_len(OP, "x", x.len(), s.len())?;
    check_len(OP, "y", y.len(), s.len())?;
    check_params(
        OP,
        s,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    let mut scale = vec![T::zero(); s.c];
    let mut shift = vec![T::zero(); s.c];
    for ch in 0..s.c {
        let g = gamma[ch].as_f64() / (running_var[ch].as_f64() + s.eps).sqrt();
        scale[ch] = T::from_f64_lossy(g);
        shift[ch] = T::from_f64_lossy(beta[ch].as_f64() - running_mean[ch].as_f64() * g);
    }
    affine(s, x, &scale, &shift, y, relu);
    Ok(())
}

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
    const OP: &str = "batchnorm_bwd";
    for (what, b) in [("x", x), ("y", y), ("dy", dy)] {
        check_len(OP, what, b.len(), s.len())?;
    }
    check_len(OP, "dx", dx.len(), s.len())?;
    check_params(
        OP,
        s,
        &[
            ("gamma", gamma),
            ("save_mean", save_mean),
            ("save_invstd", save_invstd),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
        ],
    )?;
    let count = (s.n * s.hw) as f64;
    // The gradient reaching the normalised output: dy, zeroed where the fused ReLU clipped.
    let g_of = |yv: T, dyv: T| {
        if relu && yv <= T::zero() {
            0.0
        } else {
            dyv.as_f64()
        }
    };
    let sums: Vec<(f64, f64)> = (0..s.c)
        .into_par_iter()
        .map(|ch| {
            let mean = save_mean[ch].as_f64();
            let invstd = save_invstd[ch].as_f64();
            let mut sg = 0.0;
            let mut sgx = 0.0;
            for i in 0..s.n {
                let r = (i * s.c + ch) * s.hw..(i * s.c + ch + 1) * s.hw;
                for ((xv, yv), dyv) in x[r.clone()].iter().zip(&y[r.clone()]).zip(&dy[r]) {
                    let g = g_of(*yv, *dyv);
                    sg += g;
                    sgx += g * (xv.as_f64() - mean);
                }
            }
            (sg, sgx * invstd)
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
    });
    Ok(())
}
