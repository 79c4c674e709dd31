//! One volume within the memory budget: [`segment_volume`] plans it ([`super::memory`]) and
//! segments it whole, or by slabs of slices when the whole pass does not fit, or refuses it
//! with its size and the budget. By slabs, each slab goes through the network and the CAM
//! on its own (`Segmenter::segment` on the slab: the stage-2 net, the CAM's upsampling and
//! its per-slice normalisation work slice by slice, so the CAM and the slice probabilities
//! are those of the whole pass), and the refinement then runs once on the whole volume with
//! the settings the whole pass would use: the mask is the same. Only the refinement's
//! memory and the volume's own arrays are whole-volume; the network's input planes and
//! activations are a slab's.

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

/// Segments `vol` by slabs of `slab` slices (see the module doc). Refused for settings
/// whose result would depend on the slabs (the stage-1 classifier, volume-wide k-means).
pub fn segment_by_slabs<B: RefineOnBackend>(
    seg: &mut Segmenter<B>,
    vol: &Volume,
    slab: usize,
) -> Result<Segmentation, InferError> {
    let (d, h, w) = vol.dims();
    let costs = Costs::of(seg, &crate::io::budget::budget());
    if !costs.slab_capable {
        return Err(InferError::Input(format!(
            "{}: cannot segment by slabs: {}",
            vol.source.display(),
            costs.slab_blocker
        )));
    }
    let slab = slab.clamp(1, d.max(1));
    let mut cam = Array3::<f32>::zeros((d, h, w));
    let mut probabilities = Vec::with_capacity(d);
    let mut positive = Vec::with_capacity(d);
    for z0 in (0..d).step_by(slab) {
        let z1 = (z0 + slab).min(d);
        let part = Volume {
            data: vol.data.slice(s![z0..z1, .., ..]).to_owned(),
            spacing: vol.spacing,
            header: vol.header.clone(),
            source: vol.source.clone(),
        };
        let out = seg.segment(&part)?;
        cam.slice_mut(s![z0..z1, .., ..]).assign(&out.cam);
        probabilities.extend(out.probabilities);
        positive.extend(out.positive);
    }
    let cfg = seg.refine_config(vol);
    let refined = crate::seg::refine(&vol.data, &cam, &positive, &cfg)?;
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
