//! The stage-1 and stage-2 training steps on CUDA as captured graphs ([`TrainGraph`]): the
//! whole step (gradients zeroed, forward, loss, backward, optimizer step) recorded once per
//! (stage, batch shape, loss and optimizer settings, buffer generation) and replayed for every
//! later step of that key. The first step of a key runs eagerly (it allocates the activations,
//! gradients and optimizer moments, and loads the kernels); the second captures and
//! replays. Before each replay the host uploads the batch into the graph's fixed input
//! buffers (through [`InputRing`]s on the copy stream, so the copy overlaps queued compute)
//! and writes the optimizer's step-dependent scalars (learning rate, first step, Adam's
//! bias corrections) into a device buffer the graph's optimizer kernels read; after it the
//! step counts advance on the host, and the loss (and the logits) are read back from the
//! device buffers the graph wrote: at once ([`IchNet::stage1_step_graphed`]), or queued
//! ([`IchNet::stage1_step_queued`], [`IchNet::stage2_step_queued`]): an asynchronous copy
//! of the loss into one of two page-locked host slots ([`GraphSteps`] alternates them), read
//! by [`GraphSteps::read`] after the next step has been enqueued, so the host prepares and
//! uploads batch k+1 while the device runs step k. A slot is refilled only after it was
//! read (queuing a third unread loss is an error). A shape change (the last partial batch) runs eagerly
//! and re-captures when the shape returns; so does a step after a buffer the graph holds
//! was replaced ([`IchNet::generation`], in the key: a tensor or an optimizer state set, as
//! a checkpoint load does; a gradient or a moment allocated; the activations, the eval-mode
//! backbone's or the stage-2 head's buffers reallocated by a pass of another shape, such as
//! a validation batch; the buffers released). A capture that fails (an op of the step
//! allocates or synchronises) is reported once on stderr with its error, and the steps of
//! that shape run eagerly ([`TrainGraph::failure`] says why). The machinery ([`TrainGraph`],
//! [`GraphSteps`], keyed by a [`StepKey`]) serves the stage-3 U-Net's graphed step too
//! ([`crate::model::unet::graph`]). Knows nothing about datasets or files.

use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};

use super::net::{IchNet, Stage1Step};
use super::optim::{self, OptimizerConfig};
use super::params::ParamGroup;
use super::ModelError;
use crate::engine::cuda::graph::{Graph, InputRing};
use crate::engine::cuda::CudaBackend;
use crate::engine::Backend;

/// What a captured step depends on besides its buffers (a step with another key runs
/// eagerly or re-captures), and how the values its graph leaves in the loss buffer make
/// the step's loss. The stage-1/2 steps' [`Key`] here, the U-Net's in
/// [`crate::model::unet::graph`].
pub trait StepKey: Clone + PartialEq {
    /// The step's loss from the values of its loss buffer, read back from the device.
    fn loss(&self, values: &[f64]) -> Result<f64, ModelError>;
}

/// The key of a stage-1 or stage-2 step.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    stage: u8,
    batch: usize,
    seq: usize,
    h: usize,
    w: usize,
    pos_weight: u64,
    /// The optimizer with its learning rate zeroed (the learning rate is a device scalar).
    opt: OptimizerConfig,
    /// [`IchNet::generation`] at the capture.
    generation: u64,
}

impl StepKey for Key {
    /// The BCE, the buffer's one value.
    fn loss(&self, values: &[f64]) -> Result<f64, ModelError> {
        values
            .first()
            .copied()
            .ok_or_else(|| ModelError::Internal("empty loss readback".into()))
    }
}

/// A captured training step and its fixed device buffers: the inputs (`x`, `y`: the
/// graph reads them; `TrainGraph::feed` fills them through the rings), the loss the graph
/// writes, and the optimizer's device scalars (`hyper`, written before each replay).
pub struct TrainGraph<K = Key> {
    pub(crate) key: K,
    pub(crate) graph: Option<Graph>,
    pub(crate) x: CudaSlice<f32>,
    pub(crate) y: CudaSlice<f32>,
    x_ring: InputRing,
    y_ring: InputRing,
    pub(crate) loss: CudaSlice<f64>,
    pub(crate) hyper: CudaSlice<f32>,
    captures: usize,
    replays: usize,
    /// Why the capture failed (the steps of this shape then run eagerly).
    pub(crate) failed: Option<String>,
}

impl<K> TrainGraph<K> {
    /// The buffers of a step keyed `key` (nothing captured yet): inputs of `x_len` and
    /// `y_len` values with their rings, a loss of `loss_len` values, `hyper_len` device
    /// scalars; `counts` (captures, replays) carried over from the graph it replaces.
    pub(crate) fn new(
        be: &CudaBackend,
        key: K,
        (x_len, y_len, loss_len, hyper_len): (usize, usize, usize, usize),
        (captures, replays): (usize, usize),
    ) -> Result<Self, ModelError> {
        Ok(TrainGraph {
            key,
            graph: None,
            x: be.zeros(x_len)?,
            y: be.zeros(y_len)?,
            x_ring: be.input_ring(x_len)?,
            y_ring: be.input_ring(y_len)?,
            loss: be.zeros_f64(loss_len.max(1))?,
            hyper: be.zeros_f32(hyper_len.max(1))?,
            captures,
            replays,
            failed: None,
        })
    }

    /// Uploads a batch into the graph's inputs (through the rings on the copy stream) and
    /// the device scalars of this step into `hyper`.
    pub(crate) fn feed(
        &mut self,
        be: &CudaBackend,
        x: &[f32],
        y: &[f32],
        hyper: &[f32],
    ) -> Result<(), ModelError> {
        be.ring_upload(&mut self.x_ring, x)?;
        be.ring_upload(&mut self.y_ring, y)?;
        be.ring_consume(&mut self.x_ring, &mut self.x)?;
        be.ring_consume(&mut self.y_ring, &mut self.y)?;
        be.upload_into(hyper, &mut self.hyper)?;
        Ok(())
    }

    /// Records a successful capture.
    pub(crate) fn captured(&mut self, graph: Graph) {
        self.graph = Some(graph);
        self.captures += 1;
    }

    /// Launches the captured graph (the caller then advances the step counts).
    pub(crate) fn replay(&mut self) -> Result<(), ModelError> {
        self.graph.as_ref().ok_or_else(missing)?.replay()?;
        self.replays += 1;
        Ok(())
    }

    /// Why capturing this step failed, if it did (its steps then ran eagerly).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
    /// Operations in the captured graph (0 before the capture).
    pub fn nodes(&self) -> usize {
        self.graph.as_ref().map_or(0, Graph::nodes)
    }
    /// How many times a step was captured, and replayed.
    pub fn counts(&self) -> (usize, usize) {
        (self.captures, self.replays)
    }
}

/// Where the graphed steps of a training run stand: the graph of the current shape, and
/// how many steps ran eagerly (first steps and shape changes).
pub struct GraphSteps<K = Key> {
    pub graph: Option<TrainGraph<K>>,
    pub eager_steps: usize,
    /// The two page-locked slots queued losses are copied into (allocated at the first).
    loss_host: Vec<PinnedHostSlice<f64>>,
    /// Which slots hold a loss not yet read: the key of the graph that wrote it (which says
    /// how its values make the loss), and the event recorded after the copy into the slot.
    /// The engine turns cudarc's own event tracking off, so `PinnedHostSlice::as_slice`
    /// would not wait for the copy: [`GraphSteps::read`] waits for this event (on an H200 a
    /// read without it returned the loss of two steps earlier).
    unread: [Option<(K, CudaEvent)>; 2],
    /// The slot the next queued loss goes to.
    next_slot: usize,
}

impl<K> Default for GraphSteps<K> {
    fn default() -> Self {
        GraphSteps {
            graph: None,
            eager_steps: 0,
            loss_host: Vec::new(),
            unread: [None, None],
            next_slot: 0,
        }
    }
}

/// A step's loss: known (an eager step), or on its way from the device into a host slot
/// of the [`GraphSteps`] that ran it ([`GraphSteps::read`] waits for it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepLoss {
    Ready(f64),
    Queued(usize),
}

impl<K: StepKey> GraphSteps<K> {
    /// (captures, replays, eager steps) so far.
    pub fn counts(&self) -> (usize, usize, usize) {
        let (c, r) = self.graph.as_ref().map_or((0, 0), TrainGraph::counts);
        (c, r, self.eager_steps)
    }

    /// The loss of a step: waits for its copy to the host when it is queued.
    pub fn read(&mut self, loss: StepLoss) -> Result<f64, ModelError> {
        match loss {
            StepLoss::Ready(v) => Ok(v),
            StepLoss::Queued(slot) => {
                let none = || ModelError::Internal(format!("no queued loss in slot {slot}"));
                let (key, copied) = self
                    .unread
                    .get_mut(slot)
                    .and_then(Option::take)
                    .ok_or_else(none)?;
                copied
                    .synchronize()
                    .map_err(|e| ModelError::Internal(format!("loss readback: {e}")))?;
                let host = self.loss_host.get(slot).ok_or_else(none)?;
                let values = host
                    .as_slice()
                    .map_err(|e| ModelError::Internal(format!("loss readback: {e}")))?;
                key.loss(values)
            }
        }
    }

    /// Queues the copy of the loss the graph just wrote into the next host slot (on the
    /// compute stream, after the replay; the host does not wait).
    pub(crate) fn queue_loss(&mut self, be: &CudaBackend) -> Result<StepLoss, ModelError> {
        let err =
            |e: cudarc::driver::DriverError| ModelError::Internal(format!("loss readback: {e}"));
        let slot = self.next_slot;
        if self.unread[slot].is_some() {
            return Err(ModelError::Internal(
                "a third training loss was queued before the first was read".into(),
            ));
        }
        let g = self.graph.as_ref().ok_or_else(missing)?;
        let len = g.loss.len();
        while self.loss_host.len() < 2 {
            // SAFETY: a page-locked buffer of `len` f64, written by the copy below before
            // any read (reads wait for the event recorded after that copy).
            let host = unsafe { be.stream().context().alloc_pinned_with_flags::<f64>(len, 0) }
                .map_err(err)?;
            self.loss_host.push(host);
        }
        let host = &mut self.loss_host[slot];
        if host.len() != len {
            // SAFETY: as above (this slot holds no unread loss).
            *host = unsafe { be.stream().context().alloc_pinned_with_flags::<f64>(len, 0) }
                .map_err(err)?;
        }
        be.stream().memcpy_dtoh(&g.loss, host).map_err(err)?;
        let copied = be.stream().record_event(None).map_err(err)?;
        self.unread[slot] = Some((g.key.clone(), copied));
        self.next_slot ^= 1;
        Ok(StepLoss::Queued(slot))
    }
}

fn key(
    stage: u8,
    dims: (usize, usize, usize, usize),
    pos_weight: f64,
    opt: &OptimizerConfig,
    generation: u64,
) -> Key {
    Key {
        stage,
        batch: dims.0,
        seq: dims.1,
        h: dims.2,
        w: dims.3,
        pos_weight: pos_weight.to_bits(),
        opt: opt.with_lr(0.0),
        generation,
    }
}

impl IchNet<CudaBackend> {
    /// One stage-1 training step (gradients zeroed, forward, backward, optimizer step on
    /// [`ParamGroup::Stage1`]) as [`IchNet::stage1_forward_backward`] + [`IchNet::step`]
    /// compute it, replayed from a captured graph when `steps` holds one for this shape
    /// (see the module doc).
    #[allow(clippy::too_many_arguments)]
    pub fn stage1_step_graphed(
        &mut self,
        steps: &mut GraphSteps,
        x: &[f32],
        labels: &[f32],
        batch: usize,
        seq: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<Stage1Step, ModelError> {
        match self.stage1_run(steps, x, labels, batch, seq, h, w, pos_weight, opt)? {
            Some(s) => Ok(s),
            None => {
                let g = steps.graph.as_ref().ok_or_else(missing)?;
                let loss = self.download_loss(&g.loss)?;
                let logits = self.stage1_last_logits()?;
                Ok(Stage1Step { loss, logits })
            }
        }
    }

    /// [`IchNet::stage1_step_graphed`] without waiting for the device: a replayed step's
    /// loss is queued into a host slot of `steps` ([`GraphSteps::read`] it after enqueuing
    /// the next step, at most two unread); its logits are not read back.
    #[allow(clippy::too_many_arguments)]
    pub fn stage1_step_queued(
        &mut self,
        steps: &mut GraphSteps,
        x: &[f32],
        labels: &[f32],
        batch: usize,
        seq: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<StepLoss, ModelError> {
        match self.stage1_run(steps, x, labels, batch, seq, h, w, pos_weight, opt)? {
            Some(s) => Ok(StepLoss::Ready(s.loss)),
            None => steps.queue_loss(self.backend()),
        }
    }

    /// The stage-1 step, eager (`Some`, its result) or replayed (`None`: the loss is in
    /// the graph's loss buffer, the logits in the net's last activations).
    #[allow(clippy::too_many_arguments)]
    fn stage1_run(
        &mut self,
        steps: &mut GraphSteps,
        x: &[f32],
        labels: &[f32],
        batch: usize,
        seq: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<Option<Stage1Step>, ModelError> {
        let k = key(1, (batch, seq, h, w), pos_weight, opt, self.generation());
        if !matches!(&steps.graph, Some(g) if g.key == k) {
            return self.eager1(steps, k, x, labels, pos_weight, opt).map(Some);
        }
        if steps.graph.as_ref().is_some_and(|g| g.failed.is_some()) {
            steps.eager_steps += 1;
            self.zero_grads()?;
            let s = self.stage1_forward_backward(x, labels, batch, seq, h, w, pos_weight)?;
            self.step(opt, ParamGroup::Stage1)?;
            return Ok(Some(s));
        }
        let g = steps.graph.as_mut().ok_or_else(missing)?;
        self.check_stage1_input(x, labels, batch, seq, h, w, pos_weight)?;
        self.feed(g, x, labels, opt, ParamGroup::Stage1)?;
        if g.graph.is_none() {
            let be = self.backend().clone();
            let captured = be.capture(|| {
                let r = (|| -> Result<(), ModelError> {
                    self.zero_grads()?;
                    let d = (batch, seq, h, w);
                    let (xb, yb, loss) = (&g.x, &g.y, &mut g.loss);
                    self.stage1_core_dev(xb, yb, d, |be, l, y, dl| {
                        be.bce_with_logits_into(l, y, pos_weight, dl, loss)?;
                        Ok(f64::NAN)
                    })?;
                    self.step_dev(opt, ParamGroup::Stage1, &g.hyper)
                })();
                r.map_err(|e| crate::engine::EngineError::Param(e.to_string()))
            });
            match captured {
                Ok((graph, ())) => g.captured(graph),
                Err(e) => {
                    capture_failed(g, &e);
                    return self.stage1_run(steps, x, labels, batch, seq, h, w, pos_weight, opt);
                }
            }
        }
        self.replay(g, ParamGroup::Stage1)?;
        Ok(None)
    }

    /// One stage-2 training step (gradients zeroed, the frozen backbone, fc forward and
    /// backward, optimizer step on [`ParamGroup::Fc`]) as [`IchNet::stage2_forward_backward`]
    /// and [`IchNet::step`] compute it, from a captured graph when `steps` holds one for
    /// this shape. Returns the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn stage2_step_graphed(
        &mut self,
        steps: &mut GraphSteps,
        x: &[f32],
        labels: &[f32],
        n: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<f64, ModelError> {
        match self.stage2_run(steps, x, labels, n, h, w, pos_weight, opt)? {
            Some(loss) => Ok(loss),
            None => self.download_loss(&steps.graph.as_ref().ok_or_else(missing)?.loss),
        }
    }

    /// [`IchNet::stage2_step_graphed`] without waiting for the device: a replayed step's
    /// loss is queued into a host slot of `steps` ([`GraphSteps::read`] it after enqueuing
    /// the next step, at most two unread).
    #[allow(clippy::too_many_arguments)]
    pub fn stage2_step_queued(
        &mut self,
        steps: &mut GraphSteps,
        x: &[f32],
        labels: &[f32],
        n: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<StepLoss, ModelError> {
        match self.stage2_run(steps, x, labels, n, h, w, pos_weight, opt)? {
            Some(loss) => Ok(StepLoss::Ready(loss)),
            None => steps.queue_loss(self.backend()),
        }
    }

    /// The stage-2 step, eager (`Some`, its loss) or replayed (`None`: the loss is in the
    /// graph's loss buffer).
    #[allow(clippy::too_many_arguments)]
    fn stage2_run(
        &mut self,
        steps: &mut GraphSteps,
        x: &[f32],
        labels: &[f32],
        n: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<Option<f64>, ModelError> {
        let k = key(2, (n, 1, h, w), pos_weight, opt, self.generation());
        if !matches!(&steps.graph, Some(g) if g.key == k) {
            return self
                .eager2(steps, k, x, labels, pos_weight, opt)
                .map(|s| Some(s.loss));
        }
        if steps.graph.as_ref().is_some_and(|g| g.failed.is_some()) {
            steps.eager_steps += 1;
            self.zero_grads()?;
            let loss = self.stage2_forward_backward(x, labels, n, h, w, pos_weight)?;
            self.step(opt, ParamGroup::Fc)?;
            return Ok(Some(loss));
        }
        let g = steps.graph.as_mut().ok_or_else(missing)?;
        self.check_stage2_input(x, labels, n, h, w, pos_weight)?;
        self.feed(g, x, labels, opt, ParamGroup::Fc)?;
        if g.graph.is_none() {
            let be = self.backend().clone();
            let captured = be.capture(|| {
                let r = (|| -> Result<(), ModelError> {
                    self.zero_grads()?;
                    let (xb, yb, loss) = (&g.x, &g.y, &mut g.loss);
                    self.stage2_core_dev(xb, yb, (n, h, w), |be, l, y, dl| {
                        be.bce_with_logits_into(l, y, pos_weight, dl, loss)?;
                        Ok(f64::NAN)
                    })?;
                    self.step_dev(opt, ParamGroup::Fc, &g.hyper)
                })();
                r.map_err(|e| crate::engine::EngineError::Param(e.to_string()))
            });
            match captured {
                Ok((graph, ())) => g.captured(graph),
                Err(e) => {
                    capture_failed(g, &e);
                    return self.stage2_run(steps, x, labels, n, h, w, pos_weight, opt);
                }
            }
        }
        self.replay(g, ParamGroup::Fc)?;
        Ok(None)
    }

    /// The eager stage-1 step; then the buffers of a graph for its shape (captured at the
    /// next step of that shape).
    fn eager1(
        &mut self,
        steps: &mut GraphSteps,
        k: Key,
        x: &[f32],
        labels: &[f32],
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<Stage1Step, ModelError> {
        self.zero_grads()?;
        let s = self.stage1_forward_backward(x, labels, k.batch, k.seq, k.h, k.w, pos_weight)?;
        self.step(opt, ParamGroup::Stage1)?;
        steps.eager_steps += 1;
        self.prepare(steps, k, x.len(), labels.len())?;
        Ok(s)
    }

    fn eager2(
        &mut self,
        steps: &mut GraphSteps,
        k: Key,
        x: &[f32],
        labels: &[f32],
        pos_weight: f64,
        opt: &OptimizerConfig,
    ) -> Result<Stage1Step, ModelError> {
        self.zero_grads()?;
        let loss = self.stage2_forward_backward(x, labels, k.batch, k.h, k.w, pos_weight)?;
        self.step(opt, ParamGroup::Fc)?;
        steps.eager_steps += 1;
        self.prepare(steps, k, x.len(), labels.len())?;
        Ok(Stage1Step {
            loss,
            logits: Vec::new(),
        })
    }

    /// The fixed buffers of a graph for `k` (the old graph and its buffers freed first),
    /// keyed with the generation the eager step left (it may have allocated the
    /// activations, the gradients and the optimizer state).
    fn prepare(
        &mut self,
        steps: &mut GraphSteps,
        mut k: Key,
        x_len: usize,
        y_len: usize,
    ) -> Result<(), ModelError> {
        k.generation = self.generation();
        let counts = steps.graph.as_ref().map_or((0, 0), TrainGraph::counts);
        steps.graph = None;
        let hyper_len = optim::step_hyper(self.params(), &k.opt, ParamGroup::Stage1).len();
        let lens = (x_len, y_len, 1, hyper_len);
        steps.graph = Some(TrainGraph::new(self.backend(), k, lens, counts)?);
        Ok(())
    }

    /// Uploads the batch into the graph's inputs and the optimizer's scalars for this step.
    fn feed(
        &self,
        g: &mut TrainGraph,
        x: &[f32],
        labels: &[f32],
        opt: &OptimizerConfig,
        group: ParamGroup,
    ) -> Result<(), ModelError> {
        let hyper = optim::step_hyper(self.params(), opt, group);
        g.feed(self.backend(), x, labels, &hyper)
    }

    fn replay(&mut self, g: &mut TrainGraph, group: ParamGroup) -> Result<(), ModelError> {
        g.replay()?;
        self.advance_steps(group);
        Ok(())
    }

    fn download_loss(&self, loss: &CudaSlice<f64>) -> Result<f64, ModelError> {
        let v = download_values(self.backend(), loss)?;
        v.first()
            .copied()
            .ok_or_else(|| ModelError::Internal("empty loss readback".into()))
    }
}

/// The values of a graph's loss buffer on the host (waits for the device).
pub(crate) fn download_values(
    be: &CudaBackend,
    loss: &CudaSlice<f64>,
) -> Result<Vec<f64>, ModelError> {
    Ok(be.download_prefix(loss, loss.len())?)
}

pub(crate) fn missing() -> ModelError {
    ModelError::Internal("the training graph is missing".into())
}

/// Records why a capture failed and says so once on stderr: the steps of that shape run
/// eagerly from now on.
pub(crate) fn capture_failed<K>(g: &mut TrainGraph<K>, e: &crate::engine::EngineError) {
    let msg = e.to_string();
    eprintln!("warning: the training step could not be captured as a CUDA graph; its steps run eagerly: {msg}");
    g.failed = Some(msg);
}
