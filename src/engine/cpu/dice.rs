//! The segmentation output: the sigmoid (forward and backward) and the soft Dice loss
//! `1 - mean_c(2 * sum(p * t) / (sum(p + t) + eps))` (sums over the batch and the pixels,
//! in f64) with its gradient with respect to the probabilities. Knows only shapes.

use rayon::prelude::*;

use crate::engine::shapes::SoftDice;
use crate::engine::{check_len, EngineError, Real, Result};

const CHUNK: usize = 1 << 15;

/// y = 1 / (1 + exp(-x)), without overflow for large |x|.
pub fn sigmoid_fwd<T: Real>(x: &[T], y: &mut [T]) -> Result<()> {
    check_len("sigmoid_fwd", "y", y.len(), x.len())?;
    let one = T::one();
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            for (o, v) in yc.iter_mut().zip(xc) {
                *o = if *v >= T::zero() {
                    one / (one + (-*v).exp())
                } else {
                    let e = v.exp();
                    e / (one + e)
                };
            }
        });
    Ok(())
}

/// dx = dy * y * (1 - y).
pub fn sigmoid_bwd<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    check_len("sigmoid_bwd", "dy", dy.len(), y.len())?;
    check_len("sigmoid_bwd", "dx", dx.len(), y.len())?;
    let one = T::one();
    dx.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (yc, gc))| {
            for ((o, yv), g) in dc.iter_mut().zip(yc).zip(gc) {
                *o = *g * *yv * (one - *yv);
            }
        });
    Ok(())
}

/// Per channel: (sum p*t, sum p + t) over the batch and the pixels, in f64.
fn channel_sums<T: Real>(s: &SoftDice, p: &[T], t: &[T]) -> Vec<(f64, f64)> {
    (0..s.c)
        .into_par_iter()
        .map(|ch| {
            let (mut inter, mut total) = (0.0, 0.0);
            for i in 0..s.n {
                let o = (i * s.c + ch) * s.hw;
                for (pv, tv) in p[o..o + s.hw].iter().zip(&t[o..o + s.hw]) {
                    let (pv, tv) = (pv.as_f64(), tv.as_f64());
                    inter += pv * tv;
                    total += pv + tv;
                }
            }
            (inter, total)
        })
        .collect()
}

/// Returns the loss and writes dL/dprobs:
/// `dL/dp = -(1/c) * (2 t / S - 2 I / S^2)` with I = sum p*t, S = sum(p + t) + eps.
pub fn soft_dice_loss<T: Real>(
    s: &SoftDice,
    probs: &[T],
    targets: &[T],
    dprobs: &mut [T],
) -> Result<f64> {
    const OP: &str = "soft_dice_loss";
    let sums = channel_sums(s, probs, targets);
    let inv_c = 1.0 / s.c as f64;
    let mut loss = 1.0;
    // Per channel: dL/dp = a * t + b.
    let mut coef = Vec::with_capacity(s.c);
    for &(inter, total) in &sums {
        let den = total + s.eps;
        if den == 0.0 {
            return Err(EngineError::Shape {
                op: OP,
                detail: "empty prediction and target with eps = 0: the Dice is 0/0".into(),
            });
        }
        loss -= inv_c * 2.0 * inter / den;
        coef.push((
            T::from_f64_lossy(-inv_c * 2.0 / den),
            T::from_f64_lossy(inv_c * 2.0 * inter / (den * den)),
        ));
    }
    if s.hw > 0 {
        dprobs
            .par_chunks_mut(s.hw)
            .zip(targets.par_chunks(s.hw))
            .enumerate()
            .for_each(|(plane, (d, t))| {
                let (a, b) = coef[plane % s.c];
                for (o, tv) in d.iter_mut().zip(t) {
                    *o = a * *tv + b;
                }
            });
    }
    Ok(loss)
}
