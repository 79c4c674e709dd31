//! [`CudaBackend`]: the op trait over device buffers (`CudaSlice<f32>`), each op one or a few
//! launches of the kernels in `kernels/*.cu` on one stream. Shapes are checked on the host
//! exactly as the CPU reference checks them; dimensions are passed to the kernels as i32
//! (a buffer longer than i32::MAX elements is refused), tensor offsets are 64-bit in-kernel.
//! Every launch's arguments are checked against the kernel's PTX parameter list, and a grid
//! dimension over the device's limit is a shape error before any launch.
//!
//! One stream and no cross-stream event tracking: every launch and copy is ordered on that
//! stream, and a buffer freed on the host is freed stream-ordered after the work queued on it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::device::{cuda, cuda_available, driver_present, launched, synced, DeviceInfo};
use super::module::{ModuleCache, ParamKind};
use crate::engine::backend::Backend;
use crate::engine::shapes::{BatchNorm2d, ChannelCopy, Conv2d, Lstm, Pool2d, SoftDice, UpConv2d};
use crate::engine::{check_len, EngineError, Result};

/// A kernel argument: a device pointer or a scalar.
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    F64(f64),
}

const THREADS: u32 = 256;
/// Blocks of the grid-stride elementwise kernels: enough to fill any current GPU.
const MAX_BLOCKS: usize = 65_536;

/// The CUDA backend (f32) on one device. A clone shares the context, the stream and the
/// loaded kernels.
#[derive(Clone)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Arc<ModuleCache>,
    info: DeviceInfo,
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
        Ok(CudaBackend {
            ctx,
            stream,
            modules,
            info,
        })
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

    /// Function `name` of `kernels/<module>.cu`, loaded on first use and cached.
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        self.modules.function(module, name)
    }

    /// The raw device address of a buffer (for kernel arguments and offsets into it).
    pub fn ptr(&self, buf: &CudaSlice<f32>) -> u64 {
        let (p, _sync) = buf.device_ptr(&self.stream);
        p
    }

    /// Launches `module::name` on this backend's stream with `args`. Their number and kinds
    /// are checked against the kernel's PTX parameters (an error naming the kernel, not a
    /// launch); what the pointers point to is the caller's to get right, which is what makes
    /// this wrapper sound only for the kernels of this crate.
    pub fn launch(&self, module: &str, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        let (f, params) = self.modules.function_with_params(module, name)?;
        check_args(module, name, &params, args)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                KArg::Ptr(v) => b.arg(v),
                KArg::I32(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
                KArg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: the argument list mirrors the kernel's parameters (see each call site), and
        // every buffer's length was checked against the shape the kernel indexes.
        unsafe { b.launch(cfg) }.map_err(|e| cuda(&format!("launch {module}::{name}"), e))?;
        launched(module, name);
        Ok(())
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return empty_slice(&self.stream);
        }
        // SAFETY: every caller overwrites the whole buffer before reading it.
        unsafe { self.stream.alloc::<f32>(len) }.map_err(|e| oom(e, len * 4))
    }

    fn alloc_f64(&self, len: usize) -> Result<CudaSlice<f64>> {
        // SAFETY: the kernels write every element before any is read.
        unsafe { self.stream.alloc::<f64>(len.max(1)) }.map_err(|e| oom(e, len * 8))
    }

    fn ptr_f64(&self, buf: &CudaSlice<f64>) -> u64 {
        let (p, _sync) = buf.device_ptr(&self.stream);
        p
    }

    /// (splits, chunk) of a batch-norm channel reduction: enough blocks to fill the GPU, at
    /// least 4096 values per block; a function of the shape and the GPU only, so the order of
    /// the f64 sums does not change from call to call.
    fn bn_split(&self, s: &BatchNorm2d) -> (usize, usize) {
        let count = s.n * s.hw;
        let target = 4 * self.info.multiprocessors.max(1) as usize;
        let want = target
            .div_ceil(s.c.max(1))
            .clamp(1, count.div_ceil(4096).clamp(1, 65_535));
        let chunk = count.div_ceil(want);
        (count.div_ceil(chunk), chunk)
    }

    /// Grid-stride launch shape for `n` elements.
    fn grid(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// y = op(A) . op(B) (+ bias) (+ y when accumulate); see kernels/dense.cu.
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        a: u64,
        b: u64,
        c: u64,
        bias: u64,
        m: usize,
        n: usize,
        k: usize,
        lda: usize,
        ldb: usize,
        ldc: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x("sgemm", n.div_ceil(64))?,
                grid_yz("sgemm", m.div_ceil(64))?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "dense",
            "sgemm",
            cfg,
            &[
                KArg::Ptr(a),
                KArg::Ptr(b),
                KArg::Ptr(c),
                KArg::Ptr(bias),
                i(m)?,
                i(n)?,
                i(k)?,
                i(lda)?,
                i(ldb)?,
                i(ldc)?,
                KArg::I32(trans_a as i32),
                KArg::I32(trans_b as i32),
                KArg::I32(accumulate as i32),
            ],
        )
    }

    fn colsum(&self, x: u64, out: u64, m: usize, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "dense",
            "colsum",
            Self::grid(n),
            &[KArg::Ptr(x), KArg::Ptr(out), i(m)?, i(n)?],
        )
    }

    /// The launch shape and int arguments shared by the three convolution kernels.
    fn conv_args(s: &Conv2d) -> Result<Vec<KArg>> {
        Ok(vec![
            i(s.n)?,
            i(s.c_in)?,
            i(s.h)?,
            i(s.w)?,
            i(s.c_out)?,
            i(s.kh)?,
            i(s.kw)?,
            i(s.stride)?,
            i(s.pad)?,
            i(s.out_h())?,
            i(s.out_w())?,
        ])
    }

    fn elementwise(&self, name: &str, bufs: &[u64], n: usize, scalar: Option<f32>) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut args: Vec<KArg> = bufs.iter().map(|&p| KArg::Ptr(p)).collect();
        if let Some(s) = scalar {
            args.push(KArg::F32(s));
        }
        args.push(i(n)?);
        self.launch("elementwise", name, Self::grid(n), &args)
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
pub(crate) fn empty_slice<T>(stream: &Arc<CudaStream>) -> Result<CudaSlice<T>> {
    // SAFETY: the byte is never read or written.
    let one = unsafe { stream.alloc::<u8>(1) }.map_err(|e| cuda("alloc", e))?;
    let ptr = one.leak();
    // SAFETY: `ptr` is a live allocation large enough for 0 elements of T; the returned
    // slice owns it and frees it when dropped.
    Ok(unsafe { stream.upgrade_device_ptr::<T>(ptr, 0) })
}

/// Checks a launch's arguments against the kernel's PTX parameters: a device pointer or a
/// 64-bit length for a 64-bit integer, an i32 for a 32-bit one, f32/f64 for floats.
fn check_args(module: &str, name: &str, params: &[ParamKind], args: &[KArg]) -> Result<()> {
    let bad = |msg: String| {
        Err(EngineError::Cuda {
            op: format!("launch {module}::{name}"),
            msg,
        })
    };
    if params.len() != args.len() {
        return bad(format!(
            "{} arguments for the {} parameters of the kernel's PTX",
            args.len(),
            params.len()
        ));
    }
    for (i, (a, p)) in args.iter().zip(params).enumerate() {
        let ok = matches!(
            (a, p),
            (KArg::Ptr(_), ParamKind::Int(8))
                | (KArg::I32(_), ParamKind::Int(4))
                | (KArg::F32(_), ParamKind::Float(4))
                | (KArg::F64(_), ParamKind::Float(8))
        );
        if !ok {
            return bad(format!(
                "argument {i} is {a:?} but the kernel's PTX parameter {i} is {p}"
            ));
        }
    }
    Ok(())
}

/// A grid's x dimension (at most 2^31 - 1 blocks).
fn grid_x(op: &'static str, blocks: usize) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| EngineError::Shape {
            op,
            detail: format!("{blocks} blocks exceed the grid's x limit (2^31 - 1)"),
        })
}

/// A grid's y or z dimension (at most 65535 blocks).
fn grid_yz(op: &'static str, blocks: usize) -> Result<u32> {
    if blocks > 65_535 {
        return Err(EngineError::Shape {
            op,
            detail: format!("{blocks} blocks exceed the grid's y/z limit of 65535"),
        });
    }
    Ok(blocks as u32)
}

/// An i32 kernel argument, refusing sizes the kernels' int indexing cannot hold.
fn i(v: usize) -> Result<KArg> {
    i32::try_from(v)
        .map(KArg::I32)
        .map_err(|_| EngineError::Shape {
            op: "cuda",
            detail: format!("size {v} exceeds the kernels' 32-bit indexing"),
        })
}

fn oom(e: cudarc::driver::DriverError, bytes: usize) -> EngineError {
    match cuda("alloc", e) {
        EngineError::OutOfMemory { .. } => EngineError::OutOfMemory { bytes },
        other => other,
    }
}

fn check_pool(op: &'static str, s: &Pool2d) -> Result<()> {
    let bad = |detail: String| Err(EngineError::Shape { op, detail });
    if s.k == 0 || s.stride == 0 {
        return bad("kernel and stride must be at least 1".into());
    }
    if 2 * s.pad > s.k {
        return bad(format!("padding {} exceeds half the kernel {}", s.pad, s.k));
    }
    if s.k > s.h + 2 * s.pad || s.k > s.w + 2 * s.pad {
        return bad(format!(
            "kernel {} larger than the padded input {}x{}",
            s.k,
            s.h + 2 * s.pad,
            s.w + 2 * s.pad
        ));
    }
    Ok(())
}

fn check_bn(op: &'static str, s: &BatchNorm2d, lens: &[(&str, usize, usize)]) -> Result<()> {
    for &(what, got, want) in lens {
        check_len(op, what, got, want)?;
    }
    let _ = s;
    Ok(())
}

impl Backend for CudaBackend {
    type T = f32;
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        format!("cuda:{} {}", self.info.ordinal, self.info.name)
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return empty_slice(&self.stream);
        }
        self.stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| oom(e, len * 4))
    }
    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        if host.is_empty() {
            return empty_slice(&self.stream);
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| oom(e, host.len() * 4))
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        let host = self
            .stream
            .clone_dtoh(buf)
            .map_err(|e| cuda("download", e))?;
        synced();
        Ok(host)
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
        let p = self.ptr(buf);
        self.elementwise("fill_f32", &[p], buf.len(), Some(value as f32))
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

    // ---- convolution ---------------------------------------------------------------------
    fn conv2d_fwd(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_fwd";
        crate::engine::cpu::conv::check_shape(OP, s)?;
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "w", w.len(), s.w_len())?;
        check_len(OP, "y", y.len(), s.y_len())?;
        let p = s.n * s.out_h() * s.out_w();
        if p == 0 || s.c_out == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x(OP, p.div_ceil(64))?,
                grid_yz(OP, s.c_out.div_ceil(64))?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(w)),
            KArg::Ptr(self.ptr(y)),
        ];
        args.extend(Self::conv_args(s)?);
        i(s.y_len())?;
        i(s.x_len())?;
        self.launch("conv", "conv2d_fwd", cfg, &args)
    }

    fn conv2d_bwd_data(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_data";
        crate::engine::cpu::conv::check_shape(OP, s)?;
        check_len(OP, "dy", dy.len(), s.y_len())?;
        check_len(OP, "w", w.len(), s.w_len())?;
        check_len(OP, "dx", dx.len(), s.x_len())?;
        let p = s.n * s.h * s.w;
        if p == 0 || s.c_in == 0 {
            return Ok(());
        }
        i(s.y_len())?;
        i(s.x_len())?;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x(OP, p.div_ceil(64))?,
                grid_yz(OP, s.c_in.div_ceil(64))?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![
            KArg::Ptr(self.ptr(dy)),
            KArg::Ptr(self.ptr(w)),
            KArg::Ptr(self.ptr(dx)),
        ];
        args.extend(Self::conv_args(s)?);
        self.launch("conv", "conv2d_bwd_data", cfg, &args)
    }

    fn conv2d_bwd_weight(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight";
        crate::engine::cpu::conv::check_shape(OP, s)?;
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "dy", dy.len(), s.y_len())?;
        check_len(OP, "dw", dw.len(), s.w_len())?;
        i(s.y_len())?;
        i(s.x_len())?;
        let nc = s.c_in * s.kh * s.kw;
        let k = s.n * s.out_h() * s.out_w();
        if nc == 0 || s.c_out == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.fill(dw, 0.0);
        }
        // Split the reduction over batch*OH*OW so that the grid fills the GPU; each split
        // covers at least 256 pixels.
        let tiles = s.c_out.div_ceil(64) * nc.div_ceil(64);
        let target = 4 * self.info.multiprocessors.max(1) as usize;
        let max_splits = (k / 256).clamp(1, 65_535);
        let want = target.div_ceil(tiles).clamp(1, max_splits);
        let chunk = k.div_ceil(want).div_ceil(16) * 16;
        let splits = k.div_ceil(chunk);
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x(OP, nc.div_ceil(64))?,
                grid_yz(OP, s.c_out.div_ceil(64))?,
                grid_yz(OP, splits)?,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ws = if splits > 1 {
            Some(self.alloc(splits * s.w_len())?)
        } else {
            None
        };
        let out = match &ws {
            Some(ws) => self.ptr(ws),
            None => self.ptr(dw),
        };
        let mut args = vec![
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(dy)),
            KArg::Ptr(out),
        ];
        args.extend(Self::conv_args(s)?);
        args.push(i(chunk)?);
        self.launch("conv", "conv2d_bwd_weight", cfg, &args)?;
        if let Some(ws) = &ws {
            let len = s.w_len();
            self.launch(
                "conv",
                "conv_splitk_reduce",
                Self::grid(len),
                &[
                    KArg::Ptr(self.ptr(ws)),
                    KArg::Ptr(self.ptr(dw)),
                    i(splits)?,
                    i(len)?,
                ],
            )?;
        }
        Ok(())
    }

    // ---- batch norm ----------------------------------------------------------------------
    fn batchnorm_train_fwd(
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
        const OP: &str = "batchnorm_train_fwd";
        check_bn(
            OP,
            s,
            &[
                ("x", x.len(), s.len()),
                ("y", y.len(), s.len()),
                ("gamma", gamma.len(), s.c),
                ("beta", beta.len(), s.c),
                ("running_mean", running_mean.len(), s.c),
                ("running_var", running_var.len(), s.c),
                ("save_mean", save_mean.len(), s.c),
                ("save_invstd", save_invstd.len(), s.c),
            ],
        )?;
        let count = s.n * s.hw;
        if count < 2 {
            return Err(EngineError::Shape {
                op: OP,
                detail: format!(
                    "training needs more than one value per channel, got n*hw = {count}"
                ),
            });
        }
        if s.c == 0 {
            return Ok(());
        }
        i(s.len())?;
        let (split, chunk) = self.bn_split(s);
        let part = self.alloc_f64(s.c * split)?;
        let stats = self.alloc_f64(2 * s.c)?;
        let (pp, ps) = (self.ptr_f64(&part), self.ptr_f64(&stats));
        // One block row per channel: C is the grid's y dimension.
        let red = LaunchConfig {
            grid_dim: (grid_x(OP, split)?, grid_yz(OP, s.c)?, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let per_c = LaunchConfig {
            grid_dim: (s.c.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, c, hw, ch, sp) = (i(s.n)?, i(s.c)?, i(s.hw)?, i(chunk)?, i(split)?);
        let xp = KArg::Ptr(self.ptr(x));
        // mean, then squared deviations from it (two passes), then normalise.
        self.launch(
            "norm",
            "bn_partial",
            red,
            &[xp, KArg::Ptr(0), KArg::Ptr(pp), n, c, hw, ch],
        )?;
        self.launch(
            "norm",
            "bn_finalize_mean",
            per_c,
            &[KArg::Ptr(pp), KArg::Ptr(ps), c, sp, n, hw],
        )?;
        self.launch(
            "norm",
            "bn_partial",
            red,
            &[xp, KArg::Ptr(ps), KArg::Ptr(pp), n, c, hw, ch],
        )?;
        let (sm, si) = (
            KArg::Ptr(self.ptr(save_mean)),
            KArg::Ptr(self.ptr(save_invstd)),
        );
        let fin = [
            KArg::Ptr(pp),
            KArg::Ptr(ps),
            KArg::Ptr(self.ptr(running_mean)),
            KArg::Ptr(self.ptr(running_var)),
            sm,
            si,
            c,
            sp,
            n,
            hw,
            KArg::F64(s.eps),
            KArg::F64(s.momentum),
        ];
        self.launch("norm", "bn_finalize_var", per_c, &fin)?;
        let args = [
            xp,
            KArg::Ptr(self.ptr(gamma)),
            KArg::Ptr(self.ptr(beta)),
            sm,
            si,
            KArg::Ptr(self.ptr(y)),
            i(s.len())?,
            c,
            hw,
            KArg::I32(relu as i32),
        ];
        self.launch("norm", "bn_apply", Self::grid(s.len()), &args)
    }

    fn batchnorm_eval_fwd(
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
        const OP: &str = "batchnorm_eval_fwd";
        check_bn(
            OP,
            s,
            &[
                ("x", x.len(), s.len()),
                ("y", y.len(), s.len()),
                ("gamma", gamma.len(), s.c),
                ("beta", beta.len(), s.c),
                ("running_mean", running_mean.len(), s.c),
                ("running_var", running_var.len(), s.c),
            ],
        )?;
        let total = s.len();
        if total == 0 {
            return Ok(());
        }
        let args = [
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(gamma)),
            KArg::Ptr(self.ptr(beta)),
            KArg::Ptr(self.ptr(running_mean)),
            KArg::Ptr(self.ptr(running_var)),
            KArg::Ptr(self.ptr(y)),
            i(total)?,
            i(s.c)?,
            i(s.hw)?,
            KArg::F32(s.eps as f32),
            KArg::I32(relu as i32),
        ];
        self.launch("norm", "bn_eval_fwd", Self::grid(total), &args)
    }

    fn batchnorm_bwd(
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
        const OP: &str = "batchnorm_bwd";
        check_bn(
            OP,
            s,
            &[
                ("x", x.len(), s.len()),
                ("y", y.len(), s.len()),
                ("dy", dy.len(), s.len()),
                ("dx", dx.len(), s.len()),
                ("gamma", gamma.len(), s.c),
                ("save_mean", save_mean.len(), s.c),
                ("save_invstd", save_invstd.len(), s.c),
                ("dgamma", dgamma.len(), s.c),
                ("dbeta", dbeta.len(), s.c),
            ],
        )?;
        if s.c == 0 {
            return Ok(());
        }
        if s.n * s.hw == 0 {
            self.fill(dgamma, 0.0)?;
            return self.fill(dbeta, 0.0);
        }
        i(s.len())?;
        let (split, chunk) = self.bn_split(s);
        let part1 = self.alloc_f64(s.c * split)?;
        let part2 = self.alloc_f64(s.c * split)?;
        let stats = self.alloc_f64(2 * s.c)?;
        let (p1, p2, ps) = (
            self.ptr_f64(&part1),
            self.ptr_f64(&part2),
            self.ptr_f64(&stats),
        );
        // One block row per channel: C is the grid's y dimension.
        let red = LaunchConfig {
            grid_dim: (grid_x(OP, split)?, grid_yz(OP, s.c)?, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let per_c = LaunchConfig {
            grid_dim: (s.c.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, c, hw) = (i(s.n)?, i(s.c)?, i(s.hw)?);
        let (xp, yp, dyp) = (
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(y)),
            KArg::Ptr(self.ptr(dy)),
        );
        let (sm, si) = (
            KArg::Ptr(self.ptr(save_mean)),
            KArg::Ptr(self.ptr(save_invstd)),
        );
        let relu = KArg::I32(relu as i32);
        let part = [
            xp,
            yp,
            dyp,
            sm,
            si,
            KArg::Ptr(p1),
            KArg::Ptr(p2),
            n,
            c,
            hw,
            i(chunk)?,
            relu,
        ];
        self.launch("norm", "bn_bwd_partial", red, &part)?;
        let fin = [
            KArg::Ptr(p1),
            KArg::Ptr(p2),
            KArg::Ptr(ps),
            KArg::Ptr(self.ptr(dgamma)),
            KArg::Ptr(self.ptr(dbeta)),
            c,
            i(split)?,
        ];
        self.launch("norm", "bn_bwd_finalize", per_c, &fin)?;
        let args = [
            xp,
            yp,
            dyp,
            KArg::Ptr(self.ptr(gamma)),
            sm,
            si,
            KArg::Ptr(ps),
            KArg::Ptr(self.ptr(dx)),
            i(s.len())?,
            c,
            hw,
            KArg::F64((s.n * s.hw) as f64),
            relu,
        ];
        self.launch("norm", "bn_bwd_apply", Self::grid(s.len()), &args)
    }

    // ---- elementwise ---------------------------------------------------------------------
    fn relu_fwd(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        check_len("relu_fwd", "y", y.len(), x.len())?;
        self.elementwise("relu_fwd", &[self.ptr(x), self.ptr(y)], x.len(), None)
    }
    fn relu_bwd(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("relu_bwd", "dy", dy.len(), y.len())?;
        check_len("relu_bwd", "dx", dx.len(), y.len())?;
        self.elementwise(
            "relu_bwd",
            &[self.ptr(y), self.ptr(dy), self.ptr(dx)],
            y.len(),
            None,
        )
    }
    fn add_relu_fwd(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("add_relu_fwd", "b", b.len(), a.len())?;
        check_len("add_relu_fwd", "y", y.len(), a.len())?;
        self.elementwise(
            "add_relu_fwd",
            &[self.ptr(a), self.ptr(b), self.ptr(y)],
            a.len(),
            None,
        )
    }
    fn add_assign(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        check_len("add_assign", "x", x.len(), y.len())?;
        self.elementwise("add_assign", &[self.ptr(y), self.ptr(x)], y.len(), None)
    }
    fn scale_assign(&self, y: &mut CudaSlice<f32>, alpha: f64) -> Result<()> {
        self.elementwise("scale_assign", &[self.ptr(y)], y.len(), Some(alpha as f32))
    }

    // ---- pooling -------------------------------------------------------------------------
    fn maxpool2d_fwd(&self, s: &Pool2d, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "maxpool2d_fwd";
        check_pool(OP, s)?;
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "y", y.len(), s.y_len())?;
        if s.y_len() == 0 {
            return Ok(());
        }
        i(s.x_len())?;
        i(s.y_len())?;
        let args = [
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(y)),
            i(s.n * s.c)?,
            i(s.h)?,
            i(s.w)?,
            i(s.k)?,
            i(s.stride)?,
            i(s.pad)?,
            i(s.out_h())?,
            i(s.out_w())?,
        ];
        self.launch("pool", "maxpool2d_fwd", Self::grid(s.y_len()), &args)
    }

    fn maxpool2d_bwd(
        &self,
        s: &Pool2d,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "maxpool2d_bwd";
        check_pool(OP, s)?;
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "y", y.len(), s.y_len())?;
        check_len(OP, "dy", dy.len(), s.y_len())?;
        check_len(OP, "dx", dx.len(), s.x_len())?;
        if s.x_len() == 0 {
            return Ok(());
        }
        i(s.x_len())?;
        let args = [
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(y)),
            KArg::Ptr(self.ptr(dy)),
            KArg::Ptr(self.ptr(dx)),
            i(s.n * s.c)?,
            i(s.h)?,
            i(s.w)?,
            i(s.k)?,
            i(s.stride)?,
            i(s.pad)?,
            i(s.out_h())?,
            i(s.out_w())?,
        ];
        self.launch("pool", "maxpool2d_bwd", Self::grid(s.x_len()), &args)
    }

    fn global_avg_pool_fwd(
        &self,
        rows: usize,
        hw: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "global_avg_pool_fwd";
        if hw == 0 {
            return Err(EngineError::Shape {
                op: OP,
                detail: "cannot average over hw = 0".into(),
            });
        }
        check_len(OP, "x", x.len(), rows * hw)?;
        check_len(OP, "y", y.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        i(rows * hw)?;
        let blocks = (rows * 32).div_ceil(256);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "pool",
            "gap_fwd",
            cfg,
            &[
                KArg::Ptr(self.ptr(x)),
                KArg::Ptr(self.ptr(y)),
                i(rows)?,
                i(hw)?,
            ],
        )
    }

    fn global_avg_pool_bwd(
        &self,
        rows: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "global_avg_pool_bwd";
        if hw == 0 {
            return Err(EngineError::Shape {
                op: OP,
                detail: "cannot average over hw = 0".into(),
            });
        }
        check_len(OP, "dy", dy.len(), rows)?;
        check_len(OP, "dx", dx.len(), rows * hw)?;
        if rows == 0 {
            return Ok(());
        }
        i(rows * hw)?;
        self.launch(
            "pool",
            "gap_bwd",
            Self::grid(rows * hw),
            &[
                KArg::Ptr(self.ptr(dy)),
                KArg::Ptr(self.ptr(dx)),
                i(rows)?,
                i(hw)?,
            ],
        )
    }

    // ---- dense ---------------------------------------------------------------------------
    fn linear_fwd(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "linear_fwd";
        check_len(OP, "x", x.len(), m * k)?;
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "y", y.len(), m * n)?;
        let bias = match b {
            Some(b) => {
                check_len(OP, "b", b.len(), n)?;
                self.ptr(b)
            }
            None => 0,
        };
        i(m * k)?;
        i(n * k)?;
        i(m * n)?;
        self.sgemm(
            self.ptr(x),
            self.ptr(w),
            self.ptr(y),
            bias,
            m,
            n,
            k,
            k,
            k,
            n,
            false,
            true,
            false,
        )
    }

    fn linear_bwd(
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
        const OP: &str = "linear_bwd";
        check_len(OP, "x", x.len(), m * k)?;
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "dy", dy.len(), m * n)?;
        check_len(OP, "dw", dw.len(), n * k)?;
        i(m * k)?;
        i(n * k)?;
        i(m * n)?;
        if let Some(dx) = dx {
            check_len(OP, "dx", dx.len(), m * k)?;
            // dx[m, k] = dy[m, n] . w[n, k]
            self.sgemm(
                self.ptr(dy),
                self.ptr(w),
                self.ptr(dx),
                0,
                m,
                k,
                n,
                n,
                k,
                k,
                false,
                false,
                false,
            )?;
        }
        // dw[n, k] = dy^T[n, m] . x[m, k]
        self.sgemm(
            self.ptr(dy),
            self.ptr(x),
            self.ptr(dw),
            0,
            n,
            k,
            m,
            n,
            k,
            k,
            true,
            false,
            false,
        )?;
        if let Some(db) = db {
            check_len(OP, "db", db.len(), n)?;
            self.colsum(self.ptr(dy), self.ptr(db), m, n)?;
        }
        Ok(())
    }

    // ---- LSTM ----------------------------------------------------------------------------
    fn lstm_fwd(
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
        const OP: &str = "lstm_fwd";
        let (b, t, inp, h) = (s.batch, s.seq, s.input, s.hidden);
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "w_ih", w_ih.len(), 4 * h * inp)?;
        check_len(OP, "w_hh", w_hh.len(), 4 * h * h)?;
        check_len(OP, "b_ih", b_ih.len(), 4 * h)?;
        check_len(OP, "b_hh", b_hh.len(), 4 * h)?;
        check_len(OP, "h_seq", h_seq.len(), s.h_len())?;
        check_len(OP, "c_seq", c_seq.len(), s.h_len())?;
        check_len(OP, "gates", gates.len(), s.gates_len())?;
        if b == 0 || t == 0 || h == 0 {
            return Ok(());
        }
        if h * 4 > 48 * 1024 {
            return Err(EngineError::Shape {
                op: OP,
                detail: format!("hidden size {h} exceeds the step kernel's shared memory"),
            });
        }
        i(s.gates_len())?;
        i(s.x_len())?;
        i(4 * h * inp)?;
        // The input projection of every step at once: pre[b*t, 4h] = x . W_ih^T.
        let pre = self.alloc(s.gates_len())?;
        if inp == 0 {
            let mut pre = pre;
            self.fill(&mut pre, 0.0)?;
            return self.lstm_steps(s, &pre, w_hh, b_ih, b_hh, h_seq, c_seq, gates);
        }
        self.sgemm(
            self.ptr(x),
            self.ptr(w_ih),
            self.ptr(&pre),
            0,
            b * t,
            4 * h,
            inp,
            inp,
            inp,
            4 * h,
            false,
            true,
            false,
        )?;
        self.lstm_steps(s, &pre, w_hh, b_ih, b_hh, h_seq, c_seq, gates)
    }

    fn lstm_bwd(
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
        const OP: &str = "lstm_bwd";
        let (b, t, inp, h) = (s.batch, s.seq, s.input, s.hidden);
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "w_ih", w_ih.len(), 4 * h * inp)?;
        check_len(OP, "w_hh", w_hh.len(), 4 * h * h)?;
        check_len(OP, "h_seq", h_seq.len(), s.h_len())?;
        check_len(OP, "c_seq", c_seq.len(), s.h_len())?;
        check_len(OP, "gates", gates.len(), s.gates_len())?;
        check_len(OP, "dh_seq", dh_seq.len(), s.h_len())?;
        check_len(OP, "dx", dx.len(), s.x_len())?;
        check_len(OP, "dw_ih", dw_ih.len(), 4 * h * inp)?;
        check_len(OP, "dw_hh", dw_hh.len(), 4 * h * h)?;
        check_len(OP, "db", db.len(), 4 * h)?;
        i(s.gates_len())?;
        i(s.x_len())?;
        i(4 * h * inp)?;
        if b == 0 || t == 0 || h == 0 {
            self.fill(dx, 0.0)?;
            self.fill(dw_ih, 0.0)?;
            self.fill(dw_hh, 0.0)?;
            return self.fill(db, 0.0);
        }
        let dgates = self.alloc(s.gates_len())?;
        let dh_rec = self.zeros(b * h)?;
        let dc = self.zeros(b * h)?;
        let (p_gates, p_c, p_dh, p_dhrec, p_dc, p_dg) = (
            self.ptr(gates),
            self.ptr(c_seq),
            self.ptr(dh_seq),
            self.ptr(&dh_rec),
            self.ptr(&dc),
            self.ptr(&dgates),
        );
        let step_cfg = LaunchConfig {
            grid_dim: ((b * h).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        for step in (0..t).rev() {
            self.launch(
                "lstm",
                "lstm_step_bwd",
                step_cfg,
                &[
                    KArg::Ptr(p_gates),
                    KArg::Ptr(p_c),
                    KArg::Ptr(p_dh),
                    KArg::Ptr(p_dhrec),
                    KArg::Ptr(p_dc),
                    KArg::Ptr(p_dg),
                    i(b)?,
                    i(t)?,
                    i(h)?,
                    i(step)?,
                ],
            )?;
            if step > 0 {
                // dh_{t-1}[b, h] = dgates_t[b, 4h] . W_hh[4h, h]; rows of step t are T*4h apart.
                let a = p_dg + (step * 4 * h * 4) as u64;
                self.sgemm(
                    a,
                    self.ptr(w_hh),
                    p_dhrec,
                    0,
                    b,
                    h,
                    4 * h,
                    t * 4 * h,
                    h,
                    h,
                    false,
                    false,
                    false,
                )?;
            }
        }
        // Weight gradients over all steps at once.
        let hprev = self.alloc(s.h_len())?;
        self.launch(
            "lstm",
            "lstm_shift_h",
            Self::grid(s.h_len()),
            &[
                KArg::Ptr(self.ptr(h_seq)),
                KArg::Ptr(self.ptr(&hprev)),
                i(b)?,
                i(t)?,
                i(h)?,
            ],
        )?;
        let rows = b * t;
        self.sgemm(
            p_dg,
            self.ptr(&hprev),
            self.ptr(dw_hh),
            0,
            4 * h,
            h,
            rows,
            4 * h,
            h,
            h,
            true,
            false,
            false,
        )?;
        if inp > 0 {
            self.sgemm(
                p_dg,
                self.ptr(x),
                self.ptr(dw_ih),
                0,
                4 * h,
                inp,
                rows,
                4 * h,
                inp,
                inp,
                true,
                false,
                false,
            )?;
            self.sgemm(
                p_dg,
                self.ptr(w_ih),
                self.ptr(dx),
                0,
                rows,
                inp,
                4 * h,
                4 * h,
                inp,
                inp,
                false,
                false,
                false,
            )?;
        }
        self.colsum(p_dg, self.ptr(db), rows, 4 * h)
    }

    // ---- loss and optimizers -------------------------------------------------------------
    fn bce_with_logits(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        pos_weight: f64,
        dlogits: &mut CudaSlice<f32>,
    ) -> Result<f64> {
        const OP: &str = "bce_with_logits";
        check_len(OP, "targets", targets.len(), logits.len())?;
        check_len(OP, "dlogits", dlogits.len(), logits.len())?;
        if logits.is_empty() {
            return Err(EngineError::Shape {
                op: OP,
                detail: "no logits: the mean of nothing is undefined".into(),
            });
        }
        // SAFETY: the kernel writes the one element before it is read.
        let loss = unsafe { self.stream.alloc::<f64>(1) }.map_err(|e| oom(e, 8))?;
        let (lp, _sync) = loss.device_ptr(&self.stream);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "loss",
            "bce_with_logits",
            cfg,
            &[
                KArg::Ptr(self.ptr(logits)),
                KArg::Ptr(self.ptr(targets)),
                KArg::F32(pos_weight as f32),
                KArg::Ptr(self.ptr(dlogits)),
                KArg::Ptr(lp),
                i(logits.len())?,
            ],
        )?;
        let host = self
            .stream
            .clone_dtoh(&loss)
            .map_err(|e| cuda("download loss", e))?;
        host.first().copied().ok_or_else(|| EngineError::Cuda {
            op: OP.into(),
            msg: "empty loss download".into(),
        })
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
        check_len("sgd_step", "g", g.len(), p.len())?;
        check_len("sgd_step", "m", m.len(), p.len())?;
        if p.is_empty() {
            return Ok(());
        }
        let args = [
            KArg::Ptr(self.ptr(p)),
            KArg::Ptr(self.ptr(g)),
            KArg::Ptr(self.ptr(m)),
            KArg::F32(lr as f32),
            KArg::F32(momentum as f32),
            KArg::F32(weight_decay as f32),
            KArg::I32(first_step as i32),
            i(p.len())?,
        ];
        self.launch("optim", "sgd_step", Self::grid(p.len()), &args)
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
        const OP: &str = "adam_step";
        check_len(OP, "g", g.len(), p.len())?;
        check_len(OP, "m", m.len(), p.len())?;
        check_len(OP, "v", v.len(), p.len())?;
        if step == 0 {
            return Err(EngineError::Shape {
                op: OP,
                detail: "step counts from 1".into(),
            });
        }
        if p.is_empty() {
            return Ok(());
        }
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        let args = [
            KArg::Ptr(self.ptr(p)),
            KArg::Ptr(self.ptr(g)),
            KArg::Ptr(self.ptr(m)),
            KArg::Ptr(self.ptr(v)),
            KArg::F32(beta1 as f32),
            KArg::F32(beta2 as f32),
            KArg::F32(eps as f32),
            KArg::F32(weight_decay as f32),
            KArg::F32((lr / bc1) as f32),
            KArg::F32(bc2.sqrt() as f32),
            i(p.len())?,
        ];
        self.launch("optim", "adam_step", Self::grid(p.len()), &args)
    }

    // ---- class activation maps -----------------------------------------------------------
    fn cam_weight(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        features: &CudaSlice<f32>,
        weights: &CudaSlice<f32>,
        cam: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "cam_weight";
        check_len(OP, "features", features.len(), n * c * hw)?;
        check_len(OP, "weights", weights.len(), c)?;
        check_len(OP, "cam", cam.len(), n * hw)?;
        if n * hw == 0 {
            return Ok(());
        }
        i(n * c * hw)?;
        let args = [
            KArg::Ptr(self.ptr(features)),
            KArg::Ptr(self.ptr(weights)),
            KArg::Ptr(self.ptr(cam)),
            i(n)?,
            i(c)?,
            i(hw)?,
        ];
        self.launch("cam", "cam_weight", Self::grid(n * hw), &args)
    }

    fn gradcam(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        features: &CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "gradcam";
        check_len(OP, "features", features.len(), n * c * hw)?;
        check_len(OP, "grads", grads.len(), n * c * hw)?;
        check_len(OP, "out", out.len(), n * hw)?;
        if n * hw == 0 {
            return Ok(());
        }
        i(n * c * hw)?;
        let alpha = self.alloc(n * c)?;
        if n * c > 0 {
            let blocks = (n * c * 32).div_ceil(256);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                "cam",
                "row_mean",
                cfg,
                &[
                    KArg::Ptr(self.ptr(grads)),
                    KArg::Ptr(self.ptr(&alpha)),
                    i(n * c)?,
                    i(hw)?,
                ],
            )?;
        }
        let args = [
            KArg::Ptr(self.ptr(features)),
            KArg::Ptr(self.ptr(&alpha)),
            KArg::Ptr(self.ptr(out)),
            i(n)?,
            i(c)?,
            i(hw)?,
        ];
        self.launch("cam", "gradcam_combine", Self::grid(n * hw), &args)
    }

    fn upsample_bilinear(
        &self,
        n: usize,
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "upsample_bilinear";
        check_len(OP, "x", x.len(), n * h * w)?;
        check_len(OP, "y", y.len(), n * oh * ow)?;
        if n * oh * ow == 0 {
            return Ok(());
        }
        if h == 0 || w == 0 {
            return Err(EngineError::Shape {
                op: OP,
                detail: "cannot resize an empty image".into(),
            });
        }
        i(n * h * w)?;
        i(n * oh * ow)?;
        let args = [
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(y)),
            i(n)?,
            i(h)?,
            i(w)?,
            i(oh)?,
            i(ow)?,
        ];
        self.launch("cam", "upsample_bilinear", Self::grid(n * oh * ow), &args)
    }

    fn minmax_normalize(
        &self,
        n: usize,
        len: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "minmax_normalize";
        check_len(OP, "x", x.len(), n * len)?;
        check_len(OP, "y", y.len(), n * len)?;
        if n * len == 0 {
            return Ok(());
        }
        if n > i32::MAX as usize {
            return Err(EngineError::Shape {
                op: OP,
                detail: format!("{n} rows exceed the grid limit"),
            });
        }
        i(n * len)?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "cam",
            "minmax_normalize",
            cfg,
            &[
                KArg::Ptr(self.ptr(x)),
                KArg::Ptr(self.ptr(y)),
                i(n)?,
                i(len)?,
            ],
        )
    }
    // ---- U-Net (stage 3) -----------------------------------------------------------------
    fn bias_relu_assign(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        const OP: &str = "bias_relu_assign";
        check_len(OP, "b", b.len(), c)?;
        check_len(OP, "y", y.len(), n * c * hw)?;
        let total = n * c * hw;
        if total == 0 {
            return Ok(());
        }
        let args = [
            KArg::Ptr(self.ptr(y)),
            KArg::Ptr(self.ptr(b)),
            i(total)?,
            i(c)?,
            i(hw)?,
            KArg::I32(relu as i32),
        ];
        self.launch("bias", "bias_relu_assign", Self::grid(total), &args)
    }

    fn bias_bwd(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: &CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "bias_bwd";
        check_len(OP, "dy", dy.len(), n * c * hw)?;
        check_len(OP, "db", db.len(), c)?;
        i(n * c * hw)?;
        self.channel_sum(self.ptr(dy), n, c, 0, c, hw, self.ptr(db))
    }

    fn upconv2d_fwd(
        &self,
        s: &UpConv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "upconv2d_fwd";
        crate::engine::cpu::upconv::check_shape(OP, s)?;
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "w", w.len(), s.w_len())?;
        check_len(OP, "b", b.len(), s.c_out)?;
        check_len(OP, "y", y.len(), s.y_len())?;
        let total = s.n * s.c_out * s.out_h() * s.out_w();
        if total == 0 {
            return Ok(());
        }
        let mut args = vec![
            KArg::Ptr(self.ptr(x)),
            KArg::Ptr(self.ptr(w)),
            KArg::Ptr(self.ptr(b)),
            KArg::Ptr(self.ptr(y)),
        ];
        args.extend(Self::upconv_args(s)?);
        self.launch("upconv", "upconv_fwd", Self::grid(total), &args)
    }

    fn upconv2d_bwd(
        &self,
        s: &UpConv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "upconv2d_bwd";
        crate::engine::cpu::upconv::check_shape(OP, s)?;
        check_len(OP, "x", x.len(), s.x_len())?;
        check_len(OP, "w", w.len(), s.w_len())?;
        check_len(OP, "dy", dy.len(), s.y_len())?;
        check_len(OP, "dx", dx.len(), s.x_len())?;
        check_len(OP, "dw", dw.len(), s.w_len())?;
        check_len(OP, "db", db.len(), s.c_out)?;
        let args = Self::upconv_args(s)?;
        if s.x_len() > 0 {
            let mut a = vec![
                KArg::Ptr(self.ptr(dy)),
                KArg::Ptr(self.ptr(w)),
                KArg::Ptr(self.ptr(dx)),
            ];
            a.extend(args.iter().copied());
            self.launch("upconv", "upconv_bwd_data", Self::grid(s.x_len()), &a)?;
        }
        if s.w_len() > 0 {
            let blocks = u32::try_from(s.w_len()).map_err(|_| EngineError::Shape {
                op: OP,
                detail: format!("{} weights exceed the grid limit", s.w_len()),
            })?;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut a = vec![
                KArg::Ptr(self.ptr(x)),
                KArg::Ptr(self.ptr(dy)),
                KArg::Ptr(self.ptr(dw)),
            ];
            a.extend(args.iter().copied());
            self.launch("upconv", "upconv_bwd_weight", cfg, &a)?;
        }
        self.channel_sum(
            self.ptr(dy),
            s.n,
            s.y_channels,
            s.y_offset,
            s.c_out,
            s.out_h() * s.out_w(),
            self.ptr(db),
        )
    }

    fn copy_channels(
        &self,
        s: &ChannelCopy,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "copy_channels";
        crate::engine::cpu::channels::check_shape(OP, s)?;
        check_len(OP, "src", src.len(), s.src_len())?;
        check_len(OP, "dst", dst.len(), s.dst_len())?;
        i(s.src_len())?;
        i(s.dst_len())?;
        let total = s.n * s.c * s.hw;
        if total == 0 {
            return Ok(());
        }
        let args = [
            KArg::Ptr(self.ptr(src)),
            KArg::Ptr(self.ptr(dst)),
            i(s.n)?,
            i(s.c)?,
            i(s.hw)?,
            i(s.src_channels)?,
            i(s.src_offset)?,
            i(s.dst_channels)?,
            i(s.dst_offset)?,
            KArg::I32(accumulate as i32),
        ];
        self.launch("channels", "copy_channels", Self::grid(total), &args)
    }

    fn sigmoid_fwd(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        check_len("sigmoid_fwd", "y", y.len(), x.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let args = [KArg::Ptr(self.ptr(x)), KArg::Ptr(self.ptr(y)), i(x.len())?];
        self.launch("dice", "sigmoid_fwd", Self::grid(x.len()), &args)
    }

    fn sigmoid_bwd(
        &self,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("sigmoid_bwd", "dy", dy.len(), y.len())?;
        check_len("sigmoid_bwd", "dx", dx.len(), y.len())?;
        if y.is_empty() {
            return Ok(());
        }
        let args = [
            KArg::Ptr(self.ptr(y)),
            KArg::Ptr(self.ptr(dy)),
            KArg::Ptr(self.ptr(dx)),
            i(y.len())?,
        ];
        self.launch("dice", "sigmoid_bwd", Self::grid(y.len()), &args)
    }

    fn soft_dice_loss(
        &self,
        s: &SoftDice,
        probs: &CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        dprobs: &mut CudaSlice<f32>,
    ) -> Result<f64> {
        const OP: &str = "soft_dice_loss";
        check_len(OP, "probs", probs.len(), s.len())?;
        check_len(OP, "targets", targets.len(), s.len())?;
        check_len(OP, "dprobs", dprobs.len(), s.len())?;
        if s.c == 0 {
            return Err(EngineError::Shape {
                op: OP,
                detail: "no channels: the mean over channels is undefined".into(),
            });
        }
        if !(s.eps.is_finite() && s.eps >= 0.0) {
            return Err(EngineError::Shape {
                op: OP,
                detail: format!("eps must be finite and not negative, got {}", s.eps),
            });
        }
        i(s.len())?;
        if s.c > 65_535 {
            return Err(EngineError::Shape {
                op: OP,
                detail: format!("{} channels exceed the grid limit", s.c),
            });
        }
        let (split, chunk) = self.reduce_split(s.n * s.hw, s.c);
        let part_i = self.alloc_f64(s.c * split)?;
        let part_t = self.alloc_f64(s.c * split)?;
        let coef = self.alloc_f64(2 * s.c)?;
        let out = self.alloc_f64(2)?;
        let (pi, pt, pc, po) = (
            self.ptr_f64(&part_i),
            self.ptr_f64(&part_t),
            self.ptr_f64(&coef),
            self.ptr_f64(&out),
        );
        let red = LaunchConfig {
            grid_dim: (split as u32, s.c as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "dice",
            "dice_partial",
            red,
            &[
                KArg::Ptr(self.ptr(probs)),
                KArg::Ptr(self.ptr(targets)),
                KArg::Ptr(pi),
                KArg::Ptr(pt),
                i(s.n)?,
                i(s.c)?,
                i(s.hw)?,
                i(chunk)?,
            ],
        )?;
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "dice",
            "dice_finalize",
            one,
            &[
                KArg::Ptr(pi),
                KArg::Ptr(pt),
                KArg::Ptr(pc),
                KArg::Ptr(po),
                i(s.c)?,
                i(split)?,
                KArg::F64(s.eps),
            ],
        )?;
        if !s.is_empty() {
            self.launch(
                "dice",
                "dice_grad",
                Self::grid(s.len()),
                &[
                    KArg::Ptr(self.ptr(targets)),
                    KArg::Ptr(pc),
                    KArg::Ptr(self.ptr(dprobs)),
                    i(s.len())?,
                    i(s.c)?,
                    i(s.hw)?,
                ],
            )?;
        }
        let host = self
            .stream
            .clone_dtoh(&out)
            .map_err(|e| cuda("download loss", e))?;
        match host[..] {
            [_, z, ..] if z != 0.0 => Err(EngineError::Shape {
                op: OP,
                detail: "empty prediction and target with eps = 0: the Dice is 0/0".into(),
            }),
            [loss, ..] => Ok(loss),
            _ => Err(EngineError::Cuda {
                op: OP.into(),
                msg: "empty loss download".into(),
            }),
        }
    }
}

impl CudaBackend {
    /// The recurrence of [`Backend::lstm_fwd`] given the input projection `pre`.
    #[allow(clippy::too_many_arguments)]
    fn lstm_steps(
        &self,
        s: &Lstm,
        pre: &CudaSlice<f32>,
        w_hh: &CudaSlice<f32>,
        b_ih: &CudaSlice<f32>,
        b_hh: &CudaSlice<f32>,
        h_seq: &mut CudaSlice<f32>,
        c_seq: &mut CudaSlice<f32>,
        gates: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (b, t, h) = (s.batch, s.seq, s.hidden);
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x("lstm_fwd", h.div_ceil(8))?,
                grid_yz("lstm_fwd", b)?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (h * 4) as u32,
        };
        let ptrs = [
            self.ptr(pre),
            self.ptr(w_hh),
            self.ptr(b_ih),
            self.ptr(b_hh),
            self.ptr(h_seq),
            self.ptr(c_seq),
            self.ptr(gates),
        ];
        for step in 0..t {
            let mut args: Vec<KArg> = ptrs.iter().map(|&p| KArg::Ptr(p)).collect();
            args.extend([i(b)?, i(t)?, i(h)?, i(step)?]);
            self.launch("lstm", "lstm_step_fwd", cfg, &args)?;
        }
        Ok(())
    }
}

/// Host-side helpers of the U-Net ops.
impl CudaBackend {
    /// (splits, chunk) of a per-channel reduction over `count` values per channel: enough
    /// blocks to fill the GPU, at least 4096 values per block; a function of the shape and
    /// the GPU only, so the order of the f64 sums does not change from call to call.
    fn reduce_split(&self, count: usize, channels: usize) -> (usize, usize) {
        let target = 4 * self.info.multiprocessors.max(1) as usize;
        let want = target
            .div_ceil(channels.max(1))
            .clamp(1, count.div_ceil(4096).clamp(1, 65_535));
        let chunk = count.div_ceil(want).max(1);
        (count.div_ceil(chunk).max(1), chunk)
    }

    /// out[ch] = sum over the batch and the pixels of x[:, c_off + ch, :] for ch < c, x being
    /// `[n, c_total, hw]` (deterministic f64 sums; kernels/bias.cu).
    #[allow(clippy::too_many_arguments)]
    fn channel_sum(
        &self,
        x: u64,
        n: usize,
        c_total: usize,
        c_off: usize,
        c: usize,
        hw: usize,
        out: u64,
    ) -> Result<()> {
        if c == 0 {
            return Ok(());
        }
        if c > 65_535 {
            return Err(EngineError::Shape {
                op: "channel_sum",
                detail: format!("{c} channels exceed the grid limit"),
            });
        }
        let (split, chunk) = self.reduce_split(n * hw, c);
        let part = self.alloc_f64(c * split)?;
        let pp = self.ptr_f64(&part);
        let red = LaunchConfig {
            grid_dim: (split as u32, c as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "bias",
            "channel_sum_partial",
            red,
            &[
                KArg::Ptr(x),
                KArg::Ptr(pp),
                i(n)?,
                i(c_total)?,
                i(c_off)?,
                i(hw)?,
                i(chunk)?,
            ],
        )?;
        let per_c = LaunchConfig {
            grid_dim: (c.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "bias",
            "channel_sum_finalize",
            per_c,
            &[KArg::Ptr(pp), KArg::Ptr(out), i(c)?, i(split)?],
        )
    }

    /// The int arguments shared by the up-convolution kernels (their order in kernels/upconv.cu).
    fn upconv_args(s: &UpConv2d) -> Result<Vec<KArg>> {
        i(s.y_len())?;
        i(s.x_len())?;
        Ok(vec![
            i(s.n)?,
            i(s.c_in)?,
            i(s.h)?,
            i(s.w)?,
            i(s.c_out)?,
            i(s.k)?,
            i(s.y_channels)?,
            i(s.y_offset)?,
        ])
    }
}
