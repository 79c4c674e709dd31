//! Elementwise ops on device buffers (`kernels/elementwise.cu`, mirroring
//! `cpu/elementwise.rs`): fill, ReLU forward and backward (the backward also on y in bf16
//! storage), the residual join, in-place
//! add and scale; grid-stride launches over the buffer.

use cudarc::driver::CudaSlice;

use super::launch::{dim, grid, kernels, map1, map2};
use super::CudaBackend;
use crate::engine::{check_len, Result};

kernels!("elementwise" {
    fill: "fill_f32",
    relu_fwd: "relu_fwd",
    relu_bwd: "relu_bwd",
    relu_bwd_bf16: "relu_bwd_bf16",
    add_relu_fwd: "add_relu_fwd",
    add_assign: "add_assign",
    scale_assign: "scale_assign",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.elementwise.get(|| Kernels::load(be.modules()))
}

/// y = value everywhere.
pub(crate) fn fill(be: &CudaBackend, y: &mut CudaSlice<f32>, value: f32) -> Result<()> {
    if y.is_empty() {
        return Ok(());
    }
    let n = dim(y.len())?;
    let cfg = grid(y.len());
    // SAFETY: the kernel writes y[0..n], y's whole length.
    unsafe {
        kernels(be)?
            .fill
            .on(be.stream())
            .arg(y)
            .arg(&value)
            .arg(&n)
            .launch(cfg)
    }
}

pub(crate) fn relu_fwd(be: &CudaBackend, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    map1(be.stream(), "relu_fwd", &kernels(be)?.relu_fwd, x, y)
}

pub(crate) fn relu_bwd(
    be: &CudaBackend,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    map2(be.stream(), "relu_bwd", &kernels(be)?.relu_bwd, y, dy, dx)
}

/// [`relu_bwd`] with y in bf16 storage (`dx.len().div_ceil(2)` slots), dy and dx f32.
/// Lengths checked here.
pub(crate) fn relu_bwd_bf16(
    be: &CudaBackend,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("relu_bwd_bf16", "dy", dy.len(), dx.len())?;
    check_len("relu_bwd_bf16", "y", y.len(), dx.len().div_ceil(2))?;
    if dx.is_empty() {
        return Ok(());
    }
    let n = dim(dx.len())?;
    let cfg = grid(dx.len());
    // SAFETY: the kernel reads n values of y (n.div_ceil(2) slots) and of dy, writes n of dx.
    unsafe {
        kernels(be)?
            .relu_bwd_bf16
            .on(be.stream())
            .arg(y)
            .arg(dy)
            .arg(dx)
            .arg(&n)
            .launch(cfg)
    }
}

pub(crate) fn add_relu_fwd(
    be: &CudaBackend,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    map2(
        be.stream(),
        "add_relu_fwd",
        &kernels(be)?.add_relu_fwd,
        a,
        b,
        y,
    )
}

pub(crate) fn add_assign(
    be: &CudaBackend,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
) -> Result<()> {
    check_len("add_assign", "x", x.len(), y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    let (n, cfg) = (dim(y.len())?, grid(y.len()));
    // SAFETY: y and x hold n elements.
    unsafe {
        kernels(be)?
            .add_assign
            .on(be.stream())
            .arg(y)
            .arg(x)
            .arg(&n)
            .launch(cfg)
    }
}

pub(crate) fn scale_assign(be: &CudaBackend, y: &mut CudaSlice<f32>, alpha: f64) -> Result<()> {
    if y.is_empty() {
        return Ok(());
    }
    let (n, cfg, alpha) = (dim(y.len())?, grid(y.len()), alpha as f32);
    // SAFETY: y holds n elements.
    unsafe {
        kernels(be)?
            .scale_assign
            .on(be.stream())
            .arg(y)
            .arg(&alpha)
            .arg(&n)
            .launch(cfg)
    }
}
