//! Kernel launches: a kernel's function handle and its PTX parameter list, loaded once per
//! backend ([`Kernel`], gathered per op family by [`kernels!`]); [`Launch`], cudarc's launch
//! builder taking device slices, `slice(range)` views and scalars, which records each
//! argument's kind and checks the list against the kernel's PTX `.param` list before it
//! launches (an error naming the kernel, nothing launched), and opts the function in once for
//! the dynamic shared memory a launch asks for above 48 KiB; the launch itself is `unsafe`
//! (only the op wrappers of this module tree, which check every length first, make one).
//! Also the launch shapes (grid-stride grids, grid limits) and the kernels' 32-bit sizes.
//! Knows nothing about what the kernels compute.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchArgs, LaunchConfig,
    PushKernelArg,
};

use super::device::{cuda, launched};
use super::module::{DynSmem, ModuleCache, ParamKind};
use crate::engine::{EngineError, Result};

/// Threads of the grid-stride kernels' blocks.
pub(crate) const THREADS: u32 = 256;
/// Blocks of the grid-stride kernels: enough to fill any current GPU.
const MAX_BLOCKS: usize = 65_536;
/// The most parameters a kernel of this crate takes.
const MAX_PARAMS: usize = 16;

/// One kernel: its function handle and its parameters as its PTX declares them.
pub(crate) struct Kernel {
    f: CudaFunction,
    params: Arc<[ParamKind]>,
    smem: Arc<DynSmem>,
    module: &'static str,
    name: &'static str,
}

impl Kernel {
    /// Function `name` of `kernels/<module>.cu` (the module loaded on first use).
    pub(crate) fn load(m: &ModuleCache, module: &'static str, name: &'static str) -> Result<Self> {
        let (f, params, smem) = m.function_with_params(module, name)?;
        Ok(Kernel {
            f,
            params,
            smem,
            module,
            name,
        })
    }

    /// A launch of this kernel on `stream`; push the arguments in the kernel's order.
    pub(crate) fn on<'a>(&'a self, stream: &'a CudaStream) -> Launch<'a> {
        Launch {
            kernel: self,
            b: stream.launch_builder(&self.f),
            kinds: [ParamKind::Int(0); MAX_PARAMS],
            n: 0,
        }
    }
}

/// Declares an op family's kernels, loaded together: `kernels!("conv", { fwd: "conv2d_fwd" })`
/// gives `struct Kernels { fwd: Kernel }` and `Kernels::load`.
macro_rules! kernels {
    ($module:literal { $($field:ident: $name:literal),* $(,)? }) => {
        /// This family's kernels, loaded once per backend.
        pub(crate) struct Kernels {
            $(pub(crate) $field: $crate::engine::cuda::launch::Kernel,)*
        }
        impl Kernels {
            pub(crate) fn load(
                m: &$crate::engine::cuda::module::ModuleCache,
            ) -> $crate::engine::Result<Self> {
                Ok(Kernels {
                    $($field: $crate::engine::cuda::launch::Kernel::load(m, $module, $name)?,)*
                })
            }
        }
    };
}
pub(crate) use kernels;

/// A kernel argument: a device buffer or view (a pointer), or a scalar by reference.
pub(crate) trait KernelArg<'a> {
    /// The PTX parameter it fills.
    const KIND: ParamKind;
    fn push(self, b: &mut LaunchArgs<'a>);
}

impl<'a, T> KernelArg<'a> for &'a CudaSlice<T> {
    const KIND: ParamKind = ParamKind::Int(8);
    fn push(self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl<'a, T> KernelArg<'a> for &'a mut CudaSlice<T> {
    const KIND: ParamKind = ParamKind::Int(8);
    fn push(self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl<'a, 'c: 'a, T> KernelArg<'a> for &'a CudaView<'c, T> {
    const KIND: ParamKind = ParamKind::Int(8);
    fn push(self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl<'a, 'c: 'a, T> KernelArg<'a> for &'a mut CudaViewMut<'c, T> {
    const KIND: ParamKind = ParamKind::Int(8);
    fn push(self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// A device buffer or view an op takes generically (a whole `CudaSlice` or a
/// `slice(range)` view of one), pushed as a pointer argument.
pub(crate) trait DeviceArg {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>);
}

impl<T> DeviceArg for CudaSlice<T> {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl<T> DeviceArg for CudaView<'_, T> {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

macro_rules! scalar_arg {
    ($($t:ty => $kind:expr),*) => {$(
        impl<'a> KernelArg<'a> for &'a $t {
            const KIND: ParamKind = $kind;
            fn push(self, b: &mut LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
scalar_arg!(
    i32 => ParamKind::Int(4),
    u32 => ParamKind::Int(4),
    u64 => ParamKind::Int(8),
    f32 => ParamKind::Float(4),
    f64 => ParamKind::Float(8)
);

/// The null pointer a kernel reads as "no buffer" (an optional bias or statistics).
pub(crate) static NULL: u64 = 0;

/// One launch being built: cudarc's builder and the kinds of the arguments pushed so far.
pub(crate) struct Launch<'a> {
    kernel: &'a Kernel,
    b: LaunchArgs<'a>,
    kinds: [ParamKind; MAX_PARAMS],
    n: usize,
}

impl<'a> Launch<'a> {
    /// Pushes the next argument.
    pub(crate) fn arg<A: KernelArg<'a>>(&mut self, a: A) -> &mut Self {
        if let Some(k) = self.kinds.get_mut(self.n) {
            *k = A::KIND;
        }
        self.n += 1;
        a.push(&mut self.b);
        self
    }

    /// Pushes a device buffer or view given generically (see [`DeviceArg`]).
    pub(crate) fn dev<D: DeviceArg + ?Sized>(&mut self, d: &'a D) -> &mut Self {
        if let Some(k) = self.kinds.get_mut(self.n) {
            *k = ParamKind::Int(8);
        }
        self.n += 1;
        d.push(&mut self.b);
        self
    }

    /// Pushes every value of `v` as an `int` argument, in order.
    pub(crate) fn ints(&mut self, v: &'a [i32]) -> &mut Self {
        for x in v {
            self.arg(x);
        }
        self
    }

    /// Checks the arguments against the kernel's PTX parameters, then launches.
    ///
    /// # Safety
    /// Every buffer must be at least as long as the kernel indexes it with the given sizes
    /// and launch shape, and the scalars must be what its parameters mean.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        let k = self.kernel;
        if self.n > MAX_PARAMS {
            return Err(bad_args(
                k.module,
                k.name,
                format!("{} arguments: more than {MAX_PARAMS}", self.n),
            ));
        }
        check_args(k.module, k.name, &k.params, &self.kinds[..self.n])?;
        k.smem
            .ensure(&k.f, cfg.shared_mem_bytes)
            .map_err(|e| smem_error(k.module, k.name, cfg.shared_mem_bytes, e))?;
        // SAFETY: the caller's contract; the list matches the PTX in count, width and class.
        unsafe { self.b.launch(cfg) }.map_err(|e| launch_error(k.module, k.name, e))?;
        launched(k.module, k.name);
        Ok(())
    }
}

fn launch_error(module: &str, name: &str, e: cudarc::driver::DriverError) -> EngineError {
    cuda(&format!("launch {module}::{name}"), e)
}

fn smem_error(module: &str, name: &str, bytes: u32, e: cudarc::driver::DriverError) -> EngineError {
    EngineError::Cuda {
        op: format!("launch {module}::{name}"),
        msg: format!(
            "{bytes} bytes of dynamic shared memory: the opt-in (cuFuncSetAttribute) failed: {e}"
        ),
    }
}

fn bad_args(module: &str, name: &str, msg: String) -> EngineError {
    EngineError::Cuda {
        op: format!("launch {module}::{name}"),
        msg,
    }
}

/// Checks a launch's argument kinds against the kernel's PTX parameters: a device pointer
/// or a 64-bit length for a 64-bit integer, an i32 for a 32-bit one, f32/f64 for floats.
pub(crate) fn check_args(
    module: &str,
    name: &str,
    params: &[ParamKind],
    args: &[ParamKind],
) -> Result<()> {
    if params.len() != args.len() {
        return Err(bad_args(
            module,
            name,
            format!(
                "{} arguments for the {} parameters of the kernel's PTX",
                args.len(),
                params.len()
            ),
        ));
    }
    for (i, (a, p)) in args.iter().zip(params).enumerate() {
        if a != p {
            return Err(bad_args(
                module,
                name,
                format!("argument {i} is {a} but the kernel's PTX parameter {i} is {p}"),
            ));
        }
    }
    Ok(())
}

/// An argument of [`super::CudaBackend::launch_raw`]: a raw device address or a scalar.
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    F64(f64),
}

impl KArg {
    fn kind(&self) -> ParamKind {
        match self {
            KArg::Ptr(_) => ParamKind::Int(8),
            KArg::I32(_) => ParamKind::Int(4),
            KArg::F32(_) => ParamKind::Float(4),
            KArg::F64(_) => ParamKind::Float(8),
        }
    }
}

impl fmt::Display for KArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A launch from raw arguments (see [`super::CudaBackend::launch_raw`]).
///
/// # Safety
/// As [`Launch::launch`]; the addresses must point into live allocations of the right size.
pub(crate) unsafe fn launch_raw(
    m: &ModuleCache,
    stream: &CudaStream,
    module: &'static str,
    name: &'static str,
    cfg: LaunchConfig,
    args: &[KArg],
) -> Result<()> {
    let (f, params, smem) = m.function_with_params(module, name)?;
    let kinds: Vec<ParamKind> = args.iter().map(KArg::kind).collect();
    check_args(module, name, &params, &kinds)?;
    smem.ensure(&f, cfg.shared_mem_bytes)
        .map_err(|e| smem_error(module, name, cfg.shared_mem_bytes, e))?;
    let mut b = stream.launch_builder(&f);
    for a in args {
        match a {
            KArg::Ptr(v) => b.arg(v),
            KArg::I32(v) => b.arg(v),
            KArg::F32(v) => b.arg(v),
            KArg::F64(v) => b.arg(v),
        };
    }
    // SAFETY: the caller's contract; the list matches the PTX in count, width and class.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(module, name, e))?;
    launched(module, name);
    Ok(())
}

// ---- elementwise launches ----------------------------------------------------------------

/// `kernel(x, out, n)`: an elementwise map over `n = x.len()` values into `out` (as long);
/// nothing launched when empty.
pub(crate) fn map1(
    stream: &CudaStream,
    op: &'static str,
    kernel: &Kernel,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    crate::engine::check_len(op, "output", out.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let n = dim(x.len())?;
    // SAFETY: x and out hold n values (checked).
    unsafe {
        kernel
            .on(stream)
            .arg(x)
            .arg(out)
            .arg(&n)
            .launch(grid(x.len()))
    }
}

/// `kernel(a, b, out, n)`: an elementwise map of two inputs over `n = a.len()` values, every
/// buffer as long; nothing launched when empty.
pub(crate) fn map2(
    stream: &CudaStream,
    op: &'static str,
    kernel: &Kernel,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    crate::engine::check_len(op, "second input", b.len(), a.len())?;
    crate::engine::check_len(op, "output", out.len(), a.len())?;
    if a.is_empty() {
        return Ok(());
    }
    let n = dim(a.len())?;
    // SAFETY: a, b and out hold n values (checked).
    unsafe {
        kernel
            .on(stream)
            .arg(a)
            .arg(b)
            .arg(out)
            .arg(&n)
            .launch(grid(a.len()))
    }
}

// ---- launch shapes and sizes ----------------------------------------------------------------

/// Grid-stride launch shape for `n` elements.
pub(crate) fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A `(x, y, z)` grid of blocks of `threads` threads, each dimension within the device's
/// limits (x at most 2^31 - 1, y and z at most 65535), else a shape error naming `op`.
pub(crate) fn blocks(
    op: &'static str,
    (x, y, z): (usize, usize, usize),
    threads: u32,
) -> Result<LaunchConfig> {
    let x = u32::try_from(x)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| EngineError::Shape {
            op,
            detail: format!("{x} blocks exceed the grid's x limit (2^31 - 1)"),
        })?;
    let yz = |b: usize| {
        if b > 65_535 {
            Err(EngineError::Shape {
                op,
                detail: format!("{b} blocks exceed the grid's y/z limit of 65535"),
            })
        } else {
            Ok(b as u32)
        }
    };
    Ok(LaunchConfig {
        grid_dim: (x, yz(y)?, yz(z)?),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A size as the kernels' `int`, refusing what their 32-bit indexing cannot hold.
pub(crate) fn dim(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| EngineError::Shape {
        op: "cuda",
        detail: format!("size {v} exceeds the kernels' 32-bit indexing"),
    })
}

/// Sizes as the kernels' `int`s (see [`dim`]).
pub(crate) fn int_args<const N: usize>(v: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, x) in out.iter_mut().zip(v) {
        *o = dim(x)?;
    }
    Ok(out)
}
