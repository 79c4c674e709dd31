//! Convolutions on the device (`kernels/conv.cu`, mirroring `cpu/conv.rs`): implicit-GEMM
//! forward, data gradient (per output phase: a stride > 1 skips the structurally zero
//! taps) and weight gradient (split over the reduction when the output tiles alone would
//! not fill the GPU, the splits summed by a second kernel). At the
//! backend's precision: f32 runs the SIMT kernels of `conv.cu` (the reference), tf32 and
//! bf16 the tensor-core kernels of `kernels/conv_tc.cu` (the same GEMMs and tiling of the
//! grid, operands rounded as they are staged, f32 accumulation). The eval-mode conv + batch
//! norm (+ residual) (+ ReLU) is one forward launch with the normalisation in its epilogue
//! ([`conv2d_bn_eval_fwd`]; the per-channel scale and shift come from `norm.rs`), and on the
//! split-K path in the kernel that sums the splits. The training forward can write, with z,
//! the batch-norm partial statistics of z per (channel, 64-pixel tile) ([`conv2d_fwd_stats`];
//! on the split-K path the kernel that sums the splits takes them). At tf32 and bf16 the
//! large layers (forwards plain and fused alike, data and weight gradients) take the 128x128
//! `mma.sync` kernels of `conv_tc.cu` instead ([`mma_route`], [`mma_route_weight`],
//! [`MmaRoute`]), with 16-byte copies where [`mma_vec`] allows. The eval-mode fused forward
//! also runs natively on channels-last (NHWC) activations at tf32 / bf16
//! ([`CudaBackend::conv2d_bn_eval_fwd_nhwc_native`], `conv2d_fwd_bn_mma_nhwc_*`: K ordered
//! (kh, kw, c), the weights copied to OHWI per call, 16-byte copies where [`mma_vec_nhwc`]
//! allows), and at bf16 also on activations stored in bf16
//! ([`CudaBackend::conv2d_bn_eval_fwd_nhwc_bf16s_native`], `conv2d_fwd_bn_mma_nhwc_bf16s`:
//! two values per f32 slot, the weights copied to bf16 OHWI per call, a bf16-only ring).
//! The training path runs channels-last too at tf32 / bf16: the forward with the
//! batch-statistics epilogue ([`CudaBackend::conv2d_fwd_stats_nhwc_native`]: the eval
//! kernel's GEMM with [`conv2d_fwd_stats`]'s partials), the data gradient
//! ([`CudaBackend::conv2d_bwd_data_nhwc_native`]: per output phase, K ordered (tap, c_out),
//! the weights copied per call in that order) and the weight gradient
//! ([`CudaBackend::conv2d_bwd_weight_nhwc_native`], `conv2d_bwd_weight_mma_nhwc_*`: N ordered
//! (kh, kw, c), split over the pixels as the NCHW one, dw written OIHW). At bf16 the training
//! forward and data gradient also run on activations stored in bf16
//! ([`CudaBackend::conv2d_fwd_stats_nhwc_bf16s_native`]: x and z bf16, the partials of the
//! rounded z; [`CudaBackend::conv2d_bwd_data_nhwc_bf16s_native`]: dy bf16, dx f32), on the
//! bf16-storage eval kernel's ring, and the weight gradient on x and dy stored in bf16
//! ([`CudaBackend::conv2d_bwd_weight_nhwc_bf16s_native`]: a bf16-only ring, the same split).
//! The channels-last forwards and data gradients (f32 and bf16 storage) launch a 64 x 256
//! tile instead of 128 x 128 (the `_m64` kernels, `NhwcTile`) where the GEMM's M, `c_out`
//! of a forward or `c_in` of a data gradient, is at most 64. Every tensor-core kernel is taken
//! only where its shared memory (one table: [`TcKernel`], [`shared_memory`]) fits what the
//! device gives a block ([`CudaBackend::fits`]); elsewhere a shallower cp.async ring
//! ([`Ring`]: the `mma.sync` kernels' variants for 99 KiB per block), a smaller tile, or the
//! fallback (WMMA for NCHW, layout changes or conversions for channels-last) runs.

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels, Kernel, Launch, NULL};
use super::{norm, CudaBackend};
use crate::engine::shapes::Conv2d;
use crate::engine::{Backend, BatchNorm2d, EngineError, Precision, Result};

kernels!("conv" {
    fwd: "conv2d_fwd",
    fwd_bn: "conv2d_fwd_bn",
    fwd_stats: "conv2d_fwd_stats",
    bwd_data: "conv2d_bwd_data",
    bwd_weight: "conv2d_bwd_weight",
    splitk_reduce: "conv_splitk_reduce",
    splitk_reduce_bn: "conv_splitk_reduce_bn",
    splitk_reduce_stats: "conv_splitk_reduce_stats",
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
        fwd_bn_bf16: "conv2d_fwd_bn_bf16",
        fwd_bn_tf32: "conv2d_fwd_bn_tf32",
        fwd_stats_bf16: "conv2d_fwd_stats_bf16",
        fwd_stats_tf32: "conv2d_fwd_stats_tf32",
        bwd_data_bf16: "conv2d_bwd_data_bf16",
        bwd_data_tf32: "conv2d_bwd_data_tf32",
        bwd_weight_bf16: "conv2d_bwd_weight_bf16",
        bwd_weight_tf32: "conv2d_bwd_weight_tf32",
        fwd_mma_bf16: "conv2d_fwd_mma_bf16",
        fwd_bn_mma_bf16: "conv2d_fwd_bn_mma_bf16",
        fwd_stats_mma_bf16: "conv2d_fwd_stats_mma_bf16",
        bwd_data_mma_bf16: "conv2d_bwd_data_mma_bf16",
        bwd_weight_mma_bf16: "conv2d_bwd_weight_mma_bf16",
        fwd_mma_tf32: "conv2d_fwd_mma_tf32",
        fwd_bn_mma_tf32: "conv2d_fwd_bn_mma_tf32",
        fwd_stats_mma_tf32: "conv2d_fwd_stats_mma_tf32",
        bwd_data_mma_tf32: "conv2d_bwd_data_mma_tf32",
        bwd_weight_mma_tf32: "conv2d_bwd_weight_mma_tf32",
        fwd_bn_mma_nhwc_bf16: "conv2d_fwd_bn_mma_nhwc_bf16",
        fwd_bn_mma_nhwc_tf32: "conv2d_fwd_bn_mma_nhwc_tf32",
        fwd_stats_mma_nhwc_bf16: "conv2d_fwd_stats_mma_nhwc_bf16",
        fwd_stats_mma_nhwc_tf32: "conv2d_fwd_stats_mma_nhwc_tf32",
        bwd_data_mma_nhwc_bf16: "conv2d_bwd_data_mma_nhwc_bf16",
        bwd_data_mma_nhwc_tf32: "conv2d_bwd_data_mma_nhwc_tf32",
        weight_bwd_nhwc: "conv_weight_bwd_nhwc",
        weight_ohwi: "conv_weight_ohwi",
        fwd_bn_mma_nhwc_bf16s: "conv2d_fwd_bn_mma_nhwc_bf16s",
        weight_ohwi_bf16: "conv_weight_ohwi_bf16",
        fwd_stats_mma_nhwc_bf16s: "conv2d_fwd_stats_mma_nhwc_bf16s",
        bwd_data_mma_nhwc_bf16s: "conv2d_bwd_data_mma_nhwc_bf16s",
        weight_bwd_nhwc_bf16: "conv_weight_bwd_nhwc_bf16",
        bwd_weight_mma_nhwc_bf16: "conv2d_bwd_weight_mma_nhwc_bf16",
        bwd_weight_mma_nhwc_tf32: "conv2d_bwd_weight_mma_nhwc_tf32",
        bwd_weight_mma_nhwc_bf16s: "conv2d_bwd_weight_mma_nhwc_bf16s",
        bwd_weight_mma_nhwc_bf16s_s5: "conv2d_bwd_weight_mma_nhwc_bf16s_s5",
        fwd_bn_mma_nhwc_bf16_m64: "conv2d_fwd_bn_mma_nhwc_bf16_m64",
        fwd_bn_mma_nhwc_tf32_m64: "conv2d_fwd_bn_mma_nhwc_tf32_m64",
        fwd_stats_mma_nhwc_bf16_m64: "conv2d_fwd_stats_mma_nhwc_bf16_m64",
        fwd_stats_mma_nhwc_tf32_m64: "conv2d_fwd_stats_mma_nhwc_tf32_m64",
        bwd_data_mma_nhwc_bf16_m64: "conv2d_bwd_data_mma_nhwc_bf16_m64",
        bwd_data_mma_nhwc_tf32_m64: "conv2d_bwd_data_mma_nhwc_tf32_m64",
        fwd_bn_mma_nhwc_bf16s_m64: "conv2d_fwd_bn_mma_nhwc_bf16s_m64",
        fwd_stats_mma_nhwc_bf16s_m64: "conv2d_fwd_stats_mma_nhwc_bf16s_m64",
        bwd_data_mma_nhwc_bf16s_m64: "conv2d_bwd_data_mma_nhwc_bf16s_m64",
        fwd_mma_bf16_s2: "conv2d_fwd_mma_bf16_s2",
        fwd_bn_mma_bf16_s2: "conv2d_fwd_bn_mma_bf16_s2",
        fwd_stats_mma_bf16_s2: "conv2d_fwd_stats_mma_bf16_s2",
        bwd_data_mma_bf16_s2: "conv2d_bwd_data_mma_bf16_s2",
        bwd_weight_mma_bf16_s2: "conv2d_bwd_weight_mma_bf16_s2",
        fwd_mma_tf32_s2: "conv2d_fwd_mma_tf32_s2",
        fwd_bn_mma_tf32_s2: "conv2d_fwd_bn_mma_tf32_s2",
        fwd_stats_mma_tf32_s2: "conv2d_fwd_stats_mma_tf32_s2",
        bwd_data_mma_tf32_s2: "conv2d_bwd_data_mma_tf32_s2",
        bwd_weight_mma_tf32_s2: "conv2d_bwd_weight_mma_tf32_s2",
        fwd_bn_mma_nhwc_bf16s_s4: "conv2d_fwd_bn_mma_nhwc_bf16s_s4",
        fwd_stats_mma_nhwc_bf16s_s4: "conv2d_fwd_stats_mma_nhwc_bf16s_s4",
        bwd_data_mma_nhwc_bf16s_s4: "conv2d_bwd_data_mma_nhwc_bf16s_s4",
        fwd_bn_mma_nhwc_bf16s_m64_s3: "conv2d_fwd_bn_mma_nhwc_bf16s_m64_s3",
        fwd_stats_mma_nhwc_bf16s_m64_s3: "conv2d_fwd_stats_mma_nhwc_bf16s_m64_s3",
        bwd_data_mma_nhwc_bf16s_m64_s3: "conv2d_bwd_data_mma_nhwc_bf16s_m64_s3",
        fwd_bn_mma_nhwc_bf16_s2: "conv2d_fwd_bn_mma_nhwc_bf16_s2",
        fwd_bn_mma_nhwc_tf32_s2: "conv2d_fwd_bn_mma_nhwc_tf32_s2",
        fwd_bn_mma_nhwc_tf32_m64_s2: "conv2d_fwd_bn_mma_nhwc_tf32_m64_s2",
        fwd_stats_mma_nhwc_bf16_s2: "conv2d_fwd_stats_mma_nhwc_bf16_s2",
        fwd_stats_mma_nhwc_tf32_s2: "conv2d_fwd_stats_mma_nhwc_tf32_s2",
        fwd_stats_mma_nhwc_tf32_m64_s2: "conv2d_fwd_stats_mma_nhwc_tf32_m64_s2",
        bwd_data_mma_nhwc_bf16_s2: "conv2d_bwd_data_mma_nhwc_bf16_s2",
        bwd_data_mma_nhwc_tf32_s2: "conv2d_bwd_data_mma_nhwc_tf32_s2",
        bwd_data_mma_nhwc_tf32_m64_s2: "conv2d_bwd_data_mma_nhwc_tf32_m64_s2",
        bwd_weight_mma_nhwc_bf16_s2: "conv2d_bwd_weight_mma_nhwc_bf16_s2",
    });
}
pub(crate) use tc::Kernels as TcKernels;

pub(super) fn tc_kernels(be: &CudaBackend) -> Result<&TcKernels> {
    be.families.conv_tc.get(|| TcKernels::load(be.modules()))
}

/// How a split-K kernel of [`launch_split`] tiles its GEMM.
#[derive(Clone, Copy)]
pub(crate) struct Tiling {
    /// Threads per block.
    pub(crate) threads: u32,
    /// K tile: a split covers a whole number of them.
    pub(crate) bk: usize,
    /// Side of the block's output tile (64 or 128).
    pub(crate) side: usize,
    /// Dynamic shared memory per block.
    pub(crate) smem: u32,
    /// The kernel's last argument after `chunk` (the mma kernels' `vec`), if it takes one.
    pub(crate) vec: Option<i32>,
}

/// The f32 SIMT kernels of `conv.cu`: 64x64 tiles, 256 threads, K tiles of 16.
const SIMT: Tiling = Tiling {
    threads: 256,
    bk: 16,
    side: 64,
    smem: 0,
    vec: None,
};
/// The WMMA kernels of `conv_tc.cu`: 64x64 tiles, 128 threads (4 warps), K tiles of 16
/// (`TBK`).
const TC: Tiling = Tiling {
    threads: 128,
    bk: 16,
    side: 64,
    smem: 0,
    vec: None,
};
/// The 128 x 128 split-K `mma.sync` kernels of `conv_tc.cu` (`k`: the NCHW weight gradient,
/// the channels-last ones) at `be`'s precision with their copy paths `vec`; an error where
/// `k`'s shared memory does not fit `be`'s limit ([`CudaBackend::smem_dynamic`]).
fn mma_tiling(be: &CudaBackend, op: &'static str, k: TcKernel, vec: i32) -> Result<Tiling> {
    Ok(Tiling {
        threads: MMA_THREADS,
        bk: MMA_BK,
        side: MMA_TILE,
        smem: be.smem_dynamic(op, k)?,
        vec: Some(vec),
    })
}

/// Block tile (both sides) of the bf16 `mma.sync` forward (`MBM`, `MBN` in conv_tc.cu).
pub(crate) const MMA_TILE: usize = 128;
/// Threads of its blocks (8 warps).
const MMA_THREADS: u32 = 256;
/// Its K tile (`MBK`).
pub(crate) const MMA_BK: usize = 32;

/// The 48 KiB of shared memory every CUDA device gives a block (without the opt-in): the
/// WMMA kernels' static arrays fit it ([`shared_memory`]), so they are the floor of every
/// fallback, and [`CudaBackend::limit_shared_memory_for_tests`] goes no lower.
pub(crate) const SMEM_FLOOR: u32 = 48 * 1024;

/// A tensor-core convolution kernel (a family of them: forwards, gradients, epilogues) by the
/// shared memory a block of it takes ([`shared_memory`]), which decides whether it runs on a
/// device ([`CudaBackend::fits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcKernel {
    /// The 64x64 WMMA kernels (`conv2d_fwd_tf32`, ...; `weight`: the weight gradients, which
    /// add a column table): the floor of the fallbacks, within the 48 KiB every device gives
    /// ([`SMEM_FLOOR`]; the unit test `shared_memory_by_kernel_and_limit`), so no selection
    /// asks (listed for the table and its test against the compiled kernels).
    Wmma { weight: bool },
    /// The 128x128 NCHW `mma.sync` kernels (`conv2d_*_mma_*`: forwards, data and weight
    /// gradients) with a ring of 3 f32 stages, or 2 (`_s2`, [`Ring::Shallow`]).
    MmaNchw(Ring),
    /// The channels-last forwards and data gradients on f32 activations, of a tile, with a
    /// ring of 3 f32 stages, or 2 (`_s2`, [`Ring::Shallow`]; of the 64x256 tile at tf32 only:
    /// at bf16 its 2 stages do not fit 99 KiB either, and there is no such kernel).
    MmaNhwc(NhwcTile, Ring),
    /// The channels-last forwards and data gradients on bf16 activations, of a tile, with a
    /// ring of 6 bf16 stages, or the shallow one ([`Ring::Shallow`]: 4 stages of the 128x128
    /// tile, `_s4`; 3 of the 64x256 one, `_m64_s3`).
    MmaNhwcBf16s(NhwcTile, Ring),
    /// The channels-last weight gradient on f32 activations, with a ring of 3 f32 stages, or 2
    /// (`_s2`, [`Ring::Shallow`]; at bf16 only: tf32's 3 stages fit 99 KiB, and there is no
    /// tf32 `_s2` kernel).
    WgradNhwc(Ring),
    /// The channels-last weight gradient on bf16 activations, with a ring of 6 bf16 stages, or
    /// 5 (`_s5`, [`Ring::Shallow`]).
    WgradNhwcBf16s(Ring),
    /// Every sm_90a `wgmma` kernel (`conv_wgmma.rs`: the forwards and the data and weight
    /// gradients, both channel tiles; one ring size).
    Wgmma,
}

/// The depth of a tensor-core kernel's cp.async ring, for the kernel families that have two
/// ([`TcKernel::MmaNchw`], [`TcKernel::MmaNhwc`], [`TcKernel::MmaNhwcBf16s`],
/// [`TcKernel::WgradNhwc`], [`TcKernel::WgradNhwcBf16s`]): the deep one, sized for sm_90's
/// 227 KiB per block, or the shallow one (a kernel name's `_s<stages>` suffix), the deepest
/// that fits the 99 KiB (101,376 bytes) of sm_86 / sm_89 (`SMEM_99K` in conv_tc.cu). The
/// depth changes how many K tiles are in flight, not the order of the arithmetic: both give
/// the same results bit for bit (tests/cuda_conv_smem_99k.rs). Where the deep ring fits it
/// runs ([`CudaBackend::ring`]: fewer tiles in flight can only hide less latency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ring {
    /// The deep ring (the kernels without a suffix).
    Deep,
    /// The shallow ring (`_s2`, `_s4`, `_m64_s3`, `_s5`; of some families not at every
    /// precision and tile: [`shared_memory`]).
    Shallow,
}

impl Ring {
    /// The deepest ring of the kernel family `k` that `fits` ([`CudaBackend::fits`]): Deep,
    /// else Shallow, else None.
    fn deepest(k: impl Fn(Ring) -> TcKernel, fits: impl Fn(TcKernel) -> bool) -> Option<Ring> {
        [Ring::Deep, Ring::Shallow]
            .into_iter()
            .find(|&r| fits(k(r)))
    }
    /// Of a kernel's two variants (`deep`, `shallow`), this ring's.
    fn pick<T>(self, deep: T, shallow: T) -> T {
        match self {
            Ring::Deep => deep,
            Ring::Shallow => shallow,
        }
    }
}

/// The shared memory of one block of a kernel, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SharedMemory {
    /// Asked for at launch (`launch.rs` opts the function in above 48 KiB).
    pub dynamic: u32,
    /// Declared in the kernel (`__shared__` arrays: the channels-last pixel tables of 16
    /// bytes per pixel, the WMMA kernels' stages).
    pub fixed: u32,
}

impl SharedMemory {
    /// What the block needs of the device's per-block limit.
    pub fn total(self) -> u32 {
        self.dynamic + self.fixed
    }
}

/// The one table of what each tensor-core convolution kernel takes of a block's shared memory
/// at precision `p` (the sizes `kernels/conv_tc.cu` and `kernels/conv_wgmma.cu` assert):
///
/// | kernel | dynamic (bf16 / tf32) | static |
/// | --- | --- | --- |
/// | WMMA 64x64 (`TC_STAGES` 4) | 0 | 47_104 / 40_960 (+256 weight gradients) |
/// | NCHW mma 128x128 (`MMA_SMEM`, 3 f32 stages + bf16 tile) | 124_928 / 105_984 | 0 |
/// | NCHW mma 128x128 `_s2` (`MmaBNchw99k`, 2 f32 stages + bf16 tile) | 89_600 / 70_656 | 0 |
/// | NHWC mma 128x128 (`MmaB<true>`) | 131_072 / 110_592 | 2_048 (pixels) |
/// | NHWC mma 64x256 (`MmaBNhwc64`) | 163_840 / 138_240 | 4_096 |
/// | NHWC mma 128x128 `_s2` (`MmaBNhwc99k`, 2 stages) | 94_208 / 73_728 | 2_048 |
/// | NHWC mma 64x256 `_s2` (`MmaBNhwc64_99k`) | none / 92_160 | 4_096 |
/// | NHWC bf16 storage 128x128 (`Bf16sRing<128>`, 6 stages) | 122_880 | 2_048 |
/// | NHWC bf16 storage 64x256 (`Bf16sRing<64>`) | 153_600 | 4_096 |
/// | NHWC bf16 storage 128x128 `_s4` (`Bf16sRing<128, 4>`) | 81_920 | 2_048 |
/// | NHWC bf16 storage 64x256 `_m64_s3` (`Bf16sRing<64, 3>`) | 76_800 | 4_096 |
/// | NHWC weight gradient (`WgradNhwc`) | 118_784 / 101_376 | 0 |
/// | NHWC weight gradient `_s2` (`WgradNhwc99k`, 2 stages) | 84_992 / none | 0 |
/// | NHWC bf16-storage weight gradient (`WS_SMEM`, 6 stages) | 104_448 | 0 |
/// | NHWC bf16-storage weight gradient `_s5` (5 stages) | 87_040 | 0 |
/// | wgmma (`WG_SMEM`, 4 stages) | 134_144 | 0 |
///
/// The bf16-storage and wgmma kernels run at bf16 only (their sizes do not depend on `p`).
/// None for the two variants that have no kernel ("none": no selection can take them).
pub(crate) fn shared_memory(k: TcKernel, p: Precision) -> Option<SharedMemory> {
    let bf16 = p == Precision::Bf16;
    let by_p = |b: u32, t: u32| if bf16 { b } else { t };
    let (dynamic, fixed) = match k {
        TcKernel::Wmma { weight } => (0, by_p(47_104, 40_960) + if weight { 256 } else { 0 }),
        TcKernel::MmaNchw(r) => (r.pick(by_p(124_928, 105_984), by_p(89_600, 70_656)), 0),
        TcKernel::MmaNhwc(NhwcTile::M64, Ring::Shallow) if bf16 => return None,
        TcKernel::MmaNhwc(t, r) => (
            t.pick(
                r.pick(by_p(131_072, 110_592), by_p(94_208, 73_728)),
                r.pick(by_p(163_840, 138_240), 92_160),
            ),
            t.pixel_table(),
        ),
        TcKernel::MmaNhwcBf16s(t, r) => (
            t.pick(r.pick(122_880, 81_920), r.pick(153_600, 76_800)),
            t.pixel_table(),
        ),
        TcKernel::WgradNhwc(Ring::Shallow) if !bf16 => return None,
        TcKernel::WgradNhwc(r) => (r.pick(by_p(118_784, 101_376), 84_992), 0),
        TcKernel::WgradNhwcBf16s(r) => (r.pick(104_448, 87_040), 0),
        TcKernel::Wgmma => (super::conv_wgmma::WG_SMEM, 0),
    };
    Some(SharedMemory { dynamic, fixed })
}

/// The block tile of the channels-last `mma.sync` kernels (`MmaTile` in conv_tc.cu; the
/// forwards and the data gradients, f32 and bf16 storage): 128 x 128, or 64 x 256 (the `_m64`
/// kernels) where the GEMM's M, the rows of the tile (`c_out` of a forward, `c_in` of a data
/// gradient), is at most 64: a 128-row tile would leave half its rows, and of its MMAs, empty;
/// 64 x 256 does as many MMAs per block (8 warps of 64x32) on rows that exist. Rows 65 to 127
/// keep 128 x 128 (two 64-row tiles would leave as many rows empty), and so does a kernel whose
/// 64 x 256 shared memory the device cannot give a block ([`NhwcTile::choose`]). Which one is
/// faster on a GPU is not measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NhwcTile {
    /// 128 x 128.
    Square,
    /// 64 rows x 256 pixels.
    M64,
}

impl NhwcTile {
    /// The tile of a GEMM with `rows` rows where `fits` says which tiles' kernels the device
    /// can give their shared memory ([`CudaBackend::fits`]): 64 x 256 for at most 64 rows
    /// where it fits, else 128 x 128 where that fits (it takes less), else None (the caller
    /// falls back: layout changes around the NCHW path, or conversions out of bf16 storage).
    fn choose(rows: usize, fits: impl Fn(NhwcTile) -> bool) -> Option<Self> {
        if rows <= 64 && fits(NhwcTile::M64) {
            Some(NhwcTile::M64)
        } else if fits(NhwcTile::Square) {
            Some(NhwcTile::Square)
        } else {
            None
        }
    }
    /// The tile and ring of a channels-last kernel family `k` ([`TcKernel::MmaNhwc`],
    /// [`TcKernel::MmaNhwcBf16s`]) for a GEMM of `rows` rows: [`NhwcTile::choose`] among the
    /// deep rings' kernels, else among the shallow ones' (so that wherever a deep kernel fits,
    /// the choice is the one before the shallow rings existed), else None.
    fn choose_with_ring(
        rows: usize,
        k: impl Fn(NhwcTile, Ring) -> TcKernel,
        fits: impl Fn(TcKernel) -> bool,
    ) -> Option<(Self, Ring)> {
        [Ring::Deep, Ring::Shallow]
            .into_iter()
            .find_map(|r| Some((NhwcTile::choose(rows, |t| fits(k(t, r)))?, r)))
    }
    /// Rows (channels) per block.
    fn rows(self) -> usize {
        match self {
            NhwcTile::Square => MMA_TILE,
            NhwcTile::M64 => 64,
        }
    }
    /// Pixels per block.
    fn pixels(self) -> usize {
        match self {
            NhwcTile::Square => MMA_TILE,
            NhwcTile::M64 => 256,
        }
    }
    /// The static shared memory of its kernels: the pixel table, 16 bytes per pixel
    /// (`NhwcPixel pix[BN]`).
    fn pixel_table(self) -> u32 {
        self.pixels() as u32 * 16
    }
    /// Of a kernel's two variants (`square`, `m64`), this tile's.
    fn pick<T>(self, square: T, m64: T) -> T {
        match self {
            NhwcTile::Square => square,
            NhwcTile::M64 => m64,
        }
    }
}

/// The variants of one f32-storage channels-last kernel family ([`TcKernel::MmaNhwc`]: a
/// forward or the data gradient), each (bf16, tf32) but the last: their names, or their
/// kernels.
struct NhwcVariants<T> {
    /// 128 x 128 on the deep ring.
    square: (T, T),
    /// 64 x 256 on the deep ring (`_m64`).
    m64: (T, T),
    /// 128 x 128 on the shallow ring (`_s2`).
    square_s2: (T, T),
    /// 64 x 256 on the shallow ring, tf32 (`_tf32_m64_s2`; there is no bf16 one,
    /// [`shared_memory`]).
    m64_s2: T,
}

impl<T: Copy> NhwcVariants<T> {
    /// The variant of `tile` and `ring` at `p`; None at f32, and for the 64 x 256 shallow ring
    /// at bf16 (which no selection takes: [`CudaBackend::fits`] is false for it).
    fn get(&self, tile: NhwcTile, ring: Ring, p: Precision) -> Option<T> {
        let (bf16, tf32) = match (tile, ring) {
            (NhwcTile::Square, Ring::Deep) => self.square,
            (NhwcTile::M64, Ring::Deep) => self.m64,
            (NhwcTile::Square, Ring::Shallow) => self.square_s2,
            (NhwcTile::M64, Ring::Shallow) => return (p == Precision::Tf32).then_some(self.m64_s2),
        };
        match p {
            Precision::Bf16 => Some(bf16),
            Precision::Tf32 => Some(tf32),
            Precision::F32 => None,
        }
    }
}

/// The f32-storage channels-last kernel families ([`TcKernel::MmaNhwc`]).
#[derive(Clone, Copy, Debug)]
enum NhwcOp {
    /// The eval forward (`conv2d_fwd_bn_mma_nhwc_*`).
    Eval,
    /// The training forward (`conv2d_fwd_stats_mma_nhwc_*`).
    Stats,
    /// The data gradient (`conv2d_bwd_data_mma_nhwc_*`).
    BwdData,
}

impl NhwcOp {
    /// The names of its kernels.
    fn names(self) -> NhwcVariants<&'static str> {
        match self {
            NhwcOp::Eval => FWD_BN_NHWC,
            NhwcOp::Stats => FWD_STATS_NHWC,
            NhwcOp::BwdData => BWD_DATA_NHWC,
        }
    }
    /// Its kernels in `t`.
    fn kernels(self, t: &TcKernels) -> NhwcVariants<&Kernel> {
        match self {
            NhwcOp::Eval => NhwcVariants {
                square: (&t.fwd_bn_mma_nhwc_bf16, &t.fwd_bn_mma_nhwc_tf32),
                m64: (&t.fwd_bn_mma_nhwc_bf16_m64, &t.fwd_bn_mma_nhwc_tf32_m64),
                square_s2: (&t.fwd_bn_mma_nhwc_bf16_s2, &t.fwd_bn_mma_nhwc_tf32_s2),
                m64_s2: &t.fwd_bn_mma_nhwc_tf32_m64_s2,
            },
            NhwcOp::Stats => NhwcVariants {
                square: (&t.fwd_stats_mma_nhwc_bf16, &t.fwd_stats_mma_nhwc_tf32),
                m64: (
                    &t.fwd_stats_mma_nhwc_bf16_m64,
                    &t.fwd_stats_mma_nhwc_tf32_m64,
                ),
                square_s2: (&t.fwd_stats_mma_nhwc_bf16_s2, &t.fwd_stats_mma_nhwc_tf32_s2),
                m64_s2: &t.fwd_stats_mma_nhwc_tf32_m64_s2,
            },
            NhwcOp::BwdData => NhwcVariants {
                square: (&t.bwd_data_mma_nhwc_bf16, &t.bwd_data_mma_nhwc_tf32),
                m64: (&t.bwd_data_mma_nhwc_bf16_m64, &t.bwd_data_mma_nhwc_tf32_m64),
                square_s2: (&t.bwd_data_mma_nhwc_bf16_s2, &t.bwd_data_mma_nhwc_tf32_s2),
                m64_s2: &t.bwd_data_mma_nhwc_tf32_m64_s2,
            },
        }
    }
}

/// The names of [`NhwcOp`]'s kernels.
const FWD_BN_NHWC: NhwcVariants<&str> = NhwcVariants {
    square: ("conv2d_fwd_bn_mma_nhwc_bf16", "conv2d_fwd_bn_mma_nhwc_tf32"),
    m64: (
        "conv2d_fwd_bn_mma_nhwc_bf16_m64",
        "conv2d_fwd_bn_mma_nhwc_tf32_m64",
    ),
    square_s2: (
        "conv2d_fwd_bn_mma_nhwc_bf16_s2",
        "conv2d_fwd_bn_mma_nhwc_tf32_s2",
    ),
    m64_s2: "conv2d_fwd_bn_mma_nhwc_tf32_m64_s2",
};
const FWD_STATS_NHWC: NhwcVariants<&str> = NhwcVariants {
    square: (
        "conv2d_fwd_stats_mma_nhwc_bf16",
        "conv2d_fwd_stats_mma_nhwc_tf32",
    ),
    m64: (
        "conv2d_fwd_stats_mma_nhwc_bf16_m64",
        "conv2d_fwd_stats_mma_nhwc_tf32_m64",
    ),
    square_s2: (
        "conv2d_fwd_stats_mma_nhwc_bf16_s2",
        "conv2d_fwd_stats_mma_nhwc_tf32_s2",
    ),
    m64_s2: "conv2d_fwd_stats_mma_nhwc_tf32_m64_s2",
};
const BWD_DATA_NHWC: NhwcVariants<&str> = NhwcVariants {
    square: (
        "conv2d_bwd_data_mma_nhwc_bf16",
        "conv2d_bwd_data_mma_nhwc_tf32",
    ),
    m64: (
        "conv2d_bwd_data_mma_nhwc_bf16_m64",
        "conv2d_bwd_data_mma_nhwc_tf32_m64",
    ),
    square_s2: (
        "conv2d_bwd_data_mma_nhwc_bf16_s2",
        "conv2d_bwd_data_mma_nhwc_tf32_s2",
    ),
    m64_s2: "conv2d_bwd_data_mma_nhwc_tf32_m64_s2",
};

impl CudaBackend {
    /// FOR TESTS: per tensor-core kernel family of [`shared_memory`] (one kernel of each, and
    /// both precisions where they differ), the kernel's name, the static shared memory the
    /// driver reports for it (`CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES`, from the compiled code)
    /// and the table's: tests/cuda_conv_smem_limit.rs asserts they agree. The wgmma kernel on
    /// compute capability 9.0 only (its module is compiled for sm_90a there).
    #[doc(hidden)]
    pub fn tc_static_shared_memory(&self) -> Result<Vec<(&'static str, u32, u32)>> {
        use NhwcTile::{Square, M64};
        use Precision::{Bf16, Tf32};
        use Ring::{Deep, Shallow};
        let mut list = vec![
            (
                "conv_tc",
                "conv2d_fwd_bf16",
                TcKernel::Wmma { weight: false },
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_fwd_tf32",
                TcKernel::Wmma { weight: false },
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_bf16",
                TcKernel::Wmma { weight: true },
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_tf32",
                TcKernel::Wmma { weight: true },
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_fwd_bn_mma_bf16",
                TcKernel::MmaNchw(Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_mma_tf32",
                TcKernel::MmaNchw(Deep),
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_fwd_bn_mma_bf16_s2",
                TcKernel::MmaNchw(Shallow),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_data_mma_tf32_s2",
                TcKernel::MmaNchw(Shallow),
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_fwd_bn_mma_nhwc_bf16",
                TcKernel::MmaNhwc(Square, Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_data_mma_nhwc_tf32",
                TcKernel::MmaNhwc(Square, Deep),
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_fwd_stats_mma_nhwc_tf32_m64",
                TcKernel::MmaNhwc(M64, Deep),
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_bwd_data_mma_nhwc_bf16_m64",
                TcKernel::MmaNhwc(M64, Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_fwd_stats_mma_nhwc_bf16_s2",
                TcKernel::MmaNhwc(Square, Shallow),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_data_mma_nhwc_tf32_s2",
                TcKernel::MmaNhwc(Square, Shallow),
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_fwd_bn_mma_nhwc_tf32_m64_s2",
                TcKernel::MmaNhwc(M64, Shallow),
                Tf32,
            ),
            (
                "conv_tc",
                "conv2d_fwd_bn_mma_nhwc_bf16s",
                TcKernel::MmaNhwcBf16s(Square, Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_data_mma_nhwc_bf16s_m64",
                TcKernel::MmaNhwcBf16s(M64, Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_fwd_bn_mma_nhwc_bf16s_s4",
                TcKernel::MmaNhwcBf16s(Square, Shallow),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_fwd_stats_mma_nhwc_bf16s_m64_s3",
                TcKernel::MmaNhwcBf16s(M64, Shallow),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_mma_nhwc_bf16",
                TcKernel::WgradNhwc(Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_mma_nhwc_bf16_s2",
                TcKernel::WgradNhwc(Shallow),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_mma_nhwc_bf16s",
                TcKernel::WgradNhwcBf16s(Deep),
                Bf16,
            ),
            (
                "conv_tc",
                "conv2d_bwd_weight_mma_nhwc_bf16s_s5",
                TcKernel::WgradNhwcBf16s(Shallow),
                Bf16,
            ),
        ];
        if self.info().compute_capability == (9, 0) {
            list.push((
                "conv_wgmma",
                "conv2d_fwd_bn_wgmma_n128",
                TcKernel::Wgmma,
                Bf16,
            ));
        }
        list.into_iter()
            .map(|(module, name, k, p)| {
                let f = self.modules().function(module, name)?;
                let got = f
                    .get_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                    )
                    .map_err(|e| super::device::cuda("cuFuncGetAttribute", e))?;
                let table = shared_memory(k, p).map_or(u32::MAX, |m| m.fixed);
                Ok((name, u32::try_from(got).unwrap_or(u32::MAX), table))
            })
            .collect()
    }
}

/// Which kernels a tf32 / bf16 convolution takes: the 128x128 `mma.sync` kernels or the
/// 64x64 WMMA ones (`kernels/conv_tc.cu`); a setting of the backend
/// ([`CudaBackend::set_mma_route`]) for tests and comparisons. f32 never takes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MmaRoute {
    /// By the layer's size (`mma_route`, `mma_route_weight` in this module): the large layers.
    #[default]
    Auto,
    /// Every tf32 / bf16 convolution (whose kernel's shared memory the device gives a block:
    /// `CudaBackend::fits`; WMMA elsewhere).
    Always,
    /// None: the WMMA kernels (and their split-K paths) for every layer.
    Never,
}

/// Whether a tf32 / bf16 forward or data gradient with `tiles` tiles of 128 output pixels (batch
/// and, for the data gradient, every output phase included) and `rows` output channels
/// (`c_out`, or `c_in` for the data gradient) takes the 128x128 `mma.sync` kernel on a GPU of
/// `sms` multiprocessors: when its 128x128 tile grid alone gives every SM a block (such a
/// layer needs no split over K, which those two kernels do not do) and at least 128 rows fill
/// the tile. The rest (the small late layers, split over K, and the 64-channel ones) stay on
/// the 64x64 WMMA kernels.
pub(crate) fn mma_route(tiles: usize, rows: usize, sms: usize) -> bool {
    rows >= MMA_TILE && tiles * rows.div_ceil(MMA_TILE) >= sms.max(1)
}

/// Whether a tf32 / bf16 weight gradient (`c_out` x `nc = c_in*kh*kw` outputs, a reduction over `k`
/// pixels) takes the 128x128 `mma.sync` kernel, which is split over K like the WMMA one: both
/// sides at least 128, and enough work that the output tiles times the 1024-pixel runs of the
/// reduction give every SM a block.
pub(crate) fn mma_route_weight(c_out: usize, nc: usize, k: usize, sms: usize) -> bool {
    c_out >= MMA_TILE
        && nc >= MMA_TILE
        && c_out.div_ceil(MMA_TILE) * nc.div_ceil(MMA_TILE) * (k / 1024).max(1) >= sms.max(1)
}

/// The 16-byte cp.async paths of the `mma.sync` forward of `s` for an input at device
/// address `x_addr` and weights at `w_addr` (the kernel's `vec`): bit 0 when each weight row
/// (`K = c_in*kh*kw` floats) starts 16-byte aligned (`K % 4 == 0`, `w_addr % 16 == 0`), bit 1
/// when the im2col rows are 16-byte aligned runs of contiguous pixels (1x1, stride 1, no
/// padding, `h*w % 4 == 0`, `x_addr % 16 == 0`); 4-byte copies otherwise.
pub(crate) fn mma_vec(s: &Conv2d, x_addr: u64, w_addr: u64) -> i32 {
    let k = s.c_in * s.kh * s.kw;
    let a = k.is_multiple_of(4) && w_addr.is_multiple_of(16);
    let b = s.kh == 1
        && s.kw == 1
        && s.stride == 1
        && s.pad == 0
        && (s.h * s.w).is_multiple_of(4)
        && x_addr.is_multiple_of(16);
    i32::from(a) | (i32::from(b) << 1)
}

/// The 16-byte cp.async paths of the channels-last forward of `s` (`conv2d_fwd_bn_mma_nhwc_*`'s
/// `vec`) for an NHWC input at device address `x_addr` and weights with K ordered (kh, kw, c)
/// (OHWI) at `w_addr`: bit 0 when each weight row (`K = kh*kw*c_in` floats) starts 16-byte
/// aligned (`K % 4 == 0`, `w_addr % 16 == 0`), bit 1 when `c_in % 4 == 0` and
/// `x_addr % 16 == 0` (4 channels of one tap of one pixel are then contiguous, in one tap, and
/// 16-byte aligned, for every pixel, tap and stride); 4-byte copies otherwise.
pub(crate) fn mma_vec_nhwc(s: &Conv2d, x_addr: u64, w_addr: u64) -> i32 {
    let k = s.c_in * s.kh * s.kw;
    let a = k.is_multiple_of(4) && w_addr.is_multiple_of(16);
    let b = s.c_in.is_multiple_of(4) && x_addr.is_multiple_of(16);
    i32::from(a) | (i32::from(b) << 1)
}

/// The 16-byte cp.async paths of the channels-last data gradient of `s`
/// (`conv2d_bwd_data_mma_nhwc_*`'s `vec`) for an NHWC `dy` at device address `dy_addr` and the
/// weights' copy (`conv_weight_bwd_nhwc`) at `wt_addr`: bit 0 when the copy is 16-byte aligned
/// (the kernel then copies a phase's weight rows 16 bytes at a time where its `K = taps*c_out`
/// and its block's offset are multiples of 4: `c_out % 4 == 0`), bit 1 when `c_out % 4 == 0`
/// and `dy_addr % 16 == 0` (4 channels of one tap of one pixel of dy are then contiguous and
/// 16-byte aligned); 4-byte copies otherwise.
pub(crate) fn mma_vec_nhwc_bwd_data(s: &Conv2d, dy_addr: u64, wt_addr: u64) -> i32 {
    let a = wt_addr.is_multiple_of(16);
    let b = s.c_out.is_multiple_of(4) && dy_addr.is_multiple_of(16);
    i32::from(a) | (i32::from(b) << 1)
}

/// The copy path of x in the bf16-storage channels-last forward of `s`
/// (`conv2d_fwd_bn_mma_nhwc_bf16s`'s `vec`) for an input at device address `x_addr`: 2 (bit 1)
/// 16-byte copies of 8 channels when `c_in % 8 == 0` and `x_addr % 16 == 0`; else 4 (bit 2)
/// 4-byte copies of 2 channels when `c_in` is even (a buffer of f32 slots is 4-byte aligned);
/// else 0, 2-byte loads (odd `c_in`). Its weights are always copied 16 bytes at a time (the
/// bf16 OHWI copy's rows are padded to [`bf16s_weight_row`]).
pub(crate) fn mma_vec_nhwc_bf16s(s: &Conv2d, x_addr: u64) -> i32 {
    bf16s_copy_path(s.c_in, x_addr)
}

/// The copy path (`vec`: 2, 4 or 0 as [`mma_vec_nhwc_bf16s`] says) of a bf16-storage NHWC
/// operand of `c` channels per pixel at device address `addr`: x of the forward (`c_in`), dy
/// of the data gradient (`c_out`).
fn bf16s_copy_path(c: usize, addr: u64) -> i32 {
    if c.is_multiple_of(8) && addr.is_multiple_of(16) {
        2
    } else if c.is_multiple_of(2) {
        4
    } else {
        0
    }
}

/// The row length (in bf16 values) of the bf16 OHWI weight copy of the bf16-storage forward:
/// `K = c_in*kh*kw` rounded up to 8 (16 bytes), zero past K (the wgmma forward's too).
pub(super) fn bf16s_weight_row(s: &Conv2d) -> usize {
    (s.c_in * s.kh * s.kw).next_multiple_of(8)
}

/// A bf16 weight copy of `len` values (two per f32 slot) into arena scratch: one launch of the
/// weight-copy kernel `kern` (arguments `w`, the copy, `ints`; a thread per value) where `len`
/// is not 0, the buffer 16-byte aligned as the bf16-storage kernels read it (a scratch buffer
/// is a whole allocation, 256-byte aligned: checked). The caller gives it back
/// (`give_scratch`); on an error it is given back here. Nothing allocated once warm.
///
/// # Safety
/// `kern` with `ints` writes the first `len` bf16 values of the copy at most and reads no
/// more than `w` holds.
unsafe fn weight_copy_scratch(
    be: &CudaBackend,
    op: &str,
    kern: &Kernel,
    w: &CudaSlice<f32>,
    ints: &[i32],
    len: usize,
) -> Result<CudaSlice<f32>> {
    // Two bf16 per f32 slot (len is even); never an empty buffer.
    let mut wt = be.take_scratch((len / 2).max(4))?;
    let r = if len > 0 {
        // SAFETY: the caller's contract; wt holds len bf16 (len / 2 slots).
        unsafe {
            kern.on(be.stream())
                .arg(w)
                .arg(&mut wt)
                .ints(ints)
                .launch(grid(len))
        }
    } else {
        Ok(())
    };
    // The kernels copy the weights' rows 16 bytes at a time.
    let r = r.and_then(|()| {
        if be.ptr(&wt).is_multiple_of(16) {
            Ok(())
        } else {
            Err(EngineError::Param(format!(
                "{op}: the weight copy's scratch buffer is not 16-byte aligned"
            )))
        }
    });
    match r {
        Ok(()) => Ok(wt),
        Err(e) => {
            be.give_scratch(wt);
            Err(e)
        }
    }
}

/// The weights `w` (OIHW f32) copied to bf16 OHWI (`conv_weight_ohwi_bf16`: nearest even,
/// rows of [`bf16s_weight_row`] values, two per f32 slot) in arena scratch by
/// [`weight_copy_scratch`], as the bf16-storage forwards (mma.sync and wgmma) read it.
pub(super) fn weight_ohwi_bf16_scratch(
    be: &CudaBackend,
    s: &Conv2d,
    w: &CudaSlice<f32>,
    op: &str,
) -> Result<CudaSlice<f32>> {
    let tc = tc_kernels(be)?;
    let kp = bf16s_weight_row(s);
    let len = s.c_out * kp;
    let a = int_args([s.c_in, s.kh * s.kw, kp, len])?;
    // SAFETY: w holds s.w_len() values (the callers' contract), which the kernel reads with
    // these sizes; it writes c_out rows of kp values, len in all.
    unsafe { weight_copy_scratch(be, op, &tc.weight_ohwi_bf16, w, &a, len) }
}

/// The weights `w` (OIHW f32) copied to bf16 in the data gradient's order
/// (`conv_weight_bwd_nhwc_bf16`: per output phase `[c_in][taps * c_out]`, the taps reversed,
/// rows padded to 8, [`bf16s_bwd_weight_len`] values, two per f32 slot) in arena scratch by
/// [`weight_copy_scratch`], as the bf16-storage data gradients (mma.sync and wgmma) read it.
/// `c_out = 0`: no taps, an empty copy (dx all zeros).
pub(super) fn weight_bwd_nhwc_bf16_scratch(
    be: &CudaBackend,
    s: &Conv2d,
    w: &CudaSlice<f32>,
    op: &str,
) -> Result<CudaSlice<f32>> {
    let tc = tc_kernels(be)?;
    let len = bf16s_bwd_weight_len(s);
    let a = int_args([s.c_in, s.c_out, s.kh, s.kw, s.stride, len])?;
    // SAFETY: w holds s.w_len() values (the callers' contract), which the kernel reads with
    // these sizes; it writes the phases' padded rows, len values in all.
    unsafe { weight_copy_scratch(be, op, &tc.weight_bwd_nhwc_bf16, w, &a, len) }
}

/// The length (in bf16 values) of the bf16 weight copy of the bf16-storage data gradient
/// (`conv_weight_bwd_nhwc_bf16`): per output phase (`stride^2`, row-major) `c_in` rows of the
/// phase's `taps * c_out` values rounded up to 8 (16 bytes), zero past them.
pub(super) fn bf16s_bwd_weight_len(s: &Conv2d) -> usize {
    let taps = |k: usize, p: usize| if p < k { (k - p).div_ceil(s.stride) } else { 0 };
    let mut len = 0;
    for py in 0..s.stride {
        for px in 0..s.stride {
            len += s.c_in * (taps(s.kh, py) * taps(s.kw, px) * s.c_out).next_multiple_of(8);
        }
    }
    len
}

impl CudaBackend {
    /// Whether a block of `k` (at this backend's precision) fits the shared memory a block
    /// may use here ([`shared_memory`] against [`CudaBackend::shared_memory_per_block`]):
    /// what every tensor-core kernel selection asks before it takes a kernel.
    pub(crate) fn fits(&self, k: TcKernel) -> bool {
        shared_memory(k, self.precision())
            .is_some_and(|m| m.total() <= self.shared_memory_per_block())
    }

    /// The dynamic shared memory a launch of `k` asks for, or an error naming `op` where `k`
    /// does not fit (the selections never take such a kernel: a guard against one that did).
    pub(crate) fn smem_dynamic(&self, op: &str, k: TcKernel) -> Result<u32> {
        let Some(need) = shared_memory(k, self.precision()) else {
            return Err(EngineError::Param(format!(
                "{op}: there is no {k:?} kernel at {}",
                self.precision()
            )));
        };
        if need.total() > self.shared_memory_per_block() {
            return Err(EngineError::Param(format!(
                "{op}: {k:?} needs {} bytes of shared memory per block; {} gives {}",
                need.total(),
                self.info().name,
                self.shared_memory_per_block()
            )));
        }
        Ok(need.dynamic)
    }

    /// The tile and ring of this backend's f32-storage channels-last kernels (at its
    /// precision) for a GEMM of `rows` rows ([`NhwcTile::choose_with_ring`]), or None where no
    /// kernel of them fits.
    fn nhwc_tile(&self, rows: usize) -> Option<(NhwcTile, Ring)> {
        NhwcTile::choose_with_ring(rows, TcKernel::MmaNhwc, |k| self.fits(k))
    }

    /// The deepest ring of the kernel family `k` (of a [`Ring`]) whose shared memory fits
    /// here ([`CudaBackend::fits`]): [`Ring::Deep`], else [`Ring::Shallow`], else None.
    pub(crate) fn ring(&self, k: impl Fn(Ring) -> TcKernel) -> Option<Ring> {
        Ring::deepest(k, |k| self.fits(k))
    }

    /// The ring of the NCHW `mma.sync` kernels here ([`TcKernel::MmaNchw`]), or the error of
    /// `op` where neither fits (the selections, `takes_mma`, then take WMMA).
    fn nchw_ring(&self, op: &str) -> Result<Ring> {
        self.ring(TcKernel::MmaNchw).ok_or_else(|| {
            EngineError::Param(format!(
                "{op}: no mma.sync ring fits the {} bytes of shared memory per block of {}",
                self.shared_memory_per_block(),
                self.info().name
            ))
        })
    }

    /// The tile and ring of the bf16-storage channels-last kernels for a GEMM of `rows` rows
    /// ([`NhwcTile::choose_with_ring`]), or None.
    fn nhwc_tile_bf16s(&self, rows: usize) -> Option<(NhwcTile, Ring)> {
        NhwcTile::choose_with_ring(rows, TcKernel::MmaNhwcBf16s, |k| self.fits(k))
    }

    /// [`CudaBackend::nhwc_tile`], or the error of `op` where no tile fits.
    fn nhwc_tile_for(&self, op: &str, rows: usize) -> Result<(NhwcTile, Ring)> {
        self.nhwc_tile(rows).ok_or_else(|| self.no_tile(op))
    }

    /// The name of the kernel of the f32-storage channels-last family `k` for a GEMM of `rows`
    /// rows at this backend's precision ([`CudaBackend::nhwc_tile`]) where `runs` (the op
    /// runs natively), else None: the `*_kernel` diagnostics.
    fn nhwc_kernel_name(&self, k: NhwcOp, rows: usize, runs: bool) -> Option<&'static str> {
        let (tile, ring) = self.nhwc_tile(rows)?;
        runs.then(|| k.names().get(tile, ring, self.precision()))
            .flatten()
    }

    /// The kernel of the f32-storage channels-last family `k` for a GEMM of `rows` rows at
    /// this backend's precision, with its tile and ring ([`CudaBackend::nhwc_tile`]), or the
    /// error of `op` where none fits.
    fn nhwc_kernel(&self, op: &str, k: NhwcOp, rows: usize) -> Result<(&Kernel, NhwcTile, Ring)> {
        let (tile, ring) = self.nhwc_tile_for(op, rows)?;
        let kern = k
            .kernels(tc_kernels(self)?)
            .get(tile, ring, self.precision())
            .ok_or_else(|| self.no_tile(op))?;
        Ok((kern, tile, ring))
    }

    /// The error of a channels-last `op` launched where no tile's kernel fits.
    fn no_tile(&self, op: &str) -> EngineError {
        EngineError::Param(format!(
            "{op}: no channels-last tile fits the {} bytes of shared memory per block of {}",
            self.shared_memory_per_block(),
            self.info().name
        ))
    }

    /// A native kernel's name at this backend's precision where `runs` (the bf16 or the tf32
    /// one), else None: the `*_kernel` diagnostics.
    fn mma_kernel_name(
        &self,
        runs: bool,
        bf16: &'static str,
        tf32: &'static str,
    ) -> Option<&'static str> {
        match (runs, self.precision()) {
            (true, Precision::Bf16) => Some(bf16),
            (true, Precision::Tf32) => Some(tf32),
            _ => None,
        }
    }

    /// Whether [`CudaBackend::conv2d_bn_eval_fwd_nhwc_native`] runs `s` at this backend's
    /// precision: at tf32 and bf16 (not f32: there is no channels-last SIMT kernel), unless
    /// the route is [`MmaRoute::Never`] (no `mma.sync` kernel), for every shape the kernels'
    /// 32-bit indexing holds (any kernel size, stride, padding and `c_in`). Unlike the NCHW
    /// forward's [`mma_route`], small layers are not sent elsewhere: the alternative is two
    /// transposes around the NCHW path, and which is faster is not measured (no GPU). Not
    /// where neither tile's kernel fits the device's shared memory ([`NhwcTile::choose`]).
    pub(crate) fn conv_bn_eval_nhwc_native(&self, s: &Conv2d) -> bool {
        self.precision().tensor_cores()
            && self.mma_route != MmaRoute::Never
            && geometry(s).is_ok()
            && self.nhwc_tile(s.c_out).is_some()
    }

    /// The kernel the channels-last eval forward of `s` launches at this backend's precision
    /// and route (`conv2d_fwd_bn_mma_nhwc_bf16` / `_tf32`), or None where it does not run
    /// natively (at f32, or with the route [`MmaRoute::Never`]); diagnostics and tests.
    pub fn conv_bn_eval_nhwc_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.nhwc_kernel_name(NhwcOp::Eval, s.c_out, self.conv_bn_eval_nhwc_native(s))
    }

    /// `y = act(bn_eval(conv(x, w)) (+ residual))` on channels-last activations: `x`
    /// `[n][h][w][c_in]`, `residual` and `y` `[n][out_h][out_w][c_out]`, `w` OIHW, the batch-norm
    /// buffers per channel, in one launch of `conv2d_fwd_bn_mma_nhwc_*` (128x128 tiles, one
    /// split) after the per-channel fold of the running statistics (`norm::bn_eval_fold`, into
    /// arena scratch) and, for a kernel larger than 1x1 (and `c_in > 1`), a copy of the weights
    /// in OHWI order (`conv_weight_ohwi`, arena scratch): nothing allocated once warm, so
    /// capturable in a graph. An error where [`CudaBackend::conv_bn_eval_nhwc_native`] is false.
    ///
    /// # Safety
    /// Every buffer holds the length the shapes give (what `Backend::conv2d_bn_eval_fwd`
    /// checks; the same lengths as NCHW), as for `conv2d_bn_eval_fwd_unchecked`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn conv2d_bn_eval_fwd_nhwc_native(
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
        if !self.conv_bn_eval_nhwc_native(s) {
            return Err(EngineError::Param(format!(
                "conv2d_bn_eval_fwd_nhwc: no channels-last kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        if s.y_len() == 0 {
            return Ok(());
        }
        let (k, ..) = self.nhwc_kernel("conv2d_bn_eval_fwd_nhwc", NhwcOp::Eval, s.c_out)?;
        norm::with_bn_eval_fold(self, bn, gamma, beta, running_mean, running_var, |ss| {
            let ep = BnEpilogue { ss, residual, relu };
            // SAFETY: the caller's contract; ss holds 2 * c_out values.
            unsafe {
                launch_mma_nhwc(
                    self,
                    "conv2d_bn_eval_fwd_nhwc",
                    s,
                    x,
                    w,
                    y,
                    Fused::Bn(k, &ep),
                )
            }
        })
    }

    /// Whether [`CudaBackend::conv2d_fwd_stats_nhwc_native`] runs `s` at this backend's
    /// precision: where the channels-last eval forward does
    /// (`CudaBackend::conv_bn_eval_nhwc_native`: tf32 and bf16, not with
    /// [`MmaRoute::Never`], any shape the 32-bit indexing holds) and the statistics epilogue
    /// applies (`stats_tiles`: a non-empty output and reduction).
    pub fn conv_fwd_stats_nhwc_native(&self, s: &Conv2d) -> bool {
        self.conv_bn_eval_nhwc_native(s) && stats_tiles(s).is_some()
    }

    /// The kernel the channels-last training forward of `s`
    /// ([`CudaBackend::conv2d_fwd_stats_nhwc_native`]) launches at this backend's precision and
    /// route (`conv2d_fwd_stats_mma_nhwc_bf16` / `_tf32`, with `_m64` for `c_out <= 64`), or
    /// None where it does not run natively; diagnostics and tests.
    pub fn conv_fwd_stats_nhwc_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.nhwc_kernel_name(NhwcOp::Stats, s.c_out, self.conv_fwd_stats_nhwc_native(s))
    }

    /// The channels-last training forward: `z = conv(x, w)` with `x` `[n][h][w][c_in]`, `z`
    /// `[n][out_h][out_w][c_out]`, `w` OIHW, that also writes the batch-norm partial
    /// statistics exactly as `conv2d_fwd_stats` does (per output channel c and tile t of 64
    /// pixels in order n, oh, ow, `part_s[c * tiles + t]` the sum of z over the tile and
    /// `part_q[c * tiles + t]` the sum of its squared deviations from the tile's mean, f64;
    /// `tiles` = `stats_tiles`), so `norm::batchnorm_train_from_partials`'s combine step
    /// takes them unchanged. One launch of `conv2d_fwd_stats_mma_nhwc_*` (128x128 tiles, one
    /// split) after, for a kernel larger than 1x1 (and `c_in > 1`), the weights' OHWI copy in
    /// arena scratch: nothing allocated once warm, so capturable in a graph. An error where
    /// [`CudaBackend::conv_fwd_stats_nhwc_native`] is false. Public (with its predicate) for
    /// tests/cuda_conv_nhwc_train.rs, which checks the raw partials; the model's way in is the
    /// backend op `conv2d_bn_train_fwd_nhwc`.
    ///
    /// # Safety
    /// `x` holds `s.x_len()` values, `w` `s.w_len()`, `z` `s.y_len()`, `part_s` and `part_q`
    /// `c_out * tiles` each (the kernel indexes them so, unchecked).
    pub unsafe fn conv2d_fwd_stats_nhwc_native(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        part_s: &mut CudaSlice<f64>,
        part_q: &mut CudaSlice<f64>,
    ) -> Result<()> {
        if !self.conv_fwd_stats_nhwc_native(s) {
            return Err(EngineError::Param(format!(
                "conv2d_fwd_stats_nhwc: no channels-last statistics kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        let (k, ..) = self.nhwc_kernel("conv2d_fwd_stats_nhwc", NhwcOp::Stats, s.c_out)?;
        // SAFETY: the caller's contract (the partials: c_out * stats_tiles(s) values, the
        // 64-pixel tiles the kernel writes).
        unsafe {
            launch_mma_nhwc(
                self,
                "conv2d_fwd_stats_nhwc",
                s,
                x,
                w,
                z,
                Fused::Stats(k, part_s, part_q),
            )
        }
    }

    /// Whether [`CudaBackend::conv2d_bwd_data_nhwc_native`] runs `s` at this backend's
    /// precision: at tf32 and bf16, unless the route is [`MmaRoute::Never`], for every shape
    /// the kernels' 32-bit indexing holds (any kernel size, stride, padding, `c_in` and
    /// `c_out`: 16- or 4-byte copies by [`mma_vec_nhwc_bwd_data`]), where a tile's kernel
    /// fits the device's shared memory ([`NhwcTile::choose`] on `c_in`).
    pub(crate) fn conv_bwd_data_nhwc_native(&self, s: &Conv2d) -> bool {
        self.precision().tensor_cores()
            && self.mma_route != MmaRoute::Never
            && s.stride > 0
            && geometry(s).is_ok()
            && self.nhwc_tile(s.c_in).is_some()
    }

    /// The kernel the channels-last data gradient of `s` (`Backend::conv2d_bwd_data_nhwc`)
    /// launches at this backend's precision and route (`conv2d_bwd_data_mma_nhwc_bf16` /
    /// `_tf32`), or None where the op takes the layout changes around the NCHW kernels instead
    /// (f32, [`MmaRoute::Never`]); diagnostics and tests.
    pub fn conv_bwd_data_nhwc_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        self.nhwc_kernel_name(NhwcOp::BwdData, s.c_in, self.conv_bwd_data_nhwc_native(s))
    }

    /// The channels-last data gradient: `dx = conv_transpose(dy, w)` with `dy`
    /// `[n][out_h][out_w][c_out]`, `dx` `[n][h][w][c_in]`, `w` OIHW. The weights copied into arena
    /// scratch in the kernel's order (`conv_weight_bwd_nhwc`: per output phase `[c_in][taps][c_out]`,
    /// the taps reversed), then one launch of `conv2d_bwd_data_mma_nhwc_*`: per output phase
    /// (stride^2 of them, as the NCHW kernel's [`phase_grid`]; a stride-2 layer multiplies
    /// only the taps that reach each phase) an implicit GEMM of (pixel tiles, channel tiles)
    /// 128x128 blocks, K = taps * `c_out` with `c_out` fastest, one split. Every dx value is
    /// written (zeros where no tap reaches it). Nothing allocated once warm, so capturable in a
    /// graph. An error where [`CudaBackend::conv_bwd_data_nhwc_native`] is false.
    ///
    /// # Safety
    /// `dy` holds `s.y_len()` values, `w` `s.w_len()`, `dx` `s.x_len()` (the kernel indexes
    /// them so, unchecked).
    pub(crate) unsafe fn conv2d_bwd_data_nhwc_native(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_data_nhwc";
        if !self.conv_bwd_data_nhwc_native(s) {
            return Err(EngineError::Param(format!(
                "{OP}: no channels-last data-gradient kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        if s.x_len() == 0 {
            return Ok(());
        }
        let g = geometry(s)?;
        let (kern, tile, ring) = self.nhwc_kernel(OP, NhwcOp::BwdData, s.c_in)?;
        let (gx, _) = phase_grid(s, tile.pixels());
        let mut cfg = blocks(OP, (gx, s.c_in.div_ceil(tile.rows()), 1), MMA_THREADS)?;
        cfg.shared_mem_bytes = self.smem_dynamic(OP, TcKernel::MmaNhwc(tile, ring))?;
        let tc = tc_kernels(self)?;
        let len = s.w_len();
        // Never an empty buffer (c_out = 0: no taps, dx all zeros).
        let mut wt = self.take_scratch(len.max(4))?;
        let r = (|| {
            if len > 0 {
                let [c, co, kh, kw, st, len_i] =
                    int_args([s.c_in, s.c_out, s.kh, s.kw, s.stride, len])?;
                // SAFETY: w and wt hold (at least) w_len values, the kernel's `len`.
                unsafe {
                    tc.weight_bwd_nhwc
                        .on(self.stream())
                        .arg(w)
                        .arg(&mut wt)
                        .ints(&[c, co, kh, kw, st, len_i])
                        .launch(grid(len))?
                };
            }
            let vec = mma_vec_nhwc_bwd_data(s, self.ptr(dy), self.ptr(&wt));
            let mut l = kern.on(self.stream());
            l.arg(dy).arg(&wt).arg(dx).ints(&g[..9]).arg(&vec);
            // SAFETY: the caller's contract; wt holds the w_len weights in the kernel's order.
            unsafe { l.launch(cfg) }
        })();
        self.give_scratch(wt);
        r
    }

    /// Whether [`CudaBackend::conv2d_bn_eval_fwd_nhwc_bf16s_native`] runs `s` (activations
    /// stored in bf16): at bf16 only, unless the route is [`MmaRoute::Never`], for every shape
    /// the kernels' 32-bit indexing holds (any kernel size, stride, padding and `c_in`: 16-,
    /// 4- or 2-byte copies of x by [`mma_vec_nhwc_bf16s`]; any `c_out`), where a tile's
    /// kernel fits the device's shared memory ([`NhwcTile::choose`] on `c_out`).
    pub(crate) fn conv_bn_eval_nhwc_bf16s_native(&self, s: &Conv2d) -> bool {
        self.precision() == Precision::Bf16
            && self.mma_route != MmaRoute::Never
            && geometry(s).is_ok()
            && dim(s.c_out * bf16s_weight_row(s)).is_ok()
            && self.nhwc_tile_bf16s(s.c_out).is_some()
    }

    /// The mma.sync kernel of the bf16-storage channels-last eval forward of `s`
    /// (`conv2d_fwd_bn_mma_nhwc_bf16s` / `_m64`; `_s4` / `_m64_s3` on the shallow ring), or None where it does not run (not at bf16,
    /// or with the route [`MmaRoute::Never`]); diagnostics and tests. Where the opted-in wgmma
    /// kernel takes the shape over (`conv_bn_eval_nhwc_bf16s_wgmma_kernel` is Some) that one
    /// runs instead: the kernel that runs is `wgmma_kernel(s).or(kernel(s))`, for each of the
    /// four bf16-storage ops' pairs (eval forward, training forward, data gradient, weight
    /// gradient).
    pub fn conv_bn_eval_nhwc_bf16s_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        let (tile, ring) = self.nhwc_tile_bf16s(s.c_out)?;
        self.conv_bn_eval_nhwc_bf16s_native(s).then_some(ring.pick(
            tile.pick(
                "conv2d_fwd_bn_mma_nhwc_bf16s",
                "conv2d_fwd_bn_mma_nhwc_bf16s_m64",
            ),
            tile.pick(
                "conv2d_fwd_bn_mma_nhwc_bf16s_s4",
                "conv2d_fwd_bn_mma_nhwc_bf16s_m64_s3",
            ),
        ))
    }

    /// [`CudaBackend::conv2d_bn_eval_fwd_nhwc_native`] on activations stored in bf16: `x`
    /// (`[n][h][w][c_in]`), `residual` and `y` (`[n][out_h][out_w][c_out]`) hold value `i` in
    /// the 16-bit half `i` of the buffer (the low half of slot `i / 2` for even `i`, the high
    /// for odd; `len.div_ceil(2)` slots: an odd length's last high half is neither read nor
    /// written), `w` OIHW f32 and the batch-norm buffers f32 as there. One launch of
    /// `conv2d_fwd_bn_mma_nhwc_bf16s` after the batch-norm fold (`norm::with_bn_eval_fold`) and
    /// the weights' copy to bf16 OHWI (`conv_weight_ohwi_bf16`, rounded to nearest even, rows
    /// padded to a multiple of 8), both in arena scratch: nothing allocated once warm, so
    /// capturable in a graph. y is rounded to bf16 (nearest even) from the f32 epilogue. An
    /// error where [`CudaBackend::conv_bn_eval_nhwc_bf16s_native`] is false.
    ///
    /// # Safety
    /// `x` holds `s.x_len().div_ceil(2)` values, `residual` and `y` `s.y_len().div_ceil(2)`,
    /// `w` `s.w_len()`, the batch-norm buffers `c_out` (what
    /// `Backend::conv2d_bn_eval_fwd_nhwc_bf16` checks).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn conv2d_bn_eval_fwd_nhwc_bf16s_native(
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
        if !self.conv_bn_eval_nhwc_bf16s_native(s) {
            return Err(EngineError::Param(format!(
                "conv2d_bn_eval_fwd_nhwc_bf16s: no bf16-storage kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        if s.y_len() == 0 {
            return Ok(());
        }
        norm::with_bn_eval_fold(self, bn, gamma, beta, running_mean, running_var, |ss| {
            let ep = BnEpilogue { ss, residual, relu };
            // SAFETY: the caller's contract; ss holds 2 * c_out values.
            unsafe { launch_mma_nhwc_bf16s(self, s, x, w, Bf16sEpilogue::Bn(&ep), y) }
        })
    }

    /// Whether [`CudaBackend::conv2d_fwd_stats_nhwc_bf16s_native`] runs `s`: where the
    /// bf16-storage eval forward does (`CudaBackend::conv_bn_eval_nhwc_bf16s_native`: bf16
    /// only, not with [`MmaRoute::Never`]) and the statistics epilogue applies
    /// (`stats_tiles`: a non-empty output and reduction).
    pub fn conv_fwd_stats_nhwc_bf16s_native(&self, s: &Conv2d) -> bool {
        self.conv_bn_eval_nhwc_bf16s_native(s) && stats_tiles(s).is_some()
    }

    /// The mma.sync kernel of the bf16-storage channels-last training forward of `s`
    /// (`conv2d_fwd_stats_mma_nhwc_bf16s` / `_m64`; `_s4` / `_m64_s3` on the shallow ring), or None where it does not run;
    /// diagnostics and tests. Where `conv_fwd_stats_nhwc_bf16s_wgmma_kernel` is Some, that
    /// wgmma kernel runs instead (as [`CudaBackend::conv_bn_eval_nhwc_bf16s_kernel`]).
    pub fn conv_fwd_stats_nhwc_bf16s_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        let (tile, ring) = self.nhwc_tile_bf16s(s.c_out)?;
        self.conv_fwd_stats_nhwc_bf16s_native(s)
            .then_some(ring.pick(
                tile.pick(
                    "conv2d_fwd_stats_mma_nhwc_bf16s",
                    "conv2d_fwd_stats_mma_nhwc_bf16s_m64",
                ),
                tile.pick(
                    "conv2d_fwd_stats_mma_nhwc_bf16s_s4",
                    "conv2d_fwd_stats_mma_nhwc_bf16s_m64_s3",
                ),
            ))
    }

    /// [`CudaBackend::conv2d_fwd_stats_nhwc_native`] on activations stored in bf16: `x`
    /// (`[n][h][w][c_in]`) and `z` (`[n][out_h][out_w][c_out]`) in bf16 storage as
    /// `CudaBackend::conv2d_bn_eval_fwd_nhwc_bf16s_native`'s, `w` OIHW f32; z rounded to bf16
    /// (nearest even) and the partials (f64, `conv2d_fwd_stats`'s layout, `c_out * tiles`
    /// each, `tiles` = `stats_tiles`) those of the ROUNDED values, what z holds. The weights'
    /// bf16 OHWI copy in arena scratch, then one launch of `conv2d_fwd_stats_mma_nhwc_bf16s`
    /// (the eval kernel's GEMM): nothing allocated once warm, so capturable in a graph. An
    /// error where [`CudaBackend::conv_fwd_stats_nhwc_bf16s_native`] is false. Public as its
    /// f32-storage sibling [`CudaBackend::conv2d_fwd_stats_nhwc_native`] is, for
    /// tests/cuda_conv_nhwc_train_bf16s.rs, which checks the raw partials; the model's way in
    /// (lengths checked) is the backend op `conv2d_bn_train_fwd_nhwc_bf16`.
    ///
    /// # Safety
    /// `x` holds `s.x_len().div_ceil(2)` values, `z` `s.y_len().div_ceil(2)`, `w` `s.w_len()`,
    /// `part_s` and `part_q` `c_out * tiles` each (the kernel indexes them so, unchecked).
    pub unsafe fn conv2d_fwd_stats_nhwc_bf16s_native(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        z: &mut CudaSlice<f32>,
        part_s: &mut CudaSlice<f64>,
        part_q: &mut CudaSlice<f64>,
    ) -> Result<()> {
        if !self.conv_fwd_stats_nhwc_bf16s_native(s) {
            return Err(EngineError::Param(format!(
                "conv2d_fwd_stats_nhwc_bf16s: no bf16-storage statistics kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        // SAFETY: the caller's contract.
        unsafe { launch_mma_nhwc_bf16s(self, s, x, w, Bf16sEpilogue::Stats(part_s, part_q), z) }
    }

    /// Whether [`CudaBackend::conv2d_bwd_data_nhwc_bf16s_native`] runs `s` (dy stored in bf16):
    /// at bf16 only, unless the route is [`MmaRoute::Never`], for every shape the kernels'
    /// 32-bit indexing holds (any kernel size, stride, padding, `c_in`; any `c_out`: 16-, 4- or
    /// 2-byte copies of dy by [`mma_vec_nhwc_bf16s`] on `c_out`), where a tile's kernel fits
    /// the device's shared memory ([`NhwcTile::choose`] on `c_in`).
    pub(crate) fn conv_bwd_data_nhwc_bf16s_native(&self, s: &Conv2d) -> bool {
        self.precision() == Precision::Bf16
            && self.mma_route != MmaRoute::Never
            && s.stride > 0
            && geometry(s).is_ok()
            && dim(bf16s_bwd_weight_len(s)).is_ok()
            && self.nhwc_tile_bf16s(s.c_in).is_some()
    }

    /// The mma.sync kernel of the bf16-storage channels-last data gradient of `s`
    /// (`conv2d_bwd_data_mma_nhwc_bf16s` / `_m64`; `_s4` / `_m64_s3` on the shallow ring), or None where it does not run; diagnostics
    /// and tests. Where `conv_bwd_data_nhwc_bf16s_wgmma_kernel` is Some, that wgmma kernel
    /// runs instead (as [`CudaBackend::conv_bn_eval_nhwc_bf16s_kernel`]).
    pub fn conv_bwd_data_nhwc_bf16s_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        let (tile, ring) = self.nhwc_tile_bf16s(s.c_in)?;
        self.conv_bwd_data_nhwc_bf16s_native(s).then_some(ring.pick(
            tile.pick(
                "conv2d_bwd_data_mma_nhwc_bf16s",
                "conv2d_bwd_data_mma_nhwc_bf16s_m64",
            ),
            tile.pick(
                "conv2d_bwd_data_mma_nhwc_bf16s_s4",
                "conv2d_bwd_data_mma_nhwc_bf16s_m64_s3",
            ),
        ))
    }

    /// [`CudaBackend::conv2d_bwd_data_nhwc_native`] with `dy` (`[n][out_h][out_w][c_out]`) in
    /// bf16 storage (as [`CudaBackend::conv2d_bn_eval_fwd_nhwc_bf16s_native`]'s) and `dx`
    /// (`[n][h][w][c_in]`) f32, `w` OIHW f32: the weights copied into arena scratch in bf16
    /// (nearest even) in the data gradient's order (`conv_weight_bwd_nhwc_bf16`: per output
    /// phase `[c_in][taps * c_out]`, the taps reversed, rows padded to a multiple of 8), then
    /// one launch of `conv2d_bwd_data_mma_nhwc_bf16s` (the bf16-storage forward's bf16 ring,
    /// per output phase, one split). Every dx value is written (zeros where no tap reaches it).
    /// Nothing allocated once warm, so capturable in a graph. An error where
    /// [`CudaBackend::conv_bwd_data_nhwc_bf16s_native`] is false.
    ///
    /// # Safety
    /// `dy` holds `s.y_len().div_ceil(2)` values, `w` `s.w_len()`, `dx` `s.x_len()` (the kernel
    /// indexes them so, unchecked).
    pub(crate) unsafe fn conv2d_bwd_data_nhwc_bf16s_native(
        &self,
        s: &Conv2d,
        dy: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_data_nhwc_bf16s";
        if !self.conv_bwd_data_nhwc_bf16s_native(s) {
            return Err(EngineError::Param(format!(
                "{OP}: no bf16-storage data-gradient kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        if s.x_len() == 0 {
            return Ok(());
        }
        let g = geometry(s)?;
        let (tile, ring) = self
            .nhwc_tile_bf16s(s.c_in)
            .ok_or_else(|| self.no_tile(OP))?;
        let (gx, _) = phase_grid(s, tile.pixels());
        let mut cfg = blocks(OP, (gx, s.c_in.div_ceil(tile.rows()), 1), MMA_THREADS)?;
        cfg.shared_mem_bytes = self.smem_dynamic(OP, TcKernel::MmaNhwcBf16s(tile, ring))?;
        let tc = tc_kernels(self)?;
        let wt = weight_bwd_nhwc_bf16_scratch(self, s, w, OP)?;
        let r = {
            // dy's copies by its c_out channels per pixel, as the forward's of x by c_in.
            let vec = bf16s_copy_path(s.c_out, self.ptr(dy));
            let kern = ring.pick(
                tile.pick(&tc.bwd_data_mma_nhwc_bf16s, &tc.bwd_data_mma_nhwc_bf16s_m64),
                tile.pick(
                    &tc.bwd_data_mma_nhwc_bf16s_s4,
                    &tc.bwd_data_mma_nhwc_bf16s_m64_s3,
                ),
            );
            let mut l = kern.on(self.stream());
            l.arg(dy).arg(&wt).arg(dx).ints(&g[..9]).arg(&vec);
            // SAFETY: the caller's contract; wt holds the phases' padded bf16 weight rows.
            unsafe { l.launch(cfg) }
        };
        self.give_scratch(wt);
        r
    }

    /// Which kernels the tf32 / bf16 convolutions take (default [`MmaRoute::Auto`]).
    pub fn set_mma_route(&mut self, r: MmaRoute) {
        self.mma_route = r;
    }

    /// The kernel `conv2d_fwd` (and the fused forwards) of `s` launch at this backend's
    /// precision and route, by name (diagnostics and tests): `conv2d_fwd` (f32),
    /// `conv2d_fwd_tf32` / `_bf16` (WMMA, 64x64, maybe split over K) or
    /// `conv2d_fwd_mma_tf32` / `_bf16` (128x128; `_s2` with the shallow ring, `Ring`).
    pub fn conv_fwd_kernel(&self, s: &Conv2d) -> &'static str {
        self.conv_kernels(s)[0]
    }

    /// The kernels of `s`'s forward, data gradient and weight gradient at this backend's
    /// precision and route (as [`CudaBackend::conv_fwd_kernel`]; the `mma.sync` ones with
    /// `_s2` where their shallow ring runs, `Ring::Shallow`).
    pub fn conv_kernels(&self, s: &Conv2d) -> [&'static str; 3] {
        let [f, d, w] = takes_mma(self, s);
        let shallow = self.ring(TcKernel::MmaNchw) == Some(Ring::Shallow);
        let pick = |mma: bool, names: [&'static str; 7]| match (self.precision(), mma) {
            (Precision::F32, _) => names[0],
            (Precision::Tf32, false) => names[1],
            (Precision::Bf16, false) => names[2],
            (Precision::Tf32, true) => names[3 + 2 * usize::from(shallow)],
            (Precision::Bf16, true) => names[4 + 2 * usize::from(shallow)],
        };
        [
            pick(
                f,
                [
                    "conv2d_fwd",
                    "conv2d_fwd_tf32",
                    "conv2d_fwd_bf16",
                    "conv2d_fwd_mma_tf32",
                    "conv2d_fwd_mma_bf16",
                    "conv2d_fwd_mma_tf32_s2",
                    "conv2d_fwd_mma_bf16_s2",
                ],
            ),
            pick(
                d,
                [
                    "conv2d_bwd_data",
                    "conv2d_bwd_data_tf32",
                    "conv2d_bwd_data_bf16",
                    "conv2d_bwd_data_mma_tf32",
                    "conv2d_bwd_data_mma_bf16",
                    "conv2d_bwd_data_mma_tf32_s2",
                    "conv2d_bwd_data_mma_bf16_s2",
                ],
            ),
            pick(
                w,
                [
                    "conv2d_bwd_weight",
                    "conv2d_bwd_weight_tf32",
                    "conv2d_bwd_weight_bf16",
                    "conv2d_bwd_weight_mma_tf32",
                    "conv2d_bwd_weight_mma_bf16",
                    "conv2d_bwd_weight_mma_tf32_s2",
                    "conv2d_bwd_weight_mma_bf16_s2",
                ],
            ),
        ]
    }
}

/// Whether `s`'s forward, data gradient and weight gradient on `be` take the `mma.sync`
/// kernels (tf32 and bf16; f32 never; nor where their shared memory does not fit the
/// device's: the WMMA kernels then, whose static 46 KiB every device gives).
fn takes_mma(be: &CudaBackend, s: &Conv2d) -> [bool; 3] {
    if !be.precision().tensor_cores() || be.ring(TcKernel::MmaNchw).is_none() {
        return [false; 3];
    }
    match be.mma_route {
        MmaRoute::Always => [true; 3],
        MmaRoute::Never => [false; 3],
        MmaRoute::Auto => {
            let sms = be.info().multiprocessors.max(1) as usize;
            let p = s.n * s.out_h() * s.out_w();
            [
                mma_route(p.div_ceil(MMA_TILE), s.c_out, sms),
                mma_route(phase_grid(s, MMA_TILE).0, s.c_in, sms),
                mma_route_weight(s.c_out, s.c_in * s.kh * s.kw, p, sms),
            ]
        }
    }
}

/// The `mma.sync` forward of `s` (`conv2d_fwd_mma_*`, or with `fused` its epilogue's kernel,
/// `conv2d_fwd_bn_mma_*` / `conv2d_fwd_stats_mma_*`) at the backend's precision: one launch
/// of (pixel tiles, channel tiles) 128x128 blocks, 256 threads, with the dynamic shared memory
/// of [`TcKernel::MmaNchw`], never split over K.
///
/// # Safety
/// As [`launch_split`]'s: `x`, `w`, `y` and the epilogue's buffers hold the lengths `s`
/// gives (the statistics `c_out * ceil(p / 64)` values each).
#[allow(clippy::too_many_arguments)]
unsafe fn launch_mma(
    be: &CudaBackend,
    op: &'static str,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    g: &[i32; 11],
    fused: Option<Fused<'_>>,
) -> Result<()> {
    let p = s.n * s.out_h() * s.out_w();
    let mut cfg = blocks(
        op,
        (p.div_ceil(MMA_TILE), s.c_out.div_ceil(MMA_TILE), 1),
        MMA_THREADS,
    )?;
    let ring = be.nchw_ring(op)?;
    cfg.shared_mem_bytes = be.smem_dynamic(op, TcKernel::MmaNchw(ring))?;
    let vec = mma_vec(s, be.ptr(x), be.ptr(w));
    let relu = match &fused {
        Some(Fused::Bn(_, ep)) => ep.relu as i32,
        _ => 0,
    };
    let k = match &fused {
        None => mma_pick(be, |t| {
            ring.pick(
                (&t.fwd_mma_bf16, &t.fwd_mma_tf32),
                (&t.fwd_mma_bf16_s2, &t.fwd_mma_tf32_s2),
            )
        })?,
        Some(Fused::Bn(k, _)) | Some(Fused::Stats(k, ..)) => *k,
    };
    let mut l = k.on(be.stream());
    l.arg(x).arg(w).arg(y).ints(&g[..9]);
    match fused {
        None => {}
        Some(Fused::Bn(_, ep)) => ep.push(&mut l, &relu),
        Some(Fused::Stats(_, ps, pq)) => {
            l.arg(ps).arg(pq);
        }
    }
    l.arg(&vec);
    // SAFETY: the caller's contract.
    unsafe { l.launch(cfg) }
}

/// The channels-last forward of `s` with its epilogue's kernel (`fused`: the eval forward
/// `conv2d_fwd_bn_mma_nhwc_*`, or the training forward `conv2d_fwd_stats_mma_nhwc_*`, at the
/// backend's precision, the kernel `fused` carries being of the [`NhwcTile`] of `c_out`): one
/// launch of (pixel tiles, channel tiles) blocks of that tile (128x128, or 64 channels x 256
/// pixels), 256 threads, with [`TcKernel::MmaNhwc`]'s dynamic shared memory, never split over K; the weights
/// with K ordered (kh, kw, c): `w` itself where that is OIHW's order (a 1x1, or one input
/// channel), else an OHWI copy (`conv_weight_ohwi`) in arena scratch, given back after the
/// launch (stream order keeps the next user after it).
///
/// # Safety
/// `x`, `w`, `y` and the epilogue's buffers hold the lengths `s` gives (`ss` `2 * c_out`, the
/// statistics `c_out * ceil(p / 64)` values each).
unsafe fn launch_mma_nhwc(
    be: &CudaBackend,
    op: &'static str,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    fused: Fused<'_>,
) -> Result<()> {
    let g = geometry(s)?;
    let p = s.n * s.out_h() * s.out_w();
    let (tile, ring) = be.nhwc_tile_for(op, s.c_out)?;
    let mut cfg = blocks(
        op,
        (p.div_ceil(tile.pixels()), s.c_out.div_ceil(tile.rows()), 1),
        MMA_THREADS,
    )?;
    cfg.shared_mem_bytes = be.smem_dynamic(op, TcKernel::MmaNhwc(tile, ring))?;
    let khw = s.kh * s.kw;
    let wt = if khw > 1 && s.c_in > 1 {
        let mut wt = be.take_scratch(s.w_len())?;
        let [c, khw_i, len] = int_args([s.c_in, khw, s.w_len()])?;
        // SAFETY: w and wt hold w_len values, the kernel's `len`.
        let r = unsafe {
            tc_kernels(be)?
                .weight_ohwi
                .on(be.stream())
                .arg(w)
                .arg(&mut wt)
                .arg(&c)
                .arg(&khw_i)
                .arg(&len)
                .launch(grid(s.w_len()))
        };
        if let Err(e) = r {
            be.give_scratch(wt);
            return Err(e);
        }
        Some(wt)
    } else {
        None
    };
    let wa = wt.as_ref().unwrap_or(w);
    let vec = mma_vec_nhwc(s, be.ptr(x), be.ptr(wa));
    let (kern, relu) = match &fused {
        Fused::Bn(k, ep) => (*k, ep.relu as i32),
        Fused::Stats(k, ..) => (*k, 0),
    };
    let mut l = kern.on(be.stream());
    l.arg(x).arg(wa).arg(y).ints(&g[..9]);
    match fused {
        Fused::Bn(_, ep) => ep.push(&mut l, &relu),
        Fused::Stats(_, ps, pq) => {
            l.arg(ps).arg(pq);
        }
    }
    l.arg(&vec);
    // SAFETY: the caller's contract; wa holds the w_len weights in OHWI order.
    let r = unsafe { l.launch(cfg) };
    if let Some(wt) = wt {
        be.give_scratch(wt);
    }
    r
}

/// The epilogue of the bf16-storage channels-last forward ([`launch_mma_nhwc_bf16s`]).
enum Bf16sEpilogue<'a> {
    /// The eval-mode batch norm (`conv2d_fwd_bn_mma_nhwc_bf16s`).
    Bn(&'a BnEpilogue<'a>),
    /// The batch-norm partial statistics `part_s`, `part_q` of the rounded z
    /// (`conv2d_fwd_stats_mma_nhwc_bf16s`).
    Stats(&'a mut CudaSlice<f64>, &'a mut CudaSlice<f64>),
}

/// The bf16-storage channels-last forward of `s` (`conv2d_fwd_bn_mma_nhwc_bf16s`, or with the
/// statistics epilogue `conv2d_fwd_stats_mma_nhwc_bf16s`): the
/// weights copied to bf16 OHWI with rows of [`bf16s_weight_row`] values
/// (`conv_weight_ohwi_bf16`) into arena scratch, given back after the launch (stream order
/// keeps the next user after it), then one launch of (pixel tiles, channel tiles) blocks of
/// the [`NhwcTile`] of `c_out` (128x128, or 64 channels x 256 pixels: the `_m64` kernels),
/// 256 threads, [`TcKernel::MmaNhwcBf16s`]'s dynamic shared memory, never split over K.
///
/// # Safety
/// `x`, `y` (and the residual) hold the bf16-storage lengths `s` gives, `w` `s.w_len()`,
/// `ep.ss` `2 * c_out`, the statistics `c_out * ceil(p / 64)` values each.
unsafe fn launch_mma_nhwc_bf16s(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    epi: Bf16sEpilogue<'_>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = match epi {
        Bf16sEpilogue::Bn(_) => "conv2d_bn_eval_fwd_nhwc_bf16s",
        Bf16sEpilogue::Stats(..) => "conv2d_fwd_stats_nhwc_bf16s",
    };
    let g = geometry(s)?;
    let p = s.n * s.out_h() * s.out_w();
    let (tile, ring) = be.nhwc_tile_bf16s(s.c_out).ok_or_else(|| be.no_tile(op))?;
    let mut cfg = blocks(
        op,
        (p.div_ceil(tile.pixels()), s.c_out.div_ceil(tile.rows()), 1),
        MMA_THREADS,
    )?;
    cfg.shared_mem_bytes = be.smem_dynamic(op, TcKernel::MmaNhwcBf16s(tile, ring))?;
    let tc = tc_kernels(be)?;
    let wt = weight_ohwi_bf16_scratch(be, s, w, op)?;
    let r = {
        let vec = mma_vec_nhwc_bf16s(s, be.ptr(x));
        let relu = matches!(epi, Bf16sEpilogue::Bn(ep) if ep.relu) as i32;
        let kern = match epi {
            Bf16sEpilogue::Bn(_) => ring.pick(
                tile.pick(&tc.fwd_bn_mma_nhwc_bf16s, &tc.fwd_bn_mma_nhwc_bf16s_m64),
                tile.pick(
                    &tc.fwd_bn_mma_nhwc_bf16s_s4,
                    &tc.fwd_bn_mma_nhwc_bf16s_m64_s3,
                ),
            ),
            Bf16sEpilogue::Stats(..) => ring.pick(
                tile.pick(
                    &tc.fwd_stats_mma_nhwc_bf16s,
                    &tc.fwd_stats_mma_nhwc_bf16s_m64,
                ),
                tile.pick(
                    &tc.fwd_stats_mma_nhwc_bf16s_s4,
                    &tc.fwd_stats_mma_nhwc_bf16s_m64_s3,
                ),
            ),
        };
        let mut l = kern.on(be.stream());
        l.arg(x).arg(&wt).arg(y).ints(&g[..9]);
        match epi {
            Bf16sEpilogue::Bn(ep) => ep.push(&mut l, &relu),
            Bf16sEpilogue::Stats(ps, pq) => {
                l.arg(ps).arg(pq);
            }
        }
        l.arg(&vec);
        // SAFETY: the caller's contract; wt holds c_out rows of kp bf16 weights.
        unsafe { l.launch(cfg) }
    };
    be.give_scratch(wt);
    r
}

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
            "--precision {p}: the tensor-core kernels (kernels/conv_tc.cu) were not precompiled and need the CUDA headers (mma.h) to compile: rebuild with them, or point ICHCAM_CUDA_INCLUDE (or CUDA_HOME) at them on this machine (pip's nvidia-cuda-runtime and nvidia-cuda-crt put them beside NVRTC)"
        )),
        e => e,
    })
}

/// The `mma.sync` kernel of `be`'s precision among (bf16, tf32) (only where [`takes_mma`]
/// said so: never at f32).
fn mma_pick<'a>(
    be: &'a CudaBackend,
    pick: impl Fn(&'a TcKernels) -> (&'a Kernel, &'a Kernel),
) -> Result<&'a Kernel> {
    tc_pick(be, pick)?.ok_or_else(|| {
        EngineError::Param("the mma.sync kernels take tf32 or bf16 operands, not f32".into())
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
pub(crate) fn geometry(s: &Conv2d) -> Result<[i32; 11]> {
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
    let p = s.n * s.out_h() * s.out_w();
    if p == 0 || s.c_out == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    let (gx, gy) = (p.div_ceil(64), s.c_out.div_ceil(64));
    if takes_mma(be, s)[0] {
        // SAFETY: x, w and y hold the lengths `s` gives (checked); the kernel indexes them so.
        return unsafe { launch_mma(be, "conv2d_fwd", s, x, w, y, &g, None) };
    }
    if let Some(k) = tc_pick(be, |t| (&t.fwd_bf16, &t.fwd_tf32))? {
        let kk = s.c_in * s.kh * s.kw;
        // SAFETY: x, w and y hold the lengths `s` gives (checked); the kernel indexes them so.
        return unsafe { launch_split(be, "conv2d_fwd", k, TC, (gx, gy), kk, x, w, y, &g, None) };
    }
    let cfg = blocks("conv2d_fwd", (gx, gy, 1), 256)?;
    // SAFETY: x, w and y hold the lengths `s` gives (checked); the kernel indexes them so.
    unsafe {
        kernels(be)?
            .fwd
            .on(be.stream())
            .arg(x)
            .arg(w)
            .arg(y)
            .ints(&g)
            .launch(cfg)
    }
}

/// The eval-mode batch-norm epilogue of a fused forward (`bn_epilogue` in the kernels):
/// `y = act(conv * scale[c] + shift[c] (+ residual))`.
pub(crate) struct BnEpilogue<'a> {
    /// `[scale; c_out]` then `[shift; c_out]` (`norm::bn_eval_fold`).
    pub ss: &'a CudaSlice<f32>,
    /// Added after the affine map; the output's shape.
    pub residual: Option<&'a CudaSlice<f32>>,
    pub relu: bool,
}

impl BnEpilogue<'_> {
    /// Pushes the epilogue's kernel arguments: `ss`, the residual or null, `relu`.
    fn push<'a>(&'a self, l: &mut Launch<'a>, relu: &'a i32) {
        l.arg(self.ss);
        match self.residual {
            Some(r) => l.arg(r),
            None => l.arg(&NULL),
        };
        l.arg(relu);
    }
}

/// `y = act(conv(x, w) * scale[c] + shift[c] (+ residual))` in one forward launch (f32:
/// `conv2d_fwd_bn`; tf32 / bf16: `conv2d_fwd_bn_*` with one split, or the unfused
/// tensor-core forward into the split-K workspace and `conv_splitk_reduce_bn`). The caller
/// checked every length (`ep.ss` holds `2 * c_out` values, the residual `y`'s).
pub(crate) fn conv2d_bn_eval_fwd(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    ep: &BnEpilogue<'_>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let p = s.n * s.out_h() * s.out_w();
    if p == 0 || s.c_out == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    let (gx, gy) = (p.div_ceil(64), s.c_out.div_ceil(64));
    if takes_mma(be, s)[0] {
        let ring = be.nchw_ring("conv2d_bn_eval_fwd")?;
        let k = mma_pick(be, |t| {
            ring.pick(
                (&t.fwd_bn_mma_bf16, &t.fwd_bn_mma_tf32),
                (&t.fwd_bn_mma_bf16_s2, &t.fwd_bn_mma_tf32_s2),
            )
        })?;
        // SAFETY: x, w, y, ss and the residual hold the lengths `s` gives (checked).
        return unsafe {
            launch_mma(
                be,
                "conv2d_bn_eval_fwd",
                s,
                x,
                w,
                y,
                &g,
                Some(Fused::Bn(k, ep)),
            )
        };
    }
    if let Some(k) = tc_pick(be, |t| (&t.fwd_bf16, &t.fwd_tf32))? {
        let fused = tc_pick(be, |t| (&t.fwd_bn_bf16, &t.fwd_bn_tf32))?;
        let kk = s.c_in * s.kh * s.kw;
        let fused = fused.map(|f| Fused::Bn(f, ep));
        // SAFETY: x, w, y, ss and the residual hold the lengths `s` gives (checked).
        return unsafe {
            launch_split(
                be,
                "conv2d_bn_eval_fwd",
                k,
                TC,
                (gx, gy),
                kk,
                x,
                w,
                y,
                &g,
                fused,
            )
        };
    }
    let cfg = blocks("conv2d_bn_eval_fwd", (gx, gy, 1), 256)?;
    let relu = ep.relu as i32;
    let kern = &kernels(be)?.fwd_bn;
    let mut l = kern.on(be.stream());
    l.arg(x).arg(w).arg(y).ints(&g[..9]);
    ep.push(&mut l, &relu);
    // SAFETY: x, w, y, ss and the residual hold the lengths `s` gives (checked).
    unsafe { l.launch(cfg) }
}

/// The epilogue of a tensor-core forward for [`launch_split`]: its fused kernel (used with one
/// split) and its arguments.
pub(crate) enum Fused<'a> {
    /// The eval-mode batch norm (`conv2d_fwd_bn_*`; split: `conv_splitk_reduce_bn`).
    Bn(&'a Kernel, &'a BnEpilogue<'a>),
    /// The batch-norm partial statistics `part_s`, `part_q` (`conv2d_fwd_stats_*`; split:
    /// `conv_splitk_reduce_stats`).
    Stats(&'a Kernel, &'a mut CudaSlice<f64>, &'a mut CudaSlice<f64>),
}

/// Pixels per tile of the forward kernels' statistics epilogue (`BN`, `TBN`).
pub(crate) const STATS_TILE: usize = 64;

/// The number of pixel tiles of `s`'s forward whose batch-norm statistics
/// [`conv2d_fwd_stats`] writes in its epilogue, or None where it does not: an empty output or
/// reduction (the caller then takes the statistics in separate passes over z).
pub(crate) fn stats_tiles(s: &Conv2d) -> Option<usize> {
    let p = s.n * s.out_h() * s.out_w();
    let kk = s.c_in * s.kh * s.kw;
    if p == 0 || s.c_out == 0 || kk == 0 {
        return None;
    }
    Some(p.div_ceil(STATS_TILE))
}

/// `z = conv(x, w)` that also writes, per output channel c and tile t of 64 pixels (of the
/// n*out_h*out_w, in order), `part_s[c * tiles + t]` = the sum of z over the tile and
/// `part_q[c * tiles + t]` = the sum of its squared deviations from the tile's mean (f64;
/// `norm::batchnorm_train_from_partials` combines them): one launch (f32:
/// `conv2d_fwd_stats`; tf32 / bf16: `conv2d_fwd_stats_*` with one split), or on the
/// tensor-core split-K path the unfused forward into the workspace and
/// `conv_splitk_reduce_stats`, which sums the splits and takes the statistics of the sums.
/// Only where [`stats_tiles`] gives `Some(tiles)`; the caller checked the lengths (`part_s`,
/// `part_q`: `c_out * tiles` each).
pub(crate) fn conv2d_fwd_stats(
    be: &CudaBackend,
    s: &Conv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    z: &mut CudaSlice<f32>,
    part_s: &mut CudaSlice<f64>,
    part_q: &mut CudaSlice<f64>,
) -> Result<()> {
    let Some(tiles) = stats_tiles(s) else {
        return Err(EngineError::Param(format!(
            "conv2d_fwd_stats: {s:?} has no statistics epilogue (an empty output or reduction)"
        )));
    };
    let g = geometry(s)?;
    let gy = s.c_out.div_ceil(64);
    if takes_mma(be, s)[0] {
        let ring = be.nchw_ring("conv2d_fwd_stats")?;
        let k = mma_pick(be, |t| {
            ring.pick(
                (&t.fwd_stats_mma_bf16, &t.fwd_stats_mma_tf32),
                (&t.fwd_stats_mma_bf16_s2, &t.fwd_stats_mma_tf32_s2),
            )
        })?;
        // SAFETY: x, w and z hold the lengths `s` gives, part_s and part_q c_out * tiles
        // values (the caller's contract; the kernel writes the 64-pixel tiles' layout).
        return unsafe {
            launch_mma(
                be,
                "conv2d_fwd_stats",
                s,
                x,
                w,
                z,
                &g,
                Some(Fused::Stats(k, part_s, part_q)),
            )
        };
    }
    if let Some(k) = tc_pick(be, |t| (&t.fwd_bf16, &t.fwd_tf32))? {
        let fused = tc_pick(be, |t| (&t.fwd_stats_bf16, &t.fwd_stats_tf32))?;
        let kk = s.c_in * s.kh * s.kw;
        let fused = fused.map(|f| Fused::Stats(f, part_s, part_q));
        // SAFETY: x, w and z hold the lengths `s` gives, part_s and part_q c_out * tiles
        // values (the caller's contract); the grid's x is `tiles`.
        return unsafe {
            launch_split(
                be,
                "conv2d_fwd_stats",
                k,
                TC,
                (tiles, gy),
                kk,
                x,
                w,
                z,
                &g,
                fused,
            )
        };
    }
    let cfg = blocks("conv2d_fwd_stats", (tiles, gy, 1), 256)?;
    // SAFETY: x, w and z hold the lengths `s` gives, part_s and part_q c_out * tiles values
    // (the caller's contract); the grid's x is `tiles`.
    unsafe {
        kernels(be)?
            .fwd_stats
            .on(be.stream())
            .arg(x)
            .arg(w)
            .arg(z)
            .ints(&g[..9])
            .arg(part_s)
            .arg(part_q)
            .launch(cfg)
    }
}

pub(crate) fn conv2d_bwd_data(
    be: &CudaBackend,
    s: &Conv2d,
    dy: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let p = s.n * s.h * s.w;
    if p == 0 || s.c_in == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    if takes_mma(be, s)[1] {
        let (gx, _) = phase_grid(s, MMA_TILE);
        let mut cfg = blocks(
            "conv2d_bwd_data",
            (gx, s.c_in.div_ceil(MMA_TILE), 1),
            MMA_THREADS,
        )?;
        let ring = be.nchw_ring("conv2d_bwd_data")?;
        cfg.shared_mem_bytes = be.smem_dynamic("conv2d_bwd_data", TcKernel::MmaNchw(ring))?;
        // Bit 1 only: 16-byte copies of dy (1x1, stride 1, no padding: dy's rows are as x's).
        let vec = mma_vec(s, be.ptr(dy), be.ptr(w)) & 2;
        // SAFETY: dy, w and dx hold the lengths `s` gives (checked).
        return unsafe {
            mma_pick(be, |t| {
                ring.pick(
                    (&t.bwd_data_mma_bf16, &t.bwd_data_mma_tf32),
                    (&t.bwd_data_mma_bf16_s2, &t.bwd_data_mma_tf32_s2),
                )
            })?
            .on(be.stream())
            .arg(dy)
            .arg(w)
            .arg(dx)
            .ints(&g[..9])
            .arg(&vec)
            .launch(cfg)
        };
    }
    let (gx, kk) = phase_grid(s, 64);
    let gy = s.c_in.div_ceil(64);
    if let Some(k) = tc_pick(be, |t| (&t.bwd_data_bf16, &t.bwd_data_tf32))? {
        // SAFETY: dy, w and dx hold the lengths `s` gives (checked).
        return unsafe {
            launch_split(
                be,
                "conv2d_bwd_data",
                k,
                TC,
                (gx, gy),
                kk,
                dy,
                w,
                dx,
                &g,
                None,
            )
        };
    }
    let cfg = blocks("conv2d_bwd_data", (gx, gy, 1), 256)?;
    // SAFETY: dy, w and dx hold the lengths `s` gives (checked).
    unsafe {
        kernels(be)?
            .bwd_data
            .on(be.stream())
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
    let g = geometry(s)?;
    let nc = s.c_in * s.kh * s.kw;
    let k = s.n * s.out_h() * s.out_w();
    if nc == 0 || s.c_out == 0 {
        return Ok(());
    }
    if k == 0 {
        return be.fill(dw, 0.0);
    }
    if takes_mma(be, s)[2] {
        // 16-byte copies of dy's rows of out_h*out_w pixels where they are 16-byte aligned.
        let vec =
            i32::from((s.out_h() * s.out_w()).is_multiple_of(4) && be.ptr(dy).is_multiple_of(16));
        let grid_xy = (nc.div_ceil(MMA_TILE), s.c_out.div_ceil(MMA_TILE));
        let ring = be.nchw_ring(OP)?;
        let kern = mma_pick(be, |t| {
            ring.pick(
                (&t.bwd_weight_mma_bf16, &t.bwd_weight_mma_tf32),
                (&t.bwd_weight_mma_bf16_s2, &t.bwd_weight_mma_tf32_s2),
            )
        })?;
        // SAFETY: x and dy hold the lengths `s` gives, dw one weight tensor (checked).
        return unsafe {
            launch_split(
                be,
                OP,
                kern,
                mma_tiling(be, OP, TcKernel::MmaNchw(ring), vec)?,
                grid_xy,
                k,
                x,
                dy,
                dw,
                &g,
                None,
            )
        };
    }
    let tc = tc_pick(be, |t| (&t.bwd_weight_bf16, &t.bwd_weight_tf32))?;
    if tc.is_some() && (s.kh > 255 || s.kw > 255) {
        return Err(EngineError::Param(format!(
            "{OP}: a {}x{} kernel is over the tensor-core path's 255x255",
            s.kh, s.kw
        )));
    }
    let kern = match tc {
        Some(t) => t,
        None => &kernels(be)?.bwd_weight,
    };
    let grid_xy = (nc.div_ceil(64), s.c_out.div_ceil(64));
    // SAFETY: x and dy hold the lengths `s` gives, dw one weight tensor (checked).
    let tiling = if tc.is_some() { TC } else { SIMT };
    unsafe { launch_split(be, OP, kern, tiling, grid_xy, k, x, dy, dw, &g, None) }
}

/// The data gradient's grid along x and its longest reduction: per output phase (stride
/// `st`: `st * st` phases, `PhaseGemm` in the kernels) a run of 64-pixel tiles as long as the
/// largest phase (`ceil(h/st) * ceil(w/st)` pixels per image) needs, and the largest phase's
/// `c_out * ceil(kh/st) * ceil(kw/st)` taps (the kernels skip the structurally zero ones).
/// Stride 1: one phase, every pixel and tap.
pub(super) fn phase_grid(s: &Conv2d, side: usize) -> (usize, usize) {
    let st = s.stride.max(1);
    let tiles = (s.n * s.h.div_ceil(st) * s.w.div_ceil(st)).div_ceil(side);
    (
        st * st * tiles,
        s.c_out * s.kh.div_ceil(st) * s.kw.div_ceil(st),
    )
}

/// How to split a reduction of length `k` over `blockIdx.z` when `tiles` output tiles alone
/// would not fill the GPU: (chunk, splits), each split at least 256 long and a whole number
/// of the kernel's K tiles (`bk`).
fn split_plan(be: &CudaBackend, tiles: usize, k: usize, bk: usize) -> (usize, usize) {
    let target = 4 * be.info().multiprocessors.max(1) as usize;
    let max_splits = (k / 256).clamp(1, 65_535);
    let want = target.div_ceil(tiles.max(1)).clamp(1, max_splits);
    let chunk = k.div_ceil(want).div_ceil(bk) * bk;
    (chunk, k.div_ceil(chunk))
}

/// Launches a split-K kernel `kern(a, b, out, geometry.., chunk)` (the weight gradients and
/// the tensor-core kernels; then `vec` for the mma kernels), tiled as `t` says, on a
/// `(gx, gy, splits)` grid (`gx`, `gy` in tiles of `t.side`): with one split it writes `out`;
/// otherwise each split writes its partial result into a workspace of `splits` outputs,
/// which `conv_splitk_reduce` sums into `out` in split order (deterministic).
///
/// `fused`: a forward with an epilogue (the tensor-core forwards): with one split its fused
/// kernel (`kern`'s signature but for `chunk`, `OH` and `OW`, then the epilogue's arguments)
/// writes `out`; with more, `kern` fills the workspace and the epilogue's reduce
/// (`conv_splitk_reduce_bn`, `conv_splitk_reduce_stats`) sums it and applies the epilogue.
///
/// # Safety
/// `a`, `b` and `out` must hold the lengths the kernel indexes with `g` (the op checked them
/// against its shape), and `k` must be the kernel's reduction length; `fused`'s buffers
/// those of [`BnEpilogue`], or for the statistics `c_out * gx` values each (`gx`: the
/// forward's 64-pixel tiles).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_split(
    be: &CudaBackend,
    op: &'static str,
    kern: &Kernel,
    t: Tiling,
    (gx, gy): (usize, usize),
    k: usize,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    g: &[i32; 11],
    fused: Option<Fused<'_>>,
) -> Result<()> {
    let (bk, threads) = (t.bk, t.threads);
    // The split planner counts 64x64 tiles.
    let tiles64 = gx * gy * (t.side / 64) * (t.side / 64);
    let (chunk, splits) = if k == 0 {
        (0, 1)
    } else {
        split_plan(be, tiles64, k, bk)
    };
    if splits == 1 {
        if let Some(f) = fused {
            // One split (an empty reduction included): the fused kernel.
            let cfg = blocks(op, (gx, gy, 1), threads)?;
            let (fk, relu) = match &f {
                Fused::Bn(fk, ep) => (*fk, ep.relu as i32),
                Fused::Stats(fk, ..) => (*fk, 0),
            };
            let mut l = fk.on(be.stream());
            l.arg(a).arg(b).arg(out).ints(&g[..9]);
            match f {
                Fused::Bn(_, ep) => ep.push(&mut l, &relu),
                Fused::Stats(_, ps, pq) => {
                    l.arg(ps).arg(pq);
                }
            }
            // SAFETY: the caller's contract.
            return unsafe { l.launch(cfg) };
        }
    }
    if k == 0 {
        return be.fill(out, 0.0);
    }
    let mut cfg = blocks(op, (gx, gy, splits), threads)?;
    cfg.shared_mem_bytes = t.smem;
    let chunk = dim(chunk)?;
    if splits == 1 {
        let mut l = kern.on(be.stream());
        l.arg(a).arg(b).arg(out).ints(g).arg(&chunk);
        if let Some(v) = &t.vec {
            l.arg(v);
        }
        // SAFETY: the caller's contract.
        return unsafe { l.launch(cfg) };
    }
    let len = out.len();
    // From the scratch pool, not allocated: a captured train step (CUDA graph) may not
    // allocate; stream order keeps the reuse safe.
    let mut ws = be.take_scratch(splits * len)?;
    {
        let mut l = kern.on(be.stream());
        l.arg(a).arg(b).arg(&mut ws).ints(g).arg(&chunk);
        if let Some(v) = &t.vec {
            l.arg(v);
        }
        // SAFETY: the caller's contract, ws holding one output per split.
        unsafe { l.launch(cfg)? };
    }
    let (splits, n) = (dim(splits)?, dim(len)?);
    let ks = kernels(be)?;
    let r = match fused {
        None => {
            // SAFETY: ws holds `splits` outputs of `len` elements, out one.
            unsafe {
                ks.splitk_reduce
                    .on(be.stream())
                    .arg(&ws)
                    .arg(out)
                    .arg(&splits)
                    .arg(&n)
                    .launch(grid(len))
            }
        }
        Some(Fused::Bn(_, ep)) => {
            // The forward's output: channel c = (i / (OH*OW)) % C_out, g[4] and g[9]*g[10].
            let (c, hw) = (g[4], g[9] * g[10]);
            let relu = ep.relu as i32;
            let mut l = ks.splitk_reduce_bn.on(be.stream());
            l.arg(&ws).arg(out).arg(&splits).arg(&n).arg(&c).arg(&hw);
            ep.push(&mut l, &relu);
            // SAFETY: ws holds `splits` outputs of `len` elements, out one, ep's buffers
            // their lengths (the caller's contract).
            unsafe { l.launch(grid(len)) }
        }
        Some(Fused::Stats(_, ps, pq)) => {
            // One warp per (channel, 64-pixel tile), 8 channels per block; gx tiles.
            let (c, hw) = (g[4], g[9] * g[10]);
            blocks(op, (gx, (c as usize).div_ceil(8), 1), 256).and_then(|cfg| {
                // SAFETY: ws holds `splits` outputs of `len` elements, out one, ps and pq
                // c_out * gx values (the caller's contract).
                unsafe {
                    ks.splitk_reduce_stats
                        .on(be.stream())
                        .arg(&ws)
                        .arg(out)
                        .arg(&splits)
                        .arg(&n)
                        .arg(&c)
                        .arg(&hw)
                        .arg(ps)
                        .arg(pq)
                        .launch(cfg)
                }
            })
        }
    };
    be.give_scratch(ws);
    r
}

/// The 16-byte cp.async paths of the channels-last weight gradient of `s`
/// (`conv2d_bwd_weight_mma_nhwc_*`'s `vec`) for an NHWC input at device address `x_addr` and
/// an NHWC output gradient at `dy_addr`: bit 0 when `c_out % 4 == 0` and `dy_addr % 16 == 0`
/// (4 channels of one pixel of dy are then contiguous and 16-byte aligned), bit 1 when
/// `c_in % 4 == 0` and `x_addr % 16 == 0` (the same for x, in one tap, for every pixel, tap
/// and stride); 4-byte copies otherwise.
pub(crate) fn mma_vec_wgrad_nhwc(s: &Conv2d, x_addr: u64, dy_addr: u64) -> i32 {
    let a = s.c_out.is_multiple_of(4) && dy_addr.is_multiple_of(16);
    let b = s.c_in.is_multiple_of(4) && x_addr.is_multiple_of(16);
    i32::from(a) | (i32::from(b) << 1)
}

/// The copy paths of the bf16-storage channels-last weight gradient of `s`
/// (`conv2d_bwd_weight_mma_nhwc_bf16s`'s `vec`) for x at device address `x_addr` and dy at
/// `dy_addr`: x's as [`mma_vec_nhwc_bf16s`] gives them for `c_in` (2: 16-byte copies of 8
/// channels, `c_in % 8 == 0` and 16-byte aligned; 4: 4-byte copies, even `c_in`; 0: 2-byte
/// loads), dy's the same for `c_out`, shifted left by 4 (32, 64 or 0).
pub(crate) fn mma_vec_wgrad_nhwc_bf16s(s: &Conv2d, x_addr: u64, dy_addr: u64) -> i32 {
    let dy_as_input = Conv2d {
        c_in: s.c_out,
        ..*s
    };
    mma_vec_nhwc_bf16s(s, x_addr) | (mma_vec_nhwc_bf16s(&dy_as_input, dy_addr) << 4)
}

/// The channels-last weight gradient: `conv2d_bwd_weight_mma_nhwc_*` on f32 activations and
/// `conv2d_bwd_weight_mma_nhwc_bf16s` on activations stored in bf16 (kernels/conv_tc.cu, the
/// sections at its end).
impl CudaBackend {
    /// Whether [`CudaBackend::conv2d_bwd_weight_nhwc_native`] runs `s` at this backend's
    /// precision: at tf32 and bf16 (not f32: there is no channels-last SIMT kernel), unless the
    /// route is [`MmaRoute::Never`] (no `mma.sync` kernel), for every shape the kernel's 32-bit
    /// indexing and its packed column decode hold (`c_in < 2^15`, `kh`, `kw` <= 255): any
    /// kernel size, stride, padding, `c_in` and `c_out`, small layers included (split over the
    /// pixels; the alternative is two transposes around the NCHW path, not measured: no GPU).
    /// Not where neither ring's shared memory fits the device's ([`TcKernel::WgradNhwc`]:
    /// the deepest that fits runs, [`CudaBackend::ring`]).
    pub(crate) fn conv_bwd_weight_nhwc_native(&self, s: &Conv2d) -> bool {
        self.precision().tensor_cores()
            && self.wgrad_nhwc_runs(s)
            && self.ring(TcKernel::WgradNhwc).is_some()
    }

    /// What the channels-last weight-gradient kernels (f32 and bf16 storage) run: the route
    /// not [`MmaRoute::Never`], and a shape their 32-bit indexing and packed column decode
    /// hold.
    fn wgrad_nhwc_runs(&self, s: &Conv2d) -> bool {
        self.mma_route != MmaRoute::Never
            && geometry(s).is_ok()
            && s.c_in < 1 << 15
            && s.kh <= 255
            && s.kw <= 255
    }

    /// The kernel the channels-last weight gradient of `s` launches at this backend's
    /// precision and route (`conv2d_bwd_weight_mma_nhwc_bf16` / `_tf32`; `_bf16_s2` on the
    /// shallow ring), or None where it does not run natively; diagnostics and tests.
    pub fn conv_bwd_weight_nhwc_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        let ring = self.ring(TcKernel::WgradNhwc)?;
        self.mma_kernel_name(
            self.conv_bwd_weight_nhwc_native(s),
            ring.pick(
                "conv2d_bwd_weight_mma_nhwc_bf16",
                "conv2d_bwd_weight_mma_nhwc_bf16_s2",
            ),
            "conv2d_bwd_weight_mma_nhwc_tf32",
        )
    }

    /// `dw = sum over the batch of x (*) dy` on channels-last activations: `x`
    /// `[n][h][w][c_in]`, `dy` `[n][out_h][out_w][c_out]`, `dw` OIHW (overwritten). One launch of
    /// `conv2d_bwd_weight_mma_nhwc_*` on (column tiles, channel tiles, splits) 128x128 blocks,
    /// 256 threads, [`TcKernel::WgradNhwc`]'s dynamic shared memory, split over the pixels
    /// when the output tiles alone would not fill the GPU (the small late layers), each split
    /// into the arena-scratch workspace that `conv_splitk_reduce` then sums in split order
    /// (deterministic; [`launch_split`], as the NCHW weight gradient): nothing allocated once
    /// warm, so capturable in a graph. An error where
    /// [`CudaBackend::conv_bwd_weight_nhwc_native`] is false.
    ///
    /// # Safety
    /// `x`, `dy` and `dw` hold the lengths `s` gives (what `Backend::conv2d_bwd_weight`
    /// checks; the same lengths as NCHW).
    pub(crate) unsafe fn conv2d_bwd_weight_nhwc_native(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight_nhwc";
        if !self.conv_bwd_weight_nhwc_native(s) {
            return Err(EngineError::Param(format!(
                "{OP}: no channels-last kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        let g = geometry(s)?;
        let nc = s.c_in * s.kh * s.kw;
        if nc == 0 || s.c_out == 0 {
            return Ok(());
        }
        let k = s.n * s.out_h() * s.out_w();
        let ring = self
            .ring(TcKernel::WgradNhwc)
            .ok_or_else(|| self.no_tile(OP))?;
        // At tf32 `ring` is Deep: there is no tf32 `_s2` kernel (`shared_memory`).
        let kern = mma_pick(self, |t| {
            (
                ring.pick(&t.bwd_weight_mma_nhwc_bf16, &t.bwd_weight_mma_nhwc_bf16_s2),
                &t.bwd_weight_mma_nhwc_tf32,
            )
        })?;
        let vec = mma_vec_wgrad_nhwc(s, self.ptr(x), self.ptr(dy));
        let tiling = mma_tiling(self, OP, TcKernel::WgradNhwc(ring), vec)?;
        let grid_xy = (nc.div_ceil(MMA_TILE), s.c_out.div_ceil(MMA_TILE));
        // SAFETY: x, dy and dw hold the lengths `s` gives (the caller's contract); an empty
        // reduction fills dw with zeros there.
        unsafe { launch_split(self, OP, kern, tiling, grid_xy, k, x, dy, dw, &g, None) }
    }

    /// Whether [`CudaBackend::conv2d_bwd_weight_nhwc_bf16s_native`] runs `s` (x and dy stored
    /// in bf16): at bf16 only, where [`CudaBackend::conv_bwd_weight_nhwc_native`] runs it (the
    /// same indexing and column decode; any kernel size, stride, padding and channel counts:
    /// 16-, 4- or 2-byte copies of each operand by [`mma_vec_wgrad_nhwc_bf16s`]).
    /// Not where neither ring's shared memory fits the device's ([`TcKernel::WgradNhwcBf16s`]:
    /// the deepest that fits runs, [`CudaBackend::ring`]).
    pub(crate) fn conv_bwd_weight_nhwc_bf16s_native(&self, s: &Conv2d) -> bool {
        self.precision() == Precision::Bf16
            && self.wgrad_nhwc_runs(s)
            && self.ring(TcKernel::WgradNhwcBf16s).is_some()
    }

    /// The mma.sync kernel of the bf16-storage channels-last weight gradient of `s`
    /// (`conv2d_bwd_weight_mma_nhwc_bf16s`, `_s5` on the shallow ring), or None where it does
    /// not run (not at bf16, or with the route [`MmaRoute::Never`]); diagnostics and tests.
    /// Where `conv_bwd_weight_nhwc_bf16s_wgmma_kernel` is Some, that wgmma kernel runs
    /// instead (as [`CudaBackend::conv_bn_eval_nhwc_bf16s_kernel`]).
    pub fn conv_bwd_weight_nhwc_bf16s_kernel(&self, s: &Conv2d) -> Option<&'static str> {
        let ring = self.ring(TcKernel::WgradNhwcBf16s)?;
        self.conv_bwd_weight_nhwc_bf16s_native(s)
            .then_some(ring.pick(
                "conv2d_bwd_weight_mma_nhwc_bf16s",
                "conv2d_bwd_weight_mma_nhwc_bf16s_s5",
            ))
    }

    /// [`CudaBackend::conv2d_bwd_weight_nhwc_native`] on activations stored in bf16: `x`
    /// (`[n][h][w][c_in]`) and `dy` (`[n][out_h][out_w][c_out]`) hold value `i` in the 16-bit
    /// half `i` of the buffer (the low half of slot `i / 2` for even `i`, the high for odd;
    /// `len.div_ceil(2)` slots), `dw` OIHW f32 (overwritten). One launch of
    /// `conv2d_bwd_weight_mma_nhwc_bf16s` (a bf16-only ring, both operands copied as stored)
    /// on (column tiles, channel tiles, splits) 128x128 blocks, 256 threads,
    /// [`TcKernel::WgradNhwcBf16s`]'s dynamic shared memory, split over the pixels as the
    /// f32-storage kernel, the splits' workspace from arena scratch and summed in split order
    /// by `conv_splitk_reduce` (deterministic; [`launch_split`]): nothing allocated once warm,
    /// so capturable in a graph. An error where
    /// [`CudaBackend::conv_bwd_weight_nhwc_bf16s_native`] is false.
    ///
    /// # Safety
    /// `x` holds `s.x_len().div_ceil(2)` values, `dy` `s.y_len().div_ceil(2)`, `dw`
    /// `s.w_len()`.
    pub(crate) unsafe fn conv2d_bwd_weight_nhwc_bf16s_native(
        &self,
        s: &Conv2d,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight_nhwc_bf16s";
        if !self.conv_bwd_weight_nhwc_bf16s_native(s) {
            return Err(EngineError::Param(format!(
                "{OP}: no bf16-storage kernel for {s:?} at {} (route {:?})",
                self.precision(),
                self.mma_route
            )));
        }
        let g = geometry(s)?;
        let nc = s.c_in * s.kh * s.kw;
        if nc == 0 || s.c_out == 0 {
            return Ok(());
        }
        let k = s.n * s.out_h() * s.out_w();
        let ring = self
            .ring(TcKernel::WgradNhwcBf16s)
            .ok_or_else(|| self.no_tile(OP))?;
        let tc = tc_kernels(self)?;
        let kern = ring.pick(
            &tc.bwd_weight_mma_nhwc_bf16s,
            &tc.bwd_weight_mma_nhwc_bf16s_s5,
        );
        let vec = mma_vec_wgrad_nhwc_bf16s(s, self.ptr(x), self.ptr(dy));
        let tiling = mma_tiling(self, OP, TcKernel::WgradNhwcBf16s(ring), vec)?;
        let grid_xy = (nc.div_ceil(MMA_TILE), s.c_out.div_ceil(MMA_TILE));
        // SAFETY: x, dy (bf16 storage) and dw hold the lengths `s` gives (the caller's
        // contract); an empty reduction fills dw with zeros there.
        unsafe { launch_split(self, OP, kern, tiling, grid_xy, k, x, dy, dw, &g, None) }
    }
}

#[cfg(test)]
mod wgrad_nhwc_tests {
    use super::{mma_vec_wgrad_nhwc, mma_vec_wgrad_nhwc_bf16s};
    use crate::engine::shapes::Conv2d;

    #[test]
    fn bf16_storage_weight_gradient_copies_by_channel_count() {
        let a = 0x7f00_0000_0000u64;
        let s = |c_in, c_out| Conv2d {
            n: 2,
            c_in,
            h: 7,
            w: 5,
            c_out,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        };
        // x in bits 1 (16-byte) / 2 (4-byte), dy in bits 5 / 6; neither: 2-byte loads.
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(64, 128), a, a), 2 | 32);
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(12, 130), a, a), 4 | 64);
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(3, 67), a, a), 0);
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(8, 33), a, a), 2);
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(1, 8), a, a), 32);
        // Misaligned (4- or 8-byte): the 4-byte copies.
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(64, 128), a + 4, a), 4 | 32);
        assert_eq!(mma_vec_wgrad_nhwc_bf16s(&s(64, 128), a, a + 8), 2 | 64);
    }

    #[test]
    fn weight_gradient_sixteen_byte_copies_need_four_channels() {
        let a = 0x7f00_0000_0000u64;
        let s = |c_in, c_out| Conv2d {
            n: 2,
            c_in,
            h: 7,
            w: 5,
            c_out,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        };
        assert_eq!(mma_vec_wgrad_nhwc(&s(64, 128), a, a), 3);
        assert_eq!(mma_vec_wgrad_nhwc(&s(6, 128), a, a), 1); // x: 4-byte copies
        assert_eq!(mma_vec_wgrad_nhwc(&s(64, 130), a, a), 2); // dy: 4-byte copies
        assert_eq!(mma_vec_wgrad_nhwc(&s(3, 65), a, a), 0);
        assert_eq!(mma_vec_wgrad_nhwc(&s(64, 128), a + 4, a), 1);
        assert_eq!(mma_vec_wgrad_nhwc(&s(64, 128), a, a + 8), 2);
    }
}

#[cfg(test)]
mod tests {
    use super::{
        bf16s_bwd_weight_len, bf16s_copy_path, bf16s_weight_row, mma_route, mma_route_weight,
        mma_vec, mma_vec_nhwc, mma_vec_nhwc_bf16s, mma_vec_nhwc_bwd_data, shared_memory, NhwcTile,
        Ring, TcKernel, MMA_TILE, SMEM_FLOOR,
    };
    use crate::engine::shapes::Conv2d;
    use crate::engine::Precision;

    /// The per-block shared-memory limits (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`)
    /// of sm_90 / sm_100 (227 KiB), sm_80 / sm_87 (163 KiB), sm_86 / sm_89 (99 KiB), sm_75 (64 KiB).
    const SM90: u32 = 232_448;
    const SM80: u32 = 166_912;
    const SM86: u32 = 101_376;
    const SM75: u32 = 65_536;

    fn fits(k: TcKernel, p: Precision, limit: u32) -> bool {
        shared_memory(k, p).is_some_and(|m| m.total() <= limit)
    }

    /// The channels-last tile by the GEMM's rows and what fits: 64 x 256 up to 64 rows, 128 x
    /// 128 above (65..127 too: two 64-row tiles would leave as many rows empty); where the
    /// 64 x 256 kernel does not fit, 128 x 128 (sm_80's 163 KiB: the f32-storage bf16 kernel;
    /// 150 KiB: the bf16-storage one too); where neither does, None (sm_86's 99 KiB, sm_75's
    /// 64 KiB); both tiles 16,384 outputs per block. With the shallow rings, the tile and ring
    /// of the bf16-storage and the f32-storage kernels.
    #[test]
    fn nhwc_tile_by_rows_and_device() {
        use NhwcTile::{Square, M64};
        type Kind = fn(NhwcTile) -> TcKernel;
        let kinds: [(&str, Kind, Precision); 3] = [
            (
                "bf16",
                |t| TcKernel::MmaNhwc(t, Ring::Deep),
                Precision::Bf16,
            ),
            (
                "tf32",
                |t| TcKernel::MmaNhwc(t, Ring::Deep),
                Precision::Tf32,
            ),
            (
                "bf16s",
                |t| TcKernel::MmaNhwcBf16s(t, Ring::Deep),
                Precision::Bf16,
            ),
        ];
        for (rows, small) in [
            (1, true),
            (33, true),
            (64, true),
            (65, false),
            (80, false),
            (128, false),
            (512, false),
        ] {
            for (name, kind, p) in kinds {
                for (limit, m64_fits, square_fits) in [
                    (SM90, true, true),
                    (SM80, name != "bf16", true),
                    (153_600, name == "tf32", true),
                    (SM86, false, false),
                    (SM75, false, false),
                ] {
                    let want = if small && m64_fits {
                        Some(M64)
                    } else if square_fits {
                        Some(Square)
                    } else {
                        None
                    };
                    let got = NhwcTile::choose(rows, |t| fits(kind(t), p, limit));
                    assert_eq!(got, want, "{rows} rows, {name}, limit {limit}");
                }
            }
        }
        // The bf16-storage kernels with their shallow rings: as above wherever a deep ring
        // fits, else the shallow rings' tile by the rows (99 KiB: both tiles' shallow rings
        // fit), else None (64 KiB).
        for (rows, small) in [(1, true), (64, true), (65, false), (512, false)] {
            for (limit, want) in [
                (SM90, Some((if small { M64 } else { Square }, Ring::Deep))),
                (SM80, Some((if small { M64 } else { Square }, Ring::Deep))),
                (153_600, Some((Square, Ring::Deep))),
                (
                    SM86,
                    Some((if small { M64 } else { Square }, Ring::Shallow)),
                ),
                (SM75, None),
                (SMEM_FLOOR, None),
            ] {
                let got = NhwcTile::choose_with_ring(rows, TcKernel::MmaNhwcBf16s, |k| {
                    fits(k, Precision::Bf16, limit)
                });
                assert_eq!(got, want, "{rows} rows, bf16s, limit {limit}");
            }
        }
        // The f32-storage kernels with their shallow rings: the deep rings' choice wherever
        // one fits; else 128 x 128 `_s2` at bf16 (no 64 x 256 `_s2` there) and the tile by the
        // rows at tf32 (99 KiB), else None (64 KiB).
        for (rows, small) in [(1, true), (64, true), (65, false), (512, false)] {
            let by_rows = if small { M64 } else { Square };
            for (limit, bf16, tf32) in [
                (
                    SM90,
                    Some((by_rows, Ring::Deep)),
                    Some((by_rows, Ring::Deep)),
                ),
                (
                    SM80,
                    Some((Square, Ring::Deep)),
                    Some((by_rows, Ring::Deep)),
                ),
                (
                    128 * 1024,
                    Some((Square, Ring::Shallow)),
                    Some((Square, Ring::Deep)),
                ),
                (
                    SM86,
                    Some((Square, Ring::Shallow)),
                    Some((by_rows, Ring::Shallow)),
                ),
                (SM75, None, None),
            ] {
                for (p, want) in [(Precision::Bf16, bf16), (Precision::Tf32, tf32)] {
                    let got =
                        NhwcTile::choose_with_ring(rows, TcKernel::MmaNhwc, |k| fits(k, p, limit));
                    assert_eq!(got, want, "{rows} rows, f32 storage at {p}, limit {limit}");
                }
            }
        }
        for t in [Square, M64] {
            assert_eq!(t.rows() * t.pixels(), 128 * 128);
            assert_eq!(t.pick(1, 2), if t == Square { 1 } else { 2 });
            assert_eq!(t.pixel_table() as usize, t.pixels() * 16);
        }
    }

    /// The table's totals (dynamic + static; the dynamic parts are what conv_tc.cu's and
    /// conv_wgmma.cu's static_asserts pin) and what fits each device's limit: at 99 KiB the
    /// shallow rings (NCHW and f32-storage channels-last `_s2`, bf16 storage `_s4` / `_m64_s3` /
    /// `_s5`) and the tf32 channels-last weight gradient (exactly 99 KiB), no other deep ring; at 64 KiB no mma / wgmma kernel; the
    /// WMMA kernels within the 48 KiB floor everywhere. Which ring each family takes by limit.
    #[test]
    fn shared_memory_by_kernel_and_limit() {
        use NhwcTile::{Square, M64};
        use Precision::{Bf16, Tf32};
        use Ring::{Deep, Shallow};
        let all: [(TcKernel, Precision, u32); 29] = [
            (TcKernel::Wmma { weight: false }, Bf16, 47_104),
            (TcKernel::Wmma { weight: true }, Bf16, 47_360),
            (TcKernel::Wmma { weight: false }, Tf32, 40_960),
            (TcKernel::Wmma { weight: true }, Tf32, 41_216),
            (TcKernel::MmaNchw(Deep), Bf16, 124_928),
            (TcKernel::MmaNchw(Deep), Tf32, 105_984),
            (TcKernel::MmaNchw(Shallow), Bf16, 89_600),
            (TcKernel::MmaNchw(Shallow), Tf32, 70_656),
            (TcKernel::MmaNhwc(Square, Deep), Bf16, 133_120),
            (TcKernel::MmaNhwc(Square, Deep), Tf32, 112_640),
            (TcKernel::MmaNhwc(M64, Deep), Bf16, 167_936),
            (TcKernel::MmaNhwc(M64, Deep), Tf32, 142_336),
            (TcKernel::MmaNhwc(Square, Shallow), Bf16, 96_256),
            (TcKernel::MmaNhwc(Square, Shallow), Tf32, 75_776),
            (TcKernel::MmaNhwc(M64, Shallow), Tf32, 96_256),
            (TcKernel::MmaNhwcBf16s(Square, Deep), Bf16, 124_928),
            (TcKernel::MmaNhwcBf16s(M64, Deep), Bf16, 157_696),
            (TcKernel::MmaNhwcBf16s(Square, Shallow), Bf16, 83_968),
            (TcKernel::MmaNhwcBf16s(M64, Shallow), Bf16, 80_896),
            (TcKernel::WgradNhwc(Deep), Bf16, 118_784),
            (TcKernel::WgradNhwc(Deep), Tf32, 101_376),
            (TcKernel::WgradNhwc(Shallow), Bf16, 84_992),
            (TcKernel::WgradNhwcBf16s(Deep), Bf16, 104_448),
            (TcKernel::WgradNhwcBf16s(Shallow), Bf16, 87_040),
            (TcKernel::Wgmma, Bf16, 134_144),
            (TcKernel::Wgmma, Tf32, 134_144),
            (TcKernel::MmaNhwcBf16s(Square, Deep), Tf32, 124_928),
            (TcKernel::MmaNhwcBf16s(M64, Shallow), Tf32, 80_896),
            (TcKernel::WgradNhwcBf16s(Deep), Tf32, 104_448),
        ];
        for (k, p, total) in all {
            let m = shared_memory(k, p).map(|m| m.total());
            assert_eq!(m, Some(total), "{k:?} at {p}");
            let wmma = matches!(k, TcKernel::Wmma { .. });
            assert_eq!(fits(k, p, SMEM_FLOOR), wmma, "{k:?} at {p}: 48 KiB");
            assert_eq!(fits(k, p, SM75), wmma, "{k:?} at {p}: 64 KiB");
            let shallow = matches!(
                k,
                TcKernel::MmaNchw(Shallow)
                    | TcKernel::MmaNhwc(_, Shallow)
                    | TcKernel::MmaNhwcBf16s(_, Shallow)
                    | TcKernel::WgradNhwc(Shallow)
                    | TcKernel::WgradNhwcBf16s(Shallow)
            );
            let sm86 = wmma || shallow || (k == TcKernel::WgradNhwc(Deep) && p == Tf32);
            assert_eq!(fits(k, p, SM86), sm86, "{k:?} at {p}: 99 KiB");
            let sm80 = !(k == TcKernel::MmaNhwc(M64, Deep) && p == Bf16);
            assert_eq!(fits(k, p, SM80), sm80, "{k:?} at {p}: 163 KiB");
            assert!(fits(k, p, SM90), "{k:?} at {p}: 227 KiB");
        }
        for p in [Bf16, Tf32] {
            for (limit, want) in [
                (SM90, Some(Deep)),
                (SM80, Some(Deep)),
                (SM86, Some(Shallow)),
                (SM75, None),
                (SMEM_FLOOR, None),
            ] {
                let got = Ring::deepest(TcKernel::MmaNchw, |k| fits(k, p, limit));
                assert_eq!(got, want, "NCHW at {p}, limit {limit}");
                let got = Ring::deepest(TcKernel::WgradNhwcBf16s, |k| fits(k, p, limit));
                assert_eq!(
                    got, want,
                    "bf16-storage weight gradient at {p}, limit {limit}"
                );
                // The f32-storage weight gradient: tf32's deep ring fits 99 KiB.
                let want = if p == Tf32 && limit == SM86 {
                    Some(Deep)
                } else {
                    want
                };
                let got = Ring::deepest(TcKernel::WgradNhwc, |k| fits(k, p, limit));
                assert_eq!(got, want, "weight gradient at {p}, limit {limit}");
            }
        }
        // The variants without a kernel: no size, never fit.
        for (k, p) in [
            (TcKernel::MmaNhwc(M64, Shallow), Bf16),
            (TcKernel::WgradNhwc(Shallow), Tf32),
        ] {
            assert_eq!(shared_memory(k, p), None, "{k:?} at {p}");
            assert!(!fits(k, p, SM90), "{k:?} at {p}");
        }
        assert_eq!(Deep.pick(1, 2), 1);
        assert_eq!(Shallow.pick(1, 2), 2);
    }

    fn conv(c_in: usize, h: usize, w: usize, c_out: usize, k: usize, stride: usize) -> Conv2d {
        Conv2d {
            n: 1,
            c_in,
            h,
            w,
            c_out,
            kh: k,
            kw: k,
            stride,
            pad: (k / 2) * usize::from(k > 1),
        }
    }

    #[test]
    fn the_large_layers_take_the_mma_kernel() {
        // 132 SMs (H100/H200): 132 blocks of 128x128 and more.
        let sms = 132;
        assert!(mma_route(132, 128, sms));
        assert!(!mma_route(131, 128, sms)); // 131 blocks
        assert!(mma_route(66, 256, sms)); // 66 x 2
        assert!(!mma_route(65, 256, sms)); // 65 x 2
        assert!(!mma_route(1 << 20, 64, sms)); // 64 channels: half a tile of rows
        assert!(!mma_route(1 << 20, 127, sms));
        // ResNet-101 at 32 x 512^2 slices: stage 1 (128^2 pixels per slice, 256 channels) yes,
        // stage 4 (16^2, 2048 channels: 64 x 16 = 1024 blocks) yes, one 16^2 slice of
        // stage 4 (2 x 16 = 32 blocks) no.
        assert!(mma_route((32 * 128 * 128) / MMA_TILE, 256, sms));
        assert!(mma_route((32 * 16 * 16) / MMA_TILE, 2048, sms));
        assert!(!mma_route(2, 2048, sms));
        assert!(mma_route(1, 128, 0)); // no SM count: one block is enough
                                       // Weight gradients: 4 x 4 tiles need 9 runs of 1024 pixels on 132 SMs.
        assert!(mma_route_weight(512, 512, 9 * 1024, sms));
        assert!(!mma_route_weight(512, 512, 8 * 1024, sms));
        assert!(!mma_route_weight(64, 4096, 1 << 20, sms));
        assert!(!mma_route_weight(4096, 64, 1 << 20, sms));
        // The data gradient's tiles count every output phase: a 3x3 stride-2 layer with
        // 2 x 32^2 input pixels has 4 phases of 512 pixels, 4 x 4 tiles of 128.
        let s = Conv2d {
            n: 2,
            c_in: 2048,
            h: 32,
            w: 32,
            c_out: 512,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        };
        assert_eq!(super::phase_grid(&s, MMA_TILE), (16, 512 * 4));
        assert!(mma_route(super::phase_grid(&s, MMA_TILE).0, s.c_in, sms)); // 16 x 16
        assert!(!mma_route(super::phase_grid(&s, MMA_TILE).0, 1024, sms)); // 16 x 8
    }

    #[test]
    fn sixteen_byte_copies_only_where_contiguous_and_aligned() {
        let a = 0x7f00_0000_0000u64; // 256-byte aligned, as cuMemAlloc gives
                                     // 1x1 stride 1, h*w % 4 == 0, K = 64: both.
        assert_eq!(mma_vec(&conv(64, 8, 6, 128, 1, 1), a, a), 3);
        // K = 66 (not % 4): activations only.
        assert_eq!(mma_vec(&conv(66, 8, 6, 128, 1, 1), a, a), 2);
        // h*w = 35: weights only.
        assert_eq!(mma_vec(&conv(64, 7, 5, 128, 1, 1), a, a), 1);
        // 3x3 (K = 36) or a stride 2 1x1: weights only; 3x3 with K = 27: none.
        assert_eq!(mma_vec(&conv(4, 8, 8, 128, 3, 1), a, a), 1);
        assert_eq!(mma_vec(&conv(64, 8, 8, 128, 1, 2), a, a), 1);
        assert_eq!(mma_vec(&conv(3, 8, 8, 128, 3, 1), a, a), 0);
        // Pointers 4 bytes off a 16-byte boundary: no 16-byte copy of that operand.
        assert_eq!(mma_vec(&conv(64, 8, 6, 128, 1, 1), a + 4, a), 1);
        assert_eq!(mma_vec(&conv(64, 8, 6, 128, 1, 1), a, a + 4), 2);
        assert_eq!(mma_vec(&conv(64, 8, 6, 128, 1, 1), a + 16, a + 32), 3);
        // Padding on a 1x1: the rows are not plain pixel runs.
        let mut s = conv(64, 8, 8, 128, 1, 1);
        s.pad = 1;
        assert_eq!(mma_vec(&s, a, a), 1);
    }

    #[test]
    fn channels_last_sixteen_byte_copies_need_four_channels() {
        let a = 0x7f00_0000_0000u64;
        // c_in % 4 == 0: both, whatever the kernel, stride, padding or image size.
        assert_eq!(mma_vec_nhwc(&conv(64, 7, 5, 128, 3, 2), a, a), 3);
        assert_eq!(mma_vec_nhwc(&conv(4, 9, 9, 130, 7, 2), a, a), 3);
        // c_in = 6: K = 54 (3x3) neither; K = 6 (1x1) neither; K = 24 (2x2) weights only.
        assert_eq!(mma_vec_nhwc(&conv(6, 8, 8, 128, 3, 1), a, a), 0);
        assert_eq!(mma_vec_nhwc(&conv(6, 8, 8, 128, 1, 1), a, a), 0);
        assert_eq!(mma_vec_nhwc(&conv(6, 8, 8, 128, 2, 1), a, a), 1);
        // The stem: c_in = 3, K = 147: 4-byte copies of both.
        assert_eq!(mma_vec_nhwc(&conv(3, 23, 21, 64, 7, 2), a, a), 0);
        // Misaligned pointers.
        assert_eq!(mma_vec_nhwc(&conv(64, 8, 8, 128, 1, 1), a + 4, a), 1);
        assert_eq!(mma_vec_nhwc(&conv(64, 8, 8, 128, 1, 1), a, a + 8), 2);
    }

    #[test]
    fn channels_last_data_gradient_copies_need_four_output_channels() {
        let a = 0x7f00_0000_0000u64;
        // c_out % 4 == 0 and dy aligned: 16-byte copies of dy, whatever the kernel, stride
        // or c_in; the weight copy (scratch: a whole allocation) aligned: bit 0.
        assert_eq!(mma_vec_nhwc_bwd_data(&conv(6, 7, 5, 128, 3, 2), a, a), 3);
        assert_eq!(mma_vec_nhwc_bwd_data(&conv(3, 9, 9, 64, 1, 1), a, a), 3);
        // c_out = 130 or 70: 4-byte copies of dy.
        assert_eq!(mma_vec_nhwc_bwd_data(&conv(64, 8, 8, 130, 1, 2), a, a), 1);
        assert_eq!(mma_vec_nhwc_bwd_data(&conv(6, 8, 8, 70, 3, 2), a, a), 1);
        // Misaligned pointers.
        assert_eq!(
            mma_vec_nhwc_bwd_data(&conv(64, 8, 8, 128, 1, 1), a + 4, a),
            1
        );
        assert_eq!(
            mma_vec_nhwc_bwd_data(&conv(64, 8, 8, 128, 1, 1), a, a + 8),
            2
        );
    }

    #[test]
    fn bf16_storage_copies_by_channel_count() {
        let a = 0x7f00_0000_0000u64;
        // c_in % 8 == 0 and aligned: 16 bytes (8 channels), whatever the kernel and stride.
        assert_eq!(mma_vec_nhwc_bf16s(&conv(64, 7, 5, 128, 3, 2), a), 2);
        assert_eq!(mma_vec_nhwc_bf16s(&conv(8, 9, 9, 130, 7, 2), a), 2);
        // Even c_in otherwise, or x not 16-byte aligned: 4 bytes (2 channels).
        assert_eq!(mma_vec_nhwc_bf16s(&conv(12, 8, 8, 128, 3, 1), a), 4);
        assert_eq!(mma_vec_nhwc_bf16s(&conv(4, 8, 8, 128, 1, 1), a), 4);
        assert_eq!(mma_vec_nhwc_bf16s(&conv(64, 8, 8, 128, 1, 1), a + 4), 4);
        assert_eq!(mma_vec_nhwc_bf16s(&conv(64, 8, 8, 128, 1, 1), a + 8), 4);
        // Odd c_in (the stem's 3, c_in = 1): 2-byte loads.
        assert_eq!(mma_vec_nhwc_bf16s(&conv(3, 23, 21, 64, 7, 2), a), 0);
        assert_eq!(mma_vec_nhwc_bf16s(&conv(1, 10, 10, 128, 3, 1), a), 0);
        // The bf16 weight rows: K rounded up to 8.
        assert_eq!(bf16s_weight_row(&conv(3, 23, 21, 64, 7, 2)), 152); // K = 147
        assert_eq!(bf16s_weight_row(&conv(64, 8, 8, 128, 3, 1)), 576);
        assert_eq!(bf16s_weight_row(&conv(10, 8, 8, 128, 1, 1)), 16);
        assert_eq!(bf16s_weight_row(&conv(0, 8, 8, 128, 1, 1)), 0);
    }

    #[test]
    fn bf16_storage_data_gradient_weight_copy_and_dy_paths() {
        // dy's copies by c_out, as x's by c_in.
        let a = 0x7f00_0000_0000u64;
        assert_eq!(bf16s_copy_path(136, a), 2);
        assert_eq!(bf16s_copy_path(136, a + 4), 4);
        assert_eq!(bf16s_copy_path(130, a), 4);
        assert_eq!(bf16s_copy_path(67, a), 0);
        // 3x3 stride 2: phases of 4, 2, 2, 1 taps; c_out 6: rows 24, 12 -> 16, 12 -> 16, 6 -> 8.
        assert_eq!(
            bf16s_bwd_weight_len(&conv(5, 9, 10, 6, 3, 2)),
            5 * (24 + 16 + 16 + 8)
        );
        // 1x1 stride 2: one phase with the tap (130 -> 136), three without (0).
        assert_eq!(bf16s_bwd_weight_len(&conv(32, 9, 13, 130, 1, 2)), 32 * 136);
        // Stride 1: one phase of every tap, 9 * 67 = 603 -> 608.
        assert_eq!(bf16s_bwd_weight_len(&conv(5, 9, 7, 67, 3, 1)), 5 * 608);
        assert_eq!(bf16s_bwd_weight_len(&conv(5, 9, 7, 0, 3, 1)), 0);
    }
}
