//! Hopper's warpgroup tensor-core instruction `wgmma` (sm_90a) for the channels-last eval
//! conv + batch norm (+ residual) (+ ReLU) and the training forward with batch statistics on
//! activations stored in bf16 (`kernels/conv_wgmma.cu`). The eval forward: the contract of conv.rs's
//! `CudaBackend::conv2d_bn_eval_fwd_nhwc_bf16s_native` (`conv2d_fwd_bn_mma_nhwc_bf16s`: x,
//! the residual and y bf16 NHWC two values to an f32 slot, the OIHW f32 weights copied to bf16
//! OHWI per call by conv_tc.cu's `conv_weight_ohwi_bf16`, the batch norm folded by
//! `norm::with_bn_eval_fold`, y rounded to nearest even), as an implicit GEMM of 128-pixel x
//! 128- (or 64-) channel tiles on `wgmma.mma_async` m64nNk16 from 128-byte-swizzled shared
//! memory. The training forward: the contract of conv.rs's
//! `CudaBackend::conv2d_fwd_stats_nhwc_bf16s_native` (`conv2d_fwd_stats_mma_nhwc_bf16s`: z
//! rounded to bf16, the per-(channel, 64-pixel tile) f64 partials of the rounded z in that
//! kernel's layout), the same kernel with the statistics epilogue. Opt-in and off by default
//! ([`CudaBackend::set_wgmma`], `ICHCAM_WGMMA=1`): it is proven on the emulated driver's model
//! of the PTX ISA only, not yet on a GPU (docs/precision.md). A kernel runs where [`supported`]
//! holds, the device has compute capability 9.0 (sm_90a code runs nowhere else), the module
//! loads there (build.rs's precompiled `compute_90a` PTX, or NVRTC at run time: module.rs;
//! where it does not, one note on stderr and the mma.sync kernels run), the mma.sync kernel
//! would run the shape (bf16, route not `Never`) and x is 16-byte aligned; elsewhere the
//! mma.sync kernel runs. The channels-last data gradient on dy stored in bf16 (the section at
//! the end: `conv2d_bwd_data_wgmma_n128` / `_n64`, the contract of conv.rs's
//! `CudaBackend::conv2d_bwd_data_nhwc_bf16s_native`, per output phase with the mma.sync
//! kernel's K order) is opted in and routed the same way, where `c_out % 8 == 0` and dy is
//! 16-byte aligned. The weight gradient (the last section: `conv2d_bwd_weight_wgmma_n128` /
//! `_n64`, the contract of conv.rs's `CudaBackend::conv2d_bwd_weight_nhwc_bf16s_native`, both
//! operands MN-major) likewise, where [`wgrad_supported`] holds and x and dy are 16-byte
//! aligned. Knows nothing about the model.

use std::sync::Once;

use cudarc::driver::CudaSlice;

use super::conv::{
    bf16s_bwd_weight_len, bf16s_weight_row, geometry, launch_split, phase_grid, stats_tiles,
    weight_bwd_nhwc_bf16_scratch, weight_ohwi_bf16_scratch, TcKernel, Tiling, MMA_BK, MMA_TILE,
};
use super::launch::{blocks, dim, int_args, Kernel, NULL};
use super::{norm, CudaBackend};
use crate::engine::shapes::Conv2d;
use crate::engine::{BatchNorm2d, EngineError, Result};

mod loaded {
    use super::super::launch::kernels;
    kernels!("conv_wgmma" {
        n128: "conv2d_fwd_bn_wgmma_n128",
        n64: "conv2d_fwd_bn_wgmma_n64",
        stats_n128: "conv2d_fwd_stats_wgmma_n128",
        stats_n64: "conv2d_fwd_stats_wgmma_n64",
        bwd_data_n128: "conv2d_bwd_data_wgmma_n128",
        bwd_data_n64: "conv2d_bwd_data_wgmma_n64",
        wgrad_n128: "conv2d_bwd_weight_wgmma_n128",
        wgrad_n64: "conv2d_bwd_weight_wgmma_n64",
    });
}

/// The family's kernels once per backend, or why the module did not load (kept, so that a
/// device where it does not load asks once, not per call).
pub(crate) struct Kernels(std::result::Result<loaded::Kernels, String>);

impl Kernels {
    /// Never an error: a module that does not load is remembered as such.
    pub(crate) fn load(m: &super::module::ModuleCache) -> Result<Self> {
        Ok(Kernels(loaded::Kernels::load(m).map_err(|e| e.to_string())))
    }
}

/// The one note (per process) that the switch is on and the module does not load here.
static UNAVAILABLE_NOTE: Once = Once::new();

/// The kernels where the module loads (compute capability 9.0 checked first: elsewhere the
/// module is not even tried), else why not; the first failure noted once on stderr.
fn kernels(be: &CudaBackend) -> std::result::Result<&loaded::Kernels, String> {
    if be.info().compute_capability != (9, 0) {
        let (a, b) = be.info().compute_capability;
        return Err(format!(
            "sm_90a code runs on compute capability 9.0 only; this device is {a}.{b}"
        ));
    }
    let ks = be
        .families
        .conv_wgmma
        .get(|| Kernels::load(be.modules()))
        .map_err(|e| e.to_string())?;
    ks.0.as_ref().map_err(|why| {
        UNAVAILABLE_NOTE.call_once(|| {
            eprintln!(
                "note: wgmma kernels opted in (ICHCAM_WGMMA=1 / set_wgmma) but kernels/conv_wgmma.cu's sm_90a module does not load on this device ({why}); the mma.sync kernels run instead"
            );
        });
        why.clone()
    })
}

/// [`kernels`] with the failure as `op`'s error.
fn kernels_for<'a>(be: &'a CudaBackend, op: &str) -> Result<&'a loaded::Kernels> {
    kernels(be).map_err(|why| EngineError::Cuda {
        op: op.to_string(),
        msg: why,
    })
}

/// A kernel's name by its channel tile: `n64` where the tile is 64, else `n128`.
fn by_tile(tile: usize, n64: &'static str, n128: &'static str) -> &'static str {
    if tile == 64 {
        n64
    } else {
        n128
    }
}

/// Threads per block: two warpgroups.
const THREADS: u32 = 256;
/// Pixels per block (64 per warpgroup).
const TILE_M: usize = 128;
/// Dynamic shared memory per block: 1 KiB of alignment slack, 4 stages of A (16 KiB) and B
/// (16 KiB at 128 channels), the pixel table (`WG_SMEM` of conv_wgmma.cu).
pub(super) const WG_SMEM: u32 = 134_144;

/// Output channels per block: 64 where `c_out <= 64` (`conv2d_fwd_bn_wgmma_n64`), else 128.
fn tile_n(s: &Conv2d) -> usize {
    if s.c_out <= 64 {
        64
    } else {
        128
    }
}

/// The kernel's `int` arguments (N, C, H, W, C_out, KH, KW, stride, pad), with every size its
/// 32-bit indexing computes checked.
fn args(s: &Conv2d) -> Result<[i32; 9]> {
    int_args([
        s.x_len(),
        s.y_len(),
        s.n * s.h * s.w,
        s.n * s.out_h() * s.out_w(),
        s.c_out * bf16s_weight_row(s),
    ])?;
    int_args([s.n, s.c_in, s.h, s.w, s.c_out, s.kh, s.kw, s.stride, s.pad])
}

/// Whether `kernels/conv_wgmma.cu` computes `s`: `c_in` a positive multiple of 8 (a 16-byte
/// copy is 8 channels of one tap), a positive stride and `c_out`, and sizes its 32-bit
/// indexing holds; any kernel size, stride and padding. (x must also be 16-byte aligned,
/// checked per call.)
pub(crate) fn supported(s: &Conv2d) -> bool {
    s.c_in > 0
        && s.c_in.is_multiple_of(8)
        && s.stride > 0
        && s.c_out > 0
        && s.kh > 0
        && s.kw > 0
        && s.h + 2 * s.pad >= s.kh
        && s.w + 2 * s.pad >= s.kw
        && args(s).is_ok()
}

/// The epilogue of a launch ([`CudaBackend::launch_wgmma`]): its arguments after the ints.
enum Epilogue<'a> {
    /// Eval: `{scale, shift}` per output channel, the residual, the ReLU.
    Bn {
        ss: &'a CudaSlice<f32>,
        residual: Option<&'a CudaSlice<f32>>,
        relu: bool,
    },
    /// Training: the partial statistics of the rounded z, `c_out * tiles` f64 each.
    Stats(&'a mut CudaSlice<f64>, &'a mut CudaSlice<f64>),
    /// The data gradient: dx (f32) straight from the fragment, no arguments.
    Plain,
}

impl CudaBackend {
    /// Whether the wgmma kernels run on this backend at all: the switch on
    /// ([`CudaBackend::set_wgmma`]), a device of compute capability 9.0 and the module loaded
    /// there (its first failure noted once on stderr). Loads the module on first call.
    fn wgmma_ready(&self) -> bool {
        self.wgmma() && kernels(self).is_ok()
    }

    /// What every wgmma op asks before it takes its kernel: the switch on
    /// ([`CudaBackend::set_wgmma`]), `native` (the mma.sync kernel it replaces would run the
    /// shape) and `supported` (the wgmma kernel computes it), every operand address in
    /// `addrs` 16-byte aligned, [`WG_SMEM`] within the device's shared memory per block
    /// (conv.rs's `TcKernel::Wgmma`), and the module loaded on a device of compute capability
    /// 9.0 (asked last: it loads the module).
    fn wgmma_runs(&self, native: bool, supported: bool, addrs: &[u64]) -> bool {
        self.wgmma()
            && native
            && supported
            && addrs.iter().all(|a| a.is_multiple_of(16))
            && self.fits(TcKernel::Wgmma)
            && self.wgmma_ready()
    }

    /// The error of a wgmma op called where [`CudaBackend::wgmma_runs`] is false.
    fn wgmma_refused(&self, op: &str, s: &Conv2d) -> EngineError {
        EngineError::Param(format!(
            "{op}: the wgmma kernel does not run {s:?} here (switch {}, compute capability {:?}, precision {})",
            self.wgmma(),
            self.info().compute_capability,
            self.precision()
        ))
    }

    /// Why the wgmma kernels do not run on this device even with the switch on (not compute
    /// capability 9.0, or the sm_90a module does not load: no precompiled `compute_90a` PTX
    /// and no NVRTC at run time, or the driver refuses it), or None where they do. Loads the
    /// module on first call; diagnostics and tests.
    pub fn wgmma_unavailable(&self) -> Option<String> {
        kernels(self).err()
    }

    /// The PTX `kernels/conv_wgmma.cu`'s module was loaded from (build.rs's precompiled
    /// `compute_90a` PTX, or a run-time compile), None before it is loaded; diagnostics and
    /// tests.
    pub fn wgmma_module_ptx(&self) -> Option<std::sync::Arc<str>> {
        self.modules().loaded_ptx("conv_wgmma")
    }

    /// Whether the bf16-storage eval forward of `s` on an input at device address `x_addr`
    /// runs the wgmma kernel: the switch on ([`CudaBackend::set_wgmma`]), where the mma.sync
    /// kernel would run it (`conv_bn_eval_nhwc_bf16s_native`: bf16, route not `Never`),
    /// [`supported`], x 16-byte aligned, its shared memory ([`WG_SMEM`]) within the device's
    /// per block (conv.rs's `TcKernel::Wgmma`), and the module loaded on a device of compute
    /// capability 9.0.
    pub(crate) fn conv_bn_eval_nhwc_bf16s_wgmma(&self, s: &Conv2d, x_addr: u64) -> bool {
        self.wgmma_runs(
            self.conv_bn_eval_nhwc_bf16s_native(s),
            supported(s),
            &[x_addr],
        )
    }

    /// Whether the bf16-storage training forward of `s` (z and the batch-norm partials) on
    /// an input at device address `x_addr` runs the wgmma kernel: as
    /// [`CudaBackend::conv_bn_eval_nhwc_bf16s_wgmma`], where the mma.sync statistics kernel
    /// would run it (`conv_fwd_stats_nhwc_bf16s_native`: also a non-empty output and
    /// reduction).
    pub(crate) fn conv_fwd_stats_nhwc_bf16s_wgmma(&self, s: &Conv2d, x_addr: u64) -> bool {
        self.wgmma_runs(
            self.conv_fwd_stats_nhwc_bf16s_native(s),
            supported(s),
            &[x_addr],
        )
    }

    /// The wgmma kernel the bf16-storage training forward of `s` launches for an input in an
    /// allocation of its own, or None where it does not run (the mma.sync kernel
    /// `conv_fwd_stats_nhwc_bf16s_kernel` names then runs); diagnostics and tests.
    pub fn conv_fwd_stats_nhwc_bf16s_wgmma_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.conv_fwd_stats_nhwc_bf16s_wgmma(s, 0).then(|| {
            by_tile(
                tile_n(s),
                "conv2d_fwd_stats_wgmma_n64",
                "conv2d_fwd_stats_wgmma_n128",
            )
        })
    }

    /// The wgmma kernel the bf16-storage eval forward of `s` launches for an input in an
    /// allocation of its own (16-byte aligned), or None where it does not run (switch off,
    /// not compute capability 9.0, the module not loaded, not bf16, route `Never`, or not
    /// `supported`: the mma.sync kernel `conv_bn_eval_nhwc_bf16s_kernel` names then runs);
    /// diagnostics and tests.
    pub fn conv_bn_eval_nhwc_bf16s_wgmma_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.conv_bn_eval_nhwc_bf16s_wgmma(s, 0).then(|| {
            by_tile(
                tile_n(s),
                "conv2d_fwd_bn_wgmma_n64",
                "conv2d_fwd_bn_wgmma_n128",
            )
        })
    }

    /// `conv2d_bn_eval_fwd_nhwc_bf16s_native` on the wgmma kernel: the batch-norm fold and
    /// the weights' bf16 OHWI copy in arena scratch (nothing allocated once warm, so
    /// capturable in a graph), then one launch of `conv2d_fwd_bn_wgmma_n128` / `_n64`, a grid
    /// of (pixel tiles of 128, channel tiles of 128 or 64). An error where
    /// [`CudaBackend::conv_bn_eval_nhwc_bf16s_wgmma`] is false.
    ///
    /// # Safety
    /// As `conv2d_bn_eval_fwd_nhwc_bf16s_native`: `x` holds `s.x_len().div_ceil(2)` values,
    /// `residual` and `y` `s.y_len().div_ceil(2)`, `w` `s.w_len()`, the batch-norm buffers
    /// `c_out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn conv2d_bn_eval_fwd_nhwc_bf16s_wgmma(
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
        const OP: &str = "conv2d_bn_eval_fwd_nhwc_bf16s_wgmma";
        if !self.conv_bn_eval_nhwc_bf16s_wgmma(s, self.ptr(x)) {
            return Err(self.wgmma_refused(OP, s));
        }
        if s.y_len() == 0 {
            return Ok(());
        }
        norm::with_bn_eval_fold(self, bn, gamma, beta, running_mean, running_var, |ss| {
            let ep = Epilogue::Bn { ss, residual, relu };
            // SAFETY: the caller's contract; ss holds 2 * c_out values.
            unsafe { self.launch_fwd(OP, s, x, w, ep, y) }
        })
    }

    /// `conv2d_fwd_stats_nhwc_bf16s_native` on the wgmma kernel: the weights' bf16 OHWI copy
    /// in arena scratch (nothing allocated once warm, so capturable in a graph), then one
    /// launch of `conv2d_fwd_stats_wgmma_n128` / `_n64`: z rounded to bf16 and the partials of
    /// the rounded z in `conv2d_fwd_stats_mma_nhwc_bf16s`'s layout (`c_out * tiles` each,
    /// `tiles` = `conv::stats_tiles`). An error where
    /// `CudaBackend::conv_fwd_stats_nhwc_bf16s_wgmma` is false. Public as its mma.sync
    /// sibling is, for tests/cuda_conv_wgmma.rs, which checks the raw partials; the model's
    /// way in is the backend op `conv2d_bn_train_fwd_nhwc_bf16`.
    ///
    /// # Safety
    /// As `conv2d_fwd_stats_nhwc_bf16s_native`: `x` holds `s.x_len().div_ceil(2)` values, `z`
    /// `s.y_len().div_ceil(2)`, `w` `s.w_len()`, `part_s` and `part_q` `c_out * tiles` each
    /// (the kernel indexes them so, unchecked).
    pub unsafe fn conv2d_fwd_stats_nhwc_bf16s_wgmma(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        part_s: &mut CudaSlice<f64>,
        part_q: &mut CudaSlice<f64>,
    ) -> Result<()> {
        const OP: &str = "conv2d_fwd_stats_nhwc_bf16s_wgmma";
        if !self.conv_fwd_stats_nhwc_bf16s_wgmma(s, self.ptr(x)) {
            return Err(self.wgmma_refused(OP, s));
        }
        let tiles = stats_tiles(s).unwrap_or(0);
        if part_s.len() < s.c_out * tiles || part_q.len() < s.c_out * tiles {
            return Err(EngineError::Param(format!(
                "{OP}: the partials hold {} and {} values, {s:?} needs {}",
                part_s.len(),
                part_q.len(),
                s.c_out * tiles
            )));
        }
        // SAFETY: the caller's contract.
        unsafe { self.launch_fwd(OP, s, x, w, Epilogue::Stats(part_s, part_q), z) }
    }

    /// The forward's launch: the kernel of `ep` and [`tile_n`] on a grid of (pixel tiles of
    /// 128, channel tiles of 128 or 64), the weights' bf16 OHWI copy
    /// ([`weight_ohwi_bf16_scratch`]), by [`CudaBackend::launch_wgmma`]. The caller checked the
    /// route.
    ///
    /// # Safety
    /// `x` holds `s.x_len().div_ceil(2)` values, `y` `s.y_len().div_ceil(2)`, `w` `s.w_len()`,
    /// the residual `s.y_len().div_ceil(2)`, `ss` `2 * c_out`, the partials `c_out * tiles`.
    unsafe fn launch_fwd(
        &self,
        op: &'static str,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        ep: Epilogue<'_>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if s.y_len() == 0 {
            return Ok(());
        }
        let a = args(s)?;
        let p = s.n * s.out_h() * s.out_w();
        let tn = tile_n(s);
        let stats = matches!(ep, Epilogue::Stats(..));
        let grid_xy = (p.div_ceil(TILE_M), s.c_out.div_ceil(tn));
        let copy = || weight_ohwi_bf16_scratch(self, s, w, op);
        // SAFETY: the caller's contract; the copy holds c_out rows of kp bf16 weights.
        unsafe {
            self.launch_wgmma(
                op,
                grid_xy,
                |ks| match (stats, tn == 64) {
                    (false, true) => &ks.n64,
                    (false, false) => &ks.n128,
                    (true, true) => &ks.stats_n64,
                    (true, false) => &ks.stats_n128,
                },
                copy,
                x,
                y,
                &a,
                ep,
            )
        }
    }

    /// One launch of the forward's or the data gradient's kernel (the weight gradient's is
    /// conv.rs's `launch_split`, with its splits' workspace and reduction): the kernel `pick`
    /// takes from the module's (`op`'s error where it does not load) on `grid_xy` blocks of
    /// [`THREADS`] with [`WG_SMEM`] bytes of dynamic shared memory, its arguments `src`, the
    /// bf16 weight copy `copy` makes in arena scratch (given back after the launch: stream
    /// order keeps the next user after it), `out`, `ints` and `ep`'s.
    ///
    /// # Safety
    /// The buffers hold what the kernel indexes with `ints` and the grid.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_wgmma(
        &self,
        op: &'static str,
        (gx, gy): (usize, usize),
        pick: impl FnOnce(&loaded::Kernels) -> &Kernel,
        copy: impl FnOnce() -> Result<CudaSlice<f32>>,
        src: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        ints: &[i32],
        ep: Epilogue<'_>,
    ) -> Result<()> {
        let mut cfg = blocks(op, (gx, gy, 1), THREADS)?;
        cfg.shared_mem_bytes = WG_SMEM;
        let kern = pick(kernels_for(self, op)?);
        let wt = copy()?;
        let r = {
            let relu_i = match &ep {
                Epilogue::Bn { relu, .. } => i32::from(*relu),
                Epilogue::Stats(..) | Epilogue::Plain => 0,
            };
            let mut l = kern.on(self.stream());
            l.arg(src).arg(&wt).arg(out).ints(ints);
            match ep {
                Epilogue::Bn { ss, residual, .. } => {
                    l.arg(ss);
                    match residual {
                        Some(r) => l.arg(r),
                        None => l.arg(&NULL),
                    };
                    l.arg(&relu_i);
                }
                Epilogue::Stats(part_s, part_q) => {
                    l.arg(part_s).arg(part_q);
                }
                Epilogue::Plain => {}
            }
            // SAFETY: the caller's contract.
            unsafe { l.launch(cfg) }
        };
        self.give_scratch(wt);
        r
    }
}

// ---- The channels-last data gradient on wgmma -------------------------------------------

/// Input channels per block of the data gradient: 64 where `c_in <= 64`
/// (`conv2d_bwd_data_wgmma_n64`), else 128.
fn tile_n_bwd_data(s: &Conv2d) -> usize {
    if s.c_in <= 64 {
        64
    } else {
        128
    }
}

/// Whether `kernels/conv_wgmma.cu` computes the data gradient of `s`: `c_out` a positive
/// multiple of 8 (a 16-byte copy of dy is 8 channels of one tap), a positive `c_in` and
/// stride, the kernel within the padded input, and sizes its 32-bit indexing holds (the
/// geometry, the weight copy's length); any kernel size, stride and padding. (dy must also be
/// 16-byte aligned, checked per call.)
pub(crate) fn supported_bwd_data(s: &Conv2d) -> bool {
    s.c_out > 0
        && s.c_out.is_multiple_of(8)
        && s.c_in > 0
        && s.stride > 0
        && s.kh > 0
        && s.kw > 0
        && s.h + 2 * s.pad >= s.kh
        && s.w + 2 * s.pad >= s.kw
        && geometry(s).is_ok()
        && dim(bf16s_bwd_weight_len(s)).is_ok()
}

impl CudaBackend {
    /// Whether the bf16-storage channels-last data gradient of `s` on a `dy` at device
    /// address `dy_addr` runs the wgmma kernel: the switch on ([`CudaBackend::set_wgmma`]),
    /// where the mma.sync kernel would run it (`conv_bwd_data_nhwc_bf16s_native`: bf16, route
    /// not `Never`), [`supported_bwd_data`], dy 16-byte aligned, its shared memory
    /// ([`WG_SMEM`]) within the device's per block (conv.rs's `TcKernel::Wgmma`), and the
    /// module loaded on a device of compute capability 9.0.
    pub(crate) fn conv_bwd_data_nhwc_bf16s_wgmma(&self, s: &Conv2d, dy_addr: u64) -> bool {
        self.wgmma_runs(
            self.conv_bwd_data_nhwc_bf16s_native(s),
            supported_bwd_data(s),
            &[dy_addr],
        )
    }

    /// The wgmma kernel the bf16-storage channels-last data gradient of `s` launches for a
    /// `dy` in an allocation of its own (16-byte aligned), or None where it does not run
    /// (switch off, not compute capability 9.0, the module not loaded, not bf16, route
    /// `Never`, or not `supported_bwd_data`: the mma.sync kernel
    /// `conv_bwd_data_nhwc_bf16s_kernel` names then runs); diagnostics and tests.
    pub fn conv_bwd_data_nhwc_bf16s_wgmma_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.conv_bwd_data_nhwc_bf16s_wgmma(s, 0).then(|| {
            by_tile(
                tile_n_bwd_data(s),
                "conv2d_bwd_data_wgmma_n64",
                "conv2d_bwd_data_wgmma_n128",
            )
        })
    }

    /// `conv2d_bwd_data_nhwc_bf16s_native` on the wgmma kernel: the weights' bf16 copy in the
    /// data gradient's order in arena scratch (nothing allocated once warm, so capturable in
    /// a graph), then one launch of `conv2d_bwd_data_wgmma_n128` / `_n64`, a grid of (per
    /// output phase a run of 128-pixel tiles, conv.rs's `phase_grid`; `c_in` tiles of 128 or
    /// 64). Every dx value is written (zeros where no tap reaches it). An error where
    /// [`CudaBackend::conv_bwd_data_nhwc_bf16s_wgmma`] is false.
    ///
    /// # Safety
    /// As `conv2d_bwd_data_nhwc_bf16s_native`: `dy` holds `s.y_len().div_ceil(2)` values, `w`
    /// `s.w_len()`, `dx` `s.x_len()` (the kernel indexes them so, unchecked).
    pub(crate) unsafe fn conv2d_bwd_data_nhwc_bf16s_wgmma(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_data_nhwc_bf16s_wgmma";
        if !self.conv_bwd_data_nhwc_bf16s_wgmma(s, self.ptr(dy)) {
            return Err(self.wgmma_refused(OP, s));
        }
        if s.x_len() == 0 {
            return Ok(());
        }
        let g = geometry(s)?;
        let tn = tile_n_bwd_data(s);
        let (gx, _) = phase_grid(s, TILE_M);
        let copy = || weight_bwd_nhwc_bf16_scratch(self, s, w, OP);
        // SAFETY: the caller's contract; the copy holds the phases' padded bf16 weight rows.
        unsafe {
            self.launch_wgmma(
                OP,
                (gx, s.c_in.div_ceil(tn)),
                |ks| {
                    if tn == 64 {
                        &ks.bwd_data_n64
                    } else {
                        &ks.bwd_data_n128
                    }
                },
                copy,
                dy,
                dx,
                &g[..9],
                Epilogue::Plain,
            )
        }
    }
}

// ---- The weight gradient on wgmma (channels-last, bf16 storage) ----------------------------
//
// `conv2d_bwd_weight_wgmma_n128` / `_n64` (kernels/conv_wgmma.cu's weight-gradient section):
// the contract of conv.rs's `CudaBackend::conv2d_bwd_weight_nhwc_bf16s_native`
// (`conv2d_bwd_weight_mma_nhwc_bf16s`: x and dy NHWC in bf16 storage, dw OIHW f32 overwritten,
// split over the pixels by that kernel's plan, the splits' workspace from arena scratch summed
// in split order by `conv_splitk_reduce`: conv.rs's `launch_split`, with the mma.sync kernel's
// K tile and 128x128 tile count, so the same splits), both operands MN-major
// (`wgmma.mma_async` with imm-trans-a = imm-trans-b = 1) from 128-byte-swizzled shared memory.
// The same products in the same order as the mma.sync kernel per split: on the emulated driver
// the two agree bit for bit (tests/cuda_conv_wgmma_wgrad.rs).

/// Columns (`(kh, kw, c)`) per block of the weight gradient: 64 where `c_in * kh * kw <= 64`
/// (`conv2d_bwd_weight_wgmma_n64`: one column tile, as the mma.sync kernel's 128, so the same
/// split plan), else 128.
fn wgrad_tile_n(s: &Conv2d) -> usize {
    if s.c_in * s.kh * s.kw <= 64 {
        64
    } else {
        128
    }
}

/// Whether `conv2d_bwd_weight_wgmma_*` computes `s`: `c_in` and `c_out` positive multiples of
/// 8 (a 16-byte copy is 8 channels of one tap of x, or 8 output channels of dy). x and dy must
/// also be 16-byte aligned, checked per call; the rest (sizes, kernel size, stride, padding)
/// is what the mma.sync kernel takes.
pub(crate) fn wgrad_supported(s: &Conv2d) -> bool {
    s.c_in > 0 && s.c_in.is_multiple_of(8) && s.c_out > 0 && s.c_out.is_multiple_of(8)
}

impl CudaBackend {
    /// Whether the bf16-storage channels-last weight gradient of `s` on x at device address
    /// `x_addr` and dy at `dy_addr` runs the wgmma kernel: the switch on
    /// ([`CudaBackend::set_wgmma`]), where the mma.sync kernel would run it
    /// (`conv_bwd_weight_nhwc_bf16s_native`: bf16, route not `Never`), [`wgrad_supported`],
    /// both 16-byte aligned, [`WG_SMEM`] within the device's per block (`TcKernel::Wgmma`,
    /// the forward's ring), and the module loaded on a device of compute capability 9.0.
    pub(crate) fn conv_bwd_weight_nhwc_bf16s_wgmma(
        &self,
        s: &Conv2d,
        x_addr: u64,
        dy_addr: u64,
    ) -> bool {
        self.wgmma_runs(
            self.conv_bwd_weight_nhwc_bf16s_native(s),
            wgrad_supported(s),
            &[x_addr, dy_addr],
        )
    }

    /// The wgmma kernel the bf16-storage channels-last weight gradient of `s` launches for x
    /// and dy in allocations of their own (16-byte aligned), or None where it does not run (the
    /// mma.sync kernel `conv_bwd_weight_nhwc_bf16s_kernel` names,
    /// `conv2d_bwd_weight_mma_nhwc_bf16s`, then runs); diagnostics and tests.
    pub fn conv_bwd_weight_nhwc_bf16s_wgmma_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.conv_bwd_weight_nhwc_bf16s_wgmma(s, 0, 0).then(|| {
            by_tile(
                wgrad_tile_n(s),
                "conv2d_bwd_weight_wgmma_n64",
                "conv2d_bwd_weight_wgmma_n128",
            )
        })
    }

    /// `conv2d_bwd_weight_nhwc_bf16s_native` on the wgmma kernel: one launch of
    /// `conv2d_bwd_weight_wgmma_n128` / `_n64` on (column tiles of 128 or 64, channel tiles of
    /// 128, splits) blocks of 256 threads, [`WG_SMEM`] bytes of dynamic shared memory, split
    /// over the pixels as the mma.sync kernel (its K tile and tile count: the same plan), the
    /// splits' workspace from arena scratch summed in split order by `conv_splitk_reduce`
    /// (`launch_split`): nothing allocated once warm, so capturable in a graph. An error where
    /// [`CudaBackend::conv_bwd_weight_nhwc_bf16s_wgmma`] is false.
    ///
    /// # Safety
    /// As `conv2d_bwd_weight_nhwc_bf16s_native`: `x` holds `s.x_len().div_ceil(2)` values,
    /// `dy` `s.y_len().div_ceil(2)`, `dw` `s.w_len()`.
    pub(crate) unsafe fn conv2d_bwd_weight_nhwc_bf16s_wgmma(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight_nhwc_bf16s_wgmma";
        if !self.conv_bwd_weight_nhwc_bf16s_wgmma(s, self.ptr(x), self.ptr(dy)) {
            return Err(self.wgmma_refused(OP, s));
        }
        let g = geometry(s)?;
        let nc = s.c_in * s.kh * s.kw;
        if nc == 0 || s.c_out == 0 {
            return Ok(());
        }
        let k = s.n * s.out_h() * s.out_w();
        let ks = kernels_for(self, OP)?;
        let tn = wgrad_tile_n(s);
        let kern: &Kernel = if tn == 64 {
            &ks.wgrad_n64
        } else {
            &ks.wgrad_n128
        };
        // The mma.sync kernel's K tile and 128x128 tile count (`side`), so its split plan: at
        // tn = 64 there is one column tile either way (c_in * kh * kw <= 64).
        let tiling = Tiling {
            threads: THREADS,
            bk: MMA_BK,
            side: MMA_TILE,
            smem: self.smem_dynamic(OP, TcKernel::Wgmma)?,
            vec: None,
        };
        let grid_xy = (nc.div_ceil(tn), s.c_out.div_ceil(MMA_TILE));
        // SAFETY: x, dy (bf16 storage) and dw hold the lengths `s` gives (the caller's
        // contract); an empty reduction fills dw with zeros there.
        unsafe { launch_split(self, OP, kern, tiling, grid_xy, k, x, dy, dw, &g, None) }
    }
}
