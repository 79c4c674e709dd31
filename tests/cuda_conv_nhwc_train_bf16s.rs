//! The channels-last training convolutions on activations stored in bf16 (`kernels/conv_tc.cu`,
//! `--precision bf16`): the forward with the batch-statistics epilogue
//! (`conv2d_fwd_stats_mma_nhwc_bf16s`, through `CudaBackend::conv2d_fwd_stats_nhwc_bf16s_native`,
//! public and unsafe as its f32-storage sibling is, for the raw partials, the lengths right by
//! construction here; and through the backend op `Backend::conv2d_bn_train_fwd_nhwc_bf16`, which
//! CUDA routes to it: x `[n][h][w][c_in]` and z `[n][oh][ow][c_out]` bf16 values two to an f32
//! slot, value i in the 16-bit half i of the buffer, OIHW f32 weights copied to bf16 per call;
//! the partials f64 as `conv2d_fwd_stats`'s, of the ROUNDED z) and the data gradient
//! (`conv2d_bwd_data_mma_nhwc_bf16s`, through the backend op `Backend::conv2d_bwd_data_nhwc_bf16`,
//! which CUDA routes to it at bf16: dy bf16 storage, dx f32), each shape first asserted to take
//! the kernel, every output poisoned first (0xFFFF halves = bf16 NaN; NaN for dx and the
//! partials).
//!
//! Per shape:
//! - z on bf16-exact x and w: every value within 1 bf16 ulp of the CPU's f32 `conv2d_fwd`
//!   rounded to bf16 (nearest even; the sums differ only in order) or, near zero, within 2e-5
//!   (counted), and at least 99% of them exactly it; on unrounded operands (x rounded by the
//!   packing, w by the kernel's copy) the same z bit for bit (the weight copy rounds as the host
//!   does) and within 1e-2 relative of the CPU's f32 result on the unrounded data (and above 1e-5);
//! - the partials: per channel and 64-pixel tile the f64 sum of the kernel's own (rounded) z in
//!   pixel order bit for bit, the squared deviations from the tile's mean within 1e-12 relative;
//!   every entry written;
//! - the backend op on the unrounded operands: z bit for bit the kernel's, the saved batch mean
//!   within 1e-6 (relative to 1 + |mean|) of the f64 mean of the stored z, per channel;
//! - dx on bf16-exact dy and w within 1e-5 relative of the CPU's f32 `conv2d_bwd_data` (on the
//!   unpacked dy); on unrounded w the same dx bit for bit (the kernel's weight copy rounds as
//!   the host does) and within 1e-2 of the CPU's on the unrounded w (and above 1e-5).
//!
//! The shapes: 1x1 stride 1 and 2, 3x3 stride 1 and 2, each copy path of the gathered operand
//! (x by `c_in`, dy by `c_out`: 16-byte for a multiple of 8, 4-byte for other even counts, 2-byte
//! loads for odd ones), odd `c_in`, `c_out` and pixel counts (odd storage lengths: the last slot's
//! unused high half left alone), two channel tiles, more K tiles than the ring's 6 stages, a
//! 1x1 stride 2 whose three other phases have no tap (dx zeros there). Also: a stride-2 data
//! gradient with one infinite weight of tap (0, 0) leaves every pixel that tap cannot reach
//! finite and the CPU's (no zero tap multiplied, no phase reading another's rows); a captured graph of
//! both kernels replays bit for bit what the eager calls wrote; at tf32 and with the route `Never`
//! no bf16-storage kernel runs (the statistics entry refuses, writing nothing; the data-gradient op
//! takes the conversions: dx bit for bit the f32-storage op's on the unpacked dy); wrong lengths
//! are the backend ops' `EngineError::Shape` with the op's name, nothing written.
//!
//! The 64 x 256 tile (the `_m64` kernels, for `c_out <= 64` in the forward and `c_in <= 64` in
//! the data gradient; the shapes above with such channel counts take it too): forwards with
//! `c_out` 64, 48, 33 (odd, with odd `c_in`) on it and 80 on 128 x 128, data gradients with
//! `c_in` 64, 48, 33 (odd, with odd `c_out`: 2-byte loads of dy) on it and 80 on 128 x 128, each
//! kernel asserted by name and checked against the CPU as above; each 64 x 256 case also
//! against the 128 x 128 kernel on the same data: the layer with random channels appended up
//! to 80 (the forward's output channels, the data gradient's input channels) takes the 128 x
//! 128 kernel, and its first channels (z, the partials of those channels, dx) must be the 64 x
//! 256 kernel's bit for bit. Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_nhwc_train_bf16s-* --include-ignored`);
//! without a device the device tests are ignored.

mod common;
use common::cuda::{device, rel_err, round};
use common::nhwc::{bf16_value, bn_of, check_zero_taps, cpu_dx, halves, pack, to_nhwc, ulps};
use common::rng::SplitMix64;
use common::shapes::conv;

use cudarc::driver::CudaSlice;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::precision::bf16_bits;
use ichcam::engine::{Backend, Conv2d, EngineError, Precision};

fn main() {
    common::cuda::main(vec![
        device(
            "bf16s_train_forward_and_stats_match_cpu",
            train_forward_matches_cpu,
        ),
        device("bf16s_data_gradient_matches_cpu", data_gradient_matches_cpu),
        device(
            "bf16s_strided_data_gradient_skips_the_zero_taps",
            strided_data_gradient_skips_the_zero_taps,
        ),
        device("bf16s_train_kernels_replay_in_a_graph", replays_in_a_graph),
        device(
            "bf16s_train_kernels_refuse_other_precisions_routes_and_lengths",
            refusals,
        ),
        device(
            "bf16s_train_tile_m64_matches_cpu_and_the_128_tile",
            tile_m64_matches_cpu_and_the_128_tile,
        ),
    ])
}

/// Pixels per statistics tile (`conv::STATS_TILE`).
const TILE: usize = 64;

/// The statistics forward's kernel of `s`: the 64 x 256 tile's (`_m64`) for `c_out <= 64`.
fn fwd_kernel(s: &Conv2d) -> &'static str {
    if s.c_out <= 64 {
        "conv2d_fwd_stats_mma_nhwc_bf16s_m64"
    } else {
        "conv2d_fwd_stats_mma_nhwc_bf16s"
    }
}

/// The data gradient's kernel of `s`: the 64 x 256 tile's (`_m64`) for `c_in <= 64`.
fn bwd_kernel(s: &Conv2d) -> &'static str {
    if s.c_in <= 64 {
        "conv2d_bwd_data_mma_nhwc_bf16s_m64"
    } else {
        "conv2d_bwd_data_mma_nhwc_bf16s"
    }
}

/// The shapes, each with what it exercises (x's copy path / dy's copy path).
fn shapes() -> Vec<(Conv2d, &'static str)> {
    vec![
        // 1x1 stride 1, 198 pixels (4 tiles, the last ragged), c_out 136: two channel tiles.
        (conv(2, 64, 9, 11, 136, 1, 1, 0), "1x1 s1, x 16 / dy 16"),
        // 1x1 stride 2: 9x13 -> 5x7, 105 pixels; c_out 130 (dy 4-byte); three phases without taps.
        (conv(3, 32, 9, 13, 130, 1, 2, 0), "1x1 s2, x 16 / dy 4"),
        // 3x3 stride 1: K = 108 (4 K tiles); the data gradient's K = 9 * 136 (39 K tiles).
        (conv(2, 12, 11, 9, 136, 3, 1, 1), "3x3 s1, x 4 / dy 16"),
        // 3x3 stride 2, odd 13x12 -> 7x6: phases of 4, 2, 2, 1 taps.
        (conv(3, 24, 13, 12, 160, 3, 2, 1), "3x3 s2, x 16 / dy 16"),
        // Odd c_in 5 and c_out 67: 2-byte loads of both, odd lengths (x 5*9*7, z 67*63).
        (
            conv(1, 5, 9, 7, 67, 3, 1, 1),
            "odd c_in / c_out, x 2 / dy 2",
        ),
        // 3x3 stride 2, c_in 6, c_out 70, 7x9 -> 4x5: 4-byte copies of both.
        (conv(3, 6, 7, 9, 70, 3, 2, 1), "3x3 s2, x 4 / dy 4"),
        // c_in 130 (the data gradient's two channel tiles), K = 1170 (37 K tiles), c_out 36.
        (conv(2, 130, 6, 7, 36, 3, 1, 1), "37 K tiles, x 4 / dy 4"),
        // K = 576: 18 K tiles, the 6-stage ring wraps three times; c_out 40.
        (conv(1, 64, 9, 9, 40, 3, 1, 1), "18 K tiles, x 16 / dy 16"),
        // 3x3 stride 2, 24x22 -> 12x11: a data-gradient phase of 264 pixels (3 tiles); c_out 24.
        (conv(2, 8, 24, 22, 24, 3, 2, 1), "3x3 s2, x 16 / dy 16"),
        // Tiny: c_in 3, c_out 5, 5x5, one ragged tile of 25 pixels.
        (conv(1, 3, 5, 5, 5, 3, 1, 1), "tiny, x 2 / dy 2"),
        // 3x3 stride 1 without padding, 9x7 -> 7x5, batch 3 (105 pixels), c_out 129 (odd, 2 tiles).
        (
            conv(3, 4, 9, 7, 129, 3, 1, 0),
            "odd c_out over two tiles, x 4 / dy 2",
        ),
        // 1x1 with c_in 10 (K padded to 16 in the weight copy), odd 7x7.
        (conv(1, 10, 7, 7, 136, 1, 1, 0), "1x1 c_in 10, x 4 / dy 16"),
    ]
}

/// How far apart (absolutely) z and the CPU's rounded result may be where they are more than 1
/// bf16 ulp apart (as tests/cuda_conv_nhwc_bf16s.rs: the same exact products summed in another
/// order, more than a bf16 ulp only for results below about 1e-3).
const NEAR_ZERO: f64 = 2e-5;

const POISON: u32 = 0xffff_ffff;

fn up64(g: &CudaBackend, v: &[f64]) -> CudaSlice<f64> {
    g.stream().clone_htod(v).expect("upload f64")
}

fn down64(g: &CudaBackend, b: &CudaSlice<f64>) -> Vec<f64> {
    g.synchronize().expect("synchronize");
    g.stream().clone_dtoh(b).expect("download f64")
}

fn tiles(s: &Conv2d) -> usize {
    (s.n * s.out_h() * s.out_w()).div_ceil(TILE)
}

/// The operands of one shape on the device: x (NCHW) transposed and packed, dy (NCHW)
/// transposed and packed, w as it is.
struct Dev {
    x: CudaSlice<f32>,
    dy: CudaSlice<f32>,
    w: CudaSlice<f32>,
}

fn upload(g: &CudaBackend, s: &Conv2d, x: &[f32], dy: &[f32], w: &[f32]) -> Dev {
    let hw = s.out_h() * s.out_w();
    Dev {
        x: g.upload(&pack(&to_nhwc(x, s.n, s.c_in, s.h * s.w)))
            .expect("upload"),
        dy: g
            .upload(&pack(&to_nhwc(dy, s.n, s.c_out, hw)))
            .expect("upload"),
        w: g.upload(w).expect("upload"),
    }
}

/// Poisoned outputs: z (bf16 NaN halves), the partials and dx (NaN).
struct Out {
    z: CudaSlice<f32>,
    ps: CudaSlice<f64>,
    pq: CudaSlice<f64>,
    dx: CudaSlice<f32>,
}

fn poisoned(g: &CudaBackend, s: &Conv2d) -> Out {
    let nan = vec![f64::NAN; s.c_out * tiles(s)];
    Out {
        z: g.upload(&vec![f32::from_bits(POISON); s.y_len().div_ceil(2)])
            .expect("upload"),
        ps: up64(g, &nan),
        pq: up64(g, &nan),
        dx: g.upload(&vec![f32::NAN; s.x_len()]).expect("upload"),
    }
}

/// z's halves (asserting every value written and an odd length's last high half untouched)
/// and the partials (asserting every entry written).
fn read_fwd(g: &CudaBackend, s: &Conv2d, o: &Out) -> (Vec<u16>, Vec<f64>, Vec<f64>) {
    let slots = g.download(&o.z).expect("download");
    if s.y_len() % 2 == 1 {
        let last = slots.last().expect("a slot").to_bits();
        assert_eq!(
            last >> 16,
            0xffff,
            "{s:?}: z's unused high half was written"
        );
    }
    let h = halves(&slots, s.y_len());
    assert!(
        h.iter().all(|&v| bf16_value(v).is_finite()),
        "{s:?}: a z value not written (or not finite)"
    );
    let (ps, pq) = (down64(g, &o.ps), down64(g, &o.pq));
    assert!(
        ps.iter().chain(&pq).all(|v| v.is_finite()),
        "{s:?}: a partial not written"
    );
    (h, ps, pq)
}

/// The statistics forward's kernel on `d` into `o` (z and the raw partials).
fn stats_fwd(g: &CudaBackend, s: &Conv2d, d: &Dev, o: &mut Out) -> ichcam::engine::Result<()> {
    // SAFETY: upload and poisoned size x, w, z and the partials as `s` gives them (x and z
    // bf16 storage, the partials c_out * tiles).
    unsafe { g.conv2d_fwd_stats_nhwc_bf16s_native(s, &d.x, &d.w, &mut o.z, &mut o.ps, &mut o.pq) }
}

fn gpu_fwd(g: &CudaBackend, s: &Conv2d, x: &[f32], w: &[f32]) -> (Vec<u16>, Vec<f64>, Vec<f64>) {
    let d = upload(g, s, x, &vec![0.0; s.y_len()], w);
    let mut o = poisoned(g, s);
    stats_fwd(g, s, &d, &mut o).expect("conv2d_fwd_stats_nhwc_bf16s");
    read_fwd(g, s, &o)
}

/// The backend op `conv2d_bn_train_fwd_nhwc_bf16` (gamma 1, beta 0, fresh running statistics,
/// no residual, no ReLU) on `d`'s x and w into `o.z` and `y`: its saved batch mean.
fn op_fwd(
    g: &CudaBackend,
    s: &Conv2d,
    d: &Dev,
    z: &mut CudaSlice<f32>,
) -> ichcam::engine::Result<Vec<f32>> {
    let c = s.c_out;
    let up = |v: Vec<f32>| g.upload(&v).expect("upload");
    let (gamma, beta) = (up(vec![1.0; c]), up(vec![0.0; c]));
    let (mut rm, mut rv) = (up(vec![0.0; c]), up(vec![1.0; c]));
    let (mut sm, mut si) = (up(vec![f32::NAN; c]), up(vec![f32::NAN; c]));
    let mut y = up(vec![f32::from_bits(POISON); s.y_len().div_ceil(2)]);
    g.conv2d_bn_train_fwd_nhwc_bf16(
        s,
        &bn_of(s),
        &d.x,
        &d.w,
        &gamma,
        &beta,
        &mut rm,
        &mut rv,
        &mut sm,
        &mut si,
        z,
        &mut y,
        None,
        false,
    )?;
    Ok(g.download(&sm).expect("download"))
}

/// The backend op `conv2d_bwd_data_nhwc_bf16` on `d`'s dy and w into `o.dx`.
fn op_bwd(g: &CudaBackend, s: &Conv2d, d: &Dev, o: &mut Out) -> ichcam::engine::Result<()> {
    g.conv2d_bwd_data_nhwc_bf16(s, &d.dy, &d.w, &mut o.dx)
}

fn gpu_bwd(g: &CudaBackend, s: &Conv2d, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let d = upload(g, s, &vec![0.0; s.x_len()], dy, w);
    let mut o = poisoned(g, s);
    op_bwd(g, s, &d, &mut o).expect("conv2d_bwd_data_nhwc_bf16");
    g.download(&o.dx).expect("download")
}

/// The CPU's NCHW forward in f32, transposed to NHWC.
fn cpu_fwd(s: &Conv2d, x: &[f32], w: &[f32]) -> Vec<f32> {
    let cpu = CpuBackend::<f32>::new();
    let (xb, wb) = (
        cpu.upload(x).expect("upload"),
        cpu.upload(w).expect("upload"),
    );
    let mut y = cpu.upload(&vec![f32::NAN; s.y_len()]).expect("upload");
    cpu.conv2d_fwd(s, &xb, &wb, &mut y).expect("cpu conv2d_fwd");
    to_nhwc(
        &cpu.download(&y).expect("download"),
        s.n,
        s.c_out,
        s.out_h() * s.out_w(),
    )
}

/// The partials against z's values (NHWC, `c` channels, `p` pixels): per channel and tile the
/// f64 sum in pixel order bit for bit, the squared deviations within 1e-12 relative. Returns
/// the worst relative difference of the squared deviations.
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
                "{what}: channel {ch} tile {tile}: sum {gs} vs the host's {sum} from the stored z"
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

fn train_forward_matches_cpu() {
    let g = common::cuda::gpu_at(Precision::Bf16);
    let p = Precision::Bf16;
    let mut rng = SplitMix64::fresh("conv_nhwc_train_bf16s_fwd");
    let (mut total, mut exact, mut near_zero, mut worst, mut worst_q) =
        (0usize, 0usize, 0usize, 0.0f64, 0.0f64);
    for (s, what) in shapes() {
        assert_eq!(
            g.conv_fwd_stats_nhwc_bf16s_kernel(&s),
            Some(fwd_kernel(&s)),
            "{s:?}"
        );
        let what = format!("{s:?} ({what})");
        let pixels = s.n * s.out_h() * s.out_w();
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (xr, wr) = (round(p, &x), round(p, &w));
        // (1) bf16-exact operands: z = the CPU's f32 result rounded, but for sum-order ties.
        let (z, ps, pq) = gpu_fwd(&g, &s, &xr, &wr);
        let want = cpu_fwd(&s, &xr, &wr);
        let mut ex = 0;
        for (i, (&h, &f)) in z.iter().zip(&want).enumerate() {
            let wh = bf16_bits(f);
            if h == wh {
                ex += 1;
                continue;
            }
            let d = (f64::from(bf16_value(h)) - f64::from(f)).abs();
            if ulps(h, wh) > 1 {
                assert!(
                    d <= NEAR_ZERO,
                    "{what}: z[{i}] = {} vs the CPU's {f} rounded {} ({} ulps)",
                    bf16_value(h),
                    bf16_value(wh),
                    ulps(h, wh)
                );
                near_zero += 1;
            }
        }
        assert!(
            ex * 100 >= z.len() * 99,
            "{what}: only {ex} of {} z values exactly the CPU's rounded",
            z.len()
        );
        total += z.len();
        exact += ex;
        let zf: Vec<f32> = z.iter().map(|&h| bf16_value(h)).collect();
        worst_q = worst_q.max(check_partials(&what, &zf, s.c_out, pixels, &ps, &pq));
        // (2) unrounded operands: x rounded by the packing, w by the kernel's copy.
        let (z2, ps2, pq2) = gpu_fwd(&g, &s, &x, &w);
        assert!(
            z2 == z,
            "{what}: the weight copy rounds otherwise than the host (nearest even)"
        );
        assert!(
            ps2.iter().zip(&ps).all(|(a, b)| a.to_bits() == b.to_bits())
                && pq2.iter().zip(&pq).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: the partials differ on the same rounded operands"
        );
        let e = rel_err(&zf, &cpu_fwd(&s, &x, &w));
        assert!(
            e < 1e-2 && e > 1e-5,
            "{what}: z relative error {e:e}, expected in (1e-5, 1e-2)"
        );
        worst = worst.max(e);
        // (3) the backend op on the same unrounded operands: this kernel's z, and the batch
        // mean of what z holds.
        let d = upload(&g, &s, &x, &vec![0.0; s.y_len()], &w);
        let mut zo = poisoned(&g, &s).z;
        let mean = op_fwd(&g, &s, &d, &mut zo).expect("conv2d_bn_train_fwd_nhwc_bf16");
        let z3 = halves(&g.download(&zo).expect("download"), s.y_len());
        assert!(
            z3 == z,
            "{what}: the backend op's z differs from the kernel's"
        );
        for (c, &m) in mean.iter().enumerate() {
            let want = z
                .iter()
                .skip(c)
                .step_by(s.c_out)
                .map(|&h| f64::from(bf16_value(h)))
                .sum::<f64>()
                / pixels as f64;
            assert!(
                (f64::from(m) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{what}: the backend op's batch mean of channel {c} {m} vs {want} of the stored z"
            );
        }
        println!(
            "bf16s train forward {what}: z relative error {e:.2e}, {ex}/{} exact",
            z.len()
        );
    }
    println!(
        "bf16s train forward, {} shapes: z on bf16-exact operands {exact}/{total} exactly the CPU's rounded \
         ({near_zero} more than 1 ulp off, all within {NEAR_ZERO:e}); unrounded worst relative error {worst:.2e}; \
         partial sums of the stored z bit-exact, squared deviations within {worst_q:.1e}",
        shapes().len()
    );
}

fn data_gradient_matches_cpu() {
    let g = common::cuda::gpu_at(Precision::Bf16);
    let p = Precision::Bf16;
    let mut rng = SplitMix64::fresh("conv_nhwc_train_bf16s_bwd");
    let (mut exact, mut worst) = (0.0f64, 0.0f64);
    for (s, what) in shapes() {
        assert_eq!(
            g.conv_bwd_data_nhwc_bf16s_kernel(&s),
            Some(bwd_kernel(&s)),
            "{s:?}"
        );
        let what = format!("{s:?} ({what})");
        // dy as the packing stores it (bf16): the CPU takes the same values.
        let dy = round(p, &rng.vec_f32(s.y_len(), -1.0, 1.0));
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let wr = round(p, &w);
        let got = gpu_bwd(&g, &s, &dy, &wr);
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{what}: a dx value not written"
        );
        let e = rel_err(&got, &cpu_dx(&s, &dy, &wr));
        assert!(
            e < 1e-5,
            "{what} on bf16-exact operands: dx relative error {e:e} (>= 1e-5)"
        );
        exact = exact.max(e);
        let got_w = gpu_bwd(&g, &s, &dy, &w);
        assert!(
            got_w.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: dx on unrounded w differs from dx on the host-rounded w (the weight copy does not round to nearest even)"
        );
        let e = rel_err(&got_w, &cpu_dx(&s, &dy, &w));
        assert!(
            e < 1e-2 && e > 1e-5,
            "{what}: dx relative error {e:e}, expected in (1e-5, 1e-2)"
        );
        worst = worst.max(e);
        println!("bf16s data gradient {what}: dx relative error {e:.2e}");
    }
    println!(
        "bf16s data gradient, {} shapes: worst dx relative error {worst:.2e} (bf16-exact operands {exact:.2e})",
        shapes().len()
    );
}

/// The stride-2 data gradient multiplies no structurally zero tap and no phase reads another
/// phase's padded weight rows (as tests/cuda_conv_nhwc_train.rs checks the f32-storage kernel):
/// with one weight of tap (0, 0) infinite, the input pixels that tap never reaches stay finite
/// and equal to the CPU's, while pixels it reaches do not. Every dy copy path (`c_out` 8, 6, 5;
/// rows of 4 * c_out, 2 * c_out and c_out taps padded to 8 in the bf16 copy).
fn strided_data_gradient_skips_the_zero_taps() {
    let g = common::cuda::gpu_at(Precision::Bf16);
    for c_out in [8, 6, 5] {
        let s = conv(2, 5, 9, 10, c_out, 3, 2, 1);
        let mut rng = SplitMix64::fresh("conv_nhwc_bf16s_zero_taps");
        let mut w = round(Precision::Bf16, &rng.vec_f32(s.w_len(), -1.0, 1.0));
        let dy = round(Precision::Bf16, &rng.vec_f32(s.y_len(), -1.0, 1.0));
        let ci = 3;
        w[(2 * s.c_in + ci) * 9] = f32::INFINITY; // w[co 2][ci 3][0][0]
        let want = cpu_dx(&s, &dy, &w);
        let got = gpu_bwd(&g, &s, &dy, &w);
        check_zero_taps(&format!("{s:?}"), &s, ci, &got, &want);
    }
}

/// A captured forward (its bf16 weight copy and the kernel, with the raw partials) and data
/// gradient (the backend op: its weight copy and the kernel) replay bit for bit what the eager
/// calls wrote.
fn replays_in_a_graph() {
    // A backend of its own (its own stream): the other tests' work would break the capture.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes bf16");
    let mut rng = SplitMix64::fresh("conv_nhwc_train_bf16s_graph");
    let s = shapes()[3].0; // 3x3 stride 2: four phases
    let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
    let dy = rng.vec_f32(s.y_len(), -1.0, 1.0);
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    let (z_e, ps_e, pq_e) = gpu_fwd(&g, &s, &x, &w);
    let dx_e = gpu_bwd(&g, &s, &dy, &w);
    let d = upload(&g, &s, &x, &dy, &w);
    let mut o = poisoned(&g, &s);
    let (graph, ()) = g
        .capture(|| {
            stats_fwd(&g, &s, &d, &mut o)?;
            op_bwd(&g, &s, &d, &mut o)
        })
        .expect("capture");
    assert!(
        g.download(&o.dx)
            .expect("download")
            .iter()
            .all(|v| v.is_nan()),
        "nothing runs while capturing"
    );
    graph.replay().expect("replay");
    let (z, ps, pq) = read_fwd(&g, &s, &o);
    let dx = g.download(&o.dx).expect("download");
    let same64 = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits());
    assert!(z == z_e, "z of the replay differs from the eager call's");
    assert!(
        same64(&ps, &ps_e) && same64(&pq, &pq_e),
        "the partials of the replay differ"
    );
    assert!(
        dx.iter()
            .zip(&dx_e)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "dx of the replay differs from the eager call's"
    );
    assert!(dx.iter().all(|v| v.is_finite()), "a non-finite dx");
}

/// Whether `r` is the backend op `op`'s length refusal.
fn shape_err<T>(r: ichcam::engine::Result<T>, op: &str) -> bool {
    matches!(r, Err(EngineError::Shape { op: o, .. }) if o == op)
}

/// tf32 and the route `Never` take no bf16-storage kernel: the statistics entry refuses
/// (nothing written), the data-gradient op takes the conversions (dx bit for bit the
/// f32-storage op's on the unpacked dy); nor does the statistics forward run without a
/// reduction. Wrong lengths are the backend ops' `EngineError::Shape`, nothing written.
fn refusals() {
    let s = shapes()[0].0;
    let tf32 = common::cuda::gpu_at(Precision::Tf32);
    let mut never = common::cuda::gpu_at(Precision::Bf16);
    never.set_mma_route(MmaRoute::Never);
    let mut rng = SplitMix64::fresh("conv_nhwc_train_bf16s_refusals");
    let x = round(Precision::Bf16, &rng.vec_f32(s.x_len(), -1.0, 1.0));
    let dy = round(Precision::Bf16, &rng.vec_f32(s.y_len(), -1.0, 1.0));
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    let dy_nhwc = to_nhwc(&dy, s.n, s.c_out, s.out_h() * s.out_w());
    for (g, what) in [(&tf32, "tf32"), (&never, "bf16, route Never")] {
        assert_eq!(g.conv_fwd_stats_nhwc_bf16s_kernel(&s), None, "{what}");
        assert_eq!(g.conv_bwd_data_nhwc_bf16s_kernel(&s), None, "{what}");
        let d = upload(g, &s, &x, &dy, &w);
        let mut o = poisoned(g, &s);
        assert!(
            matches!(stats_fwd(g, &s, &d, &mut o), Err(EngineError::Param(_))),
            "{what}: the bf16-storage statistics kernel ran"
        );
        assert!(g
            .download(&o.z)
            .expect("download")
            .iter()
            .all(|v| v.to_bits() == POISON));
        assert!(down64(g, &o.ps).iter().all(|v| v.is_nan()));
        // The data-gradient op by conversions: the f32-storage op on the unpacked dy.
        op_bwd(g, &s, &d, &mut o).expect("conv2d_bwd_data_nhwc_bf16 by conversions");
        let got = g.download(&o.dx).expect("download");
        let mut want = g.upload(&vec![f32::NAN; s.x_len()]).expect("upload");
        g.conv2d_bwd_data_nhwc(&s, &g.upload(&dy_nhwc).expect("upload"), &d.w, &mut want)
            .expect("conv2d_bwd_data_nhwc");
        let want = g.download(&want).expect("download");
        assert!(
            got.iter().all(|v| v.is_finite())
                && got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: dx by conversions differs from the f32-storage op's"
        );
    }
    let g = common::cuda::gpu_at(Precision::Bf16);
    let mut empty = s;
    empty.c_in = 0;
    assert_eq!(g.conv_fwd_stats_nhwc_bf16s_kernel(&empty), None);
    // Lengths: f32-sized x / z / dy (not bf16 storage), a short dx.
    let d = upload(&g, &s, &x, &dy, &w);
    let mut o = poisoned(&g, &s);
    let xf = g.upload(&x).expect("upload");
    let df = Dev {
        x: xf,
        dy: g.upload(&dy).expect("upload"),
        w: g.upload(&w).expect("upload"),
    };
    assert!(shape_err(
        op_fwd(&g, &s, &df, &mut o.z),
        "conv2d_bn_train_fwd_nhwc_bf16"
    ));
    let mut zf = g
        .upload(&vec![f32::from_bits(POISON); s.y_len()])
        .expect("upload");
    assert!(shape_err(
        op_fwd(&g, &s, &d, &mut zf),
        "conv2d_bn_train_fwd_nhwc_bf16"
    ));
    assert!(shape_err(
        op_bwd(&g, &s, &df, &mut o),
        "conv2d_bwd_data_nhwc_bf16"
    ));
    let mut short = poisoned(&g, &s);
    short.dx = g.upload(&vec![f32::NAN; s.x_len() - 1]).expect("upload");
    assert!(shape_err(
        op_bwd(&g, &s, &d, &mut short),
        "conv2d_bwd_data_nhwc_bf16"
    ));
    assert!(g
        .download(&o.dx)
        .expect("download")
        .iter()
        .all(|v| v.is_nan()));
    for z in [&o.z, &zf] {
        assert!(g
            .download(z)
            .expect("download")
            .iter()
            .all(|v| v.to_bits() == POISON));
    }
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
fn first_channels<T: Copy>(v: &[T], c_pad: usize, c: usize) -> Vec<T> {
    v.chunks(c_pad).flat_map(|px| px[..c].to_vec()).collect()
}

/// The 64 x 256 tile against the CPU and against the 128 x 128 kernels on the same data (see
/// the module doc).
fn tile_m64_matches_cpu_and_the_128_tile() {
    const WIDE: usize = 80;
    let g = common::cuda::gpu_at(Precision::Bf16);
    let p = Precision::Bf16;
    let mut rng = SplitMix64::fresh("conv_nhwc_train_bf16s_m64");
    let same64 = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits());
    let mut compared = 0;
    for s in [
        conv(2, 24, 17, 15, 64, 3, 1, 1),
        conv(2, 24, 17, 15, 48, 3, 1, 1),
        conv(2, 24, 17, 15, WIDE, 3, 1, 1),
        conv(3, 5, 13, 12, 33, 3, 2, 1),
    ] {
        assert_eq!(g.conv_fwd_stats_nhwc_bf16s_kernel(&s), Some(fwd_kernel(&s)));
        let what = format!("forward {s:?} ({})", fwd_kernel(&s));
        let pixels = s.n * s.out_h() * s.out_w();
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let (xr, wr) = (round(p, &x), round(p, &w));
        let (z, ps, pq) = gpu_fwd(&g, &s, &xr, &wr);
        let want = cpu_fwd(&s, &xr, &wr);
        let mut ex = 0;
        for (i, (&h, &f)) in z.iter().zip(&want).enumerate() {
            let wh = bf16_bits(f);
            ex += usize::from(h == wh);
            let d = (f64::from(bf16_value(h)) - f64::from(f)).abs();
            assert!(
                ulps(h, wh) <= 1 || d <= NEAR_ZERO,
                "{what}: z[{i}] = {} vs the CPU's {f} rounded {}",
                bf16_value(h),
                bf16_value(wh)
            );
        }
        assert!(
            ex * 100 >= z.len() * 99,
            "{what}: only {ex} of {} exact",
            z.len()
        );
        let zf: Vec<f32> = z.iter().map(|&h| bf16_value(h)).collect();
        check_partials(&what, &zf, s.c_out, pixels, &ps, &pq);
        let (z2, ps2, pq2) = gpu_fwd(&g, &s, &x, &w);
        assert!(
            z2 == z && same64(&ps2, &ps) && same64(&pq2, &pq),
            "{what}: the weight copy rounds otherwise than the host"
        );
        let e = rel_err(&zf, &cpu_fwd(&s, &x, &w));
        assert!(
            e < 1e-2 && e > 1e-5,
            "{what}: z relative error {e:e}, expected in (1e-5, 1e-2)"
        );
        println!(
            "bf16s train tile {what}: {ex}/{} exact, relative error {e:.2e}",
            z.len()
        );
        if s.c_out > 64 {
            continue;
        }
        let wide = Conv2d { c_out: WIDE, ..s };
        assert_eq!(
            g.conv_fwd_stats_nhwc_bf16s_kernel(&wide),
            Some(fwd_kernel(&wide))
        );
        let k = s.c_in * s.kh * s.kw;
        let more = rng.vec_f32((WIDE - s.c_out) * k, -1.0, 1.0);
        let (zw, psw, pqw) = gpu_fwd(&g, &wide, &x, &pad_channels(&w, 1, s.c_out, k, WIDE, &more));
        let n = ps.len();
        assert!(
            first_channels(&zw, WIDE, s.c_out) == z,
            "{what}: z differs from the 128 x 128 kernel's"
        );
        assert!(
            same64(&psw[..n], &ps) && same64(&pqw[..n], &pq),
            "{what}: the partials differ from the 128 x 128 kernel's"
        );
        compared += z.len() + 2 * n;
    }
    for s in [
        conv(3, 64, 24, 22, 40, 3, 2, 1),
        conv(3, 48, 24, 22, 40, 3, 2, 1),
        conv(3, WIDE, 24, 22, 40, 3, 2, 1),
        conv(2, 33, 17, 15, 25, 3, 1, 1),
    ] {
        assert_eq!(g.conv_bwd_data_nhwc_bf16s_kernel(&s), Some(bwd_kernel(&s)));
        let what = format!("data gradient {s:?} ({})", bwd_kernel(&s));
        let dy = round(p, &rng.vec_f32(s.y_len(), -1.0, 1.0));
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let wr = round(p, &w);
        let dx = gpu_bwd(&g, &s, &dy, &wr);
        let e = rel_err(&dx, &cpu_dx(&s, &dy, &wr));
        assert!(
            e < 1e-5,
            "{what} on bf16-exact operands: dx relative error {e:e}"
        );
        let dx_raw = gpu_bwd(&g, &s, &dy, &w);
        assert!(
            dx_raw
                .iter()
                .zip(&dx)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: the weight copy rounds otherwise than the host"
        );
        let e = rel_err(&dx_raw, &cpu_dx(&s, &dy, &w));
        assert!(
            e < 1e-2 && e > 1e-5,
            "{what}: dx relative error {e:e}, expected in (1e-5, 1e-2)"
        );
        println!("bf16s train tile {what}: dx relative error {e:.2e}");
        if s.c_in > 64 {
            continue;
        }
        let wide = Conv2d { c_in: WIDE, ..s };
        assert_eq!(
            g.conv_bwd_data_nhwc_bf16s_kernel(&wide),
            Some(bwd_kernel(&wide))
        );
        let khw = s.kh * s.kw;
        let more = rng.vec_f32(s.c_out * (WIDE - s.c_in) * khw, -1.0, 1.0);
        let dxw = gpu_bwd(
            &g,
            &wide,
            &dy,
            &pad_channels(&w, s.c_out, s.c_in, khw, WIDE, &more),
        );
        let dxw = first_channels(&dxw, WIDE, s.c_in);
        let differ = dx_raw
            .iter()
            .zip(&dxw)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{what}: {differ} of {} dx values differ from the 128 x 128 kernel's",
            dx.len()
        );
        compared += dx.len();
    }
    println!("bf16s training, 64 x 256 tile: {compared} values bit for bit the 128 x 128 kernels'");
}
