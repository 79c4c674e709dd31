//! Device and pinned host memory reused instead of reallocated, per backend: the scratch
//! buffers of composite ops (taken by size and given back, so a buffer serves one layer
//! after another and an eval pass allocates nothing once warm), whether the stream is
//! capturing a CUDA graph (an allocation then is an error, before the driver sees it), and
//! the two page-locked staging buffers of host-to-device uploads (double-buffered: the
//! host fills one while the device may still be copying from the other).
//!
//! Uploads run on a second stream, the copy stream: the copy first waits for an event that
//! says its destination is free (by default an event recorded on the compute stream at the
//! call, which orders it after the destination's allocation and earlier readers), the
//! compute stream then waits for the event recorded after the copy, and a staging buffer is
//! refilled only once the event of the copy out of it has completed. With an [`InputRing`]
//! (two device buffers that uploads alternate between, each with the event after its last
//! reader) the copy waits only for the reader of its own buffer, so the next batch's
//! upload overlaps the current step's compute. Knows nothing about what the buffers hold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::sync::OnceLock;

use cudarc::driver::{result, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};

use super::device::cuda;
use crate::engine::{EngineError, Result};

/// Free device buffers of one element type, by length: a scratch buffer is taken by its
/// length and given back for the next user (stream order keeps it after this one).
struct Pool<T>(Mutex<HashMap<usize, Vec<CudaSlice<T>>>>);

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool(Mutex::new(HashMap::new()))
    }
}

impl<T> Pool<T> {
    /// A free buffer of `len` values, else `alloc(len)`.
    fn take(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<CudaSlice<T>>,
    ) -> Result<CudaSlice<T>> {
        let found = self
            .0
            .lock()
            .ok()
            .and_then(|mut m| m.get_mut(&len).and_then(Vec::pop));
        match found {
            Some(b) => Ok(b),
            None => alloc(len),
        }
    }

    fn give(&self, buf: CudaSlice<T>) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(buf.len()).or_default().push(buf);
        }
    }

    fn clear(&self) {
        if let Ok(mut m) = self.0.lock() {
            m.clear();
        }
    }

    /// Bytes held by the free buffers.
    fn bytes(&self) -> usize {
        self.0.lock().map_or(0, |m| {
            m.iter()
                .map(|(len, v)| len * std::mem::size_of::<T>() * v.len())
                .sum::<usize>()
        })
    }
}

/// The reusable memory of one backend (shared by its clones).
#[derive(Default)]
pub(crate) struct Arena {
    /// Free scratch buffers by length (f32 elements).
    scratch: Pool<f32>,
    /// Free f64 scratch buffers by length (the reductions' partial sums).
    scratch64: Pool<f64>,
    /// Set while the backend's stream captures a graph.
    capturing: AtomicBool,
    /// The upload staging buffers and which one is next.
    staging: Mutex<Staging>,
    /// The stream uploads are copied on (the compute stream when unset).
    copy: OnceLock<Arc<CudaStream>>,
    /// How many instantiated graphs of this backend are alive: they replay on the scratch
    /// buffers their capture took, so those are not freed while any is.
    graphs: Arc<AtomicUsize>,
}

/// Held by a live [`super::graph::Graph`]: counts it in its arena until dropped.
pub(crate) struct LiveGraph(Arc<AtomicUsize>);

impl Drop for LiveGraph {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Two device buffers of `len` values that uploads alternate between
/// ([`super::CudaBackend::ring_upload`]), each with the event recorded after the last read of
/// it on the compute stream ([`super::CudaBackend::ring_consume`]): the upload into one waits
/// only for that event, not for the compute queued since.
pub struct InputRing {
    pub(crate) bufs: [CudaSlice<f32>; 2],
    pub(crate) read: [Option<CudaEvent>; 2],
    /// The buffer the last upload went to.
    pub(crate) last: usize,
}

impl InputRing {
    /// Values per buffer.
    pub fn len(&self) -> usize {
        self.bufs[0].len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
struct Staging {
    bufs: [Option<Pinned>; 2],
    next: usize,
}

/// One page-locked host buffer (cuMemHostAlloc) and the event recorded after the last
/// copy out of it.
struct Pinned {
    ptr: *mut u8,
    cap: usize,
    done: Option<CudaEvent>,
}

// SAFETY: the buffer is only touched under the staging lock.
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(cap: usize) -> Result<Self> {
        // SAFETY: a plain page-locked allocation of `cap` bytes.
        let ptr = unsafe { result::malloc_host(cap, 0) }.map_err(|e| cuda("cuMemHostAlloc", e))?;
        Ok(Pinned {
            ptr: ptr.cast(),
            cap,
            done: None,
        })
    }

    /// Waits until the device has finished copying out of this buffer.
    fn wait(&mut self) -> Result<()> {
        if let Some(ev) = self.done.take() {
            ev.synchronize().map_err(|e| cuda("upload", e))?;
        }
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.wait();
        // SAFETY: `ptr` came from cuMemHostAlloc and no copy reads it any more.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// Uploads below this size go straight from pageable memory (staging costs a host copy).
const STAGE_MIN_BYTES: usize = 64 << 10;

impl Arena {
    /// An error when the stream is capturing: `op` would allocate, synchronise or copy to
    /// the host, which a graph cannot record. (A GPU's driver may accept a device-to-host
    /// copy into pageable memory inside a thread-local capture, seen on an H200: the copy is
    /// recorded, the call returns, and the host buffer holds whatever it held. So the
    /// engine refuses it here, before the driver sees it.)
    pub(crate) fn check_not_capturing(&self, op: &str) -> Result<()> {
        if self.capturing.load(Ordering::Acquire) {
            return Err(EngineError::Cuda {
                op: op.to_string(),
                msg: "not permitted while the stream captures a CUDA graph: the captured region \
                      must allocate nothing and read nothing back to the host (run it once \
                      before capturing, so that its buffers exist)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Sets the stream uploads are copied on (once; later calls change nothing).
    pub(crate) fn set_copy_stream(&self, s: Arc<CudaStream>) {
        let _ = self.copy.set(s);
    }

    /// The stream uploads are copied on, if it is not the compute stream.
    pub(crate) fn copy_stream(&self) -> Option<&Arc<CudaStream>> {
        self.copy.get()
    }

    pub(crate) fn set_capturing(&self, on: bool) {
        self.capturing.store(on, Ordering::Release);
    }

    pub(crate) fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    /// A scratch buffer of `len` values (contents undefined): a free one of that length,
    /// else `alloc(len)`; give it back with [`Arena::give`].
    pub(crate) fn take(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        self.scratch.take(len, alloc)
    }

    /// Returns a scratch buffer for reuse (stream order keeps the next user after this one).
    pub(crate) fn give(&self, buf: CudaSlice<f32>) {
        self.scratch.give(buf)
    }

    /// An f64 scratch buffer of `len` values, as [`Arena::take`].
    pub(crate) fn take64(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<CudaSlice<f64>>,
    ) -> Result<CudaSlice<f64>> {
        self.scratch64.take(len, alloc)
    }

    /// Returns an f64 scratch buffer for reuse.
    pub(crate) fn give64(&self, buf: CudaSlice<f64>) {
        self.scratch64.give(buf)
    }

    /// Counts a graph instantiated on this arena's buffers until the returned guard drops.
    pub(crate) fn graph_alive(&self) -> LiveGraph {
        self.graphs.fetch_add(1, Ordering::AcqRel);
        LiveGraph(self.graphs.clone())
    }

    /// Frees every free scratch buffer. Refused while capturing (the capture may hold
    /// them) and while a graph is alive (its replays write the buffers its capture took,
    /// which sit in the free lists between replays: freeing them would leave it replaying
    /// through dangling addresses).
    pub(crate) fn release(&self) -> Result<()> {
        let why = if self.is_capturing() {
            "the stream is capturing a CUDA graph".to_string()
        } else {
            match self.graphs.load(Ordering::Acquire) {
                0 => {
                    self.scratch.clear();
                    self.scratch64.clear();
                    return Ok(());
                }
                n => format!(
                    "{n} CUDA graph(s) of this backend are alive and replay on its scratch \
                     buffers: drop them first"
                ),
            }
        };
        Err(EngineError::Cuda {
            op: "release_scratch".into(),
            msg: why,
        })
    }

    /// Bytes held by free scratch buffers.
    pub(crate) fn scratch_bytes(&self) -> usize {
        self.scratch.bytes() + self.scratch64.bytes()
    }

    /// Copies `host` into `dst` (as long) through the next page-locked staging buffer and
    /// an asynchronous copy on the copy stream, ordered before the work queued on `stream`
    /// (the compute stream) from now on: the call returns before the device has the data,
    /// and the host may reuse `host` at once. Waits only for the copy that last used the
    /// same staging buffer (two uploads ago). The copy starts once `dst_free` has completed
    /// (None: once the work queued on `stream` so far has). Small uploads go directly, on
    /// `stream`. Not while capturing (the copy stream is not captured).
    pub(crate) fn upload_staged<T: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        host: &[T],
        dst: &mut CudaSlice<T>,
        dst_free: Option<&CudaEvent>,
    ) -> Result<()> {
        crate::engine::check_len("upload", "device buffer", dst.len(), host.len())?;
        self.check_not_capturing("upload")?;
        let bytes = std::mem::size_of_val(host);
        if bytes < STAGE_MIN_BYTES {
            if let Some(ev) = dst_free {
                stream.wait(ev).map_err(|e| cuda("upload", e))?;
            }
            return stream.memcpy_htod(host, dst).map_err(|e| cuda("upload", e));
        }
        let copy = self.copy.get().unwrap_or(stream);
        let mut st = self.staging.lock().map_err(|_| EngineError::Cuda {
            op: "upload".into(),
            msg: "the staging buffers' lock is poisoned".into(),
        })?;
        let i = st.next;
        st.next ^= 1;
        let slot = &mut st.bufs[i];
        if slot.as_ref().is_none_or(|b| b.cap < bytes) {
            *slot = None; // waits for the copy out of the old one, then frees it
            *slot = Some(Pinned::new(bytes.next_power_of_two())?);
        }
        let Some(pinned) = slot.as_mut() else {
            return Err(EngineError::Cuda {
                op: "upload".into(),
                msg: "no staging buffer".into(),
            });
        };
        pinned.wait()?;
        // SAFETY: the buffer holds `cap >= bytes` bytes, no copy reads it (waited above),
        // and `T: DeviceRepr` is plain old data.
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr().cast::<u8>(), pinned.ptr, bytes) };
        let staged = unsafe { std::slice::from_raw_parts(pinned.ptr, bytes) };
        let err = |e| cuda("upload", e);
        if !Arc::ptr_eq(copy, stream) {
            // The destination is free once its allocation and earlier readers are done.
            match dst_free {
                Some(ev) => copy.wait(ev).map_err(err)?,
                None => copy
                    .wait(&stream.record_event(None).map_err(err)?)
                    .map_err(err)?,
            }
        } else if let Some(ev) = dst_free {
            stream.wait(ev).map_err(err)?;
        }
        let (dptr, _guard) = dst.device_ptr_mut(copy);
        // SAFETY: dst holds host.len() values (checked above); the staged bytes stay
        // untouched until the event recorded next has completed.
        unsafe { result::memcpy_htod_async(dptr, staged, copy.cu_stream()) }.map_err(err)?;
        let done = copy.record_event(None).map_err(err)?;
        if !Arc::ptr_eq(copy, stream) {
            // What the compute stream queues from now on sees the data.
            stream.wait(&done).map_err(err)?;
        }
        pinned.done = Some(done);
        Ok(())
    }
}
