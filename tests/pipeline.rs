//! The pipeline end to end through the `ichcam` binary: synth -> train (slice labels only)
//! -> segment -> eval. A real ct-ich volume is segmented and its outputs must carry the
//! input's exact geometry; a bad volume in a batch is reported without stopping the others;
//! and `ichcam demo` must clear its Dice bar on held-out phantoms.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    common::bin()
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the ichcam binary runs");
    assert!(
        out.status.success(),
        "{:?} failed ({:?}):\n{}\n{}",
        cmd,
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A quickly trained tiny model on a few small phantoms (the tests here check plumbing and
/// geometry; the demo test checks quality).
fn quick_model(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    run_ok(
        bin()
            .args([
                "synth",
                "--volumes",
                "5",
                "--seed",
                "11",
                "--size",
                "96",
                "--slices",
                "10",
                "--out",
            ])
            .arg(&data),
    );
    // Training sees no masks: remove them.
    std::fs::remove_dir_all(data.join("labels")).unwrap();
    let model = dir.join("model.safetensors");
    run_ok(
        bin()
            .args([
                "train",
                "--epochs",
                "1",
                "--stage2-epochs",
                "1",
                "--device",
                "cpu",
                "--quiet",
                "--data",
            ])
            .arg(&data)
            .arg("--model")
            .arg(&model),
    );
    assert!(model.exists());
    model
}

#[test]
fn segment_keeps_the_geometry_of_a_real_volume_and_survives_a_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = quick_model(tmp.path());
    let bad = tmp.path().join("broken.nii.gz");
    std::fs::write(&bad, b"this is not a gzip stream").unwrap();
    let image = fixture("ct-ich/images/054.nii.gz");
    let out_dir = tmp.path().join("pred");
    let out = bin()
        .args(["segment", "--device", "cpu", "--quiet", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&image)
        .arg(&bad)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    // The bad file fails the batch (exit 1, not a panic) but the real volume is done.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken"),
        "the failure names the file: {stderr}"
    );
    assert!(
        !out_dir.join("broken").exists(),
        "no output for the bad volume"
    );

    let vol = ichcam::io::read_volume(&image).unwrap();
    let dir = out_dir.join("054");
    for f in [
        "mask.nii.gz",
        "cam.nii.gz",
        "slices.csv",
        "overlay.png",
        "summary.json",
    ] {
        assert!(dir.join(f).exists(), "{f} written");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind");
    for f in ["mask.nii.gz", "cam.nii.gz"] {
        let o = ichcam::io::read_volume(&dir.join(f)).unwrap();
        assert_eq!(o.dims(), vol.dims(), "{f} dims");
        assert_eq!(o.spacing, vol.spacing, "{f} spacing");
        let (a, b) = (&o.header, &vol.header);
        assert_eq!(
            (a.sform_code, a.qform_code),
            (b.sform_code, b.qform_code),
            "{f} codes"
        );
        assert_eq!(
            (a.srow_x, a.srow_y, a.srow_z),
            (b.srow_x, b.srow_y, b.srow_z),
            "{f} sform"
        );
        assert_eq!(
            (
                a.quatern_b,
                a.quatern_c,
                a.quatern_d,
                a.quatern_x,
                a.quatern_y,
                a.quatern_z
            ),
            (
                b.quatern_b,
                b.quatern_c,
                b.quatern_d,
                b.quatern_x,
                b.quatern_y,
                b.quatern_z
            ),
            "{f} qform"
        );
        assert_eq!(a.pixdim[1..4], b.pixdim[1..4], "{f} pixdim");
        assert_eq!(a.xyzt_units, b.xyzt_units, "{f} units");
    }
    let mask = ichcam::io::read_volume(&dir.join("mask.nii.gz")).unwrap();
    assert!(
        mask.data.iter().all(|&v| v == 0.0 || v == 1.0),
        "a 0/1 mask"
    );
    let cam = ichcam::io::read_volume(&dir.join("cam.nii.gz")).unwrap();
    assert!(
        cam.data.iter().all(|&v| (0.0..=1.0).contains(&v)),
        "a normalised CAM"
    );
    let csv = std::fs::read_to_string(dir.join("slices.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + vol.dims().0, "one row per slice");

    // eval against the fixture's truth: 054 has no hemorrhage.
    let json = tmp.path().join("eval.json");
    let report = bin()
        .args(["eval", "--pred"])
        .arg(&out_dir)
        .arg("--truth")
        .arg(fixture("ct-ich"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_eq!(
        report.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["summary"]["n_volumes"], 1);
    assert_eq!(v["summary"]["n_negative"], 1);
}

#[test]
fn demo_clears_its_dice_bar_on_held_out_phantoms() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let stdout = run_ok(
        bin()
            .args(["demo", "--quiet", "--device", "cpu", "--out"])
            .arg(&out),
    );
    assert!(stdout.contains("held-out Dice"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let dice = v["summary"]["dice"]
        .as_f64()
        .expect("a Dice over the positive volumes");
    assert!(dice >= 0.70, "held-out Dice {dice} < 0.70:\n{stdout}");
    let n_pos = v["summary"]["n_positive"].as_u64().unwrap();
    assert!(n_pos >= 3, "the held-out set has hemorrhages to find");
    // The training folder held slice labels only.
    assert!(!out.join("train/labels").exists());
    assert!(out.join("pred").read_dir().unwrap().count() > 0);
}
