//! Direct (im2col + GEMM) against Winograd F(4x4, 3x3) on the 3x3 stride-1 convolutions of
//! the two issue-13 workloads (ResNet-18: 8 slices at 256^2 for the CAM pass, 8 at 128^2 for
//! the train step), each pass of each shape alternating between the two paths and keeping
//! the best of several calls (robust to other processes on the machine). Prints a table of
//! ms and the Winograd / direct ratio; `worth_it` says which one the engine picks.
//!
//!     cargo bench --bench conv_paths [-- REPS]
//!     ICHCAM_BENCH_CPU=1 RAYON_NUM_THREADS=1 cargo bench --bench conv_paths   # CPU time

use std::time::Instant;

use ichcam::engine::cpu::{conv, winograd, CpuBackend};
use ichcam::engine::{Backend, Conv2d};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                - 0.5
        })
        .collect()
}

/// CPU time of every thread of this process so far, in ns (`/proc/self/task/*/schedstat`):
/// unlike wall time it does not count the time other processes hold the cores.
fn cpu_ns() -> u64 {
    let mut total = 0;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Best of `reps` calls: wall ms, or CPU ms of all threads when `ICHCAM_BENCH_CPU=1`
/// (run with RAYON_NUM_THREADS=1 then: a loaded machine changes wall time, not CPU time).
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    let cpu = std::env::var("ICHCAM_BENCH_CPU").is_ok_and(|v| v == "1");
    // Calls per sample: at least 50 ms of work, so that CPU-time accounting (updated at
    // scheduler ticks) is precise.
    let t = Instant::now();
    f();
    let one = t.elapsed().as_secs_f64() * 1e3;
    let inner = ((50.0 / one.max(1e-3)).ceil() as usize).clamp(1, 1000);
    let mut b = f64::INFINITY;
    for _ in 0..reps {
        let (t, c) = (Instant::now(), cpu_ns());
        for _ in 0..inner {
            f();
        }
        let ms = if cpu {
            (cpu_ns() - c) as f64 / 1e6
        } else {
            t.elapsed().as_secs_f64() * 1e3
        };
        b = b.min(ms / inner as f64);
    }
    b
}

fn main() {
    let reps: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(5);
    let be = CpuBackend::<f32>::new();
    println!("| shape | pass | direct ms | winograd ms | ratio | engine picks |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (size, n) in [(256usize, 8usize), (128, 8)] {
        for (i, c) in [64usize, 128, 256, 512].into_iter().enumerate() {
            let hw = (size / 4) >> i;
            let s = Conv2d {
                n,
                c_in: c,
                h: hw,
                w: hw,
                c_out: c,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            };
            let x = data(s.x_len(), 1);
            let w = data(s.w_len(), 2);
            let dy = data(s.y_len(), 3);
            let mut y = vec![0f32; s.y_len()];
            let mut dx = vec![0f32; s.x_len()];
            let mut dw = vec![0f32; s.w_len()];
            let picks = if winograd::worth_it(&s) {
                "winograd"
            } else {
                "direct"
            };
            let name = format!("{n}x{c}x{hw}x{hw}");
            let only = std::env::var("ICHCAM_BENCH_ONLY").unwrap_or_default();
            let row = |pass: &str, f: &mut dyn FnMut()| {
                if !format!("{name} {pass}").contains(&only) {
                    return;
                }
                let (mut d, mut wg) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..3 {
                    conv::set_winograd(false);
                    d = d.min(best(reps, &mut *f));
                    conv::set_winograd(true);
                    wg = wg.min(best(reps, &mut *f));
                }
                println!(
                    "| {name} | {pass} | {d:.2} | {wg:.2} | {:.2} | {picks} |",
                    wg / d
                );
            };
            // Force the Winograd path whatever worth_it says, to measure it.
            row("fwd", &mut || {
                if conv::use_winograd::<f32>(&s) || !conv_is_direct() {
                    winograd::conv3x3_fwd(&s, &x, &w, &mut y, winograd::Epilogue::none());
                } else {
                    be.conv2d_fwd(&s, &x, &w, &mut y).unwrap();
                }
            });
            row("bwd data", &mut || {
                if !conv_is_direct() {
                    winograd::conv3x3_bwd_data(&s, &dy, &w, &mut dx);
                } else {
                    be.conv2d_bwd_data(&s, &dy, &w, &mut dx).unwrap();
                }
            });
            row("bwd weight", &mut || {
                if !conv_is_direct() {
                    winograd::conv3x3_bwd_weight(&s, &x, &dy, &mut dw);
                } else {
                    be.conv2d_bwd_weight(&s, &x, &dy, &mut dw).unwrap();
                }
            });
        }
    }
}

/// Whether the process-wide switch currently says "direct" (probed on a shape Winograd
/// always takes when enabled).
fn conv_is_direct() -> bool {
    let probe = Conv2d {
        n: 64,
        c_in: 64,
        h: 64,
        w: 64,
        c_out: 64,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    !conv::use_winograd::<f32>(&probe)
}
