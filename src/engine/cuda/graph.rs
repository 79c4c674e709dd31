//! CUDA graphs: [`CudaBackend::capture`] records every launch, memset and device copy that
//! a closure enqueues on the backend's stream (stream capture, nothing runs) and
//! instantiates them as a [`Graph`], which [`Graph::replay`] launches again as one unit,
//! on the same buffers. The captured region must allocate nothing and wait for nothing: an
//! allocation through the backend is refused while capturing (with an error saying so),
//! and the driver refuses synchronisations and copies to pageable host memory (the
//! capture is then invalidated). Knows nothing about what the captured ops compute.

use cudarc::driver::sys;
use cudarc::driver::CudaGraph;

use super::device::{cuda, launched, synced};
use super::CudaBackend;
use crate::engine::{EngineError, Result};

/// An instantiated graph on one backend's stream; replays on the buffers it was captured
/// with, which must outlive it.
pub struct Graph {
    g: CudaGraph,
    nodes: usize,
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
        Ok((Graph { g, nodes: n }, value))
    }

    /// Whether this backend's stream is capturing a graph now.
    pub fn is_capturing(&self) -> bool {
        self.arena().is_capturing()
    }
}
