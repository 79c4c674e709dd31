//! Optimizer steps on the device (`kernels/optim.cu`, mirroring `cpu/optim.rs`): PyTorch's
//! SGD with momentum and Adam, fused per tensor.

use cudarc::driver::CudaSlice;

use super::launch::{dim, grid, kernels};
use super::CudaBackend;
use crate::engine::shapes::{check_adam, check_sgd};
use crate::engine::Result;

kernels!("optim" {
    sgd: "sgd_step",
    adam: "adam_step",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.optim.get(|| Kernels::load(be.modules()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_step(
    be: &CudaBackend,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    first_step: bool,
) -> Result<()> {
    check_sgd(p.len(), g.len(), m.len())?;
    if p.is_empty() {
        return Ok(());
    }
    let (n, cfg) = (dim(p.len())?, grid(p.len()));
    let scalars = [lr as f32, momentum as f32, weight_decay as f32];
    let first = first_step as i32;
    // SAFETY: p, g and m hold n values (checked).
    unsafe {
        kernels(be)?
            .sgd
            .on(be.stream())
            .arg(p)
            .arg(g)
            .arg(m)
            .arg(&scalars[0])
            .arg(&scalars[1])
            .arg(&scalars[2])
            .arg(&first)
            .arg(&n)
            .launch(cfg)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_step(
    be: &CudaBackend,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    step: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> Result<()> {
    check_adam(p.len(), g.len(), m.len(), v.len(), step)?;
    if p.is_empty() {
        return Ok(());
    }
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - beta1.powi(t);
    let bc2 = 1.0 - beta2.powi(t);
    let scalars = [
        beta1 as f32,
        beta2 as f32,
        eps as f32,
        weight_decay as f32,
        (lr / bc1) as f32,
        bc2.sqrt() as f32,
    ];
    let (n, cfg) = (dim(p.len())?, grid(p.len()));
    let mut l = kernels(be)?.adam.on(be.stream());
    l.arg(p).arg(g).arg(m).arg(v);
    for s in &scalars {
        l.arg(s);
    }
    // SAFETY: p, g, m and v hold n values (checked).
    unsafe { l.arg(&n).launch(cfg) }
}
