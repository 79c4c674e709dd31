//! The opt-in sm_90a `wgmma` kernel of the channels-last bf16-storage DATA gradient
//! (`kernels/conv_wgmma.cu`: `conv2d_bwd_data_wgmma_n128` / `_n64`, dy bf16 NHWC two values to
//! an f32 slot, dx f32 NHWC, per output phase) through the backend op
//! `conv2d_bwd_data_nhwc_bf16` with `CudaBackend::set_wgmma(true)`, each shape first asserted
//! to take it (`conv_bwd_data_nhwc_bf16s_wgmma_kernel`), dx poisoned (NaN) first:
//!
//! - against the CPU reference `conv2d_bwd_data` (f32, NCHW, transposed here): on bf16-exact
//!   dy and w within 1e-5 relative (the same exact products, f32 sums in another order); on
//!   unrounded w the same dx bit for bit (the weight copy rounds to nearest even as the host
//!   does) and within 1e-2 relative of the CPU's on the unrounded w (and above 1e-5: the
//!   bf16 path ran); every dx value written;
//! - against the mma.sync kernel (`conv2d_bwd_data_mma_nhwc_bf16s` / `_m64`, the switch off)
//!   on the same inputs: the wgmma kernel sums the same products in the same k order, so on
//!   the emulated driver (both instructions accumulate with fmaf in k order from zero) dx is
//!   bit for bit that kernel's (asserted there; on a GPU, whose tensor cores add in their own
//!   order, within 1e-5 relative, the count bit for bit printed);
//! - a stride-2 gradient with one infinite weight of tap (0, 0) leaves every pixel that tap
//!   cannot reach finite and the CPU's (no structurally zero tap multiplied, no phase reading
//!   another phase's weight rows);
//! - a captured graph (the weight copy and the kernel) replays bit for bit what the eager call
//!   wrote;
//! - the route: off by default, off at f32 / tf32 and with the route `Never`, off where
//!   `c_out % 8 != 0` (the mma.sync kernel named and run: bit for bit the switch-off result),
//!   and for a dy that is not 16-byte aligned (a view 8 bytes into an allocation: the result
//!   bit for bit the switch-off backend's on the same view and the aligned call's);
//! - which kernels run (emulator only, its `EMU_PROFILE=1` launch counts in a child
//!   process): the op with the switch on launches the wgmma kernel and no mma.sync data
//!   gradient, the misaligned dy the reverse; one stage-1 training step of the tiny model
//!   (bf16, channels-last, bf16 storage: asserted) launches only wgmma data gradients with
//!   the switch on (as many as the mma.sync ones with it off), its loss bit for bit the
//!   switch-off step's; without conv_wgmma's module (a child whose emulated kernel folder
//!   lacks it) no wgmma data gradient is named or launched, the op's results are the
//!   switch-off ones bit for bit, and the note comes once.
//!
//! Shapes: 1x1 stride 1 and 2 (three phases without taps: zeros), 3x3 stride 1 and 2 with and
//! without padding, 5x5, 7x7 stride 2 padding 3 (the stem), 2x2 stride 3 (a phase without
//! taps along each axis), a 3x1 kernel, odd sizes, `c_in` <= 64 (the 64-channel kernel), over
//! 128 (two channel tiles, a ragged one) and odd (4-byte stores), phases of several pixel
//! tiles, more K tiles than the ring's 4 stages. Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_wgmma_dgrad-* --include-ignored`),
//! whose device is compute capability 9.0; without a device the device tests are ignored.

mod common;
use common::cuda::{device, emulated, emulator, gpu_at, rel_err, round, Needs, Test};
use common::nhwc::{check_zero_taps, cpu_dx, pack, to_nhwc};
use common::rng::SplitMix64;
use common::shapes::conv;

use cudarc::driver::CudaSlice;
use ichcam::engine::cuda::module::{compile_for_arch, kernel, precompiled};
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{ActStorage, Backend, Conv2d, Precision};
use ichcam::model::{IchNet, ModelConfig};

fn main() {
    common::cuda::main(vec![
        device(
            "wgmma_dgrad_matches_cpu_and_mma",
            wgmma_dgrad_matches_cpu_and_mma,
        ),
        device(
            "wgmma_dgrad_skips_the_zero_taps",
            wgmma_dgrad_skips_the_zero_taps,
        ),
        device(
            "wgmma_dgrad_replays_in_a_graph",
            wgmma_dgrad_replays_in_a_graph,
        ),
        device("wgmma_dgrad_route", wgmma_dgrad_route),
        emulator(
            "wgmma_dgrad_launches_the_wgmma_kernel",
            wgmma_dgrad_launches_the_wgmma_kernel,
        ),
        emulator(
            "wgmma_dgrad_falls_back_without_the_module",
            wgmma_dgrad_falls_back_without_the_module,
        ),
        Test {
            name: "wgmma_dgrad_in_the_sm90a_ptx",
            run: wgmma_dgrad_in_the_sm90a_ptx,
            needs: Needs::Nvrtc,
        },
    ])
}

/// The shapes (all `c_out % 8 == 0`) and what each exercises.
fn cases() -> Vec<(Conv2d, &'static str)> {
    vec![
        (
            conv(2, 64, 9, 11, 136, 1, 1, 0),
            "1x1 s1, c_in 64 (n64), K 136 (3 K tiles, a tail)",
        ),
        (
            conv(3, 32, 9, 13, 128, 1, 2, 0),
            "1x1 s2: three phases without taps (zeros)",
        ),
        (
            conv(2, 136, 11, 9, 16, 3, 1, 1),
            "3x3 s1 p1, c_in 136: two 128-channel tiles, the second ragged",
        ),
        (
            conv(3, 24, 13, 12, 160, 3, 2, 1),
            "3x3 s2 p1, odd 13x12: phases of 4, 2, 2, 1 taps",
        ),
        (conv(2, 32, 15, 17, 64, 3, 2, 0), "3x3 s2 p0, 15x17"),
        (
            conv(1, 16, 23, 21, 8, 7, 2, 3),
            "7x7 s2 p3 (the stem), c_out 8: phases of 16, 12, 12, 9 taps",
        ),
        (
            conv(1, 8, 9, 9, 96, 3, 1, 1),
            "K 864: 14 K tiles over a 4-stage ring",
        ),
        (
            conv(2, 8, 24, 22, 24, 3, 2, 1),
            "3x3 s2, phases of 264 pixels (3 pixel tiles)",
        ),
        (conv(1, 33, 7, 9, 24, 3, 1, 1), "odd c_in 33: 4-byte stores"),
        (
            conv(1, 200, 8, 7, 8, 5, 1, 2),
            "5x5 s1 p2, c_in 200 (n128, ragged), c_out 8",
        ),
        (
            conv(2, 16, 10, 11, 16, 2, 3, 1),
            "2x2 s3 p1: phases without taps along each axis",
        ),
        (
            Conv2d {
                n: 2,
                c_in: 72,
                h: 9,
                w: 10,
                c_out: 40,
                kh: 3,
                kw: 1,
                stride: 2,
                pad: 1,
            },
            "3x1 s2 p1, c_in 72 (n128, ragged)",
        ),
    ]
}

/// The kernel the wgmma route names for `s`.
fn wgmma_kernel(s: &Conv2d) -> &'static str {
    if s.c_in <= 64 {
        "conv2d_bwd_data_wgmma_n64"
    } else {
        "conv2d_bwd_data_wgmma_n128"
    }
}

/// The switch-on and switch-off backends at bf16.
fn backends() -> (CudaBackend, CudaBackend) {
    let mma = gpu_at(Precision::Bf16);
    let mut wg = mma.clone();
    wg.set_wgmma(true);
    (wg, mma)
}

/// dy (NCHW) transposed to NHWC and packed into bf16 storage, on the device.
fn upload_dy(g: &CudaBackend, s: &Conv2d, dy: &[f32]) -> CudaSlice<f32> {
    let hw = s.out_h() * s.out_w();
    g.upload(&pack(&to_nhwc(dy, s.n, s.c_out, hw)))
        .expect("upload")
}

/// The backend op on `dy` (device, bf16 storage) and `w` (OIHW f32) into a poisoned dx.
fn op_on(g: &CudaBackend, s: &Conv2d, dy: &CudaSlice<f32>, w: &[f32]) -> Vec<f32> {
    let wb = g.upload(w).expect("upload");
    let mut dx = g.upload(&vec![f32::NAN; s.x_len()]).expect("upload");
    g.conv2d_bwd_data_nhwc_bf16(s, dy, &wb, &mut dx)
        .expect("conv2d_bwd_data_nhwc_bf16");
    let got = g.download(&dx).expect("download");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{s:?}: a dx value not written (or not finite)"
    );
    got
}

/// The backend op on dy (NCHW, host) and w: dx NHWC.
fn op(g: &CudaBackend, s: &Conv2d, dy: &[f32], w: &[f32]) -> Vec<f32> {
    op_on(g, s, &upload_dy(g, s, dy), w)
}

fn same_bits(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() == y.to_bits())
        .count()
}

fn wgmma_dgrad_matches_cpu_and_mma() {
    let (wg, mma) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    let emu = emulated();
    let p = Precision::Bf16;
    let mut rng = SplitMix64::fresh("conv_wgmma_dgrad");
    let (mut total, mut same_as_mma, mut worst_exact, mut worst) = (0usize, 0usize, 0.0f64, 0.0f64);
    for (s, what) in cases() {
        assert_eq!(
            wg.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s),
            hopper.then_some(wgmma_kernel(&s)),
            "{s:?}"
        );
        assert_eq!(mma.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s), None);
        // The op's other name function names its mma.sync kernel, switch on or off (the one
        // that runs where the wgmma name is None).
        assert_eq!(
            wg.conv_bwd_data_nhwc_bf16s_kernel(&s),
            mma.conv_bwd_data_nhwc_bf16s_kernel(&s),
            "{s:?}"
        );
        assert!(
            mma.conv_bwd_data_nhwc_bf16s_kernel(&s)
                .is_some_and(|k| k.contains("_mma_")),
            "{s:?}"
        );
        let label = format!("{s:?} ({what})");
        // dy as the packing stores it (bf16): the CPU takes the same values.
        let dy = round(p, &rng.vec_f32(s.y_len(), -1.0, 1.0));
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let wr = round(p, &w);
        let got = op(&wg, &s, &dy, &wr);
        let e_exact = rel_err(&got, &cpu_dx(&s, &dy, &wr));
        assert!(
            e_exact < 1e-5,
            "{label} on bf16-exact operands: dx relative error {e_exact:e} (>= 1e-5)"
        );
        // The mma.sync kernel on the same inputs: the same products in the same k order.
        let by_mma = op(&mma, &s, &dy, &wr);
        let same = same_bits(&got, &by_mma);
        if emu {
            assert_eq!(
                same,
                got.len(),
                "{label}: only {same} of {} dx values bit for bit the mma.sync kernel's on the emulator",
                got.len()
            );
        } else {
            let e = rel_err(&got, &by_mma);
            assert!(e < 1e-5, "{label}: {e:e} from the mma.sync kernel's dx");
        }
        // Unrounded w: the kernel's weight copy rounds as the host does.
        let got_w = op(&wg, &s, &dy, &w);
        assert_eq!(
            same_bits(&got_w, &got),
            got.len(),
            "{label}: dx on unrounded w differs from dx on the host-rounded w"
        );
        let e = rel_err(&got_w, &cpu_dx(&s, &dy, &w));
        assert!(
            e < 1e-2 && e > 1e-5,
            "{label}: dx relative error {e:e} on unrounded w, expected in (1e-5, 1e-2)"
        );
        total += got.len();
        same_as_mma += same;
        worst_exact = worst_exact.max(e_exact);
        worst = worst.max(e);
        println!(
            "wgmma dgrad {label}: bf16-exact relative error {e_exact:.2e}, unrounded w {e:.2e}; {same} of {} bit for bit the mma.sync kernel's",
            got.len()
        );
    }
    println!(
        "wgmma data gradient ({}), {} shapes: worst relative error {worst_exact:.2e} on bf16-exact operands, {worst:.2e} on unrounded w; {same_as_mma} of {total} dx values bit for bit the mma.sync kernel's",
        if hopper {
            "the wgmma kernel"
        } else {
            "not compute capability 9.0: the mma.sync fallback"
        },
        cases().len()
    );
}

/// With one weight of tap (0, 0) infinite in a stride-2 3x3, only the input pixels that tap
/// reaches (odd rows and columns, its input channel) are not finite; every other dx value is
/// finite and the CPU's: no structurally zero tap multiplied, no phase reads another phase's
/// weight rows or the padding. c_out 8 and 16 (rows of 4, 2, 2, 1 taps times c_out).
fn wgmma_dgrad_skips_the_zero_taps() {
    let (wg, _) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    for c_out in [8, 16] {
        let s = conv(2, 5, 9, 10, c_out, 3, 2, 1);
        assert_eq!(
            wg.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s).is_some(),
            hopper
        );
        let mut rng = SplitMix64::fresh("conv_wgmma_dgrad_zero_taps");
        let mut w = round(Precision::Bf16, &rng.vec_f32(s.w_len(), -1.0, 1.0));
        let dy = round(Precision::Bf16, &rng.vec_f32(s.y_len(), -1.0, 1.0));
        let ci = 3;
        w[(2 * s.c_in + ci) * 9] = f32::INFINITY; // w[co 2][ci 3][0][0]
        let want = cpu_dx(&s, &dy, &w);
        let dyb = upload_dy(&wg, &s, &dy);
        let wb = wg.upload(&w).expect("upload");
        let mut dx = wg.upload(&vec![f32::NAN; s.x_len()]).expect("upload");
        wg.conv2d_bwd_data_nhwc_bf16(&s, &dyb, &wb, &mut dx)
            .expect("conv2d_bwd_data_nhwc_bf16");
        let got = wg.download(&dx).expect("download");
        check_zero_taps(&format!("{s:?}"), &s, ci, &got, &want);
    }
}

/// A captured data gradient (the bf16 weight copy and the kernel, the module loaded and
/// scratch warmed by the eager call) replays bit for bit what the eager call wrote.
fn wgmma_dgrad_replays_in_a_graph() {
    // A backend of its own (its own stream): the other tests' work on the shared stream would
    // break the capture.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes bf16");
    g.set_wgmma(true);
    let s = cases()[3].0; // 3x3 stride 2: four phases
    let hopper = g.info().compute_capability == (9, 0);
    assert_eq!(
        g.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s).is_some(),
        hopper
    );
    let mut rng = SplitMix64::fresh("conv_wgmma_dgrad_graph");
    let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    let dyb = upload_dy(&g, &s, &dy);
    let eager = op_on(&g, &s, &dyb, &w);
    let wb = g.upload(&w).expect("upload");
    let got = common::cuda::capture_replay(&g, &vec![f32::NAN; s.x_len()], |dx| {
        g.conv2d_bwd_data_nhwc_bf16(&s, &dyb, &wb, dx)
    });
    assert_eq!(
        same_bits(&got, &eager),
        eager.len(),
        "the replay differs from the eager call"
    );
}

/// dy packed at 2 f32 slots (8 bytes) into an allocation of its own: a `CudaSlice` whose
/// device address is 8 modulo 16 (the wgmma kernel's 16-byte copies would fault on it), run
/// through `f`, then let go of without freeing (the allocation frees it).
fn with_misaligned_dy<R>(
    g: &CudaBackend,
    s: &Conv2d,
    dy: &[f32],
    f: impl FnOnce(&CudaSlice<f32>) -> R,
) -> R {
    let hw = s.out_h() * s.out_w();
    let packed = pack(&to_nhwc(dy, s.n, s.c_out, hw));
    let mut buf = vec![0.0f32; 2];
    buf.extend_from_slice(&packed);
    let big = g.upload(&buf).expect("upload");
    let addr = g.ptr(&big) + 8;
    assert_eq!(addr % 16, 8, "an allocation is 16-byte aligned");
    // SAFETY: `addr` lies in `big`, which holds `packed.len()` slots from there and outlives
    // the view; the view is leaked (not freed) before `big` is dropped.
    let view = unsafe { g.stream().upgrade_device_ptr::<f32>(addr, packed.len()) };
    let r = f(&view);
    g.synchronize().expect("synchronize");
    let _ = view.leak();
    drop(big);
    r
}

/// Off by default, off where it does not apply, and where it does not run the op gives what
/// the switch-off backend gives, bit for bit.
fn wgmma_dgrad_route() {
    let (wg, mma) = backends();
    let hopper = wg.info().compute_capability == (9, 0);
    let s = cases()[0].0;
    assert!(!mma.wgmma(), "off by default (ICHCAM_WGMMA unset)");
    assert_eq!(mma.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s), None);
    assert_eq!(
        wg.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s).is_some(),
        hopper,
        "on, at bf16, on compute capability 9.0 only"
    );
    for p in [Precision::F32, Precision::Tf32] {
        let mut b = gpu_at(p);
        b.set_wgmma(true);
        assert_eq!(b.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s), None, "at {p}");
    }
    let mut never = wg.clone();
    never.set_mma_route(MmaRoute::Never);
    assert_eq!(
        never.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s),
        None,
        "route Never"
    );
    // Unsupported (c_out % 8 != 0): the mma.sync kernel runs, bit for bit the switch-off result.
    let mut rng = SplitMix64::fresh("conv_wgmma_dgrad_route");
    for s in [
        conv(2, 16, 9, 7, 12, 3, 1, 1),
        conv(1, 70, 9, 7, 5, 3, 2, 1),
    ] {
        assert_eq!(wg.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s), None, "{s:?}");
        let want = if s.c_in <= 64 {
            "conv2d_bwd_data_mma_nhwc_bf16s_m64"
        } else {
            "conv2d_bwd_data_mma_nhwc_bf16s"
        };
        assert_eq!(wg.conv_bwd_data_nhwc_bf16s_kernel(&s), Some(want));
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        assert_eq!(
            same_bits(&op(&wg, &s, &dy, &w), &op(&mma, &s, &dy, &w)),
            s.x_len(),
            "{s:?}: the fallback differs from the switch-off backend"
        );
    }
    // A dy 8 bytes into its allocation: the mma.sync kernel (its 4-byte copies) on both
    // backends, bit for bit; and (on the emulator, where the two kernels agree bit for bit)
    // the aligned wgmma call's result.
    let s = cases()[3].0;
    let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    let on = with_misaligned_dy(&wg, &s, &dy, |v| op_on(&wg, &s, v, &w));
    let off = with_misaligned_dy(&mma, &s, &dy, |v| op_on(&mma, &s, v, &w));
    assert_eq!(
        same_bits(&on, &off),
        on.len(),
        "misaligned dy: the switch-on result differs from the switch-off one"
    );
    let aligned = op(&wg, &s, &dy, &w);
    if emulated() {
        assert_eq!(
            same_bits(&on, &aligned),
            on.len(),
            "misaligned dy: differs from the aligned call"
        );
    }
    println!(
        "wgmma dgrad route: off by default, off at f32 / tf32 / route Never / c_out % 8 != 0 / dy not 16-byte aligned (the fallback bit for bit the mma.sync kernel's); on: {}",
        if hopper {
            "compute capability 9.0"
        } else {
            "never (not compute capability 9.0)"
        }
    );
}

const CHILD: &str = "ICHCAM_WGMMA_DGRAD_TEST_CHILD";
const MODE: &str = "ICHCAM_WGMMA_DGRAD_TEST_MODE";

/// The child's work by [`MODE`]: "op" one switch-on op call, "misaligned" one on a dy 8
/// bytes into its allocation, "step-on" / "step-off" one stage-1 training step of the tiny
/// model (bf16, channels-last, bf16 storage) with the switch on / off, its loss printed,
/// "no-module" the fallback checks of [`wgmma_dgrad_falls_back_without_the_module`].
fn launches_child(mode: &str) {
    let (wg, mma) = backends();
    let mut rng = SplitMix64::fresh("conv_wgmma_dgrad_launches");
    let s = cases()[3].0;
    let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    match mode {
        "op" => {
            op(&wg, &s, &dy, &w);
        }
        "misaligned" => {
            with_misaligned_dy(&wg, &s, &dy, |v| op_on(&wg, &s, v, &w));
        }
        "step-on" | "step-off" => {
            let g = if mode == "step-on" { wg } else { mma };
            let cfg = ModelConfig {
                lstm_hidden: 5,
                ..ModelConfig::tiny()
            };
            let mut net = IchNet::new(g, cfg.clone(), 13).expect("net");
            let (batch, seq, h, w) = (1, 2, 21, 19);
            let mut rng = SplitMix64(17);
            let x = rng.vec_f32(batch * seq * cfg.in_channels * h * w, -1.0, 1.0);
            let labels = [1.0, 0.0];
            let st = net
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("a training step");
            assert_eq!(net.train_channels_last(), Some(true));
            assert_eq!(net.train_storage(), Some(ActStorage::Bf16));
            println!("child: loss {:e}", st.loss);
        }
        "no-module" => {
            // The child's kernel folder lacks conv_wgmma's host module: the switch falls back.
            assert_eq!(wg.info().compute_capability, (9, 0), "the emulated device");
            let why = wg
                .wgmma_unavailable()
                .expect("the module does not load in the child");
            println!("child: wgmma unavailable: {why}");
            for (s, _) in cases().into_iter().take(4) {
                assert_eq!(wg.conv_bwd_data_nhwc_bf16s_wgmma_kernel(&s), None, "{s:?}");
                let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
                let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
                assert_eq!(
                    same_bits(&op(&wg, &s, &dy, &w), &op(&mma, &s, &dy, &w)),
                    s.x_len(),
                    "{s:?}: the fallback differs from the switch-off backend"
                );
            }
        }
        m => panic!("unknown mode {m}"),
    }
}

/// Without the module the switch falls back (emulator only): the parent runs a child whose
/// kernel folder (`EMU_KERNEL_DIR`) lacks conv_wgmma's host module, so that the module does
/// not load on the compute capability 9.0 device; there no wgmma data gradient is named, the
/// op gives the switch-off results bit for bit (4 shapes), the mma.sync kernel runs (launch
/// profile) and the note comes once on stderr.
fn wgmma_dgrad_falls_back_without_the_module() {
    if std::env::var_os(CHILD).is_some() {
        launches_child(&std::env::var(MODE).expect("the mode"));
        return;
    }
    let dirs = std::env::var("EMU_KERNEL_DIR").expect("the emulator sets EMU_KERNEL_DIR");
    let tmp = std::env::temp_dir().join(format!("ichcam-wgmma-dgrad-{}", std::process::id()));
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
    let dir = tmp.to_string_lossy().into_owned();
    let (so, se) = common::cuda::child(
        CHILD,
        "wgmma_dgrad_falls_back_without_the_module",
        &[
            (MODE, "no-module"),
            ("EMU_KERNEL_DIR", &dir),
            ("EMU_PROFILE", "1"),
        ],
    );
    let _ = std::fs::remove_dir_all(&tmp);
    let notes = se.matches("note: wgmma kernels opted in").count();
    assert_eq!(notes, 1, "the note {notes} times:\n{se}");
    let (wg, mma) = (
        common::cuda::launches_prefixed(&se, "conv2d_bwd_data_wgmma_"),
        common::cuda::launches_prefixed(&se, "conv2d_bwd_data_mma_nhwc_bf16s"),
    );
    assert!(
        wg == 0 && mma == 8,
        "without the module: wgmma {wg}, mma.sync {mma} data gradients:\n{se}"
    );
    println!(
        "wgmma dgrad without the module: {}; mma.sync data gradients {mma}, wgmma {wg}; the note once",
        so.lines().find(|l| l.starts_with("child:")).unwrap_or("?")
    );
}

/// Which kernels run (emulator only: its profile counts launches by name), each in a child
/// process with `EMU_PROFILE=1`: the switch-on op launches `conv2d_bwd_data_wgmma_n64` and no
/// mma.sync data gradient; on a misaligned dy the reverse; a training step of the tiny model
/// with the switch on launches wgmma data gradients only, as many as the switch-off step's
/// mma.sync ones, and its loss is bit for bit the switch-off step's (the wgmma forwards run
/// too; on the emulator every wgmma kernel sums in its mma.sync sibling's k order).
fn wgmma_dgrad_launches_the_wgmma_kernel() {
    if std::env::var_os(CHILD).is_some() {
        launches_child(&std::env::var(MODE).expect("the mode"));
        return;
    }
    let run = |mode: &str| {
        let (so, se) = common::cuda::child(
            CHILD,
            "wgmma_dgrad_launches_the_wgmma_kernel",
            &[(MODE, mode), ("EMU_PROFILE", "1")],
        );
        let wg = common::cuda::launches_prefixed(&se, "conv2d_bwd_data_wgmma_");
        let mma = common::cuda::launches_prefixed(&se, "conv2d_bwd_data_mma_nhwc_bf16s");
        let loss = so
            .lines()
            .find_map(|l| l.strip_prefix("child: loss "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        (wg, mma, loss, se)
    };
    let (w1, m1, _, se) = run("op");
    assert!(w1 == 1 && m1 == 0, "op: wgmma {w1}, mma.sync {m1}:\n{se}");
    let (w2, m2, _, se) = run("misaligned");
    assert!(
        w2 == 0 && m2 == 1,
        "misaligned dy: wgmma {w2}, mma.sync {m2}:\n{se}"
    );
    let (w3, m3, l_on, se) = run("step-on");
    assert!(
        w3 > 0 && m3 == 0,
        "training step, switch on: wgmma {w3}, mma.sync {m3} data gradients:\n{se}"
    );
    let (w4, m4, l_off, se) = run("step-off");
    assert!(
        w4 == 0 && m4 == w3,
        "training step, switch off: wgmma {w4}, mma.sync {m4} data gradients (on: {w3}):\n{se}"
    );
    // On the emulator the wgmma kernels (the forwards' too) sum in the mma.sync kernels' k
    // order: the same step, bit for bit.
    let (l_on, l_off) = (l_on.expect("a loss"), l_off.expect("a loss"));
    let d = (l_on - l_off).abs() / l_off.abs().max(1e-30);
    assert!(
        l_on.is_finite() && l_on.to_bits() == l_off.to_bits(),
        "training step loss {l_on:e} with the switch on, {l_off:e} off"
    );
    println!(
        "wgmma dgrad launches (emulator profile): op wgmma {w1} mma.sync {m1}; misaligned dy wgmma {w2} mma.sync {m2}; training step switch on wgmma {w3} mma.sync {m3}, off wgmma {w4} mma.sync {m4}; loss {l_on:e} on vs {l_off:e} off ({d:.1e} apart)"
    );
}

/// The data gradient's two kernels are in conv_wgmma.cu's `compute_90a` PTX, build.rs's
/// precompiled one (where the build had NVRTC) and NVRTC's at run time, with the wgmma
/// instructions (tests/cuda_conv_wgmma.rs's `wgmma_ptx_for_sm90a` assembles the file's PTX
/// with ptxas, every kernel without spills, and prints their registers).
fn wgmma_dgrad_in_the_sm90a_ptx() {
    let k = kernel("conv_wgmma").expect("kernels/conv_wgmma.cu is built in");
    let runtime = compile_for_arch(k, "compute_90a")
        .expect("NVRTC compiles conv_wgmma.cu for compute_90a")
        .to_src();
    assert_eq!(k.ptx_sm90a.is_some(), precompiled());
    let mut ptxs = vec![("run-time", runtime.as_str())];
    if let Some(pre) = k.ptx_sm90a {
        ptxs.push(("precompiled", pre));
    }
    for (what, ptx) in &ptxs {
        for name in ["conv2d_bwd_data_wgmma_n128", "conv2d_bwd_data_wgmma_n64"] {
            let at = ptx
                .find(&format!(".entry {name}("))
                .unwrap_or_else(|| panic!("the {what} compute_90a PTX has no {name}"));
            // The entry's body, up to the next entry.
            let body = &ptx[at..];
            let body = &body[..body[1..].find(".entry ").map_or(body.len(), |e| e + 1)];
            for needle in [
                "wgmma.mma_async.sync.aligned",
                "wgmma.wait_group.sync.aligned",
                "fence.proxy.async.shared::cta",
                "cp.async.cg.shared.global",
            ] {
                assert!(
                    body.contains(needle),
                    "the {what} compute_90a PTX of {name} has no `{needle}`"
                );
            }
        }
    }
    println!(
        "wgmma data gradient: both kernels in the {} compute_90a PTX",
        ptxs.iter().map(|p| p.0).collect::<Vec<_>>().join(" and ")
    );
}
