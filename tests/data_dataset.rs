//! Dataset layouts, label CSVs, loading, summaries and patient-wise splits.

use ichcam::data::dataset::{
    load_case, read_label_csv, slice_labels_from_mask, summary, Dataset, Layout,
};
use ichcam::data::split::split_patients;
use ichcam::data::DataError;
use ichcam::io::{self, IoError, Volume};
use ndarray::Array3;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A small volume of depth `d` and its mask with blood on the slices in `positive`.
fn write_case(img: &Path, mask: Option<&Path>, d: usize, positive: &[usize]) {
    let hu = Array3::from_shape_fn((d, 6, 5), |(z, y, x)| (z * 10 + y + x) as f32 - 20.0);
    let vol = Volume::from_array(hu, [5.0, 0.5, 0.5], img.to_path_buf());
    io::write_volume(img, &vol).unwrap();
    if let Some(m) = mask {
        let mut mk = Array3::<u8>::zeros((d, 6, 5));
        for &z in positive {
            mk[[z, 2, 3]] = 1;
        }
        io::write_mask(m, &mk, &vol).unwrap();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn expect_labels(d: usize, positive: &[usize]) -> Vec<u8> {
    (0..d).map(|z| u8::from(positive.contains(&z))).collect()
}

#[test]
fn instance_layout() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    std::fs::create_dir_all(r.join("data")).unwrap();
    std::fs::create_dir_all(r.join("label")).unwrap();
    write_case(
        &r.join("data/001.nii.gz"),
        Some(&r.join("label/001.nii.gz")),
        7,
        &[2, 3],
    );
    write_case(
        &r.join("data/002.nii.gz"),
        Some(&r.join("label/002.nii.gz")),
        5,
        &[],
    );
    write_case(&r.join("data/003.nii.gz"), None, 4, &[]);
    let ds = Dataset::open(r).unwrap();
    assert_eq!(ds.layout, Layout::Instance);
    assert_eq!(
        ds.cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["001", "002", "003"]
    );
    assert_eq!(
        ds.cases[0].mask.as_deref(),
        Some(r.join("label/001.nii.gz").as_path())
    );
    assert!(ds.cases[2].mask.is_none() && ds.cases[2].slice_labels.is_none());
    let c = ds.load(0, true).unwrap();
    assert_eq!(c.slice_labels, expect_labels(7, &[2, 3]));
    assert_eq!(c.volume.dims(), (7, 6, 5));
    assert_eq!(
        c.mask.as_ref().unwrap().iter().filter(|&&v| v > 0).count(),
        2
    );
    assert_eq!(ds.load(1, true).unwrap().slice_labels, vec![0; 5]);
    // Case 003 has no labels at all.
    assert!(matches!(ds.load(2, true), Err(DataError::NoLabels { ref id, .. }) if id == "003"));
    assert!(matches!(
        ds.require_labels(),
        Err(DataError::NoLabels { .. })
    ));
    let unl = ds.load(2, false).unwrap();
    assert!(unl.slice_labels.is_empty() && unl.mask.is_none());
    assert!(ds.load(9, false).is_err());
}

#[test]
fn ct_ich_layout_with_masks_and_csv() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    std::fs::create_dir_all(r.join("images")).unwrap();
    std::fs::create_dir_all(r.join("labels")).unwrap();
    write_case(
        &r.join("images/049.nii.gz"),
        Some(&r.join("labels/049.nii.gz")),
        6,
        &[1, 4],
    );
    write_case(
        &r.join("images/050.nii.gz"),
        Some(&r.join("labels/050.nii.gz")),
        4,
        &[0],
    );
    // The CSV disagrees with the mask of 050 on purpose: the CSV wins when present.
    let mut csv = String::from("patient,slice,z,png_index,any_hemorrhage,intraventricular\r\n");
    for z in 0..6 {
        csv += &format!("049,{},{z},{z},{},0\r\n", z + 1, u8::from(z == 1 || z == 4));
    }
    for z in 0..4 {
        csv += &format!("050,{},{z},{z},{},0\r\n", z + 1, u8::from(z == 3));
    }
    write(&r.join("slice_labels.csv"), &csv);
    write(&r.join("manifest.csv"), "patient,n_slices\n049,6\n");
    let ds = Dataset::open(r).unwrap();
    assert_eq!(ds.layout, Layout::CtIch);
    assert_eq!(
        ds.label_csv.as_deref(),
        Some(r.join("slice_labels.csv").as_path())
    );
    assert_eq!(ds.len(), 2);
    assert!(ds
        .cases
        .iter()
        .all(|c| c.mask.is_some() && c.slice_labels.is_some()));
    assert_eq!(
        ds.load(0, true).unwrap().slice_labels,
        expect_labels(6, &[1, 4])
    );
    let c = ds.load(1, true).unwrap();
    assert_eq!(c.slice_labels, expect_labels(4, &[3]));
    assert_eq!(
        slice_labels_from_mask(c.mask.as_ref().unwrap()),
        expect_labels(4, &[0])
    );
    let s = summary(r).unwrap();
    assert_eq!(
        (
            s.volumes,
            s.with_masks,
            s.unlabelled,
            s.slices,
            s.positive_slices,
            s.positive_volumes
        ),
        (2, 2, 0, 10, 3, 2)
    );
    assert_eq!((s.min_dims, s.max_dims), ((4, 6, 5), (6, 6, 5)));
    assert!(s.to_string().contains("10 (3 positive"), "{s}");
}

#[test]
fn ct_ich_layout_without_masks_is_weak_supervision() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    std::fs::create_dir_all(r.join("images")).unwrap();
    write_case(&r.join("images/001.nii.gz"), None, 5, &[]);
    write_case(&r.join("images/002.nii.gz"), None, 3, &[]);
    // Only positive rows listed for 001; 002 rows stop before its top slice (padded with 0).
    write(
        &r.join("slice_labels.csv"),
        "patient,slice,any_hemorrhage\n1,3,1\n1,4,1\n2,1,0\n",
    );
    let ds = Dataset::open(r).unwrap();
    assert_eq!(ds.layout, Layout::CtIch);
    assert!(ds.cases.iter().all(|c| c.mask.is_none()));
    ds.require_labels().unwrap();
    let a = ds.load(0, true).unwrap();
    assert_eq!(
        a.slice_labels,
        expect_labels(5, &[2, 3]),
        "1-based slice numbers, lenient 1 == 001"
    );
    assert!(a.mask.is_none());
    assert_eq!(ds.load(1, true).unwrap().slice_labels, vec![0, 0, 0]);

    // Without the CSV there are no labels: valid to open, an error to train on.
    std::fs::remove_file(r.join("slice_labels.csv")).unwrap();
    let ds = Dataset::open(r).unwrap();
    assert!(ds.label_csv.is_none());
    assert!(matches!(ds.load(0, true), Err(DataError::NoLabels { .. })));
    assert_eq!(summary(r).unwrap().unlabelled, 2);
}

#[test]
fn csv_only_folder_with_lenient_ids_and_column_variants() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write_case(&r.join("049.nii.gz"), None, 4, &[]);
    write_case(&r.join("7.nii"), None, 3, &[]);
    write_case(&r.join("abc.nii.gz"), None, 2, &[]);
    write(&r.join("notes.txt"), "not a volume");
    // `z` (0-based) and `label`, extra columns, quoted fields, rows of an absent patient.
    write(
        &r.join("weak.csv"),
        "\u{feff}id,patient,z,label\nx,\"49\",2,1\nx,49,0,0\nx,007,1,1\nx,999,0,1\nx,abc,1,1\n",
    );
    let ds = Dataset::open(r).unwrap();
    assert_eq!(ds.layout, Layout::Folder);
    assert_eq!(
        ds.cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["049", "7", "abc"]
    );
    assert_eq!(ds.load(0, true).unwrap().slice_labels, vec![0, 0, 1, 0]);
    assert_eq!(ds.load(1, true).unwrap().slice_labels, vec![0, 1, 0]);
    assert_eq!(ds.load(2, true).unwrap().slice_labels, vec![0, 1]);
    assert_eq!(ds.find("49").map(|c| c.id.as_str()), Some("049"));

    // The raw ct-ich table's names work too: PatientNumber, SliceNumber, No_Hemorrhage.
    let raw = r.join("raw.csv");
    write(
        &raw,
        "PatientNumber,SliceNumber,Intraventricular,No_Hemorrhage\r\n49,1,0,1\r\n49,2,0,0\r\n",
    );
    let ds = Dataset::open_with_csv(r, Some(&raw)).unwrap();
    assert_eq!(ds.load(0, true).unwrap().slice_labels, vec![0, 1, 0, 0]);
    assert!(
        matches!(ds.load(1, true), Err(DataError::NoLabels { .. })),
        "7 has no rows in raw.csv"
    );
}

#[test]
fn errors_are_typed_and_name_the_problem() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    // Empty folder.
    let e = Dataset::open(r).unwrap_err();
    assert!(matches!(e, DataError::Empty { .. }), "{e}");
    // Missing folder.
    assert!(matches!(
        Dataset::open(&r.join("nope")),
        Err(DataError::Folder { .. })
    ));
    // An empty images/ folder.
    std::fs::create_dir_all(r.join("images")).unwrap();
    assert!(matches!(Dataset::open(r), Err(DataError::Empty { .. })));
    write_case(&r.join("images/001.nii.gz"), None, 3, &[]);

    // CSV without a label column, without a slice column, without a header at all.
    let csv = r.join("slice_labels.csv");
    write(&csv, "patient,slice,flag\n1,1,1\n");
    let e = Dataset::open(r).unwrap_err();
    assert!(matches!(e, DataError::CsvColumns { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("any_hemorrhage") && msg.contains("patient,slice,flag"),
        "{msg}"
    );
    write(&csv, "patient,any_hemorrhage\n1,1\n");
    assert!(matches!(
        Dataset::open(r),
        Err(DataError::CsvColumns { .. })
    ));
    write(&csv, "");
    assert!(matches!(
        Dataset::open(r),
        Err(DataError::CsvColumns { .. })
    ));
    // Bad values.
    write(&csv, "patient,slice,label\n1,0,1\n");
    assert!(matches!(
        read_label_csv(&csv),
        Err(DataError::CsvRow { line: 2, .. })
    ));
    write(&csv, "patient,slice,label\n1,1,2\n");
    assert!(matches!(
        read_label_csv(&csv),
        Err(DataError::CsvRow { .. })
    ));
    write(&csv, "patient,slice,label\n1,x,1\n");
    assert!(matches!(
        read_label_csv(&csv),
        Err(DataError::CsvRow { .. })
    ));

    // Rows past the top of the volume (z = 5 of 3 slices).
    write(&csv, "patient,z,label\n1,0,0\n1,5,1\n");
    let ds = Dataset::open(r).unwrap();
    let e = ds.load(0, true).unwrap_err();
    assert!(
        matches!(e, DataError::LabelBeyondVolume { z: 5, depth: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("001"), "{e}");

    // A mask whose shape differs from its image.
    std::fs::remove_file(&csv).unwrap();
    std::fs::create_dir_all(r.join("labels")).unwrap();
    let other = Volume::from_array(
        Array3::zeros((4, 6, 5)),
        [5.0, 0.5, 0.5],
        PathBuf::from("x"),
    );
    io::write_mask(
        &r.join("labels/001.nii.gz"),
        &Array3::zeros((4, 6, 5)),
        &other,
    )
    .unwrap();
    let ds = Dataset::open(r).unwrap();
    let e = ds.load(0, true).unwrap_err();
    assert!(
        matches!(e, DataError::Io(IoError::ShapeMismatch { .. })),
        "{e}"
    );
    // A corrupt volume is an io error, not a panic.
    write(&r.join("images/002.nii.gz"), "garbage");
    let ds = Dataset::open(r).unwrap();
    assert!(matches!(
        load_case(&ds.cases[1], false),
        Err(DataError::Io(_))
    ));
}

#[test]
fn split_is_patient_wise_deterministic_and_two_sided() {
    for n in 2..30usize {
        // Some patients own two volumes.
        let patients: Vec<String> = (0..n).map(|i| format!("p{}", i / 2 + i % 3)).collect();
        for seed in [0u64, 1, 42] {
            let s = split_patients(&patients, 0.2, seed).unwrap();
            let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "every case exactly once");
            let tp: HashSet<&str> = s.train.iter().map(|&i| patients[i].as_str()).collect();
            let vp: HashSet<&str> = s.val.iter().map(|&i| patients[i].as_str()).collect();
            assert!(tp.is_disjoint(&vp), "a patient on both sides");
            let distinct = patients.iter().collect::<HashSet<_>>().len();
            if distinct >= 2 {
                assert!(!s.train.is_empty() && !s.val.is_empty(), "n={n}");
            }
            assert_eq!(
                s,
                split_patients(&patients, 0.2, seed).unwrap(),
                "deterministic"
            );
            // Listing order does not matter: the same patients land on the same side.
            let rev: Vec<String> = patients.iter().rev().cloned().collect();
            let sr = split_patients(&rev, 0.2, seed).unwrap();
            let vr: HashSet<&str> = sr.val.iter().map(|&i| rev[i].as_str()).collect();
            assert_eq!(vp, vr);
        }
    }
    let ids: Vec<String> = (0..40).map(|i| format!("{i:03}")).collect();
    let a = split_patients(&ids, 0.25, 1).unwrap();
    assert_eq!(a.val.len(), 10);
    assert_ne!(
        a,
        split_patients(&ids, 0.25, 2).unwrap(),
        "the seed matters"
    );
    assert_eq!(split_patients(&ids[..1], 0.5, 0).unwrap().val.len(), 0);
    assert_eq!(split_patients(&ids[..2], 0.0, 0).unwrap().val.len(), 1);
    assert_eq!(split_patients(&ids[..2], 1.0, 0).unwrap().train.len(), 1);
    assert!(split_patients(&ids, 1.5, 0).is_err());
    assert!(split_patients(&ids, f64::NAN, 0).is_err());
}

/// The real ct-ich sample: slice labels from the CSV equal those from the masks.
#[test]
fn real_ct_ich_csv_labels_equal_mask_labels() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/ct-ich-dev");
    if !dir.join("images").is_dir() {
        println!("skipped: {} is absent", dir.display());
        return;
    }
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.layout, Layout::CtIch);
    assert_eq!(ds.len(), 6);
    let mut positive = 0;
    let mut slices = 0;
    for c in &ds.cases {
        assert!(c.mask.is_some() && c.slice_labels.is_some(), "{}", c.id);
        let lc = load_case(c, true).unwrap();
        let from_mask = slice_labels_from_mask(lc.mask.as_ref().unwrap());
        assert_eq!(lc.slice_labels, from_mask, "case {}", c.id);
        positive += from_mask.iter().filter(|&&v| v > 0).count();
        slices += lc.volume.dims().0;
    }
    // manifest.csv: 39+32+46+35+33+56 slices, 9+12+19+10 positive.
    assert_eq!((slices, positive), (241, 50));
    let s = ds.split(0.34, 7).unwrap();
    assert_eq!(s.val.len(), 2);
}
