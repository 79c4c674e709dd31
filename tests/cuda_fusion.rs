//! The fused convolutions of issue 14 point 2 against the CPU reference (`CpuBackend<f32>`).
//!
//! Eval mode (`Backend::conv2d_bn_eval_fwd` on CUDA: one forward launch whose epilogue
//! applies `y = act(conv * scale[c] + shift[c] (+ residual))`, after a per-channel fold of
//! the running statistics; on the tensor-core split-K path the epilogue is in the kernel that
//! sums the splits), at f32, tf32 and bf16, with and without residual and ReLU, over odd
//! sizes, stride 1 and 2, 1x1 / 3x3 / 7x7, batch > 1 and split-K shapes, the output poisoned
//! with NaN first:
//!
//! - against the CPU composite (conv, then eval batch norm, then add + ReLU, as separate
//!   ops): f32 within 1e-5 relative, tf32 1e-3, bf16 1e-2; with the operands already at the
//!   precision, the tensor-core result within 1e-5 too (only the summation order differs);
//! - bit for bit against the device's own unfused convolution with the epilogue applied on
//!   the host (the CPU's rounding: the scale and shift of `cpu::norm::eval_scale_shift`,
//!   `((z * scale) + shift) + residual`, then `max(., 0)`): the fused kernel computes the same
//!   accumulators and the epilogue the CPU's, at every precision and on the split-K path.
//!
//! Training mode (`Backend::conv2d_bn_train_fwd` on CUDA: the forward's epilogue writes, with
//! z, per channel and 64-pixel tile the sum of z and the sum of squared deviations from the
//! tile's mean in f64, combined per channel by `bn_stats_finalize`; a split-K tensor-core
//! forward takes them in the kernel that sums the splits; then one pass over z writes `y =
//! act(bn(z) (+ residual))`, a residual block's join included), at f32, tf32 and bf16, with
//! and without ReLU and residual, on shapes with a partial last tile, several tiles and
//! channel tiles, split-K shapes, and channel means far from zero (inputs offset by 5, 100 and
//! 1e5):
//!
//! - with a residual, every output bit-identical to the same op without it followed by the
//!   separate join (`add_relu_fwd`, or copy and `add_assign`), on the device and on the CPU;
//! - z bit-identical to the device's plain forward;
//! - the saved mean and 1/sqrt(var + eps) within 1 ulp (f32) of the exact statistics of that z
//!   (two passes in f64 on the host), and equal to the running stats' update from them;
//! - z, y, the running stats and the saved statistics within the CPU's tolerance of the CPU
//!   composite (conv, then batch norm: f32 1e-5; at tf32 / bf16 on operands already at the
//!   precision 1e-5, on unrounded ones the precision's tolerance);
//! - two runs bit-identical (no atomics).
//!
//! Runs on a GPU or on the emulated driver (`scripts/cuda-emu.sh test`); without either the
//! device tests are reported as ignored (tests/common/cuda.rs), and with
//! `ICHCAM_REQUIRE_GPU=1` a missing device fails them.

mod common;
use common::rng::SplitMix64;
use common::shapes::conv;

use common::cuda::{device, host, rel_err, round};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, Precision};

fn main() {
    common::cuda::main(vec![
        device("eval_fusion_f32_matches_cpu", || {
            eval_fusion_matches_cpu(Precision::F32)
        }),
        device("eval_fusion_tf32_matches_cpu", || {
            eval_fusion_matches_cpu(Precision::Tf32)
        }),
        device("eval_fusion_bf16_matches_cpu", || {
            eval_fusion_matches_cpu(Precision::Bf16)
        }),
        device("train_stats_fusion_f32_matches_cpu", || {
            train_stats_fusion_matches_cpu(Precision::F32)
        }),
        device("train_stats_fusion_tf32_matches_cpu", || {
            train_stats_fusion_matches_cpu(Precision::Tf32)
        }),
        device("train_stats_fusion_bf16_matches_cpu", || {
            train_stats_fusion_matches_cpu(Precision::Bf16)
        }),
        host(
            "train_join_on_the_cpu_is_the_composite",
            train_join_on_the_cpu_is_the_composite,
        ),
        host("train_op_checks_its_shapes_on_the_cpu", || {
            train_op_checks_its_shapes(&CpuBackend::<f32>::new())
        }),
        device("train_op_checks_its_shapes_on_the_device", || {
            train_op_checks_its_shapes(&gpu(Precision::F32))
        }),
    ])
}

fn gpu(p: Precision) -> CudaBackend {
    common::cuda::gpu_at(p)
}

/// The shapes of the eval-mode tests: odd sizes, the stem's 7x7 stride 2, 1x1 (stride 1 and
/// 2, > 64 channels), 3x3 stride 2, batch > 1, and the late layers whose tensor-core forward
/// is split over K (a few output tiles, a long reduction).
fn eval_shapes() -> [Conv2d; 8] {
    [
        conv(2, 3, 17, 13, 5, 3, 1, 1),   // odd sizes, few channels, 3x3
        conv(2, 3, 15, 13, 20, 7, 2, 3),  // 7x7 stride 2
        conv(3, 66, 9, 11, 17, 1, 1, 0),  // 1x1, > 64 input channels
        conv(2, 16, 8, 8, 72, 1, 2, 0),   // 1x1 stride 2, > 64 outputs
        conv(2, 20, 12, 10, 24, 3, 2, 1), // 3x3 stride 2
        conv(1, 200, 4, 4, 20, 3, 1, 1),  // split-K forward (tensor cores)
        conv(2, 130, 3, 3, 70, 3, 1, 1),  // split-K, batch 2, two channel tiles
        conv(1, 5, 6, 7, 3, 3, 1, 0),     // no padding, tiny
    ]
}

/// One eval-mode case's inputs.
struct EvalCase {
    s: Conv2d,
    bn: BatchNorm2d,
    x: Vec<f32>,
    w: Vec<f32>,
    /// gamma, beta, running mean, running var.
    stats: [Vec<f32>; 4],
    residual: Option<Vec<f32>>,
    relu: bool,
}

impl EvalCase {
    fn new(rng: &mut SplitMix64, s: Conv2d, residual: bool, relu: bool) -> Self {
        let c = s.c_out;
        let bn = BatchNorm2d {
            n: s.n,
            c,
            hw: s.out_h() * s.out_w(),
            eps: 1e-5,
            momentum: 0.1,
        };
        // Scale and shift of order one, so that a lost term changes the output as much as
        // the convolution does.
        let stats = [
            rng.vec_f32(c, 0.5, 1.5),
            rng.vec_f32(c, -1.0, 1.0),
            rng.vec_f32(c, -0.5, 0.5),
            rng.vec_f32(c, 0.5, 2.0),
        ];
        EvalCase {
            s,
            bn,
            x: rng.vec_f32(s.x_len(), -1.0, 1.0),
            w: rng.vec_f32(s.w_len(), -1.0, 1.0),
            stats,
            residual: residual.then(|| rng.vec_f32(s.y_len(), -1.0, 1.0)),
            relu,
        }
    }

    /// `self` with x and w rounded to `p`.
    fn rounded(&self, p: Precision) -> Self {
        EvalCase {
            s: self.s,
            bn: self.bn,
            x: round(p, &self.x),
            w: round(p, &self.w),
            stats: self.stats.clone(),
            residual: self.residual.clone(),
            relu: self.relu,
        }
    }

    fn name(&self) -> String {
        format!(
            "{:?} residual {} relu {}",
            self.s,
            self.residual.is_some(),
            self.relu
        )
    }
}

/// `be.conv2d_bn_eval_fwd` on the case, the output poisoned with NaN first.
fn fused<B: Backend<T = f32>>(be: &B, c: &EvalCase) -> Vec<f32> {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let (x, w) = (up(&c.x), up(&c.w));
    let [g, b, m, v] = [0, 1, 2, 3].map(|i| up(&c.stats[i]));
    let r = c.residual.as_deref().map(up);
    let mut y = up(&vec![f32::NAN; c.s.y_len()]);
    be.conv2d_bn_eval_fwd(
        &c.s,
        &c.bn,
        &x,
        &w,
        &g,
        &b,
        &m,
        &v,
        r.as_ref(),
        c.relu,
        &mut y,
    )
    .expect("conv2d_bn_eval_fwd");
    be.download(&y).expect("download")
}

/// The unfused composite of separate ops: conv, eval batch norm (with the ReLU when there is
/// no residual), then add (+ ReLU).
fn composite<B: Backend<T = f32>>(be: &B, c: &EvalCase) -> Vec<f32> {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let (x, w) = (up(&c.x), up(&c.w));
    let [g, b, m, v] = [0, 1, 2, 3].map(|i| up(&c.stats[i]));
    let mut z = up(&vec![f32::NAN; c.s.y_len()]);
    let mut y = up(&vec![f32::NAN; c.s.y_len()]);
    be.conv2d_fwd(&c.s, &x, &w, &mut z).expect("conv2d_fwd");
    match &c.residual {
        None => be
            .batchnorm_eval_fwd(&c.bn, &z, &g, &b, &m, &v, &mut y, c.relu)
            .expect("batchnorm_eval_fwd"),
        Some(r) => {
            let r = up(r);
            let mut t = up(&vec![f32::NAN; c.s.y_len()]);
            be.batchnorm_eval_fwd(&c.bn, &z, &g, &b, &m, &v, &mut t, false)
                .expect("batchnorm_eval_fwd");
            if c.relu {
                be.add_relu_fwd(&t, &r, &mut y).expect("add_relu_fwd");
            } else {
                be.copy(&t, &mut y).expect("copy");
                be.add_assign(&mut y, &r).expect("add_assign");
            }
        }
    }
    be.download(&y).expect("download")
}

/// The device's own unfused convolution with the CPU's epilogue applied on the host.
fn unfused_with_host_epilogue(be: &CudaBackend, c: &EvalCase) -> Vec<f32> {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let (x, w) = (up(&c.x), up(&c.w));
    let mut z = up(&vec![f32::NAN; c.s.y_len()]);
    be.conv2d_fwd(&c.s, &x, &w, &mut z).expect("conv2d_fwd");
    let z = be.download(&z).expect("download");
    let [g, b, m, v] = &c.stats;
    let (scale, shift) =
        ichcam::engine::cpu::norm::eval_scale_shift(&c.bn, g, b, m, v).expect("scale, shift");
    let plane = c.bn.hw;
    z.iter()
        .enumerate()
        .map(|(i, &zi)| {
            let ch = (i / plane) % c.s.c_out;
            let mut t = zi * scale[ch] + shift[ch];
            if let Some(r) = &c.residual {
                t += r[i];
            }
            if c.relu {
                t.max(0.0)
            } else {
                t
            }
        })
        .collect()
}

fn eval_fusion_matches_cpu(p: Precision) {
    let g = gpu(p);
    assert_eq!(g.precision(), p);
    let cpu = CpuBackend::<f32>::new();
    let tol = p.tolerance().unwrap_or(1e-5);
    let mut rng = SplitMix64::fresh(&format!("fusion_eval_{p}"));
    let (mut worst, mut worst_exact) = (0.0f64, 0.0f64);
    let mut cases = 0;
    for s in eval_shapes() {
        for (residual, relu) in [(false, false), (false, true), (true, false), (true, true)] {
            let c = EvalCase::new(&mut rng, s, residual, relu);
            let name = c.name();
            let got = fused(&g, &c);
            // The fused kernel is the unfused one plus the CPU's epilogue, bit for bit, and
            // within the tolerance of the CPU composite of separate ops (both measured
            // before either is asserted, so that a failure shows both).
            let same = unfused_with_host_epilogue(&g, &c);
            let differ = got
                .iter()
                .zip(&same)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let want = composite(&cpu, &c);
            let e = rel_err(&got, &want);
            assert!(
                differ == 0 && e < tol,
                "{p} {name}: {differ} of {} outputs differ from the unfused kernel + epilogue; relative error to the CPU {e:.3e} (tolerance {tol:.0e})",
                got.len()
            );
            worst = worst.max(e);
            if p != Precision::F32 {
                // Operands at the precision: the products are exact, only the order of the
                // f32 sums differs.
                let r = c.rounded(p);
                let e = rel_err(&fused(&g, &r), &composite(&cpu, &r));
                assert!(e < 1e-5, "{p} {name}, rounded operands: {e:.3e} >= 1e-5");
                worst_exact = worst_exact.max(e);
            }
            cases += 1;
        }
    }
    eprintln!(
        "{p}: {cases} cases, worst relative error {worst:.3e} (tolerance {tol:.0e}); rounded operands {worst_exact:.3e}"
    );
}

/// One training-mode case: shape, inputs, and the state of the running statistics.
struct TrainCase {
    s: Conv2d,
    bn: BatchNorm2d,
    x: Vec<f32>,
    w: Vec<f32>,
    /// gamma, beta, running mean, running var (before the step).
    stats: [Vec<f32>; 4],
    /// A residual block's shortcut, added after the normalisation (before the ReLU).
    residual: Option<Vec<f32>>,
    relu: bool,
}

/// The outputs of a training conv + BN: z, y, running mean, running var, save mean, save
/// invstd.
type TrainOut = [Vec<f32>; 6];
const TRAIN_NAMES: [&str; 6] = [
    "z",
    "y",
    "running_mean",
    "running_var",
    "save_mean",
    "save_invstd",
];

impl TrainCase {
    fn new(rng: &mut SplitMix64, s: Conv2d, offset: f32, residual: bool, relu: bool) -> Self {
        let c = s.c_out;
        let bn = BatchNorm2d {
            n: s.n,
            c,
            hw: s.out_h() * s.out_w(),
            eps: 1e-5,
            momentum: 0.1,
        };
        let mut x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        for v in &mut x {
            *v += offset;
        }
        TrainCase {
            s,
            bn,
            x,
            w: rng.vec_f32(s.w_len(), -1.0, 1.0),
            stats: [
                rng.vec_f32(c, 0.5, 1.5),
                rng.vec_f32(c, -0.5, 0.5),
                rng.vec_f32(c, -0.2, 0.2),
                rng.vec_f32(c, 0.5, 1.5),
            ],
            // Of the normalised output's order (gamma ~ 1), so that about half the sums are
            // clipped by the ReLU and a lost or misplaced term shows.
            residual: residual.then(|| rng.vec_f32(s.y_len(), -1.5, 1.5)),
            relu,
        }
    }

    fn rounded(&self, p: Precision) -> Self {
        TrainCase {
            s: self.s,
            bn: self.bn,
            x: round(p, &self.x),
            w: round(p, &self.w),
            stats: self.stats.clone(),
            residual: self.residual.clone(),
            relu: self.relu,
        }
    }
}

/// How [`train`] computes a case.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// `conv2d_bn_train_fwd` with the residual and the ReLU: the fused op.
    Fused,
    /// `conv2d_bn_train_fwd` without them, then the separate join (`add_relu_fwd`, or copy
    /// and `add_assign`): the same statistics, the join unfused.
    JoinApart,
    /// `conv2d_fwd`, `batchnorm_train_fwd`, then the separate join: nothing fused.
    Plain,
}

/// One case along `path`, every output poisoned with NaN first.
fn train<B: Backend<T = f32>>(be: &B, c: &TrainCase, path: Path) -> TrainOut {
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let (x, w) = (up(&c.x), up(&c.w));
    let [g, b, mut rm, mut rv] = [0, 1, 2, 3].map(|i| up(&c.stats[i]));
    let (mut sm, mut si) = (nan(c.s.c_out), nan(c.s.c_out));
    let (mut z, mut y) = (nan(c.s.y_len()), nan(c.s.y_len()));
    let r = c.residual.as_deref().map(up);
    // The normalised output before the join, where the join is separate.
    let mut t = nan(c.s.y_len());
    let (bn_out, bn_relu) = match (&r, path) {
        (None, _) => (&mut y, c.relu),
        (Some(_), Path::Fused) => (&mut y, c.relu),
        (Some(_), _) => (&mut t, false),
    };
    if path == Path::Plain {
        be.conv2d_fwd(&c.s, &x, &w, &mut z).expect("conv2d_fwd");
        be.batchnorm_train_fwd(
            &c.bn, &z, &g, &b, &mut rm, &mut rv, &mut sm, &mut si, bn_out, bn_relu,
        )
        .expect("batchnorm_train_fwd");
    } else {
        let fused_r = if path == Path::Fused {
            r.as_ref()
        } else {
            None
        };
        be.conv2d_bn_train_fwd(
            &c.s, &c.bn, &x, &w, &g, &b, &mut rm, &mut rv, &mut sm, &mut si, &mut z, bn_out,
            fused_r, bn_relu,
        )
        .expect("conv2d_bn_train_fwd");
    }
    if let (Some(r), false) = (&r, path == Path::Fused) {
        if c.relu {
            be.add_relu_fwd(&t, r, &mut y).expect("add_relu_fwd");
        } else {
            be.copy(&t, &mut y).expect("copy");
            be.add_assign(&mut y, r).expect("add_assign");
        }
    }
    [&z, &y, &rm, &rv, &sm, &si].map(|b| be.download(b).expect("download"))
}

/// The number of values of `a` and `b` whose bits differ, per output.
fn bit_diffs(a: &TrainOut, b: &TrainOut) -> [usize; 6] {
    std::array::from_fn(|k| {
        a[k].iter()
            .zip(&b[k])
            .filter(|(u, v)| u.to_bits() != v.to_bits())
            .count()
    })
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    if a.is_nan() || b.is_nan() || (a < 0.0) != (b < 0.0) {
        return if a == b { 0 } else { u32::MAX };
    }
    a.to_bits().abs_diff(b.to_bits())
}

/// The shapes of the training tests: a partial last tile, many tiles, two channel tiles,
/// strides, 1x1 and 7x7, batch > 1, and (at tf32 / bf16) three whose forward is split over K,
/// the statistics then taken by the kernel that sums the splits (one tile of 16 pixels; four
/// tiles, the last of 8; batch 2 with 70 channels: two channel tiles of the forward, nine
/// blocks of 8 channels of the reduce, the last of 6).
fn train_shapes() -> [Conv2d; 9] {
    [
        conv(2, 3, 17, 13, 5, 3, 1, 1),  // 442 pixels: 7 tiles, the last of 58
        conv(2, 3, 15, 13, 20, 7, 2, 3), // the stem's 7x7 stride 2: 112 pixels
        conv(3, 66, 9, 11, 17, 1, 1, 0), // 1x1, 297 pixels
        conv(2, 16, 8, 8, 72, 1, 2, 0),  // 1x1 stride 2, two channel tiles, 32 pixels
        conv(2, 20, 12, 10, 24, 3, 2, 1), // 3x3 stride 2, 60 pixels: one partial tile
        conv(4, 8, 24, 24, 9, 3, 1, 1),  // 2304 pixels: 36 full tiles
        conv(1, 200, 4, 4, 20, 3, 1, 1), // split-K on the tensor cores
        conv(2, 64, 10, 10, 16, 3, 1, 1), // split-K, 200 pixels: 4 tiles
        conv(2, 130, 3, 3, 70, 3, 1, 1), // split-K, 70 channels
    ]
}

fn train_stats_fusion_matches_cpu(p: Precision) {
    let g = gpu(p);
    let cpu = CpuBackend::<f32>::new();
    let tol = p.tolerance().unwrap_or(1e-5);
    let mut rng = SplitMix64::fresh(&format!("fusion_train_{p}"));
    let mut worst = [0.0f64; 6];
    let mut worst_exact = [0.0f64; 6];
    let (mut worst_ulp, mut cases) = (0u32, 0);
    let (mut worst_unfused, mut worst_unfused_ulp) = (0.0f64, 0u32);
    let mut joins = 0;
    for s in train_shapes() {
        for (offset, residual, relu) in [
            (0.0, false, false),
            (5.0, false, true),
            (100.0, false, false),
            (1e5, false, true),
            (0.0, true, true),
            (5.0, true, false),
        ] {
            let c = TrainCase::new(&mut rng, s, offset, residual, relu);
            let name = format!("{p} {s:?} offset {offset} residual {residual} relu {relu}");
            let got = train(&g, &c, Path::Fused);
            let again = train(&g, &c, Path::Fused);
            assert_eq!(
                bit_diffs(&got, &again),
                [0; 6],
                "{name}: two runs differ (must be bit-reproducible)"
            );
            if residual {
                // The join fused into the normalisation is the separate join, bit for bit
                // (the same statistics: the same op without the residual).
                let apart = train(&g, &c, Path::JoinApart);
                let d = bit_diffs(&got, &apart);
                assert_eq!(
                    d, [0; 6],
                    "{name}: values differing from the separate join ({TRAIN_NAMES:?})"
                );
                joins += 1;
            }
            // z is the plain forward's, bit for bit.
            let plain = train(&g, &c, Path::Plain);
            let zdiff = got[0]
                .iter()
                .zip(&plain[0])
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(zdiff, 0, "{name}: z differs from the plain forward");
            // The rest within a rounding of the unfused path's (its statistics: two f64
            // passes over z).
            let e = rel_err(&got[1], &plain[1]);
            assert!(e < 1e-6, "{name}: y {e:.3e} from the unfused path's");
            worst_unfused = worst_unfused.max(e);
            for k in 2..6 {
                let u = got[k]
                    .iter()
                    .zip(&plain[k])
                    .map(|(&a, &b)| ulps(a, b))
                    .max()
                    .unwrap_or(0);
                assert!(
                    u <= 1,
                    "{name}: {} {u} ulp from the unfused path's",
                    TRAIN_NAMES[k]
                );
                worst_unfused_ulp = worst_unfused_ulp.max(u);
            }
            // The saved statistics against the exact (f64, two-pass) statistics of this z.
            let (n, hw) = (s.n, c.bn.hw);
            let cnt = (n * hw) as f64;
            for ch in 0..s.c_out {
                let vals = (0..n).flat_map(|i| {
                    let base = (i * s.c_out + ch) * hw;
                    got[0][base..base + hw].iter().map(|&v| v as f64)
                });
                let mean = vals.clone().sum::<f64>() / cnt;
                let var = vals.map(|v| (v - mean) * (v - mean)).sum::<f64>() / cnt;
                let invstd = 1.0 / (var + c.bn.eps).sqrt();
                let (um, ui) = (
                    ulps(got[4][ch], mean as f32),
                    ulps(got[5][ch], invstd as f32),
                );
                assert!(
                    um <= 1 && ui <= 1,
                    "{name}: channel {ch}: mean {} vs exact {mean} ({um} ulp), invstd {} vs exact {invstd} ({ui} ulp)",
                    got[4][ch],
                    got[5][ch]
                );
                worst_ulp = worst_ulp.max(um).max(ui);
            }
            // Against the CPU composite. Not with the inputs offset by 100 (the CPU's own
            // statistics are f32-accurate only: those are checked against the exact ones
            // above), and at tf32 / bf16 on unrounded operands only without offset: a
            // channel mean far from zero makes the normalised y amplify the operands'
            // rounding (z - mean is small next to z) past the precision's tolerance, with
            // or without fusion (y equals the unfused path's, checked above).
            if offset < 50.0 {
                let want = train(&cpu, &c, Path::Plain);
                let ks = if p == Precision::F32 || offset == 0.0 {
                    0..6
                } else {
                    0..0
                };
                // The saved means of zero-mean data are near zero next to z: their error
                // is measured against the channels' root mean square of z (what the
                // normalisation subtracts them from), else a seed's tf32 rounding alone
                // can put ||mean error|| / ||mean|| over the tolerance (1.46e-3 seen).
                let rms: Vec<f32> = (0..s.c_out)
                    .map(|ch| {
                        let sq: f64 = (0..n)
                            .flat_map(|i| {
                                let base = (i * s.c_out + ch) * hw;
                                want[0][base..base + hw].iter().map(|&v| (v as f64).powi(2))
                            })
                            .sum();
                        (sq / cnt).sqrt() as f32
                    })
                    .collect();
                for k in ks {
                    let e = if TRAIN_NAMES[k] == "save_mean" {
                        let num: f64 = got[k]
                            .iter()
                            .zip(&want[k])
                            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                            .sum();
                        let den: f64 = rms.iter().map(|&x| (x as f64).powi(2)).sum();
                        (num / den).sqrt()
                    } else {
                        rel_err(&got[k], &want[k])
                    };
                    assert!(
                        e < tol,
                        "{name}: {} relative error {e:.3e} >= {tol:.0e}",
                        TRAIN_NAMES[k]
                    );
                    worst[k] = worst[k].max(e);
                }
                if p != Precision::F32 {
                    let r = c.rounded(p);
                    let (gr, wr) = (train(&g, &r, Path::Fused), train(&cpu, &r, Path::Plain));
                    for k in 0..6 {
                        let e = rel_err(&gr[k], &wr[k]);
                        assert!(
                            e < 1e-5,
                            "{name}, rounded operands: {} relative error {e:.3e} >= 1e-5",
                            TRAIN_NAMES[k]
                        );
                        worst_exact[k] = worst_exact[k].max(e);
                    }
                }
            }
            cases += 1;
        }
    }
    let fmt = |w: &[f64; 6]| {
        TRAIN_NAMES
            .iter()
            .zip(w)
            .map(|(n, e)| format!("{n} {e:.2e}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "{p}: {cases} cases ({joins} with the residual join, bit-identical to the separate join); saved statistics vs exact f64: worst {worst_ulp} ulp; vs the unfused device path: y {worst_unfused:.2e}, statistics {worst_unfused_ulp} ulp; vs CPU (tolerance {tol:.0e}): {}; rounded operands: {}",
        fmt(&worst),
        fmt(&worst_exact)
    );
}

/// `conv2d_bn_train_fwd` refuses a batch norm that does not fit the convolution and buffers
/// of the wrong length, naming the op, before anything runs.
fn train_op_checks_its_shapes<B: Backend<T = f32>>(be: &B) {
    let s = conv(2, 3, 9, 7, 5, 3, 1, 1);
    let bn = BatchNorm2d {
        n: s.n,
        c: s.c_out,
        hw: s.out_h() * s.out_w(),
        eps: 1e-5,
        momentum: 0.1,
    };
    let z = |n: usize| be.zeros(n).expect("zeros");
    let run = |bn: &BatchNorm2d, y_len: usize, pc: usize| {
        let (x, w) = (z(s.x_len()), z(s.w_len()));
        let (g, b) = (z(pc), z(pc));
        let (mut rm, mut rv, mut sm, mut si) = (z(pc), z(pc), z(pc), z(pc));
        let (mut zz, mut y) = (z(s.y_len()), z(y_len));
        be.conv2d_bn_train_fwd(
            &s, bn, &x, &w, &g, &b, &mut rm, &mut rv, &mut sm, &mut si, &mut zz, &mut y, None, true,
        )
    };
    let run_res = |r_len: usize| {
        let (x, w) = (z(s.x_len()), z(s.w_len()));
        let (g, b) = (z(s.c_out), z(s.c_out));
        let (mut rm, mut rv, mut sm, mut si) = (z(s.c_out), z(s.c_out), z(s.c_out), z(s.c_out));
        let (mut zz, mut y, r) = (z(s.y_len()), z(s.y_len()), z(r_len));
        be.conv2d_bn_train_fwd(
            &s,
            &bn,
            &x,
            &w,
            &g,
            &b,
            &mut rm,
            &mut rv,
            &mut sm,
            &mut si,
            &mut zz,
            &mut y,
            Some(&r),
            true,
        )
    };
    run(&bn, s.y_len(), s.c_out).expect("the fitting shapes run");
    run_res(s.y_len()).expect("the fitting shapes run with a residual");
    let wrong_c = BatchNorm2d {
        c: s.c_out + 1,
        ..bn
    };
    for (what, r) in [
        (
            "a batch norm of another channel count",
            run(&wrong_c, s.y_len(), s.c_out + 1),
        ),
        ("a short y", run(&bn, s.y_len() - 1, s.c_out)),
        (
            "short per-channel buffers",
            run(&bn, s.y_len(), s.c_out - 1),
        ),
        ("a short residual", run_res(s.y_len() - 1)),
    ] {
        let e = r.expect_err(what).to_string();
        assert!(
            e.contains("conv2d_bn_train_fwd") || e.contains("batchnorm"),
            "{what}: the error names the op: {e}"
        );
    }
}

/// The CPU's `conv2d_bn_train_fwd` with a residual (the join in the normalisation's pass) is
/// the composite of separate ops bit for bit: conv, batch norm, then `add_relu_fwd` (or copy
/// and `add_assign`), every output.
fn train_join_on_the_cpu_is_the_composite() {
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("fusion_train_join_cpu");
    let mut cases = 0;
    for s in train_shapes() {
        for relu in [false, true] {
            let c = TrainCase::new(&mut rng, s, 0.0, true, relu);
            let got = train(&cpu, &c, Path::Fused);
            for path in [Path::JoinApart, Path::Plain] {
                assert_eq!(
                    bit_diffs(&got, &train(&cpu, &c, path)),
                    [0; 6],
                    "{s:?} relu {relu}: values differing ({TRAIN_NAMES:?})"
                );
            }
            // The join did something: some sums clipped to 0, others kept.
            if relu {
                assert!(got[1].contains(&0.0) && got[1].iter().any(|&v| v > 0.0));
            }
            cases += 1;
        }
    }
    eprintln!("cpu: {cases} cases, the fused join bit-identical to the separate ops");
}
