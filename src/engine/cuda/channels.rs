//! Channel slices on the device (`kernels/channels.cu`, mirroring `cpu/channels.rs`): the
//! U-Net's skip concatenation and, accumulating, its backward; and the layout changes
//! between channels-first and channels-last (a shared-memory tiled transpose per image,
//! coalesced both ways; nothing allocated, so capturable in a CUDA graph), and their forms
//! into and out of bf16 storage (`precision::ActStorage::Bf16`: two values per f32 slot),
//! with the plain conversions between f32 and bf16 storage ([`pack_bf16`], [`unpack_bf16`]).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, grid, int_args, kernels, Kernel};
use super::CudaBackend;
use crate::engine::shapes::{check_lens, ChannelCopy, Transpose};
use crate::engine::Result;

kernels!("channels" {
    copy: "copy_channels",
    transpose: "transpose_tiles",
    to_bf16: "transpose_tiles_to_bf16",
    from_bf16: "transpose_tiles_from_bf16",
    pack: "pack_bf16",
    unpack: "unpack_bf16",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.channels.get(|| Kernels::load(be.modules()))
}

pub(crate) fn copy_channels(
    be: &CudaBackend,
    s: &ChannelCopy,
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    int_args([s.src_len(), s.dst_len()])?;
    let total = s.n * s.c * s.hw;
    if total == 0 {
        return Ok(());
    }
    let a = int_args([
        s.n,
        s.c,
        s.hw,
        s.src_channels,
        s.src_offset,
        s.dst_channels,
        s.dst_offset,
        accumulate as usize,
    ])?;
    // SAFETY: src and dst hold the lengths `s` gives, the slices inside them (checked).
    unsafe {
        kernels(be)?
            .copy
            .on(be.stream())
            .arg(src)
            .arg(dst)
            .ints(&a)
            .launch(grid(total))
    }
}

/// The most blocks of [`transpose`]'s grid in x and y (its kernel strides over the rest).
const TRANSPOSE_GRID: usize = 4096;

/// Per image `dst[j, i] = src[i, j]` for `src` `[n, rows, cols]`, `dst` `[n, cols, rows]`
/// (as many values as `src`, in f32 or bf16 storage as `kernel` reads and writes them:
/// checked by the callers), in 32x32 tiles.
fn transpose(
    be: &CudaBackend,
    op: &'static str,
    kernel: fn(&Kernels) -> &Kernel,
    (n, rows, cols): (usize, usize, usize),
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    if n == 0 || rows == 0 || cols == 0 {
        return Ok(());
    }
    // Offsets are 64-bit in the kernel; the sizes are ints, and so are the tile bounds
    // (up to 31 past them).
    let a = int_args([n, rows, cols])?;
    int_args([rows + 31, cols + 31])?;
    let cfg = blocks(
        op,
        (
            cols.div_ceil(32).min(TRANSPOSE_GRID),
            rows.div_ceil(32).min(TRANSPOSE_GRID),
            n.min(65_535),
        ),
        256,
    )?;
    // SAFETY: src and dst hold n * rows * cols values in the storage the kernel reads and
    // writes (checked by the trait's method).
    unsafe {
        kernel(kernels(be)?)
            .on(be.stream())
            .arg(src)
            .arg(dst)
            .ints(&a)
            .launch(cfg)
    }
}

/// `y[i, p, ch] = x[i, ch, p]`: NCHW to channels-last.
pub(crate) fn nchw_to_nhwc(
    be: &CudaBackend,
    s: &Transpose,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    transpose(be, "nchw_to_nhwc", |k| &k.transpose, (s.n, s.c, s.hw), x, y)
}

/// `y[i, ch, p] = x[i, p, ch]`: channels-last to NCHW.
pub(crate) fn nhwc_to_nchw(
    be: &CudaBackend,
    s: &Transpose,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    transpose(be, "nhwc_to_nchw", |k| &k.transpose, (s.n, s.hw, s.c), x, y)
}

/// [`nchw_to_nhwc`] into bf16 storage (y: `n * c * hw` values in half as many slots,
/// rounded to nearest even).
pub(crate) fn nchw_to_nhwc_bf16(
    be: &CudaBackend,
    s: &Transpose,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    transpose(
        be,
        "nchw_to_nhwc_bf16",
        |k| &k.to_bf16,
        (s.n, s.c, s.hw),
        x,
        y,
    )
}

/// [`nhwc_to_nchw`] out of bf16 storage (x: `n * c * hw` values in half as many slots).
pub(crate) fn nhwc_bf16_to_nchw(
    be: &CudaBackend,
    s: &Transpose,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    transpose(
        be,
        "nhwc_bf16_to_nchw",
        |k| &k.from_bf16,
        (s.n, s.hw, s.c),
        x,
        y,
    )
}

/// `len` f32 values of `src` into bf16 storage `dst` (`len.div_ceil(2)` slots; rounded to
/// nearest even; an odd length's last high half 0). Lengths checked here.
pub(crate) fn pack_bf16(
    be: &CudaBackend,
    len: usize,
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    convert(
        be,
        "pack_bf16",
        |k| &k.pack,
        (len, len.div_ceil(2)),
        src,
        dst,
    )
}

/// `len` values in bf16 storage `src` (`len.div_ceil(2)` slots) into f32 `dst`, exactly.
/// Lengths checked here.
pub(crate) fn unpack_bf16(
    be: &CudaBackend,
    len: usize,
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    convert(
        be,
        "unpack_bf16",
        |k| &k.unpack,
        (len.div_ceil(2), len),
        src,
        dst,
    )
}

/// A grid-stride conversion of `len` values between f32 and bf16 storage (`src`, `dst` of
/// `lens` slots, checked), a thread per slot of the bf16 side.
fn convert(
    be: &CudaBackend,
    op: &'static str,
    kernel: fn(&Kernels) -> &Kernel,
    (src_len, dst_len): (usize, usize),
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    check_lens(
        op,
        &[("src", src.len(), src_len), ("dst", dst.len(), dst_len)],
    )?;
    let len = src_len.max(dst_len);
    if len == 0 {
        return Ok(());
    }
    let values = len as u64;
    // SAFETY: the lengths are checked above; the kernel indexes below `len` values.
    unsafe {
        kernel(kernels(be)?)
            .on(be.stream())
            .arg(src)
            .arg(dst)
            .arg(&values)
            .launch(grid(src_len.min(dst_len)))
    }
}
