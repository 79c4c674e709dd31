//! The stage-1 and stage-2 training steps on CUDA as captured graphs ([`TrainGraph`]): the
//! whole step (gradients zeroed, forward, loss, backward, optimizer step) recorded once per
//! (stage, batch shape, loss and optimizer settings) and replayed for every later step of
//! that shape. The first step of a shape runs eagerly (it allocates the activations,
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
//! and re-captures when the shape returns. A capture that fails (an op of the step
//! allocates or synchronises) is reported once on stderr with its error, and the steps of
//! that shape run eagerly ([`TrainGraph::failure`] says why). Knows nothing about datasets
//! or files.

use cudarc::driver::{CudaSlice, PinnedHostSlice};

use super::net::{IchNet, Stage1Step};
use super::optim::{self, OptimizerConfig};
use super::params::ParamGroup;
use super::ModelError;
use crate::engine::cuda::graph::{Graph, InputRing};
use crate::engine::cuda::CudaBackend;
use crate::engine::Backend;

/// What a captured step depends on besides its buffers: a step with another key runs
/// eagerly or re-captures.
#[derive(Clone, Debug, PartialEq)]
struct Key {
    stage: u8,
    batch: usize,
    seq: usize,
    h: usize,
    w: usize,
    pos_weight: u64,
    /// The optimizer with its learning rate zeroed (the learning rate is a device scalar).
    opt: OptimizerConfig,
}

/// A captured training step and its fixed device buffers.
pub struct TrainGraph {
    key: Key,
    graph: Option<Graph>,
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    x_ring: InputRing,
    y_ring: InputRing,
    loss: CudaSlice<f64>,
    hyper: CudaSlice<f32>,
    captures: usize,
    replays: usize,
    /// Why the capture failed (the steps of this shape then run eagerly).
    failed: Option<String>,
}

impl TrainGraph {
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
#[derive(Default)]
pub struct GraphSteps {
    pub graph: Option<TrainGraph>,
    pub eager_steps: usize,
    /// The two page-locked slots queued losses are copied into (allocated at the first).
    loss_host: Vec<PinnedHostSlice<f64>>,
    /// Which slots hold a loss not yet read.
    unread: [bool; 2],
    /// The slot the next queued loss goes to.
    next_slot: usize,
}

/// A step's loss: known (an eager step), or on its way from the device into a host slot
/// of the [`GraphSteps`] that ran it ([`GraphSteps::read`] waits for it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepLoss {
    Ready(f64),
    Queued(usize),
}

impl GraphSteps {
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
                let host = self
                    .loss_host
                    .get(slot)
                    .filter(|_| self.unread[slot])
                    .ok_or_else(|| {
                        ModelError::Internal(format!("no queued loss in slot {slot}"))
                    })?;
                let v = host
                    .as_slice()
                    .map_err(|e| ModelError::Internal(format!("loss readback: {e}")))?
                    .first()
                    .copied()
                    .ok_or_else(|| ModelError::Internal("empty loss readback".into()))?;
                self.unread[slot] = false;
                Ok(v)
            }
        }
    }

    /// Queues the copy of the loss the graph just wrote into the next host slot (on the
    /// compute stream, after the replay; the host does not wait).
    fn queue_loss(&mut self, be: &CudaBackend) -> Result<StepLoss, ModelError> {
        let err =
            |e: cudarc::driver::DriverError| ModelError::Internal(format!("loss readback: {e}"));
        while self.loss_host.len() < 2 {
            // SAFETY: a page-locked buffer of one f64, written by the copy below before
            // any read (reads wait for the event recorded after that copy).
            let slot = unsafe { be.stream().context().alloc_pinned_with_flags::<f64>(1, 0) }
                .map_err(err)?;
            self.loss_host.push(slot);
        }
        let slot = self.next_slot;
        if self.unread[slot] {
            return Err(ModelError::Internal(
                "a third training loss was queued before the first was read".into(),
            ));
        }
        let g = self.graph.as_ref().ok_or_else(missing)?;
        be.stream()
            .memcpy_dtoh(&g.loss, &mut self.loss_host[slot])
            .map_err(err)?;
        self.unread[slot] = true;
        self.next_slot ^= 1;
        Ok(StepLoss::Queued(slot))
    }
}

fn key(
    stage: u8,
    dims: (usize, usize, usize, usize),
    pos_weight: f64,
    opt: &OptimizerConfig,
) -> Key {
    Key {
        stage,
        batch: dims.0,
        seq: dims.1,
        h: dims.2,
        w: dims.3,
        pos_weight: pos_weight.to_bits(),
        opt: opt.with_lr(0.0),
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
        let k = key(1, (batch, seq, h, w), pos_weight, opt);
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
                Ok((graph, ())) => {
                    g.graph = Some(graph);
                    g.captures += 1;
                }
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
        let k = key(2, (n, 1, h, w), pos_weight, opt);
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
                Ok((graph, ())) => {
                    g.graph = Some(graph);
                    g.captures += 1;
                }
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

    /// The fixed buffers of a graph for `k` (the old graph and its buffers freed first).
    fn prepare(
        &mut self,
        steps: &mut GraphSteps,
        k: Key,
        x_len: usize,
        y_len: usize,
    ) -> Result<(), ModelError> {
        let (captures, replays) = steps.graph.as_ref().map_or((0, 0), TrainGraph::counts);
        steps.graph = None;
        let be = self.backend();
        let hyper_len = optim::step_hyper(self.params(), &k.opt, ParamGroup::Stage1).len();
        steps.graph = Some(TrainGraph {
            key: k,
            graph: None,
            x: be.zeros(x_len)?,
            y: be.zeros(y_len)?,
            x_ring: be.input_ring(x_len)?,
            y_ring: be.input_ring(y_len)?,
            loss: be.zeros_f64(1)?,
            hyper: be.zeros_f32(hyper_len.max(1))?,
            captures,
            replays,
            failed: None,
        });
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
        let be = self.backend();
        be.ring_upload(&mut g.x_ring, x)?;
        be.ring_upload(&mut g.y_ring, labels)?;
        be.ring_consume(&mut g.x_ring, &mut g.x)?;
        be.ring_consume(&mut g.y_ring, &mut g.y)?;
        let hyper = optim::step_hyper(self.params(), opt, group);
        be.upload_into(&hyper, &mut g.hyper)?;
        Ok(())
    }

    fn replay(&mut self, g: &mut TrainGraph, group: ParamGroup) -> Result<(), ModelError> {
        g.graph.as_ref().ok_or_else(missing)?.replay()?;
        g.replays += 1;
        self.advance_steps(group);
        Ok(())
    }

    fn download_loss(&self, loss: &CudaSlice<f64>) -> Result<f64, ModelError> {
        let v = self
            .backend()
            .stream()
            .clone_dtoh(loss)
            .map_err(|e| ModelError::Internal(format!("loss readback: {e}")))?;
        v.first()
            .copied()
            .ok_or_else(|| ModelError::Internal("empty loss readback".into()))
    }
}

fn missing() -> ModelError {
    ModelError::Internal("the training graph is missing".into())
}

/// Records why a capture failed and says so once on stderr: the steps of that shape run
/// eagerly from now on.
fn capture_failed(g: &mut TrainGraph, e: &crate::engine::EngineError) {
    let msg = e.to_string();
    eprintln!("warning: the training step could not be captured as a CUDA graph; its steps run eagerly: {msg}");
    g.failed = Some(msg);
}
