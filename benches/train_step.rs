//! One stage-1 training step (forward, BCE, backward through head, LSTM and ResNet, SGD
//! momentum update) of a small config on the CPU backend in f32: basic [1,1,1,1] base 16,
//! LSTM 1x64, one sequence of 16 slices at 64x64 and 128x128. Throughput is slices/s
//! (criterion's "elem/s"); the forward pass alone is timed too. Short runs (10 samples) so
//! the file takes about two minutes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ichcam::engine::cpu::CpuBackend;
use ichcam::model::{BlockKind, IchNet, ModelConfig, OptimizerConfig, ParamGroup};
use ichcam::rng::Rng;

fn cfg() -> ModelConfig {
    ModelConfig {
        block: BlockKind::Basic,
        layers: vec![1, 1, 1, 1],
        base_width: 16,
        lstm_hidden: 64,
        lstm_layers: 1,
        head: vec![128, 64],
        bn_eps: 1e-5,
        bn_momentum: 0.1,
        in_channels: 3,
    }
}

fn bench_train_step(cr: &mut Criterion) {
    let (batch, seq) = (1, 16);
    let opt = OptimizerConfig::paper_sgd();
    for size in [64usize, 128] {
        let mut net = IchNet::new(CpuBackend::<f32>::new(), cfg(), 1).expect("config is valid");
        let mut rng = Rng::new(size as u64);
        let x: Vec<f32> = (0..batch * seq * 3 * size * size)
            .map(|_| rng.normal() as f32)
            .collect();
        let labels: Vec<f32> = (0..batch * seq)
            .map(|i| (i % 3 == 0) as u8 as f32)
            .collect();
        let mut g = cr.benchmark_group("train_step_cpu_f32");
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        g.throughput(Throughput::Elements((batch * seq) as u64));
        g.bench_function(format!("basic1111_b16_lstm64_1x16_{size}px"), |b| {
            b.iter(|| {
                let s = net
                    .stage1_forward_backward(black_box(&x), &labels, batch, seq, size, size, 1.0)
                    .expect("step");
                net.step(&opt, ParamGroup::Stage1).expect("sgd");
                black_box(s.loss)
            })
        });
        // The forward pass alone (eval-mode batch norm), to split the step's time.
        g.bench_function(format!("forward_only_1x16_{size}px"), |b| {
            b.iter(|| {
                black_box(
                    net.stage1_logits(black_box(&x), batch, seq, size, size)
                        .expect("forward"),
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
