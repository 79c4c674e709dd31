//! bf16 storage of the channels-last training activations (issue 14, round 2) on the CPU
//! reference (`CpuBackend::with_train_storage`: a slot per value, rounded to bf16, RN-even):
//! - each bf16-storage training op's default (by conversions, `backend::through_bf16_storage`
//!   and `backend::conv2d_bn_train_fwd_nhwc_bf16_by_conversions`) against the f32
//!   channels-last op on the rounded inputs with its outputs rounded, on odd shapes:
//!   `relu_bwd_bf16`, `conv2d_bwd_data_nhwc_bf16`, `conv2d_bwd_weight_nhwc_bf16` and
//!   `batchnorm_bwd_nhwc_bf16` bit for bit; `conv2d_bn_train_fwd_nhwc_bf16`: z bit for bit
//!   the rounded convolution, the saved mean / invstd and the running statistics those of
//!   the ROUNDED z (an NCHW batch norm on it, 1e-6), y within one bf16 step of the rounded
//!   reference; every stored bf16 buffer holds bf16 values only;
//! - wrong lengths are `EngineError::Shape`.
//!
//! Not here (not done this round): the model's training backbone in bf16 storage (a
//! whole train step bf16 vs f32 storage).

mod common;
use common::nhwc::bn_of;
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::precision::round_bf16;
use ichcam::engine::{ActStorage, Backend, Conv2d, EngineError};

type Cpu = CpuBackend<f32>;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round_bf16(x)).collect()
}

fn all_bf16(v: &[f32]) -> bool {
    v.iter().all(|x| x.to_bits() & 0xffff == 0)
}

fn be() -> Cpu {
    Cpu::new()
        .with_channels_last_train(true)
        .with_train_storage(ActStorage::Bf16)
}

/// Odd shapes: (batch, c_in, h, w, c_out, k, stride, pad).
fn shapes() -> Vec<Conv2d> {
    vec![
        conv(2, 5, 9, 7, 6, 3, 1, 1),
        conv(1, 8, 13, 11, 16, 3, 2, 1),
        conv(3, 4, 6, 6, 12, 1, 2, 0),
        conv(3, 7, 5, 3, 1, 1, 1, 0),
    ]
}

#[test]
fn the_cpu_switch_sets_the_training_storage() {
    assert_eq!(Cpu::new().train_storage(), ActStorage::F32);
    let mut b = be();
    assert_eq!(b.train_storage(), ActStorage::Bf16);
    assert_eq!(b.storage_slots(ActStorage::Bf16, 7), 7);
    b.force_f32_train_storage();
    assert_eq!(b.train_storage(), ActStorage::F32);
}

#[test]
fn relu_bwd_bf16_is_relu_bwd_on_the_rounded_output() {
    let be = be();
    let mut rng = SplitMix64::fresh("bf16s-relu-bwd");
    let len = 1001;
    let mut y = rng.vec_f32(len, -1.0, 1.0);
    for v in y.iter_mut().step_by(3) {
        *v = v.max(0.0);
    }
    // A value that rounds to zero only in bf16 is not possible (no underflow here); one that
    // is tiny and positive stays positive.
    y[0] = 1e-30;
    let dy = rng.vec_f32(len, -1.0, 1.0);
    let yr = rounded(&y);
    let mut want = vec![f32::NAN; len];
    be.relu_bwd(&yr, &dy, &mut want).expect("f32");
    let mut got = vec![f32::NAN; len];
    be.relu_bwd_bf16(&yr, &dy, &mut got).expect("bf16");
    assert_eq!(bits(&got), bits(&want));
    let mut short = vec![0.0; len - 1];
    assert!(matches!(
        be.relu_bwd_bf16(&yr, &dy, &mut short),
        Err(EngineError::Shape { .. })
    ));
}

#[test]
fn conv_gradients_bf16_are_the_f32_ops_on_rounded_operands() {
    let be = be();
    let mut rng = SplitMix64::fresh("bf16s-conv-bwd");
    for s in shapes() {
        let x = rounded(&rng.vec_f32(s.x_len(), -1.0, 1.0));
        let dy = rounded(&rng.vec_f32(s.y_len(), -1.0, 1.0));
        let w = rng.vec_f32(s.w_len(), -0.5, 0.5);
        let mut want = vec![f32::NAN; s.x_len()];
        be.conv2d_bwd_data_nhwc(&s, &dy, &w, &mut want)
            .expect("dx f32");
        let mut got = vec![f32::NAN; s.x_len()];
        be.conv2d_bwd_data_nhwc_bf16(&s, &dy, &w, &mut got)
            .expect("dx bf16");
        assert_eq!(bits(&got), bits(&want), "{s:?} dx");
        let mut want = vec![f32::NAN; s.w_len()];
        be.conv2d_bwd_weight_nhwc(&s, &x, &dy, &mut want)
            .expect("dw f32");
        let mut got = vec![f32::NAN; s.w_len()];
        be.conv2d_bwd_weight_nhwc_bf16(&s, &x, &dy, &mut got)
            .expect("dw bf16");
        assert_eq!(bits(&got), bits(&want), "{s:?} dw");
        let mut bad = vec![0.0; s.x_len() + 1];
        assert!(matches!(
            be.conv2d_bwd_data_nhwc_bf16(&s, &dy, &w, &mut bad),
            Err(EngineError::Shape { .. })
        ));
    }
}

#[test]
fn batchnorm_bwd_bf16_is_the_f32_op_on_rounded_tensors_dz_rounded() {
    let be = be();
    let mut rng = SplitMix64::fresh("bf16s-bn-bwd");
    for s in shapes() {
        let bn = bn_of(&s);
        let c = bn.c;
        let z = rounded(&rng.vec_f32(bn.len(), -1.0, 1.0));
        let y = rounded(&rng.vec_f32(bn.len(), -1.0, 1.0));
        let dy = rng.vec_f32(bn.len(), -1.0, 1.0);
        let g = rng.vec_f32(c, 0.5, 1.5);
        let sm = rng.vec_f32(c, -0.2, 0.2);
        let si = rng.vec_f32(c, 0.5, 2.0);
        for relu in [false, true] {
            let mut want = vec![f32::NAN; bn.len()];
            let (mut wg, mut wb) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            be.batchnorm_bwd_nhwc(
                &bn, &z, &y, &dy, &g, &sm, &si, &mut want, &mut wg, &mut wb, relu,
            )
            .expect("f32");
            let want = rounded(&want);
            let mut got = vec![f32::NAN; bn.len()];
            let (mut gg, mut gb) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            be.batchnorm_bwd_nhwc_bf16(
                &bn, &z, &y, &dy, &g, &sm, &si, &mut got, &mut gg, &mut gb, relu,
            )
            .expect("bf16");
            assert_eq!(bits(&got), bits(&want), "{s:?} relu {relu} dz");
            assert!(all_bf16(&got));
            assert_eq!(bits(&gg), bits(&wg), "{s:?} dgamma");
            assert_eq!(bits(&gb), bits(&wb), "{s:?} dbeta");
        }
    }
}

/// Host NCHW batch statistics (biased variance) of NHWC `z` `[n * hw, c]`, in f64.
fn stats(z: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let cnt = (z.len() / c) as f64;
    let mut m = vec![0.0; c];
    for (i, v) in z.iter().enumerate() {
        m[i % c] += *v as f64 / cnt;
    }
    let mut var = vec![0.0; c];
    for (i, v) in z.iter().enumerate() {
        var[i % c] += (*v as f64 - m[i % c]).powi(2) / cnt;
    }
    (m, var)
}

#[test]
fn train_fwd_bf16_keeps_the_rounded_z_and_its_statistics() {
    let be = be();
    let mut rng = SplitMix64::fresh("bf16s-train-fwd");
    for s in shapes() {
        let bn = bn_of(&s);
        let c = s.c_out;
        let ohw = s.out_h() * s.out_w();
        let x = rounded(&rng.vec_f32(s.x_len(), -1.0, 1.0));
        let w = rng.vec_f32(s.w_len(), -0.5, 0.5);
        let g = rng.vec_f32(c, 0.5, 1.5);
        let b = rng.vec_f32(c, -0.5, 0.5);
        let rm0 = rng.vec_f32(c, -0.2, 0.2);
        let rv0 = rng.vec_f32(c, 0.5, 2.0);
        let r = rounded(&rng.vec_f32(s.y_len(), -1.0, 1.0));
        // The rounded convolution, channels-last: the f32 op's z (the conv, bit for bit
        // the NCHW one) rounded.
        let zr = {
            let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
            let (mut sm, mut si) = (vec![0.0; c], vec![0.0; c]);
            let (mut z, mut y) = (vec![0.0; s.y_len()], vec![0.0; s.y_len()]);
            be.conv2d_bn_train_fwd_nhwc(
                &s, &bn, &x, &w, &g, &b, &mut rm, &mut rv, &mut sm, &mut si, &mut z, &mut y, None,
                false,
            )
            .expect("f32 unit");
            rounded(&z)
        };
        let (mean, var) = stats(&zr, c);
        let cnt = (s.n * ohw) as f64;
        for (residual, relu) in [(false, true), (true, true), (true, false), (false, false)] {
            let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
            let (mut sm, mut si) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            let (mut z, mut y) = (vec![f32::NAN; s.y_len()], vec![f32::NAN; s.y_len()]);
            be.conv2d_bn_train_fwd_nhwc_bf16(
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
                &mut z,
                &mut y,
                residual.then_some(&r),
                relu,
            )
            .expect("bf16 unit");
            let what = format!("{s:?} residual {residual} relu {relu}");
            assert_eq!(bits(&z), bits(&zr), "{what}: z");
            assert!(all_bf16(&y), "{what}: y stored in bf16");
            for ch in 0..c {
                let invstd = 1.0 / (var[ch] + bn.eps).sqrt();
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs());
                assert!(
                    close(sm[ch], mean[ch]),
                    "{what}: mean {} vs {}",
                    sm[ch],
                    mean[ch]
                );
                assert!(
                    close(si[ch], invstd),
                    "{what}: invstd {} vs {invstd}",
                    si[ch]
                );
                let m = bn.momentum;
                let want_rm = (1.0 - m) * rm0[ch] as f64 + m * mean[ch];
                let unbiased = if cnt > 1.0 {
                    var[ch] * cnt / (cnt - 1.0)
                } else {
                    var[ch]
                };
                let want_rv = (1.0 - m) * rv0[ch] as f64 + m * unbiased;
                assert!(close(rm[ch], want_rm), "{what}: running mean");
                assert!(close(rv[ch], want_rv), "{what}: running var");
            }
            for (i, &got) in y.iter().enumerate() {
                let ch = i % c;
                let invstd = 1.0 / (var[ch] + bn.eps).sqrt();
                let mut v = (zr[i] as f64 - mean[ch]) * invstd * g[ch] as f64 + b[ch] as f64;
                if residual {
                    v += r[i] as f64;
                }
                if relu {
                    v = v.max(0.0);
                }
                // One bf16 step (2^-8 relative) plus the f32 arithmetic's error.
                let tol = (v.abs() * 2f64.powi(-8)).max(1e-5);
                assert!((got as f64 - v).abs() <= tol, "{what}: y[{i}] {got} vs {v}");
            }
        }
    }
}

#[test]
fn bf16_ops_refuse_wrong_lengths() {
    let be = be();
    let s = conv(2, 3, 5, 5, 4, 3, 1, 1);
    let bn = bn_of(&s);
    let c = s.c_out;
    let (x, w) = (vec![0.0; s.x_len()], vec![0.0; s.w_len()]);
    let (g, b) = (vec![1.0; c], vec![0.0; c]);
    let (mut rm, mut rv, mut sm, mut si) = (vec![0.0; c], vec![1.0; c], vec![0.0; c], vec![0.0; c]);
    let mut z = vec![0.0; s.y_len() - 1];
    let mut y = vec![7.0; s.y_len()];
    let e = be.conv2d_bn_train_fwd_nhwc_bf16(
        &s, &bn, &x, &w, &g, &b, &mut rm, &mut rv, &mut sm, &mut si, &mut z, &mut y, None, true,
    );
    assert!(matches!(e, Err(EngineError::Shape { .. })));
    assert!(y.iter().all(|&v| v == 7.0), "nothing written");
    let mut dw = vec![0.0; s.w_len()];
    let short = vec![0.0; s.x_len() - 1];
    assert!(matches!(
        be.conv2d_bwd_weight_nhwc_bf16(&s, &short, &y, &mut dw),
        Err(EngineError::Shape { .. })
    ));
    let mut packed = vec![0.0; 3];
    assert!(matches!(
        be.pack_bf16(&x, &mut packed),
        Err(EngineError::Shape { .. })
    ));
}
