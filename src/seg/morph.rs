//! Binary morphology in the slice plane (per `z`): dilation and erosion with a cross or a
//! square. Slices never bleed into each other, so a slice the classifier called negative
//! stays empty. Knows nothing of CT.

use crate::io::Mask;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};
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
    let mut out = mask.mapv(|v| u8::from(v != 0));
    if radius == 0 {
        return out;
    }
    // ndarray's rayon feature is off: collect the slice views and hand those to rayon.
    let slices: Vec<_> = out.axis_iter_mut(Axis(0)).collect();
    slices.into_par_iter().for_each(|mut s| {
        let mut tmp = s.to_owned();
        match shape {
            Structuring::Square => {
                // A square is separable: a 1-D pass along x, then along y.
                line_pass(tmp.view(), s.view_mut(), radius, dilate, true);
                tmp.assign(&s);
                line_pass(tmp.view(), s.view_mut(), radius, dilate, false);
            }
            Structuring::Cross => {
                for _ in 0..radius {
                    tmp.assign(&s);
                    cross_pass(tmp.view(), s.view_mut(), dilate);
                }
            }
        }
    });
    out
}

/// One 1-D max (dilate) or min (erode) filter of half-width `r` along x (`along_x`) or y.
/// Outside the slice is background.
fn line_pass(
    src: ArrayView2<u8>,
    mut dst: ArrayViewMut2<u8>,
    r: usize,
    dilate: bool,
    along_x: bool,
) {
    let (h, w) = src.dim();
    let target = u8::from(dilate);
    for y in 0..h {
        for x in 0..w {
            let (pos, len) = if along_x { (x, w) } else { (y, h) };
            let lo = pos.saturating_sub(r);
            let hi = (pos + r).min(len - 1);
            // Erosion: a window that reaches past the border sees background.
            let clipped = pos < r || pos + r > len - 1;
            let hit = (lo..=hi).any(|p| {
                let v = if along_x { src[[y, p]] } else { src[[p, x]] };
                v == target
            });
            dst[[y, x]] = if dilate {
                u8::from(hit)
            } else {
                u8::from(!hit && !clipped)
            };
        }
    }
}

/// One step with the 4-neighbour cross.
fn cross_pass(src: ArrayView2<u8>, mut dst: ArrayViewMut2<u8>, dilate: bool) {
    let (h, w) = src.dim();
    for y in 0..h {
        for x in 0..w {
            let c = src[[y, x]];
            let n = [
                if y > 0 { Some(src[[y - 1, x]]) } else { None },
                if y + 1 < h {
                    Some(src[[y + 1, x]])
                } else {
                    None
                },
                if x > 0 { Some(src[[y, x - 1]]) } else { None },
                if x + 1 < w {
                    Some(src[[y, x + 1]])
                } else {
                    None
                },
            ];
            dst[[y, x]] = if dilate {
                u8::from(c == 1 || n.contains(&Some(1)))
            } else {
                u8::from(c == 1 && n.iter().all(|v| *v == Some(1)))
            };
        }
    }
}
