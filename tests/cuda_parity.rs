//! Every op of the CUDA backend against the CPU reference (`CpuBackend<f32>`) on fresh
//! random inputs, with the outputs poisoned (NaN) before the launch so that an unwritten
//! element fails: `||gpu - cpu|| / ||cpu|| < 1e-5`. Shapes cover odd sizes, stride 2, 7x7,
//! 1x1, batch > 1 and the split-K path of the weight gradient.
//!
//! Runs on a GPU or on the emulated driver (`scripts/cuda-emu.sh test`); without either the
//! device tests are reported as ignored (tests/common/cuda.rs), and with `ICHCAM_REQUIRE_GPU=1`
//! a missing device fails them (scripts/gpu-check.sh and the emulator run them so).

mod common;
use common::rng::SplitMix64;
use common::shapes::conv;

use std::sync::OnceLock;

use common::cuda::{device, host, Test};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, Lstm, Pool2d};

const TOL: f64 = 1e-5;

fn main() {
    common::cuda::main(vec![
        device("conv2d_matches_cpu", conv2d_matches_cpu),
        device("batchnorm_matches_cpu", batchnorm_matches_cpu),
        device("elementwise_matches_cpu", elementwise_matches_cpu),
        device("maxpool_matches_cpu", maxpool_matches_cpu),
        device("global_avg_pool_matches_cpu", global_avg_pool_matches_cpu),
        device("linear_matches_cpu", linear_matches_cpu),
        device("lstm_matches_cpu", lstm_matches_cpu),
        device("bce_matches_cpu", bce_matches_cpu),
        device("optimizers_match_cpu", optimizers_match_cpu),
        device("cam_matches_cpu", cam_matches_cpu),
        device(
            "cuda_rejects_bad_shapes_without_launching",
            cuda_rejects_bad_shapes_without_launching,
        ),
        device(
            "launch_arguments_are_checked_against_the_ptx",
            launch_arguments_are_checked_against_the_ptx,
        ),
        device(
            "empty_buffers_make_no_zero_length_allocation",
            empty_buffers_make_no_zero_length_allocation,
        ),
        device(
            "grid_limits_are_checked_before_launching",
            grid_limits_are_checked_before_launching,
        ),
        device("ichnet_tiny_step_matches_cpu", ichnet_tiny_step_matches_cpu),
        host("device_choice_never_panics", device_choice_never_panics),
        host("every_kernel_is_embedded", every_kernel_is_embedded),
        Test {
            name: "every_kernel_compiles_at_run_time",
            run: every_kernel_compiles_at_run_time,
            needs: common::cuda::Needs::Nvrtc,
        },
    ])
}

/// The shared device backend (the harness runs device tests only when one opens).
fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    GPU.get_or_init(|| CudaBackend::new(0).expect("the harness found a CUDA device"))
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
    if want.iter().all(|v| *v == 0.0) {
        // e.g. dW_hh of a one-step sequence: then every element must be exactly zero.
        assert!(
            got.iter().all(|v| *v == 0.0),
            "{what}: reference is all zeros, the GPU's is not"
        );
        return;
    }
    let e = rel_err(got, want);
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert!(
        e < TOL,
        "{what}: relative error {e:e} (>= {TOL:e}), {nan} NaN of {}",
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

// ---- convolution ---------------------------------------------------------------------------

fn conv_all<B: Backend<T = f32>>(
    be: &B,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
) -> [Vec<f32>; 3] {
    let (xb, wb, dyb) = (up(be, x), up(be, w), up(be, dy));
    let mut y = nan(be, s.y_len());
    let mut dx = nan(be, s.x_len());
    let mut dw = nan(be, s.w_len());
    be.conv2d_fwd(s, &xb, &wb, &mut y).expect("conv2d_fwd");
    be.conv2d_bwd_data(s, &dyb, &wb, &mut dx)
        .expect("conv2d_bwd_data");
    be.conv2d_bwd_weight(s, &xb, &dyb, &mut dw)
        .expect("conv2d_bwd_weight");
    [down(be, &y), down(be, &dx), down(be, &dw)]
}

fn conv2d_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("conv2d");
    let shapes = [
        conv(2, 3, 17, 13, 5, 3, 1, 1),   // odd sizes, few channels
        conv(2, 3, 37, 29, 70, 7, 2, 3),  // the stem: 7x7 stride 2, > 64 output channels
        conv(3, 66, 9, 11, 17, 1, 1, 0),  // 1x1, > 64 input channels
        conv(2, 16, 8, 8, 32, 1, 2, 0),   // 1x1 stride 2 (downsample)
        conv(2, 20, 12, 10, 24, 3, 2, 1), // 3x3 stride 2
        conv(4, 64, 32, 32, 64, 3, 1, 1), // big reduction: the split-K path of bwd-weight
        conv(1, 5, 6, 7, 3, 3, 1, 0),     // no padding, tiny
    ];
    for s in shapes {
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let want = conv_all(&cpu, &s, &x, &w, &dy);
        let got = conv_all(g, &s, &x, &w, &dy);
        check(&format!("conv2d_fwd {s:?}"), &got[0], &want[0]);
        check(&format!("conv2d_bwd_data {s:?}"), &got[1], &want[1]);
        check(&format!("conv2d_bwd_weight {s:?}"), &got[2], &want[2]);
    }
}

// ---- batch norm ----------------------------------------------------------------------------

struct BnIn {
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    dy: Vec<f32>,
}

fn bn_all<B: Backend<T = f32>>(be: &B, s: &BatchNorm2d, i: &BnIn, relu: bool) -> Vec<Vec<f32>> {
    let (x, gamma, beta, dyb) = (
        up(be, &i.x),
        up(be, &i.gamma),
        up(be, &i.beta),
        up(be, &i.dy),
    );
    let (mut rm, mut rv) = (up(be, &i.rm), up(be, &i.rv));
    let (mut sm, mut si) = (nan(be, s.c), nan(be, s.c));
    let mut y = nan(be, s.len());
    be.batchnorm_train_fwd(
        s, &x, &gamma, &beta, &mut rm, &mut rv, &mut sm, &mut si, &mut y, relu,
    )
    .expect("bn train");
    let mut ye = nan(be, s.len());
    be.batchnorm_eval_fwd(s, &x, &gamma, &beta, &rm, &rv, &mut ye, relu)
        .expect("bn eval");
    let (mut dx, mut dg, mut db) = (nan(be, s.len()), nan(be, s.c), nan(be, s.c));
    be.batchnorm_bwd(
        s, &x, &y, &dyb, &gamma, &sm, &si, &mut dx, &mut dg, &mut db, relu,
    )
    .expect("bn bwd");
    [&y, &rm, &rv, &sm, &si, &ye, &dx, &dg, &db]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

fn batchnorm_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("batchnorm");
    let names = [
        "y",
        "running_mean",
        "running_var",
        "save_mean",
        "save_invstd",
        "eval y",
        "dx",
        "dgamma",
        "dbeta",
    ];
    for (n, c, hw) in [(3, 5, 37), (2, 70, 64), (1, 3, 1000), (4, 8, 3)] {
        for relu in [false, true] {
            let s = BatchNorm2d {
                n,
                c,
                hw,
                eps: 1e-5,
                momentum: 0.1,
            };
            // An offset mean and a spread scale: the variance must not be taken as E[x^2]-E[x]^2.
            let mut x = rng.vec_f32(s.len(), -1.0, 1.0);
            for (j, v) in x.iter_mut().enumerate() {
                let ch = (j / hw) % c;
                *v = *v * (0.5 + ch as f32 * 0.1) + 3.0 + ch as f32;
            }
            let i = BnIn {
                x,
                gamma: rng.vec_f32(c, 0.5, 1.5),
                beta: rng.vec_f32(c, -0.5, 0.5),
                rm: rng.vec_f32(c, -0.2, 0.2),
                rv: rng.vec_f32(c, 0.5, 1.5),
                dy: rng.vec_f32(s.len(), -1.0, 1.0),
            };
            let want = bn_all(&cpu, &s, &i, relu);
            let got = bn_all(g, &s, &i, relu);
            for (k, name) in names.iter().enumerate() {
                check(
                    &format!("batchnorm {name} n={n} c={c} hw={hw} relu={relu}"),
                    &got[k],
                    &want[k],
                );
            }
        }
    }
}

// ---- elementwise ---------------------------------------------------------------------------

fn elementwise_all<B: Backend<T = f32>>(be: &B, a: &[f32], b: &[f32]) -> Vec<Vec<f32>> {
    let (ab, bb) = (up(be, a), up(be, b));
    let n = a.len();
    let mut r = nan(be, n);
    be.relu_fwd(&ab, &mut r).expect("relu_fwd");
    let mut rb = nan(be, n);
    be.relu_bwd(&r, &bb, &mut rb).expect("relu_bwd");
    let mut ar = nan(be, n);
    be.add_relu_fwd(&ab, &bb, &mut ar).expect("add_relu_fwd");
    let mut acc = up(be, a);
    be.add_assign(&mut acc, &bb).expect("add_assign");
    let mut sc = up(be, b);
    be.scale_assign(&mut sc, -0.37).expect("scale_assign");
    let mut f = nan(be, n);
    be.fill(&mut f, 0.625).expect("fill");
    let mut cp = nan(be, n);
    be.copy(&bb, &mut cp).expect("copy");
    [&r, &rb, &ar, &acc, &sc, &f, &cp]
        .iter()
        .map(|x| down(be, x))
        .collect()
}

fn elementwise_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("elementwise");
    let names = [
        "relu_fwd",
        "relu_bwd",
        "add_relu_fwd",
        "add_assign",
        "scale_assign",
        "fill",
        "copy",
    ];
    for n in [1usize, 255, 1000, 70_001] {
        let a = rng.vec_f32(n, -1.0, 1.0);
        let b = rng.vec_f32(n, -1.0, 1.0);
        let want = elementwise_all(&cpu, &a, &b);
        let got = elementwise_all(g, &a, &b);
        for (k, name) in names.iter().enumerate() {
            check(&format!("{name} n={n}"), &got[k], &want[k]);
        }
    }
}

// ---- pooling -------------------------------------------------------------------------------

fn pool_all<B: Backend<T = f32>>(be: &B, s: &Pool2d, x: &[f32], dy: &[f32]) -> [Vec<f32>; 2] {
    let (xb, dyb) = (up(be, x), up(be, dy));
    let mut y = nan(be, s.y_len());
    be.maxpool2d_fwd(s, &xb, &mut y).expect("maxpool fwd");
    let mut dx = nan(be, s.x_len());
    be.maxpool2d_bwd(s, &xb, &y, &dyb, &mut dx)
        .expect("maxpool bwd");
    [down(be, &y), down(be, &dx)]
}

fn maxpool_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("maxpool");
    let shapes = [
        Pool2d {
            n: 2,
            c: 3,
            h: 13,
            w: 11,
            k: 3,
            stride: 2,
            pad: 1,
        },
        Pool2d {
            n: 1,
            c: 4,
            h: 8,
            w: 8,
            k: 2,
            stride: 2,
            pad: 0,
        },
        Pool2d {
            n: 3,
            c: 2,
            h: 9,
            w: 10,
            k: 3,
            stride: 1,
            pad: 1,
        },
    ];
    for s in shapes {
        for ties in [false, true] {
            let mut x = rng.vec_f32(s.x_len(), -1.0, 1.0);
            if ties {
                // Coarse values make ties in most windows: the first maximum must win.
                for v in &mut x {
                    *v = (*v * 2.0).round() / 2.0;
                }
            }
            let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
            let want = pool_all(&cpu, &s, &x, &dy);
            let got = pool_all(g, &s, &x, &dy);
            check(&format!("maxpool fwd {s:?} ties={ties}"), &got[0], &want[0]);
            check(&format!("maxpool bwd {s:?} ties={ties}"), &got[1], &want[1]);
        }
    }
}

fn global_avg_pool_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("gap");
    for (rows, hw) in [(1usize, 1usize), (6, 49), (70, 64), (3, 1000)] {
        let x = rng.vec_f32(rows * hw, -1.0, 1.0);
        let dy = rng.vec_f32(rows, -1.0, 1.0);
        let want = gap_all(&cpu, rows, hw, &x, &dy);
        let got = gap_all(g, rows, hw, &x, &dy);
        let out = [want, got];
        check(
            &format!("gap fwd rows={rows} hw={hw}"),
            &out[1][0],
            &out[0][0],
        );
        check(
            &format!("gap bwd rows={rows} hw={hw}"),
            &out[1][1],
            &out[0][1],
        );
    }
}

fn gap_all<B: Backend<T = f32>>(
    be: &B,
    rows: usize,
    hw: usize,
    x: &[f32],
    dy: &[f32],
) -> [Vec<f32>; 2] {
    let (xb, dyb) = (up(be, x), up(be, dy));
    let mut y = nan(be, rows);
    be.global_avg_pool_fwd(rows, hw, &xb, &mut y)
        .expect("gap fwd");
    let mut dx = nan(be, rows * hw);
    be.global_avg_pool_bwd(rows, hw, &dyb, &mut dx)
        .expect("gap bwd");
    [down(be, &y), down(be, &dx)]
}

// ---- dense ---------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn linear_all<B: Backend<T = f32>>(
    be: &B,
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
    with_bias: bool,
) -> Vec<Vec<f32>> {
    let (xb, wb, bb, dyb) = (up(be, x), up(be, w), up(be, b), up(be, dy));
    let mut y = nan(be, m * n);
    be.linear_fwd(
        m,
        k,
        n,
        &xb,
        &wb,
        if with_bias { Some(&bb) } else { None },
        &mut y,
    )
    .expect("linear fwd");
    let (mut dx, mut dw, mut db) = (nan(be, m * k), nan(be, n * k), nan(be, n));
    be.linear_bwd(
        m,
        k,
        n,
        &xb,
        &wb,
        &dyb,
        Some(&mut dx),
        &mut dw,
        if with_bias { Some(&mut db) } else { None },
    )
    .expect("linear bwd");
    let mut dw2 = nan(be, n * k);
    be.linear_bwd(m, k, n, &xb, &wb, &dyb, None, &mut dw2, None)
        .expect("linear bwd (dw only)");
    let mut out = vec![down(be, &y), down(be, &dx), down(be, &dw), down(be, &dw2)];
    if with_bias {
        out.push(down(be, &db));
    }
    out
}

fn linear_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("linear");
    let names = ["y", "dx", "dw", "dw (dw only)", "db"];
    for (m, k, n) in [
        (7usize, 70usize, 65usize),
        (32, 2048, 1),
        (128, 256, 128),
        (1, 1, 1),
        (33, 129, 67),
    ] {
        for with_bias in [true, false] {
            let x = rng.vec_f32(m * k, -1.0, 1.0);
            let w = rng.vec_f32(n * k, -1.0, 1.0);
            let b = rng.vec_f32(n, -1.0, 1.0);
            let dy = rng.vec_f32(m * n, -1.0, 1.0);
            let want = linear_all(&cpu, m, k, n, &x, &w, &b, &dy, with_bias);
            let got = linear_all(g, m, k, n, &x, &w, &b, &dy, with_bias);
            for (j, name) in names.iter().enumerate().take(want.len()) {
                check(
                    &format!("linear {name} m={m} k={k} n={n} bias={with_bias}"),
                    &got[j],
                    &want[j],
                );
            }
        }
    }
}

// ---- LSTM ----------------------------------------------------------------------------------

struct LstmIn {
    x: Vec<f32>,
    w_ih: Vec<f32>,
    w_hh: Vec<f32>,
    b_ih: Vec<f32>,
    b_hh: Vec<f32>,
    dh: Vec<f32>,
}

fn lstm_all<B: Backend<T = f32>>(be: &B, s: &Lstm, i: &LstmIn) -> Vec<Vec<f32>> {
    let (x, w_ih, w_hh, b_ih, b_hh, dh) = (
        up(be, &i.x),
        up(be, &i.w_ih),
        up(be, &i.w_hh),
        up(be, &i.b_ih),
        up(be, &i.b_hh),
        up(be, &i.dh),
    );
    let (mut h, mut c, mut gates) = (
        nan(be, s.h_len()),
        nan(be, s.h_len()),
        nan(be, s.gates_len()),
    );
    be.lstm_fwd(
        s, &x, &w_ih, &w_hh, &b_ih, &b_hh, &mut h, &mut c, &mut gates,
    )
    .expect("lstm fwd");
    let (mut dx, mut dwi, mut dwh, mut db) = (
        nan(be, s.x_len()),
        nan(be, i.w_ih.len()),
        nan(be, i.w_hh.len()),
        nan(be, 4 * s.hidden),
    );
    be.lstm_bwd(
        s, &x, &w_ih, &w_hh, &h, &c, &gates, &dh, &mut dx, &mut dwi, &mut dwh, &mut db,
    )
    .expect("lstm bwd");
    [&h, &c, &gates, &dx, &dwi, &dwh, &db]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

fn lstm_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("lstm");
    let names = ["h_seq", "c_seq", "gates", "dx", "dw_ih", "dw_hh", "db"];
    let shapes = [
        Lstm {
            batch: 2,
            seq: 5,
            input: 37,
            hidden: 19,
        },
        Lstm {
            batch: 1,
            seq: 32,
            input: 300,
            hidden: 256,
        },
        Lstm {
            batch: 3,
            seq: 1,
            input: 8,
            hidden: 70,
        },
    ];
    for s in shapes {
        let scale_ih = 1.0 / (s.input as f32).sqrt();
        let scale_hh = 1.0 / (s.hidden as f32).sqrt();
        let i = LstmIn {
            x: rng.vec_f32(s.x_len(), -1.0, 1.0),
            w_ih: rng.vec_f32(4 * s.hidden * s.input, -scale_ih, scale_ih),
            w_hh: rng.vec_f32(4 * s.hidden * s.hidden, -scale_hh, scale_hh),
            b_ih: rng.vec_f32(4 * s.hidden, -0.3, 0.3),
            b_hh: rng.vec_f32(4 * s.hidden, -0.3, 0.3),
            dh: rng.vec_f32(s.h_len(), -1.0, 1.0),
        };
        let want = lstm_all(&cpu, &s, &i);
        let got = lstm_all(g, &s, &i);
        for (k, name) in names.iter().enumerate() {
            check(&format!("lstm {name} {s:?}"), &got[k], &want[k]);
        }
    }
}

// ---- loss and optimizers -------------------------------------------------------------------

fn bce_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("bce");
    for n in [1usize, 32, 128, 1000] {
        for pos_weight in [1.0, 2.5] {
            let logits = rng.vec_f32(n, -12.0, 12.0);
            let targets: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.uniform_f32(0.0, 1.0) < 0.4 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let run = |be_cpu: bool| -> (f64, Vec<f32>) {
                if be_cpu {
                    let (l, t) = (up(&cpu, &logits), up(&cpu, &targets));
                    let mut d = nan(&cpu, n);
                    let loss = cpu
                        .bce_with_logits(&l, &t, pos_weight, &mut d)
                        .expect("bce");
                    (loss, down(&cpu, &d))
                } else {
                    let (l, t) = (up(g, &logits), up(g, &targets));
                    let mut d = nan(g, n);
                    let loss = g.bce_with_logits(&l, &t, pos_weight, &mut d).expect("bce");
                    (loss, down(g, &d))
                }
            };
            let (lw, dw) = run(true);
            let (lg, dg) = run(false);
            let e = ((lg - lw) / lw).abs();
            assert!(
                e < TOL,
                "bce loss n={n} pw={pos_weight}: {lg} vs {lw} (rel {e:e})"
            );
            check(&format!("bce dlogits n={n} pw={pos_weight}"), &dg, &dw);
        }
    }
}

fn optim_all<B: Backend<T = f32>>(
    be: &B,
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
) -> Vec<Vec<f32>> {
    let gb = up(be, g);
    let mut out = Vec::new();
    for first in [true, false] {
        let (mut pb, mut mb) = (up(be, p), up(be, m));
        be.sgd_step(&mut pb, &gb, &mut mb, 1e-2, 0.9, 1e-4, first)
            .expect("sgd");
        out.push(down(be, &pb));
        out.push(down(be, &mb));
    }
    for step in [1u64, 7] {
        let (mut pb, mut mb, mut vb) = (up(be, p), up(be, m), up(be, v));
        be.adam_step(
            &mut pb, &gb, &mut mb, &mut vb, step, 1e-3, 0.9, 0.999, 1e-8, 1e-4,
        )
        .expect("adam");
        out.push(down(be, &pb));
        out.push(down(be, &mb));
        out.push(down(be, &vb));
    }
    out
}

fn optimizers_match_cpu() {
    let gpu_be = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("optim");
    for n in [1usize, 1000, 70_001] {
        let p = rng.vec_f32(n, -1.0, 1.0);
        let g = rng.vec_f32(n, -1.0, 1.0);
        let m = rng.vec_f32(n, -0.1, 0.1);
        let v = rng.vec_f32(n, 0.0, 0.01);
        let want = optim_all(&cpu, &p, &g, &m, &v);
        let got = optim_all(gpu_be, &p, &g, &m, &v);
        let names = [
            "sgd first p",
            "sgd first m",
            "sgd p",
            "sgd m",
            "adam1 p",
            "adam1 m",
            "adam1 v",
            "adam7 p",
            "adam7 m",
            "adam7 v",
        ];
        for (k, name) in names.iter().enumerate() {
            check(&format!("{name} n={n}"), &got[k], &want[k]);
        }
    }
}

// ---- class activation maps -----------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn cam_all<B: Backend<T = f32>>(
    be: &B,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    f: &[f32],
    wt: &[f32],
    gr: &[f32],
) -> Vec<Vec<f32>> {
    let hw = h * w;
    let (fb, wb, gb) = (up(be, f), up(be, wt), up(be, gr));
    let mut cam = nan(be, n * hw);
    be.cam_weight(n, c, hw, &fb, &wb, &mut cam)
        .expect("cam_weight");
    let mut gc = nan(be, n * hw);
    be.gradcam(n, c, hw, &fb, &gb, &mut gc).expect("gradcam");
    let mut upb = nan(be, n * oh * ow);
    be.upsample_bilinear(n, h, w, oh, ow, &cam, &mut upb)
        .expect("upsample");
    let mut norm = nan(be, n * oh * ow);
    be.minmax_normalize(n, oh * ow, &upb, &mut norm)
        .expect("minmax");
    [&cam, &gc, &upb, &norm]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

/// Grad-CAM is `ReLU(sum_c alpha_c f_c)` with `alpha_c` the mean of a gradient of either
/// sign: both sums cancel, so two correct f32 summation orders differ by about the unit
/// roundoff times the magnitude of the terms, not of the result (seen: 1.3e-4 relative to
/// the result for one seed). The error is therefore measured against that magnitude,
/// `S(p) = sum_c (|alpha_c| + mean_i |g_ci|) |f_c(p)|`, at the same 1e-5.
fn check_gradcam(
    what: &str,
    got: &[f32],
    want: &[f32],
    c: usize,
    hw: usize,
    f: &[f32],
    gr: &[f32],
) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.chunks(hw).zip(want.chunks(hw)).enumerate() {
        let mut scale = vec![0.0f64; hw];
        for ch in 0..c {
            let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
            let alpha = gr[r.clone()].iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64;
            let mag = gr[r.clone()]
                .iter()
                .map(|&v| f64::from(v).abs())
                .sum::<f64>()
                / hw as f64;
            for (sv, &fv) in scale.iter_mut().zip(&f[r]) {
                *sv += (alpha.abs() + mag) * f64::from(fv).abs();
            }
        }
        for p in 0..hw {
            assert!(!g[p].is_nan(), "{what}: NaN at {p}");
            let d = f64::from(g[p]) - f64::from(w[p]);
            num += d * d;
            den += scale[p] * scale[p];
        }
    }
    let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    assert!(
        e < TOL,
        "{what}: error {e:e} relative to the terms' magnitude (>= {TOL:e})"
    );
}

fn cam_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("cam");
    let names = [
        "cam_weight",
        "gradcam",
        "upsample_bilinear",
        "minmax_normalize",
    ];
    // (n, c, h, w, oh, ow): upsampling by 32 as in the model, odd factors, and a downsample.
    for (n, c, h, w, oh, ow) in [
        (2usize, 70usize, 8usize, 8usize, 256usize, 256usize),
        (3, 5, 7, 5, 33, 21),
        (1, 16, 16, 16, 9, 12),
    ] {
        let f = rng.vec_f32(n * c * h * w, 0.0, 2.0);
        let wt = rng.vec_f32(c, -1.0, 1.0);
        let gr = rng.vec_f32(n * c * h * w, -1.0, 1.0);
        let want = cam_all(&cpu, n, c, h, w, oh, ow, &f, &wt, &gr);
        let got = cam_all(g, n, c, h, w, oh, ow, &f, &wt, &gr);
        for (k, name) in names.iter().enumerate() {
            let what = format!("{name} n={n} c={c} {h}x{w}->{oh}x{ow}");
            if *name == "gradcam" {
                check_gradcam(&what, &got[k], &want[k], c, h * w, &f, &gr);
            } else {
                check(&what, &got[k], &want[k]);
            }
        }
    }
    // A constant row normalises to zeros, and the other rows are untouched by it.
    let (n, len) = (3usize, 50usize);
    let mut x = rng.vec_f32(n * len, -1.0, 1.0);
    for v in &mut x[len..2 * len] {
        *v = 0.75;
    }
    let run = |on_gpu: bool| -> Vec<f32> {
        if on_gpu {
            let (xb, mut y) = (up(g, &x), nan(g, n * len));
            g.minmax_normalize(n, len, &xb, &mut y).expect("minmax");
            down(g, &y)
        } else {
            let (xb, mut y) = (up(&cpu, &x), nan(&cpu, n * len));
            cpu.minmax_normalize(n, len, &xb, &mut y).expect("minmax");
            down(&cpu, &y)
        }
    };
    let (got, want) = (run(true), run(false));
    assert!(
        got[len..2 * len].iter().all(|v| *v == 0.0),
        "constant row must become zeros"
    );
    check("minmax_normalize with a constant row", &got, &want);
}

// ---- shape errors --------------------------------------------------------------------------

fn cuda_rejects_bad_shapes_without_launching() {
    let g = gpu();
    let s = conv(1, 2, 5, 5, 3, 3, 1, 1);
    let x = g.zeros(s.x_len()).expect("zeros");
    let w = g.zeros(s.w_len() + 1).expect("zeros");
    let mut y = g.zeros(s.y_len()).expect("zeros");
    assert!(
        g.conv2d_fwd(&s, &x, &w, &mut y).is_err(),
        "a wrong weight length must be an error"
    );
    let bad = conv(1, 2, 2, 2, 3, 7, 1, 0);
    assert!(
        g.conv2d_fwd(&bad, &x, &w, &mut y).is_err(),
        "a kernel larger than the input must be an error"
    );
    let bn = BatchNorm2d {
        n: 1,
        c: 2,
        hw: 1,
        eps: 1e-5,
        momentum: 0.1,
    };
    let (xb, gb, bb) = (
        g.zeros(2).expect("z"),
        g.zeros(2).expect("z"),
        g.zeros(2).expect("z"),
    );
    let (mut a, mut b, mut c, mut d, mut e) = (
        g.zeros(2).expect("z"),
        g.zeros(2).expect("z"),
        g.zeros(2).expect("z"),
        g.zeros(2).expect("z"),
        g.zeros(2).expect("z"),
    );
    assert!(
        g.batchnorm_train_fwd(&bn, &xb, &gb, &bb, &mut a, &mut b, &mut c, &mut d, &mut e, false)
            .is_err(),
        "one value per channel cannot be normalised in training mode"
    );
}

/// The arguments of a launch are checked against the kernel's PTX parameter list: a
/// missing argument, an i32 for a pointer or an f64 for an f32 is an error naming the kernel,
/// and nothing is launched.
fn launch_arguments_are_checked_against_the_ptx() {
    use cudarc::driver::LaunchConfig;
    use ichcam::engine::cuda::KArg;
    let g = gpu();
    let mut y = g.zeros(16).expect("zeros");
    let p = g.ptr(&y);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // fill_f32(float* y, float value, int n)
    let good = [KArg::Ptr(p), KArg::F32(2.5), KArg::I32(16)];
    // SAFETY: y holds the 16 floats the launch writes.
    unsafe { g.launch_raw("elementwise", "fill_f32", cfg, &good) }
        .expect("the right arguments launch");
    assert_eq!(g.download(&y).expect("download"), vec![2.5; 16]);
    for (what, args) in [
        ("one argument too few", vec![KArg::Ptr(p), KArg::F32(1.0)]),
        (
            "one argument too many",
            vec![KArg::Ptr(p), KArg::F32(1.0), KArg::I32(16), KArg::I32(0)],
        ),
        (
            "an i32 for the pointer",
            vec![KArg::I32(0), KArg::F32(1.0), KArg::I32(16)],
        ),
        (
            "an f64 for the f32",
            vec![KArg::Ptr(p), KArg::F64(1.0), KArg::I32(16)],
        ),
        (
            "a 64-bit length for the int",
            vec![KArg::Ptr(p), KArg::F32(1.0), KArg::Ptr(16)],
        ),
    ] {
        // SAFETY: refused before it runs (the test).
        let e = unsafe { g.launch_raw("elementwise", "fill_f32", cfg, &args) }
            .expect_err(what)
            .to_string();
        assert!(
            e.contains("elementwise::fill_f32") && e.contains("PTX"),
            "{what}: {e}"
        );
    }
    g.fill(&mut y, 0.0).expect("fill");
    assert_eq!(
        g.download(&y).expect("download"),
        vec![0.0; 16],
        "a refused launch must not have run"
    );
}

/// Empty buffers are length-0 slices without a zero-byte allocation (which a GPU refuses).
fn empty_buffers_make_no_zero_length_allocation() {
    let g = gpu();
    let a = g.zeros(0).expect("zeros(0)");
    let b = g.upload(&[]).expect("upload of nothing");
    assert_eq!((g.len(&a), g.len(&b)), (0, 0));
    assert!(g.download(&a).expect("download").is_empty());
    let mut c = g.zeros(0).expect("zeros(0)");
    g.copy(&b, &mut c).expect("copy of nothing");
    g.relu_fwd(&a, &mut c).expect("relu of nothing");
    drop((a, b, c));
    g.synchronize().expect("the device is fine afterwards");
}

/// Grid dimensions beyond the device's limits are shape errors before any launch: the
/// batch-norm reduction puts the channels on grid.y (at most 65535).
fn grid_limits_are_checked_before_launching() {
    let g = gpu();
    let s = BatchNorm2d {
        n: 2,
        c: 70_000,
        hw: 1,
        eps: 1e-5,
        momentum: 0.1,
    };
    let z = |n: usize| g.zeros(n).expect("zeros");
    let (x, gamma, beta) = (z(s.len()), z(s.c), z(s.c));
    let (mut rm, mut rv, mut sm, mut si, mut y) = (z(s.c), z(s.c), z(s.c), z(s.c), z(s.len()));
    let e = g
        .batchnorm_train_fwd(
            &s, &x, &gamma, &beta, &mut rm, &mut rv, &mut sm, &mut si, &mut y, false,
        )
        .expect_err("70000 channels exceed grid.y");
    assert!(
        matches!(e, ichcam::engine::EngineError::Shape { .. }) && e.to_string().contains("65535"),
        "{e}"
    );
    let (dy, mut dx, mut dg, mut db) = (z(s.len()), z(s.len()), z(s.c), z(s.c));
    let e = g
        .batchnorm_bwd(
            &s, &x, &y, &dy, &gamma, &sm, &si, &mut dx, &mut dg, &mut db, false,
        )
        .expect_err("70000 channels exceed grid.y");
    assert!(
        matches!(e, ichcam::engine::EngineError::Shape { .. }),
        "{e}"
    );
    g.synchronize().expect("nothing was launched");
}

// ---- the whole model -----------------------------------------------------------------------

/// A stage-1 train step and a stage-2 CAM pass of the tiny model on the GPU against the CPU,
/// from the same seed: loss, logits, every stage-1 gradient, the updated weights and the CAM
/// within 1e-3 (many ops in sequence, and batch-norm statistics over few values, amplify f32
/// rounding beyond the per-op 1e-5).
fn ichnet_tiny_step_matches_cpu() {
    use ichcam::model::{CamKind, IchNet, ModelConfig, OptimizerConfig, ParamGroup};
    let gpu_be = CudaBackend::new(0).expect("second CUDA backend");
    let cfg = ModelConfig::tiny();
    let s = common::rng::fresh_seed("ichnet");
    let mut net_c = IchNet::new(CpuBackend::<f32>::new(), cfg.clone(), s).expect("cpu model");
    let mut net_g = IchNet::new(gpu_be, cfg, s).expect("gpu model");
    let (batch, seq, h, w) = (2usize, 4usize, 48usize, 40usize);
    let mut rng = SplitMix64::new(s ^ 0xABCD);
    let x = rng.vec_f32(batch * seq * 3 * h * w, 0.0, 1.0);
    let labels: Vec<f32> = (0..batch * seq)
        .map(|i| (i % 3 == 0) as u8 as f32)
        .collect();
    net_c.set_train(true);
    net_g.set_train(true);
    let sc = net_c
        .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
        .expect("cpu step");
    let sg = net_g
        .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
        .expect("gpu step");
    let tol = 1e-3;
    let e = ((sg.loss - sc.loss) / sc.loss).abs();
    assert!(e < tol, "loss {} vs {} (rel {e:e})", sg.loss, sc.loss);
    let lg: Vec<f32> = sg.logits.iter().map(|v| *v as f32).collect();
    let lc: Vec<f32> = sc.logits.iter().map(|v| *v as f32).collect();
    let el = rel_err(&lg, &lc);
    assert!(el < tol, "logits rel err {el:e}");
    let mut compared = 0;
    for name in net_c.names() {
        let (Ok(gc), Ok(gg)) = (net_c.grad(&name), net_g.grad(&name)) else {
            continue;
        };
        if name.starts_with("fc.") || gc.iter().all(|v| *v == 0.0) {
            continue;
        }
        let e = rel_err(&gg, &gc);
        assert!(e < tol, "grad {name}: rel err {e:e}");
        compared += 1;
    }
    assert!(compared > 10, "only {compared} gradients compared");
    let opt = OptimizerConfig::paper_sgd();
    net_c.step(&opt, ParamGroup::Stage1).expect("cpu sgd");
    net_g.step(&opt, ParamGroup::Stage1).expect("gpu sgd");
    for name in net_c.names() {
        let (pc, pg) = (
            net_c.param(&name).expect("param"),
            net_g.param(&name).expect("param"),
        );
        if pc.iter().all(|v| *v == 0.0) {
            continue;
        }
        let e = rel_err(&pg, &pc);
        assert!(e < tol, "param {name} after the step: rel err {e:e}");
    }
    net_c.set_train(false);
    net_g.set_train(false);
    let n = 3;
    let xs = &x[..n * 3 * h * w];
    let oc = net_c
        .stage2_infer(xs, n, h, w, CamKind::Vanilla)
        .expect("cpu cam");
    let og = net_g
        .stage2_infer(xs, n, h, w, CamKind::Vanilla)
        .expect("gpu cam");
    let f = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    for (what, a, b) in [
        ("logits", &og.logits, &oc.logits),
        ("cam_up", &og.cam_up, &oc.cam_up),
        ("cam_norm", &og.cam_norm, &oc.cam_norm),
    ] {
        let e = rel_err(&f(a), &f(b));
        assert!(e < tol, "stage 2 {what}: rel err {e:e}");
    }
}

// ---- discovery and the kernel table (these run without a GPU) ------------------------------

fn device_choice_never_panics() {
    use ichcam::engine::Device;
    assert!(
        matches!(
            Device::open("cpu").expect("cpu"),
            Device::Cpu { fallback: None, .. }
        ),
        "cpu is the CPU, with no fallback note"
    );
    assert!(
        Device::open("tpu").is_err(),
        "an unknown device name must be an error"
    );
    assert!(
        Device::open("cuda:abc").is_err(),
        "a bad ordinal must be an error"
    );
    match Device::open("auto").expect("auto always resolves") {
        Device::Cpu { fallback, .. } => {
            let r = fallback.expect("auto falling back to the CPU says why");
            assert!(!r.is_empty() && !r.contains('\n'), "one clear line: {r:?}");
        }
        Device::Cuda(be) => assert!(be.info().compute_capability.0 >= 3, "{:?}", be.info()),
    }
    if common::cuda::device_absent().is_some() {
        assert!(
            Device::open("cuda").is_err(),
            "asking for a GPU without one must be an error"
        );
        assert!(CudaBackend::new(0).is_err());
    }
}

fn every_kernel_is_embedded() {
    use ichcam::engine::cuda::module::{precompiled, KERNELS};
    for name in [
        "conv",
        "norm",
        "pool",
        "elementwise",
        "dense",
        "lstm",
        "loss",
        "optim",
        "cam",
        "volume",
        "kmeans",
        "morph",
        "ccl",
        "bias",
        "channels",
        "dice",
        "upconv",
    ] {
        let k = KERNELS
            .iter()
            .find(|k| k.name == name)
            .unwrap_or_else(|| panic!("kernels/{name}.cu not embedded"));
        assert!(
            k.source.contains("extern \"C\" __global__"),
            "{name}: no kernel in the embedded source"
        );
        assert_eq!(
            k.ptx_sm90.is_some(),
            precompiled(),
            "{name}: sm90 PTX presence"
        );
        assert_eq!(
            k.ptx_portable.is_some(),
            precompiled(),
            "{name}: portable PTX presence"
        );
    }
}

/// The path a build without NVRTC takes at first GPU use (needs libnvrtc at run time).
fn every_kernel_compiles_at_run_time() {
    use ichcam::engine::cuda::module::{compile_at_runtime, KERNELS};
    for k in KERNELS {
        if let Err(e) = compile_at_runtime(k, (9, 0)) {
            panic!("kernels/{}.cu does not compile at run time: {e}", k.name);
        }
    }
}
