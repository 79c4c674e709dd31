//! Metrics against hand-computed values on small masks (overlap counts, empty-mask
//! conventions, HD95 with anisotropic spacing), the EDT-based HD95 against a brute-force
//! reference, the report's summary conventions, and the folder evaluation.

mod common;
use common::rng::SplitMix64;

use ichcam::eval::metrics::{
    edt_squared, hausdorff_percentile, percentile, surface, surface_distances,
};
use ichcam::eval::{build_report, hd95, volume_metrics, VolumeReport};
use ndarray::Array3;

fn mask(shape: (usize, usize, usize), on: &[(usize, usize, usize)]) -> Array3<u8> {
    let mut m = Array3::zeros(shape);
    for &(z, y, x) in on {
        m[[z, y, x]] = 1;
    }
    m
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn overlap_metrics_by_hand() {
    // Truth 4 voxels, prediction 3 voxels, 2 shared.
    let t = mask((2, 3, 3), &[(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 1, 1)]);
    let p = mask((2, 3, 3), &[(0, 0, 0), (0, 0, 1), (0, 2, 2)]);
    let m = volume_metrics(&p, &t, [2.0, 1.0, 0.5]).unwrap();
    assert_eq!((m.truth_voxels, m.pred_voxels, m.true_positives), (4, 3, 2));
    assert!(close(m.dice, 4.0 / 7.0));
    assert!(close(m.iou, 2.0 / 5.0));
    assert!(close(m.precision.unwrap(), 2.0 / 3.0));
    assert!(close(m.recall.unwrap(), 0.5));
    assert!(close(m.rvd.unwrap(), -0.25));
    assert!(close(m.truth_ml, 4.0 * 1e-3) && close(m.pred_ml, 3.0 * 1e-3));
    // Per-slice: slice 0 has 3 truth voxels, 3 predicted, 2 shared -> 2/3; slice 1 has 1
    // truth voxel, none predicted -> 0.
    assert_eq!(m.truth_slices, 2);
    assert!(close(m.dice_slice.unwrap(), (2.0 / 3.0 + 0.0) / 2.0));
}

#[test]
fn empty_mask_conventions() {
    let e = Array3::<u8>::zeros((3, 4, 4));
    let one = mask((3, 4, 4), &[(1, 1, 1)]);
    let both = volume_metrics(&e, &e, [1.0; 3]).unwrap();
    assert_eq!((both.dice, both.iou), (1.0, 1.0));
    assert_eq!(
        (
            both.precision,
            both.recall,
            both.hd95,
            both.rvd,
            both.dice_slice
        ),
        (None, None, None, None, None)
    );
    assert!(!both.positive() && !both.false_positive_volume());

    let fp = volume_metrics(&one, &e, [1.0; 3]).unwrap();
    assert_eq!(fp.dice, 0.0);
    assert_eq!(fp.precision, Some(0.0));
    assert_eq!(
        (fp.recall, fp.hd95, fp.rvd, fp.dice_slice),
        (None, None, None, None)
    );
    assert!(fp.false_positive_volume());

    let miss = volume_metrics(&e, &one, [1.0; 3]).unwrap();
    assert_eq!(miss.dice, 0.0);
    assert_eq!(
        (miss.precision, miss.recall, miss.rvd, miss.hd95),
        (None, Some(0.0), Some(-1.0), None)
    );
    assert_eq!(miss.dice_slice, Some(0.0));
    assert!(miss.positive());
}

#[test]
fn bad_inputs_are_errors() {
    let a = Array3::<u8>::zeros((3, 4, 4));
    let b = Array3::<u8>::zeros((3, 4, 5));
    assert!(volume_metrics(&a, &b, [1.0; 3]).is_err());
    assert!(volume_metrics(&a, &a, [1.0, 0.0, 1.0]).is_err());
    assert!(volume_metrics(&a, &a, [1.0, f64::NAN, 1.0]).is_err());
}

#[test]
fn hd95_two_single_voxels_anisotropic() {
    let p = mask((4, 5, 6), &[(0, 0, 0)]);
    let t = mask((4, 5, 6), &[(2, 3, 5)]);
    let sp = [5.0, 0.5, 0.7];
    let expect = ((2.0 * 5.0f64).powi(2) + (3.0 * 0.5f64).powi(2) + (5.0 * 0.7f64).powi(2)).sqrt();
    assert!(close(hd95(&p, &t, sp).unwrap().unwrap(), expect));
    assert!(close(hd95(&t, &p, sp).unwrap().unwrap(), expect));
    // Identical masks: 0.
    assert_eq!(hd95(&t, &t, sp).unwrap(), Some(0.0));
}

#[test]
fn hd95_two_cubes_offset_along_x() {
    // 3x3x3 cubes, the prediction one voxel further along x; spacing (z, y, x) = (1, 1, 2).
    // Surface of each cube = its 26 non-centre voxels. From the truth's surface to the
    // prediction's: the 9 voxels of the face x = 0 are 2 mm away (one x-step), the voxel
    // (1, 1, 2) is the prediction's centre, 1 mm (a z or y step) from its surface, the other
    // 16 lie on the prediction's surface (0). Sorted: 16 x 0, 1 x 1, 9 x 2: the 95th
    // percentile (index 23.75 of 0..25) is 2; the other direction is the mirror image.
    let mut t = Array3::<u8>::zeros((5, 5, 7));
    let mut p = Array3::<u8>::zeros((5, 5, 7));
    for z in 1..4 {
        for y in 1..4 {
            for x in 1..4 {
                t[[z, y, x]] = 1;
                p[[z, y, x + 1]] = 1;
            }
        }
    }
    let sp = [1.0, 1.0, 2.0];
    let (tp, pt) = surface_distances(&t, &p, sp).unwrap().unwrap();
    let mut d = tp.clone();
    d.sort_by(|a, b| a.total_cmp(b));
    let mut expect = vec![0.0; 16];
    expect.push(1.0);
    expect.extend([2.0; 9]);
    assert_eq!(d, expect);
    assert_eq!(pt.len(), 26);
    assert!(close(hd95(&p, &t, sp).unwrap().unwrap(), 2.0));
    // The 80th percentile interpolates: index 20 of the sorted list -> 2; the 62nd: index
    // 15.5 -> halfway between 0 and 1.
    assert!(close(
        hausdorff_percentile(&p, &t, sp, 62.0).unwrap().unwrap(),
        0.5
    ));
    let m = volume_metrics(&p, &t, sp).unwrap();
    assert!(close(m.dice, 2.0 * 18.0 / 54.0));
}

#[test]
fn percentile_matches_numpy_linear() {
    // numpy.percentile([1, 2, 3, 4], [0, 50, 95, 100]) = [1, 2.5, 3.85, 4]
    let v = vec![4.0, 1.0, 3.0, 2.0];
    assert!(close(percentile(v.clone(), 0.0), 1.0));
    assert!(close(percentile(v.clone(), 50.0), 2.5));
    assert!(close(percentile(v.clone(), 95.0), 3.85));
    assert!(close(percentile(v, 100.0), 4.0));
}

#[test]
fn edt_matches_brute_force() {
    let mut r = SplitMix64(7);
    for (shape, density, sp) in [
        ((5, 9, 11), 0.02, [3.0, 0.7, 0.9]),
        ((1, 17, 13), 0.05, [1.0, 1.0, 1.0]),
        ((8, 6, 1), 0.1, [0.5, 2.0, 1.0]),
    ] {
        let f = Array3::from_shape_fn(shape, |_| u8::from(r.unit_f64() < density));
        let feats: Vec<(usize, usize, usize)> = f
            .indexed_iter()
            .filter(|(_, &v)| v != 0)
            .map(|(i, _)| i)
            .collect();
        let d = edt_squared(&f, sp);
        for ((z, y, x), &got) in d.indexed_iter() {
            let want = feats
                .iter()
                .map(|&(a, b, c)| {
                    let dz = (z as f64 - a as f64) * sp[0];
                    let dy = (y as f64 - b as f64) * sp[1];
                    let dx = (x as f64 - c as f64) * sp[2];
                    dz * dz + dy * dy + dx * dx
                })
                .fold(f64::INFINITY, f64::min);
            assert!(
                (got - want).abs() <= 1e-9 * want.max(1.0),
                "{shape:?} at {:?}: {got} vs {want}",
                (z, y, x)
            );
        }
    }
    // No feature at all: infinite everywhere.
    assert!(edt_squared(&Array3::zeros((2, 3, 4)), [1.0; 3])
        .iter()
        .all(|v| v.is_infinite()));
}

#[test]
fn hd95_matches_brute_force_on_random_blobs() {
    let mut r = SplitMix64(11);
    for trial in 0..6 {
        let shape = (6, 14, 15);
        let a = Array3::from_shape_fn(shape, |_| u8::from(r.unit_f64() < 0.3));
        let b = Array3::from_shape_fn(shape, |_| u8::from(r.unit_f64() < 0.2));
        let sp = [2.5, 0.6, 0.8];
        let (sa, sb) = (surface(&a), surface(&b));
        let pts = |m: &Array3<u8>| -> Vec<[f64; 3]> {
            m.indexed_iter()
                .filter(|(_, &v)| v != 0)
                .map(|((z, y, x), _)| [z as f64 * sp[0], y as f64 * sp[1], x as f64 * sp[2]])
                .collect()
        };
        let (pa, pb) = (pts(&sa), pts(&sb));
        let directed = |from: &[[f64; 3]], to: &[[f64; 3]]| -> Vec<f64> {
            from.iter()
                .map(|p| {
                    to.iter()
                        .map(|q| {
                            ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2))
                                .sqrt()
                        })
                        .fold(f64::INFINITY, f64::min)
                })
                .collect()
        };
        let want = percentile(directed(&pa, &pb), 95.0).max(percentile(directed(&pb, &pa), 95.0));
        let got = hd95(&a, &b, sp).unwrap().unwrap();
        assert!((got - want).abs() < 1e-9, "trial {trial}: {got} vs {want}");
        assert!(got > 0.0);
    }
}

#[test]
fn surface_is_voxels_with_an_outside_face_neighbour() {
    let mut m = Array3::<u8>::zeros((5, 5, 5));
    m.slice_mut(ndarray::s![1..4, 1..4, 1..4]).fill(1);
    let s = surface(&m);
    assert_eq!(s.iter().filter(|&&v| v != 0).count(), 26);
    assert_eq!(s[[2, 2, 2]], 0);
    // At the volume's border the outside counts as background.
    let full = Array3::<u8>::ones((3, 3, 3));
    assert_eq!(surface(&full).iter().filter(|&&v| v != 0).count(), 26);
}

fn row(id: &str, pred: &Array3<u8>, truth: &Array3<u8>) -> VolumeReport {
    VolumeReport {
        id: id.into(),
        shape: None,
        spacing: Some([1.0; 3]),
        metrics: Some(volume_metrics(pred, truth, [1.0; 3]).unwrap()),
        slices: None,
        cam: None,
        error: None,
    }
}

#[test]
fn report_summary_conventions() {
    let e = Array3::<u8>::zeros((2, 4, 4));
    let a = mask((2, 4, 4), &[(0, 0, 0), (0, 0, 1)]);
    let b = mask((2, 4, 4), &[(0, 0, 0)]);
    let rows = vec![
        row("c-pos", &b, &a), // dice 2/3
        row("a-pos", &a, &a), // dice 1
        row("b-tn", &e, &e),  // true negative: not in the mean
        row("d-fp", &b, &e),  // false-positive volume
        VolumeReport {
            id: "e-bad".into(),
            shape: None,
            spacing: None,
            metrics: None,
            slices: None,
            cam: None,
            error: Some("shape mismatch".into()),
        },
    ];
    let rep = build_report(rows, vec!["z-missing".into()]);
    let s = &rep.summary;
    assert_eq!((s.n_volumes, s.n_positive, s.n_negative), (4, 2, 2));
    assert_eq!(
        (
            s.true_negative_volumes,
            s.false_positive_volumes,
            s.n_errors,
            s.n_missing
        ),
        (1, 1, 1, 1)
    );
    assert!(close(s.dice.unwrap(), (1.0 + 2.0 / 3.0) / 2.0));
    assert!(close(s.recall.unwrap(), (1.0 + 0.5) / 2.0));
    assert!(close(s.precision.unwrap(), 1.0));
    assert!(close(s.rvd.unwrap(), (0.0 - 0.5) / 2.0));
    assert_eq!(s.n_hd95, 2);
    assert_eq!(rep.volumes[0].id, "a-pos", "rows sorted by id");

    let json: serde_json::Value = serde_json::from_str(&rep.to_json().unwrap()).unwrap();
    assert!(close(
        json["summary"]["dice"].as_f64().unwrap(),
        s.dice.unwrap()
    ));
    assert_eq!(json["summary"]["false_positive_volumes"], 1);
    let tn = json["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == "b-tn")
        .unwrap();
    assert!(tn["hd95"].is_null());
    assert_eq!(tn["dice"], 1.0);
    assert_eq!(json["missing"][0], "z-missing");

    let table = rep.table();
    for id in ["a-pos", "b-tn", "c-pos", "d-fp", "e-bad", "z-missing"] {
        assert!(table.contains(id), "{id} missing from the table");
    }
    assert!(table.contains("shape mismatch"));
    // Fixed-width: every metric row has the header's width.
    let lines: Vec<&str> = table.lines().collect();
    let w = lines[0].len();
    for l in lines
        .iter()
        .filter(|l| l.starts_with("a-pos") || l.starts_with("c-pos") || l.starts_with("b-tn"))
    {
        assert_eq!(l.len(), w, "{l}");
    }
    // No positive volume at all: the means are null, not NaN.
    let only_neg = build_report(vec![row("n", &e, &e)], vec![]);
    assert_eq!(only_neg.summary.dice, None);
}

#[test]
fn folder_evaluation() {
    use ichcam::io::{write_mask, Volume};
    let dir = tempfile::tempdir().unwrap();
    let (truth, pred) = (dir.path().join("ds"), dir.path().join("pred"));
    let like = Volume::from_array(Array3::zeros((3, 4, 5)), [5.0, 0.5, 0.5], "t".into());
    let a = mask((3, 4, 5), &[(1, 1, 1), (1, 1, 2)]);
    let b = mask((3, 4, 5), &[(1, 1, 1)]);
    for id in ["001", "002", "003", "004"] {
        write_mask(
            &truth.join("labels").join(format!("{id}.nii.gz")),
            &a,
            &like,
        )
        .unwrap();
    }
    write_mask(&pred.join("001").join("mask.nii.gz"), &a, &like).unwrap();
    write_mask(&pred.join("002.nii.gz"), &b, &like).unwrap();
    let other = Volume::from_array(Array3::zeros((3, 4, 6)), [5.0, 0.5, 0.5], "o".into());
    write_mask(&pred.join("003.nii.gz"), &Array3::zeros((3, 4, 6)), &other).unwrap();
    write_mask(&pred.join("999.nii.gz"), &b, &like).unwrap();

    let (rep, orphans) = ichcam::eval::dirs::evaluate_dirs(&pred, &truth).unwrap();
    assert_eq!(orphans, vec!["999".to_string()]);
    assert_eq!(rep.missing, vec!["004".to_string()]);
    assert_eq!(rep.volumes.len(), 3);
    assert_eq!(rep.volumes[0].metrics.as_ref().unwrap().dice, 1.0);
    assert!(close(
        rep.volumes[1].metrics.as_ref().unwrap().dice,
        2.0 / 3.0
    ));
    let err = rep.volumes[2].error.as_deref().unwrap();
    assert!(err.contains("shape") && err.contains("003"), "{err}");
    assert_eq!(rep.volumes[1].spacing, Some([5.0, 0.5, 0.5]));
    assert!(close(
        rep.volumes[0].metrics.as_ref().unwrap().truth_ml,
        2.0 * 1.25e-3
    ));
    // A folder without any truth mask is an error.
    assert!(ichcam::eval::dirs::evaluate_dirs(&pred, &dir.path().join("nothing")).is_err());
}

#[test]
fn pooled_slice_dice_weights_every_truth_slice_and_counts_misses() {
    // Volume A: 2 truth slices, predicted exactly (2 x Dice 1). Volume B: 1 truth slice on
    // z = 0 (predicted: Dice 2/3) and one on z = 1 (nothing predicted: Dice 0).
    let a = mask((2, 4, 4), &[(0, 0, 0), (1, 1, 1)]);
    let bt = mask((2, 4, 4), &[(0, 0, 0), (0, 0, 1), (1, 2, 2)]);
    let bp = mask((2, 4, 4), &[(0, 0, 0)]);
    let mut ra = row("a", &a, &a);
    ra.slices = Some(ichcam::eval::SliceScores {
        probability: vec![0.9, 0.8],
        flagged: vec![true, true],
        truth: vec![true, true],
    });
    let mut rb = row("b", &bp, &bt);
    rb.slices = Some(ichcam::eval::SliceScores {
        probability: vec![0.7, 0.2],
        flagged: vec![true, false],
        truth: vec![true, true],
    });
    let e = Array3::<u8>::zeros((2, 4, 4));
    let mut rn = row("n", &e, &e);
    rn.slices = Some(ichcam::eval::SliceScores {
        probability: vec![0.75, 0.1],
        flagged: vec![true, false],
        truth: vec![false, false],
    });
    let rep = build_report(vec![ra, rb, rn], vec![]);
    let s = &rep.summary;
    assert_eq!(s.n_truth_slices, 4);
    // (1 + 1 + 2/3 + 0) / 4, not the mean of the per-volume means (1 + 1/3) / 2.
    assert!(close(s.dice_slice_pooled.unwrap(), (2.0 + 2.0 / 3.0) / 4.0));
    assert_eq!(s.n_scored_slices, 6);
    assert!(close(s.slice_sensitivity.unwrap(), 3.0 / 4.0));
    assert!(close(s.slice_specificity.unwrap(), 1.0 / 2.0));
    // Positives 0.9, 0.8, 0.7, 0.2 against negatives 0.75, 0.1: 6 of 8 pairs ranked right.
    assert!(close(s.slice_auc.unwrap(), 6.0 / 8.0));
    let json: serde_json::Value = serde_json::from_str(&rep.to_json().unwrap()).unwrap();
    assert!(json["summary"]["dice_slice_pooled"].as_f64().is_some());
}
