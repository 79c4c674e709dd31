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
//! Runs on a GPU or on the emulated driver (`scripts/cuda-emu.sh test`); without either the
//! device tests are reported as ignored (tests/common/cuda.rs), and with
//! `ICHCAM_REQUIRE_GPU=1` a missing device fails them.

mod common;
use common::rng::SplitMix64;
use common::shapes::conv;

use std::sync::OnceLock;

use common::cuda::device;
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
    ])
}

/// The shared device backend at precision `p` (clones of one backend: one context).
fn gpu(p: Precision) -> CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    let mut be = GPU
        .get_or_init(|| CudaBackend::new(0).expect("the harness found a CUDA device"))
        .clone();
    be.set_precision(p)
        .expect("the device takes this precision");
    be
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
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

/// `v` rounded as the tensor-core kernels round their operands: bf16 to nearest even, tf32
/// to nearest with ties away from zero (`cvt.rna.tf32.f32`).
fn round(p: Precision, v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            let u = x.to_bits();
            f32::from_bits(match p {
                Precision::F32 => u,
                Precision::Bf16 => (u + 0x7fff + ((u >> 16) & 1)) & 0xffff_0000,
                Precision::Tf32 => (u + 0x1000) & 0xffff_e000,
            })
        })
        .collect()
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
