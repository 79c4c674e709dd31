//! The named parameter store: every tensor of the network in PyTorch's `state_dict` order
//! and names (`conv1.weight`, `layer2.0.downsample.1.running_var`, `lstm.weight_ih_l0`,
//! `head.2.bias`, `fc.weight`), with its shape, its buffer on the backend and the group it
//! belongs to (backbone, LSTM + head, fc: stage 2 trains only the fc). Trainables (each
//! with its gradient and its optimizer state, both allocated on their first training use,
//! so that a model used only for inference holds neither) and running statistics (no
//! gradient) are two lists addressed by typed indices (`W`, `S`), so a network never looks
//! for a gradient that is not there. The store counts every replacement or allocation of a
//! buffer ([`ParamStore::generation`]): a CUDA graph captured before holds stale addresses.
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

/// A trainable tensor's place in the store (its index among the trainables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct W(pub usize);

/// A running statistic's place in the store (its index among the statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct S(pub usize);

/// A trainable tensor, its gradient (overwritten by every backward pass) and its optimizer
/// state.
pub(crate) struct Trainable<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub group: Group,
    pub data: B::Buf,
    /// Allocated zeroed on the first training use of the tensor's group
    /// ([`ParamStore::ensure_grads`]); `None` reads as zeros.
    pub grad: Option<B::Buf>,
    /// SGD momentum buffer or Adam's first moment; allocated on the first step.
    pub m: Option<B::Buf>,
    /// Adam's second moment.
    pub v: Option<B::Buf>,
    /// Optimizer steps taken (Adam's bias correction; 0 = SGD's first step).
    pub step: u64,
}

impl<B: Backend> Trainable<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A trainable's gradient buffer, which the training pass that writes it has allocated
/// ([`ParamStore::ensure_grads`]): its absence is an internal error.
pub(crate) fn grad_buf<'a, T>(
    grad: &'a mut Option<T>,
    name: &str,
) -> Result<&'a mut T, ModelError> {
    grad.as_mut()
        .ok_or_else(|| ModelError::Internal(format!("the gradient of {name} was not allocated")))
}

/// A batch-norm running statistic: saved, updated by training-mode forwards, never trained.
pub(crate) struct Stat<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub group: Group,
    pub data: B::Buf,
}

/// Where a named tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    W(usize),
    S(usize),
}

/// A view of one tensor of the store.
pub struct Param<'a, B: Backend> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub kind: ParamKind,
    pub group: Group,
    pub data: &'a B::Buf,
    /// The gradient (trainables only, once a training pass of its group allocated it).
    pub grad: Option<&'a B::Buf>,
    /// Optimizer steps taken (0 for statistics).
    pub steps: u64,
}

impl<B: Backend> Param<'_, B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// All tensors: the trainables and the running statistics, each in its own list (the
/// networks address them by `W` and `S`), walked in `state_dict` order and looked up by
/// name.
pub struct ParamStore<B: Backend> {
    pub(crate) w: Vec<Trainable<B>>,
    pub(crate) s: Vec<Stat<B>>,
    order: Vec<Slot>,
    index: HashMap<String, Slot>,
    /// Counts the times a buffer of the store was replaced or allocated ([`ParamStore::generation`]).
    generation: u64,
}

impl<B: Backend> Default for ParamStore<B> {
    fn default() -> Self {
        ParamStore {
            w: Vec::new(),
            s: Vec::new(),
            order: Vec::new(),
            index: HashMap::new(),
            generation: 0,
        }
    }
}

impl<B: Backend> ParamStore<B> {
    /// The initial values of the next tensor (one independent stream of `seed` per tensor,
    /// numbered in `state_dict` order).
    fn init(&self, shape: &[usize], init: Init, seed: u64) -> Vec<B::T> {
        let numel: usize = shape.iter().product();
        let mut rng = Rng::stream(seed, self.order.len() as u64);
        match init {
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
        }
    }

    fn name(&mut self, name: &str, slot: Slot) -> Result<(), ModelError> {
        if self.index.insert(name.to_string(), slot).is_some() {
            return Err(ModelError::Internal(format!(
                "parameter {name} declared twice"
            )));
        }
        self.order.push(slot);
        Ok(())
    }

    /// Appends a trainable tensor initialised from `seed` (no gradient yet).
    pub(crate) fn add_trainable(
        &mut self,
        be: &B,
        name: String,
        shape: Vec<usize>,
        group: Group,
        init: Init,
        seed: u64,
    ) -> Result<W, ModelError> {
        let data = be.upload(&self.init(&shape, init, seed))?;
        let i = self.w.len();
        self.name(&name, Slot::W(i))?;
        self.w.push(Trainable {
            name,
            shape,
            group,
            data,
            grad: None,
            m: None,
            v: None,
            step: 0,
        });
        Ok(W(i))
    }

    /// Appends a running statistic initialised to `value`.
    pub(crate) fn add_stat(
        &mut self,
        be: &B,
        name: String,
        shape: Vec<usize>,
        group: Group,
        value: f64,
    ) -> Result<S, ModelError> {
        let data = be.upload(&self.init(&shape, Init::Constant(value), 0))?;
        let i = self.s.len();
        self.name(&name, Slot::S(i))?;
        self.s.push(Stat {
            name,
            shape,
            group,
            data,
        });
        Ok(S(i))
    }

    fn view(&self, slot: Slot) -> Param<'_, B> {
        match slot {
            Slot::W(i) => {
                let t = &self.w[i];
                Param {
                    name: &t.name,
                    shape: &t.shape,
                    kind: ParamKind::Trainable,
                    group: t.group,
                    data: &t.data,
                    grad: t.grad.as_ref(),
                    steps: t.step,
                }
            }
            Slot::S(i) => {
                let s = &self.s[i];
                Param {
                    name: &s.name,
                    shape: &s.shape,
                    kind: ParamKind::Buffer,
                    group: s.group,
                    data: &s.data,
                    grad: None,
                    steps: 0,
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
    /// Every tensor in `state_dict` order.
    pub fn iter(&self) -> impl Iterator<Item = Param<'_, B>> {
        self.order.iter().map(|&slot| self.view(slot))
    }
    fn slot(&self, name: &str) -> Result<Slot, ModelError> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| ModelError::UnknownParam(name.to_string()))
    }
    pub fn get(&self, name: &str) -> Result<Param<'_, B>, ModelError> {
        Ok(self.view(self.slot(name)?))
    }
    /// A trainable tensor by name (a running statistic has no gradient).
    pub(crate) fn trainable(&self, name: &str) -> Result<&Trainable<B>, ModelError> {
        match self.slot(name)? {
            Slot::W(i) => Ok(&self.w[i]),
            Slot::S(_) => Err(ModelError::NoGradient {
                name: name.to_string(),
            }),
        }
    }
    pub(crate) fn trainable_mut(&mut self, name: &str) -> Result<&mut Trainable<B>, ModelError> {
        match self.slot(name)? {
            Slot::W(i) => Ok(&mut self.w[i]),
            Slot::S(_) => Err(ModelError::NoGradient {
                name: name.to_string(),
            }),
        }
    }
    pub fn names(&self) -> Vec<String> {
        self.iter().map(|p| p.name.to_string()).collect()
    }
    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.w.iter().map(|p| p.numel()).sum()
    }

    /// Overwrites a tensor's values (host data of exactly its element count).
    pub fn set(&mut self, be: &B, name: &str, values: &[B::T]) -> Result<(), ModelError> {
        let slot = self.slot(name)?;
        let (shape, data) = match slot {
            Slot::W(i) => {
                let t = &mut self.w[i];
                (&t.shape, &mut t.data)
            }
            Slot::S(i) => {
                let t = &mut self.s[i];
                (&t.shape, &mut t.data)
            }
        };
        if values.len() != data_len(shape) {
            return Err(ModelError::ParamLen {
                name: name.to_string(),
                shape: shape.clone(),
                found: values.len(),
            });
        }
        *data = be.upload(values)?;
        self.generation += 1;
        Ok(())
    }

    /// Allocates (zeroed) the gradient of every trainable of `group` that has none yet: a
    /// training pass or an optimizer step of that group calls it first.
    pub(crate) fn ensure_grads(&mut self, be: &B, group: ParamGroup) -> Result<(), ModelError> {
        for p in self.w.iter_mut().filter(|p| group.contains(p.group)) {
            if p.grad.is_none() {
                p.grad = Some(be.zeros(data_len(&p.shape))?);
                self.generation += 1;
            }
        }
        Ok(())
    }

    /// Counts a replacement or allocation of a buffer of the store made outside its methods
    /// (the optimizer state).
    pub(crate) fn replaced(&mut self) {
        self.generation += 1;
    }

    /// How many times a buffer of the store (a tensor, a gradient, an optimizer moment) was
    /// replaced or allocated since it was built: a CUDA graph that holds the store's buffers
    /// is valid only while this stays what it was at the capture.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Values the store's buffers on `be` hold: every tensor, and the gradients and
    /// optimizer moments allocated so far (what `memory::param_bytes` counts).
    pub fn held_scalars(&self, be: &B) -> usize {
        let w: usize = self
            .w
            .iter()
            .map(|p| {
                let extra = [&p.grad, &p.m, &p.v].into_iter().flatten();
                be.len(&p.data) + extra.map(|b| be.len(b)).sum::<usize>()
            })
            .sum();
        w + self.s.iter().map(|s| be.len(&s.data)).sum::<usize>()
    }
}

fn data_len(shape: &[usize]) -> usize {
    shape.iter().product()
}
