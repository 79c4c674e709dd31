//! Batch norm on the device (`kernels/norm.cu`, mirroring `cpu/norm.rs`): training mode
//! (per-channel mean, then squared deviations from it, as f64 partial sums per block and a
//! per-channel finish; running stats updated), eval mode, the eval-mode normalisation folded
//! into a per-channel scale and shift for a fused convolution ([`bn_eval_fold`]), the
//! training forward from the partial statistics a convolution's epilogue wrote
//! ([`batchnorm_train_from_partials`]), and the backward pass. The training forward's
//! normalisation can add a residual block's shortcut and apply its ReLU in the same pass
//! (`bn_apply`; `Backend::conv2d_bn_train_fwd`'s join). Channels-last (NHWC) activations
//! take the same combine and elementwise passes (the channel of element i is `i % c`:
//! [`Layout::Nhwc`]), the training forward from a convolution's partials (the same
//! function, [`Layout`] given) and the backward ([`batchnorm_bwd_nhwc`], its sums by
//! `bn_bwd_partial_nhwc`, coalesced along the channels), and both on activations in bf16
//! storage ([`Layout::NhwcBf16`], [`batchnorm_bwd_nhwc_bf16`]).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::launch::{blocks, grid, int_args, kernels, NULL};
use super::CudaBackend;
use crate::engine::shapes::BatchNorm2d;
use crate::engine::Result;

kernels!("norm" {
    partial: "bn_partial",
    finalize_mean: "bn_finalize_mean",
    finalize_var: "bn_finalize_var",
    apply: "bn_apply",
    apply_bf16: "bn_apply_bf16",
    eval_fwd: "bn_eval_fwd",
    eval_fold: "bn_eval_fold",
    stats_finalize: "bn_stats_finalize",
    bwd_partial: "bn_bwd_partial",
    bwd_partial_nhwc: "bn_bwd_partial_nhwc",
    bwd_partial_nhwc_bf16: "bn_bwd_partial_nhwc_bf16",
    bwd_finalize: "bn_bwd_finalize",
    bwd_apply: "bn_bwd_apply",
    bwd_apply_bf16: "bn_bwd_apply_bf16",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.norm.get(|| Kernels::load(be.modules()))
}

/// The layout of a batch norm's activations `[n, c, hw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// NCHW: element i is of channel `(i / hw) % c`.
    Nchw,
    /// Channels-last (NHWC, `[n * hw, c]`): element i is of channel `i % c`.
    Nhwc,
    /// Channels-last in bf16 storage (`precision::ActStorage::Bf16`: value i the 16-bit half
    /// at index i of the buffer): the activations a kernel reads (z, y, the residual) read
    /// exactly, the one it writes (y forward, dz backward) rounded to nearest even.
    NhwcBf16,
}

impl Layout {
    /// The `HW` the elementwise kernels take: `(i / HW) % C` is element i's channel.
    fn kernel_hw(self, s: &BatchNorm2d) -> usize {
        match self {
            Layout::Nchw => s.hw,
            Layout::Nhwc | Layout::NhwcBf16 => 1,
        }
    }
}

/// Channels per block of `bn_bwd_partial_nhwc` (its 256 threads: 256 / CT pixel rows).
fn nhwc_channel_tile(c: usize) -> usize {
    c.clamp(1, 256)
}

/// The reduction's launch shapes: (split blocks x channels of 512 threads, one thread per
/// channel) and the split and chunk sizes.
fn reduction(
    be: &CudaBackend,
    op: &'static str,
    s: &BatchNorm2d,
) -> Result<(LaunchConfig, LaunchConfig, usize, usize)> {
    let (split, chunk) = be.reduce_split(s.n * s.hw, s.c);
    // One block row per channel: C is the grid's y dimension.
    let red = blocks(op, (split, s.c, 1), 512)?;
    let per_c = blocks(op, (s.c.div_ceil(256), 1, 1), 256)?;
    Ok((red, per_c, split, chunk))
}

/// The training forward in separate passes over x (the mean, the squared deviations, then
/// `bn_apply`: `y = act(bn(x) (+ residual))`, the residual of x's shape when there is one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_train_fwd(
    be: &CudaBackend,
    s: &BatchNorm2d,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    running_mean: &mut CudaSlice<f32>,
    running_var: &mut CudaSlice<f32>,
    save_mean: &mut CudaSlice<f32>,
    save_invstd: &mut CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    residual: Option<&CudaSlice<f32>>,
    relu: bool,
) -> Result<()> {
    if s.c == 0 {
        return Ok(());
    }
    let (red, per_c, split, chunk) = reduction(be, "batchnorm_train_fwd", s)?;
    // Scratch from the arena (reused call after call: nothing allocated once warm, so a
    // training step can be captured as a CUDA graph).
    let mut part = be.take_scratch_f64(s.c * split)?;
    let mut stats = be.take_scratch_f64(2 * s.c)?;
    let r = (|| -> Result<()> {
        let [n, c, hw, chunk, split] = int_args([s.n, s.c, s.hw, chunk, split])?;
        let (eps, momentum) = (s.eps, s.momentum);
        let k = kernels(be)?;
        let st = be.stream();
        // SAFETY: x holds n*c*hw values (checked), the per-channel buffers c each, `part` one
        // partial sum per (channel, split) and `stats` two per channel.
        unsafe {
            // The mean, then the squared deviations from it (two passes), then normalise.
            k.partial
                .on(st)
                .arg(x)
                .arg(&NULL)
                .arg(&mut part)
                .ints(&[n, c, hw, chunk])
                .launch(red)?;
            k.finalize_mean
                .on(st)
                .arg(&part)
                .arg(&mut stats)
                .ints(&[c, split, n, hw])
                .launch(per_c)?;
            k.partial
                .on(st)
                .arg(x)
                .arg(&stats)
                .arg(&mut part)
                .ints(&[n, c, hw, chunk])
                .launch(red)?;
            k.finalize_var
                .on(st)
                .arg(&part)
                .arg(&mut stats)
                .arg(running_mean)
                .arg(running_var)
                .arg(&mut *save_mean)
                .arg(&mut *save_invstd)
                .ints(&[c, split, n, hw])
                .arg(&eps)
                .arg(&momentum)
                .launch(per_c)?;
            apply(
                k,
                be,
                s,
                x,
                gamma,
                beta,
                save_mean,
                save_invstd,
                residual,
                y,
                relu,
                Layout::Nchw,
            )
        }
    })();
    be.give_scratch_f64(part);
    be.give_scratch_f64(stats);
    r
}

/// [`batchnorm_train_fwd`] of `z` when its statistics come from the convolution that wrote it
/// (`conv::conv2d_fwd_stats` and its channels-last twins): per channel c and pixel tile t
/// (`tile` consecutive values of the channel's n*hw in pixel order n, oh, ow, the last one
/// shorter: the same in both layouts), `part_s[c * tiles + t]` the tile's sum and
/// `part_q[c * tiles + t]` its sum of squared deviations from its own mean. One block per
/// channel combines them exactly (`bn_stats_finalize`: mean, then the squared deviations as
/// the tiles' own plus `n_t * (mean_t - mean)^2`, no cancellation), updates the running
/// stats and saves mean and invstd as [`batchnorm_train_fwd`] does; then `bn_apply` reads z
/// once (and the residual, when there is one: `y = act(bn(z) + residual)`) in `layout`: NCHW,
/// channels-last (the channel of element i is `i % c`: bit for bit the NCHW result,
/// transposed), or channels-last in bf16 storage (`bn_apply_bf16`: z and the residual read
/// exactly, y written rounded; the partials must then be those of the ROUNDED z, as the
/// backward reads it). The caller checked the lengths (`part_s`, `part_q`: `c * tiles`; z,
/// y, the residual: `s.len()`, or `s.len().div_ceil(2)` slots in bf16 storage).
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_train_from_partials(
    be: &CudaBackend,
    s: &BatchNorm2d,
    part_s: &CudaSlice<f64>,
    part_q: &CudaSlice<f64>,
    tiles: usize,
    tile: usize,
    z: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    running_mean: &mut CudaSlice<f32>,
    running_var: &mut CudaSlice<f32>,
    save_mean: &mut CudaSlice<f32>,
    save_invstd: &mut CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    residual: Option<&CudaSlice<f32>>,
    relu: bool,
    layout: Layout,
) -> Result<()> {
    if s.c == 0 {
        return Ok(());
    }
    let [cnt, tiles, tile] = int_args([s.n * s.hw, tiles, tile])?;
    let per_c = blocks("batchnorm_train_fwd", (s.c, 1, 1), 256)?;
    let (eps, momentum) = (s.eps, s.momentum);
    let k = kernels(be)?;
    let st = be.stream();
    // SAFETY: the partial sums hold c * tiles values, z and y n*c*hw, the per-channel
    // buffers c each (the caller's contract).
    unsafe {
        k.stats_finalize
            .on(st)
            .arg(part_s)
            .arg(part_q)
            .arg(running_mean)
            .arg(running_var)
            .arg(&mut *save_mean)
            .arg(&mut *save_invstd)
            .ints(&[tiles, cnt, tile])
            .arg(&eps)
            .arg(&momentum)
            .launch(per_c)?;
        apply(
            k,
            be,
            s,
            z,
            gamma,
            beta,
            save_mean,
            save_invstd,
            residual,
            y,
            relu,
            layout,
        )
    }
}

/// `bn_apply`: `y = act((x - mean) * invstd * gamma + beta (+ residual))` with the saved
/// statistics, the residual (x's shape) or none, one pass over x, all in `layout`.
///
/// # Safety
/// x, y and the residual hold `s.len()` values, the per-channel buffers `s.c` each.
#[allow(clippy::too_many_arguments)]
unsafe fn apply(
    k: &Kernels,
    be: &CudaBackend,
    s: &BatchNorm2d,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    save_mean: &CudaSlice<f32>,
    save_invstd: &CudaSlice<f32>,
    residual: Option<&CudaSlice<f32>>,
    y: &mut CudaSlice<f32>,
    relu: bool,
    layout: Layout,
) -> Result<()> {
    let ints = int_args([s.len(), s.c, layout.kernel_hw(s), relu as usize])?;
    let kernel = match layout {
        Layout::NhwcBf16 => &k.apply_bf16,
        Layout::Nchw | Layout::Nhwc => &k.apply,
    };
    let mut l = kernel.on(be.stream());
    l.arg(x)
        .arg(gamma)
        .arg(beta)
        .arg(save_mean)
        .arg(save_invstd);
    match residual {
        Some(r) => l.arg(r),
        None => l.arg(&NULL),
    };
    l.arg(y).ints(&ints);
    // SAFETY: the caller's contract.
    unsafe { l.launch(grid(s.len())) }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_eval_fwd(
    be: &CudaBackend,
    s: &BatchNorm2d,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    running_mean: &CudaSlice<f32>,
    running_var: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    relu: bool,
) -> Result<()> {
    if s.is_empty() {
        return Ok(());
    }
    let [total, c, hw] = int_args([s.len(), s.c, s.hw])?;
    let (eps, relu) = (s.eps as f32, relu as i32);
    // SAFETY: x and y hold n*c*hw values, the per-channel buffers c each (checked).
    unsafe {
        kernels(be)?
            .eval_fwd
            .on(be.stream())
            .arg(x)
            .arg(gamma)
            .arg(beta)
            .arg(running_mean)
            .arg(running_var)
            .arg(y)
            .ints(&[total, c, hw])
            .arg(&eps)
            .arg(&relu)
            .launch(grid(s.len()))
    }
}

/// Runs `f` on the eval-mode batch norm folded per channel into `ss = [scale; c]` then
/// `[shift; c]` (2 * c values of arena scratch, given back after `f`: nothing allocated once
/// warm, so capturable): what a convolution's fused epilogue applies
/// (`conv::conv2d_bn_eval_fwd`, the channels-last forward). The per-channel buffers hold
/// `s.c` values (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn with_bn_eval_fold(
    be: &CudaBackend,
    s: &BatchNorm2d,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    running_mean: &CudaSlice<f32>,
    running_var: &CudaSlice<f32>,
    f: impl FnOnce(&CudaSlice<f32>) -> Result<()>,
) -> Result<()> {
    let mut ss = be.take_scratch(2 * s.c)?;
    let r =
        bn_eval_fold(be, s, gamma, beta, running_mean, running_var, &mut ss).and_then(|()| f(&ss));
    be.give_scratch(ss);
    r
}

/// `ss = [scale; c]` then `[shift; c]`, `scale = gamma / sqrt(var + eps)`,
/// `shift = beta - mean * scale`, in f64 rounded to f32 as the CPU's `eval_scale_shift`.
/// The per-channel buffers hold `s.c` values, `ss` `2 * s.c` (checked by the caller).
fn bn_eval_fold(
    be: &CudaBackend,
    s: &BatchNorm2d,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    running_mean: &CudaSlice<f32>,
    running_var: &CudaSlice<f32>,
    ss: &mut CudaSlice<f32>,
) -> Result<()> {
    if s.c == 0 {
        return Ok(());
    }
    let [c] = int_args([s.c])?;
    let cfg = blocks("bn_eval_fold", (s.c.div_ceil(256), 1, 1), 256)?;
    // SAFETY: the per-channel buffers hold c values, ss 2c (the caller's contract).
    unsafe {
        kernels(be)?
            .eval_fold
            .on(be.stream())
            .arg(gamma)
            .arg(beta)
            .arg(running_mean)
            .arg(running_var)
            .arg(ss)
            .arg(&c)
            .arg(&s.eps)
            .launch(cfg)
    }
}

/// The backward pass (`Backend::batchnorm_bwd`): per channel the sums of g and g * xhat (g:
/// dy masked by the fused ReLU) as f64 partials per chunk of pixels (`bn_bwd_partial`),
/// combined per channel (`bn_bwd_finalize`: dgamma, dbeta), then dx elementwise
/// (`bn_bwd_apply`). The caller checked the lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_bwd(
    be: &CudaBackend,
    s: &BatchNorm2d,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    save_mean: &CudaSlice<f32>,
    save_invstd: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dgamma: &mut CudaSlice<f32>,
    dbeta: &mut CudaSlice<f32>,
    relu: bool,
) -> Result<()> {
    bwd(
        be,
        s,
        [x, y, dy, gamma, save_mean, save_invstd],
        dx,
        dgamma,
        dbeta,
        relu,
        Layout::Nchw,
    )
}

/// [`batchnorm_bwd`] on channels-last x, y, dy and dx (`[n * hw, c]`, NHWC): the partial
/// sums by `bn_bwd_partial_nhwc` (a block per chunk of pixels and tile of up to 256
/// channels, its threads along the channels: coalesced), in the NCHW kernel's layout, so
/// the same finalize and elementwise passes follow. Deterministic; the f64 sums run in
/// another order than the NCHW kernel's, so dgamma, dbeta and dx may differ from
/// [`batchnorm_bwd`]'s in their last bits. The caller checked the lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_bwd_nhwc(
    be: &CudaBackend,
    s: &BatchNorm2d,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    save_mean: &CudaSlice<f32>,
    save_invstd: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dgamma: &mut CudaSlice<f32>,
    dbeta: &mut CudaSlice<f32>,
    relu: bool,
) -> Result<()> {
    bwd(
        be,
        s,
        [x, y, dy, gamma, save_mean, save_invstd],
        dx,
        dgamma,
        dbeta,
        relu,
        Layout::Nhwc,
    )
}

/// [`batchnorm_bwd_nhwc`] with x and y in bf16 storage and dx written in bf16 storage
/// (rounded; `Layout::NhwcBf16`), dy f32: the same partial sums (`bn_bwd_partial_nhwc_bf16`),
/// finalize and elementwise pass (`bn_bwd_apply_bf16`). The caller checked the lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_bwd_nhwc_bf16(
    be: &CudaBackend,
    s: &BatchNorm2d,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    save_mean: &CudaSlice<f32>,
    save_invstd: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dgamma: &mut CudaSlice<f32>,
    dbeta: &mut CudaSlice<f32>,
    relu: bool,
) -> Result<()> {
    bwd(
        be,
        s,
        [x, y, dy, gamma, save_mean, save_invstd],
        dx,
        dgamma,
        dbeta,
        relu,
        Layout::NhwcBf16,
    )
}

/// The three above: the inputs x, y, dy, gamma, save_mean, save_invstd in that order.
#[allow(clippy::too_many_arguments)]
fn bwd(
    be: &CudaBackend,
    s: &BatchNorm2d,
    [x, y, dy, gamma, save_mean, save_invstd]: [&CudaSlice<f32>; 6],
    dx: &mut CudaSlice<f32>,
    dgamma: &mut CudaSlice<f32>,
    dbeta: &mut CudaSlice<f32>,
    relu: bool,
    layout: Layout,
) -> Result<()> {
    use crate::engine::Backend;
    if s.c == 0 {
        return Ok(());
    }
    if s.n * s.hw == 0 {
        be.fill(dgamma, 0.0)?;
        return be.fill(dbeta, 0.0);
    }
    let (red, per_c, split, chunk) = match layout {
        Layout::Nchw => reduction(be, "batchnorm_bwd", s)?,
        Layout::Nhwc | Layout::NhwcBf16 => {
            // Blocks of 256 threads over (chunk of pixels, tile of channels).
            let ct = nhwc_channel_tile(s.c);
            let tiles = s.c.div_ceil(ct);
            // A block reads `ct` values per pixel: at least 4096 values per block, as
            // `reduce_split` wants per channel.
            let count = s.n * s.hw;
            let (split, _) = be.reduce_split(count * ct, tiles);
            let chunk = count.div_ceil(split).max(1);
            let split = count.div_ceil(chunk).max(1);
            let red = blocks("batchnorm_bwd_nhwc", (split, tiles, 1), 256)?;
            let per_c = blocks("batchnorm_bwd_nhwc", (s.c.div_ceil(256), 1, 1), 256)?;
            (red, per_c, split, chunk)
        }
    };
    let mut part1 = be.take_scratch_f64(s.c * split)?;
    let mut part2 = be.take_scratch_f64(s.c * split)?;
    let mut stats = be.take_scratch_f64(2 * s.c)?;
    let r = (|| -> Result<()> {
        let [total, n, c, hw, chunk, split] = int_args([s.len(), s.n, s.c, s.hw, chunk, split])?;
        let [cnt, ct, apply_hw] =
            int_args([s.n * s.hw, nhwc_channel_tile(s.c), layout.kernel_hw(s)])?;
        let relu = relu as i32;
        let count = (s.n * s.hw) as f64;
        let k = kernels(be)?;
        let st = be.stream();
        // SAFETY: x, y, dy and dx hold n*c*hw values, the per-channel buffers c each (checked),
        // the partial sums one per (channel, split), `stats` two per channel.
        unsafe {
            match layout {
                Layout::Nchw => k
                    .bwd_partial
                    .on(st)
                    .arg(x)
                    .arg(y)
                    .arg(dy)
                    .arg(save_mean)
                    .arg(save_invstd)
                    .arg(&mut part1)
                    .arg(&mut part2)
                    .ints(&[n, c, hw, chunk, relu])
                    .launch(red)?,
                Layout::Nhwc | Layout::NhwcBf16 => (if layout == Layout::Nhwc {
                    &k.bwd_partial_nhwc
                } else {
                    &k.bwd_partial_nhwc_bf16
                })
                .on(st)
                .arg(x)
                .arg(y)
                .arg(dy)
                .arg(save_mean)
                .arg(save_invstd)
                .arg(&mut part1)
                .arg(&mut part2)
                .ints(&[cnt, c, ct, chunk, relu])
                .launch(red)?,
            }
            k.bwd_finalize
                .on(st)
                .arg(&part1)
                .arg(&part2)
                .arg(&mut stats)
                .arg(dgamma)
                .arg(dbeta)
                .ints(&[c, split])
                .launch(per_c)?;
            (if layout == Layout::NhwcBf16 {
                &k.bwd_apply_bf16
            } else {
                &k.bwd_apply
            })
            .on(st)
            .arg(x)
            .arg(y)
            .arg(dy)
            .arg(gamma)
            .arg(save_mean)
            .arg(save_invstd)
            .arg(&stats)
            .arg(dx)
            .ints(&[total, c, apply_hw])
            .arg(&count)
            .arg(&relu)
            .launch(grid(s.len()))
        }
    })();
    be.give_scratch_f64(part1);
    be.give_scratch_f64(part2);
    be.give_scratch_f64(stats);
    r
}
