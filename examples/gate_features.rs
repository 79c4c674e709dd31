//! Development instrument: dumps, for every held-out volume of a cross-validation run
//! (`scripts/ctich_cv.sh`), the features a test-time gate or component filter could use
//! (the slice probabilities and flags, the stage-3 U-Net map's maximum per slice, and for
//! every 3-D component of the predicted mask its size, U-Net / CAM statistics and, per
//! slice, its voxels and its overlap with the truth; `mirror_other` is the fraction
//! `ichcam segment`'s mirror-pair filter uses), one JSON object per line. A script
//! can then score any gate or filter (pooled slice Dice, volume Dice, false-positive
//! volumes) without re-running the network or the refinement.
//!
//!   cargo run --release --example gate_features -- CVDIR > features.jsonl
//!
//! CVDIR holds `foldK/test/{images,labels}` and `foldK/pred/<id>/{mask,cam,unet}.nii.gz`
//! and `slices.csv`. It reads the truth masks: it is an evaluation tool, never part of
//! training or of `ichcam segment`.

use ichcam::seg::{connected_components, Connectivity};
use ndarray::Axis;
use serde_json::json;
use std::path::Path;

fn read_probs(path: &Path, d: usize) -> (Vec<f64>, Vec<bool>) {
    let t = std::fs::read_to_string(path).expect("slices.csv");
    let mut p = vec![0.0; d];
    let mut f = vec![false; d];
    for line in t.lines().skip(1) {
        let c: Vec<&str> = line.split(',').collect();
        let z: usize = c[0].parse().expect("z");
        p[z] = c[1].parse().expect("probability");
        f[z] = c[2] == "1";
    }
    (p, f)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cv = Path::new(&args[0]);
    let mut folds: Vec<_> = std::fs::read_dir(cv)
        .expect("CVDIR")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("pred").is_dir())
        .collect();
    folds.sort();
    for (fold_no, fold) in folds.iter().enumerate() {
        let mut ids: Vec<String> = std::fs::read_dir(fold.join("test/images"))
            .expect("test/images")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().replace(".nii.gz", ""))
            .collect();
        ids.sort();
        for id in ids {
            let vol = ichcam::io::read_volume(&fold.join(format!("test/images/{id}.nii.gz")))
                .expect("image");
            let truth = ichcam::io::to_mask(
                &ichcam::io::read_mask(&fold.join(format!("test/labels/{id}.nii.gz")))
                    .expect("truth"),
            );
            let pred = ichcam::io::to_mask(
                &ichcam::io::read_mask(&fold.join(format!("pred/{id}/mask.nii.gz"))).expect("mask"),
            );
            let cam = ichcam::io::read_volume(&fold.join(format!("pred/{id}/cam.nii.gz")))
                .expect("cam")
                .data;
            let unet = ichcam::io::read_volume(&fold.join(format!("pred/{id}/unet.nii.gz")))
                .expect("unet")
                .data;
            let d = vol.dims().0;
            let (probs, flags) = read_probs(&fold.join(format!("pred/{id}/slices.csv")), d);
            let truth_slice: Vec<usize> = truth
                .axis_iter(Axis(0))
                .map(|s| s.iter().filter(|&&v| v != 0).count())
                .collect();
            let unet_max: Vec<f32> = unet
                .axis_iter(Axis(0))
                .map(|s| s.iter().copied().fold(0.0, f32::max))
                .collect();
            let unet_area: Vec<usize> = unet
                .axis_iter(Axis(0))
                .map(|s| s.iter().filter(|&&v| v >= 0.5).count())
                .collect();
            let cc = connected_components(&pred, Connectivity::TwentySix).expect("ccl");
            let (dd, hh, ww) = vol.dims();
            // The head's mid-sagittal line: the major axis of every slice's non-air pixels.
            let (mut n0, mut sy, mut sx) = (0f64, 0f64, 0f64);
            for ((_, y, x), &v) in vol.data.indexed_iter() {
                if v > -19.0 {
                    n0 += 1.0;
                    sy += y as f64;
                    sx += x as f64;
                }
            }
            let (cy, cx) = (sy / n0.max(1.0), sx / n0.max(1.0));
            let (mut syy, mut sxx, mut sxy) = (0f64, 0f64, 0f64);
            for ((_, y, x), &v) in vol.data.indexed_iter() {
                if v > -19.0 {
                    let (a, b) = (y as f64 - cy, x as f64 - cx);
                    syy += a * a;
                    sxx += b * b;
                    sxy += a * b;
                }
            }
            let theta = 0.5 * (2.0 * sxy).atan2(sxx - syy);
            let (ux, uy) = (theta.cos(), theta.sin());
            let mirror = |y: usize, x: usize| -> (i64, i64) {
                let (a, b) = (x as f64 - cx, y as f64 - cy);
                let t = a * ux + b * uy;
                let (mx, my) = (cx + 2.0 * t * ux - a, cy + 2.0 * t * uy - b);
                (my.round() as i64, mx.round() as i64)
            };
            let near = |m: &ndarray::Array3<u8>, z: usize, y: i64, x: i64, r: i64| -> bool {
                for yy in (y - r).max(0)..=(y + r).min(hh as i64 - 1) {
                    for xx in (x - r).max(0)..=(x + r).min(ww as i64 - 1) {
                        if m[[z, yy as usize, xx as usize]] != 0 {
                            return true;
                        }
                    }
                }
                false
            };
            let bone = vol.data.mapv(|v| (v >= 99.0) as u8);
            // The library's outside-the-skull mask (what `ichcam segment` filters on).
            let outside = ichcam::seg::skull::outside_skull(
                &vol.data,
                ichcam::seg::skull::bone_level(&vol.data),
                (ichcam::seg::skull::DEFAULT_CLOSE_MM / vol.spacing[1].min(vol.spacing[2])).round()
                    as usize,
            );
            let _ = dd;
            let n = cc.sizes.len().saturating_sub(1);
            // Per component: voxels, U-Net sum / max / voxels >= 0.5, CAM max, HU sum,
            // per-slice (voxels, overlap with truth).
            let mut usum = vec![0f64; n + 1];
            let mut umax = vec![0f32; n + 1];
            let mut uhi = vec![0usize; n + 1];
            let mut cmax = vec![0f32; n + 1];
            let mut husum = vec![0f64; n + 1];
            let mut per = vec![vec![(0usize, 0usize); d]; n + 1];
            let mut mir = vec![0usize; n + 1];
            // The library's mirror-pair fractions (what `ichcam segment` filters on).
            let pairs = ichcam::seg::mirror::head_midline(&vol.data, vol.spacing)
                .map(|m| {
                    let px = vol.spacing[1].min(vol.spacing[2]);
                    let tol = (ichcam::seg::mirror::DEFAULT_TOLERANCE_MM / px).round() as usize;
                    ichcam::seg::mirror::pair_fractions(
                        &cc.labels,
                        n,
                        &m,
                        (vol.spacing[1], vol.spacing[2]),
                        tol,
                    )
                })
                .unwrap_or_else(|| vec![0.0; n + 1]);
            let mut rim = vec![0usize; n + 1];
            let mut outs = vec![0usize; n + 1];
            let mut middist = vec![0f64; n + 1];
            for ((z, y, x), &l) in cc.labels.indexed_iter() {
                if l == 0 {
                    continue;
                }
                let l = l as usize;
                let u = unet[[z, y, x]];
                usum[l] += u as f64;
                umax[l] = umax[l].max(u);
                uhi[l] += (u >= 0.5) as usize;
                cmax[l] = cmax[l].max(cam[[z, y, x]]);
                husum[l] += vol.data[[z, y, x]] as f64;
                per[l][z].0 += 1;
                let (my, mx) = mirror(y, x);
                mir[l] += near(&pred, z, my, mx, 4) as usize;
                rim[l] += near(&bone, z, y as i64, x as i64, 3) as usize;
                outs[l] += outside[[z, y, x]] as usize;
                middist[l] += ((x as f64 - cx) * uy - (y as f64 - cy) * ux).abs();
                per[l][z].1 += (truth[[z, y, x]] != 0) as usize;
            }
            let comps: Vec<_> = (1..=n)
                .map(|l| {
                    let sl: Vec<_> = per[l]
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.0 > 0)
                        .map(|(z, p)| json!([z, p.0, p.1]))
                        .collect();
                    let sz = cc.sizes[l] as f64;
                    json!({
                        "voxels": cc.sizes[l],
                        "unet_mean": usum[l] / sz,
                        "unet_max": umax[l],
                        "unet_hi": uhi[l] as f64 / sz,
                        "cam_max": cmax[l],
                        "hu_mean": husum[l] / sz,
                        "mirror": mir[l] as f64 / sz,
                        "mirror_other": pairs[l],
                        "rim": rim[l] as f64 / sz,
                        "outside": outs[l] as f64 / sz,
                        "middist_px": middist[l] / sz,
                        "slices": sl,
                    })
                })
                .collect();
            let row = json!({
                "fold": fold_no,
                "id": id,
                "voxel_ml": vol.voxel_ml(),
                "truth_slice": truth_slice,
                "prob": probs,
                "flag": flags,
                "unet_max": unet_max,
                "unet_area": unet_area,
                "comps": comps,
            });
            println!("{row}");
        }
        eprintln!("done {}", fold.display());
    }
}
