//! One volume within the memory budget: [`segment_volume`] plans it ([`super::memory`]) and
//! segments it whole, or by slabs of slices when the whole pass does not fit, or refuses it
//! with its size and the budget. By slabs, the model-resolution work (the head's crop box,
//! the windowed and resized input, the slice probabilities of either classifier, the CAM at
//! the features' resolution, the U-Net's map: small) still runs on the whole volume
//! (`Segmenter::model_pass`); only the native-resolution upsampling and placement of the
//! maps goes slab by slab (`Segmenter::native_maps`: slice by slice, so the same values),
//! and the refinement then runs once on the whole volume (`Segmenter::finish`): the mask,
//! the CAM and the probabilities are those of the whole pass. What the slabs save is the
//! upsampling's box-sized buffers of the whole volume.

use super::memory::{Costs, Estimate, Mode};
use super::segmenter::{RefineOnBackend, Segmentation, Segmenter};
use super::InferError;
use crate::io::Volume;
use ndarray::{s, Array3};

/// Segments `vol` within the process's memory budget (see the module doc).
pub fn segment_volume<B: RefineOnBackend>(
    seg: &mut Segmenter<B>,
    vol: &Volume,
) -> Result<Segmentation, InferError> {
    let budget = crate::io::budget::budget();
    let costs = Costs::of(seg, &budget);
    let available = (budget.bytes as u128).saturating_sub(costs.fixed);
    let est = costs.plan(vol.dims(), available).map_err(|reason| {
        InferError::Input(format!(
            "{}: {reason} (memory budget {}, of which the model holds {})",
            vol.source.display(),
            budget.describe(),
            crate::io::error::human_bytes(costs.fixed)
        ))
    })?;
    segment_planned(seg, vol, &est)
}

/// Segments `vol` as `est` says.
pub fn segment_planned<B: RefineOnBackend>(
    seg: &mut Segmenter<B>,
    vol: &Volume,
    est: &Estimate,
) -> Result<Segmentation, InferError> {
    match est.mode {
        Mode::Whole => seg.segment(vol),
        Mode::Slabs(n) => segment_by_slabs(seg, vol, n),
    }
}

/// Segments `vol` by slabs of `slab` slices (see the module doc).
pub fn segment_by_slabs<B: RefineOnBackend>(
    seg: &mut Segmenter<B>,
    vol: &Volume,
    slab: usize,
) -> Result<Segmentation, InferError> {
    let (d, h, w) = vol.dims();
    let pass = seg.model_pass(vol, Some(slab.max(1)))?;
    let slab = slab.clamp(1, d.max(1));
    let mut cam = Array3::<f32>::zeros((d, h, w));
    let mut unet = pass
        .unet_small
        .as_ref()
        .map(|_| Array3::<f32>::zeros((d, h, w)));
    for z0 in (0..d).step_by(slab) {
        let z1 = (z0 + slab).min(d);
        let (c, u) = seg.native_maps(&pass, z0, z1, (h, w))?;
        cam.slice_mut(s![z0..z1, .., ..]).assign(&c);
        if let (Some(all), Some(u)) = (unet.as_mut(), u) {
            all.slice_mut(s![z0..z1, .., ..]).assign(&u);
        }
    }
    seg.finish(vol, pass, cam, unet)
}
