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
//! - its PTX for `compute_90a` (NVRTC at run time, as module.rs compiles it) holds the wgmma
//!   instructions, build.rs's `compute_90` PTX of the file none, and ptxas (where found:
//!   `PTXAS`, `PATH`, or beside NVRTC) assembles it for sm_90a without spills, printing the
//!   registers (`ICHCAM_SM90A_PTX_OUT=path` also writes the PTX out: scripts/cuda-emu.sh test).
//!
//! Shapes: 1x1 stride 1 and 2, 3x3 stride 1 and 2 with and without padding, 5x5, c_out a
//! multiple of neither tile (odd too), c_out <= 64 (the 64-channel kernel), more K tiles than
//! the ring's 4 stages, pixels not a multiple of 128. Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_wgmma-* --include-ignored`), whose
//! device is compute capability 9.0; without a device the device tests are ignored.

mod common;
use common::cuda::{device, rel_err, round, Needs, Test};
use common::nhwc::{bf16_value, bn_of, bn_params, cpu_nhwc, halves, pack, to_nhwc, ulps, Case};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cuda::module::{compile_for_arch, kernel};
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

const POISON: u32 = 0xffff_ffff;
const NEAR_ZERO: f64 = 2e-5;

/// The op on `c` (x and the residual transposed to NHWC and packed), y poisoned first: the
/// output's bf16 halves, every one written and finite.
fn run_op(g: &CudaBackend, c: &Case) -> Vec<u16> {
    let s = &c.s;
    let up = |v: &[f32]| g.upload(v).expect("upload");
    let xb = up(&pack(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w)));
    let wb = up(&c.w);
    let [ga, be_, m, v] = [0, 1, 2, 3].map(|i| up(&c.bn[i]));
    let hw = s.out_h() * s.out_w();
    let rb = c
        .residual
        .as_deref()
        .map(|r| up(&pack(&to_nhwc(r, s.n, s.c_out, hw))));
    let mut y = up(&vec![f32::from_bits(POISON); s.y_len().div_ceil(2)]);
    g.conv2d_bn_eval_fwd_nhwc_bf16(
        s,
        &bn_of(s),
        &xb,
        &wb,
        &ga,
        &be_,
        &m,
        &v,
        rb.as_ref(),
        c.relu,
        &mut y,
    )
    .expect("conv2d_bn_eval_fwd_nhwc_bf16");
    let slots = g.download(&y).expect("download");
    if s.y_len() % 2 == 1 {
        let last = slots.last().expect("a slot").to_bits();
        assert_eq!(
            last >> 16,
            0xffff,
            "{s:?}: the unused high half was written"
        );
    }
    let h = halves(&slots, s.y_len());
    assert!(
        h.iter().all(|&v| bf16_value(v).is_finite()),
        "{s:?}: an output not written (or not finite)"
    );
    h
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
        let got = run_op(&wg, &rounded);
        let (ex, near) = close(&label, "the CPU's", &got, &cpu_nhwc(&rounded));
        assert!(
            ex * 100 >= got.len() * 99,
            "{label}: only {ex} of {} outputs exact",
            got.len()
        );
        // The mma.sync kernel on the same inputs.
        let by_mma = run_op(&mma, &rounded);
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
        let vals: Vec<f32> = run_op(&wg, &raw).iter().map(|&h| bf16_value(h)).collect();
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
    let eager = run_op(&g, &c);
    let up = |v: &[f32]| g.upload(v).expect("upload");
    let xb = up(&pack(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w)));
    let wb = up(&c.w);
    let [ga, be_, m, v] = [0, 1, 2, 3].map(|i| up(&c.bn[i]));
    let hw = s.out_h() * s.out_w();
    let rb = up(&pack(&to_nhwc(
        c.residual.as_deref().expect("a residual"),
        s.n,
        s.c_out,
        hw,
    )));
    let mut y = up(&vec![f32::from_bits(POISON); s.y_len().div_ceil(2)]);
    let (graph, ()) = g
        .capture(|| {
            g.conv2d_bn_eval_fwd_nhwc_bf16(
                &s,
                &bn_of(&s),
                &xb,
                &wb,
                &ga,
                &be_,
                &m,
                &v,
                Some(&rb),
                true,
                &mut y,
            )
        })
        .expect("capture");
    assert!(
        g.download(&y)
            .expect("download")
            .iter()
            .all(|v| v.to_bits() == POISON),
        "nothing runs while capturing"
    );
    graph.replay().expect("replay");
    let got = halves(&g.download(&y).expect("download"), s.y_len());
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
            run_op(&wg, &c) == run_op(&mma, &c),
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
    let ptx = compile_for_arch(k, "compute_90a")
        .expect("NVRTC compiles conv_wgmma.cu for compute_90a")
        .to_src();
    for needle in [
        ".target sm_90a",
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
        "wgmma.fence.sync.aligned",
        "wgmma.commit_group.sync.aligned",
        "wgmma.wait_group.sync.aligned",
        "fence.proxy.async.shared::cta",
        "cp.async.cg.shared.global",
    ] {
        assert!(
            ptx.contains(needle),
            "the compute_90a PTX has no `{needle}`"
        );
    }
    if let Some(pre) = k.ptx_sm90 {
        assert!(
            !pre.contains("wgmma.mma_async"),
            "build.rs's compute_90 PTX of conv_wgmma.cu has wgmma (it cannot assemble for sm_90)"
        );
    }
    if let Some(out) = std::env::var_os("ICHCAM_SM90A_PTX_OUT") {
        std::fs::write(&out, &ptx).expect("write ICHCAM_SM90A_PTX_OUT");
    }
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
    std::fs::write(&file, &ptx).expect("write the PTX");
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
    assert!(
        lines.iter().filter(|l| l.contains("Used")).count() == 2,
        "ptxas reported no registers for the two kernels:\n{log}"
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
