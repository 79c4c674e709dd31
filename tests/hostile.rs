//! Issue 15's hostile files, kept as regression cases: each ran into an abort, a panic, a
//! silent wrong answer, a clobbered file or a half-written output before the fix. Every
//! binary run here is under an 8 GB address-space limit (`setrlimit(RLIMIT_AS)` in the
//! child) and must exit 0 or 1 with a clear message, leaving no partial output. A hostile
//! DICOM file in a nested archive fails only its folder under `segment --recursive`.

mod common;

use common::files::{run_limited, Outcome, AS_LIMIT};
use ichcam::engine::cpu::CpuBackend;
use ichcam::infer::{Fuse, SegmentOptions, Segmenter, SliceClassifier};
use ichcam::io::{self, IoError};
use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(600);

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Runs `ichcam args...` under the 8 GB limit and returns the run, asserting exit 0 or 1.
fn run(args: &[&OsStr]) -> common::files::Run {
    let r = run_limited(args, AS_LIMIT, LONG);
    assert!(
        r.outcome.is_clean(),
        "{args:?}: {:?}\nstderr: {}",
        r.outcome,
        r.stderr
    );
    r
}

fn error_of(r: &common::files::Run) -> String {
    match &r.outcome {
        Outcome::CleanError(l) => l.clone(),
        o => panic!("expected a clean error, got {o:?}\nstderr: {}", r.stderr),
    }
}

/// The seed model with its `config` (fixture format) and metadata edited.
fn edited_model(
    dir: &Path,
    name: &str,
    config: &[(&str, serde_json::Value)],
    meta: &[(&str, &str)],
) -> std::path::PathBuf {
    let seed = dir.join("seed.safetensors");
    if !seed.exists() {
        common::files::write_model(&seed, 32);
    }
    let (mut h, data) = common::files::split_safetensors(&std::fs::read(&seed).unwrap());
    let mut cfg: serde_json::Value =
        serde_json::from_str(h["__metadata__"]["config"].as_str().unwrap()).unwrap();
    for (k, v) in config {
        cfg[*k] = v.clone();
    }
    h["__metadata__"]["config"] = cfg.to_string().into();
    for (k, v) in meta {
        h["__metadata__"][*k] = (*v).into();
    }
    let p = dir.join(name);
    std::fs::write(&p, common::files::join_safetensors(&h, &data)).unwrap();
    p
}

#[test]
fn model_fields_are_bounded_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("v.nii.gz");
    io::write_volume(&vol, &common::files::phantom(4)).unwrap();
    let big = u64::MAX;
    type Edit<'a> = (
        Vec<(&'a str, serde_json::Value)>,
        Vec<(&'a str, &'a str)>,
        &'a str,
    );
    let cases: Vec<Edit> = vec![
        (vec![("base_width", 1_000_000.into())], vec![], "base_width"),
        (vec![("base_width", big.into())], vec![], "base_width"),
        (
            vec![("lstm_hidden", 10_000_000.into())],
            vec![],
            "lstm_hidden",
        ),
        (
            vec![("lstm_layers", 1_000_000.into())],
            vec![],
            "lstm_layers",
        ),
        (
            vec![("layers", serde_json::json!([1_000_000, 1]))],
            vec![],
            "layers",
        ),
        (
            vec![("head", serde_json::json!([1_000_000_000, 1]))],
            vec![],
            "head",
        ),
        (
            vec![("in_channels", 10_000_000.into())],
            vec![],
            "in_channels",
        ),
        (
            vec![],
            vec![("ichcam.input_size", "100000")],
            "ichcam.input_size",
        ),
        (
            vec![],
            vec![("ichcam.input_size", "4000")],
            "ichcam.input_size",
        ),
        (
            vec![],
            vec![("ichcam.input_size", "18446744073709551615")],
            "ichcam.input_size",
        ),
        (
            vec![],
            vec![("ichcam.slices", "1000000000")],
            "ichcam.slices",
        ),
    ];
    for (k, (config, meta, what)) in cases.into_iter().enumerate() {
        let m = edited_model(dir.path(), &format!("m{k}.safetensors"), &config, &meta);
        // Library: a typed error, no allocation of the claimed size.
        let e = match Segmenter::load(CpuBackend::<f32>::new(), &m, SegmentOptions::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{what}: loaded"),
        };
        assert!(e.contains(what), "{what}: {e}");
        // Binary: exit 1 with the reason, for both classifiers.
        for cls in ["stage2", "stage1"] {
            let out = dir.path().join(format!("out{k}{cls}"));
            let r = run(&[
                os("segment"),
                os("--model"),
                m.as_os_str(),
                os("--input"),
                vol.as_os_str(),
                os("--out"),
                out.as_os_str(),
                os("--device"),
                os("cpu"),
                os("-q"),
                os("--classifier"),
                os(cls),
            ]);
            assert!(error_of(&r).contains(what), "{what}: {}", r.stderr);
            assert!(!out.exists(), "{what}: outputs written");
        }
    }
}

#[test]
fn nan_weights_are_refused_by_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.safetensors");
    common::files::write_model(&seed, 32);
    let (h, mut data) = common::files::split_safetensors(&std::fs::read(&seed).unwrap());
    let [s, e] = [0, 1].map(|i| h["fc.weight"]["data_offsets"][i].as_u64().unwrap() as usize);
    for c in data[s..e].chunks_exact_mut(4) {
        c.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let m = dir.path().join("nan.safetensors");
    std::fs::write(&m, common::files::join_safetensors(&h, &data)).unwrap();
    let e = match Segmenter::load(CpuBackend::<f32>::new(), &m, SegmentOptions::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("NaN weights loaded"),
    };
    assert!(e.contains("`fc.weight`") && e.contains("non-finite"), "{e}");
}

#[test]
fn huge_but_valid_volumes_are_planned_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    for (name, dims) in [
        ("w4096.nii.gz", (4096, 4096, 24)),
        ("z2048.nii.gz", (512, 512, 2048)),
        ("flat.nii.gz", (32767, 26000, 1)),
    ] {
        let p = dir.path().join(name);
        common::files::write_big_u8_gz(&p, dims, 0);
        let out = dir.path().join(format!("out-{name}"));
        let r = run(&[
            os("segment"),
            os("--model"),
            model.as_os_str(),
            os("--input"),
            p.as_os_str(),
            os("--out"),
            out.as_os_str(),
            os("--device"),
            os("cpu"),
            os("-q"),
        ]);
        error_of(&r);
        assert!(
            r.stderr.contains("1 of 1 volume(s) failed"),
            "{name}: {}",
            r.stderr
        );
        let (nx, ny, nz) = dims;
        assert!(
            r.stderr
                .contains(&format!("segmenting {nx}x{ny}x{nz} voxels needs about"))
                && r.stderr.contains("memory budget"),
            "{name}: {}",
            r.stderr
        );
        assert_eq!(common::files::check_outputs(&out), Ok(0), "{name}");
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn a_512x512x1000_scan_still_segments_under_8_gb() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    // A real scan's size: air everywhere but a head in the middle slices.
    let p = dir.path().join("long.nii.gz");
    {
        use std::io::Write;
        let (n, d) = (512usize, 1000usize);
        let mut v = common::files::phantom(1);
        v.header.dim = [3, n as u16, n as u16, d as u16, 1, 1, 1, 1];
        v.header.datatype = 2;
        v.header.bitpix = 8;
        v.header.pixdim = [1.0, 0.45, 0.45, 0.625, 1.0, 1.0, 1.0, 1.0];
        // HU = 10 * stored - 1000: 0 is air, 104 brain, 107 blood, 220 bone.
        v.header.scl_slope = 10.0;
        v.header.scl_inter = -1000.0;
        let f = std::fs::File::create(&p).unwrap();
        let mut e =
            flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::fast());
        e.write_all(&io::nii::header_bytes(&v.header)).unwrap();
        let mut head = vec![0u8; n * n];
        for y in 0..n {
            for x in 0..n {
                let r = ((y as f64 - 256.0).powi(2) + (x as f64 - 256.0).powi(2)).sqrt();
                head[y * n + x] = if r < 180.0 {
                    104
                } else if r < 200.0 {
                    220
                } else {
                    0
                };
            }
        }
        for y in 200..240 {
            for x in 150..200 {
                head[y * n + x] = 107;
            }
        }
        let air = vec![0u8; n * n];
        for z in 0..d {
            e.write_all(if (400..600).contains(&z) { &head } else { &air })
                .unwrap();
        }
        e.finish().unwrap().flush().unwrap();
    }
    let out = dir.path().join("out");
    let r = run(&[
        os("segment"),
        os("--model"),
        model.as_os_str(),
        os("--input"),
        p.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--device"),
        os("cpu"),
        os("-q"),
    ]);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    assert_eq!(common::files::check_outputs(&out), Ok(1));
    assert_eq!(
        io::probe_dims(&out.join("long/mask.nii.gz")).unwrap(),
        (1000, 512, 512)
    );
}

#[test]
fn eval_of_two_huge_all_ones_masks_does_not_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (pred, truth) = (dir.path().join("pred"), dir.path().join("truth"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&truth).unwrap();
    common::files::write_big_u8_gz(&truth.join("a.nii.gz"), (4096, 4096, 16), 1);
    std::fs::copy(truth.join("a.nii.gz"), pred.join("a.nii.gz")).unwrap();
    let json = dir.path().join("e.json");
    let r = run(&[
        os("eval"),
        os("--pred"),
        pred.as_os_str(),
        os("--truth"),
        truth.as_os_str(),
        os("--json"),
        json.as_os_str(),
    ]);
    // Refused under 8 GB (the distance transforms need about 9.5 GiB), by name and size.
    if let Outcome::CleanError(_) = r.outcome {
        assert!(
            r.stdout.contains("evaluating 4096x4096x16 voxels")
                && r.stdout.contains("memory budget"),
            "{}",
            r.stdout
        );
    }
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(j["volumes"].as_array().unwrap().len(), 1);
}

#[test]
fn gzip_damage_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let v = common::files::phantom(8);
    let good = dir.path().join("good.nii.gz");
    io::write_volume(&good, &v).unwrap();
    let b = std::fs::read(&good).unwrap();
    let n = b.len();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("cut trailer".into(), b[..n - 8].to_vec()),
        ("cut ISIZE".into(), b[..n - 4].to_vec()),
        ("trailing garbage".into(), [&b[..], b"garbage!"].concat()),
    ];
    for (what, at) in [("CRC", n - 6), ("ISIZE", n - 2)] {
        let mut c = b.clone();
        c[at] ^= 0x10;
        cases.push((what.into(), c));
    }
    // Bit flips inside the deflate stream, past the header's block.
    let mut rng = common::rng::SplitMix64(15);
    for k in 0..24 {
        let mut c = b.clone();
        let at = 200 + rng.below(n - 220);
        c[at] ^= 1 << rng.below(8);
        cases.push((format!("flip {k} at {at}"), c));
    }
    for (what, bytes) in cases {
        let p = dir.path().join("bad.nii.gz");
        std::fs::write(&p, &bytes).unwrap();
        match io::read_volume_report(&p) {
            Err(e) => assert!(
                e.to_string().contains("gzip") || e.to_string().contains("header"),
                "{what}: {e}"
            ),
            Ok((got, _)) => panic!(
                "{what}: damaged stream read without error (voxels equal: {})",
                got.data == v.data
            ),
        }
    }
}

/// A 9 KB DICOM file: the file meta group, then a private OB element claiming 0xF0000000
/// bytes.
fn dicom_claiming_4_gb() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend([0u8; 128]);
    f.extend(b"DICM");
    let el = |g: u16, e: u16, vr: &[u8; 2], v: &[u8]| {
        let mut o = Vec::new();
        o.extend(g.to_le_bytes());
        o.extend(e.to_le_bytes());
        o.extend(vr);
        if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
            o.extend([0, 0]);
            o.extend((v.len() as u32).to_le_bytes());
        } else {
            o.extend((v.len() as u16).to_le_bytes());
        }
        o.extend(v);
        o
    };
    let mut meta = Vec::new();
    meta.extend(el(2, 1, b"OB", &[0, 1]));
    meta.extend(el(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"));
    meta.extend(el(2, 3, b"UI", b"1.2.3.4\0"));
    meta.extend(el(2, 0x10, b"UI", b"1.2.840.10008.1.2.1\0"));
    f.extend(el(2, 0, b"UL", &(meta.len() as u32).to_le_bytes()));
    f.extend(meta);
    f.extend(el(8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"));
    f.extend(0x0011u16.to_le_bytes());
    f.extend(0x1010u16.to_le_bytes());
    f.extend(b"OB\0\0");
    f.extend(0xF000_0000u32.to_le_bytes());
    f.extend(vec![0u8; 9000]);
    f
}

#[test]
fn a_dicom_element_claiming_4_gb_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("series");
    io::dicom::write_series(&s, &common::files::phantom(3)).unwrap();
    std::fs::write(s.join("zz_hostile.dcm"), dicom_claiming_4_gb()).unwrap();
    let e = io::read_volume(&s).unwrap_err().to_string();
    assert!(
        e.contains("zz_hostile.dcm") && e.contains("claims 4026531840 bytes"),
        "{e}"
    );
    // The binary under a 1 GB address space: before the fix the library's 4.2 GB
    // allocation aborted it.
    let r = run_limited(&[os("inspect"), s.as_os_str()], 1 << 30, LONG);
    assert!(
        matches!(&r.outcome, Outcome::CleanError(l) if l.contains("claims 4026531840 bytes")),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
}

#[test]
fn a_corrupt_loose_dicom_file_in_a_folder_of_volumes_fails_the_listing() {
    // A folder of volumes lists a loose DICOM file from its header: a header claiming 4 GB
    // (or a corrupt one) fails the listing, naming the file, before anything is read or
    // written; `segment`, `train` and `inspect` under a 1 GB address space.
    let dir = tempfile::tempdir().unwrap();
    let vols = dir.path().join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    let v = common::files::phantom(3);
    io::write_volume(&vols.join("a.nii.gz"), &v).unwrap();
    common::enhanced::write_enhanced(
        &vols.join("b.dcm"),
        &v,
        &common::enhanced::Enhanced::default(),
    );
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let out = dir.path().join("out");
    let trained = dir.path().join("t.safetensors");
    // The pydicom Enhanced CT fixture cut in its per-frame functional groups.
    let mut enhanced_cut = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dicom-enhanced/enhanced/enhanced.dcm"),
    )
    .unwrap();
    enhanced_cut.truncate(700);
    for (file, bytes, want) in [
        ("c.dcm", dicom_claiming_4_gb(), "claims 4026531840 bytes"),
        ("c", dicom_claiming_4_gb(), "claims 4026531840 bytes"),
        ("c.dcm", enhanced_cut, "claims 870 bytes"),
    ] {
        let bad = vols.join(file);
        std::fs::write(&bad, &bytes).unwrap();
        let named = |l: &str| l.contains(&bad.display().to_string()) && l.contains(want);
        let seg = run_limited(
            &[
                os("segment"),
                os("--model"),
                model.as_os_str(),
                os("--input"),
                vols.as_os_str(),
                os("--out"),
                out.as_os_str(),
                os("--device"),
                os("cpu"),
                os("-q"),
            ],
            1 << 30,
            LONG,
        );
        let train = run_limited(
            &[
                os("train"),
                os("--data"),
                vols.as_os_str(),
                os("--model"),
                trained.as_os_str(),
                os("--device"),
                os("cpu"),
            ],
            1 << 30,
            LONG,
        );
        let inspect = run_limited(&[os("inspect"), vols.as_os_str()], 1 << 30, LONG);
        for (what, r) in [("segment", seg), ("train", train), ("inspect", inspect)] {
            assert!(
                matches!(&r.outcome, Outcome::CleanError(l) if named(l)),
                "{file} {what}: {:?} {}",
                r.outcome,
                r.stderr
            );
        }
        assert!(!out.exists(), "{file}: segment wrote outputs");
        assert!(!trained.exists(), "{file}: train wrote a model");
        std::fs::remove_file(&bad).unwrap();
    }
}

#[test]
fn hostile_dicom_in_a_nested_archive_fails_its_folder_only() {
    // `segment --recursive` under a 1 GB address space: a header claiming 4 GB in a series
    // folder and in a folder holding several series fails that folder's volume, named, and
    // the others are segmented; `inspect` of the mixed folder is a clean error.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let v = common::files::phantom(8);
    io::dicom::write_series(&root.join("p1/good"), &v).unwrap();
    io::dicom::write_series(&root.join("p1/bad"), &v).unwrap();
    std::fs::write(root.join("p1/bad/zz.dcm"), dicom_claiming_4_gb()).unwrap();
    let mixed = root.join("p2/mixed");
    common::archive::write_mixed(&mixed, "2.25.99", &v, &common::files::phantom(9));
    std::fs::write(mixed.join("zz.dcm"), dicom_claiming_4_gb()).unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let out = dir.path().join("out");
    let r = run_limited(
        &[
            os("segment"),
            os("--model"),
            model.as_os_str(),
            os("--input"),
            root.as_os_str(),
            os("--out"),
            out.as_os_str(),
            os("--device"),
            os("cpu"),
            os("-q"),
            os("--recursive"),
        ],
        1 << 30,
        LONG,
    );
    assert!(
        matches!(&r.outcome, Outcome::CleanError(_))
            && r.stderr.contains("error: 2 of 3 volume(s) failed"),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
    for id in ["p1_bad", "p2_mixed"] {
        assert!(
            r.stderr
                .lines()
                .any(|l| l.starts_with(&format!("failed: {id}: "))
                    && l.contains("zz.dcm")
                    && l.contains("claims 4026531840 bytes")),
            "{id}: {}",
            r.stderr
        );
    }
    assert_eq!(common::files::check_outputs(&out), Ok(1));
    assert!(out.join("p1_good/mask.nii.gz").is_file());
    let r = run_limited(&[os("inspect"), mixed.as_os_str()], 1 << 30, LONG);
    assert!(
        matches!(&r.outcome, Outcome::CleanError(l) if l.contains("claims 4026531840 bytes")),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
}

#[test]
fn special_targets_are_written_into_or_refused_never_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let (pred, truth) = (dir.path().join("pred"), dir.path().join("truth"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&truth).unwrap();
    let v = common::files::phantom(6);
    let m = io::to_mask(&common::files::phantom_mask(&v));
    io::write_mask(&truth.join("a.nii.gz"), &m, &v).unwrap();
    io::write_mask(&pred.join("a.nii.gz"), &m, &v).unwrap();
    let eval_to = |target: &Path| {
        run_limited(
            &[
                os("eval"),
                os("--pred"),
                pred.as_os_str(),
                os("--truth"),
                truth.as_os_str(),
                os("--json"),
                target.as_os_str(),
            ],
            AS_LIMIT,
            LONG,
        )
    };
    // A FIFO: written into, still a FIFO.
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(&fifo).unwrap())
    };
    let r = eval_to(&fifo);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    let got = reader.join().unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&got).is_ok());
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    // A symbolic link: its target is replaced, the link kept.
    let target = dir.path().join("target.json");
    std::fs::write(&target, b"{}").unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_eq!(eval_to(&link).outcome, Outcome::Ok);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read(&target).unwrap().len() > 100);
    // A device: refused, left alone (as root this replaced /dev/full before the fix).
    let full = Path::new("/dev/full");
    if full.exists() {
        let r = eval_to(full);
        assert!(error_of(&r).contains("character device"), "{}", r.stderr);
        assert!(std::fs::symlink_metadata(full)
            .unwrap()
            .file_type()
            .is_char_device());
    }
    // A folder and a link loop: refused by name.
    let r = eval_to(dir.path());
    assert!(error_of(&r).contains("is a folder"), "{}", r.stderr);
    let (a, b) = (dir.path().join("loop_a"), dir.path().join("loop_b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let r = eval_to(&a);
    assert!(error_of(&r).contains("symbolic link loop"), "{}", r.stderr);
    // `-` is standard output: the JSON alone.
    let r = eval_to(Path::new("-"));
    assert!(serde_json::from_str::<serde_json::Value>(&r.stdout).is_ok());
}

#[test]
fn a_volume_failing_half_way_leaves_nothing_and_keeps_the_previous_output() {
    let dir = tempfile::tempdir().unwrap();
    let v = common::files::phantom(6);
    let mut s = ichcam::infer::Segmentation {
        probabilities: vec![0.9; 6],
        positive: vec![true; 6],
        cam: v.data.mapv(|_| 0.5),
        unet: None,
        mask: io::to_mask(&common::files::phantom_mask(&v)),
        n_components: 1,
        volume_ml: 1.0,
        saturation: 0.6,
    };
    let dest = dir.path().join("out/v");
    ichcam::infer::write_outputs(&dest, "v", &v, &s).unwrap();
    let before: Vec<Vec<u8>> = common::files::OUTPUT_FILES
        .iter()
        .map(|f| std::fs::read(dest.join(f)).unwrap())
        .collect();
    // The CAM of the wrong shape: the mask is written, the CAM fails.
    s.cam = ndarray::Array3::zeros((5, 48, 48));
    s.volume_ml = 2.0;
    let e = ichcam::infer::write_outputs(&dest, "v", &v, &s).unwrap_err();
    assert!(e.to_string().contains("out/v/cam.nii.gz"), "{e}");
    for (f, b) in common::files::OUTPUT_FILES.iter().zip(&before) {
        assert_eq!(&std::fs::read(dest.join(f)).unwrap(), b, "{f} changed");
    }
    assert_eq!(common::files::check_outputs(&dir.path().join("out")), Ok(1));
    // A new id that fails leaves nothing at all.
    let e = ichcam::infer::write_outputs(&dir.path().join("out/w"), "w", &v, &s);
    assert!(e.is_err());
    assert!(!dir.path().join("out/w").exists());
    assert_eq!(common::files::check_outputs(&dir.path().join("out")), Ok(1));
    // An output folder holding someone else's file is not replaced.
    std::fs::write(dest.join("notes.txt"), b"mine").unwrap();
    s.cam = v.data.mapv(|_| 0.5);
    let e = ichcam::infer::write_outputs(&dest, "v", &v, &s).unwrap_err();
    assert!(e.to_string().contains("notes.txt"), "{e}");
    assert_eq!(std::fs::read(dest.join("notes.txt")).unwrap(), b"mine");
}

#[test]
fn absurd_pixdim_and_bitpix_mismatch_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = common::files::phantom(4);
    let p = dir.path().join("p.nii");
    v.header.pixdim[1] = 1e30;
    io::write_volume(&p, &v).unwrap();
    let e = io::read_volume(&p).unwrap_err();
    assert!(
        matches!(&e, IoError::Invalid { reason, .. } if reason.contains("pixdim[1]") && reason.contains("plausible")),
        "{e}"
    );
    // Unusual but possible: a warning.
    v.header.pixdim[1] = 40.0;
    io::write_volume(&p, &v).unwrap();
    let (_, r) = io::read_volume_report(&p).unwrap();
    assert!(
        r.warnings.iter().any(|w| w.contains("unusual")),
        "{:?}",
        r.warnings
    );
    // Metres in xyzt_units: 0.00045 m is 0.45 mm.
    v.header.pixdim[1] = 0.00045;
    v.header.pixdim[2] = 0.00045;
    v.header.pixdim[3] = 0.005;
    v.header.xyzt_units = 1;
    io::write_volume(&p, &v).unwrap();
    let (got, r) = io::read_volume_report(&p).unwrap();
    assert!((got.spacing[2] - 0.45).abs() < 1e-6, "{:?}", got.spacing);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // bitpix contradicting the datatype: the datatype wins, with a warning.
    let mut b = std::fs::read(&p).unwrap();
    b[72..74].copy_from_slice(&8i16.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let (_, r) = io::read_volume_report(&p).unwrap();
    assert!(
        r.warnings.iter().any(|w| w.contains("bitpix 8 disagrees")),
        "{:?}",
        r.warnings
    );
    let r = run(&[os("inspect"), p.as_os_str()]);
    assert!(r.stdout.contains("bitpix 8 disagrees"), "{}", r.stdout);
}

#[test]
fn symlink_loops_are_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.nii.gz"), dir.path().join("b.nii.gz"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let e = io::read_volume(&a).unwrap_err().to_string();
    assert!(e.contains("symbolic link loop"), "{e}");
    let r = run(&[os("inspect"), a.as_os_str()]);
    assert!(error_of(&r).contains("symbolic link loop"), "{}", r.stderr);
    // As a truth mask of eval.
    let (pred, truth) = (dir.path().join("pred"), dir.path().join("truth"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&truth).unwrap();
    std::os::unix::fs::symlink(truth.join("y.nii.gz"), truth.join("x.nii.gz")).unwrap();
    std::os::unix::fs::symlink(truth.join("x.nii.gz"), truth.join("y.nii.gz")).unwrap();
    let r = run(&[
        os("eval"),
        os("--pred"),
        pred.as_os_str(),
        os("--truth"),
        truth.as_os_str(),
    ]);
    assert!(error_of(&r).contains("symbolic link loop"), "{}", r.stderr);
}

#[test]
fn segmenting_by_slabs_gives_the_whole_pass_result() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let with_unet = dir.path().join("u.safetensors");
    common::files::write_model_with_unet(&with_unet, 32, 2);
    let v = common::files::phantom(13);
    // Both classifiers (the stage-1 one reads sequences across slabs), with and without a
    // U-Net, every fuse.
    let runs = [
        (&model, SliceClassifier::Stage2, None),
        (&model, SliceClassifier::Stage1, None),
        (&with_unet, SliceClassifier::Stage1, Some(Fuse::Unet)),
        (&with_unet, SliceClassifier::Stage2, Some(Fuse::Or)),
        (&with_unet, SliceClassifier::Stage1, Some(Fuse::Cam)),
    ];
    for (m, classifier, fuse) in runs {
        // Every slice positive and the whole slice in the CAM region, so that the
        // refinement has work everywhere (the random model's CAM says little).
        let mut opts = SegmentOptions {
            slice_threshold: Some(0.0),
            min_component_ml: Some(0.0),
            classifier,
            fuse,
            unet_threshold: 0.0,
            unet_grow: 0.0,
            ..Default::default()
        };
        opts.refine.cam_threshold = 0.0;
        opts.refine.grow_cam_threshold = 0.0;
        let mut seg = Segmenter::load(CpuBackend::<f32>::new(), m, opts).unwrap();
        let whole = seg.segment(&v).unwrap();
        assert!(whole.mask.iter().any(|&m| m != 0), "nothing to compare");
        assert_eq!(whole.unet.is_some(), fuse.is_some());
        for slab in [1, 4, 5, 13] {
            let by = ichcam::infer::slabs::segment_by_slabs(&mut seg, &v, slab).unwrap();
            let what = format!("slab {slab}, {classifier:?}, {fuse:?}");
            assert_eq!(by.probabilities, whole.probabilities, "{what}");
            assert_eq!(by.cam, whole.cam, "{what}");
            assert_eq!(by.unet, whole.unet, "{what}");
            assert_eq!(by.mask, whole.mask, "{what}");
            assert_eq!(by.n_components, whole.n_components, "{what}");
        }
    }
}

#[test]
fn unet_sections_are_checked_like_the_rest_of_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.safetensors");
    common::files::write_model_with_unet(&seed, 32, 2);
    let load =
        |m: &Path| match Segmenter::load(CpuBackend::<f32>::new(), m, SegmentOptions::default()) {
            Err(e) => e.to_string(),
            Ok(_) => "loaded".into(),
        };
    assert_eq!(load(&seed), "loaded");
    // An infinity in one U-Net tensor: refused by name.
    let (h, mut data) = common::files::split_safetensors(&std::fs::read(&seed).unwrap());
    let name = "unet.decoder1.dec1conv2.weight";
    let [s, _] = [0, 1].map(|i| h[name]["data_offsets"][i].as_u64().unwrap() as usize);
    data[s..s + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let m = dir.path().join("nan.safetensors");
    std::fs::write(&m, common::files::join_safetensors(&h, &data)).unwrap();
    let e = load(&m);
    assert!(e.contains(name) && e.contains("non-finite"), "{e}");
    // A config claiming a huge network: refused before anything is allocated.
    for (key, value, what) in [
        ("features", serde_json::json!(1_000_000), "features"),
        ("in_channels", serde_json::json!(100_000), "channels"),
        ("depth", serde_json::json!(40), "depth"),
    ] {
        let (mut h, data) = common::files::split_safetensors(&std::fs::read(&seed).unwrap());
        let cfg = h["__metadata__"]["unet_config"]
            .as_str()
            .unwrap()
            .to_string();
        let mut c: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        c[key] = value;
        h["__metadata__"]["unet_config"] = serde_json::Value::String(c.to_string());
        let m = dir.path().join(format!("{key}.safetensors"));
        std::fs::write(&m, common::files::join_safetensors(&h, &data)).unwrap();
        let e = load(&m);
        assert!(e.contains(what) && e.contains("unet_config"), "{key}: {e}");
    }
    // A U-Net asked for from a model without one: a clear error.
    let plain = dir.path().join("plain.safetensors");
    common::files::write_model(&plain, 32);
    let e = match Segmenter::load(
        CpuBackend::<f32>::new(),
        &plain,
        SegmentOptions {
            fuse: Some(Fuse::Or),
            ..Default::default()
        },
    ) {
        Err(e) => e.to_string(),
        Ok(_) => "loaded".into(),
    };
    assert!(
        e.contains("no stage-3 U-Net") && e.contains("--fuse cam"),
        "{e}"
    );
    // The binary writes the U-Net's map beside the rest, for every fuse.
    let vol = dir.path().join("v.nii.gz");
    io::write_volume(&vol, &common::files::phantom(6)).unwrap();
    for fuse in ["unet", "or", "cam"] {
        let out = dir.path().join(format!("out-{fuse}"));
        let r = run(&[
            os("segment"),
            os("--model"),
            seed.as_os_str(),
            os("--input"),
            vol.as_os_str(),
            os("--out"),
            out.as_os_str(),
            os("--device"),
            os("cpu"),
            os("-q"),
            os("--fuse"),
            os(fuse),
        ]);
        assert_eq!(r.outcome, Outcome::Ok, "{fuse}: {}", r.stderr);
        assert_eq!(common::files::check_outputs(&out), Ok(1));
        assert!(out.join("v/unet.nii.gz").is_file());
    }
    let r = run(&[
        os("segment"),
        os("--model"),
        plain.as_os_str(),
        os("--input"),
        vol.as_os_str(),
        os("--out"),
        dir.path().join("o").as_os_str(),
        os("--device"),
        os("cpu"),
        os("-q"),
        os("--fuse"),
        os("unet"),
    ]);
    assert!(error_of(&r).contains("no stage-3 U-Net"), "{}", r.stderr);
}

#[test]
fn a_label_csv_naming_a_slice_beyond_any_volume_is_an_error() {
    // Found by the fuzz harness: the labels became one byte per slice up to the largest
    // named, so `a01,999999999999,1` asked for a terabyte and aborted.
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(ds.join("images")).unwrap();
    io::write_volume(&ds.join("images/a01.nii.gz"), &common::files::phantom(4)).unwrap();
    let csv = ds.join("slice_labels.csv");
    std::fs::write(
        &csv,
        "patient,z,any_hemorrhage\na01,0,1\na01,999999999999,1\n",
    )
    .unwrap();
    let e = ichcam::data::dataset::read_label_csv(&csv)
        .unwrap_err()
        .to_string();
    assert!(e.contains("999999999999") && e.contains(":3:"), "{e}");
    let r = run(&[os("inspect"), ds.as_os_str()]);
    assert!(error_of(&r).contains("999999999999"), "{}", r.stderr);
}

/// A NIfTI-2 copy of a little-endian `.nii` phantom: its header fields and voxel bytes.
fn nifti2_phantom(dir: &Path) -> (common::nifti2::Nifti2, Vec<u8>) {
    let p = dir.join("phantom1.nii");
    io::write_volume(&p, &common::files::phantom(4)).unwrap();
    common::nifti2::parts_of_nifti1_file(&std::fs::read(&p).unwrap())
}

#[test]
fn nifti2_hostile_headers_are_clear_errors() {
    use common::files::gz;
    let dir = tempfile::tempdir().unwrap();
    let (h, body) = nifti2_phantom(dir.path());
    let good = h.file(false, &body);
    let edit = |f: &dyn Fn(&mut common::nifti2::Nifti2)| {
        let mut e = h.clone();
        f(&mut e);
        e.file(false, &body)
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "short.nii",
            good[..400].to_vec(),
            "is only 400 bytes, shorter than the 540-byte NIfTI-2 header",
        ),
        (
            "short.nii.gz",
            gz(&good[..400]),
            "decompresses to only 400 bytes, shorter than the 540-byte NIfTI-2 header",
        ),
        (
            "negative_dim.nii",
            edit(&|e| e.dim[2] = -5),
            "dim[2] = -5 (must be positive)",
        ),
        (
            "ndim.nii",
            edit(&|e| e.dim[0] = 9),
            "dim[0] = 9 (must be 1 to 7)",
        ),
        (
            "three_volumes.nii",
            edit(&|e| e.dim = [4, 48, 48, 4, 3, 1, 1, 1]),
            "4-D image with 3 volumes",
        ),
        (
            "offset.nii",
            edit(&|e| e.vox_offset = 1 << 40),
            "vox_offset 1099511627776 is past the end of the file",
        ),
        (
            "offset.nii.gz",
            gz(&edit(&|e| e.vox_offset = 1 << 40)),
            "vox_offset 1099511627776 is past the end of the data",
        ),
        (
            "negative_offset.nii",
            edit(&|e| e.vox_offset = -8),
            "invalid vox_offset -8",
        ),
        (
            "short_data.nii",
            good[..good.len() - 10].to_vec(),
            "but the file holds only",
        ),
        (
            "complex.nii",
            edit(&|e| e.datatype = 32),
            "complex datatype (code 32)",
        ),
        (
            "pair.nii",
            edit(&|e| e.magic = *b"ni2\0\r\n\x1a\n"),
            ".hdr/.img pair",
        ),
        (
            // A text-mode transfer turned "\r\n" into "\n".
            "text_mode.nii",
            edit(&|e| e.magic = *b"n+2\0\n\x1a\n\0"),
            "check bytes",
        ),
        (
            "nifti1_magic.nii",
            edit(&|e| e.magic = *b"n+1\0\r\n\x1a\n"),
            "expected \"n+2\"",
        ),
        // Fields that NIfTI-1 outputs cannot carry: refused at read time.
        (
            "wide.nii",
            edit(&|e| e.dim = [3, 40000, 2, 1, 1, 1, 1, 1]),
            "dims [40000, 2, 1] do not fit NIfTI-1 (at most 32767 per axis)",
        ),
        (
            "i64_dims.nii",
            edit(&|e| e.dim = [3, i64::MAX, i64::MAX, i64::MAX, 1, 1, 1, 1]),
            "do not fit NIfTI-1",
        ),
        (
            "srow.nii",
            edit(&|e| e.srow[0][3] = 1e300),
            "srow_x[3] = 1e300 does not fit NIfTI-1's field",
        ),
        (
            "tiny_pixdim.nii",
            edit(&|e| e.pixdim[4] = 1e-300),
            "pixdim[4] = 1e-300 does not fit",
        ),
        (
            "qform_code.nii",
            edit(&|e| e.qform_code = 70000),
            "qform_code = 70000 does not fit",
        ),
        (
            "slice_end.nii",
            edit(&|e| e.slice_end = 1 << 40),
            "slice_end = 1099511627776 does not fit",
        ),
    ];
    for (name, bytes, phrase) in &cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = io::read_volume_report(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(phrase), "{name}: {e}");
        let r = run(&[os("inspect"), p.as_os_str()]);
        assert!(error_of(&r).contains(phrase), "{name}: {}", r.stderr);
    }
    // The header alone (what batch planning reads) gives the same answers.
    for (name, _, phrase) in &cases[..5] {
        let e = io::probe_dims(&dir.path().join(name))
            .unwrap_err()
            .to_string();
        assert!(e.contains(phrase), "{name}: {e}");
    }
    // The same file, unedited, reads (big-endian too).
    for (name, bytes) in [
        ("good.nii", good),
        ("good_be.nii.gz", gz(&h.file(true, &body))),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(io::read_volume(&p).unwrap().dims(), (4, 48, 48), "{name}");
    }
}

/// `p`'s header claims 32767^3 float64 voxels: the read refuses it as too large, naming the
/// claim; past the per-volume cap the budget or the file's size refuses it; both within a
/// second (nothing allocated); `ichcam inspect` under a 1 GB address space exits with a
/// clean error naming the claim. Returns the first read's error for more checks.
fn assert_terabyte_claim_refused(p: &Path, name: &str) -> IoError {
    let t = std::time::Instant::now();
    let e = io::read_volume(p).unwrap_err();
    assert!(
        matches!(&e, IoError::TooLarge { claim, .. } if claim == "32767x32767x32767 voxels of float64"),
        "{e}"
    );
    let past_cap = io::read_volume_with(
        p,
        &io::ReadOptions {
            max_bytes: u64::MAX,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&past_cap, IoError::OverBudget { .. })
            || past_cap.to_string().contains("cannot hold that much")
            || past_cap.to_string().contains("holds only"),
        "{past_cap}"
    );
    assert!(t.elapsed().as_secs_f64() < 1.0, "{name}");
    let r = run_limited(&[OsStr::new("inspect"), p.as_os_str()], 1 << 30, LONG);
    assert!(
        matches!(&r.outcome, Outcome::CleanError(l) if l.contains("header claims 32767x32767x32767 voxels of float64")),
        "{name}: {:?} {}",
        r.outcome,
        r.stderr
    );
    e
}

#[test]
fn a_nifti2_header_claiming_terabytes_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let (mut h, body) = nifti2_phantom(dir.path());
    // 32767^3 float64 voxels (2^48 bytes) in a 600-byte file; every dim fits NIfTI-1.
    h.dim = [3, 32767, 32767, 32767, 1, 1, 1, 1];
    h.datatype = 64;
    h.bitpix = 64;
    let bytes = h.file(false, &body[..56]);
    for (name, b) in [
        ("tb.nii", bytes.clone()),
        ("tb.nii.gz", common::files::gz(&bytes)),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        let e = assert_terabyte_claim_refused(&p, name);
        assert!(e.to_string().contains("TiB"), "{e}");
    }
}

#[test]
fn a_nifti2_volume_too_wide_for_nifti1_outputs_fails_before_segmenting() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    let (mut h, _) = nifti2_phantom(dir.path());
    // 40000 x 2 x 1 uint8 voxels, all there: readable, but no NIfTI-1 mask can hold it.
    h.dim = [3, 40000, 2, 1, 1, 1, 1, 1];
    h.datatype = 2;
    h.bitpix = 8;
    h.scl_slope = 0.0;
    let p = dir.path().join("wide.nii.gz");
    std::fs::write(&p, common::files::gz(&h.file(false, &vec![100u8; 80000]))).unwrap();
    let out = dir.path().join("out");
    let r = run(&[
        os("segment"),
        os("--model"),
        model.as_os_str(),
        os("--input"),
        p.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--device"),
        os("cpu"),
        os("-q"),
    ]);
    error_of(&r);
    assert!(
        r.stderr.contains("wide.nii.gz")
            && r.stderr.contains("dims [40000, 2, 1] do not fit NIfTI-1")
            && r.stderr
                .contains("outputs (masks, maps) are written as NIfTI-1"),
        "{}",
        r.stderr
    );
    assert_eq!(common::files::check_outputs(&out), Ok(0));
}

/// The little-endian `.nii` of a 4-slice phantom, split into a pair's `.hdr` and `.img`.
fn pair_phantom(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let p = dir.join("phantom_pair.nii");
    io::write_volume(&p, &common::files::phantom(4)).unwrap();
    common::pair::split_nii(&std::fs::read(&p).unwrap())
}

#[test]
fn nifti_pair_hostile_files_are_clear_errors() {
    use common::files::gz;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (hdr, img) = pair_phantom(d);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut h = hdr.clone();
        f(&mut h);
        h
    };
    // (stem, .hdr name and bytes or none, .img name and bytes or none, the name read, the
    // file the error must name, the phrase it must hold).
    type Case<'a> = (
        Option<(&'a str, Vec<u8>)>,
        Option<(&'a str, Vec<u8>)>,
        &'a str,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            Some(("no_img.hdr", hdr.clone())),
            None,
            "no_img.hdr",
            "no_img.img",
            "no such file: the voxel file (.img) of the NIfTI pair whose header is",
        ),
        (
            None,
            Some(("no_hdr.img.gz", gz(&img))),
            "no_hdr.img.gz",
            "no_hdr.hdr.gz",
            "no such file: the header (.hdr) of the NIfTI pair whose voxel file is",
        ),
        (
            Some(("short_img.hdr", hdr.clone())),
            Some(("short_img.img", img[..img.len() - 10].to_vec())),
            "short_img.hdr",
            "short_img.img",
            "short_img.hdr claims 48x48x4 voxels of int16",
        ),
        (
            Some(("short_img_gz.hdr", hdr.clone())),
            Some(("short_img_gz.img.gz", gz(&img[..img.len() / 2]))),
            "short_img_gz.img.gz",
            "short_img_gz.img.gz",
            "but the file holds only 9216 bytes of voxel data",
        ),
        (
            Some(("cut_gz.hdr", hdr.clone())),
            Some(("cut_gz.img.gz", {
                let g = gz(&img);
                g[..g.len() - 6].to_vec()
            })),
            "cut_gz.hdr",
            "cut_gz.img.gz",
            "gzip",
        ),
        (
            Some(("empty_img.hdr", hdr.clone())),
            Some(("empty_img.img", Vec::new())),
            "empty_img.hdr",
            "empty_img.img",
            "empty file (0 bytes)",
        ),
        (
            Some(("analyze.hdr", edit(&|h| h[344..348].fill(0)))),
            Some(("analyze.img", img.clone())),
            "analyze.img",
            "analyze.hdr",
            "a plain Analyze 7.5 header, whose orientation is undefined",
        ),
        (
            Some((
                "single.hdr",
                edit(&|h| h[344..348].copy_from_slice(b"n+1\0")),
            )),
            Some(("single.img", img.clone())),
            "single.hdr",
            "single.hdr",
            "of a single-file NIfTI-1",
        ),
        (
            Some(("short_hdr.hdr", hdr[..200].to_vec())),
            Some(("short_hdr.img", img.clone())),
            "short_hdr.hdr",
            "short_hdr.hdr",
            "is only 200 bytes, shorter than the 348-byte NIfTI-1 header",
        ),
        (
            Some((
                "offset.hdr",
                edit(&|h| h[108..112].copy_from_slice(&1e9f32.to_le_bytes())),
            )),
            Some(("offset.img", img.clone())),
            "offset.hdr",
            "offset.img",
            "vox_offset 1000000000 is past the end of the file",
        ),
        (
            Some((
                "negative_dim.hdr",
                edit(&|h| common::pair::set_dims(h, [3, 48, -48, 4, 1, 1, 1, 1])),
            )),
            Some(("negative_dim.img", img.clone())),
            "negative_dim.hdr",
            "negative_dim.hdr",
            "dim[2] = -48 (must be positive)",
        ),
    ];
    for (h, i, read, named, phrase) in &cases {
        for (name, bytes) in h.iter().chain(i) {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        let p = d.join(read);
        let e = io::read_volume_report(&p).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.path(), d.join(named), "{read}: {msg}");
        assert!(msg.contains(phrase) && !msg.contains('\n'), "{read}: {msg}");
        let r = run(&[os("inspect"), p.as_os_str()]);
        assert!(error_of(&r).contains(phrase), "{read}: {}", r.stderr);
    }
    // The header alone (what batch planning reads) gives the header's answers.
    for (read, phrase) in [
        ("analyze.img", "Analyze 7.5"),
        ("no_hdr.img.gz", "no such file"),
        ("negative_dim.hdr", "must be positive"),
    ] {
        let e = io::probe_dims(&d.join(read)).unwrap_err().to_string();
        assert!(e.contains(phrase), "{read}: {e}");
    }
    // A folder where the .img should be.
    std::fs::write(d.join("dir_img.hdr"), &hdr).unwrap();
    std::fs::create_dir(d.join("dir_img.img")).unwrap();
    let e = io::read_volume(&d.join("dir_img.hdr"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a folder, expected a NIfTI pair's .img file"),
        "{e}"
    );
    // A pair's magic in a single file's name.
    std::fs::write(
        d.join("pair_magic.nii"),
        [hdr.clone(), vec![0; 4], img.clone()].concat(),
    )
    .unwrap();
    let e = io::read_volume(&d.join("pair_magic.nii"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("name it .hdr, beside its .img"), "{e}");
    // The same pair, unedited, reads.
    let (hp, _) = common::pair::write_pair(
        d,
        "good",
        &std::fs::read(d.join("phantom_pair.nii")).unwrap(),
        false,
    );
    assert_eq!(io::read_volume(&hp).unwrap().dims(), (4, 48, 48));
}

#[test]
fn a_pair_header_claiming_terabytes_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut hdr, img) = pair_phantom(d);
    // 32767^3 float64 voxels (2^48 bytes) promised by a 348-byte header, a small .img.
    common::pair::set_dims(&mut hdr, [3, 32767, 32767, 32767, 1, 1, 1, 1]);
    common::pair::set_datatype(&mut hdr, 64, 64);
    for (stem, gz) in [("tb", false), ("tbz", true)] {
        let wrap = |b: &[u8]| if gz { common::files::gz(b) } else { b.to_vec() };
        let ext = if gz { ".gz" } else { "" };
        let hp = d.join(format!("{stem}.hdr{ext}"));
        std::fs::write(&hp, wrap(&hdr)).unwrap();
        std::fs::write(d.join(format!("{stem}.img{ext}")), wrap(&img[..4096])).unwrap();
        let e = assert_terabyte_claim_refused(&hp, stem);
        assert_eq!(e.path(), hp.as_path());
    }
}
