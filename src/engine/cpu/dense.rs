//! Fully connected layers: `y = x w^T + b` and its backward, as GEMMs through
//! [`super::gemm::matmul`]. Also the column sum used for bias gradients.

use super::gemm::{matmul, Mat, MatMut, Par};
use crate::engine::{Real, Result};

/// `out[j] = sum_i a[i, j]` for a row-major `[rows, cols]` matrix (summed in f64).
pub fn column_sums<T: Real>(a: &[T], rows: usize, cols: usize, out: &mut [T]) {
    let mut acc = vec![0.0f64; cols];
    for r in 0..rows {
        for (s, v) in acc.iter_mut().zip(&a[r * cols..(r + 1) * cols]) {
            *s += v.as_f64();
        }
    }
    for (o, s) in out.iter_mut().zip(acc) {
        *o = T::from_f64_lossy(s);
    }
}

/// `y[m, n] = x[m, k] . w[n, k]^T + b[n]`.
pub fn linear_fwd<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
) -> Result<()> {
    if let Some(b) = b {
        for row in y.chunks_mut(n.max(1)) {
            row.copy_from_slice(b);
        }
    }
    matmul(
        MatMut::new(y, m, n),
        Mat::new(x, m, k),
        Mat::new(w, n, k).t(),
        b.is_some(),
        Par::Rayon,
    )
}

/// dx = dy . w (if wanted), dw = dy^T . x, db = column sums of dy (if wanted).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) -> Result<()> {
    if let Some(dx) = dx {
        matmul(
            MatMut::new(dx, m, k),
            Mat::new(dy, m, n),
            Mat::new(w, n, k),
            false,
            Par::Rayon,
        )?;
    }
    matmul(
        MatMut::new(dw, n, k),
        Mat::new(dy, m, n).t(),
        Mat::new(x, m, k),
        false,
        Par::Rayon,
    )?;
    if let Some(db) = db {
        column_sums(dy, m, n, db);
    }
    Ok(())
}
