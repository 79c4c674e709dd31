//! Max pooling (forward, and a backward that routes each gradient to the first maximum of
//! its window in row-major order) and global average pooling. Padding counts as -inf.
//! Parallel over the `n*c` planes. Knows only shapes.

use rayon::prelude::*;

use crate::engine::shapes::Pool2d;
use crate::engine::{check_len, EngineError, Real, Result};

fn check_shape(op: &'static str, s: &Pool2d) -> Result<()> {
    let bad = |detail: String| Err(EngineError::Shape { op, detail });
    if s.k == 0 || s.stride == 0 {
        return bad("kernel and stride must be at least 1".into());
    }
    // PyTorch's rule: a window must never lie entirely in the padding.
    if 2 * s.pad > s.k {
        return bad(format!("padding {} exceeds half the kernel {}", s.pad, s.k));
    }
    if s.k > s.h + 2 * s.pad || s.k > s.w + 2 * s.pad {
        return bad(format!(
            "kernel {} larger than the padded input {}x{}",
            s.k,
            s.h + 2 * s.pad,
            s.w + 2 * s.pad
        ));
    }
    Ok(())
}

/// Flat index into the plane of the first maximum of the window of output (oy, ox).
fn argmax<T: Real>(s: &Pool2d, plane: &[T], oy: usize, ox: usize) -> Option<usize> {
    let y0 = (oy * s.stride) as isize - s.pad as isize;
    let x0 = (ox * s.stride) as isize - s.pad as isize;
    let mut best: Option<(usize, T)> = None;
    for iy in y0.max(0)..(y0 + s.k as isize).min(s.h as isize) {
        for ix in x0.max(0)..(x0 + s.k as isize).min(s.w as isize) {
            let i = iy as usize * s.w + ix as usize;
            let v = plane[i];
            // NaN propagates like PyTorch: it wins and stays.
            match best {
                None => best = Some((i, v)),
                Some((_, b)) if (v > b || v.is_nan()) && !b.is_nan() => best = Some((i, v)),
                _ => {}
            }
        }
    }
    best.map(|(i, _)| i)
}

pub fn maxpool2d_fwd<T: Real>(s: &Pool2d, x: &[T], y: &mut [T]) -> Result<()> {
    const OP: &str = "maxpool2d_fwd";
    check_shape(OP, s)?;
    check_len(OP, "x", x.len(), s.x_len())?;
    check_len(OP, "y", y.len(), s.y_len())?;
    let (oh, ow) = (s.out_h(), s.out_w());
    if oh * ow == 0 || s.h * s.w == 0 {
        return Ok(());
    }
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(s.h * s.w))
        .for_each(|(yp, xp)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    yp[oy * ow + ox] = argmax(s, xp, oy, ox).map_or(T::neg_infinity(), |i| xp[i]);
                }
            }
        });
    Ok(())
}

pub fn maxpool2d_bwd<T: Real>(s: &Pool2d, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    const OP: &str = "maxpool2d_bwd";
    check_shape(OP, s)?;
    check_len(OP, "x", x.len(), s.x_len())?;
    check_len(OP, "y", y.len(), s.y_len())?;
    check_len(OP, "dy", dy.len(), s.y_len())?;
    check_len(OP, "dx", dx.len(), s.x_len())?;
    let (oh, ow) = (s.out_h(), s.out_w());
    if s.h * s.w == 0 {
        return Ok(());
    }
    dx.fill(T::zero());
    if oh * ow == 0 {
        return Ok(());
    }
    dx.par_chunks_mut(s.h * s.w)
        .zip(x.par_chunks(s.h * s.w))
        .zip(dy.par_chunks(oh * ow))
        .for_each(|((dxp, xp), dyp)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    if let Some(i) = argmax(s, xp, oy, ox) {
                        dxp[i] = dxp[i] + dyp[oy * ow + ox];
                    }
                }
            }
        });
    Ok(())
}

/// y[i] = mean of x[i, 0..hw].
pub fn global_avg_pool_fwd<T: Real>(rows: usize, hw: usize, x: &[T], y: &mut [T]) -> Result<()> {
    const OP: &str = "global_avg_pool_fwd";
    check_len(OP, "x", x.len(), rows * hw)?;
    check_len(OP, "y", y.len(), rows)?;
    if hw == 0 {
        return Err(EngineError::Shape {
            op: OP,
            detail: "cannot average over hw = 0".into(),
        });
    }
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::one);
    y.par_iter_mut().zip(x.par_chunks(hw)).for_each(|(o, xr)| {
        *o = xr.iter().copied().sum::<T>() * inv;
    });
    Ok(())
}

/// dx[i, p] = dy[i] / hw.
pub fn global_avg_pool_bwd<T: Real>(rows: usize, hw: usize, dy: &[T], dx: &mut [T]) -> Result<()> {
    const OP: &str = "global_avg_pool_bwd";
    check_len(OP, "dy", dy.len(), rows)?;
    check_len(OP, "dx", dx.len(), rows * hw)?;
    if hw == 0 {
        return Err(EngineError::Shape {
            op: OP,
            detail: "cannot average over hw = 0".into(),
        });
    }
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::one);
    dx.par_chunks_mut(hw)
        .zip(dy.par_iter())
        .for_each(|(dr, g)| dr.fill(*g * inv));
    Ok(())
}
