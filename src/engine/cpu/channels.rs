//! Channel-slice copies between two `[n, *, hw]` buffers: the U-Net's skip concatenation
//! (copy into channels of a wider buffer) and its backward (add a slice of the wider
//! gradient into the skip's gradient), parallel over the copied planes; and the layout
//! changes between channels-first `[n, c, hw]` and channels-last `[n, hw, c]` (a transpose
//! per image, parallel over blocks of the destination's rows), and their bf16-storage forms
//! (the CPU reference's bf16 storage: a slot per value, rounded to bf16). Knows only shapes.

use rayon::prelude::*;

use crate::engine::precision::round_bf16;
use crate::engine::shapes::{ChannelCopy, Transpose};
use crate::engine::{Real, Result};

/// dst[i, dst_offset + k, :] = (or +=) src[i, src_offset + k, :] for k < c.
pub fn copy_channels<T: Real>(
    s: &ChannelCopy,
    src: &[T],
    dst: &mut [T],
    accumulate: bool,
) -> Result<()> {
    let block = s.c * s.hw;
    if block == 0 || s.n == 0 {
        return Ok(());
    }
    let (dimg, simg) = (s.dst_channels * s.hw, s.src_channels * s.hw);
    dst.par_chunks_mut(dimg)
        .zip(src.par_chunks(simg))
        .for_each(|(d, sr)| {
            let d = &mut d[s.dst_offset * s.hw..s.dst_offset * s.hw + block];
            let sr = &sr[s.src_offset * s.hw..s.src_offset * s.hw + block];
            if accumulate {
                for (o, v) in d.iter_mut().zip(sr) {
                    *o = *o + *v;
                }
            } else {
                d.copy_from_slice(sr);
            }
        });
    Ok(())
}

/// Destination rows per parallel task of [`transpose`] (its reads run this long).
const TRANSPOSE_ROWS: usize = 32;

/// Per image `dst[j, i] = src[i, j]` for `src` `[n, rows, cols]` and `dst` `[n, cols, rows]`.
fn transpose<T: Real>(n: usize, rows: usize, cols: usize, src: &[T], dst: &mut [T]) {
    let img = rows * cols;
    if img == 0 || n == 0 {
        return;
    }
    let block = TRANSPOSE_ROWS * rows;
    dst.par_chunks_mut(img)
        .zip(src.par_chunks(img))
        .flat_map(|(d, s)| {
            d.par_chunks_mut(block)
                .enumerate()
                .map(move |(b, d)| (b * TRANSPOSE_ROWS, d, s))
        })
        .for_each(|(j0, d, s)| {
            // Destination rows j0.. (source columns): for each source row a run of
            // contiguous reads, written down the block's rows.
            let nj = d.len() / rows;
            for i in 0..rows {
                let run = &s[i * cols + j0..i * cols + j0 + nj];
                for (k, v) in run.iter().enumerate() {
                    d[k * rows + i] = *v;
                }
            }
        });
}

/// `y[i, p, ch] = x[i, ch, p]`: NCHW to channels-last (NHWC).
pub fn nchw_to_nhwc<T: Real>(s: &Transpose, x: &[T], y: &mut [T]) -> Result<()> {
    transpose(s.n, s.c, s.hw, x, y);
    Ok(())
}

/// `y[i, ch, p] = x[i, p, ch]`: channels-last (NHWC) to NCHW.
pub fn nhwc_to_nchw<T: Real>(s: &Transpose, x: &[T], y: &mut [T]) -> Result<()> {
    transpose(s.n, s.hw, s.c, x, y);
    Ok(())
}

/// Every value of `v` rounded to bf16 in place (nearest even, [`round_bf16`], through f32:
/// what the device's f32 buffers would hold): the CPU reference's bf16 storage.
pub fn round_to_bf16<T: Real>(v: &mut [T]) {
    v.par_iter_mut()
        .for_each(|x| *x = T::from_f64_lossy(round_bf16(x.as_f64() as f32) as f64));
}

/// [`nchw_to_nhwc`] into bf16 storage (the values rounded).
pub fn nchw_to_nhwc_bf16<T: Real>(s: &Transpose, x: &[T], y: &mut [T]) -> Result<()> {
    nchw_to_nhwc(s, x, y)?;
    round_to_bf16(y);
    Ok(())
}

/// [`nhwc_to_nchw`] out of bf16 storage (the values rounded again: exact when x holds bf16
/// values, as bf16 storage does).
pub fn nhwc_bf16_to_nchw<T: Real>(s: &Transpose, x: &[T], y: &mut [T]) -> Result<()> {
    nhwc_to_nchw(s, x, y)?;
    round_to_bf16(y);
    Ok(())
}
