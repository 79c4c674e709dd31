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
//!   replayed from that memory's contents at replay time.
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
