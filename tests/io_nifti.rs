//! NIfTI reading and writing: the real fixture volume, geometry preservation of every
//! writer, every datatype (files written by the nifti crate, read by ichcam, and the other
//! way round), scaling, byte order, 4-D singleton, 2-D, and NaN/Inf replacement; NIfTI-2
//! (files written by nibabel, and by hand in [`common::nifti2`]) read as the same volume
//! written as NIfTI-1, with outputs that overlay it; `.hdr`/`.img` pairs (written by nibabel
//! in tests/fixtures/nifti-pair, and split by hand in [`common::pair`]) read as nibabel's own
//! single files of the same data, are listed once in folders, and segment to NIfTI-1.

mod common;

use common::nifti2::{self, Nifti2};
use ichcam::io::{self, geometry, nii, DataType, Volume};
use ndarray::{Array, Array3, IxDyn};
use std::io::Read;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ct-ich")
        .join(rel)
}

/// The fields that place voxels in the world.
fn assert_same_geometry(a: &nifti::NiftiHeader, b: &nifti::NiftiHeader) {
    assert_eq!(a.dim[..4], b.dim[..4], "dims");
    assert_eq!(a.pixdim[..4], b.pixdim[..4], "pixdim");
    assert_eq!(
        (a.qform_code, a.sform_code),
        (b.qform_code, b.sform_code),
        "xform codes"
    );
    assert_eq!(
        [
            a.quatern_b,
            a.quatern_c,
            a.quatern_d,
            a.quatern_x,
            a.quatern_y,
            a.quatern_z
        ],
        [
            b.quatern_b,
            b.quatern_c,
            b.quatern_d,
            b.quatern_x,
            b.quatern_y,
            b.quatern_z
        ],
        "qform parameters"
    );
    assert_eq!(
        (a.srow_x, a.srow_y, a.srow_z),
        (b.srow_x, b.srow_y, b.srow_z),
        "sform rows"
    );
    assert_eq!(a.xyzt_units, b.xyzt_units, "units");
}

/// Decodes the fixture's raw bytes independently of ichcam's reader.
fn raw_fixture_bytes() -> Vec<u8> {
    let mut d =
        flate2::read::GzDecoder::new(std::fs::File::open(fixture("images/054.nii.gz")).unwrap());
    let mut b = Vec::new();
    d.read_to_end(&mut b).unwrap();
    b
}

#[test]
fn real_volume_reads_hu_and_geometry() {
    let (v, r) = io::read_volume_report(&fixture("images/054.nii.gz")).unwrap();
    assert_eq!(v.dims(), (33, 512, 512));
    assert_eq!(v.spacing, [5.0, 0.5, 0.5]);
    assert_eq!(r.datatype, "uint8");
    assert_eq!(r.nonfinite, 0);
    assert_eq!(v.orientation(), "RAS");
    // Every voxel is raw * 120/255 - 20 with x fastest in the file.
    let raw = raw_fixture_bytes();
    let slope = f32::from_le_bytes(raw[112..116].try_into().unwrap()) as f64;
    let inter = f32::from_le_bytes(raw[116..120].try_into().unwrap()) as f64;
    assert!((slope - 120.0 / 255.0).abs() < 1e-6 && inter == -20.0);
    let body = &raw[352..];
    assert_eq!(body.len(), 33 * 512 * 512);
    let mut checked = 0;
    for ((z, y, x), &hu) in v.data.indexed_iter() {
        let want = (body[(z * 512 + y) * 512 + x] as f64 * slope + inter) as f32;
        assert_eq!(hu, want, "voxel ({z},{y},{x})");
        checked += 1;
    }
    assert_eq!(checked, 33 * 512 * 512);
    let (lo, hi) = v
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(
        lo >= -20.0 - 1e-4 && hi <= 100.0 + 1e-3 && hi > 90.0,
        "{lo} {hi}"
    );
}

#[test]
fn real_volume_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let v = io::read_volume(&fixture("images/054.nii.gz")).unwrap();
    // f32 map: identical voxels and geometry.
    let p = dir.path().join("map.nii.gz");
    io::write_map(&p, &v.data, &v).unwrap();
    let back = io::read_volume(&p).unwrap();
    assert_eq!(back.data, v.data);
    assert_eq!(back.spacing, v.spacing);
    assert_same_geometry(&back.header, &v.header);
    assert_eq!(back.header.datatype, 16);
    // int16 HU: voxels rounded, geometry identical, slope 1 / inter 0.
    let p = dir.path().join("vol.nii");
    io::write_volume(&p, &v).unwrap();
    let back = io::read_volume(&p).unwrap();
    assert_eq!(back.data, v.data.mapv(f32::round));
    assert_same_geometry(&back.header, &v.header);
    assert_eq!(
        (
            back.header.datatype,
            back.header.scl_slope,
            back.header.scl_inter
        ),
        (4, 1.0, 0.0)
    );
    // Writing what was read back again is lossless.
    let p2 = dir.path().join("vol2.nii.gz");
    io::write_volume(&p2, &back).unwrap();
    assert_eq!(io::read_volume(&p2).unwrap().data, back.data);
}

#[test]
fn mask_and_map_keep_the_input_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let v = io::read_volume(&fixture("images/054.nii.gz")).unwrap();
    let label = io::read_mask(&fixture("labels/054.nii.gz")).unwrap();
    io::check_same_shape(&v, &fixture("labels/054.nii.gz"), &label).unwrap();
    assert_same_geometry(&label.header, &v.header);
    // A mask with a blob: read back bit for bit, as uint8, with the image geometry.
    let mut mask = io::to_mask(&label);
    assert!(mask.iter().all(|&m| m == 0), "054 has no hemorrhage");
    mask.slice_mut(ndarray::s![10..14, 200..260, 300..330])
        .fill(1);
    let p = dir.path().join("out/mask.nii.gz");
    io::write_mask(&p, &mask, &v).unwrap();
    let back = io::read_mask(&p).unwrap();
    assert_eq!(back.header.datatype, 2);
    assert_same_geometry(&back.header, &v.header);
    assert_eq!(io::to_mask(&back), mask);
    let p = dir.path().join("cam.nii");
    let cam = v.data.mapv(|x| x / 100.0);
    io::write_map(&p, &cam, &v).unwrap();
    let back = io::read_volume(&p).unwrap();
    assert_same_geometry(&back.header, &v.header);
    assert_eq!(back.data, cam);
    // The nifti crate reads our output the same way (independent reader).
    let obj = nifti::ReaderOptions::new().read_file(&p).unwrap();
    use nifti::{IntoNdArray, NiftiObject};
    let arr = obj.into_volume().into_ndarray::<f32>().unwrap();
    assert_eq!(arr.shape(), &[512, 512, 33]);
    assert_eq!(arr[[300, 200, 10]], cam[[10, 200, 300]]);
    assert_eq!(arr[[7, 500, 32]], cam[[32, 500, 7]]);
}

#[test]
fn shape_mismatch_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let v = Volume::from_array(Array3::zeros((4, 5, 6)), [2.0, 1.0, 1.0], "img.nii".into());
    let p = dir.path().join("mask.nii.gz");
    let e = io::write_mask(&p, &Array3::zeros((4, 5, 7)), &v).unwrap_err();
    assert!(
        e.to_string().contains("mask.nii.gz") && e.to_string().contains("img.nii"),
        "{e}"
    );
    assert!(!p.exists());
    let e = io::write_map(&p, &Array3::zeros((3, 5, 6)), &v).unwrap_err();
    assert!(matches!(e, io::IoError::ShapeMismatch { .. }), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Values that fit every type, distinct per voxel, in nifti's `[x, y, z]` order.
fn xyz_values(nx: usize, ny: usize, nz: usize, signed: bool) -> Array<f64, IxDyn> {
    Array::from_shape_fn(IxDyn(&[nx, ny, nz]), |i| {
        let v = (i[0] + 3 * i[1] + 11 * i[2]) as f64;
        if signed && (i[0] + i[2]) % 2 == 1 {
            -v
        } else {
            v
        }
    })
}

fn check_zyx(v: &Volume, want: &Array<f64, IxDyn>, slope: f64, inter: f64) {
    let s = want.shape();
    let (nx, ny, nz) = (
        s[0],
        s.get(1).copied().unwrap_or(1),
        s.get(2).copied().unwrap_or(1),
    );
    assert_eq!(v.dims(), (nz, ny, nx));
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let idx: Vec<usize> = [x, y, z][..s.len().min(3)].to_vec();
                let mut idx = idx;
                idx.resize(s.len(), 0);
                let w = (want[IxDyn(&idx)] * slope + inter) as f32;
                assert_eq!(v.data[[z, y, x]], w, "({z},{y},{x})");
            }
        }
    }
}

macro_rules! nifti_crate_writes {
    ($name:ident, $t:ty, $signed:expr, $code:expr) => {
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let want = xyz_values(5, 4, 3, $signed);
            let arr = want.mapv(|v| v as $t);
            for (file, big) in [("a.nii", false), ("b.nii.gz", false), ("c.nii", true)] {
                let p = dir.path().join(file);
                let mut hdr = nifti::NiftiHeader::default();
                hdr.pixdim = [1.0, 0.7, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0];
                hdr.endianness = if big {
                    nifti::Endianness::Big
                } else {
                    nifti::Endianness::Little
                };
                nifti::writer::WriterOptions::new(&p)
                    .reference_header(&hdr)
                    .write_nifti(&arr)
                    .unwrap();
                if big {
                    let b = std::fs::read(&p).unwrap();
                    assert_eq!(
                        i32::from_be_bytes(b[..4].try_into().unwrap()),
                        348,
                        "big-endian file"
                    );
                }
                let (v, r) = io::read_volume_report(&p).unwrap();
                assert_eq!(v.header.datatype, $code);
                assert_eq!(r.datatype, DataType::from_code($code).unwrap().name());
                assert_eq!(v.spacing, [2.5, 0.800000011920929, 0.699999988079071]);
                check_zyx(&v, &want, 1.0, 0.0);
            }
            // And ichcam writes the same type so that the nifti crate reads it back.
            let zyx = want
                .clone()
                .into_dimensionality::<ndarray::Ix3>()
                .unwrap()
                .permuted_axes([2, 1, 0])
                .to_owned();
            let like = Volume::from_array(Array3::zeros(zyx.dim()), [2.5, 0.8, 0.7], "like".into());
            let p = dir.path().join("ours.nii.gz");
            nii::write_typed(
                &p,
                &zyx,
                DataType::from_code($code).unwrap(),
                1.0,
                0.0,
                &like.header,
            )
            .unwrap();
            use nifti::{IntoNdArray, NiftiObject};
            let obj = nifti::ReaderOptions::new().read_file(&p).unwrap();
            assert_eq!(obj.header().datatype, $code);
            let back = obj.into_volume().into_ndarray::<f64>().unwrap();
            assert_eq!(back, want);
        }
    };
}

nifti_crate_writes!(dtype_u8, u8, false, 2);
nifti_crate_writes!(dtype_i8, i8, true, 256);
nifti_crate_writes!(dtype_i16, i16, true, 4);
nifti_crate_writes!(dtype_u16, u16, false, 512);
nifti_crate_writes!(dtype_i32, i32, true, 8);
nifti_crate_writes!(dtype_u32, u32, false, 768);
nifti_crate_writes!(dtype_i64, i64, true, 1024);
nifti_crate_writes!(dtype_u64, u64, false, 1280);
nifti_crate_writes!(dtype_f32, f32, true, 16);
nifti_crate_writes!(dtype_f64, f64, true, 64);

#[test]
fn slope_and_intercept_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let want = xyz_values(6, 5, 4, true);
    let zyx = want
        .clone()
        .into_dimensionality::<ndarray::Ix3>()
        .unwrap()
        .permuted_axes([2, 1, 0])
        .to_owned();
    let like = Volume::from_array(Array3::zeros(zyx.dim()), [1.0, 1.0, 1.0], "like".into());
    for (dt, slope, inter) in [
        (DataType::I16, 2.0f32, -1024.0f32),
        (DataType::U8, 0.5, 3.0),
        (DataType::F32, 0.0, 7.0),
    ] {
        let stored = if dt == DataType::U8 {
            want.mapv(f64::abs)
        } else {
            want.clone()
        };
        let z = stored
            .clone()
            .into_dimensionality::<ndarray::Ix3>()
            .unwrap()
            .permuted_axes([2, 1, 0])
            .to_owned();
        let p = dir.path().join(format!("s{}.nii.gz", dt.name()));
        nii::write_typed(&p, &z, dt, slope, inter, &like.header).unwrap();
        let v = io::read_volume(&p).unwrap();
        // Slope 0 means "no scaling" (the intercept is ignored too).
        let (s, i) = if slope == 0.0 {
            (1.0, 0.0)
        } else {
            (slope as f64, inter as f64)
        };
        check_zyx(&v, &stored, s, i);
    }
}

#[test]
fn four_d_singleton_and_two_d_images_are_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.nii.gz");
    let a4 = Array::from_shape_fn(IxDyn(&[4, 3, 2, 1]), |i| {
        (i[0] + 10 * i[1] + 100 * i[2]) as i16
    });
    nifti::writer::WriterOptions::new(&p)
        .write_nifti(&a4)
        .unwrap();
    let v = io::read_volume(&p).unwrap();
    assert_eq!(v.dims(), (2, 3, 4));
    assert_eq!(v.data[[1, 2, 3]], 123.0);
    // Writing keeps the 4-D header's dims.
    let q = dir.path().join("t_mask.nii");
    io::write_mask(&q, &io::to_mask(&v), &v).unwrap();
    let back = io::read_mask(&q).unwrap();
    assert_eq!(back.header.dim[..5], [4, 4, 3, 2, 1]);

    let a2 = Array::from_shape_fn(IxDyn(&[7, 5]), |i| (i[0] + 10 * i[1]) as f32);
    let p = dir.path().join("slice.nii");
    nifti::writer::WriterOptions::new(&p)
        .write_nifti(&a2)
        .unwrap();
    let v = io::read_volume(&p).unwrap();
    assert_eq!(v.dims(), (1, 5, 7));
    assert_eq!(v.data[[0, 4, 6]], 46.0);
    let q = dir.path().join("slice_map.nii.gz");
    io::write_map(&q, &v.data, &v).unwrap();
    let back = io::read_volume(&q).unwrap();
    assert_eq!(back.data, v.data);
    assert_eq!(back.header.dim[0], 2);
}

#[test]
fn nan_and_inf_are_counted_and_replaced_with_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = Array3::from_shape_fn((3, 4, 5), |(z, y, x)| (z * 20 + y * 5 + x) as f32 - 7.0);
    data[[0, 0, 1]] = f32::NAN;
    data[[2, 3, 4]] = f32::INFINITY;
    data[[1, 1, 1]] = f32::NEG_INFINITY;
    let v = Volume::from_array(data.clone(), [1.0; 3], "x".into());
    let p = dir.path().join("nan.nii");
    io::write_map(&p, &data, &v).unwrap();
    let (back, r) = io::read_volume_report(&p).unwrap();
    assert_eq!(r.nonfinite, 3);
    assert_eq!(r.fill, -7.0);
    assert!(back.data.iter().all(|x| x.is_finite()));
    assert_eq!(back.data[[0, 0, 1]], -7.0);
    assert_eq!(back.data[[2, 3, 4]], -7.0);
    assert_eq!(back.data[[1, 1, 1]], -7.0);
    assert_eq!(back.data[[1, 2, 3]], data[[1, 2, 3]]);
    let w = io::report_warnings(&p, &r);
    assert!(
        w.len() == 1 && w[0].contains("3 NaN/Inf") && w[0].contains("nan.nii"),
        "{w:?}"
    );
}

#[test]
fn from_array_header_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let data = Array3::from_shape_fn((6, 7, 8), |(z, y, x)| (z + y + x) as f32);
    let v = Volume::from_array(data.clone(), [5.0, 0.45, 0.5], "phantom".into());
    assert_eq!(v.spacing, [5.0, 0.45, 0.5]);
    assert_eq!(v.orientation(), "RAS");
    assert_eq!(
        (
            v.header.sform_code,
            v.header.qform_code,
            v.header.xyzt_units
        ),
        (1, 1, 2)
    );
    let a = v.affine();
    let q = ichcam::io::geometry::qform_affine(&v.header);
    for r in 0..3 {
        for c in 0..4 {
            assert!((a[r][c] - q[r][c]).abs() < 1e-5, "sform and qform disagree");
        }
    }
    // Centred on the origin.
    for r in 0..3 {
        let n = [8.0, 7.0, 6.0][r];
        assert!((a[r][3] + a[r][r] * (n - 1.0) / 2.0).abs() < 1e-5);
    }
    let p = dir.path().join("ph.nii.gz");
    io::write_volume(&p, &v).unwrap();
    let back = io::read_volume(&p).unwrap();
    assert_eq!(back.data, data);
    assert!((back.spacing[1] - 0.45).abs() < 1e-6);
    assert_same_geometry(&back.header, &v.header);
}

#[test]
fn write_volume_rounds_and_clamps_to_int16() {
    let dir = tempfile::tempdir().unwrap();
    let data = ndarray::arr3(&[[[1.4f32, 1.6, -2.5, 40000.0, -40000.0, 0.0]]]);
    let v = Volume::from_array(data, [1.0; 3], "x".into());
    let p = dir.path().join("c.nii");
    io::write_volume(&p, &v).unwrap();
    let back = io::read_volume(&p).unwrap();
    assert_eq!(
        back.data.iter().copied().collect::<Vec<_>>(),
        vec![1.0, 2.0, -3.0, 32767.0, -32768.0, 0.0]
    );
}

fn nifti2_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nifti2")
        .join(name)
}

fn assert_affine_near(got: &geometry::Affine, want: &geometry::Affine, tol: f64, what: &str) {
    for r in 0..3 {
        for c in 0..4 {
            assert!(
                (got[r][c] - want[r][c]).abs() <= tol,
                "{what}: [{r}][{c}] {got:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn nifti2_files_written_by_nibabel_read_with_their_voxels_and_geometry() {
    // tests/fixtures/nifti2/make.py: stored x + 10y + 100z - 50 (int16), slope 2, inter
    // -1024, this oblique sform and qform (code 1), mm.
    let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
    let want: geometry::Affine = [
        [0.5 * c, -0.5 * s, 0.0, 10.25],
        [0.5 * s, 0.5 * c, 0.0, -20.5],
        [0.0, 0.0, 2.5, 30.0],
    ];
    let mut first: Option<Volume> = None;
    for name in ["le.nii", "le.nii.gz", "be.nii"] {
        let p = nifti2_fixture(name);
        let (v, r) = io::read_volume_report(&p).unwrap();
        assert_eq!(v.dims(), (3, 4, 5), "{name}");
        assert_eq!((r.datatype.as_str(), r.nonfinite), ("int16", 0), "{name}");
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        for ((z, y, x), &hu) in v.data.indexed_iter() {
            let raw = (x + 10 * y + 100 * z) as f64 - 50.0;
            assert_eq!(hu, (raw * 2.0 - 1024.0) as f32, "{name} ({z},{y},{x})");
        }
        assert_eq!(v.spacing, [2.5, 0.5, 0.5], "{name}");
        let h = &v.header;
        assert_eq!(h.sizeof_hdr, 540, "{name}");
        assert_eq!(
            (h.sform_code, h.qform_code, h.xyzt_units),
            (1, 1, 2),
            "{name}"
        );
        assert_eq!(h.dim, [3, 5, 4, 3, 1, 1, 1, 1], "{name}");
        // f64 geometry held at f32 precision.
        assert_affine_near(&v.affine(), &want, 1e-6, name);
        assert_affine_near(&geometry::qform_affine(h), &want, 1e-5, name);
        assert_eq!(v.orientation(), "RAS", "{name}");
        assert_eq!(io::probe_dims(&p).unwrap(), (3, 4, 5), "{name}");
        match &first {
            None => first = Some(v),
            Some(f) => {
                assert_eq!(f.data, v.data, "{name}");
                assert_same_geometry(&f.header, &v.header);
            }
        }
    }
    // `inspect` names the format.
    let d = io::inspect::describe(&nifti2_fixture("be.nii")).unwrap();
    assert!(
        d.contains("format       NIfTI-2\n") && d.contains("(scl_slope 2, scl_inter -1024)"),
        "{d}"
    );
    let d = io::inspect::describe(&fixture("images/054.nii.gz")).unwrap();
    assert!(d.contains("format       NIfTI-1\n"), "{d}");
}

/// A header with an oblique sform and qform (different codes), mm, a description: the
/// geometry a NIfTI-2 copy must keep.
fn oblique_header(zyx: (usize, usize, usize)) -> nifti::NiftiHeader {
    let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
    let aff: geometry::Affine = [
        [0.45 * c, -0.5 * s, 0.0, 12.5],
        [0.45 * s, 0.5 * c, 0.0, -7.25],
        [0.0, 0.0, -2.5, 40.0],
    ];
    let mut h = Volume::from_array(Array3::zeros(zyx), [1.0; 3], "like".into()).header;
    geometry::set_qform(&mut h, &aff, 1);
    geometry::set_sform(&mut h, &aff, 2);
    h.descrip[..11].copy_from_slice(b"nifti2 test");
    h
}

#[test]
fn nifti2_reads_as_the_same_volume_written_as_nifti1() {
    let dir = tempfile::tempdir().unwrap();
    let want = xyz_values(6, 5, 4, true);
    let like = oblique_header((4, 5, 6));
    let mut checked = 0;
    for (dt, slope, inter) in [
        (DataType::U8, 0.5f32, 3.0f32),
        (DataType::I8, 1.0, 0.0),
        (DataType::I16, 2.0, -1024.0),
        (DataType::U16, 1.0, 0.0),
        (DataType::I32, 0.25, 0.0),
        (DataType::U64, 1.0, -1.0),
        (DataType::F32, 0.0, 7.0),
        (DataType::F64, 1.5, -2.0),
    ] {
        let signed = !matches!(dt, DataType::U8 | DataType::U16 | DataType::U64);
        let stored = if signed {
            want.clone()
        } else {
            want.mapv(f64::abs)
        };
        let zyx = stored
            .clone()
            .into_dimensionality::<ndarray::Ix3>()
            .unwrap()
            .permuted_axes([2, 1, 0])
            .to_owned();
        let p1 = dir.path().join(format!("v1_{}.nii", dt.name()));
        nii::write_typed(&p1, &zyx, dt, slope, inter, &like).unwrap();
        let (v1, r1) = io::read_volume_report(&p1).unwrap();
        let b1 = std::fs::read(&p1).unwrap();
        for (big, gz) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("{} big {big} gz {gz}", dt.name());
            let b2 = nifti2::from_nifti1_file(&b1, big);
            let size = if big {
                i32::from_be_bytes(b2[..4].try_into().unwrap())
            } else {
                i32::from_le_bytes(b2[..4].try_into().unwrap())
            };
            assert_eq!(size, 540, "{what}");
            let p2 = dir.path().join(format!(
                "v2_{}_{big}.nii{}",
                dt.name(),
                if gz { ".gz" } else { "" }
            ));
            std::fs::write(&p2, if gz { common::files::gz(&b2) } else { b2 }).unwrap();
            let (v2, r2) = io::read_volume_report(&p2).unwrap();
            assert_eq!(v2.data, v1.data, "{what}");
            assert_eq!(v2.spacing, v1.spacing, "{what}");
            assert_eq!(v2.affine(), v1.affine(), "{what}");
            assert_same_geometry(&v2.header, &v1.header);
            assert_eq!(
                (
                    v2.header.sform_code,
                    v2.header.qform_code,
                    v2.header.pixdim[0]
                ),
                (2, 1, v1.header.pixdim[0]),
                "{what}"
            );
            assert_eq!(v2.header.descrip, v1.header.descrip, "{what}");
            assert_eq!(
                (v2.header.scl_slope, v2.header.scl_inter),
                (slope, inter),
                "{what}"
            );
            assert_eq!(
                (v2.header.sizeof_hdr, &v2.header.magic),
                (540, b"n+2\0"),
                "{what}"
            );
            assert_eq!((&r2.datatype, r2.nonfinite), (&r1.datatype, 0), "{what}");
            assert!(r2.warnings.is_empty(), "{what}: {:?}", r2.warnings);
            // And the voxels are the stored values, scaled (slope 0: none).
            let (s, i) = if slope == 0.0 {
                (1.0, 0.0)
            } else {
                (slope as f64, inter as f64)
            };
            check_zyx(&v2, &stored, s, i);
            checked += 1;
        }
    }
    assert_eq!(checked, 32);
}

#[test]
fn nifti2_four_d_with_one_volume_and_its_outputs_overlay_it() {
    let dir = tempfile::tempdir().unwrap();
    // By hand: f64 geometry that f32 cannot hold exactly, int16 voxels, 4-D with one volume.
    let (nx, ny, nz) = (6usize, 5usize, 4usize);
    let mut h = Nifti2::from_nifti1(&nifti::NiftiHeader::default());
    h.datatype = 4;
    h.bitpix = 16;
    h.dim = [4, nx as i64, ny as i64, nz as i64, 1, 1, 1, 1];
    h.pixdim = [-1.0, 0.7, 0.7, 3.3, 2.1, 1.0, 1.0, 1.0];
    h.xyzt_units = 2 | 8;
    h.qform_code = 1;
    h.quatern = [0.1, -0.2, 0.3, 101.1, -99.9, 33.3];
    h.sform_code = 1;
    h.srow = [
        [-0.7, 0.01, 0.0, 101.1],
        [0.02, -0.7, 0.1, -99.9],
        [0.0, -0.03, 3.3, 33.3],
    ];
    h.scl_slope = 1.0;
    let raw: Vec<i16> = (0..nx * ny * nz).map(|i| i as i16 * 7 - 100).collect();
    let body: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
    for big in [false, true] {
        let p = dir.path().join(format!("four_{big}.nii"));
        std::fs::write(&p, h.file(big, &body)).unwrap();
        let v = io::read_volume(&p).unwrap();
        assert_eq!(v.dims(), (nz, ny, nx));
        assert_eq!(v.data.iter().copied().collect::<Vec<f32>>(), {
            raw.iter().map(|&r| r as f32).collect::<Vec<f32>>()
        });
        // Every f64 rounded to f32, as a NIfTI-1 file would hold it.
        assert_eq!(v.spacing, [3.3f32 as f64, 0.7f32 as f64, 0.7f32 as f64]);
        assert_eq!(v.header.dim, [4, 6, 5, 4, 1, 1, 1, 1]);
        assert_eq!(
            v.header.pixdim,
            [-1.0, 0.7, 0.7, 3.3, 2.1, 1.0, 1.0, 1.0].map(|x: f64| x as f32)
        );
        assert_eq!(
            [v.header.srow_x, v.header.srow_y, v.header.srow_z],
            h.srow.map(|r| r.map(|x| x as f32))
        );
        assert_eq!(
            [
                v.header.quatern_b,
                v.header.quatern_c,
                v.header.quatern_d,
                v.header.quatern_x,
                v.header.quatern_y,
                v.header.quatern_z
            ],
            h.quatern.map(|x| x as f32)
        );
        assert_eq!(v.header.xyzt_units, 10);
        // Outputs: NIfTI-1 with the input's geometry, 4-D dims kept.
        let mut mask = Array3::<u8>::zeros((nz, ny, nx));
        mask.slice_mut(ndarray::s![1..3, 2..4, 1..5]).fill(1);
        let mp = dir.path().join(format!("out_{big}/mask.nii.gz"));
        io::write_mask(&mp, &mask, &v).unwrap();
        let cp = dir.path().join(format!("out_{big}/cam.nii"));
        let cam = v.data.mapv(|x| x / 100.0);
        io::write_map(&cp, &cam, &v).unwrap();
        for (q, dt) in [(&mp, 2), (&cp, 16)] {
            let back = io::read_volume(q).unwrap();
            assert_eq!(back.header.sizeof_hdr, 348, "{}", q.display());
            assert_eq!(back.header.magic, *b"n+1\0");
            assert_eq!(back.header.datatype, dt);
            assert_eq!(back.header.dim[..5], [4, 6, 5, 4, 1]);
            assert_same_geometry(&back.header, &v.header);
            assert_eq!(back.header.pixdim, v.header.pixdim);
            assert_eq!(back.affine(), v.affine());
            assert_eq!(back.spacing, v.spacing);
            assert_eq!(back.orientation(), v.orientation());
        }
        assert_eq!(io::to_mask(&io::read_mask(&mp).unwrap()), mask);
        assert_eq!(io::read_volume(&cp).unwrap().data, cam);
        // The nifti crate (an independent reader) sees the same geometry in the mask.
        use nifti::NiftiObject;
        let obj = nifti::ReaderOptions::new().read_file(&mp).unwrap();
        let oh = obj.header();
        assert_eq!(oh.dim[..5], [4, 6, 5, 4, 1]);
        assert_eq!(
            (oh.srow_x, oh.srow_y, oh.srow_z, oh.pixdim),
            (
                v.header.srow_x,
                v.header.srow_y,
                v.header.srow_z,
                v.header.pixdim
            )
        );
    }
}

#[test]
fn nifti2_warnings_and_nan_voxels_are_those_of_nifti1() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = Array3::from_shape_fn((3, 4, 5), |(z, y, x)| (z * 20 + y * 5 + x) as f32 - 7.0);
    data[[0, 0, 1]] = f32::NAN;
    data[[2, 3, 4]] = f32::NEG_INFINITY;
    let mut v = Volume::from_array(data.clone(), [1.0; 3], "x".into());
    v.header.pixdim[1] = 40.0;
    let p1 = dir.path().join("w1.nii");
    io::write_map(&p1, &data, &v).unwrap();
    // bitpix contradicting the datatype: a warning.
    let mut b1 = std::fs::read(&p1).unwrap();
    b1[72..74].copy_from_slice(&8i16.to_le_bytes());
    std::fs::write(&p1, &b1).unwrap();
    let (v1, r1) = io::read_volume_report(&p1).unwrap();
    assert_eq!(r1.warnings.len(), 2, "{:?}", r1.warnings);
    for big in [false, true] {
        let p2 = dir.path().join(format!("w2_{big}.nii"));
        std::fs::write(&p2, nifti2::from_nifti1_file(&b1, big)).unwrap();
        let (v2, r2) = io::read_volume_report(&p2).unwrap();
        assert_eq!(v2.data, v1.data);
        assert_eq!((r2.nonfinite, r2.fill), (2, -7.0));
        let (w1, w2) = (
            io::report_warnings(&p1, &r1).join("\n"),
            io::report_warnings(&p2, &r2).join("\n"),
        );
        assert_eq!(
            w2,
            w1.replace(&p1.display().to_string(), &p2.display().to_string())
        );
    }
    // An implausible voxel size is the same error.
    let (mut h, body) = nifti2::parts_of_nifti1_file(&b1);
    h.pixdim[1] = 1e30;
    let p2 = dir.path().join("huge_pixdim.nii");
    std::fs::write(&p2, h.file(false, &body)).unwrap();
    let e = io::read_volume(&p2).unwrap_err().to_string();
    assert!(e.contains("pixdim[1]") && e.contains("plausible"), "{e}");
}

#[test]
fn segment_writes_nifti1_outputs_that_overlay_a_nifti2_input() {
    use common::files::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    // The phantom with an oblique geometry, as big-endian NIfTI-2.
    let mut v = common::files::phantom(4);
    v.header = oblique_header(v.dims());
    let p1 = dir.path().join("p1.nii");
    io::write_volume(&p1, &v).unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let p2 = input.join("head.nii.gz");
    let b2 = nifti2::from_nifti1_file(&std::fs::read(&p1).unwrap(), true);
    std::fs::write(&p2, common::files::gz(&b2)).unwrap();
    let v2 = io::read_volume(&p2).unwrap();
    assert_eq!(v2.header.sizeof_hdr, 540);
    let out = dir.path().join("out");
    let r = common::files::segment_cpu(&model, &input, &out, &[]);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    assert_eq!(common::files::check_outputs(&out), Ok(1));
    for name in ["mask.nii.gz", "cam.nii.gz"] {
        let back = io::read_volume(&out.join("head").join(name)).unwrap();
        assert_eq!(back.header.sizeof_hdr, 348, "{name}");
        assert_eq!(back.dims(), v2.dims(), "{name}");
        assert_same_geometry(&back.header, &v2.header);
        assert_eq!(back.affine(), v2.affine(), "{name}");
        assert_eq!(back.spacing, v2.spacing, "{name}");
    }
}

fn pair_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nifti-pair")
        .join(name)
}

#[test]
fn nifti_pairs_written_by_nibabel_read_as_nibabels_own_single_files() {
    // tests/fixtures/nifti-pair/make.py: stored x + 10y + 100z - 50 on the oblique AFFINE
    // of the NIfTI-2 fixtures; each pair beside nibabel's single file of the same data.
    let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
    let want_affine: geometry::Affine = [
        [0.5 * c, -0.5 * s, 0.0, 10.25],
        [0.5 * s, 0.5 * c, 0.0, -20.5],
        [0.0, 0.0, 2.5, 30.0],
    ];
    // (the pair's names, nibabel's single file, datatype, slope, intercept, format).
    type Case<'a> = (&'a [&'a str], &'a str, &'a str, f64, f64, &'a str);
    let cases: [Case; 4] = [
        (
            &["plain.hdr", "plain.img"],
            "plain.nii",
            "int16",
            1.0,
            0.0,
            "NIfTI-1 pair",
        ),
        (
            &["gz.hdr.gz", "gz.img.gz"],
            "gz.nii.gz",
            "int16",
            1.0,
            0.0,
            "NIfTI-1 pair",
        ),
        (
            &["scaled_be.hdr", "scaled_be.img"],
            "scaled_be.nii",
            "int16",
            2.0,
            -1024.0,
            "NIfTI-1 pair",
        ),
        (
            &["nifti2.hdr", "nifti2.img"],
            "nifti2.nii",
            "float32",
            0.5,
            0.0,
            "NIfTI-2 pair",
        ),
    ];
    for (names, single, dtype, slope, inter, format) in cases {
        let (want, wr) = io::read_volume_report(&pair_fixture(single)).unwrap();
        for name in names {
            let p = pair_fixture(name);
            let (v, r) = io::read_volume_report(&p).unwrap();
            assert_eq!(v.source, p, "{name}");
            assert_eq!(v.dims(), (3, 4, 5), "{name}");
            assert_eq!((r.datatype.as_str(), r.nonfinite), (dtype, 0), "{name}");
            assert_eq!(wr.datatype, r.datatype, "{name}");
            assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
            for ((z, y, x), &hu) in v.data.indexed_iter() {
                let raw = (x + 10 * y + 100 * z) as f64 - 50.0;
                assert_eq!(hu, (raw * slope + inter) as f32, "{name} ({z},{y},{x})");
            }
            assert_eq!(v.data, want.data, "{name}");
            assert_eq!(v.spacing, want.spacing, "{name}");
            assert_eq!(v.spacing, [2.5, 0.5, 0.5], "{name}");
            assert_eq!(v.affine(), want.affine(), "{name}");
            assert_affine_near(&v.affine(), &want_affine, 1e-6, name);
            assert_same_geometry(&v.header, &want.header);
            assert_eq!(v.orientation(), "RAS", "{name}");
            assert_eq!(
                (
                    v.header.sizeof_hdr,
                    v.header.sform_code,
                    v.header.qform_code
                ),
                (want.header.sizeof_hdr, 1, 1),
                "{name}"
            );
            assert_eq!(io::probe_dims(&p).unwrap(), (3, 4, 5), "{name}");
            let d = io::inspect::describe(&p).unwrap();
            assert!(
                d.contains(&format!("format       {format} (.hdr/.img)\n")),
                "{d}"
            );
            if slope != 1.0 && dtype == "int16" {
                assert!(d.contains("(scl_slope 2, scl_inter -1024)"), "{d}");
            }
        }
    }
    // Plain Analyze 7.5 (no NIfTI magic): refused, saying why, through either name.
    for name in ["analyze.hdr", "analyze.img"] {
        let e = io::read_volume(&pair_fixture(name)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, io::IoError::Invalid { .. }), "{msg}");
        assert_eq!(e.path(), pair_fixture("analyze.hdr"), "{msg}");
        assert!(
            msg.contains("Analyze 7.5") && msg.contains("orientation is undefined"),
            "{msg}"
        );
        let e = io::probe_dims(&pair_fixture(name)).unwrap_err().to_string();
        assert!(e.contains("Analyze 7.5"), "{e}");
    }
}

#[test]
fn a_pair_is_found_by_any_name_and_its_outputs_are_single_nifti1_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let want = io::read_volume(&pair_fixture("plain.nii")).unwrap();
    let hdr = std::fs::read(pair_fixture("plain.hdr")).unwrap();
    let img = std::fs::read(pair_fixture("plain.img")).unwrap();
    let gz = common::files::gz;
    // Upper case, and each file compressed or not independently of the other.
    let sets: [(&str, Vec<u8>, &str, Vec<u8>); 4] = [
        ("UP.HDR", hdr.clone(), "UP.IMG", img.clone()),
        ("a.hdr", hdr.clone(), "a.img.gz", gz(&img)),
        ("b.hdr.gz", gz(&hdr), "b.img", img.clone()),
        ("c.HDR.GZ", gz(&hdr), "c.IMG.GZ", gz(&img)),
    ];
    for (h, hb, i, ib) in &sets {
        std::fs::write(d.join(h), hb).unwrap();
        std::fs::write(d.join(i), ib).unwrap();
        for name in [h, i] {
            let v = io::read_volume(&d.join(name)).unwrap();
            assert_eq!(v.data, want.data, "{name}");
            assert_eq!(v.affine(), want.affine(), "{name}");
        }
    }
    // Outputs of a pair's volume: NIfTI-1 single files (magic n+1, voxels at 352) with its
    // geometry, read back by the nifti crate too.
    let v = io::read_volume(&d.join("a.hdr")).unwrap();
    assert_eq!(&v.header.magic, b"ni1\0");
    let mask = v.data.mapv(|x| u8::from(x > 0.0));
    let mp = d.join("out/mask.nii.gz");
    io::write_mask(&mp, &mask, &v).unwrap();
    let back = io::read_volume(&mp).unwrap();
    assert_eq!(
        (
            back.header.sizeof_hdr,
            &back.header.magic,
            back.header.vox_offset
        ),
        (348, b"n+1\0", 352.0)
    );
    assert_same_geometry(&back.header, &v.header);
    assert_eq!(back.affine(), v.affine());
    assert_eq!(io::to_mask(&back), mask);
    use nifti::NiftiObject;
    let obj = nifti::ReaderOptions::new().read_file(&mp).unwrap();
    assert_eq!(
        (obj.header().srow_x, obj.header().magic),
        (v.header.srow_x, *b"n+1\0")
    );
}

#[test]
fn folders_list_a_pair_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in [
        "plain.hdr",
        "plain.img",
        "gz.hdr.gz",
        "gz.img.gz",
        "plain.nii",
    ] {
        let to = if name == "plain.nii" {
            "single.nii"
        } else {
            name
        };
        std::fs::copy(pair_fixture(name), d.join(to)).unwrap();
    }
    // A lone .img (no header) is not a volume of its own either.
    std::fs::copy(pair_fixture("plain.img"), d.join("lone.img")).unwrap();
    let listed = ichcam::data::dataset::list_volumes(d, false).unwrap();
    let ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["gz", "plain", "single"]);
    assert_eq!(listed[0].1, d.join("gz.hdr.gz"));
    assert_eq!(listed[1].1, d.join("plain.hdr"));
    // A dataset folder of them, `segment`'s inputs and `eval`'s truth list them once too.
    let ds = ichcam::data::Dataset::open(d).unwrap();
    assert_eq!(ds.cases.len(), 3);
    let items = ichcam::infer::expand_inputs(&[d.to_path_buf()]).unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["gz", "plain", "single"]);
    let truth = ichcam::eval::dirs::list_truth(d).unwrap();
    assert_eq!(truth.len(), 3);
    assert_eq!(ichcam::eval::dirs::list_predictions(d).unwrap().len(), 3);
    assert_eq!(
        ichcam::eval::dirs::find_prediction(d, "plain"),
        Some(d.join("plain.hdr"))
    );
    // Named on its own, either file of a pair has the pair's id.
    for name in ["plain.img", "gz.img.gz", "plain.hdr"] {
        let items = ichcam::infer::expand_inputs(&[d.join(name)]).unwrap();
        assert_eq!(items[0].id, name.split('.').next().unwrap(), "{name}");
    }
}

#[test]
fn segment_on_a_pair_writes_nifti1_outputs_that_overlay_it() {
    use common::files::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    common::files::write_model(&model, 32);
    // The phantom with an oblique geometry, as a gzipped pair in a folder of inputs.
    let mut v = common::files::phantom(4);
    v.header = oblique_header(v.dims());
    let p1 = dir.path().join("p1.nii");
    io::write_volume(&p1, &v).unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let (hp, _) = common::pair::write_pair(&input, "head", &std::fs::read(&p1).unwrap(), true);
    let v2 = io::read_volume(&hp).unwrap();
    assert_eq!(v2.data, io::read_volume(&p1).unwrap().data);
    let out = dir.path().join("out");
    let r = common::files::segment_cpu(&model, &input, &out, &[]);
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.stderr);
    // One volume (the pair, not its .img besides), named by the pair's stem.
    assert_eq!(common::files::check_outputs(&out), Ok(1));
    for name in ["mask.nii.gz", "cam.nii.gz"] {
        let back = io::read_volume(&out.join("head").join(name)).unwrap();
        assert_eq!(
            (back.header.sizeof_hdr, &back.header.magic),
            (348, b"n+1\0"),
            "{name}"
        );
        assert_eq!(back.dims(), v2.dims(), "{name}");
        assert_same_geometry(&back.header, &v2.header);
        assert_eq!(back.affine(), v2.affine(), "{name}");
        assert_eq!(back.spacing, v2.spacing, "{name}");
    }
}
