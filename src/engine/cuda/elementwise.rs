//! Elementwise ops on device buffers (`kernels/elementwise.cu`, mirroring
//! `cpu/elementwise.rs`): fill, ReLU forward and backward, the residual join, in-place
//! add and scale; grid-stride launches over the buffer.

use cudarc::driver::CudaSlice;

use super::launch::{dim, grid, kernels};
use super::CudaBackend;
use crate::engine::{check_len, Result};

kernels!("elementwise" {
    fill: "fill_f32",
    relu_fwd: "relu_fwd",
    relu_bwd: "relu_bwd",
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
    check_len("relu_fwd", "y", y.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let n = dim(x.len())?;
    // SAFETY: x and y hold n elements.
    unsafe {
        kernels(be)?
            .relu_fwd
            .on(be.stream())
            .arg(x)
            .arg(y)
            .arg(&n)
            .launch(grid(x.len()))
    }
}

pub(crate) fn relu_bwd(
    be: &CudaBackend,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("relu_bwd", "dy", dy.len(), y.len())?;
    check_len("relu_bwd", "dx", dx.len(), y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    let n = dim(y.len())?;
    // SAFETY: y, dy and dx hold n elements.
    unsafe {
        kernels(be)?
            .relu_bwd
            .on(be.stream())
            .arg(y)
            .arg(dy)
            .arg(dx)
            .arg(&n)
            .launch(grid(y.len()))
    }
}

pub(crate) fn add_relu_fwd(
    be: &CudaBackend,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("add_relu_fwd", "b", b.len(), a.len())?;
    check_len("add_relu_fwd", "y", y.len(), a.len())?;
    if a.is_empty() {
        return Ok(());
    }
    let n = dim(a.len())?;
    // SAFETY: a, b and y hold n elements.
    unsafe {
        kernels(be)?
            .add_relu_fwd
            .on(be.stream())
            .arg(a)
            .arg(b)
            .arg(y)
            .arg(&n)
            .launch(grid(a.len()))
    }
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
