//! Channel-slice copies between two `[n, *, hw]` buffers: the U-Net's skip concatenation
//! (copy into channels of a wider buffer) and its backward (add a slice of the wider
//! gradient into the skip's gradient). Parallel over the copied planes. Knows only shapes.

use rayon::prelude::*;

use crate::engine::shapes::ChannelCopy;
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
