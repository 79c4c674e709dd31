//! Class activation maps: the channel-weighted sum of feature maps (vanilla CAM), Grad-CAM,
//! PyTorch's bilinear resize with `align_corners=False`, and per-row min-max normalisation.
//! Knows nothing about images beyond `[n, h, w]` planes.

use rayon::prelude::*;

use crate::engine::shapes::Resize;
use crate::engine::{Real, Result};

/// `cam[i, p] = sum_c weights[c] * features[i, c, p]`.
pub fn cam_weight<T: Real>(
    c: usize,
    hw: usize,
    features: &[T],
    weights: &[T],
    cam: &mut [T],
) -> Result<()> {
    if hw == 0 {
        return Ok(());
    }
    cam.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
        out.fill(T::zero());
        for (ch, wv) in weights.iter().enumerate() {
            let f = &features[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            for (o, v) in out.iter_mut().zip(f) {
                *o = *o + *wv * *v;
            }
        }
    });
    Ok(())
}

/// alpha[i, c] = mean_p grads[i, c, p]; out[i, p] = max(0, sum_c alpha[i, c] * features[i, c, p]).
pub fn gradcam<T: Real>(
    c: usize,
    hw: usize,
    features: &[T],
    grads: &[T],
    out: &mut [T],
) -> Result<()> {
    if hw == 0 {
        return Ok(());
    }
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::one);
    out.par_chunks_mut(hw).enumerate().for_each(|(i, o)| {
        o.fill(T::zero());
        for ch in 0..c {
            let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
            let alpha = grads[r.clone()].iter().copied().sum::<T>() * inv;
            for (ov, v) in o.iter_mut().zip(&features[r]) {
                *ov = *ov + alpha * *v;
            }
        }
        for ov in o.iter_mut() {
            *ov = ov.max(T::zero());
        }
    });
    Ok(())
}

/// PyTorch's source index and weights along one axis (align_corners=False): the source
/// coordinate `(d + 0.5) * in/out - 0.5` clamped at 0, its floor, the next index (or the
/// same at the border) and the weight of that next index.
fn axis_weights<T: Real>(input: usize, output: usize) -> Vec<(usize, usize, T)> {
    let scale =
        T::from_usize(input).unwrap_or_else(T::one) / T::from_usize(output).unwrap_or_else(T::one);
    let half = T::from_f64_lossy(0.5);
    (0..output)
        .map(|d| {
            let src =
                (scale * (T::from_usize(d).unwrap_or_else(T::zero) + half) - half).max(T::zero());
            let i0 = src.floor().to_usize().unwrap_or(0).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let l1 = (src - T::from_usize(i0).unwrap_or_else(T::zero))
                .max(T::zero())
                .min(T::one());
            (i0, i1, l1)
        })
        .collect()
}

/// Bilinear resize of `[n, h, w]` to `[n, oh, ow]` (align_corners=False).
#[allow(clippy::too_many_arguments)]
pub fn upsample_bilinear<T: Real>(
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    x: &[T],
    y: &mut [T],
) -> Result<()> {
    let r = Resize { n, h, w, oh, ow };
    if !r.has_output() {
        return Ok(());
    }
    let ry = axis_weights::<T>(h, oh);
    let rx = axis_weights::<T>(w, ow);
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(yp, xp)| {
            for (oy, &(y0, y1, ly)) in ry.iter().enumerate() {
                let ly0 = T::one() - ly;
                for (ox, &(x0, x1, lx)) in rx.iter().enumerate() {
                    let lx0 = T::one() - lx;
                    yp[oy * ow + ox] = ly0 * (lx0 * xp[y0 * w + x0] + lx * xp[y0 * w + x1])
                        + ly * (lx0 * xp[y1 * w + x0] + lx * xp[y1 * w + x1]);
                }
            }
        });
    Ok(())
}

/// Per row of `[n, len]` (the rows are the slices' `len`-chunks): (x - min) / (max - min); a
/// constant row becomes all zeros.
pub fn minmax_normalize<T: Real>(len: usize, x: &[T], y: &mut [T]) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    y.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .for_each(|(yr, xr)| {
            let lo = xr.iter().copied().fold(T::infinity(), T::min);
            let hi = xr.iter().copied().fold(T::neg_infinity(), T::max);
            let range = hi - lo;
            if range > T::zero() && range.is_finite() {
                for (o, v) in yr.iter_mut().zip(xr) {
                    *o = (*v - lo) / range;
                }
            } else {
                yr.fill(T::zero());
            }
        });
    Ok(())
}
