//! CUDA graphs: [`CudaBackend::capture`] records every launch, memset and device copy that
//! a closure enqueues on the backend's stream (stream capture, nothing runs) and
//! instantiates them as a [`Graph`], which [`Graph::replay`] launches again as one unit,
//! on the same buffers. The captured region must allocate nothing and wait for nothing: an
//! allocation through the backend is refused while capturing (with an error saying so),
//! and the driver refuses synchronisations and copies to pageable host memory (the
//! capture is then invalidated). Also the capturable forms of the ops whose eager form
//! synchronises or takes a step-dependent scalar by value: the BCE and soft Dice losses left
//! in a device buffer ([`CudaBackend::bce_with_logits_into`],
//! [`CudaBackend::soft_dice_loss_into`]) and the optimizer steps reading their
//! learning rate / bias corrections from device scalars the host writes before each replay
//! ([`CudaBackend::sgd_step_dev`], [`CudaBackend::adam_step_dev`], [`sgd_hyper`],
//! [`adam_hyper`]). Knows nothing about what the captured ops compute.

use cudarc::driver::sys;
use cudarc::driver::{CudaGraph, CudaSlice};

use super::arena::LiveGraph;
use super::device::{cuda, launched, synced};
use super::CudaBackend;
use crate::engine::shapes::SoftDice;
use crate::engine::{EngineError, Result};

pub use super::arena::InputRing;
pub use super::dice::dice_value;
pub use super::optim::{adam_hyper, sgd_hyper, HYPER_LEN};

/// An instantiated graph on one backend's stream; replays on the buffers it was captured
/// with, which must outlive it.
pub struct Graph {
    g: CudaGraph,
    nodes: usize,
    /// Keeps the backend's scratch arena from freeing what the replays use.
    _live: LiveGraph,
}

impl Graph {
    /// Launches the whole recorded sequence on the backend's stream (asynchronously, like
    /// any launch; a kernel's failure is reported by the next synchronising call).
    pub fn replay(&self) -> Result<()> {
        self.g.launch().map_err(|e| cuda("cuGraphLaunch", e))?;
        launched("graph", "replay");
        Ok(())
    }

    /// The number of operations captured (launches, memsets, copies), where the driver
    /// says (0 when it does not).
    pub fn nodes(&self) -> usize {
        self.nodes
    }
}

impl CudaBackend {
    /// Captures what `f` enqueues on this backend's stream as a graph. Queued work is
    /// finished first (so that an earlier failure is not blamed on the capture). Any error
    /// of `f` ends the capture and is returned; a capture the driver invalidated is an
    /// error naming the operation that broke it.
    pub fn capture<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(Graph, R)> {
        let stream = self.stream().clone();
        stream
            .synchronize()
            .map_err(|e| cuda("synchronize before capture", e))?;
        synced();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda("cuStreamBeginCapture", e))?;
        self.arena().set_capturing(true);
        let out = f();
        self.arena().set_capturing(false);
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let value = out?;
        let g = ended
            .map_err(|e| cuda("cuStreamEndCapture", e))?
            .ok_or_else(|| EngineError::Cuda {
                op: "cuStreamEndCapture".into(),
                msg: "the driver returned no graph".into(),
            })?;
        let mut n = 0usize;
        // SAFETY: the graph handle is live (owned by `g`); a null node array asks for the count.
        let counted = unsafe { sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) };
        if counted != sys::CUresult::CUDA_SUCCESS {
            n = 0;
        }
        Ok((
            Graph {
                g,
                nodes: n,
                _live: self.arena().graph_alive(),
            },
            value,
        ))
    }

    /// Whether this backend's stream is capturing a graph now.
    pub fn is_capturing(&self) -> bool {
        self.arena().is_capturing()
    }
}

impl CudaBackend {
    /// A device buffer of `len` f64 zeros (a loss a graph writes).
    pub fn zeros_f64(&self, len: usize) -> Result<CudaSlice<f64>> {
        self.alloc_zeros::<f64>(len)
    }

    /// A device buffer of `len` f32 zeros (device scalars).
    pub fn zeros_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.alloc_zeros::<f32>(len)
    }

    /// The mean BCE with logits into `loss[0]` on the device and its gradient into
    /// `dlogits`: `bce_with_logits` without the download (capturable).
    pub fn bce_with_logits_into(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        pos_weight: f64,
        dlogits: &mut CudaSlice<f32>,
        loss: &mut CudaSlice<f64>,
    ) -> Result<()> {
        super::loss::bce_with_logits_into(self, logits, targets, pos_weight, dlogits, loss)
    }

    /// The soft Dice loss into `out[at]` on the device (and 1 into `out[at + 1]` when a
    /// denominator is 0, the eager form's error: [`dice_value`]), its gradient into
    /// `dprobs`: `soft_dice_loss` without the allocations and the download (capturable).
    #[allow(clippy::too_many_arguments)]
    pub fn soft_dice_loss_into(
        &self,
        s: &SoftDice,
        probs: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        dprobs: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f64>,
        at: usize,
    ) -> Result<()> {
        super::dice::soft_dice_loss_into(self, s, probs, targets, dprobs, out, at)
    }

    /// `sgd_step` with {lr, first step} read from `hyper[at..at + 2]` ([`sgd_hyper`]).
    #[allow(clippy::too_many_arguments)]
    pub fn sgd_step_dev(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        hyper: &CudaSlice<f32>,
        at: usize,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<()> {
        super::optim::sgd_step_dev(self, p, g, m, hyper, at, momentum, weight_decay)
    }

    /// `adam_step` with {step size, sqrt(1 - beta2^t)} read from `hyper[at..at + 2]`
    /// ([`adam_hyper`]).
    #[allow(clippy::too_many_arguments)]
    pub fn adam_step_dev(
        &self,
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
        super::optim::adam_step_dev(self, p, g, m, v, hyper, at, beta1, beta2, eps, weight_decay)
    }
}
