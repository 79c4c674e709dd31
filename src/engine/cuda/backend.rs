//! [`CudaBackend`]: the op trait over device buffers (`CudaSlice<f32>`) on one stream, each op
//! a few typed launches of the kernels in `kernels/*.cu` by its family's module (`conv.rs`
//! launches `kernels/conv.cu` and mirrors `cpu/conv.rs`, and so on). The [`Backend`] trait
//! checks the shapes of an op with a shape type once, for both backends, before its
//! `*_unchecked` method runs here; the op then checks the sizes against the kernels' 32-bit
//! indexing and the grid limits, before any launch.
//!
//! One compute stream and no cross-stream event tracking by cudarc: every launch and copy is
//! ordered on that stream, and a buffer freed on the host is freed stream-ordered after the
//! work queued on it. Uploads through the page-locked staging run on a second, copy stream,
//! ordered with the compute stream by explicit events (`arena.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};

use super::arena::{Arena, InputRing};
use super::device::{cuda, cuda_available, driver_present, synced, DeviceInfo};
use super::launch::KArg;
use super::module::ModuleCache;
use super::{
    bias, cam, ccl, channels, conv, conv_wgmma, dense, dice, elementwise, kmeans, loss, lstm,
    morph, norm, optim, pool, upconv, volume,
};
use crate::engine::backend::{
    conv2d_bn_eval_fwd_nhwc_by_transposes, conv2d_bn_train_fwd_nhwc_bf16_by_conversions,
    conv2d_bn_train_fwd_nhwc_by_transposes, conv2d_bwd_data_nhwc_by_transposes,
    conv2d_bwd_weight_nhwc_by_transposes, nchw_between_layout_changes, through_bf16_storage,
    Backend,
};
use crate::engine::shapes::{
    BatchNorm2d, ChannelCopy, Conv2d, Lstm, Pool2d, SoftDice, Transpose, UpConv2d,
};
use crate::engine::{check_len, ActStorage, EngineError, Precision, Result};

/// The CUDA backend (f32 buffers) on one device. A clone shares the context, the stream and
/// the loaded kernels, and starts with the same convolution precision.
#[derive(Clone)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Arc<ModuleCache>,
    pub(super) families: Arc<Families>,
    arena: Arc<Arena>,
    info: DeviceInfo,
    precision: Precision,
    /// Which bf16 forward kernel a convolution takes (`conv.rs`).
    pub(super) mma_route: conv::MmaRoute,
    /// Whether the bf16-storage channels-last eval and training forwards take the sm_90a
    /// `wgmma` kernels where they can (`conv_wgmma.rs`; [`CudaBackend::set_wgmma`]; off by default).
    wgmma: bool,
    /// The shared memory one block may use, what the tensor-core convolutions' kernels are
    /// chosen by (`conv.rs`, `TcKernel`): the device's opt-in limit
    /// ([`DeviceInfo::shared_memory_per_block`]) unless a test lowered it
    /// ([`CudaBackend::limit_shared_memory_for_tests`]).
    smem_limit: u32,
    /// The layout of the eval-mode backbone's activations ([`LayoutChoice`]).
    eval_layout: LayoutChoice,
    /// The layout of the training-mode backbone's activations ([`LayoutChoice`]).
    train_layout: LayoutChoice,
    /// The storage of its channels-last activations ([`StorageChoice`]).
    eval_storage: StorageChoice,
    /// The storage of the training-mode backbone's channels-last activations
    /// ([`StorageChoice`]).
    train_storage: StorageChoice,
}

/// A value loaded on first use and kept.
pub(crate) struct Loaded<T>(OnceLock<T>);

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Loaded(OnceLock::new())
    }
}

impl<T> Loaded<T> {
    pub(crate) fn get(&self, load: impl FnOnce() -> Result<T>) -> Result<&T> {
        if let Some(v) = self.0.get() {
            return Ok(v);
        }
        let v = load()?;
        Ok(self.0.get_or_init(|| v))
    }
}

/// Every op family's kernels (one per `kernels/*.cu`), each family loaded on first use.
#[derive(Default)]
pub(crate) struct Families {
    pub(super) bias: Loaded<bias::Kernels>,
    pub(super) cam: Loaded<cam::Kernels>,
    pub(super) ccl: Loaded<ccl::Kernels>,
    pub(super) channels: Loaded<channels::Kernels>,
    pub(super) conv: Loaded<conv::Kernels>,
    pub(super) conv_tc: Loaded<conv::TcKernels>,
    pub(super) conv_wgmma: Loaded<conv_wgmma::Kernels>,
    pub(super) dense: Loaded<dense::Kernels>,
    pub(super) dice: Loaded<dice::Kernels>,
    pub(super) elementwise: Loaded<elementwise::Kernels>,
    pub(super) kmeans: Loaded<kmeans::Kernels>,
    pub(super) loss: Loaded<loss::Kernels>,
    pub(super) lstm: Loaded<lstm::Kernels>,
    pub(super) morph: Loaded<morph::Kernels>,
    pub(super) norm: Loaded<norm::Kernels>,
    pub(super) optim: Loaded<optim::Kernels>,
    pub(super) pool: Loaded<pool::Kernels>,
    pub(super) upconv: Loaded<upconv::Kernels>,
    pub(super) volume: Loaded<volume::Kernels>,
}

impl CudaBackend {
    /// Opens device `ordinal`; `NoCuda` (one line) when there is no driver or no such GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(EngineError::NoCuda(
                "no CUDA driver found (libcuda.so did not load)".into(),
            ));
        }
        let devs = cuda_available()?;
        let info = devs
            .into_iter()
            .nth(ordinal)
            .ok_or_else(|| EngineError::NoCuda(format!("no CUDA device with ordinal {ordinal}")))?;
        let opened = catch_unwind(AssertUnwindSafe(
            || -> Result<(Arc<CudaContext>, Arc<CudaStream>)> {
                let ctx = CudaContext::new(ordinal).map_err(|e| cuda("cuCtxCreate", e))?;
                // One stream only: per-buffer events would only add overhead to every launch.
                unsafe { ctx.disable_event_tracking() };
                let stream = ctx.new_stream().map_err(|e| cuda("cuStreamCreate", e))?;
                keep_pool_memory(ordinal);
                Ok((ctx, stream))
            },
        ));
        let (ctx, stream) = match opened {
            Ok(r) => r?,
            Err(_) => {
                return Err(EngineError::NoCuda(
                    "the CUDA driver library failed while opening the device".into(),
                ))
            }
        };
        let modules = Arc::new(ModuleCache::new(ctx.clone(), info.compute_capability));
        let smem_limit = info.shared_memory_per_block;
        // The copy stream of the staged uploads.
        let arena = Arc::new(Arena::default());
        arena.set_copy_stream(ctx.new_stream().map_err(|e| cuda("cuStreamCreate", e))?);
        Ok(CudaBackend {
            ctx,
            stream,
            modules,
            families: Arc::default(),
            arena,
            info,
            precision: Precision::F32,
            mma_route: conv::MmaRoute::default(),
            wgmma: std::env::var("ICHCAM_WGMMA").is_ok_and(|v| v == "1"),
            smem_limit,
            eval_layout: LayoutChoice::default(),
            train_layout: LayoutChoice::default(),
            eval_storage: StorageChoice::default(),
            train_storage: StorageChoice::default(),
        })
    }

    /// The precision of the convolutions (f32 unless [`CudaBackend::set_precision`] said).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Opts the bf16-storage channels-last eval and training forwards
    /// (`conv2d_bn_eval_fwd_nhwc_bf16`, `conv2d_bn_train_fwd_nhwc_bf16`) in to (or out of) the
    /// sm_90a `wgmma` kernels (`kernels/conv_wgmma.cu`), which then run where they can: a
    /// device of compute capability 9.0 where the module loads, bf16, a shape they support
    /// (`c_in % 8 == 0`), x 16-byte aligned; the mma.sync kernels elsewhere (where the module
    /// does not load, after one note on stderr). Off by default (also set by
    /// `ICHCAM_WGMMA=1` when the backend is made) until a GPU run confirms it: it is proven on
    /// the emulated driver only (docs/precision.md).
    pub fn set_wgmma(&mut self, on: bool) {
        self.wgmma = on;
    }

    /// The shared memory (static and dynamic, bytes) a block of this backend's kernels may
    /// use: the device's opt-in limit, or what [`CudaBackend::limit_shared_memory_for_tests`]
    /// lowered it to. Every tensor-core convolution kernel is chosen to fit it (`conv.rs`).
    pub fn shared_memory_per_block(&self) -> u32 {
        self.smem_limit
    }

    /// FOR TESTS: makes this backend (not its clones made before) choose its tensor-core
    /// convolution kernels as on a device that gives a block only `bytes` of shared memory
    /// (99 KiB as sm_86 / sm_89, 64 KiB as sm_75, ...), to check the fallbacks on a device
    /// that gives more (the emulated driver's 227 KiB). The kernels still run on this device,
    /// which does not enforce the lowered limit; what fits is decided here. An error (the
    /// limit unchanged) above the device's own limit, which it never raises, and below the
    /// 48 KiB every CUDA device gives a block (the WMMA kernels' floor).
    pub fn limit_shared_memory_for_tests(&mut self, bytes: u32) -> Result<()> {
        let device = self.info.shared_memory_per_block;
        if bytes > device || bytes < conv::SMEM_FLOOR {
            return Err(EngineError::Param(format!(
                "limit_shared_memory_for_tests: {bytes} bytes is outside {}..={device} (48 KiB to the device's limit)",
                conv::SMEM_FLOOR
            )));
        }
        self.smem_limit = bytes;
        Ok(())
    }

    /// Whether the wgmma kernel is opted in ([`CudaBackend::set_wgmma`]).
    pub fn wgmma(&self) -> bool {
        self.wgmma
    }

    /// Sets the precision of the convolutions (see `conv.rs`); tf32 and bf16 need compute
    /// capability 8.0 or newer.
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        conv::check_precision(self, p)?;
        self.precision = p;
        Ok(())
    }

    /// The device this backend runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this backend is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn modules(&self) -> &ModuleCache {
        &self.modules
    }

    /// The reusable memory of this backend: scratch buffers, upload staging, capture state.
    pub(crate) fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Frees the scratch buffers the composite ops keep for reuse; an error (nothing
    /// freed) while a graph is being captured or any [`super::graph::Graph`] of this
    /// backend is alive, since its replays use the scratch its capture took.
    pub fn release_scratch(&self) -> Result<()> {
        self.arena.release()
    }

    /// Bytes of device memory held by free scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.arena.scratch_bytes()
    }

    /// A scratch buffer of `len` values from the arena (contents undefined; give it back
    /// with [`CudaBackend::give_scratch`]).
    pub(crate) fn take_scratch(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.arena.take(len, |l| self.alloc::<f32>(l))
    }

    pub(crate) fn give_scratch(&self, buf: CudaSlice<f32>) {
        self.arena.give(buf)
    }

    /// An f64 scratch buffer of `len` values (contents undefined), as
    /// [`CudaBackend::take_scratch`].
    pub(crate) fn take_scratch_f64(&self, len: usize) -> Result<CudaSlice<f64>> {
        self.arena.take64(len, |l| self.alloc::<f64>(l))
    }

    pub(crate) fn give_scratch_f64(&self, buf: CudaSlice<f64>) {
        self.arena.give64(buf)
    }

    /// The raw device address of a buffer (for [`CudaBackend::launch_raw`] only).
    pub fn ptr<T>(&self, buf: &CudaSlice<T>) -> u64 {
        let (p, _sync) = buf.device_ptr(&self.stream);
        p
    }

    /// Launches `module::name` on this backend's stream with raw arguments, for tests and
    /// diagnostics: their number and kinds are checked against the kernel's PTX parameters
    /// (an error naming the kernel, nothing launched). The ops never use it.
    ///
    /// # Safety
    /// Every pointer must point into a live allocation at least as long as the kernel
    /// indexes it with the given sizes and launch shape (or the launch faults on the
    /// device: the next synchronising call reports it).
    pub unsafe fn launch_raw(
        &self,
        module: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { super::launch::launch_raw(&self.modules, &self.stream, module, name, cfg, args) }
    }

    /// A buffer of `len` elements whose contents are undefined until written; only for the
    /// ops' own buffers, which a kernel fills before anything reads them.
    pub(crate) fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.arena.check_not_capturing("alloc")?;
        if len == 0 {
            return empty_slice(&self.stream);
        }
        // SAFETY: the callers' kernels write every element before any is read.
        unsafe { self.stream.alloc::<T>(len) }.map_err(|e| oom(e, len * std::mem::size_of::<T>()))
    }

    /// A buffer of `len` zeros.
    pub(crate) fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.arena.check_not_capturing("alloc")?;
        if len == 0 {
            return empty_slice(&self.stream);
        }
        self.stream
            .alloc_zeros::<T>(len)
            .map_err(|e| oom(e, len * std::mem::size_of::<T>()))
    }

    /// `host` in a new device buffer.
    pub(crate) fn upload_any<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.arena.check_not_capturing("upload")?;
        if host.is_empty() {
            return empty_slice(&self.stream);
        }
        // SAFETY: the upload below writes every element.
        let mut dst = unsafe { self.stream.alloc::<T>(host.len()) }
            .map_err(|e| oom(e, std::mem::size_of_val(host)))?;
        self.arena
            .upload_staged(&self.stream, host, &mut dst, None)?;
        Ok(dst)
    }

    /// Copies `host` into the existing buffer `dst` (as long): through the page-locked
    /// staging and the copy stream, ordered after the work queued on the compute stream so
    /// far and before what is queued after (no allocation; not while capturing).
    pub fn upload_into(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        self.arena.upload_staged(&self.stream, host, dst, None)
    }

    /// The stream staged uploads are copied on (the compute stream if there is none).
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        self.arena.copy_stream().unwrap_or(&self.stream)
    }

    /// Two device buffers of `len` values for [`CudaBackend::ring_upload`].
    pub fn input_ring(&self, len: usize) -> Result<InputRing> {
        Ok(InputRing {
            bufs: [self.alloc_zeros(len)?, self.alloc_zeros(len)?],
            read: [None, None],
            last: 1,
        })
    }

    /// Uploads `host` into the ring's other buffer on the copy stream: the copy waits only
    /// for the last read of that buffer ([`CudaBackend::ring_consume`] two uploads ago), so
    /// it overlaps the compute queued since; the compute stream's later work sees the data.
    pub fn ring_upload(&self, ring: &mut InputRing, host: &[f32]) -> Result<()> {
        let k = ring.last ^ 1;
        let free = ring.read[k].take();
        self.arena
            .upload_staged(&self.stream, host, &mut ring.bufs[k], free.as_ref())?;
        ring.last = k;
        Ok(())
    }

    /// Copies the ring's last upload into `dst` on the compute stream and records the event
    /// after that read, which the next upload into the same buffer waits for.
    pub fn ring_consume(&self, ring: &mut InputRing, dst: &mut CudaSlice<f32>) -> Result<()> {
        let k = ring.last;
        self.copy(&ring.bufs[k], dst)?;
        ring.read[k] = Some(
            self.stream
                .record_event(None)
                .map_err(|e| cuda("ring_consume", e))?,
        );
        Ok(())
    }

    /// The first `len` elements of a device buffer (waits for the device): every copy to
    /// the host that waits goes through here (the queued training losses of
    /// `model::net_graph` are the one asynchronous copy). Not while capturing a graph.
    pub(crate) fn download_prefix<T: DeviceRepr + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        self.arena.check_not_capturing("download")?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let view = s.try_slice(0..len).ok_or_else(|| EngineError::Shape {
            op: "download",
            detail: format!("asked for {len} elements of a buffer of {}", s.len()),
        })?;
        let host = self
            .stream
            .clone_dtoh(&view)
            .map_err(|e| cuda("download", e))?;
        synced();
        Ok(host)
    }

    /// (splits, chunk) of a per-channel reduction over `count` values per channel: enough
    /// blocks to fill the GPU, at least 4096 values per block; a function of the shape and
    /// the GPU only, so the order of the f64 sums does not change from call to call.
    pub(crate) fn reduce_split(&self, count: usize, channels: usize) -> (usize, usize) {
        let target = 4 * self.info.multiprocessors.max(1) as usize;
        let want = target
            .div_ceil(channels.max(1))
            .clamp(1, count.div_ceil(4096).clamp(1, 65_535));
        let chunk = count.div_ceil(want).max(1);
        (count.div_ceil(chunk).max(1), chunk)
    }
}

// ---- the backbone's layouts --------------------------------------------------------------

/// The layout a backbone's activations take between the stem's max-pool and the last block
/// on this backend: two settings of the backend, one for the eval-mode backbone
/// ([`CudaBackend::set_eval_layout`], read when a model builds its eval-mode buffers) and one
/// for the training-mode backbone ([`CudaBackend::set_train_layout`], read when a model
/// builds its training activations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LayoutChoice {
    /// The backend's choice. Eval: channels-last at tf32 and bf16 (where the native
    /// channels-last `mma.sync` kernel runs every unit; not timed against NCHW: no GPU yet),
    /// NCHW at f32 or with [`MmaRoute::Never`](super::MmaRoute::Never). Training: the same
    /// (the native channels-last kernels run the forward with its batch statistics and both
    /// gradients; not timed against NCHW either).
    #[default]
    Auto,
    /// Channels-first: every unit as `conv2d_bn_eval_fwd` / `conv2d_bn_train_fwd` and the
    /// NCHW backward ops.
    Nchw,
    /// Channels-last: every block unit as `conv2d_bn_eval_fwd_nhwc` /
    /// `conv2d_bn_train_fwd_nhwc` (and in training the `*_nhwc` backward ops), with a layout
    /// change after the max-pool and one after the last block.
    Nhwc,
}

impl LayoutChoice {
    /// Every layout, in the order the help text lists them.
    pub const ALL: [LayoutChoice; 3] = [LayoutChoice::Auto, LayoutChoice::Nchw, LayoutChoice::Nhwc];

    /// `auto`, `nchw` or `nhwc`.
    pub fn name(self) -> &'static str {
        match self {
            LayoutChoice::Auto => "auto",
            LayoutChoice::Nchw => "nchw",
            LayoutChoice::Nhwc => "nhwc",
        }
    }
}

impl std::fmt::Display for LayoutChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LayoutChoice {
    type Err = EngineError;

    /// `auto`, `nchw` or `nhwc` (any case, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        LayoutChoice::ALL
            .into_iter()
            .find(|l| l.name() == t)
            .ok_or_else(|| {
                EngineError::Param(format!("unknown layout `{s}`: use auto, nchw or nhwc"))
            })
    }
}

impl CudaBackend {
    /// The layout of the eval-mode backbone (default [`LayoutChoice::Auto`]).
    pub fn set_eval_layout(&mut self, l: LayoutChoice) {
        self.eval_layout = l;
    }

    /// The layout setting ([`CudaBackend::set_eval_layout`]).
    pub fn eval_layout(&self) -> LayoutChoice {
        self.eval_layout
    }

    /// The layout of the training-mode backbone (default [`LayoutChoice::Auto`]).
    pub fn set_train_layout(&mut self, l: LayoutChoice) {
        self.train_layout = l;
    }

    /// The training layout setting ([`CudaBackend::set_train_layout`]).
    pub fn train_layout(&self) -> LayoutChoice {
        self.train_layout
    }
}

/// How the backbone's channels-last activations are stored on this backend, one setting for
/// the eval-mode backbone ([`CudaBackend::set_eval_storage`]: what [`Backend::eval_storage`]
/// answers) and one for the training-mode backbone ([`CudaBackend::set_train_storage`]: what
/// [`Backend::train_storage`] answers), each read with its layout when a model builds its
/// buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StorageChoice {
    /// The backend's choice: bf16 at `--precision bf16` (the convolutions round their
    /// activation operand to bf16 anyway, so the storage changes only the residual adds and
    /// the features; in training also the batch norms' inputs and the gradient both
    /// convolution gradients read) where the layout is channels-last, f32 otherwise.
    #[default]
    Auto,
    /// f32 at any precision.
    F32,
    /// bf16 at `--precision bf16`; ignored (f32) at tf32 and f32, whose convolutions read
    /// more of the activations than bf16 keeps.
    Bf16,
}

impl StorageChoice {
    /// Every setting, in the order the help text lists them.
    pub const ALL: [StorageChoice; 3] =
        [StorageChoice::Auto, StorageChoice::F32, StorageChoice::Bf16];

    /// `auto`, `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            StorageChoice::Auto => "auto",
            StorageChoice::F32 => "f32",
            StorageChoice::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for StorageChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StorageChoice {
    type Err = EngineError;

    /// `auto`, `f32` or `bf16` (any case, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        StorageChoice::ALL
            .into_iter()
            .find(|l| l.name() == t)
            .ok_or_else(|| {
                EngineError::Param(format!(
                    "unknown activation storage `{s}`: use auto, f32 or bf16"
                ))
            })
    }
}

impl CudaBackend {
    /// The storage of the eval-mode backbone's channels-last activations (default
    /// [`StorageChoice::Auto`]).
    pub fn set_eval_storage(&mut self, st: StorageChoice) {
        self.eval_storage = st;
    }

    /// The storage setting ([`CudaBackend::set_eval_storage`]).
    pub fn eval_storage_setting(&self) -> StorageChoice {
        self.eval_storage
    }

    /// The storage of the training-mode backbone's channels-last activations (default
    /// [`StorageChoice::Auto`]; bf16 only at `--precision bf16` and when the training layout
    /// is channels-last).
    pub fn set_train_storage(&mut self, st: StorageChoice) {
        self.train_storage = st;
    }

    /// The training storage setting ([`CudaBackend::set_train_storage`]).
    pub fn train_storage_setting(&self) -> StorageChoice {
        self.train_storage
    }

    /// The training unit from a convolution that writes z and the per-(channel, pixel tile)
    /// partial statistics of z (`run_conv`, given z and the two partial buffers of
    /// `c_out * tiles` values, taken here from the f64 arena and given back), then
    /// [`norm::batchnorm_train_from_partials`] in `layout` (the combine, then one pass over z
    /// that adds the residual and applies the ReLU). In bf16 storage z is written rounded and
    /// the partials must be those of the rounded z. `None` for an empty output or reduction
    /// (no statistics epilogue: the caller takes the separate passes). Lengths as the
    /// `conv2d_bn_train_fwd*` ops check them.
    #[allow(clippy::too_many_arguments)]
    fn train_fwd_from_partials(
        &self,
        layout: norm::Layout,
        s: &Conv2d,
        bn: &BatchNorm2d,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &mut CudaSlice<f32>,
        running_var: &mut CudaSlice<f32>,
        save_mean: &mut CudaSlice<f32>,
        save_invstd: &mut CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        run_conv: impl FnOnce(
            &mut CudaSlice<f32>,
            &mut CudaSlice<f64>,
            &mut CudaSlice<f64>,
        ) -> Result<()>,
    ) -> Option<Result<()>> {
        let tiles = conv::stats_tiles(s)?;
        Some((|| {
            let mut part_s = self.take_scratch_f64(s.c_out * tiles)?;
            let mut part_q = self.take_scratch_f64(s.c_out * tiles)?;
            let r = run_conv(z, &mut part_s, &mut part_q).and_then(|()| {
                norm::batchnorm_train_from_partials(
                    self,
                    bn,
                    &part_s,
                    &part_q,
                    tiles,
                    conv::STATS_TILE,
                    z,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    save_mean,
                    save_invstd,
                    y,
                    residual,
                    relu,
                    layout,
                )
            });
            self.give_scratch_f64(part_s);
            self.give_scratch_f64(part_q);
            r
        })())
    }

    /// The conv unit on bf16 storage by conversions: x (and the residual) unpacked to f32
    /// NHWC scratch, [`Backend::conv2d_bn_eval_fwd_nhwc`], its output packed into y. Lengths
    /// as [`Backend::conv2d_bn_eval_fwd_nhwc_bf16`] checks them (the ops check them again).
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bn_eval_fwd_nhwc_bf16_by_conversions(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &CudaSlice<f32>,
        running_var: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if s.y_len() == 0 {
            return Ok(());
        }
        let mut ins = vec![(x, s.x_len())];
        if let Some(r) = residual {
            ins.push((r, s.y_len()));
        }
        through_bf16_storage(self, &ins, &mut [(y, s.y_len())], |i, o| {
            self.conv2d_bn_eval_fwd_nhwc(
                s,
                bn,
                &i[0],
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                i.get(1),
                relu,
                &mut o[0],
            )
        })
    }
}

/// Stream-ordered allocations come from the device's default memory pool, which by default
/// returns freed memory to the OS at every synchronisation; a training step allocates the
/// same buffers again right after, so keep it (as PyTorch's caching allocator does). Best
/// effort: a driver without memory pools just allocates normally.
fn keep_pool_memory(ordinal: usize) {
    use cudarc::driver::{result, sys};
    let Ok(dev) = result::device::get(ordinal as i32) else {
        return;
    };
    // SAFETY: `dev` comes from cuDeviceGet; the attribute takes a pointer to a u64.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(dev) {
            let mut threshold = u64::MAX;
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

/// An empty buffer without a zero-byte allocation, which a GPU refuses (cudarc's
/// `CudaStream::null` makes one): one byte is allocated and the slice has length 0.
fn empty_slice<T>(stream: &Arc<CudaStream>) -> Result<CudaSlice<T>> {
    // SAFETY: the byte is never read or written.
    let one = unsafe { stream.alloc::<u8>(1) }.map_err(|e| cuda("alloc", e))?;
    let ptr = one.leak();
    // SAFETY: `ptr` is a live allocation large enough for 0 elements of T; the returned
    // slice owns it and frees it when dropped.
    Ok(unsafe { stream.upgrade_device_ptr::<T>(ptr, 0) })
}

fn oom(e: cudarc::driver::DriverError, bytes: usize) -> EngineError {
    match cuda("alloc", e) {
        EngineError::OutOfMemory { .. } => EngineError::OutOfMemory { bytes },
        other => other,
    }
}

impl Backend for CudaBackend {
    type T = f32;
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        match self.precision {
            Precision::F32 => format!("cuda:{} {}", self.info.ordinal, self.info.name),
            p => format!(
                "cuda:{} {} ({p} convolutions)",
                self.info.ordinal, self.info.name
            ),
        }
    }
    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.arena.check_not_capturing("zeros")?;
        if len == 0 {
            return empty_slice(&self.stream);
        }
        self.stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| oom(e, len * 4))
    }
    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.upload_any(host)
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.download_prefix(buf, buf.len())
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut CudaSlice<f32>, value: f64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if value == 0.0 {
            return self.stream.memset_zeros(buf).map_err(|e| cuda("memset", e));
        }
        elementwise::fill(self, buf, value as f32)
    }
    fn copy(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len("copy", "dst", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(|e| cuda("copy", e))
    }
    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda("synchronize", e))?;
        synced();
        Ok(())
    }
    fn scratch(&self, len: usize) -> Result<CudaSlice<f32>> {
        // The arena's: a warm op allocates nothing (capturable).
        self.take_scratch(len)
    }
    fn recycle(&self, buf: CudaSlice<f32>) {
        self.give_scratch(buf)
    }
    fn channels_last_eval(&self) -> bool {
        // Auto: channels-last where the native channels-last kernel runs the units (tf32 /
        // bf16 with the mma kernels allowed); at f32 the units would be layout changes around
        // the NCHW op.
        match self.eval_layout {
            LayoutChoice::Nhwc => true,
            LayoutChoice::Nchw => false,
            LayoutChoice::Auto => {
                self.precision().tensor_cores() && self.mma_route != conv::MmaRoute::Never
            }
        }
    }

    fn channels_last_train(&self) -> bool {
        // Auto: as the eval layout, channels-last where the native channels-last kernels run
        // the units' forward and both gradients (tf32 / bf16 with the mma kernels allowed).
        match self.train_layout {
            LayoutChoice::Nhwc => true,
            LayoutChoice::Nchw => false,
            LayoutChoice::Auto => {
                self.precision().tensor_cores() && self.mma_route != conv::MmaRoute::Never
            }
        }
    }

    fn eval_storage(&self) -> ActStorage {
        // bf16 only where the convolutions round their activation operand to bf16 anyway.
        match (self.eval_storage, self.precision()) {
            (StorageChoice::Auto | StorageChoice::Bf16, Precision::Bf16) => ActStorage::Bf16,
            _ => ActStorage::F32,
        }
    }
    fn force_f32_eval_storage(&mut self) {
        self.eval_storage = StorageChoice::F32;
    }
    fn train_storage(&self) -> ActStorage {
        // As the eval storage, and only on a channels-last training backbone.
        match (self.train_storage, self.precision()) {
            (StorageChoice::Auto | StorageChoice::Bf16, Precision::Bf16)
                if self.channels_last_train() =>
            {
                ActStorage::Bf16
            }
            _ => ActStorage::F32,
        }
    }
    fn force_f32_train_storage(&mut self) {
        self.train_storage = StorageChoice::F32;
    }
    unsafe fn pack_bf16_unchecked(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        channels::pack_bf16(self, x.len(), x, y)
    }
    unsafe fn unpack_bf16_unchecked(
        &self,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        channels::unpack_bf16(self, y.len(), x, y)
    }
    fn storage_slots(&self, st: ActStorage, values: usize) -> usize {
        match st {
            ActStorage::F32 => values,
            ActStorage::Bf16 => values.div_ceil(2),
        }
    }
    unsafe fn conv2d_bn_eval_fwd_nhwc_bf16_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &CudaSlice<f32>,
        running_var: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The opted-in wgmma kernel where it runs the shape, else the native bf16-storage
        // kernel where it does (at bf16 with the mma kernels allowed), else conversions
        // around the channels-last unit.
        if self.conv_bn_eval_nhwc_bf16s_wgmma(s, self.ptr(x)) {
            self.conv2d_bn_eval_fwd_nhwc_bf16s_wgmma(
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                residual,
                relu,
                y,
            )
        } else if self.conv_bn_eval_nhwc_bf16s_native(s) {
            self.conv2d_bn_eval_fwd_nhwc_bf16s_native(
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                residual,
                relu,
                y,
            )
        } else {
            self.conv2d_bn_eval_fwd_nhwc_bf16_by_conversions(
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                residual,
                relu,
                y,
            )
        }
    }

    // ---- convolution ---------------------------------------------------------------------
    unsafe fn conv2d_fwd_unchecked(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        conv::conv2d_fwd(self, s, x, w, y)
    }
    unsafe fn conv2d_bn_eval_fwd_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &CudaSlice<f32>,
        running_var: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // One fused launch (conv with the normalisation, residual and ReLU in its epilogue)
        // after a per-channel fold of the running statistics into scale and shift, whose
        // 2 * c_out values come from the arena (nothing allocated once warm: capturable).
        if s.y_len() == 0 {
            return Ok(());
        }
        norm::with_bn_eval_fold(self, bn, gamma, beta, running_mean, running_var, |ss| {
            let ep = conv::BnEpilogue { ss, residual, relu };
            conv::conv2d_bn_eval_fwd(self, s, x, w, &ep, y)
        })
    }
    unsafe fn conv2d_bn_eval_fwd_nhwc_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &CudaSlice<f32>,
        running_var: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The native channels-last kernel where it runs the shape (tf32 / bf16), else the
        // layout changes around the NCHW op.
        if self.conv_bn_eval_nhwc_native(s) {
            self.conv2d_bn_eval_fwd_nhwc_native(
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                residual,
                relu,
                y,
            )
        } else {
            conv2d_bn_eval_fwd_nhwc_by_transposes(
                self,
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                residual,
                relu,
                y,
            )
        }
    }
    unsafe fn conv2d_bn_train_fwd_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &mut CudaSlice<f32>,
        running_var: &mut CudaSlice<f32>,
        save_mean: &mut CudaSlice<f32>,
        save_invstd: &mut CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
    ) -> Result<()> {
        // The statistics in the convolution's epilogue (partial sums per channel and pixel
        // tile, from the f64 arena; on the split-K path in the kernel that sums the splits),
        // combined per channel, then one pass over z that also adds the residual and applies
        // the ReLU (a block's join). An empty output or reduction takes the separate passes.
        let done = self.train_fwd_from_partials(
            norm::Layout::Nchw,
            s,
            bn,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            z,
            y,
            residual,
            relu,
            |z, part_s, part_q| conv::conv2d_fwd_stats(self, s, x, w, z, part_s, part_q),
        );
        if let Some(r) = done {
            return r;
        }
        conv::conv2d_fwd(self, s, x, w, z)?;
        norm::batchnorm_train_fwd(
            self,
            bn,
            z,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            y,
            residual,
            relu,
        )
    }
    unsafe fn conv2d_bn_train_fwd_nhwc_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &mut CudaSlice<f32>,
        running_var: &mut CudaSlice<f32>,
        save_mean: &mut CudaSlice<f32>,
        save_invstd: &mut CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
    ) -> Result<()> {
        // As the NCHW op: the statistics from the convolution's epilogue, combined, then one
        // channels-last pass over z that adds the residual and applies the ReLU. The
        // convolution with its statistics: the native channels-last kernel where it runs the
        // shape (tf32 / bf16), else the NCHW kernel between two layout changes (x in, z out;
        // its partials are a channels-last kernel's, the pixel order being the same). An
        // empty output or reduction takes the layout changes around the NCHW op.
        let done = self.train_fwd_from_partials(
            norm::Layout::Nhwc,
            s,
            bn,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            z,
            y,
            residual,
            relu,
            |z, part_s, part_q| {
                if self.conv_fwd_stats_nhwc_native(s) {
                    // SAFETY: x, w and z hold the lengths `s` gives (checked by the trait
                    // op), part_s and part_q c_out * tiles values.
                    return unsafe {
                        self.conv2d_fwd_stats_nhwc_native(s, x, w, z, part_s, part_q)
                    };
                }
                let t_in = Transpose {
                    n: s.n,
                    c: s.c_in,
                    hw: s.h * s.w,
                };
                let t_out = Transpose {
                    n: s.n,
                    c: s.c_out,
                    hw: s.out_h() * s.out_w(),
                };
                nchw_between_layout_changes(self, &[(x, t_in)], &mut [(z, t_out)], |i, o| {
                    conv::conv2d_fwd_stats(self, s, &i[0], w, &mut o[0], part_s, part_q)
                })
            },
        );
        if let Some(r) = done {
            return r;
        }
        conv2d_bn_train_fwd_nhwc_by_transposes(
            self,
            s,
            bn,
            x,
            w,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            z,
            y,
            residual,
            relu,
        )
    }
    unsafe fn conv2d_bn_train_fwd_nhwc_bf16_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &mut CudaSlice<f32>,
        running_var: &mut CudaSlice<f32>,
        save_mean: &mut CudaSlice<f32>,
        save_invstd: &mut CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        relu: bool,
    ) -> Result<()> {
        // The native bf16-storage kernel where it runs the shape (bf16: x and z in bf16, the
        // partials of the rounded z), else by conversions (the statistics those of the
        // rounded z too).
        if self.conv_fwd_stats_nhwc_bf16s_native(s) {
            let done = self.train_fwd_from_partials(
                norm::Layout::NhwcBf16,
                s,
                bn,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                z,
                y,
                residual,
                relu,
                |z, part_s, part_q| {
                    // SAFETY: x, w and z hold the lengths `s` gives in bf16 storage (the
                    // trait op checked them), part_s and part_q c_out * tiles values. The
                    // opted-in wgmma kernel where it runs the shape (conv_wgmma.rs).
                    unsafe {
                        if self.conv_fwd_stats_nhwc_bf16s_wgmma(s, self.ptr(x)) {
                            self.conv2d_fwd_stats_nhwc_bf16s_wgmma(s, x, w, z, part_s, part_q)
                        } else {
                            self.conv2d_fwd_stats_nhwc_bf16s_native(s, x, w, z, part_s, part_q)
                        }
                    }
                },
            );
            if let Some(r) = done {
                return r;
            }
        }
        conv2d_bn_train_fwd_nhwc_bf16_by_conversions(
            self,
            s,
            bn,
            x,
            w,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            z,
            y,
            residual,
            relu,
        )
    }
    unsafe fn batchnorm_bwd_nhwc_bf16_unchecked(
        &self,
        s: &BatchNorm2d,
        z: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        save_mean: &CudaSlice<f32>,
        save_invstd: &CudaSlice<f32>,
        dz: &mut CudaSlice<f32>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        norm::batchnorm_bwd_nhwc_bf16(
            self,
            s,
            z,
            y,
            dy,
            gamma,
            save_mean,
            save_invstd,
            dz,
            dgamma,
            dbeta,
            relu,
        )
    }
    unsafe fn conv2d_bwd_data_nhwc_bf16_unchecked(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The opted-in wgmma kernel where it runs the shape (conv_wgmma.rs), else the native
        // kernel on dy in bf16 storage where it runs the shape (bf16), else dy unpacked into
        // scratch and the f32-storage op.
        if self.conv_bwd_data_nhwc_bf16s_wgmma(s, self.ptr(dy)) {
            // SAFETY: dy (bf16 storage), w and dx hold the lengths `s` gives (checked).
            return unsafe { self.conv2d_bwd_data_nhwc_bf16s_wgmma(s, dy, w, dx) };
        }
        if self.conv_bwd_data_nhwc_bf16s_native(s) {
            // SAFETY: dy (bf16 storage), w and dx hold the lengths `s` gives (checked).
            return unsafe { self.conv2d_bwd_data_nhwc_bf16s_native(s, dy, w, dx) };
        }
        through_bf16_storage(self, &[(dy, s.y_len())], &mut [], |i, _| {
            self.conv2d_bwd_data_nhwc(s, &i[0], w, dx)
        })
    }
    unsafe fn conv2d_bwd_weight_nhwc_bf16_unchecked(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The opt-in wgmma kernel where it runs (sm_90a, the switch on, channel counts % 8,
        // aligned), else the native mma.sync kernel on x and dy in bf16 storage where it runs
        // the shape (bf16), else both unpacked into scratch and the f32-storage op.
        if self.conv_bwd_weight_nhwc_bf16s_wgmma(s, self.ptr(x), self.ptr(dy)) {
            // SAFETY: x, dy (bf16 storage) and dw hold the lengths `s` gives (checked).
            return unsafe { self.conv2d_bwd_weight_nhwc_bf16s_wgmma(s, x, dy, dw) };
        }
        if self.conv_bwd_weight_nhwc_bf16s_native(s) {
            // SAFETY: x, dy (bf16 storage) and dw hold the lengths `s` gives (checked).
            return unsafe { self.conv2d_bwd_weight_nhwc_bf16s_native(s, x, dy, dw) };
        }
        through_bf16_storage(self, &[(x, s.x_len()), (dy, s.y_len())], &mut [], |i, _| {
            self.conv2d_bwd_weight_nhwc(s, &i[0], &i[1], dw)
        })
    }
    unsafe fn relu_bwd_bf16_unchecked(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        elementwise::relu_bwd_bf16(self, y, dy, dx)
    }
    unsafe fn conv2d_bwd_data_unchecked(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        conv::conv2d_bwd_data(self, s, dy, w, dx)
    }
    unsafe fn conv2d_bwd_data_nhwc_unchecked(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The native channels-last kernel where it runs the shape (tf32 / bf16), else layout
        // changes around the NCHW kernels.
        if self.conv_bwd_data_nhwc_native(s) {
            // SAFETY: dy, w and dx hold the lengths `s` gives (the trait op checked them).
            return unsafe { self.conv2d_bwd_data_nhwc_native(s, dy, w, dx) };
        }
        conv2d_bwd_data_nhwc_by_transposes(self, s, dy, w, dx)
    }
    unsafe fn conv2d_bwd_weight_nhwc_unchecked(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        // The native channels-last kernel where it runs the shape (tf32 / bf16), else layout
        // changes around the NCHW kernels.
        if self.conv_bwd_weight_nhwc_native(s) {
            // SAFETY: x, dy and dw hold the lengths `s` gives (the trait op checked them).
            return unsafe { self.conv2d_bwd_weight_nhwc_native(s, x, dy, dw) };
        }
        conv2d_bwd_weight_nhwc_by_transposes(self, s, x, dy, dw)
    }
    unsafe fn batchnorm_bwd_nhwc_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        save_mean: &CudaSlice<f32>,
        save_invstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        norm::batchnorm_bwd_nhwc(
            self,
            s,
            x,
            y,
            dy,
            gamma,
            save_mean,
            save_invstd,
            dx,
            dgamma,
            dbeta,
            relu,
        )
    }
    unsafe fn conv2d_bwd_weight_unchecked(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        conv::conv2d_bwd_weight(self, s, x, dy, dw)
    }
    unsafe fn batchnorm_train_fwd_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &mut CudaSlice<f32>,
        running_var: &mut CudaSlice<f32>,
        save_mean: &mut CudaSlice<f32>,
        save_invstd: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        norm::batchnorm_train_fwd(
            self,
            s,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            y,
            None,
            relu,
        )
    }
    unsafe fn batchnorm_eval_fwd_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        running_mean: &CudaSlice<f32>,
        running_var: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        norm::batchnorm_eval_fwd(self, s, x, gamma, beta, running_mean, running_var, y, relu)
    }
    unsafe fn batchnorm_bwd_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        save_mean: &CudaSlice<f32>,
        save_invstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        norm::batchnorm_bwd(
            self,
            s,
            x,
            y,
            dy,
            gamma,
            save_mean,
            save_invstd,
            dx,
            dgamma,
            dbeta,
            relu,
        )
    }
    fn relu_fwd(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        elementwise::relu_fwd(self, x, y)
    }
    fn relu_bwd(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        elementwise::relu_bwd(self, y, dy, dx)
    }
    fn add_relu_fwd(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        elementwise::add_relu_fwd(self, a, b, y)
    }
    fn add_assign(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        elementwise::add_assign(self, y, x)
    }
    fn scale_assign(&self, y: &mut CudaSlice<f32>, alpha: f64) -> Result<()> {
        elementwise::scale_assign(self, y, alpha)
    }
    unsafe fn maxpool2d_fwd_unchecked(
        &self,
        s: &Pool2d,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        pool::maxpool2d_fwd(self, s, x, y)
    }
    unsafe fn maxpool2d_bwd_unchecked(
        &self,
        s: &Pool2d,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        pool::maxpool2d_bwd(self, s, x, y, dy, dx)
    }
    unsafe fn global_avg_pool_fwd_unchecked(
        &self,
        rows: usize,
        hw: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        pool::global_avg_pool_fwd(self, rows, hw, x, y)
    }
    unsafe fn global_avg_pool_bwd_unchecked(
        &self,
        rows: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        pool::global_avg_pool_bwd(self, rows, hw, dy, dx)
    }
    unsafe fn linear_fwd_unchecked(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        dense::linear_fwd(self, m, k, n, x, w, b, y)
    }
    unsafe fn linear_bwd_unchecked(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        dense::linear_bwd(self, m, k, n, x, w, dy, dx, dw, db)
    }
    unsafe fn lstm_fwd_unchecked(
        &self,
        s: &Lstm,
        x: &CudaSlice<f32>,
        w_ih: &CudaSlice<f32>,
        w_hh: &CudaSlice<f32>,
        b_ih: &CudaSlice<f32>,
        b_hh: &CudaSlice<f32>,
        h_seq: &mut CudaSlice<f32>,
        c_seq: &mut CudaSlice<f32>,
        gates: &mut CudaSlice<f32>,
    ) -> Result<()> {
        lstm::lstm_fwd(self, s, x, w_ih, w_hh, b_ih, b_hh, h_seq, c_seq, gates)
    }
    unsafe fn lstm_bwd_unchecked(
        &self,
        s: &Lstm,
        x: &CudaSlice<f32>,
        w_ih: &CudaSlice<f32>,
        w_hh: &CudaSlice<f32>,
        h_seq: &CudaSlice<f32>,
        c_seq: &CudaSlice<f32>,
        gates: &CudaSlice<f32>,
        dh_seq: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dw_ih: &mut CudaSlice<f32>,
        dw_hh: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        lstm::lstm_bwd(
            self, s, x, w_ih, w_hh, h_seq, c_seq, gates, dh_seq, dx, dw_ih, dw_hh, db,
        )
    }
    fn bce_with_logits(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        pos_weight: f64,
        dlogits: &mut CudaSlice<f32>,
    ) -> Result<f64> {
        loss::bce_with_logits(self, logits, targets, pos_weight, dlogits)
    }
    fn sgd_step(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        first_step: bool,
    ) -> Result<()> {
        optim::sgd_step(self, p, g, m, lr, momentum, weight_decay, first_step)
    }
    fn adam_step(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<()> {
        optim::adam_step(self, p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
    }
    unsafe fn cam_weight_unchecked(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        features: &CudaSlice<f32>,
        weights: &CudaSlice<f32>,
        cam: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cam::cam_weight(self, n, c, hw, features, weights, cam)
    }
    unsafe fn cam_normalized_unchecked(
        &self,
        n: usize,
        c: usize,
        fh: usize,
        fw: usize,
        oh: usize,
        ow: usize,
        features: &CudaSlice<f32>,
        weights: &CudaSlice<f32>,
        cam: &mut CudaSlice<f32>,
        norm: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cam::cam_normalized(self, n, c, fh, fw, oh, ow, features, weights, cam, norm)
    }
    unsafe fn gradcam_unchecked(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        features: &CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cam::gradcam(self, n, c, hw, features, grads, out)
    }
    unsafe fn upsample_bilinear_unchecked(
        &self,
        n: usize,
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cam::upsample_bilinear(self, n, h, w, oh, ow, x, y)
    }
    unsafe fn minmax_normalize_unchecked(
        &self,
        n: usize,
        len: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        cam::minmax_normalize(self, n, len, x, y)
    }
    unsafe fn bias_relu_assign_unchecked(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        bias::bias_relu_assign(self, n, c, hw, b, y, relu)
    }
    unsafe fn bias_bwd_unchecked(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        bias::bias_bwd(self, n, c, hw, dy, db)
    }
    unsafe fn upconv2d_fwd_unchecked(
        &self,
        s: &UpConv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        upconv::upconv2d_fwd(self, s, x, w, b, y)
    }
    unsafe fn upconv2d_bwd_unchecked(
        &self,
        s: &UpConv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        upconv::upconv2d_bwd(self, s, x, w, dy, dx, dw, db)
    }
    unsafe fn copy_channels_unchecked(
        &self,
        s: &ChannelCopy,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        channels::copy_channels(self, s, src, dst, accumulate)
    }
    unsafe fn nchw_to_nhwc_unchecked(
        &self,
        s: &Transpose,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        channels::nchw_to_nhwc(self, s, x, y)
    }
    unsafe fn nhwc_to_nchw_unchecked(
        &self,
        s: &Transpose,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        channels::nhwc_to_nchw(self, s, x, y)
    }
    unsafe fn nchw_to_nhwc_bf16_unchecked(
        &self,
        s: &Transpose,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        channels::nchw_to_nhwc_bf16(self, s, x, y)
    }
    unsafe fn nhwc_bf16_to_nchw_unchecked(
        &self,
        s: &Transpose,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        channels::nhwc_bf16_to_nchw(self, s, x, y)
    }
    fn sigmoid_fwd(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        dice::sigmoid_fwd(self, x, y)
    }
    fn sigmoid_bwd(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        dice::sigmoid_bwd(self, y, dy, dx)
    }
    unsafe fn soft_dice_loss_unchecked(
        &self,
        s: &SoftDice,
        probs: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        dprobs: &mut CudaSlice<f32>,
    ) -> Result<f64> {
        dice::soft_dice_loss(self, s, probs, targets, dprobs)
    }
}
