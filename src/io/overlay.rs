//! Montage overlays for people to look at: a grid of axial slices, each showing the CT in
//! the brain window (level 40, width 80) as gray, an optional CAM as a semi-transparent
//! jet-like heat map, and the mask outline in a bright colour.
//! Knows nothing about the network: the CAM is just a `[z, y, x]` map in `[0, 1]`.

use super::volume::{Mask, Volume};
use super::IoError;
use ndarray::Array3;
use std::path::Path;

/// Most panels per row.
pub const MAX_COLS: usize = 6;
/// Largest panel side in pixels (slices are downscaled to fit).
pub const MAX_PANEL: usize = 256;
const GAP: usize = 2;
const OUTLINE: [u8; 3] = [0, 255, 64];
const CAM_ALPHA: f32 = 0.45;
/// The brain window: level 40 HU, width 80 HU.
const LEVEL: f32 = 40.0;
const WIDTH: f32 = 80.0;

/// Writes a PNG montage of slices `zs` (out-of-range ones are skipped; an empty list means
/// every slice). `cam`, when given, and `mask` must have the volume's shape.
pub fn montage(
    vol: &Volume,
    cam: Option<&Array3<f32>>,
    mask: &Mask,
    zs: &[usize],
    path: &Path,
) -> Result<(), IoError> {
    let dim = vol.data.dim();
    let shape_err = |got: (usize, usize, usize)| IoError::ShapeMismatch {
        path: path.to_path_buf(),
        image: vol.source.clone(),
        got: [got.0, got.1, got.2],
        want: [dim.0, dim.1, dim.2],
    };
    if mask.dim() != dim {
        return Err(shape_err(mask.dim()));
    }
    if let Some(c) = cam {
        if c.dim() != dim {
            return Err(shape_err(c.dim()));
        }
    }
    let (nz, ny, nx) = dim;
    let zs: Vec<usize> = if zs.is_empty() {
        (0..nz).collect()
    } else {
        zs.iter().copied().filter(|&z| z < nz).collect()
    };
    if zs.is_empty() || ny == 0 || nx == 0 {
        return Err(IoError::invalid(path, "montage has no slices to show"));
    }
    // Integer downscale factor so the panel fits MAX_PANEL; nearest neighbour keeps
    // outlines crisp.
    let step = nx.max(ny).div_ceil(MAX_PANEL).max(1);
    let (pw, ph) = (nx.div_ceil(step), ny.div_ceil(step));
    let cols = zs.len().min(MAX_COLS);
    let rows = zs.len().div_ceil(cols);
    let width = cols * pw + (cols - 1) * GAP;
    let height = rows * ph + (rows - 1) * GAP;
    let mut img = vec![0u8; width * height * 3];

    for (k, &z) in zs.iter().enumerate() {
        let (ox, oy) = ((k % cols) * (pw + GAP), (k / cols) * (ph + GAP));
        for py in 0..ph {
            for px in 0..pw {
                let (y, x) = (py * step, px * step);
                let hu = vol.data[[z, y, x]];
                let g = ((hu - (LEVEL - WIDTH / 2.0)) / WIDTH).clamp(0.0, 1.0) * 255.0;
                let mut c = [g, g, g];
                if let Some(cam) = cam {
                    let v = cam[[z, y, x]];
                    if v.is_finite() && v > 0.05 {
                        let j = jet(v.clamp(0.0, 1.0));
                        let a = CAM_ALPHA * v.clamp(0.0, 1.0).sqrt();
                        for ch in 0..3 {
                            c[ch] = c[ch] * (1.0 - a) + j[ch] * a;
                        }
                    }
                }
                let on_edge = mask[[z, y, x]] > 0 && {
                    let inside = |yy: isize, xx: isize| {
                        yy >= 0
                            && xx >= 0
                            && (yy as usize) < ny
                            && (xx as usize) < nx
                            && mask[[z, yy as usize, xx as usize]] > 0
                    };
                    let (yi, xi, s) = (y as isize, x as isize, step as isize);
                    !(inside(yi - s, xi)
                        && inside(yi + s, xi)
                        && inside(yi, xi - s)
                        && inside(yi, xi + s))
                };
                let o = ((oy + py) * width + ox + px) * 3;
                if on_edge {
                    img[o..o + 3].copy_from_slice(&OUTLINE);
                } else {
                    for ch in 0..3 {
                        img[o + ch] = c[ch].round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
    }
    super::png::write_rgb(path, width, height, &img)
}

/// Jet-like colour map: blue -> cyan -> yellow -> red, `t` in `[0, 1]`, components 0..255.
fn jet(t: f32) -> [f32; 3] {
    let f = |c: f32| (1.5 - (4.0 * t - c).abs()).clamp(0.0, 1.0) * 255.0;
    [f(3.0), f(2.0), f(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (usize, usize, Vec<u8>) {
        let dec = ::png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, ::png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width as usize, info.height as usize, buf)
    }

    #[test]
    fn montage_grid_window_cam_and_outline() {
        let dir = tempfile::tempdir().unwrap();
        // 8 slices of 512x300: panels downscaled by 2 to 256x150, 6 columns, 2 rows.
        let data = Array3::from_shape_fn(
            (8, 300, 512),
            |(_, _, x)| if x < 256 { -1000.0 } else { 40.0 },
        );
        let vol = Volume::from_array(data, [5.0, 0.5, 0.5], "v".into());
        let mut mask = Mask::zeros(vol.data.dim());
        mask.slice_mut(ndarray::s![.., 100..200, 300..400]).fill(1);
        let mut cam = Array3::<f32>::zeros(vol.data.dim());
        cam.slice_mut(ndarray::s![.., 0..50, 0..100]).fill(1.0);
        let p = dir.path().join("m.png");
        montage(&vol, Some(&cam), &mask, &[], &p).unwrap();
        let (w, h, px) = decode(&p);
        assert_eq!((w, h), (6 * 256 + 5 * GAP, 2 * 150 + GAP));
        let at = |x: usize, y: usize| {
            [
                px[(y * w + x) * 3],
                px[(y * w + x) * 3 + 1],
                px[(y * w + x) * 3 + 2],
            ]
        };
        // Air is black, 40 HU is mid-gray, the CAM region is red-ish, the outline bright.
        assert_eq!(at(120, 140), [0, 0, 0]);
        assert_eq!(at(200, 140), [128, 128, 128]);
        let c = at(10, 10);
        assert!(c[0] > 40 && c[1] < 10 && c[2] < 10, "cam colour {c:?}");
        assert_eq!(at(150, 50), OUTLINE, "top edge of the mask");
        assert_eq!(at(175, 75), [128, 128, 128], "mask interior shows the CT");
        // Only the requested slices; out-of-range ones are skipped.
        let q = dir.path().join("two.png");
        montage(&vol, None, &mask, &[0, 3, 99], &q).unwrap();
        assert_eq!(decode(&q).0, 2 * 256 + GAP);
        // Shape mismatch is an error and writes nothing.
        let r = dir.path().join("bad.png");
        assert!(montage(&vol, None, &Mask::zeros((1, 2, 3)), &[], &r).is_err());
        assert!(!r.exists());
    }
}
