//! HU windows, each mapped linearly to [0, 1] and clamped: the method's three (brain 40/80,
//! subdural 80/200, bone 600/2800) stacked into the authors' 3-channel input `[z, 3, y, x]`,
//! and the windows that suit brain-windowed data (blood 70/40, wide 40/120) for any list of
//! channels. Knows nothing about the network beyond the channel order.

use ndarray::{Array3, Array4, ArrayView2, ArrayView3, Axis, Zip};
use rayon::prelude::*;

/// A display window: HU in `[level - width/2, level + width/2]` maps linearly to `[0, 1]`;
/// values outside are clamped.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub level: f32,
    pub width: f32,
}

impl Window {
    /// Brain window, level 40 / width 80.
    pub const BRAIN: Window = Window {
        level: 40.0,
        width: 80.0,
    };
    /// Subdural window, level 80 / width 200 (the pseudo-mask's k-means works on it).
    pub const SUBDURAL: Window = Window {
        level: 80.0,
        width: 200.0,
    };
    /// Bone window, level 600 / width 2800.
    pub const BONE: Window = Window {
        level: 600.0,
        width: 2800.0,
    };
    /// Acute blood, level 70 / width 40 (50-90 HU): brain and CSF go to 0, bone and
    /// calcification to 1, blood spreads over the range.
    pub const BLOOD: Window = Window {
        level: 70.0,
        width: 40.0,
    };
    /// The whole range of brain-windowed data, level 40 / width 120 (-20 to 100 HU: what
    /// the ct-ich release keeps; bone and air saturate at its ends).
    pub const WIDE: Window = Window {
        level: 40.0,
        width: 120.0,
    };
    /// The authors' input channels, in order.
    pub const METHOD: [Window; 3] = [Window::BRAIN, Window::SUBDURAL, Window::BONE];

    /// Lowest HU of the window (maps to 0).
    pub fn lo(&self) -> f32 {
        self.level - 0.5 * self.width
    }
    /// Highest HU of the window (maps to 1).
    pub fn hi(&self) -> f32 {
        self.level + 0.5 * self.width
    }

    /// One HU value to `[0, 1]`. NaN stays NaN (a corrupt voxel should be visible, not hidden
    /// as 0). A non-positive width degenerates to a threshold at `level`.
    #[inline]
    pub fn apply(&self, hu: f32) -> f32 {
        if self.width <= 0.0 {
            return if hu.is_nan() {
                hu
            } else if hu >= self.level {
                1.0
            } else {
                0.0
            };
        }
        ((hu - self.lo()) / self.width).clamp(0.0, 1.0)
    }

    /// Back from `[0, 1]` to HU (the window's linear part; clamped values do not come back).
    pub fn invert(&self, v: f32) -> f32 {
        self.lo() + v * self.width
    }

    /// The window applied to every voxel of a `[z, y, x]` volume (or any 3-D array).
    pub fn apply_volume(&self, hu: ArrayView3<f32>) -> Array3<f32> {
        hu.mapv(|v| self.apply(v))
    }
}

/// The method's input for a whole volume: HU `[z, y, x]` -> `[z, 3, y, x]` with channels
/// brain, subdural, bone ([`Window::METHOD`]).
pub fn windows3(hu: ArrayView3<f32>) -> Array4<f32> {
    windows_n(&Window::METHOD, hu)
}

/// The method's input for one slice: HU `[y, x]` -> `[3, y, x]`.
pub fn windows3_slice(hu: ArrayView2<f32>) -> Array3<f32> {
    let (h, w) = hu.dim();
    let mut out = Array3::<f32>::zeros((3, h, w));
    for (c, win) in Window::METHOD.iter().enumerate() {
        Zip::from(out.index_axis_mut(Axis(0), c))
            .and(&hu)
            .for_each(|o, &v| *o = win.apply(v));
    }
    out
}

/// Any list of windows: HU `[z, y, x]` -> `[z, windows.len(), y, x]`.
pub fn windows_n(windows: &[Window], hu: ArrayView3<f32>) -> Array4<f32> {
    let (d, h, w) = hu.dim();
    let c = windows.len();
    let mut buf = vec![0.0f32; d * c * h * w];
    if h * w > 0 && c > 0 {
        buf.par_chunks_mut(c * h * w)
            .enumerate()
            .for_each(|(z, chunk)| {
                let s = hu.index_axis(Axis(0), z);
                for (win, plane) in windows.iter().zip(chunk.chunks_mut(h * w)) {
                    for (o, &v) in plane.iter_mut().zip(s.iter()) {
                        *o = win.apply(v);
                    }
                }
            });
    }
    // The buffer has exactly d*c*h*w elements in standard order.
    Array4::from_shape_vec((d, c, h, w), buf).unwrap_or_else(|_| Array4::zeros((d, c, h, w)))
}
