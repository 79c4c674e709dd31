//! Evaluation of a folder of predictions against a folder of truth masks: file matching,
//! reading, per-volume metrics. The only part of `eval` that touches files (through `io`).
//!
//! Layouts: truth is `TRUTH/<id>.nii[.gz]` (or a pair `<id>.hdr[.gz]` + `<id>.img[.gz]`; names
//! as [`io::volume_stem`] says), or a dataset folder whose `labels/` (or
//! `label/`) subfolder holds those files; a prediction is `PRED/<id>/mask.nii[.gz]` or
//! `PRED/<id>.nii[.gz]` (or `PRED/<id>.hdr[.gz]`). Beside a `mask.nii[.gz]`, `slices.csv` (z, probability, positive)
//! gives the slice-detection figures and `cam.nii.gz` (read when asked) the CAM's. Hidden
//! entries (a `segment` run's temporary folders) are ignored; a symbolic-link loop or a
//! dangling link among the masks is an error naming it.
//!
//! Memory: each mask is kept as 0/1 bytes once read, and the metrics' peak (the two masks,
//! HD95's surfaces and exact distance transforms on the masks' bounding box, the surface
//! distances) is estimated before they run; a pair beyond the budget
//! ([`crate::io::budget`]) gets an error row naming the size and the budget.

use super::metrics::{bbox, volume_metrics};
use super::report::{build_report, CamPointing, Report, SliceScores, VolumeReport};
use crate::io::{self, IoError, Mask};
use ndarray::{Array3, Axis};
use std::path::{Path, PathBuf};

/// Errors that stop the whole evaluation (per-volume problems go into the report).
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: cannot list: {err}", path.display())]
    List { path: PathBuf, err: std::io::Error },
    #[error("{}: no truth masks (*.nii, *.nii.gz or *.hdr/*.img pairs) found", .0.display())]
    NoTruth(PathBuf),
    #[error(transparent)]
    Entry(#[from] IoError),
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
        let Some(id) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(io::volume_stem)
        else {
            continue;
        };
        // A mask name behind a link loop or a dangling link is an error, not a skip.
        if !io::metadata(&p)?.is_file() {
            continue;
        }
        out.push((id.to_string(), p.clone()));
    }
    out.sort();
    // `x.nii` and `x.nii.gz` (or `x.hdr`) side by side: keep the first (sorted) and say
    // nothing more.
    out.dedup_by(|a, b| a.0 == b.0);
    if out.is_empty() {
        return Err(DirError::NoTruth(dir));
    }
    Ok(out)
}

/// The prediction file for `id`, if any (a link that leads nowhere counts, so that its
/// read names the problem). `PRED/<id>.<ext>` is looked for with the extensions of
/// [`io::VOLUME_EXTENSIONS`] in lower and in upper case.
pub fn find_prediction(pred: &Path, id: &str) -> Option<PathBuf> {
    let dir = pred.join(id);
    [dir.join("mask.nii.gz"), dir.join("mask.nii")]
        .into_iter()
        .chain(io::VOLUME_EXTENSIONS.iter().flat_map(|e| {
            [e.to_string(), e.to_ascii_uppercase()].map(|e| pred.join(format!("{id}{e}")))
        }))
        .find(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.is_file() || (m.is_symlink() && !p.is_dir()))
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
        } else if let Some(id) = io::volume_stem(name) {
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

/// Probabilities and flags per slice.
pub type SliceColumns = (Vec<f64>, Vec<bool>);

/// `slices.csv` beside a prediction (header `z,probability,positive,...`): probabilities
/// and flags per slice, for `depth` slices. A missing file is `Ok(None)`.
pub fn read_slice_scores(path: &Path, depth: usize) -> Result<Option<SliceColumns>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("{}: no `{name}` column", path.display()))
    };
    let (cz, cp, cf) = (col("z")?, col("probability")?, col("positive")?);
    let mut prob = vec![f64::NAN; depth];
    let mut flag = vec![false; depth];
    let mut seen = vec![false; depth];
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = || format!("{}: line {}: cannot read `{line}`", path.display(), i + 2);
        let z: usize = f.get(cz).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let p: f64 = f.get(cp).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let q: u8 = f.get(cf).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        if z >= depth || !p.is_finite() {
            return Err(bad());
        }
        prob[z] = p;
        flag[z] = q != 0;
        seen[z] = true;
    }
    if seen.iter().any(|s| !s) {
        return Err(format!(
            "{}: {} of {depth} slices listed",
            path.display(),
            seen.iter().filter(|&&s| s).count()
        ));
    }
    Ok(Some((prob, flag)))
}

/// CAM diagnostics (see [`CamPointing`]) of a normalised CAM against the truth.
pub fn cam_pointing(cam: &Array3<f32>, truth: &Mask, flagged: &[bool]) -> CamPointing {
    let mut c = CamPointing::default();
    for (z, (cs, ts)) in cam
        .axis_iter(Axis(0))
        .zip(truth.axis_iter(Axis(0)))
        .enumerate()
    {
        let n: usize = ts.iter().filter(|&&v| v != 0).count();
        if n == 0 || !flagged.get(z).copied().unwrap_or(false) {
            continue;
        }
        c.slices += 1;
        c.truth_voxels += n;
        c.truth_voxels_in_cam += cs
            .iter()
            .zip(ts.iter())
            .filter(|(&v, &t)| t != 0 && v >= 0.7)
            .count();
        let (mut best, mut at) = (f32::NEG_INFINITY, (0usize, 0usize));
        for ((y, x), &v) in cs.indexed_iter() {
            if v > best {
                best = v;
                at = (y, x);
            }
        }
        let (h, w) = ts.dim();
        let r = 10isize;
        let hit = (-r..=r).any(|dy| {
            (-r..=r).any(|dx| {
                let (y, x) = (at.0 as isize + dy, at.1 as isize + dx);
                y >= 0
                    && x >= 0
                    && (y as usize) < h
                    && (x as usize) < w
                    && ts[[y as usize, x as usize]] != 0
            })
        });
        c.peak_hits += usize::from(hit);
    }
    c
}

/// One volume: reads both masks and computes the metrics; a problem becomes the row's error.
pub fn evaluate_pair(id: &str, pred_path: &Path, truth_path: &Path) -> VolumeReport {
    evaluate_pair_with(id, pred_path, truth_path, false)
}

/// [`evaluate_pair`], also reading `slices.csv` beside the prediction, and its `cam.nii.gz`
/// when `with_cam`.
pub fn evaluate_pair_with(
    id: &str,
    pred_path: &Path,
    truth_path: &Path,
    with_cam: bool,
) -> VolumeReport {
    let mut row = VolumeReport {
        id: id.to_string(),
        shape: None,
        spacing: None,
        metrics: None,
        slices: None,
        cam: None,
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
    // Side files only beside a `<id>/mask.nii[.gz]` prediction.
    let dir = pred_path
        .parent()
        .filter(|_| {
            pred_path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mask."))
        })
        .map(Path::to_path_buf);
    let Some(dir) = dir else {
        return row;
    };
    let truth_flags: Vec<bool> = truth
        .axis_iter(Axis(0))
        .map(|s| s.iter().any(|&v| v != 0))
        .collect();
    match read_slice_scores(&dir.join("slices.csv"), z) {
        Ok(Some((probability, flagged))) => {
            if with_cam {
                match io::read_volume(&dir.join("cam.nii.gz")) {
                    Ok(c) if c.dims() == (z, y, x) => {
                        row.cam = Some(cam_pointing(&c.data, &truth, &flagged));
                    }
                    Ok(c) => {
                        row.error = Some(format!(
                            "{}: CAM shape {:?} differs from the truth's",
                            dir.join("cam.nii.gz").display(),
                            c.dims()
                        ))
                    }
                    Err(e) => row.error = Some(e.to_string()),
                }
            }
            row.slices = Some(SliceScores {
                probability,
                flagged,
                truth: truth_flags,
            });
        }
        Ok(None) => {}
        Err(e) => row.error = Some(e),
    }
    row
}

/// Evaluates every truth volume that has a prediction; the others are listed as missing.
/// Also returns the ids of predictions without a truth.
pub fn evaluate_dirs(pred: &Path, truth: &Path) -> Result<(Report, Vec<String>), DirError> {
    evaluate_dirs_with(pred, truth, false)
}

/// [`evaluate_dirs`], reading the CAMs too when `with_cam` (see [`evaluate_pair_with`]).
pub fn evaluate_dirs_with(
    pred: &Path,
    truth: &Path,
    with_cam: bool,
) -> Result<(Report, Vec<String>), DirError> {
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
            Some(pp) => rows.push(evaluate_pair_with(id, &pp, tp, with_cam)),
            None => missing.push(id.clone()),
        }
    }
    let orphans = list_predictions(pred)?
        .into_iter()
        .filter(|p| !truths.iter().any(|(id, _)| id == p))
        .collect();
    Ok((build_report(rows, missing), orphans))
}
