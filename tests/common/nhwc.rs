//! The channels-last (NHWC) eval forward's test cases, shared by tests/cuda_conv_nhwc.rs (f32
//! activations) and tests/cuda_conv_nhwc_bf16s.rs (bf16 storage): the shapes, layout changes
//! on the host, the batch-norm parameters and the CPU reference (NCHW, transposed here); and
//! the small models of the channels-last model tests (tests/eval_nhwc.rs,
//! tests/eval_bf16_storage.rs); bf16 storage on the host ([`pack`], [`halves`], [`ulps`]:
//! the bf16-storage kernels' tests); the gradients' CPU references ([`cpu_dx`], [`cpu_dw`],
//! [`wgrad_data`]) and the stride-2 data gradient's zero-tap check ([`check_zero_taps`]) of
//! the channels-last training kernels' tests (tests/cuda_conv_nhwc_train*.rs,
//! tests/cuda_conv_nhwc_wgrad.rs, tests/cuda_conv_wgmma_*.rs).

use super::rng::SplitMix64;
use super::shapes::conv;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::precision::bf16_bits;
use ichcam::engine::{Backend, BatchNorm2d, Conv2d};
use ichcam::model::{BlockKind, ModelConfig};

/// The shapes, each with the copy paths it takes in the f32-activation kernel (weights /
/// activations: 16 or 4 bytes).
pub fn shapes() -> [(Conv2d, &'static str); 11] {
    [
        // 1x1 stride 1, K = 64; odd 9x11, 198 pixels; C_out 136 (two channel tiles).
        (conv(2, 64, 9, 11, 136, 1, 1, 0), "16/16"),
        // 1x1 stride 2 (a downsample), 9x13 -> 5x7, batch 3: 105 pixels.
        (conv(3, 32, 9, 13, 130, 1, 2, 0), "16/16"),
        // 3x3 stride 1 padding 1, K = 108, 198 pixels, C_out 140.
        (conv(2, 12, 11, 9, 140, 3, 1, 1), "16/16"),
        // 3x3 stride 2 padding 1, K = 180, 13x12 -> 7x6, batch 3: 126 pixels.
        (conv(3, 20, 13, 12, 160, 3, 2, 1), "16/16"),
        // 3x3 stride 2 without padding, K = 288: 9 K tiles, 15x17 -> 7x8, 112 pixels.
        (conv(2, 32, 15, 17, 128, 3, 2, 0), "16/16"),
        // The stem: 7x7 stride 2 padding 3, c_in = 3 (K = 147), 23x21 -> 12x11, 264 pixels.
        (conv(2, 3, 23, 21, 129, 7, 2, 3), "4/4"),
        // c_in = 6 with 3x3 (K = 54), C_out 70 (one ragged channel tile), 189 pixels.
        (conv(3, 6, 7, 9, 70, 3, 1, 1), "4/4"),
        // 1x1 with c_in = 66 (K = 66): 4-byte copies of both, 130 pixels.
        (conv(1, 66, 10, 13, 128, 1, 1, 0), "4/4"),
        // An even kernel: 2x2 stride 2, c_in = 6 (K = 24), 8x9 -> 4x4.
        (conv(2, 6, 8, 9, 96, 2, 2, 0), "16/4"),
        // c_in = 1, 3x3: the OIHW weights are already in (kh, kw, c) order; K = 9.
        (conv(2, 1, 10, 10, 128, 3, 1, 1), "4/4"),
        // 5x5 stride 1 padding 2, c_in = 4 (K = 100), batch 1, 15x11: 165 pixels.
        (conv(1, 4, 15, 11, 200, 5, 1, 2), "16/16"),
    ]
}

/// `[n][c][hw]` -> `[n][hw][c]`.
pub fn to_nhwc(v: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    assert_eq!(v.len(), n * c * hw);
    let mut out = vec![0.0; v.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                out[(i * hw + p) * c + ch] = v[(i * c + ch) * hw + p];
            }
        }
    }
    out
}

pub fn bn_of(s: &Conv2d) -> BatchNorm2d {
    BatchNorm2d {
        n: s.n,
        c: s.c_out,
        hw: s.out_h() * s.out_w(),
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// Batch-norm parameters and statistics of `c` channels: gamma, beta, mean, var.
pub fn bn_params(rng: &mut SplitMix64, c: usize) -> [Vec<f32>; 4] {
    [
        rng.vec_f32(c, 0.5, 1.5),
        rng.vec_f32(c, -0.5, 0.5),
        rng.vec_f32(c, -0.2, 0.2),
        rng.vec_f32(c, 0.5, 1.5),
    ]
}

/// One case: NCHW x, OIHW w, the batch-norm parameters, the NCHW residual if any, ReLU.
pub struct Case {
    pub s: Conv2d,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub bn: [Vec<f32>; 4],
    pub residual: Option<Vec<f32>>,
    pub relu: bool,
}

/// The CPU reference on NCHW data, its output transposed to NHWC.
pub fn cpu_nhwc(c: &Case) -> Vec<f32> {
    let cpu = CpuBackend::<f32>::new();
    let up = |v: &[f32]| cpu.upload(v).expect("upload");
    let (xb, wb) = (up(&c.x), up(&c.w));
    let [ga, be_, m, v] = [0, 1, 2, 3].map(|i| up(&c.bn[i]));
    let rb = c.residual.as_deref().map(up);
    let mut y = up(&vec![f32::NAN; c.s.y_len()]);
    cpu.conv2d_bn_eval_fwd(
        &c.s,
        &bn_of(&c.s),
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
    .expect("cpu conv2d_bn_eval_fwd");
    let y = cpu.download(&y).expect("download");
    to_nhwc(&y, c.s.n, c.s.c_out, c.s.out_h() * c.s.out_w())
}

/// Two small models for the channels-last model tests: a bottleneck net of base width 4
/// (layers 2, 1, 2) and the tiny preset.
pub fn eval_configs() -> [ModelConfig; 2] {
    [
        ModelConfig {
            block: BlockKind::Bottleneck,
            layers: vec![2, 1, 2],
            base_width: 4,
            ..ModelConfig::tiny()
        },
        ModelConfig::tiny(),
    ]
}

/// `v` in bf16 storage: value i (rounded to nearest even) in the 16-bit half i (little-endian
/// halves of the f32 slots); an odd length's unused last half 0.
pub fn pack(v: &[f32]) -> Vec<f32> {
    pack_tail(v, 0)
}

/// [`pack`] with an odd length's unused last half set to `tail` (0xFFFF: a bf16 NaN, which
/// would poison whatever read it).
pub fn pack_tail(v: &[f32], tail: u16) -> Vec<f32> {
    let mut out = vec![0u32; v.len().div_ceil(2)];
    for (i, &x) in v.iter().enumerate() {
        out[i / 2] |= u32::from(bf16_bits(x)) << (16 * (i % 2));
    }
    if v.len() % 2 == 1 {
        if let Some(last) = out.last_mut() {
            *last |= u32::from(tail) << 16;
        }
    }
    out.into_iter().map(f32::from_bits).collect()
}

/// The first `len` halves of bf16 storage.
pub fn halves(slots: &[f32], len: usize) -> Vec<u16> {
    (0..len)
        .map(|i| (slots[i / 2].to_bits() >> (16 * (i % 2))) as u16)
        .collect()
}

/// The f32 value of bf16 bits.
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Distance in bf16 ulps (across zero: +0 and -0 are one point).
pub fn ulps(a: u16, b: u16) -> u32 {
    let ord = |h: u16| {
        if h & 0x8000 != 0 {
            -i32::from(h & 0x7fff)
        } else {
            i32::from(h)
        }
    };
    ord(a).abs_diff(ord(b))
}

/// NCHW x and dy of `s` (uniform in [-1, 1)), the weight gradient's operands.
pub fn wgrad_data(rng: &mut SplitMix64, s: &Conv2d) -> (Vec<f32>, Vec<f32>) {
    (
        rng.vec_f32(s.x_len(), -1.0, 1.0),
        rng.vec_f32(s.y_len(), -1.0, 1.0),
    )
}

/// The weight gradient's CPU reference: NCHW x and dy, dw OIHW.
pub fn cpu_dw(s: &Conv2d, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let cpu = CpuBackend::<f32>::new();
    let (xb, dyb) = (
        cpu.upload(x).expect("upload"),
        cpu.upload(dy).expect("upload"),
    );
    let mut dw = cpu.upload(&vec![f32::NAN; s.w_len()]).expect("upload");
    cpu.conv2d_bwd_weight(s, &xb, &dyb, &mut dw)
        .expect("cpu conv2d_bwd_weight");
    cpu.download(&dw).expect("download")
}

/// The data gradient's CPU reference: NCHW dy and OIHW w in f32, dx transposed to NHWC.
pub fn cpu_dx(s: &Conv2d, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let cpu = CpuBackend::<f32>::new();
    let (dyb, wb) = (
        cpu.upload(dy).expect("upload"),
        cpu.upload(w).expect("upload"),
    );
    let mut dx = cpu.upload(&vec![f32::NAN; s.x_len()]).expect("upload");
    cpu.conv2d_bwd_data(s, &dyb, &wb, &mut dx)
        .expect("cpu conv2d_bwd_data");
    to_nhwc(
        &cpu.download(&dx).expect("download"),
        s.n,
        s.c_in,
        s.h * s.w,
    )
}

/// The zero-tap check of a stride-2 data gradient (`s` 3x3, stride 2, padding 1, the weight
/// `w[2][ci][0][0]` infinite): in `got` (dx NHWC) every value of an input pixel that tap
/// never reaches (channel `ci` at an even row or column, and every other channel) equal to
/// `want` (the CPU's) within 1e-5, and some that it reaches not finite (a kernel that
/// multiplied the structurally zero taps, or a phase that read another phase's weights, would
/// make the unreached ones 0 * inf = NaN). `what` labels a failure.
pub fn check_zero_taps(what: &str, s: &Conv2d, ci: usize, got: &[f32], want: &[f32]) {
    let (mut reached, mut checked) = (0, 0);
    for n in 0..s.n {
        for ih in 0..s.h {
            for iw in 0..s.w {
                for c in 0..s.c_in {
                    let i = ((n * s.h + ih) * s.w + iw) * s.c_in + c;
                    if c == ci && ih % 2 == 1 && iw % 2 == 1 {
                        reached += usize::from(!got[i].is_finite());
                        continue;
                    }
                    assert!(
                        (got[i] - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                        "{what}: dx[{n}][{ih}][{iw}][{c}] = {} (cpu {}): a zero tap was multiplied",
                        got[i],
                        want[i]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 800, "{what}: {checked} values checked");
    assert!(reached > 0, "{what}: the infinite weight reached no pixel");
}
