//! One volume through a trained model: the model's input as it was trained (windows, head
//! crop, resize: the model file's [`InputSpec`]), stage-2 logits and CAM per slice (or the
//! stage-1 ResNet-LSTM's slice probabilities), the CAM upsampled to the crop box (or the
//! native grid) and min-max normalised on the backend, placed back into the native field,
//! then the refinement into a mask on the same backend ([`RefineOnBackend`]).
//! Development oracles (`SegmentOptions::oracle`) replace the CAM or the slice flags with
//! ones made from the truth masks, to measure the refinement's ceiling; they read masks
//! only when asked to.

use super::InferError;
use crate::data::crop::{self, CropBox};
use crate::data::resample::{resize_volume, ResizeMode};
use crate::data::sequence::{merge_scores, plan, SeqMode};
use crate::data::InputSpec;
use crate::engine::cpu::CpuBackend;
use crate::engine::cuda::CudaBackend;
use crate::engine::{Backend, Real};
use crate::io::{Mask, Volume};
use crate::model::meta::{MetaError, META_INPUT};
use crate::model::{checkpoint, CamKind, HeadPooling, IchNet, ModelMeta};
use crate::seg::{RefineConfig, RefineOutput};
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
        Ok(crate::seg::refine::refine_on(
            self,
            hu,
            cam_norm,
            slice_positive,
            cfg,
        )?)
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

/// Development oracles: a folder of truth masks (`<id>.nii[.gz]`, the id being the input
/// file's name) from which the CAM and/or the slice flags are made instead of the model's.
#[derive(Clone, Debug, Default)]
pub struct Oracle {
    pub truth_dir: std::path::PathBuf,
    /// The CAM is the truth mask averaged down to the CAM's grid (over the model's input
    /// box) and brought back up like a real CAM: the best a CAM of that resolution can do.
    pub cam: bool,
    /// A slice is positive when its truth mask holds a voxel.
    pub flags: bool,
}

/// The knobs of test-time segmentation; `Default` is the authors' method.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    pub cam: CamKind,
    /// Average the CAM (and the slice logits) of each slice and of its left-right mirror.
    pub flip_tta: bool,
    /// A volume whose most probable slice stays below this has no positive slice (volume
    /// gating against false-positive volumes); `None` = off.
    pub volume_threshold: Option<f64>,
    pub oracle: Option<Oracle>,
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
            flip_tta: false,
            volume_threshold: None,
            oracle: None,
            classifier: SliceClassifier::Stage2,
            slice_threshold: None,
            min_component_ml: Some(0.05),
            adapt_saturation: true,
            refine: RefineConfig::default(),
            batch_slices: 32,
        }
    }
}

impl SegmentOptions {
    /// `ichcam segment`'s defaults: the refinement chosen for real CT by 5-fold patient
    /// cross-validation on ct-ich (docs/accuracy.md: binary CAM at 0.4, growth to 0.1, a
    /// band floor of 55 HU, an opening of radius 2, components of at least 0.3 mL) and the
    /// stage-1 slice classifier; the rest as [`SegmentOptions::default`] (the demo's
    /// phantom-tuned settings).
    pub fn real_ct() -> Self {
        let d = SegmentOptions::default();
        SegmentOptions {
            classifier: SliceClassifier::Stage1,
            min_component_ml: Some(0.3),
            refine: RefineConfig {
                cam_threshold: 0.4,
                grow_cam_threshold: 0.1,
                band_floor_hu: Some(55.0),
                open_radius: 2,
                ..d.refine.clone()
            },
            ..d
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
    input: InputSpec,
    /// How the stage-2 head pools its class map, and its bias (the logit of a pooled head
    /// is computed from the CAM at feature resolution).
    pooling: HeadPooling,
    fc_bias: f64,
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
        let bad = |e: MetaError| InferError::ModelMetadata {
            path: model.to_path_buf(),
            detail: e.to_string(),
        };
        let meta = ModelMeta::read(&loaded.metadata).map_err(bad)?;
        let (size, slices) = (meta.input_size, meta.slices);
        super::memory::check_model_metadata(model, net.cfg(), size, slices)?;
        // pos_weight > 1 only pushes the head's probabilities up, so the calibration may raise
        // the cut above 0.5 but never lowers it: a lower Youden cut comes from a small
        // validation set's gap and calls more slices positive on new volumes.
        let slice_threshold = opts
            .slice_threshold
            .or(meta.slice_threshold.map(|t| t.max(0.5)))
            .unwrap_or(0.5);
        let input: InputSpec = meta.input().map_err(bad)?.unwrap_or_default();
        if input.channels() != net.cfg().in_channels {
            return Err(InferError::ModelMetadata {
                path: model.to_path_buf(),
                detail: format!(
                    "`{META_INPUT}` lists {} windows but the network takes {} channels",
                    input.channels(),
                    net.cfg().in_channels
                ),
            });
        }
        let pooling = meta.head_pooling;
        let fc_bias = net
            .param("fc.bias")?
            .first()
            .map(|v| v.as_f64())
            .unwrap_or(0.0);
        Ok(Segmenter {
            net,
            size,
            slices,
            input,
            pooling,
            fc_bias,
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

    /// The input recipe the model was trained with.
    pub fn input_spec(&self) -> &InputSpec {
        &self.input
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
        let prep = self
            .input
            .model_input(vol.data.view(), s)
            .map_err(|e| InferError::Input(format!("{}: {e}", vol.source.display())))?;
        let ch = prep.channels;
        let plane = ch * s * s;
        let batch = self.opts.batch_slices.max(1);
        let mut logits = Vec::with_capacity(d);
        let mut cam_small: Vec<f32> = Vec::new();
        let mut fhw = (0, 0);
        self.net.set_train(false);
        for z0 in (0..d).step_by(batch) {
            let n = batch.min(d - z0);
            let x = &prep.x[z0 * plane..(z0 + n) * plane];
            let (l, c, hw) = self.stage2_pass(x, n)?;
            if self.opts.flip_tta {
                let mut xf = x.to_vec();
                for p in xf.chunks_exact_mut(s * s) {
                    flip_h(p, s);
                }
                let (lf, mut cf, _) = self.stage2_pass(&xf, n)?;
                for m in cf.chunks_exact_mut(hw.0 * hw.1) {
                    flip_h(m, hw.1);
                }
                logits.extend(l.iter().zip(&lf).map(|(a, b)| 0.5 * (a + b)));
                cam_small.extend(c.iter().zip(&cf).map(|(a, b)| 0.5 * (a + b)));
            } else {
                logits.extend(l);
                cam_small.extend(c);
            }
            fhw = hw;
        }
        if self.opts.classifier == SliceClassifier::Stage1 {
            logits = self.stage1_logits(&prep.x, d, ch)?;
        }
        let probabilities: Vec<f64> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let mut positive: Vec<bool> = probabilities
            .iter()
            .map(|&p| p >= self.slice_threshold)
            .collect();
        if let Some(t) = self.opts.volume_threshold {
            if probabilities.iter().copied().fold(0.0, f64::max) < t {
                positive.iter_mut().for_each(|p| *p = false);
            }
        }
        if let Some(o) = self.opts.oracle.clone() {
            let truth = read_oracle(&o, vol)?;
            if o.flags {
                for (z, p) in positive.iter_mut().enumerate() {
                    *p = truth
                        .index_axis(ndarray::Axis(0), z)
                        .iter()
                        .any(|&v| v != 0);
                }
            }
            if o.cam {
                cam_small = oracle_cam(&truth, prep.crop, fhw);
            }
        }

        // Feature-resolution CAM -> model's box -> [0, 1] per slice, on the backend.
        let be = self.net.backend();
        let b = prep.crop;
        let (uh, uw) = if b.side == 0 {
            (h, w)
        } else {
            (b.side, b.side)
        };
        let cam_b = be.upload(&cam_small)?;
        let mut up = be.zeros(d * uh * uw)?;
        be.upsample_bilinear(d, fhw.0, fhw.1, uh, uw, &cam_b, &mut up)?;
        drop(cam_b);
        let mut norm = be.zeros(d * uh * uw)?;
        be.minmax_normalize(d, uh * uw, &up, &mut norm)?;
        drop(up);
        // The box back into the native field (outside the box: 0).
        let norm = if b.side == 0 {
            norm
        } else {
            let boxed = Array3::from_shape_vec((d, uh, uw), be.download(&norm)?)
                .map_err(|e| InferError::Input(format!("CAM shape: {e}")))?;
            let mut full = Vec::with_capacity(d * h * w);
            for z in 0..d {
                let p = crop::place(boxed.index_axis(ndarray::Axis(0), z), b, h, w, 0.0);
                full.extend(p.iter().copied());
            }
            be.upload(&full)?
        };

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

    /// Stage-2 logits and feature-resolution CAM of `n` prepared slices.
    fn stage2_pass(&mut self, x: &[f32], n: usize) -> Result<Stage2Pass, InferError> {
        let s = self.size;
        let xb = self.net.backend().upload(x)?;
        let out = self.net.stage2_infer_device(&xb, n, s, s, self.opts.cam)?;
        let be = self.net.backend();
        let cam = be.download(&out.cam)?;
        let l = if self.pooling == HeadPooling::Mean {
            be.download(&out.logits)?
                .into_iter()
                .map(|v| v.as_f64())
                .collect()
        } else {
            let hw = out.features_hw.0 * out.features_hw.1;
            cam.chunks_exact(hw.max(1))
                .map(|m| self.pooling.pool(m).0 + self.fc_bias)
                .collect()
        };
        Ok((l, cam, out.features_hw))
    }

    /// Stage-1 logits per slice: sliding windows of the trained sequence length, the
    /// overlapping predictions averaged.
    fn stage1_logits(&mut self, x: &[f32], d: usize, ch: usize) -> Result<Vec<f64>, InferError> {
        let s = self.size;
        let plane = ch * s * s;
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

/// Stage-2 logits, the feature-resolution CAM and its `(fh, fw)`.
type Stage2Pass = (Vec<f64>, Vec<f32>, (usize, usize));

/// Mirrors the rows of a row-major plane of width `w` left-right.
fn flip_h(plane: &mut [f32], w: usize) {
    for row in plane.chunks_exact_mut(w.max(1)) {
        row.reverse();
    }
}

/// The truth mask of `vol` from the oracle's folder (`<id>.nii[.gz]`), same shape.
fn read_oracle(o: &Oracle, vol: &Volume) -> Result<Mask, InferError> {
    let name = vol
        .source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name);
    let path = [".nii.gz", ".nii"]
        .iter()
        .map(|e| o.truth_dir.join(format!("{id}{e}")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            InferError::Input(format!(
                "oracle: no truth mask for `{id}` in {}",
                o.truth_dir.display()
            ))
        })?;
    let m = crate::io::to_mask(&crate::io::read_mask(&path)?);
    if m.dim() != vol.data.dim() {
        return Err(InferError::Input(format!(
            "oracle: {} has shape {:?}, the volume {:?}",
            path.display(),
            m.dim(),
            vol.data.dim()
        )));
    }
    Ok(m)
}

/// The oracle CAM at feature resolution: the truth mask over the model's input box,
/// averaged down to the CAM's `fh x fw` grid (a real CAM's best case).
fn oracle_cam(truth: &Mask, b: CropBox, (fh, fw): (usize, usize)) -> Vec<f32> {
    let t = truth.mapv(|v| f32::from(u8::from(v != 0)));
    let boxed = if b.side == 0 {
        t
    } else {
        crop::extract(t.view(), b, 0.0)
    };
    resize_volume(boxed.view(), fh, fw, ResizeMode::Area)
        .iter()
        .copied()
        .collect()
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
