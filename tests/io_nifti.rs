//! NIfTI reading and writing: the real fixture volume, geometry preservation of every
//! writer, every datatype (files written by the nifti crate, read by ichcam, and the other
//! way round), scaling, byte order, 4-D singleton, 2-D, and NaN/Inf replacement.

use ichcam::io::{self, nii, DataType, Volume};
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
