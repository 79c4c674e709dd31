//! The U-Net against PyTorch: every fixture in tests/fixtures/unet-parity (the project's
//! `unet_basic` and two more from make_unet_fixtures.py with three input channels, features
//! 2, batch 1 and 3, 48x80 and 64x32, Dice and Dice + BCE) must match in f64 at 1e-9 and in
//! f32 at 1e-4 — output, loss, every gradient, the running statistics after the training
//! forward and the eval output — through the library and the `ichcam parity` binary; a
//! wrong weight must fail, a corrupted fixture must be refused clearly. The CUDA run of the
//! same fixtures is in tests/cuda_unet_parity.rs.

mod common;

use ichcam::engine::cpu::CpuBackend;
use ichcam::model::parity::{self, AnyFixture, UNetFixture};
use ichcam::model::ModelError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 3] = ["unet_basic", "unet_rgb_f2_b3_48x80", "unet_f2_b1_64x32_bce"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet-parity")
        .join(format!("{name}.safetensors"))
}

fn load(path: &Path) -> UNetFixture {
    match AnyFixture::load(path).unwrap() {
        AnyFixture::UNet(f) => f,
        AnyFixture::ResNetLstm(_) => panic!("{}: not a U-Net fixture", path.display()),
    }
}

fn check_all<T: ichcam::engine::Real>(tol: f64) {
    for name in FIXTURES {
        let fx = load(&fixture(name));
        let report = parity::run_unet(CpuBackend::<T>::new(), &fx, tol).unwrap();
        assert!(
            report.passed(),
            "{name} in {}:\n{}",
            T::NAME,
            report.table()
        );
        let worst = report.worst().unwrap();
        println!(
            "{name} {}: {} quantities, worst {} {:.3e}",
            T::NAME,
            report.rows.len(),
            worst.quantity,
            worst.rel_err
        );
        let q: Vec<&str> = report.rows.iter().map(|r| r.quantity.as_str()).collect();
        for want in ["output", "loss", "eval.output"] {
            assert!(q.contains(&want), "{name}: no row {want}");
        }
        // Every gradient and every running statistic of the fixture is compared.
        for (prefix, row) in [("grad.", "grad "), ("after_train.", "after_train ")] {
            let n = fx.tensors.keys().filter(|k| k.starts_with(prefix)).count();
            assert!(n > 0);
            assert_eq!(
                report
                    .rows
                    .iter()
                    .filter(|r| r.quantity.starts_with(row))
                    .count(),
                n,
                "{name}: {prefix}"
            );
        }
    }
}

#[test]
fn all_fixtures_match_in_f64() {
    check_all::<f64>(1e-9);
}

#[test]
fn all_fixtures_match_in_f32() {
    check_all::<f32>(1e-4);
}

#[test]
fn a_wrong_parameter_fails_the_comparison() {
    let mut fx = load(&fixture("unet_basic"));
    let t = fx.tensors.get_mut("param.decoder2.dec2conv1.bias").unwrap();
    t.data[0] += 1e-3;
    let report = parity::run_unet(CpuBackend::<f64>::new(), &fx, 1e-9).unwrap();
    assert!(!report.passed());
    for q in ["output", "grad encoder1.enc1conv1.weight", "eval.output"] {
        assert!(
            report.rows.iter().any(|r| r.quantity == q && !r.pass),
            "{q} still passes"
        );
    }
    // And a wrong running statistic shows in the eval output only.
    let mut fx = load(&fixture("unet_basic"));
    let t = fx
        .tensors
        .get_mut("param.decoder1.dec1norm2.running_var")
        .unwrap();
    t.data[1] *= 1.01;
    let report = parity::run_unet(CpuBackend::<f64>::new(), &fx, 1e-9).unwrap();
    let failed: Vec<&str> = report
        .rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.quantity.as_str())
        .collect();
    assert!(failed.contains(&"eval.output"), "{failed:?}");
    assert!(
        failed.contains(&"after_train decoder1.dec1norm2.running_var"),
        "{failed:?}"
    );
    assert!(!failed.contains(&"output") && !failed.contains(&"loss"));
}

#[test]
fn binary_passes_a_fixture_in_both_precisions() {
    for (dtype, name) in [
        ("f64", "unet_rgb_f2_b3_48x80"),
        ("f32", "unet_f2_b1_64x32_bce"),
    ] {
        let out = common::bin()
            .args(["parity", "--dtype", dtype])
            .arg(fixture(name))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("U-Net"), "{stdout}");
        assert!(stdout.contains("grad upconv4.weight"), "{stdout}");
        assert!(
            stdout.contains("after_train decoder1.dec1norm2.running_var"),
            "{stdout}"
        );
        assert!(
            stdout.lines().last().unwrap_or("").starts_with("PASS"),
            "{stdout}"
        );
    }
}

/// Rewrites a fixture with `name` given one more output channel.
fn corrupt(src: &Path, dst: &Path, name: &str) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, v) in st.iter() {
        let mut shape = v.shape().to_vec();
        let mut data = v.data().to_vec();
        if n == name {
            let per = data.len() / shape[0];
            shape[0] += 1;
            data.extend(std::iter::repeat_n(0u8, per));
        }
        owned.push((n.to_string(), shape, data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F64, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dst,
        safetensors::serialize(views, meta.metadata().clone()).unwrap(),
    )
    .unwrap();
}

#[test]
fn corrupted_fixture_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    corrupt(&fixture("unet_basic"), &bad, "param.upconv2.weight");
    let fx = load(&bad);
    let err = parity::run_unet(CpuBackend::<f64>::new(), &fx, 1e-9).unwrap_err();
    match &err {
        ModelError::Mismatch { report, .. } => {
            assert_eq!(report.mismatched.len(), 1, "{err}");
            assert_eq!(report.mismatched[0].name, "upconv2.weight");
            assert_eq!(report.mismatched[0].expected, vec![16, 8, 2, 2]);
            assert_eq!(report.mismatched[0].found, vec![17, 8, 2, 2]);
        }
        e => panic!("expected a shape mismatch, got {e}"),
    }
    let out = common::bin().arg("parity").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("upconv2.weight")
            && stderr.contains("[17, 8, 2, 2]"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The ResNet-LSTM loader names a U-Net fixture for what it is.
    let e = parity::Fixture::load(&fixture("unet_basic"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("U-Net fixture"), "{e}");
}
