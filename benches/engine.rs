//! CPU engine benchmarks: convolutions at ResNet-18 shapes against the gemm crate's own
//! matrix product at the equivalent GEMM shape (M = c_out, N = n*oh*ow, K = c_in*kh*kw),
//! and one LSTM layer's full-sequence forward + BPTT. Throughput is reported as elements/s
//! where one element is one floating-point operation (2 per multiply-add): read
//! "Gelem/s" as GFLOP/s. Short runs (10 samples, 2 s) so the whole file takes a few minutes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use ichcam::engine::cpu::gemm::{matmul, Mat, MatMut, Par};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d, Lstm, Pool2d};

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill; the values only need to be ordinary floats.
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                - 0.5
        })
        .collect()
}

fn conv_shapes() -> Vec<(&'static str, Conv2d)> {
    let c = |c_in, h, c_out, k, stride, pad| Conv2d {
        n: 8,
        c_in,
        h,
        w: h,
        c_out,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    vec![
        ("stem_7x7s2_3-64_224", c(3, 224, 64, 7, 2, 3)),
        ("3x3_64-64_56", c(64, 56, 64, 3, 1, 1)),
        ("3x3_128-128_28", c(128, 28, 128, 3, 1, 1)),
        ("3x3_256-256_14", c(256, 14, 256, 3, 1, 1)),
        ("3x3s2_128-256_28", c(128, 28, 256, 3, 2, 1)),
        ("1x1s2_128-256_28", c(128, 28, 256, 1, 2, 0)),
    ]
}

fn bench_conv(cr: &mut Criterion) {
    let be = CpuBackend::<f32>::new();
    for (name, s) in conv_shapes() {
        let mut g = cr.benchmark_group(format!("conv/{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        g.throughput(Throughput::Elements(2 * s.macs() as u64));
        let x = data(s.x_len(), 1);
        let w = data(s.w_len(), 2);
        let dy = data(s.y_len(), 3);
        let mut y = vec![0f32; s.y_len()];
        let mut dx = vec![0f32; s.x_len()];
        let mut dw = vec![0f32; s.w_len()];
        // The reference: one product of the equivalent shape, gemm splitting it over the cores.
        let (m, n, k) = (s.c_out, s.n * s.out_h() * s.out_w(), s.c_in * s.kh * s.kw);
        let a = data(m * k, 4);
        let b = data(k * n, 5);
        let mut c = vec![0f32; m * n];
        g.bench_function("gemm", |bch| {
            bch.iter(|| {
                matmul(
                    MatMut::new(&mut c, m, n),
                    Mat::new(&a, m, k),
                    Mat::new(&b, k, n),
                    false,
                    Par::Rayon,
                )
                .unwrap()
            })
        });
        g.bench_function("fwd", |bch| {
            bch.iter(|| be.conv2d_fwd(&s, &x, &w, &mut y).unwrap())
        });
        g.bench_function("bwd_data", |bch| {
            bch.iter(|| be.conv2d_bwd_data(&s, &dy, &w, &mut dx).unwrap())
        });
        g.bench_function("bwd_weight", |bch| {
            bch.iter(|| be.conv2d_bwd_weight(&s, &x, &dy, &mut dw).unwrap())
        });
        g.finish();
        black_box((&y, &dx, &dw, &c));
    }
}

fn bench_lstm(cr: &mut Criterion) {
    let be = CpuBackend::<f32>::new();
    for batch in [1, 4] {
        let s = Lstm {
            batch,
            seq: 32,
            input: 512,
            hidden: 256,
        };
        let h4 = 4 * s.hidden;
        let x = data(s.x_len(), 1);
        let w_ih = data(h4 * s.input, 2)
            .iter()
            .map(|v| v * 0.1)
            .collect::<Vec<_>>();
        let w_hh = data(h4 * s.hidden, 3)
            .iter()
            .map(|v| v * 0.1)
            .collect::<Vec<_>>();
        let b = data(h4, 4);
        let dh = data(s.h_len(), 5);
        let (mut h, mut c, mut gates) = (
            vec![0f32; s.h_len()],
            vec![0f32; s.h_len()],
            vec![0f32; s.gates_len()],
        );
        let (mut dx, mut dw_ih, mut dw_hh, mut db) = (
            vec![0f32; s.x_len()],
            vec![0f32; w_ih.len()],
            vec![0f32; w_hh.len()],
            vec![0f32; h4],
        );
        let mut g = cr.benchmark_group(format!("lstm/h256_t32_in512_b{batch}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        g.bench_function("fwd", |bch| {
            bch.iter(|| {
                be.lstm_fwd(&s, &x, &w_ih, &w_hh, &b, &b, &mut h, &mut c, &mut gates)
                    .unwrap()
            })
        });
        g.bench_function("fwd+bptt", |bch| {
            bch.iter(|| {
                be.lstm_fwd(&s, &x, &w_ih, &w_hh, &b, &b, &mut h, &mut c, &mut gates)
                    .unwrap();
                be.lstm_bwd(
                    &s, &x, &w_ih, &w_hh, &h, &c, &gates, &dh, &mut dx, &mut dw_ih, &mut dw_hh,
                    &mut db,
                )
                .unwrap()
            })
        });
        g.finish();
        black_box((&dx, &dw_ih, &dw_hh, &db));
    }
}

/// The memory-bound ops around the convolutions, at the stem's and the first stage's sizes.
fn bench_ops(cr: &mut Criterion) {
    let be = CpuBackend::<f32>::new();
    let bn = BatchNorm2d {
        n: 8,
        c: 64,
        hw: 56 * 56,
        eps: 1e-5,
        momentum: 0.1,
    };
    let pool = Pool2d {
        n: 8,
        c: 64,
        h: 112,
        w: 112,
        k: 3,
        stride: 2,
        pad: 1,
    };
    let x = data(bn.len(), 1);
    let dy = data(bn.len(), 2);
    let (gamma, beta) = (vec![1f32; bn.c], vec![0f32; bn.c]);
    let (mut rm, mut rv, mut sm, mut si) = (
        vec![0f32; bn.c],
        vec![1f32; bn.c],
        vec![0f32; bn.c],
        vec![0f32; bn.c],
    );
    let (mut y, mut dx) = (vec![0f32; bn.len()], vec![0f32; bn.len()]);
    let (mut dg, mut db) = (vec![0f32; bn.c], vec![0f32; bn.c]);
    let px = data(pool.x_len(), 3);
    let (mut py, mut pdx) = (vec![0f32; pool.y_len()], vec![0f32; pool.x_len()]);
    let mut g = cr.benchmark_group("ops");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("bn_train_fwd_relu_8x64x56x56", |b| {
        b.iter(|| {
            be.batchnorm_train_fwd(
                &bn, &x, &gamma, &beta, &mut rm, &mut rv, &mut sm, &mut si, &mut y, true,
            )
            .unwrap()
        })
    });
    g.bench_function("bn_bwd_relu_8x64x56x56", |b| {
        b.iter(|| {
            be.batchnorm_bwd(
                &bn, &x, &y, &dy, &gamma, &sm, &si, &mut dx, &mut dg, &mut db, true,
            )
            .unwrap()
        })
    });
    g.bench_function("add_relu_8x64x56x56", |b| {
        b.iter(|| be.add_relu_fwd(&x, &dy, &mut y).unwrap())
    });
    g.bench_function("maxpool3s2_fwd_8x64x112x112", |b| {
        b.iter(|| be.maxpool2d_fwd(&pool, &px, &mut py).unwrap())
    });
    let pdy = data(pool.y_len(), 4);
    g.bench_function("maxpool3s2_bwd_8x64x112x112", |b| {
        b.iter(|| be.maxpool2d_bwd(&pool, &px, &py, &pdy, &mut pdx).unwrap())
    });
    g.finish();
}

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The conv-vs-GEMM table in one run: each pass and the reference product alternate, and the
/// best of several calls is kept, which shrugs off other processes on a shared machine
/// better than a mean does.
fn conv_summary() {
    let be = CpuBackend::<f32>::new();
    println!(
        "\nconv vs gemm (f32, best of 7 alternating calls, {} rayon threads)",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>14}",
        "shape", "gemm", "fwd", "bwd_data", "bwd_wt", "worst/gemm"
    );
    for (name, s) in conv_shapes() {
        let x = data(s.x_len(), 1);
        let w = data(s.w_len(), 2);
        let dy = data(s.y_len(), 3);
        let (mut y, mut dx, mut dw) = (
            vec![0f32; s.y_len()],
            vec![0f32; s.x_len()],
            vec![0f32; s.w_len()],
        );
        let (m, n, k) = (s.c_out, s.n * s.out_h() * s.out_w(), s.c_in * s.kh * s.kw);
        let (a, b) = (data(m * k, 4), data(k * n, 5));
        let mut c = vec![0f32; m * n];
        let mut best = [f64::INFINITY; 4];
        for _ in 0..7 {
            let t = [
                best_of(1, || {
                    matmul(
                        MatMut::new(&mut c, m, n),
                        Mat::new(&a, m, k),
                        Mat::new(&b, k, n),
                        false,
                        Par::Rayon,
                    )
                    .unwrap()
                }),
                best_of(1, || be.conv2d_fwd(&s, &x, &w, &mut y).unwrap()),
                best_of(1, || be.conv2d_bwd_data(&s, &dy, &w, &mut dx).unwrap()),
                best_of(1, || be.conv2d_bwd_weight(&s, &x, &dy, &mut dw).unwrap()),
            ];
            for (bst, v) in best.iter_mut().zip(t) {
                *bst = bst.min(v);
            }
        }
        black_box((&y, &dx, &dw, &c));
        let gf = best.map(|t| 2.0 * s.macs() as f64 / t / 1e9);
        let worst = gf[1..].iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{:<22} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>14.2}",
            name,
            gf[0],
            gf[1],
            gf[2],
            gf[3],
            worst / gf[0]
        );
    }
    println!("(GFLOP/s; worst/gemm = the slowest conv pass over the gemm reference)");
}

criterion_group!(benches, bench_conv, bench_lstm, bench_ops);

fn main() {
    // The summary runs with the criterion benches, or alone with the filter `summary`.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if filters.iter().all(|f| f != "summary") {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    if filters.is_empty() || filters.iter().any(|f| f == "summary") {
        conv_summary();
    }
}
