//! Test-time memory: the bounds of a model file's metadata, and the peak bytes of segmenting
//! one volume, estimated from its dimensions before it is read ([`Costs::plan`]). A volume
//! whose whole-volume pass does not fit the budget is segmented by slabs of slices (the
//! model's input planes prepared per slab, the maps brought to the native grid per slab;
//! the small model-resolution maps and the refinement, whose 3-D components need the whole
//! volume, whole: [`super::slabs`]), or refused with its size and the budget when even that
//! does not fit.
//!
//! The bytes per voxel are counted from the code (which arrays live at the peak) and
//! checked by measuring the process's peak address space (README, "Robustness").
//! Knows no op and no kernel: the network's share comes from `model::memory`.

use super::segmenter::{RefineOnBackend, Segmenter, SliceClassifier, UNET_BATCH};
use super::InferError;
use crate::io::budget::Budget;
use crate::io::error::human_bytes;
use crate::model::{memory as model_memory, ModelConfig};
use std::path::Path;

/// Bounds of the model's input size (`ichcam.input_size`): the paper's is 512.
pub const MIN_INPUT_SIZE: usize = 16;
pub const MAX_INPUT_SIZE: usize = 2048;
/// Most slices per stage-1 sequence (`ichcam.slices`): the paper's is 32.
pub const MAX_SEQUENCE_SLICES: usize = 1024;

/// Bytes per native voxel of a volume's segmentation, whole or by slabs (the native arrays
/// are whole-volume either way): the HU volume (4) and the normalised CAM (4) throughout;
/// the refinement's buffers (`seg::refine_on`) at their peak: while the band is found the
/// CAM region and its grown level (1 each) with the subdural values and their box mean
/// (4 each), 10; at the components the band, its dilation (1 each) and the labels (4), 6,
/// plus the labelling's run tables. 24 leaves a margin: a 512x512x1000 volume peaked at
/// 14 B/voxel resident (cpu preset, 2026-12-02), and segments under an 8 GB address-space
/// limit.
pub const WHOLE_BYTES_PER_VOXEL: u128 = 24;
/// More bytes per native voxel with a stage-3 U-Net: its map on the native grid (4) and,
/// with `--fuse or`, the first mask while the second refinement runs (1).
pub const UNET_BYTES_PER_VOXEL: u128 = 5;
/// Bytes per voxel while a volume's outputs are written: the HU volume, the CAM, the mask
/// and a margin (plus 4 for the U-Net's map when there is one).
pub const WRITE_BYTES_PER_VOXEL: u128 = 10;
/// Slices windowed at a time while preparing the model's input
/// (`data::InputSpec::prepare_in`), and slices upsampled at a time into the field
/// (`seg::field::to_field`).
const PREP_CHUNK: u128 = 8;

/// A model file's metadata within bounds, and one slice of its network within the budget.
pub fn check_model_metadata(
    path: &Path,
    cfg: &ModelConfig,
    size: usize,
    slices: usize,
) -> Result<(), InferError> {
    let bad = |detail: String| InferError::ModelMetadata {
        path: path.to_path_buf(),
        detail,
    };
    if !(MIN_INPUT_SIZE..=MAX_INPUT_SIZE).contains(&size) {
        return Err(bad(format!(
            "`ichcam.input_size` is {size}, outside {MIN_INPUT_SIZE}..={MAX_INPUT_SIZE}"
        )));
    }
    if !(1..=MAX_SEQUENCE_SLICES).contains(&slices) {
        return Err(bad(format!(
            "`ichcam.slices` is {slices}, outside 1..={MAX_SEQUENCE_SLICES}"
        )));
    }
    let budget = crate::io::budget::budget();
    let need = model_memory::stage2_infer_bytes(cfg, 1, size, 4).unwrap_or(u128::MAX);
    budget.check(path, need, || {
        format!("one {size}x{size} slice through the network")
    })?;
    Ok(())
}

/// How one volume is segmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In one pass (`Segmenter::segment`).
    Whole,
    /// The network and the CAM by slabs of this many slices, the refinement once.
    Slabs(usize),
}

/// A volume's plan: how, and the bytes it holds at its peak and while being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub mode: Mode,
    pub bytes: u128,
    pub write_bytes: u128,
}

/// What segmenting costs with one loaded model.
#[derive(Clone, Debug)]
pub struct Costs {
    pub input_size: usize,
    /// Host bytes the model holds whatever the volume: parameters and (on the CPU) cached
    /// activations, the U-Net's included.
    pub fixed: u128,
    /// The model's input channels (windows).
    pub channels: usize,
    /// Whether the model has a stage-3 U-Net (its maps cost memory per slice and per voxel).
    pub unet: bool,
    feature_hw: u128,
}

impl Costs {
    /// The costs of `seg`; lowers `seg.opts.batch_slices` (halving) while the network's
    /// activations would take more than a quarter of the budget.
    pub fn of<B: RefineOnBackend>(seg: &mut Segmenter<B>, budget: &Budget) -> Self {
        let cfg = seg.model_config().clone();
        let s = seg.input_size();
        let elem = std::mem::size_of::<f32>();
        let params = model_memory::param_bytes(&cfg, elem, false).unwrap_or(u128::MAX);
        let net =
            |b: usize| model_memory::stage2_infer_bytes(&cfg, b, s, elem).unwrap_or(u128::MAX);
        let mut batch = seg.opts.batch_slices.max(1);
        while batch > 1 && net(batch) > budget.bytes as u128 / 4 {
            batch /= 2;
        }
        seg.opts.batch_slices = batch;
        let mut acts = net(batch);
        if seg.opts.classifier == SliceClassifier::Stage1 {
            let st1 = model_memory::stage1_infer_bytes(&cfg, 1, seg.sequence_slices(), s, elem)
                .unwrap_or(u128::MAX);
            acts = acts.max(st1);
        }
        let mut unet_params = 0u128;
        if let Some(u) = seg.unet_config() {
            unet_params = u
                .tensor_count()
                .map_or(u128::MAX, |n| n.saturating_mul(elem as u128));
            let a = u
                .activation_bytes(UNET_BATCH, s, s, elem)
                .unwrap_or(u128::MAX);
            acts = acts.max(a);
        }
        // A GPU backend keeps the activations in device memory.
        if !seg.backend().name().starts_with("cpu") {
            acts = 0;
        }
        let feature_hw = model_memory::backbone_activations(&cfg, 1, s, s)
            .map(|(_, (_, h, w))| h * w)
            .unwrap_or(u128::MAX);
        Costs {
            input_size: s,
            fixed: params.saturating_add(unet_params).saturating_add(acts),
            channels: cfg.in_channels,
            unet: seg.unet_config().is_some(),
            feature_hw,
        }
    }

    /// Peak bytes of segmenting a `(d, h, w)` volume with the model's input prepared `slab`
    /// slices at a time (`d`: the whole pass), the volume included.
    pub fn bytes(&self, dims: (usize, usize, usize), slab: usize) -> u128 {
        let (d, h, w) = dims;
        let (d, slab) = (d as u128, slab.clamp(1, d.max(1)) as u128);
        let hw = h as u128 * w as u128;
        let s2 = (self.input_size as u128).pow(2);
        let mut native = WHOLE_BYTES_PER_VOXEL * hw;
        // The CAM at the features' resolution, on the host and the backend.
        let mut small = 8 * self.feature_hw.min(hw);
        if self.unet {
            native += UNET_BYTES_PER_VOXEL * hw;
            small += 4 * s2;
        }
        // The model's input planes of a slab.
        let input = 4 * self.channels as u128 * s2;
        // The windowed chunk being resized, and a chunk's box-sized upsampling buffers.
        let chunk = PREP_CHUNK * (12 * (hw + s2) + 16 * hw);
        d.saturating_mul(native + small)
            .saturating_add(slab.saturating_mul(input))
            .saturating_add(chunk)
    }

    /// Peak bytes of `Segmenter::segment` on a `(d, h, w)` volume, the volume included.
    pub fn whole_bytes(&self, dims: (usize, usize, usize)) -> u128 {
        self.bytes(dims, dims.0)
    }

    /// Peak bytes of segmenting by slabs of `slab` slices, the volume included.
    pub fn slab_bytes(&self, dims: (usize, usize, usize), slab: usize) -> u128 {
        self.bytes(dims, slab)
    }

    /// How to segment a `(d, h, w)` volume with `available` bytes: whole when it fits, else
    /// by the largest slabs that fit, else an error naming the sizes (without the path).
    pub fn plan(&self, dims: (usize, usize, usize), available: u128) -> Result<Estimate, String> {
        let (d, h, w) = dims;
        let n = d as u128 * h as u128 * w as u128;
        let per_write = WRITE_BYTES_PER_VOXEL + if self.unet { 4 } else { 0 };
        let write_bytes = per_write.saturating_mul(n);
        let whole = self.whole_bytes(dims);
        if whole <= available {
            return Ok(Estimate {
                mode: Mode::Whole,
                bytes: whole,
                write_bytes,
            });
        }
        let refuse = |need: u128, how: &str| {
            format!(
                "segmenting {w}x{h}x{d} voxels needs about {} {how}, over the {} available",
                human_bytes(need),
                human_bytes(available)
            )
        };
        let one = self.slab_bytes(dims, 1);
        if one > available {
            return Err(refuse(one, "even by slabs of one slice"));
        }
        // slab_bytes grows linearly with the slab: solve for the largest that fits.
        let per = self.slab_bytes(dims, 2).saturating_sub(one).max(1);
        let slab = (1 + (available - one) / per).min(d as u128) as usize;
        Ok(Estimate {
            mode: Mode::Slabs(slab.max(1)),
            bytes: self.slab_bytes(dims, slab.max(1)),
            write_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(unet: bool) -> Costs {
        Costs {
            input_size: 256,
            fixed: 0,
            channels: 3,
            unet,
            feature_hw: 64,
        }
    }

    #[test]
    fn plans_whole_then_slabs_then_refuses() {
        let c = costs(false);
        let dims = (1000, 512, 512);
        let n = 1000u128 * 512 * 512;
        let whole = c.whole_bytes(dims);
        assert!(whole >= WHOLE_BYTES_PER_VOXEL * n);
        assert_eq!(c.plan(dims, whole).unwrap().mode, Mode::Whole);
        let e = c.plan(dims, whole - 1).unwrap();
        let Mode::Slabs(s) = e.mode else {
            panic!("{e:?}")
        };
        assert!((1..1000).contains(&s));
        assert!(e.bytes < whole);
        assert!(c.slab_bytes(dims, s + 1) > whole - 1);
        let e = c.plan(dims, 16 * n).unwrap_err();
        assert!(
            e.contains("512x512x1000") && e.contains("by slabs of one slice"),
            "{e}"
        );
        // A U-Net's maps cost more per voxel and per slice.
        assert!(costs(true).whole_bytes(dims) > whole + 5 * n);
    }
}
