//! Pooling on the device (`kernels/pool.cu`, mirroring `cpu/pool.rs`): max pooling forward
//! and backward (the gradient to the first maximum of each window), global average pooling
//! (one warp per row) and its backward.

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::Pool2d;
use crate::engine::Result;

kernels!("pool" {
    max_fwd: "maxpool2d_fwd",
    max_bwd: "maxpool2d_bwd",
    gap_fwd: "gap_fwd",
    gap_bwd: "gap_bwd",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.pool.get(|| Kernels::load(be.modules()))
}

/// The `int` arguments of the max-pooling kernels, in their order.
fn window(s: &Pool2d) -> Result<[i32; 8]> {
    int_args([s.x_len(), s.y_len()])?;
    int_args([
        s.n * s.c,
        s.h,
        s.w,
        s.k,
        s.stride,
        s.pad,
        s.out_h(),
        s.out_w(),
    ])
}

pub(crate) fn maxpool2d_fwd(
    be: &CudaBackend,
    s: &Pool2d,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    if s.y_len() == 0 {
        return Ok(());
    }
    let a = window(s)?;
    // SAFETY: x and y hold the lengths `s` gives (checked).
    unsafe {
        kernels(be)?
            .max_fwd
            .on(be.stream())
            .arg(x)
            .arg(y)
            .ints(&a)
            .launch(grid(s.y_len()))
    }
}

pub(crate) fn maxpool2d_bwd(
    be: &CudaBackend,
    s: &Pool2d,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    if s.x_len() == 0 {
        return Ok(());
    }
    let a = window(s)?;
    // SAFETY: x, y, dy and dx hold the lengths `s` gives (checked).
    unsafe {
        kernels(be)?
            .max_bwd
            .on(be.stream())
            .arg(x)
            .arg(y)
            .arg(dy)
            .arg(dx)
            .ints(&a)
            .launch(grid(s.x_len()))
    }
}

pub(crate) fn global_avg_pool_fwd(
    be: &CudaBackend,
    rows: usize,
    hw: usize,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    dim(rows * hw)?;
    // One warp per row.
    let cfg = blocks(
        "global_avg_pool_fwd",
        ((rows * 32).div_ceil(256), 1, 1),
        256,
    )?;
    let a = int_args([rows, hw])?;
    // SAFETY: x holds rows*hw values and y rows (checked).
    unsafe {
        kernels(be)?
            .gap_fwd
            .on(be.stream())
            .arg(x)
            .arg(y)
            .ints(&a)
            .launch(cfg)
    }
}

pub(crate) fn global_avg_pool_bwd(
    be: &CudaBackend,
    rows: usize,
    hw: usize,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    dim(rows * hw)?;
    let a = int_args([rows, hw])?;
    // SAFETY: dy holds rows values and dx rows*hw (checked).
    unsafe {
        kernels(be)?
            .gap_bwd
            .on(be.stream())
            .arg(dy)
            .arg(dx)
            .ints(&a)
            .launch(grid(rows * hw))
    }
}
