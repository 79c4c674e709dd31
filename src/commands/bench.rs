//! `ichcam bench`: times one workload on one backend, waiting for the device with the
//! backend's `synchronize` around every timed iteration (so GPU times are real), after
//! warm-up iterations that absorb module loading and allocation. Prints the median and the
//! minimum in ms, slices/s, and with `--json` one JSON line for scripts.
//!
//! Workloads: `conv` (a 3x3 64->64 convolution's forward and both backward passes, at the
//! config's stage-1 resolution), `train-step` (stage-1 forward + backward + SGD step) and
//! `cam` (stage-2 inference with the vanilla CAM, upsampled and normalised, left on the device).
//! `tiny` is the training CPU default ([`TrainConfig::tiny`]) at its own shapes, so the
//! bench follows that preset when it changes. `--describe` prints the model config and
//! the workload's shapes as JSON (what `scripts/cpu_baseline.sh` rebuilds in PyTorch).

use std::time::Instant;

use anyhow::{bail, Context};
use ichcam::engine::{Backend, Conv2d};
use ichcam::infer::SegmentOptions;
use ichcam::model::{BlockKind, CamKind, IchNet, ModelConfig, OptimizerConfig, ParamGroup};
use ichcam::train::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Convolution arithmetic on CUDA: f32 (the reference), tf32 or bf16 (tensor cores,
    /// f32 accumulation; compute capability 8.0+). The CPU takes f32 only.
    #[arg(long, default_value = "f32")]
    precision: ichcam::engine::Precision,
    /// tiny (the training CPU default: its model, batch x slices and image size; CAM passes
    /// of the segmenter's slices per pass), small (ResNet-18 + LSTM 3x256, 4x32 slices / 128 slices at 256^2)
    /// or paper (ResNet-101 + LSTM 3x256, 1x32 slices / 32 slices at 512^2).
    #[arg(long, default_value = "tiny")]
    config: String,
    /// conv, train-step or cam.
    #[arg(long, default_value = "conv")]
    what: String,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Override the number of sequences (train-step) of the config.
    #[arg(long)]
    batch: Option<usize>,
    /// Override the slices per sequence (train-step) or per CAM pass (cam).
    #[arg(long)]
    slices: Option<usize>,
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
}

fn preset(name: &str) -> anyhow::Result<Preset> {
    Ok(match name {
        "tiny" => {
            let t = TrainConfig::tiny();
            Preset {
                name: "tiny",
                model: t.model,
                train: (t.batch, t.slices),
                cam_slices: SegmentOptions::default().batch_slices,
                size: t.size,
            }
        }
        "small" => Preset {
            name: "small",
            model: ModelConfig {
                block: BlockKind::Basic,
                layers: vec![2, 2, 2, 2],
                ..ModelConfig::resnet101_lstm()
            },
            train: (4, 32),
            cam_slices: 128,
            size: 256,
        },
        "paper" => Preset {
            name: "paper",
            model: ModelConfig::resnet101_lstm(),
            train: (1, 32),
            cam_slices: 32,
            size: 512,
        },
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

pub fn run(args: Args) -> anyhow::Result<()> {
    let p = preset(&args.config)?;
    if args.describe {
        let j = serde_json::json!({
            "config": p.name,
            "what": args.what,
            "model": serde_json::from_str::<serde_json::Value>(&p.model.to_fixture_json())?,
            "batch": args.batch.unwrap_or(p.train.0),
            "slices": args.slices.unwrap_or(p.train.1),
            "cam_slices": args.slices.unwrap_or(p.cam_slices),
            "size": args.size.unwrap_or(p.size),
            "precision": args.precision.name(),
        });
        println!("{j}");
        return Ok(());
    }
    let mut device = super::open_device(&args.device, false)?;
    device.set_precision(args.precision)?;
    ichcam::on_device!(device, be => bench(be, &p, &args))
}

fn bench<B: Backend<T = f32> + 'static>(be: B, p: &Preset, args: &Args) -> anyhow::Result<()> {
    let size = args.size.unwrap_or(p.size);
    // Host memory, before anything is allocated (sizes come from the command line): the
    // workload's inputs, and on the CPU its activations (on a GPU they are device memory).
    {
        use ichcam::model::memory::{param_bytes, stage2_infer_bytes, training_bytes};
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
            "cam" => {
                let n = args.slices.unwrap_or(p.cam_slices);
                let model = if on_host {
                    stage2_infer_bytes(&p.model, n, size, 4)
                } else {
                    param_bytes(&p.model, 4, false)
                };
                model.map(|t| t + input(n))
            }
            // x, w, y, dx, dy of one 64-channel convolution at size/4.
            _ => Some(args.slices.unwrap_or(p.train.0 * p.train.1) as u128 * 64 * plane / 16 * 20),
        };
        ichcam::io::budget::budget().check(
            std::path::Path::new(&args.what),
            need.unwrap_or(u128::MAX),
            || format!("benchmarking `{}` at {size}^2", p.name),
        )?;
    }
    let device = be.name();
    match args.what.as_str() {
        "conv" => bench_conv(&be, p, size, args, &device),
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
            report(
                args,
                p.name,
                "train-step",
                &device,
                &t,
                batch * seq,
                &format!("{batch}x{seq} slices {size}^2, loss {last_loss:.4}"),
            );
            Ok(())
        }
        "cam" => {
            let n = args.slices.unwrap_or(p.cam_slices);
            let c = p.model.in_channels;
            let x = inputs(n * c * size * size, 2);
            let mut net = IchNet::new(be, p.model.clone(), 7).context("building the model")?;
            net.set_train(false);
            let xb = net.backend().upload(&x)?;
            let t = {
                let cell = std::cell::RefCell::new(&mut net);
                let sync = || -> anyhow::Result<()> { Ok(cell.borrow().backend().synchronize()?) };
                time(&sync, args.warmup, args.iters, || {
                    let mut n_ = cell.borrow_mut();
                    // The CAM upsampled and normalised at the input size, as the baselines.
                    let out = n_.stage2_infer_device(&xb, n, size, size, CamKind::Vanilla)?;
                    let _maps = n_.cam_to_input(&out, n, size, size)?;
                    Ok(())
                })?
            };
            report(
                args,
                p.name,
                "cam",
                &device,
                &t,
                n,
                &format!("{n} slices {size}^2"),
            );
            Ok(())
        }
        other => bail!("unknown --what `{other}`: use conv, train-step or cam"),
    }
}

fn bench_conv<B: Backend<T = f32>>(
    be: &B,
    p: &Preset,
    size: usize,
    args: &Args,
    device: &str,
) -> anyhow::Result<()> {
    // The first stage's 3x3 convolution: after the stem and the max-pool, at size/4.
    let slices = args.slices.unwrap_or(p.train.0 * p.train.1);
    let ch = if p.name == "tiny" {
        p.model.base_width
    } else {
        64
    };
    let hw = (size / 4).max(1);
    let s = Conv2d {
        n: slices,
        c_in: ch,
        h: hw,
        w: hw,
        c_out: ch,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    let x = be.upload(&inputs(s.x_len(), 3))?;
    let w = be.upload(&inputs(s.w_len(), 4))?;
    let dy = be.upload(&inputs(s.y_len(), 5))?;
    let mut y = be.zeros(s.y_len())?;
    let mut dx = be.zeros(s.x_len())?;
    let mut dw = be.zeros(s.w_len())?;
    let sync = || -> anyhow::Result<()> { Ok(be.synchronize()?) };
    let flops = 2.0 * s.macs() as f64;
    let desc = format!("{slices}x{ch}x{hw}x{hw} 3x3 -> {ch}");
    let tf = time(&sync, args.warmup, args.iters, || {
        Ok(be.conv2d_fwd(&s, &x, &w, &mut y)?)
    })?;
    report(
        args,
        p.name,
        "conv-fwd",
        device,
        &tf,
        slices,
        &format!("{desc}, {:.2} TFLOP/s", flops / tf.median_ms / 1e9),
    );
    let td = time(&sync, args.warmup, args.iters, || {
        Ok(be.conv2d_bwd_data(&s, &dy, &w, &mut dx)?)
    })?;
    report(
        args,
        p.name,
        "conv-bwd-data",
        device,
        &td,
        slices,
        &format!("{desc}, {:.2} TFLOP/s", flops / td.median_ms / 1e9),
    );
    let tw = time(&sync, args.warmup, args.iters, || {
        Ok(be.conv2d_bwd_weight(&s, &x, &dy, &mut dw)?)
    })?;
    report(
        args,
        p.name,
        "conv-bwd-weight",
        device,
        &tw,
        slices,
        &format!("{desc}, {:.2} TFLOP/s", flops / tw.median_ms / 1e9),
    );
    Ok(())
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
        });
        println!("{j}");
    }
}
