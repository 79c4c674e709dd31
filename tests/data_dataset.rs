//! Dataset layouts, label CSVs, loading, summaries and patient-wise splits. A folder of
//! volumes lists loose multi-frame DICOM files (the pydicom Enhanced CT fixture and files of
//! `common/enhanced.rs`) beside NIfTI files and series folders, for datasets and for
//! `segment`'s batch input (the binary too); loose single-frame slices, two volumes with
//! one stem and a corrupt loose DICOM file are clear errors. `segment --recursive` over a
//! nested archive (a folder holding two CT series and a localizer, a short series, an MR
//! series, a link loop, a corrupt file): the ids, the skips, each mask's dims; `--series`.

mod common;

use common::enhanced::{write_enhanced, Enhanced};
use common::files::Outcome;
use ichcam::data::dataset::{
    list_volumes, load_case, read_label_csv, slice_labels_from_mask, summary, Dataset, Layout,
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

// Loose multi-frame DICOM files in a folder of volumes.

/// The pydicom Enhanced CT fixture: `single/` (a series) and `enhanced/enhanced.dcm`.
fn enhanced_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dicom-enhanced")
}

/// The fixture's voxels (tests/fixtures/dicom-enhanced/README.md).
fn fixture_hu() -> Array3<f32> {
    Array3::from_shape_fn((6, 5, 7), |(z, y, x)| {
        ((z * 131 + y * 17 + x * 7) % 3001) as f32 - 1000.0
    })
}

/// Copies the fixture's single-frame series into `to` (created).
fn copy_series(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(enhanced_fixture().join("single")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn copy_enhanced(to: &Path) {
    std::fs::copy(enhanced_fixture().join("enhanced/enhanced.dcm"), to).unwrap();
}

/// A small volume of integer HU (what a multi-frame file stores exactly).
fn small_volume(d: usize) -> Volume {
    let hu = Array3::from_shape_fn((d, 6, 5), |(z, y, x)| (z * 10 + y + x) as f32 - 20.0);
    Volume::from_array(hu, [5.0, 0.5, 0.5], PathBuf::from("small"))
}

fn stems(list: &[(String, PathBuf)]) -> Vec<&str> {
    list.iter().map(|(s, _)| s.as_str()).collect()
}

/// The ids `segment --input DIR` would give.
fn input_ids(dir: &Path) -> Result<Vec<String>, String> {
    ichcam::infer::expand_inputs(&[dir.to_path_buf()])
        .map(|v| v.into_iter().map(|i| i.id).collect())
        .map_err(|e| e.to_string())
}

#[test]
fn a_folder_lists_loose_multi_frame_files_beside_nifti_and_series() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("vols");
    std::fs::create_dir_all(&r).unwrap();
    write_case(&r.join("a.nii.gz"), None, 3, &[]);
    copy_series(&r.join("b"));
    copy_enhanced(&r.join("c.dcm"));
    // Without an extension, and with an upper-case one.
    let d = small_volume(4);
    write_enhanced(&r.join("d"), &d, &Enhanced::default());
    copy_enhanced(&r.join("e.DCM"));
    // Not volumes: a text file without an extension, a `.dcm` without the DICM code, a
    // DICOM file without an image (a DICOMDIR-like object), a hidden multi-frame file.
    write(&r.join("README"), "not DICOM");
    write(&r.join("junk.dcm"), "not DICOM either");
    let no_image = dicom_object::InMemDicomObject::from_element_iter([
        dicom_core::DataElement::new(
            dicom_dictionary_std::tags::SOP_CLASS_UID,
            dicom_core::VR::UI,
            dicom_core::value::PrimitiveValue::from("1.2.840.10008.1.3.10"),
        ),
        dicom_core::DataElement::new(
            dicom_dictionary_std::tags::SOP_INSTANCE_UID,
            dicom_core::VR::UI,
            dicom_core::value::PrimitiveValue::from("2.25.99"),
        ),
    ])
    .with_meta(dicom_object::FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))
    .unwrap();
    no_image.write_to_file(r.join("DICOMDIR")).unwrap();
    copy_enhanced(&r.join(".hidden.dcm"));

    let list = list_volumes(&r, true).unwrap();
    assert_eq!(stems(&list), ["a", "b", "c", "d", "e"]);
    let want_paths: Vec<PathBuf> = ["a.nii.gz", "b", "c.dcm", "d", "e.DCM"]
        .iter()
        .map(|n| r.join(n))
        .collect();
    assert_eq!(
        list.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
        want_paths
    );
    // Each reads to its own voxels.
    let hu_a = Array3::from_shape_fn((3, 6, 5), |(z, y, x)| (z * 10 + y + x) as f32 - 20.0);
    assert_eq!(io::read_volume(&list[0].1).unwrap().data, hu_a);
    for k in [1, 2, 4] {
        assert_eq!(
            io::read_volume(&list[k].1).unwrap().data,
            fixture_hu(),
            "{k}"
        );
    }
    assert_eq!(io::read_volume(&list[3].1).unwrap().data, d.data);
    // Masks (no DICOM folders) list the NIfTI alone.
    assert_eq!(stems(&list_volumes(&r, false).unwrap()), ["a"]);

    // The dataset and `segment`'s inputs see the same volumes.
    let ds = Dataset::open(&r).unwrap();
    assert_eq!(ds.layout, Layout::Folder);
    let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d", "e"]);
    let c = ds.load(2, false).unwrap();
    assert_eq!(c.volume.data, fixture_hu());
    assert_eq!(input_ids(&r).unwrap(), ["a", "b", "c", "d", "e"]);
    // In the ct-ich layout's images/ too.
    let ct = t.path().join("ctich");
    std::fs::create_dir_all(ct.join("images")).unwrap();
    copy_enhanced(&ct.join("images/001.dcm"));
    write_case(&ct.join("images/002.nii.gz"), None, 3, &[]);
    write(
        &ct.join("slice_labels.csv"),
        "patient,z,label\n1,2,1\n2,0,1\n",
    );
    let ds = Dataset::open(&ct).unwrap();
    assert_eq!(ds.layout, Layout::CtIch);
    let c = ds.load(0, true).unwrap();
    assert_eq!((c.id.as_str(), c.volume.dims()), ("001", (6, 5, 7)));
    assert_eq!(c.slice_labels, expect_labels(6, &[2]));
    // A folder holding one multi-frame file is a folder of one volume named by the file.
    let one = t.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    copy_enhanced(&one.join("scan.dcm"));
    assert_eq!(input_ids(&one).unwrap(), ["scan"]);
}

#[test]
fn loose_single_frame_slices_are_a_series_not_volumes() {
    let t = tempfile::tempdir().unwrap();
    // Only slices: the folder is a series itself, not a folder of volumes.
    let series = t.path().join("series");
    copy_series(&series);
    assert!(list_volumes(&series, true).unwrap().is_empty());
    assert_eq!(io::read_volume(&series).unwrap().data, fixture_hu());
    assert_eq!(input_ids(&series).unwrap(), ["series"]);
    let e = Dataset::open(&series).unwrap_err();
    assert!(
        matches!(e, DataError::Empty { .. }) && e.to_string().contains("one per series"),
        "{e}"
    );
    // Slices beside a volume: an error saying where a series goes.
    for (name, other) in [
        ("nifti", "a.nii.gz"),
        ("multiframe", "c.dcm"),
        ("folder", "b"),
    ] {
        let r = t.path().join(name);
        copy_series(&r);
        match other {
            "a.nii.gz" => write_case(&r.join(other), None, 3, &[]),
            "c.dcm" => copy_enhanced(&r.join(other)),
            _ => copy_series(&r.join(other)),
        }
        let e = list_volumes(&r, true).unwrap_err();
        assert!(matches!(e, DataError::Invalid(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("6 loose single-frame DICOM slice(s) (s0.dcm, s1.dcm, s2.dcm, ...)")
                && msg.contains("beside 1 volume(s)")
                && msg.contains("subfolder of its own"),
            "{msg}"
        );
        assert_eq!(Dataset::open(&r).unwrap_err().to_string(), msg);
        assert!(input_ids(&r).unwrap_err().contains("subfolder of its own"));
        // Masks list no DICOM: the slices do not matter there.
        let nifti = list_volumes(&r, false).unwrap();
        assert_eq!(nifti.len(), usize::from(other == "a.nii.gz"));
    }
}

#[test]
fn two_volumes_with_one_stem_are_an_error() {
    let t = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 5] = [
        ("nii", &["a.nii", "a.nii.gz"]),
        ("dcm-nii", &["a.dcm", "a.nii.gz"]),
        ("dcm-folder", &["a", "a.dcm"]),
        ("bare-nii", &["a.nii", "a"]),
        ("dcm-DCM", &["a.DCM", "a.dcm"]),
    ];
    for (name, files) in cases {
        let r = t.path().join(name);
        std::fs::create_dir_all(&r).unwrap();
        write_case(&r.join("b.nii.gz"), None, 3, &[]);
        for f in files {
            let p = r.join(f);
            if f.contains(".nii") {
                write_case(&p, None, 3, &[]);
            } else if name == "dcm-folder" && *f == "a" {
                copy_series(&p);
            } else {
                write_enhanced(&p, &small_volume(3), &Enhanced::default());
            }
        }
        let e = list_volumes(&r, true).unwrap_err();
        let msg = e.to_string();
        // Sorted paths: the message names both, in order.
        let mut names = files.to_vec();
        names.sort();
        assert!(
            matches!(e, DataError::Invalid(_))
                && msg.contains(&format!(
                    "two volumes are named `a` ({} and {})",
                    names[0], names[1]
                )),
            "{name}: {msg}"
        );
        assert_eq!(Dataset::open(&r).unwrap_err().to_string(), msg, "{name}");
        assert!(input_ids(&r)
            .unwrap_err()
            .contains("two volumes are named `a`"));
    }
    // A folder that is no volume does not clash with a file of its name.
    let r = t.path().join("plain-folder");
    std::fs::create_dir_all(r.join("a")).unwrap();
    write(&r.join("a/notes.txt"), "x");
    write_case(&r.join("a.nii.gz"), None, 3, &[]);
    assert_eq!(stems(&list_volumes(&r, true).unwrap()), ["a"]);
}

#[test]
fn a_corrupt_loose_dicom_file_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let v = small_volume(4);
    let mut garbage = vec![0u8; 128];
    garbage.extend(b"DICM");
    garbage.extend((0..600u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    // The pydicom fixture cut in its data set, and in its per-frame sequence.
    let fixture = std::fs::read(enhanced_fixture().join("enhanced/enhanced.dcm")).unwrap();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", garbage, "DICOM"),
        ("truncated", fixture[..400].to_vec(), "corrupt DICOM file"),
        (
            "truncated-bare",
            fixture[..700].to_vec(),
            "element (5200,9230) claims 870 bytes",
        ),
    ];
    for (name, spec, want) in [
        (
            "frames-claim",
            Enhanced {
                number_of_frames: Some("9".into()),
                ..Default::default()
            },
            "NumberOfFrames is 9",
        ),
        (
            "no-position",
            Enhanced {
                no_position: Some(2),
                ..Default::default()
            },
            "frame 3: missing ImagePositionPatient",
        ),
        (
            "legacy",
            Enhanced {
                legacy: true,
                ..Default::default()
            },
            "legacy multi-frame",
        ),
    ] {
        let p = t.path().join(format!("{name}.dcm"));
        write_enhanced(&p, &v, &spec);
        cases.push((name, std::fs::read(&p).unwrap(), want));
    }
    for (name, b, want) in cases {
        let r = t.path().join(format!("case-{name}"));
        std::fs::create_dir_all(&r).unwrap();
        write_case(&r.join("a.nii.gz"), None, 3, &[]);
        let file = if name == "truncated-bare" {
            "bad"
        } else {
            "bad.dcm"
        };
        std::fs::write(r.join(file), &b).unwrap();
        let e = list_volumes(&r, true).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, DataError::Io(_))
                && msg.contains(&r.join(file).display().to_string())
                && msg.contains(want),
            "{name}: {msg}"
        );
        // The dataset and `segment`'s inputs fail at listing with the same message.
        assert_eq!(Dataset::open(&r).unwrap_err().to_string(), msg, "{name}");
        assert_eq!(input_ids(&r).unwrap_err(), msg, "{name}");
        // Reading the file says the same.
        let read = io::read_volume(&r.join(file)).unwrap_err().to_string();
        assert!(read.contains(want), "{name}: {read}");
    }
}

#[test]
fn segment_runs_on_a_folder_with_a_loose_multi_frame_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let v = common::files::phantom(4);
    io::write_volume(&input.join("a.nii.gz"), &v).unwrap();
    io::dicom::write_series(&input.join("b"), &v).unwrap();
    write_enhanced(&input.join("c.dcm"), &v, &Enhanced::default());
    let out = dir.path().join("out");
    let r = common::files::segment_cpu(&model, &input, &out, &[]);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    assert_eq!(common::files::check_outputs(&out), Ok(3));
    for id in ["a", "b", "c"] {
        let m = io::read_volume(&out.join(id).join("mask.nii.gz")).unwrap();
        assert_eq!(m.dims(), v.dims(), "{id}");
    }
    // The multi-frame file's mask carries its geometry.
    let m = io::read_volume(&out.join("c/mask.nii.gz")).unwrap();
    let src = io::read_volume(&input.join("c.dcm")).unwrap();
    for (a, b) in m.affine().iter().zip(src.affine().iter()) {
        for k in 0..4 {
            assert!(
                (a[k] - b[k]).abs() < 1e-4,
                "{:?} vs {:?}",
                m.affine(),
                src.affine()
            );
        }
    }
}

/// A nested archive under `root`: `patient1/study1/axial/` (one series of `d1` slices),
/// `patient1/study2/mixed/` (a localizer, a bone series of `d2` and a brain series of `d3`
/// slices: `common/archive.rs`), `patient2/scan.nii.gz` and the pair `patient2/old.hdr` +
/// `old.img` (`d1` slices each), `patient2/short/`
/// (3 slices), `patient2/mr/` (Modality MR), a `loop` link back to `root` and a text file.
/// Returns the mixed folder's series.
fn write_archive(root: &Path, d1: usize, d2: usize, d3: usize) -> Vec<common::archive::Written> {
    use io::dicom::{write_series, write_series_with, SeriesOptions};
    let v = common::files::phantom;
    write_series(&root.join("patient1/study1/axial"), &v(d1)).unwrap();
    let mixed = common::archive::write_mixed(
        &root.join("patient1/study2/mixed"),
        "2.25.4242",
        &v(d2),
        &v(d3),
    );
    std::fs::create_dir_all(root.join("patient2")).unwrap();
    io::write_volume(&root.join("patient2/scan.nii.gz"), &v(d1)).unwrap();
    let nii = root.join("patient2/tmp.nii");
    io::write_volume(&nii, &v(d1)).unwrap();
    common::pair::write_pair(
        &root.join("patient2"),
        "old",
        &std::fs::read(&nii).unwrap(),
        false,
    );
    std::fs::remove_file(&nii).unwrap();
    write_series(&root.join("patient2/short"), &v(3)).unwrap();
    write_series_with(
        &root.join("patient2/mr"),
        &v(d1),
        &SeriesOptions {
            modality: "MR".into(),
            ..Default::default()
        },
    )
    .unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(root, root.join("loop")).unwrap();
    write(&root.join("notes.txt"), "not a volume");
    mixed
}

#[test]
fn recursive_inputs_walk_a_nested_archive() {
    use ichcam::infer::{expand_inputs_with, ExpandOptions};
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("archive");
    let mixed = write_archive(&root, 8, 9, 10);
    let rec = ExpandOptions {
        recursive: true,
        ..Default::default()
    };
    let got = expand_inputs_with(std::slice::from_ref(&root), &rec).unwrap();
    let ids: Vec<(&str, Option<&str>)> = got
        .items
        .iter()
        .map(|i| (i.id.as_str(), i.series.as_deref()))
        .collect();
    assert_eq!(
        ids,
        [
            ("patient1_study1_axial", None),
            ("patient1_study2_mixed_s2", Some(mixed[1].uid.as_str())),
            ("patient1_study2_mixed_s3", Some(mixed[2].uid.as_str())),
            ("patient2_old", None),
            ("patient2_scan", None),
        ]
    );
    // Each skip once, with its reason.
    let skipped = got.skipped.join("\n");
    for want in [
        "LOCALIZER",
        "Modality MR, not CT",
        "3 slice(s), fewer than the 8 of --min-slices",
        "symbolic link to a folder, not followed",
    ] {
        assert_eq!(
            got.skipped.iter().filter(|l| l.contains(want)).count(),
            1,
            "{want}: {skipped}"
        );
    }
    assert_eq!(got.skipped.len(), 4, "{skipped}");
    assert!(skipped.contains(&mixed[0].uid), "{skipped}");
    // --min-slices lets the short series in; a lower one keeps the same ids otherwise.
    let low = expand_inputs_with(
        std::slice::from_ref(&root),
        &ExpandOptions {
            min_slices: 3,
            ..rec.clone()
        },
    )
    .unwrap();
    assert!(low.items.iter().any(|i| i.id == "patient2_short"));
    // A series folder named itself: its name, as without --recursive.
    let axial = root.join("patient1/study1/axial");
    let got = expand_inputs_with(std::slice::from_ref(&axial), &rec).unwrap();
    assert_eq!(got.items.len(), 1);
    assert_eq!(got.items[0].id, "axial");
    assert_eq!(input_ids(&axial).unwrap(), ["axial"]);
    // Without --recursive: today's reading (no volume one level down: the folder itself).
    assert_eq!(input_ids(&root).unwrap(), ["archive"]);
    // --series: one series of one folder; an unknown UID lists the folder's series.
    let dir = root.join("patient1/study2/mixed");
    let one = |uid: &str| {
        expand_inputs_with(
            std::slice::from_ref(&dir),
            &ExpandOptions {
                series: Some(uid.into()),
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())
    };
    let got = one(&mixed[2].uid).unwrap();
    assert_eq!(got.items.len(), 1);
    assert_eq!(got.items[0].id, "mixed");
    assert_eq!(got.items[0].series.as_deref(), Some(mixed[2].uid.as_str()));
    let e = one("2.25.1").unwrap_err();
    assert!(
        e.contains("no series 2.25.1 in the folder") && mixed.iter().all(|w| e.contains(&w.uid)),
        "{e}"
    );
    let e = expand_inputs_with(
        &[dir.clone(), root.clone()],
        &ExpandOptions {
            series: Some(mixed[2].uid.clone()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--series takes one DICOM folder"), "{e}");
    // A corrupt DICOM file in a nested folder: that folder is an item the reader refuses
    // (the batch reports it and goes on), the others are listed as before.
    let bad = root.join("patient3/bad");
    std::fs::create_dir_all(&bad).unwrap();
    let mut garbage = vec![0u8; 128];
    garbage.extend(b"DICM");
    garbage.extend((0..600u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(bad.join("x.dcm"), &garbage).unwrap();
    let got = expand_inputs_with(std::slice::from_ref(&root), &rec).unwrap();
    assert_eq!(got.items.len(), 6);
    let item = got.items.iter().find(|i| i.id == "patient3_bad").unwrap();
    let e = io::read_volume(&item.path).unwrap_err().to_string();
    assert!(e.contains("x.dcm"), "{e}");
}

#[test]
fn segment_recursive_on_a_nested_archive() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let root = t.path().join("archive");
    let mixed = write_archive(&root, 8, 9, 10);
    // A corrupt DICOM file in a nested folder.
    let bad = root.join("patient3/bad");
    std::fs::create_dir_all(&bad).unwrap();
    let mut garbage = vec![0u8; 128];
    garbage.extend(b"DICM");
    garbage.extend((0..600u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(bad.join("x.dcm"), &garbage).unwrap();
    let segment = |input: &Path, out: &Path, more: &[&str]| {
        common::files::segment_cpu(&model, input, out, more)
    };
    let out = t.path().join("out");
    let r = segment(&root, &out, &["--recursive"]);
    // The corrupt folder fails cleanly; the others are segmented.
    assert!(
        matches!(r.outcome, Outcome::CleanError(_)),
        "{:?}: {}",
        r.outcome,
        r.stderr
    );
    assert!(
        r.stderr.contains("patient3_bad") && r.stderr.contains("1 of 6 volume(s) failed"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.matches("skipped: ").count(), 4, "{}", r.stderr);
    assert_eq!(common::files::check_outputs(&out), Ok(5));
    for (id, d) in [
        ("patient1_study1_axial", 8),
        ("patient1_study2_mixed_s2", 9),
        ("patient1_study2_mixed_s3", 10),
        ("patient2_old", 8),
        ("patient2_scan", 8),
    ] {
        let m = io::read_volume(&out.join(id).join("mask.nii.gz")).unwrap();
        assert_eq!(m.dims(), (d, 48, 48), "{id}");
    }
    // --series: one series of the mixed folder; the folder whole is a clear failure.
    let dir = root.join("patient1/study2/mixed");
    let out2 = t.path().join("out2");
    let r = segment(&dir, &out2, &["--series", mixed[1].uid.as_str()]);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    let m = io::read_volume(&out2.join("mixed/mask.nii.gz")).unwrap();
    assert_eq!(m.dims(), (9, 48, 48));
    let r = segment(&dir, &t.path().join("out3"), &[]);
    assert!(
        matches!(r.outcome, Outcome::CleanError(_)) && r.stderr.contains("mixed series"),
        "{:?}: {}",
        r.outcome,
        r.stderr
    );
    // `inspect` lists the series.
    let o = common::bin().arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("holding 3 series") && mixed.iter().all(|w| text.contains(&w.uid)),
        "{text}"
    );
}

#[test]
fn a_multi_frame_file_named_alone_has_the_id_a_folder_gives_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("vols");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("scan.DCM");
    copy_enhanced(&file);
    let alone: Vec<String> = ichcam::infer::expand_inputs(std::slice::from_ref(&file))
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(alone, ["scan"]);
    assert_eq!(input_ids(&dir).unwrap(), alone);
}
