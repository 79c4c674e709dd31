//! Convolutions on the device (`kernels/conv.cu`, mirroring `cpu/conv.rs`): implicit-GEMM
//! forward, data gradient and weight gradient (split over the reduction when the output
//! tiles alone would not fill the GPU, the splits summed by a second kernel). At the
//! backend's precision: f32 runs the SIMT kernels of `conv.cu` (the reference), tf32 and
//! bf16 the tensor-core kernels of `kernels/conv_tc.cu` (the same GEMMs and tiling of the
//! grid, operands rounded as they are staged, f32 accumulation).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels, Kernel};
use super::CudaBackend;
use crate::engine::shapes::Conv2d;
use crate::engine::{Backend, EngineError, Precision, Result};

kernels!("conv" {
    fwd: "conv2d_fwd",
    bwd_data: "conv2d_bwd_data",
    bwd_weight: "conv2d_bwd_weight",
    splitk_reduce: "conv_splitk_reduce",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.conv.get(|| Kernels::load(be.modules()))
}

/// The tensor-core kernels of `kernels/conv_tc.cu`.
mod tc {
    use super::kernels;
    kernels!("conv_tc" {
        fwd_bf16: "conv2d_fwd_bf16",
        fwd_tf32: "conv2d_fwd_tf32",
        bwd_data_bf16: "conv2d_bwd_data_bf16",
        bwd_data_tf32: "conv2d_bwd_data_tf32",
        bwd_weight_bf16: "conv2d_bwd_weight_bf16",
        bwd_weight_tf32: "conv2d_bwd_weight_tf32",
    });
}
pub(crate) use tc::Kernels as TcKernels;

fn tc_kernels(be: &CudaBackend) -> Result<&TcKernels> {
    be.families.conv_tc.get(|| TcKernels::load(be.modules()))
}

/// Threads of a tensor-core block (4 warps); the tiles are 64x64 like the SIMT kernels'.
const TC_THREADS: u32 = 128;
/// K tile of the tensor-core kernels: a split of the weight gradient covers a multiple.
const TC_BK: usize = 32;

/// Whether `be`'s device can run its convolutions at `p` (tf32 and bf16: compute capability
/// 8.0 or newer, and the tensor-core module loads), checked when the precision is set.
pub(crate) fn check_precision(be: &CudaBackend, p: Precision) -> Result<()> {
    if !p.tensor_cores() {
        return Ok(());
    }
    let (major, minor) = be.info().compute_capability;
    if major < 8 {
        return Err(EngineError::Param(format!(
            "--precision {p} needs tensor cores with {p} (compute capability 8.0 or newer); {} is {major}.{minor}",
            be.info().name
        )));
    }
    tc_kernels(be).map(|_| ()).map_err(|e| match e {
        EngineError::Compile { log, .. } if log.contains("mma.h") => EngineError::Param(format!(
            "--precision {p}: the tensor-core kernels (kernels/conv_tc.cu) were not precompiled and need the CUDA headers (mma.h) to compile: rebuild with them (ICHCAM_CUDA_INCLUDE, CUDA_HOME, or pip's nvidia-cuda-runtime and nvidia-cuda-crt beside NVRTC)"
        )),
        e => e,
    })
}

/// The tensor-core kernel of `be`'s precision among (bf16, tf32), or None for f32.
fn tc_pick<'a>(
    be: &'a CudaBackend,
    pick: impl Fn(&'a TcKernels) -> (&'a Kernel, &'a Kernel),
) -> Result<Option<&'a Kernel>> {
    Ok(match be.precision() {
        Precision::F32 => None,
        Precision::Bf16 => Some(pick(tc_kernels(be)?).0),
        Precision::Tf32 => Some(pick(tc_kernels(be)?).1),
    })
}

/// The `int` arguments the three convolution kernels share, in their order (and the
/// buffers' total sizes checked against the 32-bit indexing).
fn geometry(s: &Conv2d) -> Result<[i32; 11]> {
    int_args([s.y_len(), s.x_len(), s.w_len()])?;
    int_args([
        s.n,
        s.c_in,
        s.h,
        s.w,
        s.c_out,
        s.kh,
        s.kw,
        s.stride,
        s.pad,
        s.out_h(),
        s.out_w(),
    ])
}

pub(crate) fn conv2d_fwd(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    s.check_fwd(x.len(), w.len(), y.len())?;
    let p = s.n * s.out_h() * s.out_w();
    if p == 0 || s.c_out == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    let tiles = (p.div_ceil(64), s.c_out.div_ceil(64), 1);
    let (k, cfg) = match tc_pick(be, |t| (&t.fwd_bf16, &t.fwd_tf32))? {
        Some(k) => (k, blocks("conv2d_fwd", tiles, TC_THREADS)?),
        None => (&kernels(be)?.fwd, blocks("conv2d_fwd", tiles, 256)?),
    };
    // SAFETY: x, w and y hold the lengths `s` gives (checked); the kernel indexes them so.
    unsafe { k.on(be.stream()).arg(x).arg(w).arg(y).ints(&g).launch(cfg) }
}

pub(crate) fn conv2d_bwd_data(
    be: &CudaBackend,
    s: &Conv2d,
    dy: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    s.check_bwd_data(dy.len(), w.len(), dx.len())?;
    let p = s.n * s.h * s.w;
    if p == 0 || s.c_in == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    let tiles = (p.div_ceil(64), s.c_in.div_ceil(64), 1);
    let (k, cfg) = match tc_pick(be, |t| (&t.bwd_data_bf16, &t.bwd_data_tf32))? {
        Some(k) => (k, blocks("conv2d_bwd_data", tiles, TC_THREADS)?),
        None => (
            &kernels(be)?.bwd_data,
            blocks("conv2d_bwd_data", tiles, 256)?,
        ),
    };
    // SAFETY: dy, w and dx hold the lengths `s` gives (checked).
    unsafe {
        k.on(be.stream())
            .arg(dy)
            .arg(w)
            .arg(dx)
            .ints(&g)
            .launch(cfg)
    }
}

pub(crate) fn conv2d_bwd_weight(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "conv2d_bwd_weight";
    s.check_bwd_weight(x.len(), dy.len(), dw.len())?;
    let g = geometry(s)?;
    let nc = s.c_in * s.kh * s.kw;
    let k = s.n * s.out_h() * s.out_w();
    if nc == 0 || s.c_out == 0 {
        return Ok(());
    }
    if k == 0 {
        return be.fill(dw, 0.0);
    }
    // Split the reduction over batch*OH*OW so that the grid fills the GPU; each split
    // covers at least 256 pixels.
    let tiles = s.c_out.div_ceil(64) * nc.div_ceil(64);
    let target = 4 * be.info().multiprocessors.max(1) as usize;
    let max_splits = (k / 256).clamp(1, 65_535);
    let want = target.div_ceil(tiles).clamp(1, max_splits);
    let tc = tc_pick(be, |t| (&t.bwd_weight_bf16, &t.bwd_weight_tf32))?;
    if tc.is_some() && (s.kh > 255 || s.kw > 255) {
        return Err(EngineError::Param(format!(
            "{OP}: a {}x{} kernel is over the tensor-core path's 255x255",
            s.kh, s.kw
        )));
    }
    // A split covers whole K tiles of the kernel that runs.
    let bk = if tc.is_some() { TC_BK } else { 16 };
    let chunk = k.div_ceil(want).div_ceil(bk) * bk;
    let splits = k.div_ceil(chunk);
    let tiles = (nc.div_ceil(64), s.c_out.div_ceil(64), splits);
    let ks = kernels(be)?;
    let (kern, cfg) = match tc {
        Some(t) => (t, blocks(OP, tiles, TC_THREADS)?),
        None => (&ks.bwd_weight, blocks(OP, tiles, 256)?),
    };
    let chunk = dim(chunk)?;
    if splits == 1 {
        // SAFETY: x and dy hold the lengths `s` gives, dw one weight tensor (checked).
        return unsafe {
            kern.on(be.stream())
                .arg(x)
                .arg(dy)
                .arg(dw)
                .ints(&g)
                .arg(&chunk)
                .launch(cfg)
        };
    }
    let mut ws = be.alloc::<f32>(splits * s.w_len())?;
    // SAFETY: as above, ws holding one weight tensor per split.
    unsafe {
        kern.on(be.stream())
            .arg(x)
            .arg(dy)
            .arg(&mut ws)
            .ints(&g)
            .arg(&chunk)
            .launch(cfg)?;
    }
    let (splits, len) = (dim(splits)?, dim(s.w_len())?);
    // SAFETY: ws holds `splits` tensors of `len` weights, dw one.
    unsafe {
        ks.splitk_reduce
            .on(be.stream())
            .arg(&ws)
            .arg(dw)
            .arg(&splits)
            .arg(&len)
            .launch(grid(s.w_len()))
    }
}
