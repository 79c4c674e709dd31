//! Evaluation of a folder of predictions against a folder of truth masks: file matching,
//! reading, per-volume metrics. The only part of `eval` that touches files (through `io`).
//!
//! Layouts: truth is `TRUTH/<id>.nii[.gz]`, or a dataset folder whose `labels/` (or
//! `label/`) subfolder holds those files; a prediction is `PRED/<id>/mask.nii[.gz]` or
//! `PRED/<id>.nii[.gz]`. Hidden entries (a `segment` run's temporary folders) are ignored;
//! a symbolic-link loop or a dangling link among the masks is an error naming it.
//!
//! Memory: each mask is kept as 0/1 bytes once read, and the metrics' peak (the two masks,
//! HD95's surfaces and exact distance transforms on the masks' bounding box, the surface
//! distances) is estimated before they run; a pair beyond the budget
//! ([`crate::io::budget`]) gets an error row naming the size and the budget.

use super::metrics::{bbox, volume_metrics};
use super::report::{build_report, Report, VolumeReport};
use crate::io::{self, IoError, Mask};
use std::path::{Path, PathBuf};

/// Errors that stop the whole evaluation (per-volume problems go into the report).
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: cannot list: {err}", path.display())]
    List { path: PathBuf, err: std::io::Error },
    #[error("{}: no truth masks (*.nii or *.nii.gz) found", .0.display())]
    NoTruth(PathBuf),
    #[error(transparent)]
    Entry(#[from] IoError),
}

/// The id of a NIfTI file name (`049.nii.gz` -> `049`), or `None` for other files.
pub fn nifti_id(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
}

/// The folder that holds the truth files: `truth/labels`, `truth/label` or `truth` itself.
pub fn truth_folder(truth: &Path) -> PathBuf {
    for sub in ["labels", "label"] {
        let p = truth.join(sub);
        if p.is_dir() {
            return p;
        }
    }
    truth.to_path_buf()
}

/// `(id, path)` of the truth masks, sorted by id.
pub fn list_truth(truth: &Path) -> Result<Vec<(String, PathBuf)>, DirError> {
    let dir = truth_folder(truth);
    let rd = std::fs::read_dir(&dir).map_err(|err| DirError::List {
        path: dir.clone(),
        err,
    })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|err| DirError::List {
            path: dir.clone(),
            err,
        })?;
        let p = e.path();
        let Some(id) = p.file_name().and_then(|n| n.to_str()).and_then(nifti_id) else {
            continue;
        };
        // A mask name behind a link loop or a dangling link is an error, not a skip.
        if !io::metadata(&p)?.is_file() {
            continue;
        }
        out.push((id.to_string(), p.clone()));
    }
    out.sort();
    // `x.nii` and `x.nii.gz` side by side: keep the first (sorted) and say nothing more.
    out.dedup_by(|a, b| a.0 == b.0);
    if out.is_empty() {
        return Err(DirError::NoTruth(dir));
    }
    Ok(out)
}

/// The prediction file for `id`, if any (a link that leads nowhere counts, so that its
/// read names the problem).
pub fn find_prediction(pred: &Path, id: &str) -> Option<PathBuf> {
    let dir = pred.join(id);
    [
        dir.join("mask.nii.gz"),
        dir.join("mask.nii"),
        pred.join(format!("{id}.nii.gz")),
        pred.join(format!("{id}.nii")),
    ]
    .into_iter()
    .find(|p| {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() || (m.is_symlink() && !p.is_dir()))
    })
}

/// Ids that have a prediction under `pred` (either layout).
pub fn list_predictions(pred: &Path) -> Result<Vec<String>, DirError> {
    let rd = std::fs::read_dir(pred).map_err(|err| DirError::List {
        path: pred.to_path_buf(),
        err,
    })?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            if p.join("mask.nii.gz").is_file() || p.join("mask.nii").is_file() {
                out.push(name.to_string());
            }
        } else if let Some(id) = nifti_id(name) {
            out.push(id.to_string());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Reads a mask file as 0/1 bytes (the voxels read as `f32` are dropped at once).
fn read_mask_bytes(path: &Path) -> Result<(Mask, [f64; 3]), IoError> {
    let v = io::read_mask(path)?;
    Ok((io::to_mask(&v), v.spacing))
}

/// Peak bytes of the metrics of two `n`-voxel masks whose foregrounds span a bounding box
/// of `boxed` voxels and hold `fg` voxels together: the masks (2 per voxel); in the box,
/// each mask's crop and surface (4) and two f64 distance transforms (16); the surface
/// distances (8 per surface voxel, at most one per foreground voxel).
pub fn metrics_bytes(n: u128, boxed: u128, fg: u128) -> u128 {
    2 * n + 20 * boxed + 8 * fg
}

/// One volume: reads both masks and computes the metrics; a problem becomes the row's error.
pub fn evaluate_pair(id: &str, pred_path: &Path, truth_path: &Path) -> VolumeReport {
    let mut row = VolumeReport {
        id: id.to_string(),
        shape: None,
        spacing: None,
        metrics: None,
        error: None,
    };
    let (truth, spacing) = match read_mask_bytes(truth_path) {
        Ok(v) => v,
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    let (z, y, x) = truth.dim();
    row.shape = Some([z, y, x]);
    row.spacing = Some(spacing);
    let (pred, _) = match read_mask_bytes(pred_path) {
        Ok(v) => v,
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    if pred.dim() != truth.dim() {
        let (a, b, c) = pred.dim();
        row.error = Some(format!(
            "{}: shape (z, y, x) = {:?} differs from the truth {} shape {:?}",
            pred_path.display(),
            [a, b, c],
            truth_path.display(),
            [z, y, x]
        ));
        return row;
    }
    let n = truth.len() as u128;
    let boxed = match (bbox(&pred), bbox(&truth)) {
        (Some(a), Some(b)) => (0..3)
            .map(|i| (a.1[i].max(b.1[i]) - a.0[i].min(b.0[i]) + 1) as u128)
            .product(),
        _ => 0,
    };
    let fg = (pred.iter().filter(|&&v| v != 0).count() + truth.iter().filter(|&&v| v != 0).count())
        as u128;
    let need = metrics_bytes(n, boxed, fg);
    if let Err(e) = io::budget::budget().check(truth_path, need, || {
        format!(
            "evaluating {x}x{y}x{z} voxels (HD95's distance transforms on a box of {boxed} voxels)"
        )
    }) {
        row.error = Some(e.to_string());
        return row;
    }
    match volume_metrics(&pred, &truth, spacing) {
        Ok(m) => row.metrics = Some(m),
        Err(e) => row.error = Some(format!("{}: {e}", truth_path.display())),
    }
    row
}

/// Evaluates every truth volume that has a prediction; the others are listed as missing.
/// Also returns the ids of predictions without a truth.
pub fn evaluate_dirs(pred: &Path, truth: &Path) -> Result<(Report, Vec<String>), DirError> {
    if !pred.is_dir() {
        return Err(DirError::List {
            path: pred.to_path_buf(),
            err: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
        });
    }
    let truths = list_truth(truth)?;
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    for (id, tp) in &truths {
        match find_prediction(pred, id) {
            Some(pp) => rows.push(evaluate_pair(id, &pp, tp)),
            None => missing.push(id.clone()),
        }
    }
    let orphans = list_predictions(pred)?
        .into_iter()
        .filter(|p| !truths.iter().any(|(id, _)| id == p))
        .collect();
    Ok((build_report(rows, missing), orphans))
}
