//! The channels-last eval-mode backbone (issue 14) on the CPU reference:
//! - the layout changes (`nchw_to_nhwc`, `nhwc_to_nchw`) against a naive host transpose,
//!   their round trip exact, on odd sizes, one channel, one pixel and an empty batch; wrong
//!   lengths (and a size that overflows) are `EngineError::Shape`, the output untouched;
//! - `conv2d_bn_eval_fwd_nhwc` (the trait's default: transposes around the NCHW op) is the
//!   NCHW op on transposed buffers bit for bit, with and without residual and ReLU, stride 1
//!   and 2, and checks its lengths as the NCHW op does;
//! - a model whose backend asks for a channels-last eval backbone
//!   (`CpuBackend::with_channels_last_eval`) gives bit-identical features, pooled features,
//!   logits, CAMs (vanilla and Grad-CAM, feature resolution, upsampled, normalised), stage-1
//!   logits and every output of the CAM pass, whole and in chunks, to the NCHW model, after
//!   running statistics moved by a training step (the same in both layouts: training is NCHW).

mod common;
use common::rng::SplitMix64;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::shapes::Transpose;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, EngineError};
use ichcam::model::{CamChunking, CamKind, IchNet, ModelConfig};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits64(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `[n, rows, cols]` -> `[n, cols, rows]`, the obvious way.
fn naive(n: usize, rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for i in 0..n {
        for r in 0..rows {
            for c in 0..cols {
                y[(i * cols + c) * rows + r] = x[(i * rows + r) * cols + c];
            }
        }
    }
    y
}

#[test]
fn transposes_match_a_naive_one_and_round_trip() {
    let be = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("nhwc-transpose");
    // (n, c, hw): odd sizes across the 32-row blocks, one channel, one pixel, nothing.
    for (n, c, hw) in [
        (2usize, 3usize, 5usize),
        (3, 64, 33 * 31),
        (1, 1, 70),
        (2, 70, 1),
        (1, 257, 65),
        (0, 4, 9),
        (2, 0, 9),
    ] {
        let t = Transpose { n, c, hw };
        let x = rng.vec_f32(n * c * hw, -1.0, 1.0);
        let xb = be.upload(&x).expect("up");
        let mut y = be.zeros(x.len()).expect("zeros");
        be.nchw_to_nhwc(&t, &xb, &mut y).expect("to nhwc");
        assert_eq!(bits(&y), bits(&naive(n, c, hw, &x)), "{t:?} to NHWC");
        let mut back = be.zeros(x.len()).expect("zeros");
        be.nhwc_to_nchw(&t, &y, &mut back).expect("to nchw");
        assert_eq!(bits(&back), bits(&x), "{t:?} round trip");
        // NHWC to NCHW of a buffer read as [n, hw, c] is the naive transpose of that.
        let mut z = be.zeros(x.len()).expect("zeros");
        be.nhwc_to_nchw(&t, &xb, &mut z).expect("to nchw");
        assert_eq!(bits(&z), bits(&naive(n, hw, c, &x)), "{t:?} to NCHW");
    }
}

#[test]
fn transposes_refuse_wrong_lengths() {
    let be = CpuBackend::<f32>::new();
    let t = Transpose { n: 2, c: 3, hw: 4 };
    let x = be.upload(&[1.0; 24]).expect("up");
    let short = be.upload(&[1.0; 23]).expect("up");
    let mut y = be.upload(&[7.0; 24]).expect("up");
    let mut long = be.upload(&[7.0; 25]).expect("up");
    let shape = |r: Result<(), EngineError>, what: &str| match r {
        Err(EngineError::Shape { op, detail }) => {
            assert!(op.starts_with("n"), "{what}: {op}");
            detail
        }
        other => panic!("{what}: expected a shape error, got {other:?}"),
    };
    let d = shape(be.nchw_to_nhwc(&t, &short, &mut y), "short x");
    assert!(d.contains("x has 23 elements, expected 24"), "{d}");
    let d = shape(be.nhwc_to_nchw(&t, &x, &mut long), "long y");
    assert!(d.contains("y has 25 elements, expected 24"), "{d}");
    let huge = Transpose {
        n: usize::MAX,
        c: 2,
        hw: 2,
    };
    let d = shape(be.nchw_to_nhwc(&huge, &x, &mut y), "overflow");
    assert!(d.contains("overflow"), "{d}");
    assert!(y.iter().all(|&v| v == 7.0), "a refused op wrote its output");
}

/// `[n, c, h, w]` values to `[n, h, w, c]` on the host.
fn to_nhwc(n: usize, c: usize, hw: usize, x: &[f32]) -> Vec<f32> {
    naive(n, c, hw, x)
}

#[test]
fn default_nhwc_unit_is_the_nchw_op_bit_for_bit() {
    let be = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("nhwc-unit");
    for (n, c_in, h, w, c_out, k, stride) in [
        (2usize, 5usize, 9usize, 7usize, 6usize, 3usize, 1usize),
        (1, 8, 13, 11, 16, 3, 2),
        (3, 4, 6, 6, 12, 1, 2),
        (2, 3, 10, 9, 4, 7, 2),
    ] {
        let s = Conv2d {
            n,
            c_in,
            h,
            w,
            c_out,
            kh: k,
            kw: k,
            stride,
            pad: k / 2,
        };
        let (oh, ow) = (s.out_h(), s.out_w());
        let bn = BatchNorm2d {
            n,
            c: c_out,
            hw: oh * ow,
            eps: 1e-5,
            momentum: 0.1,
        };
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let wt = be.upload(&rng.vec_f32(s.w_len(), -0.5, 0.5)).expect("w");
        let g = be.upload(&rng.vec_f32(c_out, 0.5, 1.5)).expect("g");
        let b = be.upload(&rng.vec_f32(c_out, -0.5, 0.5)).expect("b");
        let rm = be.upload(&rng.vec_f32(c_out, -0.2, 0.2)).expect("rm");
        let rv = be.upload(&rng.vec_f32(c_out, 0.5, 2.0)).expect("rv");
        let r = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let (xb, rb) = (be.upload(&x).expect("x"), be.upload(&r).expect("r"));
        let xn = be.upload(&to_nhwc(n, c_in, h * w, &x)).expect("x nhwc");
        let rn = be.upload(&to_nhwc(n, c_out, oh * ow, &r)).expect("r nhwc");
        for (residual, relu) in [(false, true), (true, true), (true, false), (false, false)] {
            let mut want = be.zeros(s.y_len()).expect("y");
            be.conv2d_bn_eval_fwd(
                &s,
                &bn,
                &xb,
                &wt,
                &g,
                &b,
                &rm,
                &rv,
                residual.then_some(&rb),
                relu,
                &mut want,
            )
            .expect("nchw");
            let mut got = be.upload(&vec![f32::NAN; s.y_len()]).expect("y");
            be.conv2d_bn_eval_fwd_nhwc(
                &s,
                &bn,
                &xn,
                &wt,
                &g,
                &b,
                &rm,
                &rv,
                residual.then_some(&rn),
                relu,
                &mut got,
            )
            .expect("nhwc");
            assert_eq!(
                bits(&got),
                bits(&to_nhwc(n, c_out, oh * ow, &want)),
                "{s:?} residual {residual} relu {relu}"
            );
        }
        // The checks of the NCHW op.
        let mut short = be.zeros(s.y_len() - 1).expect("y");
        let e = be
            .conv2d_bn_eval_fwd_nhwc(&s, &bn, &xn, &wt, &g, &b, &rm, &rv, None, true, &mut short)
            .unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        let mut y = be.zeros(s.y_len()).expect("y");
        let e = be
            .conv2d_bn_eval_fwd_nhwc(&s, &bn, &xn, &wt, &g, &b, &rm, &rv, Some(&xn), true, &mut y)
            .unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
    }
}

/// An NCHW and a channels-last model of `cfg` with the same weights and running statistics
/// moved away from 0 and 1 by the same training step.
fn pair(
    cfg: &ModelConfig,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
) -> [IchNet<CpuBackend<f32>>; 2] {
    let labels: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
    [false, true].map(|cl| {
        let be = CpuBackend::<f32>::new().with_channels_last_eval(cl);
        let mut net = IchNet::new(be, cfg.clone(), 5).expect("net");
        net.stage1_forward_backward(x, &labels, 1, n, h, w, 1.0)
            .expect("a training step");
        net
    })
}

/// (logits, CAM, normalised CAM, whether channels-last) of a CAM pass, as bits.
fn cam_pass(
    net: &mut IchNet<CpuBackend<f32>>,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
) -> (Vec<u32>, Vec<u32>, Vec<u32>, bool) {
    let xb = net.backend().upload(x).expect("upload");
    let mut bufs = None;
    net.stage2_cam_pass(&xb, n, h, w, &mut bufs).expect("pass");
    let b = bufs.expect("bufs");
    let d = |v| bits(&net.backend().download(v).expect("download"));
    (d(&b.logits), d(&b.cam), d(&b.norm), b.channels_last())
}

#[test]
fn channels_last_model_is_bit_identical_to_nchw() {
    let (n, h, w) = (5, 52, 44);
    let mut rng = SplitMix64::fresh("nhwc-model");
    let x = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let x2 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    for cfg in common::nhwc::eval_configs() {
        let [mut a, mut b] = pair(&cfg, &x2, n, h, w);
        let what = format!("{:?} {:?}", cfg.block, cfg.layers);
        // Features (and through them the pooled features) of the eval-mode backbone.
        let (fa, fb) = (
            a.stage2_features(&x, n, h, w).expect("features"),
            b.stage2_features(&x, n, h, w).expect("features"),
        );
        assert_eq!((fa.c, fa.h, fa.w), (fb.c, fb.h, fb.w));
        assert_eq!(bits64(&fa.data), bits64(&fb.data), "{what}: features");
        // Stage-2 inference, both CAMs.
        for kind in [CamKind::Vanilla, CamKind::GradCam] {
            let (oa, ob) = (
                a.stage2_infer(&x, n, h, w, kind).expect("infer"),
                b.stage2_infer(&x, n, h, w, kind).expect("infer"),
            );
            for (name, va, vb) in [
                ("logits", &oa.logits, &ob.logits),
                ("cam", &oa.cam, &ob.cam),
                ("cam_up", &oa.cam_up, &ob.cam_up),
                ("cam_norm", &oa.cam_norm, &ob.cam_norm),
            ] {
                assert_eq!(bits64(va), bits64(vb), "{what} {kind:?} {name}");
            }
        }
        // Stage 1 in eval mode (the backbone on every slice, then the LSTM).
        assert_eq!(
            bits64(&a.stage1_logits(&x, 1, n, h, w).expect("s1")),
            bits64(&b.stage1_logits(&x, 1, n, h, w).expect("s1")),
            "{what}: stage-1 logits"
        );
        // The CAM pass, whole and in chunks (5 = 2 + 2 + 1), after another input.
        for chunk in [n, 2] {
            a.set_cam_chunking(CamChunking::Slices(chunk));
            b.set_cam_chunking(CamChunking::Slices(chunk));
            let ra = cam_pass(&mut a, &x, n, h, w);
            cam_pass(&mut b, &x2, n, h, w);
            let rb = cam_pass(&mut b, &x, n, h, w);
            assert!(!ra.3 && rb.3, "{what}: layouts {} {}", ra.3, rb.3);
            assert_eq!(ra.0, rb.0, "{what}: logits, chunks of {chunk}");
            assert_eq!(ra.1, rb.1, "{what}: CAM, chunks of {chunk}");
            assert_eq!(ra.2, rb.2, "{what}: normalised CAM, chunks of {chunk}");
        }
    }
}
