//! The whole pipeline on the CUDA device against the CPU, through the `ichcam` binary: a
//! short `train --device cuda` must give the CPU run's losses and weights (f32 on both, so
//! within rounding), and `segment --device cuda` of the real ct-ich volume (054, 512x512x33)
//! must give the CPU's mask (Dice >= 0.99), CAM and slice probabilities. Runs on a GPU or on
//! the emulated driver (`scripts/cuda-emu.sh test`); without either the tests are reported
//! as ignored (tests/common/cuda.rs). Sizes are small: the emulator is slow.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::bin;
use common::cuda::device;

fn main() {
    common::cuda::main(vec![
        device(
            "train_on_the_device_matches_the_cpu",
            train_on_the_device_matches_the_cpu,
        ),
        device(
            "segment_on_the_device_gives_the_cpus_mask",
            segment_on_the_device_gives_the_cpus_mask,
        ),
    ])
}

/// A file of tests/fixtures, from the source tree or the working directory.
fn fixture(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    if p.exists() {
        p
    } else {
        Path::new("tests/fixtures").join(rel)
    }
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

/// Synthetic training data (slice labels only) and a model trained on it on the CPU, made
/// once for both tests.
struct Work {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    cpu_model: PathBuf,
}

fn work() -> &'static Work {
    static WORK: OnceLock<Work> = OnceLock::new();
    WORK.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        run_ok(
            bin()
                .args([
                    "synth",
                    "--volumes",
                    "4",
                    "--seed",
                    "11",
                    "--size",
                    "64",
                    "--slices",
                    "8",
                    "--out",
                ])
                .arg(&data),
        );
        std::fs::remove_dir_all(data.join("labels")).expect("remove the masks");
        let cpu_model = root.join("cpu.safetensors");
        train(&data, &cpu_model, "cpu");
        Work {
            _dir: dir,
            root,
            data,
            cpu_model,
        }
    })
}

fn train(data: &Path, model: &Path, device: &str) -> String {
    run_ok(
        bin()
            .args([
                "train",
                // The same preset on both devices (`auto` picks `small` on a GPU).
                "--config",
                "tiny",
                "--epochs",
                "2",
                "--stage2-epochs",
                "1",
                "--seed",
                "5",
                "--fresh",
                "--quiet",
                "--device",
                device,
                "--data",
            ])
            .arg(data)
            .arg("--model")
            .arg(model),
    )
}

fn log_of(model: &Path) -> serde_json::Value {
    let p = model.with_extension("log.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("a JSON training log")
}

fn tensors(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).expect("read the model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors model");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn train_on_the_device_matches_the_cpu() {
    let w = work();
    let gpu_model = w.root.join("gpu.safetensors");
    let out = train(&w.data, &gpu_model, "cuda");
    assert!(out.contains("trained tiny on cuda"), "{out}");
    let (lc, lg) = (log_of(&w.cpu_model), log_of(&gpu_model));
    let (ec, eg) = (
        lc["epochs"].as_array().expect("epochs"),
        lg["epochs"].as_array().expect("epochs"),
    );
    assert_eq!(ec.len(), 3, "two stage-1 epochs and one stage-2 epoch");
    assert_eq!(ec.len(), eg.len());
    for (c, g) in ec.iter().zip(eg) {
        assert_eq!((&c["stage"], &c["epoch"]), (&g["stage"], &g["epoch"]));
        for key in ["train_loss", "val_loss"] {
            let (a, b) = (
                c[key].as_f64().expect("a loss"),
                g[key].as_f64().expect("a loss"),
            );
            assert!(
                ((a - b) / a).abs() < 1e-4,
                "stage {} epoch {} {key}: cpu {a} vs device {b}",
                c["stage"],
                c["epoch"]
            );
        }
    }
    let (pc, pg) = (tensors(&w.cpu_model), tensors(&gpu_model));
    assert!(pc.len() > 20, "only {} tensors", pc.len());
    for (name, want) in &pc {
        let got = pg
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the device's model"));
        let e = rel_err(got, want);
        assert!(e < 1e-3, "{name}: relative error {e:e} after training");
    }
}

fn segment(model: &Path, out: &Path, device: &str) {
    let image = fixture("ct-ich/images/054.nii.gz");
    // Every slice positive and the filters open: a large mask, so that agreement means
    // something (patient 054 has no hemorrhage; the defaults would give an empty mask).
    run_ok(
        bin()
            .args([
                "segment",
                "--quiet",
                "--slice-threshold",
                "0",
                "--min-blood-hu",
                "20",
                "--min-component-ml",
                "0",
                "--min-cam-support",
                "0",
                "--device",
                device,
                "--model",
            ])
            .arg(model)
            .arg("--input")
            .arg(&image)
            .arg("--out")
            .arg(out),
    );
}

fn segment_on_the_device_gives_the_cpus_mask() {
    let w = work();
    let (cpu_out, gpu_out) = (w.root.join("seg-cpu"), w.root.join("seg-gpu"));
    segment(&w.cpu_model, &cpu_out, "cpu");
    segment(&w.cpu_model, &gpu_out, "cuda");
    let read = |dir: &Path, f: &str| {
        ichcam::io::read_volume(&dir.join("054").join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .data
    };
    let (mc, mg) = (read(&cpu_out, "mask.nii.gz"), read(&gpu_out, "mask.nii.gz"));
    assert_eq!(mc.dim(), (33, 512, 512));
    assert_eq!(mc.dim(), mg.dim());
    let (mut both, mut nc, mut ng) = (0usize, 0usize, 0usize);
    for (&a, &b) in mc.iter().zip(mg.iter()) {
        let (a, b) = (a > 0.5, b > 0.5);
        nc += a as usize;
        ng += b as usize;
        both += (a && b) as usize;
    }
    assert!(
        nc > 10_000,
        "the CPU's mask has only {nc} voxels: nothing to compare"
    );
    let dice = 2.0 * both as f64 / (nc + ng) as f64;
    assert!(
        dice >= 0.99,
        "Dice {dice:.5} between the CPU's ({nc}) and the device's ({ng}) masks"
    );
    let (cc, cg) = (read(&cpu_out, "cam.nii.gz"), read(&gpu_out, "cam.nii.gz"));
    let (cc, cg): (Vec<f32>, Vec<f32>) =
        (cc.iter().copied().collect(), cg.iter().copied().collect());
    let e = rel_err(&cg, &cc);
    assert!(e < 1e-3, "CAM: relative error {e:e}");
    let probs = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("054/slices.csv"))
            .expect("slices.csv")
            .lines()
            .skip(1)
            .map(|l| {
                l.split(',')
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("a probability")
            })
            .collect()
    };
    let (pc, pg) = (probs(&cpu_out), probs(&gpu_out));
    assert_eq!(pc.len(), 33);
    for (z, (a, b)) in pc.iter().zip(&pg).enumerate() {
        assert!((a - b).abs() < 1e-4, "slice {z}: probability {a} vs {b}");
    }
}
