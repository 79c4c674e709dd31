//! CPU 3-D connected components (26-connectivity) on two deterministic blob volumes:
//! 40x512x512 at 2 % foreground (a CT-sized mask) and 512^3 at 30 %. Blobs, not salt and
//! pepper: white noise, box-blurred three times per axis, thresholded at the quantile that
//! gives the wanted foreground fraction.
//!
//! `ICHCAM_CCL_DUMP=DIR cargo bench --bench ccl` also writes each volume as raw u8
//! (`DIR/<name>.u8`, C order [z, y, x]) with `DIR/<name>.txt` = "nz ny nx components", for
//! `scripts/ccl_cc3d.py`, which times cc3d on the same bytes and checks the count.
//! `ICHCAM_CCL_SMALL=1` skips the 512^3 volume. The last group times the whole CPU
//! refinement (`seg::refine`) on the 40x512x512 volume.

#[path = "../tests/common/rng.rs"]
#[allow(dead_code)]
mod rng;

/// The offset of the benches' noise streams (fixes their volumes).
const SEED_OFFSET: u64 = 0xD1B5_4A32_D192_ED03;

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ichcam::engine::cpu::ccl::{
    connected_components, connected_components_reusing, connected_components_slabs,
};
use ichcam::engine::Connectivity;

use ndarray::Array3;
use rayon::prelude::*;

/// Box blur of half-width `r` along one axis of a C-order `[nz, ny, nx]` buffer (edges
/// clamp to the nearest in-range sample): a running sum along x and y inside each slice,
/// a direct sum over the `2r + 1` neighbouring slices along z.
fn box_blur(v: &mut [f32], dims: (usize, usize, usize), axis: usize, r: usize) {
    let (nz, ny, nx) = dims;
    let plane = ny * nx;
    let norm = 1.0 / (2 * r + 1) as f32;
    if r == 0 {
        return;
    }
    if axis == 0 {
        let src = v.to_vec();
        v.par_chunks_mut(plane).enumerate().for_each(|(z, out)| {
            out.fill(0.0);
            for d in -(r as isize)..=r as isize {
                let zz = (z as isize + d).clamp(0, nz as isize - 1) as usize;
                for (o, &x) in out.iter_mut().zip(&src[zz * plane..(zz + 1) * plane]) {
                    *o += x * norm;
                }
            }
        });
        return;
    }
    let (len, stride, lanes) = if axis == 1 { (ny, nx, nx) } else { (nx, 1, ny) };
    v.par_chunks_mut(plane).for_each(|slice| {
        let mut line = vec![0f32; len];
        for lane in 0..lanes {
            let start = if axis == 1 { lane } else { lane * nx };
            for (k, l) in line.iter_mut().enumerate() {
                *l = slice[start + k * stride];
            }
            let at = |k: isize| line[k.clamp(0, len as isize - 1) as usize];
            let mut acc: f32 = (-(r as isize)..=r as isize).map(at).sum();
            for k in 0..len {
                slice[start + k * stride] = acc * norm;
                acc += at(k as isize + r as isize + 1) - at(k as isize - r as isize);
            }
        }
    });
}

/// The blob volume: smoothed noise above its `(1 - fraction)` quantile.
fn blobs(dims: (usize, usize, usize), fraction: f64, radius: [usize; 3], seed: u64) -> Array3<u8> {
    let n = dims.0 * dims.1 * dims.2;
    let mut v: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| {
            (rng::counter(i as u64 ^ (seed << 40), SEED_OFFSET) >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    for _ in 0..3 {
        for (axis, &r) in radius.iter().enumerate() {
            box_blur(&mut v, dims, axis, r);
        }
    }
    let mut sorted = v.clone();
    let k = ((1.0 - fraction) * n as f64) as usize;
    let (_, t, _) = sorted.select_nth_unstable_by(k.min(n - 1), |a, b| a.total_cmp(b));
    let t = *t;
    drop(sorted);
    let m: Vec<u8> = v.par_iter().map(|&x| u8::from(x >= t)).collect();
    Array3::from_shape_vec(dims, m).expect("n = product of dims")
}

fn dump(name: &str, m: &Array3<u8>, n_comp: usize) {
    let Ok(dir) = std::env::var("ICHCAM_CCL_DUMP") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let (nz, ny, nx) = m.dim();
    let bytes = m.as_slice().expect("standard layout");
    ichcam::io::atomic::write_atomic(&dir.join(format!("{name}.u8")), |w| w.write_all(bytes))
        .expect("write volume");
    ichcam::io::atomic::write_atomic(&dir.join(format!("{name}.txt")), |w| {
        writeln!(w, "{nz} {ny} {nx} {n_comp}")
    })
    .expect("write shape");
    eprintln!("wrote {}/{name}.u8", dir.display());
}

fn bench_ccl(cr: &mut Criterion) {
    let mut vols = vec![("40x512x512_2pct", (40, 512, 512), 0.02, [1, 4, 4])];
    if std::env::var("ICHCAM_CCL_SMALL").is_err() {
        vols.push(("512x512x512_30pct", (512, 512, 512), 0.30, [3, 3, 3]));
    }
    for (name, dims, frac, radius) in vols {
        let m = blobs(dims, frac, radius, 7);
        let fg = m.iter().filter(|&&v| v != 0).count();
        let out = connected_components(&m, Connectivity::TwentySix).expect("ccl");
        eprintln!(
            "{name}: foreground {:.2} %, {} components, largest {} voxels, threads {}",
            100.0 * fg as f64 / m.len() as f64,
            out.n_components(),
            out.sizes[1..].iter().max().copied().unwrap_or(0),
            rayon::current_num_threads()
        );
        dump(name, &m, out.n_components());
        drop(out);
        let mut g = cr.benchmark_group(format!("ccl26/{name}"));
        let big = m.len() > 50_000_000;
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(if big { 1000 } else { 500 }))
            .measurement_time(Duration::from_secs(if big { 15 } else { 3 }));
        g.throughput(Throughput::Elements(m.len() as u64));
        g.bench_function("rayon", |b| {
            b.iter(|| connected_components(black_box(&m), Connectivity::TwentySix).expect("ccl"))
        });
        g.bench_function("1-slab", |b| {
            b.iter(|| {
                connected_components_slabs(black_box(m.view()), Connectivity::TwentySix, 1)
                    .expect("ccl")
            })
        });
        let mut buf = Some(Array3::<u32>::zeros(m.raw_dim()));
        g.bench_function("rayon-reused-buffer", |b| {
            b.iter(|| {
                let old = buf.take().unwrap_or_else(|| Array3::zeros(m.raw_dim()));
                let out = connected_components_reusing(black_box(&m), Connectivity::TwentySix, old)
                    .expect("ccl");
                buf = Some(out.labels);
            })
        });
        g.finish();
    }
}

/// The whole CPU refinement (CAM threshold, per-slice k-means, dilation, CCL, filter) on a
/// CT-sized volume: 35 HU brain with +-5 HU noise, 60 HU wherever the 2 % blob mask is, a
/// CAM that is the blurred mask (min-max normalised per slice), every slice positive.
fn bench_refine(cr: &mut Criterion) {
    use ichcam::seg::{refine, RefineConfig};
    let dims = (40, 512, 512);
    let m = blobs(dims, 0.02, [1, 4, 4], 7);
    let mut cam: Vec<f32> = m.iter().map(|&v| v as f32).collect();
    for (axis, r) in [(1, 3), (2, 3)] {
        box_blur(&mut cam, dims, axis, r);
    }
    // Min-max normalised per slice, as the method's CAM.
    for slice in cam.chunks_mut(512 * 512) {
        let lo = slice.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = slice.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        slice.iter_mut().for_each(|v| *v = (*v - lo) / span);
    }
    let cam = Array3::from_shape_vec(dims, cam).expect("dims");
    let hu = Array3::from_shape_fn(dims, |(z, y, x)| {
        let i = ((z * 512 + y) * 512 + x) as u64;
        let noise = (rng::counter(i, SEED_OFFSET) >> 40) as f32 / (1u64 << 24) as f32 * 10.0 - 5.0;
        (if m[[z, y, x]] != 0 { 60.0 } else { 35.0 }) + noise
    });
    let positive = vec![true; dims.0];
    let cfg = RefineConfig::default();
    let out = refine(&hu, &cam, &positive, &cfg).expect("refine");
    eprintln!(
        "refine 40x512x512: CAM {} voxels, clusters {}, {} components kept",
        out.cam_voxels, out.cluster_voxels, out.n_components
    );
    let mut g = cr.benchmark_group("refine/40x512x512");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    g.bench_function("cpu", |b| {
        b.iter(|| refine(black_box(&hu), &cam, &positive, &cfg).expect("refine"))
    });
    g.finish();
}

criterion_group!(benches, bench_ccl, bench_refine);
criterion_main!(benches);
