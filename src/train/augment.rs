//! The authors' on-the-fly augmentation: horizontal/vertical flips, shifts of up to +-15 px
//! (of a 512-px slice, scaled to the training size), rotations of up to +-15 degrees
//! (bilinear, zero fill) and an intensity factor in [0.9, 1.1]; one transform for all the
//! slices (and channels) of a sequence, so the LSTM sees a consistent volume.
//!
//! Every random draw comes from the crate's [`Rng`] seeded by [`mix_seed`] over (run seed, epoch,
//! sequence index): the same seed gives the same augmentation whatever the batch order or
//! thread count, which is what makes a resumed run replay an uninterrupted one.
//! Knows nothing about the network, files or CT: only `[planes, h, w]` f32 images.

use crate::rng::derive_seed;
pub use crate::rng::Rng;
use thiserror::Error;

/// Combines a seed with a path of indices (epoch, sequence, ...) into an independent seed.
pub fn mix_seed(seed: u64, path: &[u64]) -> u64 {
    path.iter()
        .fold(derive_seed(seed, 0xA06_5EED), |s, &p| derive_seed(s, p))
}

/// The augmentation's ranges. Shifts are a fraction of the slice size so that the authors'
/// 15 px at 512 px stays the same relative shift at any training size.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    pub enabled: bool,
    pub flip_h: bool,
    pub flip_v: bool,
    /// Maximum shift as a fraction of the width/height (authors: 15/512).
    pub max_shift_frac: f64,
    /// Maximum rotation in degrees (authors: 15).
    pub max_rotate_deg: f64,
    /// Intensity factor range (authors: 0.9..1.1).
    pub intensity_min: f64,
    pub intensity_max: f64,
}

impl AugmentConfig {
    /// The authors' ranges.
    pub fn paper() -> Self {
        AugmentConfig {
            enabled: true,
            flip_h: true,
            flip_v: true,
            max_shift_frac: 15.0 / 512.0,
            max_rotate_deg: 15.0,
            intensity_min: 0.9,
            intensity_max: 1.1,
        }
    }

    /// No augmentation (validation, tests).
    pub fn none() -> Self {
        AugmentConfig {
            enabled: false,
            ..Self::paper()
        }
    }
}

/// One concrete transform. The geometric part maps an input pixel to the output as
/// flip, then rotation about the image centre, then shift; intensity multiplies every value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transform {
    pub flip_h: bool,
    pub flip_v: bool,
    /// Shift in whole pixels at the image's own size (+x right, +y down).
    pub shift_x: i64,
    pub shift_y: i64,
    /// Rotation in degrees (counter-clockwise as displayed, y pointing down).
    pub angle_deg: f64,
    pub intensity: f64,
}

#[derive(Debug, Error, PartialEq)]
pub enum AugmentError {
    #[error("augment: buffer has {got} values, expected {planes} x {h} x {w} = {want}")]
    Shape {
        got: usize,
        planes: usize,
        h: usize,
        w: usize,
        want: usize,
    },
}

impl Transform {
    pub fn identity() -> Self {
        Transform {
            flip_h: false,
            flip_v: false,
            shift_x: 0,
            shift_y: 0,
            angle_deg: 0.0,
            intensity: 1.0,
        }
    }

    /// Draws a transform for an `h x w` image. Always consumes the same number of draws, so
    /// one sequence's transform never depends on what was enabled for another.
    pub fn sample(cfg: &AugmentConfig, rng: &mut Rng, h: usize, w: usize) -> Self {
        let fh = rng.chance(0.5);
        let fv = rng.chance(0.5);
        let sx = rng.range(-1.0, 1.0);
        let sy = rng.range(-1.0, 1.0);
        let a = rng.range(-1.0, 1.0);
        let k = rng.f64();
        if !cfg.enabled {
            return Self::identity();
        }
        let (lo, hi) = if cfg.intensity_min <= cfg.intensity_max {
            (cfg.intensity_min, cfg.intensity_max)
        } else {
            (cfg.intensity_max, cfg.intensity_min)
        };
        let max_sx = cfg.max_shift_frac.abs() * w as f64;
        let max_sy = cfg.max_shift_frac.abs() * h as f64;
        Transform {
            flip_h: cfg.flip_h && fh,
            flip_v: cfg.flip_v && fv,
            shift_x: (sx * max_sx).round() as i64,
            shift_y: (sy * max_sy).round() as i64,
            angle_deg: a * cfg.max_rotate_deg.abs(),
            intensity: lo + (hi - lo) * k,
        }
    }

    /// The transform for sequence `index` of `epoch` in a run seeded with `seed`.
    pub fn for_sequence(
        cfg: &AugmentConfig,
        seed: u64,
        epoch: u64,
        index: u64,
        h: usize,
        w: usize,
    ) -> Self {
        let mut rng = Rng::new(mix_seed(seed, &[0xA06, epoch, index]));
        Self::sample(cfg, &mut rng, h, w)
    }

    pub fn is_identity(&self) -> bool {
        *self == Self::identity()
    }

    /// Applies the transform in place to `data` = `[planes, h, w]` (planes = slices x
    /// channels): every plane gets the same geometry and intensity.
    pub fn apply(
        &self,
        data: &mut [f32],
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<(), AugmentError> {
        let want = planes * h * w;
        if data.len() != want {
            return Err(AugmentError::Shape {
                got: data.len(),
                planes,
                h,
                w,
                want,
            });
        }
        if want == 0 {
            return Ok(());
        }
        let mut tmp = vec![0f32; h * w];
        for plane in data.chunks_exact_mut(h * w) {
            if self.flip_h {
                flip_h(plane, h, w);
            }
            if self.flip_v {
                flip_v(plane, h, w);
            }
            if self.angle_deg != 0.0 {
                rotate_shift(
                    plane,
                    &mut tmp,
                    h,
                    w,
                    self.angle_deg,
                    self.shift_x as f64,
                    self.shift_y as f64,
                );
                plane.copy_from_slice(&tmp);
            } else if self.shift_x != 0 || self.shift_y != 0 {
                shift_int(plane, &mut tmp, h, w, self.shift_x, self.shift_y);
                plane.copy_from_slice(&tmp);
            }
            if self.intensity != 1.0 {
                let k = self.intensity as f32;
                plane.iter_mut().for_each(|v| *v *= k);
            }
        }
        Ok(())
    }
}

/// Mirrors left-right.
pub fn flip_h(plane: &mut [f32], h: usize, w: usize) {
    for row in plane.chunks_exact_mut(w).take(h) {
        row.reverse();
    }
}

/// Mirrors top-bottom.
pub fn flip_v(plane: &mut [f32], h: usize, w: usize) {
    for y in 0..h / 2 {
        let (top, bottom) = plane.split_at_mut((h - 1 - y) * w);
        top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
    }
}

/// out(y, x) = in(y - dy, x - dx), zero outside: an exact integer translation.
fn shift_int(src: &[f32], out: &mut [f32], h: usize, w: usize, dx: i64, dy: i64) {
    out.iter_mut().for_each(|v| *v = 0.0);
    for y in 0..h as i64 {
        let sy = y - dy;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..w as i64 {
            let sx = x - dx;
            if sx >= 0 && sx < w as i64 {
                out[(y * w as i64 + x) as usize] = src[(sy * w as i64 + sx) as usize];
            }
        }
    }
}

/// Rotation by `angle_deg` about the centre followed by a shift, by inverse mapping with
/// bilinear interpolation; samples outside the image read as zero (air in every window).
fn rotate_shift(
    src: &[f32],
    out: &mut [f32],
    h: usize,
    w: usize,
    angle_deg: f64,
    dx: f64,
    dy: f64,
) {
    let (s, c) = angle_deg.to_radians().sin_cos();
    let cx = (w as f64 - 1.0) / 2.0;
    let cy = (h as f64 - 1.0) / 2.0;
    let at = |yy: i64, xx: i64| -> f64 {
        if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
            0.0
        } else {
            src[yy as usize * w + xx as usize] as f64
        }
    };
    for y in 0..h {
        for x in 0..w {
            // Undo the shift, then the rotation (rotate by -angle).
            let px = x as f64 - dx - cx;
            let py = y as f64 - dy - cy;
            let sx = c * px + s * py + cx;
            let sy = -s * px + c * py + cy;
            let x0 = sx.floor();
            let y0 = sy.floor();
            let fx = sx - x0;
            let fy = sy - y0;
            let (x0, y0) = (x0 as i64, y0 as i64);
            let v = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                + fy * ((1.0 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1));
            out[y * w + x] = v as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_seed_separates_paths() {
        assert_ne!(mix_seed(1, &[0, 1]), mix_seed(1, &[1, 0]));
        assert_ne!(mix_seed(1, &[0]), mix_seed(2, &[0]));
        assert_eq!(mix_seed(7, &[3, 4]), mix_seed(7, &[3, 4]));
    }

    #[test]
    fn flip_v_odd_height() {
        let mut p: Vec<f32> = (0..15).map(|v| v as f32).collect();
        flip_v(&mut p, 5, 3);
        assert_eq!(&p[..3], &[12.0, 13.0, 14.0]);
        assert_eq!(&p[6..9], &[6.0, 7.0, 8.0]);
    }
}
