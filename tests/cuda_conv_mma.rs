//! The `mma.sync` kernels of the large layers (`kernels/conv_tc.cu`, second half: bf16 with
//! ldmatrix and m16n8k16, tf32 with m16n8k8; 128x128 tiles, dynamic shared memory, 16-byte
//! cp.async): the forward with its fused eval / statistics epilogues, the data gradient and
//! the weight gradient, against the CPU reference, every output poisoned with NaN first. The
//! backend is told to route every tf32 / bf16 convolution to them (`MmaRoute::Always`) so that
//! modest shapes run them; `routing_threshold` checks the size rule on the device's own SM
//! count.
//!
//! Per shape: on operands already rounded to the precision (exact products) within 1e-5
//! relative of the CPU's f32 result (tiling, fragment layouts, copies and epilogue exact: only
//! the f32 summation order differs), and on unrounded ones within the precision's tolerance
//! (bf16 1e-2, tf32 1e-3) and above 1e-5 (the reduced path ran). The shapes cover both copy
//! paths of each operand (16-byte: K % 4 == 0 for the weights, 1x1 stride-1 unpadded convs
//! with H*W % 4 == 0 for the activations and dy, OH*OW % 4 == 0 for the weight gradient's dy;
//! 4-byte otherwise), ragged tails of M, N and K, 1x1 / 3x3 / 7x7 and an even kernel, stride
//! 1, 2 and 3, padding, batch > 1 and a weight gradient split over K. Runs on a GPU or on the
//! emulated driver (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_mma-*
//! --include-ignored`, and `scripts/cuda-emu.sh test`); without a device the device tests are
//! ignored.

mod common;
use common::cuda::{device, rel_err, round};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, Precision};

fn main() {
    common::cuda::main(vec![
        device("mma_bf16_forward_matches_cpu", || {
            mma_forward_matches_cpu(Precision::Bf16)
        }),
        device("mma_tf32_forward_matches_cpu", || {
            mma_forward_matches_cpu(Precision::Tf32)
        }),
        device("mma_bf16_fused_epilogues_match_cpu", || {
            mma_fused_epilogues_match_cpu(Precision::Bf16)
        }),
        device("mma_tf32_fused_epilogues_match_cpu", || {
            mma_fused_epilogues_match_cpu(Precision::Tf32)
        }),
        device("mma_bf16_gradients_match_cpu", || {
            mma_gradients_match_cpu(Precision::Bf16)
        }),
        device("mma_tf32_gradients_match_cpu", || {
            mma_gradients_match_cpu(Precision::Tf32)
        }),
        device("routing_threshold", routing_threshold),
        device(
            "fixtures_pass_through_the_mma_kernels",
            fixtures_pass_through_the_mma_kernels,
        ),
        device(
            "mma_forward_replays_in_a_graph",
            mma_forward_replays_in_a_graph,
        ),
    ])
}

fn gpu(p: Precision, route: MmaRoute) -> CudaBackend {
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(route);
    g
}

/// The shapes, each with the copy paths it takes (weights, activations: 16 or 4 bytes).
fn shapes() -> [(Conv2d, &'static str); 9] {
    [
        // K = 64, H*W = 80; C_out 136 (two channel tiles, the last of 8), 160 pixels.
        (conv(2, 64, 8, 10, 136, 1, 1, 0), "16/16"),
        // K = 66 (two K tiles and 2), H*W = 108.
        (conv(1, 66, 9, 12, 130, 1, 1, 0), "4/16"),
        // H*W = 63 and 30: the activations' runs are not 16-byte aligned.
        (conv(2, 32, 7, 9, 128, 1, 1, 0), "16/4"),
        (conv(2, 16, 5, 6, 128, 1, 1, 0), "16/4"),
        // 3x3, padding 1, K = 108.
        (conv(2, 12, 11, 9, 140, 3, 1, 1), "16/4"),
        // The stem: 7x7 stride 2 padding 3, K = 147.
        (conv(1, 3, 23, 21, 129, 7, 2, 3), "4/4"),
        // 3x3 stride 2, K = 180, batch 2.
        (conv(2, 20, 10, 12, 160, 3, 2, 1), "16/4"),
        // No padding, batch 3, K = 81.
        (conv(3, 9, 6, 5, 130, 3, 1, 0), "4/4"),
        // 1x1 stride 2 (a downsample): not contiguous.
        (conv(1, 64, 9, 8, 128, 1, 2, 0), "16/4"),
    ]
}

/// The kernel's name at precision `p`: `conv2d_fwd_mma_bf16` for ("conv2d_fwd", Bf16).
fn mma_name(op: &str, p: Precision) -> String {
    format!("{op}_mma_{p}")
}

fn forward<B: Backend<T = f32>>(be: &B, s: &Conv2d, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (xb, wb) = (be.upload(x).expect("upload"), be.upload(w).expect("upload"));
    let mut y = be.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
    be.conv2d_fwd(s, &xb, &wb, &mut y).expect("conv2d_fwd");
    be.download(&y).expect("download")
}

fn mma_forward_matches_cpu(p: Precision) {
    let g = gpu(p, MmaRoute::Always);
    let tol = p.tolerance().expect("a reduced precision");
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh(&format!("conv_mma_fwd_{p}"));
    let (mut exact, mut worst) = (0.0f64, 0.0f64);
    for (s, path) in shapes() {
        assert_eq!(g.conv_fwd_kernel(&s), mma_name("conv2d_fwd", p));
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (xr, wr) = (round(p, &x), round(p, &w));
        let e = rel_err(&forward(&g, &s, &xr, &wr), &forward(&cpu, &s, &xr, &wr));
        assert!(
            e < 1e-5,
            "{p} {s:?} (copies {path}) on {p}-exact operands: relative error {e:e} (>= 1e-5)"
        );
        exact = exact.max(e);
        let e = rel_err(&forward(&g, &s, &x, &w), &forward(&cpu, &s, &x, &w));
        assert!(
            e < tol && e > 1e-5,
            "{p} {s:?} (copies {path}): relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        worst = worst.max(e);
    }
    println!("mma {p} forward: worst relative error {worst:.2e} ({p}-exact operands {exact:.2e})");
}

/// The data and weight gradients (`conv2d_bwd_data_mma_bf16`, `conv2d_bwd_weight_mma_bf16`).
fn gradients<B: Backend<T = f32>>(
    be: &B,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
) -> [Vec<f32>; 2] {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let (xb, wb, dyb) = (up(x), up(w), up(dy));
    let (mut dx, mut dw) = (nan(s.x_len()), nan(s.w_len()));
    be.conv2d_bwd_data(s, &dyb, &wb, &mut dx)
        .expect("conv2d_bwd_data");
    be.conv2d_bwd_weight(s, &xb, &dyb, &mut dw)
        .expect("conv2d_bwd_weight");
    [&dx, &dw].map(|b| be.download(b).expect("download"))
}

/// The data gradient (per output phase: 3x3, 7x7, 1x1 (phases without taps) and an even
/// kernel at stride 2, a stride 3, C_in over one 128-row tile, 16-byte copies of dy for the
/// 1x1 stride-1 shapes with H*W % 4 == 0) and the weight gradient (split over K for the
/// 2048-pixel shape, 16-byte copies of dy where OH*OW % 4 == 0) on the forward's shapes and
/// these, as the forward is checked.
fn mma_gradients_match_cpu(p: Precision) {
    let g = gpu(p, MmaRoute::Always);
    let tol = p.tolerance().expect("a reduced precision");
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh(&format!("conv_mma_grad_{p}"));
    let more = [
        conv(2, 8, 32, 32, 128, 3, 1, 1), // 2048 pixels: the weight gradient split over K
        conv(1, 136, 6, 5, 24, 3, 1, 1),  // C_in 136: two row tiles of the data gradient
        conv(2, 7, 11, 9, 6, 3, 2, 1),    // 3x3 stride 2, odd sizes
        conv(2, 5, 9, 7, 70, 1, 2, 0),    // 1x1 stride 2: three phases without taps
        conv(2, 4, 10, 11, 5, 5, 3, 2),   // stride 3: nine phases
        conv(1, 6, 8, 9, 7, 4, 2, 1),     // an even kernel
    ];
    let all = shapes().into_iter().map(|(s, _)| s).chain(more);
    let names = ["conv2d_bwd_data", "conv2d_bwd_weight"];
    let (mut exact, mut worst) = (0.0f64, 0.0f64);
    for s in all {
        let k = g.conv_kernels(&s);
        assert_eq!(
            [k[1], k[2]],
            [
                mma_name("conv2d_bwd_data", p),
                mma_name("conv2d_bwd_weight", p)
            ]
        );
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let r = |v: &[f32]| round(p, v);
        let (xr, wr, dyr) = (r(&x), r(&w), r(&dy));
        let got = gradients(&g, &s, &xr, &wr, &dyr);
        let want = gradients(&cpu, &s, &xr, &wr, &dyr);
        for i in 0..2 {
            let e = rel_err(&got[i], &want[i]);
            assert!(
                e < 1e-5,
                "{p} {} {s:?} on {p}-exact operands: relative error {e:e} (>= 1e-5)",
                names[i]
            );
            exact = exact.max(e);
        }
        let got = gradients(&g, &s, &x, &w, &dy);
        let want = gradients(&cpu, &s, &x, &w, &dy);
        for i in 0..2 {
            let e = rel_err(&got[i], &want[i]);
            assert!(
                e < tol && e > 1e-5,
                "{p} {} {s:?}: relative error {e:e}, expected in (1e-5, {tol:e})",
                names[i]
            );
            worst = worst.max(e);
        }
    }
    println!(
        "mma {p} gradients: worst relative error {worst:.2e} ({p}-exact operands {exact:.2e})"
    );
}

/// Batch-norm parameters and statistics of `c` channels: gamma, beta, mean, var.
fn bn_params(rng: &mut SplitMix64, c: usize) -> [Vec<f32>; 4] {
    [
        rng.vec_f32(c, 0.5, 1.5),
        rng.vec_f32(c, -0.5, 0.5),
        rng.vec_f32(c, -0.2, 0.2),
        rng.vec_f32(c, 0.5, 1.5),
    ]
}

fn bn_of(s: &Conv2d) -> BatchNorm2d {
    BatchNorm2d {
        n: s.n,
        c: s.c_out,
        hw: s.out_h() * s.out_w(),
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// `conv2d_bn_eval_fwd` with a residual and the ReLU.
fn eval<B: Backend<T = f32>>(
    be: &B,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
    p: &[Vec<f32>; 4],
    r: &[f32],
) -> Vec<f32> {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let (xb, wb, rb) = (up(x), up(w), up(r));
    let [ga, be_, m, v] = [0, 1, 2, 3].map(|i| up(&p[i]));
    let mut y = up(&vec![f32::NAN; s.y_len()]);
    be.conv2d_bn_eval_fwd(
        s,
        &bn_of(s),
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
    .expect("conv2d_bn_eval_fwd");
    be.download(&y).expect("download")
}

/// `conv2d_bn_train_fwd` (no residual, ReLU): z, y, running mean / var, saved mean / invstd.
fn train<B: Backend<T = f32>>(
    be: &B,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
    p: &[Vec<f32>; 4],
) -> [Vec<f32>; 6] {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let (xb, wb) = (up(x), up(w));
    let [ga, be_, mut rm, mut rv] = [0, 1, 2, 3].map(|i| up(&p[i]));
    let (mut sm, mut si) = (nan(s.c_out), nan(s.c_out));
    let (mut z, mut y) = (nan(s.y_len()), nan(s.y_len()));
    be.conv2d_bn_train_fwd(
        s,
        &bn_of(s),
        &xb,
        &wb,
        &ga,
        &be_,
        &mut rm,
        &mut rv,
        &mut sm,
        &mut si,
        &mut z,
        &mut y,
        None,
        true,
    )
    .expect("conv2d_bn_train_fwd");
    [&z, &y, &rm, &rv, &sm, &si].map(|b| be.download(b).expect("download"))
}

/// The eval-mode batch-norm epilogue (with residual and ReLU) and the training statistics
/// epilogue (two 64-pixel tiles per 128-pixel block, a partial last one) of the mma kernel,
/// on {p}-exact operands, within 1e-5 of the CPU's fused ops.
fn mma_fused_epilogues_match_cpu(p: Precision) {
    let g = gpu(p, MmaRoute::Always);
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh(&format!("conv_mma_fused_{p}"));
    let names = [
        "z",
        "y",
        "running mean",
        "running var",
        "saved mean",
        "saved invstd",
    ];
    let mut worst = 0.0f64;
    for (s, path) in [shapes()[0], shapes()[3], shapes()[4]] {
        assert_eq!(g.conv_fwd_kernel(&s), mma_name("conv2d_fwd", p));
        let x = round(p, &rng.vec_f32(s.x_len(), -1.0, 1.0));
        let w = round(p, &rng.vec_f32(s.w_len(), -1.0, 1.0));
        let r = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let bp = bn_params(&mut rng, s.c_out);
        let e = rel_err(
            &eval(&g, &s, &x, &w, &bp, &r),
            &eval(&cpu, &s, &x, &w, &bp, &r),
        );
        assert!(
            e < 1e-5,
            "{p} eval epilogue {s:?} ({path}): relative error {e:e}"
        );
        worst = worst.max(e);
        let got = train(&g, &s, &x, &w, &bp);
        let want = train(&cpu, &s, &x, &w, &bp);
        for i in 0..6 {
            let e = rel_err(&got[i], &want[i]);
            assert!(
                e < 1e-5,
                "{p} statistics epilogue {s:?} ({path}): {} relative error {e:e}",
                names[i]
            );
            worst = worst.max(e);
        }
    }
    println!("mma {p} fused epilogues: worst relative error {worst:.2e}");
}

/// With the default route, a bf16 forward takes the mma kernel from a 128x128 grid of one
/// block per SM on (and 128 channels), the WMMA kernel below; both right.
fn routing_threshold() {
    let g = gpu(Precision::Bf16, MmaRoute::Auto);
    let sms = g.info().multiprocessors as usize;
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("conv_mma_route");
    // 1x1 over sms (sms - 1) rows of 128 pixels, 128 channels: sms (sms - 1) blocks.
    for (h, kernel) in [(sms, "conv2d_fwd_mma_bf16"), (sms - 1, "conv2d_fwd_bf16")] {
        let s = conv(1, 4, h, 128, 128, 1, 1, 0);
        assert_eq!(g.conv_fwd_kernel(&s), kernel, "{s:?} on {sms} SMs");
        let mut wide = s;
        wide.c_out = 64;
        assert_eq!(g.conv_fwd_kernel(&wide), "conv2d_fwd_bf16");
        let x = round(Precision::Bf16, &rng.vec_f32(s.x_len(), -1.0, 1.0));
        let w = round(Precision::Bf16, &rng.vec_f32(s.w_len(), -1.0, 1.0));
        let e = rel_err(&forward(&g, &s, &x, &w), &forward(&cpu, &s, &x, &w));
        assert!(e < 1e-5, "{kernel} {s:?}: relative error {e:e}");
    }
    let tf32 = gpu(Precision::Tf32, MmaRoute::Auto);
    assert_eq!(
        tf32.conv_fwd_kernel(&conv(1, 4, sms, 128, 128, 1, 1, 0)),
        "conv2d_fwd_mma_tf32"
    );
    let mut never = g.clone();
    never.set_mma_route(MmaRoute::Never);
    assert_eq!(
        never.conv_fwd_kernel(&conv(1, 4, sms, 128, 128, 1, 1, 0)),
        "conv2d_fwd_bf16"
    );
}

/// A captured mma forward (dynamic shared memory, the opt-in made once per function, not a
/// stream operation) replays bit for bit what the eager launch wrote.
fn mma_forward_replays_in_a_graph() {
    // A backend of its own (its own stream): the other tests' work on the shared stream would
    // break the capture.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16).expect("bf16");
    g.set_mma_route(MmaRoute::Always);
    let mut rng = SplitMix64::fresh("conv_mma_graph");
    let s = shapes()[3].0;
    let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    let eager = forward(&g, &s, &x, &w);
    let (xb, wb) = (g.upload(&x).expect("upload"), g.upload(&w).expect("upload"));
    let mut y = g.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
    let (graph, ()) = g
        .capture(|| g.conv2d_fwd(&s, &xb, &wb, &mut y))
        .expect("capture");
    assert!(
        g.download(&y).expect("download").iter().all(|v| v.is_nan()),
        "nothing runs while capturing"
    );
    graph.replay().expect("replay");
    let got = g.download(&y).expect("download");
    assert!(
        got.iter()
            .zip(&eager)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the replay differs from the eager forward"
    );
}

/// Whole networks through the mma kernels: the PyTorch parity fixtures that pass `ichcam
/// parity` outright against their rounded references at a precision (docs/precision.md:
/// `parity_basic1_odd` at tf32 and bf16, `parity_basic3_lstm3` at bf16) pass with every
/// convolution (forwards with their fused batch-norm epilogues, data and weight gradients) on
/// the mma kernels, and take them (a shape of the fixture's stem says so).
fn fixtures_pass_through_the_mma_kernels() {
    use ichcam::model::parity::{self, AnyFixture};
    let cases = [
        (Precision::Tf32, "parity_basic1_odd"),
        (Precision::Bf16, "parity_basic1_odd"),
        (Precision::Bf16, "parity_basic3_lstm3"),
    ];
    for (p, name) in cases {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/torch-parity/{name}.safetensors"));
        let mut fx = AnyFixture::load(&path).expect("a fixture");
        assert!(
            fx.use_rounded_reference(p)
                .expect("a valid rounded reference"),
            "{name}: no rounded reference"
        );
        let tol = p.tolerance().expect("a reduced precision");
        let g = gpu(p, MmaRoute::Always);
        assert_eq!(
            g.conv_kernels(&conv(1, 1, 8, 8, 4, 7, 2, 3)),
            [
                mma_name("conv2d_fwd", p),
                mma_name("conv2d_bwd_data", p),
                mma_name("conv2d_bwd_weight", p)
            ]
        );
        let r = match &fx {
            AnyFixture::ResNetLstm(f) => parity::run(g, f, tol),
            AnyFixture::UNet(f) => parity::run_unet(g, f, tol),
        }
        .expect("the parity run");
        println!(
            "{name} at {p} through the mma kernels: {} of {} quantities over {tol:e}, worst {:.3e}",
            r.failures(),
            r.rows.len(),
            r.worst().map_or(0.0, |w| w.rel_err)
        );
        assert!(
            r.passed(),
            "{name} at {p} through the mma kernels:\n{}",
            r.table()
        );
    }
}
