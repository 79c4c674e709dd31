//! Test-time memory of the eval-mode backbone (its activation plan) and the CAM pass split
//! into chunks of slices, on the CPU backend:
//! - the CAM pass split into chunks (1, 2, 3, 4 slices of 7: even, short last chunks) gives
//!   bit-identical logits, feature-resolution CAM and normalised CAM to the pass in one
//!   chunk, and its logits and CAM are those of `stage2_cam` (the unfused path);
//! - a pass after another input and a chunk change gives the same answers (nothing left over
//!   in the reused buffers leaks into a result);
//! - the default budget splits the paper's CAM pass (ResNet-101, 32 slices of 512^2) so
//!   that its counted bytes stay under issue 14's 0.8 GB, and leaves a pass that fits whole
//!   unsplit, and takes chunks at least as large as when a built model held a gradient
//!   buffer per trainable; the figures before and after the plan, and with and without the
//!   gradient buffers, are printed (`--nocapture`);
//! - training is untouched by eval passes: steps with eval passes between them give
//!   bit-identical losses, logits, parameters and gradients to the same steps without;
//! - channels-last (a backend that asks for it, `CpuBackend::with_channels_last_eval`): the
//!   eval backbone and the CAM pass, split or not, hold what `memory` counts for that layout,
//!   and the budget's chunk is counted in it; for the paper and small presets the layout
//!   changes add at most a buffer of the max-pool's output and one of the features to the
//!   plan, the default budget still splits the paper's pass under 0.8 GB, and the figures of
//!   both layouts are printed with the NCHW temporaries the default channels-last unit keeps
//!   in a backend's arena (not counted by `memory`; `--nocapture`);
//! - bf16 storage of the channels-last activations: on the CPU reference (a slot per value,
//!   `CpuBackend::with_eval_storage`) the passes hold what `memory` counts for that
//!   (`ActLayout::Nhwc`, as f32); packed two per slot as CUDA stores them
//!   (`ActLayout::NhwcBf16`, what tests/cuda_eval_nhwc.rs compares with a built CUDA pass)
//!   the presets' eval plans shrink (by a fifth to a quarter: the NCHW stem, max-pool and
//!   features stay f32 in buffers of their own lengths), the default budget's chunks grow
//!   for the paper's pass, which stays under 0.8 GB, and the figures are printed.

mod common;
use common::rng::SplitMix64;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{ActStorage, Backend};
use ichcam::model::eval_plan::{PlanOp, Src};
use ichcam::model::memory::{
    backbone_activations, cam_pass_activations, cam_pass_bytes, cam_pass_chunk, eval_activations,
    eval_ops, param_bytes, param_counts, ActLayout,
};
use ichcam::model::{
    BlockKind, CamChunking, CamKind, IchNet, ModelConfig, OptimizerConfig, ParamGroup,
    CAM_PASS_BUDGET,
};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bottleneck() -> ModelConfig {
    ModelConfig {
        block: BlockKind::Bottleneck,
        layers: vec![2, 1, 2],
        base_width: 4,
        ..ModelConfig::tiny()
    }
}

/// (logits, CAM, normalised CAM) of a CAM pass, as bits.
type Outs = (Vec<u32>, Vec<u32>, Vec<u32>);

fn cam_pass(net: &mut IchNet<CpuBackend<f32>>, x: &[f32], n: usize, h: usize, w: usize) -> Outs {
    let xb = net.backend().upload(x).expect("upload");
    let mut bufs = None;
    net.stage2_cam_pass(&xb, n, h, w, &mut bufs).expect("pass");
    let b = bufs.expect("bufs");
    let d = |v| bits(&net.backend().download(v).expect("download"));
    (d(&b.logits), d(&b.cam), d(&b.norm))
}

#[test]
fn chunked_cam_pass_is_bit_identical_to_one_chunk() {
    let (n, h, w) = (7, 52, 44);
    let mut rng = SplitMix64::fresh("eval-memory-chunks");
    let x = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let x2 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    for cfg in [bottleneck(), ModelConfig::tiny()] {
        let mut net = IchNet::new(CpuBackend::<f32>::new(), cfg.clone(), 5).expect("net");
        // Running statistics away from 0 and 1 (eval mode uses them).
        let labels = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        net.stage1_forward_backward(&x2, &labels, 1, n, h, w, 1.0)
            .expect("a training step");
        net.set_cam_chunking(CamChunking::Slices(n));
        assert_eq!(net.cam_chunk(n, h, w), n);
        let whole = cam_pass(&mut net, &x, n, h, w);
        // The unfused path agrees on the logits and the feature-resolution CAM.
        let (l, cam, _) = net
            .stage2_cam(&x, n, h, w, CamKind::Vanilla)
            .expect("stage2_cam");
        let f = |v: Vec<f64>| bits(&v.into_iter().map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(f(l), whole.0, "logits vs stage2_cam");
        assert_eq!(f(cam), whole.1, "CAM vs stage2_cam");
        for (slices, chunk) in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (6, 4)] {
            net.set_cam_chunking(CamChunking::Slices(slices));
            // 7 slices: chunks as even as can be (6 -> 4 + 3, 5 -> 4 + 3).
            assert_eq!(net.cam_chunk(n, h, w), chunk);
            // Another input first, through the same buffers.
            cam_pass(&mut net, &x2, n, h, w);
            let got = cam_pass(&mut net, &x, n, h, w);
            assert_eq!(got.0, whole.0, "{:?} logits, chunks of {chunk}", cfg.block);
            assert_eq!(got.1, whole.1, "{:?} CAM, chunks of {chunk}", cfg.block);
            assert_eq!(
                got.2, whole.2,
                "{:?} normalised, chunks of {chunk}",
                cfg.block
            );
        }
    }
}

#[test]
fn a_reused_pass_buffer_after_new_input_gives_the_new_answer() {
    let (n, h, w) = (5, 40, 40);
    let mut rng = SplitMix64::fresh("eval-memory-reuse");
    let x1 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let x2 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let mut a = IchNet::new(CpuBackend::<f32>::new(), bottleneck(), 9).expect("net");
    let mut b = IchNet::new(CpuBackend::<f32>::new(), bottleneck(), 9).expect("net");
    a.set_cam_chunking(CamChunking::Slices(2));
    b.set_cam_chunking(CamChunking::Slices(2));
    let xb1 = a.backend().upload(&x1).expect("up");
    let xb2 = a.backend().upload(&x2).expect("up");
    let mut bufs = None;
    a.stage2_cam_pass(&xb1, n, h, w, &mut bufs).expect("pass");
    a.stage2_cam_pass(&xb2, n, h, w, &mut bufs).expect("pass");
    let bb = bufs.as_ref().expect("bufs");
    let got = bits(&a.backend().download(&bb.norm).expect("down"));
    let fresh = cam_pass(&mut b, &x2, n, h, w);
    assert_eq!(got, fresh.2);
    let first = cam_pass(&mut b, &x1, n, h, w);
    assert_ne!(first.2, fresh.2, "different inputs, different maps");
}

#[test]
fn default_budget_splits_the_paper_cam_pass_under_the_goal() {
    const GB: f64 = 1e9;
    let paper = ModelConfig::resnet101_lstm();
    let small = ModelConfig {
        block: BlockKind::Basic,
        layers: vec![2, 2, 2, 2],
        ..ModelConfig::resnet101_lstm()
    };
    for (name, cfg, n, s) in [
        ("paper", paper, 32usize, 512usize),
        ("small", small, 128, 256),
    ] {
        let before = backbone_activations(&cfg, n, s, s).expect("count").0 * 4;
        let plan = eval_activations(&cfg, n, s, s, ActLayout::Nchw)
            .expect("count")
            .0
            * 4;
        let m = cam_pass_chunk(&cfg, n, s, s, 4, CAM_PASS_BUDGET, ActLayout::Nchw);
        let acts = cam_pass_activations(&cfg, n, s, s, m, ActLayout::Nchw).expect("count") * 4;
        let pass = cam_pass_bytes(&cfg, n, s, s, m, 4, ActLayout::Nchw).expect("count");
        let whole = cam_pass_bytes(&cfg, n, s, s, n, 4, ActLayout::Nchw).expect("count");
        let params = param_bytes(&cfg, 4, false).expect("count");
        // What the pass counted while a built model held a gradient buffer per trainable
        // (before they were allocated on the first training use): the chunk that budget
        // chose.
        let grads = param_counts(&cfg).expect("count").trainable * 4;
        let m_grads = cam_pass_chunk(&cfg, n, s, s, 4, CAM_PASS_BUDGET - grads, ActLayout::Nchw);
        let pass_grads =
            cam_pass_bytes(&cfg, n, s, s, m_grads, 4, ActLayout::Nchw).expect("count") + grads;
        println!(
            "{name}: {n} slices {s}^2 f32: activations one buffer per layer {:.3} GB, eval plan \
             {:.3} GB; CAM pass unsplit {:.3} GB; chunks of {m}: activations {:.3} GB, pass \
             {:.3} GB (parameters {:.3} GB); with gradient buffers ({:.3} GB) the pass took \
             chunks of {m_grads}, {:.3} GB",
            before as f64 / GB,
            plan as f64 / GB,
            whole as f64 / GB,
            acts as f64 / GB,
            pass as f64 / GB,
            params as f64 / GB,
            grads as f64 / GB,
            pass_grads as f64 / GB,
        );
        assert!(m >= m_grads, "{name}: smaller chunks without the gradients");
        assert!(plan * 2 < before, "{name}: the plan saves little");
        assert!(pass <= CAM_PASS_BUDGET || m == 1, "{name}: {pass} bytes");
        if name == "paper" {
            assert!(m < n, "the paper's pass does not fit whole");
            assert!(pass as f64 <= 0.8 * GB, "{pass} bytes");
        }
    }
    // A pass that fits whole is not split.
    let net = IchNet::new(CpuBackend::<f32>::new(), bottleneck(), 1).expect("net");
    assert_eq!(net.cam_chunking(), CamChunking::Budget(CAM_PASS_BUDGET));
    assert_eq!(net.cam_chunk(32, 64, 64), 32);
}

#[test]
fn eval_passes_leave_training_bit_identical() {
    let (batch, seq, h, w) = (1, 4, 36, 36);
    let mut rng = SplitMix64::fresh("eval-memory-train");
    let xs: Vec<Vec<f32>> = (0..3)
        .map(|_| rng.vec_f32(batch * seq * 3 * h * w, -1.0, 1.0))
        .collect();
    let labels = [1.0f32, 0.0, 0.0, 1.0];
    let opt = OptimizerConfig::paper_sgd();
    let run = |evals: bool| {
        let mut net = IchNet::new(CpuBackend::<f32>::new(), bottleneck(), 4).expect("net");
        let mut out = Vec::new();
        for x in &xs {
            net.zero_grads().expect("zero");
            let s = net
                .stage1_forward_backward(x, &labels, batch, seq, h, w, 1.0)
                .expect("step");
            net.step(&opt, ParamGroup::Stage1).expect("sgd");
            out.push((
                s.loss.to_bits(),
                s.logits.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ));
            if evals {
                // Every eval pass, at this shape and at others.
                net.stage1_logits(x, batch, seq, h, w).expect("eval");
                net.stage2_infer(x, seq, h, w, CamKind::GradCam)
                    .expect("infer");
                net.stage2_features(&x[..3 * h * w], 1, h, w)
                    .expect("features");
                let xb = net.backend().upload(x).expect("up");
                let mut bufs = None;
                net.set_cam_chunking(CamChunking::Slices(3));
                net.stage2_cam_pass(&xb, seq, h, w, &mut bufs).expect("cam");
            }
        }
        let state: Vec<(Vec<u32>, Vec<u32>)> = net
            .names()
            .iter()
            .map(|name| {
                let p = bits(&net.param(name).expect("param"));
                let g = net.grad(name).map(|g| bits(&g)).unwrap_or_default();
                (p, g)
            })
            .collect();
        (out, state)
    };
    let (plain, plain_state) = run(false);
    let (mixed, mixed_state) = run(true);
    assert_eq!(plain, mixed, "losses and logits");
    assert!(
        plain_state == mixed_state,
        "parameters, running stats or gradients differ"
    );
}

fn presets() -> [(&'static str, ModelConfig, usize, usize); 2] {
    let small = ModelConfig {
        block: BlockKind::Basic,
        layers: vec![2, 2, 2, 2],
        ..ModelConfig::resnet101_lstm()
    };
    [
        ("paper", ModelConfig::resnet101_lstm(), 32, 512),
        ("small", small, 128, 256),
    ]
}

/// Values the default channels-last unit (`Backend::conv2d_bn_eval_fwd_nhwc`: NCHW
/// temporaries of its input, output and residual) keeps in a backend's arena over the
/// channels-last ops of a pass: the arena keeps its buffers by length, so per length the
/// most that one unit holds at once.
fn default_unit_scratch(ops: &[PlanOp]) -> u128 {
    use std::collections::HashMap;
    let mut most: HashMap<u128, u128> = HashMap::new();
    // The units between the layout changes (ops 3 .. len - 1).
    for op in &ops[3..ops.len() - 1] {
        let Src::Op(k) = op.reads[0] else {
            panic!("a unit reads the pass's input")
        };
        let mut here: HashMap<u128, u128> = HashMap::new();
        *here.entry(ops[k].len).or_default() += 1;
        *here.entry(op.len).or_default() += 1 + u128::from(op.reads.len() == 2);
        for (l, c) in here {
            let e = most.entry(l).or_default();
            *e = (*e).max(c);
        }
    }
    most.iter().map(|(l, c)| l * c).sum()
}

#[test]
fn channels_last_memory_of_the_presets() {
    const GB: f64 = 1e9;
    for (name, cfg, n, s) in presets() {
        let (nchw_ops, (c, fh, fw)) = eval_ops(&cfg, n, s, s, ActLayout::Nchw).expect("ops");
        let (nhwc_ops, _) = eval_ops(&cfg, n, s, s, ActLayout::Nhwc).expect("ops");
        assert_eq!(
            nhwc_ops.len(),
            nchw_ops.len() + 2,
            "{name}: two layout changes"
        );
        let [a, b, bh] =
            ActLayout::ALL.map(|l| eval_activations(&cfg, n, s, s, l).expect("count").0);
        // Each layout change adds at most one buffer of its length (the max-pool's output,
        // the features).
        let (pooled, feats) = (nchw_ops[1].len, n as u128 * c * fh * fw);
        assert!(a <= b && b <= a + pooled + feats, "{name}: {a} -> {b}");
        let [ma, mb, mh] =
            ActLayout::ALL.map(|l| cam_pass_chunk(&cfg, n, s, s, 4, CAM_PASS_BUDGET, l));
        let pass = |m, l| cam_pass_bytes(&cfg, n, s, s, m, 4, l).expect("count");
        let (pa, pb, ph) = (
            pass(ma, ActLayout::Nchw),
            pass(mb, ActLayout::Nhwc),
            pass(mh, ActLayout::NhwcBf16),
        );
        assert!(mb <= ma, "{name}: a larger chunk channels-last");
        assert!(pb <= CAM_PASS_BUDGET || mb == 1, "{name}: {pb} bytes");
        // bf16 storage: the NHWC tensors in half the slots, the stem, the max-pool and the
        // features f32. The plan keeps a buffer per length, so the stem's output (4x a
        // layer-1 tensor of the small preset, as long as one of the paper's), which
        // channels-last f32 shares with later tensors of its length, stays apart: the plans
        // shrink by a fifth to a quarter (paper 2.11 -> 1.59 GB, small 1.29 -> 1.05 GB),
        // not by half. The chunks at least as large, and the pass within the budget.
        assert!(bh < b && 6 * bh < 5 * b, "{name}: {b} -> {bh}");
        assert!(mh >= mb, "{name}: bf16 chunks of {mh}, f32 {mb}");
        assert!(ph <= CAM_PASS_BUDGET || mh == 1, "{name}: {ph} bytes");
        if name == "paper" {
            assert!(pb as f64 <= 0.8 * GB, "{pb} bytes");
            assert!(ph as f64 <= 0.8 * GB, "{ph} bytes");
            assert!(mh > mb, "the paper's bf16 chunks no larger: {mh}");
        }
        // The chunk's NCHW temporaries of the default channels-last unit.
        let (chunk_ops, _) = eval_ops(&cfg, mb, s, s, ActLayout::Nhwc).expect("ops");
        let scratch = default_unit_scratch(&chunk_ops) * 4;
        // CUDA's bf16-storage unit by conversions keeps the same f32 copies (its input,
        // output and residual unpacked), at the bf16 chunk.
        let (chunk_ops_h, _) = eval_ops(&cfg, mh, s, s, ActLayout::Nhwc).expect("ops");
        let scratch_h = default_unit_scratch(&chunk_ops_h) * 4;
        let [ca, cb, ch] = [
            (ma, ActLayout::Nchw),
            (mb, ActLayout::Nhwc),
            (mh, ActLayout::NhwcBf16),
        ]
        .map(|(m, l)| cam_pass_activations(&cfg, n, s, s, m, l).expect("count") * 4);
        println!(
            "{name}: {n} slices {s}^2 f32: eval plan NCHW {:.3} GB, channels-last {:.3} GB \
             (+{:.1} MB); CAM pass at the default budget NCHW chunks of {ma}: activations \
             {:.3} GB, pass {:.3} GB; channels-last chunks of {mb}: activations {:.3} GB, pass \
             {:.3} GB, and the default unit's NCHW temporaries (the arena, not counted) {:.3} GB; \
             bf16 storage: eval plan {:.3} GB, chunks of {mh}: activations {:.3} GB, pass {:.3} GB, \
             the unit by conversions' f32 copies (the arena, not counted) {:.3} GB",
            a as f64 * 4.0 / GB,
            b as f64 * 4.0 / GB,
            (b - a) as f64 * 4.0 / 1e6,
            ca as f64 / GB,
            pa as f64 / GB,
            cb as f64 / GB,
            pb as f64 / GB,
            scratch as f64 / GB,
            bh as f64 * 4.0 / GB,
            ch as f64 / GB,
            ph as f64 / GB,
            scratch_h as f64 / GB,
        );
    }
}

#[test]
fn channels_last_passes_hold_what_memory_counts() {
    let (n, h, w) = (5, 44, 36);
    let mut rng = SplitMix64::fresh("eval-memory-nhwc");
    let x = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    for cfg in [bottleneck(), ModelConfig::tiny()] {
        for (cl, st) in [
            (false, ActStorage::F32),
            (true, ActStorage::F32),
            (true, ActStorage::Bf16),
        ] {
            let be = CpuBackend::<f32>::new()
                .with_channels_last_eval(cl)
                .with_eval_storage(st);
            // The CPU reference's bf16 storage: a slot per value, counted as f32.
            let lay = if cl { ActLayout::Nhwc } else { ActLayout::Nchw };
            let mut net = IchNet::new(be, cfg.clone(), 2).expect("net");
            net.stage2_features(&x, n, h, w).expect("features");
            let xb = net.backend().upload(&x).expect("up");
            for chunk in [n, 2] {
                net.set_cam_chunking(CamChunking::Slices(chunk));
                let mut bufs = None;
                net.stage2_cam_pass(&xb, n, h, w, &mut bufs).expect("pass");
                let b = bufs.expect("bufs");
                assert_eq!(b.channels_last(), cl);
                assert_eq!(b.storage(), if cl { st } else { ActStorage::F32 });
                assert_eq!(b.layout(), lay);
                let want = cam_pass_activations(&cfg, n, h, w, b.chunk, lay).expect("count");
                assert_eq!(
                    b.activation_scalars() as u128,
                    want,
                    "{cl} {st} chunk {chunk}"
                );
            }
            // The budget's chunk is the one counted in this layout.
            let budget = cam_pass_bytes(&cfg, n, h, w, 3, 4, lay).expect("count");
            net.set_cam_chunking(CamChunking::Budget(budget));
            assert_eq!(
                net.cam_chunk(n, h, w),
                cam_pass_chunk(&cfg, n, h, w, 4, budget, lay)
            );
        }
    }
}
