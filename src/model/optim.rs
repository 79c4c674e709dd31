//! Optimizer settings ([`OptimizerConfig`]) and the step over a [`ParamStore`] group with
//! the backend's fused `sgd_step` / `adam_step` (PyTorch semantics: L2 weight decay added to
//! the gradient, SGD momentum buffer seeded with the first gradient, bias-corrected Adam).
//! Knows nothing about the topology.

use super::params::{ParamGroup, ParamStore};
use super::ModelError;
use crate::engine::Backend;
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
    for p in store.w.iter_mut() {
        if !group.contains(p.group) {
            continue;
        }
        let n = p.numel();
        let grad = &p.grad;
        let m = match p.m.take() {
            Some(m) => p.m.insert(m),
            None => p.m.insert(be.zeros(n)?),
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
                    None => p.v.insert(be.zeros(n)?),
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
}
