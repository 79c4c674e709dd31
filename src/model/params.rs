//! The named parameter store: every tensor of the network in PyTorch's `state_dict` order
//! and names (`conv1.weight`, `layer2.0.downsample.1.running_var`, `lstm.weight_ih_l0`,
//! `head.2.bias`, `fc.weight`), with its shape, its buffer on the backend, a gradient buffer
//! for trainables and the optimizer state; trainables vs running-stat buffers, and the
//! group each belongs to (backbone, LSTM + head, fc) so stage 2 can train only the fc.
//! Also the torchvision / PyTorch default initialisation from a seed.
//! Knows nothing about the topology beyond names and shapes.

use super::ModelError;
use crate::engine::{Backend, Real};
use crate::rng::Rng;
use std::collections::HashMap;

/// A learnable tensor or a running statistic (saved, never trained).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Trainable,
    /// BN running mean/var: updated by training-mode forwards, no gradient.
    Buffer,
}

/// Which part of the network a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// The ResNet (stem, stages, their BN).
    Backbone,
    /// The stage-1 LSTM and its 128-64-1 head.
    Sequence,
    /// The stage-2 single-slice head.
    Fc,
}

/// The set of tensors an optimizer step updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamGroup {
    /// Stage 1: backbone + LSTM + head (not fc).
    Stage1,
    /// Stage 2: only `fc.weight`, `fc.bias`.
    Fc,
}

impl ParamGroup {
    pub fn contains(self, g: Group) -> bool {
        match self {
            ParamGroup::Stage1 => g != Group::Fc,
            ParamGroup::Fc => g == Group::Fc,
        }
    }
}

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2/fan_out).
    KaimingConvFanOut,
    /// uniform(-bound, bound): nn.Linear's and nn.LSTM's defaults.
    Uniform(f64),
    Constant(f64),
}

/// One tensor and its training state.
pub struct Param<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    pub group: Group,
    pub(crate) data: B::Buf,
    /// Allocated for trainables; overwritten by every backward pass.
    pub(crate) grad: Option<B::Buf>,
    /// SGD momentum buffer or Adam's first moment; allocated on the first step.
    pub(crate) m: Option<B::Buf>,
    /// Adam's second moment.
    pub(crate) v: Option<B::Buf>,
    /// Optimizer steps taken (Adam's bias correction; 0 = SGD's first step).
    pub(crate) step: u64,
}

impl<B: Backend> Param<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn data(&self) -> &B::Buf {
        &self.data
    }
    pub fn grad(&self) -> Option<&B::Buf> {
        self.grad.as_ref()
    }
    pub fn steps(&self) -> u64 {
        self.step
    }
}

/// All tensors in `state_dict` order, looked up by name.
pub struct ParamStore<B: Backend> {
    pub(crate) params: Vec<Param<B>>,
    index: HashMap<String, usize>,
}

impl<B: Backend> Default for ParamStore<B> {
    fn default() -> Self {
        ParamStore {
            params: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<B: Backend> ParamStore<B> {
    /// Appends a tensor initialised from `seed` (one independent stream per tensor) and
    /// returns its index.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        be: &B,
        name: String,
        shape: Vec<usize>,
        kind: ParamKind,
        group: Group,
        init: Init,
        seed: u64,
    ) -> Result<usize, ModelError> {
        let idx = self.params.len();
        let numel: usize = shape.iter().product();
        let mut rng = Rng::stream(seed, idx as u64);
        let host: Vec<B::T> = match init {
            Init::KaimingConvFanOut => {
                // fan_out = c_out * kh * kw (dims 0, 2, 3 of [c_out, c_in, kh, kw]).
                let fan_out: usize = shape[0] * shape[2..].iter().product::<usize>();
                let std = (2.0 / fan_out as f64).sqrt();
                (0..numel)
                    .map(|_| B::T::from_f64_lossy(std * rng.normal()))
                    .collect()
            }
            Init::Uniform(b) => (0..numel)
                .map(|_| B::T::from_f64_lossy(rng.range(-b, b)))
                .collect(),
            Init::Constant(c) => vec![B::T::from_f64_lossy(c); numel],
        };
        let data = be.upload(&host)?;
        let grad = match kind {
            ParamKind::Trainable => Some(be.zeros(numel)?),
            ParamKind::Buffer => None,
        };
        if self.index.insert(name.clone(), idx).is_some() {
            return Err(ModelError::Internal(format!(
                "parameter {name} declared twice"
            )));
        }
        self.params.push(Param {
            name,
            shape,
            kind,
            group,
            data,
            grad,
            m: None,
            v: None,
            step: 0,
        });
        Ok(idx)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Param<B>> {
        self.params.iter()
    }
    pub fn index_of(&self, name: &str) -> Result<usize, ModelError> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| ModelError::UnknownParam(name.to_string()))
    }
    pub fn get(&self, name: &str) -> Result<&Param<B>, ModelError> {
        Ok(&self.params[self.index_of(name)?])
    }
    pub fn get_mut(&mut self, name: &str) -> Result<&mut Param<B>, ModelError> {
        let i = self.index_of(name)?;
        Ok(&mut self.params[i])
    }
    pub fn names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }
    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .map(|p| p.numel())
            .sum()
    }

    /// Overwrites a tensor's values (host data of exactly its element count).
    pub fn set(&mut self, be: &B, name: &str, values: &[B::T]) -> Result<(), ModelError> {
        let p = self.get_mut(name)?;
        if values.len() != p.numel() {
            return Err(ModelError::ParamLen {
                name: name.to_string(),
                shape: p.shape.clone(),
                found: values.len(),
            });
        }
        p.data = be.upload(values)?;
        Ok(())
    }
}
