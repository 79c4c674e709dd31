//! The evaluation report: one row per volume and a summary, as JSON (serde) and as a
//! fixed-width table. Knows only [`VolumeMetrics`] and volume ids.
//!
//! Summary conventions: `dice`, `dice_slice`, `iou`, `precision`, `recall`, `hd95` (mm)
//! and `rvd` are means over the volumes **with hemorrhage in the truth** whose value is
//! defined (a volume with an error or an empty truth never enters them); volumes with an
//! empty truth are counted as `true_negative_volumes` (empty prediction) or
//! `false_positive_volumes` (non-empty prediction). `dice_slice_pooled` is the paper's
//! metric: the mean over every slice with hemorrhage in the truth, all volumes pooled, of
//! that slice's 2-D Dice (0 when the prediction is empty there). The slice-detection
//! figures (`slice_auc`, `slice_sensitivity`, `slice_specificity`) pool every slice of the
//! volumes whose prediction came with slice probabilities and flags; the CAM figures pool
//! the volumes whose CAM was read. Means over nothing are `null`.

use super::metrics::VolumeMetrics;
use std::fmt::Write as _;

/// One volume: its metrics, or the reason it could not be evaluated.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeReport {
    pub id: String,
    /// `[z, y, x]` of the truth.
    pub shape: Option<[usize; 3]>,
    /// `[z, y, x]` mm of the truth.
    pub spacing: Option<[f64; 3]>,
    #[serde(flatten)]
    pub metrics: Option<VolumeMetrics>,
    /// The prediction's slice probabilities and flags beside the truth's, when the
    /// prediction folder has them (`slices.csv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slices: Option<SliceScores>,
    /// How well the CAM points at the truth, when the CAM was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cam: Option<CamPointing>,
    pub error: Option<String>,
}

/// Per slice: the classifier's probability, its flag, and whether the truth has hemorrhage.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SliceScores {
    pub probability: Vec<f64>,
    pub flagged: Vec<bool>,
    pub truth: Vec<bool>,
}

/// CAM diagnostics of one volume, on the slices with hemorrhage in the truth that the
/// classifier flagged: truth voxels where the normalised CAM reaches 0.7 (of all their truth
/// voxels), and slices whose CAM maximum lies on the truth (within 10 px).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CamPointing {
    pub truth_voxels: usize,
    pub truth_voxels_in_cam: usize,
    pub slices: usize,
    pub peak_hits: usize,
}

/// Means and counts over the volumes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Volumes evaluated (no error).
    pub n_volumes: usize,
    /// ... of which with hemorrhage in the truth.
    pub n_positive: usize,
    /// ... of which with an empty truth.
    pub n_negative: usize,
    pub true_negative_volumes: usize,
    pub false_positive_volumes: usize,
    /// Volumes that could not be evaluated (e.g. shape mismatch).
    pub n_errors: usize,
    /// Truth volumes without a prediction.
    pub n_missing: usize,
    pub dice: Option<f64>,
    pub dice_slice: Option<f64>,
    pub iou: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// mm, over the positive volumes where it is defined (`n_hd95` of them).
    pub hd95: Option<f64>,
    pub n_hd95: usize,
    pub rvd: Option<f64>,
    /// The paper's pooled per-slice Dice (see the module doc) over `n_truth_slices` slices.
    pub dice_slice_pooled: Option<f64>,
    pub n_truth_slices: usize,
    /// Slice detection over `n_scored_slices` slices (see the module doc).
    pub slice_auc: Option<f64>,
    pub slice_sensitivity: Option<f64>,
    pub slice_specificity: Option<f64>,
    pub n_scored_slices: usize,
    /// Pooled [`CamPointing`]: fraction of truth voxels inside the binary CAM, fraction of
    /// slices whose CAM peak hits the truth.
    pub cam_pointing: Option<f64>,
    pub cam_peak_hit: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub summary: Summary,
    pub volumes: Vec<VolumeReport>,
    /// Ids of truth volumes without a prediction.
    pub missing: Vec<String>,
}

fn mean(v: impl Iterator<Item = Option<f64>>) -> (Option<f64>, usize) {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v.flatten() {
        s += x;
        n += 1;
    }
    ((n > 0).then(|| s / n as f64), n)
}

/// The summary of `volumes` (see the module doc for what each mean covers).
pub fn summarize(volumes: &[VolumeReport], n_missing: usize) -> Summary {
    let ok: Vec<&VolumeMetrics> = volumes
        .iter()
        .filter(|v| v.error.is_none())
        .filter_map(|v| v.metrics.as_ref())
        .collect();
    let pos: Vec<&VolumeMetrics> = ok.iter().copied().filter(|m| m.positive()).collect();
    let neg = ok.len() - pos.len();
    let fp = ok.iter().filter(|m| m.false_positive_volume()).count();
    let (hd95, n_hd95) = mean(pos.iter().map(|m| m.hd95));
    let n_truth_slices: usize = pos.iter().map(|m| m.truth_slices).sum();
    let pooled: f64 = pos
        .iter()
        .map(|m| m.dice_slice.unwrap_or(0.0) * m.truth_slices as f64)
        .sum();
    let scored: Vec<&SliceScores> = volumes
        .iter()
        .filter(|v| v.error.is_none())
        .filter_map(|v| v.slices.as_ref())
        .collect();
    let (mut probs, mut truth, mut flags) = (Vec::new(), Vec::new(), Vec::new());
    for s in &scored {
        probs.extend_from_slice(&s.probability);
        truth.extend_from_slice(&s.truth);
        flags.extend_from_slice(&s.flagged);
    }
    let (mut s_tp, mut s_fn, mut s_tn, mut s_fp) = (0usize, 0usize, 0usize, 0usize);
    for (&f, &t) in flags.iter().zip(&truth) {
        match (f, t) {
            (true, true) => s_tp += 1,
            (false, true) => s_fn += 1,
            (false, false) => s_tn += 1,
            (true, false) => s_fp += 1,
        }
    }
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    let cams: Vec<&CamPointing> = volumes
        .iter()
        .filter(|v| v.error.is_none())
        .filter_map(|v| v.cam.as_ref())
        .collect();
    let cam_sum = |f: fn(&CamPointing) -> usize| cams.iter().map(|c| f(c)).sum::<usize>();
    Summary {
        dice_slice_pooled: (n_truth_slices > 0).then(|| pooled / n_truth_slices as f64),
        n_truth_slices,
        slice_auc: crate::train::auc::roc_auc(&probs, &truth),
        slice_sensitivity: ratio(s_tp, s_tp + s_fn),
        slice_specificity: ratio(s_tn, s_tn + s_fp),
        n_scored_slices: probs.len(),
        cam_pointing: ratio(
            cam_sum(|c| c.truth_voxels_in_cam),
            cam_sum(|c| c.truth_voxels),
        ),
        cam_peak_hit: ratio(cam_sum(|c| c.peak_hits), cam_sum(|c| c.slices)),
        n_volumes: ok.len(),
        n_positive: pos.len(),
        n_negative: neg,
        true_negative_volumes: neg - fp,
        false_positive_volumes: fp,
        n_errors: volumes.len() - ok.len(),
        n_missing,
        dice: mean(pos.iter().map(|m| Some(m.dice))).0,
        dice_slice: mean(pos.iter().map(|m| m.dice_slice)).0,
        iou: mean(pos.iter().map(|m| Some(m.iou))).0,
        precision: mean(pos.iter().map(|m| m.precision)).0,
        recall: mean(pos.iter().map(|m| m.recall)).0,
        hd95,
        n_hd95,
        rvd: mean(pos.iter().map(|m| m.rvd)).0,
    }
}

/// Builds the report; volumes are sorted by id.
pub fn build_report(mut volumes: Vec<VolumeReport>, mut missing: Vec<String>) -> Report {
    volumes.sort_by(|a, b| a.id.cmp(&b.id));
    missing.sort();
    Report {
        summary: summarize(&volumes, missing.len()),
        volumes,
        missing,
    }
}

fn cell(v: Option<f64>, width: usize, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:>width$.prec$}"),
        _ => format!("{:>width$}", "-"),
    }
}

impl Report {
    /// Pretty JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// A fixed-width table: one row per volume, then the summary row and the counts.
    pub fn table(&self) -> String {
        let id_w = self
            .volumes
            .iter()
            .map(|v| v.id.len())
            .chain(self.missing.iter().map(|m| m.len()))
            .max()
            .unwrap_or(0)
            .max(8);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{:<id_w$} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7}",
            "volume",
            "truth mL",
            "pred mL",
            "dice",
            "dice/sl",
            "iou",
            "prec",
            "recall",
            "hd95 mm",
            "rvd"
        );
        let line_w = id_w + 9 * 2 + 7 * 5 + 8 + 7 + 9;
        let _ = writeln!(t, "{}", "-".repeat(line_w));
        for v in &self.volumes {
            match (&v.metrics, &v.error) {
                (Some(m), None) => {
                    let _ = writeln!(
                        t,
                        "{:<id_w$} {} {} {} {} {} {} {} {} {}",
                        v.id,
                        cell(Some(m.truth_ml), 9, 2),
                        cell(Some(m.pred_ml), 9, 2),
                        cell(Some(m.dice), 7, 3),
                        cell(m.dice_slice, 7, 3),
                        cell(Some(m.iou), 7, 3),
                        cell(m.precision, 7, 3),
                        cell(m.recall, 7, 3),
                        cell(m.hd95, 8, 2),
                        cell(m.rvd, 7, 3),
                    );
                }
                (_, e) => {
                    let _ = writeln!(
                        t,
                        "{:<id_w$} error: {}",
                        v.id,
                        e.as_deref().unwrap_or("no metrics")
                    );
                }
            }
        }
        for m in &self.missing {
            let _ = writeln!(t, "{m:<id_w$} missing prediction");
        }
        let s = &self.summary;
        let _ = writeln!(t, "{}", "-".repeat(line_w));
        let _ = writeln!(
            t,
            "{:<id_w$} {:>9} {:>9} {} {} {} {} {} {} {}",
            "mean(+)",
            "",
            "",
            cell(s.dice, 7, 3),
            cell(s.dice_slice, 7, 3),
            cell(s.iou, 7, 3),
            cell(s.precision, 7, 3),
            cell(s.recall, 7, 3),
            cell(s.hd95, 8, 2),
            cell(s.rvd, 7, 3),
        );
        let f = |v: Option<f64>| cell(v, 0, 3);
        let _ = writeln!(
            t,
            "pooled per-slice Dice (the paper's) {} over {} slices; volume Dice {}",
            f(s.dice_slice_pooled),
            s.n_truth_slices,
            f(s.dice)
        );
        if s.n_scored_slices > 0 {
            let _ = writeln!(
                t,
                "slice flags over {} slices: AUC {}, sensitivity {}, specificity {}",
                s.n_scored_slices,
                f(s.slice_auc),
                f(s.slice_sensitivity),
                f(s.slice_specificity)
            );
        }
        if s.cam_pointing.is_some() {
            let _ = writeln!(
                t,
                "CAM on flagged truth slices: {} of the truth voxels inside CAM >= 0.7, peak on the truth in {}",
                f(s.cam_pointing),
                f(s.cam_peak_hit)
            );
        }
        let _ = writeln!(
            t,
            "{} volumes: {} with hemorrhage, {} without ({} true negative, {} false positive); {} errors, {} missing",
            s.n_volumes, s.n_positive, s.n_negative, s.true_negative_volumes, s.false_positive_volumes, s.n_errors, s.n_missing
        );
        t
    }
}
