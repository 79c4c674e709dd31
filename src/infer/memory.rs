//! Test-time memory: the bounds of a model file's metadata, and the peak bytes of segmenting
//! one volume, estimated from its dimensions before it is read ([`Costs::plan`]). A volume
//! whose whole-volume pass does not fit the budget is segmented by slabs of slices (the
//! network, the CAM and its normalisation per slab; the refinement, whose 3-D components
//! need the whole volume, once: [`super::slabs`]), or refused with its size and the budget
//! when even that does not fit.
//!
//! The bytes per voxel are counted from the code (which arrays live at the peak) and
//! checked by measuring the process's peak address space (README, "Robustness").
//! Knows no op and no kernel: the network's share comes from `model::memory`.

use super::segmenter::{RefineOnBackend, Segmenter, SliceClassifier};
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

/// Bytes per native voxel of the whole-volume pass (`Segmenter::segment`), besides the
/// model's input planes: the HU volume (4), the normalised CAM on the backend and the copy
/// the refinement reads (8), the refinement's own arrays at its peak (the CAM region and
/// its grown level, the chosen clusters and their dilation, 1 each; the component labels
/// and the filtered labels, 4 each; the final mask, 1: 13) and a margin.
pub const WHOLE_BYTES_PER_VOXEL: u128 = 30;
/// Bytes per native voxel when segmenting by slabs: the HU volume (4), the whole CAM (4),
/// the refinement's arrays (13) and a margin; the slab's own pass comes on top.
pub const SLABS_BYTES_PER_VOXEL: u128 = 24;
/// Bytes per voxel while a volume's outputs are written: the HU volume, the CAM, the mask
/// and a margin.
pub const WRITE_BYTES_PER_VOXEL: u128 = 10;
/// Slices windowed at a time while preparing the model's input (`data::InputSpec::prepare`).
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
    /// activations.
    pub fixed: u128,
    /// Whether the work can be split into slabs of slices with the same result (the stage-2
    /// classifier and per-slice k-means work slice by slice).
    pub slab_capable: bool,
    /// Why not, when not.
    pub slab_blocker: &'static str,
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
        // A GPU backend keeps the activations in device memory.
        if !seg.backend().name().starts_with("cpu") {
            acts = 0;
        }
        let feature_hw = model_memory::backbone_activations(&cfg, 1, s, s)
            .map(|(_, (_, h, w))| h * w)
            .unwrap_or(u128::MAX);
        let (slab_capable, slab_blocker) = if seg.opts.classifier == SliceClassifier::Stage1 {
            (
                false,
                "the stage-1 classifier reads sequences across slabs (use --classifier stage2)",
            )
        } else if !seg.opts.refine.per_slice_kmeans {
            (false, "k-means over the whole volume cannot be split")
        } else {
            (true, "")
        };
        Costs {
            input_size: s,
            fixed: params.saturating_add(acts),
            slab_capable,
            slab_blocker,
            feature_hw,
        }
    }

    /// Bytes per slice of `h x w` of the whole-volume pass.
    fn per_slice(&self, h: usize, w: usize) -> u128 {
        let hw = h as u128 * w as u128;
        let s2 = (self.input_size as u128).pow(2);
        // Native voxels; the model's three input planes; the small CAM (host and backend).
        WHOLE_BYTES_PER_VOXEL * hw + 12 * s2 + 8 * self.feature_hw.min(hw)
    }

    /// Peak bytes of `Segmenter::segment` on a `(d, h, w)` volume, the volume included.
    pub fn whole_bytes(&self, dims: (usize, usize, usize)) -> u128 {
        let (d, h, w) = dims;
        let hw = h as u128 * w as u128;
        let s2 = (self.input_size as u128).pow(2);
        // The windowed chunk being resized while the input is prepared.
        let chunk = PREP_CHUNK * 12 * (hw + s2);
        (d as u128).saturating_mul(self.per_slice(h, w)) + chunk
    }

    /// Peak bytes of segmenting by slabs of `slab` slices, the volume included.
    pub fn slab_bytes(&self, dims: (usize, usize, usize), slab: usize) -> u128 {
        let (d, h, w) = dims;
        let n = d as u128 * h as u128 * w as u128;
        let slab = slab.min(d);
        // The slab's copy of the HU, and its own whole-volume pass.
        let part = 4 * slab as u128 * h as u128 * w as u128 + self.whole_bytes((slab, h, w));
        SLABS_BYTES_PER_VOXEL.saturating_mul(n) + part
    }

    /// How to segment a `(d, h, w)` volume with `available` bytes: whole when it fits, else
    /// by the largest slabs that fit, else an error naming the sizes (without the path).
    pub fn plan(&self, dims: (usize, usize, usize), available: u128) -> Result<Estimate, String> {
        let (d, h, w) = dims;
        let n = d as u128 * h as u128 * w as u128;
        let write_bytes = WRITE_BYTES_PER_VOXEL.saturating_mul(n);
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
        if !self.slab_capable {
            return Err(format!(
                "{}; it cannot be split into slabs: {}",
                refuse(whole, "in one pass"),
                self.slab_blocker
            ));
        }
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

    fn costs(slab_capable: bool) -> Costs {
        Costs {
            input_size: 256,
            fixed: 0,
            slab_capable,
            slab_blocker: "stage 1",
            feature_hw: 64,
        }
    }

    #[test]
    fn plans_whole_then_slabs_then_refuses() {
        let c = costs(true);
        let dims = (1000, 512, 512);
        let n = 1000u128 * 512 * 512;
        let whole = c.whole_bytes(dims);
        assert!(whole >= 30 * n);
        assert_eq!(c.plan(dims, whole).unwrap().mode, Mode::Whole);
        let e = c.plan(dims, whole - 1).unwrap();
        let Mode::Slabs(s) = e.mode else {
            panic!("{e:?}")
        };
        assert!((1..1000).contains(&s));
        assert!(e.bytes < whole);
        assert!(c.slab_bytes(dims, s + 1) > whole - 1);
        let e = c.plan(dims, 20 * n).unwrap_err();
        assert!(
            e.contains("512x512x1000") && e.contains("by slabs of one slice"),
            "{e}"
        );
        let e = costs(false).plan(dims, whole - 1).unwrap_err();
        assert!(e.contains("stage 1"), "{e}");
    }
}
