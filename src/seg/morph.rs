//! Binary morphology in the slice plane (per `z`): dilation and erosion with a cross or a
//! square. Slices never bleed into each other, so a slice the classifier called negative
//! stays empty. Knows nothing of CT.

use crate::io::Mask;
use rayon::prelude::*;

/// In-plane structuring element of radius `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Structuring {
    /// The 4-neighbour cross applied `r` times (a diamond, `|dy| + |dx| <= r`).
    Cross,
    /// The `(2r+1) x (2r+1)` square (8-neighbour for `r = 1`).
    Square,
}

/// Binary dilation of every slice (non-zero = foreground; output is 0/1).
pub fn dilate(mask: &Mask, radius: usize, shape: Structuring) -> Mask {
    morph(mask, radius, shape, true)
}

/// Binary erosion of every slice; outside the slice counts as background, so objects
/// touching the border shrink from it too.
pub fn erode(mask: &Mask, radius: usize, shape: Structuring) -> Mask {
    morph(mask, radius, shape, false)
}

fn morph(mask: &Mask, radius: usize, shape: Structuring, dilate: bool) -> Mask {
    // `mapv` gives a standard-layout array: each slice is one contiguous row-major chunk.
    let mut out = mask.mapv(|v| u8::from(v != 0));
    let (_, h, w) = out.dim();
    if radius == 0 || h * w == 0 {
        return out;
    }
    let Some(data) = out.as_slice_mut() else {
        return out;
    };
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
    out
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
