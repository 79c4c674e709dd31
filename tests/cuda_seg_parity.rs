//! The volume ops' CUDA kernels (`engine::cuda::{ccl,kmeans,morph,volume}`) against their CPU
//! twins (`engine::cpu::...`), and the refinement (`seg::refine::refine_on`) on both, on fresh random
//! inputs: connected components (labels, count and sizes; every 26-neighbour offset across
//! 2x2x2 block faces, edges and corners), k-means (centroids, counts, assignments), the
//! in-plane morphology, the CAM region and the subdural window, and the whole refinement on
//! synthetic heads. Outputs are poisoned before each launch so that an unwritten element
//! fails. Runs on a GPU or on the emulated driver; without either the tests are reported as
//! ignored (tests/common/cuda.rs), with `ICHCAM_REQUIRE_GPU=1` a missing device fails them.
//! `ccl_gpu_timings` prints the CCL timings on a real GPU only.

mod common;
use common::rng::SplitMix64;

use std::collections::HashMap;
use std::time::Instant;

use cudarc::driver::{CudaSlice, DeviceRepr};
use ichcam::data::Window;
use ichcam::engine::cpu::kmeans::kmeans_1d;
use ichcam::engine::cpu::morph::{dilate, erode};
use ichcam::engine::cuda::ccl::{ccl3d, ccl3d_into, CclRun};
use ichcam::engine::cuda::kmeans::kmeans_segments;
use ichcam::engine::cuda::morph::morph2d;
use ichcam::engine::cuda::volume::{count_nonzero, threshold_slices, window};
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::{Connectivity, Structuring};
use ichcam::io::Mask;
use ichcam::seg::refine::{positive_cam_region, refine_on};
use ichcam::seg::{connected_components, refine, RefineConfig, RefineOutput, SegError};
use ndarray::Array3;

fn main() {
    use common::cuda::{device, real_gpu};
    common::cuda::main(vec![
        device("ccl_random_volumes_match_cpu", ccl_random_volumes_match_cpu),
        device(
            "ccl_every_neighbour_offset_across_blocks",
            ccl_every_neighbour_offset_across_blocks,
        ),
        device(
            "ccl_structured_volumes_match_cpu",
            ccl_structured_volumes_match_cpu,
        ),
        device("ccl_large_volume_matches_cpu", ccl_large_volume_matches_cpu),
        device("kmeans_matches_cpu", kmeans_matches_cpu),
        device("morphology_matches_cpu", morphology_matches_cpu),
        device(
            "region_window_and_count_match_cpu",
            region_window_and_count_match_cpu,
        ),
        device("refine_matches_cpu", refine_matches_cpu),
        device("ccl3d_convenience_allocates", ccl3d_convenience_allocates),
        real_gpu("ccl_gpu_timings", ccl_gpu_timings),
    ])
}

/// A backend on device 0 (the harness runs these tests only when one opens).
fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("the harness found a CUDA device")
}

fn up<T: DeviceRepr>(be: &CudaBackend, host: &[T]) -> CudaSlice<T> {
    be.stream().clone_htod(host).expect("upload")
}

fn down<T: DeviceRepr + Default + Clone>(be: &CudaBackend, d: &CudaSlice<T>) -> Vec<T> {
    be.stream().clone_dtoh(d).expect("download")
}

fn random_mask(rng: &mut SplitMix64, dims: (usize, usize, usize), p: f32) -> Mask {
    Array3::from_shape_fn(dims, |_| u8::from(rng.unit_f32() < p))
}

fn flat<T: Clone>(a: &Array3<T>) -> Vec<T> {
    a.as_standard_layout().iter().cloned().collect()
}

/// Whether two labellings describe the same partition (a bijection between their ids, 0 to 0).
fn same_partition(a: &[u32], b: &[u32]) -> bool {
    let (mut ab, mut ba) = (HashMap::new(), HashMap::new());
    a.iter().zip(b).all(|(&x, &y)| {
        (x == 0) == (y == 0) && *ab.entry(x).or_insert(y) == y && *ba.entry(y).or_insert(x) == x
    })
}

const POISON_U32: u32 = 0xDEAD_BEEF;
const POISON_U8: u8 = 0xAB;

fn check_ccl(be: &CudaBackend, mask: &Mask, conn: Connectivity, voxel_path: bool, what: &str) {
    let dims = mask.dim();
    let cpu = connected_components(mask, conn).expect("cpu ccl");
    let n = mask.len();
    let d_mask = up(be, &flat(mask));
    let mut labels = up(be, &vec![POISON_U32; n]);
    let mut run = CclRun::new(be, dims, conn, voxel_path).expect("ccl buffers");
    run.launch(be, &d_mask, &mut labels).expect("ccl launch");
    let (count, sizes) = run.collect(be).expect("ccl collect");
    let gpu = down(be, &labels);
    let cpu_l = flat(&cpu.labels);
    assert!(
        same_partition(&gpu, &cpu_l),
        "{what}: {conn:?} voxel_path={voxel_path} dims {dims:?}: partitions differ"
    );
    assert_eq!(count, cpu.n_components(), "{what}: component count");
    assert_eq!(sizes, cpu.sizes, "{what}: sizes");
    // Stronger than the partition: the same ids (raster order of first voxels).
    assert_eq!(
        gpu, cpu_l,
        "{what}: ids differ although the partitions agree"
    );
}

fn ccl_random_volumes_match_cpu() {
    let be = gpu();
    let mut rng = SplitMix64(common::rng::fresh_seed("ccl_random_volumes_match_cpu"));
    let mut shapes = vec![
        (1, 1, 1),
        (1, 1, 7),
        (3, 1, 5),
        (2, 2, 2),
        (5, 7, 9),
        (16, 33, 31),
        (40, 64, 64),
    ];
    for _ in 0..6 {
        shapes.push((1 + rng.below(20), 1 + rng.below(70), 1 + rng.below(70)));
    }
    for &dims in &shapes {
        for p in [0.0, 0.02, 0.1, 0.3, 0.5, 0.8, 1.0] {
            let mask = random_mask(&mut rng, dims, p);
            for conn in [
                Connectivity::TwentySix,
                Connectivity::Eighteen,
                Connectivity::Six,
            ] {
                check_ccl(&be, &mask, conn, false, &format!("p={p}"));
            }
            check_ccl(&be, &mask, Connectivity::TwentySix, true, &format!("p={p}"));
        }
    }
}

/// Two voxels at every 26-neighbour offset, from every position parity inside a 2x2x2 block,
/// so that every face, edge and corner between blocks is crossed; joined exactly when the
/// connectivity says they touch.
fn ccl_every_neighbour_offset_across_blocks() {
    let be = gpu();
    let dims = (6, 6, 6);
    for pz in 2..4 {
        for py in 2..4 {
            for px in 2..4 {
                for dz in -1i32..=1 {
                    for dy in -1i32..=1 {
                        for dx in -1i32..=1 {
                            if (dz, dy, dx) == (0, 0, 0) {
                                continue;
                            }
                            let mut mask = Mask::zeros(dims);
                            mask[[pz, py, px]] = 1;
                            let q = [
                                (pz as i32 + dz) as usize,
                                (py as i32 + dy) as usize,
                                (px as i32 + dx) as usize,
                            ];
                            mask[q] = 1;
                            for conn in [
                                Connectivity::TwentySix,
                                Connectivity::Eighteen,
                                Connectivity::Six,
                            ] {
                                let d_mask = up(&be, &flat(&mask));
                                let (_, n, _) = ccl3d(&be, &d_mask, dims, conn).expect("ccl3d");
                                let want = if conn.touches(dz, dy, dx) { 1 } else { 2 };
                                assert_eq!(
                                    n,
                                    want,
                                    "{conn:?} at {:?} offset {:?}",
                                    (pz, py, px),
                                    (dz, dy, dx)
                                );
                                check_ccl(&be, &mask, conn, false, "offset");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Long thin structures that merge late (spirals, combs): many union retries.
fn ccl_structured_volumes_match_cpu() {
    let be = gpu();
    let dims = (9, 48, 48);
    // A comb: teeth along y joined by one row at the far end, diagonal steps between slices.
    let comb = Array3::from_shape_fn(dims, |(z, y, x)| {
        u8::from((x % 3 == 0 && y > z) || (y == 47 && z % 2 == 0))
    });
    // A staircase touching only through corners.
    let stairs = Array3::from_shape_fn(dims, |(z, y, x)| u8::from(x == y && (x + z) % 2 == 0));
    // A checkerboard: all one component in 26 and 18, single voxels in 6.
    let checker = Array3::from_shape_fn(dims, |(z, y, x)| u8::from((x + y + z) % 2 == 0));
    for (name, m) in [("comb", &comb), ("stairs", &stairs), ("checker", &checker)] {
        for conn in [
            Connectivity::TwentySix,
            Connectivity::Eighteen,
            Connectivity::Six,
        ] {
            check_ccl(&be, m, conn, false, name);
        }
    }
}

/// Values on a 1/1024 grid: their f64 sums are exact in any order, so the device's
/// centroids must equal the CPU's bit for bit even with ties and duplicates.
fn kmeans_matches_cpu() {
    let be = gpu();
    let mut rng = SplitMix64(common::rng::fresh_seed("kmeans_matches_cpu"));
    let (nseg, seg_len) = (7, 4099);
    for &(k, max_iter, clustered) in &[
        (4, 50, true),
        (4, 50, false),
        (1, 10, false),
        (3, 2, false),
        (5, 1, true),
        (16, 50, false),
    ] {
        let centres = [0.1f32, 0.35, 0.6, 0.9];
        let values: Vec<f32> = (0..nseg * seg_len)
            .map(|_| {
                let v = if clustered {
                    centres[rng.below(4)] + 0.04 * (rng.unit_f32() - 0.5)
                } else {
                    rng.unit_f32()
                };
                (v * 1024.0).round() / 1024.0
            })
            .collect();
        // Segment 2 empty, segment 5 a single voxel, the rest random.
        let region: Vec<u8> = (0..nseg * seg_len)
            .map(|i| match i / seg_len {
                2 => 0,
                5 => u8::from(i % seg_len == 17),
                _ => u8::from(rng.unit_f32() < 0.6),
            })
            .collect();
        let d_values = up(&be, &values);
        let d_region = up(&be, &region);
        let mut d_labels = up(&be, &vec![POISON_U8; values.len()]);
        let km = kmeans_segments(
            &be,
            &d_values,
            &d_region,
            nseg,
            seg_len,
            k,
            max_iter,
            &mut d_labels,
        )
        .expect("kmeans");
        let labels = down(&be, &d_labels);
        for s in 0..nseg {
            let r = s * seg_len..(s + 1) * seg_len;
            let idx: Vec<usize> = r.clone().filter(|&i| region[i] != 0).collect();
            let vals: Vec<f32> = idx.iter().map(|&i| values[i]).collect();
            for i in r.clone().filter(|&i| region[i] == 0) {
                assert_eq!(labels[i], 255, "outside the region: segment {s} voxel {i}");
            }
            if vals.is_empty() {
                assert!(km.counts_of(s).iter().all(|&c| c == 0));
                continue;
            }
            let cpu = kmeans_1d(&vals, k, max_iter);
            let what = format!("k={k} max_iter={max_iter} clustered={clustered} segment {s}");
            let gpu_l: Vec<u8> = idx.iter().map(|&i| labels[i]).collect();
            assert_eq!(gpu_l, cpu.labels, "{what}: assignments");
            assert_eq!(km.centroids_of(s), &cpu.centroids[..], "{what}: centroids");
            assert_eq!(km.counts_of(s), &cpu.counts[..], "{what}: counts");
        }
    }
    // k above the device limit is an error, not a panic.
    let v = up(&be, &[0.5f32; 8]);
    let r = up(&be, &[1u8; 8]);
    let mut l = up(&be, &[0u8; 8]);
    assert!(kmeans_segments(&be, &v, &r, 1, 8, 17, 10, &mut l).is_err());
}

fn morphology_matches_cpu() {
    let be = gpu();
    let mut rng = SplitMix64(common::rng::fresh_seed("morphology_matches_cpu"));
    for &dims in &[(3, 17, 23), (1, 1, 1), (2, 5, 1), (4, 64, 48)] {
        for p in [0.02, 0.2, 0.7] {
            let mut mask = random_mask(&mut rng, dims, p);
            // Non-0/1 foreground values must count as foreground.
            mask.iter_mut()
                .filter(|v| **v != 0)
                .enumerate()
                .for_each(|(i, v)| *v = 1 + (i % 3) as u8 * 100);
            let d_in = up(&be, &flat(&mask));
            for radius in [0, 1, 2, 3, 70] {
                for shape in [Structuring::Cross, Structuring::Square] {
                    for dil in [true, false] {
                        let mut out = up(&be, &vec![POISON_U8; mask.len()]);
                        morph2d(&be, &d_in, dims, radius, shape, dil, &mut out).expect("morph2d");
                        let cpu = if dil {
                            dilate(&mask, radius, shape)
                        } else {
                            erode(&mask, radius, shape)
                        };
                        assert_eq!(
                            down(&be, &out),
                            flat(&cpu),
                            "{dims:?} p={p} r={radius} {shape:?} dilate={dil}"
                        );
                    }
                }
            }
        }
    }
}

fn region_window_and_count_match_cpu() {
    let be = gpu();
    let mut rng = SplitMix64(common::rng::fresh_seed("region_window_and_count_match_cpu"));
    let dims = (6, 31, 29);
    let n = dims.0 * dims.1 * dims.2;
    let mut cam = Array3::from_shape_fn(dims, |_| rng.unit_f32());
    cam[[1, 2, 3]] = f32::NAN;
    cam[[2, 0, 0]] = 0.7;
    let positive: Vec<bool> = (0..dims.0).map(|z| z % 3 != 1).collect();
    let mut region = up(&be, &vec![POISON_U8; n]);
    threshold_slices(
        &be,
        &up(&be, &flat(&cam)),
        dims,
        &positive,
        0.7,
        &mut region,
    )
    .expect("threshold_slices");
    let cpu = positive_cam_region(&cam, &positive, 0.7).expect("cpu region");
    assert_eq!(down(&be, &region), flat(&cpu));
    assert_eq!(
        count_nonzero(&be, &region).expect("count"),
        cpu.iter().filter(|&&v| v != 0).count()
    );

    let mut hu: Vec<f32> = (0..n).map(|_| rng.unit_f32() * 3000.0 - 1500.0).collect();
    hu[0] = f32::NAN;
    hu[1] = -20.0;
    hu[2] = 180.0;
    hu[3] = f32::INFINITY;
    let mut w = up(&be, &vec![f32::NAN; n]);
    let sub = Window::SUBDURAL;
    window(&be, &up(&be, &hu), sub.lo(), sub.width, &mut w).expect("window");
    let gpu_w = down(&be, &w);
    for (i, (&h, &g)) in hu.iter().zip(&gpu_w).enumerate() {
        let c = Window::SUBDURAL.apply(h);
        assert!(
            c.to_bits() == g.to_bits() || (c.is_nan() && g.is_nan()),
            "voxel {i}: hu {h} cpu {c} gpu {g}"
        );
    }
}

/// A synthetic head: brain at 35 HU with noise, a few blood blobs (65 HU) under CAM peaks, a
/// calcification and a bone rim, integer HU (exact k-means sums).
fn head(
    rng: &mut SplitMix64,
    dims: (usize, usize, usize),
) -> (Array3<f32>, Array3<f32>, Vec<bool>) {
    let (nz, ny, nx) = dims;
    let blobs: Vec<(f64, f64, f64, f64)> = (0..3)
        .map(|_| {
            let r = 3.0 + rng.unit_f32() as f64 * 6.0;
            let cy = 12.0 + rng.unit_f32() as f64 * (ny as f64 - 24.0);
            let cx = 12.0 + rng.unit_f32() as f64 * (nx as f64 - 24.0);
            let cz = rng.below(nz) as f64;
            (cz, cy, cx, r)
        })
        .collect();
    let mut hu = Array3::<f32>::zeros(dims);
    let mut cam = Array3::<f32>::zeros(dims);
    let (my, mx) = (ny as f64 / 2.0, nx as f64 / 2.0);
    for ((z, y, x), v) in hu.indexed_iter_mut() {
        let (fz, fy, fx) = (z as f64, y as f64, x as f64);
        let head_r = ((fy - my).powi(2) / (my * my) + (fx - mx).powi(2) / (mx * mx)).sqrt();
        let mut h = if head_r > 0.98 {
            -1000.0
        } else if head_r > 0.9 {
            1200.0
        } else {
            35.0 + (rng.unit_f32() * 10.0 - 5.0) as f64
        };
        let mut c = 0.0f64;
        for &(cz, cy, cx, r) in &blobs {
            let d2 = (fy - cy).powi(2) + (fx - cx).powi(2) + (2.0 * (fz - cz)).powi(2);
            if d2 <= r * r && head_r <= 0.9 {
                h = 65.0 + (rng.unit_f32() * 6.0 - 3.0) as f64;
            }
            c = c.max((-d2 / (2.0 * (1.6 * r).powi(2))).exp());
        }
        if (y as i64 - 20).abs() < 2 && (x as i64 - 20).abs() < 2 {
            h = 400.0;
            c = c.max(0.8);
        }
        *v = h.round() as f32;
        cam[[z, y, x]] = (c + 0.05 * rng.unit_f32() as f64).min(1.0) as f32;
    }
    let positive: Vec<bool> = (0..nz)
        .map(|z| blobs.iter().any(|b| (b.0 - z as f64).abs() <= 3.0) || z % 4 == 0)
        .collect();
    (hu, cam, positive)
}

/// The refinement on the device: the HU on the host, the CAM uploaded.
fn refine_arrays(
    be: &CudaBackend,
    hu: &Array3<f32>,
    cam: &Array3<f32>,
    positive: &[bool],
    cfg: &RefineConfig,
) -> Result<RefineOutput, SegError> {
    refine_on(be, hu, &up(be, &flat(cam)), positive, cfg)
}

fn refine_matches_cpu() {
    let be = gpu();
    let mut rng = SplitMix64(common::rng::fresh_seed("refine_matches_cpu"));
    let configs = [
        RefineConfig::default(),
        RefineConfig {
            min_component_voxels: 5,
            min_cam_support: 0.2,
            ..RefineConfig::default()
        },
        RefineConfig {
            dilate_shape: Structuring::Cross,
            dilate_radius: 2,
            connectivity: Connectivity::Six,
            ..RefineConfig::default()
        },
        RefineConfig {
            per_slice_kmeans: false,
            k: 3,
            connectivity: Connectivity::Eighteen,
            ..RefineConfig::default()
        },
        RefineConfig {
            dilate_radius: 0,
            max_kmeans_iter: 2,
            min_cluster_voxels: 1,
            ..RefineConfig::default()
        },
        // The real-CT rules: a fixed band floor, growth to CAM 0.1, an opening.
        RefineConfig {
            cam_threshold: 0.4,
            grow_cam_threshold: 0.1,
            band_floor_hu: Some(55.0),
            open_radius: 2,
            min_component_voxels: 5,
            ..RefineConfig::default()
        },
        RefineConfig {
            open_radius: 1,
            exclude_saturated: false,
            smooth_radius: 0,
            ..RefineConfig::default()
        },
        RefineConfig {
            mode: ichcam::seg::RefineMode::Authors,
            ..RefineConfig::default()
        },
    ];
    for dims in [(12, 64, 64), (5, 37, 41)] {
        let (hu, cam, positive) = head(&mut rng, dims);
        for (i, cfg) in configs.iter().enumerate() {
            let cpu = refine(&hu, &cam, &positive, cfg).expect("cpu refine");
            let gpu = refine_arrays(&be, &hu, &cam, &positive, cfg).expect("gpu refine");
            let what = format!("{dims:?} config {i}");
            assert_eq!(gpu.cam_voxels, cpu.cam_voxels, "{what}: cam voxels");
            assert_eq!(
                gpu.cluster_voxels, cpu.cluster_voxels,
                "{what}: cluster voxels"
            );
            assert_eq!(
                gpu.dropped_small, cpu.dropped_small,
                "{what}: dropped small"
            );
            assert_eq!(gpu.dropped_cam, cpu.dropped_cam, "{what}: dropped cam");
            assert_eq!(gpu.component_sizes, cpu.component_sizes, "{what}: sizes");
            assert_eq!(gpu.n_components, cpu.n_components, "{what}: components");
            assert!(gpu.mask == cpu.mask, "{what}: masks differ");
        }
        // The synthetic head must give the refinement something to do.
        let cpu = refine(&hu, &cam, &positive, &configs[1]).expect("cpu refine");
        assert!(
            cpu.cluster_voxels > 0 && cpu.cam_voxels > 0,
            "{dims:?}: empty synthetic case"
        );
    }
    // Bad shapes are errors.
    let (hu, cam, positive) = head(&mut rng, (3, 30, 30));
    assert!(refine_arrays(&be, &hu, &cam, &positive[1..], &RefineConfig::default()).is_err());
    let small = Array3::<f32>::zeros((3, 30, 29));
    assert!(refine_arrays(&be, &hu, &small, &positive, &RefineConfig::default()).is_err());
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A volume of the size the timings use, once: labels, count and sizes as the CPU's.
fn ccl_large_volume_matches_cpu() {
    let be = gpu();
    let dims = (40, 512, 512);
    let host = hashed_mask(dims, 0.02);
    let mask = Array3::from_shape_vec(dims, host).expect("shape");
    check_ccl(&be, &mask, Connectivity::TwentySix, false, "40x512x512 2%");
}

/// A mask with foreground probability `p` from a hash of the voxel index: the same volume on
/// every run and machine.
fn hashed_mask(dims: (usize, usize, usize), p: f32) -> Vec<u8> {
    let n = dims.0 * dims.1 * dims.2;
    let thr = (p as f64 * (1u64 << 32) as f64) as u64;
    (0..n as u64)
        .map(|i| u8::from((SplitMix64(i ^ 0x5EED).next_u64() & 0xFFFF_FFFF) < thr))
        .collect()
}

/// Times the labelling kernels (buffers allocated and the mask uploaded once; each run is
/// the launches plus one stream sync, median of 20 after 3 warm-ups). Real GPUs only;
/// checks the sizes but asserts no timing.
fn ccl_gpu_timings() {
    let be = gpu();
    for (dims, p, name) in [
        ((40, 512, 512), 0.02f32, "ccl 40x512x512 2%"),
        ((512, 512, 512), 0.30, "ccl 512x512x512 30%"),
    ] {
        let n = dims.0 * dims.1 * dims.2;
        let host = hashed_mask(dims, p);
        let d_mask = up(&be, &host);
        let mut labels = up(&be, &vec![POISON_U32; n]);
        let mut run = CclRun::new(&be, dims, Connectivity::TwentySix, false).expect("ccl buffers");
        let mut times = Vec::new();
        for i in 0..23 {
            let t = Instant::now();
            run.launch(&be, &d_mask, &mut labels).expect("launch");
            be.stream().synchronize().expect("sync");
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (count, sizes) = run.collect(&be).expect("collect");
        let fg = host.iter().filter(|&&v| v != 0).count();
        assert_eq!(
            sizes.iter().skip(1).sum::<usize>(),
            fg,
            "{name}: sizes do not add up to the foreground"
        );
        println!("{name}: {:.3} ms", median_ms(times));
        println!("  ({count} components, median of 20 runs after 3 warm-ups)");
    }
}

fn ccl3d_convenience_allocates() {
    let be = gpu();
    let mut rng = SplitMix64(common::rng::fresh_seed("ccl3d_convenience_allocates"));
    let dims = (7, 19, 21);
    let mask = random_mask(&mut rng, dims, 0.3);
    let d_mask = up(&be, &flat(&mask));
    let (labels, n, sizes) = ccl3d(&be, &d_mask, dims, Connectivity::TwentySix).expect("ccl3d");
    let cpu = connected_components(&mask, Connectivity::TwentySix).expect("cpu");
    assert_eq!(n, cpu.n_components());
    assert_eq!(sizes, cpu.sizes);
    assert_eq!(down(&be, &labels), flat(&cpu.labels));
    let mut wrong = up(&be, &[0u32; 5]);
    assert!(ccl3d_into(&be, &d_mask, dims, Connectivity::TwentySix, &mut wrong).is_err());
}
