//! The U-Net's ops on the CPU reference checked from first principles, in f64 on fresh
//! random inputs: the conv bias (+ ReLU) add and its reduction, the up-convolution
//! (kernel = stride) against naive loops and by central finite differences, the channel-slice
//! copy against naive loops and as the adjoint of itself, the sigmoid and the soft Dice loss
//! by finite differences (and the Dice against its formula); f32 against f64; bad lengths
//! and slices as `Err`, never a panic.

mod common;
use common::rng::SplitMix64;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, ChannelCopy, SoftDice, UpConv2d};

type B = CpuBackend<f64>;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

const H: f64 = 1e-5;

/// Central differences of `loss` at every element of `x` against `analytic`.
fn check_grad(name: &str, x: &[f64], analytic: &[f64], tol: f64, loss: impl Fn(&[f64]) -> f64) {
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
    assert!(scale > 1e-8, "{name}: the gradient is identically zero");
    let diff = analytic
        .iter()
        .zip(&numeric)
        .map(|(a, n)| (a - n).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = analytic
        .iter()
        .zip(&numeric)
        .map(|(a, n)| (a + n).powi(2))
        .sum::<f64>()
        .sqrt();
    let (worst, werr) = analytic
        .iter()
        .zip(&numeric)
        .enumerate()
        .map(|(i, (a, n))| (i, (a - n).abs() / scale))
        .fold((0, 0.0), |b, c| if c.1 > b.1 { c } else { b });
    let rel = diff / norm;
    println!("{name}: rel {rel:.2e}, worst element {werr:.2e}");
    assert!(
        rel < tol && werr < tol,
        "{name}: relative error {rel:e} (worst element {worst}: analytic {} numeric {})",
        analytic[worst],
        numeric[worst]
    );
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
}

// ---- conv bias -----------------------------------------------------------------------------

#[test]
fn bias_add_relu_and_its_gradient() {
    let be = B::new();
    let mut rng = SplitMix64::fresh("bias");
    for (n, c, hw) in [(2usize, 3usize, 7usize), (1, 5, 40_000), (3, 1, 1)] {
        let mut z = rng.vec_off_zero(n * c * hw, 0.05);
        // Some value of every channel passes the ReLU (else the gradient is identically 0).
        for v in z.iter_mut().step_by(hw) {
            *v = v.abs();
        }
        let b = rng
            .vec_off_zero(c, 0.0)
            .iter()
            .map(|v| v * 0.02)
            .collect::<Vec<_>>();
        for relu in [false, true] {
            let mut y = z.clone();
            be.bias_relu_assign(n, c, hw, &b, &mut y, relu).unwrap();
            for (i, v) in y.iter().enumerate() {
                let pre = z[i] + b[(i / hw) % c];
                let want = if relu { pre.max(0.0) } else { pre };
                assert_eq!(*v, want, "element {i}");
            }
            if n * c * hw > 1000 {
                continue;
            }
            // d<r, relu(z + b)>/db = bias_bwd(relu_bwd(y, r)).
            let r = rng.vec(n * c * hw, -1.0, 1.0);
            let mut g = vec![f64::NAN; r.len()];
            if relu {
                be.relu_bwd(&y, &r, &mut g).unwrap();
            } else {
                g.copy_from_slice(&r);
            }
            let mut db = vec![f64::NAN; c];
            be.bias_bwd(n, c, hw, &g, &mut db).unwrap();
            check_grad(
                &format!("bias db {n}x{c}x{hw} relu {relu}"),
                &b,
                &db,
                1e-8,
                |bp| {
                    let mut y = z.clone();
                    be.bias_relu_assign(n, c, hw, &bp.to_vec(), &mut y, relu)
                        .unwrap();
                    dot(&y, &r)
                },
            );
        }
    }
}

// ---- up-convolution ------------------------------------------------------------------------

fn naive_upconv(s: &UpConv2d, x: &[f64], w: &[f64], b: &[f64], y: &mut [f64]) {
    let (oh, ow) = (s.out_h(), s.out_w());
    for n in 0..s.n {
        for co in 0..s.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (i, a, j, bb) = (oy / s.k, oy % s.k, ox / s.k, ox % s.k);
                    let mut acc = b[co];
                    for ci in 0..s.c_in {
                        acc += x[((n * s.c_in + ci) * s.h + i) * s.w + j]
                            * w[((ci * s.c_out + co) * s.k + a) * s.k + bb];
                    }
                    y[((n * s.y_channels + s.y_offset + co) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn up(
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

fn upconv_cases() -> Vec<UpConv2d> {
    vec![
        up(2, 3, 3, 4, 2, 2, 2, 0), // the plain op
        up(2, 3, 3, 4, 2, 2, 5, 0), // first channels of a wider buffer (the U-Net's concat)
        up(3, 4, 2, 3, 3, 2, 7, 4), // last channels, batch 3 (parallel over images)
        up(1, 2, 3, 2, 2, 3, 4, 1), // kernel = stride = 3, a middle slice
        up(1, 5, 1, 1, 4, 2, 8, 4), // a 1x1 input (the bottleneck of a small image)
        up(9, 2, 2, 2, 2, 2, 3, 1), // 9 images: uneven blocks of the parallel weight gradient
    ]
}

#[test]
fn upconv_forward_matches_naive_loops_and_leaves_other_channels() {
    let be = B::new();
    let mut rng = SplitMix64::fresh("upconv fwd");
    for s in upconv_cases().into_iter().chain([
        up(4, 32, 16, 16, 16, 2, 32, 0),
        up(1, 64, 16, 20, 32, 2, 64, 32),
    ]) {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let b = rng.vec(s.c_out, -1.0, 1.0);
        let before = rng.vec(s.y_len(), -1.0, 1.0);
        let mut y = before.clone();
        be.upconv2d_fwd(&s, &x, &w, &b, &mut y).unwrap();
        let mut want = before.clone();
        naive_upconv(&s, &x, &w, &b, &mut want);
        let e = max_abs_diff(&y, &want);
        assert!(e < 1e-12, "{s:?}: max error {e}");
    }
}

#[test]
fn upconv_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = SplitMix64::fresh("upconv bwd");
    for s in upconv_cases() {
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let w = rng.vec(s.w_len(), -1.0, 1.0);
        let b = rng.vec(s.c_out, -1.0, 1.0);
        let r = rng.vec(s.y_len(), -1.0, 1.0);
        let (mut dx, mut dw, mut db) = (
            vec![f64::NAN; s.x_len()],
            vec![f64::NAN; s.w_len()],
            vec![f64::NAN; s.c_out],
        );
        be.upconv2d_bwd(&s, &x, &w, &r, &mut dx, &mut dw, &mut db)
            .unwrap();
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; s.y_len()];
            be.upconv2d_fwd(&s, &x.to_vec(), &w.to_vec(), &b.to_vec(), &mut y)
                .unwrap();
            dot(&y, &r)
        };
        check_grad(&format!("upconv dx {s:?}"), &x, &dx, 1e-8, |p| {
            loss(p, &w, &b)
        });
        check_grad(&format!("upconv dw {s:?}"), &w, &dw, 1e-8, |p| {
            loss(&x, p, &b)
        });
        check_grad(&format!("upconv db {s:?}"), &b, &db, 1e-8, |p| {
            loss(&x, &w, p)
        });
    }
}

#[test]
fn upconv_equals_the_data_gradient_of_a_strided_conv() {
    // ConvTranspose2d(k, stride k) is the adjoint of Conv2d(k, stride k): the same numbers as
    // the existing conv2d_bwd_data (plus the bias), a cross-check of both ops.
    use ichcam::engine::Conv2d;
    let be = B::new();
    let mut rng = SplitMix64::fresh("upconv vs conv");
    for (n, ci, h, w, co, k) in [
        (2usize, 6usize, 5usize, 3usize, 4usize, 2usize),
        (1, 3, 4, 4, 2, 3),
    ] {
        let s = up(n, ci, h, w, co, k, co, 0);
        let conv = Conv2d {
            n,
            c_in: co,
            h: k * h,
            w: k * w,
            c_out: ci,
            kh: k,
            kw: k,
            stride: k,
            pad: 0,
        };
        let x = rng.vec(s.x_len(), -1.0, 1.0);
        let wt = rng.vec(s.w_len(), -1.0, 1.0);
        let zero = vec![0.0; co];
        let mut y = vec![f64::NAN; s.y_len()];
        be.upconv2d_fwd(&s, &x, &wt, &zero, &mut y).unwrap();
        let mut want = vec![f64::NAN; conv.x_len()];
        be.conv2d_bwd_data(&conv, &x, &wt, &mut want).unwrap();
        let e = max_abs_diff(&y, &want);
        assert!(e < 1e-12, "{s:?}: max error {e}");
    }
}

// ---- channel slices ------------------------------------------------------------------------

#[test]
fn copy_channels_writes_only_its_slice_and_its_accumulate_is_the_adjoint() {
    let be = B::new();
    let mut rng = SplitMix64::fresh("channels");
    for s in [
        ChannelCopy {
            n: 2,
            hw: 6,
            c: 3,
            src_channels: 3,
            src_offset: 0,
            dst_channels: 7,
            dst_offset: 4,
        },
        ChannelCopy {
            n: 3,
            hw: 5,
            c: 2,
            src_channels: 6,
            src_offset: 3,
            dst_channels: 2,
            dst_offset: 0,
        },
        ChannelCopy {
            n: 1,
            hw: 1,
            c: 4,
            src_channels: 8,
            src_offset: 4,
            dst_channels: 9,
            dst_offset: 1,
        },
    ] {
        let src = rng.vec(s.src_len(), -1.0, 1.0);
        let before = rng.vec(s.dst_len(), -1.0, 1.0);
        for accumulate in [false, true] {
            let mut dst = before.clone();
            be.copy_channels(&s, &src, &mut dst, accumulate).unwrap();
            for img in 0..s.n {
                for ch in 0..s.dst_channels {
                    for p in 0..s.hw {
                        let d = (img * s.dst_channels + ch) * s.hw + p;
                        let inside = ch >= s.dst_offset && ch < s.dst_offset + s.c;
                        let want = if inside {
                            let v = src[(img * s.src_channels + s.src_offset + ch - s.dst_offset)
                                * s.hw
                                + p];
                            if accumulate {
                                before[d] + v
                            } else {
                                v
                            }
                        } else {
                            before[d]
                        };
                        assert_eq!(dst[d], want, "{s:?} accumulate {accumulate} at {d}");
                    }
                }
            }
        }
        // The split backward: d<r, copy(src)>/dsrc, read back by the reverse copy.
        let r = rng.vec(s.dst_len(), -1.0, 1.0);
        let back = ChannelCopy {
            n: s.n,
            hw: s.hw,
            c: s.c,
            src_channels: s.dst_channels,
            src_offset: s.dst_offset,
            dst_channels: s.src_channels,
            dst_offset: s.src_offset,
        };
        let mut dsrc = vec![0.0; s.src_len()];
        be.copy_channels(&back, &r, &mut dsrc, true).unwrap();
        check_grad(&format!("copy_channels {s:?}"), &src, &dsrc, 1e-8, |p| {
            let mut dst = before.clone();
            be.copy_channels(&s, &p.to_vec(), &mut dst, false).unwrap();
            dot(&dst, &r)
        });
    }
}

// ---- sigmoid and the soft Dice loss --------------------------------------------------------

#[test]
fn sigmoid_values_and_gradient() {
    let be = B::new();
    let mut rng = SplitMix64::fresh("sigmoid");
    let x: Vec<f64> = rng
        .vec(200, -8.0, 8.0)
        .into_iter()
        .chain([0.0, 40.0, -40.0, 800.0, -800.0])
        .collect();
    let mut y = vec![f64::NAN; x.len()];
    be.sigmoid_fwd(&x, &mut y).unwrap();
    for (a, v) in x.iter().zip(&y) {
        let want = 1.0 / (1.0 + (-a).exp());
        assert!(
            (v - want).abs() <= 1e-15 * want.max(1e-300) + 1e-300,
            "sigmoid({a}) = {v}, want {want}"
        );
        assert!(v.is_finite() && (0.0..=1.0).contains(v));
    }
    let x = rng.vec(50, -4.0, 4.0);
    let mut y = vec![0.0; x.len()];
    be.sigmoid_fwd(&x, &mut y).unwrap();
    let r = rng.vec(x.len(), -1.0, 1.0);
    let mut dx = vec![f64::NAN; x.len()];
    be.sigmoid_bwd(&y, &r, &mut dx).unwrap();
    check_grad("sigmoid", &x, &dx, 1e-8, |p| {
        let mut y = vec![0.0; p.len()];
        be.sigmoid_fwd(&p.to_vec(), &mut y).unwrap();
        dot(&y, &r)
    });
}

/// The Dice loss by its formula, for the value check.
fn dice_formula(s: &SoftDice, p: &[f64], t: &[f64]) -> f64 {
    let mut acc = 0.0;
    for ch in 0..s.c {
        let (mut i, mut tot) = (0.0, 0.0);
        for n in 0..s.n {
            for q in 0..s.hw {
                let k = (n * s.c + ch) * s.hw + q;
                i += p[k] * t[k];
                tot += p[k] + t[k];
            }
        }
        acc += 2.0 * i / (tot + s.eps);
    }
    1.0 - acc / s.c as f64
}

#[test]
fn soft_dice_value_and_gradient() {
    let be = B::new();
    let mut rng = SplitMix64::fresh("dice");
    for s in [
        SoftDice {
            n: 2,
            c: 1,
            hw: 12,
            eps: 1e-7,
        },
        SoftDice {
            n: 1,
            c: 3,
            hw: 10,
            eps: 1e-7,
        },
        SoftDice {
            n: 3,
            c: 2,
            hw: 5,
            eps: 0.5,
        },
    ] {
        let p = rng.vec(s.len(), 0.02, 0.98);
        let t = rng.mask(s.len(), 0.3);
        let mut dp = vec![f64::NAN; s.len()];
        let loss = be.soft_dice_loss(&s, &p, &t, &mut dp).unwrap();
        let want = dice_formula(&s, &p, &t);
        assert!((loss - want).abs() < 1e-14, "{s:?}: loss {loss} vs {want}");
        assert!((0.0..=1.0).contains(&loss));
        check_grad(&format!("dice {s:?}"), &p, &dp, 1e-8, |pp| {
            let mut d = vec![0.0; pp.len()];
            be.soft_dice_loss(&s, &pp.to_vec(), &t, &mut d).unwrap()
        });
    }
    // A perfect prediction has loss ~0; an empty one against a non-empty target 1.
    let s = SoftDice {
        n: 1,
        c: 1,
        hw: 4,
        eps: 1e-7,
    };
    let t = vec![1.0, 0.0, 1.0, 0.0];
    let mut d = vec![0.0; 4];
    assert!(be.soft_dice_loss(&s, &t, &t, &mut d).unwrap() < 1e-7);
    assert!(
        (be.soft_dice_loss(&s, &[0.0; 4].to_vec(), &t, &mut d)
            .unwrap()
            - 1.0)
            .abs()
            < 1e-12
    );
}

#[test]
fn dice_after_sigmoid_chains_to_the_logits() {
    // The U-Net's output layer: loss(sigmoid(z)); dz = sigmoid_bwd(y, dice's dp).
    let be = B::new();
    let mut rng = SplitMix64::fresh("dice o sigmoid");
    let s = SoftDice {
        n: 2,
        c: 2,
        hw: 9,
        eps: 1e-7,
    };
    let z = rng.vec(s.len(), -3.0, 3.0);
    let t = rng.mask(s.len(), 0.4);
    let mut y = vec![0.0; s.len()];
    be.sigmoid_fwd(&z, &mut y).unwrap();
    let mut dp = vec![0.0; s.len()];
    be.soft_dice_loss(&s, &y, &t, &mut dp).unwrap();
    let mut dz = vec![f64::NAN; s.len()];
    be.sigmoid_bwd(&y, &dp, &mut dz).unwrap();
    check_grad("dice o sigmoid", &z, &dz, 1e-8, |zp| {
        let mut y = vec![0.0; zp.len()];
        be.sigmoid_fwd(&zp.to_vec(), &mut y).unwrap();
        let mut d = vec![0.0; zp.len()];
        be.soft_dice_loss(&s, &y, &t, &mut d).unwrap()
    });
}

// ---- f32 and bad input ---------------------------------------------------------------------

#[test]
fn f32_agrees_with_f64() {
    let mut rng = SplitMix64::fresh("f32");
    let (b32, b64) = (CpuBackend::<f32>::new(), B::new());
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let rel = |a: &[f32], b: &[f64]| {
        let d: f64 = a
            .iter()
            .zip(b)
            .map(|(p, q)| (*p as f64 - q).powi(2))
            .sum::<f64>()
            .sqrt();
        d / b.iter().map(|q| q * q).sum::<f64>().sqrt()
    };
    let s = up(3, 16, 12, 10, 8, 2, 16, 8);
    let (x, w, b, dy) = (
        rng.vec(s.x_len(), -1.0, 1.0),
        rng.vec(s.w_len(), -1.0, 1.0),
        rng.vec(s.c_out, -1.0, 1.0),
        rng.vec(s.y_len(), -1.0, 1.0),
    );
    let (mut y32, mut y64) = (vec![0f32; s.y_len()], vec![0f64; s.y_len()]);
    b32.upconv2d_fwd(&s, &f(&x), &f(&w), &f(&b), &mut y32)
        .unwrap();
    b64.upconv2d_fwd(&s, &x, &w, &b, &mut y64).unwrap();
    assert!(rel(&y32, &y64) < 1e-6);
    let (mut dx32, mut dw32, mut db32) =
        (vec![0f32; s.x_len()], vec![0f32; s.w_len()], vec![0f32; 8]);
    let (mut dx64, mut dw64, mut db64) =
        (vec![0f64; s.x_len()], vec![0f64; s.w_len()], vec![0f64; 8]);
    b32.upconv2d_bwd(&s, &f(&x), &f(&w), &f(&dy), &mut dx32, &mut dw32, &mut db32)
        .unwrap();
    b64.upconv2d_bwd(&s, &x, &w, &dy, &mut dx64, &mut dw64, &mut db64)
        .unwrap();
    for (what, a, b) in [
        ("dx", &dx32, &dx64),
        ("dw", &dw32, &dw64),
        ("db", &db32, &db64),
    ] {
        assert!(rel(a, b) < 1e-6, "upconv {what}: {}", rel(a, b));
    }
    let d = SoftDice {
        n: 2,
        c: 1,
        hw: 5000,
        eps: 1e-7,
    };
    let p = rng.vec(d.len(), 0.0, 1.0);
    let t = rng.mask(d.len(), 0.2);
    let (mut dp32, mut dp64) = (vec![0f32; d.len()], vec![0f64; d.len()]);
    let l32 = b32.soft_dice_loss(&d, &f(&p), &f(&t), &mut dp32).unwrap();
    let l64 = b64.soft_dice_loss(&d, &p, &t, &mut dp64).unwrap();
    assert!(((l32 - l64) / l64).abs() < 1e-6, "{l32} vs {l64}");
    assert!(rel(&dp32, &dp64) < 1e-6);
}

#[test]
fn wrong_lengths_and_slices_are_errors_not_panics() {
    let be = B::new();
    let v = |n: usize| vec![0.5f64; n];
    assert!(be
        .bias_relu_assign(2, 3, 4, &v(2), &mut v(24), true)
        .is_err());
    assert!(be
        .bias_relu_assign(2, 3, 4, &v(3), &mut v(23), true)
        .is_err());
    assert!(be.bias_bwd(2, 3, 4, &v(24), &mut v(4)).is_err());
    let s = up(1, 2, 3, 3, 2, 2, 2, 0);
    assert!(be
        .upconv2d_fwd(&s, &v(18), &v(16), &v(2), &mut v(72))
        .is_ok());
    assert!(be
        .upconv2d_fwd(&s, &v(17), &v(16), &v(2), &mut v(72))
        .is_err());
    assert!(be
        .upconv2d_fwd(&s, &v(18), &v(16), &v(1), &mut v(72))
        .is_err());
    assert!(be
        .upconv2d_fwd(&s, &v(18), &v(16), &v(2), &mut v(71))
        .is_err());
    let past = up(1, 2, 3, 3, 2, 2, 3, 2);
    assert!(be
        .upconv2d_fwd(&past, &v(18), &v(16), &v(2), &mut v(108))
        .is_err());
    let k0 = up(1, 2, 3, 3, 2, 0, 2, 0);
    assert!(be
        .upconv2d_fwd(&k0, &v(18), &v(0), &v(2), &mut v(0))
        .is_err());
    assert!(be
        .upconv2d_bwd(
            &s,
            &v(18),
            &v(16),
            &v(72),
            &mut v(18),
            &mut v(15),
            &mut v(2)
        )
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
    assert!(be.copy_channels(&c, &v(4), &mut v(8), false).is_err());
    let c = ChannelCopy { src_offset: 0, ..c };
    assert!(be.copy_channels(&c, &v(4), &mut v(8), false).is_ok());
    assert!(be.copy_channels(&c, &v(4), &mut v(7), false).is_err());
    assert!(be.sigmoid_fwd(&v(3), &mut v(4)).is_err());
    assert!(be.sigmoid_bwd(&v(3), &v(3), &mut v(2)).is_err());
    let d = SoftDice {
        n: 1,
        c: 1,
        hw: 3,
        eps: 1e-7,
    };
    assert!(be.soft_dice_loss(&d, &v(3), &v(2), &mut v(3)).is_err());
    assert!(be
        .soft_dice_loss(&SoftDice { c: 0, hw: 0, ..d }, &v(0), &v(0), &mut v(0))
        .is_err());
    assert!(be
        .soft_dice_loss(&SoftDice { eps: -1.0, ..d }, &v(3), &v(3), &mut v(3))
        .is_err());
    assert!(be
        .soft_dice_loss(
            &SoftDice { eps: 0.0, ..d },
            &v(3).iter().map(|_| 0.0).collect(),
            &vec![0.0; 3],
            &mut v(3)
        )
        .is_err());
}
