//! The stage-3 U-Net on the CPU backend in f32, the authors' network (features 16, depth 4,
//! one input channel): one training step (training-mode forward, soft Dice, backward, Adam)
//! and the eval forward alone, on 1 and 8 slices of 256x256 (criterion's elem/s is slices/s).
//! Then the up-convolution two ways at the U-Net's shapes (8 slices): the dedicated op
//! (GEMM + scatter with the bias, straight into the concatenation's channels) against the
//! adjoint of a stride-2 conv (`conv2d_bwd_data`, exact too) followed by the bias and the
//! copy into the concatenation it then needs. Short runs (10 samples).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, ChannelCopy, Conv2d, UpConv2d};
use ichcam::model::unet::{UNet, UNetConfig};
use ichcam::model::OptimizerConfig;
use ichcam::rng::Rng;

fn bench_unet_step(cr: &mut Criterion) {
    let size = 256usize;
    let opt = OptimizerConfig::adam(1e-3);
    for n in [1usize, 8] {
        let mut net =
            UNet::new(CpuBackend::<f32>::new(), UNetConfig::authors(1), 1).expect("valid config");
        let mut rng = Rng::new(n as u64);
        let x: Vec<f32> = (0..n * size * size).map(|_| rng.normal() as f32).collect();
        let t: Vec<f32> = (0..n * size * size)
            .map(|_| (rng.f64() < 0.1) as u8 as f32)
            .collect();
        let mut g = cr.benchmark_group("unet_step_cpu_f32");
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(if n == 1 { 5 } else { 20 }));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("f16_train_step_{n}x{size}px"), |b| {
            b.iter(|| {
                let l = net
                    .forward_backward(black_box(&x), &t, n, size, size)
                    .expect("step");
                net.step(&opt).expect("adam");
                black_box(l.loss)
            })
        });
        g.bench_function(format!("f16_eval_forward_{n}x{size}px"), |b| {
            b.iter(|| black_box(net.predict(black_box(&x), n, size, size).expect("forward")))
        });
        g.finish();
    }
}

fn bench_upconv(cr: &mut Criterion) {
    let be = CpuBackend::<f32>::new();
    let mut g = cr.benchmark_group("unet_upconv_cpu_f32");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let n = 8;
    // upconv1 (32 -> 16 channels, 128 -> 256 px) and upconv4 (256 -> 128, 16 -> 32 px).
    for (c_in, c_out, h) in [(32usize, 16usize, 128usize), (256, 128, 16)] {
        let s = UpConv2d {
            n,
            c_in,
            h,
            w: h,
            c_out,
            k: 2,
            y_channels: 2 * c_out,
            y_offset: 0,
        };
        let conv = Conv2d {
            n,
            c_in: c_out,
            h: 2 * h,
            w: 2 * h,
            c_out: c_in,
            kh: 2,
            kw: 2,
            stride: 2,
            pad: 0,
        };
        let copy = ChannelCopy {
            n,
            hw: 4 * h * h,
            c: c_out,
            src_channels: c_out,
            src_offset: 0,
            dst_channels: 2 * c_out,
            dst_offset: 0,
        };
        let mut rng = Rng::new(3);
        let mut v = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
        let (x, w, b) = (v(s.x_len()), v(s.w_len()), v(c_out));
        let mut cat = vec![0f32; s.y_len()];
        let mut tmp = vec![0f32; conv.x_len()];
        let (mut dx, mut dw, mut db) = (
            vec![0f32; s.x_len()],
            vec![0f32; s.w_len()],
            vec![0f32; c_out],
        );
        let dcat = v(s.y_len());
        g.bench_function(format!("dedicated_fwd_{c_in}to{c_out}_{h}px"), |bn| {
            bn.iter(|| be.upconv2d_fwd(&s, &x, &w, &b, &mut cat).expect("upconv"))
        });
        g.bench_function(
            format!("via_conv_bwd_data_fwd_{c_in}to{c_out}_{h}px"),
            |bn| {
                bn.iter(|| {
                    be.conv2d_bwd_data(&conv, &x, &w, &mut tmp)
                        .expect("bwd data");
                    be.bias_relu_assign(n, c_out, 4 * h * h, &b, &mut tmp, false)
                        .expect("bias");
                    be.copy_channels(&copy, &tmp, &mut cat, false)
                        .expect("copy");
                })
            },
        );
        g.bench_function(format!("dedicated_bwd_{c_in}to{c_out}_{h}px"), |bn| {
            bn.iter(|| {
                be.upconv2d_bwd(&s, &x, &w, &dcat, &mut dx, &mut dw, &mut db)
                    .expect("upconv bwd")
            })
        });
        let back = ChannelCopy {
            src_channels: 2 * c_out,
            dst_channels: c_out,
            ..copy
        };
        g.bench_function(
            format!("via_conv_fwd_and_bwd_weight_{c_in}to{c_out}_{h}px"),
            |bn| {
                bn.iter(|| {
                    be.copy_channels(&back, &dcat, &mut tmp, false)
                        .expect("split");
                    be.conv2d_fwd(&conv, &tmp, &w, &mut dx).expect("dx");
                    be.conv2d_bwd_weight(&conv, &tmp, &x, &mut dw).expect("dw");
                    be.bias_bwd(n, c_out, 4 * h * h, &tmp, &mut db).expect("db");
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_unet_step, bench_upconv);
criterion_main!(benches);
