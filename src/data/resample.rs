//! In-plane resampling of `[z, y, x]` stacks: images down to the model's resolution
//! (bilinear, or area/box averaging which does not alias when shrinking 512 -> 64), and
//! model outputs back up to the native grid (masks by nearest neighbour, float maps such as
//! CAMs bilinearly). Every resize is separable: a row pass then a column pass with
//! precomputed taps, one slice per rayon task. The z axis is never touched.
//! Knows nothing about HU or the network.

use ndarray::{Array2, Array3, Array4, ArrayView2, ArrayView3, ArrayView4};
use rayon::prelude::*;

/// How an image is resampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    /// Bilinear with half-pixel centres (PyTorch `align_corners=False`): good for upsampling
    /// and for mild downsampling.
    Bilinear,
    /// Each output pixel is the exact area-weighted mean of the input pixels it covers
    /// (fractional overlaps included): the mean is preserved and nothing aliases.
    Area,
}

/// The taps of one output index along one axis: input indices `start..start+w.len()`.
#[derive(Clone, Debug)]
struct Tap {
    start: usize,
    w: Vec<f32>,
}

fn bilinear_taps(n_in: usize, n_out: usize) -> Vec<Tap> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let l = (src - i0 as f64).clamp(0.0, 1.0) as f32;
            if i1 == i0 || l == 0.0 {
                Tap {
                    start: i0,
                    w: vec![1.0],
                }
            } else {
                Tap {
                    start: i0,
                    w: vec![1.0 - l, l],
                }
            }
        })
        .collect()
}

fn area_taps(n_in: usize, n_out: usize) -> Vec<Tap> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let a = o as f64 * scale;
            let b = ((o + 1) as f64 * scale).min(n_in as f64);
            let i0 = (a.floor() as usize).min(n_in - 1);
            let i1 = (b.ceil() as usize).clamp(i0 + 1, n_in);
            let w: Vec<f32> = (i0..i1)
                .map(|i| {
                    let lo = a.max(i as f64);
                    let hi = b.min(i as f64 + 1.0);
                    ((hi - lo).max(0.0) / scale) as f32
                })
                .collect();
            Tap { start: i0, w }
        })
        .collect()
}

fn taps(mode: ResizeMode, n_in: usize, n_out: usize) -> Vec<Tap> {
    match mode {
        ResizeMode::Bilinear => bilinear_taps(n_in, n_out),
        ResizeMode::Area => area_taps(n_in, n_out),
    }
}

/// Resizes `planes` contiguous row-major planes of `h_in x w_in` to `h x w`.
/// An empty input or output gives zeros of the output size.
pub fn resize_planes(
    data: &[f32],
    planes: usize,
    (h_in, w_in): (usize, usize),
    (h, w): (usize, usize),
    mode: ResizeMode,
) -> Vec<f32> {
    let mut out = vec![0.0f32; planes * h * w];
    if h == 0 || w == 0 || h_in == 0 || w_in == 0 || data.len() < planes * h_in * w_in {
        return out;
    }
    if (h, w) == (h_in, w_in) {
        out.copy_from_slice(&data[..planes * h * w]);
        return out;
    }
    let tx = taps(mode, w_in, w);
    let ty = taps(mode, h_in, h);
    out.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
        let src = &data[p * h_in * w_in..(p + 1) * h_in * w_in];
        // Row pass: h_in x w.
        let mut tmp = vec![0.0f32; h_in * w];
        for (row_in, row_out) in src.chunks_exact(w_in).zip(tmp.chunks_exact_mut(w)) {
            for (o, t) in row_out.iter_mut().zip(&tx) {
                let s = &row_in[t.start..t.start + t.w.len()];
                *o = s.iter().zip(&t.w).map(|(a, b)| a * b).sum();
            }
        }
        // Column pass: whole rows at a time, so the inner loop is a contiguous axpy.
        for (row_out, t) in dst.chunks_exact_mut(w).zip(&ty) {
            for (k, &wk) in t.w.iter().enumerate() {
                let row_in = &tmp[(t.start + k) * w..(t.start + k + 1) * w];
                for (o, &v) in row_out.iter_mut().zip(row_in) {
                    *o += wk * v;
                }
            }
        }
    });
    out
}

/// One slice `[y, x]` -> `[h, w]`.
pub fn resize_slice(img: ArrayView2<f32>, h: usize, w: usize, mode: ResizeMode) -> Array2<f32> {
    let (h_in, w_in) = img.dim();
    let src = img.as_standard_layout();
    let data = src.as_slice().unwrap_or(&[]);
    let v = resize_planes(data, 1, (h_in, w_in), (h, w), mode);
    Array2::from_shape_vec((h, w), v).unwrap_or_else(|_| Array2::zeros((h, w)))
}

/// Every slice of `[z, y, x]` -> `[z, h, w]`.
pub fn resize_volume(vol: ArrayView3<f32>, h: usize, w: usize, mode: ResizeMode) -> Array3<f32> {
    let (d, h_in, w_in) = vol.dim();
    let src = vol.as_standard_layout();
    let data = src.as_slice().unwrap_or(&[]);
    let v = resize_planes(data, d, (h_in, w_in), (h, w), mode);
    Array3::from_shape_vec((d, h, w), v).unwrap_or_else(|_| Array3::zeros((d, h, w)))
}

/// Every plane of `[z, c, y, x]` (e.g. windowed model input) -> `[z, c, h, w]`.
pub fn resize_stack(x: ArrayView4<f32>, h: usize, w: usize, mode: ResizeMode) -> Array4<f32> {
    let (d, c, h_in, w_in) = x.dim();
    let src = x.as_standard_layout();
    let data = src.as_slice().unwrap_or(&[]);
    let v = resize_planes(data, d * c, (h_in, w_in), (h, w), mode);
    Array4::from_shape_vec((d, c, h, w), v).unwrap_or_else(|_| Array4::zeros((d, c, h, w)))
}

/// A float map (CAM, probability) `[z, y, x]` -> `[z, h, w]`, bilinear: how maps computed
/// at the model's resolution go back to the native grid.
pub fn resize_map_bilinear(map: ArrayView3<f32>, h: usize, w: usize) -> Array3<f32> {
    resize_volume(map, h, w, ResizeMode::Bilinear)
}

/// The nearest source index of each output index (half-pixel centres), as in PyTorch's
/// `nearest-exact`: integer up- then down-scaling returns the original.
fn nearest_index(n_in: usize, n_out: usize) -> Vec<usize> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| (((o as f64 + 0.5) * scale).floor() as usize).min(n_in - 1))
        .collect()
}

/// A mask (or any label map) `[z, y, x]` -> `[z, h, w]` by nearest neighbour: values are
/// copied, never blended.
pub fn resize_mask_nearest(mask: ArrayView3<u8>, h: usize, w: usize) -> Array3<u8> {
    let (d, h_in, w_in) = mask.dim();
    let mut out = Array3::<u8>::zeros((d, h, w));
    if h_in == 0 || w_in == 0 || h == 0 || w == 0 {
        return out;
    }
    let iy = nearest_index(h_in, h);
    let ix = nearest_index(w_in, w);
    let src = mask.as_standard_layout();
    let Some(data) = src.as_slice() else {
        return out;
    };
    if let Some(dst) = out.as_slice_mut() {
        dst.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(z, plane)| {
                let s = &data[z * h_in * w_in..(z + 1) * h_in * w_in];
                for (row, &y) in plane.chunks_exact_mut(w).zip(&iy) {
                    let r = &s[y * w_in..(y + 1) * w_in];
                    for (o, &x) in row.iter_mut().zip(&ix) {
                        *o = r[x];
                    }
                }
            });
    }
    out
}
