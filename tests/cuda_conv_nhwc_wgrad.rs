//! The channels-last (NHWC) weight gradient (`kernels/conv_tc.cu`, its last sections:
//! `conv2d_bwd_weight_mma_nhwc_bf16` / `_tf32` on f32 activations and
//! `conv2d_bwd_weight_mma_nhwc_bf16s` on activations stored in bf16; `dw = sum over the batch
//! of x (*) dy` with x `[n][h][w][c_in]`, dy `[n][oh][ow][c_out]`, dw OIHW f32, split over the
//! pixels with the deterministic split-K reduction), each shape first asserted to take the
//! native kernel (`conv_bwd_weight_nhwc_kernel`, `conv_bwd_weight_nhwc_bf16s_kernel`), against
//! the CPU reference `conv2d_bwd_weight` on the same data in NCHW (transposed on the host
//! here), dw poisoned with NaN first.
//!
//! f32 storage, through the backend op `Backend::conv2d_bwd_weight_nhwc` (CUDA routes it to
//! the native kernel at tf32 / bf16). Per shape and precision: on x and dy already rounded to
//! the precision (exact products) within 1e-5 relative (L2) and 2e-5 of the largest |dw|
//! (element-wise) of the CPU's f32 result (only the f32 summation order differs: up to 4e-6
//! over 4096 pixels), and on unrounded ones within the precision's tolerance (bf16 1e-2, tf32
//! 1e-3) and above 1e-5 (the reduced path ran), both as `rel_err` (relative L2) and as the
//! largest error relative to the largest |dw|. The shapes cover 1x1 stride 1 and 2, 3x3
//! stride 1 and 2 with padding 1 (the ResNet blocks' convolutions), both copy paths of each
//! operand (16-byte: `c_out % 4 == 0` for dy, `c_in % 4 == 0` for x; 4-byte otherwise: odd
//! and even `c_in`, odd `c_out`), `c_in` below a warp's 32 columns (many taps per row of the
//! tile), ragged channel and column tiles, pixel counts that are not multiples of the
//! 32-pixel K tile, and reductions long enough to be split over several chunks (the last one
//! shorter). Also: a captured graph of the op (split-K workspace from the arena) replays bit
//! for bit what the eager call wrote, and f32 / `MmaRoute::Never` have no native kernel (the
//! op takes the layout changes around the NCHW kernels instead, and still matches the CPU).
//!
//! bf16 storage (x and dy two bf16 to an f32 slot, value i in the 16-bit half i: packed on
//! the host, rounded to nearest even; an odd length's unused last half poisoned with a bf16
//! NaN), through the backend op `Backend::conv2d_bwd_weight_nhwc_bf16` (CUDA routes it to the
//! native kernel at bf16). Per shape: within
//! 1e-5 relative (L2) and 2e-5 of the largest |dw| of the CPU's f32 result on the unpacked
//! values (bf16-exact: exact products, only the summation order differs), and bit for bit the
//! f32-storage kernel's result at bf16 on the same values in f32 storage (the same K tiles,
//! fragments and accumulation order: any wrong, missing or misplaced operand value shows).
//! The shapes: the f32-storage ones (each copy path of both operands: 16-byte for a channel
//! count % 8 == 0, 4-byte for other even ones, 2-byte loads for odd ones), more with odd
//! lengths, `c_in` 1 and 3, small `c_out`, and split-K with 2-byte loads. Also a captured
//! graph replays bit for bit; other precisions and the route `Never` take no kernel (the op
//! takes the conversions: dw bit for bit the f32-storage op's on the unpacked values); wrong
//! lengths are the op's `EngineError::Shape`, dw untouched. Runs on a GPU or on the emulated
//! driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_nhwc_wgrad-* --include-ignored`);
//! without a device the device tests are ignored.

mod common;
use common::cuda::{device, max_err, rel_err, round};
use common::nhwc::{cpu_dw, gpu_dw_bf16s, to_nhwc, upload_wgrad_bf16s, wgrad_data};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{Backend, Conv2d, EngineError, Precision};

fn main() {
    common::cuda::main(vec![
        device("nhwc_bf16_weight_gradient_matches_cpu", || {
            nhwc_weight_gradient_matches_cpu(Precision::Bf16)
        }),
        device("nhwc_tf32_weight_gradient_matches_cpu", || {
            nhwc_weight_gradient_matches_cpu(Precision::Tf32)
        }),
        device(
            "nhwc_weight_gradient_replays_in_a_graph",
            nhwc_weight_gradient_replays_in_a_graph,
        ),
        device(
            "no_native_weight_gradient_at_f32_or_route_never",
            no_native_weight_gradient_at_f32_or_route_never,
        ),
        device(
            "bf16s_weight_gradient_matches_cpu_and_f32_storage",
            bf16s_weight_gradient_matches_cpu_and_f32_storage,
        ),
        device(
            "bf16s_weight_gradient_replays_in_a_graph",
            bf16s_weight_gradient_replays_in_a_graph,
        ),
        device(
            "bf16s_weight_gradient_checks_precision_route_and_lengths",
            bf16s_weight_gradient_checks_precision_route_and_lengths,
        ),
    ])
}

/// The shapes, each with what it covers (copies: dy / x, 16- or 4-byte). The chunk counts
/// are `split_plan`'s on 132 SMs (H100 / H200, and the emulator's count).
fn shapes() -> [(Conv2d, &'static str); 11] {
    [
        // 1x1 stride 1, 16-byte copies of both; c_out 136 (two channel tiles), 198 pixels.
        (conv(2, 64, 9, 11, 136, 1, 1, 0), "1x1 s1, copies 16/16"),
        // 1x1 stride 2 (a downsample), c_out 130: dy 4-byte; 9x13 -> 5x7, batch 3: 105 pixels.
        (conv(3, 32, 9, 13, 130, 1, 2, 0), "1x1 s2, copies 4/16"),
        // 3x3 stride 1 padding 1, N = 108, c_out 140, 198 pixels.
        (conv(2, 12, 11, 9, 140, 3, 1, 1), "3x3 s1 p1, copies 16/16"),
        // 3x3 stride 2 padding 1, N = 180 (two column tiles), 13x12 -> 7x6, batch 3.
        (conv(3, 20, 13, 12, 160, 3, 2, 1), "3x3 s2 p1, copies 16/16"),
        // Odd c_in and c_out: 4-byte copies of both, N = 63.
        (
            conv(2, 7, 10, 9, 67, 3, 1, 1),
            "3x3 s1 p1 odd channels, copies 4/4",
        ),
        // Even c_in not a multiple of 4, 1x1 stride 2, c_out 33.
        (conv(2, 6, 11, 11, 33, 1, 2, 0), "1x1 s2 c_in 6, copies 4/4"),
        // c_in = 4: 16-byte copies, 9 taps in a row of 36 columns; c_out 200, batch 1.
        (
            conv(1, 4, 15, 11, 200, 3, 1, 1),
            "3x3 s1 p1 c_in 4, copies 16/16",
        ),
        // 1200 pixels: split over the pixels (4 chunks of 320 on 132 SMs, the last 240).
        (
            conv(2, 24, 24, 25, 40, 3, 1, 1),
            "3x3 s1 p1 split-K, copies 16/16",
        ),
        // 544 pixels, 1x1: 2 chunks (288 and 256).
        (
            conv(2, 64, 16, 17, 128, 1, 1, 0),
            "1x1 s1 split-K, copies 16/16",
        ),
        // 3x3 stride 2, 2 x 25x27 -> 13x14: 364 pixels; odd c_out 131.
        (conv(2, 8, 25, 27, 131, 3, 2, 1), "3x3 s2 p1, copies 4/16"),
        // 4096 pixels on 5 column tiles: 16 chunks of 256 (a layer4-like long reduction).
        (
            conv(16, 64, 16, 16, 64, 3, 1, 1),
            "3x3 s1 p1 split-K x16, copies 16/16",
        ),
    ]
}

/// The channels-last op on `g`: x and dy (NCHW) transposed to NHWC on the host, dw (OIHW)
/// poisoned with NaN first.
fn gpu_dw(g: &CudaBackend, s: &Conv2d, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let xb = g
        .upload(&to_nhwc(x, s.n, s.c_in, s.h * s.w))
        .expect("upload");
    let dyb = g
        .upload(&to_nhwc(dy, s.n, s.c_out, s.out_h() * s.out_w()))
        .expect("upload");
    let mut dw = g.upload(&vec![f32::NAN; s.w_len()]).expect("upload");
    g.conv2d_bwd_weight_nhwc(s, &xb, &dyb, &mut dw)
        .expect("conv2d_bwd_weight_nhwc");
    g.download(&dw).expect("download")
}

fn nhwc_weight_gradient_matches_cpu(p: Precision) {
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let tol = p.tolerance().expect("a reduced precision");
    let mut rng = SplitMix64::fresh(&format!("conv_nhwc_wgrad_{p}"));
    let (mut exact, mut exact_max, mut worst, mut worst_max) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (s, what) in shapes() {
        assert_eq!(
            g.conv_bwd_weight_nhwc_kernel(&s),
            Some(format!("conv2d_bwd_weight_mma_nhwc_{p}").as_str())
        );
        let what = format!("{p} {s:?} ({what})");
        let (x, dy) = wgrad_data(&mut rng, &s);
        let (xr, dyr) = (round(p, &x), round(p, &dy));
        let want = cpu_dw(&s, &xr, &dyr);
        let got = gpu_dw(&g, &s, &xr, &dyr);
        let (e, em) = (rel_err(&got, &want), max_err(&got, &want));
        assert!(
            e < 1e-5 && em < 2e-5,
            "{what} on {p}-exact operands: relative error {e:e} (limit 1e-5), max {em:e} (limit 2e-5)"
        );
        exact = exact.max(e);
        exact_max = exact_max.max(em);
        let want = cpu_dw(&s, &x, &dy);
        let got = gpu_dw(&g, &s, &x, &dy);
        let (e, em) = (rel_err(&got, &want), max_err(&got, &want));
        assert!(
            e < tol && em < tol && e > 1e-5,
            "{what}: relative error {e:e}, max {em:e}, expected in (1e-5, {tol:e})"
        );
        worst = worst.max(e);
        worst_max = worst_max.max(em);
        println!("nhwc wgrad {what}: relative error {e:.2e}, max {em:.2e}");
    }
    println!(
        "nhwc {p} weight gradient, {} shapes: worst relative error {worst:.2e}, worst max error {worst_max:.2e} ({p}-exact operands: {exact:.2e}, max {exact_max:.2e})",
        shapes().len()
    );
}

/// A captured channels-last weight gradient split over the pixels (workspace from the arena
/// warmed by the eager call, then the reduction) replays bit for bit what the eager call
/// wrote, at bf16 and tf32.
fn nhwc_weight_gradient_replays_in_a_graph() {
    for p in [Precision::Bf16, Precision::Tf32] {
        // A backend of its own (its own stream): the other tests' work on the shared stream
        // would break the capture.
        let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
        g.set_precision(p).expect("the device takes this precision");
        let mut rng = SplitMix64::fresh(&format!("conv_nhwc_wgrad_graph_{p}"));
        let s = shapes()[8].0; // split over the pixels: the workspace and the reduction run
        let (x, dy) = wgrad_data(&mut rng, &s);
        let eager = gpu_dw(&g, &s, &x, &dy);
        let xb = g
            .upload(&to_nhwc(&x, s.n, s.c_in, s.h * s.w))
            .expect("upload");
        let dyb = g
            .upload(&to_nhwc(&dy, s.n, s.c_out, s.out_h() * s.out_w()))
            .expect("upload");
        let mut dw = g.upload(&vec![f32::NAN; s.w_len()]).expect("upload");
        let (graph, ()) = g
            .capture(|| g.conv2d_bwd_weight_nhwc(&s, &xb, &dyb, &mut dw))
            .expect("capture");
        assert!(
            g.download(&dw)
                .expect("download")
                .iter()
                .all(|v| v.is_nan()),
            "nothing runs while capturing"
        );
        graph.replay().expect("replay");
        let got = g.download(&dw).expect("download");
        assert!(
            got.iter()
                .zip(&eager)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{p}: the replay differs from the eager call"
        );
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{p}: a non-finite output"
        );
    }
}

/// At f32, and with the route `Never`, there is no native kernel: the op takes the layout
/// changes around the NCHW kernels and still matches the CPU.
fn no_native_weight_gradient_at_f32_or_route_never() {
    let s = shapes()[0].0;
    let f32_be = common::cuda::gpu_at(Precision::F32);
    let mut never = common::cuda::gpu_at(Precision::Bf16);
    never.set_mma_route(MmaRoute::Never);
    let mut always = common::cuda::gpu_at(Precision::Tf32);
    always.set_mma_route(MmaRoute::Always);
    assert_eq!(
        always.conv_bwd_weight_nhwc_kernel(&s),
        Some("conv2d_bwd_weight_mma_nhwc_tf32")
    );
    let mut rng = SplitMix64::fresh("conv_nhwc_wgrad_no_native");
    let (x, dy) = wgrad_data(&mut rng, &s);
    let (xr, dyr) = (round(Precision::Bf16, &x), round(Precision::Bf16, &dy));
    let want = cpu_dw(&s, &xr, &dyr);
    for g in [f32_be, never] {
        assert_eq!(g.conv_bwd_weight_nhwc_kernel(&s), None);
        let got = gpu_dw(&g, &s, &xr, &dyr);
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "{}: relative error {e:e}", g.precision());
    }
}

// ---- bf16 storage ----------------------------------------------------------------------

/// The f32-storage shapes and more (their labels name the f32-storage copy paths; the test
/// prints the bf16 ones, [`bf16s_path`]).
fn bf16s_shapes() -> Vec<(Conv2d, &'static str)> {
    let mut v: Vec<(Conv2d, &'static str)> = shapes().into_iter().collect();
    v.extend([
        // Odd c_in 5, odd c_out 67: 2-byte loads of both; odd x and dy lengths.
        (conv(1, 5, 9, 7, 67, 3, 1, 1), "3x3 s1 p1, odd lengths"),
        // c_in 1 (one column per tap), 2-byte loads; c_out 128.
        (conv(2, 1, 10, 10, 128, 3, 1, 1), "3x3 s1 p1 c_in 1"),
        // c_in 8: 16-byte copies of a whole pixel per tap; c_out 8: one 16-byte copy of dy.
        (conv(2, 8, 12, 11, 8, 3, 2, 1), "3x3 s2 p1 c_in 8 c_out 8"),
        // c_in 3 (the stem's), 1200 pixels split over 4 chunks; c_out 34: 4-byte copies.
        (conv(2, 3, 24, 25, 34, 3, 1, 1), "3x3 s1 p1 split-K, c_in 3"),
        // 1x1 stride 2, c_in 10 (4-byte), c_out 72 (16-byte), odd 13x15 -> 7x8, batch 3.
        (conv(3, 10, 13, 15, 72, 1, 2, 0), "1x1 s2 c_in 10"),
    ]);
    v
}

/// The bf16-storage kernel's copy path of an operand with `c` channels (each uploaded into
/// its own allocation: 16-byte aligned).
fn bf16s_path(c: usize) -> &'static str {
    if c.is_multiple_of(8) {
        "16-byte"
    } else if c.is_multiple_of(2) {
        "4-byte"
    } else {
        "2-byte"
    }
}

fn bf16s_weight_gradient_matches_cpu_and_f32_storage() {
    let p = Precision::Bf16;
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let mut rng = SplitMix64::fresh("conv_nhwc_wgrad_bf16s");
    let (mut worst, mut worst_max) = (0.0f64, 0.0f64);
    for (s, what) in bf16s_shapes() {
        assert_eq!(
            g.conv_bwd_weight_nhwc_bf16s_kernel(&s),
            Some("conv2d_bwd_weight_mma_nhwc_bf16s")
        );
        assert_eq!(
            g.conv_bwd_weight_nhwc_kernel(&s),
            Some("conv2d_bwd_weight_mma_nhwc_bf16")
        );
        let what = format!(
            "{s:?} ({what}; bf16 copies x/dy: {}/{})",
            bf16s_path(s.c_in),
            bf16s_path(s.c_out)
        );
        let (x, dy) = wgrad_data(&mut rng, &s);
        let (xr, dyr) = (round(p, &x), round(p, &dy));
        let got = gpu_dw_bf16s(&g, &s, &xr, &dyr);
        let want = cpu_dw(&s, &xr, &dyr);
        let (e, em) = (rel_err(&got, &want), max_err(&got, &want));
        assert!(
            e < 1e-5 && em < 2e-5,
            "bf16s {what}: relative error {e:e} (limit 1e-5), max {em:e} (limit 2e-5)"
        );
        worst = worst.max(e);
        worst_max = worst_max.max(em);
        let f32s = gpu_dw(&g, &s, &xr, &dyr);
        let differ = got
            .iter()
            .zip(&f32s)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "bf16s {what}: {differ} of {} dw values differ from the f32-storage kernel's",
            got.len()
        );
        println!("nhwc wgrad bf16s {what}: relative error {e:.2e}, max {em:.2e}, bit for bit the f32-storage kernel");
    }
    println!(
        "nhwc bf16-storage weight gradient, {} shapes: worst relative error {worst:.2e}, worst max error {worst_max:.2e}, all bit for bit the f32-storage kernel",
        bf16s_shapes().len()
    );
}

/// A captured bf16-storage weight gradient split over the pixels replays bit for bit what
/// the eager call wrote.
fn bf16s_weight_gradient_replays_in_a_graph() {
    // A backend of its own (its own stream), as above.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes this precision");
    let mut rng = SplitMix64::fresh("conv_nhwc_wgrad_bf16s_graph");
    let s = bf16s_shapes()[14].0; // 1200 pixels over 4 chunks, 2-byte / 4-byte copies
    let (x, dy) = wgrad_data(&mut rng, &s);
    let eager = gpu_dw_bf16s(&g, &s, &x, &dy);
    let (xb, dyb) = upload_wgrad_bf16s(&g, &s, &x, &dy);
    let got = common::cuda::capture_replay(&g, &vec![f32::NAN; s.w_len()], |dw| {
        g.conv2d_bwd_weight_nhwc_bf16(&s, &xb, &dyb, dw)
    });
    assert!(got.iter().all(|v| v.is_finite()), "a non-finite output");
    assert!(
        got.iter()
            .zip(&eager)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the replay differs from the eager call"
    );
}

/// Only at bf16 and not with the route `Never`: elsewhere no kernel, and the op takes the
/// conversions (dw bit for bit the f32-storage op's on the unpacked values); wrong lengths
/// (f32-storage ones, one slot more) are the op's `EngineError::Shape`, dw untouched.
fn bf16s_weight_gradient_checks_precision_route_and_lengths() {
    let s = bf16s_shapes()[11].0;
    let mut never = common::cuda::gpu_at(Precision::Bf16);
    never.set_mma_route(MmaRoute::Never);
    let (xl, yl) = (s.x_len().div_ceil(2), s.y_len().div_ceil(2));
    let mut rng = SplitMix64::fresh("conv_nhwc_wgrad_bf16s_elsewhere");
    let (x, dy) = wgrad_data(&mut rng, &s);
    let (xr, dyr) = (round(Precision::Bf16, &x), round(Precision::Bf16, &dy));
    for (g, what) in [
        (common::cuda::gpu_at(Precision::F32), "f32"),
        (common::cuda::gpu_at(Precision::Tf32), "tf32"),
        (never, "bf16, route Never"),
    ] {
        assert_eq!(g.conv_bwd_weight_nhwc_bf16s_kernel(&s), None, "{what}");
        let got = gpu_dw_bf16s(&g, &s, &xr, &dyr);
        let want = gpu_dw(&g, &s, &xr, &dyr);
        assert!(
            got.iter().all(|v| v.is_finite())
                && got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: dw by conversions differs from the f32-storage op's"
        );
    }
    let g = common::cuda::gpu_at(Precision::Bf16);
    let mut dw = g.upload(&vec![f32::NAN; s.w_len()]).expect("upload");
    for (xn, yn) in [(s.x_len(), yl), (xl, s.y_len()), (xl + 1, yl)] {
        let xb = g.upload(&vec![0.5; xn]).expect("upload");
        let dyb = g.upload(&vec![0.5; yn]).expect("upload");
        let r = g.conv2d_bwd_weight_nhwc_bf16(&s, &xb, &dyb, &mut dw);
        assert!(
            matches!(
                r,
                Err(EngineError::Shape {
                    op: "conv2d_bwd_weight_nhwc_bf16",
                    ..
                })
            ),
            "x {xn}, dy {yn} slots: {r:?}"
        );
    }
    let (xb, dyb) = (
        g.upload(&vec![0.5; xl]).expect("upload"),
        g.upload(&vec![0.5; yl]).expect("upload"),
    );
    let mut short = g.upload(&vec![f32::NAN; s.w_len() - 1]).expect("upload");
    let r = g.conv2d_bwd_weight_nhwc_bf16(&s, &xb, &dyb, &mut short);
    assert!(
        matches!(
            r,
            Err(EngineError::Shape {
                op: "conv2d_bwd_weight_nhwc_bf16",
                ..
            })
        ),
        "a short dw: {r:?}"
    );
    assert!(g
        .download(&dw)
        .expect("download")
        .iter()
        .all(|v| v.is_nan()));
}
