//! The CPU engine's fast paths checked against first principles: Winograd F(4x4, 3x3)
//! (forward, data and weight gradients, the fused epilogue) in f64 against naive loops and
//! in f32 against f64; the fused ops of the `Backend` trait (CPU overrides) against their
//! default compositions, with f64 finite differences for the ones with a backward.

mod common;
use common::rng::SplitMix64;

use ichcam::engine::cpu::winograd::{self, Epilogue};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, Conv2d};

fn conv3(n: usize, c_in: usize, h: usize, w: usize, c_out: usize) -> Conv2d {
    Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    }
}

/// y, dx and dw of a convolution by the seven loops of the definition.
fn naive(s: &Conv2d, x: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow) = (s.out_h(), s.out_w());
    let mut y = vec![0.0; s.y_len()];
    let mut dx = vec![0.0; s.x_len()];
    let mut dw = vec![0.0; s.w_len()];
    for n in 0..s.n {
        for co in 0..s.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * s.c_out + co) * oh + oy) * ow + ox;
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
                                y[yi] += x[xi] * w[wi];
                                dx[xi] += dy[yi] * w[wi];
                                dw[wi] += dy[yi] * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
        / scale
}

fn l2_rel32(a: &[f32], b: &[f64]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(p, q)| (*p as f64 - q).powi(2))
        .sum::<f64>()
        .sqrt();
    d / b.iter().map(|q| q * q).sum::<f64>().sqrt()
}

fn f32v(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

/// Shapes: partial tiles at the right and bottom, images smaller than a tile, several
/// blocks of tiles, more output than input channels and the reverse.
fn shapes() -> Vec<Conv2d> {
    vec![
        conv3(2, 3, 6, 5, 4),
        conv3(1, 2, 1, 1, 3),
        conv3(3, 5, 3, 7, 2),
        conv3(2, 4, 17, 13, 6),
        conv3(5, 8, 16, 16, 8),
        conv3(1, 16, 9, 30, 4),
    ]
}

#[test]
fn winograd_matches_naive_loops_in_f64() {
    let mut rng = SplitMix64(21);
    for s in shapes() {
        assert!(winograd::applies(&s));
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let dy = rng.vec(s.y_len(), -1.0, 1.0);
        let (want_y, want_dx, want_dw) = naive(&s, &x, &w, &dy);
        let mut y = vec![f64::NAN; s.y_len()];
        winograd::conv3x3_fwd(&s, &x, &w, &mut y, Epilogue::none());
        let mut dx = vec![f64::NAN; s.x_len()];
        winograd::conv3x3_bwd_data(&s, &dy, &w, &mut dx);
        let mut dw = vec![f64::NAN; s.w_len()];
        winograd::conv3x3_bwd_weight(&s, &x, &dy, &mut dw);
        let (ey, edx, edw) = (
            max_rel(&y, &want_y),
            max_rel(&dx, &want_dx),
            max_rel(&dw, &want_dw),
        );
        assert!(ey < 1e-12, "fwd {s:?}: {ey}");
        assert!(edx < 1e-12, "bwd data {s:?}: {edx}");
        assert!(edw < 1e-12, "bwd weight {s:?}: {edw}");
    }
}

#[test]
fn winograd_epilogue_is_affine_residual_relu() {
    let mut rng = SplitMix64(22);
    let s = conv3(3, 4, 11, 9, 5);
    let x = rng.vec(s.x_len(), -1.0, 1.0);
    let w = rng.vec(s.w_len(), -1.0, 1.0);
    let r = rng.vec(s.y_len(), -1.0, 1.0);
    let scale = rng.vec(s.c_out, 0.5, 2.0);
    let shift = rng.vec(s.c_out, -0.5, 0.5);
    let (plain, _, _) = naive(&s, &x, &w, &vec![0.0; s.y_len()]);
    let hw = s.h * s.w;
    let want: Vec<f64> = plain
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = (i / hw) % s.c_out;
            (v * scale[c] + shift[c] + r[i]).max(0.0)
        })
        .collect();
    let mut y = vec![f64::NAN; s.y_len()];
    let ep = Epilogue {
        affine: Some((&scale, &shift)),
        residual: Some(&r),
        relu: true,
    };
    winograd::conv3x3_fwd(&s, &x, &w, &mut y, ep);
    assert!(max_rel(&y, &want) < 1e-12);
    assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0));
}

#[test]
fn winograd_f32_is_close_to_f64_at_resnet_scale() {
    // ResNet-like magnitudes (Kaiming-scaled weights, post-ReLU inputs), channels as in
    // the first stage: the f32 error of the transforms stays at the 1e-6 level.
    let mut rng = SplitMix64(23);
    let b32 = CpuBackend::<f32>::new();
    let b64 = CpuBackend::<f64>::new();
    for s in [conv3(4, 64, 16, 16, 64), conv3(3, 64, 23, 19, 96)] {
        assert!(ichcam::engine::cpu::conv::use_winograd::<f32>(&s));
        assert!(!ichcam::engine::cpu::conv::use_winograd::<f64>(&s));
        let std = (2.0 / (9.0 * s.c_out as f64)).sqrt() * 3f64.sqrt();
        let x = rng.vec(s.x_len(), 0.0, 1.0);
        let w = rng.vec(s.w_len(), -std, std);
        let dy = rng.vec(s.y_len(), -1.0, 1.0);
        let (mut y32, mut y64) = (vec![0f32; s.y_len()], vec![0f64; s.y_len()]);
        b32.conv2d_fwd(&s, &f32v(&x), &f32v(&w), &mut y32).unwrap();
        b64.conv2d_fwd(&s, &x, &w, &mut y64).unwrap();
        let (mut dx32, mut dx64) = (vec![0f32; s.x_len()], vec![0f64; s.x_len()]);
        b32.conv2d_bwd_data(&s, &f32v(&dy), &f32v(&w), &mut dx32)
            .unwrap();
        b64.conv2d_bwd_data(&s, &dy, &w, &mut dx64).unwrap();
        let (mut dw32, mut dw64) = (vec![0f32; s.w_len()], vec![0f64; s.w_len()]);
        b32.conv2d_bwd_weight(&s, &f32v(&x), &f32v(&dy), &mut dw32)
            .unwrap();
        b64.conv2d_bwd_weight(&s, &x, &dy, &mut dw64).unwrap();
        for (what, e) in [
            ("fwd", l2_rel32(&y32, &y64)),
            ("bwd data", l2_rel32(&dx32, &dx64)),
            ("bwd weight", l2_rel32(&dw32, &dw64)),
        ] {
            assert!(e < 2e-6, "{what} {s:?}: relative L2 error {e}");
        }
    }
}

/// The fused inference unit against the ops it replaces (what the trait's default runs):
/// conv, eval-mode batch norm, then add + ReLU or ReLU, for Winograd and direct shapes,
/// with and without residual and ReLU, in f64 and f32.
fn fused_eval_case<T: ichcam::engine::Real>(be: &CpuBackend<T>, s: Conv2d, seed: u64, tol: f64) {
    use ichcam::engine::BatchNorm2d;
    let mut rng = SplitMix64(seed);
    let c = |v: Vec<f64>| v.into_iter().map(T::from_f64_lossy).collect::<Vec<T>>();
    let x = c(rng.vec(s.x_len(), -1.0, 1.0));
    let w = c(rng.vec(s.w_len(), -0.3, 0.3));
    let gamma = c(rng.vec(s.c_out, 0.5, 1.5));
    let beta = c(rng.vec(s.c_out, -0.5, 0.5));
    let rm = c(rng.vec(s.c_out, -0.2, 0.2));
    let rv = c(rng.vec(s.c_out, 0.5, 2.0));
    let res = c(rng.vec(s.y_len(), -1.0, 1.0));
    let bn = BatchNorm2d {
        n: s.n,
        c: s.c_out,
        hw: s.out_h() * s.out_w(),
        eps: 1e-5,
        momentum: 0.1,
    };
    for (residual, relu) in [(false, false), (false, true), (true, false), (true, true)] {
        let mut z = vec![T::zero(); s.y_len()];
        be.conv2d_fwd(&s, &x, &w, &mut z).unwrap();
        let mut want = vec![T::zero(); s.y_len()];
        if residual {
            let mut t = vec![T::zero(); s.y_len()];
            be.batchnorm_eval_fwd(&bn, &z, &gamma, &beta, &rm, &rv, &mut t, false)
                .unwrap();
            if relu {
                be.add_relu_fwd(&t, &res, &mut want).unwrap();
            } else {
                for i in 0..t.len() {
                    want[i] = t[i] + res[i];
                }
            }
        } else {
            be.batchnorm_eval_fwd(&bn, &z, &gamma, &beta, &rm, &rv, &mut want, relu)
                .unwrap();
        }
        let mut got = vec![T::nan(); s.y_len()];
        be.conv2d_bn_eval_fwd(
            &s,
            &bn,
            &x,
            &w,
            &gamma,
            &beta,
            &rm,
            &rv,
            residual.then_some(&res),
            relu,
            &mut got,
        )
        .unwrap();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.as_f64().abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f64, |m, (a, b)| m.max((a.as_f64() - b.as_f64()).abs()));
        assert!(
            err <= tol * scale,
            "{s:?} residual {residual} relu {relu} in {}: {err}",
            T::NAME
        );
        if relu {
            assert!(got.iter().all(|v| v.as_f64() >= 0.0));
        }
    }
}

#[test]
fn fused_conv_bn_eval_equals_the_separate_ops() {
    let shapes = [
        conv3(8, 64, 16, 16, 64), // Winograd in f32
        conv3(2, 3, 7, 9, 5),     // direct
        Conv2d {
            kh: 1,
            kw: 1,
            pad: 0,
            stride: 2,
            ..conv3(3, 6, 9, 9, 8)
        }, // 1x1 stride 2 (downsample)
        Conv2d {
            kh: 7,
            kw: 7,
            pad: 3,
            stride: 2,
            ..conv3(2, 3, 20, 18, 4)
        }, // the stem
    ];
    for (i, s) in shapes.into_iter().enumerate() {
        // The fused op computes exactly the same expressions: equal up to the last bit in
        // f64, and in f32 too.
        fused_eval_case(&CpuBackend::<f64>::new(), s, 40 + i as u64, 0.0);
        fused_eval_case(&CpuBackend::<f32>::new(), s, 50 + i as u64, 0.0);
    }
}

#[test]
fn fused_conv_bn_eval_rejects_mismatched_shapes() {
    use ichcam::engine::BatchNorm2d;
    let be = CpuBackend::<f64>::new();
    let s = conv3(1, 2, 4, 4, 3);
    let bn = BatchNorm2d {
        n: 1,
        c: 4,
        hw: 16,
        eps: 1e-5,
        momentum: 0.1,
    };
    let v = |n: usize| vec![1.0; n];
    let mut y = v(s.y_len());
    let r = be.conv2d_bn_eval_fwd(
        &s,
        &bn,
        &v(s.x_len()),
        &v(s.w_len()),
        &v(4),
        &v(4),
        &v(4),
        &v(4),
        None,
        true,
        &mut y,
    );
    assert!(r.is_err());
    let bn = BatchNorm2d { c: 3, ..bn };
    let short = v(5);
    let r = be.conv2d_bn_eval_fwd(
        &s,
        &bn,
        &v(s.x_len()),
        &v(s.w_len()),
        &v(3),
        &v(3),
        &v(3),
        &v(3),
        Some(&short),
        true,
        &mut y,
    );
    assert!(r.is_err());
}
