//! One volume through a trained model: windows and resize to the model's input, stage-2
//! logits and CAM per slice (or the stage-1 ResNet-LSTM's slice probabilities), the CAM
//! upsampled to the native grid and min-max normalised on the backend, then the refinement
//! into a mask on the same backend ([`RefineOnBackend`]): only the slice probabilities, the
//! normalised CAM and the mask come back from a GPU.

use super::InferError;
use crate::data::sequence::{merge_scores, plan, SeqMode};
use crate::engine::cpu::CpuBackend;
use crate::engine::cuda::CudaBackend;
use crate::engine::{Backend, Real};
use crate::io::{Mask, Volume};
use crate::model::{checkpoint, CamKind, IchNet};
use crate::seg::{RefineConfig, RefineOutput};
use crate::train::checkpoint::{META_INPUT_SIZE, META_SLICES, META_SLICE_THRESHOLD};
use crate::train::prep::Prepared;
use ndarray::Array3;
use std::path::Path;

/// The refinement on the backend that holds the CAM: the CPU reference on the host, the
/// device kernels on a GPU. Both take the HU volume and the normalised CAM `[z, y, x]`.
pub trait RefineOnBackend: Backend<T = f32> {
    fn refine_buf(
        &self,
        hu: &Array3<f32>,
        cam_norm: &Self::Buf,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError>;
}

impl RefineOnBackend for CpuBackend<f32> {
    fn refine_buf(
        &self,
        hu: &Array3<f32>,
        cam_norm: &Vec<f32>,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError> {
        let cam = Array3::from_shape_vec(hu.dim(), cam_norm.clone())
            .map_err(|e| InferError::Input(format!("CAM shape: {e}")))?;
        Ok(crate::seg::refine(hu, &cam, slice_positive, cfg)?)
    }
}

impl RefineOnBackend for CudaBackend {
    fn refine_buf(
        &self,
        hu: &Array3<f32>,
        cam_norm: &Self::Buf,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError> {
        let host: Vec<f32> = hu.iter().copied().collect();
        let hu_dev = self.upload(&host)?;
        crate::engine::cuda::seg::refine_on_device(
            self,
            &hu_dev,
            cam_norm,
            hu.dim(),
            slice_positive,
            cfg,
        )
        .map_err(|e| match e {
            crate::engine::cuda::seg::DeviceSegError::Engine(e) => InferError::Engine(e),
            crate::engine::cuda::seg::DeviceSegError::Seg(e) => InferError::Seg(e),
        })
    }
}

/// Which net decides whether a slice holds blood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceClassifier {
    /// The stage-2 single-slice head (the authors' light test-time net).
    Stage2,
    /// The stage-1 ResNet-LSTM over sliding windows of slices (context from the neighbours).
    Stage1,
}

/// The knobs of test-time segmentation; `Default` is the authors' method.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    pub cam: CamKind,
    pub classifier: SliceClassifier,
    /// A slice is positive when its probability reaches this; `None` = the threshold the
    /// training calibrated on its validation slices (stored in the model, used when above
    /// 0.5), else 0.5.
    pub slice_threshold: Option<f64>,
    /// Components smaller than this many mL are dropped (overrides the voxel count of
    /// `refine` when set).
    pub min_component_ml: Option<f64>,
    /// Lower the k-means saturation level to just under the data's clip value when the
    /// volume is clipped below the subdural window's top (as the ct-ich release is, at
    /// 100 HU): otherwise clipped bone is the "brightest non-saturated" cluster.
    pub adapt_saturation: bool,
    pub refine: RefineConfig,
    /// Slices per forward pass (memory).
    pub batch_slices: usize,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            cam: CamKind::Vanilla,
            classifier: SliceClassifier::Stage2,
            slice_threshold: None,
            min_component_ml: Some(0.05),
            adapt_saturation: true,
            refine: RefineConfig::default(),
            batch_slices: 32,
        }
    }
}

/// The result for one volume, on the native grid.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// Probability of hemorrhage per slice.
    pub probabilities: Vec<f64>,
    pub positive: Vec<bool>,
    /// Normalised CAM `[z, y, x]` in [0, 1].
    pub cam: Array3<f32>,
    pub mask: Mask,
    pub n_components: usize,
    /// Hemorrhage volume in mL.
    pub volume_ml: f64,
    /// The saturation level the k-means used.
    pub saturation: f32,
}

/// A trained model ready to segment volumes on backend `B`.
pub struct Segmenter<B: RefineOnBackend> {
    net: IchNet<B>,
    size: usize,
    slices: usize,
    /// The slice threshold in use (the option, else the model's calibrated one, else 0.5).
    slice_threshold: f64,
    pub opts: SegmentOptions,
}

/// The saturation level for this volume: the configured one, or just under the clip value
/// of data clipped below 180 HU (the top of the 80/200 window).
pub fn effective_saturation(hu: &Array3<f32>, configured: f32) -> f32 {
    let max = hu
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || max >= 180.0 {
        return configured;
    }
    let at_max = hu.iter().filter(|&&v| v >= max - 0.5).count();
    // Clipped data piles up at its maximum; natural data does not (0.1 % of the voxels).
    if (at_max as f64) < 1e-3 * hu.len() as f64 {
        return configured;
    }
    configured.min(crate::data::window::Window::SUBDURAL.apply(max) - 0.025)
}

impl<B: RefineOnBackend> Segmenter<B> {
    /// Loads a model written by `ichcam train` (it records the input size it was trained at).
    pub fn load(backend: B, model: &Path, opts: SegmentOptions) -> Result<Self, InferError> {
        let (net, loaded) = checkpoint::load(backend, model)?;
        let get = |k: &str| -> Result<usize, InferError> {
            loaded
                .metadata
                .get(k)
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| InferError::ModelMetadata {
                    path: model.to_path_buf(),
                    detail: format!(
                        "no `{k}` in the metadata: is this a model written by `ichcam train`?"
                    ),
                })
        };
        let size = get(META_INPUT_SIZE)?;
        let slices = get(META_SLICES)?;
        super::memory::check_model_metadata(model, net.cfg(), size, slices)?;
        let calibrated = loaded
            .metadata
            .get(META_SLICE_THRESHOLD)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|t| (0.0..=1.0).contains(t));
        // pos_weight > 1 only pushes the head's probabilities up, so the calibration may raise
        // the cut above 0.5 but never lowers it: a lower Youden cut comes from a small
        // validation set's gap and calls more slices positive on new volumes.
        let slice_threshold = opts
            .slice_threshold
            .or(calibrated.map(|t| t.max(0.5)))
            .unwrap_or(0.5);
        Ok(Segmenter {
            net,
            size,
            slices,
            slice_threshold,
            opts,
        })
    }

    /// The slice probability threshold in use.
    pub fn slice_threshold(&self) -> f64 {
        self.slice_threshold
    }

    /// The model's square input size.
    pub fn input_size(&self) -> usize {
        self.size
    }

    /// The slices per sequence of the stage-1 classifier.
    pub fn sequence_slices(&self) -> usize {
        self.slices
    }

    pub fn model_config(&self) -> &crate::model::ModelConfig {
        self.net.cfg()
    }

    /// The refinement's settings for `vol` (its spacing and, when adapted, its saturation).
    pub fn refine_config(&self, vol: &Volume) -> RefineConfig {
        let mut cfg = self.opts.refine.clone();
        if let Some(ml) = self.opts.min_component_ml {
            cfg = cfg.with_min_component_ml(ml, vol.spacing);
        }
        if self.opts.adapt_saturation {
            cfg.saturation = effective_saturation(&vol.data, cfg.saturation);
        }
        cfg
    }

    pub fn backend(&self) -> &B {
        self.net.backend()
    }

    /// Segments one volume.
    pub fn segment(&mut self, vol: &Volume) -> Result<Segmentation, InferError> {
        let (d, h, w) = vol.dims();
        if d == 0 || h == 0 || w == 0 {
            return Err(InferError::Input(format!(
                "{}: empty volume",
                vol.source.display()
            )));
        }
        let s = self.size;
        let labels = vec![false; d];
        let prep = Prepared::from_hu("volume", "volume", &vol.data, &labels, s)
            .map_err(|e| InferError::Input(format!("{}: {e}", vol.source.display())))?;
        let plane = 3 * s * s;
        let batch = self.opts.batch_slices.max(1);
        let mut logits = Vec::with_capacity(d);
        let mut cam_small: Vec<f32> = Vec::new();
        let mut fhw = (0, 0);
        self.net.set_train(false);
        for z0 in (0..d).step_by(batch) {
            let n = batch.min(d - z0);
            let x = &prep.x[z0 * plane..(z0 + n) * plane];
            let xb = self.net.backend().upload(x)?;
            let out = self.net.stage2_infer_device(&xb, n, s, s, self.opts.cam)?;
            let be = self.net.backend();
            logits.extend(be.download(&out.logits)?.into_iter().map(|v| v.as_f64()));
            cam_small.extend(be.download(&out.cam)?);
            fhw = out.features_hw;
        }
        if self.opts.classifier == SliceClassifier::Stage1 {
            logits = self.stage1_logits(&prep.x, d)?;
        }
        let probabilities: Vec<f64> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let positive: Vec<bool> = probabilities
            .iter()
            .map(|&p| p >= self.slice_threshold)
            .collect();

        // Feature-resolution CAM -> native grid -> [0, 1] per slice, on the backend.
        let be = self.net.backend();
        let cam_b = be.upload(&cam_small)?;
        let mut up = be.zeros(d * h * w)?;
        be.upsample_bilinear(d, fhw.0, fhw.1, h, w, &cam_b, &mut up)?;
        drop(cam_b);
        let mut norm = be.zeros(d * h * w)?;
        be.minmax_normalize(d, h * w, &up, &mut norm)?;
        drop(up);

        let cfg = self.refine_config(vol);
        let refined = be.refine_buf(&vol.data, &norm, &positive, &cfg)?;
        let cam = Array3::from_shape_vec((d, h, w), be.download(&norm)?)
            .map_err(|e| InferError::Input(format!("CAM shape: {e}")))?;
        let voxels = refined.mask.iter().filter(|&&v| v != 0).count();
        Ok(Segmentation {
            probabilities,
            positive,
            cam,
            n_components: refined.n_components,
            volume_ml: voxels as f64 * vol.voxel_ml(),
            mask: refined.mask,
            saturation: cfg.saturation,
        })
    }

    /// Stage-1 logits per slice: sliding windows of the trained sequence length, the
    /// overlapping predictions averaged.
    fn stage1_logits(&mut self, x: &[f32], d: usize) -> Result<Vec<f64>, InferError> {
        let s = self.size;
        let plane = 3 * s * s;
        let windows = plan(
            d,
            self.slices,
            SeqMode::Sliding {
                stride: (self.slices / 2).max(1),
            },
        )?;
        let mut preds = Vec::with_capacity(windows.len());
        for win in &windows {
            let mut seq = Vec::with_capacity(win.len() * plane);
            for &z in &win.z {
                seq.extend_from_slice(&x[z * plane..(z + 1) * plane]);
            }
            let l = self.net.stage1_logits(&seq, 1, win.len(), s, s)?;
            preds.push(l.into_iter().map(|v| v as f32).collect::<Vec<f32>>());
        }
        let (merged, _) = merge_scores(d, &windows, &preds)?;
        Ok(merged.into_iter().map(f64::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::effective_saturation;
    use ndarray::Array3;

    #[test]
    fn saturation_drops_below_the_clip_of_clipped_data_only() {
        // Brain-windowed data clipped at 100 HU, bone piled up at the clip value.
        let mut clipped = Array3::<f32>::from_elem((2, 20, 20), 35.0);
        clipped.slice_mut(ndarray::s![.., 0..4, ..]).fill(100.0);
        let s = effective_saturation(&clipped, 0.6);
        assert!((s - 0.575).abs() < 1e-6, "{s}");
        // Natural CT reaches far past the window's top: unchanged.
        let mut natural = clipped.clone();
        natural[[0, 0, 0]] = 1200.0;
        assert_eq!(effective_saturation(&natural, 0.6), 0.6);
        // A maximum below 180 HU that is not piled up (no clipping): unchanged.
        let mut soft = Array3::<f32>::from_elem((2, 40, 40), 35.0);
        soft[[1, 5, 5]] = 90.0;
        assert_eq!(effective_saturation(&soft, 0.6), 0.6);
    }
}
