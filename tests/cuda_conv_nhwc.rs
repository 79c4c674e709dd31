//! The channels-last (NHWC) eval forward (`kernels/conv_tc.cu`: `conv2d_fwd_bn_mma_nhwc_bf16`
//! / `_tf32`, conv + eval-mode batch norm (+ residual) (+ ReLU), x `[n][h][w][c_in]`, residual
//! and y `[n][oh][ow][c_out]`, weights OIHW copied to OHWI per call) through
//! the backend op `conv2d_bn_eval_fwd_nhwc` (each shape first asserted to take the native
//! kernel: `CudaBackend::conv_bn_eval_nhwc_kernel`), against the CPU reference
//! `conv2d_bn_eval_fwd` on the same data in NCHW (transposed on the host here), every output
//! poisoned with NaN first.
//!
//! Per shape and precision: on x and w already rounded to the precision (exact products)
//! within 1e-5 relative of the CPU's f32 result, and on unrounded ones within the precision's
//! tolerance (bf16 1e-2, tf32 1e-3) and above 1e-5 (the reduced path ran). The shapes cover
//! both copy paths of each operand (16-byte: `c_in % 4 == 0` for x, `K = kh*kw*c_in % 4 == 0`
//! for the weights; 4-byte otherwise), 1x1 stride 1 and 2, 3x3 stride 1 and 2 with and without
//! padding, the 7x7 stride-2 stem with `c_in = 3`, an even kernel, `c_in = 1` (the OIHW weights
//! used as they are), odd h / w, batch 1-3, `c_out` not a multiple of 128 (one to two channel
//! tiles, the last ragged) and more pixels than one 128-pixel tile, with and without the
//! residual and the ReLU. Also: a captured graph of the op replays bit for bit what the eager
//! call wrote, and f32 / `MmaRoute::Never` have no native kernel (the op then runs the layout
//! changes around the NCHW forward: checked against the CPU too).
//!
//! The 64 x 256 tile (`conv2d_fwd_bn_mma_nhwc_*_m64`, which the op launches for `c_out <= 64`):
//! `c_out` 64, 48 and 33 (odd; stride 2) take it and 80 the 128 x 128 kernel (each asserted by
//! name), each against the CPU as above (residual and ReLU on), and each `c_out <= 64` case
//! against the 128 x 128 kernel on the same data: the layer with its weights, batch-norm
//! parameters and residual padded with random channels up to `c_out` 80 (so it takes the
//! 128 x 128 kernel), whose first `c_out` channels must be the 64 x 256 kernel's output bit for
//! bit (the same K order and MMAs per output value, only the tile differs). 510 pixels: two
//! 256-pixel tiles, the second ragged. Runs on a GPU or on the emulated driver (`scripts/cuda-emu.sh run
//! target/release/deps/cuda_conv_nhwc-* --include-ignored`); without a device the device tests
//! are ignored.

mod common;
use common::cuda::{device, rel_err, round};
use common::nhwc::{bn_of, bn_params, cpu_nhwc, shapes, to_nhwc, Case};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{Backend, Conv2d, Precision};

fn main() {
    common::cuda::main(vec![
        device("nhwc_bf16_eval_forward_matches_cpu", || {
            nhwc_eval_forward_matches_cpu(Precision::Bf16)
        }),
        device("nhwc_tf32_eval_forward_matches_cpu", || {
            nhwc_eval_forward_matches_cpu(Precision::Tf32)
        }),
        device(
            "nhwc_eval_forward_replays_in_a_graph",
            nhwc_eval_forward_replays_in_a_graph,
        ),
        device(
            "no_native_kernel_at_f32_or_route_never",
            no_native_kernel_at_f32_or_route_never,
        ),
        device(
            "nhwc_bf16_eval_tile_m64_matches_cpu_and_the_128_tile",
            || tile_m64_matches_cpu_and_the_128_tile(Precision::Bf16),
        ),
        device(
            "nhwc_tf32_eval_tile_m64_matches_cpu_and_the_128_tile",
            || tile_m64_matches_cpu_and_the_128_tile(Precision::Tf32),
        ),
    ])
}

/// The channels-last op on `g`: x and the residual transposed to NHWC on the
/// host, y (NHWC) poisoned with NaN first.
fn gpu_nhwc(g: &CudaBackend, c: &Case) -> Vec<f32> {
    let s = &c.s;
    let up = |v: &[f32]| g.upload(v).expect("upload");
    let xb = up(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w));
    let wb = up(&c.w);
    let [ga, be_, m, v] = [0, 1, 2, 3].map(|i| up(&c.bn[i]));
    let hw = s.out_h() * s.out_w();
    let rb = c
        .residual
        .as_deref()
        .map(|r| up(&to_nhwc(r, s.n, s.c_out, hw)));
    let mut y = up(&vec![f32::NAN; s.y_len()]);
    g.conv2d_bn_eval_fwd_nhwc(
        s,
        &bn_of(s),
        &xb,
        &wb,
        &ga,
        &be_,
        &m,
        &v,
        rb.as_ref(),
        c.relu,
        &mut y,
    )
    .expect("conv2d_bn_eval_fwd_nhwc");
    g.download(&y).expect("download")
}

fn nhwc_eval_forward_matches_cpu(p: Precision) {
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let tol = p.tolerance().expect("a reduced precision");
    let mut rng = SplitMix64::fresh(&format!("conv_nhwc_eval_{p}"));
    let (mut exact, mut worst) = (0.0f64, 0.0f64);
    for (i, (s, path)) in shapes().into_iter().enumerate() {
        assert_eq!(
            g.conv_bn_eval_nhwc_kernel(&s),
            Some(format!("conv2d_fwd_bn_mma_nhwc_{p}").as_str())
        );
        // Residual and ReLU: both, neither, residual only, ReLU only, in turn.
        let (with_res, relu) = [(true, true), (false, false), (true, false), (false, true)][i % 4];
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let bn = bn_params(&mut rng, s.c_out);
        let residual = with_res.then(|| rng.vec_f32(s.y_len(), -1.0, 1.0));
        let rounded = Case {
            s,
            x: round(p, &x),
            w: round(p, &w),
            bn: bn.clone(),
            residual: residual.clone(),
            relu,
        };
        let what = format!("{p} {s:?} (copies {path}, residual {with_res}, relu {relu})");
        let e = rel_err(&gpu_nhwc(&g, &rounded), &cpu_nhwc(&rounded));
        assert!(
            e < 1e-5,
            "{what} on {p}-exact operands: relative error {e:e} (>= 1e-5)"
        );
        exact = exact.max(e);
        let raw = Case {
            s,
            x,
            w,
            bn,
            residual,
            relu,
        };
        let e = rel_err(&gpu_nhwc(&g, &raw), &cpu_nhwc(&raw));
        assert!(
            e < tol && e > 1e-5,
            "{what}: relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        worst = worst.max(e);
        println!("nhwc {what}: relative error {e:.2e}");
    }
    println!(
        "nhwc {p} eval forward, {} shapes: worst relative error {worst:.2e} ({p}-exact operands {exact:.2e})",
        shapes().len()
    );
}

/// A captured channels-last eval forward (the batch-norm fold, the OHWI weight copy and the
/// kernel, scratch from the arena warmed by the eager call) replays bit for bit what the eager
/// call wrote, at bf16 and tf32.
fn nhwc_eval_forward_replays_in_a_graph() {
    for p in [Precision::Bf16, Precision::Tf32] {
        // A backend of its own (its own stream): the other tests' work on the shared stream
        // would break the capture.
        let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
        g.set_precision(p).expect("the device takes this precision");
        let mut rng = SplitMix64::fresh(&format!("conv_nhwc_graph_{p}"));
        let s = shapes()[2].0; // 3x3: the weight copy runs too
        let c = Case {
            s,
            x: rng.vec_f32(s.x_len(), -1.0, 1.0),
            w: rng.vec_f32(s.w_len(), -1.0, 1.0),
            bn: bn_params(&mut rng, s.c_out),
            residual: Some(rng.vec_f32(s.y_len(), -1.0, 1.0)),
            relu: true,
        };
        let eager = gpu_nhwc(&g, &c);
        let up = |v: &[f32]| g.upload(v).expect("upload");
        let xb = up(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w));
        let wb = up(&c.w);
        let [ga, be_, m, v] = [0, 1, 2, 3].map(|i| up(&c.bn[i]));
        let hw = s.out_h() * s.out_w();
        let rb = up(&to_nhwc(
            c.residual.as_deref().expect("a residual"),
            s.n,
            s.c_out,
            hw,
        ));
        let mut y = up(&vec![f32::NAN; s.y_len()]);
        let (graph, ()) = g
            .capture(|| {
                g.conv2d_bn_eval_fwd_nhwc(
                    &s,
                    &bn_of(&s),
                    &xb,
                    &wb,
                    &ga,
                    &be_,
                    &m,
                    &v,
                    Some(&rb),
                    true,
                    &mut y,
                )
            })
            .expect("capture");
        assert!(
            g.download(&y).expect("download").iter().all(|v| v.is_nan()),
            "nothing runs while capturing"
        );
        graph.replay().expect("replay");
        let got = g.download(&y).expect("download");
        assert!(
            got.iter()
                .zip(&eager)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{p}: the replay differs from the eager call"
        );
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{p}: a non-finite output"
        );
    }
}

/// At f32, and with the route `Never` (no `mma.sync` kernel), there is no native kernel: the
/// op runs the layout changes around the NCHW forward, and still matches the CPU (f32 within
/// 1e-5, the bf16 WMMA path within bf16's tolerance).
fn no_native_kernel_at_f32_or_route_never() {
    let s = shapes()[0].0;
    let f32_be = common::cuda::gpu_at(Precision::F32);
    let mut never = common::cuda::gpu_at(Precision::Bf16);
    never.set_mma_route(MmaRoute::Never);
    let mut always = common::cuda::gpu_at(Precision::Tf32);
    always.set_mma_route(MmaRoute::Always);
    assert_eq!(
        always.conv_bn_eval_nhwc_kernel(&s),
        Some("conv2d_fwd_bn_mma_nhwc_tf32")
    );
    let mut rng = SplitMix64::fresh("conv_nhwc_refused");
    let c = Case {
        s,
        x: rng.vec_f32(s.x_len(), -1.0, 1.0),
        w: rng.vec_f32(s.w_len(), -1.0, 1.0),
        bn: bn_params(&mut rng, s.c_out),
        residual: None,
        relu: false,
    };
    for g in [f32_be, never] {
        let p = g.precision();
        assert_eq!(g.conv_bn_eval_nhwc_kernel(&s), None);
        let tol = p.tolerance().unwrap_or(1e-5);
        let e = rel_err(&gpu_nhwc(&g, &c), &cpu_nhwc(&c));
        assert!(
            e < tol,
            "{p} without the native kernel: relative error {e:e} (>= {tol:e})"
        );
    }
}

/// `[n][c][hw]` with `c_pad - c` channels of `fill` appended to each image.
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

/// The 64 x 256 tile against the CPU and against the 128 x 128 kernel on the same data (see
/// the module doc).
fn tile_m64_matches_cpu_and_the_128_tile(p: Precision) {
    let mut g = common::cuda::gpu_at(p);
    g.set_mma_route(MmaRoute::Auto);
    let tol = p.tolerance().expect("a reduced precision");
    let mut rng = SplitMix64::fresh(&format!("conv_nhwc_eval_m64_{p}"));
    const WIDE: usize = 80;
    let name = |s: &Conv2d| {
        // Where the device gives a block its shared memory, 164 KiB at bf16, 139 KiB at tf32
        // (conv.rs's `shared_memory`): sm_90 both, sm_80 (163 KiB) tf32 only.
        let need = if p == Precision::Bf16 {
            167_936
        } else {
            142_336
        };
        let fits = g.shared_memory_per_block() >= need;
        let tile = if s.c_out <= 64 && fits { "_m64" } else { "" };
        format!("conv2d_fwd_bn_mma_nhwc_{p}{tile}")
    };
    let shapes: [Conv2d; 4] = [
        conv(2, 24, 17, 15, 64, 3, 1, 1),
        conv(2, 24, 17, 15, 48, 3, 1, 1),
        conv(2, 24, 17, 15, WIDE, 3, 1, 1),
        conv(3, 20, 13, 12, 33, 3, 2, 1),
    ];
    let mut compared = 0;
    for s in shapes {
        assert_eq!(
            g.conv_bn_eval_nhwc_kernel(&s),
            Some(name(&s).as_str()),
            "{s:?}"
        );
        let hw = s.out_h() * s.out_w();
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
        let bn = bn_params(&mut rng, s.c_out);
        let residual = rng.vec_f32(s.y_len(), -1.0, 1.0);
        let case = |x: Vec<f32>, w: Vec<f32>| Case {
            s,
            x,
            w,
            bn: bn.clone(),
            residual: Some(residual.clone()),
            relu: true,
        };
        let rounded = case(round(p, &x), round(p, &w));
        let e = rel_err(&gpu_nhwc(&g, &rounded), &cpu_nhwc(&rounded));
        assert!(
            e < 1e-5,
            "{p} {s:?} on {p}-exact operands: relative error {e:e}"
        );
        let raw = case(x, w);
        let got = gpu_nhwc(&g, &raw);
        let e = rel_err(&got, &cpu_nhwc(&raw));
        assert!(
            e < tol && e > 1e-5,
            "{p} {s:?}: relative error {e:e}, expected in (1e-5, {tol:e})"
        );
        println!(
            "nhwc {p} eval, tile {}: {s:?}: relative error {e:.2e}",
            name(&s)
        );
        if s.c_out > 64 {
            continue;
        }
        // The same layer with WIDE - c_out more channels: the 128 x 128 kernel.
        let wide = Conv2d { c_out: WIDE, ..s };
        assert_eq!(
            g.conv_bn_eval_nhwc_kernel(&wide),
            Some(format!("conv2d_fwd_bn_mma_nhwc_{p}").as_str())
        );
        let more = WIDE - s.c_out;
        let k = s.c_in * s.kh * s.kw;
        let extra_bn = bn_params(&mut rng, more);
        let padded = Case {
            s: wide,
            x: raw.x.clone(),
            w: pad_channels(
                &raw.w,
                1,
                s.c_out,
                k,
                WIDE,
                &rng.vec_f32(more * k, -1.0, 1.0),
            ),
            bn: [0, 1, 2, 3].map(|i| [raw.bn[i].clone(), extra_bn[i].clone()].concat()),
            residual: Some(pad_channels(
                &residual,
                s.n,
                s.c_out,
                hw,
                WIDE,
                &rng.vec_f32(s.n * more * hw, -1.0, 1.0),
            )),
            relu: true,
        };
        let wide_y = first_channels(&gpu_nhwc(&g, &padded), WIDE, s.c_out);
        let differ = got
            .iter()
            .zip(&wide_y)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{p} {s:?}: {differ} of {} values differ from the 128 x 128 kernel's",
            got.len()
        );
        compared += got.len();
    }
    println!("nhwc {p} eval, 64 x 256 tile: {compared} values bit for bit the 128 x 128 kernel's");
}
