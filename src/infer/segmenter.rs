//! One volume through a trained model, in two parts. At the model's resolution, on the
//! whole volume ([`Segmenter::model_pass`]): the model's input as it was trained (windows,
//! one head crop box per volume, resize: the model file's [`InputSpec`]), stage-2 logits and
//! the CAM at the features' resolution per slice (or the stage-1 ResNet-LSTM's slice
//! probabilities), the slice flags, and the stage-3 U-Net's probabilities when the model
//! has one. At the native resolution, for any range of slices ([`Segmenter::native_maps`]):
//! the CAM upsampled to the crop box, min-max normalised and placed into the field, the
//! U-Net's map the same way without normalising ([`crate::seg::field`]). Then the
//! refinement into a mask on the backend ([`RefineOnBackend`]), of the CAM, of the U-Net's
//! map, or of both ORed (`--fuse`), and the connected-component filter.
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
use crate::model::meta::{MetaError, META_INPUT, META_INPUT_SIZE};
use crate::model::unet::{SecondHandle, UNet};
use crate::model::{checkpoint, CamKind, HeadPooling, IchNet, ModelMeta};
use crate::seg::{RefineConfig, RefineOutput};
use ndarray::Array3;
use std::path::Path;

/// The refinement ([`crate::seg::refine_on`], written once over the engine's volume ops) on
/// the backend that holds the CAM: the CPU reference on the host, the device kernels on a
/// GPU. Both take the HU volume (on the host) and the normalised CAM `[z, y, x]`.
pub trait RefineOnBackend: Backend<T = f32> + SecondHandle {
    fn refine_buf(
        &self,
        hu: &Array3<f32>,
        cam_norm: &Self::Buf,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError>;

    /// [`RefineOnBackend::refine_buf`] of a map on the host (uploaded first on a device).
    fn refine_host(
        &self,
        hu: &Array3<f32>,
        map: &Array3<f32>,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError> {
        let host = map.as_standard_layout();
        let buf = self.upload(host.as_slice().unwrap_or(&[]))?;
        self.refine_buf(hu, &buf, slice_positive, cfg)
    }
}

impl RefineOnBackend for CpuBackend<f32> {
    fn refine_buf(
        &self,
        hu: &Array3<f32>,
        cam_norm: &Vec<f32>,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError> {
        Ok(crate::seg::refine_on(
            self,
            hu,
            cam_norm.as_slice(),
            slice_positive,
            cfg,
        )?)
    }

    fn refine_host(
        &self,
        hu: &Array3<f32>,
        map: &Array3<f32>,
        slice_positive: &[bool],
        cfg: &RefineConfig,
    ) -> Result<RefineOutput, InferError> {
        Ok(crate::seg::refine(hu, map, slice_positive, cfg)?)
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
        Ok(crate::seg::refine_on(
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

/// How the stage-3 U-Net's mask and the CAM's combine (`--fuse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fuse {
    /// The CAM's refinement alone (the U-Net's map is still computed and written).
    Cam,
    /// The refinement with the U-Net's probability in the CAM's place (thresholds
    /// `unet_threshold` and `unet_grow`): the U-Net says where, the intensity band and the
    /// components' rules cut the native-resolution mask.
    Unet,
    /// The union of the two masks (the authors' test time: U-Net OR CAM pseudo-mask).
    Or,
}

impl Fuse {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cam" => Some(Fuse::Cam),
            "unet" => Some(Fuse::Unet),
            "or" => Some(Fuse::Or),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fuse::Cam => "cam",
            Fuse::Unet => "unet",
            Fuse::Or => "or",
        }
    }
}

/// The fuse of a model with a U-Net when none is asked for (docs/accuracy.md).
pub const DEFAULT_FUSE: Fuse = Fuse::Unet;
/// With a U-Net, components on fewer slices are dropped (docs/accuracy.md).
pub const DEFAULT_MIN_COMPONENT_SLICES: usize = 2;
/// The U-Net's probability where its refinement looks for the blood cluster (the CAM's
/// `cam_threshold`), and the level the lesion may grow to (the CAM's `grow_cam_threshold`).
pub const DEFAULT_UNET_THRESHOLD: f32 = 0.5;
pub const DEFAULT_UNET_GROW: f32 = 0.3;

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

/// The knobs of test-time segmentation; `Default` is the authors' method (with the
/// phantom-tuned refinement), [`SegmentOptions::real_ct`] `ichcam segment`'s defaults.
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
    /// With a stage-3 U-Net in the model: how its mask and the CAM's combine (`None`:
    /// [`DEFAULT_FUSE`]); without one only `Cam` is possible.
    pub fuse: Option<Fuse>,
    /// The U-Net map's levels in its refinement (see [`DEFAULT_UNET_THRESHOLD`]).
    pub unet_threshold: f32,
    pub unet_grow: f32,
    /// After our refinement with a stage-3 U-Net (`--fuse unet` or `or`): drop the
    /// components that pair with another across the head's midline
    /// ([`crate::seg::mirror`]); `None` = off (never with `Fuse::Cam` or the authors' mode).
    pub mirror: Option<crate::seg::MirrorFilter>,
    /// After our refinement: drop the components that reach outside the skull
    /// ([`crate::seg::skull`]); `None` = off (the authors' mode never filters).
    pub skull: Option<crate::seg::SkullFilter>,
    /// After our refinement with a stage-3 U-Net (`--fuse unet` or `or`): drop the
    /// components on fewer slices than this (1 = off; never with `Fuse::Cam`, where it was
    /// measured to cost Dice).
    pub min_component_slices: usize,
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
            fuse: None,
            unet_threshold: DEFAULT_UNET_THRESHOLD,
            unet_grow: DEFAULT_UNET_GROW,
            mirror: None,
            skull: None,
            min_component_slices: 1,
        }
    }
}

impl SegmentOptions {
    /// `ichcam segment`'s defaults, chosen on real head CT by cross-validation
    /// (docs/accuracy.md): the stage-1 slice flags and the real-CT refinement
    /// ([`RefineConfig::real_ct`], components of at least 0.3 mL), the filter of the
    /// components outside the skull (the mirror-pair filter is off: it added nothing to it)
    /// and, with a U-Net, of the components on a single slice.
    pub fn real_ct() -> Self {
        SegmentOptions {
            classifier: SliceClassifier::Stage1,
            skull: Some(crate::seg::SkullFilter::default()),
            min_component_slices: DEFAULT_MIN_COMPONENT_SLICES,
            min_component_ml: Some(crate::seg::refine::REAL_CT_MIN_COMPONENT_ML),
            refine: RefineConfig::real_ct(),
            ..SegmentOptions::default()
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
    /// The stage-3 U-Net's probability `[z, y, x]` on every slice (flagged or not), when the
    /// model has a U-Net.
    pub unet: Option<Array3<f32>>,
    pub mask: Mask,
    pub n_components: usize,
    /// Hemorrhage volume in mL.
    pub volume_ml: f64,
    /// The saturation level the k-means used.
    pub saturation: f32,
}

/// The model-resolution part of one volume's segmentation (the whole volume): what the
/// native-resolution part needs, and nothing at the native resolution.
#[derive(Clone, Debug)]
pub struct ModelPass {
    pub probabilities: Vec<f64>,
    pub positive: Vec<bool>,
    /// The CAM at the features' resolution `[d, fh, fw]` (not normalised).
    pub cam_small: Vec<f32>,
    pub features_hw: (usize, usize),
    /// The U-Net's probabilities `[d, size, size]` over the box, when there is a U-Net.
    pub unet_small: Option<Vec<f32>>,
    /// The box of the native slice the model saw (one per volume).
    pub crop: CropBox,
    /// The model's input size.
    pub size: usize,
}

/// A trained model ready to segment volumes on backend `B`.
pub struct Segmenter<B: RefineOnBackend> {
    net: IchNet<B>,
    /// The stage-3 U-Net, on its own handle of the same device.
    unet: Option<UNet<B>>,
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

/// Slices per U-Net forward pass at test time.
pub const UNET_BATCH: usize = 8;

/// The saturation level for this volume (see [`crate::seg::effective_saturation`]).
pub use crate::seg::effective_saturation;

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
        let has_unet = loaded
            .metadata
            .contains_key(crate::model::unet::checkpoint::CONFIG_KEY);
        let unet = if has_unet {
            let handle = net.backend().second_handle()?;
            let u = crate::model::unet::checkpoint::load(handle, model)?;
            if let Some(u) = &u {
                let bad = |detail: String| InferError::ModelMetadata {
                    path: model.to_path_buf(),
                    detail,
                };
                if u.cfg().in_channels != input.channels() || u.cfg().out_channels != 1 {
                    return Err(bad(format!(
                        "the U-Net takes {} channel(s) and gives {}, the model's input has {} windows and one map is expected",
                        u.cfg().in_channels,
                        u.cfg().out_channels,
                        input.channels()
                    )));
                }
                u.cfg()
                    .check_size(size, size)
                    .map_err(|e| bad(format!("the U-Net and `{META_INPUT_SIZE}`: {e}")))?;
            }
            u
        } else {
            None
        };
        if unet.is_none() && matches!(opts.fuse, Some(Fuse::Unet | Fuse::Or)) {
            return Err(InferError::ModelMetadata {
                path: model.to_path_buf(),
                detail: "the model has no stage-3 U-Net (trained with --no-unet?): use --fuse cam"
                    .into(),
            });
        }
        Ok(Segmenter {
            net,
            unet,
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

    /// The stage-3 U-Net's config, when the model has one.
    pub fn unet_config(&self) -> Option<&crate::model::unet::UNetConfig> {
        self.unet.as_ref().map(|u| u.cfg())
    }

    /// The fuse in use: the option, else [`DEFAULT_FUSE`] with a U-Net, else `Cam`.
    pub fn fuse(&self) -> Fuse {
        match (self.opts.fuse, &self.unet) {
            (Some(f), _) => f,
            (None, Some(_)) => DEFAULT_FUSE,
            (None, None) => Fuse::Cam,
        }
    }

    /// The refinement's settings for `vol` (its spacing and, when adapted, its saturation).
    pub fn refine_config(&self, vol: &Volume) -> RefineConfig {
        crate::seg::volume_config(
            &self.opts.refine,
            self.opts.min_component_ml,
            self.opts.adapt_saturation,
            &vol.data,
            vol.spacing,
        )
    }

    pub fn backend(&self) -> &B {
        self.net.backend()
    }

    /// The input recipe the model was trained with.
    pub fn input_spec(&self) -> &InputSpec {
        &self.input
    }

    /// Segments one volume: [`Self::model_pass`] on the whole volume, [`Self::native_maps`]
    /// of every slice and [`Self::finish`].
    pub fn segment(&mut self, vol: &Volume) -> Result<Segmentation, InferError> {
        let pass = self.model_pass(vol, None)?;
        let (_, h, w) = vol.dims();
        let (cam, unet) = self.native_maps(&pass, 0, pass.positive.len(), (h, w))?;
        self.finish(vol, pass, cam, unet)
    }

    /// The model-resolution work on the whole volume (see the module doc). The model's
    /// input is prepared `slab` slices at a time (`None`: all at once): the same values
    /// either way (one crop box per volume; every step works slice by slice or, for the
    /// stage-1 classifier, window by window).
    pub fn model_pass(
        &mut self,
        vol: &Volume,
        slab: Option<usize>,
    ) -> Result<ModelPass, InferError> {
        let (d, h, w) = vol.dims();
        if d == 0 || h == 0 || w == 0 {
            return Err(InferError::Input(format!(
                "{}: empty volume",
                vol.source.display()
            )));
        }
        let s = self.size;
        let ch = self.input.channels();
        let plane = ch * s * s;
        let crop = self.input.crop_box(vol.data.view());
        let fill = crate::data::input::air_value(vol.data.view());
        let chunk = slab.unwrap_or(d).clamp(1, d);
        let batch = self.opts.batch_slices.max(1);
        let mut logits = Vec::with_capacity(d);
        let mut cam_small: Vec<f32> = Vec::new();
        let mut unet_small: Option<Vec<f32>> = self.unet.as_ref().map(|_| Vec::new());
        let mut fhw = (0, 0);
        let mut whole_x = None;
        self.net.set_train(false);
        for c0 in (0..d).step_by(chunk) {
            let c1 = (c0 + chunk).min(d);
            let x = self.prepare(vol, crop, fill, c0, c1)?;
            for z0 in (0..c1 - c0).step_by(batch) {
                let n = batch.min(c1 - c0 - z0);
                let xb = &x[z0 * plane..(z0 + n) * plane];
                let (l, c, hw) = self.stage2_pass(xb, n)?;
                if self.opts.flip_tta {
                    let mut xf = xb.to_vec();
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
            if let (Some(u), Some(out)) = (self.unet.as_mut(), unet_small.as_mut()) {
                out.extend(unet_probabilities(u, &x, c1 - c0, ch, s)?);
            }
            if chunk == d {
                whole_x = Some(x);
            }
        }
        if self.opts.classifier == SliceClassifier::Stage1 {
            logits = self.stage1_logits(vol, crop, fill, whole_x.as_deref())?;
        }
        drop(whole_x);
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
                cam_small = oracle_cam(&truth, crop, fhw);
            }
        }
        Ok(ModelPass {
            probabilities,
            positive,
            cam_small,
            features_hw: fhw,
            unet_small,
            crop,
            size: s,
        })
    }

    /// The model's input `[z1 - z0, channels, size, size]` of slices `z0..z1` in the
    /// volume's box.
    fn prepare(
        &self,
        vol: &Volume,
        crop: CropBox,
        fill: f32,
        z0: usize,
        z1: usize,
    ) -> Result<Vec<f32>, InferError> {
        let part = vol.data.slice(ndarray::s![z0..z1, .., ..]);
        let x = self.input.prepare_in(part, crop, fill, self.size);
        if let Some(bad) = x.iter().position(|v| !v.is_finite()) {
            return Err(InferError::Input(format!(
                "{}: non-finite voxel after windowing (slice {})",
                vol.source.display(),
                z0 + bad / (self.input.channels() * self.size * self.size).max(1)
            )));
        }
        Ok(x)
    }

    /// The normalised CAM and the U-Net's map of slices `z0..z1` on the native `h x w` grid
    /// (see the module doc): the same values for a range as for the whole volume.
    pub fn native_maps(
        &self,
        pass: &ModelPass,
        z0: usize,
        z1: usize,
        (h, w): (usize, usize),
    ) -> Result<(Array3<f32>, Option<Array3<f32>>), InferError> {
        let be = self.net.backend();
        let (fh, fw) = pass.features_hw;
        let n = z1.saturating_sub(z0);
        let cam = crate::seg::field::to_field(
            be,
            &pass.cam_small[z0 * fh * fw..z1 * fh * fw],
            n,
            (fh, fw),
            pass.crop,
            (h, w),
            true,
        )?;
        let s = pass.size;
        let unet = match &pass.unet_small {
            None => None,
            Some(u) => Some(crate::seg::field::to_field(
                be,
                &u[z0 * s * s..z1 * s * s],
                n,
                (s, s),
                pass.crop,
                (h, w),
                false,
            )?),
        };
        Ok((cam, unet))
    }

    /// The refinement of the whole volume from its native maps, and the fuse.
    pub fn finish(
        &self,
        vol: &Volume,
        pass: ModelPass,
        cam: Array3<f32>,
        unet: Option<Array3<f32>>,
    ) -> Result<Segmentation, InferError> {
        let be = self.net.backend();
        let cfg = self.refine_config(vol);
        let refine_map = |map: &Array3<f32>, cfg: &RefineConfig| {
            be.refine_host(&vol.data, map, &pass.positive, cfg)
        };
        let fuse = self.fuse();
        let unet_cfg = || {
            let mut c = cfg.clone();
            c.cam_threshold = self.opts.unet_threshold;
            c.grow_cam_threshold = self.opts.unet_grow.min(self.opts.unet_threshold);
            c
        };
        let (mask, n_components) = match (fuse, &unet) {
            (Fuse::Cam, _) | (_, None) => {
                let r = refine_map(&cam, &cfg)?;
                (r.mask, r.n_components)
            }
            (Fuse::Unet, Some(u)) => {
                let r = refine_map(u, &unet_cfg())?;
                (r.mask, r.n_components)
            }
            (Fuse::Or, Some(u)) => {
                let a = refine_map(&cam, &cfg)?.mask;
                let mut b = refine_map(u, &unet_cfg())?.mask;
                b.zip_mut_with(&a, |x, &y| *x |= y);
                let n = crate::seg::connected_components(&b, cfg.connectivity)?
                    .sizes
                    .len()
                    .saturating_sub(1);
                (b, n)
            }
        };
        // The mirror-pair filter on the U-Net fuses only: on the CAM's masks it was
        // measured not to help (docs/accuracy.md).
        let with_unet = unet.is_some() && fuse != Fuse::Cam;
        let (mask, n_components) = match self.opts.mirror {
            Some(f) if with_unet && cfg.mode == crate::seg::RefineMode::Ours => {
                let r = crate::seg::drop_mirror_pairs(
                    &vol.data,
                    vol.spacing,
                    mask,
                    cfg.connectivity,
                    &f,
                )?;
                (r.mask, r.n_components)
            }
            _ => (mask, n_components),
        };
        let (mask, n_components) = match self.opts.skull {
            Some(f) if cfg.mode == crate::seg::RefineMode::Ours => {
                let r = crate::seg::drop_outside_skull(
                    &vol.data,
                    vol.spacing,
                    mask,
                    cfg.connectivity,
                    &f,
                )?;
                (r.mask, r.n_components)
            }
            _ => (mask, n_components),
        };
        let (mask, n_components) = if with_unet
            && cfg.mode == crate::seg::RefineMode::Ours
            && self.opts.min_component_slices > 1
        {
            let r = crate::seg::drop_thin_components(
                mask,
                cfg.connectivity,
                self.opts.min_component_slices,
            )?;
            (r.mask, r.n_components)
        } else {
            (mask, n_components)
        };
        let voxels = mask.iter().filter(|&&v| v != 0).count();
        Ok(Segmentation {
            probabilities: pass.probabilities,
            positive: pass.positive,
            cam,
            unet,
            n_components,
            volume_ml: voxels as f64 * vol.voxel_ml(),
            mask,
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
    /// overlapping predictions averaged. The windows' input comes from `whole` (the whole
    /// volume's) or is prepared window by window.
    fn stage1_logits(
        &mut self,
        vol: &Volume,
        crop: CropBox,
        fill: f32,
        whole: Option<&[f32]>,
    ) -> Result<Vec<f64>, InferError> {
        let d = vol.dims().0;
        let s = self.size;
        let plane = self.input.channels() * s * s;
        let windows = plan(
            d,
            self.slices,
            SeqMode::Sliding {
                stride: (self.slices / 2).max(1),
            },
        )?;
        let mut preds = Vec::with_capacity(windows.len());
        for win in &windows {
            let lo = win.z.iter().copied().min().unwrap_or(0);
            let hi = win.z.iter().copied().max().map_or(0, |z| z + 1);
            let local;
            let (x, base) = match whole {
                Some(x) => (x, 0),
                None => {
                    local = self.prepare(vol, crop, fill, lo, hi)?;
                    (&local[..], lo)
                }
            };
            let mut seq = Vec::with_capacity(win.len() * plane);
            for &z in &win.z {
                seq.extend_from_slice(&x[(z - base) * plane..(z - base + 1) * plane]);
            }
            let l = self.net.stage1_logits(&seq, 1, win.len(), s, s)?;
            preds.push(l.into_iter().map(|v| v as f32).collect::<Vec<f32>>());
        }
        let (merged, _) = merge_scores(d, &windows, &preds)?;
        Ok(merged.into_iter().map(f64::from).collect())
    }
}

/// The U-Net's probabilities `[d, s, s]` of every prepared slice `x` `[d, ch, s, s]`, in
/// batches of [`UNET_BATCH`] (the last one shorter).
pub fn unet_probabilities<B: Backend<T = f32>>(
    unet: &mut UNet<B>,
    x: &[f32],
    d: usize,
    ch: usize,
    s: usize,
) -> Result<Vec<f32>, InferError> {
    let plane = ch * s * s;
    let mut out = Vec::with_capacity(d * s * s);
    for z0 in (0..d).step_by(UNET_BATCH) {
        let n = UNET_BATCH.min(d - z0);
        out.extend(unet.predict(&x[z0 * plane..(z0 + n) * plane], n, s, s)?);
    }
    Ok(out)
}

/// Stage-2 logits, the feature-resolution CAM and its `(fh, fw)`.
type Stage2Pass = (Vec<f64>, Vec<f32>, (usize, usize));

/// Mirrors the rows of a row-major plane of width `w` left-right.
fn flip_h(plane: &mut [f32], w: usize) {
    for row in plane.chunks_exact_mut(w.max(1)) {
        row.reverse();
    }
}

/// The truth mask of `vol` from the oracle's folder (`<id>.nii[.gz]`, or the pair
/// `<id>.hdr[.gz]`), same shape.
fn read_oracle(o: &Oracle, vol: &Volume) -> Result<Mask, InferError> {
    let id = crate::io::volume_id(&vol.source);
    let path = crate::io::VOLUME_EXTENSIONS
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
