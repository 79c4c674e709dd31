//! Per-slice maps computed at the model's resolution over its input box (the CAM at the
//! features' resolution, the U-Net's probabilities at the input's) brought to the native
//! grid: bilinear upsampling to the box (PyTorch's `align_corners=False`, on the backend),
//! optionally min-max normalised per slice over the box, then placed into the field (0
//! outside the box). Slice by slice: a range of slices gives the same values as the whole
//! volume. Knows nothing of the network: maps in, maps out.

use crate::data::crop::{self, CropBox};
use crate::engine::{Backend, EngineError};
use ndarray::{Array3, Axis};

/// `small` is `[d, mh, mw]` over the box `crop` (`side` 0: the whole `h x w` field, resized
/// without a crop); the result is `[d, h, w]`.
pub fn to_field<B: Backend<T = f32>>(
    be: &B,
    small: &[f32],
    d: usize,
    (mh, mw): (usize, usize),
    crop: CropBox,
    (h, w): (usize, usize),
    normalise: bool,
) -> Result<Array3<f32>, EngineError> {
    let (uh, uw) = if crop.side == 0 {
        (h, w)
    } else {
        (crop.side, crop.side)
    };
    if small.len() != d * mh * mw {
        return Err(EngineError::Shape {
            op: "to_field",
            detail: format!("{} values for {d} maps of {mh}x{mw}", small.len()),
        });
    }
    let mut out = Array3::<f32>::zeros((d, h, w));
    let plane = mh * mw;
    // A few slices at a time: the box-sized buffers stay small (the values are per slice).
    for z0 in (0..d).step_by(CHUNK) {
        let n = CHUNK.min(d - z0);
        let src = be.upload(&small[z0 * plane..(z0 + n) * plane])?;
        let mut up = be.zeros(n * uh * uw)?;
        be.upsample_bilinear(n, mh, mw, uh, uw, &src, &mut up)?;
        drop(src);
        let up = if normalise {
            let mut norm = be.zeros(n * uh * uw)?;
            be.minmax_normalize(n, uh * uw, &up, &mut norm)?;
            norm
        } else {
            up
        };
        let host = be.download(&up)?;
        drop(up);
        for (k, map) in host.chunks_exact((uh * uw).max(1)).enumerate() {
            let mut o = out.index_axis_mut(Axis(0), z0 + k);
            if crop.side == 0 {
                for (dst, &v) in o.iter_mut().zip(map) {
                    *dst = v;
                }
            } else {
                let m = ndarray::ArrayView2::from_shape((uh, uw), map).map_err(|e| {
                    EngineError::Shape {
                        op: "to_field",
                        detail: e.to_string(),
                    }
                })?;
                o.assign(&crop::place(m, crop, h, w, 0.0));
            }
        }
    }
    Ok(out)
}

/// Slices upsampled at a time.
const CHUNK: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::CpuBackend;

    #[test]
    fn slices_are_independent_and_placed_in_the_box() {
        let be = CpuBackend::<f32>::new();
        let small: Vec<f32> = (0..3 * 4 * 4).map(|i| ((i * 7) % 11) as f32).collect();
        let b = CropBox {
            y0: -2,
            x0: 5,
            side: 12,
        };
        let all = to_field(&be, &small, 3, (4, 4), b, (16, 20), true).unwrap();
        let one = to_field(&be, &small[16..32], 1, (4, 4), b, (16, 20), true).unwrap();
        assert_eq!(all.index_axis(Axis(0), 1), one.index_axis(Axis(0), 0));
        // Outside the box: 0; inside: normalised to [0, 1] with both ends reached.
        assert_eq!(all[[0, 15, 0]], 0.0);
        let inside: Vec<f32> = (0..10)
            .flat_map(|y| (5..17).map(move |x| (y, x)))
            .map(|(y, x)| all[[1, y, x]])
            .collect();
        assert!(inside.iter().all(|v| (0.0..=1.0).contains(v)));
        let raw = to_field(&be, &small, 3, (4, 4), b, (16, 20), false).unwrap();
        assert!(raw.iter().any(|&v| v > 1.0));
        assert!(to_field(&be, &small, 2, (4, 4), b, (16, 20), true).is_err());
        // No crop: the whole field.
        let full = CropBox {
            y0: 0,
            x0: 0,
            side: 0,
        };
        assert_eq!(
            to_field(&be, &small, 3, (4, 4), full, (8, 6), false)
                .unwrap()
                .dim(),
            (3, 8, 6)
        );
    }
}
