//! The engine against PyTorch: every fixture in tests/fixtures/torch-parity (two shipped by
//! the project, three more from make_extra.py with other depths, stage counts, LSTM layers
//! and odd image sizes) must match in f64 at 1e-9 and in f32 at 1e-4, through the library
//! and through the `ichcam parity` binary; a corrupted fixture must be refused clearly.

mod common;

use ichcam::engine::cpu::CpuBackend;
use ichcam::model::parity::{self, Fixture};
use ichcam::model::ModelError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 5] = [
    "parity_basic",
    "parity_bottleneck",
    "parity_basic3_lstm3",
    "parity_bottleneck_33",
    "parity_basic1_odd",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch-parity")
        .join(format!("{name}.safetensors"))
}

fn check_all<T: ichcam::engine::Real>(tol: f64) {
    for name in FIXTURES {
        let fx = Fixture::load(&fixture(name)).unwrap();
        let report = parity::run(CpuBackend::<T>::new(), &fx, tol).unwrap();
        assert!(
            report.passed(),
            "{name} in {}:\n{}",
            T::NAME,
            report.table()
        );
        // Every quantity the README lists is compared, gradients of every stage-1 tensor included.
        let q: Vec<&str> = report.rows.iter().map(|r| r.quantity.as_str()).collect();
        for want in [
            "logits",
            "loss",
            "eval.features",
            "eval.fc_logits",
            "eval.cam",
            "eval.cam_up",
            "eval.cam_norm",
            "eval.gradcam",
        ] {
            assert!(q.contains(&want), "{name}: no row {want}");
        }
        let grads = fx.tensors.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            report
                .rows
                .iter()
                .filter(|r| r.quantity.starts_with("grad "))
                .count(),
            grads,
            "{name}"
        );
        let stats = fx
            .tensors
            .keys()
            .filter(|k| k.starts_with("after_train."))
            .count();
        assert_eq!(
            report
                .rows
                .iter()
                .filter(|r| r.quantity.starts_with("after_train "))
                .count(),
            stats,
            "{name}"
        );
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
    // Parity must be able to fail: perturb one weight of the fixture and the gradients,
    // logits and CAMs no longer match.
    let mut fx = Fixture::load(&fixture("parity_basic")).unwrap();
    let t = fx.tensors.get_mut("param.layer2.0.conv1.weight").unwrap();
    t.data[0] += 1e-3;
    let report = parity::run(CpuBackend::<f64>::new(), &fx, 1e-9).unwrap();
    assert!(!report.passed());
    assert!(report
        .rows
        .iter()
        .any(|r| r.quantity == "logits" && !r.pass));
}

#[test]
fn binary_passes_a_fixture() {
    let out = common::bin()
        .arg("parity")
        .arg(fixture("parity_bottleneck"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("grad layer1.0.conv3.weight"), "{stdout}");
    assert!(
        stdout.lines().last().unwrap_or("").starts_with("PASS"),
        "{stdout}"
    );
    let out = common::bin()
        .args(["parity", "--dtype", "f32"])
        .arg(fixture("parity_basic3_lstm3"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rewrites a fixture with `param.<name>` given a wrong shape (one more output channel).
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
    corrupt(
        &fixture("parity_basic"),
        &bad,
        "param.layer3.0.conv2.weight",
    );
    let fx = Fixture::load(&bad).unwrap();
    let err = parity::run(CpuBackend::<f64>::new(), &fx, 1e-9).unwrap_err();
    match &err {
        ModelError::Mismatch { report, .. } => {
            assert_eq!(report.mismatched.len(), 1, "{err}");
            assert_eq!(report.mismatched[0].name, "layer3.0.conv2.weight");
            assert_eq!(report.mismatched[0].expected, vec![32, 32, 3, 3]);
            assert_eq!(report.mismatched[0].found, vec![33, 32, 3, 3]);
        }
        e => panic!("expected a shape mismatch, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("layer3.0.conv2.weight")
            && msg.contains("[32, 32, 3, 3]")
            && msg.contains("[33, 32, 3, 3]"),
        "{msg}"
    );

    let out = common::bin().arg("parity").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("layer3.0.conv2.weight") && stderr.contains("[33, 32, 3, 3]"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Not a safetensors file at all, and a missing file: one clear line, non-zero exit.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a tensor file").unwrap();
    for p in [junk, dir.path().join("missing.safetensors")] {
        let out = common::bin().arg("parity").arg(&p).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("error: ")
                && stderr.contains(p.file_name().unwrap().to_str().unwrap()),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Without a GPU `--device cuda` is one clear error line; with one (and on the GPU machine,
/// where `ICHCAM_REQUIRE_GPU=1`), the CUDA backend must pass every fixture at 1e-4.
#[test]
fn cuda_device_passes_or_says_why_not() {
    let require = std::env::var("ICHCAM_REQUIRE_GPU").is_ok_and(|v| v == "1");
    for name in FIXTURES {
        let out = common::bin()
            .args(["parity", "--device", "cuda"])
            .arg(fixture(name))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if out.status.success() {
            assert!(
                stdout.lines().last().unwrap_or("").starts_with("PASS"),
                "{stdout}"
            );
            continue;
        }
        assert!(
            !stderr.contains("parity FAILED"),
            "{name} on CUDA:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.starts_with("error: ") && stderr.contains("CUDA"),
            "{stderr}"
        );
        assert!(!require, "ICHCAM_REQUIRE_GPU=1 but: {stderr}");
        println!("skipped: no CUDA device ({})", stderr.trim());
        return;
    }
}
