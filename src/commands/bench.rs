//! `ichcam bench`: times one workload on one backend, waiting for the device with the
//! backend's `synchronize` around every timed iteration (so GPU times are real), after
//! warm-up iterations that absorb module loading and allocation. Prints the median and the
//! minimum in ms, slices/s, and with `--json` one JSON line for scripts.
//!
//! Workloads: `conv` (every distinct convolution shape of the preset's backbone at its
//! train-step batch and size, [`backbone_convs`], with how many times the network runs it:
//! forward, data gradient and weight gradient timed on each family of kernels, on CUDA f32
//! SIMT, the WMMA 64x64 kernels (`MmaRoute::Never`) and the `mma.sync` 128x128 ones
//! (`MmaRoute::Always`) at bf16, and at tf32 too with `--precision tf32`; the CPU times its
//! f32 convolutions. The plain forward is timed, the one whose kernel family and route the
//! network's fused forwards share. It prints per shape and pass the median ms and TFLOP/s of
//! each, the kernel `MmaRoute::Auto` takes and the fastest, and the network's convolution
//! time per family (sum of count x median), Auto's and the best's; `--json` one line per
//! (shape, pass, family) and one `conv-summary` line per family), `train-step` (stage-1
//! forward + backward + SGD step; on CUDA the whole step, gradients zeroed to optimizer
//! step, captured once as a CUDA graph and replayed, [`IchNet::stage1_step_graphed`]: the
//! batch uploaded on the copy stream into the
//! graph's fixed inputs, the learning rate a device scalar, the loss and logits read back
//! after each replay; `--no-graph` for eager launches),
//! `cam` (the stage-2 vanilla-CAM pass, [`IchNet::stage2_cam_pass`]: backbone, fc, CAM
//! upsampled and normalised, left on the device, the backbone on chunks of slices within
//! the default memory budget or `--cam-chunk` slices; on CUDA captured once as a CUDA graph
//! and replayed, `--no-graph` for eager launches), `cam-latency` (the same pass on one slice),
//! `unet-step` (the stage-3 U-Net's training step: forward, soft Dice + BCE, backward, Adam
//! step, on the preset's stage-3 network, batch and image size; on CUDA captured once as a
//! CUDA graph and replayed, [`UNet::train_step_graphed`], with the batch uploaded into the
//! graph's fixed inputs and the losses read back after each replay; `--no-graph` for eager
//! launches) and
//! `ccl` (3-D connected components, 26-connectivity, of a `--dims` mask with `--fill`
//! foreground: the labelling with its buffers allocated and the mask uploaded once).
//! The six workloads of issue 14 are `--config paper|small --what train-step|cam`,
//! `--config small --what cam-latency` and `--what ccl` at 40x512x512 2 % and 512^3 30 %.
//! On CUDA the JSON line also has the device memory the workload holds (`device_mb`: free
//! memory before building it less free memory after its first pass (CUDA graph, ccl) or after
//! the timed runs (train-step, eager cam), the stream-ordered pool keeping what it freed).
//! `conv` reports none (`--describe` adds its shapes, counts and families). The `cam` and
//! `cam-latency` lines also have the pass's memory plan (`cam_chunk`, `act_mb`,
//! `act_plan_mb`, `act_per_layer_mb`, `pass_plan_mb`: [`cam_memory`]); the `train-step`
//! lines the training backbone's buffers as built (`train_bb_mb`: activations and their
//! gradients) and training's memory counted from the config (`train_plan_mb`:
//! [`memory::training_bytes_in`] in the layout and storage it ran in). `--layout` sets the
//! layout of the eval-mode and of the training-mode backbone on CUDA (`auto`, `nchw`,
//! `nhwc`: its blocks channels-last, [`LayoutChoice`]; `auto` is the backend's choice for
//! each); the CPU runs NCHW (and says so when `nhwc` is asked); the JSON lines of the timed
//! workloads name the layout the workload's backbone ran in on the device (`layout`: `nchw`
//! or `nhwc`; `train-step` the training backbone's, the CAM workloads' from the pass's own
//! buffers, the others the eval-mode backbone's).
//! `--act-storage` sets the storage of its channels-last activations on CUDA, of the
//! eval-mode and of the training-mode backbone (`auto`: bf16 at `--precision bf16`, else
//! f32; `f32`; `bf16`, ignored below bf16 precision: [`StorageChoice`]); the JSON lines name
//! the storage used (`act_storage`: `f32` or `bf16`, `f32` when NCHW; `train-step` the
//! training backbone's, the CAM workloads' from the pass's own buffers). `wgmma` says
//! whether the opt-in sm_90a kernels (`ICHCAM_WGMMA=1`) can run on the device.
//! `tiny` is the training CPU default ([`TrainConfig::tiny`]) at its own shapes, so the
//! bench follows that preset when it changes. `--describe` prints the model config and
//! the workload's shapes as JSON (what `scripts/cpu_baseline.sh` rebuilds in PyTorch; the
//! U-Net's config, batch and size for `unet-step`), after checking `--what`.

use std::time::Instant;

use anyhow::{bail, Context};
use ichcam::engine::cuda::backend::{LayoutChoice, StorageChoice};
use ichcam::engine::{Backend, Conv2d};
use ichcam::infer::SegmentOptions;
use ichcam::model::unet::{UNet, UNetConfig};
use ichcam::model::{
    memory, BlockKind, CamChunking, CamPassBufs, IchNet, ModelConfig, OptimizerConfig, ParamGroup,
};
use ichcam::train::config::UNetTrainConfig;
use ichcam::train::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Convolution arithmetic on CUDA: f32 (the reference), tf32 or bf16 (tensor cores,
    /// f32 accumulation; compute capability 8.0+). The CPU takes f32 only. `--what conv`
    /// times f32 and both bf16 kernel families whatever this says, and the tf32 ones too
    /// with tf32.
    #[arg(long, default_value = "f32")]
    precision: ichcam::engine::Precision,
    /// The backbone's layout on CUDA, eval mode (cam, cam-latency) and training mode
    /// (train-step): auto (the backend's choice for each), nchw, or nhwc (its blocks
    /// channels-last between two layout changes). The CPU runs NCHW.
    #[arg(long, default_value = "auto")]
    layout: LayoutChoice,
    /// The layout the workload's backbone runs in on the opened device (`nchw` / `nhwc`):
    /// the training backbone's for train-step, else the eval-mode backbone's.
    #[arg(skip)]
    layout_used: Option<&'static str>,
    /// Whether the sm_90a wgmma kernels were opted in (`ICHCAM_WGMMA=1`) and can run on this
    /// device; None on the CPU.
    #[arg(skip)]
    wgmma_used: Option<bool>,
    /// The storage of the backbone's channels-last activations on CUDA, eval mode (cam,
    /// cam-latency) and training mode (train-step): auto (bf16 at --precision bf16, else
    /// f32), f32, or bf16 (ignored below bf16 precision). The CPU stores f32.
    #[arg(long, default_value = "auto")]
    act_storage: StorageChoice,
    /// The storage those activations take on the opened device (`f32` / `bf16`).
    #[arg(skip)]
    act_storage_used: Option<&'static str>,
    /// tiny (the training CPU default: its model, batch x slices and image size; CAM passes
    /// of the segmenter's slices per pass), small (ResNet-18 + LSTM 3x256, 4x32 slices / 128 slices at 256^2)
    /// or paper (ResNet-101 + LSTM 3x256, 1x32 slices / 32 slices at 512^2).
    #[arg(long, default_value = "tiny")]
    config: String,
    /// conv, train-step, cam, cam-latency, unet-step or ccl.
    #[arg(long, default_value = "conv")]
    what: String,
    /// train-step, unet-step, cam and cam-latency on CUDA: launch the step or pass op by op
    /// instead of replaying it as a CUDA graph.
    #[arg(long)]
    no_graph: bool,
    /// ccl: the mask's size, ZxYxX.
    #[arg(long, default_value = "40x512x512")]
    dims: String,
    /// ccl: the foreground fraction of the mask (hashed white noise).
    #[arg(long, default_value_t = 0.02)]
    fill: f64,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Override the number of sequences (train-step, conv) or of slices (unet-step) of the
    /// config.
    #[arg(long)]
    batch: Option<usize>,
    /// Override the slices per sequence (train-step, conv: its batch is sequences x slices)
    /// or per CAM pass (cam).
    #[arg(long)]
    slices: Option<usize>,
    /// cam, cam-latency: slices per chunk of the pass's backbone (default: the fewest chunks
    /// whose pass fits ichcam's CAM-pass budget, 0.7 GB counted).
    #[arg(long)]
    cam_chunk: Option<usize>,
    /// Override the image size (square).
    #[arg(long)]
    size: Option<usize>,
    /// Also print one JSON line with the figures.
    #[arg(long)]
    json: bool,
    /// Print the model config and the workload's shapes as one JSON line, run nothing.
    #[arg(long)]
    describe: bool,
}

/// The sizes of one benchmark configuration.
struct Preset {
    name: &'static str,
    model: ModelConfig,
    /// (batch, seq) of a stage-1 train step.
    train: (usize, usize),
    /// Slices of one CAM pass.
    cam_slices: usize,
    size: usize,
    /// The stage-3 U-Net (of the training preset's stage 3) and its batch of slices.
    unet: UNetConfig,
    unet_batch: usize,
}

/// The workloads `--what` names.
const WORKLOADS: [&str; 6] = [
    "conv",
    "train-step",
    "cam",
    "cam-latency",
    "unet-step",
    "ccl",
];

fn preset(name: &str) -> anyhow::Result<Preset> {
    Ok(match name {
        "tiny" => {
            // The training CPU default has no stage 3: the U-Net of the `cpu` preset.
            let t = TrainConfig::tiny();
            let u = UNetTrainConfig::cpu();
            Preset {
                name: "tiny",
                unet: u.net(t.model.in_channels),
                unet_batch: u.batch,
                model: t.model,
                train: (t.batch, t.slices),
                cam_slices: SegmentOptions::default().batch_slices,
                size: t.size,
            }
        }
        "small" => {
            let u = UNetTrainConfig::gpu();
            let model = ModelConfig {
                block: BlockKind::Basic,
                layers: vec![2, 2, 2, 2],
                ..ModelConfig::resnet101_lstm()
            };
            Preset {
                name: "small",
                unet: u.net(model.in_channels),
                unet_batch: u.batch,
                model,
                train: (4, 32),
                cam_slices: 128,
                size: 256,
            }
        }
        "paper" => {
            let u = UNetTrainConfig::gpu();
            let model = ModelConfig::resnet101_lstm();
            Preset {
                name: "paper",
                unet: u.net(model.in_channels),
                unet_batch: u.batch,
                model,
                train: (1, 32),
                cam_slices: 32,
                size: 512,
            }
        }
        other => bail!("unknown --config `{other}`: use tiny, small or paper"),
    })
}

/// Median and minimum of per-iteration times in ms, and the process's CPU time (all
/// threads) per iteration, which a loaded machine inflates much less than wall time.
struct Timing {
    median_ms: f64,
    min_ms: f64,
    cpu_ms: Option<f64>,
}

/// User + system CPU time of this process so far in ms (Linux `/proc/self/stat`), if known.
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // USER_HZ is 100 on every Linux ABI Rust targets.
    Some((utime + stime) * 10.0)
}

fn time<F: FnMut() -> anyhow::Result<()>>(
    sync: &dyn Fn() -> anyhow::Result<()>,
    warmup: usize,
    iters: usize,
    mut f: F,
) -> anyhow::Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    sync()?;
    let _ = ichcam::engine::cpu::profile_report(); // drop the warm-up's counts
    let mut ms = Vec::with_capacity(iters.max(1));
    let cpu0 = process_cpu_ms();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        sync()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = match (cpu0, process_cpu_ms()) {
        (Some(a), Some(b)) => Some((b - a) / iters.max(1) as f64),
        _ => None,
    };
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(Timing {
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        cpu_ms,
    })
}

/// Deterministic inputs in [0, 1) (never zeros: zeros can run faster than real data).
fn inputs(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / (1u64 << 24) as f32
        })
        .collect()
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    let p = preset(&args.config)?;
    if !WORKLOADS.contains(&args.what.as_str()) {
        bail!(
            "unknown --what `{}`: use {}",
            args.what,
            WORKLOADS.join(", ")
        );
    }
    if args.describe {
        let mut j = serde_json::json!({
            "config": p.name,
            "what": args.what,
            "model": serde_json::from_str::<serde_json::Value>(&p.model.to_fixture_json())?,
            "batch": args.batch.unwrap_or(p.train.0),
            "slices": args.slices.unwrap_or(p.train.1),
            "cam_slices": cam_slices(&p, &args),
            "graph": !args.no_graph,
            "dims": args.dims,
            "fill": args.fill,
            "size": args.size.unwrap_or(p.size),
            "precision": args.precision.name(),
            "layout": args.layout.name(),
            "act_storage": args.act_storage.name(),
            "unet": serde_json::from_str::<serde_json::Value>(&p.unet.to_json())?,
            "unet_batch": args.batch.unwrap_or(p.unet_batch),
        });
        if args.what == "conv" {
            if let (Some(o), serde_json::Value::Object(c)) =
                (j.as_object_mut(), describe_conv(&p, &args)?)
            {
                o.extend(c);
            }
        }
        println!("{j}");
        return Ok(());
    }
    let mut device = super::open_device(&args.device, false)?;
    device.set_precision(args.precision)?;
    let train_step = args.what == "train-step";
    let (channels_last, storage) = match &mut device {
        ichcam::engine::Device::Cuda(be) => {
            be.set_eval_layout(args.layout);
            be.set_train_layout(args.layout);
            be.set_eval_storage(args.act_storage);
            be.set_train_storage(args.act_storage);
            args.wgmma_used = Some(be.wgmma() && be.wgmma_unavailable().is_none());
            if train_step {
                (be.channels_last_train(), be.train_storage())
            } else {
                (be.channels_last_eval(), be.eval_storage())
            }
        }
        ichcam::engine::Device::Cpu { .. } => {
            if args.layout == LayoutChoice::Nhwc {
                eprintln!(
                    "note: --layout nhwc is a CUDA setting: the CPU backend runs the backbone \
                     NCHW"
                );
            }
            if args.act_storage == StorageChoice::Bf16 {
                eprintln!("note: --act-storage bf16 is a CUDA setting: the CPU backend stores f32");
            }
            (false, ichcam::engine::ActStorage::F32)
        }
    };
    args.layout_used = Some(layout_name(channels_last));
    args.act_storage_used = Some(if channels_last { storage.name() } else { "f32" });
    if args.what == "ccl" {
        return bench_ccl(device, &args);
    }
    if args.what == "conv" {
        return match device {
            ichcam::engine::Device::Cuda(be) => bench_conv_cuda(be, &p, &args),
            ichcam::engine::Device::Cpu { backend, .. } => bench_conv_cpu(backend, &p, &args),
        };
    }
    if let ichcam::engine::Device::Cuda(be) = &device {
        if !args.no_graph && matches!(args.what.as_str(), "cam" | "cam-latency") {
            return bench_cam_graph(be.clone(), &p, &args);
        }
        if !args.no_graph && args.what == "train-step" {
            return bench_train_graph(be.clone(), &p, &args);
        }
        if !args.no_graph && args.what == "unet-step" {
            return bench_unet_graph(be.clone(), &p, &args);
        }
    }
    ichcam::on_device!(device, be => bench(be, &p, &args))
}

/// `nhwc` or `nchw`, as the JSON lines name a layout.
fn layout_name(channels_last: bool) -> &'static str {
    if channels_last {
        "nhwc"
    } else {
        "nchw"
    }
}

/// Slices of one pass of the `cam` / `cam-latency` workloads.
fn cam_slices(p: &Preset, args: &Args) -> usize {
    match args.what.as_str() {
        "cam-latency" => args.slices.unwrap_or(1),
        _ => args.slices.unwrap_or(p.cam_slices),
    }
}

/// Free device memory now (CUDA), in bytes; None without a driver (never a panic).
fn device_free() -> Option<usize> {
    if !ichcam::engine::cuda::device::driver_present() {
        return None;
    }
    std::panic::catch_unwind(cudarc::driver::result::mem_get_info)
        .ok()?
        .ok()
        .map(|(free, _)| free)
}

/// `--cam-chunk`: the CAM pass's slices per chunk (else the default budget's).
fn set_cam_chunk<B: Backend>(net: &mut IchNet<B>, args: &Args) {
    if let Some(m) = args.cam_chunk {
        net.set_cam_chunking(CamChunking::Slices(m));
    }
}

/// The CAM pass's memory as JSON fields, from the model config and from the pass's
/// buffers (MiB of f32): `cam_chunk` (slices per chunk), `act_mb` (the activations the pass
/// allocated: the chunk's eval-mode backbone and staging, [`CamPassBufs::activation_scalars`]),
/// `act_plan_mb` (the same counted from the config, [`memory::cam_pass_activations`]),
/// `act_per_layer_mb` (what keeping every layer's output for all the slices would hold,
/// [`memory::backbone_activations`]: the memory before the plan) and `pass_plan_mb` (the whole
/// pass counted: parameters (an inference-only model holds no gradient buffers), input, outputs and activations,
/// [`memory::cam_pass_bytes`]; beside `device_mb` it shows what the count leaves out); and
/// the detail's words for the chunks.
fn cam_memory<B: Backend>(
    p: &Preset,
    n: usize,
    size: usize,
    bufs: &Option<CamPassBufs<B>>,
) -> anyhow::Result<(serde_json::Value, String)> {
    let b = bufs.as_ref().context("the CAM pass left no buffers")?;
    let (m, cl, lay) = (b.chunk, b.channels_last(), b.layout());
    let mib = |scalars: Option<u128>| scalars.map(|v| (v * 4) as f64 / (1u64 << 20) as f64);
    let cfg = &p.model;
    let j = serde_json::json!({
        "cam_chunk": m,
        "layout": layout_name(cl),
        "act_storage": b.storage().name(),
        "act_mb": mib(Some(b.activation_scalars() as u128)),
        "act_plan_mb": mib(memory::cam_pass_activations(cfg, n, size, size, m, lay)),
        "act_per_layer_mb": mib(memory::backbone_activations(cfg, n, size, size).map(|a| a.0)),
        "pass_plan_mb": mib(memory::cam_pass_bytes(cfg, n, size, size, m, 4, lay).map(|v| v / 4)),
    });
    let mut chunks = if m < n {
        format!(", {} chunks of {m}", n.div_ceil(m))
    } else {
        String::new()
    };
    if cl {
        chunks.push_str(", blocks channels-last");
        if b.storage() == ichcam::engine::ActStorage::Bf16 {
            chunks.push_str(" in bf16");
        }
    }
    Ok((j, chunks))
}

/// The CAM pass on CUDA as a graph: one eager pass (allocates its buffers, loads the
/// kernels), the capture, then replays timed.
fn bench_cam_graph(
    be: ichcam::engine::cuda::CudaBackend,
    p: &Preset,
    args: &Args,
) -> anyhow::Result<()> {
    let size = args.size.unwrap_or(p.size);
    let n = cam_slices(p, args);
    let c = p.model.in_channels;
    let x = inputs(n * c * size * size, 2);
    let free0 = device_free();
    let mut net = IchNet::new(be.clone(), p.model.clone(), 7).context("building the model")?;
    net.set_train(false);
    set_cam_chunk(&mut net, args);
    let xb = net.backend().upload(&x)?;
    let mut bufs = None;
    net.stage2_cam_pass(&xb, n, size, size, &mut bufs)?;
    be.synchronize()?;
    let (mem, chunks) = cam_memory(p, n, size, &bufs)?;
    let used = free0.and_then(|a| device_free().map(|b| a.saturating_sub(b)));
    let (graph, ()) = be
        .capture(|| {
            net.stage2_cam_pass(&xb, n, size, size, &mut bufs)
                .map_err(|e| ichcam::engine::EngineError::Param(e.to_string()))
        })
        .context("capturing the CAM pass as a CUDA graph")?;
    let sync = || -> anyhow::Result<()> { Ok(be.synchronize()?) };
    let t = time(&sync, args.warmup, args.iters, || Ok(graph.replay()?))?;
    let device = be.name();
    report_mem(
        args,
        p.name,
        &args.what,
        &device,
        &t,
        n,
        &format!(
            "{n} slices {size}^2{chunks}, CUDA graph of {} ops",
            graph.nodes()
        ),
        used,
        Some(mem),
    );
    Ok(())
}

/// The stage-1 training step on CUDA as a graph: the first step eager (allocates, loads the
/// kernels), the second captures and replays, the rest replay; every step uploads its batch
/// and reads its loss and logits back, as training does.
fn bench_train_graph(
    be: ichcam::engine::cuda::CudaBackend,
    p: &Preset,
    args: &Args,
) -> anyhow::Result<()> {
    let size = args.size.unwrap_or(p.size);
    let (batch, seq) = (
        args.batch.unwrap_or(p.train.0),
        args.slices.unwrap_or(p.train.1),
    );
    let c = p.model.in_channels;
    let x = inputs(batch * seq * c * size * size, 1);
    let labels: Vec<f32> = (0..batch * seq).map(|i| ((i / 3) % 2) as f32).collect();
    let free0 = device_free();
    let mut net = IchNet::new(be.clone(), p.model.clone(), 7).context("building the model")?;
    net.set_train(true);
    let opt = OptimizerConfig::paper_sgd();
    let mut steps = ichcam::model::net_graph::GraphSteps::default();
    let mut last_loss = f64::NAN;
    let mut step = |net: &mut IchNet<_>| -> anyhow::Result<()> {
        let s = net
            .stage1_step_graphed(&mut steps, &x, &labels, batch, seq, size, size, 1.0, &opt)
            .context("the graphed training step")?;
        last_loss = s.loss;
        Ok(())
    };
    // The eager first step and the capture, untimed.
    step(&mut net)?;
    step(&mut net)?;
    be.synchronize()?;
    let used = free0.and_then(|a| device_free().map(|b| a.saturating_sub(b)));
    let sync = || -> anyhow::Result<()> { Ok(be.synchronize()?) };
    let t = time(&sync, args.warmup, args.iters, || step(&mut net))?;
    let nodes = steps.graph.as_ref().map_or(0, |g| g.nodes());
    let (captures, replays, eager) = steps.counts();
    let device = be.name();
    report_mem(
        args,
        p.name,
        "train-step",
        &device,
        &t,
        batch * seq,
        &format!(
            "{batch}x{seq} slices {size}^2, loss {last_loss:.4}, CUDA graph of {nodes} ops \
             ({captures} capture, {replays} replays, {eager} eager steps)"
        ),
        used,
        train_buffers(&net, batch, seq, size),
    );
    Ok(())
}

/// The `layout` and `act_storage` JSON fields of a training step from the training
/// backbone's own buffers (what it ran in: the backend's settings when they were built),
/// and their memory: `train_bb_mb` (MiB of f32 slots the training backbone's buffers hold,
/// its activations and their gradients in the shared buffers of its gradient plan, as
/// built), `train_plan_mb` (all that training holds, counted from the config:
/// [`memory::training_bytes_in`] for that layout and storage; beside `device_mb` it shows
/// what the count leaves out, e.g. the arena's scratch and a CUDA graph).
fn train_buffers<B: Backend>(
    net: &IchNet<B>,
    batch: usize,
    seq: usize,
    size: usize,
) -> Option<serde_json::Value> {
    use ichcam::engine::ActStorage;
    let cl = net.train_channels_last()?;
    let st = net.train_storage()?;
    let lay = match (cl, st) {
        (false, _) => memory::ActLayout::Nchw,
        (true, ActStorage::Bf16) if net.backend().storage_slots(st, 2) < 2 => {
            memory::ActLayout::NhwcBf16
        }
        (true, _) => memory::ActLayout::Nhwc,
    };
    let mib = |bytes: u128| bytes as f64 / (1u64 << 20) as f64;
    let bb = net
        .train_backbone_slots()
        .and_then(|(a, g)| Some(mib((a as u128 + g? as u128) * 4)));
    let plan = memory::training_bytes_in(net.cfg(), batch, seq, size, 4, lay).map(mib);
    Some(serde_json::json!({
        "layout": layout_name(cl),
        "act_storage": st.name(),
        "train_bb_mb": bb,
        "train_plan_mb": plan,
    }))
}

/// The U-Net step's inputs: `[n, in_channels, size, size]` images and soft targets in
/// [0, 1] (a disc per slice, so the Dice is not degenerate).
fn unet_inputs(p: &Preset, n: usize, size: usize) -> (Vec<f32>, Vec<f32>) {
    let x = inputs(n * p.unet.in_channels * size * size, 6);
    let r2 = (size as f64 / 4.0).powi(2);
    let c = size as f64 / 2.0;
    let plane: Vec<f32> = (0..size * size)
        .map(|i| {
            let (y, x) = ((i / size) as f64 - c, (i % size) as f64 - c);
            f32::from(u8::from(y * y + x * x < r2))
        })
        .collect();
    let t = (0..n * p.unet.out_channels)
        .flat_map(|_| plane.iter().copied())
        .collect();
    (x, t)
}

/// The stage-3 U-Net's training step on CUDA as a graph: the first step eager (allocates,
/// loads the kernels), the second captures and replays, the rest replay; every step uploads
/// its batch and reads its losses back, as [`UNet::train_step_graphed`] does.
fn bench_unet_graph(
    be: ichcam::engine::cuda::CudaBackend,
    p: &Preset,
    args: &Args,
) -> anyhow::Result<()> {
    let size = args.size.unwrap_or(p.size);
    let n = args.batch.unwrap_or(p.unet_batch);
    let (x, t) = unet_inputs(p, n, size);
    let free0 = device_free();
    let mut unet = UNet::new(be.clone(), p.unet.clone(), 7).context("building the U-Net")?;
    let opt = OptimizerConfig::adam(1e-3);
    let mut steps = ichcam::model::unet::graph::UNetSteps::default();
    let mut last_loss = f64::NAN;
    let mut step = |unet: &mut UNet<_>| -> anyhow::Result<()> {
        let l = unet
            .train_step_graphed(&mut steps, &x, &t, n, size, size, &opt)
            .context("the graphed U-Net step")?;
        last_loss = l.loss;
        Ok(())
    };
    // The eager first step and the capture, untimed.
    step(&mut unet)?;
    step(&mut unet)?;
    be.synchronize()?;
    let used = free0.and_then(|a| device_free().map(|b| a.saturating_sub(b)));
    let sync = || -> anyhow::Result<()> { Ok(be.synchronize()?) };
    let timing = time(&sync, args.warmup, args.iters, || step(&mut unet))?;
    let nodes = steps.graph.as_ref().map_or(0, |g| g.nodes());
    let (captures, replays, eager) = steps.counts();
    if let Some(why) = steps.graph.as_ref().and_then(|g| g.failure()) {
        eprintln!("the U-Net step ran eagerly: {why}");
    }
    let device = be.name();
    report_mem(
        args,
        p.name,
        "unet-step",
        &device,
        &timing,
        n,
        &format!(
            "{n} slices {size}^2, features {} depth {}, loss {last_loss:.4}, CUDA graph of \
             {nodes} ops ({captures} capture, {replays} replays, {eager} eager steps)",
            p.unet.features, p.unet.depth
        ),
        used,
        None,
    );
    Ok(())
}

/// 3-D connected components of a hashed white-noise mask (as tests/cuda_seg_parity.rs's
/// timings), 26-connectivity.
fn bench_ccl(device: ichcam::engine::Device, args: &Args) -> anyhow::Result<()> {
    use ichcam::engine::Connectivity;
    let d: Vec<usize> = args
        .dims
        .split('x')
        .map(|v| v.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--dims `{}`: expected ZxYxX", args.dims))?;
    let [nz, ny, nx] = d[..] else {
        bail!("--dims `{}`: expected three sizes ZxYxX", args.dims);
    };
    if !(0.0..=1.0).contains(&args.fill) {
        bail!("--fill {} must be a fraction in [0, 1]", args.fill);
    }
    let n = nz
        .checked_mul(ny)
        .and_then(|v| v.checked_mul(nx))
        .filter(|&v| v > 0)
        .with_context(|| format!("--dims `{}`: empty or too large", args.dims))?;
    ichcam::io::budget::budget().check(std::path::Path::new("ccl"), n as u128 * 16, || {
        format!("benchmarking ccl at {}", args.dims)
    })?;
    let thr = (args.fill * (1u64 << 32) as f64) as u64;
    let host: Vec<u8> = (0..n as u64)
        .map(|i| {
            let mut z = (i ^ 0x5EED).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            u8::from(((z ^ (z >> 31)) & 0xFFFF_FFFF) < thr)
        })
        .collect();
    let detail = format!("{nz}x{ny}x{nx} {:.0}%", args.fill * 100.0);
    let name = device.name();
    match device {
        ichcam::engine::Device::Cuda(be) => {
            use ichcam::engine::cuda::ccl::CclRun;
            let free0 = device_free();
            let mask = be.stream().clone_htod(&host)?;
            let mut labels = be.stream().alloc_zeros::<u32>(n)?;
            let mut run = CclRun::new(&be, (nz, ny, nx), Connectivity::TwentySix, false)?;
            run.launch(&be, &mask, &mut labels)?;
            be.synchronize()?;
            let used = free0.and_then(|a| device_free().map(|b| a.saturating_sub(b)));
            let sync = || -> anyhow::Result<()> { Ok(be.synchronize()?) };
            let t = time(&sync, args.warmup, args.iters, || {
                Ok(run.launch(&be, &mask, &mut labels)?)
            })?;
            let (count, _) = run.collect(&be)?;
            report_mem(
                args,
                "-",
                "ccl",
                &name,
                &t,
                nz,
                &format!("{detail}, {count} components"),
                used,
                None,
            );
        }
        ichcam::engine::Device::Cpu { .. } => {
            let mask =
                ndarray::Array3::from_shape_vec((nz, ny, nx), host).context("building the mask")?;
            let sync = || -> anyhow::Result<()> { Ok(()) };
            let mut count = 0;
            let t = time(&sync, args.warmup, args.iters, || {
                let out =
                    ichcam::engine::cpu::ccl::connected_components(&mask, Connectivity::TwentySix)?;
                count = out.n_components();
                Ok(())
            })?;
            report(
                args,
                "-",
                "ccl",
                &name,
                &t,
                nz,
                &format!("{detail}, {count} components"),
            );
        }
    }
    Ok(())
}

fn bench<B: Backend<T = f32> + 'static>(be: B, p: &Preset, args: &Args) -> anyhow::Result<()> {
    let size = args.size.unwrap_or(p.size);
    // Host memory, before anything is allocated (sizes come from the command line): the
    // workload's inputs, and on the CPU its activations (on a GPU they are device memory).
    {
        use ichcam::model::memory::{param_bytes, training_bytes};
        let on_host = be.name().starts_with("cpu");
        let plane = (size as u128).pow(2);
        let input = |k: usize| k as u128 * p.model.in_channels as u128 * plane * 4;
        let need = match args.what.as_str() {
            "train-step" => {
                let (b, q) = (
                    args.batch.unwrap_or(p.train.0),
                    args.slices.unwrap_or(p.train.1),
                );
                let model = if on_host {
                    training_bytes(&p.model, b, q, size, 4)
                } else {
                    param_bytes(&p.model, 4, true)
                };
                model.map(|t| t + input(b * q))
            }
            // The whole pass (parameters, input, outputs, activations) at its chunk.
            "cam" | "cam-latency" => {
                let n = cam_slices(p, args);
                let m = match args.cam_chunk {
                    Some(m) => memory::even_chunk(n, m),
                    None => memory::cam_pass_chunk(
                        &p.model,
                        n,
                        size,
                        size,
                        4,
                        ichcam::model::CAM_PASS_BUDGET,
                        memory::ActLayout::of(&be),
                    ),
                };
                if on_host {
                    memory::cam_pass_bytes(
                        &p.model,
                        n,
                        size,
                        size,
                        m,
                        4,
                        memory::ActLayout::of(&be),
                    )
                } else {
                    param_bytes(&p.model, 4, false).map(|t| t + input(n))
                }
            }
            // Activations with their gradients (about twice), inputs and targets.
            "unet-step" => {
                let n = args.batch.unwrap_or(p.unet_batch);
                p.unet
                    .activation_bytes(n, size, size, 4)
                    .map(|a| (if on_host { 3 * a } else { 0 }) + input(n) * 2)
            }
            // `conv` and `ccl` check their own.
            _ => Some(0),
        };
        ichcam::io::budget::budget().check(
            std::path::Path::new(&args.what),
            need.unwrap_or(u128::MAX),
            || format!("benchmarking `{}` at {size}^2", p.name),
        )?;
    }
    let device = be.name();
    // On CUDA: free device memory before the workload is built; the stream-ordered pool
    // keeps what it freed, so free memory after the timed runs measures the workload's peak.
    let on_cuda = device.starts_with("cuda");
    let free0 = if on_cuda { device_free() } else { None };
    let used = || free0.and_then(|a| device_free().map(|b| a.saturating_sub(b)));
    match args.what.as_str() {
        "train-step" => {
            let (batch, seq) = (
                args.batch.unwrap_or(p.train.0),
                args.slices.unwrap_or(p.train.1),
            );
            let c = p.model.in_channels;
            let x = inputs(batch * seq * c * size * size, 1);
            let labels: Vec<f32> = (0..batch * seq).map(|i| ((i / 3) % 2) as f32).collect();
            let mut net = IchNet::new(be, p.model.clone(), 7).context("building the model")?;
            net.set_train(true);
            let opt = OptimizerConfig::paper_sgd();
            let mut last_loss = f64::NAN;
            let t = {
                let sync_net = std::cell::RefCell::new(&mut net);
                let sync =
                    || -> anyhow::Result<()> { Ok(sync_net.borrow().backend().synchronize()?) };
                time(&sync, args.warmup, args.iters, || {
                    let mut n = sync_net.borrow_mut();
                    let step =
                        n.stage1_forward_backward(&x, &labels, batch, seq, size, size, 1.0)?;
                    n.step(&opt, ParamGroup::Stage1)?;
                    last_loss = step.loss;
                    Ok(())
                })?
            };
            report_mem(
                args,
                p.name,
                "train-step",
                &device,
                &t,
                batch * seq,
                &format!(
                    "{batch}x{seq} slices {size}^2, loss {last_loss:.4}{}",
                    if on_cuda { ", eager launches" } else { "" }
                ),
                used(),
                train_buffers(&net, batch, seq, size),
            );
            Ok(())
        }
        "cam" | "cam-latency" => {
            let n = cam_slices(p, args);
            let c = p.model.in_channels;
            let x = inputs(n * c * size * size, 2);
            let mut net = IchNet::new(be, p.model.clone(), 7).context("building the model")?;
            net.set_train(false);
            set_cam_chunk(&mut net, args);
            let xb = net.backend().upload(&x)?;
            let mut bufs = None;
            let t = {
                let cell = std::cell::RefCell::new(&mut net);
                let sync = || -> anyhow::Result<()> { Ok(cell.borrow().backend().synchronize()?) };
                time(&sync, args.warmup, args.iters, || {
                    // The CAM upsampled and normalised at the input size, as the baselines.
                    cell.borrow_mut()
                        .stage2_cam_pass(&xb, n, size, size, &mut bufs)?;
                    Ok(())
                })?
            };
            let (mem, chunks) = cam_memory(p, n, size, &bufs)?;
            report_mem(
                args,
                p.name,
                &args.what,
                &device,
                &t,
                n,
                &format!(
                    "{n} slices {size}^2{chunks}{}",
                    if on_cuda { ", eager launches" } else { "" }
                ),
                used(),
                Some(mem),
            );
            Ok(())
        }
        "unet-step" => {
            let n = args.batch.unwrap_or(p.unet_batch);
            let (x, targets) = unet_inputs(p, n, size);
            let mut unet = UNet::new(be, p.unet.clone(), 7).context("building the U-Net")?;
            let opt = OptimizerConfig::adam(1e-3);
            let mut last_loss = f64::NAN;
            let t = {
                let cell = std::cell::RefCell::new(&mut unet);
                let sync = || -> anyhow::Result<()> { Ok(cell.borrow().backend().synchronize()?) };
                time(&sync, args.warmup, args.iters, || {
                    let mut u = cell.borrow_mut();
                    last_loss = u.forward_backward(&x, &targets, n, size, size)?.loss;
                    u.step(&opt)?;
                    Ok(())
                })?
            };
            report_mem(
                args,
                p.name,
                "unet-step",
                &device,
                &t,
                n,
                &format!(
                    "{n} slices {size}^2, features {} depth {}, loss {last_loss:.4}{}",
                    p.unet.features,
                    p.unet.depth,
                    if on_cuda { ", eager launches" } else { "" }
                ),
                used(),
                None,
            );
            Ok(())
        }
        other => bail!("unknown --what `{other}`: use {}", WORKLOADS.join(", ")),
    }
}

/// One distinct convolution shape of the backbone: the shape, the parameter names of the
/// convolutions that have it (torchvision's, in network order: how many times a forward
/// pass runs it), and how many of them a training step takes the data gradient of (all but
/// the stem's: the input needs none, `resnet.rs` skips it).
struct NetConv {
    s: Conv2d,
    layers: Vec<String>,
    dgrad: usize,
}

impl NetConv {
    /// How many times a training step runs `pass` (0 forward, 1 data gradient, 2 weight
    /// gradient) on this shape.
    fn count(&self, pass: usize) -> usize {
        if pass == 1 {
            self.dgrad
        } else {
            self.layers.len()
        }
    }
}

/// The passes of a convolution, as the JSON lines name them.
const PASSES: [&str; 3] = ["fwd", "dgrad", "wgrad"];

/// The backbone's convolutions on `n` images of `size^2`, distinct shapes in order of first
/// use. `resnet.rs` keeps its layer specs crate-private (and `src/model` is not this
/// command's to change), so this mirrors `resnet::declare` from the public config: the stem
/// 7x7/2 pad 3 then the 3x3/2 pad 1 max-pool; per stage `i` of width `base << i`, blocks
/// with the stride (2 from the second stage on) on the 3x3 (basic: 3x3, 3x3; bottleneck:
/// 1x1, 3x3, 1x1 to 4x the width) and a 1x1 downsample where the stride or the channel
/// count changes. tests/bench_conv.rs compares the list with a built network's parameters
/// (names and weight shapes), the feature map with `memory::backbone_activations` and the
/// multiply-adds at 224^2 with torchvision's published figures.
fn backbone_convs(cfg: &ModelConfig, n: usize, size: usize) -> anyhow::Result<Vec<NetConv>> {
    if n == 0 || size == 0 {
        bail!("the convolution bench needs at least one slice of at least 1x1");
    }
    if n > 1 << 20 || size > 1 << 20 {
        bail!("{n} slices of {size}^2: too large for the convolution bench");
    }
    let mut out: Vec<NetConv> = Vec::new();
    let mut add = |name: String, s: Conv2d, dgrad: bool| {
        match out.iter_mut().find(|c| c.s == s) {
            Some(c) => {
                c.layers.push(name);
                c.dgrad += usize::from(dgrad);
            }
            None => out.push(NetConv {
                s,
                layers: vec![name],
                dgrad: usize::from(dgrad),
            }),
        }
        (s.out_h(), s.c_out)
    };
    let conv = |c_in: usize, h: usize, c_out: usize, k: usize, stride: usize, pad: usize| Conv2d {
        n,
        c_in,
        h,
        w: h,
        c_out,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    let base = cfg.base_width;
    let (stem, _) = add(
        "conv1".into(),
        conv(cfg.in_channels, size, base, 7, 2, 3),
        false,
    );
    let mut h = (stem + 2 - 3) / 2 + 1; // the max-pool
    let mut cin = base;
    for (i, &blocks) in cfg.layers.iter().enumerate() {
        let w = base
            .checked_shl(i as u32)
            .filter(|v| v >> i == base)
            .context("stage width overflows")?;
        for j in 0..blocks {
            let stride = if j == 0 && i > 0 { 2 } else { 1 };
            let p = format!("layer{}.{j}", i + 1);
            let (oh, cout) = match cfg.block {
                BlockKind::Basic => {
                    let (oh, _) = add(format!("{p}.conv1"), conv(cin, h, w, 3, stride, 1), true);
                    add(format!("{p}.conv2"), conv(w, oh, w, 3, 1, 1), true)
                }
                BlockKind::Bottleneck => {
                    add(format!("{p}.conv1"), conv(cin, h, w, 1, 1, 0), true);
                    let (oh, _) = add(format!("{p}.conv2"), conv(w, h, w, 3, stride, 1), true);
                    add(format!("{p}.conv3"), conv(w, oh, w * 4, 1, 1, 0), true)
                }
            };
            if stride != 1 || cin != cout {
                add(
                    format!("{p}.downsample.0"),
                    conv(cin, h, cout, 1, stride, 0),
                    true,
                );
            }
            (h, cin) = (oh, cout);
        }
    }
    Ok(out)
}

/// `--what conv`'s slices: `--batch` sequences (default the preset's train batch) times
/// `--slices` (default its sequence length), as one train step's backbone sees them.
fn conv_slices(p: &Preset, args: &Args) -> usize {
    args.batch
        .unwrap_or(p.train.0)
        .saturating_mul(args.slices.unwrap_or(p.train.1))
}

/// The shape's sizes as JSON fields (square inputs and kernels: `h`, `k`).
fn conv_fields(s: &Conv2d) -> serde_json::Map<String, serde_json::Value> {
    let j = serde_json::json!({
        "n": s.n, "c_in": s.c_in, "h": s.h, "w": s.w, "c_out": s.c_out, "k": s.kh,
        "stride": s.stride, "pad": s.pad, "out_h": s.out_h(), "out_w": s.out_w(),
    });
    match j {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// Multiply-adds of one pass of `s`, counted in u128 (a `--size` or `--batch` from the
/// command line must not overflow before the memory check refuses it).
fn conv_macs(s: &Conv2d) -> u128 {
    [s.n, s.c_out, s.out_h(), s.out_w(), s.c_in, s.kh, s.kw]
        .iter()
        .fold(1u128, |a, &v| a.saturating_mul(v as u128))
}

/// Host bytes the bench of `s` holds at once: x, w, dy and on the CPU y, dx, dw too (the
/// device holds those on a GPU), f32.
fn conv_bytes(s: &Conv2d) -> u128 {
    let m = |v: &[usize]| v.iter().fold(1u128, |a, &x| a.saturating_mul(x as u128));
    let x = m(&[s.n, s.c_in, s.h, s.w]);
    let y = m(&[s.n, s.c_out, s.out_h(), s.out_w()]);
    let w = m(&[s.c_out, s.c_in, s.kh, s.kw]);
    2u128.saturating_mul(x.saturating_add(y).saturating_add(w)) * 4
}

/// `--describe` for `--what conv`: the distinct shapes, each with its first layer's name,
/// its layers and the passes' counts, and the kernels' variants that would be timed.
fn describe_conv(p: &Preset, args: &Args) -> anyhow::Result<serde_json::Value> {
    let size = args.size.unwrap_or(p.size);
    let convs = backbone_convs(&p.model, conv_slices(p, args), size)?;
    let shapes: Vec<serde_json::Value> = convs
        .iter()
        .map(|c| {
            let mut m = conv_fields(&c.s);
            m.insert("layer".into(), c.layers[0].clone().into());
            m.insert("layers".into(), c.layers.clone().into());
            m.insert("count".into(), c.layers.len().into());
            m.insert("dgrad_count".into(), c.dgrad.into());
            m.insert("macs".into(), conv_macs(&c.s).to_string().into());
            serde_json::Value::Object(m)
        })
        .collect();
    let total: usize = convs.iter().map(|c| c.layers.len()).sum();
    let macs: u128 = convs
        .iter()
        .map(|c| conv_macs(&c.s).saturating_mul(c.layers.len() as u128))
        .sum();
    Ok(serde_json::json!({
        "conv_shapes": shapes,
        "conv_count": total,
        "conv_fwd_macs": macs.to_string(),
        "conv_variants": conv_variant_names(args),
    }))
}

/// The kernel families `--what conv` times on CUDA: f32, then per tensor-core precision
/// (bf16; tf32 too with `--precision tf32`) the WMMA kernels (`MmaRoute::Never`) and the
/// `mma.sync` ones (`MmaRoute::Always`); the CPU times its f32 convolutions.
fn conv_tc_precisions(args: &Args) -> Vec<ichcam::engine::Precision> {
    use ichcam::engine::Precision;
    match args.precision {
        Precision::Tf32 => vec![Precision::Bf16, Precision::Tf32],
        _ => vec![Precision::Bf16],
    }
}

fn conv_variant_names(args: &Args) -> Vec<String> {
    let mut v = vec!["f32".to_string()];
    for p in conv_tc_precisions(args) {
        v.push(format!("wmma-{p}"));
        v.push(format!("mma-{p}"));
    }
    v
}

/// One family of kernels `--what conv` times: its label (`f32`, `wmma-bf16`, `mma-bf16`,
/// ...), the backend set to its precision and route, and the route's name.
struct ConvVariant<B> {
    label: String,
    precision: ichcam::engine::Precision,
    route: &'static str,
    be: B,
}

/// The kernel names of each variant and shape (`CudaBackend::conv_kernels`; the CPU's op
/// names), and per tensor-core precision the variant `MmaRoute::Auto` picks for each shape
/// and pass (None on the CPU).
struct ConvKernels {
    names: Vec<Vec<[&'static str; 3]>>,
    auto: Vec<(ichcam::engine::Precision, Vec<[usize; 3]>)>,
}

/// `--what conv` on CUDA: the variants as clones of `be` (sharing its stream and kernels)
/// and what `MmaRoute::Auto` would take.
fn bench_conv_cuda(
    be: ichcam::engine::cuda::CudaBackend,
    p: &Preset,
    args: &Args,
) -> anyhow::Result<()> {
    use ichcam::engine::cuda::MmaRoute;
    use ichcam::engine::Precision;
    let size = args.size.unwrap_or(p.size);
    let convs = backbone_convs(&p.model, conv_slices(p, args), size)?;
    let mut variants = Vec::new();
    let mut f32_be = be.clone();
    f32_be.set_precision(Precision::F32)?;
    variants.push(ConvVariant {
        label: "f32".into(),
        precision: Precision::F32,
        route: "-",
        be: f32_be,
    });
    let mut auto = Vec::new();
    for prec in conv_tc_precisions(args) {
        // A GPU without tensor cores at `prec` times the rest, and says so.
        let mut a = be.clone();
        if let Err(e) = a.set_precision(prec) {
            println!("bench conv: no {prec} kernels timed: {e}");
            continue;
        }
        a.set_mma_route(MmaRoute::Auto);
        for (route, name, r) in [
            (MmaRoute::Never, "wmma", "never"),
            (MmaRoute::Always, "mma", "always"),
        ] {
            let mut b = a.clone();
            b.set_mma_route(route);
            variants.push(ConvVariant {
                label: format!("{name}-{prec}"),
                precision: prec,
                route: r,
                be: b,
            });
        }
        auto.push((prec, a));
    }
    let names: Vec<Vec<[&'static str; 3]>> = variants
        .iter()
        .map(|v| convs.iter().map(|c| v.be.conv_kernels(&c.s)).collect())
        .collect();
    // Auto's kernel per shape and pass is one of the two routes' kernels at its precision.
    let mut auto_picks = Vec::new();
    for (prec, a) in &auto {
        let mut picks = Vec::new();
        for (i, c) in convs.iter().enumerate() {
            let k = a.conv_kernels(&c.s);
            let mut pick = [0usize; 3];
            for pass in 0..3 {
                pick[pass] = (0..variants.len())
                    .find(|&v| variants[v].precision == *prec && names[v][i][pass] == k[pass])
                    .with_context(|| {
                        format!(
                            "MmaRoute::Auto takes {} for {}, neither route's kernel",
                            k[pass], c.layers[0]
                        )
                    })?;
            }
            picks.push(pick);
        }
        auto_picks.push((*prec, picks));
    }
    let device = be.name();
    bench_conv_net(
        &variants,
        &ConvKernels {
            names,
            auto: auto_picks,
        },
        &convs,
        p,
        args,
        &device,
    )
}

/// `--what conv` on the CPU: its f32 convolutions, timed the same way.
fn bench_conv_cpu<B: Backend<T = f32>>(be: B, p: &Preset, args: &Args) -> anyhow::Result<()> {
    let size = args.size.unwrap_or(p.size);
    let convs = backbone_convs(&p.model, conv_slices(p, args), size)?;
    let device = be.name();
    let names = vec![convs
        .iter()
        .map(|_| ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"])
        .collect()];
    let variants = [ConvVariant {
        label: "f32".into(),
        precision: ichcam::engine::Precision::F32,
        route: "-",
        be,
    }];
    bench_conv_net(
        &variants,
        &ConvKernels {
            names,
            auto: Vec::new(),
        },
        &convs,
        p,
        args,
        &device,
    )
}

/// Times the forward, data gradient and weight gradient of every distinct convolution of
/// the backbone on every variant (the data gradient of a shape no training step takes it
/// of, the stem's, is not timed); prints a table per shape and pass (median ms and TFLOP/s
/// per variant, Auto's pick and the best), the network's convolution time per variant (the
/// sum of count x median over shapes and passes), and with `--json` one line per (shape,
/// pass, variant) and one `conv-summary` line per variant, Auto and the best per precision.
fn bench_conv_net<B: Backend<T = f32>>(
    variants: &[ConvVariant<B>],
    kernels: &ConvKernels,
    convs: &[NetConv],
    p: &Preset,
    args: &Args,
    device: &str,
) -> anyhow::Result<()> {
    let need = convs.iter().map(|c| conv_bytes(&c.s)).max().unwrap_or(0);
    ichcam::io::budget::budget().check(std::path::Path::new("conv"), need, || {
        format!("benchmarking the convolutions of `{}`", p.name)
    })?;
    let size = args.size.unwrap_or(p.size);
    let n = conv_slices(p, args);
    let total: usize = convs.iter().map(|c| c.layers.len()).sum();
    println!(
        "bench conv config={} device=\"{device}\": {} distinct shapes of {total} convolutions, {n} slices {size}^2; median ms (TFLOP/s) over {} iters",
        p.name,
        convs.len(),
        args.iters.max(1)
    );
    let descs: Vec<String> = convs
        .iter()
        .map(|c| {
            let s = &c.s;
            format!(
                "{}x{}x{}x{} {}x{}/{} -> {} ({})",
                s.n, s.c_in, s.h, s.w, s.kh, s.kw, s.stride, s.c_out, c.layers[0]
            )
        })
        .collect();
    let col = descs.iter().map(String::len).max().unwrap_or(0).max(19);
    let mut head = format!(
        "{:<col$} {:<5} {:>5} |",
        "shape (first layer)", "pass", "count"
    );
    for v in variants {
        head.push_str(&format!(" {:>18}", v.label));
    }
    for (prec, _) in &kernels.auto {
        head.push_str(&format!(" | auto-{prec} (best)"));
    }
    println!("{head}");
    let be0 = &variants[0].be;
    // ms[shape][pass][variant]: the medians (None: not timed).
    let mut ms: Vec<[Vec<Option<f64>>; 3]> = Vec::new();
    // The JSON lines, printed after the table (the summaries' last, for a log's tail).
    let mut json_rows: Vec<String> = Vec::new();
    for (i, c) in convs.iter().enumerate() {
        let s = &c.s;
        let x = be0.upload(&inputs(s.x_len(), 3))?;
        let w = be0.upload(&inputs(s.w_len(), 4))?;
        let dy = be0.upload(&inputs(s.y_len(), 5))?;
        let mut y = be0.zeros(s.y_len())?;
        let mut dx = be0.zeros(s.x_len())?;
        let mut dw = be0.zeros(s.w_len())?;
        let flops = 2.0 * conv_macs(s) as f64;
        let mut row: [Vec<Option<f64>>; 3] = Default::default();
        let desc = &descs[i];
        for pass in 0..3 {
            for (vi, v) in variants.iter().enumerate() {
                if c.count(pass) == 0 {
                    row[pass].push(None);
                    continue;
                }
                let b = &v.be;
                let sync = || -> anyhow::Result<()> { Ok(b.synchronize()?) };
                let t = time(&sync, args.warmup, args.iters, || {
                    match pass {
                        0 => b.conv2d_fwd(s, &x, &w, &mut y)?,
                        1 => b.conv2d_bwd_data(s, &dy, &w, &mut dx)?,
                        _ => b.conv2d_bwd_weight(s, &x, &dy, &mut dw)?,
                    }
                    Ok(())
                })?;
                row[pass].push(Some(t.median_ms));
                if args.json {
                    let mut m = conv_fields(s);
                    let auto = kernels
                        .auto
                        .iter()
                        .any(|(prec, picks)| *prec == v.precision && picks[i][pass] == vi);
                    let extra = serde_json::json!({
                        "what": "conv", "config": p.name, "device": device, "shape": i,
                        "layer": c.layers[0], "pass": PASSES[pass], "kernel": kernels.names[vi][i][pass],
                        "variant": v.label, "route": v.route, "precision": v.precision.name(),
                        "median_ms": t.median_ms, "min_ms": t.min_ms,
                        "tflops": flops / t.median_ms / 1e9, "count": c.count(pass),
                        "auto": auto, "iters": args.iters,
                    });
                    if let serde_json::Value::Object(e) = extra {
                        m.extend(e);
                    }
                    json_rows.push(serde_json::Value::Object(m).to_string());
                }
            }
            if c.count(pass) == 0 {
                continue;
            }
            let mut line = format!(
                "{:<col$} {:<5} {:>5} |",
                if pass == 0 { desc.as_str() } else { "" },
                PASSES[pass],
                c.count(pass)
            );
            for t in &row[pass] {
                line.push_str(&match t {
                    Some(t) => format!(" {:>9.3} ({:>6.2})", t, flops / t / 1e9),
                    None => format!(" {:>18}", "-"),
                });
            }
            for (prec, picks) in &kernels.auto {
                let a = picks[i][pass];
                let best = best_variant(variants, &row[pass], *prec);
                line.push_str(&format!(
                    " | {}{}",
                    variants[a].label,
                    match best {
                        Some(b) if b != a => format!(" ({})", variants[b].label),
                        _ => String::new(),
                    }
                ));
            }
            println!("{line}");
        }
        ms.push(row);
    }
    // The network's convolution time per variant: sum of count x median.
    let sum = |f: &dyn Fn(usize, usize) -> Option<f64>| -> [f64; 3] {
        let mut t = [0.0; 3];
        for (i, c) in convs.iter().enumerate() {
            for (pass, tp) in t.iter_mut().enumerate() {
                if c.count(pass) > 0 {
                    *tp += c.count(pass) as f64 * f(i, pass).unwrap_or(f64::NAN);
                }
            }
        }
        t
    };
    let mut totals: Vec<(String, String, &str, [f64; 3])> = variants
        .iter()
        .enumerate()
        .map(|(vi, v)| {
            (
                v.label.clone(),
                v.precision.name().to_string(),
                v.route,
                sum(&|i, pass| ms[i][pass][vi]),
            )
        })
        .collect();
    let mut auto_lines = Vec::new();
    for (prec, picks) in &kernels.auto {
        totals.push((
            format!("auto-{prec}"),
            prec.name().into(),
            "auto",
            sum(&|i, pass| ms[i][pass][picks[i][pass]]),
        ));
        totals.push((
            format!("best-{prec}"),
            prec.name().into(),
            "best",
            sum(&|i, pass| {
                best_variant(variants, &ms[i][pass], *prec).and_then(|b| ms[i][pass][b])
            }),
        ));
        let (mut slower, mut pairs, mut lost) = (0usize, 0usize, 0.0f64);
        for (i, c) in convs.iter().enumerate() {
            for (pass, pick) in picks[i].iter().enumerate() {
                if c.count(pass) == 0 {
                    continue;
                }
                pairs += 1;
                let best = best_variant(variants, &ms[i][pass], *prec);
                if let (Some(b), Some(ta)) = (best, ms[i][pass][*pick]) {
                    if b != *pick {
                        slower += 1;
                        lost += c.count(pass) as f64 * (ta - ms[i][pass][b].unwrap_or(ta));
                    }
                }
            }
        }
        auto_lines.push((format!("auto-{prec}"), slower, pairs, lost));
    }
    for (label, prec, route, t) in &totals {
        if args.json {
            let auto = auto_lines.iter().find(|a| &a.0 == label);
            json_rows.push(format!(
                "{}",
                serde_json::json!({
                    "what": "conv-summary", "config": p.name, "device": device, "variant": label,
                    "precision": prec, "route": route, "fwd_ms": t[0], "dgrad_ms": t[1],
                    "wgrad_ms": t[2], "total_ms": t[0] + t[1] + t[2], "shapes": convs.len(),
                    "convs": total, "iters": args.iters,
                    "auto_slower": auto.map(|a| a.1), "pairs": auto.map(|a| a.2),
                    "auto_lost_ms": auto.map(|a| a.3),
                })
            ));
        }
    }
    for j in &json_rows {
        println!("{j}");
    }
    println!(
        "network conv time (sum of count x median, ms): {:<12} {:>10} {:>10} {:>10} {:>10}",
        "variant", "fwd", "dgrad", "wgrad", "total"
    );
    for (label, _, _, t) in &totals {
        println!(
            "{:<47} {label:<12} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            "",
            t[0],
            t[1],
            t[2],
            t[0] + t[1] + t[2]
        );
    }
    for (label, slower, pairs, lost) in &auto_lines {
        println!(
            "{label}: a slower kernel than its precision's best on {slower} of {pairs} (shape, pass) pairs, {lost:.3} ms per step lost"
        );
    }
    Ok(())
}

/// The fastest timed variant at precision `prec` among `t` (one median per variant).
fn best_variant<B>(
    variants: &[ConvVariant<B>],
    t: &[Option<f64>],
    prec: ichcam::engine::Precision,
) -> Option<usize> {
    (0..variants.len())
        .filter(|&v| variants[v].precision == prec)
        .filter_map(|v| t.get(v).copied().flatten().map(|ms| (v, ms)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(v, _)| v)
}

/// With `ICHCAM_PROFILE=1` on the CPU: where the timed iterations spent their time, per op
/// family (warm-up excluded), per iteration.
fn print_profile(iters: usize) {
    if let Some(rows) = ichcam::engine::cpu::profile_report() {
        let total: f64 = rows.iter().map(|r| r.1).sum();
        let it = iters.max(1) as f64;
        println!(
            "profile (per iteration, ms): total in ops {:.2}",
            total / it
        );
        for (name, ms, calls) in rows {
            println!(
                "  {name:<22} {:>8.2} ms {:>5.1} %  {:>5} calls",
                ms / it,
                100.0 * ms / total.max(1e-12),
                calls / iters.max(1) as u64
            );
        }
    }
}

fn report(
    args: &Args,
    config: &str,
    what: &str,
    device: &str,
    t: &Timing,
    slices: usize,
    detail: &str,
) {
    report_mem(args, config, what, device, t, slices, detail, None, None)
}

/// [`report`] with the device memory the workload holds, when known, and more JSON fields
/// (`extra`, an object: the CAM pass's memory plan, [`cam_memory`]).
#[allow(clippy::too_many_arguments)]
fn report_mem(
    args: &Args,
    config: &str,
    what: &str,
    device: &str,
    t: &Timing,
    slices: usize,
    detail: &str,
    device_bytes: Option<usize>,
    extra: Option<serde_json::Value>,
) {
    print_profile(args.iters);
    let per_s = slices as f64 / (t.median_ms / 1e3);
    println!(
        "bench {what} config={config} device=\"{device}\": median {:.3} ms (min {:.3} ms), {:.1} slices/s; {detail}",
        t.median_ms, t.min_ms, per_s
    );
    if args.json {
        let j = serde_json::json!({
            "what": what, "config": config, "device": device, "median_ms": t.median_ms,
            "min_ms": t.min_ms, "cpu_ms": t.cpu_ms, "slices_per_s": per_s, "iters": args.iters, "detail": detail,
            "device_mb": device_bytes.map(|b| b as f64 / (1u64 << 20) as f64),
            "layout": args.layout_used,
            "act_storage": args.act_storage_used,
            "wgmma": args.wgmma_used,
        });
        let mut j = j;
        if let (Some(o), Some(serde_json::Value::Object(e))) = (j.as_object_mut(), extra) {
            o.extend(e);
        }
        println!("{j}");
    }
}
