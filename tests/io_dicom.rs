//! DICOM series: write -> read round trips (axis-aligned, LPS and oblique geometry), the
//! NIfTI written from a series keeps its geometry, non-DICOM files are skipped, and mixed
//! series, inconsistent slice sizes, gaps and empty folders are clear errors.
//! Multi-frame (Enhanced CT) images, written by `common/enhanced.rs`: read from a folder or
//! as a file, with shared or per-frame functional groups, frames out of order, per-frame
//! rescale and RLE pixel data, they give the voxels, spacing and affine of the same volume
//! written as a single-frame series; a short per-frame sequence, too little pixel data, a
//! frame without a position, two frames at one position, a gap, NumberOfFrames claims, a
//! mixed folder, a legacy multi-frame file and an undecodable transfer syntax are errors.
//! An Enhanced CT written by pydicom (tests/fixtures/dicom-enhanced) reads as its
//! single-frame series. A folder holding two CT series and a localizer
//! (`common/archive.rs`): `list_series` gives each one's attributes from the headers,
//! reading (and probing) by UID gives each one's voxels, an unknown UID and reading the
//! folder whole are errors listing the series, and `inspect` lists them.

#[path = "common/archive.rs"]
mod archive;
#[path = "common/enhanced.rs"]
mod enhanced;

use ichcam::io::dicom::{self, SeriesOptions};
use ichcam::io::geometry::{self, Affine};
use ichcam::io::{self, Volume};
use ndarray::Array3;
use std::path::Path;

/// A volume of integer HU in [-1000, 2000] with the given voxel-to-RAS affine.
fn volume(dim: (usize, usize, usize), aff: Option<Affine>) -> Volume {
    let data = Array3::from_shape_fn(dim, |(z, y, x)| {
        ((z * 131 + y * 17 + x * 7) % 3001) as f32 - 1000.0
    });
    let mut v = Volume::from_array(data, [3.0, 0.7, 0.6], "test-volume".into());
    if let Some(a) = aff {
        geometry::set_sform(&mut v.header, &a, 1);
        geometry::set_qform(&mut v.header, &a, 1);
        v.spacing = [
            v.header.pixdim[3] as f64,
            v.header.pixdim[2] as f64,
            v.header.pixdim[1] as f64,
        ];
    }
    v
}

fn assert_affine_close(a: &Affine, b: &Affine, tol: f64) {
    for r in 0..3 {
        for c in 0..4 {
            assert!(
                (a[r][c] - b[r][c]).abs() < tol,
                "affines differ at [{r}][{c}]:\n{a:?}\n{b:?}"
            );
        }
    }
}

fn round_trip(v: &Volume) {
    let dir = tempfile::tempdir().unwrap();
    let series = dir.path().join("series");
    dicom::write_series(&series, v).unwrap();
    assert_eq!(std::fs::read_dir(&series).unwrap().count(), v.dims().0);
    let (back, report) = io::read_volume_report(&series).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(
        report.datatype,
        format!("int16 (DICOM, {} slices)", v.dims().0)
    );
    assert_eq!(back.dims(), v.dims());
    assert_eq!(back.data, v.data, "voxels");
    for k in 0..3 {
        assert!(
            (back.spacing[k] - v.spacing[k]).abs() < 1e-4,
            "spacing {:?} vs {:?}",
            back.spacing,
            v.spacing
        );
    }
    assert_affine_close(&back.affine(), &v.affine(), 1e-3);
    assert_eq!(back.orientation(), v.orientation());
    // The series written as NIfTI keeps voxels and geometry.
    let nii = dir.path().join("from_dicom.nii.gz");
    io::write_volume(&nii, &back).unwrap();
    let again = io::read_volume(&nii).unwrap();
    assert_eq!(again.data, back.data);
    for k in 0..3 {
        assert!(
            (again.spacing[k] - back.spacing[k]).abs() < 1e-5,
            "{:?} vs {:?}",
            again.spacing,
            back.spacing
        );
    }
    assert_affine_close(&again.affine(), &back.affine(), 1e-5);
    assert_affine_close(&geometry::qform_affine(&again.header), &back.affine(), 1e-3);
}

#[test]
fn axis_aligned_series_round_trips() {
    round_trip(&volume((5, 6, 7), None));
}

#[test]
fn lps_series_round_trips_and_writes_dicom_orientation() {
    // DICOM's usual axial order: x to the patient's left, y to the back.
    let aff: Affine = [
        [-0.6, 0.0, 0.0, 90.0],
        [0.0, -0.7, 0.0, 120.0],
        [0.0, 0.0, 3.0, -40.0],
    ];
    let v = volume((4, 6, 5), Some(aff));
    assert_eq!(v.orientation(), "LPS");
    round_trip(&v);
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), &v).unwrap();
    let obj = dicom_object::open_file(dir.path().join("slice_0002.dcm")).unwrap();
    let f = |t| obj.element(t).unwrap().to_multi_float64().unwrap();
    use dicom_dictionary_std::tags;
    assert_eq!(
        f(tags::IMAGE_ORIENTATION_PATIENT),
        vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    );
    // RAS (90, 120, -40 + 3) is LPS (-90, -120, -37).
    assert_eq!(f(tags::IMAGE_POSITION_PATIENT), vec![-90.0, -120.0, -37.0]);
    assert_eq!(f(tags::PIXEL_SPACING), vec![0.7, 0.6]);
    assert_eq!(f(tags::RESCALE_INTERCEPT), vec![-1024.0]);
}

#[test]
fn oblique_series_round_trips() {
    let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
    let aff: Affine = [
        [0.5 * c, 0.0, -2.5 * s, 10.0],
        [0.0, 0.5, 0.0, -30.0],
        [0.5 * s, 0.0, 2.5 * c, 55.5],
    ];
    round_trip(&volume((6, 5, 4), Some(aff)));
}

#[test]
fn slices_are_sorted_by_position_not_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume((5, 4, 3), None);
    dicom::write_series(dir.path(), &v).unwrap();
    // Shuffle the names: the reader must use ImagePositionPatient.
    for (from, to) in [(1, "zz"), (5, "aa"), (3, "mm")] {
        std::fs::rename(
            dir.path().join(format!("slice_{from:04}.dcm")),
            dir.path().join(format!("{to}.dcm")),
        )
        .unwrap();
    }
    let back = io::read_volume(dir.path()).unwrap();
    assert_eq!(back.data, v.data);
}

#[test]
fn non_dicom_files_are_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let v = volume((3, 4, 5), None);
    dicom::write_series(dir.path(), &v).unwrap();
    std::fs::write(dir.path().join("README.txt"), "not an image").unwrap();
    std::fs::write(dir.path().join("Thumbs.db"), [0u8; 300]).unwrap();
    let (back, report) = io::read_volume_report(dir.path()).unwrap();
    assert_eq!(back.data, v.data);
    assert_eq!(report.warnings.len(), 2, "{:?}", report.warnings);
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("README.txt") && w.contains("not a DICOM")));
}

fn err_of(dir: &Path) -> String {
    io::read_volume(dir).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn mixed_series_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series_with(
        dir.path(),
        &volume((3, 4, 5), None),
        &SeriesOptions {
            prefix: "a_".into(),
            ..Default::default()
        },
    )
    .unwrap();
    dicom::write_series_with(
        dir.path(),
        &volume((3, 4, 5), None),
        &SeriesOptions {
            prefix: "b_".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("mixed series") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

#[test]
fn a_mixed_folder_lists_its_series_and_reads_each_by_uid() {
    let dir = tempfile::tempdir().unwrap();
    let written = archive::write_mixed(
        dir.path(),
        "2.25.777",
        &volume((3, 4, 5), None),
        &volume((4, 6, 5), None),
    );
    std::fs::write(dir.path().join("README.txt"), "not DICOM").unwrap();
    let found = dicom::list_series(dir.path()).unwrap();
    assert_eq!(found.len(), written.len(), "{found:?}");
    for (s, w) in found.iter().zip(&written) {
        let (z, y, x) = w.volume.dims();
        assert_eq!(s.uid.as_deref(), Some(w.uid.as_str()));
        assert_eq!(s.number, Some(w.number as i64));
        assert_eq!(s.description.as_deref(), Some(w.description));
        assert_eq!(s.modality.as_deref(), Some("CT"));
        assert_eq!(s.localizer, w.localizer, "{}", w.description);
        assert_eq!((s.slices, s.files, s.rows, s.cols), (z, z, y, x));
        let opts = io::ReadOptions {
            series: Some(w.uid.clone()),
            ..Default::default()
        };
        assert_eq!(io::probe_dims_with(dir.path(), &opts).unwrap(), (z, y, x));
        let (v, report) = io::read_volume_with(dir.path(), &opts).unwrap();
        assert_eq!(v.data, w.volume.data, "{}", w.description);
        assert_affine_close(&v.affine(), &w.volume.affine(), 1e-4);
        // The other series' files are neither read nor reported.
        assert!(
            report.warnings.iter().all(|l| !l.contains(".dcm")),
            "{:?}",
            report.warnings
        );
    }
    // Reading the folder whole lists its series and says how to pick one.
    let e = err_of(dir.path());
    assert!(
        e.contains("mixed series: 3 different") && e.contains("--series"),
        "{e}"
    );
    for w in &written {
        assert!(
            e.contains(&w.uid)
                && e.contains(&format!("#{} \"{}\"", w.number, w.description))
                && e.contains(&format!("{} slice(s)", w.volume.dims().0)),
            "{e}"
        );
    }
    assert!(e.contains("LOCALIZER") && !e.contains('\n'), "{e}");
    // An unknown UID, to the reader and the probe.
    let opts = io::ReadOptions {
        series: Some("2.25.999".into()),
        ..Default::default()
    };
    for e in [
        io::read_volume_with(dir.path(), &opts)
            .map(|_| ())
            .unwrap_err()
            .to_string(),
        io::probe_dims_with(dir.path(), &opts)
            .map(|_| ())
            .unwrap_err()
            .to_string(),
    ] {
        assert!(
            e.contains("no images of the series 2.25.999")
                && written.iter().all(|w| e.contains(&w.uid)),
            "{e}"
        );
    }
    // `inspect` lists the series, or describes the one asked for.
    let d = io::inspect::describe(dir.path()).unwrap();
    assert!(d.contains("holding 3 series"), "{d}");
    for w in &written {
        assert_eq!(d.matches(&w.uid).count(), 1, "{d}");
    }
    let brain = &written[2];
    let d = io::inspect::describe_with(
        dir.path(),
        &io::ReadOptions {
            series: Some(brain.uid.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(d.contains("dims x,y,z   5 x 6 x 4"), "{d}");
}

#[test]
fn mismatched_rows_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let uid = Some("2.25.12345".to_string());
    dicom::write_series_with(
        dir.path(),
        &volume((3, 4, 5), None),
        &SeriesOptions {
            series_uid: uid.clone(),
            prefix: "a_".into(),
            ..Default::default()
        },
    )
    .unwrap();
    // Same series, one more row, placed after the first block.
    let mut other = volume((2, 5, 5), None);
    other.header.srow_z[3] += 30.0;
    dicom::write_series_with(
        dir.path(),
        &other,
        &SeriesOptions {
            series_uid: uid,
            prefix: "b_".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("inconsistent slice size") && e.contains("4x5") && e.contains("5x5"),
        "{e}"
    );
}

#[test]
fn a_gap_in_slice_positions_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), &volume((6, 4, 5), None)).unwrap();
    std::fs::remove_file(dir.path().join("slice_0004.dcm")).unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("gap in slice positions")
            && e.contains("slice_0003.dcm")
            && e.contains("slice_0005.dcm"),
        "{e}"
    );
    // Removing an end slice leaves a regular series.
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), &volume((6, 4, 5), None)).unwrap();
    std::fs::remove_file(dir.path().join("slice_0006.dcm")).unwrap();
    assert_eq!(io::read_volume(dir.path()).unwrap().dims(), (5, 4, 5));
}

#[test]
fn duplicate_positions_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), &volume((3, 4, 5), None)).unwrap();
    std::fs::copy(
        dir.path().join("slice_0002.dcm"),
        dir.path().join("copy.dcm"),
    )
    .unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("same position"), "{e}");
}

#[test]
fn empty_and_non_dicom_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("empty folder") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("no DICOM images"), "{e}");
}

#[test]
fn truncated_dicom_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), &volume((3, 8, 8), None)).unwrap();
    let p = dir.path().join("slice_0002.dcm");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let e = err_of(dir.path());
    assert!(e.contains("slice_0002.dcm"), "{e}");
}

use enhanced::{write_enhanced, Enhanced};

/// An oblique volume whose HU are integers in [-1000, 2000].
fn oblique_volume() -> Volume {
    let (c, s) = (25f64.to_radians().cos(), 25f64.to_radians().sin());
    let aff: Affine = [
        [-0.55 * c, 0.0, -2.5 * s, 80.0],
        [0.0, -0.65, 0.0, 110.0],
        [-0.55 * s, 0.0, 2.5 * c, -35.5],
    ];
    volume((6, 5, 7), Some(aff))
}

/// Reads `v` written as a single-frame series: the reference of the multi-frame cases.
fn single_frame_reference(v: &Volume) -> Volume {
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), v).unwrap();
    io::read_volume(dir.path()).unwrap()
}

/// Writes `v` as one multi-frame file in a folder of its own; returns (folder, file).
fn enhanced_in_dir(
    root: &Path,
    name: &str,
    v: &Volume,
    spec: &Enhanced,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("enhanced.dcm");
    write_enhanced(&file, v, spec);
    (dir, file)
}

fn assert_same_volume(got: &Volume, want: &Volume, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: dims");
    assert_eq!(got.data, want.data, "{what}: voxels (HU)");
    for k in 0..3 {
        assert!(
            (got.spacing[k] - want.spacing[k]).abs() < 1e-9,
            "{what}: spacing {:?} vs {:?}",
            got.spacing,
            want.spacing
        );
    }
    assert_affine_close(&got.affine(), &want.affine(), 1e-9);
    assert_eq!(got.header.sform_code, 1, "{what}");
    assert_eq!(got.header.qform_code, 1, "{what}");
    assert_affine_close(
        &geometry::qform_affine(&got.header),
        &geometry::qform_affine(&want.header),
        1e-6,
    );
}

#[test]
fn enhanced_ct_reads_as_the_same_volume_as_a_single_frame_series() {
    let v = oblique_volume();
    let reference = single_frame_reference(&v);
    assert_eq!(reference.data, v.data);
    let root = tempfile::tempdir().unwrap();
    let nz = v.dims().0;
    let shuffled = vec![3, 0, 5, 1, 4, 2];
    let cases = [
        ("shared groups, frames in order", Enhanced::default()),
        (
            "frames out of order, per-frame rescale",
            Enhanced {
                order: Some(shuffled.clone()),
                per_frame_rescale: true,
                ..Default::default()
            },
        ),
        (
            "frames reversed, all groups per frame",
            Enhanced {
                order: Some((0..nz).rev().collect()),
                per_frame_geometry: true,
                per_frame_rescale: true,
                ..Default::default()
            },
        ),
        (
            "RLE, frames out of order, per-frame rescale",
            Enhanced {
                order: Some(shuffled.clone()),
                per_frame_rescale: true,
                encapsulated: Some(enhanced::RLE_LOSSLESS),
                ..Default::default()
            },
        ),
    ];
    for (k, (what, spec)) in cases.iter().enumerate() {
        let (dir, file) = enhanced_in_dir(root.path(), &format!("case{k}"), &v, spec);
        let (from_dir, report) = io::read_volume_report(&dir).unwrap();
        assert!(report.warnings.is_empty(), "{what}: {:?}", report.warnings);
        assert_eq!(
            report.datatype,
            format!("int16 (DICOM, {nz} frames of one multi-frame image)"),
            "{what}"
        );
        assert_same_volume(&from_dir, &reference, what);
        // The file itself is a volume too.
        let from_file = io::read_volume(&file).unwrap();
        assert_same_volume(&from_file, &reference, what);
        assert_eq!(io::probe_dims(&file).unwrap(), v.dims(), "{what}");
        assert_eq!(io::probe_dims(&dir).unwrap(), v.dims(), "{what}");
    }
}

#[test]
fn per_frame_rescale_is_applied_frame_by_frame() {
    // The same stored values under two rescales: frames written with slope 0.5 hold twice
    // the stored value, and only the per-frame rescale brings them back to the same HU.
    let v = volume((4, 3, 5), None);
    let spec = Enhanced {
        order: Some(vec![1, 0, 3, 2]),
        per_frame_rescale: true,
        ..Default::default()
    };
    assert_eq!(enhanced::frame_rescale(&spec, 1), (0.5, -1032.0));
    let dir = tempfile::tempdir().unwrap();
    write_enhanced(&dir.path().join("mf.dcm"), &v, &spec);
    let back = io::read_volume(dir.path()).unwrap();
    assert_eq!(back.data, v.data);
}

/// The error reading `path` (a folder or a file).
fn err_at(path: &Path) -> String {
    match io::read_volume_report(path) {
        Ok(_) => panic!("{} was read", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_multi_frame_images_are_errors() {
    let v = volume((5, 4, 6), None);
    let root = tempfile::tempdir().unwrap();
    let cases: [(&str, Enhanced, &[&str]); 9] = [
        (
            "NumberOfFrames larger than the pixel data",
            Enhanced {
                pixel_frames: Some(4),
                ..Default::default()
            },
            &["pixel data holds 192 bytes but 5 frame(s) of 6x4 at 16 bits need 240"],
        ),
        (
            "RLE with fewer fragments than frames",
            Enhanced {
                pixel_frames: Some(3),
                encapsulated: Some(enhanced::RLE_LOSSLESS),
                ..Default::default()
            },
            &["3 fragments for 5 frame(s)"],
        ),
        (
            "per-frame sequence shorter than NumberOfFrames",
            Enhanced {
                number_of_frames: Some("6".into()),
                ..Default::default()
            },
            &["NumberOfFrames is 6 but the Per-frame Functional Groups Sequence has 5 items"],
        ),
        (
            "a frame without a position",
            Enhanced {
                no_position: Some(2),
                ..Default::default()
            },
            &["frame 3: missing ImagePositionPatient (in the PlanePositionSequence"],
        ),
        (
            "two frames at one position",
            Enhanced {
                order: Some(vec![0, 2, 1, 2, 3]),
                ..Default::default()
            },
            &["two slices at the same position", "frame 2 and", "frame 4"],
        ),
        (
            "a gap",
            Enhanced {
                order: Some(vec![4, 0, 1, 3]),
                ..Default::default()
            },
            &["gap in slice positions", "frame 3 and", "frame 4 where"],
        ),
        (
            "NumberOfFrames claiming billions",
            Enhanced {
                number_of_frames: Some("4000000000".into()),
                ..Default::default()
            },
            &["NumberOfFrames is 4000000000 but the Per-frame Functional Groups Sequence has 5 items"],
        ),
        (
            "NumberOfFrames beyond 32 bits",
            Enhanced {
                number_of_frames: Some("99999999999".into()),
                ..Default::default()
            },
            &["bad NumberOfFrames `99999999999`"],
        ),
        (
            "legacy multi-frame CT",
            Enhanced {
                legacy: true,
                ..Default::default()
            },
            &["legacy multi-frame image (5 frames", "not supported"],
        ),
    ];
    for (k, (what, spec, want)) in cases.iter().enumerate() {
        let (dir, file) = enhanced_in_dir(root.path(), &format!("case{k}"), &v, spec);
        for path in [&dir, &file] {
            let e = err_at(path);
            assert!(e.contains("enhanced.dcm"), "{what}: {e}");
            for w in *want {
                assert!(e.contains(w), "{what}: `{w}` not in: {e}");
            }
        }
    }
}

#[test]
fn a_multi_frame_image_over_the_volume_cap_is_refused_before_decoding() {
    let root = tempfile::tempdir().unwrap();
    let (dir, file) = enhanced_in_dir(
        root.path(),
        "mf",
        &volume((5, 4, 6), None),
        &Enhanced::default(),
    );
    for path in [&dir, &file] {
        let e = io::read_volume_with(
            path,
            &io::ReadOptions {
                max_bytes: 1000,
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(&e, io::IoError::TooLarge { claim, .. } if claim == "5 frames of 6x4"),
            "{e}"
        );
    }
}

#[test]
fn a_single_frame_file_named_alone_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dicom::write_series(dir.path(), &volume((3, 4, 5), None)).unwrap();
    let e = err_at(&dir.path().join("slice_0002.dcm"));
    assert!(
        e.contains("slice_0002.dcm: a single-frame DICOM image is one slice of a series"),
        "{e}"
    );
}

#[test]
fn an_undecodable_transfer_syntax_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let spec = Enhanced {
        encapsulated: Some(enhanced::JPEG_2000),
        ..Default::default()
    };
    let (dir, _) = enhanced_in_dir(root.path(), "j2k", &volume((3, 4, 5), None), &spec);
    let e = err_at(&dir);
    assert!(
        e.contains("cannot decode pixel data (transfer syntax 1.2.840.10008.1.2.4.90"),
        "{e}"
    );
}

#[test]
fn a_multi_frame_image_is_not_merged_with_other_images() {
    let v = volume((4, 4, 5), None);
    let uid = "2.25.777".to_string();
    let spec = Enhanced {
        series_uid: Some(uid.clone()),
        ..Default::default()
    };
    // With single-frame slices of the same series.
    let dir = tempfile::tempdir().unwrap();
    write_enhanced(&dir.path().join("mf.dcm"), &v, &spec);
    dicom::write_series_with(
        dir.path(),
        &v,
        &SeriesOptions {
            series_uid: Some(uid.clone()),
            prefix: "slice_".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let e = err_at(dir.path());
    assert!(
        e.contains("mixed folder")
            && e.contains("mf.dcm is a multi-frame image (4 frames)")
            && e.contains("4 other DICOM image file(s)"),
        "{e}"
    );
    // Two multi-frame images of one series.
    let dir = tempfile::tempdir().unwrap();
    write_enhanced(&dir.path().join("a.dcm"), &v, &spec);
    write_enhanced(&dir.path().join("b.dcm"), &v, &spec);
    let e = err_at(dir.path());
    assert!(e.contains("mixed folder") && e.contains("b.dcm"), "{e}");
    // Two multi-frame images of different series.
    let dir = tempfile::tempdir().unwrap();
    write_enhanced(&dir.path().join("a.dcm"), &v, &spec);
    write_enhanced(
        &dir.path().join("b.dcm"),
        &v,
        &Enhanced {
            series_uid: Some("2.25.778".into()),
            ..Default::default()
        },
    );
    let e = err_at(dir.path());
    assert!(e.contains("mixed series"), "{e}");
}

#[test]
fn a_pydicom_enhanced_ct_reads_as_its_single_frame_series() {
    // Written by another implementation (tests/fixtures/dicom-enhanced/make.py): implicit
    // VR, undefined-length sequences, a FrameContentSequence per frame.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dicom-enhanced");
    let single = io::read_volume(&root.join("single")).unwrap();
    assert_eq!(single.dims(), (6, 5, 7));
    let want = Array3::from_shape_fn((6, 5, 7), |(z, y, x)| {
        ((z * 131 + y * 17 + x * 7) % 3001) as f32 - 1000.0
    });
    assert_eq!(single.data, want);
    for (k, s) in [2.5, 0.65, 0.55].into_iter().enumerate() {
        assert!((single.spacing[k] - s).abs() < 1e-6, "{:?}", single.spacing);
    }
    // LPS (-80, -110, 35.5) is RAS (80, 110, 35.5).
    let a = single.affine();
    assert!((a[0][3] - 80.0).abs() < 1e-4 && (a[1][3] - 110.0).abs() < 1e-4);
    assert!((a[2][3] - 35.5).abs() < 1e-4, "{a:?}");
    for path in [root.join("enhanced"), root.join("enhanced/enhanced.dcm")] {
        let (v, report) = io::read_volume_report(&path).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert_same_volume(&v, &single, &path.display().to_string());
    }
}
