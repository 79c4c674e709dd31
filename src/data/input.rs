//! How a HU volume becomes the model's input, in one place for training and segmentation:
//! the channel windows, the optional crop to the head's box (one square box per volume),
//! and the in-plane resize to the model's size. [`InputSpec`] is stored in the model file,
//! so a model is always fed the way it was trained. Knows nothing about the network.

use super::crop::{extract, head_box, CropBox};
use super::resample::{resize_stack, ResizeMode};
use super::window::{windows_n, Window};
use super::DataError;
use ndarray::{Array3, ArrayView3, Axis};

/// The input's recipe.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputSpec {
    /// One channel per window, in order (the model's `in_channels`).
    pub windows: Vec<Window>,
    /// Crop every slice to the head's square box (grown by `crop_margin` of its side on
    /// each side) before resizing; `false` = the whole field.
    pub crop_head: bool,
    pub crop_margin: f64,
}

impl Default for InputSpec {
    /// The authors' input: brain, subdural and bone windows of the whole field.
    fn default() -> Self {
        InputSpec {
            windows: Window::METHOD.to_vec(),
            crop_head: false,
            crop_margin: 0.0,
        }
    }
}

impl InputSpec {
    /// For brain-windowed head CT (ct-ich: saturated at -20 and 100 HU): brain 40/80, blood
    /// 70/40 and wide 40/120 windows (the subdural and bone windows carry little or
    /// nothing there), cropped to the head with a 4 % margin.
    pub fn head_ct() -> Self {
        InputSpec {
            windows: vec![Window::BRAIN, Window::BLOOD, Window::WIDE],
            crop_head: true,
            crop_margin: 0.04,
        }
    }

    pub fn channels(&self) -> usize {
        self.windows.len()
    }

    /// The box the model sees of a `[z, y, x]` volume: the head's box, or the whole field
    /// (also when no head is found).
    pub fn crop_box(&self, hu: ArrayView3<f32>) -> CropBox {
        let (_, h, w) = hu.dim();
        if self.crop_head {
            head_box(hu, self.crop_margin).unwrap_or_else(|| CropBox::full(h, w))
        } else if h == w {
            CropBox::full(h, w)
        } else {
            // Without cropping the slice is resized as it is (not padded to a square).
            CropBox {
                y0: 0,
                x0: 0,
                side: 0,
            }
        }
    }

    /// The model's input of a `[z, y, x]` HU volume ([`InputSpec::prepare`]), checked: an
    /// empty volume, a recipe without windows and a non-finite value after windowing are
    /// errors.
    pub fn model_input(&self, hu: ArrayView3<f32>, size: usize) -> Result<ModelInput, DataError> {
        let (d, h, w) = hu.dim();
        if d == 0 || h == 0 || w == 0 {
            return Err(DataError::Invalid(format!("empty volume {:?}", hu.dim())));
        }
        let channels = self.channels();
        if channels == 0 {
            return Err(DataError::Invalid(
                "the input has no channel windows".into(),
            ));
        }
        let (x, crop) = self.prepare(hu, size);
        if let Some(bad) = x.iter().position(|v| !v.is_finite()) {
            return Err(DataError::Invalid(format!(
                "non-finite voxel after windowing (slice {})",
                bad / (channels * size * size)
            )));
        }
        Ok(ModelInput {
            x,
            depth: d,
            channels,
            crop,
        })
    }

    /// `[z, channels, size, size]` row-major, and the box it was cut from (`side` 0: the
    /// whole, possibly non-square, field resized). Area averaging when shrinking,
    /// bilinear when enlarging.
    pub fn prepare(&self, hu: ArrayView3<f32>, size: usize) -> (Vec<f32>, CropBox) {
        let b = self.crop_box(hu);
        (self.prepare_in(hu, b, air_value(hu), size), b)
    }

    /// [`InputSpec::prepare`] in a given box, `fill` outside the field: slice by slice, so
    /// any range of slices gets the values the whole volume would (with the whole volume's
    /// box and [`air_value`]).
    pub fn prepare_in(&self, hu: ArrayView3<f32>, b: CropBox, fill: f32, size: usize) -> Vec<f32> {
        let d = hu.dim().0;
        let c = self.channels();
        let mut x = Vec::with_capacity(d * c * size * size);
        // Slice chunks keep the full-resolution windowed copy small.
        for chunk in hu.axis_chunks_iter(Axis(0), 8) {
            let cropped: Array3<f32>;
            let view = if b.side == 0 {
                chunk
            } else {
                cropped = extract(chunk, b, fill);
                cropped.view()
            };
            let (_, ih, iw) = view.dim();
            let mode = if ih >= size && iw >= size {
                ResizeMode::Area
            } else {
                ResizeMode::Bilinear
            };
            let win = windows_n(&self.windows, view);
            let r = resize_stack(win.view(), size, size, mode);
            x.extend(r.iter().copied());
        }
        x
    }
}

/// Air outside the field: the volume's lowest finite value (-1000 when it has none).
pub fn air_value(hu: ArrayView3<f32>) -> f32 {
    let fill = hu.iter().copied().fold(f32::INFINITY, f32::min);
    if fill.is_finite() {
        fill
    } else {
        -1000.0
    }
}

/// A volume as the model sees it: `x` is `[depth, channels, size, size]`, row-major.
#[derive(Clone, Debug)]
pub struct ModelInput {
    pub x: Vec<f32>,
    pub depth: usize,
    pub channels: usize,
    /// The box of the native slice the input was cut from (see [`InputSpec::prepare`]).
    pub crop: CropBox,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_authors_whole_field() {
        let hu = Array3::<f32>::from_elem((2, 32, 32), 40.0);
        let s = InputSpec::default();
        let (x, b) = s.prepare(hu.view(), 16);
        assert_eq!(x.len(), 2 * 3 * 16 * 16);
        assert_eq!(b, CropBox::full(32, 32));
        assert!((x[0] - 0.5).abs() < 1e-6);
        let j = serde_json::to_string(&InputSpec::head_ct()).unwrap();
        let back: InputSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, InputSpec::head_ct());
    }

    #[test]
    fn head_crop_zooms_in() {
        // A 20-px square head in a 64-px field of air: the crop fills the input with it.
        let mut hu = Array3::<f32>::from_elem((1, 64, 64), -20.0);
        hu.slice_mut(ndarray::s![.., 20..40, 24..44]).fill(60.0);
        let s = InputSpec::head_ct();
        let (x, b) = s.prepare(hu.view(), 16);
        assert!(b.side < 40 && b.side >= 20, "{b:?}");
        // Blood window of 60 HU = 0.25 at the centre of the input.
        let blood = &x[16 * 16..2 * 16 * 16];
        assert!((blood[8 * 16 + 8] - 0.25).abs() < 1e-5);
    }
}
