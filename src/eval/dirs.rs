//! Evaluation of a folder of predictions against a folder of truth masks: file matching,
//! reading, per-volume metrics. The only part of `eval` that touches files (through `io`).
//!
//! Layouts: truth is `TRUTH/<id>.nii[.gz]`, or a dataset folder whose `labels/` (or
//! `label/`) subfolder holds those files; a prediction is `PRED/<id>/mask.nii[.gz]` or
//! `PRED/<id>.nii[.gz]`.

use super::metrics::volume_metrics;
use super::report::{build_report, Report, VolumeReport};
use crate::io;
use std::path::{Path, PathBuf};

/// Errors that stop the whole evaluation (per-volume problems go into the report).
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: cannot list: {err}", path.display())]
    List { path: PathBuf, err: std::io::Error },
    #[error("{}: no truth masks (*.nii or *.nii.gz) found", .0.display())]
    NoTruth(PathBuf),
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
        if !p.is_file() {
            continue;
        }
        if let Some(id) = p.file_name().and_then(|n| n.to_str()).and_then(nifti_id) {
            out.push((id.to_string(), p.clone()));
        }
    }
    out.sort();
    // `x.nii` and `x.nii.gz` side by side: keep the first (sorted) and say nothing more.
    out.dedup_by(|a, b| a.0 == b.0);
    if out.is_empty() {
        return Err(DirError::NoTruth(dir));
    }
    Ok(out)
}

/// The prediction file for `id`, if any.
pub fn find_prediction(pred: &Path, id: &str) -> Option<PathBuf> {
    let dir = pred.join(id);
    [
        dir.join("mask.nii.gz"),
        dir.join("mask.nii"),
        pred.join(format!("{id}.nii.gz")),
        pred.join(format!("{id}.nii")),
    ]
    .into_iter()
    .find(|p| p.is_file())
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

/// One volume: reads both masks and computes the metrics; a problem becomes the row's error.
pub fn evaluate_pair(id: &str, pred_path: &Path, truth_path: &Path) -> VolumeReport {
    let mut row = VolumeReport {
        id: id.to_string(),
        shape: None,
        spacing: None,
        metrics: None,
        error: None,
    };
    let truth = match io::read_mask(truth_path) {
        Ok(v) => v,
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    let (z, y, x) = truth.dims();
    row.shape = Some([z, y, x]);
    row.spacing = Some(truth.spacing);
    let pred = match io::read_mask(pred_path) {
        Ok(v) => v,
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    if pred.dims() != truth.dims() {
        let (a, b, c) = pred.dims();
        row.error = Some(format!(
            "{}: shape (z, y, x) = {:?} differs from the truth {} shape {:?}",
            pred_path.display(),
            [a, b, c],
            truth_path.display(),
            [z, y, x]
        ));
        return row;
    }
    match volume_metrics(&io::to_mask(&pred), &io::to_mask(&truth), truth.spacing) {
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
