//! Optimizer steps on the device (`kernels/optim.cu`, mirroring `cpu/optim.rs`): PyTorch's
//! SGD with momentum and Adam, fused per tensor. Also their `*_dev` forms, CUDA-only, which
//! read the step-dependent scalars (learning rate, first step, Adam's bias corrections) from
//! a device buffer the host writes before each replay of a captured CUDA graph, with the
//! same arithmetic ([`sgd_hyper`], [`adam_hyper`] compute those scalars for both forms).

use cudarc::driver::CudaSlice;

use super::launch::{dim, grid, kernels};
use super::CudaBackend;
use crate::engine::shapes::{check_adam, check_sgd};
use crate::engine::Result;

kernels!("optim" {
    sgd: "sgd_step",
    adam: "adam_step",
    sgd_dev: "sgd_step_dev",
    adam_dev: "adam_step_dev",
});

/// Values per tensor in the device scalars of `sgd_step_dev` / `adam_step_dev`.
pub const HYPER_LEN: usize = 2;

/// SGD's step-dependent scalars as `sgd_step_dev` reads them: {lr, first step}.
pub fn sgd_hyper(lr: f64, first_step: bool) -> [f32; HYPER_LEN] {
    [lr as f32, if first_step { 1.0 } else { 0.0 }]
}

/// Adam's step-dependent scalars for step `step` (from 1), in f64 on the host as PyTorch
/// computes them: {lr / (1 - beta1^t), sqrt(1 - beta2^t)}.
pub fn adam_hyper(step: u64, lr: f64, beta1: f64, beta2: f64) -> [f32; HYPER_LEN] {
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - beta1.powi(t);
    let bc2 = 1.0 - beta2.powi(t);
    [(lr / bc1) as f32, bc2.sqrt() as f32]
}

/// A view of `HYPER_LEN` values of the device scalars, or a shape error.
fn hyper_view<'a>(
    op: &'static str,
    hyper: &'a CudaSlice<f32>,
    at: usize,
) -> Result<cudarc::driver::CudaView<'a, f32>> {
    hyper
        .try_slice(at..at + HYPER_LEN)
        .ok_or_else(|| crate::engine::EngineError::Shape {
            op,
            detail: format!(
                "device scalars at {at}..{} of a buffer of {}",
                at + HYPER_LEN,
                hyper.len()
            ),
        })
}

/// [`sgd_step`] with {lr, first step} read from `hyper[at..at + 2]` on the device.
#[allow(clippy::too_many_arguments)]
pub fn sgd_step_dev(
    be: &CudaBackend,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    hyper: &CudaSlice<f32>,
    at: usize,
    momentum: f64,
    weight_decay: f64,
) -> Result<()> {
    check_sgd(p.len(), g.len(), m.len())?;
    let h = hyper_view("sgd_step_dev", hyper, at)?;
    if p.is_empty() {
        return Ok(());
    }
    let (n, cfg) = (dim(p.len())?, grid(p.len()));
    let scalars = [momentum as f32, weight_decay as f32];
    // SAFETY: p, g and m hold n values (checked), h two.
    unsafe {
        kernels(be)?
            .sgd_dev
            .on(be.stream())
            .arg(p)
            .arg(g)
            .arg(m)
            .arg(&h)
            .arg(&scalars[0])
            .arg(&scalars[1])
            .arg(&n)
            .launch(cfg)
    }
}

/// [`adam_step`] with {step size, sqrt of the second bias correction} read from
/// `hyper[at..at + 2]` on the device ([`adam_hyper`]).
#[allow(clippy::too_many_arguments)]
pub fn adam_step_dev(
    be: &CudaBackend,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    hyper: &CudaSlice<f32>,
    at: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> Result<()> {
    check_adam(p.len(), g.len(), m.len(), v.len(), 1)?;
    let h = hyper_view("adam_step_dev", hyper, at)?;
    if p.is_empty() {
        return Ok(());
    }
    let scalars = [beta1 as f32, beta2 as f32, eps as f32, weight_decay as f32];
    let (n, cfg) = (dim(p.len())?, grid(p.len()));
    let mut l = kernels(be)?.adam_dev.on(be.stream());
    l.arg(p).arg(g).arg(m).arg(v).arg(&h);
    for s in &scalars {
        l.arg(s);
    }
    // SAFETY: p, g, m and v hold n values (checked), h two.
    unsafe { l.arg(&n).launch(cfg) }
}

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
    let [step_size, bc2_sqrt] = adam_hyper(step, lr, beta1, beta2);
    let scalars = [
        beta1 as f32,
        beta2 as f32,
        eps as f32,
        weight_decay as f32,
        step_size,
        bc2_sqrt,
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
