//! The test harness of the CUDA test binaries (`harness = false`, libtest-mimic): a test
//! that needs a device is a trial that is *ignored at run time*, with the reason, when no
//! CUDA device opens (no driver, no GPU and no emulator), so cargo's own count shows it as
//! ignored, never as passed. With `ICHCAM_REQUIRE_GPU=1` a missing device fails every such
//! trial instead. With a device, real or emulated (`scripts/cuda-emu.sh`), they run.
//! Tests that need no device (discovery, the kernel table) always run.

#![allow(dead_code)]

use std::process::Command;
use std::sync::OnceLock;

use cudarc::driver::CudaSlice;
use ichcam::engine::cuda::{CudaBackend, Graph};
use ichcam::engine::precision::round_bf16;
use ichcam::engine::{Backend, EngineError, Precision};
use ichcam::model::{CamPassBufs, IchNet};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Whether a missing device must be a failure.
pub fn require_gpu() -> bool {
    std::env::var("ICHCAM_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Why no CUDA device opens here, or None when one does (probed once).
pub fn device_absent() -> Option<&'static str> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE
        .get_or_init(|| CudaBackend::new(0).err().map(|e| e.to_string()))
        .as_deref()
}

/// Whether the device is the project's CPU emulator of the driver (emu/).
pub fn emulated() -> bool {
    static EMU: OnceLock<bool> = OnceLock::new();
    *EMU.get_or_init(|| {
        device_absent().is_none()
            && CudaBackend::new(0).is_ok_and(|b| b.info().name.contains("emulated"))
    })
}

/// One test of a CUDA test binary.
pub struct Test {
    pub name: &'static str,
    pub run: fn(),
    pub needs: Needs,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Runs everywhere.
    Nothing,
    /// Needs a CUDA device (a GPU or the emulator).
    Device,
    /// Needs the emulator (it checks what only the emulator catches, e.g. a deadlock that
    /// would hang a real GPU).
    Emulator,
    /// Needs a real GPU (timings; meaningless on the emulator).
    Gpu,
    /// Needs libnvrtc at run time (a failure without it under `ICHCAM_REQUIRE_NVRTC=1`).
    Nvrtc,
}

pub const fn host(name: &'static str, run: fn()) -> Test {
    Test {
        name,
        run,
        needs: Needs::Nothing,
    }
}

pub const fn device(name: &'static str, run: fn()) -> Test {
    Test {
        name,
        run,
        needs: Needs::Device,
    }
}

pub const fn real_gpu(name: &'static str, run: fn()) -> Test {
    Test {
        name,
        run,
        needs: Needs::Gpu,
    }
}

pub const fn emulator(name: &'static str, run: fn()) -> Test {
    Test {
        name,
        run,
        needs: Needs::Emulator,
    }
}

/// Runs the binary's tests with cargo's usual arguments and exits with their status.
pub fn main(tests: Vec<Test>) -> ! {
    let args = Arguments::from_args();
    run_with(&args, tests)
}

/// As [`main`], with `threads` test threads at most (tests that share one device context
/// and poison it on purpose run one at a time).
pub fn main_with_threads(tests: Vec<Test>, threads: usize) -> ! {
    let mut args = Arguments::from_args();
    args.test_threads = Some(args.test_threads.unwrap_or(threads).min(threads));
    run_with(&args, tests)
}

fn run_with(args: &Arguments, tests: Vec<Test>) -> ! {
    let trials = tests
        .into_iter()
        .map(|t| {
            let (run, needs) = (t.run, t.needs);
            Trial::ignorable_test(t.name, move || {
                if needs == Needs::Nvrtc && !ichcam::engine::cuda::device::nvrtc_present() {
                    if std::env::var("ICHCAM_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                        return Err(Failed::from(
                            "ICHCAM_REQUIRE_NVRTC=1 but libnvrtc does not load",
                        ));
                    }
                    return Ok(Completion::ignored_with("libnvrtc not found at run time"));
                }
                if matches!(needs, Needs::Device | Needs::Emulator | Needs::Gpu) {
                    if let Some(why) = device_absent() {
                        if require_gpu() {
                            return Err(Failed::from(format!(
                                "ICHCAM_REQUIRE_GPU=1 but no usable CUDA device: {why}"
                            )));
                        }
                        return Ok(Completion::ignored_with(format!("no CUDA device: {why}")));
                    }
                    if needs == Needs::Emulator && !emulated() {
                        return Ok(Completion::ignored_with(
                            "checks what only the CUDA emulator catches; this device is a real GPU",
                        ));
                    }
                    if needs == Needs::Gpu && emulated() {
                        return Ok(Completion::ignored_with(
                            "times the GPU: meaningless on the CUDA emulator",
                        ));
                    }
                }
                run();
                Ok(Completion::Completed)
            })
        })
        .collect();
    libtest_mimic::run(args, trials).exit()
}

/// The shared device backend at precision `p` (clones of one backend: one context).
pub fn gpu_at(p: Precision) -> CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    let mut be = GPU
        .get_or_init(|| CudaBackend::new(0).expect("the harness found a CUDA device"))
        .clone();
    be.set_precision(p)
        .expect("the device takes this precision");
    be
}

/// `||got - want|| / ||want||` in f64; infinite when either holds a NaN.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    assert!(den > 0.0, "reference is all zeros");
    (num / den).sqrt()
}

/// The largest |got - want| relative to the largest |want|; infinite on a NaN.
pub fn max_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    assert!(scale > 0.0, "reference is all zeros");
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        if g.is_nan() || w.is_nan() {
            f64::INFINITY
        } else {
            m.max((g as f64 - w as f64).abs() / scale)
        }
    })
}

/// `v` rounded as the tensor-core kernels round their operands: bf16 to nearest even, tf32
/// to nearest with ties away from zero (`cvt.rna.tf32.f32`).
pub fn round(p: Precision, v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            let u = x.to_bits();
            f32::from_bits(match p {
                Precision::F32 => u,
                Precision::Bf16 => round_bf16(x).to_bits(),
                Precision::Tf32 => (u + 0x1000) & 0xffff_e000,
            })
        })
        .collect()
}

/// One eager CAM pass of `net` on `xin` (its buffers warm), the outputs poisoned with NaN,
/// then the pass captured as a graph on `g` (which must allocate nothing): the graph and the
/// pass's buffers, for a replay to fill again.
pub fn warm_and_capture_cam_pass(
    g: &CudaBackend,
    net: &mut IchNet<CudaBackend>,
    xin: &CudaSlice<f32>,
    (n, h, w): (usize, usize, usize),
) -> (Graph, Option<CamPassBufs<CudaBackend>>) {
    let mut bufs = None;
    net.stage2_cam_pass(xin, n, h, w, &mut bufs)
        .expect("warm-up pass");
    {
        let b = bufs.as_mut().expect("bufs");
        for buf in [&mut b.logits, &mut b.cam, &mut b.norm] {
            g.fill(buf, f64::NAN).expect("poison");
        }
    }
    let (graph, ()) = g
        .capture(|| {
            net.stage2_cam_pass(xin, n, h, w, &mut bufs)
                .map_err(|e| EngineError::Param(e.to_string()))
        })
        .expect("capturing the CAM pass (it must allocate nothing once warm)");
    (graph, bufs)
}

/// `op` captured in a graph on `g` (its own stream: other work on it would break the capture),
/// writing the buffer it is given, uploaded from `fill` (values no op writes): asserts that
/// nothing ran while capturing (the buffer still `fill`, bit for bit), replays the graph
/// once, and returns the buffer then.
pub fn capture_replay(
    g: &CudaBackend,
    fill: &[f32],
    op: impl FnOnce(&mut CudaSlice<f32>) -> Result<(), EngineError>,
) -> Vec<f32> {
    let mut out = g.upload(fill).expect("upload");
    let (graph, ()) = g.capture(|| op(&mut out)).expect("capture");
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    assert!(
        bits(&g.download(&out).expect("download")) == bits(fill),
        "nothing runs while capturing"
    );
    graph.replay().expect("replay");
    g.download(&out).expect("download")
}

/// Runs `test` of this test binary alone in a child process (`--exact --include-ignored
/// --nocapture`) with `marker` set to 1 (how the test knows it is the child), the
/// `ICHCAM_WGMMA` switch removed and `envs` set: its stdout and stderr, the child asserted to
/// have passed it (the launch-profile tests: the emulator prints `EMU_PROFILE=1`'s profile
/// on stderr at exit).
pub fn child<V: AsRef<std::ffi::OsStr>>(
    marker: &str,
    test: &str,
    envs: &[(&str, V)],
) -> (String, String) {
    let mut cmd = Command::new(std::env::current_exe().expect("this test binary"));
    cmd.args([test, "--exact", "--include-ignored", "--nocapture"])
        .env(marker, "1")
        .env_remove("ICHCAM_WGMMA");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "the child {test} failed:\n{so}\n{se}");
    assert!(so.contains("1 passed"), "the child ran no test:\n{so}");
    (so, se)
}

/// Launches of `kernel` in the emulator's profile (`EMU_PROFILE=1`, printed at exit: name,
/// time, launches).
pub fn launches(profile: &str, kernel: &str) -> u64 {
    launches_where(profile, |k| k == kernel)
}

/// Launches of the kernels whose names start with `prefix` in the emulator's profile.
pub fn launches_prefixed(profile: &str, prefix: &str) -> u64 {
    launches_where(profile, |k| k.starts_with(prefix))
}

fn launches_where(profile: &str, named: impl Fn(&str) -> bool) -> u64 {
    profile
        .lines()
        .filter_map(|l| {
            let mut t = l.split_whitespace();
            if !named(t.next()?) {
                return None;
            }
            t.nth(1).and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}
