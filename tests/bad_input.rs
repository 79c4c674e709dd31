//! Bad input of every kind (issue 3, item 7): each gives an `Err` whose one-line message
//! names the file and the problem, never a panic; the CLI exits with 1 (not 101) and says
//! the same on stderr; a failed write leaves no file behind.

mod common;
use common::rng::SplitMix64;

use ichcam::io::{self, nii, IoError, ReadOptions, Volume};
use ndarray::Array3;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ct-ich")
        .join(rel)
}

/// A valid 352-byte NIfTI-1 header (little-endian) for a small int16 volume.
fn header() -> Vec<u8> {
    let mut v = Volume::from_array(Array3::zeros((2, 3, 4)), [1.0; 3], "h".into());
    v.header.datatype = 4;
    v.header.bitpix = 16;
    nii::header_bytes(&v.header)
}

fn set_i16(b: &mut [u8], off: usize, v: i16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn set_dims(b: &mut [u8], dims: &[i16]) {
    set_i16(b, 40, dims.len() as i16);
    for k in 0..7 {
        set_i16(b, 42 + 2 * k, *dims.get(k).unwrap_or(&1));
    }
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A header plus `n` bytes of data.
fn with_data(mut h: Vec<u8>, n: usize) -> Vec<u8> {
    h.resize(h.len() + n, 7);
    h
}

/// Pseudo-random bytes (fixed seed).
fn random_bytes(n: usize) -> Vec<u8> {
    SplitMix64::new(0x9E37_79B9_7F4A_7C15).bytes(n)
}

/// Each bad file: name, bytes, a phrase the message must contain.
fn bad_files() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good_gz = std::fs::read(fixture("images/054.nii.gz")).unwrap();
    let mut out = vec![
        (
            "truncated.nii.gz",
            good_gz[..good_gz.len() / 2].to_vec(),
            "gzip",
        ),
        ("truncated_header.nii.gz", good_gz[..60].to_vec(), "gzip"),
        ("plain.nii.gz", with_data(header(), 48), "not a gzip stream"),
        ("random.nii", random_bytes(5000), "not a NIfTI-1 file"),
        ("random.nii.gz", random_bytes(5000), "not a gzip stream"),
        ("empty.nii", Vec::new(), "empty file"),
        ("empty.nii.gz", Vec::new(), "empty file"),
        (
            "short.nii",
            header()[..200].to_vec(),
            "shorter than the 348-byte",
        ),
        (
            "short.nii.gz",
            gz(&header()[..200]),
            "shorter than the 348-byte",
        ),
    ];
    let mut h = header();
    h[344..348].copy_from_slice(b"abc\0");
    out.push(("magic.nii", with_data(h, 48), "wrong magic"));
    let mut h = header();
    h[344..348].copy_from_slice(b"ni1\0");
    out.push(("pair.nii", with_data(h, 48), ".hdr/.img pair"));
    let mut h = header();
    set_dims(&mut h, &[4, -3, 2]);
    out.push(("negative_dim.nii", with_data(h, 48), "must be positive"));
    let mut h = header();
    set_dims(&mut h, &[4, 0, 2]);
    out.push(("zero_dim.nii", with_data(h, 48), "must be positive"));
    let mut h = header();
    set_i16(&mut h, 40, 0);
    out.push(("zero_ndim.nii", with_data(h, 48), "number of dimensions"));
    let mut h = header();
    set_i16(&mut h, 40, 9);
    out.push(("ndim9.nii", with_data(h, 48), "number of dimensions"));
    let mut h = header();
    set_dims(&mut h, &[512, 512, 300]);
    out.push(("claims_more.nii", with_data(h.clone(), 1000), "holds only"));
    out.push((
        "claims_more.nii.gz",
        gz(&with_data(h, 1000)),
        "cannot hold that much",
    ));
    let mut h = header();
    set_dims(&mut h, &[512, 512, 40]);
    // 20 MB claimed, 1 MB present: passes the gzip ratio bound, found short while reading.
    let mut body = h;
    body.extend(random_bytes(1 << 20));
    out.push(("claims_more_stream.nii.gz", gz(&body), "holds only"));
    let mut h = header();
    set_dims(&mut h, &[30000, 30000, 30000]);
    set_i16(&mut h, 70, 64);
    out.push((
        "huge.nii",
        with_data(h.clone(), 100),
        "over the 4.0 GiB cap",
    ));
    out.push(("huge.nii.gz", gz(&with_data(h, 100)), "header claims"));
    let mut h = header();
    set_dims(&mut h, &[4, 3, 2, 1, 2]);
    out.push(("five_d.nii", with_data(h, 200), "5-D data"));
    let mut h = header();
    set_dims(&mut h, &[4, 3, 2, 3]);
    out.push(("four_d.nii", with_data(h, 200), "4-D image with 3 volumes"));
    for (name, code) in [
        ("complex64.nii", 32i16),
        ("complex128.nii", 1792),
        ("complex256.nii", 2048),
    ] {
        let mut h = header();
        set_i16(&mut h, 70, code);
        out.push((name, with_data(h, 800), "complex datatype"));
    }
    let mut h = header();
    set_i16(&mut h, 70, 128);
    out.push(("rgb.nii", with_data(h, 100), "RGB datatype"));
    let mut h = header();
    set_i16(&mut h, 70, 99);
    out.push(("unknown_type.nii", with_data(h, 100), "unknown datatype"));
    let mut h = header();
    h[108..112].copy_from_slice(&1.0e6f32.to_le_bytes());
    out.push(("offset.nii", with_data(h.clone(), 48), "past the end"));
    out.push(("offset.nii.gz", gz(&with_data(h, 48)), "past the end"));
    let mut h = header();
    h[108..112].copy_from_slice(&f32::NAN.to_le_bytes());
    out.push(("nan_offset.nii", with_data(h, 48), "invalid vox_offset"));
    let mut h = header();
    h[0..4].copy_from_slice(&540i32.to_le_bytes());
    out.push(("nifti2.nii", with_data(h, 600), "NIfTI-2"));
    out
}

#[test]
fn every_bad_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, phrase) in bad_files() {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        let e = match io::read_volume(&p) {
            Ok(v) => panic!("{name}: read a {:?} volume from a bad file", v.dims()),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()),
            "{name}: message does not name the file: {msg}"
        );
        assert!(
            msg.contains(phrase),
            "{name}: expected {phrase:?} in: {msg}"
        );
        assert!(!msg.contains('\n'), "{name}: not one line: {msg}");
        assert_eq!(e.path(), p.as_path());
        // The header-only reader agrees on header problems and never panics.
        let _ = nii::read_header(&p);
    }
}

#[test]
fn memory_cap_is_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // A real volume under a small cap: refused from the header alone.
    let e = io::read_volume_with(
        &fixture("images/054.nii.gz"),
        &ReadOptions {
            max_bytes: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap_err();
    match &e {
        // The f32 voxels plus one 1 MiB block of raw bytes being decoded.
        IoError::TooLarge { bytes, .. } => assert_eq!(*bytes, 33 * 512 * 512 * 4 + (1 << 20)),
        other => panic!("expected TooLarge, got {other}"),
    }
    assert!(
        e.to_string()
            .contains("header claims 512x512x33 voxels of uint8")
            && e.to_string().contains("34.0 MiB"),
        "{e}"
    );
    // 32767^3 float64 voxels: 2^48 bytes claimed, answered at once.
    let mut h = header();
    set_dims(&mut h, &[32767, 32767, 32767]);
    set_i16(&mut h, 70, 64);
    let p = dir.path().join("max.nii");
    std::fs::write(&p, with_data(h, 16)).unwrap();
    let t = std::time::Instant::now();
    let e = io::read_volume(&p).unwrap_err();
    assert!(matches!(e, IoError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("TiB"), "{e}");
    assert!(t.elapsed().as_secs_f64() < 1.0);
    // The same cap applies to DICOM folders.
    let s = dir.path().join("series");
    io::dicom::write_series(
        &s,
        &Volume::from_array(Array3::zeros((4, 64, 64)), [1.0; 3], "x".into()),
    )
    .unwrap();
    let e = io::read_volume_with(
        &s,
        &ReadOptions {
            max_bytes: 1000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, IoError::TooLarge { .. }), "{e}");
}

#[test]
fn missing_file_and_empty_folder_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.nii.gz");
    let e = io::read_volume(&p).unwrap_err().to_string();
    assert!(
        e.contains("nope.nii.gz") && e.contains("cannot read"),
        "{e}"
    );
    let e = io::read_volume(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("empty folder") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

#[test]
fn image_mask_shape_mismatch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = io::read_volume(&fixture("images/054.nii.gz")).unwrap();
    let small = Volume::from_array(Array3::zeros((33, 256, 256)), [5.0, 1.0, 1.0], "m".into());
    let mp = dir.path().join("mask.nii.gz");
    io::write_map(&mp, &small.data, &small).unwrap();
    let mask = io::read_mask(&mp).unwrap();
    let e = io::check_same_shape(&img, &mp, &mask).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("mask.nii.gz") && msg.contains("054.nii.gz"),
        "{msg}"
    );
    assert!(
        msg.contains("[33, 256, 256]") && msg.contains("[33, 512, 512]"),
        "{msg}"
    );
    io::check_same_shape(
        &img,
        &fixture("labels/054.nii.gz"),
        &io::read_mask(&fixture("labels/054.nii.gz")).unwrap(),
    )
    .unwrap();
}

#[test]
fn failed_writes_leave_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub/out.nii.gz");
    // A writer that fails halfway: neither the file nor a temp file remains.
    let e = io::atomic::write_atomic(&out, |w| {
        use std::io::Write;
        w.write_all(&[1u8; 100_000])?;
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("out.nii.gz") && e.to_string().contains("disk full"),
        "{e}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
        0
    );
    // An existing file survives a failed overwrite unchanged.
    std::fs::write(&out, b"old").unwrap();
    let _ = io::atomic::write_atomic(&out, |_| Err(std::io::Error::other("boom")));
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(
        std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
        1
    );
    // Writing onto a folder fails without creating anything.
    let v = Volume::from_array(Array3::zeros((2, 2, 2)), [1.0; 3], "x".into());
    let folder = dir.path().join("folder.nii");
    std::fs::create_dir(&folder).unwrap();
    assert!(io::write_volume(&folder, &v).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    // A PNG with the wrong buffer size is refused before anything is written.
    let png = dir.path().join("x.png");
    assert!(io::png::write_rgb(&png, 4, 4, &[0; 10]).is_err());
    assert!(!png.exists());
}

#[test]
fn cli_inspect_exits_1_with_the_problem_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, phrase) in bad_files() {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        let out = common::bin().arg("inspect").arg(&p).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: exit {:?}, stderr: {stderr}",
            out.status.code()
        );
        assert!(
            stderr.contains(name) && stderr.contains(phrase),
            "{name}: stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    let empty = dir.path().join("empty_folder");
    std::fs::create_dir(&empty).unwrap();
    let out = common::bin().arg("inspect").arg(&empty).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty folder"));
    let out = common::bin()
        .arg("inspect")
        .arg(dir.path().join("missing.nii"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.nii"));
}

#[test]
fn cli_inspect_describes_a_volume_a_series_and_a_dataset() {
    let out = common::bin()
        .arg("inspect")
        .arg(fixture("images/054.nii.gz"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "512 x 512 x 33",
        "0.5 x 0.5 x 5",
        "RAS",
        "uint8",
        "min -20.0",
        "max 100.0",
        "p50",
        "NaN/Inf      0",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
    let dir = tempfile::tempdir().unwrap();
    let v = io::read_volume(&fixture("images/054.nii.gz")).unwrap();
    let small = Volume::from_array(
        v.data.slice(ndarray::s![..4, ..64, ..64]).to_owned(),
        [5.0, 0.5, 0.5],
        "s".into(),
    );
    io::dicom::write_series(dir.path(), &small).unwrap();
    let out = common::bin()
        .arg("inspect")
        .arg(dir.path())
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && s.contains("DICOM") && s.contains("64 x 64 x 4"),
        "{s}"
    );
    let out = common::bin()
        .arg("inspect")
        .arg(fixture(""))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("33") && s.contains('1'), "{s}");
}

#[test]
fn gz_vox_offset_past_the_end_found_while_reading() {
    // An offset the gzip ratio bound allows but the stream does not reach.
    let dir = tempfile::tempdir().unwrap();
    let mut h = header();
    h[108..112].copy_from_slice(&20000.0f32.to_le_bytes());
    let mut body = h;
    body.extend(random_bytes(100));
    let p = dir.path().join("offset_stream.nii.gz");
    std::fs::write(&p, gz(&body)).unwrap();
    let e = io::read_volume(&p).unwrap_err().to_string();
    assert!(
        e.contains("offset_stream.nii.gz")
            && e.contains("vox_offset 20000 is past the end of the data"),
        "{e}"
    );
}
