//! The channels-last training path (issue 14) on the CPU reference:
//! - the trait's channels-last training ops (their defaults: transposes around the NCHW
//!   ops, `backend::nchw_between_layout_changes`) are their NCHW twins on transposed
//!   buffers bit for bit, on odd shapes: `conv2d_bn_train_fwd_nhwc` (z, y, the running
//!   statistics, the saved mean and invstd; with and without residual and ReLU, stride 1
//!   and 2), `batchnorm_bwd_nhwc` (with and without the fused ReLU), `conv2d_bwd_data_nhwc`
//!   and `conv2d_bwd_weight_nhwc`; wrong lengths are `EngineError::Shape`, nothing written;
//! - a model whose backend asks for a channels-last training backbone
//!   (`CpuBackend::with_channels_last_train`) gives bit-identical losses, logits, every
//!   parameter gradient, running statistics and parameters after optimizer steps to the
//!   NCHW model, over three stage-1 steps, and the same stage-1 logits with batch
//!   statistics (`set_train(true)`, the training activations without touching the running
//!   stats) and in eval mode;
//! - `ichcam bench --what train-step --device cpu --layout nhwc` trains NCHW and says so; its
//!   JSON line's `train_bb_mb` and `train_plan_mb` are `memory::train_backbone_slots` and
//!   `memory::training_bytes_in` of the preset's model at that shape.

mod common;
use common::nhwc::{bn_of, to_nhwc};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, EngineError};
use ichcam::model::{IchNet, ModelConfig, OptimizerConfig, ParamGroup};

type Cpu = CpuBackend<f32>;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Odd shapes: (batch, c_in, h, w, c_out, k, stride, pad).
fn shapes() -> Vec<Conv2d> {
    vec![
        conv(2, 5, 9, 7, 6, 3, 1, 1),
        conv(1, 8, 13, 11, 16, 3, 2, 1),
        conv(3, 4, 6, 6, 12, 1, 2, 0),
        conv(2, 3, 10, 9, 4, 7, 2, 3),
        conv(3, 7, 5, 3, 1, 1, 1, 0),
    ]
}

/// Host NHWC `[n, hw, c]` of an NCHW vector.
fn nhwc(v: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    to_nhwc(v, n, c, hw)
}

fn out_hw(s: &Conv2d) -> usize {
    s.out_h() * s.out_w()
}

#[test]
fn train_fwd_nhwc_is_the_nchw_op_bit_for_bit() {
    let be = Cpu::new();
    let mut rng = SplitMix64::fresh("nhwc-train-fwd");
    for s in shapes() {
        let bn = bn_of(&s);
        let (n, c, ohw) = (s.n, s.c_out, out_hw(&s));
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = be.upload(&rng.vec_f32(s.w_len(), -0.5, 0.5)).expect("w");
        let g = be.upload(&rng.vec_f32(c, 0.5, 1.5)).expect("g");
        let b = be.upload(&rng.vec_f32(c, -0.5, 0.5)).expect("b");
        let rm0 = rng.vec_f32(c, -0.2, 0.2);
        let rv0 = rng.vec_f32(c, 0.5, 2.0);
        let r = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let (xb, rb) = (be.upload(&x).expect("x"), be.upload(&r).expect("r"));
        let xn = be.upload(&nhwc(&x, n, s.c_in, s.h * s.w)).expect("x nhwc");
        let rn = be.upload(&nhwc(&r, n, c, ohw)).expect("r nhwc");
        for (residual, relu) in [(false, true), (true, true), (true, false), (false, false)] {
            // [rm, rv, mean, invstd, z, y] of one run.
            let run = |channels_last: bool| -> [Vec<f32>; 6] {
                let mut rm = be.upload(&rm0).expect("rm");
                let mut rv = be.upload(&rv0).expect("rv");
                let mut sm = be.upload(&vec![f32::NAN; c]).expect("sm");
                let mut si = be.upload(&vec![f32::NAN; c]).expect("si");
                let mut z = be.upload(&vec![f32::NAN; s.y_len()]).expect("z");
                let mut y = be.upload(&vec![f32::NAN; s.y_len()]).expect("y");
                let op = if channels_last {
                    Cpu::conv2d_bn_train_fwd_nhwc
                } else {
                    Cpu::conv2d_bn_train_fwd
                };
                let (xx, rr) = if channels_last {
                    (&xn, &rn)
                } else {
                    (&xb, &rb)
                };
                op(
                    &be,
                    &s,
                    &bn,
                    xx,
                    &w,
                    &g,
                    &b,
                    &mut rm,
                    &mut rv,
                    &mut sm,
                    &mut si,
                    &mut z,
                    &mut y,
                    residual.then_some(rr),
                    relu,
                )
                .expect("train fwd");
                [rm, rv, sm, si, z, y]
            };
            let [rm, rv, sm, si, z, y] = run(false);
            let [rm2, rv2, sm2, si2, z2, y2] = run(true);
            let what = format!("{s:?} residual {residual} relu {relu}");
            assert_eq!(bits(&rm2), bits(&rm), "{what}: running mean");
            assert_eq!(bits(&rv2), bits(&rv), "{what}: running var");
            assert_eq!(bits(&sm2), bits(&sm), "{what}: saved mean");
            assert_eq!(bits(&si2), bits(&si), "{what}: saved invstd");
            assert_eq!(bits(&z2), bits(&nhwc(&z, n, c, ohw)), "{what}: z");
            assert_eq!(bits(&y2), bits(&nhwc(&y, n, c, ohw)), "{what}: y");
        }
        // The NCHW op's checks: a short z, a residual of x's length; nothing written.
        let mut rm = be.upload(&rm0).expect("rm");
        let mut rv = be.upload(&rv0).expect("rv");
        let mut sm = be.zeros(c).expect("sm");
        let mut si = be.zeros(c).expect("si");
        let mut short = be.upload(&vec![7.0; s.y_len() - 1]).expect("z");
        let mut y = be.upload(&vec![7.0; s.y_len()]).expect("y");
        let e = be
            .conv2d_bn_train_fwd_nhwc(
                &s, &bn, &xn, &w, &g, &b, &mut rm, &mut rv, &mut sm, &mut si, &mut short, &mut y,
                None, true,
            )
            .unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        let mut z = be.upload(&vec![7.0; s.y_len()]).expect("z");
        if s.x_len() != s.y_len() {
            let e = be
                .conv2d_bn_train_fwd_nhwc(
                    &s,
                    &bn,
                    &xn,
                    &w,
                    &g,
                    &b,
                    &mut rm,
                    &mut rv,
                    &mut sm,
                    &mut si,
                    &mut z,
                    &mut y,
                    Some(&xn),
                    true,
                )
                .unwrap_err();
            assert!(e.to_string().contains("residual"), "{e}");
        }
        assert!(
            z.iter().chain(y.iter()).all(|&v| v == 7.0),
            "a refused op wrote"
        );
        assert_eq!(bits(&rm), bits(&rm0), "a refused op moved the running mean");
    }
}

#[test]
fn batchnorm_bwd_nhwc_is_the_nchw_op_bit_for_bit() {
    let be = Cpu::new();
    let mut rng = SplitMix64::fresh("nhwc-bn-bwd");
    for (n, c, hw) in [
        (2usize, 5usize, 63usize),
        (3, 1, 7),
        (1, 33, 1),
        (4, 16, 30),
    ] {
        let s = BatchNorm2d {
            n,
            c,
            hw,
            eps: 1e-5,
            momentum: 0.1,
        };
        let x = rng.vec_f32(s.len(), -2.0, 2.0);
        // y with about half its values clipped (a ReLU's output) so the mask matters.
        let y: Vec<f32> = rng
            .vec_f32(s.len(), -1.0, 1.0)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        let dy = rng.vec_f32(s.len(), -1.0, 1.0);
        let g = be.upload(&rng.vec_f32(c, 0.5, 1.5)).expect("g");
        let sm = be.upload(&rng.vec_f32(c, -0.3, 0.3)).expect("sm");
        let si = be.upload(&rng.vec_f32(c, 0.5, 2.0)).expect("si");
        let up = |v: &[f32]| be.upload(v).expect("up");
        let t = |v: &[f32]| up(&nhwc(v, n, c, hw));
        for relu in [false, true] {
            let mut dx = up(&vec![f32::NAN; s.len()]);
            let mut dg = up(&vec![f32::NAN; c]);
            let mut db = up(&vec![f32::NAN; c]);
            be.batchnorm_bwd(
                &s,
                &up(&x),
                &up(&y),
                &up(&dy),
                &g,
                &sm,
                &si,
                &mut dx,
                &mut dg,
                &mut db,
                relu,
            )
            .expect("nchw");
            let mut dx2 = up(&vec![f32::NAN; s.len()]);
            let mut dg2 = up(&vec![f32::NAN; c]);
            let mut db2 = up(&vec![f32::NAN; c]);
            be.batchnorm_bwd_nhwc(
                &s,
                &t(&x),
                &t(&y),
                &t(&dy),
                &g,
                &sm,
                &si,
                &mut dx2,
                &mut dg2,
                &mut db2,
                relu,
            )
            .expect("nhwc");
            let what = format!("{s:?} relu {relu}");
            assert_eq!(bits(&dx2), bits(&nhwc(&dx, n, c, hw)), "{what}: dx");
            assert_eq!(bits(&dg2), bits(&dg), "{what}: dgamma");
            assert_eq!(bits(&db2), bits(&db), "{what}: dbeta");
        }
        // A short dy: refused, nothing written.
        let mut dx = up(&vec![7.0; s.len()]);
        let mut dg = up(&vec![7.0; c]);
        let mut db = up(&vec![7.0; c]);
        let e = be
            .batchnorm_bwd_nhwc(
                &s,
                &t(&x),
                &t(&y),
                &up(&dy[1..]),
                &g,
                &sm,
                &si,
                &mut dx,
                &mut dg,
                &mut db,
                true,
            )
            .unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        assert!(dx.iter().chain(&dg).chain(&db).all(|&v| v == 7.0));
    }
}

#[test]
fn conv_gradients_nhwc_are_the_nchw_ops_bit_for_bit() {
    let be = Cpu::new();
    let mut rng = SplitMix64::fresh("nhwc-conv-bwd");
    for s in shapes() {
        let (n, ohw, hw) = (s.n, out_hw(&s), s.h * s.w);
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let w = be.upload(&rng.vec_f32(s.w_len(), -0.5, 0.5)).expect("w");
        let up = |v: &[f32]| be.upload(v).expect("up");
        let (xn, dyn_) = (
            up(&nhwc(&x, n, s.c_in, hw)),
            up(&nhwc(&dy, n, s.c_out, ohw)),
        );
        // Data gradient.
        let mut dx = up(&vec![f32::NAN; s.x_len()]);
        be.conv2d_bwd_data(&s, &up(&dy), &w, &mut dx)
            .expect("nchw data");
        let mut dx2 = up(&vec![f32::NAN; s.x_len()]);
        be.conv2d_bwd_data_nhwc(&s, &dyn_, &w, &mut dx2)
            .expect("nhwc data");
        assert_eq!(bits(&dx2), bits(&nhwc(&dx, n, s.c_in, hw)), "{s:?}: dx");
        // Weight gradient (OIHW either way).
        let mut dw = up(&vec![f32::NAN; s.w_len()]);
        be.conv2d_bwd_weight(&s, &up(&x), &up(&dy), &mut dw)
            .expect("nchw weight");
        let mut dw2 = up(&vec![f32::NAN; s.w_len()]);
        be.conv2d_bwd_weight_nhwc(&s, &xn, &dyn_, &mut dw2)
            .expect("nhwc weight");
        assert_eq!(bits(&dw2), bits(&dw), "{s:?}: dw");
        // Their checks.
        let mut short = up(&vec![7.0; s.x_len() - 1]);
        let e = be
            .conv2d_bwd_data_nhwc(&s, &dyn_, &w, &mut short)
            .unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        let mut dw3 = up(&vec![7.0; s.w_len()]);
        let e = be
            .conv2d_bwd_weight_nhwc(&s, &dyn_, &xn, &mut dw3)
            .unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        assert!(short.iter().chain(&dw3).all(|&v| v == 7.0));
    }
}

/// Everything a training step leaves: every tensor (parameters and running statistics)
/// and every gradient, by name, as bits.
fn state(net: &IchNet<Cpu>) -> Vec<(String, Vec<u32>, Option<Vec<u32>>)> {
    net.names()
        .into_iter()
        .map(|name| {
            let p = bits(&net.param(&name).expect("param"));
            let g = net.grad(&name).ok().map(|g| bits(&g));
            (name, p, g)
        })
        .collect()
}

#[test]
fn channels_last_train_step_is_bit_identical_to_nchw() {
    let (batch, seq, h, w) = (2, 3, 45, 38);
    let n = batch * seq;
    let mut rng = SplitMix64::fresh("nhwc-train-step");
    for cfg in common::nhwc::eval_configs()
        .into_iter()
        .chain([ModelConfig {
            layers: vec![1, 2],
            ..ModelConfig::tiny()
        }])
    {
        let what = format!("{:?} {:?}", cfg.block, cfg.layers);
        let mut nets = [false, true].map(|cl| {
            let be = Cpu::new().with_channels_last_train(cl);
            assert_eq!(be.channels_last_train(), cl);
            IchNet::new(be, cfg.clone(), 11).expect("net")
        });
        let opt = OptimizerConfig::adam(1e-2);
        for step in 0..3 {
            let x = rng.vec_f32(n * cfg.in_channels * h * w, -1.0, 1.0);
            let labels: Vec<f32> = (0..n).map(|i| ((i + step) % 2) as f32).collect();
            let [a, b] = &mut nets;
            let sa = a
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("nchw step");
            let sb = b
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("nhwc step");
            assert_eq!(a.train_channels_last(), Some(false), "{what}");
            assert_eq!(b.train_channels_last(), Some(true), "{what}");
            assert_eq!(
                sa.loss.to_bits(),
                sb.loss.to_bits(),
                "{what} step {step}: loss"
            );
            assert_eq!(sa.logits, sb.logits, "{what} step {step}: logits");
            let (ta, tb) = (state(a), state(b));
            assert_eq!(ta.len(), tb.len());
            let mut grads = 0;
            for ((name, pa, ga), (_, pb, gb)) in ta.iter().zip(&tb) {
                assert_eq!(pa, pb, "{what} step {step}: {name}");
                assert_eq!(ga, gb, "{what} step {step}: gradient of {name}");
                grads += usize::from(ga.as_ref().is_some_and(|g| g.iter().any(|&v| v != 0)));
            }
            assert!(grads > 10, "{what}: only {grads} nonzero gradients");
            a.step(&opt, ParamGroup::Stage1).expect("step");
            b.step(&opt, ParamGroup::Stage1).expect("step");
        }
        // The running statistics moved (the comparison above is not of initial values).
        let rv = nets[1]
            .param("layer1.0.bn1.running_var")
            .expect("running var");
        assert!(
            rv.iter().any(|&v| v != 1.0),
            "{what}: running var never moved"
        );
        // Forward only: batch statistics through the training activations, then eval mode.
        let x = rng.vec_f32(n * cfg.in_channels * h * w, -1.0, 1.0);
        for train in [true, false] {
            let [a, b] = &mut nets;
            a.set_train(train);
            b.set_train(train);
            let la = a.stage1_logits(&x, batch, seq, h, w).expect("logits");
            let lb = b.stage1_logits(&x, batch, seq, h, w).expect("logits");
            assert_eq!(la, lb, "{what}: stage-1 logits, batch statistics {train}");
        }
        assert_eq!(
            state(&nets[0]),
            state(&nets[1]),
            "{what}: after forward passes"
        );
    }
}

/// `ichcam bench --what train-step --json` on `device` with `--layout layout`, tiny and
/// short: (the JSON line's `layout`, stderr); on the CPU its memory fields checked.
fn bench_layout(device: &str, layout: &str) -> (String, String) {
    let out = common::bin()
        .args([
            "bench",
            "--device",
            device,
            "--what",
            "train-step",
            "--config",
            "tiny",
        ])
        .args([
            "--batch", "1", "--slices", "2", "--size", "32", "--iters", "1",
        ])
        .args(["--warmup", "0", "--json", "--layout", layout])
        .output()
        .expect("running ichcam bench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "bench failed: {stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"));
    let j: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(j["what"], "train-step", "{line}");
    let layout = j["layout"].as_str().unwrap_or("none").to_string();
    // The training memory fields: the backbone's buffers as built, what the config counts
    // for all of training, in the layout it ran in (the preset's model at 1x2 slices 32^2).
    if device == "cpu" {
        use ichcam::model::memory::{train_backbone_slots, training_bytes_in, ActLayout};
        let cfg = ichcam::train::TrainConfig::tiny().model;
        let mib = |b: u128| b as f64 / (1u64 << 20) as f64;
        let lay = ActLayout::Nchw;
        let bb = train_backbone_slots(&cfg, 2, 32, 32, lay).expect("count");
        let all = training_bytes_in(&cfg, 1, 2, 32, 4, lay).expect("count");
        let (got_bb, got_all) = (j["train_bb_mb"].as_f64(), j["train_plan_mb"].as_f64());
        assert_eq!(got_bb, Some(mib(bb.total().expect("total") * 4)), "{line}");
        assert_eq!(got_all, Some(mib(all)), "{line}");
        assert!(got_bb < got_all, "{line}");
    }
    (layout, stderr)
}

#[test]
fn cpu_bench_train_step_says_it_trains_nchw() {
    let (layout, stderr) = bench_layout("cpu", "nhwc");
    assert_eq!(layout, "nchw");
    assert!(
        stderr.contains("--layout nhwc is a CUDA setting"),
        "{stderr}"
    );
}
