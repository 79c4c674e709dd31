//! Optimizer settings ([`OptimizerConfig`]) and the step over a [`ParamStore`] group with
//! the backend's fused `sgd_step` / `adam_step` (PyTorch semantics: L2 weight decay added to
//! the gradient, SGD momentum buffer seeded with the first gradient, bias-corrected Adam),
//! and on CUDA the same step as a captured graph holds it (`step_device`: the
//! step-dependent scalars read from device memory). Knows nothing about the topology.

use super::params::{ParamGroup, ParamStore};
use super::ModelError;
use crate::engine::cuda::graph::{adam_hyper, sgd_hyper, HYPER_LEN};
use crate::engine::cuda::CudaBackend;
use crate::engine::Backend;
use cudarc::driver::CudaSlice;
use serde::{Deserialize, Serialize};

/// PyTorch's SGD (with momentum) or Adam.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    },
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// The authors' stage-1 optimizer: SGD lr 1e-3, momentum 0.9.
    pub fn paper_sgd() -> Self {
        OptimizerConfig::Sgd {
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }
    /// Adam with PyTorch's defaults and the given learning rate.
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => *lr,
        }
    }
    /// The same optimizer with another learning rate (schedules).
    pub fn with_lr(&self, new_lr: f64) -> Self {
        let mut o = self.clone();
        match &mut o {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => *lr = new_lr,
        }
        o
    }
}

/// One optimizer step on every trainable tensor of `group`, from the gradients in the store.
pub(crate) fn step<B: Backend>(
    be: &B,
    store: &mut ParamStore<B>,
    opt: &OptimizerConfig,
    group: ParamGroup,
) -> Result<(), ModelError> {
    // A step without a training pass before it steps on zero gradients.
    store.ensure_grads(be, group)?;
    // The moments are allocated (zeroed) at the first step that needs them.
    let mut allocated = false;
    let r = (|| -> Result<(), ModelError> {
        for p in store.w.iter_mut() {
            if !group.contains(p.group) {
                continue;
            }
            let n = p.numel();
            let grad = super::params::grad_buf(&mut p.grad, &p.name)?;
            let grad = &*grad;
            let m = match p.m.take() {
                Some(m) => p.m.insert(m),
                None => {
                    allocated = true;
                    p.m.insert(be.zeros(n)?)
                }
            };
            match *opt {
                OptimizerConfig::Sgd {
                    lr,
                    momentum,
                    weight_decay,
                } => {
                    be.sgd_step(
                        &mut p.data,
                        grad,
                        m,
                        lr,
                        momentum,
                        weight_decay,
                        p.step == 0,
                    )?;
                }
                OptimizerConfig::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let v = match p.v.take() {
                        Some(v) => p.v.insert(v),
                        None => {
                            allocated = true;
                            p.v.insert(be.zeros(n)?)
                        }
                    };
                    be.adam_step(
                        &mut p.data,
                        grad,
                        m,
                        v,
                        p.step + 1,
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    )?;
                }
            }
            p.step += 1;
        }
        Ok(())
    })();
    if allocated {
        store.replaced();
    }
    r
}

/// The optimizer step of a captured CUDA graph: [`step`]'s updates with the step-dependent
/// scalars (learning rate, SGD's first step, Adam's bias corrections) read from `hyper`,
/// which holds [`HYPER_LEN`] values per tensor of the store, in store order, written by the
/// host before each replay ([`step_hyper`]); the step counts are advanced on the host after
/// each replay ([`advance_steps`]). The gradients and the moment buffers must exist (an
/// eager step made them: a capture allocates nothing).
pub(crate) fn step_device(
    be: &CudaBackend,
    store: &mut ParamStore<CudaBackend>,
    opt: &OptimizerConfig,
    group: ParamGroup,
    hyper: &CudaSlice<f32>,
) -> Result<(), ModelError> {
    for (i, p) in store.w.iter_mut().enumerate() {
        if !group.contains(p.group) {
            continue;
        }
        let missing = || {
            ModelError::Internal(format!(
                "the optimizer state of {} does not exist yet (run one eager step before capturing)",
                p.name
            ))
        };
        let at = i * HYPER_LEN;
        match *opt {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                ..
            } => {
                let m = p.m.as_mut().ok_or_else(missing)?;
                let g = super::params::grad_buf(&mut p.grad, &p.name)?;
                be.sgd_step_dev(&mut p.data, g, m, hyper, at, momentum, weight_decay)?;
            }
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                let (Some(m), Some(v), Some(g)) = (p.m.as_mut(), p.v.as_mut(), p.grad.as_ref())
                else {
                    return Err(missing());
                };
                be.adam_step_dev(
                    &mut p.data,
                    g,
                    m,
                    v,
                    hyper,
                    at,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                )?;
            }
        }
    }
    Ok(())
}

/// The device scalars of the next [`step_device`] for `opt` (its learning rate) and every
/// tensor's step count, [`HYPER_LEN`] per tensor of the store (zeros outside `group`).
pub(crate) fn step_hyper<B: Backend>(
    store: &ParamStore<B>,
    opt: &OptimizerConfig,
    group: ParamGroup,
) -> Vec<f32> {
    let mut h = vec![0f32; store.w.len() * HYPER_LEN];
    for (i, p) in store.w.iter().enumerate() {
        if !group.contains(p.group) {
            continue;
        }
        let v = tensor_hyper(opt, p.step);
        h[i * HYPER_LEN..(i + 1) * HYPER_LEN].copy_from_slice(&v);
    }
    h
}

/// The device scalars of the next step of one tensor that has taken `steps` steps.
pub(crate) fn tensor_hyper(opt: &OptimizerConfig, steps: u64) -> [f32; HYPER_LEN] {
    match *opt {
        OptimizerConfig::Sgd { lr, .. } => sgd_hyper(lr, steps == 0),
        OptimizerConfig::Adam {
            lr, beta1, beta2, ..
        } => adam_hyper(steps + 1, lr, beta1, beta2),
    }
}

/// Counts one step on every trainable tensor of `group` (what [`step`] does after its update).
pub(crate) fn advance_steps<B: Backend>(store: &mut ParamStore<B>, group: ParamGroup) {
    for p in store.w.iter_mut().filter(|p| group.contains(p.group)) {
        p.step += 1;
    }
}
