//! The channels-last (NHWC) training convolutions on the tensor cores (`kernels/conv_tc.cu`):
//! the forward with the batch-statistics epilogue (`conv2d_fwd_stats_mma_nhwc_bf16` / `_tf32`,
//! through `CudaBackend::conv2d_fwd_stats_nhwc_native`: z `[n][oh][ow][c_out]` from x
//! `[n][h][w][c_in]` and OIHW weights, and per output channel and 64-pixel tile the f64 sum and
//! sum of squared deviations) and the data gradient (`conv2d_bwd_data_mma_nhwc_*`, through the
//! backend op `Backend::conv2d_bwd_data_nhwc`, which CUDA routes to the native kernel at tf32
//! / bf16: dx `[n][h][w][c_in]` from dy `[n][oh][ow][c_out]`), each shape first asserted to run
//! natively (`conv_fwd_stats_nhwc_native`, `CudaBackend::conv_bwd_data_nhwc_kernel`), every
//! output poisoned with NaN first.
//!
//! Per shape and precision (bf16, tf32):
//! - z against the CPU's NCHW `conv2d_fwd` (transposed on the host), dx against the CPU's
//!   `conv2d_bwd_data`: on operands already rounded to the precision (exact products) within
//!   1e-5 relative, on unrounded ones within the precision's tolerance (bf16 1e-2, tf32 1e-3)
//!   and above 1e-5 (the reduced path ran);
//! - the partials against f64 sums taken on the host from the kernel's own z in the kernel's
//!   order (the sums bit for bit, the squared deviations within 1e-12 relative: a fused
//!   multiply-add may round differently), every entry written;
//! - the partials through norm.cu's `bn_stats_finalize` (the combine step
//!   `norm::batchnorm_train_from_partials` launches): the saved mean and 1/sqrt(var + eps)
//!   within 1 ulp of the exact (f64, two-pass) statistics of z, the running variance's update
//!   within 1 ulp of the exact one.
//!
//! The shapes: 1x1 stride 1 and 2, 3x3 stride 1 and 2 (odd and even images), the copy paths of
//! each operand (16-byte: `c_in % 4 == 0` for x, `K % 4 == 0` for the forward's weights,
//! `c_out % 4 == 0` for dy and the data gradient's weights; 4-byte otherwise), `c_in` and
//! `c_out` above and not multiples of 128 (a ragged second channel tile), pixel counts not
//! multiples of 64 or 128 (a ragged last statistics tile and block), a data-gradient phase of
//! more than 128 pixels, many K tiles, and tiny ones. Also: a captured graph of both ops
//! replays bit for bit what the eager calls wrote, and f32 / `MmaRoute::Never` have no native
//! kernel (the statistics forward is refused; the data-gradient op takes the layout changes).
//!
//! The 64 x 256 tile (the `_m64` kernels, which run where the GEMM's M is at most 64: `c_out` of
//! the forward, `c_in` of the data gradient; the shapes above with such channel counts take it
//! too): forwards with `c_out` 64, 48, 33 (odd, stride 2) on it and 80 on 128 x 128, data
//! gradients with `c_in` 64, 48, 33 (odd, stride 1) on it and 80 on 128 x 128 (stride 2, a
//! phase of 396 pixels: two 256-pixel tiles), each kernel asserted by name; each against the
//! CPU as above (z and its partials and finalized statistics, dx), and each 64 x 256 case
//! against the 128 x 128 kernel on the same data: the layer with random channels appended up
//! to 80 (the forward's output channels: weight rows; the data gradient's input channels:
//! weight columns) takes the 128 x 128 kernel, and its first channels of z, the partials of
//! those channels, and the first channels of dx must be the 64 x 256 kernel's bit for bit.
//! Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_nhwc_train-* --include-ignored`);
//! without a device the device tests are ignored.

mod common;
use common::cuda::{device, rel_err, round};
use common::nhwc::{check_zero_taps, cpu_dx, to_nhwc};
use common::rng::SplitMix64;
use common::shapes::conv;

use cudarc::driver::{CudaSlice, LaunchConfig};
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::{CudaBackend, KArg, MmaRoute};
use ichcam::engine::{Backend, Conv2d, Precision};

fn main() {
    common::cuda::main(vec![
        device("nhwc_bf16_train_forward_and_stats", || {
            train_forward_matches_cpu(Precision::Bf16)
        }),
        device("nhwc_tf32_train_forward_and_stats", || {
            train_forward_matches_cpu(Precision::Tf32)
        }),
        device("nhwc_bf16_data_gradient_matches_cpu", || {
            data_gradient_matches_cpu(Precision::Bf16)
        }),
        device("nhwc_tf32_data_gradient_matches_cpu", || {
            data_gradient_matches_cpu(Precision::Tf32)
        }),
        device(
            "nhwc_strided_data_gradient_skips_the_zero_taps",
            nhwc_strided_data_gradient_skips_the_zero_taps,
        ),
        device(
            "nhwc_train_kernels_replay_in_a_graph",
            nhwc_train_kernels_replay_in_a_graph,
        ),
        device(
            "no_native_train_kernels_at_f32_or_route_never",
            no_native_train_kernels_at_f32_or_route_never,
        ),
        device(
            "nhwc_bf16_train_tile_m64_matches_cpu_and_the_128_tile",
            || tile_m64_matches_cpu_and_the_128_tile(Precision::Bf16),
        ),
        device(
            "nhwc_tf32_train_tile_m64_matches_cpu_and_the_128_tile",
            || tile_m64_matches_cpu_and_the_128_tile(Precision::Tf32),
        ),
    ])
}

/// Pixels per statistics tile (`conv::STATS_TILE`).
const TILE: usize = 64;

/// The shapes, each with the copy paths it takes (forward x / forward weights / dy: 16 or 4
/// bytes).
fn shapes() -> [(Conv2d, &'static str); 12] {
    [
        // 1x1 stride 1, K = 64; 9x11, 198 pixels (3 tiles and 6); c_out 136: two channel tiles.
        (conv(2, 64, 9, 11, 136, 1, 1, 0), "16/16/16"),
        // 1x1 stride 2 (a downsample): 9x13 -> 5x7, batch 3, 105 pixels; c_out 130: dy 4-byte;
        // three of the data gradient's four phases have no tap (zeros).
        (conv(3, 32, 9, 13, 130, 1, 2, 0), "16/16/4"),
        // 3x3 stride 1 padding 1, K = 108; the data gradient's K = 9 * 140 (40 K tiles).
        (conv(2, 12, 11, 9, 140, 3, 1, 1), "16/16/16"),
        // 3x3 stride 2 padding 1, odd 13x12 -> 7x6, batch 3: phases of 4, 2, 2, 1 taps.
        (conv(3, 20, 13, 12, 160, 3, 2, 1), "16/16/16"),
        // 3x3 stride 2 padding 1 with c_in = 6 (K = 54) and c_out = 70: 4-byte copies of all.
        (conv(3, 6, 7, 9, 70, 3, 2, 1), "4/4/4"),
        // 1x1 with c_in = 66 and c_out = 130: 4-byte copies of all, 130 pixels.
        (conv(1, 66, 10, 13, 130, 1, 1, 0), "4/4/4"),
        // 3x3 stride 1, c_in = 130 (the data gradient's two channel tiles, the last of 2), K =
        // 1170 (37 K tiles), c_out 36.
        (conv(2, 130, 6, 7, 36, 3, 1, 1), "4/4/16"),
        // 1x1 stride 2, c_in = 200, even 8x8 -> 4x4: 32 pixels, one partial tile.
        (conv(2, 200, 8, 8, 64, 1, 2, 0), "16/16/16"),
        // 3x3 stride 2 padding 1 on an even image (ResNet's): 8x10 -> 4x5, c_out 132.
        (conv(2, 16, 8, 10, 132, 3, 2, 1), "16/16/16"),
        // 3x3 stride 2 padding 1, 24x22 -> 12x11: a data-gradient phase of 264 pixels
        // (three 128-pixel tiles) and 264 output pixels.
        (conv(2, 8, 24, 22, 24, 3, 2, 1), "16/16/16"),
        // Tiny: c_in 3, c_out 5, 5x5: one partial tile of 25 pixels, K = 27.
        (conv(1, 3, 5, 5, 5, 3, 1, 1), "4/4/4"),
        // 3x3 stride 1 without padding, odd 9x7 -> 7x5, c_in 4, c_out 129.
        (conv(3, 4, 9, 7, 129, 3, 1, 0), "16/16/4"),
    ]
}

/// Uploads an f64 vector.
fn up64(g: &CudaBackend, v: &[f64]) -> CudaSlice<f64> {
    g.stream().clone_htod(v).expect("upload f64")
}

/// Downloads an f64 buffer.
fn down64(g: &CudaBackend, b: &CudaSlice<f64>) -> Vec<f64> {
    g.synchronize().expect("synchronize");
    g.stream().clone_dtoh(b).expect("download f64")
}

/// The statistics tiles of `s`'s output.
fn tiles(s: &Conv2d) -> usize {
    (s.n * s.out_h() * s.out_w()).div_ceil(TILE)
}

/// The native training forward on `g`: x (NCHW) transposed to NHWC on the host; z (NHWC) and
/// the partials poisoned with NaN first. Returns z, part_s, part_q.
fn gpu_fwd_stats(
    g: &CudaBackend,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let xb = g
        .upload(&to_nhwc(x, s.n, s.c_in, s.h * s.w))
        .expect("upload");
    let wb = g.upload(w).expect("upload");
    let mut z = g.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
    let nan = vec![f64::NAN; s.c_out * tiles(s)];
    let (mut ps, mut pq) = (up64(g, &nan), up64(g, &nan));
    // SAFETY: x, w and z hold the lengths `s` gives, the partials c_out * tiles values.
    unsafe { g.conv2d_fwd_stats_nhwc_native(s, &xb, &wb, &mut z, &mut ps, &mut pq) }
        .expect("conv2d_fwd_stats_nhwc_native");
    (
        g.download(&z).expect("download"),
        down64(g, &ps),
        down64(g, &pq),
    )
}

/// The data gradient on `g` through the backend op (the native kernel at tf32 / bf16): dy
/// (NCHW) transposed to NHWC on the host; dx (NHWC) poisoned with NaN first.
fn gpu_bwd_data(g: &CudaBackend, s: &Conv2d, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let hw = s.out_h() * s.out_w();
    let dyb = g.upload(&to_nhwc(dy, s.n, s.c_out, hw)).expect("upload");
    let wb = g.upload(w).expect("upload");
    let mut dx = g.upload(&vec![f32::NAN; s.x_len()]).expect("upload");
    g.conv2d_bwd_data_nhwc(s, &dyb, &wb, &mut dx)
        .expect("conv2d_bwd_data_nhwc");
    g.download(&dx).expect("download")
}

/// Whether `g` runs the 64 x 256 tile's f32-storage kernels at its precision: where the
/// device gives a block their shared memory, 164 KiB at bf16 and 139 KiB at tf32 with the
/// pixel table (conv.rs's `shared_memory`): sm_90 both, sm_80 (163 KiB) tf32 only.
fn m64_fits(g: &CudaBackend) -> bool {
    let need = if g.precision() == Precision::Bf16 {
        167_936
    } else {
        142_336
    };
    g.shared_memory_per_block() >= need
}

/// The native data-gradient kernel of `s` on `g` (the diagnostic): the 64 x 256 tile's
/// (`_m64`) for `c_in <= 64`.
fn bwd_data_kernel(g: &CudaBackend, s: &Conv2d) -> String {
    let tile = if s.c_in <= 64 && m64_fits(g) {
        "_m64"
    } else {
        ""
    };
    format!("conv2d_bwd_data_mma_nhwc_{}{tile}", g.precision())
}

/// The native statistics-forward kernel of `s` on `g` (the diagnostic): the 64 x 256 tile's
/// (`_m64`) for `c_out <= 64`.
fn fwd_stats_kernel(g: &CudaBackend, s: &Conv2d) -> String {
    let tile = if s.c_out <= 64 && m64_fits(g) {
        "_m64"
    } else {
        ""
    };
    format!("conv2d_fwd_stats_mma_nhwc_{}{tile}", g.precision())
}

/// The CPU's NCHW forward, transposed to NHWC.
fn cpu_fwd(s: &Conv2d, x: &[f32], w: &[f32]) -> Vec<f32> {
    let cpu = CpuBackend::<f32>::new();
    let (xb, wb) = (
        cpu.upload(x).expect("upload"),
        cpu.upload(w).expect("upload"),
    );
    let mut y = cpu.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
    cpu.conv2d_fwd(s, &xb, &wb, &mut y).expect("cpu conv2d_fwd");
    let y = cpu.download(&y).expect("download");
    to_nhwc(&y, s.n, s.c_out, s.out_h() * s.out_w())
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    if a.is_nan() || b.is_nan() || (a < 0.0) != (b < 0.0) {
        return if a == b { 0 } else { u32::MAX };
    }
    a.to_bits().abs_diff(b.to_bits())
}

/// Checks the partials against z (NHWC, `c` channels, `p` pixels): per channel and tile the
/// f64 sum in pixel order bit for bit, the squared deviations from the tile's mean within
/// 1e-12 relative. Returns the worst relative difference of the squared deviations.
fn check_partials(what: &str, z: &[f32], c: usize, p: usize, ps: &[f64], pq: &[f64]) -> f64 {
    let t = p.div_ceil(TILE);
    assert_eq!(ps.len(), c * t);
    let mut worst = 0.0f64;
    for ch in 0..c {
        for tile in 0..t {
            let px = tile * TILE..(tile * TILE + TILE).min(p);
            let nv = px.len() as f64;
            let vals = px.map(|q| z[q * c + ch] as f64);
            let mut sum = 0.0f64;
            for v in vals.clone() {
                sum += v;
            }
            let mean = sum / nv;
            let mut sq = 0.0f64;
            for v in vals {
                sq += (v - mean) * (v - mean);
            }
            let (gs, gq) = (ps[ch * t + tile], pq[ch * t + tile]);
            assert!(
                gs.to_bits() == sum.to_bits(),
                "{what}: channel {ch} tile {tile}: sum {gs} vs the host's {sum} from z"
            );
            let d = (gq - sq).abs() / sq.abs().max(1e-300);
            assert!(
                d <= 1e-12 || gq == sq,
                "{what}: channel {ch} tile {tile}: squared deviations {gq} vs the host's {sq} ({d:e})"
            );
            worst = worst.max(if gq == sq { 0.0 } else { d });
        }
    }
    worst
}

/// The partials through `bn_stats_finalize` (norm.cu's combine step, as
/// `norm::batchnorm_train_from_partials` launches it: one block of 256 threads per channel):
/// the saved mean and invstd within 1 ulp of the exact two-pass statistics of z, the running
/// variance (from 1, momentum 0.1) within 1 ulp of the exact unbiased update. Returns the worst
/// ulp distance.
fn check_finalize(
    what: &str,
    g: &CudaBackend,
    z: &[f32],
    c: usize,
    p: usize,
    ps: &[f64],
    pq: &[f64],
) -> u32 {
    let (eps, momentum) = (1e-5f64, 0.1f64);
    let t = p.div_ceil(TILE);
    let (psb, pqb) = (up64(g, ps), up64(g, pq));
    let rm = g.upload(&vec![0.0; c]).expect("upload");
    let rv = g.upload(&vec![1.0; c]).expect("upload");
    let sm = g.upload(&vec![f32::NAN; c]).expect("upload");
    let si = g.upload(&vec![f32::NAN; c]).expect("upload");
    let args = [
        KArg::Ptr(g.ptr(&psb)),
        KArg::Ptr(g.ptr(&pqb)),
        KArg::Ptr(g.ptr(&rm)),
        KArg::Ptr(g.ptr(&rv)),
        KArg::Ptr(g.ptr(&sm)),
        KArg::Ptr(g.ptr(&si)),
        KArg::I32(t as i32),
        KArg::I32(p as i32),
        KArg::I32(TILE as i32),
        KArg::F64(eps),
        KArg::F64(momentum),
    ];
    let cfg = LaunchConfig {
        grid_dim: (c as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the partials hold c * t values, the per-channel buffers c each.
    unsafe { g.launch_raw("norm", "bn_stats_finalize", cfg, &args) }.expect("bn_stats_finalize");
    let [rv, sm, si] = [&rv, &sm, &si].map(|b| g.download(b).expect("download"));
    let mut worst = 0;
    for ch in 0..c {
        let vals = (0..p).map(|q| z[q * c + ch] as f64);
        let mean = vals.clone().sum::<f64>() / p as f64;
        let ss = vals.map(|v| (v - mean) * (v - mean)).sum::<f64>();
        let invstd = 1.0 / (ss / p as f64 + eps).sqrt();
        let unbiased = if p > 1 {
            ss / (p - 1) as f64
        } else {
            ss / p as f64
        };
        let rv_want = (1.0 - momentum) + momentum * unbiased;
        let u = [
            ulps(sm[ch], mean as f32),
            ulps(si[ch], invstd as f32),
            ulps(rv[ch], rv_want as f32),
        ];
        assert!(
            u.iter().all(|&u| u <= 1),
            "{what}: channel {ch}: mean {} vs {mean}, invstd {} vs {invstd}, running var {} vs {rv_want} (ulps {u:?})",
            sm[ch],
            si[ch],
            rv[ch]
        );
        worst = worst.max(u.into_iter().max().unwrap_or(0));
    }
    worst
}

fn train_forward_matches_cpu(p: Precision) {
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let tol = p.tolerance().expect("a reduced precision");
    let mut rng = SplitMix64::fresh(&format!("conv_nhwc_train_fwd_{p}"));
    let (mut exact, mut worst, mut worst_q, mut worst_ulp) = (0.0f64, 0.0f64, 0.0f64, 0u32);
    for (s, path) in shapes() {
        assert!(g.conv_fwd_stats_nhwc_native(&s), "{p} {s:?}: not native");
        assert_eq!(
            g.conv_fwd_stats_nhwc_kernel(&s),
            Some(fwd_stats_kernel(&g, &s).as_str())
        );
        let what = format!("{p} {s:?} (copies {path})");
        let pixels = s.n * s.out_h() * s.out_w();
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (xr, wr) = (round(p, &x), round(p, &w));
        let (z, ps, pq) = gpu_fwd_stats(&g, &s, &xr, &wr);
        let e = rel_err(&z, &cpu_fwd(&s, &xr, &wr));
        assert!(
            e < 1e-5,
            "{what} on {p}-exact operands: z relative error {e:e} (>= 1e-5)"
        );
        exact = exact.max(e);
        worst_q = worst_q.max(check_partials(&what, &z, s.c_out, pixels, &ps, &pq));
        let (z, ps, pq) = gpu_fwd_stats(&g, &s, &x, &w);
        let e = rel_err(&z, &cpu_fwd(&s, &x, &w));
        assert!(
            e < tol && e > 1e-5,
            "{what}: z relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        worst = worst.max(e);
        worst_q = worst_q.max(check_partials(&what, &z, s.c_out, pixels, &ps, &pq));
        worst_ulp = worst_ulp.max(check_finalize(&what, &g, &z, s.c_out, pixels, &ps, &pq));
        println!("nhwc train forward {what}: z relative error {e:.2e}");
    }
    println!(
        "nhwc {p} train forward, {} shapes: worst z relative error {worst:.2e} ({p}-exact operands {exact:.2e}); \
         partial sums bit-exact, squared deviations within {worst_q:.1e}; finalized statistics within {worst_ulp} ulp",
        shapes().len()
    );
}

fn data_gradient_matches_cpu(p: Precision) {
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let tol = p.tolerance().expect("a reduced precision");
    let mut rng = SplitMix64::fresh(&format!("conv_nhwc_bwd_data_{p}"));
    let (mut exact, mut worst) = (0.0f64, 0.0f64);
    for (s, path) in shapes() {
        assert_eq!(
            g.conv_bwd_data_nhwc_kernel(&s),
            Some(bwd_data_kernel(&g, &s).as_str()),
            "{p} {s:?}: not native"
        );
        let what = format!("{p} {s:?} (copies {path})");
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (dyr, wr) = (round(p, &dy), round(p, &w));
        let e = rel_err(&gpu_bwd_data(&g, &s, &dyr, &wr), &cpu_dx(&s, &dyr, &wr));
        assert!(
            e < 1e-5,
            "{what} on {p}-exact operands: dx relative error {e:e} (>= 1e-5)"
        );
        exact = exact.max(e);
        let e = rel_err(&gpu_bwd_data(&g, &s, &dy, &w), &cpu_dx(&s, &dy, &w));
        assert!(
            e < tol && e > 1e-5,
            "{what}: dx relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        worst = worst.max(e);
        println!("nhwc data gradient {what}: dx relative error {e:.2e}");
    }
    println!(
        "nhwc {p} data gradient, {} shapes: worst dx relative error {worst:.2e} ({p}-exact operands {exact:.2e})",
        shapes().len()
    );
}

/// The stride-2 data gradient multiplies no structurally zero tap (as
/// tests/cuda_conv_tc.rs checks the NCHW kernels): with one weight of tap (0, 0) infinite, the
/// input pixels that tap never reaches (ih or iw even for a 3x3, stride 2, pad 1) stay finite
/// and equal to the CPU's, while pixels it reaches do not (a kernel that multiplied the zero
/// taps, or a phase's A holding another phase's taps, would make them 0 * inf = NaN). Both dy
/// copy paths (`c_out` 8 and 6).
fn nhwc_strided_data_gradient_skips_the_zero_taps() {
    for s in [conv(2, 5, 9, 10, 8, 3, 2, 1), conv(2, 5, 9, 10, 6, 3, 2, 1)] {
        let mut rng = SplitMix64::fresh("conv_nhwc_zero_taps");
        let mut w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let ci = 3;
        w[(2 * s.c_in + ci) * 9] = f32::INFINITY; // w[co 2][ci 3][0][0]
        for p in [Precision::Tf32, Precision::Bf16] {
            let g = common::cuda::gpu_at(p);
            assert_eq!(
                g.conv_bwd_data_nhwc_kernel(&s),
                Some(bwd_data_kernel(&g, &s).as_str())
            );
            // Operands exact at p: the finite pixels then match the CPU within 1e-5.
            let (w, dy) = (round(p, &w), round(p, &dy));
            let want = cpu_dx(&s, &dy, &w);
            let got = gpu_bwd_data(&g, &s, &dy, &w);
            check_zero_taps(&format!("{p} {s:?}"), &s, ci, &got, &want);
        }
    }
}

/// A captured training forward (its OHWI weight copy and the kernel) and data gradient (its
/// weight copy and the kernel), scratch from the arena warmed by the eager calls, replay bit
/// for bit what the eager calls wrote, at bf16 and tf32.
fn nhwc_train_kernels_replay_in_a_graph() {
    for p in [Precision::Bf16, Precision::Tf32] {
        // A backend of its own (its own stream): the other tests' work on the shared stream
        // would break the capture.
        let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
        g.set_precision(p).expect("the device takes this precision");
        let mut rng = SplitMix64::fresh(&format!("conv_nhwc_train_graph_{p}"));
        let s = shapes()[3].0; // 3x3 stride 2: both weight copies run, four phases
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (z_eager, ps_eager, pq_eager) = gpu_fwd_stats(&g, &s, &x, &w);
        assert_eq!(
            g.conv_bwd_data_nhwc_kernel(&s),
            Some(bwd_data_kernel(&g, &s).as_str())
        );
        let dx_eager = gpu_bwd_data(&g, &s, &dy, &w);

        let xb = g
            .upload(&to_nhwc(&x, s.n, s.c_in, s.h * s.w))
            .expect("upload");
        let dyb = g
            .upload(&to_nhwc(&dy, s.n, s.c_out, s.out_h() * s.out_w()))
            .expect("upload");
        let wb = g.upload(&w).expect("upload");
        let mut z = g.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
        let mut dx = g.upload(&vec![f32::NAN; s.x_len()]).expect("upload");
        let nan = vec![f64::NAN; s.c_out * tiles(&s)];
        let (mut ps, mut pq) = (up64(&g, &nan), up64(&g, &nan));
        let (graph, ()) = g
            .capture(|| {
                // SAFETY: every buffer holds the length `s` gives (the partials c_out * tiles).
                unsafe { g.conv2d_fwd_stats_nhwc_native(&s, &xb, &wb, &mut z, &mut ps, &mut pq)? };
                g.conv2d_bwd_data_nhwc(&s, &dyb, &wb, &mut dx)
            })
            .expect("capture");
        assert!(
            g.download(&z).expect("download").iter().all(|v| v.is_nan())
                && g.download(&dx)
                    .expect("download")
                    .iter()
                    .all(|v| v.is_nan()),
            "nothing runs while capturing"
        );
        graph.replay().expect("replay");
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits());
        let same64 =
            |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits());
        let (zg, dxg) = (
            g.download(&z).expect("download"),
            g.download(&dx).expect("download"),
        );
        assert!(
            same(&zg, &z_eager),
            "{p}: z of the replay differs from the eager call"
        );
        assert!(
            same(&dxg, &dx_eager),
            "{p}: dx of the replay differs from the eager call"
        );
        assert!(
            same64(&down64(&g, &ps), &ps_eager) && same64(&down64(&g, &pq), &pq_eager),
            "{p}: the partials of the replay differ from the eager call's"
        );
        assert!(
            zg.iter().chain(&dxg).all(|v| v.is_finite()),
            "{p}: a non-finite output"
        );
    }
}

/// At f32 and with the route `Never` (no `mma.sync` kernel) neither op runs natively: the
/// statistics forward is refused (nothing written), the data-gradient op takes the layout
/// changes around the NCHW kernels (dx the CPU's); nor does the statistics forward run without
/// a reduction (`c_in = 0`: no statistics epilogue).
fn no_native_train_kernels_at_f32_or_route_never() {
    let s = shapes()[0].0;
    let f32_be = common::cuda::gpu_at(Precision::F32);
    let mut never = common::cuda::gpu_at(Precision::Bf16);
    never.set_mma_route(MmaRoute::Never);
    for g in [&f32_be, &never] {
        assert!(!g.conv_fwd_stats_nhwc_native(&s));
        assert_eq!(g.conv_fwd_stats_nhwc_kernel(&s), None);
        assert_eq!(g.conv_bwd_data_nhwc_kernel(&s), None);
        let x = g.upload(&vec![1.0; s.x_len()]).expect("upload");
        let w = g.upload(&vec![1.0; s.w_len()]).expect("upload");
        let mut z = g.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
        let nan = vec![f64::NAN; s.c_out * tiles(&s)];
        let (mut ps, mut pq) = (up64(g, &nan), up64(g, &nan));
        // SAFETY: every buffer holds the length `s` gives; the call is refused anyway.
        let e = unsafe { g.conv2d_fwd_stats_nhwc_native(&s, &x, &w, &mut z, &mut ps, &mut pq) };
        assert!(e.is_err(), "{}: the statistics forward ran", g.precision());
        assert!(g.download(&z).expect("download").iter().all(|v| v.is_nan()));
        // The op's other way: the NCHW kernels between layout changes (f32 exact; the route
        // Never's WMMA kernels at bf16).
        let mut rng = SplitMix64::fresh("conv_nhwc_bwd_data_fallback");
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let wv = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (dy, wv) = (round(Precision::Bf16, &dy), round(Precision::Bf16, &wv));
        let e = rel_err(&gpu_bwd_data(g, &s, &dy, &wv), &cpu_dx(&s, &dy, &wv));
        assert!(
            e < 1e-5,
            "{}: dx by the layout changes: relative error {e:e}",
            g.precision()
        );
    }
    let tf32 = common::cuda::gpu_at(Precision::Tf32);
    assert!(tf32.conv_fwd_stats_nhwc_native(&s));
    // c_in 64: the 64 x 256 tile.
    assert_eq!(
        tf32.conv_bwd_data_nhwc_kernel(&s),
        Some(bwd_data_kernel(&tf32, &s).as_str())
    );
    assert!(bwd_data_kernel(&tf32, &s).ends_with("_m64"));
    let mut empty = s;
    empty.c_in = 0;
    assert!(!tf32.conv_fwd_stats_nhwc_native(&empty));
}

/// `[n][c][hw]` with `c_pad - c` channels of `fill` appended to each of the n blocks.
fn pad_channels(v: &[f32], n: usize, c: usize, hw: usize, c_pad: usize, fill: &[f32]) -> Vec<f32> {
    let extra = (c_pad - c) * hw;
    assert_eq!(fill.len(), n * extra);
    let mut out = Vec::with_capacity(n * c_pad * hw);
    for (img, f) in v.chunks(c * hw).zip(fill.chunks(extra)) {
        out.extend_from_slice(img);
        out.extend_from_slice(f);
    }
    out
}

/// The first `c` channels of each pixel of an NHWC tensor of `c_pad` channels.
fn first_channels(v: &[f32], c_pad: usize, c: usize) -> Vec<f32> {
    v.chunks(c_pad).flat_map(|px| px[..c].to_vec()).collect()
}

/// How many of `a`'s values differ in their bits from `b`'s.
fn differ<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(u, v)| (**u).into().to_bits() != (**v).into().to_bits())
        .count()
}

/// The 64 x 256 tile against the CPU and against the 128 x 128 kernel on the same data (see
/// the module doc).
fn tile_m64_matches_cpu_and_the_128_tile(p: Precision) {
    const WIDE: usize = 80;
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let tol = p.tolerance().expect("a reduced precision");
    let mut rng = SplitMix64::fresh(&format!("conv_nhwc_train_m64_{p}"));
    let mut compared = 0;
    // Forwards: c_out 64, 48, 80, 33.
    for s in [
        conv(2, 24, 17, 15, 64, 3, 1, 1),
        conv(2, 24, 17, 15, 48, 3, 1, 1),
        conv(2, 24, 17, 15, WIDE, 3, 1, 1),
        conv(3, 20, 13, 12, 33, 3, 2, 1),
    ] {
        assert_eq!(
            g.conv_fwd_stats_nhwc_kernel(&s),
            Some(fwd_stats_kernel(&g, &s).as_str())
        );
        let what = format!("{p} forward {s:?} ({})", fwd_stats_kernel(&g, &s));
        let pixels = s.n * s.out_h() * s.out_w();
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (xr, wr) = (round(p, &x), round(p, &w));
        let (z, ps, pq) = gpu_fwd_stats(&g, &s, &xr, &wr);
        let e = rel_err(&z, &cpu_fwd(&s, &xr, &wr));
        assert!(
            e < 1e-5,
            "{what} on {p}-exact operands: relative error {e:e}"
        );
        check_partials(&what, &z, s.c_out, pixels, &ps, &pq);
        let (z, ps, pq) = gpu_fwd_stats(&g, &s, &x, &w);
        let e = rel_err(&z, &cpu_fwd(&s, &x, &w));
        assert!(
            e < tol && e > 1e-5,
            "{what}: z relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        check_partials(&what, &z, s.c_out, pixels, &ps, &pq);
        check_finalize(&what, &g, &z, s.c_out, pixels, &ps, &pq);
        println!("nhwc train tile {what}: z relative error {e:.2e}");
        if s.c_out > 64 {
            continue;
        }
        let wide = Conv2d { c_out: WIDE, ..s };
        assert_eq!(
            g.conv_fwd_stats_nhwc_kernel(&wide),
            Some(fwd_stats_kernel(&g, &wide).as_str())
        );
        let k = s.c_in * s.kh * s.kw;
        let more = rng.vec_f32((WIDE - s.c_out) * k, -1.0, 1.0);
        let (zw, psw, pqw) =
            gpu_fwd_stats(&g, &wide, &x, &pad_channels(&w, 1, s.c_out, k, WIDE, &more));
        let zw = first_channels(&zw, WIDE, s.c_out);
        // The partials are [channel][tile]: the first c_out channels' come first.
        let n = ps.len();
        let d = [
            differ(&z, &zw),
            differ(&ps, &psw[..n]),
            differ(&pq, &pqw[..n]),
        ];
        assert_eq!(
            d, [0; 3],
            "{what}: z, part_s, part_q values differing from the 128 x 128 kernel's"
        );
        compared += z.len() + 2 * n;
    }
    // Data gradients: c_in 64, 48, 80 (stride 2), 33 (stride 1).
    for s in [
        conv(3, 64, 24, 22, 40, 3, 2, 1),
        conv(3, 48, 24, 22, 40, 3, 2, 1),
        conv(3, WIDE, 24, 22, 40, 3, 2, 1),
        conv(2, 33, 17, 15, 24, 3, 1, 1),
    ] {
        let name = bwd_data_kernel(&g, &s);
        assert_eq!(g.conv_bwd_data_nhwc_kernel(&s), Some(name.as_str()));
        let what = format!("{p} data gradient {s:?} ({name})");
        let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (dyr, wr) = (round(p, &dy), round(p, &w));
        let e = rel_err(&gpu_bwd_data(&g, &s, &dyr, &wr), &cpu_dx(&s, &dyr, &wr));
        assert!(
            e < 1e-5,
            "{what} on {p}-exact operands: relative error {e:e}"
        );
        let dx = gpu_bwd_data(&g, &s, &dy, &w);
        let e = rel_err(&dx, &cpu_dx(&s, &dy, &w));
        assert!(
            e < tol && e > 1e-5,
            "{what}: dx relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        println!("nhwc train tile {what}: dx relative error {e:.2e}");
        if s.c_in > 64 {
            continue;
        }
        let wide = Conv2d { c_in: WIDE, ..s };
        assert_eq!(
            g.conv_bwd_data_nhwc_kernel(&wide),
            Some(bwd_data_kernel(&g, &wide).as_str())
        );
        let khw = s.kh * s.kw;
        let more = rng.vec_f32(s.c_out * (WIDE - s.c_in) * khw, -1.0, 1.0);
        let ww = pad_channels(&w, s.c_out, s.c_in, khw, WIDE, &more);
        let dxw = first_channels(&gpu_bwd_data(&g, &wide, &dy, &ww), WIDE, s.c_in);
        let d = differ(&dx, &dxw);
        assert_eq!(
            d,
            0,
            "{what}: {d} of {} dx values differ from the 128 x 128 kernel's",
            dx.len()
        );
        compared += dx.len();
    }
    println!(
        "nhwc {p} training, 64 x 256 tile: {compared} values bit for bit the 128 x 128 kernels'"
    );
}
