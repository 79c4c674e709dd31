//! Convolutions on the device (`kernels/conv.cu`, mirroring `cpu/conv.rs`): implicit-GEMM
//! forward, data gradient and weight gradient (split over the reduction when the output
//! tiles alone would not fill the GPU, the splits summed by a second kernel).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::Conv2d;
use crate::engine::{Backend, Result};

kernels!("conv" {
    fwd: "conv2d_fwd",
    bwd_data: "conv2d_bwd_data",
    bwd_weight: "conv2d_bwd_weight",
    splitk_reduce: "conv_splitk_reduce",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.conv.get(|| Kernels::load(be.modules()))
}

/// The `int` arguments the three convolution kernels share, in their order (and the
/// buffers' total sizes checked against the 32-bit indexing).
fn geometry(s: &Conv2d) -> Result<[i32; 11]> {
    int_args([s.y_len(), s.x_len(), s.w_len()])?;
    int_args([
        s.n,
        s.c_in,
        s.h,
        s.w,
        s.c_out,
        s.kh,
        s.kw,
        s.stride,
        s.pad,
        s.out_h(),
        s.out_w(),
    ])
}

pub(crate) fn conv2d_fwd(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let p = s.n * s.out_h() * s.out_w();
    if p == 0 || s.c_out == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    let cfg = blocks("conv2d_fwd", (p.div_ceil(64), s.c_out.div_ceil(64), 1), 256)?;
    // SAFETY: x, w and y hold the lengths `s` gives (checked); the kernel indexes them so.
    unsafe {
        kernels(be)?
            .fwd
            .on(be.stream())
            .arg(x)
            .arg(w)
            .arg(y)
            .ints(&g)
            .launch(cfg)
    }
}

pub(crate) fn conv2d_bwd_data(
    be: &CudaBackend,
    s: &Conv2d,
    dy: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let p = s.n * s.h * s.w;
    if p == 0 || s.c_in == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    let cfg = blocks(
        "conv2d_bwd_data",
        (p.div_ceil(64), s.c_in.div_ceil(64), 1),
        256,
    )?;
    // SAFETY: dy, w and dx hold the lengths `s` gives (checked).
    unsafe {
        kernels(be)?
            .bwd_data
            .on(be.stream())
            .arg(dy)
            .arg(w)
            .arg(dx)
            .ints(&g)
            .launch(cfg)
    }
}

pub(crate) fn conv2d_bwd_weight(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "conv2d_bwd_weight";
    let g = geometry(s)?;
    let nc = s.c_in * s.kh * s.kw;
    let k = s.n * s.out_h() * s.out_w();
    if nc == 0 || s.c_out == 0 {
        return Ok(());
    }
    if k == 0 {
        return be.fill(dw, 0.0);
    }
    // Split the reduction over batch*OH*OW so that the grid fills the GPU; each split
    // covers at least 256 pixels.
    let tiles = s.c_out.div_ceil(64) * nc.div_ceil(64);
    let target = 4 * be.info().multiprocessors.max(1) as usize;
    let max_splits = (k / 256).clamp(1, 65_535);
    let want = target.div_ceil(tiles).clamp(1, max_splits);
    let chunk = k.div_ceil(want).div_ceil(16) * 16;
    let splits = k.div_ceil(chunk);
    let cfg = blocks(OP, (nc.div_ceil(64), s.c_out.div_ceil(64), splits), 256)?;
    let chunk = dim(chunk)?;
    let ks = kernels(be)?;
    if splits == 1 {
        // SAFETY: x and dy hold the lengths `s` gives, dw one weight tensor (checked).
        return unsafe {
            ks.bwd_weight
                .on(be.stream())
                .arg(x)
                .arg(dy)
                .arg(dw)
                .ints(&g)
                .arg(&chunk)
                .launch(cfg)
        };
    }
    let mut ws = be.alloc::<f32>(splits * s.w_len())?;
    // SAFETY: as above, ws holding one weight tensor per split.
    unsafe {
        ks.bwd_weight
            .on(be.stream())
            .arg(x)
            .arg(dy)
            .arg(&mut ws)
            .ints(&g)
            .arg(&chunk)
            .launch(cfg)?;
    }
    let (splits, len) = (dim(splits)?, dim(s.w_len())?);
    // SAFETY: ws holds `splits` tensors of `len` weights, dw one.
    unsafe {
        ks.splitk_reduce
            .on(be.stream())
            .arg(&ws)
            .arg(dw)
            .arg(&splits)
            .arg(&len)
            .launch(grid(s.w_len()))
    }
}
