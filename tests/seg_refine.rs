//! k-means on known clusters (and its determinism and assign/update split), the cluster
//! choice, morphology, and the whole refinement on a small synthetic head: a 60 HU blob in
//! 35 HU brain under a CAM is recovered, a negative slice stays empty, a 300 HU
//! calcification is not chosen.

mod common;

use ichcam::engine::cpu::kmeans::{assign, init_centroids, kmeans_1d, update};
use ichcam::engine::cpu::morph::{dilate, erode};
use ichcam::engine::Structuring;
use ichcam::eval::volume_metrics;
use ichcam::seg::choose::choose_cluster;
use ichcam::seg::refine::{positive_cam_region, pseudo_mask};
use ichcam::seg::threshold::cam_region;
use ichcam::seg::{refine, RefineConfig};
use ndarray::{s, Array3};

/// Deterministic noise in [-1, 1] from an index (a hash, no state).
fn noise(i: u64) -> f32 {
    let z = common::rng::counter(i, 0x632B_E59B_D9B4_E019);
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[test]
fn kmeans_recovers_known_clusters() {
    let groups = [(0.1f32, 300usize), (0.35, 120), (0.6, 200), (0.9, 80)];
    let mut values = Vec::new();
    let mut truth = Vec::new();
    for (g, &(c, n)) in groups.iter().enumerate() {
        for i in 0..n {
            values.push(c + 0.02 * noise((g * 1000 + i) as u64));
            truth.push(g);
        }
    }
    // Interleave so that the order of the input does not help.
    let order: Vec<usize> = (0..values.len())
        .map(|i| (i * 337) % values.len())
        .collect();
    let v: Vec<f32> = order.iter().map(|&i| values[i]).collect();
    let t: Vec<usize> = order.iter().map(|&i| truth[i]).collect();
    let km = kmeans_1d(&v, 4, 50);
    assert!(km.converged);
    let mut sorted: Vec<(f32, usize)> = km
        .centroids
        .iter()
        .copied()
        .zip(km.counts.iter().copied())
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    for ((c, n), &(gc, gn)) in sorted.iter().zip(&groups) {
        assert!((c - gc).abs() < 0.01, "centroid {c} vs {gc}");
        assert_eq!(*n, gn);
    }
    // Same cluster <=> same group.
    for i in (0..v.len()).step_by(7) {
        for j in (0..v.len()).step_by(11) {
            assert_eq!(km.labels[i] == km.labels[j], t[i] == t[j]);
        }
    }
    // Determinism, and the split steps reproduce the whole run.
    assert_eq!(kmeans_1d(&v, 4, 50), km);
    let mut c = init_centroids(&v, 4);
    let mut l = vec![u8::MAX; v.len()];
    let mut it = 0;
    loop {
        let changed = assign(&v, &c, &mut l);
        if changed == 0 && it > 0 {
            break;
        }
        update(&v, &l, &mut c);
        it += 1;
    }
    assert_eq!(
        (c, l, it),
        (km.centroids.clone(), km.labels.clone(), km.iterations)
    );
}

#[test]
fn kmeans_edge_cases() {
    // Quantile start at (i + 0.5) / k.
    let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
    assert_eq!(init_centroids(&v, 4), vec![1.0, 3.0, 5.0, 7.0]);
    // Constant input: all in the first cluster, the empty ones keep their centroid.
    let km = kmeans_1d(&[0.4; 50], 4, 50);
    assert_eq!(km.counts, vec![50, 0, 0, 0]);
    assert!(km.centroids.iter().all(|&c| c == 0.4));
    assert!(km.labels.iter().all(|&l| l == 0));
    // Fewer values than clusters, and none.
    let km = kmeans_1d(&[0.1, 0.9], 4, 50);
    assert_eq!(km.counts.iter().sum::<usize>(), 2);
    let km = kmeans_1d(&[], 4, 50);
    assert!(km.labels.is_empty());
    // Empty cluster keeps its centroid in update.
    let mut c = vec![0.0, 0.5, 1.0];
    let counts = update(&[0.1, 0.2, 0.9], &[0, 0, 2], &mut c);
    assert_eq!(counts, vec![2, 0, 1]);
    assert!((c[0] - 0.15).abs() < 1e-7 && c[1] == 0.5 && c[2] == 0.9);
    // Ties go to the lower index.
    let mut l = vec![9u8; 1];
    assert_eq!(assign(&[0.5], &[0.4, 0.6], &mut l), 1);
    assert_eq!(l, vec![0]);
}

#[test]
fn choose_skips_saturated_and_small_clusters() {
    let c = [0.2, 0.45, 0.98, 0.7];
    assert_eq!(
        choose_cluster(&c, &[100, 100, 100, 100], 0.0, 0.95, 10),
        Some(3)
    );
    assert_eq!(
        choose_cluster(&c, &[100, 100, 100, 3], 0.0, 0.95, 10),
        Some(1)
    );
    assert_eq!(
        choose_cluster(&c, &[100, 100, 100, 100], 0.0, 2.0, 10),
        Some(2)
    );
    assert_eq!(choose_cluster(&c, &[100, 0, 100, 0], 0.0, 0.95, 0), Some(0));
    assert_eq!(choose_cluster(&[1.0, 0.99], &[5, 5], 0.0, 0.95, 1), None);
    assert_eq!(choose_cluster(&[], &[], 0.0, 0.95, 1), None);
}

#[test]
fn morphology() {
    let mut m = Array3::<u8>::zeros((2, 7, 7));
    m[[0, 3, 3]] = 1;
    let cross = dilate(&m, 1, Structuring::Cross);
    assert_eq!(cross.iter().filter(|&&v| v == 1).count(), 5);
    assert_eq!(
        cross.slice(s![1, .., ..]).sum(),
        0,
        "no bleeding across slices"
    );
    assert_eq!(dilate(&m, 1, Structuring::Square).sum(), 9);
    assert_eq!(dilate(&m, 2, Structuring::Square).sum(), 25);
    assert_eq!(dilate(&m, 2, Structuring::Cross).sum(), 13);
    assert_eq!(dilate(&m, 0, Structuring::Square), m);
    let sq = dilate(&m, 2, Structuring::Square);
    assert_eq!(erode(&sq, 2, Structuring::Square), m);
    assert_eq!(erode(&sq, 1, Structuring::Square).sum(), 9);
    // Objects at the border erode from the border too.
    let full = Array3::<u8>::ones((1, 5, 5));
    assert_eq!(erode(&full, 1, Structuring::Square).sum(), 9);
    assert_eq!(erode(&full, 1, Structuring::Cross).sum(), 9);
}

const NZ: usize = 12;
const N: usize = 80;
const C: f64 = 40.0;
const BLOB_R: f64 = 8.0;
const BLOB_Z: std::ops::Range<usize> = 3..9;

/// A synthetic head: 35 HU brain (+-3 HU noise), a 60 HU disc stack (radius 8, slices 3..9)
/// at the centre, a 300 HU calcification (4x4) 15 px off the centre on slices 3..9, a CAM
/// that is a wide Gaussian over the blob (normalised to 1 at the centre).
fn phantom(with_calc: bool) -> (Array3<f32>, Array3<f32>, Array3<u8>) {
    let mut hu = Array3::<f32>::zeros((NZ, N, N));
    let mut truth = Array3::<u8>::zeros((NZ, N, N));
    let mut cam = Array3::<f32>::zeros((NZ, N, N));
    for ((z, y, x), v) in hu.indexed_iter_mut() {
        let r = ((y as f64 - C).powi(2) + (x as f64 - C).powi(2)).sqrt();
        let i = (z * N * N + y * N + x) as u64;
        let in_blob = BLOB_Z.contains(&z) && r <= BLOB_R;
        *v = if in_blob { 60.0 } else { 35.0 } + 3.0 * noise(i);
        if in_blob {
            truth[[z, y, x]] = 1;
        }
        if with_calc && BLOB_Z.contains(&z) && (53..57).contains(&y) && (38..42).contains(&x) {
            *v = 300.0;
        }
        if BLOB_Z.contains(&z) || z == 2 || z == 9 {
            // CAM >= 0.7 within r ~ 23 px: the blob covers ~12% of the region.
            cam[[z, y, x]] = (-(r * r) / (2.0 * 27.0f64.powi(2))).exp() as f32;
        }
    }
    (hu, cam, truth)
}

#[test]
fn refine_recovers_the_blob() {
    let (hu, cam, truth) = phantom(false);
    let positive: Vec<bool> = (0..NZ).map(|z| BLOB_Z.contains(&z)).collect();
    let cfg = RefineConfig::default();
    let out = refine(&hu, &cam, &positive, &cfg).unwrap();
    let m = volume_metrics(&out.mask, &truth, [5.0, 0.5, 0.5]).unwrap();
    assert!(m.dice > 0.8, "dice {}", m.dice);
    assert_eq!(out.n_components, 1);
    assert!(out.cam_voxels > 4 * truth.sum() as usize);
    // Nothing outside the blob's slices (slices 2 and 9 have a CAM, but are negative).
    for z in (0..NZ).filter(|z| !BLOB_Z.contains(z)) {
        assert_eq!(out.mask.slice(s![z, .., ..]).sum(), 0, "slice {z}");
    }
    // Per-volume k-means finds it too.
    let vol = refine(
        &hu,
        &cam,
        &positive,
        &RefineConfig {
            per_slice_kmeans: false,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert!(
        volume_metrics(&vol.mask, &truth, [5.0, 0.5, 0.5])
            .unwrap()
            .dice
            > 0.8
    );
    // Deterministic.
    assert_eq!(refine(&hu, &cam, &positive, &cfg).unwrap().mask, out.mask);
}

#[test]
fn negative_slice_gets_nothing() {
    let (hu, cam, truth) = phantom(false);
    let mut positive: Vec<bool> = (0..NZ).map(|z| BLOB_Z.contains(&z)).collect();
    positive[5] = false;
    let out = refine(&hu, &cam, &positive, &RefineConfig::default()).unwrap();
    assert_eq!(out.mask.slice(s![5, .., ..]).sum(), 0);
    assert!(out.mask.slice(s![4, .., ..]).sum() > 0 && out.mask.slice(s![6, .., ..]).sum() > 0);
    let region = positive_cam_region(&cam, &positive, 0.7).unwrap();
    assert_eq!(region.slice(s![5, .., ..]).sum(), 0);
    assert_eq!(
        region.slice(s![4, .., ..]),
        cam_region(&cam, 0.7).slice(s![4, .., ..])
    );
    // The rest of the blob is still found.
    let mut t = truth.clone();
    t.slice_mut(s![5, .., ..]).fill(0);
    assert!(volume_metrics(&out.mask, &t, [5.0, 0.5, 0.5]).unwrap().dice > 0.8);
    // All slices negative: an empty mask.
    let none = refine(&hu, &cam, &[false; NZ], &RefineConfig::default()).unwrap();
    assert_eq!((none.mask.sum(), none.n_components), (0, 0));
}

#[test]
fn calcification_is_not_chosen() {
    let (hu, cam, truth) = phantom(true);
    let positive: Vec<bool> = (0..NZ).map(|z| BLOB_Z.contains(&z)).collect();
    let cfg = RefineConfig::default();
    let out = refine(&hu, &cam, &positive, &cfg).unwrap();
    let calc = out.mask.slice(s![3..9, 53..57, 38..42]).sum();
    assert_eq!(calc, 0, "calcification voxels in the mask");
    assert!(
        volume_metrics(&out.mask, &truth, [5.0, 0.5, 0.5])
            .unwrap()
            .dice
            > 0.8
    );
    // The authors' literal version (saturated voxels inside k-means): the quantile start
    // puts three centroids in the brain, the calcification shares the top cluster with the
    // blob, their mean stays below the saturation level and the calcification is chosen.
    // That is why saturated voxels are left out of k-means by default.
    let literal = RefineConfig {
        exclude_saturated: false,
        ..cfg.clone()
    };
    let pm = pseudo_mask(
        &hu,
        &positive_cam_region(&cam, &positive, 0.7).unwrap(),
        &literal,
    )
    .unwrap();
    assert_eq!(pm.slice(s![3..9, 53..57, 38..42]).sum(), 6 * 16);
}

#[test]
fn refine_rejects_bad_shapes_and_parameters() {
    let (hu, cam, _) = phantom(false);
    let pos = vec![true; NZ];
    let small = Array3::<f32>::zeros((NZ, N, N - 1));
    assert!(refine(&hu, &small, &pos, &RefineConfig::default()).is_err());
    assert!(refine(&hu, &cam, &pos[1..], &RefineConfig::default()).is_err());
    assert!(refine(
        &hu,
        &cam,
        &pos,
        &RefineConfig {
            k: 0,
            ..RefineConfig::default()
        }
    )
    .is_err());
    assert!(refine(
        &hu,
        &cam,
        &pos,
        &RefineConfig {
            cam_threshold: f32::NAN,
            ..RefineConfig::default()
        }
    )
    .is_err());
    let c = RefineConfig::default().with_min_component_ml(0.1, [5.0, 0.5, 0.5]);
    assert_eq!(c.min_component_voxels, 80);
}

#[test]
fn morphology_matches_brute_force() {
    let (nz, h, w) = (3, 17, 23);
    for (seed, density) in [(1u64, 0.05f32), (2, 0.3), (3, 0.7), (4, 0.95)] {
        let m = Array3::from_shape_fn((nz, h, w), |(z, y, x)| {
            u8::from((noise(seed * 100_000 + (z * h * w + y * w + x) as u64) + 1.0) / 2.0 < density)
        });
        for r in 1..=3usize {
            for shape in [Structuring::Square, Structuring::Cross] {
                let inside = |dy: i64, dx: i64| match shape {
                    Structuring::Square => dy.abs() <= r as i64 && dx.abs() <= r as i64,
                    Structuring::Cross => dy.abs() + dx.abs() <= r as i64,
                };
                let (d, e) = (dilate(&m, r, shape), erode(&m, r, shape));
                for (((z, y, x), &dv), &ev) in d.indexed_iter().zip(e.iter()) {
                    let (mut any, mut all) = (false, true);
                    for dy in -(r as i64)..=r as i64 {
                        for dx in -(r as i64)..=r as i64 {
                            if !inside(dy, dx) {
                                continue;
                            }
                            let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                            let on = yy >= 0
                                && xx >= 0
                                && yy < h as i64
                                && xx < w as i64
                                && m[[z, yy as usize, xx as usize]] != 0;
                            any |= on;
                            all &= on;
                        }
                    }
                    assert_eq!(
                        dv,
                        u8::from(any),
                        "dilate {shape:?} r={r} at {:?}",
                        (z, y, x)
                    );
                    assert_eq!(
                        ev,
                        u8::from(all),
                        "erode {shape:?} r={r} at {:?}",
                        (z, y, x)
                    );
                }
            }
        }
    }
}

/// Noisy brain (35 HU, +-12 HU) with an optional 65 HU disc of radius `r` at the centre of
/// every slice, and a CAM that peaks `cam_dx` pixels right of it and falls off linearly.
fn noisy_slice_case(blob_r: Option<f32>, cam_dx: f32) -> (Array3<f32>, Array3<f32>) {
    let (d, n) = (3usize, 48usize);
    let mut hu = Array3::<f32>::zeros((d, n, n));
    let mut cam = Array3::<f32>::zeros((d, n, n));
    let c = n as f32 / 2.0;
    for ((z, y, x), v) in hu.indexed_iter_mut() {
        let r = ((y as f32 - c).powi(2) + (x as f32 - c).powi(2)).sqrt();
        let base = if blob_r.is_some_and(|br| r <= br) {
            65.0
        } else {
            35.0
        };
        *v = base + 12.0 * noise((z * 10_000 + y * 100 + x) as u64);
        let rc = ((y as f32 - c).powi(2) + (x as f32 - c - cam_dx).powi(2)).sqrt();
        cam[[z, y, x]] = (1.0 - rc / 24.0).max(0.0);
    }
    (hu, cam)
}

#[test]
fn brain_alone_under_a_cam_gives_no_lesion() {
    // The CAM fires on a slice that holds only noisy brain: the brightest k-means cluster
    // is the upper tail of the noise, below the blood floor once smoothed.
    let (hu, cam) = noisy_slice_case(None, 0.0);
    let pos = vec![true; 3];
    let out = refine(&hu, &cam, &pos, &RefineConfig::default()).unwrap();
    assert_eq!(out.mask.sum(), 0, "brain noise taken for blood: {out:?}");
    // Without the floor and the smoothing (the authors' literal rule) it is a lesion.
    let literal = RefineConfig {
        min_blood_hu: -1000.0,
        smooth_radius: 0,
        grow_cam_threshold: 0.7,
        min_component_voxels: 1,
        ..RefineConfig::default()
    };
    assert!(refine(&hu, &cam, &pos, &literal).unwrap().mask.sum() > 0);
}

#[test]
fn lesion_grows_beyond_the_binary_cam() {
    // A disc of radius 12 under a CAM centred on its edge, whose 0.7 level (radius 7.2)
    // holds both blood and brain: growing into the 0.4 level (radius 14.4) recovers much of
    // what the binary CAM cuts off.
    let (hu, cam) = noisy_slice_case(Some(12.0), 9.0);
    let pos = vec![true; 3];
    let mut truth = Array3::<u8>::zeros(hu.dim());
    let c = 24.0f32;
    for ((_, y, x), v) in truth.indexed_iter_mut() {
        *v = u8::from(((y as f32 - c).powi(2) + (x as f32 - c).powi(2)).sqrt() <= 12.0);
    }
    let dice = |cfg: &RefineConfig| {
        let m = refine(&hu, &cam, &pos, cfg).unwrap().mask;
        volume_metrics(&m, &truth, [5.0, 1.0, 1.0]).unwrap().dice
    };
    let grown = dice(&RefineConfig::default());
    let core = dice(&RefineConfig {
        grow_cam_threshold: 0.7,
        ..RefineConfig::default()
    });
    assert!(grown > 0.75, "grown Dice {grown}");
    assert!(grown > core + 0.1, "grown {grown} vs core only {core}");
}

#[test]
fn smoothing_marks_halos_of_saturated_voxels() {
    use ichcam::seg::refine::box_smooth;
    let mut hu = Array3::<f32>::from_elem((1, 7, 7), 40.0);
    // Constant stays constant (in-bounds mean at the borders too).
    assert!(box_smooth(&hu, 1, 0.6)
        .unwrap()
        .iter()
        .all(|&v| (v - 40.0).abs() < 1e-5));
    hu[[0, 3, 3]] = 300.0;
    let s = box_smooth(&hu, 1, 0.6).unwrap();
    for y in 0..7 {
        for x in 0..7 {
            let near = (y as i32 - 3).abs() <= 1 && (x as i32 - 3).abs() <= 1;
            assert_eq!(s[[0, y, x]].is_infinite(), near, "({y}, {x})");
        }
    }
}

#[test]
fn authors_refinement_is_the_literal_pseudo_mask() {
    use ichcam::seg::{refine, RefineMode};
    // Brain 35 HU, a 6x6 blob of blood at 70 HU, a bone rim at 1000 HU on the left; the CAM
    // is 1 over the blob and 0.2 elsewhere (bone x 0.2 = 0.2 * 255 * 1.0 = 51: dark).
    let (d, h, w) = (2, 32, 32);
    let mut hu = Array3::<f32>::from_elem((d, h, w), 35.0);
    let mut cam = Array3::<f32>::from_elem((d, h, w), 0.2);
    for z in 0..d {
        for y in 0..h {
            hu[[z, y, 0]] = 1000.0;
        }
        for y in 12..18 {
            for x in 12..18 {
                hu[[z, y, x]] = 70.0;
                cam[[z, y, x]] = 1.0;
            }
        }
    }
    let cfg = RefineConfig {
        mode: RefineMode::Authors,
        ..RefineConfig::default()
    };
    let out = refine(&hu, &cam, &[true, false], &cfg).unwrap();
    // Blob 12..18 grown by two 4x4 dilations with OpenCV's anchor (dst(x) = max src(x-2..=x+1)):
    // 2 px up/left, 4 px down/right.
    for y in 0..h {
        for x in 0..w {
            let inside = (10..22).contains(&y) && (10..22).contains(&x);
            assert_eq!(out.mask[[0, y, x]] != 0, inside, "({y}, {x})");
            assert_eq!(out.mask[[1, y, x]], 0, "negative slice");
        }
    }
    assert_eq!(out.cluster_voxels, 36);
    assert_eq!(out.n_components, 1);
}

#[test]
fn band_floor_and_opening_keep_the_hematoma_and_drop_the_ribbon() {
    // Brain 35 HU; a 12x12 hematoma whose core is 75 HU and rim 58 HU; a 2-px ribbon of
    // 62 HU (cortex / partial volume in the blood's range). CAM 1 everywhere.
    let (d, h, w) = (1, 40, 40);
    let mut hu = Array3::<f32>::from_elem((d, h, w), 35.0);
    for y in 10..22 {
        for x in 10..22 {
            let rim = !(13..19).contains(&y) || !(13..19).contains(&x);
            hu[[0, y, x]] = if rim { 58.0 } else { 75.0 };
        }
    }
    for y in 30..32 {
        for x in 5..35 {
            hu[[0, y, x]] = 62.0;
        }
    }
    let cam = Array3::<f32>::ones((d, h, w));
    let base = RefineConfig {
        smooth_radius: 0,
        dilate_radius: 0,
        min_component_voxels: 1,
        ..RefineConfig::default()
    };
    let count =
        |m: &ndarray::Array3<u8>, ys: std::ops::Range<usize>, xs: std::ops::Range<usize>| {
            let mut n = 0;
            for y in ys {
                for x in xs.clone() {
                    n += (m[[0, y, x]] != 0) as usize;
                }
            }
            n
        };
    let floor = RefineConfig {
        band_floor_hu: Some(55.0),
        ..base.clone()
    };
    let out = refine(&hu, &cam, &[true], &floor).unwrap();
    assert_eq!(
        count(&out.mask, 10..22, 10..22),
        144,
        "the whole hematoma, rim included"
    );
    assert_eq!(
        count(&out.mask, 30..32, 5..35),
        60,
        "the ribbon is in the band too"
    );
    let opened = RefineConfig {
        open_radius: 2,
        ..floor
    };
    let out = refine(&hu, &cam, &[true], &opened).unwrap();
    assert_eq!(
        count(&out.mask, 10..22, 10..22),
        144,
        "a 12-px blob survives the opening"
    );
    assert_eq!(count(&out.mask, 30..32, 5..35), 0, "a 2-px ribbon does not");
}
