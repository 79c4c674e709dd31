//! The two workloads of issue 13, as `ichcam bench --device cpu` runs them and
//! `scripts/cpu_baseline.sh` compares them with PyTorch and ONNX Runtime, on
//! `CpuBackend<f32>`:
//!
//! - `train_step/small_1x8_128`: stage-1 step of ResNet-18 + LSTM 3x256 + head, BCE,
//!   backward, SGD (lr 1e-3, momentum 0.9), one sequence of 8 slices at 128^2;
//! - `cam/small_8_256`: stage-2 pass (eval-mode ResNet-18, fc, vanilla CAM, bilinear
//!   upsample, min-max) on 8 slices at 256^2;
//! - the same two at the training CPU default's shapes (`TrainConfig::tiny`: its model,
//!   batch x slices and size; CAM passes of the segmenter's 32 slices).
//!
//! Throughput is slices/s (criterion's "elem/s"). 10 samples each, a few minutes in all.

#[path = "../tests/common/rng.rs"]
#[allow(dead_code)]
mod rng;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::Backend;
use ichcam::model::{BlockKind, CamKind, IchNet, ModelConfig, OptimizerConfig, ParamGroup};
use ichcam::train::TrainConfig;

fn inputs(len: usize, seed: u64) -> Vec<f32> {
    rng::SplitMix64::new(seed).vec_f32(len, 0.0, 1.0)
}

fn small() -> ModelConfig {
    ModelConfig {
        block: BlockKind::Basic,
        layers: vec![2, 2, 2, 2],
        ..ModelConfig::resnet101_lstm()
    }
}

fn train_step(
    cr: &mut Criterion,
    name: &str,
    cfg: ModelConfig,
    batch: usize,
    seq: usize,
    size: usize,
) {
    let mut net = IchNet::new(CpuBackend::<f32>::new(), cfg.clone(), 7).expect("valid config");
    net.set_train(true);
    let x = inputs(batch * seq * cfg.in_channels * size * size, 1);
    let labels: Vec<f32> = (0..batch * seq).map(|i| ((i / 3) % 2) as f32).collect();
    let opt = OptimizerConfig::paper_sgd();
    let mut g = cr.benchmark_group("train_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements((batch * seq) as u64));
    g.bench_function(name, |b| {
        b.iter(|| {
            let s = net
                .stage1_forward_backward(black_box(&x), &labels, batch, seq, size, size, 1.0)
                .expect("step");
            net.step(&opt, ParamGroup::Stage1).expect("sgd");
            black_box(s.loss)
        })
    });
    g.finish();
}

fn cam(cr: &mut Criterion, name: &str, cfg: ModelConfig, n: usize, size: usize) {
    let mut net = IchNet::new(CpuBackend::<f32>::new(), cfg.clone(), 7).expect("valid config");
    let x = inputs(n * cfg.in_channels * size * size, 2);
    let xb = net.backend().upload(&x).expect("upload");
    let mut g = cr.benchmark_group("cam");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(name, |b| {
        b.iter(|| {
            let o = net
                .stage2_infer_device(black_box(&xb), n, size, size, CamKind::Vanilla)
                .expect("cam");
            // Upsampled and normalised at the input size, as the baselines.
            let (_up, norm) = net.cam_to_input(&o, n, size, size).expect("cam maps");
            black_box(norm.len())
        })
    });
    g.finish();
}

fn workloads(cr: &mut Criterion) {
    train_step(cr, "small_1x8_128", small(), 1, 8, 128);
    cam(cr, "small_8_256", small(), 8, 256);
    let t = TrainConfig::tiny();
    let name = format!("tiny_{}x{}_{}", t.batch, t.slices, t.size);
    train_step(cr, &name, t.model.clone(), t.batch, t.slices, t.size);
    let n = ichcam::infer::SegmentOptions::default().batch_slices;
    cam(cr, &format!("tiny_{n}_{}", t.size), t.model, n, t.size);
}

criterion_group!(benches, workloads);
criterion_main!(benches);
