//! Elementwise ops: ReLU forward/backward, the residual add+ReLU, in-place add and scale,
//! fill and copy. Parallel over fixed-size chunks once a buffer is large enough to pay for
//! the threads.

use rayon::prelude::*;

use crate::engine::{check_len, Real, Result};

/// Elements per parallel task; smaller buffers run on the calling thread.
const CHUNK: usize = 1 << 15;

fn unary<T: Real>(y: &mut [T], f: impl Fn(&mut [T], usize) + Sync) {
    if y.len() <= CHUNK {
        f(y, 0);
    } else {
        y.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| f(c, i * CHUNK));
    }
}

/// y = max(x, 0).
pub fn relu_fwd<T: Real>(x: &[T], y: &mut [T]) -> Result<()> {
    check_len("relu_fwd", "y", y.len(), x.len())?;
    unary(y, |c, o| {
        for (v, xv) in c.iter_mut().zip(&x[o..]) {
            *v = xv.max(T::zero());
        }
    });
    Ok(())
}

/// dx = dy * (y > 0).
pub fn relu_bwd<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    check_len("relu_bwd", "dy", dy.len(), y.len())?;
    check_len("relu_bwd", "dx", dx.len(), y.len())?;
    unary(dx, |c, o| {
        for ((v, yv), g) in c.iter_mut().zip(&y[o..]).zip(&dy[o..]) {
            *v = if *yv > T::zero() { *g } else { T::zero() };
        }
    });
    Ok(())
}

/// y = max(a + b, 0).
pub fn add_relu_fwd<T: Real>(a: &[T], b: &[T], y: &mut [T]) -> Result<()> {
    check_len("add_relu_fwd", "b", b.len(), a.len())?;
    check_len("add_relu_fwd", "y", y.len(), a.len())?;
    unary(y, |c, o| {
        for ((v, av), bv) in c.iter_mut().zip(&a[o..]).zip(&b[o..]) {
            *v = (*av + *bv).max(T::zero());
        }
    });
    Ok(())
}

/// y += x.
pub fn add_assign<T: Real>(y: &mut [T], x: &[T]) -> Result<()> {
    check_len("add_assign", "x", x.len(), y.len())?;
    unary(y, |c, o| {
        for (v, xv) in c.iter_mut().zip(&x[o..]) {
            *v = *v + *xv;
        }
    });
    Ok(())
}

/// y *= alpha.
pub fn scale_assign<T: Real>(y: &mut [T], alpha: f64) -> Result<()> {
    let a = T::from_f64_lossy(alpha);
    unary(y, |c, _| {
        for v in c.iter_mut() {
            *v = *v * a;
        }
    });
    Ok(())
}

/// Every element = value.
pub fn fill<T: Real>(y: &mut [T], value: f64) -> Result<()> {
    let v = T::from_f64_lossy(value);
    unary(y, |c, _| c.fill(v));
    Ok(())
}

/// dst = src (same length).
pub fn copy<T: Real>(src: &[T], dst: &mut [T]) -> Result<()> {
    check_len("copy", "dst", dst.len(), src.len())?;
    dst.copy_from_slice(src);
    Ok(())
}
