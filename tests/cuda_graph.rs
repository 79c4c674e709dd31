//! CUDA graphs, the buffer arena, pinned uploads and the fused CAM kernel:
//! - capture records without running, replay runs the recorded ops on the captured
//!   buffers, and what a capture cannot hold (a synchronisation, an allocation, a copy to
//!   pageable host memory) is an error that ends the capture and leaves the stream usable;
//! - the whole vanilla-CAM pass (backbone, fc, CAM, resize, min-max) captured as a graph and
//!   replayed gives bit-identical results to the same pass run eagerly, also after new
//!   input is copied into the captured input buffer;
//! - the fused CAM kernel against the CPU reference (`cam_weight`, `upsample_bilinear`,
//!   `minmax_normalize`), outputs poisoned first, `||gpu - cpu|| / ||cpu|| < 1e-5`;
//! - uploads through the double-buffered pinned staging arrive intact even when the host
//!   buffer is overwritten right after the call;
//! - on the emulator, at the driver itself: the capture status, a stream-ordered allocation
//!   refused and the capture invalidated, a copy from page-locked memory recorded and
//!   replayed from that memory's contents at replay time;
//! - whole training steps (stage 1 with Adam and a learning rate that changes every step,
//!   stage 2 with SGD, whose first step differs) replayed from captured graphs give
//!   bit-identical losses, logits, parameters, batch-norm running stats and optimizer state
//!   to the same steps run eagerly from the same initial state; a step with another batch
//!   shape runs eagerly and re-captures; capturing the eager step (which allocates and
//!   synchronises) is an error saying so;
//! - the loss read a step late: steps queued two at a time (step k+1 replayed, overwriting
//!   the graph's loss buffer, before step k's loss is read) give bit-identical losses to the
//!   steps read at once, and a third unread loss is refused; a short `train` (stages 1 and
//!   2) logs bit-identical losses and writes bit-identical parameters with the late
//!   readback as with the immediate one;
//! - the copy stream: on the emulator, whose copies from page-locked memory on a created
//!   stream are deferred until something orders work after them, a consumer that does not
//!   wait for the copy's event reads the old contents and a page-locked source overwritten
//!   before the copy's event completed changes what arrives (so a wrong order fails), while
//!   the engine's uploads (which wait) arrive intact and make the compute stream wait.
//!
//! Runs on a GPU or on the emulated driver (`scripts/cuda-emu.sh test`); without either the
//! tests are reported as ignored (tests/common/cuda.rs).

mod common;
use common::rng::SplitMix64;

use std::sync::OnceLock;

use common::cuda::{device, emulator, Test};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::Backend;
use ichcam::model::{CamKind, CamPassBufs, IchNet, ModelConfig};

fn main() {
    let tests: Vec<Test> = vec![
        device(
            "capture_records_and_replay_runs",
            capture_records_and_replay_runs,
        ),
        device(
            "what_a_capture_cannot_hold_is_an_error",
            what_a_capture_cannot_hold_is_an_error,
        ),
        device(
            "cam_pass_graph_replay_is_bit_identical_to_eager",
            cam_pass_graph_replay_is_bit_identical_to_eager,
        ),
        device("cam_fused_matches_cpu", cam_fused_matches_cpu),
        device("pinned_uploads_arrive_intact", pinned_uploads_arrive_intact),
        emulator(
            "emulator_capture_at_the_driver",
            emulator_capture_at_the_driver,
        ),
        device(
            "train_steps_graph_replay_is_bit_identical_to_eager",
            train_steps_graph_replay_is_bit_identical_to_eager,
        ),
        device(
            "queued_losses_read_a_step_late_are_the_same",
            queued_losses_read_a_step_late_are_the_same,
        ),
        device(
            "train_with_late_loss_readback_is_bit_identical",
            train_with_late_loss_readback_is_bit_identical,
        ),
        device(
            "capturing_an_allocating_or_syncing_step_is_an_error",
            capturing_an_allocating_or_syncing_step_is_an_error,
        ),
        emulator(
            "emulator_copy_stream_order_is_enforced",
            emulator_copy_stream_order_is_enforced,
        ),
    ];
    // One device context shared by all; captures must not interleave.
    common::cuda::main_with_threads(tests, 1)
}

fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    GPU.get_or_init(|| CudaBackend::new(0).expect("the harness found a CUDA device"))
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn capture_records_and_replay_runs() {
    let g = gpu();
    let x = g.upload(&[1.0, 2.0, 3.0, 4.0]).expect("upload");
    let mut y = g.upload(&[10.0, 20.0, 30.0, 40.0]).expect("upload");
    // y = 2y + x, twice per replay.
    let (graph, ()) = g
        .capture(|| {
            for _ in 0..2 {
                g.scale_assign(&mut y, 2.0)?;
                g.add_assign(&mut y, &x)?;
            }
            Ok(())
        })
        .expect("capture");
    assert!(!g.is_capturing());
    assert_eq!(
        g.download(&y).expect("download"),
        [10.0, 20.0, 30.0, 40.0],
        "capturing must not run anything"
    );
    let mut want = [10.0f32, 20.0, 30.0, 40.0];
    for replay in 0..3 {
        graph.replay().expect("replay");
        for _ in 0..2 {
            for (w, xv) in want.iter_mut().zip([1.0f32, 2.0, 3.0, 4.0]) {
                *w = 2.0 * *w + xv;
            }
        }
        assert_eq!(
            g.download(&y).expect("download"),
            want,
            "after replay {replay}"
        );
    }
    // Eager work between replays is ordered with them on the one stream.
    g.fill(&mut y, 1.0).expect("fill");
    graph.replay().expect("replay");
    let got = g.download(&y).expect("download");
    assert_eq!(got, [7.0, 10.0, 13.0, 16.0]);
}

fn what_a_capture_cannot_hold_is_an_error() {
    let g = gpu();
    let mut y = g.upload(&[1.0f32; 8]).expect("upload");
    // An allocation through the backend: refused before the driver sees it.
    let e = g
        .capture(|| g.zeros(16).map(|_| ()))
        .err()
        .expect("an allocation inside a capture must fail");
    assert!(e.to_string().contains("captures a CUDA graph"), "{e}");
    // A synchronisation: the driver refuses it and invalidates the capture.
    let e = g
        .capture(|| {
            g.scale_assign(&mut y, 3.0)?;
            g.synchronize()
        })
        .err()
        .expect("a synchronisation inside a capture must fail");
    assert!(e.to_string().contains("CAPTURE"), "{e}");
    // A copy to pageable host memory (a download).
    let e = g
        .capture(|| g.download(&y).map(|_| ()))
        .err()
        .expect("a download inside a capture must fail");
    assert!(e.to_string().contains("CAPTURE"), "{e}");
    // None of that ran or broke the stream: the captured scale never executed.
    assert!(!g.is_capturing());
    assert_eq!(g.download(&y).expect("download"), [1.0f32; 8]);
    g.scale_assign(&mut y, 2.0)
        .expect("eager op after failed captures");
    assert_eq!(g.download(&y).expect("download"), [2.0f32; 8]);
}

fn tiny_net(be: CudaBackend) -> IchNet<CudaBackend> {
    let cfg = ModelConfig {
        layers: vec![1, 1],
        base_width: 8,
        ..ModelConfig::tiny()
    };
    IchNet::new(be, cfg, 11).expect("net")
}

fn cam_pass_graph_replay_is_bit_identical_to_eager() {
    let g = gpu();
    let mut net = tiny_net(g.clone());
    net.set_train(false);
    let (n, h, w) = (3usize, 64usize, 48usize);
    let mut rng = SplitMix64::fresh("graph-cam");
    let x1 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let x2 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let down = |b: &cudarc::driver::CudaSlice<f32>| g.download(b).expect("download");
    let outs = |b: &CamPassBufs<CudaBackend>| (down(&b.logits), down(&b.cam), down(&b.norm));

    // Eager references, each from its own input buffer and outputs.
    let (xb1, xb2) = (g.upload(&x1).expect("up"), g.upload(&x2).expect("up"));
    let mut eager = None;
    net.stage2_cam_pass(&xb1, n, h, w, &mut eager)
        .expect("eager pass");
    let ref1 = outs(eager.as_ref().expect("bufs"));
    net.stage2_cam_pass(&xb2, n, h, w, &mut eager)
        .expect("eager pass");
    let ref2 = outs(eager.as_ref().expect("bufs"));
    assert_ne!(
        bits(&ref1.2),
        bits(&ref2.2),
        "different inputs, different maps"
    );

    // The fused tail agrees with the separate ops of the unfused path.
    let o = net
        .stage2_infer_device(&xb1, n, h, w, CamKind::Vanilla)
        .expect("unfused");
    let (_, norm) = net.cam_to_input(&o, n, h, w).expect("unfused tail");
    assert_eq!(bits(&down(&o.cam)), bits(&ref1.1), "feature-res CAM");
    assert_eq!(bits(&down(&o.logits)), bits(&ref1.0), "logits");
    let e = rel_err(&down(&norm), &ref1.2);
    assert!(e < 1e-5, "fused vs unfused normalised CAM: rel err {e:.3e}");

    // Capture the pass on a fixed input buffer, with its buffers warm (one eager pass).
    let mut xin = g.upload(&x1).expect("up");
    let mut bufs = None;
    net.stage2_cam_pass(&xin, n, h, w, &mut bufs)
        .expect("warm-up pass");
    {
        let b = bufs.as_mut().expect("bufs");
        for buf in [&mut b.logits, &mut b.cam, &mut b.norm] {
            g.fill(buf, f64::NAN).expect("poison");
        }
    }
    let (graph, ()) = g
        .capture(|| {
            net.stage2_cam_pass(&xin, n, h, w, &mut bufs)
                .map_err(|e| ichcam::engine::EngineError::Param(e.to_string()))
        })
        .expect("capturing the CAM pass (it must allocate nothing once warm)");
    assert!(
        graph.nodes() == 0 || graph.nodes() > 5,
        "{} nodes",
        graph.nodes()
    );
    let b = bufs.as_ref().expect("bufs");
    assert!(
        down(&b.norm).iter().all(|v| v.is_nan()),
        "capturing must not run the pass"
    );
    graph.replay().expect("replay");
    let got1 = outs(b);
    assert_eq!(bits(&got1.0), bits(&ref1.0), "logits, replay on x1");
    assert_eq!(bits(&got1.1), bits(&ref1.1), "CAM, replay on x1");
    assert_eq!(bits(&got1.2), bits(&ref1.2), "normalised CAM, replay on x1");
    // New input into the captured buffer, then replay.
    g.copy(&xb2, &mut xin).expect("copy");
    graph.replay().expect("replay");
    let got2 = outs(bufs.as_ref().expect("bufs"));
    assert_eq!(bits(&got2.0), bits(&ref2.0), "logits, replay on x2");
    assert_eq!(bits(&got2.1), bits(&ref2.1), "CAM, replay on x2");
    assert_eq!(bits(&got2.2), bits(&ref2.2), "normalised CAM, replay on x2");
    drop(graph);
}

fn cam_fused_matches_cpu() {
    let g = gpu();
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("cam-fused");
    // (n, c, fh, fw, oh, ow): x32 as in the model, odd factors, a downsample, and a map too
    // large for the fused kernel's shared memory (the three-kernel path).
    for (n, c, fh, fw, oh, ow) in [
        (2usize, 70usize, 8usize, 8usize, 256usize, 256usize),
        (3, 5, 7, 5, 33, 21),
        (1, 16, 16, 16, 9, 12),
        (4, 3, 2, 1, 5, 5),
        (1, 2, 111, 111, 112, 113),
    ] {
        let f = rng.vec_f32(n * c * fh * fw, 0.0, 2.0);
        let wt = rng.vec_f32(c, -1.0, 1.0);
        let run = |on_gpu: bool| -> (Vec<f32>, Vec<f32>) {
            if on_gpu {
                let (fb, wb) = (g.upload(&f).expect("up"), g.upload(&wt).expect("up"));
                let mut cam = g.upload(&vec![f32::NAN; n * fh * fw]).expect("up");
                let mut norm = g.upload(&vec![f32::NAN; n * oh * ow]).expect("up");
                g.cam_normalized(n, c, fh, fw, oh, ow, &fb, &wb, &mut cam, &mut norm)
                    .expect("cam_normalized");
                (
                    g.download(&cam).expect("down"),
                    g.download(&norm).expect("down"),
                )
            } else {
                let (fb, wb) = (cpu.upload(&f).expect("up"), cpu.upload(&wt).expect("up"));
                let mut cam = vec![f32::NAN; n * fh * fw];
                let mut norm = vec![f32::NAN; n * oh * ow];
                cpu.cam_normalized(n, c, fh, fw, oh, ow, &fb, &wb, &mut cam, &mut norm)
                    .expect("cam_normalized");
                (cam, norm)
            }
        };
        let ((gc, gn), (cc, cn)) = (run(true), run(false));
        let what = format!("n={n} c={c} {fh}x{fw}->{oh}x{ow}");
        let e = rel_err(&gc, &cc);
        assert!(e < 1e-5, "{what}: CAM rel err {e:.3e}");
        let e = rel_err(&gn, &cn);
        assert!(e < 1e-5, "{what}: normalised CAM rel err {e:.3e}");
    }
}

fn pinned_uploads_arrive_intact() {
    let g = gpu();
    // Above and below the staging threshold, several in a row (both staging buffers,
    // then a larger one that replaces a buffer), the host data overwritten at once.
    for len in [100usize, 40_000, 40_000, 300_000, 17, 40_000] {
        let mut host: Vec<f32> = (0..len).map(|i| (i as f32).sin()).collect();
        let want = host.clone();
        let b = g.upload(&host).expect("upload");
        host.iter_mut().for_each(|v| *v = -7.0);
        let got = g.download(&b).expect("download");
        assert_eq!(bits(&got), bits(&want), "upload of {len} values");
    }
}

fn emulator_capture_at_the_driver() {
    use cudarc::driver::sys::{
        CUgraphInstantiate_flags as Flags, CUresult, CUstreamCaptureMode as Mode,
        CUstreamCaptureStatus as Status,
    };
    let g = gpu();
    let st = g.stream();
    st.synchronize().expect("sync");
    // A stream-ordered allocation inside a capture: refused, the capture invalidated
    // (graph memory nodes are not emulated), and ending it says so.
    st.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("begin");
    assert_eq!(
        st.capture_status().expect("status"),
        Status::CU_STREAM_CAPTURE_STATUS_ACTIVE
    );
    // SAFETY: a plain allocation request on a live stream.
    let r = unsafe { cudarc::driver::result::malloc_async(st.cu_stream(), 64) };
    assert_eq!(
        r.err().map(|e| e.0),
        Some(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
    );
    assert_eq!(
        st.capture_status().expect("status"),
        Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED
    );
    let e = st
        .end_capture(Flags(0))
        .err()
        .expect("an invalidated capture");
    assert_eq!(e.0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    assert_eq!(
        st.capture_status().expect("status"),
        Status::CU_STREAM_CAPTURE_STATUS_NONE
    );
    // A copy from page-locked memory is recorded; the replay reads what it holds then.
    let ctx = g.context();
    // SAFETY: written below before any copy reads it.
    let mut pinned = unsafe { ctx.alloc_pinned::<f32>(4) }.expect("pinned");
    pinned
        .as_mut_slice()
        .expect("pinned")
        .copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
    let mut dev = g.upload(&[0.0f32; 4]).expect("upload");
    st.synchronize().expect("sync");
    st.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("begin");
    st.memcpy_htod(&pinned, &mut dev).expect("captured copy");
    let graph = st.end_capture(Flags(0)).expect("end").expect("a graph");
    assert_eq!(
        g.download(&dev).expect("download"),
        [0.0f32; 4],
        "not run yet"
    );
    pinned
        .as_mut_slice()
        .expect("pinned")
        .copy_from_slice(&[5.0, 6.0, 7.0, 8.0]);
    graph.launch().expect("replay");
    assert_eq!(g.download(&dev).expect("download"), [5.0f32, 6.0, 7.0, 8.0]);
}

fn small_cfg() -> ModelConfig {
    ModelConfig {
        layers: vec![1, 1],
        base_width: 4,
        lstm_hidden: 5,
        ..ModelConfig::tiny()
    }
}

fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    r.vec_f32(n, -1.0, 1.0)
}

/// Every tensor (parameters and running stats) and every optimizer state of two nets, bit
/// for bit.
fn assert_same_state(a: &IchNet<CudaBackend>, b: &IchNet<CudaBackend>, what: &str) {
    for name in a.names() {
        let (pa, pb) = (
            a.param(&name).expect("param"),
            b.param(&name).expect("param"),
        );
        assert_eq!(bits(&pa), bits(&pb), "{what}: {name} differs");
        let (sa, sb) = (
            a.opt_state(&name).expect("state"),
            b.opt_state(&name).expect("state"),
        );
        assert_eq!(sa.steps, sb.steps, "{what}: step count of {name}");
        let b2 = |v: &Option<Vec<f32>>| v.as_ref().map(|v| bits(v));
        assert_eq!(b2(&sa.m), b2(&sb.m), "{what}: first moment of {name}");
        assert_eq!(b2(&sa.v), b2(&sb.v), "{what}: second moment of {name}");
    }
}

fn train_steps_graph_replay_is_bit_identical_to_eager() {
    use ichcam::model::net_graph::GraphSteps;
    use ichcam::model::{OptimizerConfig, ParamGroup};
    let g = gpu();
    let mut eager = IchNet::new(g.clone(), small_cfg(), 21).expect("net");
    let mut graphed = IchNet::new(g.clone(), small_cfg(), 21).expect("net");
    let c = small_cfg().in_channels;
    // Stage 1, Adam, a learning rate that changes every step (a schedule): a step count or
    // a learning rate baked into the graph at capture time would differ from step 3 on.
    let mut steps = GraphSteps::default();
    let shapes = [
        (2, 3, 32),
        (2, 3, 32),
        (2, 3, 32),
        (2, 3, 32),
        (1, 3, 32),
        (2, 3, 32),
        (2, 3, 32),
    ];
    for (k, &(batch, seq, size)) in shapes.iter().enumerate() {
        let n = batch * seq;
        let x = randn(100 + k as u64, n * c * size * size);
        let y: Vec<f32> = (0..n).map(|i| ((i + k) % 2) as f32).collect();
        let opt = OptimizerConfig::adam(1e-2 / (1.0 + k as f64));
        eager.zero_grads().expect("zero");
        let want = eager
            .stage1_forward_backward(&x, &y, batch, seq, size, size, 1.5)
            .expect("eager step");
        eager.step(&opt, ParamGroup::Stage1).expect("eager step");
        let got = graphed
            .stage1_step_graphed(&mut steps, &x, &y, batch, seq, size, size, 1.5, &opt)
            .expect("graphed step");
        assert_eq!(
            got.loss.to_bits(),
            want.loss.to_bits(),
            "stage-1 step {k}: loss {} vs {}",
            got.loss,
            want.loss
        );
        assert_eq!(got.logits, want.logits, "stage-1 step {k}: logits");
        if let Some(why) = steps.graph.as_ref().and_then(|t| t.failure()) {
            panic!("stage-1 step {k}: the step was not captured: {why}");
        }
        assert_same_state(&eager, &graphed, &format!("after stage-1 step {k}"));
    }
    // First step eager, second captured and replayed, then replays; the batch of 1 ran
    // eagerly (and prepared a graph for its shape), so did the next 2-batch step (a new
    // shape again), and the one after re-captured.
    let (captures, replays, eagers) = steps.counts();
    assert_eq!(
        (captures, replays, eagers),
        (2, 4, 3),
        "captures, replays, eager steps"
    );
    let nodes = steps.graph.as_ref().map_or(0, |t| t.nodes());
    eprintln!("stage-1 training step graph: {nodes} operations");

    // Stage 2, SGD with momentum (the first step seeds the momentum), the lr changing.
    let mut steps2 = GraphSteps::default();
    for k in 0..4 {
        let (n, size) = (4, 32);
        let x = randn(200 + k as u64, n * c * size * size);
        let y: Vec<f32> = (0..n).map(|i| ((i / 2 + k) % 2) as f32).collect();
        let opt = OptimizerConfig::Sgd {
            lr: 0.05 * (k + 1) as f64,
            momentum: 0.9,
            weight_decay: 1e-4,
        };
        eager.zero_grads().expect("zero");
        let want = eager
            .stage2_forward_backward(&x, &y, n, size, size, 1.0)
            .expect("eager step");
        eager.step(&opt, ParamGroup::Fc).expect("eager step");
        let got = graphed
            .stage2_step_graphed(&mut steps2, &x, &y, n, size, size, 1.0, &opt)
            .expect("graphed step");
        assert_eq!(got.to_bits(), want.to_bits(), "stage-2 step {k}: loss");
        assert_same_state(&eager, &graphed, &format!("after stage-2 step {k}"));
    }
    assert_eq!(steps2.counts(), (1, 3, 1), "captures, replays, eager steps");
}

fn queued_losses_read_a_step_late_are_the_same() {
    use ichcam::model::net_graph::{GraphSteps, StepLoss};
    use ichcam::model::OptimizerConfig;
    let g = gpu();
    let mut now = IchNet::new(g.clone(), small_cfg(), 23).expect("net");
    let mut late = IchNet::new(g.clone(), small_cfg(), 23).expect("net");
    let c = small_cfg().in_channels;
    let (batch, seq, size) = (2, 3, 32);
    let n = batch * seq;
    let data = |k: usize| {
        let x = randn(300 + k as u64, n * c * size * size);
        let y: Vec<f32> = (0..n).map(|i| ((i + k) % 2) as f32).collect();
        (x, y, OptimizerConfig::adam(1e-2 / (1.0 + k as f64)))
    };
    let (mut s_now, mut s_late) = (GraphSteps::default(), GraphSteps::default());
    let mut want = Vec::new();
    let mut got = Vec::new();
    let mut queued: Option<StepLoss> = None;
    let mut kinds = Vec::new();
    for k in 0..6 {
        let (x, y, opt) = data(k);
        want.push(
            now.stage1_step_graphed(&mut s_now, &x, &y, batch, seq, size, size, 1.5, &opt)
                .expect("step")
                .loss,
        );
        let l = late
            .stage1_step_queued(&mut s_late, &x, &y, batch, seq, size, size, 1.5, &opt)
            .expect("queued step");
        kinds.push(matches!(l, StepLoss::Queued(_)));
        // Step k is enqueued (its replay rewrote the graph's loss buffer) before step
        // k-1's loss is read.
        if let Some(p) = queued.replace(l) {
            got.push(s_late.read(p).expect("read"));
        }
    }
    got.push(s_late.read(queued.take().expect("last")).expect("read"));
    // The first step runs eagerly (its loss known at once), the others replay and queue.
    assert_eq!(kinds, [false, true, true, true, true, true], "queued steps");
    let b = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(b(&got), b(&want), "late {got:?} vs immediate {want:?}");
    assert_same_state(&now, &late, "after the queued steps");
    // A slot is not refilled before it is read: a third unread loss is an error.
    let (x, y, opt) = data(7);
    let a = late
        .stage1_step_queued(&mut s_late, &x, &y, batch, seq, size, size, 1.5, &opt)
        .expect("queued");
    let b2 = late
        .stage1_step_queued(&mut s_late, &x, &y, batch, seq, size, size, 1.5, &opt)
        .expect("queued");
    let third = late.stage1_step_queued(&mut s_late, &x, &y, batch, seq, size, size, 1.5, &opt);
    assert!(third.is_err(), "a third unread loss was accepted");
    assert!(s_late.read(a).is_ok() && s_late.read(b2).is_ok());
    assert!(s_late.read(a).is_err(), "a loss read twice");
}

fn train_with_late_loss_readback_is_bit_identical() {
    use ichcam::data::synth::{phantom, plan_positive, SynthConfig};
    use ichcam::model::{BlockKind, OptimizerConfig};
    use ichcam::train::{
        train_with, AugmentConfig, LossReadback, TrainCase, TrainConfig, TrainInput, TrainOptions,
    };
    let (size, slices, n) = (16, 8, 4);
    let synth = SynthConfig {
        size,
        slices,
        clean: false,
    };
    let pos = plan_positive(n, 5);
    let cases: Vec<TrainCase> = (0..n)
        .map(|i| {
            let p = phantom(&synth, 5, i, pos[i]).expect("phantom");
            TrainCase {
                id: format!("{i:03}"),
                patient: format!("p{i:03}"),
                labels: p.slice_labels().iter().map(|&l| l > 0).collect(),
                hu: p.hu,
                spacing: p.spacing,
            }
        })
        .collect();
    let cfg = TrainConfig {
        name: "micro".into(),
        model: ModelConfig {
            block: BlockKind::Basic,
            layers: vec![1, 1],
            base_width: 4,
            lstm_hidden: 5,
            lstm_layers: 1,
            head: vec![4],
            ..ModelConfig::tiny()
        },
        size,
        slices: 4,
        seq_stride: 2,
        batch: 2,
        epochs: 2,
        optimizer: OptimizerConfig::adam(1e-3),
        stage2_batch: 4,
        stage2_epochs: 1,
        stage2_optimizer: OptimizerConfig::Sgd {
            lr: 1e-2,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        val_fraction: 0.25,
        pos_weight_min: 1.0,
        pos_weight_max: 10.0,
        augment: AugmentConfig::paper(),
        input: ichcam::data::InputSpec::default(),
        stage2_pooling: ichcam::train::config::HeadPooling::Mean,
        unet: None,
    };
    let dir = std::env::temp_dir().join(format!("ichcam-late-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = |mode: LossReadback| {
        let model = dir.join(format!("{mode:?}.safetensors"));
        let opts = TrainOptions {
            seed: 3,
            resume: false,
            loss_readback: mode,
            ..TrainOptions::default()
        };
        let r = train_with(
            gpu().clone(),
            TrainInput::Cases(cases.clone()),
            &model,
            &cfg,
            &opts,
        )
        .expect("train");
        let bytes = std::fs::read(&model).expect("model file");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut t: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.data().to_vec()))
            .collect();
        t.sort();
        let losses: Vec<(u8, usize, u64, Option<u64>)> = r
            .log
            .epochs
            .iter()
            .map(|e| {
                (
                    e.stage,
                    e.epoch,
                    e.train_loss.to_bits(),
                    e.val_loss.map(f64::to_bits),
                )
            })
            .collect();
        (losses, t)
    };
    let (late_losses, late_params) = run(LossReadback::Late);
    let (now_losses, now_params) = run(LossReadback::Immediate);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        late_losses.len(),
        3,
        "two stage-1 epochs and one stage-2 epoch logged"
    );
    assert!(late_losses.iter().all(|l| f64::from_bits(l.2).is_finite()));
    assert_eq!(
        late_losses, now_losses,
        "logged losses (stage, epoch, train, val bits)"
    );
    assert_eq!(late_params.len(), now_params.len());
    for ((na, a), (nb, b)) in late_params.iter().zip(&now_params) {
        assert_eq!(na, nb);
        assert!(a == b, "{na}: the late readback's parameters differ");
    }
    let show: Vec<f64> = late_losses.iter().map(|l| f64::from_bits(l.2)).collect();
    eprintln!("train losses (late = immediate readback): {show:?}");
}

fn capturing_an_allocating_or_syncing_step_is_an_error() {
    let g = gpu();
    let mut net = IchNet::new(g.clone(), small_cfg(), 5).expect("net");
    let c = small_cfg().in_channels;
    let x = randn(7, 2 * c * 32 * 32);
    let y = [1.0f32, 0.0];
    net.stage2_forward_backward(&x, &y, 2, 32, 32, 1.0)
        .expect("warm");
    // The eager step uploads its inputs into new buffers: an allocation.
    let e = g
        .capture(|| {
            net.stage2_forward_backward(&x, &y, 2, 32, 32, 1.0)
                .map(|_| ())
                .map_err(|e| ichcam::engine::EngineError::Param(e.to_string()))
        })
        .err()
        .expect("capturing an allocation must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("not permitted while the stream captures a CUDA graph"),
        "{msg}"
    );
    assert!(!g.is_capturing());
    // The eager loss downloads (a synchronisation): the driver refuses it and the capture
    // is invalidated; the error names it.
    let (l, t) = (
        g.upload(&[0.5f32, -1.0]).expect("upload"),
        g.upload(&[1.0f32, 0.0]).expect("upload"),
    );
    let mut dl = g.upload(&[0.0f32, 0.0]).expect("upload");
    let e = g
        .capture(|| g.bce_with_logits(&l, &t, 1.0, &mut dl).map(|_| ()))
        .err()
        .expect("capturing a synchronisation must fail");
    let msg = e.to_string();
    assert!(msg.to_lowercase().contains("capture"), "{msg}");
    // The stream is usable afterwards, and the capturable form works in a graph.
    let mut loss = g.zeros_f64(1).expect("loss");
    let (graph, ()) = g
        .capture(|| g.bce_with_logits_into(&l, &t, 1.0, &mut dl, &mut loss))
        .expect("capturable loss");
    graph.replay().expect("replay");
    let want = g.bce_with_logits(&l, &t, 1.0, &mut dl).expect("eager loss");
    let got = g.stream().clone_dtoh(&loss).expect("download")[0];
    assert_eq!(got.to_bits(), want.to_bits());
}

/// An exported emulator function (emu/driver/api.cpp) on a stream.
fn emu_query(name: &std::ffi::CStr, s: cudarc::driver::sys::CUstream) -> i64 {
    // SAFETY: the emulator's libcuda is loaded (the harness checked); the symbol has this
    // signature there.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!lib.is_null(), "libcuda.so.1 is not loaded");
        let f = libc::dlsym(lib, name.as_ptr());
        assert!(!f.is_null(), "the emulator has no {name:?}");
        let f: extern "C" fn(cudarc::driver::sys::CUstream) -> i64 = std::mem::transmute(f);
        f(s)
    }
}

fn emulator_copy_stream_order_is_enforced() {
    let g = gpu();
    let ctx = g.context();
    let compute = g.stream();
    let side = ctx.new_stream().expect("stream");
    // SAFETY: written below before any copy reads it.
    let mut pinned = unsafe { ctx.alloc_pinned::<f32>(4) }.expect("pinned");
    pinned
        .as_mut_slice()
        .expect("pinned")
        .copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
    let mut dev = g.upload(&[0.0f32; 4]).expect("upload");
    g.synchronize().expect("sync");
    // A copy on another stream that nobody waits for: the compute stream reads the old data.
    side.memcpy_htod(&pinned, &mut dev).expect("copy");
    assert_eq!(emu_query(c"emuStreamPending", side.cu_stream()), 1);
    assert_eq!(
        g.download(&dev).expect("download"),
        [0.0f32; 4],
        "a consumer that does not wait for the copy's event must not see the data"
    );
    // Overwriting the page-locked source before the copy's event completed changes what
    // arrives: a staging buffer reused too early shows.
    pinned
        .as_mut_slice()
        .expect("pinned")
        .copy_from_slice(&[5.0, 6.0, 7.0, 8.0]);
    let ev = side.record_event(None).expect("event");
    let waits = emu_query(c"emuStreamWaits", compute.cu_stream());
    compute.wait(&ev).expect("wait");
    assert_eq!(emu_query(c"emuStreamWaits", compute.cu_stream()), waits + 1);
    assert_eq!(emu_query(c"emuStreamPending", side.cu_stream()), 0);
    assert_eq!(g.download(&dev).expect("download"), [5.0f32, 6.0, 7.0, 8.0]);

    // The engine's staged uploads (above the staging threshold) run on its copy stream and
    // make the compute stream wait for them; the data arrives intact even though the host
    // buffer and the staging buffers are reused at once.
    assert!(!std::sync::Arc::ptr_eq(g.copy_stream(), compute));
    let len = 40_000;
    let mut dst = g.upload(&vec![0.0f32; len]).expect("upload");
    for round in 0..4u32 {
        let waits = emu_query(c"emuStreamWaits", compute.cu_stream());
        let host: Vec<f32> = (0..len).map(|i| (i as f32 + round as f32).cos()).collect();
        g.upload_into(&host, &mut dst).expect("upload_into");
        assert!(
            emu_query(c"emuStreamWaits", compute.cu_stream()) > waits,
            "the compute stream did not wait for the upload"
        );
        let mut copy = g.upload(&host).expect("upload");
        g.add_assign(&mut copy, &dst).expect("add");
        let got = g.download(&copy).expect("download");
        let want: Vec<f32> = host.iter().map(|v| v + v).collect();
        assert_eq!(bits(&got), bits(&want), "round {round}");
    }
    // The ring: uploads alternate between two buffers; each consumed copy is the right one.
    let mut ring = g.input_ring(len).expect("ring");
    let mut x = g.upload(&vec![0.0f32; len]).expect("upload");
    for round in 0..5u32 {
        let host: Vec<f32> = (0..len)
            .map(|i| (i as f32 * 0.5 + round as f32).sin())
            .collect();
        g.ring_upload(&mut ring, &host).expect("ring upload");
        g.ring_consume(&mut ring, &mut x).expect("ring consume");
        assert_eq!(
            bits(&g.download(&x).expect("download")),
            bits(&host),
            "ring round {round}"
        );
    }
}
