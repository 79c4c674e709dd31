//! The files of one segmented volume, in `OUT/<id>/`: `mask.nii.gz` (u8, the input's exact
//! geometry), `cam.nii.gz` (f32 normalised CAM), `unet.nii.gz` (f32, the stage-3 U-Net's
//! probability on every slice, when the model has one), `slices.csv` (z, probability, positive,
//! mask voxels), `overlay.png` (a montage of the positive slices: CT, CAM heat map, mask
//! outline), `summary.json` (hemorrhage volume in mL and the rest) and, when asked
//! ([`OutputOptions::dicom_seg`]) for a volume read from DICOM, `seg.dcm`: the mask as a
//! DICOM Segmentation of the source series ([`crate::io::dicom_seg`]). The set is written
//! into a hidden temporary folder and renamed into place as one ([`AtomicDir`]): a volume
//! that fails half-way leaves nothing, a previous good output for the same id stays whole
//! until the new one replaces it, and a folder holding other files is not replaced.

use super::segmenter::Segmentation;
use super::InferError;
use crate::io::atomic::{write_atomic, AtomicDir};
use crate::io::{self, dicom_seg, IoError, Volume};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// What `summary.json` holds, and what the batch report lists.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeSummary {
    pub id: String,
    pub source: String,
    pub dims_zyx: [usize; 3],
    pub spacing_zyx_mm: [f64; 3],
    pub hemorrhage_ml: f64,
    pub mask_voxels: usize,
    pub components: usize,
    pub positive_slices: Vec<usize>,
    pub max_probability: f64,
    pub kmeans_saturation: f32,
    /// With `--dicom-seg`: `seg.dcm` and its frames, or why it was not written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dicom_seg: Option<String>,
}

/// Which optional files [`write_outputs_with`] writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputOptions {
    /// `seg.dcm`, a DICOM Segmentation of the mask, for a volume read from DICOM (a NIfTI
    /// input gets none, and its summary says why).
    pub dicom_seg: bool,
}

/// At most this many panels in the overlay montage: the slices with the most mask first.
const MAX_PANELS: usize = 24;

/// Mask voxels of each slice.
fn mask_per_slice(seg: &Segmentation) -> Vec<usize> {
    seg.mask
        .axis_iter(ndarray::Axis(0))
        .map(|s| s.iter().filter(|&&v| v != 0).count())
        .collect()
}

fn overlay_slices(seg: &Segmentation, per_slice: &[usize]) -> Vec<usize> {
    let d = per_slice.len();
    let mut zs: Vec<usize> = (0..d)
        .filter(|&z| seg.positive[z] || per_slice[z] > 0)
        .collect();
    if zs.is_empty() {
        // Nothing found: show the most probable slice so the reader sees what was looked at.
        let best = (0..d)
            .max_by(|&a, &b| seg.probabilities[a].total_cmp(&seg.probabilities[b]))
            .unwrap_or(0);
        zs.push(best);
    }
    if zs.len() > MAX_PANELS {
        zs.sort_by_key(|&z| std::cmp::Reverse(per_slice[z]));
        zs.truncate(MAX_PANELS);
        zs.sort_unstable();
    }
    zs
}

/// The files of one volume's output folder (`unet.nii.gz` only with a stage-3 U-Net).
/// (`seg.dcm` only with [`OutputOptions::dicom_seg`] and a DICOM input).
pub const OUTPUT_FILES: [&str; 7] = [
    "mask.nii.gz",
    "cam.nii.gz",
    "unet.nii.gz",
    "slices.csv",
    "overlay.png",
    "summary.json",
    "seg.dcm",
];

/// The file name of the DICOM Segmentation in a volume's folder.
pub const SEG_FILE: &str = "seg.dcm";

/// Writes every output of one volume as the folder `dest` (see the module doc), without
/// the optional ones.
pub fn write_outputs(
    dest: &Path,
    id: &str,
    vol: &Volume,
    seg: &Segmentation,
) -> Result<VolumeSummary, InferError> {
    write_outputs_with(dest, id, vol, seg, OutputOptions::default())
}

/// As [`write_outputs`], with the optional files `opts` asks for.
pub fn write_outputs_with(
    dest: &Path,
    id: &str,
    vol: &Volume,
    seg: &Segmentation,
    opts: OutputOptions,
) -> Result<VolumeSummary, InferError> {
    let out = AtomicDir::create(dest, &OUTPUT_FILES)?;
    let tmp = out.path().to_path_buf();
    let summary = write_files(out.path(), id, vol, seg, opts).map_err(|e| match e {
        InferError::Io(e) => InferError::Io(e.rebase(&tmp, dest)),
        other => other,
    })?;
    out.commit()?;
    Ok(summary)
}

fn write_files(
    dir: &Path,
    id: &str,
    vol: &Volume,
    seg: &Segmentation,
    opts: OutputOptions,
) -> Result<VolumeSummary, InferError> {
    let d = vol.dims().0;
    if seg.probabilities.len() != d || seg.positive.len() != d {
        return Err(InferError::Io(IoError::invalid(
            dir.join("slices.csv"),
            format!(
                "{} probabilities for {d} slices",
                seg.probabilities.len().min(seg.positive.len())
            ),
        )));
    }
    io::write_mask(&dir.join("mask.nii.gz"), &seg.mask, vol)?;
    io::write_map(&dir.join("cam.nii.gz"), &seg.cam, vol)?;
    if let Some(u) = &seg.unet {
        io::write_map(&dir.join("unet.nii.gz"), u, vol)?;
    }
    let per_slice = mask_per_slice(seg);
    let d = per_slice.len();
    write_atomic(&dir.join("slices.csv"), |w| {
        writeln!(w, "z,probability,positive,mask_voxels")?;
        for (z, n) in per_slice.iter().enumerate() {
            let p = seg.probabilities[z];
            writeln!(w, "{z},{p:.6},{},{n}", u8::from(seg.positive[z]))?;
        }
        Ok(())
    })?;
    io::overlay::montage(
        vol,
        Some(&seg.cam),
        &seg.mask,
        &overlay_slices(seg, &per_slice),
        &dir.join("overlay.png"),
    )?;
    let dicom_seg = if opts.dicom_seg {
        Some(match dicom_seg::seg_source(vol) {
            Err(why) => format!("not written: {why}"),
            Ok(_) => {
                let w = dicom_seg::write_seg(
                    &dir.join(SEG_FILE),
                    vol,
                    &seg.mask,
                    &dicom_seg::SegmentInfo::default(),
                )?;
                if w.empty {
                    format!("{SEG_FILE}: 1 empty frame (no mask voxels)")
                } else {
                    format!("{SEG_FILE}: {} frames", w.frames)
                }
            }
        })
    } else {
        None
    };
    let (dz, dy, dx) = vol.dims();
    let summary = VolumeSummary {
        id: id.to_string(),
        source: vol.source.display().to_string(),
        dims_zyx: [dz, dy, dx],
        spacing_zyx_mm: vol.spacing,
        hemorrhage_ml: seg.volume_ml,
        mask_voxels: per_slice.iter().sum(),
        components: seg.n_components,
        positive_slices: (0..d).filter(|&z| seg.positive[z]).collect(),
        max_probability: seg.probabilities.iter().copied().fold(0.0, f64::max),
        kmeans_saturation: seg.saturation,
        dicom_seg,
    };
    let json =
        serde_json::to_string_pretty(&summary).map_err(|e| InferError::Input(e.to_string()))?;
    write_atomic(&dir.join("summary.json"), |w| w.write_all(json.as_bytes()))?;
    Ok(summary)
}
