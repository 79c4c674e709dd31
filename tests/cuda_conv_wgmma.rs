//! The opt-in sm_90a `wgmma` kernel of the channels-last bf16-storage eval forward
//! (`kernels/conv_wgmma.cu`: `conv2d_fwd_bn_wgmma_n128` / `_n64`, conv + eval-mode batch norm
//! (+ residual) (+ ReLU), x and y bf16 NHWC two values to an f32 slot) through the backend op
//! `conv2d_bn_eval_fwd_nhwc_bf16` with `CudaBackend::set_wgmma(true)`, each shape first
//! asserted to take it (`conv_bn_eval_nhwc_bf16s_wgmma_kernel`):
//!
//! - against the CPU reference `conv2d_bn_eval_fwd` (f32, NCHW, transposed and packed here):
//!   on bf16-exact operands every output within 1 bf16 ulp of the CPU's result rounded to
//!   bf16 (or within 2e-5 of it for the few results so near zero that the order of the f32
//!   sums alone moves them further) and at least 99% exactly it; on unrounded operands within
//!   1e-2 relative of the CPU's f32 result on the unrounded data (and above 1e-5: the bf16
//!   path ran);
//! - against the mma.sync kernel (`conv2d_fwd_bn_mma_nhwc_bf16s`, the switch off) on the same
//!   inputs: within 1 bf16 ulp, or 2e-5, everywhere (the same products summed in another order);
//! - a captured graph (the fold, the weight copy and the kernel) replays bit for bit what the
//!   eager call wrote;
//! - the route: off by default, off at f32 / tf32 and with the route `Never`, off for shapes
//!   it does not support (`c_in % 8 != 0`: the mma.sync kernel runs them, bit for bit what the
//!   switch-off backend gives), and on a device that is not compute capability 9.0 never on;
//! - its PTX for `compute_90a`: build.rs's precompiled one (where the build had NVRTC; the
//!   module loads from it on the device) and NVRTC's at run time (module.rs's fallback) hold
//!   the wgmma instructions, build.rs's `compute_90` PTX of the file none, and ptxas (where
//!   found: `PTXAS`, `PATH`, or beside NVRTC) assembles the precompiled one for sm_90a without
//!   spills, printing the registers of the four kernels.
//!
//! The training forward (`conv2d_fwd_stats_wgmma_n128` / `_n64`, z and the batch-norm
//! partials, through `CudaBackend::conv2d_fwd_stats_nhwc_bf16s_wgmma` for the raw partials and
//! through the backend op `conv2d_bn_train_fwd_nhwc_bf16`, which CUDA routes to it with the
//! switch on), on the same 8 shapes: z within 1 bf16 ulp of the CPU's f32 conv rounded (or
//! 2e-5 near zero), at least 99% exactly it, and within 1 ulp of the mma.sync bf16-storage
//! kernel's (`conv2d_fwd_stats_mma_nhwc_bf16s`) on the same data (the count bit for bit
//! printed); the partials per channel and 64-pixel tile: the f64 sum of the kernel's own z in
//! pixel order bit for bit, the squared deviations within 1e-12 relative, and bit for bit the
//! mma.sync kernel's wherever its z of that tile is; the op's z bit for bit the raw kernel's
//! (so the op ran it) and its y, saved mean and inverse deviation near the switch-off op's;
//! a captured graph of the op replays bit for bit; the route as the eval forward's.
//!
//! Which kernels the ops launch (emulator only, its `EMU_PROFILE=1` launch counts in a child
//! process): with the switch on the eval and training ops launch the wgmma kernels and no
//! mma.sync forward, with it off the reverse (on the emulator both give the same bits, so only
//! the launches tell the route).
//!
//! Without the module (emulator only: a child process whose kernel folder lacks
//! conv_wgmma's host module, so the module does not load on the compute capability 9.0
//! device) the switch falls back: no wgmma kernel named, the eval and training ops give the
//! switch-off results bit for bit, and the note on stderr comes once.
//!
//! Shapes: 1x1 stride 1 and 2, 3x3 stride 1 and 2 with and without padding, 5x5, c_out a
//! multiple of neither tile (odd too), c_out <= 64 (the 64-channel kernel), more K tiles than
//! the ring's 4 stages, pixels not a multiple of 128. Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_wgmma-* --include-ignored`), whose
//! device is compute capability 9.0; without a device the device tests are ignored.

mod common;
use common::cuda::{device, emulator, rel_err, round, Needs, Test};
use common::nhwc::{
    bf16_value, bn_of, bn_params, cpu_nhwc, eval_bf16s, gpu_bf16s, halves, pack, to_nhwc, ulps,
    upload_bf16s, Case, NEAR_ZERO, POISON,
};
use common::rng::SplitMix64;
use common::shapes::conv;

use cudarc::driver::CudaSlice;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::module::{compile_for_arch, kernel, precompiled};
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::precision::bf16_bits;
use ichcam::engine::{Backend, Conv2d, Precision};

fn main() {
    common::cuda::main(vec![
        device(
            "wgmma_eval_forward_matches_cpu_and_mma",
            wgmma_eval_forward_matches_cpu_and_mma,
        ),
        device("wgmma_route_switch", wgmma_route_switch),
        device(
            "wgmma_eval_forward_replays_in_a_graph",
            wgmma_eval_forward_replays_in_a_graph,
        ),
        device(
            "wgmma_train_forward_matches_cpu_and_mma",
            wgmma_train_forward_matches_cpu_and_mma,
        ),
        device("wgmma_train_op_routes", wgmma_train_op_routes),
        device(
            "wgmma_train_op_replays_in_a_graph",
            wgmma_train_op_replays_in_a_graph,
        ),
        emulator(
            "wgmma_ops_launch_the_wgmma_kernels",
            wgmma_ops_launch_the_wgmma_kernels,
        ),
        emulator(
            "wgmma_falls_back_without_the_module",
            wgmma_falls_back_without_the_module,
        ),
        Test {
            name: "wgmma_ptx_for_sm90a",
            run: wgmma_ptx_for_sm90a,
            needs: Needs::Nvrtc,
        },
    ])
}

/// The shapes (all `c_in % 8 == 0`) and what each exercises.
fn cases() -> Vec<(Conv2d, &'static str)> {
    vec![
        (
            conv(2, 64, 9, 11, 136, 1, 1, 0),
            "1x1 s1, 198 pixels, c_out 136: two 128-channel tiles",
        ),
        (
            conv(3, 32, 9, 13, 130, 1, 2, 0),
            "1x1 s2 (downsample), 105 pixels",
        ),
        (
            conv(2, 16, 11, 9, 70, 3, 1, 1),
            "3x3 s1 p1, K 144, c_out 70 (ragged 128 tile)",
        ),
        (
            conv(3, 24, 13, 12, 64, 3, 2, 1),
            "3x3 s2 p1, c_out 64: the 64-channel kernel",
        ),
        (
            conv(2, 32, 15, 17, 67, 3, 2, 0),
            "3x3 s2 p0, odd c_out 67: 2-byte stores",
        ),
        (
            conv(1, 64, 9, 9, 40, 3, 1, 1),
            "K 576: 9 K tiles over a 4-stage ring, c_out 40",
        ),
        (
            conv(1, 8, 15, 11, 200, 5, 1, 2),
            "5x5 s1 p2, c_in 8 (K 200: K tail), c_out 200",
        ),
        (
            conv(2, 128, 8, 8, 256, 1, 1, 0),
            "1x1, K 128 (two full K tiles), two channel tiles",
        ),
    ]
}

/// Within 1 bf16 ulp of `want` (bf16 bits of an f32), or NEAR_ZERO of its value: (exact, near).
fn close(label: &str, what: &str, got: &[u16], want: &[f32]) -> (usize, usize) {
    let (mut ex, mut near) = (0, 0);
    for (j, (&a, &c)) in got.iter().zip(want).enumerate() {
        let b = bf16_bits(c);
        let d = ulps(a, b);
        let diff = (f64::from(bf16_value(a)) - f64::from(c)).abs();
        assert!(
            d <= 1 || diff <= NEAR_ZERO,
            "{label}: output {j} is {} ({a:#06x}), {what} {c} ({b:#06x}): {d} ulps, {diff:e} apart",
            bf16_value(a),
        );
        ex += usize::from(d == 0);
        near += usize::from(d > 1);
    }
    (ex, near)
}

fn backends() -> (CudaBackend, CudaBackend) {
    let mma = common::cuda::gpu_at(Precision::Bf16);
    let mut wg = mma.clone();
    wg.set_wgmma(true);
    (wg, mma)
}

fn wgmma_eval_forward_matches_cpu_and_mma() {
    let (wg, mma) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    let mut rng = SplitMix64::fresh("conv_wgmma");
    let (mut total, mut exact, mut near_zero, mut worst, mut same_as_mma) =
        (0usize, 0usize, 0usize, 0.0f64, 0usize);
    for (i, (s, what)) in cases().into_iter().enumerate() {
        let want = if s.c_out <= 64 {
            "conv2d_fwd_bn_wgmma_n64"
        } else {
            "conv2d_fwd_bn_wgmma_n128"
        };
        assert_eq!(
            wg.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s),
            hopper.then_some(want),
            "{s:?}"
        );
        assert_eq!(mma.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s), None);
        // The op's other name function names its mma.sync kernel, switch on or off (the one
        // that runs where the wgmma name is None).
        assert_eq!(
            wg.conv_bn_eval_nhwc_bf16s_kernel(&s),
            mma.conv_bn_eval_nhwc_bf16s_kernel(&s),
            "{s:?}"
        );
        assert!(
            mma.conv_bn_eval_nhwc_bf16s_kernel(&s)
                .is_some_and(|k| k.contains("_mma_")),
            "{s:?}"
        );
        let (with_res, relu) = [(true, true), (false, false), (true, false), (false, true)][i % 4];
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let bn = bn_params(&mut rng, s.c_out);
        let residual = with_res.then(|| rng.vec_f32(s.y_len(), -1.0, 1.0));
        let p = Precision::Bf16;
        let rounded = Case {
            s,
            x: round(p, &x),
            w: round(p, &w),
            bn: bn.clone(),
            residual: residual.as_deref().map(|r| round(p, r)),
            relu,
        };
        let label = format!("{s:?} ({what}, residual {with_res}, relu {relu})");
        let got = gpu_bf16s(&wg, &rounded);
        let (ex, near) = close(&label, "the CPU's", &got, &cpu_nhwc(&rounded));
        assert!(
            ex * 100 >= got.len() * 99,
            "{label}: only {ex} of {} outputs exact",
            got.len()
        );
        // The mma.sync kernel on the same inputs.
        let by_mma = gpu_bf16s(&mma, &rounded);
        let mma_vals: Vec<f32> = by_mma.iter().map(|&h| bf16_value(h)).collect();
        close(&label, "the mma.sync kernel's", &got, &mma_vals);
        let same = got.iter().zip(&by_mma).filter(|(a, b)| a == b).count();
        // Unrounded operands: near the CPU's f32 result on the unrounded data.
        let raw = Case {
            s,
            x,
            w,
            bn,
            residual,
            relu,
        };
        let vals: Vec<f32> = gpu_bf16s(&wg, &raw)
            .iter()
            .map(|&h| bf16_value(h))
            .collect();
        let e = rel_err(&vals, &cpu_nhwc(&raw));
        assert!(
            e < 1e-2 && e > 1e-5,
            "{label}: relative error {e:e}, expected in (1e-5, 1e-2)"
        );
        worst = worst.max(e);
        total += got.len();
        exact += ex;
        near_zero += near;
        same_as_mma += same;
        println!(
            "wgmma {label}: {ex} of {} exactly the CPU's rounded to bf16, {near} near zero over 1 ulp, {same} bit for bit the mma.sync kernel's; relative error on unrounded data {e:.2e}",
            got.len()
        );
    }
    if hopper {
        let k = kernel("conv_wgmma").expect("built in");
        let loaded = wg.wgmma_module_ptx().expect("the module is loaded");
        if let Some(pre) = k.ptx_sm90a {
            assert!(
                &*loaded == pre,
                "the module was not loaded from build.rs's compute_90a PTX"
            );
        }
        println!(
            "wgmma module loaded from {}",
            if k.ptx_sm90a.is_some() {
                "build.rs's precompiled compute_90a PTX"
            } else {
                "NVRTC at run time (the build had none)"
            }
        );
    }
    println!(
        "wgmma eval forward ({}), {} shapes: {exact} of {total} outputs exactly the CPU's rounded to bf16, {} 1 ulp off, {near_zero} near zero more (within {NEAR_ZERO:e}); {same_as_mma} of {total} bit for bit the mma.sync kernel's; worst relative error on unrounded data {worst:.2e}",
        if hopper { "the wgmma kernel" } else { "not compute capability 9.0: the mma.sync fallback" },
        cases().len(),
        total - exact - near_zero
    );
}

/// A captured wgmma forward (the batch-norm fold, the bf16 weight copy and the kernel, the
/// module loaded and scratch warmed by the eager call) replays bit for bit what the eager
/// call wrote.
fn wgmma_eval_forward_replays_in_a_graph() {
    // A backend of its own (its own stream): the other tests' work on the shared stream would
    // break the capture.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes bf16");
    g.set_wgmma(true);
    let s = cases()[2].0;
    let hopper = g.info().compute_capability == (9, 0);
    assert_eq!(g.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s).is_some(), hopper);
    let mut rng = SplitMix64::fresh("conv_wgmma_graph");
    let c = Case {
        s,
        x: rng.vec_f32(s.x_len(), -1.0, 1.0),
        w: rng.vec_f32(s.w_len(), -1.0, 1.0),
        bn: bn_params(&mut rng, s.c_out),
        residual: Some(rng.vec_f32(s.y_len(), -1.0, 1.0)),
        relu: true,
    };
    let eager = gpu_bf16s(&g, &c);
    let b = upload_bf16s(&g, &c);
    let poison = vec![f32::from_bits(POISON); s.y_len().div_ceil(2)];
    let y = common::cuda::capture_replay(&g, &poison, |y| eval_bf16s(&g, &c, &b, y));
    let got = halves(&y, s.y_len());
    assert!(got == eager, "the replay differs from the eager call");
}

/// Off by default, off where it does not apply, and where it does not run the op gives what
/// the switch-off backend gives, bit for bit.
fn wgmma_route_switch() {
    let (wg, mma) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    let s = cases()[0].0;
    assert!(!mma.wgmma(), "off by default (ICHCAM_WGMMA unset)");
    assert_eq!(mma.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s), None);
    assert_eq!(
        wg.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s).is_some(),
        hopper,
        "on, at bf16, on compute capability 9.0 only"
    );
    for p in [Precision::F32, Precision::Tf32] {
        let mut b = common::cuda::gpu_at(p);
        b.set_wgmma(true);
        assert_eq!(b.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s), None, "at {p}");
    }
    let mut never = wg.clone();
    never.set_mma_route(MmaRoute::Never);
    assert_eq!(
        never.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s),
        None,
        "route Never"
    );
    // Unsupported (c_in % 8 != 0): the mma.sync kernel runs, bit for bit the switch-off result.
    let mut rng = SplitMix64::fresh("conv_wgmma_route");
    for s in [
        conv(2, 12, 9, 7, 70, 3, 1, 1),
        conv(1, 5, 9, 7, 67, 3, 1, 1),
    ] {
        assert_eq!(wg.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s), None, "{s:?}");
        assert_eq!(
            wg.conv_bn_eval_nhwc_bf16s_kernel(&s),
            Some("conv2d_fwd_bn_mma_nhwc_bf16s")
        );
        let c = Case {
            s,
            x: rng.vec_f32(s.x_len(), -1.0, 1.0),
            w: rng.vec_f32(s.w_len(), -1.0, 1.0),
            bn: bn_params(&mut rng, s.c_out),
            residual: Some(rng.vec_f32(s.y_len(), -1.0, 1.0)),
            relu: true,
        };
        assert!(
            gpu_bf16s(&wg, &c) == gpu_bf16s(&mma, &c),
            "{s:?}: the fallback differs from the switch-off backend"
        );
    }
    println!(
        "wgmma route: off by default, off at f32 / tf32 / route Never / c_in % 8 != 0 (the fallback bit for bit the mma.sync kernel's); on: {}",
        if hopper { "compute capability 9.0" } else { "never (not compute capability 9.0)" }
    );
}

/// A ptxas to assemble with: `PTXAS`, on `PATH`, or `../bin/ptxas` beside a `libnvrtc.so.13`
/// on `LD_LIBRARY_PATH` (pip's nvidia-cuda-nvcc), as scripts/cuda-emu.sh finds it.
fn find_ptxas() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("PTXAS").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let on =
        |var: &str| std::env::var_os(var).map(|v| std::env::split_paths(&v).collect::<Vec<_>>());
    if let Some(p) = on("PATH")
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    on("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.join("libnvrtc.so.13").exists())
        .map(|d| d.join("../bin/ptxas"))
        .find(|p| p.is_file())
}

fn wgmma_ptx_for_sm90a() {
    let k = kernel("conv_wgmma").expect("kernels/conv_wgmma.cu is built in");
    let runtime = compile_for_arch(k, "compute_90a")
        .expect("NVRTC compiles conv_wgmma.cu for compute_90a")
        .to_src();
    assert_eq!(
        k.ptx_sm90a.is_some(),
        precompiled(),
        "build.rs precompiles conv_wgmma.cu for compute_90a where it has NVRTC"
    );
    assert!(
        ichcam::engine::cuda::module::SM90A_MODULES == ["conv_wgmma"],
        "the sm_90a files build.rs found: {:?}",
        ichcam::engine::cuda::module::SM90A_MODULES
    );
    let mut ptxs = vec![("run-time", runtime.as_str())];
    if let Some(pre) = k.ptx_sm90a {
        ptxs.push(("precompiled", pre));
    }
    for (what, ptx) in &ptxs {
        for needle in [
            ".target sm_90a",
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
            "wgmma.fence.sync.aligned",
            "wgmma.commit_group.sync.aligned",
            "wgmma.wait_group.sync.aligned",
            "fence.proxy.async.shared::cta",
            "cp.async.cg.shared.global",
            ".entry conv2d_fwd_stats_wgmma_n128(",
            ".entry conv2d_fwd_stats_wgmma_n64(",
        ] {
            assert!(
                ptx.contains(needle),
                "the {what} compute_90a PTX has no `{needle}`"
            );
        }
    }
    if let Some(pre) = k.ptx_sm90 {
        assert!(
            !pre.contains("wgmma.mma_async"),
            "build.rs's compute_90 PTX of conv_wgmma.cu has wgmma (it cannot assemble for sm_90)"
        );
    }
    // What ptxas assembles: what the device loads (the precompiled PTX where there is one).
    let ptx = ptxs.last().expect("one PTX").1;
    let Some(ptxas) = find_ptxas() else {
        assert!(
            !std::env::var("ICHCAM_REQUIRE_PTXAS").is_ok_and(|v| v == "1"),
            "ICHCAM_REQUIRE_PTXAS=1 but no ptxas found"
        );
        println!("wgmma PTX for compute_90a: the wgmma instructions are there; no ptxas found, not assembled");
        return;
    };
    let dir = std::env::temp_dir().join(format!("ichcam-wgmma-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("conv_wgmma.sm90a.ptx");
    std::fs::write(&file, ptx).expect("write the PTX");
    let o = std::process::Command::new(&ptxas)
        .arg("-arch=sm_90a")
        .arg("-v")
        .arg(&file)
        .arg("-o")
        .arg(dir.join("conv_wgmma.cubin"))
        .output()
        .expect("run ptxas");
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "ptxas -arch=sm_90a failed:\n{log}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("registers") || l.contains("spill") || l.contains("Compiling entry"))
        .collect();
    // Every kernel of the file (the forwards' four, and the gradients' appended after them).
    let entries = ptx.matches(".entry ").count();
    assert!(
        entries >= 4 && lines.iter().filter(|l| l.contains("Used")).count() == entries,
        "ptxas reported no registers for the {entries} kernels:\n{log}"
    );
    assert!(
        lines.iter().all(
            |l| !l.contains("spill") || l.contains("0 bytes spill stores, 0 bytes spill loads")
        ),
        "spills:\n{log}"
    );
    println!("ptxas -arch=sm_90a conv_wgmma ({}):", ptxas.display());
    for l in lines {
        println!("  {}", l.trim());
    }
}

// ---- The training forward (z and the batch-norm partials) ---------------------------------

const TILE: usize = 64;

fn tiles(s: &Conv2d) -> usize {
    (s.n * s.out_h() * s.out_w()).div_ceil(TILE)
}

fn up64(g: &CudaBackend, v: &[f64]) -> CudaSlice<f64> {
    g.stream().clone_htod(v).expect("upload f64")
}

fn down64(g: &CudaBackend, b: &CudaSlice<f64>) -> Vec<f64> {
    g.synchronize().expect("synchronize");
    g.stream().clone_dtoh(b).expect("download f64")
}

/// z's halves (every one written, an odd length's last high half untouched) from its slots.
fn z_halves(s: &Conv2d, slots: &[f32]) -> Vec<u16> {
    if s.y_len() % 2 == 1 {
        let last = slots.last().expect("a slot").to_bits();
        assert_eq!(
            last >> 16,
            0xffff,
            "{s:?}: z's unused high half was written"
        );
    }
    let h = halves(slots, s.y_len());
    assert!(
        h.iter().all(|&v| bf16_value(v).is_finite()),
        "{s:?}: a z value not written (or not finite)"
    );
    h
}

/// The raw statistics forward on `g`: the wgmma kernel (`wgmma`) or the mma.sync one, outputs
/// poisoned first; z's halves and the partials (every entry written).
fn raw_stats(
    g: &CudaBackend,
    wgmma: bool,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
) -> (Vec<u16>, Vec<f64>, Vec<f64>) {
    let xb = g
        .upload(&pack(&to_nhwc(x, s.n, s.c_in, s.h * s.w)))
        .expect("upload");
    let wb = g.upload(w).expect("upload");
    let mut z = g
        .upload(&vec![f32::from_bits(POISON); s.y_len().div_ceil(2)])
        .expect("upload");
    let nan = vec![f64::NAN; s.c_out * tiles(s)];
    let (mut ps, mut pq) = (up64(g, &nan), up64(g, &nan));
    // SAFETY: x, w, z and the partials sized as `s` gives them (bf16 storage, c_out * tiles).
    unsafe {
        if wgmma {
            g.conv2d_fwd_stats_nhwc_bf16s_wgmma(s, &xb, &wb, &mut z, &mut ps, &mut pq)
        } else {
            g.conv2d_fwd_stats_nhwc_bf16s_native(s, &xb, &wb, &mut z, &mut ps, &mut pq)
        }
    }
    .expect("the statistics forward");
    let h = z_halves(s, &g.download(&z).expect("download"));
    let (ps, pq) = (down64(g, &ps), down64(g, &pq));
    assert!(
        ps.iter().chain(&pq).all(|v| v.is_finite()),
        "{s:?}: a partial not written"
    );
    (h, ps, pq)
}

/// The CPU's NCHW forward in f32, transposed to NHWC.
fn cpu_fwd(s: &Conv2d, x: &[f32], w: &[f32]) -> Vec<f32> {
    let cpu = CpuBackend::<f32>::new();
    let (xb, wb) = (
        cpu.upload(x).expect("upload"),
        cpu.upload(w).expect("upload"),
    );
    let mut y = cpu.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
    cpu.conv2d_fwd(s, &xb, &wb, &mut y).expect("cpu conv2d_fwd");
    to_nhwc(
        &cpu.download(&y).expect("download"),
        s.n,
        s.c_out,
        s.out_h() * s.out_w(),
    )
}

/// The partials against z (NHWC halves): per channel and tile the f64 sum in pixel order bit
/// for bit, the squared deviations within 1e-12 relative; (squared deviations bit for bit,
/// entries).
fn check_partials(label: &str, s: &Conv2d, z: &[u16], ps: &[f64], pq: &[f64]) -> (usize, usize) {
    let (c, p, t) = (s.c_out, s.n * s.out_h() * s.out_w(), tiles(s));
    assert_eq!(ps.len(), c * t);
    let mut exact_q = 0;
    for ch in 0..c {
        for tile in 0..t {
            let px = tile * TILE..(tile * TILE + TILE).min(p);
            let nv = px.len() as f64;
            let vals: Vec<f64> = px.map(|q| f64::from(bf16_value(z[q * c + ch]))).collect();
            let mut sum = 0.0f64;
            for v in &vals {
                sum += v;
            }
            let mean = sum / nv;
            let mut sq = 0.0f64;
            for v in &vals {
                sq += (v - mean) * (v - mean);
            }
            let (gs, gq) = (ps[ch * t + tile], pq[ch * t + tile]);
            assert!(
                gs.to_bits() == sum.to_bits(),
                "{label}: channel {ch} tile {tile}: sum {gs} vs the host's {sum} from the stored z"
            );
            let d = (gq - sq).abs() / sq.abs().max(1e-300);
            assert!(
                d <= 1e-12 || gq == sq,
                "{label}: channel {ch} tile {tile}: squared deviations {gq} vs the host's {sq} ({d:e})"
            );
            exact_q += usize::from(gq.to_bits() == sq.to_bits());
        }
    }
    (exact_q, c * t)
}

fn wgmma_train_forward_matches_cpu_and_mma() {
    let (wg, mma) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    if !hopper {
        println!("not compute capability 9.0: the wgmma statistics kernel does not run here");
        for (s, _) in cases() {
            assert_eq!(wg.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s), None);
        }
        return;
    }
    let mut rng = SplitMix64::fresh("conv_wgmma_train");
    let (mut total, mut exact, mut same_z, mut parts, mut same_parts, mut q_exact) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    let mut worst = 0.0f64;
    for (s, what) in cases() {
        let want = if s.c_out <= 64 {
            "conv2d_fwd_stats_wgmma_n64"
        } else {
            "conv2d_fwd_stats_wgmma_n128"
        };
        assert_eq!(
            wg.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s),
            Some(want),
            "{s:?}"
        );
        assert_eq!(mma.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s), None);
        // The op's other name function names its mma.sync kernel, switch on or off (the one
        // that runs where the wgmma name is None).
        assert_eq!(
            wg.conv_fwd_stats_nhwc_bf16s_kernel(&s),
            mma.conv_fwd_stats_nhwc_bf16s_kernel(&s),
            "{s:?}"
        );
        assert!(
            mma.conv_fwd_stats_nhwc_bf16s_kernel(&s)
                .is_some_and(|k| k.contains("_mma_")),
            "{s:?}"
        );
        let label = format!("{s:?} ({what})");
        let p = Precision::Bf16;
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (xr, wr) = (round(p, &x), round(p, &w));
        let (z, ps, pq) = raw_stats(&wg, true, &s, &xr, &wr);
        let (ex, near) = close(&label, "the CPU's", &z, &cpu_fwd(&s, &xr, &wr));
        assert!(
            ex * 100 >= z.len() * 99,
            "{label}: only {ex} of {} z exact",
            z.len()
        );
        let (qx, n) = check_partials(&label, &s, &z, &ps, &pq);
        // The mma.sync kernel on the same data.
        let (zm, psm, pqm) = raw_stats(&mma, false, &s, &xr, &wr);
        let zm_vals: Vec<f32> = zm.iter().map(|&h| bf16_value(h)).collect();
        close(&label, "the mma.sync kernel's", &z, &zm_vals);
        let same = z.iter().zip(&zm).filter(|(a, b)| a == b).count();
        // Partials of tiles whose z (of that channel) both kernels wrote alike: bit for bit.
        let (c, pix, t) = (s.c_out, s.n * s.out_h() * s.out_w(), tiles(&s));
        let mut alike = 0;
        for ch in 0..c {
            for tile in 0..t {
                let px = tile * TILE..(tile * TILE + TILE).min(pix);
                if px.clone().all(|q| z[q * c + ch] == zm[q * c + ch]) {
                    let i = ch * t + tile;
                    assert!(
                        ps[i].to_bits() == psm[i].to_bits() && pq[i].to_bits() == pqm[i].to_bits(),
                        "{label}: channel {ch} tile {tile}: the same z, other partials than the mma.sync kernel's"
                    );
                    alike += 1;
                }
            }
        }
        // Unrounded operands: near the CPU's f32 result on the unrounded data.
        let (zu, _, _) = raw_stats(&wg, true, &s, &x, &w);
        let vals: Vec<f32> = zu.iter().map(|&h| bf16_value(h)).collect();
        let e = rel_err(&vals, &cpu_fwd(&s, &x, &w));
        assert!(e < 1e-2 && e > 1e-5, "{label}: relative error {e:e}");
        worst = worst.max(e);
        println!(
            "wgmma train {label}: z {ex} of {} exactly the CPU's rounded ({near} near zero over 1 ulp), {same} bit for bit the mma.sync kernel's; partials {alike} of {n} entries with the mma.sync kernel's z and bit for bit its partials, {qx} squared deviations bit for bit the host's; unrounded relative error {e:.2e}",
            z.len()
        );
        total += z.len();
        exact += ex;
        same_z += same;
        parts += n;
        same_parts += alike;
        q_exact += qx;
    }
    println!(
        "wgmma training forward, {} shapes: z {exact} of {total} exactly the CPU's rounded to bf16, {same_z} of {total} bit for bit the mma.sync kernel's; partials: every sum bit for bit the host's of the stored z, {q_exact} of {parts} squared deviations bit for bit (the rest within 1e-12), {same_parts} of {parts} entries of tiles with the mma.sync kernel's z and bit for bit its partials; worst relative error on unrounded data {worst:.2e}",
        cases().len()
    );
}

/// The backend op `conv2d_bn_train_fwd_nhwc_bf16` on `c` (x and the residual packed): z's and
/// y's halves, the saved mean and inverse deviation, the running mean and variance.
type TrainOut = (Vec<u16>, Vec<u16>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn train_op(g: &CudaBackend, c: &Case) -> TrainOut {
    let s = &c.s;
    let up = |v: &[f32]| g.upload(v).expect("upload");
    let xb = up(&pack(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w)));
    let wb = up(&c.w);
    let hw = s.out_h() * s.out_w();
    let rb = c
        .residual
        .as_deref()
        .map(|r| up(&pack(&to_nhwc(r, s.n, s.c_out, hw))));
    let (gamma, beta) = (up(&c.bn[0]), up(&c.bn[1]));
    let (mut rm, mut rv) = (up(&c.bn[2]), up(&c.bn[3]));
    let (mut sm, mut si) = (up(&vec![f32::NAN; s.c_out]), up(&vec![f32::NAN; s.c_out]));
    let poison = vec![f32::from_bits(POISON); s.y_len().div_ceil(2)];
    let (mut z, mut y) = (up(&poison), up(&poison));
    g.conv2d_bn_train_fwd_nhwc_bf16(
        s,
        &bn_of(s),
        &xb,
        &wb,
        &gamma,
        &beta,
        &mut rm,
        &mut rv,
        &mut sm,
        &mut si,
        &mut z,
        &mut y,
        rb.as_ref(),
        c.relu,
    )
    .expect("conv2d_bn_train_fwd_nhwc_bf16");
    let d = |b: &CudaSlice<f32>| g.download(b).expect("download");
    (
        z_halves(s, &d(&z)),
        z_halves(s, &d(&y)),
        d(&sm),
        d(&si),
        d(&rm),
        d(&rv),
    )
}

fn train_case(rng: &mut SplitMix64, s: Conv2d, residual: bool, relu: bool) -> Case {
    let p = Precision::Bf16;
    Case {
        s,
        x: round(p, &rng.vec_f32(s.x_len(), -1.0, 1.0)),
        w: round(p, &rng.vec_f32(s.w_len(), -1.0, 1.0)),
        bn: bn_params(rng, s.c_out),
        residual: residual.then(|| round(p, &rng.vec_f32(s.y_len(), -1.0, 1.0))),
        relu,
    }
}

/// Within `tol` relative to 1 + |b|.
fn near(what: &str, a: &[f32], b: &[f32], tol: f32) {
    for (i, (u, v)) in a.iter().zip(b).enumerate() {
        assert!(
            (u - v).abs() <= tol * (1.0 + v.abs()),
            "{what}[{i}]: {u} vs {v}"
        );
    }
}

/// The op routes to the wgmma kernel with the switch on (z bit for bit the raw kernel's),
/// and to the mma.sync kernel with it off, at f32 / tf32 / route Never none, and for a shape
/// it does not support the mma.sync kernel (bit for bit the switch-off op).
fn wgmma_train_op_routes() {
    let (wg, mma) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    assert_eq!(
        wg.wgmma_unavailable().is_none(),
        hopper,
        "{:?}",
        wg.wgmma_unavailable()
    );
    let mut rng = SplitMix64::fresh("conv_wgmma_train_op");
    let (mut same_z, mut total) = (0, 0);
    for (i, (s, what)) in cases().into_iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let c = train_case(&mut rng, s, i % 4 == 0, i % 4 == 0);
        let label = format!("{s:?} ({what})");
        let by_wg = train_op(&wg, &c);
        let by_mma = train_op(&mma, &c);
        let raw_wg = hopper.then(|| raw_stats(&wg, true, &s, &c.x, &c.w).0);
        let raw_mma = raw_stats(&mma, false, &s, &c.x, &c.w).0;
        assert!(
            by_mma.0 == raw_mma,
            "{label}: switch off: z is not the mma.sync kernel's"
        );
        match &raw_wg {
            Some(r) => assert!(
                &by_wg.0 == r,
                "{label}: switch on: z is not the wgmma kernel's"
            ),
            None => assert!(
                by_wg.0 == raw_mma,
                "{label}: not 9.0: z is not the mma.sync kernel's"
            ),
        }
        let vals = |h: &[u16]| h.iter().map(|&v| bf16_value(v)).collect::<Vec<f32>>();
        close(&label, "the switch-off op's", &by_wg.1, &vals(&by_mma.1));
        near(&format!("{label}: saved mean"), &by_wg.2, &by_mma.2, 1e-2);
        near(&format!("{label}: saved invstd"), &by_wg.3, &by_mma.3, 1e-2);
        near(&format!("{label}: running mean"), &by_wg.4, &by_mma.4, 1e-2);
        near(&format!("{label}: running var"), &by_wg.5, &by_mma.5, 1e-2);
        same_z += by_wg
            .0
            .iter()
            .zip(&by_mma.0)
            .filter(|(a, b)| a == b)
            .count();
        total += by_wg.0.len();
    }
    // Off at f32 / tf32 / route Never, and for c_in % 8 != 0 (the mma.sync kernel, bit for bit).
    let s = cases()[0].0;
    for p in [Precision::F32, Precision::Tf32] {
        let mut b = common::cuda::gpu_at(p);
        b.set_wgmma(true);
        assert_eq!(b.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s), None, "at {p}");
    }
    let mut never = wg.clone();
    never.set_mma_route(MmaRoute::Never);
    assert_eq!(
        never.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s),
        None,
        "route Never"
    );
    assert_eq!(
        mma.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s),
        None,
        "switch off"
    );
    for s in [
        conv(2, 12, 9, 7, 70, 3, 1, 1),
        conv(1, 5, 9, 7, 67, 3, 1, 1),
    ] {
        assert_eq!(wg.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s), None, "{s:?}");
        assert!(wg.conv_fwd_stats_nhwc_bf16s_kernel(&s).is_some(), "{s:?}");
        let c = train_case(&mut rng, s, true, true);
        assert!(
            train_op(&wg, &c) == train_op(&mma, &c),
            "{s:?}: the fallback differs"
        );
    }
    println!(
        "wgmma training op: with the switch on z is the {} kernel's bit for bit ({same_z} of {total} values bit for bit the switch-off op's); off at f32 / tf32 / route Never / c_in % 8 != 0 (bit for bit the switch-off op)",
        if hopper { "wgmma" } else { "mma.sync (not 9.0)" }
    );
}

/// A captured training op (the wgmma forward, the combine, the normalisation pass) replays
/// bit for bit what the eager call wrote.
fn wgmma_train_op_replays_in_a_graph() {
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes bf16");
    g.set_wgmma(true);
    let s = cases()[2].0;
    let hopper = g.info().compute_capability == (9, 0);
    assert_eq!(
        g.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s).is_some(),
        hopper
    );
    let mut rng = SplitMix64::fresh("conv_wgmma_train_graph");
    let c = train_case(&mut rng, s, true, true);
    let eager = train_op(&g, &c);
    let up = |v: &[f32]| g.upload(v).expect("upload");
    let xb = up(&pack(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w)));
    let wb = up(&c.w);
    let hw = s.out_h() * s.out_w();
    let rb = up(&pack(&to_nhwc(
        c.residual.as_deref().expect("a residual"),
        s.n,
        s.c_out,
        hw,
    )));
    let (gamma, beta) = (up(&c.bn[0]), up(&c.bn[1]));
    let (mut rm, mut rv) = (up(&c.bn[2]), up(&c.bn[3]));
    let (mut sm, mut si) = (up(&vec![f32::NAN; s.c_out]), up(&vec![f32::NAN; s.c_out]));
    let poison = vec![f32::from_bits(POISON); s.y_len().div_ceil(2)];
    let (mut z, mut y) = (up(&poison), up(&poison));
    let (graph, ()) = g
        .capture(|| {
            g.conv2d_bn_train_fwd_nhwc_bf16(
                &s,
                &bn_of(&s),
                &xb,
                &wb,
                &gamma,
                &beta,
                &mut rm,
                &mut rv,
                &mut sm,
                &mut si,
                &mut z,
                &mut y,
                Some(&rb),
                true,
            )
        })
        .expect("capture");
    assert!(
        g.download(&z)
            .expect("download")
            .iter()
            .all(|v| v.to_bits() == POISON),
        "nothing runs while capturing"
    );
    graph.replay().expect("replay");
    let d = |b: &CudaSlice<f32>| g.download(b).expect("download");
    let got = (
        z_halves(&s, &d(&z)),
        z_halves(&s, &d(&y)),
        d(&sm),
        d(&si),
        d(&rm),
        d(&rv),
    );
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    assert!(
        got.0 == eager.0 && got.1 == eager.1,
        "z / y of the replay differ"
    );
    for (a, b, what) in [
        (&got.2, &eager.2, "saved mean"),
        (&got.3, &eager.3, "saved invstd"),
        (&got.4, &eager.4, "running mean"),
        (&got.5, &eager.5, "running var"),
    ] {
        assert!(bits(a) == bits(b), "the replay's {what} differs");
    }
}

const CHILD: &str = "ICHCAM_WGMMA_TEST_CHILD";

/// Which kernels the ops launch (emulator only: its profile counts launches by name): the
/// eval op and the training op on a 136-channel shape in a child process with the switch on
/// launch `conv2d_fwd_bn_wgmma_n128` and `conv2d_fwd_stats_wgmma_n128` and no mma.sync
/// forward, with it off the reverse.
fn wgmma_ops_launch_the_wgmma_kernels() {
    if std::env::var_os(CHILD).is_some() {
        let mut g = common::cuda::gpu_at(Precision::Bf16);
        g.set_wgmma(std::env::var("ICHCAM_WGMMA_TEST_MODE").is_ok_and(|m| m == "on"));
        let mut rng = SplitMix64::fresh("conv_wgmma_launches");
        let c = train_case(&mut rng, cases()[0].0, true, true);
        gpu_bf16s(&g, &c);
        train_op(&g, &c);
        return;
    }
    let mut seen = Vec::new();
    for on in [true, false] {
        let mode = std::ffi::OsString::from(if on { "on" } else { "off" });
        let one = std::ffi::OsString::from("1");
        let (_, se) = common::cuda::child(
            CHILD,
            "wgmma_ops_launch_the_wgmma_kernels",
            &[("ICHCAM_WGMMA_TEST_MODE", &mode), ("EMU_PROFILE", &one)],
        );
        let n = |k: &str| common::cuda::launches(&se, k);
        let (wb, ws) = (
            n("conv2d_fwd_bn_wgmma_n128"),
            n("conv2d_fwd_stats_wgmma_n128"),
        );
        let (mb, ms) = (
            n("conv2d_fwd_bn_mma_nhwc_bf16s"),
            n("conv2d_fwd_stats_mma_nhwc_bf16s"),
        );
        if on {
            assert!(
                wb == 1 && ws == 1 && mb == 0 && ms == 0,
                "switch on: wgmma {wb} / {ws}, mma.sync {mb} / {ms} launches:\n{se}"
            );
        } else {
            assert!(
                wb == 0 && ws == 0 && mb == 1 && ms == 1,
                "switch off: wgmma {wb} / {ws}, mma.sync {mb} / {ms} launches:\n{se}"
            );
        }
        seen.push(format!(
            "switch {}: eval wgmma {wb} mma.sync {mb}, training wgmma {ws} mma.sync {ms}",
            if on { "on" } else { "off" }
        ));
    }
    println!("wgmma launches (emulator profile): {}", seen.join("; "));
}

/// Without the module the switch falls back. The parent (on the emulator) runs this test
/// again in a child process whose kernel folder (`EMU_KERNEL_DIR`) lacks conv_wgmma's host
/// module, so that the module does not load (neither the precompiled PTX nor NVRTC's): there
/// no wgmma kernel is named, the eval and training ops give the switch-off results bit for
/// bit, and the child's stderr holds the note exactly once.
fn wgmma_falls_back_without_the_module() {
    if std::env::var_os(CHILD).is_some() {
        let (wg, mma) = backends();
        assert_eq!(wg.info().compute_capability, (9, 0), "the emulated device");
        let why = wg
            .wgmma_unavailable()
            .expect("the module does not load in the child");
        println!("child: wgmma unavailable: {why}");
        let mut rng = SplitMix64::fresh("conv_wgmma_fallback");
        for (s, _) in cases().into_iter().take(4) {
            assert_eq!(wg.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s), None, "{s:?}");
            assert_eq!(wg.conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&s), None, "{s:?}");
            let c = train_case(&mut rng, s, true, true);
            assert!(
                gpu_bf16s(&wg, &c) == gpu_bf16s(&mma, &c),
                "{s:?}: eval fallback differs"
            );
            assert!(
                train_op(&wg, &c) == train_op(&mma, &c),
                "{s:?}: training fallback differs"
            );
        }
        return;
    }
    let dirs = std::env::var("EMU_KERNEL_DIR").expect("the emulator sets EMU_KERNEL_DIR");
    let tmp = std::env::temp_dir().join(format!("ichcam-wgmma-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut linked = 0;
    for d in dirs.split(':').filter(|d| !d.is_empty()) {
        for e in std::fs::read_dir(d).expect("read a kernel folder") {
            let p = e.expect("a folder entry").path();
            let name = p.file_name().expect("a name").to_owned();
            if p.extension().is_some_and(|x| x == "so") && name != "conv_wgmma.so" {
                std::os::unix::fs::symlink(&p, tmp.join(&name)).expect("symlink");
                linked += 1;
            }
        }
    }
    assert!(linked > 0, "no host modules in {dirs}");
    let (so, se) = common::cuda::child(
        CHILD,
        "wgmma_falls_back_without_the_module",
        &[("EMU_KERNEL_DIR", tmp.as_os_str())],
    );
    let _ = std::fs::remove_dir_all(&tmp);
    let notes = se.matches("note: wgmma kernels opted in").count();
    assert_eq!(notes, 1, "the note {notes} times:\n{se}");
    println!(
        "wgmma without the module: {}; the note once: {}",
        so.lines().find(|l| l.starts_with("child:")).unwrap_or("?"),
        se.lines()
            .find(|l| l.contains("note: wgmma"))
            .unwrap_or("?")
    );
}
