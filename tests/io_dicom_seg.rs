//! The DICOM Segmentation writer (`io::dicom_seg`) and `ichcam segment --dicom-seg`: the
//! written `seg.dcm` is read back with `dicom-object` and checked against the source files,
//! read independently of the volume reader (their SOP instances, frames and positions):
//! required attributes, one frame per slice with mask voxels, each frame's bits equal to the
//! mask of the slice at its position, each frame referencing the source instance (and frame)
//! at that position, and the source's geometry. Sources: a series written by
//! `io::dicom::write_series`, the pydicom fixture (tests/fixtures/dicom-enhanced, its
//! single-frame series and its multi-frame file with frames out of order) and a multi-frame
//! file of `tests/common/enhanced.rs`.

mod common;

use common::enhanced::{write_enhanced, Enhanced};
use common::files::Outcome;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ichcam::io::dicom_seg::{seg_source, write_seg, SegmentInfo, SEGMENTATION_STORAGE};
use ichcam::io::{self, Mask, Volume};
use ndarray::Array3;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Obj = dicom_object::FileDicomObject<InMemDicomObject>;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dicom-enhanced")
}

fn text(set: &InMemDicomObject, tag: Tag) -> String {
    set.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        })
        .unwrap_or_default()
}

fn floats(set: &InMemDicomObject, tag: Tag) -> Vec<f64> {
    set.element(tag).unwrap().to_multi_float64().unwrap()
}

fn items(set: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    set.element(tag).unwrap().items().unwrap()
}

fn first(set: &InMemDicomObject, tag: Tag) -> &InMemDicomObject {
    &items(set, tag)[0]
}

/// A copy of a DICOM file with a FrameOfReferenceUID (the pydicom fixture has none; a SEG
/// must carry its source's) and a patient.
fn copy_with_frame_of_reference(from: &Path, to: &Path) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let mut obj = dicom_object::open_file(from).unwrap();
    obj.put(DataElement::new(
        tags::FRAME_OF_REFERENCE_UID,
        VR::UI,
        PrimitiveValue::from("2.25.7002"),
    ));
    obj.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from("FX001"),
    ));
    obj.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from("Fixture^Patient"),
    ));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    obj.write_to_file(to).unwrap();
}

/// What the source files say, read here with `dicom-object` (not with the volume reader):
/// `(SOPInstanceUID, frame number)` -> `(SOPClassUID, ImagePositionPatient)`, and the
/// identifiers and geometry shared by all.
struct Source {
    frames: HashMap<(String, Option<u32>), (String, [f64; 3])>,
    study: String,
    series: String,
    frame_of_reference: String,
    patient_id: String,
    orientation: Vec<f64>,
    spacing: Vec<f64>,
}

fn source_of(files: &[PathBuf]) -> Source {
    let mut frames = HashMap::new();
    let mut src = None;
    for f in files {
        let o: Obj = dicom_object::open_file(f).unwrap();
        let (sop, class) = (
            text(&o, tags::SOP_INSTANCE_UID),
            text(&o, tags::SOP_CLASS_UID),
        );
        let (orientation, spacing);
        if let Ok(per) = o.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE) {
            // Orientation and pixel measures: shared, or in the first frame's groups.
            let shared = first(&o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
            let frame0 = &per.items().unwrap()[0];
            let group = |seq| {
                [shared, frame0]
                    .into_iter()
                    .find_map(|g| g.element_opt(seq).ok().flatten())
                    .and_then(|e| e.items())
                    .map(|i| &i[0])
                    .unwrap()
            };
            orientation = floats(
                group(tags::PLANE_ORIENTATION_SEQUENCE),
                tags::IMAGE_ORIENTATION_PATIENT,
            );
            spacing = floats(group(tags::PIXEL_MEASURES_SEQUENCE), tags::PIXEL_SPACING);
            for (k, it) in per.items().unwrap().iter().enumerate() {
                let p = floats(
                    first(it, tags::PLANE_POSITION_SEQUENCE),
                    tags::IMAGE_POSITION_PATIENT,
                );
                frames.insert(
                    (sop.clone(), Some(k as u32 + 1)),
                    (class.clone(), [p[0], p[1], p[2]]),
                );
            }
        } else {
            orientation = floats(&o, tags::IMAGE_ORIENTATION_PATIENT);
            spacing = floats(&o, tags::PIXEL_SPACING);
            let p = floats(&o, tags::IMAGE_POSITION_PATIENT);
            frames.insert((sop, None), (class, [p[0], p[1], p[2]]));
        }
        src.get_or_insert(Source {
            frames: HashMap::new(),
            study: text(&o, tags::STUDY_INSTANCE_UID),
            series: text(&o, tags::SERIES_INSTANCE_UID),
            frame_of_reference: text(&o, tags::FRAME_OF_REFERENCE_UID),
            patient_id: text(&o, tags::PATIENT_ID),
            orientation,
            spacing,
        });
    }
    let mut s = src.unwrap();
    s.frames = frames;
    s
}

/// The DICOM (LPS) position of slice `z`'s first voxel, from the volume's affine.
fn slice_position(v: &Volume, z: usize) -> [f64; 3] {
    let a = v.affine();
    let ras = [0, 1, 2].map(|r| a[r][3] + a[r][2] * z as f64);
    [-ras[0], -ras[1], ras[2]]
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

/// Checks the SEG at `seg` against the source files and the mask of the volume `vol`
/// (read from them); returns the number of frames.
fn check_seg(seg: &Path, files: &[PathBuf], vol: &Volume, mask: &Mask) -> usize {
    let src = source_of(files);
    let o: Obj = dicom_object::open_file(seg).unwrap();
    assert_eq!(
        o.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.1"
    );
    let t = |tag| text(&o, tag);
    assert_eq!(t(tags::SOP_CLASS_UID), SEGMENTATION_STORAGE);
    assert_eq!(t(tags::MODALITY), "SEG");
    assert_eq!(t(tags::SEGMENTATION_TYPE), "BINARY");
    assert_eq!(t(tags::STUDY_INSTANCE_UID), src.study);
    assert_eq!(t(tags::FRAME_OF_REFERENCE_UID), src.frame_of_reference);
    assert!(!src.frame_of_reference.is_empty());
    assert_eq!(t(tags::PATIENT_ID), src.patient_id);
    let series = t(tags::SERIES_INSTANCE_UID);
    assert!(!series.is_empty() && series != src.series);
    let sop = t(tags::SOP_INSTANCE_UID);
    assert!(!sop.is_empty() && !src.frames.keys().any(|(s, _)| *s == sop));
    assert!(!t(tags::CONTENT_LABEL).is_empty());
    assert_eq!(t(tags::CONTENT_CREATOR_NAME), "ichcam");
    for (tag, want) in [
        (tags::BITS_ALLOCATED, 1),
        (tags::BITS_STORED, 1),
        (tags::HIGH_BIT, 0),
        (tags::SAMPLES_PER_PIXEL, 1),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        assert_eq!(o.element(tag).unwrap().to_int::<u16>().unwrap(), want);
    }
    let (nz, ny, nx) = vol.dims();
    assert_eq!(
        o.element(tags::ROWS).unwrap().to_int::<usize>().unwrap(),
        ny
    );
    assert_eq!(
        o.element(tags::COLUMNS).unwrap().to_int::<usize>().unwrap(),
        nx
    );
    // The segment.
    let segs = items(&o, tags::SEGMENT_SEQUENCE);
    assert_eq!(segs.len(), 1);
    let sg = &segs[0];
    assert_eq!(
        sg.element(tags::SEGMENT_NUMBER)
            .unwrap()
            .to_int::<u16>()
            .unwrap(),
        1
    );
    assert_eq!(text(sg, tags::SEGMENT_ALGORITHM_TYPE), "AUTOMATIC");
    assert_eq!(text(sg, tags::SEGMENT_ALGORITHM_NAME), "ichcam");
    for (tag, value, meaning) in [
        (
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            "49755003",
            "Morphologically Altered Structure",
        ),
        (
            tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
            "50960005",
            "Hemorrhage",
        ),
    ] {
        let c = first(sg, tag);
        assert_eq!(text(c, tags::CODE_VALUE), value);
        assert_eq!(text(c, tags::CODING_SCHEME_DESIGNATOR), "SCT");
        assert_eq!(text(c, tags::CODE_MEANING), meaning);
    }
    // Shared geometry: the source's.
    let shared = first(&o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let ori = floats(
        first(shared, tags::PLANE_ORIENTATION_SEQUENCE),
        tags::IMAGE_ORIENTATION_PATIENT,
    );
    assert!(close(&ori, &src.orientation, 1e-6), "{ori:?}");
    let sp = floats(
        first(shared, tags::PIXEL_MEASURES_SEQUENCE),
        tags::PIXEL_SPACING,
    );
    assert!(close(&sp, &src.spacing, 1e-6), "{sp:?}");
    // Dimensions: one organization, its UID in both indices.
    let org = text(
        first(&o, tags::DIMENSION_ORGANIZATION_SEQUENCE),
        tags::DIMENSION_ORGANIZATION_UID,
    );
    let dims = items(&o, tags::DIMENSION_INDEX_SEQUENCE);
    assert_eq!(dims.len(), 2);
    assert!(dims
        .iter()
        .all(|d| text(d, tags::DIMENSION_ORGANIZATION_UID) == org));
    // The referenced series: every source instance, once.
    let rs = first(&o, tags::REFERENCED_SERIES_SEQUENCE);
    assert_eq!(text(rs, tags::SERIES_INSTANCE_UID), src.series);
    let mut got: Vec<String> = items(rs, tags::REFERENCED_INSTANCE_SEQUENCE)
        .iter()
        .map(|i| text(i, tags::REFERENCED_SOP_INSTANCE_UID))
        .collect();
    got.sort();
    let mut want: Vec<String> = src.frames.keys().map(|(s, _)| s.clone()).collect();
    want.sort();
    want.dedup();
    assert_eq!(got, want);
    // Frames: one per slice with mask voxels (one empty frame for an empty mask).
    let marked: Vec<usize> = (0..nz)
        .filter(|&z| mask.index_axis(ndarray::Axis(0), z).iter().any(|&v| v != 0))
        .collect();
    let frames = o
        .element(tags::NUMBER_OF_FRAMES)
        .unwrap()
        .to_int::<usize>()
        .unwrap();
    assert_eq!(frames, marked.len().max(1));
    let per = items(&o, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    assert_eq!(per.len(), frames);
    let px = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    let plane = ny * nx;
    assert!(px.len() >= (frames * plane).div_ceil(8));
    let bit = |k: usize| (px[k / 8] >> (k % 8)) & 1;
    let mut zs = Vec::new();
    for (f, it) in per.iter().enumerate() {
        let pos = floats(
            first(it, tags::PLANE_POSITION_SEQUENCE),
            tags::IMAGE_POSITION_PATIENT,
        );
        let z = (0..nz)
            .find(|&z| close(&slice_position(vol, z), &pos, 1e-3))
            .unwrap_or_else(|| panic!("frame {f} at {pos:?}: no slice there"));
        zs.push(z);
        // The referenced source instance (and frame) is the one at this position.
        let der = first(it, tags::DERIVATION_IMAGE_SEQUENCE);
        assert_eq!(
            text(first(der, tags::DERIVATION_CODE_SEQUENCE), tags::CODE_VALUE),
            "113076"
        );
        let r = first(der, tags::SOURCE_IMAGE_SEQUENCE);
        let frame = r
            .element_opt(tags::REFERENCED_FRAME_NUMBER)
            .unwrap()
            .map(|e| e.to_int::<u32>().unwrap());
        let key = (text(r, tags::REFERENCED_SOP_INSTANCE_UID), frame);
        let (class, at) = src
            .frames
            .get(&key)
            .unwrap_or_else(|| panic!("frame {f} references {key:?}, not a source frame"));
        assert_eq!(&text(r, tags::REFERENCED_SOP_CLASS_UID), class);
        assert_eq!(text(r, tags::SPATIAL_LOCATIONS_PRESERVED), "YES");
        assert!(close(at, &pos, 1e-4), "frame {f}: {at:?} vs {pos:?}");
        assert_eq!(
            first(it, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
                .element(tags::REFERENCED_SEGMENT_NUMBER)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            1
        );
        // The bits are the mask of that slice.
        let m = mask.index_axis(ndarray::Axis(0), z);
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(bit(f * plane + i), v, "frame {f} (z {z}) pixel {i}");
        }
    }
    if marked.is_empty() {
        assert_eq!(zs.len(), 1);
    } else {
        assert_eq!(zs, marked);
    }
    frames
}

/// Slices 1, 3, 5, ... hold a pattern; the others are empty.
fn pattern(dims: (usize, usize, usize)) -> Mask {
    Array3::from_shape_fn(dims, |(z, y, x)| {
        u8::from(z % 2 == 1 && (x + 2 * y + z) % 3 == 0)
    })
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut f: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    f.sort();
    f
}

#[test]
fn a_seg_of_a_written_series_references_its_slices() {
    let t = tempfile::tempdir().unwrap();
    // 9 x 11 slices: 99 bits a frame, so frames start inside a byte.
    let hu = Array3::from_shape_fn((5, 9, 11), |(z, y, x)| (z * 10 + y + x) as f32);
    let v = Volume::from_array(hu, [2.5, 0.7, 0.8], "v".into());
    let dir = t.path().join("series");
    io::dicom::write_series(&dir, &v).unwrap();
    let vol = io::read_volume(&dir).unwrap();
    let mask = pattern(vol.dims());
    let seg = t.path().join("seg.dcm");
    let w = write_seg(&seg, &vol, &mask, &SegmentInfo::default()).unwrap();
    assert_eq!((w.frames, w.empty), (2, false));
    assert_eq!(check_seg(&seg, &files_in(&dir), &vol, &mask), 2);
}

#[test]
fn a_seg_of_the_pydicom_series_and_multi_frame_file_references_their_frames() {
    let t = tempfile::tempdir().unwrap();
    let single = t.path().join("single");
    for f in files_in(&fixture().join("single")) {
        copy_with_frame_of_reference(&f, &single.join(f.file_name().unwrap()));
    }
    let enhanced = t.path().join("enhanced/enhanced.dcm");
    copy_with_frame_of_reference(&fixture().join("enhanced/enhanced.dcm"), &enhanced);
    for (input, files) in [
        (single.clone(), files_in(&single)),
        (enhanced.clone(), vec![enhanced.clone()]),
    ] {
        let vol = io::read_volume(&input).unwrap();
        assert_eq!(vol.dims(), (6, 5, 7));
        let mask = pattern(vol.dims());
        let seg = t.path().join("seg.dcm");
        write_seg(&seg, &vol, &mask, &SegmentInfo::default()).unwrap();
        assert_eq!(check_seg(&seg, &files, &vol, &mask), 3, "{input:?}");
        // For scripts/check_dicom_seg.py (README): frames on slices 1, 3 and 5 (gaps).
        if let Some(keep) = std::env::var_os("ICHCAM_KEEP_DICOM_SEG") {
            let name = input.file_name().unwrap().to_string_lossy().into_owned();
            let (src, out) = (
                PathBuf::from(&keep).join("fixture-in").join(&name),
                PathBuf::from(&keep).join("fixture-out").join(&name),
            );
            std::fs::create_dir_all(&out).unwrap();
            if input.is_dir() {
                for f in &files {
                    copy_with_frame_of_reference(f, &src.join(f.file_name().unwrap()));
                }
            } else {
                copy_with_frame_of_reference(&input, &src);
            }
            std::fs::copy(&seg, out.join("seg.dcm")).unwrap();
            io::write_mask(&out.join("mask.nii.gz"), &mask, &vol).unwrap();
        }
    }
    // The multi-frame file's frames are out of order (3, 0, 5, 1, 4, 2): frame numbers are
    // not slice numbers.
    let vol = io::read_volume(&enhanced).unwrap();
    let frames: Vec<Option<u32>> = vol
        .dicom
        .as_ref()
        .unwrap()
        .slices
        .iter()
        .map(|s| s.frame)
        .collect();
    assert_eq!(frames, [2, 4, 6, 1, 5, 3].map(Some));
}

#[test]
fn a_seg_of_a_multi_frame_file_with_per_frame_geometry() {
    let t = tempfile::tempdir().unwrap();
    let v = common::files::phantom(5);
    let path = t.path().join("mf.dcm");
    write_enhanced(
        &path,
        &v,
        &Enhanced {
            order: Some(vec![4, 2, 0, 3, 1]),
            per_frame_geometry: true,
            ..Default::default()
        },
    );
    let vol = io::read_volume(&path).unwrap();
    let mut mask = pattern(vol.dims());
    mask.index_axis_mut(ndarray::Axis(0), 0).fill(1);
    let seg = t.path().join("seg.dcm");
    write_seg(&seg, &vol, &mask, &SegmentInfo::default()).unwrap();
    assert_eq!(check_seg(&seg, std::slice::from_ref(&path), &vol, &mask), 3);
}

#[test]
fn an_empty_mask_is_one_empty_frame() {
    let t = tempfile::tempdir().unwrap();
    let v = common::files::phantom(4);
    let dir = t.path().join("series");
    io::dicom::write_series(&dir, &v).unwrap();
    let vol = io::read_volume(&dir).unwrap();
    let mask = Mask::zeros(vol.dims());
    let seg = t.path().join("seg.dcm");
    let w = write_seg(&seg, &vol, &mask, &SegmentInfo::default()).unwrap();
    assert_eq!((w.frames, w.empty, w.slices), (1, true, vec![0]));
    assert_eq!(check_seg(&seg, &files_in(&dir), &vol, &mask), 1);
}

#[test]
fn no_seg_without_a_dicom_source() {
    let t = tempfile::tempdir().unwrap();
    let v = common::files::phantom(4);
    let nii = t.path().join("v.nii.gz");
    io::write_volume(&nii, &v).unwrap();
    let vol = io::read_volume(&nii).unwrap();
    assert!(vol.dicom.is_none());
    assert_eq!(seg_source(&vol).unwrap_err(), "the input is not DICOM");
    let seg = t.path().join("seg.dcm");
    let e = write_seg(
        &seg,
        &vol,
        &Mask::zeros(vol.dims()),
        &SegmentInfo::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not DICOM"), "{e}");
    assert!(!seg.exists());
    // The pydicom fixture as it is has no FrameOfReferenceUID.
    let vol = io::read_volume(&fixture().join("single")).unwrap();
    assert!(seg_source(&vol)
        .unwrap_err()
        .contains("no FrameOfReferenceUID"));
    // A mask of other dims is an error, and writes nothing.
    let dir = t.path().join("series");
    io::dicom::write_series(&dir, &v).unwrap();
    let vol = io::read_volume(&dir).unwrap();
    let (z, y, x) = vol.dims();
    let e = write_seg(
        &seg,
        &vol,
        &Mask::zeros((z, y, x + 1)),
        &SegmentInfo::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mask of"), "{e}");
    assert!(!seg.exists());
}

#[test]
fn segment_with_dicom_seg_writes_seg_dcm_for_dicom_inputs_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let v = common::files::phantom(6);
    io::write_volume(&input.join("a.nii.gz"), &v).unwrap();
    io::dicom::write_series(&input.join("b"), &v).unwrap();
    write_enhanced(&input.join("c.dcm"), &v, &Enhanced::default());
    let out = dir.path().join("out");
    // Every slice positive and the CAM everywhere, so that the random model's mask is not
    // empty.
    let r = common::files::segment_cpu(
        &model,
        &input,
        &out,
        &[
            "--dicom-seg",
            "--slice-threshold",
            "0",
            "--cam-threshold",
            "0",
            "--min-component-ml",
            "0",
        ],
    );
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    // One note, for the NIfTI input.
    let notes: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("no seg.dcm"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", r.stderr);
    assert!(
        notes[0].contains("a:") && notes[0].contains("not DICOM"),
        "{notes:?}"
    );
    assert!(!out.join("a/seg.dcm").exists());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("a/summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["dicom_seg"], "not written: the input is not DICOM",
        "{summary}"
    );
    let mut total = 0;
    for (id, files) in [
        ("b", files_in(&input.join("b"))),
        ("c", vec![input.join("c.dcm")]),
    ] {
        let src = if id == "b" {
            input.join("b")
        } else {
            input.join("c.dcm")
        };
        let vol = io::read_volume(&src).unwrap();
        let m = io::to_mask(&io::read_volume(&out.join(id).join("mask.nii.gz")).unwrap());
        let frames = check_seg(&out.join(id).join("seg.dcm"), &files, &vol, &m);
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(id).join("summary.json")).unwrap())
                .unwrap();
        let note = summary["dicom_seg"].as_str().unwrap().to_string();
        assert!(note.starts_with("seg.dcm: "), "{note}");
        assert!(note.contains(&frames.to_string()), "{note}");
        total += m.iter().filter(|&&x| x != 0).count();
    }
    assert!(total > 0, "the masks are empty: nothing was compared");
    // For scripts/check_dicom_seg.py (README): keep the inputs and outputs.
    if let Some(keep) = std::env::var_os("ICHCAM_KEEP_DICOM_SEG") {
        let keep = PathBuf::from(keep);
        for (from, to) in [(&input, keep.join("in")), (&out, keep.join("out"))] {
            let st = std::process::Command::new("cp")
                .arg("-r")
                .arg(from)
                .arg(&to)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
    // Without the flag: no seg.dcm.
    let out2 = dir.path().join("out2");
    let r = common::files::segment_cpu(&model, &input.join("b"), &out2, &[]);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    assert_eq!(common::files::check_outputs(&out2), Ok(1));
}

#[test]
fn non_ascii_names_are_written_as_utf8() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let t = tempfile::tempdir().unwrap();
    let v = common::files::phantom(3);
    let dir = t.path().join("series");
    io::dicom::write_series(&dir, &v).unwrap();
    // Latin-1 in the source: the SEG says the same name in UTF-8.
    for f in files_in(&dir) {
        let mut o = dicom_object::open_file(&f).unwrap();
        o.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            PrimitiveValue::from("ISO_IR 100"),
        ));
        o.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("Müller^Jörg"),
        ));
        o.write_to_file(&f).unwrap();
    }
    let raw = std::fs::read(files_in(&dir)[0].clone()).unwrap();
    assert!(raw.windows(2).any(|w| w == [b'M', 0xFC]), "not Latin-1");
    let vol = io::read_volume(&dir).unwrap();
    let seg = t.path().join("seg.dcm");
    write_seg(&seg, &vol, &pattern(vol.dims()), &SegmentInfo::default()).unwrap();
    let o: Obj = dicom_object::open_file(&seg).unwrap();
    assert_eq!(text(&o, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
    assert_eq!(text(&o, tags::PATIENT_NAME), "Müller^Jörg");
    let raw = std::fs::read(&seg).unwrap();
    let utf8 = "Müller^Jörg".as_bytes();
    assert!(raw.windows(utf8.len()).any(|w| w == utf8), "not UTF-8");
}
