//! The channels-last eval forward on activations stored in bf16 (`kernels/conv_tc.cu`:
//! `conv2d_fwd_bn_mma_nhwc_bf16s`, conv + eval-mode batch norm (+ residual) (+ ReLU); x
//! `[n][h][w][c_in]`, residual and y `[n][oh][ow][c_out]` as bf16 values two to an f32 slot,
//! value i in the 16-bit half i of the buffer; the OIHW f32 weights copied to bf16 OHWI per
//! call) through the backend op `conv2d_bn_eval_fwd_nhwc_bf16`, each shape first asserted
//! to take the kernel (`CudaBackend::conv_bn_eval_nhwc_bf16s_kernel`), against the CPU
//! reference `conv2d_bn_eval_fwd` in f32 on the same data in NCHW (transposed, packed and
//! unpacked on the host here, bf16 rounded to nearest even), every output slot poisoned first
//! (0xFFFF halves: bf16 NaN).
//!
//! Per shape: (1) on x, w and the residual already bf16 (exact products), every output within
//! 1 bf16 ulp of the CPU's f32 result rounded to bf16 (the sums differ only in order), or, for
//! the few results so near zero that the sums' order alone moves them further, within 2e-5 of
//! it (counted), and at least 99% exactly it; (2) on unrounded operands (x and the residual rounded by the packing, the
//! weights by the kernel's copy) the output bit for bit (1)'s, which proves the weight copy
//! rounds as the host does (nearest even), and within 1e-2 relative of the CPU's result on the
//! unrounded f32 data (and above 1e-5: the reduced path ran). Every output written, and with an
//! odd length the last slot's unused high half left alone. The shapes: those of
//! tests/cuda_conv_nhwc.rs (each copy path of x: 16-byte copies for `c_in % 8 == 0`, 4-byte
//! for other even `c_in`, 2-byte loads for odd `c_in`), more with `c_in % 8 != 0`, odd `c_out`
//! (the epilogue's 2-byte stores) and odd lengths, and more K tiles than the ring's 6 stages.
//! Also: a captured graph replays bit for bit what the eager call wrote; wrong lengths and
//! other precisions / the route `Never` take no kernel (the op's conversions instead); the
//! 64 x 256 tile (`conv2d_fwd_bn_mma_nhwc_bf16s_m64`, `c_out <= 64`) against the CPU and bit for
//! bit against the 128 x 128 kernel on the same data (`bf16s_tile_m64_matches_cpu_and_the_128_tile`).
//! Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_nhwc_bf16s-* --include-ignored`);
//! without a device the device tests are ignored.

mod common;
use common::cuda::{device, rel_err, round};
use common::nhwc::{
    bf16_value, bn_of, bn_params, cpu_nhwc, eval_bf16s, gpu_bf16s, halves, shapes, ulps,
    upload_bf16s, Case, NEAR_ZERO, POISON,
};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::precision::bf16_bits;
use ichcam::engine::{Backend, Conv2d, Precision};

fn main() {
    common::cuda::main(vec![
        device(
            "bf16s_eval_forward_matches_cpu",
            bf16s_eval_forward_matches_cpu,
        ),
        device(
            "bf16s_eval_forward_replays_in_a_graph",
            bf16s_eval_forward_replays_in_a_graph,
        ),
        device(
            "bf16s_checks_lengths_precision_and_route",
            bf16s_checks_lengths_precision_and_route,
        ),
        device(
            "bf16s_tile_m64_matches_cpu_and_the_128_tile",
            bf16s_tile_m64_matches_cpu_and_the_128_tile,
        ),
    ])
}

/// tests/cuda_conv_nhwc.rs's shapes and more, with what they exercise here.
fn cases() -> Vec<(Conv2d, &'static str)> {
    let mut v: Vec<(Conv2d, &'static str)> = shapes().into_iter().map(|(s, _)| (s, "")).collect();
    v.extend([
        // Odd c_in = 5 (2-byte loads), odd c_out = 67 (2-byte stores), odd x and y lengths.
        (
            conv(1, 5, 9, 7, 67, 3, 1, 1),
            "odd c_in / c_out, odd lengths",
        ),
        // c_in = 24: 16-byte copies, K = 216 (7 K tiles), c_out = 131: two channel tiles, odd.
        (
            conv(2, 24, 11, 10, 131, 3, 2, 1),
            "odd c_out over two tiles",
        ),
        // K = 576: 18 K tiles, the 6-stage ring wraps three times.
        (conv(1, 64, 9, 9, 128, 3, 1, 1), "18 K tiles"),
        // 1x1 with c_in = 10: 4-byte copies, K = 10 (the weight rows padded to 16).
        (conv(2, 10, 7, 7, 136, 1, 1, 0), "c_in 10, 1x1"),
        // c_in = 8: 16-byte copies of one whole pixel per tap, K = 72.
        (conv(2, 8, 12, 11, 128, 3, 1, 1), "c_in 8"),
    ]);
    v
}

/// x's copy path in the kernel (x uploaded into its own allocation: 16-byte aligned).
fn x_path(s: &Conv2d) -> &'static str {
    if s.c_in.is_multiple_of(8) {
        "16-byte"
    } else if s.c_in.is_multiple_of(2) {
        "4-byte"
    } else {
        "2-byte"
    }
}

/// What [`check_case`] found: the unrounded case, the kernel's output on it (bf16 halves),
/// how many outputs on bf16-exact operands were exactly the CPU's rounded, how many more than
/// 1 ulp off (near zero), and the relative error on the unrounded data.
struct Checked {
    raw: Case,
    got: Vec<u16>,
    exact: usize,
    near: usize,
    err: f64,
}

/// One case of `s` (random data from `rng`) against the CPU: (1) and (2) of the module doc.
fn check_case(
    g: &CudaBackend,
    s: Conv2d,
    with_res: bool,
    relu: bool,
    what: &str,
    rng: &mut SplitMix64,
) -> Checked {
    let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
    let w = rng.vec_f32(s.w_len(), -1.0, 1.0);
    let bn = bn_params(rng, s.c_out);
    let residual = with_res.then(|| rng.vec_f32(s.y_len(), -1.0, 1.0));
    let p = Precision::Bf16;
    let rounded = Case {
        s,
        x: round(p, &x),
        w: round(p, &w),
        bn: bn.clone(),
        residual: residual.as_deref().map(|r| round(p, r)),
        relu,
    };
    let what = if what.is_empty() {
        String::new()
    } else {
        format!("{what}, ")
    };
    let label = format!(
        "{s:?} ({} copies of x, {what}residual {with_res}, relu {relu})",
        x_path(&s)
    );
    // (1) bf16-exact operands: within 1 ulp of the CPU's result rounded to bf16, unless
    // the result is so near zero that the order of the f32 sums alone moves it further
    // (|difference| <= NEAR_ZERO: counted).
    let got = gpu_bf16s(g, &rounded);
    let cpu = cpu_nhwc(&rounded);
    let (mut ex, mut near) = (0, 0);
    for (j, (&a, &c)) in got.iter().zip(&cpu).enumerate() {
        let b = bf16_bits(c);
        let d = ulps(a, b);
        let diff = (f64::from(bf16_value(a)) - f64::from(c)).abs();
        assert!(
            d <= 1 || diff <= NEAR_ZERO,
            "{label}: output {j} is {} ({a:#06x}), the CPU's {c} ({b:#06x} in bf16): {d} ulps, {diff:e} apart",
            bf16_value(a),
        );
        ex += usize::from(d == 0);
        near += usize::from(d > 1);
    }
    assert!(
        ex * 100 >= got.len() * 99,
        "{label}: only {ex} of {} outputs exact",
        got.len()
    );
    // (2) Unrounded operands: the same bits (the kernel's weight copy rounds as the host),
    // and near the CPU's f32 result on the unrounded data.
    let raw = Case {
        s,
        x,
        w,
        bn,
        residual,
        relu,
    };
    let got_raw = gpu_bf16s(g, &raw);
    assert!(
        got_raw == got,
        "{label}: unrounded weights give other bits than host-rounded ones"
    );
    let vals: Vec<f32> = got_raw.iter().map(|&h| bf16_value(h)).collect();
    let e = rel_err(&vals, &cpu_nhwc(&raw));
    assert!(
        e < 1e-2 && e > 1e-5,
        "{label}: relative error {e:e}, expected in (1e-5, 1e-2)"
    );
    println!(
        "bf16s {label}: {ex} of {} exact, {near} near zero over 1 ulp, relative error on unrounded data {e:.2e}",
        got.len()
    );
    Checked {
        raw,
        got: got_raw,
        exact: ex,
        near,
        err: e,
    }
}

fn bf16s_eval_forward_matches_cpu() {
    let g = common::cuda::gpu_at(Precision::Bf16);
    let mut rng = SplitMix64::fresh("conv_nhwc_bf16s");
    let (mut total, mut exact, mut near_zero, mut worst) = (0usize, 0usize, 0usize, 0.0f64);
    for (i, (s, what)) in cases().into_iter().enumerate() {
        assert_eq!(
            g.conv_bn_eval_nhwc_bf16s_kernel(&s),
            Some("conv2d_fwd_bn_mma_nhwc_bf16s")
        );
        let (with_res, relu) = [(true, true), (false, false), (true, false), (false, true)][i % 4];
        let c = check_case(&g, s, with_res, relu, what, &mut rng);
        total += c.got.len();
        exact += c.exact;
        near_zero += c.near;
        worst = worst.max(c.err);
    }
    println!(
        "bf16s eval forward, {} shapes: {exact} of {total} outputs exactly the CPU's rounded to bf16, {} 1 ulp off, {near_zero} near zero more (within {NEAR_ZERO:e}); worst relative error on unrounded data {worst:.2e}",
        cases().len(),
        total - exact - near_zero
    );
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

/// The 64 x 256 tile (`conv2d_fwd_bn_mma_nhwc_bf16s_m64`, for `c_out <= 64`): `c_out` 64, 48
/// and 33 (odd: the 2-byte stores; odd `c_in` 5: 2-byte loads; stride 2) on it, 80 on the
/// 128 x 128 kernel, each asserted by name and checked against the CPU as above (residual and
/// ReLU on); each `c_out <= 64` case also against the 128 x 128 kernel on the same data: the
/// layer with random channels appended up to `c_out` 80 (weights, batch norm, residual) takes
/// the 128 x 128 kernel, and the first `c_out` channels of its output must be the 64 x 256
/// kernel's bit for bit.
fn bf16s_tile_m64_matches_cpu_and_the_128_tile() {
    const WIDE: usize = 80;
    let g = common::cuda::gpu_at(Precision::Bf16);
    let mut rng = SplitMix64::fresh("conv_nhwc_bf16s_m64");
    let name = |s: &Conv2d| {
        if s.c_out <= 64 {
            "conv2d_fwd_bn_mma_nhwc_bf16s_m64"
        } else {
            "conv2d_fwd_bn_mma_nhwc_bf16s"
        }
    };
    let mut compared = 0;
    for s in [
        conv(2, 24, 17, 15, 64, 3, 1, 1),
        conv(2, 24, 17, 15, 48, 3, 1, 1),
        conv(2, 24, 17, 15, WIDE, 3, 1, 1),
        conv(3, 5, 13, 12, 33, 3, 2, 1),
    ] {
        assert_eq!(g.conv_bn_eval_nhwc_bf16s_kernel(&s), Some(name(&s)));
        let c = check_case(&g, s, true, true, name(&s), &mut rng);
        if s.c_out > 64 {
            continue;
        }
        let wide = Conv2d { c_out: WIDE, ..s };
        assert_eq!(g.conv_bn_eval_nhwc_bf16s_kernel(&wide), Some(name(&wide)));
        let (more, k, hw) = (WIDE - s.c_out, s.c_in * s.kh * s.kw, s.out_h() * s.out_w());
        let extra_bn = bn_params(&mut rng, more);
        let residual = c.raw.residual.as_deref().expect("a residual");
        let padded = Case {
            s: wide,
            x: c.raw.x.clone(),
            w: pad_channels(
                &c.raw.w,
                1,
                s.c_out,
                k,
                WIDE,
                &rng.vec_f32(more * k, -1.0, 1.0),
            ),
            bn: [0, 1, 2, 3].map(|i| [c.raw.bn[i].clone(), extra_bn[i].clone()].concat()),
            residual: Some(pad_channels(
                residual,
                s.n,
                s.c_out,
                hw,
                WIDE,
                &rng.vec_f32(s.n * more * hw, -1.0, 1.0),
            )),
            relu: true,
        };
        let wide_y: Vec<u16> = gpu_bf16s(&g, &padded)
            .chunks(WIDE)
            .flat_map(|px| px[..s.c_out].to_vec())
            .collect();
        let differ = c.got.iter().zip(&wide_y).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{s:?}: {differ} of {} outputs differ from the 128 x 128 kernel's",
            c.got.len()
        );
        compared += c.got.len();
    }
    println!("bf16s eval, 64 x 256 tile: {compared} outputs bit for bit the 128 x 128 kernel's");
}

/// A captured bf16-storage forward (the batch-norm fold, the bf16 weight copy and the kernel,
/// scratch warmed by the eager call) replays bit for bit what the eager call wrote.
fn bf16s_eval_forward_replays_in_a_graph() {
    // A backend of its own (its own stream): the other tests' work on the shared stream
    // would break the capture.
    let mut g = CudaBackend::new(0).expect("the harness found a CUDA device");
    g.set_precision(Precision::Bf16)
        .expect("the device takes bf16");
    let mut rng = SplitMix64::fresh("conv_nhwc_bf16s_graph");
    let s = shapes()[2].0; // 3x3, c_in = 12: the 4-byte path and the weight copy's padding
    let c = Case {
        s,
        x: rng.vec_f32(s.x_len(), -1.0, 1.0),
        w: rng.vec_f32(s.w_len(), -1.0, 1.0),
        bn: bn_params(&mut rng, s.c_out),
        residual: Some(rng.vec_f32(s.y_len(), -1.0, 1.0)),
        relu: true,
    };
    let eager = gpu_bf16s(&g, &c);
    let b = upload_bf16s(&g, &c);
    let poison = vec![f32::from_bits(POISON); s.y_len().div_ceil(2)];
    let y = common::cuda::capture_replay(&g, &poison, |y| eval_bf16s(&g, &c, &b, y));
    let got = halves(&y, s.y_len());
    assert!(got == eager, "the replay differs from the eager call");
}

/// The op rejects buffers of the wrong length (f32 lengths for bf16 storage included) with a
/// shape error; at f32 or tf32 or with the route `Never` there is no bf16-storage kernel and
/// the op runs the conversions around the channels-last unit (tests/cuda_eval_nhwc.rs checks
/// those against the CPU).
fn bf16s_checks_lengths_precision_and_route() {
    let s = conv(1, 6, 5, 5, 10, 3, 1, 1);
    let g = common::cuda::gpu_at(Precision::Bf16);
    let (xs, ys) = (s.x_len().div_ceil(2), s.y_len().div_ceil(2));
    let bn = bn_of(&s);
    let run = |g: &CudaBackend, x: usize, w: usize, r: Option<usize>, y: usize, c: usize| {
        let up = |n: usize| g.upload(&vec![0.5f32; n]).expect("upload");
        let (xb, wb) = (up(x), up(w));
        let [ga, be_, m, v] = [0; 4].map(|_| up(c));
        let rb = r.map(up);
        let mut yb = up(y);
        g.conv2d_bn_eval_fwd_nhwc_bf16(
            &s,
            &bn,
            &xb,
            &wb,
            &ga,
            &be_,
            &m,
            &v,
            rb.as_ref(),
            false,
            &mut yb,
        )
    };
    let c = s.c_out;
    run(&g, xs, s.w_len(), Some(ys), ys, c).expect("the right lengths run");
    for (what, bad) in [
        (
            "x in f32 length",
            run(&g, s.x_len(), s.w_len(), None, ys, c),
        ),
        ("w packed", run(&g, xs, s.w_len() / 2, None, ys, c)),
        (
            "y in f32 length",
            run(&g, xs, s.w_len(), None, s.y_len(), c),
        ),
        (
            "residual in f32 length",
            run(&g, xs, s.w_len(), Some(s.y_len()), ys, c),
        ),
        ("batch norm", run(&g, xs, s.w_len(), None, ys, c + 1)),
    ] {
        let e = bad.expect_err(what);
        assert!(
            e.to_string().contains("conv2d_bn_eval_fwd_nhwc_bf16"),
            "{what}: {e}"
        );
    }
    let mut never = common::cuda::gpu_at(Precision::Bf16);
    never.set_mma_route(MmaRoute::Never);
    for other in [
        common::cuda::gpu_at(Precision::F32),
        common::cuda::gpu_at(Precision::Tf32),
        never,
    ] {
        assert_eq!(other.conv_bn_eval_nhwc_bf16s_kernel(&s), None);
        run(&other, xs, s.w_len(), None, ys, c).expect("the conversions run it");
    }
}
