//! Synthetic phantoms: reproducibility, masks, HU model, shapes, and the written dataset.

use ichcam::data::dataset::{slice_labels_from_mask, summary, Dataset, Layout};
use ichcam::data::synth::{
    phantom, plan_positive, write_dataset, Phantom, Subtype, SynthConfig, Tissue, SLICE_MM,
};
use ichcam::io;
use std::collections::BTreeMap;
use std::path::Path;

const SMALL: SynthConfig = SynthConfig {
    size: 96,
    slices: 8,
    clean: false,
};
const SMALL_CLEAN: SynthConfig = SynthConfig {
    size: 96,
    slices: 8,
    clean: true,
};

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in ["", "images", "labels"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap().flatten() {
            if e.path().is_file() {
                out.insert(
                    format!("{sub}/{}", e.file_name().to_string_lossy()),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn same_seed_same_bytes_whatever_the_thread_count() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    write_dataset(&a, 4, 5, &SMALL).unwrap();
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| write_dataset(&b, 4, 5, &SMALL).unwrap());
    let fa = files(&a);
    assert_eq!(fa.len(), 4 + 4 + 2, "{:?}", fa.keys().collect::<Vec<_>>());
    assert_eq!(fa, files(&b));
    // Rewriting into the same folder is allowed and gives the same bytes.
    write_dataset(&a, 4, 5, &SMALL).unwrap();
    assert_eq!(fa, files(&a));
    // A different seed gives different images.
    write_dataset(&c, 4, 6, &SMALL).unwrap();
    let fc = files(&c);
    for k in [
        "images/001.nii.gz",
        "images/002.nii.gz",
        "images/003.nii.gz",
        "images/004.nii.gz",
    ] {
        assert_ne!(fa[k], fc[k], "{k}");
    }
    // Volumes of one set differ from each other.
    assert_ne!(fa["images/001.nii.gz"], fa["images/002.nii.gz"]);
}

#[test]
fn masks_are_nonempty_exactly_for_positive_volumes() {
    for (n, seed) in [(10usize, 1u64), (7, 2), (2, 3)] {
        let plan = plan_positive(n, seed);
        let neg = plan.iter().filter(|&&p| !p).count();
        assert_eq!(
            neg,
            ((0.4 * n as f64).round() as usize).clamp(1, n - 1),
            "about 40% negative"
        );
        assert_eq!(plan, plan_positive(n, seed));
        for (i, &pos) in plan.iter().enumerate() {
            let ph = phantom(&SMALL, seed, i, pos).unwrap();
            let voxels = ph.mask.iter().filter(|&&m| m > 0).count();
            assert_eq!(
                voxels > 0,
                pos,
                "volume {i}: {voxels} mask voxels, positive = {pos}"
            );
            assert_eq!(ph.lesions.is_empty(), !pos);
            assert!(ph.mask.iter().all(|&m| m <= 1));
            // Per-slice subtype flags agree with the mask.
            for (z, f) in ph.slice_subtypes.iter().enumerate() {
                assert_eq!(
                    f.iter().any(|&b| b),
                    ph.slice_labels()[z] > 0,
                    "volume {i} slice {z}"
                );
            }
        }
    }
}

fn check_tissues(ph: &Phantom) -> [usize; 11] {
    let mut count = [0usize; 11];
    for ((&t, &hu), &m) in ph.tissue.iter().zip(ph.hu.iter()).zip(ph.mask.iter()) {
        let tissue = Tissue::ALL[t as usize];
        let (lo, hi) = tissue.hu_range();
        assert!(
            hu >= lo && hu <= hi,
            "{tissue:?} at {hu} HU, outside {lo}..{hi}"
        );
        assert_eq!(
            m == 1,
            tissue == Tissue::Blood,
            "the mask is exactly the blood"
        );
        count[t as usize] += 1;
    }
    count
}

#[test]
fn clean_phantoms_have_plausible_hu_per_tissue_and_blood_50_to_90() {
    let mut total = [0usize; 11];
    let mut kinds = [0usize; 5];
    for i in 0..40 {
        let ph = phantom(
            &SynthConfig {
                size: 64,
                slices: 8,
                clean: true,
            },
            77,
            i,
            true,
        )
        .unwrap();
        let c = check_tissues(&ph);
        for k in 0..11 {
            total[k] += c[k];
        }
        for s in &ph.lesions {
            kinds[*s as usize] += 1;
        }
    }
    for t in Tissue::ALL {
        assert!(total[t as usize] > 0, "no {t:?} voxel in 40 phantoms");
    }
    for s in Subtype::ALL {
        assert!(
            kinds[s as usize] > 0,
            "no {s:?} in 40 positive phantoms: {kinds:?}"
        );
    }
    // Brain dominates the intracranial space; gray and white both present in bulk.
    assert!(total[Tissue::White as usize] > total[Tissue::Csf as usize]);
    assert!(total[Tissue::Gray as usize] * 20 > total[Tissue::White as usize]);
    // Calcifications (100-400 HU distractors) are never in the mask: check_tissues asserts it.
}

fn blood_distance_to_bone(ph: &Phantom) -> (f64, f64) {
    // In-plane distance (mm) from each blood voxel to the nearest bone voxel of its slice:
    // (min, max) over blood voxels.
    let (d, h, w) = ph.hu.dim();
    let sp = ph.spacing[1];
    let mut bones: Vec<Vec<(usize, usize)>> = vec![Vec::new(); d];
    for ((z, y, x), &t) in ph.tissue.indexed_iter() {
        if t == Tissue::Bone as u8 {
            bones[z].push((y, x));
        }
    }
    let (mut lo, mut hi) = (f64::MAX, 0.0f64);
    for (z, bz) in bones.iter().enumerate() {
        for y in 0..h {
            for x in 0..w {
                if ph.mask[[z, y, x]] == 0 {
                    continue;
                }
                let dist = bz
                    .iter()
                    .map(|&(by, bx)| {
                        ((by as f64 - y as f64).powi(2) + (bx as f64 - x as f64).powi(2)).sqrt()
                    })
                    .fold(f64::MAX, f64::min)
                    * sp;
                lo = lo.min(dist);
                hi = hi.max(dist);
            }
        }
    }
    (lo, hi)
}

#[test]
fn lesion_shapes_sit_where_their_subtype_does() {
    let cfg = SynthConfig {
        size: 96,
        slices: 8,
        clean: true,
    };
    let mut checked = [0usize; 5];
    for i in 0..60 {
        let ph = phantom(&cfg, 123, i, true).unwrap();
        if ph.lesions.len() != 1 {
            continue;
        }
        let (near, far) = blood_distance_to_bone(&ph);
        match ph.lesions[0] {
            // Extra-axial blood lies against the inner table (the bone voxel next to it is a
            // table voxel; diploe separates tables), within its maximum thickness.
            Subtype::Epidural | Subtype::Subdural => {
                assert!(
                    near < 4.0 * ph.spacing[1],
                    "extra-axial blood {near} mm from bone"
                );
                assert!(far < 24.0, "extra-axial blood reaches {far} mm from bone");
            }
            // Intraventricular blood is deep.
            Subtype::Intraventricular => assert!(near > 25.0, "IVH {near} mm from bone"),
            _ => {}
        }
        checked[ph.lesions[0] as usize] += 1;
        // IPH comes with an edema rim; no other subtype has one.
        let edema = ph.tissue.iter().any(|&t| t == Tissue::Edema as u8);
        assert_eq!(
            edema,
            ph.lesions[0] == Subtype::Intraparenchymal,
            "{:?}",
            ph.lesions
        );
    }
    println!("single-subtype phantoms checked (IVH, IPH, SAH, EDH, SDH): {checked:?}");
    assert!(
        checked[Subtype::Epidural as usize] + checked[Subtype::Subdural as usize] > 0,
        "{checked:?}"
    );
    assert!(
        checked[Subtype::Intraventricular as usize] > 0,
        "{checked:?}"
    );
}

#[test]
fn noisy_phantoms_have_noise_and_integer_hu() {
    let noisy = phantom(&SMALL, 9, 0, false).unwrap();
    let clean = phantom(&SMALL_CLEAN, 9, 0, false).unwrap();
    assert_eq!(
        noisy.tissue, clean.tissue,
        "same anatomy with and without noise"
    );
    assert!(noisy
        .hu
        .iter()
        .all(|v| v.fract() == 0.0 && (-1024.0..=3071.0).contains(v)));
    // Noise in the white matter far from edges: residual std within the configured 4-10 HU
    // (slightly widened for the blur of edges and the estimate).
    let mut r = Vec::new();
    let (d, h, w) = clean.hu.dim();
    for z in 0..d {
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let all_white = (0..3).all(|dy| {
                    (0..3)
                        .all(|dx| clean.tissue[[z, y + dy - 1, x + dx - 1]] == Tissue::White as u8)
                });
                if all_white {
                    r.push((noisy.hu[[z, y, x]] - clean.hu[[z, y, x]]) as f64);
                }
            }
        }
    }
    assert!(r.len() > 1000);
    let m = r.iter().sum::<f64>() / r.len() as f64;
    let sd = (r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
    assert!(m.abs() < 1.0, "noise mean {m}");
    assert!((3.5..=10.5).contains(&sd), "noise sd {sd}");
}

#[test]
fn geometry_head_size_and_shape() {
    let cfg = SynthConfig {
        size: 64,
        slices: 24,
        clean: true,
    };
    let ph = phantom(&cfg, 4, 0, false).unwrap();
    assert_eq!(
        ph.spacing,
        [SLICE_MM, 230.0 / 64.0, 230.0 / 64.0],
        "3.59375 is exact in f32"
    );
    let area = |z: usize| {
        ph.tissue
            .index_axis(ndarray::Axis(0), z)
            .iter()
            .filter(|&&t| t != 0)
            .count()
    };
    let areas: Vec<usize> = (0..24).map(area).collect();
    let (zmax, &amax) = areas.iter().enumerate().max_by_key(|(_, a)| **a).unwrap();
    assert!(
        areas[23] * 2 < amax,
        "the top slice is much smaller: {areas:?}"
    );
    assert!(areas[0] < amax, "the bottom slice is smaller: {areas:?}");
    // Width of the widest slice along x: ~180 mm.
    let s = ph.tissue.index_axis(ndarray::Axis(0), zmax);
    let cols: Vec<usize> = (0..64)
        .filter(|&x| s.column(x).iter().any(|&t| t != 0))
        .collect();
    let width = (cols.len() as f64) * ph.spacing[2];
    assert!((150.0..=205.0).contains(&width), "head width {width} mm");
    // Skull encloses the brain: the mid slice's centre is brain, its corners air.
    let mid = ph.tissue.index_axis(ndarray::Axis(0), 12);
    assert_eq!(mid[[0, 0]], Tissue::Air as u8);
    assert!(matches!(
        Tissue::ALL[mid[[32, 32]] as usize],
        Tissue::White | Tissue::Gray | Tissue::DeepGray | Tissue::Csf
    ));
}

#[test]
fn written_dataset_reads_back_in_the_ct_ich_layout() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("syn");
    let recs = write_dataset(&out, 5, 11, &SMALL).unwrap();
    assert_eq!(recs.len(), 5);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.layout, Layout::CtIch);
    assert_eq!(ds.len(), 5);
    let plan = plan_positive(5, 11);
    for (i, c) in ds.cases.iter().enumerate() {
        assert_eq!(c.id, format!("{:03}", i + 1));
        let lc = ds.load(i, true).unwrap();
        let ph = phantom(&SMALL, 11, i, plan[i]).unwrap();
        assert_eq!(lc.volume.data, ph.hu, "int16 round trip is exact");
        assert_eq!(lc.volume.spacing, ph.spacing);
        assert_eq!(lc.mask.as_ref().unwrap(), &ph.mask);
        // slice_labels.csv agrees with the masks.
        assert_eq!(lc.slice_labels, slice_labels_from_mask(&ph.mask));
        assert_eq!(
            recs[i].mask_voxels,
            ph.mask.iter().filter(|&&m| m > 0).count()
        );
    }
    let hdr = std::fs::read_to_string(out.join("slice_labels.csv")).unwrap();
    let real =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/ct-ich-dev/slice_labels.csv");
    if let Ok(r) = std::fs::read_to_string(&real) {
        assert_eq!(
            hdr.lines().next(),
            r.lines().next(),
            "same columns as ct-ich-dev"
        );
    }
    let man = std::fs::read_to_string(out.join("manifest.csv")).unwrap();
    assert_eq!(man.lines().count(), 6);
    let s = summary(&out).unwrap();
    assert_eq!(s.volumes, 5);
    assert_eq!(s.positive_volumes, plan.iter().filter(|&&p| p).count());
    // Written through io: the image is int16, the label u8.
    let v = io::read_volume(&out.join("images/001.nii.gz")).unwrap();
    assert_eq!(v.header.datatype, 4);
}

#[test]
fn bad_requests_are_errors() {
    let t = tempfile::tempdir().unwrap();
    assert!(phantom(
        &SynthConfig {
            size: 0,
            slices: 8,
            clean: false
        },
        0,
        0,
        true
    )
    .is_err());
    assert!(phantom(
        &SynthConfig {
            size: 64,
            slices: 0,
            clean: false
        },
        0,
        0,
        true
    )
    .is_err());
    assert!(write_dataset(t.path(), 0, 0, &SMALL).is_err());
    // A folder holding another dataset's volumes is refused, and left untouched.
    write_dataset(&t.path().join("x"), 3, 0, &SMALL).unwrap();
    let before = files(&t.path().join("x"));
    assert!(write_dataset(&t.path().join("x"), 2, 0, &SMALL).is_err());
    assert_eq!(before, files(&t.path().join("x")));
}

#[test]
fn default_size_is_fast() {
    let cfg = SynthConfig::default();
    assert_eq!((cfg.size, cfg.slices), (256, 24));
    let t = std::time::Instant::now();
    let ph = phantom(&cfg, 1, 0, true).unwrap();
    println!(
        "24x256x256 phantom in {:.0} ms ({} threads)",
        t.elapsed().as_secs_f64() * 1e3,
        rayon::current_num_threads()
    );
    assert_eq!(ph.hu.dim(), (24, 256, 256));
    assert!((ph.spacing[1] - 0.898).abs() < 0.001);
}
