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
//! - wrong lengths are `EngineError::Shape`;
//! - the model's training backbone in bf16 storage (`resnet.rs`'s unit test: every stored
//!   activation and dz a bf16 value; `memory.rs`'s: the buffers what `memory` counts): a
//!   whole stage-1 training step against the same model in f32 storage, each step from the
//!   same state: the loss and logits within 2e-2 (relative; measured up to 8.4e-3), all of a
//!   step's gradients together within 8 times the f32 model's own deviation when only its
//!   input is rounded to bf16 (measured 1.8 to 4.9 times; these tiny nets' gradients move
//!   by 4e-2 to 0.15 on that one rounding: see `bf16_storage_train_step_is_close_to_f32_storage`),
//!   batch-statistics logits within 2e-2, eval-mode logits equal; the storage named by
//!   `IchNet::train_storage`.

mod common;
use common::nhwc::bn_of;
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::precision::round_bf16;
use ichcam::engine::{ActStorage, Backend, Conv2d, EngineError};
use ichcam::model::{BlockKind, IchNet, ModelConfig, OptimizerConfig, ParamGroup};

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

/// Every tensor of `from` (parameters, running statistics, optimizer state) into `to`.
fn copy_state(from: &IchNet<Cpu>, to: &mut IchNet<Cpu>) {
    for name in from.names() {
        to.set_param(&name, &from.param(&name).expect("param"))
            .expect("set param");
        if let Ok(st) = from.opt_state(&name) {
            if st.steps > 0 {
                to.set_opt_state(&name, st.m.as_deref(), st.v.as_deref(), st.steps)
                    .expect("set optimizer state");
            }
        }
    }
}

/// ||a - b|| / ||b|| over the concatenation of several tensors.
fn rel_all(pairs: &[(Vec<f32>, Vec<f32>)]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in pairs {
        for (&x, &y) in a.iter().zip(b) {
            num += (x as f64 - y as f64).powi(2);
            den += (y as f64).powi(2);
        }
    }
    (num / den.max(1e-300)).sqrt()
}

/// The gradients a step leaves in `net`, every nonzero trainable's, by name order.
fn grads(net: &IchNet<Cpu>) -> Vec<(String, Vec<f32>)> {
    net.names()
        .into_iter()
        .filter_map(|name| net.grad(&name).ok().map(|g| (name, g)))
        .collect()
}

/// A stage-1 training step (Adam) of a channels-last model in bf16 storage against the same
/// model in f32 storage, each of three steps from the same state (the f32 net's parameters,
/// statistics and optimizer state copied over: the tolerance is one step's).
///
/// The bounds. The forward is well conditioned: bf16 keeps 8 significant bits (a relative
/// rounding error of at most 2^-9 = 2e-3 per stored value), the loss and logits go through
/// about 20 stored tensors of these nets, largely independent (~sqrt(20) x 2e-3 = 9e-3):
/// within 2e-2 (measured up to 8.4e-3 over 25 runs). The gradients of these tiny nets at their
/// initialisation are not: the f32-storage model's own gradients move by 4e-2 to 0.15 (all
/// of a step's together, relative L2) when only its INPUT is rounded to bf16, one rounding
/// (`control`; a one-ulp change of a ReLU or max-pool decision, or of a nearly constant
/// channel's 1/sqrt(var + eps), carries a whole channel's gradient). bf16 storage rounds
/// about 20 tensors of the forward and the dz of the backward, each like that input: all
/// of a step's gradients within 8 x control or 5e-2, whichever is larger (measured over 25
/// runs: 1.8 to 4.9 x control, 0.25 to 0.45); a wrong layout, a transposed copy or a z whose
/// statistics are not its own gives O(1) errors in the loss already. Each gradient finite.
#[test]
fn bf16_storage_train_step_is_close_to_f32_storage() {
    let (batch, seq, h, w) = (2, 3, 45, 38);
    let n = batch * seq;
    let mut rng = SplitMix64::fresh("bf16s-train-step");
    let (mut worst_loss, mut worst_ratio, mut worst_all) = (0.0f64, 0.0f64, 0.0f64);
    for cfg in [
        ModelConfig {
            block: BlockKind::Bottleneck,
            layers: vec![2, 1, 2],
            base_width: 4,
            ..ModelConfig::tiny()
        },
        ModelConfig::tiny(),
    ] {
        let what = format!("{:?} {:?}", cfg.block, cfg.layers);
        // f32 storage, bf16 storage, and f32 storage on the input rounded (the control).
        let mut nets = [ActStorage::F32, ActStorage::Bf16, ActStorage::F32].map(|st| {
            let be = Cpu::new()
                .with_channels_last_train(true)
                .with_train_storage(st);
            IchNet::new(be, cfg.clone(), 11).expect("net")
        });
        let opt = OptimizerConfig::adam(1e-2);
        for step in 0..3 {
            let x = rng.vec_f32(n * cfg.in_channels * h * w, -1.0, 1.0);
            let labels: Vec<f32> = (0..n).map(|i| ((i + step) % 2) as f32).collect();
            let [a, b, c] = &mut nets;
            let sa = a
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("f32 storage step");
            let sb = b
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("bf16 storage step");
            c.stage1_forward_backward(&rounded(&x), &labels, batch, seq, h, w, 1.5)
                .expect("control step");
            assert_eq!(a.train_storage(), Some(ActStorage::F32), "{what}");
            assert_eq!(b.train_storage(), Some(ActStorage::Bf16), "{what}");
            let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-30);
            let el = rel(sb.loss, sa.loss);
            let (la, lb): (Vec<f32>, Vec<f32>) = (
                sa.logits.iter().map(|&v| v as f32).collect(),
                sb.logits.iter().map(|&v| v as f32).collect(),
            );
            let elog = rel_all(&[(lb, la)]);
            worst_loss = worst_loss.max(el).max(elog);
            assert!(
                el <= 2e-2,
                "{what} step {step}: loss {} vs {}",
                sb.loss,
                sa.loss
            );
            assert!(elog <= 2e-2, "{what} step {step}: logits {elog:e}");
            assert_ne!(
                sa.loss.to_bits(),
                sb.loss.to_bits(),
                "{what}: the storage rounds"
            );
            let (ga, gb, gc) = (grads(a), grads(b), grads(c));
            let (mut pairs, mut control) = (Vec::new(), Vec::new());
            for (((name, ga), (_, gb)), (_, gc)) in ga.into_iter().zip(gb).zip(gc) {
                assert!(
                    gb.iter().all(|v| v.is_finite()),
                    "{what}: gradient of {name}"
                );
                pairs.push((gb, ga.clone()));
                control.push((gc, ga));
            }
            assert!(pairs.len() > 10, "{what}: {} gradients", pairs.len());
            let (all, ctl) = (rel_all(&pairs), rel_all(&control));
            worst_all = worst_all.max(all);
            worst_ratio = worst_ratio.max(all / ctl);
            eprintln!("{what} step {step}: all gradients {all:e}, control {ctl:e}");
            assert!(
                all <= (8.0 * ctl).max(5e-2),
                "{what} step {step}: all gradients: {all:e} (the input rounded: {ctl:e})"
            );
            a.step(&opt, ParamGroup::Stage1).expect("step");
            copy_state(a, b);
            copy_state(a, c);
        }
        // Forward only: batch statistics through the training activations, then eval mode
        // (the eval-mode backbone, f32 storage here: the same logits, the state being).
        let x = rng.vec_f32(n * cfg.in_channels * h * w, -1.0, 1.0);
        for train in [true, false] {
            let [a, b, _] = &mut nets;
            a.set_train(train);
            b.set_train(train);
            let la = a.stage1_logits(&x, batch, seq, h, w).expect("logits");
            let lb = b.stage1_logits(&x, batch, seq, h, w).expect("logits");
            let (la, lb): (Vec<f32>, Vec<f32>) = (
                la.iter().map(|&v| v as f32).collect(),
                lb.iter().map(|&v| v as f32).collect(),
            );
            let e = rel_all(&[(lb, la)]);
            if train {
                assert!(e <= 2e-2, "{what}: batch-statistics logits {e:e}");
            } else {
                assert_eq!(e, 0.0, "{what}: eval-mode logits (f32 eval storage)");
            }
        }
    }
    eprintln!(
        "bf16 vs f32 training storage, one step: loss / logits up to {worst_loss:e}, all \
         gradients up to {worst_all:e}, {worst_ratio:.2} x the input-rounding control"
    );
}

/// `ichcam parity`'s run (`parity::run`) keeps the training activations in f32 storage, as
/// it keeps the eval-mode ones (tests/eval_bf16_storage.rs): its rounded references round
/// only the convolutions' operands. The f32-storage channels-last training model is the
/// NCHW one bit for bit (tests/train_nhwc.rs), so a bf16-storage backend's rows are the
/// plain CPU backend's.
#[test]
fn parity_keeps_f32_training_storage() {
    use ichcam::model::parity::{self, Fixture};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch-parity/parity_basic.safetensors");
    let fx = Fixture::load(&path).expect("fixture");
    let plain = parity::run(Cpu::new(), &fx, 1e-3).expect("plain");
    let asked = parity::run(be(), &fx, 1e-3).expect("bf16 training storage asked");
    let rows = |r: &parity::ParityReport| format!("{:?}", r.rows);
    assert_eq!(rows(&plain), rows(&asked));
}
