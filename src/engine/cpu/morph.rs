//! Binary morphology in the slice plane (per `z`) on the CPU, mirroring `cuda/morph.rs` and
//! `kernels/morph.cu`: dilation and erosion with a cross or a square. Slices never bleed
//! into each other, so an empty slice stays empty. Knows nothing beyond 0/1 volumes.

use ndarray::Array3;
use rayon::prelude::*;

use crate::engine::volume::{check, Dims, Structuring};
use crate::engine::Result;

/// Binary dilation of every slice (non-zero = foreground; output is 0/1).
pub fn dilate(mask: &Array3<u8>, radius: usize, shape: Structuring) -> Array3<u8> {
    morph(mask, radius, shape, true)
}

/// Binary erosion of every slice; outside the slice counts as background, so objects
/// touching the border shrink from it too.
pub fn erode(mask: &Array3<u8>, radius: usize, shape: Structuring) -> Array3<u8> {
    morph(mask, radius, shape, false)
}

fn morph(mask: &Array3<u8>, radius: usize, shape: Structuring, dilate: bool) -> Array3<u8> {
    // `mapv` gives a standard-layout array: each slice is one contiguous row-major chunk.
    let mut out = mask.mapv(|v| u8::from(v != 0));
    let (_, h, w) = out.dim();
    if let Some(data) = out.as_slice_mut() {
        morph_planes(data, h, w, radius, shape, dilate);
    }
    out
}

/// `out` = the dilation (`dilate`) or erosion of every slice of `src` `[z, y, x]`.
pub fn morph2d(
    src: &[u8],
    dims: Dims,
    radius: usize,
    shape: Structuring,
    dilate: bool,
    out: &mut [u8],
) -> Result<()> {
    check::same_volume("morph2d", dims, src.len(), out.len())?;
    out.par_iter_mut()
        .zip(src.par_iter())
        .for_each(|(o, &v)| *o = u8::from(v != 0));
    morph_planes(out, dims.1, dims.2, radius, shape, dilate);
    Ok(())
}

/// The operation in place on every `h x w` plane of the 0/1 bytes `data`.
fn morph_planes(
    data: &mut [u8],
    h: usize,
    w: usize,
    radius: usize,
    shape: Structuring,
    dilate: bool,
) {
    if radius == 0 || h * w == 0 {
        return;
    }
    data.par_chunks_mut(h * w).for_each(|s| {
        // An empty slice stays empty under both operations (most slices of a volume).
        if s.iter().all(|&v| v == 0) {
            return;
        }
        let mut tmp = s.to_vec();
        match shape {
            Structuring::Square => {
                // A square is separable: a 1-D pass along x, then along y.
                pass_x(&tmp, s, h, w, radius, dilate);
                tmp.copy_from_slice(s);
                pass_y(&tmp, s, h, w, radius, dilate);
            }
            Structuring::Cross => {
                for _ in 0..radius {
                    tmp.copy_from_slice(s);
                    cross_pass(&tmp, s, h, w, dilate);
                }
            }
        }
    });
}

/// 1-D max (dilate) or min (erode) filter of half-width `r` along x, by a running count of
/// the ones in the window. Outside the slice is background, so an erosion window that
/// reaches past the border (fewer than `2r + 1` ones) gives 0.
fn pass_x(src: &[u8], dst: &mut [u8], h: usize, w: usize, r: usize, dilate: bool) {
    let full = 2 * r + 1;
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        let out = &mut dst[y * w..(y + 1) * w];
        // Ones in [x - r, x + r] clipped to the row, kept as the window slides.
        let mut count: usize = row[..r.min(w)].iter().map(|&v| v as usize).sum();
        for x in 0..w {
            if x + r < w {
                count += row[x + r] as usize;
            }
            if x > r {
                count -= row[x - r - 1] as usize;
            }
            out[x] = u8::from(if dilate { count > 0 } else { count == full });
        }
    }
}

/// The same along y: each output row is the count over the `2r + 1` rows around it.
fn pass_y(src: &[u8], dst: &mut [u8], h: usize, w: usize, r: usize, dilate: bool) {
    let full = (2 * r + 1) as u32;
    let mut count = vec![0u32; w];
    for y in 0..h {
        count.iter_mut().for_each(|c| *c = 0);
        for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
            for (c, &v) in count.iter_mut().zip(&src[yy * w..(yy + 1) * w]) {
                *c += v as u32;
            }
        }
        for (o, &c) in dst[y * w..(y + 1) * w].iter_mut().zip(&count) {
            *o = u8::from(if dilate { c > 0 } else { c == full });
        }
    }
}

/// One step with the 4-neighbour cross.
fn cross_pass(src: &[u8], dst: &mut [u8], h: usize, w: usize, dilate: bool) {
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let c = src[i];
            let n = [
                if y > 0 { Some(src[i - w]) } else { None },
                if y + 1 < h { Some(src[i + w]) } else { None },
                if x > 0 { Some(src[i - 1]) } else { None },
                if x + 1 < w { Some(src[i + 1]) } else { None },
            ];
            dst[i] = if dilate {
                u8::from(c == 1 || n.contains(&Some(1)))
            } else {
                u8::from(c == 1 && n.iter().all(|v| *v == Some(1)))
            };
        }
    }
}
