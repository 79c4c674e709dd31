//! Channel slices on the device (`kernels/channels.cu`, mirroring `cpu/channels.rs`): the
//! U-Net's skip concatenation and, accumulating, its backward; and the layout changes
//! between channels-first and channels-last (a shared-memory tiled transpose per image,
//! coalesced both ways; nothing allocated, so capturable in a CUDA graph).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::{ChannelCopy, Transpose};
use crate::engine::Result;

kernels!("channels" {
    copy: "copy_channels",
    transpose: "transpose_tiles",
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
/// (as long as `src`: checked by the callers), in 32x32 tiles.
fn transpose(
    be: &CudaBackend,
    op: &'static str,
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
    // SAFETY: src and dst hold n * rows * cols values (checked by the trait's method).
    unsafe {
        kernels(be)?
            .transpose
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
    transpose(be, "nchw_to_nhwc", (s.n, s.c, s.hw), x, y)
}

/// `y[i, ch, p] = x[i, p, ch]`: channels-last to NCHW.
pub(crate) fn nhwc_to_nchw(
    be: &CudaBackend,
    s: &Transpose,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    transpose(be, "nhwc_to_nchw", (s.n, s.hw, s.c), x, y)
}
