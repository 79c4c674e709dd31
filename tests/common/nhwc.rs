//! The channels-last (NHWC) eval forward's test cases, shared by tests/cuda_conv_nhwc.rs (f32
//! activations) and tests/cuda_conv_nhwc_bf16s.rs (bf16 storage): the shapes, layout changes
//! on the host, the batch-norm parameters and the CPU reference (NCHW, transposed here); and
//! the small models of the channels-last model tests (tests/eval_nhwc.rs,
//! tests/eval_bf16_storage.rs); the bf16-storage eval op on a case ([`gpu_bf16s`],
//! [`eval_bf16s`]: also tests/cuda_conv_wgmma.rs); bf16 storage on the host ([`pack`], [`halves`], [`ulps`]:
//! the bf16-storage kernels' tests); the gradients' CPU references ([`cpu_dx`], [`cpu_dw`],
//! [`wgrad_data`]), the bf16-storage weight gradient ([`gpu_dw_bf16s`]) and the stride-2 data gradient's zero-tap check ([`check_zero_taps`]) of
//! the channels-last training kernels' tests (tests/cuda_conv_nhwc_train*.rs,
//! tests/cuda_conv_nhwc_wgrad.rs, tests/cuda_conv_wgmma_*.rs); one convolution's operands
//! ([`OpData`]) and the f32- and bf16-storage channels-last ops' outputs on them
//! ([`nhwc_outputs`], [`bf16s_outputs`]) of the
//! shared-memory limit tests (tests/cuda_conv_smem_limit.rs, tests/cuda_conv_smem_99k.rs).

use super::rng::SplitMix64;
use super::shapes::conv;
use cudarc::driver::CudaSlice;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::precision::bf16_bits;
use ichcam::engine::{ActStorage, Backend, BatchNorm2d, Conv2d, EngineError};
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

/// The bit pattern the bf16-storage tests fill outputs with first (two bf16 NaNs per slot).
pub const POISON: u32 = 0xffff_ffff;

/// How far apart (absolutely) the kernel's and the CPU's results on bf16-exact operands may
/// be where they are more than 1 bf16 ulp apart: the sums of the same exact products in
/// another order differ by f32 rounding of their partial sums (up to ~1e-5 for K = 576 terms
/// of up to 1 here), more than a bf16 ulp only for results below about 1e-3.
pub const NEAR_ZERO: f64 = 2e-5;

/// A case's operands of the bf16-storage eval op on the device: x and the residual
/// transposed to NHWC and packed, w as it is, the batch-norm parameters.
pub struct Bf16sBufs {
    pub x: CudaSlice<f32>,
    pub w: CudaSlice<f32>,
    pub bn: [CudaSlice<f32>; 4],
    pub residual: Option<CudaSlice<f32>>,
}

/// `c`'s operands uploaded for the bf16-storage eval op.
pub fn upload_bf16s(g: &CudaBackend, c: &Case) -> Bf16sBufs {
    let s = &c.s;
    let up = |v: &[f32]| g.upload(v).expect("upload");
    let hw = s.out_h() * s.out_w();
    Bf16sBufs {
        x: up(&pack(&to_nhwc(&c.x, s.n, s.c_in, s.h * s.w))),
        w: up(&c.w),
        bn: [0, 1, 2, 3].map(|i| up(&c.bn[i])),
        residual: c
            .residual
            .as_deref()
            .map(|r| up(&pack(&to_nhwc(r, s.n, s.c_out, hw)))),
    }
}

/// The bf16-storage eval op (`conv2d_bn_eval_fwd_nhwc_bf16`) on `c` (its ReLU) and its
/// uploaded operands `b` into `y` (bf16 storage).
pub fn eval_bf16s(
    g: &CudaBackend,
    c: &Case,
    b: &Bf16sBufs,
    y: &mut CudaSlice<f32>,
) -> Result<(), EngineError> {
    let [ga, be, m, v] = &b.bn;
    g.conv2d_bn_eval_fwd_nhwc_bf16(
        &c.s,
        &bn_of(&c.s),
        &b.x,
        &b.w,
        ga,
        be,
        m,
        v,
        b.residual.as_ref(),
        c.relu,
        y,
    )
}

/// The op on `c` ([`upload_bf16s`], [`eval_bf16s`]), y poisoned first: the output's bf16
/// halves. Asserts that every value was written and, with an odd length, that the last slot's
/// high half was not.
pub fn gpu_bf16s(g: &CudaBackend, c: &Case) -> Vec<u16> {
    let s = &c.s;
    let b = upload_bf16s(g, c);
    let mut y = g
        .upload(&vec![f32::from_bits(POISON); s.y_len().div_ceil(2)])
        .expect("upload");
    eval_bf16s(g, c, &b, &mut y).expect("conv2d_bn_eval_fwd_nhwc_bf16");
    let slots = g.download(&y).expect("download");
    if s.y_len() % 2 == 1 {
        let last = slots.last().expect("a slot").to_bits();
        assert_eq!(
            last >> 16,
            0xffff,
            "{s:?}: the unused high half was written"
        );
    }
    let h = halves(&slots, s.y_len());
    assert!(
        h.iter().all(|&v| bf16_value(v).is_finite()),
        "{s:?}: an output not written (or not finite)"
    );
    h
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

/// x and dy (NCHW) of a weight gradient on `g` in bf16 storage: transposed to NHWC and packed,
/// an odd length's unused last half a bf16 NaN (0xFFFF: read, it would poison every dw it
/// touched).
pub fn upload_wgrad_bf16s(
    g: &CudaBackend,
    s: &Conv2d,
    x: &[f32],
    dy: &[f32],
) -> (CudaSlice<f32>, CudaSlice<f32>) {
    let up = |v: &[f32], c: usize, hw: usize| {
        g.upload(&pack_tail(&to_nhwc(v, s.n, c, hw), 0xFFFF))
            .expect("upload")
    };
    (
        up(x, s.c_in, s.h * s.w),
        up(dy, s.c_out, s.out_h() * s.out_w()),
    )
}

/// The bf16-storage weight gradient (`conv2d_bwd_weight_nhwc_bf16`) on `g`
/// ([`upload_wgrad_bf16s`]), dw (OIHW) poisoned with NaN first.
pub fn gpu_dw_bf16s(g: &CudaBackend, s: &Conv2d, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (xb, dyb) = upload_wgrad_bf16s(g, s, x, dy);
    let mut dw = g.upload(&vec![f32::NAN; s.w_len()]).expect("upload");
    g.conv2d_bwd_weight_nhwc_bf16(s, &xb, &dyb, &mut dw)
        .expect("conv2d_bwd_weight_nhwc_bf16");
    g.download(&dw).expect("download")
}

/// One convolution's operands for comparing every op on them (the same buffers read as NCHW
/// or NHWC as the op takes them: any data will do): x, w, dy, the batch-norm parameters and a
/// residual of y's shape.
pub struct OpData {
    pub s: Conv2d,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub dy: Vec<f32>,
    pub bn: [Vec<f32>; 4],
    pub residual: Vec<f32>,
}

impl OpData {
    /// `s`'s operands from the generator seeded by `seed` and the shape: x, dy and the
    /// residual uniform in [-1, 1), w in [-0.3, 0.3), [`bn_params`].
    pub fn new(s: Conv2d, seed: &str) -> Self {
        let mut rng = SplitMix64::fresh(&format!("{seed}_{s:?}"));
        OpData {
            s,
            x: rng.vec_f32(s.x_len(), -1.0, 1.0),
            w: rng.vec_f32(s.w_len(), -0.3, 0.3),
            dy: rng.vec_f32(s.y_len(), -1.0, 1.0),
            bn: bn_params(&mut rng, s.c_out),
            residual: rng.vec_f32(s.y_len(), -1.0, 1.0),
        }
    }
}

/// The channels-last ops on f32 storage on `be` (a CUDA backend at tf32 or bf16, or the
/// CPU's reference) for `d`'s data: the eval forward (residual, ReLU), the training forward (z,
/// y and the running variance), the data and weight gradients. Labels start with "nhwc".
pub fn nhwc_outputs<B: Backend<T = f32>>(be: &B, d: &OpData) -> Vec<(&'static str, Vec<f32>)> {
    let s = &d.s;
    let bn = bn_of(s);
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let down = |b: &B::Buf| be.download(b).expect("download");
    let (x, w, dy, res) = (up(&d.x), up(&d.w), up(&d.dy), up(&d.residual));
    let [ga, bt, rm, rv] = [0, 1, 2, 3].map(|i| up(&d.bn[i]));
    let c = s.c_out;
    let mut out = Vec::new();
    let mut y = nan(s.y_len());
    be.conv2d_bn_eval_fwd_nhwc(s, &bn, &x, &w, &ga, &bt, &rm, &rv, Some(&res), true, &mut y)
        .expect("conv2d_bn_eval_fwd_nhwc");
    out.push(("nhwc eval", down(&y)));
    let (mut rm2, mut rv2) = (up(&d.bn[2]), up(&d.bn[3]));
    let (mut sm, mut si) = (nan(c), nan(c));
    let (mut z, mut y) = (nan(s.y_len()), nan(s.y_len()));
    be.conv2d_bn_train_fwd_nhwc(
        s,
        &bn,
        &x,
        &w,
        &ga,
        &bt,
        &mut rm2,
        &mut rv2,
        &mut sm,
        &mut si,
        &mut z,
        &mut y,
        Some(&res),
        true,
    )
    .expect("conv2d_bn_train_fwd_nhwc");
    out.push(("nhwc train z", down(&z)));
    out.push(("nhwc train y", down(&y)));
    out.push(("nhwc train running_var", down(&rv2)));
    let mut dx = nan(s.x_len());
    be.conv2d_bwd_data_nhwc(s, &dy, &w, &mut dx)
        .expect("conv2d_bwd_data_nhwc");
    out.push(("nhwc bwd_data", down(&dx)));
    let mut dw = nan(s.w_len());
    be.conv2d_bwd_weight_nhwc(s, &x, &dy, &mut dw)
        .expect("conv2d_bwd_weight_nhwc");
    out.push(("nhwc bwd_weight", down(&dw)));
    out
}

/// The bf16-storage ops on `be` (a CUDA backend at bf16, or the CPU's reference) for `d`'s
/// data, packed (rounded) by the backend itself: the eval forward (residual, ReLU), the
/// training forward (z, y and the running variance), the data and weight gradients; the
/// bf16 outputs unpacked to f32. Labels start with "bf16s".
pub fn bf16s_outputs<B: Backend<T = f32>>(be: &B, d: &OpData) -> Vec<(&'static str, Vec<f32>)> {
    let s = &d.s;
    let bn = bn_of(s);
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let down = |b: &B::Buf| be.download(b).expect("download");
    let (x, w, dy, res) = (up(&d.x), up(&d.w), up(&d.dy), up(&d.residual));
    let [ga, bt, rm, rv] = [0, 1, 2, 3].map(|i| up(&d.bn[i]));
    let c = s.c_out;
    let mut out = Vec::new();
    let slots = |n: usize| be.storage_slots(ActStorage::Bf16, n);
    let pack = |b: &B::Buf, n: usize| {
        let mut p = up(&vec![0.0; slots(n)]);
        be.pack_bf16(b, &mut p).expect("pack_bf16");
        p
    };
    let unpack = |b: &B::Buf, n: usize| {
        let mut f = nan(n);
        be.unpack_bf16(b, &mut f).expect("unpack_bf16");
        down(&f)
    };
    let (xh, dyh, resh) = (
        pack(&x, s.x_len()),
        pack(&dy, s.y_len()),
        pack(&res, s.y_len()),
    );
    let mut yh = up(&vec![0.0; slots(s.y_len())]);
    be.conv2d_bn_eval_fwd_nhwc_bf16(
        s,
        &bn,
        &xh,
        &w,
        &ga,
        &bt,
        &rm,
        &rv,
        Some(&resh),
        true,
        &mut yh,
    )
    .expect("conv2d_bn_eval_fwd_nhwc_bf16");
    out.push(("bf16s eval", unpack(&yh, s.y_len())));
    let (mut rm2, mut rv2) = (up(&d.bn[2]), up(&d.bn[3]));
    let (mut sm, mut si) = (nan(c), nan(c));
    let mut zh = up(&vec![0.0; slots(s.y_len())]);
    let mut yh = up(&vec![0.0; slots(s.y_len())]);
    be.conv2d_bn_train_fwd_nhwc_bf16(
        s,
        &bn,
        &xh,
        &w,
        &ga,
        &bt,
        &mut rm2,
        &mut rv2,
        &mut sm,
        &mut si,
        &mut zh,
        &mut yh,
        Some(&resh),
        true,
    )
    .expect("conv2d_bn_train_fwd_nhwc_bf16");
    out.push(("bf16s train z", unpack(&zh, s.y_len())));
    out.push(("bf16s train y", unpack(&yh, s.y_len())));
    out.push(("bf16s train running_var", down(&rv2)));
    let mut dx = nan(s.x_len());
    be.conv2d_bwd_data_nhwc_bf16(s, &dyh, &w, &mut dx)
        .expect("conv2d_bwd_data_nhwc_bf16");
    out.push(("bf16s bwd_data", down(&dx)));
    let mut dw = nan(s.w_len());
    be.conv2d_bwd_weight_nhwc_bf16(s, &xh, &dyh, &mut dw)
        .expect("conv2d_bwd_weight_nhwc_bf16");
    out.push(("bf16s bwd_weight", down(&dw)));
    out
}
