//! CUDA graphs, the buffer arena, pinned uploads and the fused CAM kernel:
//! - capture records without running, replay runs the recorded ops on the captured
//!   buffers, and what a capture cannot hold (a synchronisation, an allocation, a copy to
//!   pageable host memory) is an error that ends the capture and leaves the stream usable;
//! - the whole vanilla-CAM pass (backbone, fc, CAM, resize, min-max) captured as a graph and
//!   replayed gives bit-identical results to the same pass run eagerly, also after new
//!   input is copied into the captured input buffer;
//! - releasing the scratch arena is refused while a graph lives (its replays use the scratch
//!   its capture took) and the graph still replays correctly; after the graph is dropped the
//!   release frees everything;
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
//!   the engine's uploads (which wait) arrive intact and make the compute stream wait;
//! - the stage-3 U-Net's training step as a graph (`src/model/unet/graph.rs`): steps with
//!   Adam and a learning rate that changes every step, a batch-shape change, an eval pass of
//!   another shape and a parameter set between steps (both make the next step eager and
//!   re-capture), then SGD steps without the BCE: losses, outputs, every parameter, batch-norm
//!   running stat and optimizer moment bit-identical to the eager steps from the same state;
//!   the U-Net step's losses read a step late equal the immediate ones; capturing the eager
//!   pass (it uploads into new buffers) or the eager Dice (it downloads) is an error while the
//!   capturable Dice replays bit-identically, its 0/0 flag giving the eager error; a capture
//!   that fails (here: the scratch arena emptied, so the step would allocate) is recorded and
//!   that shape's steps run eagerly with the same results; a `train` with stage 3, late vs
//!   immediate readback: logged losses and the model file bit-identical;
//! - the CAM pass split into chunks of slices (the eval-mode backbone on each chunk, its
//!   rows copied into the full-batch outputs: `IchNet::set_cam_chunking`) captured as one
//!   graph over all chunks and replayed is bit-identical to the same pass run eagerly, also
//!   after new input; against the pass in one chunk it agrees within 1e-5 relative (the
//!   split-K plan of a convolution may change with the batch; the difference is printed);
//! - on the emulator, a graph replayed after a buffer it holds was freed, and after that
//!   memory was allocated again for a new buffer at the same address (a stale pointer, which
//!   a GPU's replay would silently write through): CUDA_ERROR_ILLEGAL_ADDRESS naming the node,
//!   the kernel and the argument, not a crash (each case in a child process);
//! - the stage-1 and stage-2 training graphs after a buffer they hold was replaced between
//!   steps (a parameter, a running statistic or an optimizer state set; a validation or eval
//!   pass of another shape; an eager step of another batch or of the other stage; the buffers
//!   released: `IchNet::generation`): the next step runs eagerly and the one after
//!   re-captures, losses, logits, parameters, optimizer states and gradients bit-identical
//!   to eager steps (replaying the old graph reads freed buffers).
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
use ichcam::model::unet::{UNet, UNetConfig, UNetLoss};
use ichcam::model::{CamChunking, CamKind, CamPassBufs, IchNet, ModelConfig};

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
        device(
            "scratch_is_not_released_under_a_live_graph",
            scratch_is_not_released_under_a_live_graph,
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
        device(
            "unet_steps_graph_replay_is_bit_identical_to_eager",
            unet_steps_graph_replay_is_bit_identical_to_eager,
        ),
        device(
            "unet_queued_losses_read_a_step_late_are_the_same",
            unet_queued_losses_read_a_step_late_are_the_same,
        ),
        device(
            "unet_capture_refuses_allocations_and_dice_stays_on_device",
            unet_capture_refuses_allocations_and_dice_stays_on_device,
        ),
        device(
            "unet_failed_capture_runs_that_shape_eagerly",
            unet_failed_capture_runs_that_shape_eagerly,
        ),
        device(
            "unet_train_with_late_loss_readback_is_bit_identical",
            unet_train_with_late_loss_readback_is_bit_identical,
        ),
        emulator(
            STALE_REPLAY_TEST,
            emulator_replay_through_a_stale_pointer_fails,
        ),
        device(
            "chunked_cam_pass_graph_replay_is_bit_identical_to_eager",
            chunked_cam_pass_graph_replay_is_bit_identical_to_eager,
        ),
        device(
            "train_steps_after_a_buffer_replacement_recapture",
            train_steps_after_a_buffer_replacement_recapture,
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

/// A graph replays on the scratch buffers its capture took (they sit in the arena's free
/// lists between replays): releasing the scratch is refused while the graph lives, and the
/// graph keeps replaying correctly; once it is dropped the release frees everything.
fn scratch_is_not_released_under_a_live_graph() {
    // Its own backend: its arena is not shared with the other tests.
    let be = CudaBackend::new(0).expect("backend");
    let mut rng = SplitMix64::new(91);
    let (n, c, hw) = (3usize, 5usize, 6usize);
    let x = rng.vec_f32(n * c * hw, -1.0, 1.0);
    let xd = be.upload(&x).expect("upload");
    let mut out = be.zeros_f32(c).expect("out");
    // A bias gradient (a per-channel sum) takes its partial sums from the f64 scratch arena.
    be.bias_bwd(n, c, hw, &xd, &mut out).expect("eager");
    let want = be.download(&out).expect("down");
    let held = be.scratch_bytes();
    assert!(held > 0, "the eager op left its scratch in the arena");
    let (graph, ()) = be
        .capture(|| be.bias_bwd(n, c, hw, &xd, &mut out))
        .expect("capture");
    be.fill(&mut out, 0.0).expect("fill");
    let err = be
        .release_scratch()
        .expect_err("a live graph holds the scratch");
    assert!(err.to_string().contains("1 CUDA graph(s)"), "{err}");
    assert_eq!(be.scratch_bytes(), held, "nothing freed");
    graph.replay().expect("replay");
    assert_eq!(be.download(&out).expect("down"), want);
    drop(graph);
    be.release_scratch().expect("no graph left");
    assert_eq!(be.scratch_bytes(), 0);
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
    // A copy to pageable host memory (a download): refused by the engine before the
    // driver sees it (an H200's driver accepted it in a thread-local capture and returned
    // an unwritten buffer; the emulated driver refuses it too).
    let e = g
        .capture(|| g.download(&y).map(|_| ()))
        .err()
        .expect("a download inside a capture must fail");
    assert!(e.to_string().contains("captures a CUDA graph"), "{e}");
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
    let (graph, bufs) = common::cuda::warm_and_capture_cam_pass(g, &mut net, &xin, (n, h, w));
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
        // The min-max normalisation divides by each slice's range, which a few cancelling
        // channels can make small: the CAM's own f32 rounding (within 1e-5 above) is then
        // amplified by max|cam| / range. So the upsample + min-max are checked on the
        // device's own CAM (the CPU's reference ops from `gc`), and the whole against the
        // CPU's whole within 1e-5 times that amplification.
        let mut up = vec![f32::NAN; n * oh * ow];
        cpu.upsample_bilinear(n, fh, fw, oh, ow, &gc, &mut up)
            .expect("upsample");
        let mut from_gc = vec![f32::NAN; n * oh * ow];
        cpu.minmax_normalize(n, oh * ow, &up, &mut from_gc)
            .expect("minmax");
        let e = rel_err(&gn, &from_gc);
        assert!(
            e < 1e-5,
            "{what}: normalisation of the device's CAM, rel err {e:.3e}"
        );
        let amp = cc
            .chunks(fh * fw)
            .map(|s| {
                let (lo, hi) = s
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let top = s.iter().fold(0f32, |a, &v| a.max(v.abs()));
                if hi > lo {
                    f64::from(top) / f64::from(hi - lo)
                } else {
                    1.0
                }
            })
            .fold(1f64, f64::max);
        let e = rel_err(&gn, &cn);
        assert!(
            e < 1e-5 * amp,
            "{what}: normalised CAM rel err {e:.3e} (amplification {amp:.1})"
        );
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
    use ichcam::model::{BlockKind, OptimizerConfig};
    use ichcam::train::{
        train_with, AugmentConfig, LossReadback, TrainConfig, TrainInput, TrainOptions,
    };
    let (size, slices, n) = (16, 8, 4);
    let cases = common::train::phantoms(n, size, slices, 5);
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

// ---- the stage-3 U-Net step as a graph ---------------------------------------------------

fn unet_cfg(bce_weight: f64) -> UNetConfig {
    UNetConfig {
        in_channels: 2,
        features: 4,
        depth: 2,
        bce_weight,
        ..UNetConfig::authors(2)
    }
}

/// Images `[n, 2, size, size]` and 0/1 targets `[n, 1, size, size]` of batch `k`.
fn unet_batch(k: u64, n: usize, size: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = SplitMix64::new(500 + k);
    let x = r.vec_f32(n * 2 * size * size, -1.0, 1.0);
    let t = r.mask_f32(n * size * size, 0.3);
    (x, t)
}

fn loss_bits(l: &UNetLoss) -> [u64; 3] {
    [l.loss.to_bits(), l.dice.to_bits(), l.bce.to_bits()]
}

/// Every parameter and running statistic, the optimizer moments and the step count of two
/// U-Nets, bit for bit.
fn assert_same_unet(a: &UNet<CudaBackend>, b: &UNet<CudaBackend>, what: &str) {
    for name in a.names() {
        let (pa, pb) = (a.param(&name).expect("p"), b.param(&name).expect("p"));
        assert_eq!(bits(&pa), bits(&pb), "{what}: {name} differs");
    }
    assert_eq!(a.steps(), b.steps(), "{what}: step counts");
    match (a.opt_state().expect("state"), b.opt_state().expect("state")) {
        (None, None) => {}
        (Some((ma, ka)), Some((mb, kb))) => {
            assert_eq!(ka, kb, "{what}: optimizer steps");
            for (i, ((m1, v1), (m2, v2))) in ma.iter().zip(&mb).enumerate() {
                assert_eq!(bits(m1), bits(m2), "{what}: first moment of tensor {i}");
                assert_eq!(bits(v1), bits(v2), "{what}: second moment of tensor {i}");
            }
        }
        _ => panic!("{what}: one U-Net has optimizer state, the other not"),
    }
}

fn unet_steps_graph_replay_is_bit_identical_to_eager() {
    use ichcam::model::unet::graph::UNetSteps;
    use ichcam::model::OptimizerConfig;
    let g = gpu();
    let size = 32;
    // Adam with a learning rate that changes every step, the Dice + BCE loss.
    let mut eager = UNet::new(g.clone(), unet_cfg(0.5), 31).expect("unet");
    let mut graphed = UNet::new(g.clone(), unet_cfg(0.5), 31).expect("unet");
    let mut steps = UNetSteps::default();
    let ns = [2usize, 2, 2, 2, 1, 2, 2, 2, 2];
    let mut replayed = Vec::new();
    for (k, &n) in ns.iter().enumerate() {
        let (x, t) = unet_batch(k as u64, n, size);
        let opt = OptimizerConfig::adam(1e-2 / (1.0 + k as f64));
        let want = eager
            .forward_backward(&x, &t, n, size, size)
            .expect("eager");
        eager.step(&opt).expect("eager step");
        let replays = steps.counts().1;
        let got = graphed
            .train_step_graphed(&mut steps, &x, &t, n, size, size, &opt)
            .expect("graphed step");
        replayed.push(steps.counts().1 > replays);
        assert_eq!(
            loss_bits(&got),
            loss_bits(&want),
            "step {k}: losses {got:?} vs {want:?}"
        );
        if let Some(why) = steps.graph.as_ref().and_then(|t| t.failure()) {
            panic!("step {k}: the U-Net step was not captured: {why}");
        }
        assert_eq!(
            bits(&graphed.output().expect("out")),
            bits(&eager.output().expect("out")),
            "step {k}: probabilities"
        );
        assert_same_unet(&eager, &graphed, &format!("after step {k}"));
        if k == 2 {
            // An eval pass of another shape rebuilds the workspace: the graph's buffers are
            // gone, the next step must not replay it.
            let (xv, _) = unet_batch(99, 3, size);
            let pe = eager.predict(&xv, 3, size, size).expect("eval");
            let pg = graphed.predict(&xv, 3, size, size).expect("eval");
            assert_eq!(bits(&pe), bits(&pg), "eval pass between steps");
        }
        if k == 6 {
            // A parameter replaced (as a checkpoint load does): the same.
            let name = graphed.weight_specs()[0].name.clone();
            let v: Vec<f32> = eager
                .param(&name)
                .expect("p")
                .iter()
                .map(|v| v * 0.5)
                .collect();
            eager.set_param(&name, &v).expect("set");
            graphed.set_param(&name, &v).expect("set");
        }
    }
    // Step 0 eager, 1 captured and replayed, 2 replayed; the eval pass made 3 eager, the
    // batch of 1 (4) and the return to 2 (5) ran eagerly, 6 re-captured; the parameter set
    // made 7 eager and 8 captured again.
    assert_eq!(
        replayed,
        [false, true, true, false, false, false, true, false, true],
        "which steps replayed"
    );
    assert_eq!(steps.counts(), (3, 4, 5), "captures, replays, eager steps");
    let nodes = steps.graph.as_ref().map_or(0, |t| t.nodes());
    eprintln!("U-Net training step graph (features 4, depth 2, 2x32^2, Dice + BCE, Adam): {nodes} operations");

    // SGD with momentum and weight decay (its first step seeds the momentum), the learning
    // rate changing, the Dice alone (no BCE in the graph).
    let mut eager = UNet::new(g.clone(), unet_cfg(0.0), 32).expect("unet");
    let mut graphed = UNet::new(g.clone(), unet_cfg(0.0), 32).expect("unet");
    let mut steps = UNetSteps::default();
    for k in 0..4 {
        let (x, t) = unet_batch(20 + k as u64, 2, size);
        let opt = OptimizerConfig::Sgd {
            lr: 0.05 * (k + 1) as f64,
            momentum: 0.9,
            weight_decay: 1e-4,
        };
        let want = eager
            .forward_backward(&x, &t, 2, size, size)
            .expect("eager");
        eager.step(&opt).expect("eager step");
        let got = graphed
            .train_step_graphed(&mut steps, &x, &t, 2, size, size, &opt)
            .expect("graphed step");
        assert_eq!(loss_bits(&got), loss_bits(&want), "SGD step {k}");
        assert_eq!(got.bce, 0.0);
        assert_same_unet(&eager, &graphed, &format!("after SGD step {k}"));
    }
    assert_eq!(steps.counts(), (1, 3, 1), "captures, replays, eager steps");
    let nodes2 = steps.graph.as_ref().map_or(0, |t| t.nodes());
    eprintln!("U-Net training step graph (Dice alone, SGD): {nodes2} operations");
    if nodes > 0 {
        assert!(nodes > nodes2, "the BCE's ops are in the first graph only");
    }
}

fn unet_queued_losses_read_a_step_late_are_the_same() {
    use ichcam::model::net_graph::StepLoss;
    use ichcam::model::unet::graph::UNetSteps;
    use ichcam::model::OptimizerConfig;
    let g = gpu();
    let size = 32;
    let mut now = UNet::new(g.clone(), unet_cfg(1.0), 33).expect("unet");
    let mut late = UNet::new(g.clone(), unet_cfg(1.0), 33).expect("unet");
    let (mut s_now, mut s_late) = (UNetSteps::default(), UNetSteps::default());
    let (mut want, mut got, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    let mut queued: Option<StepLoss> = None;
    // The last batch is partial (an eager step whose loss is known at once).
    let ns = [2usize, 2, 2, 2, 1];
    for (k, &n) in ns.iter().enumerate() {
        let (x, t) = unet_batch(40 + k as u64, n, size);
        let opt = OptimizerConfig::adam(2e-3 * (k + 1) as f64);
        want.push(
            now.train_step_graphed(&mut s_now, &x, &t, n, size, size, &opt)
                .expect("step")
                .loss,
        );
        let l = late
            .train_step_queued(&mut s_late, &x, &t, n, size, size, &opt)
            .expect("queued step");
        kinds.push(matches!(l, StepLoss::Queued(_)));
        // Step k is enqueued (its replay rewrote the graph's loss buffer) before step k-1's
        // loss is read.
        if let Some(p) = queued.replace(l) {
            got.push(s_late.read(p).expect("read"));
        }
    }
    got.push(s_late.read(queued.take().expect("last")).expect("read"));
    assert_eq!(kinds, [false, true, true, true, false], "queued steps");
    let b = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(b(&got), b(&want), "late {got:?} vs immediate {want:?}");
    assert_same_unet(&now, &late, "after the queued steps");
}

fn unet_capture_refuses_allocations_and_dice_stays_on_device() {
    use ichcam::engine::SoftDice;
    let g = gpu();
    let size = 32;
    let mut net = UNet::new(g.clone(), unet_cfg(0.5), 34).expect("unet");
    let (x, t) = unet_batch(60, 2, size);
    net.forward_backward(&x, &t, 2, size, size).expect("warm");
    // The eager pass uploads its inputs into new buffers: an allocation, refused.
    let e = g
        .capture(|| {
            net.forward_backward(&x, &t, 2, size, size)
                .map(|_| ())
                .map_err(|e| ichcam::engine::EngineError::Param(e.to_string()))
        })
        .err()
        .expect("capturing the eager U-Net pass must fail");
    assert!(
        e.to_string()
            .contains("not permitted while the stream captures a CUDA graph"),
        "{e}"
    );
    assert!(!g.is_capturing());

    // The eager soft Dice downloads its loss (a synchronisation): refused; the capturable
    // form leaves it on the device, and its replay gives the eager loss and gradient.
    let s = SoftDice {
        n: 3,
        c: 2,
        hw: 50,
        eps: 1e-7,
    };
    let mut rng = SplitMix64::fresh("unet-graph-dice");
    let p = g.upload(&rng.vec_f32(s.len(), 0.0, 1.0)).expect("up");
    let tt = g.upload(&rng.mask_f32(s.len(), 0.4)).expect("up");
    let mut dp = g.zeros(s.len()).expect("zeros");
    let want = g.soft_dice_loss(&s, &p, &tt, &mut dp).expect("eager dice");
    let want_dp = g.download(&dp).expect("down");
    let e = g
        .capture(|| g.soft_dice_loss(&s, &p, &tt, &mut dp).map(|_| ()))
        .err()
        .expect("capturing the eager Dice must fail");
    assert!(e.to_string().to_lowercase().contains("capture"), "{e}");
    let mut out = g.zeros_f64(4).expect("out");
    g.fill(&mut dp, f64::NAN).expect("poison");
    let (graph, ()) = g
        .capture(|| g.soft_dice_loss_into(&s, &p, &tt, &mut dp, &mut out, 2))
        .expect("the capturable Dice");
    assert!(
        g.download(&dp).expect("down").iter().all(|v| v.is_nan()),
        "capturing must not run the Dice"
    );
    graph.replay().expect("replay");
    let v = g.stream().clone_dtoh(&out).expect("down");
    assert_eq!(
        v[2].to_bits(),
        want.to_bits(),
        "replayed Dice {v:?} vs {want}"
    );
    assert_eq!(v[3], 0.0, "no zero denominator");
    assert_eq!((v[0], v[1]), (0.0, 0.0), "only out[at..at + 2] is written");
    assert_eq!(bits(&g.download(&dp).expect("down")), bits(&want_dp));
    // Out of range: an error, nothing launched.
    assert!(g
        .soft_dice_loss_into(&s, &p, &tt, &mut dp, &mut out, 3)
        .is_err());
    // eps = 0 on empty prediction and target: the eager error, and the flag that gives it.
    let z = SoftDice { eps: 0.0, ..s };
    let zeros = g.zeros(z.len()).expect("zeros");
    let eager_err = g
        .soft_dice_loss(&z, &zeros, &zeros, &mut dp)
        .expect_err("0/0 must be an error");
    g.soft_dice_loss_into(&z, &zeros, &zeros, &mut dp, &mut out, 0)
        .expect("into");
    let v = g.stream().clone_dtoh(&out).expect("down");
    assert_eq!(v[1], 1.0, "the 0/0 flag");
    let flagged = ichcam::engine::cuda::graph::dice_value(v[0], v[1]).expect_err("flag");
    assert_eq!(flagged.to_string(), eager_err.to_string());
}

fn unet_failed_capture_runs_that_shape_eagerly() {
    use ichcam::model::unet::graph::UNetSteps;
    use ichcam::model::OptimizerConfig;
    let g = gpu();
    // Its own backend: emptying its scratch arena touches no other test's buffers.
    let own = CudaBackend::new(0).expect("a second backend");
    let size = 32;
    let mut eager = UNet::new(g.clone(), unet_cfg(0.5), 35).expect("unet");
    let mut graphed = UNet::new(own.clone(), unet_cfg(0.5), 35).expect("unet");
    let mut steps = UNetSteps::default();
    for k in 0..4 {
        let (x, t) = unet_batch(70 + k as u64, 2, size);
        let opt = OptimizerConfig::adam(1e-3 * (k + 1) as f64);
        if k == 1 {
            // The scratch the eager step left is freed: capturing the step would allocate
            // it again, which a capture refuses.
            own.release_scratch().expect("no graph is alive yet");
            assert_eq!(own.scratch_bytes(), 0);
        }
        let want = eager
            .forward_backward(&x, &t, 2, size, size)
            .expect("eager");
        eager.step(&opt).expect("eager step");
        let got = graphed
            .train_step_graphed(&mut steps, &x, &t, 2, size, size, &opt)
            .expect("the step runs eagerly after the failed capture");
        assert_eq!(loss_bits(&got), loss_bits(&want), "step {k}");
        assert_same_unet(&eager, &graphed, &format!("after step {k}"));
    }
    let why = steps
        .graph
        .as_ref()
        .and_then(|t| t.failure())
        .expect("the capture must have failed");
    assert!(
        why.contains("not permitted while the stream captures a CUDA graph"),
        "{why}"
    );
    // One attempt only: every step ran eagerly, nothing was captured or replayed.
    assert_eq!(steps.counts(), (0, 0, 4), "captures, replays, eager steps");
}

fn unet_train_with_late_loss_readback_is_bit_identical() {
    use ichcam::model::{BlockKind, OptimizerConfig};
    use ichcam::train::config::UNetTrainConfig;
    use ichcam::train::{
        train_with, AugmentConfig, LossReadback, TrainConfig, TrainInput, TrainOptions,
    };
    let (size, slices, n) = (40, 10, 6);
    let cases = common::train::phantoms(n, size, slices, 31);
    let mut u = UNetTrainConfig::cpu();
    u.features = 2;
    u.depth = 2;
    u.epochs = 2;
    u.batch = 4;
    // At least 11 positives (drawn again when fewer) and as many negatives an epoch.
    u.slices_per_epoch = 22;
    u.refine = ichcam::seg::RefineConfig {
        cam_threshold: 0.0,
        grow_cam_threshold: 0.0,
        k: 8,
        ..ichcam::seg::RefineConfig::default()
    };
    u.min_component_ml = Some(0.0);
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
        size: 32,
        slices: 6,
        seq_stride: 3,
        batch: 2,
        epochs: 1,
        optimizer: OptimizerConfig::adam(1e-3),
        stage2_batch: 16,
        stage2_epochs: 1,
        stage2_optimizer: OptimizerConfig::Sgd {
            lr: 1e-2,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        val_fraction: 0.34,
        pos_weight_min: 1.0,
        pos_weight_max: 10.0,
        augment: AugmentConfig::paper(),
        input: ichcam::data::InputSpec::default(),
        stage2_pooling: ichcam::train::config::HeadPooling::Mean,
        unet: Some(u),
    };
    let dir = std::env::temp_dir().join(format!("ichcam-unet-late-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = |mode: LossReadback| {
        let model = dir.join(format!("{mode:?}.safetensors"));
        let opts = TrainOptions {
            seed: 4,
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
        assert!(r.finished && r.unet_epochs == 2, "{r:?}");
        let ps = r.pseudo.expect("pseudo-masks");
        assert!(ps.positive > 0, "{ps:?}");
        eprintln!("{mode:?}: stage-3 pseudo-masks {ps:?}");
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
    let stages: Vec<(u8, usize)> = late_losses.iter().map(|l| (l.0, l.1)).collect();
    assert_eq!(stages, [(1, 1), (2, 1), (3, 1), (3, 2)], "logged epochs");
    assert!(late_losses.iter().all(|l| f64::from_bits(l.2).is_finite()));
    assert_eq!(
        late_losses, now_losses,
        "logged losses (stage, epoch, train, val bits)"
    );
    assert!(late_params.iter().any(|(n, _)| n.starts_with("unet.")));
    assert_eq!(late_params.len(), now_params.len());
    for ((na, a), (nb, b)) in late_params.iter().zip(&now_params) {
        assert_eq!(na, nb);
        assert!(a == b, "{na}: the late readback's parameters differ");
    }
    let show: Vec<f64> = late_losses.iter().map(|l| f64::from_bits(l.2)).collect();
    eprintln!("train losses with stage 3 (late = immediate readback): {show:?}");
}

// ---- a graph replayed after a buffer it holds was freed ----------------------------------

const STALE_REPLAY_TEST: &str = "emulator_replay_through_a_stale_pointer_fails";
/// Set in the child process that runs one case of
/// [`emulator_replay_through_a_stale_pointer_fails`].
const STALE_REPLAY_CASE: &str = "ICHCAM_TEST_STALE_REPLAY_CASE";

/// A graph replayed after a buffer it holds was dropped: with nothing allocated since
/// (`freed`), and with a new buffer of the same size allocated in between (`reallocated`),
/// which the emulator's allocator places at the freed buffer's address, so the graph's
/// stale pointer points into someone else's live buffer (on a GPU the replay silently
/// writes there). Both must be CUDA_ERROR_ILLEGAL_ADDRESS reported by the next
/// synchronising call, the stale one naming the node, the kernel and the argument, never a
/// crash. The error poisons the device context and this binary's other tests share one, so
/// each case runs in a child process of this binary; the parent asserts that the child
/// exited normally (a segfault is a failure here, not the end of the test binary).
fn emulator_replay_through_a_stale_pointer_fails() {
    if let Ok(case) = std::env::var(STALE_REPLAY_CASE) {
        return stale_replay_case(&case);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for case in ["freed", "reallocated"] {
        let out = std::process::Command::new(&exe)
            .args([
                STALE_REPLAY_TEST,
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(STALE_REPLAY_CASE, case)
            .env_remove("EMU_QUIET")
            .output()
            .expect("run the child test process");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        // Indented: the child's own "test result" lines must not read as this binary's
        // (scripts/cuda-emu.sh counts those).
        let shown: String = stdout
            .lines()
            .chain(stderr.lines())
            .map(|l| format!("    | {l}\n"))
            .collect();
        eprintln!(
            "case {case}: the child exited with {}:\n{shown}",
            out.status
        );
        assert!(
            out.status.success(),
            "case {case}: the child process failed or crashed ({})",
            out.status
        );
        assert!(
            stdout.contains("1 passed"),
            "case {case}: the child did not run the case"
        );
        // The emulator says so on stderr too (EMU_QUIET is unset in the child).
        let want = match case {
            "freed" => "freed since the capture",
            _ => "allocated again",
        };
        assert!(
            stderr.contains(want) && stderr.contains("add_assign"),
            "case {case}: stderr does not explain the failure"
        );
    }
}

/// One case, in the child process: capture `y += x`, replay it once, drop `y`, (allocate a
/// new buffer of `y`'s size,) replay again.
fn stale_replay_case(case: &str) {
    let be = CudaBackend::new(0).expect("device");
    let x = be.upload(&[1.0, 2.0, 3.0, 4.0]).expect("upload");
    let mut y = be.upload(&[10.0, 20.0, 30.0, 40.0]).expect("upload");
    let (graph, ()) = be.capture(|| be.add_assign(&mut y, &x)).expect("capture");
    graph.replay().expect("replay");
    assert_eq!(be.download(&y).expect("download"), [11.0, 22.0, 33.0, 44.0]);
    let stale = be.ptr(&y);
    drop(y);
    // Kept alive until the replay, so that its memory stays allocated.
    let mut fresh = None;
    if case == "reallocated" {
        let z = be.upload(&[-1.0f32; 4]).expect("upload");
        let at = be.ptr(&z);
        println!("the new buffer is at {at:#x}, the freed one was at {stale:#x}");
        assert_eq!(
            at, stale,
            "the emulator's allocator did not reuse the freed address: this case would not \
             test a stale pointer into a live buffer"
        );
        fresh = Some(z);
    }
    let err = match graph.replay() {
        Err(e) => e, // CUDA_LAUNCH_BLOCKING=1
        Ok(()) => be
            .synchronize()
            .expect_err("a replay through a stale pointer must fail"),
    };
    let msg = err.to_string();
    println!("case {case}: {msg}");
    assert!(msg.contains("ILLEGAL_ADDRESS"), "{msg}");
    assert!(msg.contains("add_assign"), "{msg}");
    match case {
        "freed" => assert!(msg.contains("freed since the capture"), "{msg}"),
        _ => {
            assert!(msg.contains("allocated again"), "{msg}");
            assert!(msg.contains("node 0"), "{msg}");
            assert!(msg.contains("pointer argument 0"), "{msg}");
        }
    }
    drop(fresh);
}

fn chunked_cam_pass_graph_replay_is_bit_identical_to_eager() {
    use ichcam::engine::Precision;
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let mut be = gpu().clone();
        be.set_precision(p)
            .expect("the device takes this precision");
        chunked_cam_pass_case(&be, p);
    }
}

fn chunked_cam_pass_case(g: &CudaBackend, p: ichcam::engine::Precision) {
    // Four stages of bottlenecks, wide enough (K = 256 x 9 in the last 3x3) that a
    // convolution's split-K plan can change with the batch.
    let cfg = ModelConfig {
        block: ichcam::model::BlockKind::Bottleneck,
        layers: vec![1, 2, 1, 1],
        base_width: 32,
        ..ModelConfig::tiny()
    };
    let mut net = IchNet::new(g.clone(), cfg, 13).expect("net");
    net.set_train(false);
    let (n, h, w) = (5usize, 64usize, 48usize);
    let mut rng = SplitMix64::fresh("graph-cam-chunks");
    let x1 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let x2 = rng.vec_f32(n * 3 * h * w, -1.0, 1.0);
    let down = |b: &cudarc::driver::CudaSlice<f32>| g.download(b).expect("download");
    let outs = |b: &CamPassBufs<CudaBackend>| (down(&b.logits), down(&b.cam), down(&b.norm));
    let (xb1, xb2) = (g.upload(&x1).expect("up"), g.upload(&x2).expect("up"));

    // The pass in one chunk, then in chunks of 2 (2 + 2 + 1), eagerly.
    net.set_cam_chunking(CamChunking::Slices(n));
    let mut whole = None;
    net.stage2_cam_pass(&xb1, n, h, w, &mut whole)
        .expect("one chunk");
    let one = outs(whole.as_ref().expect("bufs"));
    drop(whole);
    net.set_cam_chunking(CamChunking::Slices(2));
    let mut eager = None;
    net.stage2_cam_pass(&xb1, n, h, w, &mut eager)
        .expect("chunked pass");
    assert_eq!(eager.as_ref().expect("bufs").chunk, 2);
    let ref1 = outs(eager.as_ref().expect("bufs"));
    net.stage2_cam_pass(&xb2, n, h, w, &mut eager)
        .expect("chunked pass");
    let ref2 = outs(eager.as_ref().expect("bufs"));
    drop(eager);
    let max_abs = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let same = bits(&one.0) == bits(&ref1.0) && bits(&one.2) == bits(&ref1.2);
    println!(
        "{p}: chunks of 2 vs one chunk: logits max |diff| {:.3e} (rel {:.3e}), CAM {:.3e} (rel \
         {:.3e}), normalised CAM {:.3e} (rel {:.3e}); bit-identical: {same}",
        max_abs(&ref1.0, &one.0),
        rel_err(&ref1.0, &one.0),
        max_abs(&ref1.1, &one.1),
        rel_err(&ref1.1, &one.1),
        max_abs(&ref1.2, &one.2),
        rel_err(&ref1.2, &one.2),
    );
    for (what, a, b) in [
        ("logits", &ref1.0, &one.0),
        ("CAM", &ref1.1, &one.1),
        ("normalised CAM", &ref1.2, &one.2),
    ] {
        let e = rel_err(a, b);
        assert!(
            e < 1e-5,
            "{p} {what}: chunked vs one chunk, rel err {e:.3e}"
        );
    }
    assert_ne!(
        bits(&ref1.2),
        bits(&ref2.2),
        "different inputs, different maps"
    );

    // One graph over all the chunks, on a fixed input buffer, its buffers warm.
    let mut xin = g.upload(&x1).expect("up");
    let (graph, bufs) = common::cuda::warm_and_capture_cam_pass(g, &mut net, &xin, (n, h, w));
    let b = bufs.as_ref().expect("bufs");
    assert!(
        down(&b.norm).iter().all(|v| v.is_nan()),
        "capturing must not run the pass"
    );
    graph.replay().expect("replay");
    let got1 = outs(b);
    assert_eq!(bits(&got1.0), bits(&ref1.0), "{p} logits, replay on x1");
    assert_eq!(bits(&got1.1), bits(&ref1.1), "{p} CAM, replay on x1");
    assert_eq!(
        bits(&got1.2),
        bits(&ref1.2),
        "{p} normalised CAM, replay on x1"
    );
    g.copy(&xb2, &mut xin).expect("copy");
    graph.replay().expect("replay");
    let got2 = outs(bufs.as_ref().expect("bufs"));
    assert_eq!(bits(&got2.0), bits(&ref2.0), "{p} logits, replay on x2");
    assert_eq!(bits(&got2.1), bits(&ref2.1), "{p} CAM, replay on x2");
    assert_eq!(
        bits(&got2.2),
        bits(&ref2.2),
        "{p} normalised CAM, replay on x2"
    );
    drop(graph);
}

/// [`assert_same_state`] and every gradient, bit for bit.
fn assert_same_state_and_grads(a: &IchNet<CudaBackend>, b: &IchNet<CudaBackend>, what: &str) {
    assert_same_state(a, b, what);
    for name in a.names() {
        if let (Ok(ga), Ok(gb)) = (a.grad(&name), b.grad(&name)) {
            assert_eq!(bits(&ga), bits(&gb), "{what}: gradient of {name} differs");
        }
    }
}

/// Applies one replacement of buffers a captured training step holds to a net (the same
/// to the eager and the graphed one).
type Replacement = fn(&mut IchNet<CudaBackend>);

/// Stage-1 and stage-2 steps with, between some of them, a replacement of buffers a
/// captured step holds (`IchNet::generation`): a parameter and a running statistic set (as
/// a checkpoint load does), an optimizer state set, a validation pass of another shape in
/// eval mode (the eval-mode backbone and the sequence's activations reallocated) and with
/// batch statistics (the training activations reallocated), the buffers released; for stage
/// 2, on a net that never trained (no gradient buffer yet: they are allocated on the first
/// training use), an eval pass of another shape, an eager stage-2 step of another batch (the
/// head's per-shape buffers), the fc set, and an eager stage-1 step (the backbone's
/// gradients and moments allocated, which the stage-2 graph's zeroing did not hold). Each
/// makes the next step eager and the one after re-capture; losses, logits, every parameter,
/// running statistic, optimizer state and gradient are bit-identical to eager steps from the
/// same state. Replaying the old graph instead reads freed buffers: the emulator's
/// CUDA_ERROR_ILLEGAL_ADDRESS, or (the new gradients) wrong values.
fn train_steps_after_a_buffer_replacement_recapture() {
    use ichcam::model::net_graph::GraphSteps;
    use ichcam::model::{OptimizerConfig, ParamGroup};
    let g = gpu();
    let cfg = small_cfg();
    let c = cfg.in_channels;
    let (batch, seq, size) = (1, 3, 32);
    let n = batch * seq;
    let val = |net: &mut IchNet<CudaBackend>| {
        let x = randn(999, 2 * c * size * size);
        net.stage1_logits(&x, 1, 2, size, size).expect("validation")
    };
    let stage1: [(usize, &str, Replacement); 5] = [
        (3, "a parameter and a running statistic set", |net| {
            for name in ["layer1.0.conv1.weight", "bn1.running_var"] {
                let v: Vec<f32> = net
                    .param(name)
                    .expect("p")
                    .iter()
                    .map(|v| v * 0.5)
                    .collect();
                net.set_param(name, &v).expect("set");
            }
        }),
        (6, "an optimizer state set", |net| {
            let s = net.opt_state("conv1.weight").expect("state");
            let half = |v: &Option<Vec<f32>>| {
                v.as_ref()
                    .map(|v| v.iter().map(|x| x * 0.5).collect::<Vec<_>>())
            };
            let (m, v) = (half(&s.m), half(&s.v));
            net.set_opt_state("conv1.weight", m.as_deref(), v.as_deref(), s.steps)
                .expect("set state");
        }),
        (9, "an eval-mode validation pass of another shape", |net| {
            let x = randn(999, 2 * small_cfg().in_channels * 32 * 32);
            net.stage1_logits(&x, 1, 2, 32, 32).expect("validation");
        }),
        (12, "a batch-statistics pass of another shape", |net| {
            let x = randn(998, 2 * small_cfg().in_channels * 32 * 32);
            net.set_train(true);
            net.stage1_logits(&x, 1, 2, 32, 32)
                .expect("batch statistics");
            net.set_train(false);
        }),
        (15, "the buffers released", |net| net.release_buffers()),
    ];
    let mut eager = IchNet::new(g.clone(), cfg.clone(), 41).expect("net");
    let mut graphed = IchNet::new(g.clone(), cfg.clone(), 41).expect("net");
    // An eval pass first (no gradient buffer allocated): the first step allocates them.
    let f64_bits = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(f64_bits(val(&mut eager)), f64_bits(val(&mut graphed)));
    let mut steps = GraphSteps::default();
    let mut replayed = Vec::new();
    for k in 0..18 {
        if let Some((_, what, f)) = stage1.iter().find(|r| r.0 == k) {
            eprintln!("stage 1: before step {k}: {what}");
            f(&mut eager);
            f(&mut graphed);
        }
        let x = randn(300 + k as u64, n * c * size * size);
        let y: Vec<f32> = (0..n).map(|i| ((i + k) % 2) as f32).collect();
        let opt = OptimizerConfig::adam(1e-2 / (1.0 + k as f64));
        eager.zero_grads().expect("zero");
        let want = eager
            .stage1_forward_backward(&x, &y, batch, seq, size, size, 1.5)
            .expect("eager step");
        eager.step(&opt, ParamGroup::Stage1).expect("eager step");
        let before = steps.counts().1;
        let got = graphed
            .stage1_step_graphed(&mut steps, &x, &y, batch, seq, size, size, 1.5, &opt)
            .expect("graphed step");
        replayed.push(steps.counts().1 > before);
        if let Some(why) = steps.graph.as_ref().and_then(|t| t.failure()) {
            panic!("stage-1 step {k}: the step was not captured: {why}");
        }
        assert_eq!(
            got.loss.to_bits(),
            want.loss.to_bits(),
            "stage-1 step {k}: loss"
        );
        assert_eq!(got.logits, want.logits, "stage-1 step {k}: logits");
        assert_same_state_and_grads(&eager, &graphed, &format!("after stage-1 step {k}"));
    }
    // Each replacement made its step eager and the next one re-capture.
    let want: Vec<bool> = (0..18).map(|k| k % 3 != 0).collect();
    assert_eq!(replayed, want, "which stage-1 steps replayed");
    assert_eq!(
        steps.counts(),
        (6, 12, 6),
        "stage 1: captures, replays, eager steps"
    );

    // Stage 2 on nets that never trained: no gradient buffer until the first step.
    let stage2: [(usize, &str, Replacement); 4] = [
        (3, "an eval pass of another batch", |net| {
            let x = randn(997, 3 * small_cfg().in_channels * 32 * 32);
            net.stage2_logits(&x, 3, 32, 32).expect("eval");
        }),
        (6, "an eager stage-2 step of another batch", |net| {
            let x = randn(996, 3 * small_cfg().in_channels * 32 * 32);
            net.zero_grads().expect("zero");
            net.stage2_forward_backward(&x, &[1.0, 0.0, 1.0], 3, 32, 32, 1.0)
                .expect("eager stage-2 step");
            net.step(&OptimizerConfig::adam(1e-3), ParamGroup::Fc)
                .expect("step");
        }),
        (9, "the fc set", |net| {
            let v: Vec<f32> = net
                .param("fc.weight")
                .expect("p")
                .iter()
                .map(|v| -v)
                .collect();
            net.set_param("fc.weight", &v).expect("set");
        }),
        (12, "an eager stage-1 step", |net| {
            let x = randn(995, 3 * small_cfg().in_channels * 32 * 32);
            net.zero_grads().expect("zero");
            net.stage1_forward_backward(&x, &[1.0, 0.0, 1.0], 1, 3, 32, 32, 1.0)
                .expect("eager stage-1 step");
            net.step(&OptimizerConfig::paper_sgd(), ParamGroup::Stage1)
                .expect("step");
        }),
    ];
    let mut eager = IchNet::new(g.clone(), cfg.clone(), 43).expect("net");
    let mut graphed = IchNet::new(g.clone(), cfg.clone(), 43).expect("net");
    let mut steps = GraphSteps::default();
    let mut replayed = Vec::new();
    let n = 4;
    for k in 0..15 {
        if let Some((_, what, f)) = stage2.iter().find(|r| r.0 == k) {
            eprintln!("stage 2: before step {k}: {what}");
            f(&mut eager);
            f(&mut graphed);
        }
        let x = randn(400 + k as u64, n * c * size * size);
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
        let before = steps.counts().1;
        let got = graphed
            .stage2_step_graphed(&mut steps, &x, &y, n, size, size, 1.0, &opt)
            .expect("graphed step");
        replayed.push(steps.counts().1 > before);
        if let Some(why) = steps.graph.as_ref().and_then(|t| t.failure()) {
            panic!("stage-2 step {k}: the step was not captured: {why}");
        }
        assert_eq!(got.to_bits(), want.to_bits(), "stage-2 step {k}: loss");
        assert_same_state_and_grads(&eager, &graphed, &format!("after stage-2 step {k}"));
    }
    let want: Vec<bool> = (0..15).map(|k| k % 3 != 0).collect();
    assert_eq!(replayed, want, "which stage-2 steps replayed");
    assert_eq!(
        steps.counts(),
        (5, 10, 5),
        "stage 2: captures, replays, eager steps"
    );
}
