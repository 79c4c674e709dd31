//! Per-channel bias of a convolution over `[n, c, hw]`: the forward add (with the ReLU that
//! follows it fused, in place) and the backward reduction (the sum of the gradient over the
//! batch and the pixels, accumulated in f64). Parallel over planes / channels. Knows only
//! shapes.

use rayon::prelude::*;

use crate::engine::{Real, Result};

/// Elements summed in `T` before the partial moves to f64 (as the batch norm's sums do).
const BLOCK: usize = 1024;

/// Sum of a slice: blocks summed in `T` with eight lanes, the blocks in f64.
pub(crate) fn sum_f64<T: Real>(x: &[T]) -> f64 {
    let mut total = 0.0;
    for b in x.chunks(BLOCK) {
        let mut acc = [T::zero(); 8];
        let mut it = b.chunks_exact(8);
        for c in &mut it {
            for i in 0..8 {
                acc[i] = acc[i] + c[i];
            }
        }
        for v in it.remainder() {
            acc[0] = acc[0] + *v;
        }
        total += acc.iter().map(|v| v.as_f64()).sum::<f64>();
    }
    total
}

/// `y = y + b[ch]` (then `max(., 0)` when `relu`) over y `[n, c, hw]`.
pub fn bias_relu_assign<T: Real>(
    c: usize,
    hw: usize,
    b: &[T],
    y: &mut [T],
    relu: bool,
) -> Result<()> {
    if hw == 0 || c == 0 {
        return Ok(());
    }
    y.par_chunks_mut(hw).enumerate().for_each(|(p, plane)| {
        let bv = b[p % c];
        if relu {
            for v in plane.iter_mut() {
                *v = (*v + bv).max(T::zero());
            }
        } else {
            for v in plane.iter_mut() {
                *v = *v + bv;
            }
        }
    });
    Ok(())
}

/// `db[ch]` = sum over the batch and the pixels of `dy[:, ch, :]`.
pub fn bias_bwd<T: Real>(n: usize, c: usize, hw: usize, dy: &[T], db: &mut [T]) -> Result<()> {
    db.par_iter_mut().enumerate().for_each(|(ch, d)| {
        let s: f64 = (0..n)
            .map(|i| sum_f64(&dy[(i * c + ch) * hw..(i * c + ch + 1) * hw]))
            .sum();
        *d = T::from_f64_lossy(s);
    });
    Ok(())
}
