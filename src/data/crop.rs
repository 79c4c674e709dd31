//! The head's in-plane bounding box and the square crop around it: a head CT holds the head
//! in part of a 512 px field (plus the head holder and air), so the model sees the head at
//! a higher resolution when the slices are cropped to the head before resizing. One box per
//! volume (every slice of a sequence at the same scale), found on the HU values alone, and
//! the exact way back: a map over the crop placed into the full field.
//! Knows nothing about the network or files.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, Axis};

/// HU above which a voxel is tissue (not air, not fat, not the cushion): the head and the
/// head holder. Data windowed to a brain window (ct-ich is saturated at -20 HU) keeps this.
pub const TISSUE_HU: f32 = -10.0;

/// A square box in the slice plane, `[y0, y0 + side) x [x0, x0 + side)`, possibly reaching
/// past the slice's border (read as air there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CropBox {
    pub y0: isize,
    pub x0: isize,
    pub side: usize,
}

impl CropBox {
    /// The whole `h x w` slice (the square that holds it, centred).
    pub fn full(h: usize, w: usize) -> Self {
        let side = h.max(w).max(1);
        CropBox {
            y0: -((side - h) as isize / 2),
            x0: -((side - w) as isize / 2),
            side,
        }
    }
}

/// The largest 8-connected component of `m` (0/1), as a 0/1 image; empty in, empty out.
fn largest_component(m: &Array2<u8>) -> Array2<u8> {
    let (h, w) = m.dim();
    let mut label = Array2::<u32>::zeros((h, w));
    let mut best = (0u32, 0usize);
    let mut next = 0u32;
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if m[[y, x]] == 0 || label[[y, x]] != 0 {
                continue;
            }
            next += 1;
            let mut n = 0usize;
            label[[y, x]] = next;
            stack.push((y, x));
            while let Some((cy, cx)) = stack.pop() {
                n += 1;
                for dy in -1isize..=1 {
                    for dx in -1isize..=1 {
                        let (ny, nx) = (cy as isize + dy, cx as isize + dx);
                        if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                            continue;
                        }
                        let (ny, nx) = (ny as usize, nx as usize);
                        if m[[ny, nx]] != 0 && label[[ny, nx]] == 0 {
                            label[[ny, nx]] = next;
                            stack.push((ny, nx));
                        }
                    }
                }
            }
            if n > best.1 {
                best = (next, n);
            }
        }
    }
    label.mapv(|l| u8::from(l != 0 && l == best.0))
}

/// Erosion of a 0/1 image by a `(2r+1)^2` square (outside = background).
fn erode(m: &Array2<u8>, r: usize) -> Array2<u8> {
    let (h, w) = m.dim();
    let mut rows = Array2::<u8>::zeros((h, w));
    for y in 0..h {
        for x in 0..w {
            let lo = x.saturating_sub(r);
            let hi = x + r;
            rows[[y, x]] = u8::from(hi < w && (lo..=hi).all(|xx| m[[y, xx]] != 0) && x >= r);
        }
    }
    let mut out = Array2::<u8>::zeros((h, w));
    for y in 0..h {
        for x in 0..w {
            let lo = y.saturating_sub(r);
            let hi = y + r;
            out[[y, x]] = u8::from(hi < h && y >= r && (lo..=hi).all(|yy| rows[[yy, x]] != 0));
        }
    }
    out
}

/// The head's square box in a `[z, y, x]` HU volume: on a coarse grid (every `step` px),
/// the tissue of each slice is eroded (cutting the thin head holder and the table away
/// from the head), its largest component is kept, and the box holds the union of those
/// components over the slices, grown by `margin_frac` of its side on each side and made
/// square about its centre. `None` when no slice holds tissue.
pub fn head_box(hu: ArrayView3<f32>, margin_frac: f64) -> Option<CropBox> {
    let (d, h, w) = hu.dim();
    if d * h * w == 0 {
        return None;
    }
    let step = (h.max(w) / 128).max(1);
    let (gh, gw) = (h.div_ceil(step), w.div_ceil(step));
    let (mut y_lo, mut y_hi, mut x_lo, mut x_hi) = (usize::MAX, 0usize, usize::MAX, 0usize);
    for z in 0..d {
        let sl = hu.index_axis(Axis(0), z);
        let tissue = Array2::from_shape_fn((gh, gw), |(y, x)| {
            u8::from(sl[[(y * step).min(h - 1), (x * step).min(w - 1)]] > TISSUE_HU)
        });
        let head = largest_component(&erode(&tissue, 2));
        // Small pieces (the top of the skull, a slice of holder) do not set the box.
        let n = head.iter().filter(|&&v| v != 0).count();
        if n < (gh * gw) / 100 {
            continue;
        }
        for ((y, x), &v) in head.indexed_iter() {
            if v != 0 {
                y_lo = y_lo.min(y);
                y_hi = y_hi.max(y);
                x_lo = x_lo.min(x);
                x_hi = x_hi.max(x);
            }
        }
    }
    if y_lo == usize::MAX {
        return None;
    }
    // Back to full resolution; the erosion took 2 grid cells off each side.
    let grow = 2 * step + step;
    let y0 = (y_lo * step).saturating_sub(grow) as f64;
    let y1 = ((y_hi + 1) * step + grow).min(h) as f64;
    let x0 = (x_lo * step).saturating_sub(grow) as f64;
    let x1 = ((x_hi + 1) * step + grow).min(w) as f64;
    let side = (y1 - y0).max(x1 - x0);
    let side = (side * (1.0 + 2.0 * margin_frac)).round().max(8.0) as usize;
    let cy = 0.5 * (y0 + y1);
    let cx = 0.5 * (x0 + x1);
    Some(CropBox {
        y0: (cy - side as f64 / 2.0).round() as isize,
        x0: (cx - side as f64 / 2.0).round() as isize,
        side,
    })
}

/// The box's pixels of every slice, `[z, side, side]`; outside the slice reads `fill`.
pub fn extract(hu: ArrayView3<f32>, b: CropBox, fill: f32) -> Array3<f32> {
    let (d, h, w) = hu.dim();
    let mut out = Array3::<f32>::from_elem((d, b.side, b.side), fill);
    let (ys, ye) = (b.y0.max(0), (b.y0 + b.side as isize).min(h as isize));
    let (xs, xe) = (b.x0.max(0), (b.x0 + b.side as isize).min(w as isize));
    if ys >= ye || xs >= xe {
        return out;
    }
    let src = hu.slice(s![.., ys as usize..ye as usize, xs as usize..xe as usize]);
    out.slice_mut(s![
        ..,
        (ys - b.y0) as usize..(ye - b.y0) as usize,
        (xs - b.x0) as usize..(xe - b.x0) as usize
    ])
    .assign(&src);
    out
}

/// A map over the box (`[side, side]`) placed into an `h x w` slice; outside the box is
/// `fill`.
pub fn place(map: ArrayView2<f32>, b: CropBox, h: usize, w: usize, fill: f32) -> Array2<f32> {
    let mut out = Array2::<f32>::from_elem((h, w), fill);
    let (ys, ye) = (b.y0.max(0), (b.y0 + b.side as isize).min(h as isize));
    let (xs, xe) = (b.x0.max(0), (b.x0 + b.side as isize).min(w as isize));
    if ys >= ye || xs >= xe || map.dim() != (b.side, b.side) {
        return out;
    }
    out.slice_mut(s![ys as usize..ye as usize, xs as usize..xe as usize])
        .assign(&map.slice(s![
            (ys - b.y0) as usize..(ye - b.y0) as usize,
            (xs - b.x0) as usize..(xe - b.x0) as usize
        ]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_head_not_the_holder() {
        // A 40-px disc of tissue at (70, 60) in air, and a thin holder arc near a corner.
        let mut hu = Array3::<f32>::from_elem((3, 128, 128), -20.0);
        for z in 0..3 {
            for y in 0..128 {
                for x in 0..128 {
                    let (dy, dx) = (y as f32 - 70.0, x as f32 - 60.0);
                    if dy * dy + dx * dx <= 40.0 * 40.0 {
                        hu[[z, y, x]] = 35.0;
                    }
                    if x == 2 || y == 125 {
                        hu[[z, y, x]] = 100.0;
                    }
                }
            }
        }
        let b = head_box(hu.view(), 0.0).unwrap();
        // The disc spans 30..110 x 20..100; the box may add a few pixels, not the holder.
        assert!(b.y0 >= 22 && b.y0 <= 31, "{b:?}");
        assert!(b.x0 >= 12 && b.x0 <= 21, "{b:?}");
        assert!(b.side >= 80 && b.side <= 92, "{b:?}");
        let e = extract(hu.view(), b, -20.0);
        assert_eq!(e.dim(), (3, b.side, b.side));
        assert_eq!(
            e[[1, (70 - b.y0) as usize, (60 - b.x0) as usize]],
            hu[[1, 70, 60]]
        );
        // Placing the crop back gives the original pixels inside the box.
        let back = place(e.index_axis(Axis(0), 1), b, 128, 128, -99.0);
        assert_eq!(back[[70, 60]], 35.0);
        assert_eq!(back[[0, 127]], -99.0);
        assert!(head_box(Array3::<f32>::from_elem((2, 64, 64), -20.0).view(), 0.1).is_none());
    }

    #[test]
    fn boxes_past_the_border_read_the_fill() {
        let hu = Array3::<f32>::from_shape_fn((1, 4, 4), |(_, y, x)| (y * 4 + x) as f32);
        let b = CropBox {
            y0: -1,
            x0: 2,
            side: 3,
        };
        let e = extract(hu.view(), b, -5.0);
        assert_eq!(e[[0, 0, 0]], -5.0);
        assert_eq!(e[[0, 1, 0]], 2.0);
        assert_eq!(e[[0, 1, 2]], -5.0);
        let p = place(e.index_axis(Axis(0), 0), b, 4, 4, 0.0);
        assert_eq!(p[[0, 2]], 2.0);
        assert_eq!(p[[1, 3]], 7.0);
        assert_eq!(p[[3, 3]], 0.0);
        assert_eq!(CropBox::full(4, 6).side, 6);
        assert_eq!(CropBox::full(4, 6).y0, -1);
    }
}
