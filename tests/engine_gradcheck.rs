//! The CPU reference backend checked against first principles: every op with a backward by
//! central finite differences in f64 on fresh random inputs, forwards against naive loops
//! or hand-computed values, the optimizers against their formulas, and bad buffer lengths
//! against `Err` (never a panic).

mod common;
use common::rng::SplitMix64;

use ichcam::engine::cpu::gemm::{matmul, Mat, MatMut, Par};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, Lstm, Pool2d};

type B = CpuBackend<f64>;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

const H: f64 = 1e-5;

/// Compares `analytic` with the central difference of `loss` around `x` at every index;
/// fails with the worst element when the relative error exceeds `tol`.
fn check_grad(
    name: &str,
    x: &[f64],
    analytic: &[f64],
    tol: f64,
    mut loss: impl FnMut(&[f64]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    let mut numeric = vec![0.0; x.len()];
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + H;
        let lp = loss(&xp);
        xp[i] = orig - H;
        let lm = loss(&xp);
        xp[i] = orig;
        numeric[i] = (lp - lm) / (2.0 * H);
    }
    let scale = analytic
        .iter()
        .chain(&numeric)
        .fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 1e-8,
        "{name}: the gradient is identically zero, the check would prove nothing"
    );
    let diff: f64 = analytic
        .iter()
        .zip(&numeric)
        .map(|(a, n)| (a - n).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = analytic
        .iter()
        .zip(&numeric)
        .map(|(a, n)| (a + n).powi(2))
        .sum::<f64>()
        .sqrt();
    let rel = diff / norm;
    let (worst, werr) = analytic
        .iter()
        .zip(&numeric)
        .enumerate()
        .map(|(i, (a, n))| (i, (a - n).abs() / scale))
        .fold((0, 0.0), |b, c| if c.1 > b.1 { c } else { b });
    assert!(
        rel < tol && werr < tol,
        "{name}: relative error {rel:e} (worst element {worst}: analytic {} numeric {}, err {werr:e})",
        analytic[worst],
        numeric[worst]
    );
}

// ---- convolution ---------------------------------------------------------------------------

fn naive_conv(s: &Conv2d, x: &[f64], w: &[f64]) -> Vec<f64> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let mut y = vec![0.0; s.y_len()];
    for n in 0..s.n {
        for co in 0..s.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for ci in 0..s.c_in {
                        for ky in 0..s.kh {
                            for kx in 0..s.kw {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                acc += x
                                    [((n * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize]
                                    * w[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx];
                            }
                        }
                    }
                    y[((n * s.c_out + co) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn conv(
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
) -> Conv2d {
    Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        stride,
        pad,
    }
}

fn conv_cases() -> Vec<Conv2d> {
    vec![
        conv(2, 3, 6, 5, 4, 3, 3, 1, 1),   // 3x3 same, non-square image
        conv(1, 3, 6, 5, 4, 3, 3, 1, 1),   // batch 1: the sequential path
        conv(3, 2, 9, 8, 3, 3, 3, 2, 1),   // stride 2
        conv(2, 3, 15, 13, 4, 7, 7, 2, 3), // the stem's 7x7/2 pad 3
        conv(2, 5, 4, 6, 3, 1, 1, 1, 0),   // 1x1: the plain GEMM path
        conv(2, 4, 7, 6, 5, 1, 1, 2, 0),   // 1x1 stride 2 (downsample)
        conv(2, 2, 7, 9, 3, 3, 5, 2, 2),   // non-square kernel
        conv(2, 2, 5, 5, 2, 3, 3, 3, 0),   // stride larger than needed: skipped rows
    ]
}

#[test]
fn conv_forward_matches_naive_loops() {
    let be = B::new();
    let mut rng = SplitMix64::new(11);
    for s in conv_cases() {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let mut y = vec![f64::NAN; s.y_len()];
        be.conv2d_fwd(&s, &x, &w, &mut y).unwrap();
        let want = naive_conv(&s, &x, &w);
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-12, "{s:?} element {i}: {a} vs {b}");
        }
    }
}

/// The two backward passes by the same seven loops as [`naive_conv`], scattering instead
/// of gathering.
fn naive_conv_bwd(s: &Conv2d, x: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (oh, ow) = (s.out_h(), s.out_w());
    let mut dx = vec![0.0; s.x_len()];
    let mut dw = vec![0.0; s.w_len()];
    for n in 0..s.n {
        for co in 0..s.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dy[((n * s.c_out + co) * oh + oy) * ow + ox];
                    for ci in 0..s.c_in {
                        for ky in 0..s.kh {
                            for kx in 0..s.kw {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xi =
                                    ((n * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((co * s.c_in + ci) * s.kh + ky) * s.kw + kx;
                                dx[xi] += g * w[wi];
                                dw[wi] += g * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
}

#[test]
fn conv_every_work_split_matches_naive_loops() {
    // Shapes that take each path of the implementation on a 2-thread pool: one image in
    // several row tiles (alone, or several images in parallel), 1x1 on one image, and small
    // images grouped into one product (in parallel, unevenly, or in turn).
    let be = B::new();
    let mut rng = SplitMix64::new(12);
    for s in [
        conv(2, 32, 64, 64, 4, 3, 3, 1, 1),
        conv(1, 32, 64, 60, 4, 3, 3, 2, 1),
        conv(1, 8, 30, 30, 4, 1, 1, 1, 0),
        conv(8, 4, 16, 16, 4, 3, 3, 1, 1),
        conv(5, 4, 16, 16, 4, 1, 1, 1, 0),
        conv(3, 6, 7, 7, 5, 3, 3, 1, 1),
        conv(4, 3, 40, 38, 8, 7, 7, 2, 3),
    ] {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let r = rng.vec(s.y_len(), -1.0, 1.0);
        let mut y = vec![f64::NAN; s.y_len()];
        let mut dx = vec![f64::NAN; s.x_len()];
        let mut dw = vec![f64::NAN; s.w_len()];
        be.conv2d_fwd(&s, &x, &w, &mut y).unwrap();
        be.conv2d_bwd_data(&s, &r, &w, &mut dx).unwrap();
        be.conv2d_bwd_weight(&s, &x, &r, &mut dw).unwrap();
        let (want_dx, want_dw) = naive_conv_bwd(&s, &x, &w, &r);
        let e = max_abs_diff(&y, &naive_conv(&s, &x, &w));
        assert!(e < 1e-11, "fwd {s:?}: max error {e}");
        let e = max_abs_diff(&dx, &want_dx);
        assert!(e < 1e-11, "bwd data {s:?}: max error {e}");
        let e = max_abs_diff(&dw, &want_dw);
        assert!(e < 1e-9, "bwd weight {s:?}: max error {e}");
    }
}

#[test]
fn conv_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(13);
    for s in conv_cases() {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let r = rng.vec(s.y_len(), -1.0, 1.0);
        let mut dx = vec![f64::NAN; s.x_len()];
        let mut dw = vec![f64::NAN; s.w_len()];
        be.conv2d_bwd_data(&s, &r, &w, &mut dx).unwrap();
        be.conv2d_bwd_weight(&s, &x, &r, &mut dw).unwrap();
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; s.y_len()];
            be.conv2d_fwd(&s, &x.to_vec(), &w.to_vec(), &mut y).unwrap();
            dot(&y, &r)
        };
        check_grad(&format!("conv dx {s:?}"), &x, &dx, 1e-7, |xp| loss(xp, &w));
        check_grad(&format!("conv dw {s:?}"), &w, &dw, 1e-7, |wp| loss(&x, wp));
    }
}

#[test]
fn conv_f32_agrees_with_f64() {
    let mut rng = SplitMix64::new(14);
    let b32 = CpuBackend::<f32>::new();
    let b64 = B::new();
    for s in [
        conv(4, 8, 20, 18, 16, 3, 3, 1, 1),
        conv(2, 3, 33, 31, 8, 7, 7, 2, 3),
        conv(3, 16, 9, 9, 8, 1, 1, 1, 0),
    ] {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let dy = rng.vec(s.y_len(), -1.0, 1.0);
        let f = |v: &Vec<f64>| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let rel = |a: &[f32], b: &[f64]| {
            let d: f64 = a
                .iter()
                .zip(b)
                .map(|(p, q)| (*p as f64 - q).powi(2))
                .sum::<f64>()
                .sqrt();
            let n: f64 = b.iter().map(|q| q * q).sum::<f64>().sqrt();
            d / n
        };
        // f32 3x3 stride-1 passes run by Winograd F(4x4, 3x3) where it pays; its transforms
        // (coefficients up to 8) roughly double the rounding error of the direct product.
        let tol = if ichcam::engine::cpu::conv::use_winograd::<f32>(&s) {
            2e-6
        } else {
            1e-6
        };
        let (mut y32, mut y64) = (vec![0f32; s.y_len()], vec![0f64; s.y_len()]);
        b32.conv2d_fwd(&s, &f(&x), &f(&w), &mut y32).unwrap();
        b64.conv2d_fwd(&s, &x, &w, &mut y64).unwrap();
        assert!(rel(&y32, &y64) < tol, "fwd {s:?}: {}", rel(&y32, &y64));
        let (mut dx32, mut dx64) = (vec![0f32; s.x_len()], vec![0f64; s.x_len()]);
        b32.conv2d_bwd_data(&s, &f(&dy), &f(&w), &mut dx32).unwrap();
        b64.conv2d_bwd_data(&s, &dy, &w, &mut dx64).unwrap();
        assert!(
            rel(&dx32, &dx64) < tol,
            "bwd data {s:?}: {}",
            rel(&dx32, &dx64)
        );
        let (mut dw32, mut dw64) = (vec![0f32; s.w_len()], vec![0f64; s.w_len()]);
        b32.conv2d_bwd_weight(&s, &f(&x), &f(&dy), &mut dw32)
            .unwrap();
        b64.conv2d_bwd_weight(&s, &x, &dy, &mut dw64).unwrap();
        assert!(
            rel(&dw32, &dw64) < tol,
            "bwd weight {s:?}: {}",
            rel(&dw32, &dw64)
        );
    }
}

// ---- batch norm ----------------------------------------------------------------------------

struct BnOut {
    y: Vec<f64>,
    rm: Vec<f64>,
    rv: Vec<f64>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

fn bn_train(
    s: &BatchNorm2d,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    rm0: &[f64],
    rv0: &[f64],
    relu: bool,
) -> BnOut {
    let be = B::new();
    let mut o = BnOut {
        y: vec![f64::NAN; s.len()],
        rm: rm0.to_vec(),
        rv: rv0.to_vec(),
        mean: vec![f64::NAN; s.c],
        invstd: vec![f64::NAN; s.c],
    };
    be.batchnorm_train_fwd(
        s,
        &x.to_vec(),
        &gamma.to_vec(),
        &beta.to_vec(),
        &mut o.rm,
        &mut o.rv,
        &mut o.mean,
        &mut o.invstd,
        &mut o.y,
        relu,
    )
    .unwrap();
    o
}

#[test]
fn batchnorm_train_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(21);
    let s = BatchNorm2d {
        n: 3,
        c: 4,
        hw: 5,
        eps: 1e-5,
        momentum: 0.1,
    };
    for relu in [false, true] {
        let x = rng.vec(s.len(), -2.0, 2.0);
        let gamma = rng.vec(s.c, 0.5, 1.5);
        let beta = rng.vec(s.c, -0.5, 0.5);
        let (rm0, rv0) = (rng.vec(s.c, -1.0, 1.0), rng.vec(s.c, 0.5, 2.0));
        let r = rng.vec(s.len(), -1.0, 1.0);
        let o = bn_train(&s, &x, &gamma, &beta, &rm0, &rv0, relu);
        if relu {
            assert!(
                o.y.contains(&0.0) && o.y.iter().any(|v| *v > 0.0),
                "ReLU must clip some outputs"
            );
            // Keep every pre-activation clear of the kink so that finite differences are valid.
            let clear = o.y.iter().all(|v| *v == 0.0 || *v > 1e-3);
            assert!(clear, "a pre-activation too close to 0 for this seed");
        }
        let mut dx = vec![f64::NAN; s.len()];
        let mut dg = vec![f64::NAN; s.c];
        let mut db = vec![f64::NAN; s.c];
        be.batchnorm_bwd(
            &s, &x, &o.y, &r, &gamma, &o.mean, &o.invstd, &mut dx, &mut dg, &mut db, relu,
        )
        .unwrap();
        let loss =
            |x: &[f64], g: &[f64], b: &[f64]| dot(&bn_train(&s, x, g, b, &rm0, &rv0, relu).y, &r);
        check_grad(&format!("bn dx relu={relu}"), &x, &dx, 1e-6, |p| {
            loss(p, &gamma, &beta)
        });
        check_grad(&format!("bn dgamma relu={relu}"), &gamma, &dg, 1e-6, |p| {
            loss(&x, p, &beta)
        });
        check_grad(&format!("bn dbeta relu={relu}"), &beta, &db, 1e-6, |p| {
            loss(&x, &gamma, p)
        });
    }
}

#[test]
fn batchnorm_running_stats_and_eval_follow_pytorch() {
    let be = B::new();
    let mut rng = SplitMix64::new(22);
    let s = BatchNorm2d {
        n: 2,
        c: 3,
        hw: 7,
        eps: 1e-3,
        momentum: 0.25,
    };
    let x = rng.vec(s.len(), -3.0, 3.0);
    let gamma = rng.vec(s.c, 0.5, 1.5);
    let beta = rng.vec(s.c, -0.5, 0.5);
    let (rm0, rv0) = (rng.vec(s.c, -1.0, 1.0), rng.vec(s.c, 0.5, 2.0));
    let o = bn_train(&s, &x, &gamma, &beta, &rm0, &rv0, false);
    let m = (s.n * s.hw) as f64;
    for ch in 0..s.c {
        let vals: Vec<f64> = (0..s.n)
            .flat_map(|i| x[(i * s.c + ch) * s.hw..(i * s.c + ch + 1) * s.hw].to_vec())
            .collect();
        let mean = vals.iter().sum::<f64>() / m;
        let var_b = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m;
        let var_u = var_b * m / (m - 1.0);
        assert!((o.mean[ch] - mean).abs() < 1e-12);
        assert!((o.invstd[ch] - 1.0 / (var_b + s.eps).sqrt()).abs() < 1e-12);
        assert!((o.rm[ch] - (0.75 * rm0[ch] + 0.25 * mean)).abs() < 1e-12);
        assert!((o.rv[ch] - (0.75 * rv0[ch] + 0.25 * var_u)).abs() < 1e-12);
        for i in 0..s.n {
            for p in 0..s.hw {
                let k = (i * s.c + ch) * s.hw + p;
                let want = gamma[ch] * (x[k] - mean) / (var_b + s.eps).sqrt() + beta[ch];
                assert!((o.y[k] - want).abs() < 1e-12);
            }
        }
    }
    for relu in [false, true] {
        let mut y = vec![f64::NAN; s.len()];
        be.batchnorm_eval_fwd(&s, &x, &gamma, &beta, &rm0, &rv0, &mut y, relu)
            .unwrap();
        for k in 0..s.len() {
            let ch = (k / s.hw) % s.c;
            let mut want = gamma[ch] * (x[k] - rm0[ch]) / (rv0[ch] + s.eps).sqrt() + beta[ch];
            if relu {
                want = want.max(0.0);
            }
            assert!((y[k] - want).abs() < 1e-12);
        }
    }
}

// ---- elementwise, pooling ------------------------------------------------------------------

#[test]
fn relu_and_add_relu_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(31);
    let n = 50;
    let x = rng.vec_off_zero(n, 1e-3);
    let r = rng.vec(n, -1.0, 1.0);
    let mut y = vec![f64::NAN; n];
    be.relu_fwd(&x, &mut y).unwrap();
    let mut dx = vec![f64::NAN; n];
    be.relu_bwd(&y, &r, &mut dx).unwrap();
    check_grad("relu", &x, &dx, 1e-8, |p| {
        let mut y = vec![0.0; n];
        be.relu_fwd(&p.to_vec(), &mut y).unwrap();
        dot(&y, &r)
    });
    // add_relu's backward is relu_bwd on its output, for both inputs.
    let a = rng.vec(n, -1.0, 1.0);
    let b: Vec<f64> = x.iter().zip(&a).map(|(s, a)| s - a).collect();
    be.add_relu_fwd(&a, &b, &mut y).unwrap();
    be.relu_bwd(&y, &r, &mut dx).unwrap();
    let loss = |a: &[f64], b: &[f64]| {
        let mut y = vec![0.0; n];
        be.add_relu_fwd(&a.to_vec(), &b.to_vec(), &mut y).unwrap();
        dot(&y, &r)
    };
    check_grad("add_relu a", &a, &dx, 1e-8, |p| loss(p, &b));
    check_grad("add_relu b", &b, &dx, 1e-8, |p| loss(&a, p));
}

#[test]
fn elementwise_helpers_do_what_they_say() {
    let be = B::new();
    let mut rng = SplitMix64::new(32);
    // Larger than one parallel chunk, so the chunked path is exercised.
    let n = 100_003;
    let x = rng.vec(n, -1.0, 1.0);
    let mut y = rng.vec(n, -1.0, 1.0);
    let y0 = y.clone();
    be.add_assign(&mut y, &x).unwrap();
    assert!(y.iter().zip(&y0).zip(&x).all(|((a, b), c)| *a == b + c));
    be.scale_assign(&mut y, -0.5).unwrap();
    assert!(y
        .iter()
        .zip(&y0)
        .zip(&x)
        .all(|((a, b), c)| *a == (b + c) * -0.5));
    let mut z = vec![0.0; n];
    be.add_relu_fwd(&x, &y0, &mut z).unwrap();
    assert!(z
        .iter()
        .zip(&y0)
        .zip(&x)
        .all(|((a, b), c)| *a == (b + c).max(0.0)));
    be.fill(&mut z, 2.5).unwrap();
    assert!(z.iter().all(|v| *v == 2.5));
    be.copy(&x, &mut z).unwrap();
    assert_eq!(z, x);
}

#[test]
fn maxpool_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(41);
    for s in [
        Pool2d {
            n: 2,
            c: 3,
            h: 9,
            w: 8,
            k: 3,
            stride: 2,
            pad: 1,
        },
        Pool2d {
            n: 1,
            c: 2,
            h: 6,
            w: 6,
            k: 2,
            stride: 2,
            pad: 0,
        },
        Pool2d {
            n: 2,
            c: 1,
            h: 7,
            w: 5,
            k: 3,
            stride: 1,
            pad: 1,
        },
    ] {
        // Random values: ties (and near ties) have probability ~0.
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let r = rng.vec(s.y_len(), -1.0, 1.0);
        let mut y = vec![f64::NAN; s.y_len()];
        be.maxpool2d_fwd(&s, &x, &mut y).unwrap();
        let mut dx = vec![f64::NAN; s.x_len()];
        be.maxpool2d_bwd(&s, &x, &y, &r, &mut dx).unwrap();
        check_grad(&format!("maxpool {s:?}"), &x, &dx, 1e-8, |p| {
            let mut y = vec![0.0; s.y_len()];
            be.maxpool2d_fwd(&s, &p.to_vec(), &mut y).unwrap();
            dot(&y, &r)
        });
    }
}

#[test]
fn maxpool_routes_ties_to_the_first_maximum() {
    let be = B::new();
    let s = Pool2d {
        n: 1,
        c: 1,
        h: 2,
        w: 2,
        k: 2,
        stride: 2,
        pad: 0,
    };
    let x = vec![1.0, 3.0, 3.0, 3.0];
    let mut y = vec![0.0; 1];
    be.maxpool2d_fwd(&s, &x, &mut y).unwrap();
    assert_eq!(y, vec![3.0]);
    let mut dx = vec![f64::NAN; 4];
    be.maxpool2d_bwd(&s, &x, &y, &vec![2.0], &mut dx).unwrap();
    assert_eq!(dx, vec![0.0, 2.0, 0.0, 0.0]);
    // A `y` that matches nothing in its window still routes to the first maximum.
    let mut dx2 = vec![f64::NAN; 4];
    be.maxpool2d_bwd(&s, &x, &vec![-7.0], &vec![2.0], &mut dx2)
        .unwrap();
    assert_eq!(dx2, dx);
    // A NaN in the window propagates, and takes the gradient, as in PyTorch.
    let xn = vec![1.0, 5.0, f64::NAN, 3.0];
    be.maxpool2d_fwd(&s, &xn, &mut y).unwrap();
    assert!(y[0].is_nan());
    be.maxpool2d_bwd(&s, &xn, &y, &vec![2.0], &mut dx).unwrap();
    assert_eq!(dx, vec![0.0, 0.0, 2.0, 0.0]);
}

#[test]
fn maxpool_forward_matches_naive_window_max() {
    let be = B::new();
    let mut rng = SplitMix64::new(43);
    for s in [
        Pool2d {
            n: 2,
            c: 3,
            h: 11,
            w: 9,
            k: 3,
            stride: 2,
            pad: 1,
        },
        Pool2d {
            n: 1,
            c: 2,
            h: 8,
            w: 10,
            k: 4,
            stride: 3,
            pad: 2,
        },
        Pool2d {
            n: 1,
            c: 1,
            h: 5,
            w: 5,
            k: 5,
            stride: 1,
            pad: 0,
        },
    ] {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let mut y = vec![f64::NAN; s.y_len()];
        be.maxpool2d_fwd(&s, &x, &mut y).unwrap();
        let (oh, ow) = (s.out_h(), s.out_w());
        for p in 0..s.n * s.c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f64::NEG_INFINITY;
                    for ky in 0..s.k {
                        for kx in 0..s.k {
                            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                            let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                            if iy >= 0 && ix >= 0 && iy < s.h as isize && ix < s.w as isize {
                                m = m.max(x[p * s.h * s.w + iy as usize * s.w + ix as usize]);
                            }
                        }
                    }
                    assert_eq!(y[(p * oh + oy) * ow + ox], m, "{s:?}");
                }
            }
        }
    }
}

#[test]
fn global_avg_pool_gradient_matches_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(42);
    let (rows, hw) = (6, 7);
    let x = rng.vec(rows * hw, -1.0, 1.0);
    let r = rng.vec(rows, -1.0, 1.0);
    let mut y = vec![f64::NAN; rows];
    be.global_avg_pool_fwd(rows, hw, &x, &mut y).unwrap();
    for i in 0..rows {
        assert!((y[i] - x[i * hw..(i + 1) * hw].iter().sum::<f64>() / hw as f64).abs() < 1e-14);
    }
    let mut dx = vec![f64::NAN; rows * hw];
    be.global_avg_pool_bwd(rows, hw, &r, &mut dx).unwrap();
    check_grad("gap", &x, &dx, 1e-8, |p| {
        let mut y = vec![0.0; rows];
        be.global_avg_pool_fwd(rows, hw, &p.to_vec(), &mut y)
            .unwrap();
        dot(&y, &r)
    });
}

// ---- dense, LSTM, loss ---------------------------------------------------------------------

#[test]
fn linear_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(51);
    let (m, k, n) = (3, 5, 4);
    let x = rng.vec(m * k, -1.0, 1.0);
    let w = rng.vec(n * k, -1.0, 1.0);
    let b = rng.vec(n, -1.0, 1.0);
    let r = rng.vec(m * n, -1.0, 1.0);
    let mut y = vec![f64::NAN; m * n];
    be.linear_fwd(m, k, n, &x, &w, Some(&b), &mut y).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f64 = b[j] + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>();
            assert!((y[i * n + j] - want).abs() < 1e-13);
        }
    }
    let (mut dx, mut dw, mut db) = (
        vec![f64::NAN; m * k],
        vec![f64::NAN; n * k],
        vec![f64::NAN; n],
    );
    be.linear_bwd(m, k, n, &x, &w, &r, Some(&mut dx), &mut dw, Some(&mut db))
        .unwrap();
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut y = vec![0.0; m * n];
        be.linear_fwd(m, k, n, &x.to_vec(), &w.to_vec(), Some(&b.to_vec()), &mut y)
            .unwrap();
        dot(&y, &r)
    };
    check_grad("linear dx", &x, &dx, 1e-8, |p| loss(p, &w, &b));
    check_grad("linear dw", &w, &dw, 1e-8, |p| loss(&x, p, &b));
    check_grad("linear db", &b, &db, 1e-8, |p| loss(&x, &w, p));
    // Without bias and without dx: dw alone, unchanged.
    let mut dw2 = vec![f64::NAN; n * k];
    be.linear_bwd(m, k, n, &x, &w, &r, None, &mut dw2, None)
        .unwrap();
    assert_eq!(dw, dw2);
    be.linear_fwd(m, k, n, &x, &w, None, &mut y).unwrap();
    assert!((y[0] - (0..k).map(|p| x[p] * w[p]).sum::<f64>()).abs() < 1e-13);
}

struct LstmParams {
    w_ih: Vec<f64>,
    w_hh: Vec<f64>,
    b_ih: Vec<f64>,
    b_hh: Vec<f64>,
}

fn lstm_h(s: &Lstm, x: &[f64], p: &LstmParams) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let be = B::new();
    let mut h = vec![f64::NAN; s.h_len()];
    let mut c = vec![f64::NAN; s.h_len()];
    let mut g = vec![f64::NAN; s.gates_len()];
    be.lstm_fwd(
        s,
        &x.to_vec(),
        &p.w_ih,
        &p.w_hh,
        &p.b_ih,
        &p.b_hh,
        &mut h,
        &mut c,
        &mut g,
    )
    .unwrap();
    (h, c, g)
}

#[test]
fn lstm_forward_matches_the_cell_equations() {
    let mut rng = SplitMix64::new(60);
    let s = Lstm {
        batch: 2,
        seq: 3,
        input: 3,
        hidden: 2,
    };
    let hd = s.hidden;
    let p = LstmParams {
        w_ih: rng.vec(4 * hd * s.input, -1.0, 1.0),
        w_hh: rng.vec(4 * hd * hd, -1.0, 1.0),
        b_ih: rng.vec(4 * hd, -1.0, 1.0),
        b_hh: rng.vec(4 * hd, -1.0, 1.0),
    };
    let x = rng.vec(s.x_len(), -1.0, 1.0);
    let (h, c, _) = lstm_h(&s, &x, &p);
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    for b in 0..s.batch {
        let (mut hp, mut cp) = (vec![0.0; hd], vec![0.0; hd]);
        for t in 0..s.seq {
            let xt = &x[(b * s.seq + t) * s.input..][..s.input];
            let pre = |row: usize| {
                p.b_ih[row]
                    + p.b_hh[row]
                    + (0..s.input)
                        .map(|q| p.w_ih[row * s.input + q] * xt[q])
                        .sum::<f64>()
                    + (0..hd).map(|q| p.w_hh[row * hd + q] * hp[q]).sum::<f64>()
            };
            let (mut hn, mut cn) = (vec![0.0; hd], vec![0.0; hd]);
            for j in 0..hd {
                let (i, f, g, o) = (
                    sig(pre(j)),
                    sig(pre(hd + j)),
                    pre(2 * hd + j).tanh(),
                    sig(pre(3 * hd + j)),
                );
                cn[j] = f * cp[j] + i * g;
                hn[j] = o * cn[j].tanh();
            }
            for j in 0..hd {
                let k = (b * s.seq + t) * hd + j;
                assert!((h[k] - hn[j]).abs() < 1e-13 && (c[k] - cn[j]).abs() < 1e-13);
            }
            (hp, cp) = (hn, cn);
        }
    }
}

#[test]
fn lstm_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::new(61);
    let s = Lstm {
        batch: 2,
        seq: 4,
        input: 3,
        hidden: 5,
    };
    let hd = s.hidden;
    let p = LstmParams {
        w_ih: rng.vec(4 * hd * s.input, -0.8, 0.8),
        w_hh: rng.vec(4 * hd * hd, -0.8, 0.8),
        b_ih: rng.vec(4 * hd, -0.5, 0.5),
        b_hh: rng.vec(4 * hd, -0.5, 0.5),
    };
    let x = rng.vec(s.x_len(), -1.0, 1.0);
    let r = rng.vec(s.h_len(), -1.0, 1.0);
    let (h, c, g) = lstm_h(&s, &x, &p);
    let mut dx = vec![f64::NAN; s.x_len()];
    let mut dw_ih = vec![f64::NAN; p.w_ih.len()];
    let mut dw_hh = vec![f64::NAN; p.w_hh.len()];
    let mut db = vec![f64::NAN; 4 * hd];
    be.lstm_bwd(
        &s, &x, &p.w_ih, &p.w_hh, &h, &c, &g, &r, &mut dx, &mut dw_ih, &mut dw_hh, &mut db,
    )
    .unwrap();
    let loss = |x: &[f64], p: &LstmParams| dot(&lstm_h(&s, x, p).0, &r);
    let with = |f: &dyn Fn(&mut LstmParams)| {
        let mut q = LstmParams {
            w_ih: p.w_ih.clone(),
            w_hh: p.w_hh.clone(),
            b_ih: p.b_ih.clone(),
            b_hh: p.b_hh.clone(),
        };
        f(&mut q);
        q
    };
    check_grad("lstm dx", &x, &dx, 1e-6, |xp| loss(xp, &p));
    check_grad("lstm dw_ih", &p.w_ih, &dw_ih, 1e-6, |v| {
        loss(&x, &with(&|q| q.w_ih = v.to_vec()))
    });
    check_grad("lstm dw_hh", &p.w_hh, &dw_hh, 1e-6, |v| {
        loss(&x, &with(&|q| q.w_hh = v.to_vec()))
    });
    check_grad("lstm db_ih", &p.b_ih, &db, 1e-6, |v| {
        loss(&x, &with(&|q| q.b_ih = v.to_vec()))
    });
    check_grad("lstm db_hh", &p.b_hh, &db, 1e-6, |v| {
        loss(&x, &with(&|q| q.b_hh = v.to_vec()))
    });
}

#[test]
fn bce_with_logits_matches_pytorch_formula_and_gradient() {
    let be = B::new();
    let mut rng = SplitMix64::new(71);
    let n = 17;
    let x = rng.vec(n, -4.0, 4.0);
    let y: Vec<f64> = (0..n).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
    for pw in [1.0, 3.7] {
        let mut d = vec![f64::NAN; n];
        let l = be.bce_with_logits(&x, &y, pw, &mut d).unwrap();
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let want = x
            .iter()
            .zip(&y)
            .map(|(x, y)| -(pw * y * sig(*x).ln() + (1.0 - y) * (1.0 - sig(*x)).ln()))
            .sum::<f64>()
            / n as f64;
        assert!((l - want).abs() < 1e-12, "pw {pw}: {l} vs {want}");
        check_grad(&format!("bce pw={pw}"), &x, &d, 1e-7, |p| {
            let mut d = vec![0.0; n];
            be.bce_with_logits(&p.to_vec(), &y, pw, &mut d).unwrap()
        });
    }
    // Soft targets too (the formula is linear in y).
    let ys = rng.vec(n, 0.0, 1.0);
    let mut d = vec![f64::NAN; n];
    be.bce_with_logits(&x, &ys, 2.0, &mut d).unwrap();
    check_grad("bce soft", &x, &d, 1e-7, |p| {
        let mut d = vec![0.0; n];
        be.bce_with_logits(&p.to_vec(), &ys, 2.0, &mut d).unwrap()
    });
    // Stable at extreme logits: finite loss equal to the asymptote.
    let big = vec![1000.0, -1000.0];
    let mut d = vec![0.0; 2];
    let l = be
        .bce_with_logits(&big, &vec![0.0, 1.0], 2.0, &mut d)
        .unwrap();
    assert!((l - (1000.0 + 2.0 * 1000.0) / 2.0).abs() < 1e-9, "{l}");
    assert!(d.iter().all(|v| v.is_finite()));
}

// ---- optimizers ----------------------------------------------------------------------------

#[test]
fn sgd_matches_pytorch_formula_over_two_steps() {
    let be = B::new();
    let mut rng = SplitMix64::new(81);
    let n = 9;
    let p0 = rng.vec(n, -1.0, 1.0);
    let (g1, g2) = (rng.vec(n, -1.0, 1.0), rng.vec(n, -1.0, 1.0));
    let (lr, mom, wd) = (0.1, 0.9, 0.01);
    let mut p = p0.clone();
    let mut m = vec![f64::NAN; n]; // the first step must not read the buffer
    be.sgd_step(&mut p, &g1, &mut m, lr, mom, wd, true).unwrap();
    be.sgd_step(&mut p, &g2, &mut m, lr, mom, wd, false)
        .unwrap();
    for i in 0..n {
        let d1 = g1[i] + wd * p0[i];
        let p1 = p0[i] - lr * d1;
        let m2 = mom * d1 + (g2[i] + wd * p1);
        let p2 = p1 - lr * m2;
        assert!((p[i] - p2).abs() < 1e-14 && (m[i] - m2).abs() < 1e-14);
    }
}

#[test]
fn adam_matches_pytorch_formula_over_two_steps() {
    let be = B::new();
    let mut rng = SplitMix64::new(82);
    let n = 9;
    let p0 = rng.vec(n, -1.0, 1.0);
    let (g1, g2) = (rng.vec(n, -1.0, 1.0), rng.vec(n, -1.0, 1.0));
    let (lr, b1, b2, eps, wd) = (1e-3, 0.9, 0.999, 1e-8, 0.05);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    be.adam_step(&mut p, &g1, &mut m, &mut v, 1, lr, b1, b2, eps, wd)
        .unwrap();
    be.adam_step(&mut p, &g2, &mut m, &mut v, 2, lr, b1, b2, eps, wd)
        .unwrap();
    for i in 0..n {
        let (mut pp, mut mm, mut vv) = (p0[i], 0.0, 0.0);
        for (t, g) in [(1, g1[i]), (2, g2[i])] {
            let g = g + wd * pp;
            mm = b1 * mm + (1.0 - b1) * g;
            vv = b2 * vv + (1.0 - b2) * g * g;
            let mhat = mm / (1.0 - f64::powi(b1, t));
            let vhat = vv / (1.0 - f64::powi(b2, t));
            // PyTorch adds eps to sqrt(v)/sqrt(bias_correction2), i.e. to sqrt(vhat).
            pp -= lr * mhat / (vhat.sqrt() + eps);
        }
        assert!((p[i] - pp).abs() < 1e-14, "{} vs {pp}", p[i]);
        assert!((m[i] - mm).abs() < 1e-15 && (v[i] - vv).abs() < 1e-15);
    }
    assert!(be
        .adam_step(&mut p, &g1, &mut m, &mut v, 0, lr, b1, b2, eps, wd)
        .is_err());
}

// ---- CAM -----------------------------------------------------------------------------------

#[test]
fn upsample_matches_pytorch_values() {
    let be = B::new();
    // F.interpolate([[1, 2], [3, 4]], size=(4, 4), mode="bilinear", align_corners=False).
    let x = vec![1.0, 2.0, 3.0, 4.0];
    let mut y = vec![f64::NAN; 16];
    be.upsample_bilinear(1, 2, 2, 4, 4, &x, &mut y).unwrap();
    #[rustfmt::skip]
    let want = [
        1.0, 1.25, 1.75, 2.0,
        1.5, 1.75, 2.25, 2.5,
        2.5, 2.75, 3.25, 3.5,
        3.0, 3.25, 3.75, 4.0,
    ];
    assert_eq!(y, want);
    // Downsampling 1x4 -> 1x2: sources at 0.5 and 2.5.
    let mut y = vec![f64::NAN; 2];
    be.upsample_bilinear(1, 1, 4, 1, 2, &vec![1.0, 3.0, 7.0, 9.0], &mut y)
        .unwrap();
    assert_eq!(y, vec![2.0, 8.0]);
    // 1x3 -> 1x5 (scale 0.6): sources -0.2 (clamped to 0), 0.4, 1.0, 1.6, 2.2 (border).
    let mut y = vec![f64::NAN; 5];
    be.upsample_bilinear(1, 1, 3, 1, 5, &vec![0.0, 10.0, 30.0], &mut y)
        .unwrap();
    let want = [0.0, 4.0, 10.0, 22.0, 30.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{y:?}");
    }
}

#[test]
fn cam_ops_match_naive_loops() {
    let be = B::new();
    let mut rng = SplitMix64::new(91);
    let (n, c, hw) = (2, 5, 6);
    let f = rng.vec(n * c * hw, -1.0, 1.0);
    let w = rng.vec(c, -1.0, 1.0);
    let g = rng.vec(n * c * hw, -1.0, 1.0);
    let mut cam = vec![f64::NAN; n * hw];
    be.cam_weight(n, c, hw, &f, &w, &mut cam).unwrap();
    let mut gc = vec![f64::NAN; n * hw];
    be.gradcam(n, c, hw, &f, &g, &mut gc).unwrap();
    for i in 0..n {
        for p in 0..hw {
            let want: f64 = (0..c).map(|ch| w[ch] * f[(i * c + ch) * hw + p]).sum();
            assert!((cam[i * hw + p] - want).abs() < 1e-13);
            let want_g: f64 = (0..c)
                .map(|ch| {
                    let alpha = g[(i * c + ch) * hw..(i * c + ch + 1) * hw]
                        .iter()
                        .sum::<f64>()
                        / hw as f64;
                    alpha * f[(i * c + ch) * hw + p]
                })
                .sum();
            assert!((gc[i * hw + p] - want_g.max(0.0)).abs() < 1e-13);
        }
    }
    // Both sides of the ReLU occur, so the clipping was exercised.
    assert!(gc.contains(&0.0) && gc.iter().any(|v| *v > 0.0), "{gc:?}");
}

#[test]
fn minmax_normalize_maps_rows_to_unit_range() {
    let be = B::new();
    let mut rng = SplitMix64::new(92);
    let len = 11;
    let mut x = rng.vec(3 * len, -5.0, 5.0);
    x[2 * len..].fill(1.5); // a constant row
    let mut y = vec![f64::NAN; 3 * len];
    be.minmax_normalize(3, len, &x, &mut y).unwrap();
    for r in 0..2 {
        let row = &x[r * len..(r + 1) * len];
        let lo = row.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        for p in 0..len {
            assert!((y[r * len + p] - (row[p] - lo) / (hi - lo)).abs() < 1e-14);
        }
        assert!(
            y[r * len..(r + 1) * len].contains(&0.0) && y[r * len..(r + 1) * len].contains(&1.0)
        );
    }
    assert!(y[2 * len..].iter().all(|v| *v == 0.0));
}

// ---- bad input -----------------------------------------------------------------------------

#[test]
fn wrong_lengths_and_shapes_are_errors_not_panics() {
    let be = B::new();
    let s = conv(1, 2, 5, 5, 3, 3, 3, 1, 1);
    let (x, w, y) = (
        vec![0.0; s.x_len()],
        vec![0.0; s.w_len()],
        vec![0.0; s.y_len()],
    );
    assert!(be
        .conv2d_fwd(&s, &vec![0.0; s.x_len() - 1], &w, &mut y.clone())
        .is_err());
    assert!(be
        .conv2d_fwd(&s, &x, &vec![0.0; s.w_len() + 1], &mut y.clone())
        .is_err());
    assert!(be
        .conv2d_fwd(&s, &x, &w, &mut vec![0.0; s.y_len() + 3])
        .is_err());
    assert!(be.conv2d_bwd_data(&s, &y, &w, &mut vec![0.0; 1]).is_err());
    assert!(be.conv2d_bwd_weight(&s, &x, &y, &mut vec![0.0; 1]).is_err());
    // A kernel larger than the padded input and a zero stride would underflow the output size.
    let big = conv(1, 1, 2, 2, 1, 5, 5, 1, 0);
    assert!(be
        .conv2d_fwd(&big, &vec![0.0; 4], &vec![0.0; 25], &mut vec![0.0; 1])
        .is_err());
    let s0 = conv(1, 1, 4, 4, 1, 3, 3, 0, 1);
    assert!(be
        .conv2d_fwd(&s0, &vec![0.0; 16], &vec![0.0; 9], &mut vec![0.0; 16])
        .is_err());

    let bn = BatchNorm2d {
        n: 2,
        c: 3,
        hw: 4,
        eps: 1e-5,
        momentum: 0.1,
    };
    let c3 = vec![1.0; 3];
    let mut c = vec![0.0; 3];
    let r = be.batchnorm_train_fwd(
        &bn,
        &vec![0.0; 23],
        &c3,
        &c3,
        &mut c.clone(),
        &mut c.clone(),
        &mut c.clone(),
        &mut c.clone(),
        &mut vec![0.0; 24],
        false,
    );
    assert!(r.is_err());
    let r = be.batchnorm_eval_fwd(
        &bn,
        &vec![0.0; 24],
        &vec![1.0; 2],
        &c3,
        &c3,
        &c3,
        &mut vec![0.0; 24],
        true,
    );
    assert!(r.is_err());
    let one = BatchNorm2d {
        n: 1,
        c: 1,
        hw: 1,
        eps: 1e-5,
        momentum: 0.1,
    };
    let v1 = vec![1.0];
    let r = be.batchnorm_train_fwd(
        &one,
        &v1,
        &v1,
        &v1,
        &mut c[..1].to_vec(),
        &mut c[..1].to_vec(),
        &mut c[..1].to_vec(),
        &mut c[..1].to_vec(),
        &mut v1.clone(),
        false,
    );
    assert!(r.is_err(), "a single value per channel has no variance");
    c.fill(0.0);

    let p = Pool2d {
        n: 1,
        c: 1,
        h: 4,
        w: 4,
        k: 3,
        stride: 2,
        pad: 1,
    };
    assert!(be
        .maxpool2d_fwd(&p, &vec![0.0; 15], &mut vec![0.0; 4])
        .is_err());
    let p_bad = Pool2d { pad: 2, ..p };
    assert!(be
        .maxpool2d_fwd(&p_bad, &vec![0.0; 16], &mut vec![0.0; p_bad.y_len()])
        .is_err());
    assert!(be
        .global_avg_pool_fwd(2, 3, &vec![0.0; 5], &mut vec![0.0; 2])
        .is_err());
    assert!(be
        .linear_fwd(
            2,
            3,
            4,
            &vec![0.0; 6],
            &vec![0.0; 12],
            Some(&vec![0.0; 3]),
            &mut vec![0.0; 8]
        )
        .is_err());
    assert!(be
        .linear_bwd(
            2,
            3,
            4,
            &vec![0.0; 6],
            &vec![0.0; 12],
            &vec![0.0; 8],
            Some(&mut vec![0.0; 5]),
            &mut vec![0.0; 12],
            None
        )
        .is_err());

    let ls = Lstm {
        batch: 1,
        seq: 2,
        input: 3,
        hidden: 2,
    };
    let r = be.lstm_fwd(
        &ls,
        &vec![0.0; ls.x_len()],
        &vec![0.0; 24],
        &vec![0.0; 15],
        &vec![0.0; 8],
        &vec![0.0; 8],
        &mut vec![0.0; ls.h_len()],
        &mut vec![0.0; ls.h_len()],
        &mut vec![0.0; ls.gates_len()],
    );
    assert!(r.is_err());
    assert!(be
        .bce_with_logits(&vec![0.0; 3], &vec![0.0; 2], 1.0, &mut vec![0.0; 3])
        .is_err());
    assert!(be
        .bce_with_logits(&vec![], &vec![], 1.0, &mut vec![])
        .is_err());
    assert!(be
        .sgd_step(
            &mut vec![0.0; 3],
            &vec![0.0; 3],
            &mut vec![0.0; 2],
            0.1,
            0.9,
            0.0,
            true
        )
        .is_err());
    assert!(be
        .upsample_bilinear(1, 2, 2, 4, 4, &vec![0.0; 4], &mut vec![0.0; 15])
        .is_err());
    assert!(be
        .minmax_normalize(2, 3, &vec![0.0; 6], &mut vec![0.0; 5])
        .is_err());
    assert!(be
        .cam_weight(1, 2, 3, &vec![0.0; 6], &vec![0.0; 3], &mut vec![0.0; 3])
        .is_err());
    assert!(be.copy(&vec![0.0; 3], &mut vec![0.0; 4]).is_err());
    assert!(be.add_assign(&mut vec![0.0; 3], &vec![0.0; 4]).is_err());

    // The GEMM wrapper rejects views that do not fit their slices.
    let a = vec![0.0f64; 6];
    let mut d = vec![0.0f64; 4];
    assert!(matmul(
        MatMut::new(&mut d, 2, 2),
        Mat::new(&a, 2, 4),
        Mat::new(&a, 4, 2),
        false,
        Par::Seq
    )
    .is_err());
}
