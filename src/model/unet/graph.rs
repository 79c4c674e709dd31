//! The stage-3 U-Net's training step on CUDA as a captured graph, with the stage-1/2
//! machinery of [`crate::model::net_graph`] ([`TrainGraph`], [`GraphSteps`], keyed here by
//! [`UNetKey`]): the whole step (forward with batch norm in training mode, soft Dice and
//! BCE losses, backward, optimizer step) recorded once per (batch shape, optimizer settings
//! but the learning rate, buffer generation) and replayed for every later step of that key.
//! The first step of a key runs eagerly ([`UNet::forward_backward`] + [`UNet::step`]: it
//! allocates the activations, gradients, optimizer moments and scratch, and loads the
//! kernels); the second captures and replays. Before each replay the host uploads the batch
//! into the graph's fixed input buffers (through [`crate::engine::cuda::graph::InputRing`]s
//! on the copy stream) and writes the optimizer's step-dependent scalars (one
//! [`HYPER_LEN`] set: the U-Net counts one step for all its tensors) into the graph's
//! device buffer; after it the step count advances on the host. The graph leaves its losses
//! in a device buffer `[bce, dice, dice 0/0 flag]`, read at once
//! ([`UNet::train_step_graphed`]) or queued into a page-locked host slot and read a step
//! late ([`UNet::train_step_queued`], [`GraphSteps::read`]). A shape change (the last
//! partial batch) runs eagerly and re-captures when the shape returns; so does a step after
//! a buffer the graph holds was replaced (a parameter or optimizer state set, the workspace
//! rebuilt by a pass of another shape, buffers released: the key's generation). A capture
//! that fails is reported once on stderr and that key's steps run eagerly. Knows nothing
//! about datasets or files.

use cudarc::driver::CudaSlice;

use super::{LossSink, UNet, UNetLoss};
use crate::engine::cuda::graph::{dice_value, HYPER_LEN};
use crate::engine::cuda::CudaBackend;
use crate::engine::{EngineError, SoftDice};
use crate::model::net_graph::{
    capture_failed, download_values, missing, GraphSteps, StepKey, StepLoss, TrainGraph,
};
use crate::model::optim::{tensor_hyper, OptimizerConfig};
use crate::model::ModelError;

/// Where the graph leaves each loss in its loss buffer.
const BCE_AT: usize = 0;
/// The soft Dice at `DICE_AT`, its 0/0 flag at `DICE_AT + 1`.
const DICE_AT: usize = 1;
const LOSS_LEN: usize = 3;

/// What a captured U-Net step depends on besides its buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetKey {
    n: usize,
    h: usize,
    w: usize,
    /// The optimizer with its learning rate zeroed (the learning rate is a device scalar).
    opt: OptimizerConfig,
    /// The BCE's weight (bits): whether the graph holds the BCE, and how the losses add up.
    bce_weight: u64,
    /// [`UNet`]'s buffer generation at the capture.
    generation: u64,
}

impl UNetKey {
    /// The losses from the values of the graph's loss buffer (the eager pass's error when
    /// the Dice's denominator was 0).
    pub fn losses(&self, values: &[f64]) -> Result<UNetLoss, ModelError> {
        let [bce, dice, zero_den] = values[..] else {
            return Err(ModelError::Internal(format!(
                "U-Net loss readback: {} values, expected {LOSS_LEN}",
                values.len()
            )));
        };
        let dice = dice_value(dice, zero_den)?;
        let weight = f64::from_bits(self.bce_weight);
        let bce = if weight > 0.0 { bce } else { 0.0 };
        Ok(UNetLoss {
            loss: dice + weight * bce,
            dice,
            bce,
        })
    }
}

impl StepKey for UNetKey {
    fn loss(&self, values: &[f64]) -> Result<f64, ModelError> {
        Ok(self.losses(values)?.loss)
    }
}

/// The graphed U-Net steps of a training run (see [`GraphSteps`]).
pub type UNetSteps = GraphSteps<UNetKey>;

/// The losses left in the graph's loss buffer ([`BCE_AT`], [`DICE_AT`]).
struct DeviceLosses<'a>(&'a mut CudaSlice<f64>);

impl LossSink<CudaBackend> for DeviceLosses<'_> {
    fn dice(
        &mut self,
        be: &CudaBackend,
        s: &SoftDice,
        probs: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        dprobs: &mut CudaSlice<f32>,
    ) -> Result<f64, ModelError> {
        be.soft_dice_loss_into(s, probs, targets, dprobs, self.0, DICE_AT)?;
        Ok(f64::NAN)
    }
    fn bce(
        &mut self,
        be: &CudaBackend,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        dlogits: &mut CudaSlice<f32>,
    ) -> Result<f64, ModelError> {
        // `bce_with_logits_into` writes the first value of the buffer.
        const _: () = assert!(BCE_AT == 0);
        be.bce_with_logits_into(logits, targets, 1.0, dlogits, self.0)?;
        Ok(f64::NAN)
    }
}

impl UNet<CudaBackend> {
    /// One training step (training pass + optimizer step) as [`UNet::forward_backward`] and
    /// [`UNet::step`] compute it, replayed from a captured graph when `steps` holds one for
    /// this key (see the module doc). Returns the pass's losses.
    #[allow(clippy::too_many_arguments)]
    pub fn train_step_graphed(
        &mut self,
        steps: &mut UNetSteps,
        x: &[f32],
        targets: &[f32],
        n: usize,
        h: usize,
        w: usize,
        opt: &OptimizerConfig,
    ) -> Result<UNetLoss, ModelError> {
        match self.graphed_run(steps, x, targets, n, h, w, opt)? {
            Some(l) => Ok(l),
            None => {
                let g = steps.graph.as_ref().ok_or_else(missing)?;
                g.key.losses(&download_values(&self.be, &g.loss)?)
            }
        }
    }

    /// [`UNet::train_step_graphed`] without waiting for the device: a replayed step's loss
    /// is queued into a host slot of `steps` ([`GraphSteps::read`] it after enqueuing the
    /// next step, at most two unread).
    #[allow(clippy::too_many_arguments)]
    pub fn train_step_queued(
        &mut self,
        steps: &mut UNetSteps,
        x: &[f32],
        targets: &[f32],
        n: usize,
        h: usize,
        w: usize,
        opt: &OptimizerConfig,
    ) -> Result<StepLoss, ModelError> {
        match self.graphed_run(steps, x, targets, n, h, w, opt)? {
            Some(l) => Ok(StepLoss::Ready(l.loss)),
            None => steps.queue_loss(&self.be),
        }
    }

    fn graph_key(&self, n: usize, h: usize, w: usize, opt: &OptimizerConfig) -> UNetKey {
        UNetKey {
            n,
            h,
            w,
            opt: opt.with_lr(0.0),
            bce_weight: self.cfg.bce_weight.to_bits(),
            generation: self.generation,
        }
    }

    /// The eager step: the training pass and the optimizer step.
    #[allow(clippy::too_many_arguments)]
    fn eager_step(
        &mut self,
        steps: &mut UNetSteps,
        x: &[f32],
        targets: &[f32],
        n: usize,
        h: usize,
        w: usize,
        opt: &OptimizerConfig,
    ) -> Result<UNetLoss, ModelError> {
        let l = self.forward_backward(x, targets, n, h, w)?;
        self.step(opt)?;
        steps.eager_steps += 1;
        Ok(l)
    }

    /// The step, eager (`Some`, its losses) or replayed (`None`: the losses are in the
    /// graph's loss buffer).
    #[allow(clippy::too_many_arguments)]
    fn graphed_run(
        &mut self,
        steps: &mut UNetSteps,
        x: &[f32],
        targets: &[f32],
        n: usize,
        h: usize,
        w: usize,
        opt: &OptimizerConfig,
    ) -> Result<Option<UNetLoss>, ModelError> {
        let k = self.graph_key(n, h, w, opt);
        if !matches!(&steps.graph, Some(g) if g.key == k) {
            let l = self.eager_step(steps, x, targets, n, h, w, opt)?;
            // The buffers of a graph for this shape, keyed with the generation the eager
            // step left (it may have built the workspace and the optimizer state).
            let counts = steps.graph.as_ref().map_or((0, 0), TrainGraph::counts);
            steps.graph = None;
            let k = self.graph_key(n, h, w, opt);
            let lens = (x.len(), targets.len(), LOSS_LEN, HYPER_LEN);
            steps.graph = Some(TrainGraph::new(&self.be, k, lens, counts)?);
            return Ok(Some(l));
        }
        if steps.graph.as_ref().is_some_and(|g| g.failed.is_some()) {
            return self.eager_step(steps, x, targets, n, h, w, opt).map(Some);
        }
        self.check_train_input(x, targets, n, h, w)?;
        let g = steps.graph.as_mut().ok_or_else(missing)?;
        g.feed(&self.be, x, targets, &tensor_hyper(opt, self.steps()))?;
        if g.graph.is_none() {
            let be = self.be.clone();
            let captured = be.capture(|| {
                let r = (|| -> Result<(), ModelError> {
                    let (xb, tb, hyper) = (&g.x, &g.y, &g.hyper);
                    self.train_pass(xb, tb, n, h, w, &mut DeviceLosses(&mut g.loss))?;
                    self.step_dev(opt, hyper)
                })();
                r.map_err(|e| EngineError::Param(e.to_string()))
            });
            match captured {
                Ok((graph, ())) => g.captured(graph),
                Err(e) => {
                    capture_failed(g, &e);
                    return self.graphed_run(steps, x, targets, n, h, w, opt);
                }
            }
        }
        g.replay()?;
        let st = self.opt.as_mut().ok_or_else(missing)?;
        st.steps += 1;
        Ok(None)
    }

    /// [`UNet::step`] with the step-dependent scalars read from `hyper` on the device
    /// ([`tensor_hyper`] of the steps taken, written by the host before each replay); the
    /// caller counts the step. The moments must exist (an eager step made them).
    fn step_dev(
        &mut self,
        opt: &OptimizerConfig,
        hyper: &CudaSlice<f32>,
    ) -> Result<(), ModelError> {
        let tr = self
            .ws
            .as_ref()
            .and_then(|ws| ws.train.as_ref())
            .ok_or_else(|| {
                ModelError::Input("no gradients yet: run a training pass first".into())
            })?;
        let st = self.opt.as_mut().ok_or_else(|| {
            ModelError::Internal(
                "the U-Net's optimizer state does not exist yet (run one eager step before capturing)"
                    .into(),
            )
        })?;
        let be = &self.be;
        let params = self.w.muts();
        let grads = tr.grads.refs();
        for (((p, g), m), v) in params
            .into_iter()
            .zip(grads)
            .zip(st.m.muts())
            .zip(st.v.muts())
        {
            match *opt {
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                    ..
                } => be.sgd_step_dev(p, g, m, hyper, 0, momentum, weight_decay)?,
                OptimizerConfig::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => be.adam_step_dev(p, g, m, v, hyper, 0, beta1, beta2, eps, weight_decay)?,
            }
        }
        Ok(())
    }
}
