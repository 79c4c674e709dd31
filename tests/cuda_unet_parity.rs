//! The U-Net's ops on the CUDA backend against the CPU reference (`CpuBackend<f32>`) on fresh
//! random inputs, with every output poisoned (NaN) before the launch so that an unwritten
//! element fails: `||gpu - cpu|| / ||cpu|| < 1e-5`; an op that writes a channel slice must
//! leave the rest of its buffer untouched. Then a whole U-Net training pass, Adam step and
//! eval pass on the GPU against the CPU, and `ichcam parity --device cuda` on every U-Net
//! fixture.
//!
//! Runs on a GPU or on the emulated driver (scripts/cuda-emu.sh); without either the tests
//! that need a device are reported as ignored (tests/common/cuda.rs), with
//! `ICHCAM_REQUIRE_GPU=1` a missing device fails them. The kernel-table test needs no device
//! and always runs.

mod common;
use common::rng::SplitMix64;

use std::path::Path;
use std::sync::OnceLock;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::{Backend, ChannelCopy, SoftDice, UpConv2d};

fn main() {
    use common::cuda::{device, host};
    common::cuda::main(vec![
        device("bias_matches_cpu", bias_matches_cpu),
        device(
            "upconv_matches_cpu_and_writes_only_its_slice",
            upconv_matches_cpu_and_writes_only_its_slice,
        ),
        device("copy_channels_matches_cpu", copy_channels_matches_cpu),
        device("sigmoid_and_dice_match_cpu", sigmoid_and_dice_match_cpu),
        device(
            "unet_ops_reject_bad_shapes_without_launching",
            unet_ops_reject_bad_shapes_without_launching,
        ),
        device("unet_step_matches_cpu", unet_step_matches_cpu),
        device(
            "parity_binary_passes_every_unet_fixture_on_cuda",
            parity_binary_passes_every_unet_fixture_on_cuda,
        ),
        host(
            "unet_kernels_are_embedded_and_compile_at_run_time",
            unet_kernels_are_embedded_and_compile_at_run_time,
        ),
    ])
}

const TOL: f64 = 1e-5;

/// The shared GPU backend (the harness runs these tests only when one opens).
fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match GPU.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string())) {
        Ok(b) => b,
        Err(e) => panic!("no usable CUDA device: {e}"),
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() != w.is_nan() {
            return f64::INFINITY;
        }
        if g.is_nan() {
            continue;
        }
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    let nan = got.iter().filter(|v| v.is_nan()).count();
    let nan_want = want.iter().filter(|v| v.is_nan()).count();
    assert!(
        e < TOL && nan == nan_want,
        "{what}: relative error {e:e} (>= {TOL:e}), {nan} NaN of {} (reference: {nan_want})",
        got.len()
    );
}

fn nan<B: Backend<T = f32>>(be: &B, len: usize) -> B::Buf {
    be.upload(&vec![f32::NAN; len]).expect("upload")
}

fn up<B: Backend<T = f32>>(be: &B, v: &[f32]) -> B::Buf {
    be.upload(v).expect("upload")
}

fn down<B: Backend<T = f32>>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(b).expect("download")
}

// ---- conv bias -----------------------------------------------------------------------------

fn bias_all<B: Backend<T = f32>>(
    be: &B,
    n: usize,
    c: usize,
    hw: usize,
    y: &[f32],
    b: &[f32],
) -> Vec<Vec<f32>> {
    let bb = up(be, b);
    let mut out = Vec::new();
    for relu in [false, true] {
        let mut yb = up(be, y);
        be.bias_relu_assign(n, c, hw, &bb, &mut yb, relu)
            .expect("bias_relu_assign");
        out.push(down(be, &yb));
    }
    let mut db = nan(be, c);
    be.bias_bwd(n, c, hw, &up(be, y), &mut db)
        .expect("bias_bwd");
    out.push(down(be, &db));
    out
}

fn bias_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("bias");
    for (n, c, hw) in [
        (2usize, 3usize, 17usize),
        (1, 16, 256 * 256),
        (8, 64, 33),
        (3, 1, 1),
    ] {
        let y = rng.vec_f32(n * c * hw, -1.0, 1.0);
        let b = rng.vec_f32(c, -0.5, 0.5);
        let want = bias_all(&cpu, n, c, hw, &y, &b);
        let got = bias_all(g, n, c, hw, &y, &b);
        for (k, what) in ["bias add", "bias add + relu", "bias_bwd"]
            .iter()
            .enumerate()
        {
            check(&format!("{what} {n}x{c}x{hw}"), &got[k], &want[k]);
        }
    }
}

// ---- up-convolution ------------------------------------------------------------------------

/// Forward into a NaN-poisoned wider buffer, then the backward with NaN-poisoned outputs.
fn upconv_all<B: Backend<T = f32>>(
    be: &B,
    s: &UpConv2d,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
) -> [Vec<f32>; 4] {
    let (xb, wb, bb) = (up(be, x), up(be, w), up(be, b));
    let mut y = nan(be, s.y_len());
    be.upconv2d_fwd(s, &xb, &wb, &bb, &mut y)
        .expect("upconv2d_fwd");
    let (mut dx, mut dw, mut db) = (nan(be, s.x_len()), nan(be, s.w_len()), nan(be, s.c_out));
    be.upconv2d_bwd(s, &xb, &wb, &up(be, dy), &mut dx, &mut dw, &mut db)
        .expect("upconv2d_bwd");
    [down(be, &y), down(be, &dx), down(be, &dw), down(be, &db)]
}

#[allow(clippy::too_many_arguments)]
fn upc(
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    yc: usize,
    yo: usize,
) -> UpConv2d {
    UpConv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        k,
        y_channels: yc,
        y_offset: yo,
    }
}

fn upconv_matches_cpu_and_writes_only_its_slice() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("upconv");
    for s in [
        upc(2, 3, 5, 7, 2, 2, 2, 0),       // the plain op, odd sizes
        upc(2, 32, 16, 16, 16, 2, 32, 0),  // the U-Net's: first half of the concatenation
        upc(3, 8, 3, 5, 4, 2, 9, 5),       // last channels of a wider buffer, batch 3
        upc(1, 4, 4, 3, 3, 3, 6, 1),       // kernel = stride = 3
        upc(1, 256, 8, 8, 128, 2, 256, 0), // the authors' deepest up-convolution
    ] {
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let b = rng.vec_f32(s.c_out, -1.0, 1.0);
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let want = upconv_all(&cpu, &s, &x, &w, &b, &dy);
        let got = upconv_all(g, &s, &x, &w, &b, &dy);
        // Outside the slice both stay NaN (untouched); inside, no NaN.
        let plane = s.out_h() * s.out_w();
        let inside = |i: usize| {
            let ch = (i / plane) % s.y_channels;
            ch >= s.y_offset && ch < s.y_offset + s.c_out
        };
        assert!(
            got[0]
                .iter()
                .enumerate()
                .all(|(i, v)| v.is_nan() != inside(i)),
            "upconv2d_fwd {s:?}: wrote outside its slice or left part of it"
        );
        for (k, what) in ["fwd", "dx", "dw", "db"].iter().enumerate() {
            check(&format!("upconv {what} {s:?}"), &got[k], &want[k]);
        }
    }
}

// ---- channel slices ------------------------------------------------------------------------

fn copy_channels_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("channels");
    for s in [
        ChannelCopy {
            n: 2,
            hw: 48 * 80,
            c: 16,
            src_channels: 16,
            src_offset: 0,
            dst_channels: 32,
            dst_offset: 16,
        },
        ChannelCopy {
            n: 3,
            hw: 7,
            c: 2,
            src_channels: 5,
            src_offset: 3,
            dst_channels: 2,
            dst_offset: 0,
        },
    ] {
        let src = rng.vec_f32(s.src_len(), -1.0, 1.0);
        let dst = rng.vec_f32(s.dst_len(), -1.0, 1.0);
        for accumulate in [false, true] {
            let run = |be_gpu: bool| -> Vec<f32> {
                if be_gpu {
                    let mut d = up(g, &dst);
                    g.copy_channels(&s, &up(g, &src), &mut d, accumulate)
                        .expect("copy_channels");
                    down(g, &d)
                } else {
                    let mut d = dst.clone();
                    cpu.copy_channels(&s, &src, &mut d, accumulate)
                        .expect("copy_channels");
                    d
                }
            };
            check(
                &format!("copy_channels {s:?} accumulate {accumulate}"),
                &run(true),
                &run(false),
            );
        }
    }
}

// ---- sigmoid and the soft Dice loss --------------------------------------------------------

fn sigmoid_and_dice_match_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("dice");
    for s in [
        SoftDice {
            n: 1,
            c: 1,
            hw: 7,
            eps: 1e-7,
        },
        SoftDice {
            n: 8,
            c: 1,
            hw: 256 * 256,
            eps: 1e-7,
        },
        SoftDice {
            n: 3,
            c: 2,
            hw: 1000,
            eps: 0.5,
        },
    ] {
        let z = rng.vec_f32(s.len(), -30.0, 30.0);
        let t = rng.mask_f32(s.len(), 0.3);
        let r = rng.vec_f32(s.len(), -1.0, 1.0);
        let run = |be_gpu: bool| -> (f64, Vec<Vec<f32>>) {
            fn all<B: Backend<T = f32>>(
                be: &B,
                s: &SoftDice,
                z: &[f32],
                t: &[f32],
                r: &[f32],
            ) -> (f64, Vec<Vec<f32>>) {
                let mut y = nan(be, s.len());
                be.sigmoid_fwd(&up(be, z), &mut y).expect("sigmoid_fwd");
                let mut dx = nan(be, s.len());
                be.sigmoid_bwd(&y, &up(be, r), &mut dx)
                    .expect("sigmoid_bwd");
                let mut dp = nan(be, s.len());
                let loss = be
                    .soft_dice_loss(s, &y, &up(be, t), &mut dp)
                    .expect("soft_dice_loss");
                (loss, vec![down(be, &y), down(be, &dx), down(be, &dp)])
            }
            if be_gpu {
                all(g, &s, &z, &t, &r)
            } else {
                all(&cpu, &s, &z, &t, &r)
            }
        };
        let (lc, want) = run(false);
        let (lg, got) = run(true);
        let e = ((lg - lc) / lc).abs();
        assert!(e < TOL, "dice loss {s:?}: {lg} vs {lc} (rel {e:e})");
        for (k, what) in ["sigmoid", "sigmoid_bwd", "dice dprobs"].iter().enumerate() {
            check(&format!("{what} {s:?}"), &got[k], &want[k]);
        }
    }
}

fn unet_ops_reject_bad_shapes_without_launching() {
    let g = gpu();
    let z = |n: usize| g.zeros(n).expect("zeros");
    let s = upc(1, 2, 3, 3, 2, 2, 3, 2); // slice past the end
    assert!(g
        .upconv2d_fwd(&s, &z(18), &z(16), &z(2), &mut z(108))
        .is_err());
    let c = ChannelCopy {
        n: 1,
        hw: 2,
        c: 2,
        src_channels: 2,
        src_offset: 1,
        dst_channels: 4,
        dst_offset: 0,
    };
    assert!(g.copy_channels(&c, &z(4), &mut z(8), false).is_err());
    assert!(g.bias_bwd(2, 3, 4, &z(24), &mut z(4)).is_err());
    let d = SoftDice {
        n: 1,
        c: 1,
        hw: 3,
        eps: 0.0,
    };
    assert!(
        g.soft_dice_loss(&d, &z(3), &z(3), &mut z(3)).is_err(),
        "an empty prediction and target with eps 0 is 0/0"
    );
}

// ---- the whole U-Net -----------------------------------------------------------------------

/// A training pass, an Adam step and an eval pass of a small U-Net on the GPU against the
/// CPU in f64 from the same weights: loss, output, every gradient, the updated weights and
/// running statistics, and the eval output within 1e-3 (many ops in a row, and batch norms
/// over few values, amplify f32 rounding beyond the per-op 1e-5). A gradient and an updated
/// weight match the CPU's f64 or its f32 (see the comment in the body for why either).
fn unet_step_matches_cpu() {
    use ichcam::model::unet::{UNet, UNetConfig};
    use ichcam::model::OptimizerConfig;
    let _ = gpu();
    let g = CudaBackend::new(0).expect("a second CUDA backend");
    let cfg = UNetConfig {
        in_channels: 3,
        features: 4,
        bce_weight: 0.5,
        ..UNetConfig::authors(3)
    };
    // One fixed input (`ICHCAM_SEED=N` runs another): a fresh seed every run fails about
    // one run in thirty (1 of 34 measured) on an f32 ReLU decision that the device and the
    // CPU's f32 take differently (the seed below), a failure no kernel can remove.
    let mut rng = if std::env::var_os("ICHCAM_SEED").is_some() {
        SplitMix64::fresh("unet")
    } else {
        SplitMix64::new(1)
    };
    let seed = rng.next_u64();
    let mut ng = UNet::new(g, cfg.clone(), seed).expect("gpu net");
    let mut nc = UNet::new(CpuBackend::<f64>::new(), cfg.clone(), seed).expect("cpu net");
    // The CPU engine in f32 too: for some inputs an f32 rounding
    // decides a max-pool or ReLU choice differently from f64 and moves many gradients by
    // a few percent in both f32 engines (seed 6931120495416484056: the CPU's f32 gradients
    // 3e-2..7e-2 from its f64 ones, the device's within 1.3e-5 of the CPU's f32 ones);
    // elsewhere the CPU's f32 loses digits on near-cancelling batch-norm / bias gradients
    // that the device keeps (3e-3..3e-2 from f64, the device ~1e-5). A gradient passes
    // when it matches either reference; a wrong kernel matches neither.
    // Not every f32 decision is shared by the two f32 engines, though: with seed
    // 6931120459080724717 one pre-activation of encoder3's second convolution (image 1,
    // channel 1, pixel (11, 5)) is -2.96e-7 in f64, inside both f32 convolutions' rounding
    // error (device 3.6e-7, CPU f32 3.0e-7 there; medians over that layer 3.1e-7 and
    // 4.4e-7). The CPU's f32 lands on 0 (dead, as f64), the device's on +5.96e-8 (alive):
    // its BN output then is the strict maximum of a window of otherwise dead pixels (no tie;
    // both engines take the first maximum), so the pooled gradient flows through one ReLU the
    // CPU closes, and every encoder gradient moves by 3e-3..2e-2 from both references. The
    // only mask difference in that run; no kernel is wrong, and this test fails on that seed.
    let mut n32 = UNet::new(CpuBackend::<f32>::new(), cfg, seed).expect("cpu f32 net");
    for name in ng.names() {
        let p = ng.param(&name).expect("p");
        let v: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
        nc.set_param(&name, &v).expect("same initial weights");
        n32.set_param(&name, &p).expect("same initial weights");
    }
    let f32s = |v: Vec<f64>| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
    let (n, h, w) = (2usize, 48usize, 64usize);
    let x = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let t = rng.mask_f32(n * h * w, 0.3);
    let (x64, t64): (Vec<f64>, Vec<f64>) = (
        x.iter().map(|&v| f64::from(v)).collect(),
        t.iter().map(|&v| f64::from(v)).collect(),
    );
    let tol = 1e-3;
    let lc = nc.forward_backward(&x64, &t64, n, h, w).expect("cpu pass");
    n32.forward_backward(&x, &t, n, h, w).expect("cpu f32 pass");
    let lg = ng.forward_backward(&x, &t, n, h, w).expect("gpu pass");
    let e = ((lg.loss - lc.loss) / lc.loss).abs();
    assert!(e < tol, "loss {} vs {} (rel {e:e})", lg.loss, lc.loss);
    let e = rel_err(&ng.output().expect("out"), &f32s(nc.output().expect("out")));
    assert!(e < tol, "training output: rel err {e:e}");
    let mut bad = Vec::new();
    for s in nc.weight_specs() {
        let got = ng.grad(&s.name).expect("grad");
        let e64 = rel_err(&got, &f32s(nc.grad(&s.name).expect("grad")));
        let e32 = rel_err(&got, &n32.grad(&s.name).expect("grad"));
        println!(
            "grad {}: rel err {e64:.2e} vs f64, {e32:.2e} vs the CPU's f32",
            s.name
        );
        if e64 >= tol && e32 >= tol {
            bad.push(format!(
                "grad {}: rel err {e64:e} vs the CPU's f64, {e32:e} vs its f32",
                s.name
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    nc.step(&OptimizerConfig::adam(1e-3)).expect("cpu adam");
    n32.step(&OptimizerConfig::adam(1e-3))
        .expect("cpu f32 adam");
    ng.step(&OptimizerConfig::adam(1e-3)).expect("gpu adam");
    for name in nc.names() {
        let got = ng.param(&name).expect("p");
        let e64 = rel_err(&got, &f32s(nc.param(&name).expect("p")));
        let e32 = rel_err(&got, &n32.param(&name).expect("p"));
        if e64 >= tol && e32 >= tol {
            bad.push(format!(
                "{name} after the step: rel err {e64:e} vs the CPU's f64, {e32:e} vs its f32"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let pc = nc.predict(&x64, n, h, w).expect("cpu eval");
    let pg = ng.predict(&x, n, h, w).expect("gpu eval");
    let e = rel_err(&pg, &f32s(pc));
    assert!(e < tol, "eval output: rel err {e:e}");
}

fn parity_binary_passes_every_unet_fixture_on_cuda() {
    let _ = gpu();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet-parity");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).expect("fixture folder") {
        let p = entry.expect("entry").path();
        if p.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let out = common::bin()
            .args(["parity", "--device", "cuda"])
            .arg(&p)
            .output()
            .expect("run ichcam");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.lines().last().unwrap_or("").starts_with("PASS"),
            "{}:\n{stdout}\n{}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 3, "only {ran} fixtures");
}

// ---- the kernel table (no device needed) ---------------------------------------------------

fn unet_kernels_are_embedded_and_compile_at_run_time() {
    use ichcam::engine::cuda::device::nvrtc_present;
    use ichcam::engine::cuda::module::{compile_at_runtime, precompiled, KERNELS};
    for name in ["bias", "channels", "upconv", "dice"] {
        let k = KERNELS
            .iter()
            .find(|k| k.name == name)
            .unwrap_or_else(|| panic!("kernels/{name}.cu not embedded"));
        assert!(k.source.contains("extern \"C\" __global__"), "{name}");
        assert_eq!(k.ptx_sm90.is_some(), precompiled(), "{name}: sm90 PTX");
        assert_eq!(
            k.ptx_portable.is_some(),
            precompiled(),
            "{name}: portable PTX"
        );
        if nvrtc_present() {
            if let Err(e) = compile_at_runtime(k, (9, 0)) {
                panic!("kernels/{name}.cu does not compile at run time: {e}");
            }
        }
    }
}
