//! The opt-in sm_90a `wgmma` kernel of the channels-last bf16-storage WEIGHT gradient
//! (`kernels/conv_wgmma.cu`'s last section: `conv2d_bwd_weight_wgmma_n128` / `_n64`, dw OIHW f32
//! from x and dy NHWC in bf16 storage, both operands MN-major: `wgmma` with imm-trans-a =
//! imm-trans-b = 1, split over the pixels by the mma.sync kernel's plan and summed by
//! `conv_splitk_reduce`) through the backend op `conv2d_bwd_weight_nhwc_bf16` with
//! `CudaBackend::set_wgmma(true)`, each shape first asserted to take it
//! (`conv_bwd_weight_nhwc_bf16s_wgmma_kernel`: `_n64` where `c_in * kh * kw <= 64`, else
//! `_n128`), dw poisoned with NaN first:
//!
//! - against the CPU reference `conv2d_bwd_weight` (f32, NCHW, transposed and packed here): on
//!   bf16-exact x and dy within 1e-5 relative (L2) and 2e-5 of the largest |dw| (exact
//!   products, only the f32 summation order differs), and on unrounded ones within the bf16
//!   tolerance 1e-2 relative of the CPU's f32 result on the unrounded data;
//! - against the mma.sync kernel (`conv2d_bwd_weight_mma_nhwc_bf16s`, the switch off) on the
//!   same data: bit for bit on the emulated driver (the same products, per split from 0 in
//!   pixel order, the same splits and the same split-order reduction; the emulator's mma.sync
//!   and wgmma both add in k order with fmaf), within 1e-5 relative on a GPU (its tensor cores
//!   add in their own order), the bit-for-bit count printed;
//! - a captured graph of the op (split-K workspace from the arena) replays bit for bit;
//! - the route: off by default, off at f32 / tf32, with the route `Never` and with less shared
//!   memory per block than the ring's (`limit_shared_memory_for_tests`), off for shapes
//!   it does not support (`c_in % 8 != 0`, `c_out % 8 != 0`: the mma.sync kernel runs them,
//!   bit for bit what the switch-off backend gives), never on a device that is not compute
//!   capability 9.0;
//! - the model's stage-1 training step at bf16 (channels-last, bf16 activation storage, the
//!   default there) with the switch on: its gradients bit for bit (emulator; within 3e-2 on a
//!   GPU) the switch-off step's, and (emulator only, the launch counts of `EMU_PROFILE=1` in a
//!   child process) it launches the wgmma weight gradient for every channels-last weight
//!   gradient (its 5 layer convolutions, `c_in`, `c_out` multiples of 8; the stem runs the NCHW
//!   kernels) and the mma.sync one for none, with the switch off the reverse.
//!
//! The PTX for `compute_90a` (NVRTC's at run time and build.rs's precompiled one, where the
//! build had NVRTC) holds both kernels and their wgmma with both transpose immediates 1
//! (`..., p, 1, 1, 1, 1;`); ptxas's registers and spills for them: tests/cuda_conv_wgmma.rs
//! (`wgmma_ptx_for_sm90a` assembles every kernel of the file).
//!
//! Shapes: 1x1 stride 1 and 2, 3x3 stride 1 and 2 with and without padding, 7x7 stride 2
//! padding 3, odd image sizes, c_out a multiple of neither tile, ragged column tiles, c_in 8
//! (one column chunk per tap), both column tiles (64 and 128), reductions long enough to be
//! split over the pixels (4096 pixels: 16 splits of 256 on the emulated device's 132
//! multiprocessors) at both tiles, and 675 pixels in 2 splits of 352 (the mma.sync kernel's
//! chunks are multiples of its 32-pixel K tile: a split then ends inside a 64-pixel one).
//! Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_wgmma_wgrad-* --include-ignored`),
//! whose device is compute capability 9.0; without a device the device tests are ignored.

mod common;
use common::cuda::{device, emulated, emulator, max_err, rel_err, round, Needs, Test};
use common::nhwc::{cpu_dw, gpu_dw_bf16s, upload_wgrad_bf16s, wgrad_data};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cuda::module::{compile_for_arch, kernel};
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{ActStorage, Backend, Conv2d, Precision};
use ichcam::model::{IchNet, ModelConfig};

fn main() {
    common::cuda::main(vec![
        device(
            "wgmma_wgrad_matches_cpu_and_mma",
            wgmma_wgrad_matches_cpu_and_mma,
        ),
        device(
            "wgmma_wgrad_route_and_fallbacks",
            wgmma_wgrad_route_and_fallbacks,
        ),
        device(
            "wgmma_wgrad_replays_in_a_graph",
            wgmma_wgrad_replays_in_a_graph,
        ),
        device(
            "wgmma_wgrad_in_the_training_step",
            wgmma_wgrad_in_the_training_step,
        ),
        emulator(
            "wgmma_wgrad_launches_in_the_training_step",
            wgmma_wgrad_launches_in_the_training_step,
        ),
        Test {
            name: "wgmma_wgrad_ptx_for_sm90a",
            run: wgmma_wgrad_ptx_for_sm90a,
            needs: Needs::Nvrtc,
        },
    ])
}

const N64: &str = "conv2d_bwd_weight_wgmma_n64";
const N128: &str = "conv2d_bwd_weight_wgmma_n128";

/// The shapes (all `c_in % 8 == 0`, `c_out % 8 == 0`), the kernel each takes, what each
/// exercises.
fn shapes() -> Vec<(Conv2d, &'static str, &'static str)> {
    vec![
        (
            conv(2, 64, 9, 11, 136, 1, 1, 0),
            N64,
            "1x1 s1, c_in*kh*kw 64 (one 64-column tile), c_out 136 (two channel tiles)",
        ),
        (
            conv(2, 128, 10, 9, 64, 1, 2, 0),
            N128,
            "1x1 s2, 128 columns, odd output 5x5",
        ),
        (
            conv(2, 16, 13, 11, 40, 3, 1, 1),
            N128,
            "3x3 s1 p1, 144 columns (a ragged second tile), c_out 40",
        ),
        (
            conv(3, 32, 15, 17, 72, 3, 2, 1),
            N128,
            "3x3 s2 p1, odd sizes, 288 columns",
        ),
        (
            conv(1, 8, 9, 7, 24, 3, 1, 0),
            N128,
            "3x3 s1 no padding, c_in 8 (one 16-byte chunk per tap), 72 columns",
        ),
        (
            conv(2, 8, 23, 21, 64, 7, 2, 3),
            N128,
            "7x7 s2 p3 (a stem with c_in 8), 392 columns",
        ),
        (
            conv(2, 8, 7, 5, 16, 1, 1, 0),
            N64,
            "1x1, c_in 8, 70 pixels (one partial K tile)",
        ),
        (
            conv(3, 16, 15, 15, 32, 3, 1, 1),
            N128,
            "3x3 s1 p1, 675 pixels in 2 splits of 352 (a split ending inside a 64-pixel K tile)",
        ),
        (
            conv(16, 64, 16, 16, 64, 3, 1, 1),
            N128,
            "3x3 s1 p1, 4096 pixels split over the pixels, 576 columns",
        ),
        (
            conv(16, 64, 16, 16, 128, 1, 1, 0),
            N64,
            "1x1, 4096 pixels split over the pixels, the 64-column tile",
        ),
    ]
}

fn differing(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

/// (switch on, switch off) at bf16.
fn backends() -> (CudaBackend, CudaBackend) {
    let mma = common::cuda::gpu_at(Precision::Bf16);
    let mut wg = mma.clone();
    wg.set_wgmma(true);
    (wg, mma)
}

fn hopper(g: &CudaBackend) -> bool {
    g.info().compute_capability == (9, 0)
}

fn wgmma_wgrad_matches_cpu_and_mma() {
    let (wg, mma) = backends();
    let on = hopper(&wg);
    let mut rng = SplitMix64::fresh("conv_wgmma_wgrad");
    let (mut worst, mut worst_max, mut worst_u) = (0.0f64, 0.0f64, 0.0f64);
    let (mut same, mut total) = (0usize, 0usize);
    for (s, kernel, what) in shapes() {
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s),
            on.then_some(kernel),
            "{s:?} ({what})"
        );
        assert_eq!(mma.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s), None);
        // The op's other name function names its mma.sync kernel, switch on or off (the one
        // that runs where the wgmma name is None).
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_kernel(&s),
            mma.conv_bwd_weight_nhwc_bf16s_kernel(&s),
            "{s:?}"
        );
        assert!(
            mma.conv_bwd_weight_nhwc_bf16s_kernel(&s)
                .is_some_and(|k| k.contains("_mma_")),
            "{s:?}"
        );
        let (x, dy) = wgrad_data(&mut rng, &s);
        let (xr, dyr) = (round(Precision::Bf16, &x), round(Precision::Bf16, &dy));
        let got = gpu_dw_bf16s(&wg, &s, &xr, &dyr);
        let want = cpu_dw(&s, &xr, &dyr);
        let (e, em) = (rel_err(&got, &want), max_err(&got, &want));
        assert!(
            e < 1e-5 && em < 2e-5,
            "{s:?} ({what}): bf16-exact data: relative error {e:e} (limit 1e-5), max {em:e} (limit 2e-5)"
        );
        // Unrounded data: the op rounds x and dy to bf16 storage; the CPU keeps f32.
        let eu = rel_err(&gpu_dw_bf16s(&wg, &s, &x, &dy), &cpu_dw(&s, &x, &dy));
        assert!(
            eu < 1e-2 && eu > 1e-5,
            "{s:?} ({what}): unrounded data: relative error {eu:e} (bf16 tolerance 1e-2, above 1e-5: the bf16 path ran)"
        );
        let theirs = gpu_dw_bf16s(&mma, &s, &xr, &dyr);
        let d = differing(&got, &theirs);
        if emulated() {
            assert_eq!(
                d,
                0,
                "{s:?} ({what}): {d} of {} dw values differ from the mma.sync kernel's",
                got.len()
            );
        } else {
            let r = rel_err(&got, &theirs);
            assert!(r < 1e-5, "{s:?} ({what}): {r:e} from the mma.sync kernel");
        }
        same += got.len() - d;
        total += got.len();
        worst = worst.max(e);
        worst_max = worst_max.max(em);
        worst_u = worst_u.max(eu);
        println!(
            "wgmma wgrad {s:?} ({what}; {}): bf16-exact relative {e:.2e} max {em:.2e}, unrounded {eu:.2e}; {} of {} bit for bit the mma.sync kernel",
            wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s).unwrap_or("mma.sync: not compute capability 9.0"),
            got.len() - d,
            got.len()
        );
    }
    println!(
        "wgmma weight gradient, {} shapes: worst relative {worst:.2e}, max {worst_max:.2e} (bf16-exact), unrounded {worst_u:.2e}; {same} of {total} dw values bit for bit the mma.sync kernel's",
        shapes().len()
    );
}

/// Off by default, off where it does not apply, and where it does not run the op gives what
/// the switch-off backend gives, bit for bit.
fn wgmma_wgrad_route_and_fallbacks() {
    let (wg, mma) = backends();
    let on = hopper(&wg);
    let s = shapes()[2].0;
    assert!(!mma.wgmma(), "off by default (ICHCAM_WGMMA unset)");
    assert_eq!(mma.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s), None);
    assert_eq!(
        wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s).is_some(),
        on,
        "on, at bf16, on compute capability 9.0 only"
    );
    for p in [Precision::F32, Precision::Tf32] {
        let mut b = common::cuda::gpu_at(p);
        b.set_wgmma(true);
        assert_eq!(
            b.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s),
            None,
            "at {p}"
        );
    }
    let mut never = wg.clone();
    never.set_mma_route(MmaRoute::Never);
    assert_eq!(
        never.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s),
        None,
        "route Never"
    );
    // Below the ring's 134,144 bytes of shared memory per block (conv_wgmma.cu's WG_SMEM) the
    // mma.sync kernel (104,448) runs; at it, the wgmma kernel.
    for (limit, wgmma) in [(134_143, false), (134_144, true)] {
        let mut lim = wg.clone();
        lim.limit_shared_memory_for_tests(limit)
            .expect("within the device's limit");
        assert_eq!(
            lim.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s).is_some(),
            wgmma && on,
            "shared memory limited to {limit}"
        );
        assert_eq!(
            lim.conv_bwd_weight_nhwc_bf16s_kernel(&s),
            Some("conv2d_bwd_weight_mma_nhwc_bf16s")
        );
    }
    // The 64 / 128 column tiles at their boundary.
    if on {
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&conv(1, 64, 5, 5, 8, 1, 1, 0)),
            Some(N64)
        );
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&conv(1, 72, 5, 5, 8, 1, 1, 0)),
            Some(N128)
        );
    }
    // Unsupported: the mma.sync kernel runs, bit for bit the switch-off result.
    let mut rng = SplitMix64::fresh("conv_wgmma_wgrad_route");
    for (s, why) in [
        (conv(2, 12, 9, 7, 40, 3, 1, 1), "c_in % 8 != 0"),
        (conv(2, 16, 9, 7, 36, 3, 1, 1), "c_out % 8 != 0"),
        (conv(2, 3, 19, 17, 16, 7, 2, 3), "c_in 3 (the stem)"),
    ] {
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s),
            None,
            "{why}"
        );
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_kernel(&s),
            Some("conv2d_bwd_weight_mma_nhwc_bf16s"),
            "{why}"
        );
        let (x, dy) = wgrad_data(&mut rng, &s);
        assert_eq!(
            differing(
                &gpu_dw_bf16s(&wg, &s, &x, &dy),
                &gpu_dw_bf16s(&mma, &s, &x, &dy)
            ),
            0,
            "{s:?} ({why}): the fallback differs from the switch-off backend"
        );
    }
    println!(
        "wgmma wgrad route: off by default, off at f32 / tf32 / route Never / c_in or c_out % 8 != 0 (the fallback bit for bit the mma.sync kernel's); on: {}",
        if on { "compute capability 9.0" } else { "never (not compute capability 9.0)" }
    );
}

/// A captured weight gradient split over the pixels (its workspace from the arena) replays bit
/// for bit what the eager call wrote.
fn wgmma_wgrad_replays_in_a_graph() {
    // A backend of its own (its own stream): the other tests' work on the shared stream would
    // break the capture.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes bf16");
    g.set_wgmma(true);
    let s = shapes()[8].0;
    assert_eq!(
        g.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s).is_some(),
        hopper(&g)
    );
    let mut rng = SplitMix64::fresh("conv_wgmma_wgrad_graph");
    let (x, dy) = wgrad_data(&mut rng, &s);
    let eager = gpu_dw_bf16s(&g, &s, &x, &dy);
    let (xb, dyb) = upload_wgrad_bf16s(&g, &s, &x, &dy);
    let got = common::cuda::capture_replay(&g, &vec![f32::NAN; s.w_len()], |dw| {
        g.conv2d_bwd_weight_nhwc_bf16(&s, &xb, &dyb, dw)
    });
    assert!(got.iter().all(|v| v.is_finite()), "a non-finite output");
    assert_eq!(
        differing(&got, &eager),
        0,
        "the replay differs from the eager call"
    );
    println!(
        "wgmma wgrad graph: {s:?}, {} dw values replayed bit for bit",
        got.len()
    );
}

/// The tiny net of the training-step tests: layers of 8 and 16 channels (the wgmma kernel's;
/// the stem, `c_in` 3, runs the NCHW kernels).
fn step_config() -> ModelConfig {
    ModelConfig {
        layers: vec![1, 1],
        base_width: 8,
        lstm_hidden: 5,
        ..ModelConfig::tiny()
    }
}

/// Batch, sequence, height and width of the training-step tests.
const STEP: (usize, usize, usize, usize) = (2, 3, 29, 26);

/// An input of the training step.
fn step_input() -> Vec<f32> {
    let (batch, seq, h, w) = STEP;
    let mut rng = SplitMix64::fresh("conv_wgmma_wgrad_step");
    rng.vec_f32(batch * seq * step_config().in_channels * h * w, -1.0, 1.0)
}

/// One stage-1 forward and backward of the tiny net on `g` (from seed 13) on input `x`: the
/// loss and every gradient, in name order.
fn train_step(g: &CudaBackend, x: &[f32]) -> (f64, Vec<(String, Vec<f32>)>) {
    let (batch, seq, h, w) = STEP;
    let n = batch * seq;
    let mut net = IchNet::new(g.clone(), step_config(), 13).expect("net");
    let labels: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
    let out = net
        .stage1_forward_backward(x, &labels, batch, seq, h, w, 1.5)
        .expect("stage-1 step");
    assert_eq!(
        net.train_channels_last(),
        Some(true),
        "channels-last training"
    );
    assert_eq!(net.train_storage(), Some(ActStorage::Bf16), "bf16 storage");
    let grads = net
        .names()
        .into_iter()
        .filter_map(|name| net.grad(&name).ok().map(|g| (name, g)))
        .collect();
    (out.loss, grads)
}

/// The model's training step with the switch on: its layers' weight gradients take the wgmma
/// kernel (asserted by shape here; by launch counts in
/// [`wgmma_wgrad_launches_in_the_training_step`]), and its loss and gradients are the
/// switch-off step's (bit for bit on the emulator: every wgmma kernel there gives the mma.sync
/// kernel's bits).
fn wgmma_wgrad_in_the_training_step() {
    let (wg, mma) = backends();
    // The layer convolutions of the step (3x3, 8 -> 8 and 8 -> 16 stride 2, 16 -> 16; the 1x1
    // projection): all the wgmma kernel's on compute capability 9.0.
    for s in [
        conv(6, 8, 8, 7, 8, 3, 1, 1),
        conv(6, 8, 8, 7, 16, 3, 2, 1),
        conv(6, 16, 4, 4, 16, 3, 1, 1),
        conv(6, 8, 8, 7, 16, 1, 2, 0),
    ] {
        assert_eq!(
            wg.conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&s).is_some(),
            hopper(&wg),
            "{s:?}"
        );
    }
    let x = step_input();
    let (l_on, g_on) = train_step(&wg, &x);
    let (l_off, g_off) = train_step(&mma, &x);
    assert_eq!(g_on.len(), g_off.len());
    let (mut num, mut den, mut differ, mut total) = (0.0f64, 0.0f64, 0usize, 0usize);
    for ((na, a), (nb, b)) in g_on.iter().zip(&g_off) {
        assert_eq!(na, nb);
        assert!(a.iter().all(|v| v.is_finite()), "gradient of {na}");
        differ += differing(a, b);
        total += a.len();
        for (&x, &y) in a.iter().zip(b) {
            num += (x as f64 - y as f64).powi(2);
            den += (y as f64).powi(2);
        }
    }
    let rel = (num / den.max(1e-300)).sqrt();
    if emulated() {
        assert!(
            differ == 0 && l_on.to_bits() == l_off.to_bits(),
            "switch on vs off: {differ} of {total} gradient values differ, loss {l_on} vs {l_off}"
        );
    } else {
        assert!(rel < 3e-2, "switch on vs off: gradients {rel:e} apart");
        assert!(
            (l_on - l_off).abs() <= 3e-2 * l_off.abs(),
            "loss {l_on} vs {l_off}"
        );
    }
    println!(
        "wgmma wgrad training step: loss {l_on} (switch off {l_off}); {} of {total} gradient values bit for bit the switch-off step's, relative {rel:.2e}",
        total - differ
    );
}

const CHILD: &str = "ICHCAM_WGMMA_WGRAD_TEST_CHILD";

/// Which weight-gradient kernels the training step launches (emulator only: its profile
/// counts launches by name), in a child process: with the switch on the wgmma kernel for every
/// channels-last weight gradient of the step (its 5 layer convolutions; the stem runs the
/// NCHW kernels) and no mma.sync one, with it off the reverse.
fn wgmma_wgrad_launches_in_the_training_step() {
    if std::env::var_os(CHILD).is_some() {
        let mut g = common::cuda::gpu_at(Precision::Bf16);
        g.set_wgmma(std::env::var("ICHCAM_WGMMA_TEST_MODE").is_ok_and(|m| m == "on"));
        train_step(&g, &step_input());
        return;
    }
    let mut seen = Vec::new();
    let mut mma_off = 0;
    for on in [false, true] {
        let (_, se) = common::cuda::child(
            CHILD,
            "wgmma_wgrad_launches_in_the_training_step",
            &[
                ("ICHCAM_WGMMA_TEST_MODE", if on { "on" } else { "off" }),
                ("EMU_PROFILE", "1"),
            ],
        );
        let wgmma = common::cuda::launches(&se, N64) + common::cuda::launches(&se, N128);
        let mma = common::cuda::launches(&se, "conv2d_bwd_weight_mma_nhwc_bf16s");
        if on {
            assert!(
                wgmma > 0 && mma == 0 && wgmma == mma_off,
                "switch on: wgmma {wgmma}, mma.sync {mma} weight-gradient launches (switch off: {mma_off}):\n{se}"
            );
        } else {
            assert!(
                wgmma == 0 && mma > 1,
                "switch off: wgmma {wgmma}, mma.sync {mma} weight-gradient launches:\n{se}"
            );
            mma_off = mma;
        }
        seen.push(format!(
            "switch {}: wgmma {wgmma}, mma.sync {mma}",
            if on { "on" } else { "off" }
        ));
    }
    println!(
        "training step weight-gradient launches (emulator profile): {}",
        seen.join("; ")
    );
}

/// Both kernels and their MN-major wgmma (imm-trans-a = imm-trans-b = 1: the asm's "n"
/// operands become the immediates) in NVRTC's compute_90a PTX and build.rs's precompiled one.
fn wgmma_wgrad_ptx_for_sm90a() {
    let k = kernel("conv_wgmma").expect("kernels/conv_wgmma.cu is built in");
    let runtime = compile_for_arch(k, "compute_90a")
        .expect("NVRTC compiles conv_wgmma.cu for compute_90a")
        .to_src();
    let mut ptxs = vec![("run-time", runtime.as_str())];
    if let Some(pre) = k.ptx_sm90a {
        ptxs.push(("precompiled", pre));
    }
    for (what, ptx) in &ptxs {
        for entry in [N64, N128] {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "the {what} compute_90a PTX has no {entry}"
            );
        }
        let trans = ptx
            .lines()
            .filter(|l| l.contains("wgmma.mma_async") && l.trim_end().ends_with("p, 1, 1, 1, 1;"))
            .count();
        assert!(
            trans >= 2,
            "the {what} compute_90a PTX has {trans} wgmma with imm-trans-a = imm-trans-b = 1"
        );
        println!("wgmma wgrad {what} compute_90a PTX: both kernels, {trans} MN-major wgmma (p, 1, 1, 1, 1)");
    }
}
