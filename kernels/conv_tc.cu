// 2-D convolution (no bias), NCHW, as implicit GEMMs on the tensor cores (nvcuda::wmma; the
// large layers' mma.sync kernels are in the second half of the file, and at its end the
// channels-last (NHWC) eval forward on the same mma.sync machinery, with f32 activations and,
// at bf16, with activations stored in bf16, and last the channels-last weight gradient): the
// same three GEMMs as
// kernels/conv.cu (the f32 SIMT reference), with the operands rounded to bf16 (16x16x16
// fragments) or tf32 (16x16x8) once they are in shared memory, and f32 accumulation.
//
//   forward     M = C_out, N = batch*OH*OW, K = C_in*KH*KW:  y = W . col(x); conv2d_fwd_bn_*
//               with the eval-mode batch norm (+ residual) (+ ReLU) in the epilogue
//   bwd-data    M = C_in,  N = batch*H*W,   K = C_out*KH*KW: dx = W^T . col'(dy), per
//               output phase without the structurally zero taps of a stride > 1 (PhaseGemm)
//   bwd-weight  M = C_out, N = C_in*KH*KW,  K = batch*OH*OW: dW = dy . col(x)^T
//
// Each is split over K by blockIdx.z when the output tiles alone would not fill the GPU
// (the small late layers): split z covers [z*chunk, min((z+1)*chunk, K)) (chunk a multiple
// of TBK) and writes its partial result to the workspace [splits][output] that conv.cu's
// conv_splitk_reduce sums in a fixed order (deterministic, no atomics); with one split the
// output is written directly.
//
// Block tile 64x64, K tile 16, 128 threads = 4 warps in 2x2, each warp 32x32 (2x2 WMMA
// accumulators). The operands go from global to shared memory by cp.async
// (__pipeline_memcpy_async, 4 bytes per element: the im2col gather has no contiguity to
// vectorise in NCHW, and an element outside the image or past K is the src-size-0 zero fill)
// into a ring of TC_STAGES f32 stages: while tile t is multiplied, tiles t+1..t+STAGES-1
// are in flight, and one __syncthreads per tile frees the stage that tile t-1 used. The
// operands are rounded after the copy, since cp.async cannot convert: tf32 on the fragments
// as they are loaded (wmma::__float_to_tf32 on every element, the stage stays f32), bf16 by
// one pass of the block over the f32 stage into a bf16 tile (and a second barrier) that the
// fragments load from. The epilogue stores the accumulators through shared memory so that
// the global writes are coalesced. Needs sm_80 or newer (bf16/tf32 WMMA, cp.async):
// build.rs compiles this file for compute_90 only, with the CUDA headers' include folder
// (mma.h, cuda_pipeline_primitives.h).

#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

using namespace nvcuda;

#define TBM 64
#define TBN 64
#define TBK 16
#define TC_STAGES 4
#define TC_THREADS 128
// Blocks per SM the register allocation must allow (__launch_bounds__' second argument):
// 4 x 128 threads x 128 registers fill the 64K registers of an SM, and 4 blocks of the
// largest shared-memory footprint (bf16: 46-47 KB) fit its 228 KB; the tf32 weight
// gradient (41 KB) fits 5, so 96 registers.
#define TC_MIN_BLOCKS 4
#define TC_MIN_BLOCKS_WEIGHT_TF32 5
#define TC_LDC (TBN + 4)
// f32 stage: A [TBM][LDF] (row m, column k), then B, row-major [TBK][LDFB] or, for the
// weight gradient, column-major [TBN][LDF]; rows padded by 16 bytes.
#define LDF (TBK + 4)
#define LDFB (TBN + 4)
#define STAGE_FLOATS (TBM * LDF + TBN * LDF)
#define TC_SMEM_F32 (TC_STAGES * STAGE_FLOATS * 4)
// bf16 tile (after the stages): A [TBM][LDH], B [TBK][LDHB] or [TBN][LDH].
#define LDH (TBK + 8)
#define LDHB (TBN + 8)
#define TILE_H (TBM * LDH + TBN * LDH)

static_assert(TBK * LDFB <= TBN * LDF && TBK * LDHB <= TBN * LDH, "B's row-major layout fits its slot");
static_assert(TBM * TC_LDC * 4 <= TC_SMEM_F32, "the epilogue's f32 tile fits in the stages");
static_assert(TBM * TBK == 8 * TC_THREADS && TBN * TBK == 8 * TC_THREADS, "8 elements of A and of B per thread");
static_assert(TC_STAGES >= 2 && TC_STAGES <= 8, "cp.async pipeline depth");

// Operands rounded to bf16, 16x16x16 fragments loaded from the bf16 tile.
struct PrecBf16 {
    typedef __nv_bfloat16 F;  // fragment element type
    static constexpr int KS = 16;
    static constexpr bool TILE = true;  // a bf16 tile made from each stage
    static constexpr int SMEM = TC_SMEM_F32 + TILE_H * 2;
};

// Operands rounded to tf32, 16x16x8 fragments loaded from the f32 stage and rounded there.
struct PrecTf32 {
    typedef wmma::precision::tf32 F;
    static constexpr int KS = 8;
    static constexpr bool TILE = false;
    static constexpr int SMEM = TC_SMEM_F32;
};

static_assert(PrecBf16::SMEM + 4 * TBN <= 48 * 1024, "static shared memory: at most 48 KiB per block");

template <bool COL>
struct BLayout {
    typedef wmma::row_major T;
};
template <>
struct BLayout<true> {
    typedef wmma::col_major T;
};

template <class P>
struct Acc {
    wmma::fragment<wmma::accumulator, 16, 16, P::KS, float> f[2][2];
};

// This warp's 32x32 of the block tile times one K tile: A [TBM][lda] and B ([TBK][ldb], or
// [TBN][ldb] when BCOL) of element type E (float: tf32, rounded here; bf16).
template <class P, bool BCOL, class E>
__device__ __forceinline__ void tc_tile(const E* As, int lda, const E* Bs, int ldb, Acc<P>& acc, int wm, int wn) {
#pragma unroll
    for (int kk = 0; kk < TBK; kk += P::KS) {
        wmma::fragment<wmma::matrix_a, 16, 16, P::KS, typename P::F, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, P::KS, typename P::F, typename BLayout<BCOL>::T> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + 16 * i) * lda + kk, lda);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const E* b = BCOL ? Bs + (wn * 32 + 16 * j) * ldb + kk : Bs + kk * ldb + wn * 32 + 16 * j;
            wmma::load_matrix_sync(fb[j], b, ldb);
        }
        if constexpr (!P::TILE) {
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
    }
}

// 8 consecutive f32 of shared memory rounded to bf16 (16-byte-aligned source).
__device__ __forceinline__ void bf16x8(const float* s, __nv_bfloat16* d) {
    const float4 a = *(const float4*)s, b = *(const float4*)(s + 4);
    __nv_bfloat162* o = (__nv_bfloat162*)d;
    o[0] = __floats2bfloat162_rn(a.x, a.y);
    o[1] = __floats2bfloat162_rn(a.z, a.w);
    o[2] = __floats2bfloat162_rn(b.x, b.y);
    o[3] = __floats2bfloat162_rn(b.z, b.w);
}

// One f32 stage into the bf16 tile, 8 elements of A and 8 of B per thread.
template <bool BCOL>
__device__ __forceinline__ void stage_to_bf16(const float* st, __nv_bfloat16* h, int tid) {
    constexpr int CH = TBK / 8;  // 8-element chunks per row of A
    bf16x8(st + (tid / CH) * LDF + (tid % CH) * 8, h + (tid / CH) * LDH + (tid % CH) * 8);
    const float* sb = st + TBM * LDF;
    __nv_bfloat16* hb = h + TBM * LDH;
    if (BCOL)
        bf16x8(sb + (tid / CH) * LDF + (tid % CH) * 8, hb + (tid / CH) * LDH + (tid % CH) * 8);
    else
        bf16x8(sb + (tid / 8) * LDFB + (tid % 8) * 8, hb + (tid / 8) * LDHB + (tid % 8) * 8);
}

// One 4-byte cp.async: *src, or 0 without reading when !ok (src must still be a valid
// address: callers pass the tensor's base then).
__device__ __forceinline__ void cp4(float* dst, const float* src, bool ok) {
    __pipeline_memcpy_async(dst, src, 4, ok ? 0 : 4);
}

// The K loop of every kernel: `ntiles` K tiles, tile t gathered by issue(A stage, B stage,
// t) as cp.async copies (8 per thread into each), multiplied into acc. Ends with the
// stages free for the epilogue.
template <class P, bool BCOL, class Issue>
__device__ __forceinline__ void tc_mainloop(unsigned char* smem, int ntiles, Issue issue, Acc<P>& acc, int wm,
                                            int wn) {
    float* st = (float*)smem;
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ntiles) issue(st + s * STAGE_FLOATS, st + s * STAGE_FLOATS + TBM * LDF, s);
        __pipeline_commit();
    }
    for (int t = 0; t < ntiles; ++t) {
        // Tile t's group is complete (the newest STAGES-2 may not be) and, after the
        // barrier, everyone's; everyone is done with tile t-1's stage, which is refilled.
        __pipeline_wait_prior(TC_STAGES - 2);
        __syncthreads();
        const int nt = t + TC_STAGES - 1;
        if (nt < ntiles) {
            float* s = st + (nt % TC_STAGES) * STAGE_FLOATS;
            issue(s, s + TBM * LDF, nt);
        }
        __pipeline_commit();
        const float* cur = st + (t % TC_STAGES) * STAGE_FLOATS;
        if constexpr (P::TILE) {
            __nv_bfloat16* h = (__nv_bfloat16*)(smem + TC_SMEM_F32);
            stage_to_bf16<BCOL>(cur, h, threadIdx.x);
            __syncthreads();
            tc_tile<P, BCOL>(h, LDH, h + TBM * LDH, BCOL ? LDH : LDHB, acc, wm, wn);
        } else {
            tc_tile<P, BCOL>(cur, LDF, cur + TBM * LDF, BCOL ? LDF : LDFB, acc, wm, wn);
        }
    }
    __pipeline_wait_prior(0);
    __syncthreads();
}

template <class P>
__device__ __forceinline__ void tc_zero(Acc<P>& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc.f[i][j], 0.0f);
}

// The block's 64x64 f32 result into shared memory (row m, column n at m*TC_LDC + n); the
// caller synchronised after the last use of the operand tiles.
template <class P>
__device__ __forceinline__ void tc_store(float* Cs, const Acc<P>& acc, int wm, int wn) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Cs + (wm * 32 + 16 * i) * TC_LDC + wn * 32 + 16 * j, acc.f[i][j], TC_LDC,
                                    wmma::mem_row_major);
    __syncthreads();
}

// The data gradient by output phase, as in kernels/conv.cu (the same struct and function:
// the kernel files are compiled separately). For stride s the input pixels split into s*s
// phases (py, px) = ((ih + pad) % s, (iw + pad) % s); a phase receives only the taps
// kh = py + a*s, kw = px + b*s, and dx[ci, ihs + i*s, iws + j*s] = sum over co, a, b of
// w[co, ci, kh, kw] * dy[co, oh0 + i - a, ow0 + j - b]: a dense GEMM without the
// structurally zero products. The grid's x holds s*s runs of `tiles` blocks, one per phase.
struct PhaseGemm {
    int tile;        // this block's tile of the phase's pixels
    int py, px;      // the phase: (ih + pad) % stride, (iw + pad) % stride
    int ihs, iws;    // its first input row / column
    int Hp, Wp;      // its rows / columns of input pixels
    int KWp, KP;     // its taps along kw, and in all (KHp * KWp)
    int oh0, ow0;    // dy row / column of pixel (ihs, iws) and tap (py, px)
};

__device__ __forceinline__ PhaseGemm phase_gemm(int N, int H, int W, int KH, int KW, int s, int pad, int bn) {
    PhaseGemm g;
    const int tiles = (N * ((H + s - 1) / s) * ((W + s - 1) / s) + bn - 1) / bn;
    const int phase = blockIdx.x / tiles;
    g.tile = blockIdx.x - phase * tiles;
    g.py = phase / s;
    g.px = phase - g.py * s;
    g.ihs = ((g.py - pad) % s + s) % s;
    g.iws = ((g.px - pad) % s + s) % s;
    g.Hp = g.ihs < H ? (H - g.ihs + s - 1) / s : 0;
    g.Wp = g.iws < W ? (W - g.iws + s - 1) / s : 0;
    const int KHp = g.py < KH ? (KH - g.py + s - 1) / s : 0;
    g.KWp = g.px < KW ? (KW - g.px + s - 1) / s : 0;
    g.KP = KHp * g.KWp;
    g.oh0 = (g.ihs + pad - g.py) / s;
    g.ow0 = (g.iws + pad - g.px) / s;
    return g;
}

// The fused eval-mode epilogue of the forward, as in kernels/conv.cu: y = act(acc * scale[c]
// + shift[c] (+ residual[i])), ss = {scale[0..C), shift[0..C)} (bn_eval_fold in norm.cu),
// each step rounded on its own (no FMA contraction) as the CPU reference rounds it.
// bn_epilogue_v: the same on a residual value the caller read (has_res: there is one), for
// the kernels whose residual is not f32 (the bf16-storage forward).
__device__ __forceinline__ float bn_epilogue_v(float acc, const float* __restrict__ ss, int C, int c, bool has_res,
                                               float r, int relu) {
    float v = __fadd_rn(__fmul_rn(acc, ss[c]), ss[C + c]);
    if (has_res) v = __fadd_rn(v, r);
    return relu ? fmaxf(v, 0.0f) : v;
}
__device__ __forceinline__ float bn_epilogue(float acc, const float* __restrict__ ss, int C, int c,
                                             const float* __restrict__ res, size_t i, int relu) {
    return bn_epilogue_v(acc, ss, C, c, res != nullptr, res ? res[i] : 0.0f, relu);
}

// The epilogues of the forward GEMM, as in kernels/conv.cu.
#define EPI_NONE 0   // y = acc (conv2d_fwd_*)
#define EPI_BN 1     // y = bn_epilogue(acc) (conv2d_fwd_bn_*: eval mode)
#define EPI_STATS 2  // y = acc, and the batch-norm partial statistics (conv2d_fwd_stats_*)

// The forward GEMM; EPI selects the epilogue (EPI_BN and EPI_STATS with one split only: the
// host runs a split-K forward unfused, applying the eval epilogue in conv_splitk_reduce_bn
// and taking the statistics in separate passes). EPI_STATS writes, for every output channel
// m of the block and its tile of pixels t = blockIdx.x (the nv <= 64 valid ones),
// part_s[m * T + t] = sum of y and part_q[m * T + t] = sum of (y - mean_t)^2, mean_t =
// part_s / nv (f64, centred on the tile's mean), T = gridDim.x, from the f32 tile in shared
// memory: thread t sums half a row (32 pixels) in order, the two halves are added by one
// shuffle; bn_stats_finalize (norm.cu) combines the tiles.
template <class P, int EPI = EPI_NONE>
__device__ __forceinline__ void conv_fwd_tc(unsigned char* smem, const float* __restrict__ x,
                                            const float* __restrict__ w, float* __restrict__ y, int N, int C,
                                            int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                                            int OW, int chunk, const float* __restrict__ ss = nullptr,
                                            const float* __restrict__ res = nullptr, int relu = 0,
                                            double* __restrict__ part_s = nullptr,
                                            double* __restrict__ part_q = nullptr) {
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    const int M = CO, KHW = KH * KW, K = C * KHW, OHW = OH * OW, Pn = N * OHW;
    const int m0 = blockIdx.y * TBM, p0 = blockIdx.x * TBN;
    const int kbeg = blockIdx.z * chunk, kend = min(K, kbeg + chunk);
    y += (size_t)blockIdx.z * N * CO * OHW;

    // B tile: this thread's fixed pixel column, rows bk + 2q.
    const int bn = tid & 63, bk = tid >> 6;
    const int p = p0 + bn;
    const bool p_ok = p < Pn;
    int ih0 = 0, iw0 = 0;
    const float* xb = x;
    if (p_ok) {
        int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
        ih0 = oh * stride - pad;
        iw0 = ow * stride - pad;
        xb = x + (size_t)n * C * H * W;
    }
    // A tile (weights, contiguous along k): column ak, rows am + 8q.
    const int ak = tid % TBK, am = tid / TBK;

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = kbeg + t * TBK;
        const int ka = k0 + ak;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            const int m = m0 + am + 8 * q;
            const bool ok = m < M && ka < kend;
            cp4(As + (am + 8 * q) * LDF + ak, ok ? w + (size_t)m * K + ka : w, ok);
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            const int k = k0 + bk + 2 * q;
            const float* src = x;
            bool ok = p_ok && k < kend;
            if (ok) {
                int ci = k / KHW, rr = k - ci * KHW, kh = rr / KW, kw = rr - kh * KW;
                int ih = ih0 + kh, iw = iw0 + kw;
                ok = ih >= 0 && ih < H && iw >= 0 && iw < W;
                if (ok) src = xb + ((size_t)ci * H + ih) * W + iw;
            }
            cp4(Bs + (bk + 2 * q) * LDFB + bn, src, ok);
        }
    };

    Acc<P> acc;
    tc_zero(acc);
    tc_mainloop<P, false>(smem, kend > kbeg ? (kend - kbeg + TBK - 1) / TBK : 0, issue, acc, wm, wn);
    float* Cs = (float*)smem;
    tc_store(Cs, acc, wm, wn);
    if constexpr (EPI == EPI_STATS) {
        const int row = tid >> 1, half = tid & 1, m = m0 + row;
        const int nv = min(TBN, Pn - p0);
        const int lo = half * (TBN / 2), hi = min(nv, lo + TBN / 2);
        const float* cr = Cs + row * TC_LDC;
        double sum = 0.0;
        for (int k = lo; k < hi; ++k) sum += (double)cr[k];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        const double mean = sum / (double)nv;
        double q = 0.0;
        for (int k = lo; k < hi; ++k) {
            const double d = (double)cr[k] - mean;
            q += d * d;
        }
        q += __shfl_xor_sync(0xffffffffu, q, 1);
        if (half == 0 && m < M) {
            part_s[(size_t)m * gridDim.x + blockIdx.x] = sum;
            part_q[(size_t)m * gridDim.x + blockIdx.x] = q;
        }
    }
    if (!p_ok) return;
    const int n = p / OHW, r = p - n * OHW;
#pragma unroll 4
    for (int i = 0; i < TBM / 2; ++i) {
        int ml = bk + 2 * i, m = m0 + ml;
        if (m >= M) continue;
        const size_t o = ((size_t)n * CO + m) * OHW + r;
        if constexpr (EPI == EPI_BN)
            y[o] = bn_epilogue(Cs[ml * TC_LDC + bn], ss, CO, m, res, o, relu);
        else
            y[o] = Cs[ml * TC_LDC + bn];
    }
}

// The data gradient of one output phase (PhaseGemm): the structurally zero taps of a
// stride > 1 are not in its K = C_out * KP.
template <class P>
__device__ __forceinline__ void conv_bwd_data_tc(unsigned char* smem, const float* __restrict__ dy,
                                                 const float* __restrict__ w, float* __restrict__ dx, int N,
                                                 int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                                 int OH, int OW, int chunk) {
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    const PhaseGemm ph = phase_gemm(N, H, W, KH, KW, stride, pad, TBN);
    const int M = C, K = CO * ph.KP, HWp = ph.Hp * ph.Wp, OHW = OH * OW, Pn = N * HWp;
    const int m0 = blockIdx.y * TBM, p0 = ph.tile * TBN;
    if (p0 >= Pn) return;  // the whole block: this phase has fewer pixels than the largest
    const int kbeg = blockIdx.z * chunk, kend = min(K, kbeg + chunk);
    dx += (size_t)blockIdx.z * N * C * H * W;

    // B tile: this thread's fixed input-pixel column, rows bk + 2q; dy row oh = ohb - a,
    // column ow = owb - b for tap (py + a*stride, px + b*stride).
    const int bn = tid & 63, bk = tid >> 6;
    const int p = p0 + bn;
    const bool p_ok = p < Pn;
    int ohb = 0, owb = 0;
    const float* dyb = dy;
    if (p_ok) {
        int n = p / HWp, r = p - n * HWp, i = r / ph.Wp;
        ohb = ph.oh0 + i;
        owb = ph.ow0 + r - i * ph.Wp;
        dyb = dy + (size_t)n * CO * OHW;
    }
    // A[ci][(co,a,b)] = w[co][ci][py + a*stride][px + b*stride]: column ak, rows am + 8q.
    const int ak = tid % TBK, am = tid / TBK;

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = kbeg + t * TBK;
        const int ka = k0 + ak;
        const bool ka_ok = ka < kend;
        const float* wk = w;
        if (ka_ok) {
            int co = ka / ph.KP, rr = ka - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
            wk = w + (size_t)co * C * KH * KW + (ph.py + a * stride) * KW + ph.px + b * stride;
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            const int m = m0 + am + 8 * q;
            const bool ok = m < M && ka_ok;
            cp4(As + (am + 8 * q) * LDF + ak, ok ? wk + (size_t)m * KH * KW : w, ok);
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            const int k = k0 + bk + 2 * q;
            const float* src = dy;
            bool ok = p_ok && k < kend;
            if (ok) {
                int co = k / ph.KP, rr = k - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
                int oh = ohb - a, ow = owb - b;
                ok = oh >= 0 && oh < OH && ow >= 0 && ow < OW;
                if (ok) src = dyb + ((size_t)co * OH + oh) * OW + ow;
            }
            cp4(Bs + (bk + 2 * q) * LDFB + bn, src, ok);
        }
    };

    Acc<P> acc;
    tc_zero(acc);
    tc_mainloop<P, false>(smem, kend > kbeg ? (kend - kbeg + TBK - 1) / TBK : 0, issue, acc, wm, wn);
    float* Cs = (float*)smem;
    tc_store(Cs, acc, wm, wn);
    if (!p_ok) return;
    const int n = p / HWp, r = p - n * HWp, i = r / ph.Wp;
    const size_t pix = (size_t)(ph.ihs + i * stride) * W + ph.iws + (r - i * ph.Wp) * stride;
#pragma unroll 4
    for (int q = 0; q < TBM / 2; ++q) {
        int ml = bk + 2 * q, m = m0 + ml;
        if (m < M) dx[((size_t)n * C + m) * H * W + pix] = Cs[ml * TC_LDC + bn];
    }
}

// dW[co][(ci,kh,kw)]; out = dw when gridDim.z == 1, else the workspace [splits][CO][C*KH*KW].
template <class P>
__device__ __forceinline__ void conv_bwd_weight_tc(unsigned char* smem, int* colinfo,
                                                   const float* __restrict__ x, const float* __restrict__ dy,
                                                   float* __restrict__ out, int N, int C, int H, int W, int CO,
                                                   int KH, int KW, int stride, int pad, int OH, int OW,
                                                   int chunk) {
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    const int M = CO, KHW = KH * KW, NC = C * KHW, OHW = OH * OW, K = N * OHW;
    const int m0 = blockIdx.y * TBM, c0 = blockIdx.x * TBN;
    // 64-bit bounds: kbeg + chunk can pass INT_MAX on the last split.
    const long long kbeg = (long long)blockIdx.z * chunk;
    const long long kend = min((long long)K, kbeg + chunk);

    // The block's 64 (ci, kh, kw) columns, decoded once: ci in the high bits, kh, kw in
    // 8 bits each (KH, KW <= 255, checked on the host); -1 past the end.
    if (tid < TBN) {
        int c = c0 + tid;
        int v = -1;
        if (c < NC) {
            int ci = c / KHW, rr = c - ci * KHW, kh = rr / KW;
            v = (ci << 16) | (kh << 8) | (rr - kh * KW);
        }
        colinfo[tid] = v;
    }
    __syncthreads();

    // Both tiles are gathered with the reduction index (pixel) fastest: k = tid % TBK;
    // A rows (co) and B columns (ci,kh,kw) lr + 8q.
    const int lk = tid % TBK, lr = tid / TBK;

    auto issue = [&](float* As, float* Bs, int t) {
        const long long kk = kbeg + (long long)t * TBK + lk;
        const bool k_ok = kk < kend;
        int n = 0, oh = 0, ow = 0, r = 0;
        if (k_ok) {
            int k = (int)kk;
            n = k / OHW;
            r = k - n * OHW;
            oh = r / OW;
            ow = r - oh * OW;
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            const int m = m0 + lr + 8 * q;
            const bool ok = k_ok && m < M;
            cp4(As + (lr + 8 * q) * LDF + lk, ok ? dy + ((size_t)n * CO + m) * OHW + r : dy, ok);
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            const int info = colinfo[lr + 8 * q];
            const float* src = x;
            bool ok = k_ok && info >= 0;
            if (ok) {
                int ci = info >> 16, kh = (info >> 8) & 255, kw = info & 255;
                int ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
                ok = ih >= 0 && ih < H && iw >= 0 && iw < W;
                if (ok) src = x + (((size_t)n * C + ci) * H + ih) * W + iw;
            }
            cp4(Bs + (lr + 8 * q) * LDF + lk, src, ok);
        }
    };

    Acc<P> acc;
    tc_zero(acc);
    tc_mainloop<P, true>(smem, kend > kbeg ? (int)((kend - kbeg + TBK - 1) / TBK) : 0, issue, acc, wm, wn);
    float* Cs = (float*)smem;
    tc_store(Cs, acc, wm, wn);
    float* o = out + (size_t)blockIdx.z * M * NC;
    const int cl = tid & 63, c = c0 + cl;
    if (c >= NC) return;
#pragma unroll 4
    for (int i = 0; i < TBM / 2; ++i) {
        int ml = (tid >> 6) + 2 * i, m = m0 + ml;
        if (m < M) o[(size_t)m * NC + c] = Cs[ml * TC_LDC + cl];
    }
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[PrecBf16::SMEM];
    conv_fwd_tc<PrecBf16>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[PrecTf32::SMEM];
    conv_fwd_tc<PrecTf32>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

// The output size of a convolution (the fused kernels take no OH, OW: 16 parameters at most).
__device__ __forceinline__ int conv_out(int H, int K, int stride, int pad) {
    return (H + 2 * pad - K) / stride + 1;
}

// The forward with the eval-mode batch-norm epilogue (bn_epilogue), one split (a grid of
// (pixel tiles, channel tiles, 1)): ss = {scale, shift} per output channel, res the
// residual (same shape as y) or null, relu 0/1.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_bn_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                   int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                   const float* __restrict__ ss, const float* __restrict__ res, int relu) {
    __shared__ __align__(128) unsigned char smem[PrecBf16::SMEM];
    conv_fwd_tc<PrecBf16, EPI_BN>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, conv_out(H, KH, stride, pad),
                                  conv_out(W, KW, stride, pad), C * KH * KW, ss, res, relu);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_bn_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                   int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                   const float* __restrict__ ss, const float* __restrict__ res, int relu) {
    __shared__ __align__(128) unsigned char smem[PrecTf32::SMEM];
    conv_fwd_tc<PrecTf32, EPI_BN>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, conv_out(H, KH, stride, pad),
                                  conv_out(W, KW, stride, pad), C * KH * KW, ss, res, relu);
}

// The forward that also writes the batch-norm partial statistics of y per (channel, pixel
// tile) (EPI_STATS), one split: part_s, part_q hold C_out * gridDim.x values each.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_stats_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                      int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                      double* __restrict__ part_s, double* __restrict__ part_q) {
    __shared__ __align__(128) unsigned char smem[PrecBf16::SMEM];
    conv_fwd_tc<PrecBf16, EPI_STATS>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad,
                                     conv_out(H, KH, stride, pad), conv_out(W, KW, stride, pad), C * KH * KW,
                                     nullptr, nullptr, 0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_stats_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                      int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                      double* __restrict__ part_s, double* __restrict__ part_q) {
    __shared__ __align__(128) unsigned char smem[PrecTf32::SMEM];
    conv_fwd_tc<PrecTf32, EPI_STATS>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad,
                                     conv_out(H, KH, stride, pad), conv_out(W, KW, stride, pad), C * KH * KW,
                                     nullptr, nullptr, 0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_data_bf16(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                     int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[PrecBf16::SMEM];
    conv_bwd_data_tc<PrecBf16>(smem, dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_data_tf32(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                     int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[PrecTf32::SMEM];
    conv_bwd_data_tc<PrecTf32>(smem, dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_weight_bf16(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out, int N,
                       int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                       int chunk) {
    __shared__ __align__(128) unsigned char smem[PrecBf16::SMEM];
    __shared__ int colinfo[TBN];
    conv_bwd_weight_tc<PrecBf16>(smem, colinfo, x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS_WEIGHT_TF32)
conv2d_bwd_weight_tf32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out, int N,
                       int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                       int chunk) {
    __shared__ __align__(128) unsigned char smem[PrecTf32::SMEM];
    __shared__ int colinfo[TBN];
    conv_bwd_weight_tc<PrecTf32>(smem, colinfo, x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

// ==== The large layers: mma.sync, 128x128 block tiles, dynamic shared memory ============
//
// The same three GEMMs for the layers whose 128x128 tile grid fills the GPU (conv.rs,
// `mma_route`, `mma_route_weight`), with inline PTX instead of WMMA: at bf16 the fragments
// are loaded from shared memory by ldmatrix (m8n8.x4; B with .trans) in the documented
// per-lane layouts and multiplied by mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32; at
// tf32 they are read from the f32 stage element by element in the m16n8k8 layout, rounded
// (cvt.rna), and multiplied by mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32. Block tile
// 128x128, K tile 32, 256 threads = 8 warps in 2 (M) x 4 (N), each warp 64x32 = 4 x 4 m16n8
// accumulators (64 f32 per thread). The operands go from global to shared memory by cp.async
// into a ring of MMA_STAGES f32 stages (mma_mainloop, as tc_mainloop), with 16-byte copies
// where the source is contiguous and 16-byte aligned (`vec`, decided per launch on the host
// from the shapes and the pointers, conv.rs: forward bit 0 the weights' rows, K % 4 == 0, bit
// 1 the activations of a 1x1 stride-1 unpadded conv, whose im2col rows are contiguous pixels,
// H*W % 4 == 0; data gradient bit 1 dy for the same convs; weight gradient bit 0 dy, whose
// rows are the reduction's pixels, OH*OW % 4 == 0), 4-byte copies otherwise. At bf16 each
// stage is rounded by one pass of the block into a bf16 tile (one more barrier), whose rows
// are padded by 16 bytes (A: 80-byte rows, B: 272-byte rows) so that the 8 row addresses of
// every ldmatrix phase fall in 8 different 16-byte bank groups: conflict-free without a
// swizzle. 122 KiB (bf16) or 103.5 KiB (tf32) of shared memory per block: dynamic, launched
// with the opt-in above 48 KiB (launch.rs). The forward and the data gradient are one split
// (a layer that fills the GPU with 128x128 tiles needs none); the weight gradient is split
// over K like conv_bwd_weight_tc. The forward's epilogues are the WMMA forward's (EPI_NONE,
// EPI_BN with bn_epilogue, EPI_STATS per 64-pixel tile, the layout conv.rs's STATS_TILE
// gives: each block writes its two tiles), through an f32 tile in shared memory (mma_store).

// The PTX primitives, one wrapper per instruction. Under the emulated driver (ICHCAM_CUDA_EMU)
// emu/shim/emu_mma.h defines the same functions with the ISA's per-lane layouts: the one
// conditional of the kernel files, because g++ cannot compile the asm.
#ifndef ICHCAM_CUDA_EMU
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ptx_ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ptx_ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ptx_mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                      const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void ptx_mma_tf32_m16n8k8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                     const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif

#define MBM 128
#define MBN 128
#define MBK 32
#define MMA_STAGES 3
// The shallow ring of the NCHW kernels (`_s2`): what fits the 99 KiB (101,376 bytes) a block
// of sm_86 / sm_89 may opt into. The ring's depth only changes how many K tiles are in flight,
// never the order in which they are multiplied: the same results bit for bit.
#define MMA_STAGES_99K 2
#define SMEM_99K 101376
#define MMA_THREADS 256
// f32 stage: A [MBM][MLDA] (row m, column k), B [MBK][MLDB] (row k, column n): 16-byte rows.
#define MLDA (MBK + 4)
#define MLDB (MBN + 4)
#define MSTAGE_FLOATS (MBM * MLDA + MBK * MLDB)
#define MMA_SMEM_F32 (MMA_STAGES * MSTAGE_FLOATS * 4)
// bf16 tile after the stages: A [MBM][MLDAH], B [MBK][MLDBH], rows padded by 16 bytes.
#define MLDAH (MBK + 8)
#define MLDBH (MBN + 8)
#define MMA_SMEM (MMA_SMEM_F32 + (MBM * MLDAH + MBK * MLDBH) * 2)
#define MLDC (MBN + 4)

// The B operand's layout in shared memory (a template parameter of mma_tile, mma_tile_tf32,
// mma_mainloop and mma_store): [MBK][MBN], row k and column n (NK false: the NCHW kernels,
// whose im2col rows are runs of pixels), or [MBN][MBK], row n and column k like A (NK true:
// the channels-last forward, whose K run of one pixel is contiguous channels), with A's
// pitches (f32 MLDA, bf16 MLDAH); with NK the epilogue's f32 tile is [MBN][MLDC] (row n,
// column m) too, so that it is read along m for NHWC's channel-contiguous stores.
// AT (mma_tile, mma_tile_tf32, mma_mainloop; default false): A is stored transposed,
// [MBK][MBM] with B's non-NK pitches (f32 MLDB, bf16 MLDBH), row k and column m (the
// channels-last weight gradient, whose A = dy has its channels contiguous per pixel).
// BM, BN (default 128 x 128): the block tile (MmaTile), another than 128 x 128 only with NK
// (the channels-last kernels' 64 x 256 tile). S (default MMA_STAGES): the ring's depth (the
// `_s2` kernels: MMA_STAGES_99K, for devices of 99 KiB per block).
template <bool NK, bool AT = false, int BM = MBM, int BN = MBN, int S = MMA_STAGES>
struct MmaB {
    static_assert((BM == MBM && BN == MBN) || (NK && !AT), "other tiles: the channels-last layout only");
    enum : int {
        A_F32 = AT ? MBK * MLDB : BM * MLDA,                  // floats of A in a stage
        A_H = AT ? MBK * MLDBH : BM * MLDAH,                  // bf16 of A in the bf16 tile
        STAGE = A_F32 + (NK ? BN * MLDA : MBK * MLDB),        // floats per stage: A, then B
        SMEM_F32 = S * STAGE * 4,                             // bytes of the f32 ring
        SMEM = SMEM_F32 + (A_H + (NK ? BN * MLDAH : MBK * MLDBH)) * 2,  // and the bf16 tile
    };
};

// The block tile of the mma kernels: BM rows of the GEMM's M (output channels: C_out of a
// forward, C_in of a data gradient) x BN pixels, 8 warps of 64x32 each, BM / 64 of them along
// m and WN = BN / 32 along n (warp w at (w >> WN_SHIFT, w % WN)). 128 x 128 for every kernel;
// the channels-last kernels (forwards and data gradient, f32 and bf16 storage) also run
// 64 x 256 (BM = 64, `_m64`), which conv.rs launches where M <= 64: a 128-row tile would leave
// half of its rows, and of its MMAs, empty; 64 x 256 does the same MMAs per block, all on
// rows that exist. The epilogue's f32 tile [BN][LDC] (NHWC, transposed) or [BM][LDC].
template <int BM>
struct MmaTile {
    static_assert(BM == 128 || BM == 64, "the tiles: 128 x 128, 64 x 256");
    enum : int {
        BN = MBM * MBN / BM,
        WN = BN / 32,
        WN_SHIFT = BM == 128 ? 2 : 3,
        M_SHIFT = BM == 128 ? 7 : 6,  // log2(BM)
        LDC = BM + 4,
    };
    static_assert((1 << WN_SHIFT) == WN && (1 << M_SHIFT) == BM && (BM / 64) * WN * 32 == MMA_THREADS,
                  "8 warps of 64x32");
};
static_assert(MmaTile<MBM>::LDC == MLDC && MmaTile<MBM>::BN == MBN, "the 128 x 128 tile");

static_assert(MBM * MLDC * 4 <= MMA_SMEM_F32 && MBN * MLDC * 4 <= MmaB<true>::SMEM_F32,
              "the epilogue's f32 tile fits in the stages");
static_assert(MBM * MBK == 16 * MMA_THREADS && MBK * MBN == 16 * MMA_THREADS, "16 elements of A and of B per thread");
static_assert((MLDAH * 2) % 16 == 0 && (MLDAH * 2 / 16) % 2 == 1, "A's bf16 rows: an odd number of 16-byte units");
static_assert((MLDBH * 2) % 16 == 0 && (MLDBH * 2 / 16) % 2 == 1, "B's bf16 rows: an odd number of 16-byte units");
static_assert(MmaB<true>::SMEM <= 227 * 1024 - 4 * 1024, "the opt-in limit of sm_90 (and the pixel table)");
static_assert(MmaB<false>::SMEM == MMA_SMEM && MmaB<false>::SMEM_F32 == MMA_SMEM_F32, "the NCHW layout");
// The NCHW kernels' 2-stage ring (`_s2`): 69 KiB of f32 stages (+ 18.5 KiB of bf16 tile),
// under 99 KiB; the epilogue's f32 tile (66 KiB) still fits over the stages.
typedef MmaB<false, false, MBM, MBN, MMA_STAGES_99K> MmaBNchw99k;
static_assert(MmaBNchw99k::SMEM == 89600 && MmaBNchw99k::SMEM_F32 == 70656, "conv.rs's shared_memory (NCHW, _s2)");
static_assert(MmaBNchw99k::SMEM <= SMEM_99K && MBM * MLDC * 4 <= MmaBNchw99k::SMEM_F32, "the _s2 ring: 99 KiB");

extern __shared__ __align__(128) unsigned char mma_smem[];

// The bytes of dynamic shared memory of the bf16 and the tf32 mma kernels (conv.rs asks for
// the same, mma_smem): tf32 has no bf16 tile. The channels-last forward's B stage is
// [MBN][MLDA] instead of [MBK][MLDB].
static_assert(MMA_SMEM == 124928 && MMA_SMEM_F32 == 105984, "conv.rs's mma_smem");
static_assert(MmaB<true>::SMEM == 131072 && MmaB<true>::SMEM_F32 == 110592, "conv.rs's mma_smem (NHWC)");
// The 64 x 256 channels-last tile: A [64][MLDA], B [256][MLDA] per stage (45 KiB), and the
// bf16 tile; with the pixel table (4 KiB) under the opt-in limit of sm_90.
typedef MmaB<true, false, 64, 256> MmaBNhwc64;
static_assert(MmaBNhwc64::SMEM == 163840 && MmaBNhwc64::SMEM_F32 == 138240, "conv.rs's mma_smem_nhwc (64 x 256)");
static_assert(MmaBNhwc64::SMEM <= 227 * 1024 - 4 * 1024, "the opt-in limit of sm_90 (and the pixel table)");
static_assert(256 * MmaTile<64>::LDC * 4 <= MmaBNhwc64::SMEM_F32, "the epilogue's f32 tile fits in the stages");
// The channels-last f32-storage forwards' and data gradients' 2-stage rings (`_s2`, for 99 KiB
// per block: sm_86, sm_89): 128 x 128 at bf16 and tf32 (92 / 72 KiB + the 2 KiB pixel table),
// 64 x 256 at tf32 (90 KiB + 4 KiB); the 3-stage rings do not fit, nor does 64 x 256 at bf16
// with 2 stages (115 KiB + 4 KiB: there the 128 x 128 `_s2` runs, conv.rs).
typedef MmaB<true, false, MBM, MBN, MMA_STAGES_99K> MmaBNhwc99k;
typedef MmaB<true, false, 64, 256, MMA_STAGES_99K> MmaBNhwc64_99k;
static_assert(MmaBNhwc99k::SMEM == 94208 && MmaBNhwc99k::SMEM_F32 == 73728 && MmaBNhwc64_99k::SMEM_F32 == 92160,
              "conv.rs's shared_memory (NHWC, _s2)");
static_assert(MmaBNhwc99k::SMEM + MBN * 16 <= SMEM_99K && MmaBNhwc64_99k::SMEM_F32 + 256 * 16 <= SMEM_99K,
              "the _s2 rings with their pixel tables: 99 KiB");
static_assert(MmaB<true>::SMEM_F32 + MBN * 16 > SMEM_99K && MmaBNhwc64::SMEM_F32 + 256 * 16 > SMEM_99K &&
                  MmaBNhwc64_99k::SMEM + 256 * 16 > SMEM_99K,
              "no deeper ring (nor 64 x 256 at bf16) fits 99 KiB");
static_assert(MBN * MLDC * 4 <= MmaBNhwc99k::SMEM_F32 && 256 * MmaTile<64>::LDC * 4 <= MmaBNhwc64_99k::SMEM_F32,
              "the epilogue's f32 tile fits in the _s2 stages");

// A tf32 operand: the f32 rounded to nearest, ties away (cvt.rna.tf32.f32, as the WMMA
// kernels round), as the register mma.sync reads.
__device__ __forceinline__ unsigned tf32_bits(float v) { return __float_as_uint(wmma::__float_to_tf32(v)); }

// The B stage of one K tile by 16-byte copies, where the operand's rows are whole images of
// `ohw` contiguous pixels (1x1 stride-1 activations, or dy of one phase): src is
// [images][rows][ohw], ohw % 4 == 0 and src 16-byte aligned (the host's test). Thread tid
// copies pixels p0 + 4 * (tid % 32)..+3 (one image, since ohw % 4 == 0) of rows
// k0 + tid / 32 + 8q, q < 4, into Bs [MBK][ldb]; past the pixels or the rows the zero-fill form.
__device__ __forceinline__ void mma_rows_cp16(float* Bs, int ldb, const float* __restrict__ src, int rows, int ohw,
                                              int p0, int pn, int k0, int kmax, int tid) {
    const int pc = p0 + 4 * (tid & 31);
    const bool pc_ok = pc < pn;
    const float* src0 = src;
    if (pc_ok) {
        const int n = pc / ohw;
        src0 = src + (size_t)n * rows * ohw + (pc - n * ohw);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int kl = (tid >> 5) + 8 * q, k = k0 + kl;
        const bool ok = pc_ok && k < kmax;
        __pipeline_memcpy_async(Bs + kl * ldb + 4 * (tid & 31), ok ? src0 + (size_t)k * ohw : src, 16, ok ? 0 : 16);
    }
}

// The A stage of one K tile of a forward: rows m0.. of the weights [M][K] (row-major, K
// contiguous: OIHW, or for the channels-last forward OHWI), columns k0..k0+31, into As
// [BM][MLDA]; past M or K the zero-fill form. vec: 16-byte copies (K % 4 == 0, w 16-byte
// aligned: the host's test), BM / 32 per thread, row tid / 8 + 32q, columns 4 * (tid % 8);
// else BM / 8 4-byte copies per thread, row tid / 32 + 8q, column tid % 32.
template <int BM = MBM>
__device__ __forceinline__ void mma_weights_cp(float* As, const float* __restrict__ w, int M, int K, int m0, int k0,
                                               bool vec, int tid) {
    if (vec) {
        const int kc = k0 + 4 * (tid & 7);
        const int nk = min(4, max(0, K - kc));
#pragma unroll
        for (int q = 0; q < BM / 32; ++q) {
            const int ml = (tid >> 3) + 32 * q, m = m0 + ml;
            const bool ok = m < M && nk > 0;
            __pipeline_memcpy_async(As + ml * MLDA + 4 * (tid & 7), ok ? w + (size_t)m * K + kc : w, 16,
                                    ok ? 16 - 4 * nk : 16);
        }
    } else {
        const int k = k0 + (tid & 31);
#pragma unroll
        for (int q = 0; q < BM / 8; ++q) {
            const int ml = (tid >> 5) + 8 * q, m = m0 + ml;
            const bool ok = m < M && k < K;
            cp4(As + ml * MLDA + (tid & 31), ok ? w + (size_t)m * K + k : w, ok);
        }
    }
}

// One K tile of the warp's 64x32 at tf32 from the f32 stage (A [MBM][MLDA], B [MBK][MLDB],
// or with NK [MBN][MLDA]): the m16n8k8 fragments read element by element in their documented
// layout (g = lane / 4, t = lane % 4: A (g, t), (g+8, t), (g, t+4), (g+8, t+4); B (k t, n g),
// (k t+4, n g)), no ldmatrix (a 32-bit operand). A's reads are conflict-free (row pitch 36
// words: bank 4g + t), and so are B's with NK (the same pitch and pattern); B's are 2-way
// without (pitch 132: bank 4t + g).
// AT: A is [MBK][MLDB] (row k, column m): the same four elements at (k, m) = (t, g), (t, g+8),
// (t+4, g), (t+4, g+8), 2-way conflicts as B's without NK.
template <bool NK = false, bool AT = false>
__device__ __forceinline__ void mma_tile_tf32(const float* As, const float* Bs, float (&acc)[4][4][4], int wm, int wn,
                                              int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < MBK; ks += 8) {
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (AT) {
                const float* r0 = As + (ks + t) * MLDB + wm * 64 + 16 * i + g;
                a[i][0] = tf32_bits(r0[0]);
                a[i][1] = tf32_bits(r0[8]);
                a[i][2] = tf32_bits(r0[4 * MLDB]);
                a[i][3] = tf32_bits(r0[4 * MLDB + 8]);
            } else {
                const float* r0 = As + (wm * 64 + 16 * i + g) * MLDA + ks + t;
                a[i][0] = tf32_bits(r0[0]);
                a[i][1] = tf32_bits(r0[8 * MLDA]);
                a[i][2] = tf32_bits(r0[4]);
                a[i][3] = tf32_bits(r0[8 * MLDA + 4]);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if constexpr (NK) {
                const float* c0 = Bs + (wn * 32 + 8 * j + g) * MLDA + ks + t;
                b[j][0] = tf32_bits(c0[0]);
                b[j][1] = tf32_bits(c0[4]);
            } else {
                const float* c0 = Bs + (ks + t) * MLDB + wn * 32 + 8 * j + g;
                b[j][0] = tf32_bits(c0[0]);
                b[j][1] = tf32_bits(c0[4 * MLDB]);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) ptx_mma_tf32_m16n8k8(acc[i][j], a[i], b[j], acc[i][j]);
    }
}

// One K tile of the warp's 64x32: A [MBM][MLDAH] and B [MBK][MLDBH] bf16, B's k-pairs loaded
// by ldmatrix.trans; with NK B is [MBN][MLDAH] (rows n, like A), whose non-transposed ldmatrix
// gives the col-major B fragment directly: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15) = b[j][0], b[j][1], b[j+1][0], b[j+1][1], conflict-free
// as A's (80-byte rows). AT: A is [MBK][MLDBH] (row k, column m), loaded by ldmatrix.trans:
// matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15), whose
// transposed registers (m g; k 2t, 2t+1) are a[0..3]; conflict-free as B's (272-byte rows).
template <bool NK = false, bool AT = false>
__device__ __forceinline__ void mma_tile(const __nv_bfloat16* As, const __nv_bfloat16* Bs, float (&acc)[4][4][4], int wm,
                                         int wn, int lane) {
#pragma unroll
    for (int ks = 0; ks < MBK; ks += 16) {
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (AT)
                ptx_ldmatrix_x4_trans(a[i], As + (ks + (lane & 7) + 8 * (lane >> 4)) * MLDBH + wm * 64 + i * 16 +
                                                8 * ((lane >> 3) & 1));
            else
                ptx_ldmatrix_x4(a[i], As + (wm * 64 + i * 16 + (lane & 15)) * MLDAH + ks + 8 * (lane >> 4));
        }
#pragma unroll
        for (int j2 = 0; j2 < 2; ++j2) {
            unsigned q[4];
            if constexpr (NK)
                ptx_ldmatrix_x4(q, Bs + (wn * 32 + j2 * 16 + (lane & 7) + 8 * (lane >> 4)) * MLDAH + ks +
                                       8 * ((lane >> 3) & 1));
            else
                ptx_ldmatrix_x4_trans(q, Bs + (ks + (lane & 15)) * MLDBH + wn * 32 + j2 * 16 + 8 * (lane >> 4));
            b[2 * j2][0] = q[0];
            b[2 * j2][1] = q[1];
            b[2 * j2 + 1][0] = q[2];
            b[2 * j2 + 1][1] = q[3];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) ptx_mma_bf16_m16n8k16(acc[i][j], a[i], b[j], acc[i][j]);
    }
}

// The cp.async ring of the mma kernels: STAGES stages of SE elements of type T from st
// (each A's AE elements, then B), tile t gathered by issue(A, B, t) into stage t % STAGES as
// cp.async copies (or plain shared stores: both are everyone's after the next barrier) and
// multiplied by mul(A, B) once landed: while tile t is multiplied, tiles t+1..t+STAGES-1 are
// in flight, and one __syncthreads per tile frees the stage tile t-1 used (mul may hold more
// barriers of its own). Ends with every copy landed and the stages free.
template <int STAGES, int SE, int AE, class T, class Issue, class Mul>
__device__ __forceinline__ void mma_ring(T* st, int ntiles, Issue issue, Mul mul) {
    static_assert(STAGES >= 2 && STAGES <= 8, "cp.async pipeline depth (wait_prior takes 0..8)");
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) issue(st + s * SE, st + s * SE + AE, s);
        __pipeline_commit();
    }
    for (int t = 0; t < ntiles; ++t) {
        // Tile t's copies are complete and, after the barrier, everyone's; everyone is done
        // with tile t-1 (its stage, and mul's own shared memory), so tile t + STAGES - 1
        // refills its stage.
        __pipeline_wait_prior(STAGES - 2);
        __syncthreads();
        const int nt = t + STAGES - 1;
        if (nt < ntiles) {
            T* s = st + (nt % STAGES) * SE;
            issue(s, s + AE, nt);
        }
        __pipeline_commit();
        const T* cur = st + (t % STAGES) * SE;
        mul(cur, cur + AE);
    }
    __pipeline_wait_prior(0);
    __syncthreads();
}

__device__ __forceinline__ void mma_zero(float (&acc)[4][4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
}

// The K loop of the mma kernels on f32 stages: `ntiles` K tiles, tile t gathered by
// issue(A stage, B stage, t) as cp.async copies into the f32 ring (mma_ring, MMA_STAGES
// deep), then at bf16 rounded into the bf16 tile by the block and multiplied by mma_tile, at
// tf32 (TF32) multiplied from the stage by mma_tile_tf32, into acc (zeroed here); B laid out
// as MmaB<NK> says, A as MmaB<NK, AT> says; the block tile BM x MmaTile<BM>::BN (BM 64: NK
// only); S stages (MmaB's S). Ends with every copy landed and the stages free.
template <bool TF32, bool NK = false, bool AT = false, int BM = MBM, int S = MMA_STAGES, class Issue>
__device__ __forceinline__ void mma_mainloop(unsigned char* smem, int ntiles, Issue issue, float (&acc)[4][4][4]) {
    typedef MmaTile<BM> T;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> T::WN_SHIFT, wn = warp & (T::WN - 1);
    mma_zero(acc);
    typedef MmaB<NK, AT, BM, T::BN, S> L;
    __nv_bfloat16* h = (__nv_bfloat16*)(smem + L::SMEM_F32);
    __nv_bfloat16* hb = h + L::A_H;
    mma_ring<S, L::STAGE, L::A_F32>((float*)smem, ntiles, issue, [&](const float* cur, const float* curb) {
        if constexpr (TF32) {
            mma_tile_tf32<NK, AT>(cur, curb, acc, wm, wn, lane);
        } else {
            // The stage into the bf16 tile: BM / 8 elements of A and BN / 8 of B per thread
            // (16 and 16 for 128 x 128; B's rows of 32 k as A's with NK, of 128 n without; A's
            // rows of 128 m with AT), 8 at a time.
            constexpr int QA = BM * MBK / 8 / MMA_THREADS, QB = T::BN * MBK / 8 / MMA_THREADS;
#pragma unroll
            for (int q = 0; q < (QA > QB ? QA : QB); ++q) {
                const int c = tid + MMA_THREADS * q;
                if (q < QA) {
                    if constexpr (AT)
                        bf16x8(cur + (c >> 4) * MLDB + (c & 15) * 8, h + (c >> 4) * MLDBH + (c & 15) * 8);
                    else
                        bf16x8(cur + (c >> 2) * MLDA + (c & 3) * 8, h + (c >> 2) * MLDAH + (c & 3) * 8);
                }
                if (q < QB) {
                    if constexpr (NK)
                        bf16x8(curb + (c >> 2) * MLDA + (c & 3) * 8, hb + (c >> 2) * MLDAH + (c & 3) * 8);
                    else
                        bf16x8(curb + (c >> 4) * MLDB + (c & 15) * 8, hb + (c >> 4) * MLDBH + (c & 15) * 8);
                }
            }
            __syncthreads();
            mma_tile<NK, AT>(h, hb, acc, wm, wn, lane);
        }
    });
}

// The block's BM x BN f32 result (MmaTile<BM>: 128x128, or 64x256 with NM) into Cs [BM][LDC]
// (over the stages) by the m16n8 C layout: c[e] of fragment (i, j) is row wm*64 + 16i +
// lane/4 + 8(e/2), column wn*32 + 8j + 2(lane%4) + e%2; then a barrier. NM: transposed, Cs
// [BN][LDC] (row n, column m), one float per store: lane (g, t) writes word (2t + e%2) * LDC
// + g (+ constants), bank 8t + g (+ constants) for LDC 132 and 68 alike: conflict-free.
template <bool NM = false, int BM = MBM>
__device__ __forceinline__ void mma_store(float* Cs, const float (&acc)[4][4][4]) {
    typedef MmaTile<BM> T;
    static_assert(NM || BM == MBM, "64 x 256: transposed only");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> T::WN_SHIFT, wn = warp & (T::WN - 1);
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
                const int row = wm * 64 + 16 * i + g + 8 * e2, col = wn * 32 + 8 * j + 2 * tq;
                if constexpr (NM) {
                    Cs[col * T::LDC + row] = acc[i][j][2 * e2];
                    Cs[(col + 1) * T::LDC + row] = acc[i][j][2 * e2 + 1];
                } else {
                    *(float2*)(Cs + row * T::LDC + col) = make_float2(acc[i][j][2 * e2], acc[i][j][2 * e2 + 1]);
                }
            }
    __syncthreads();
}

// The forward, EPI as conv_fwd_tc's; TF32: tf32 operands (m16n8k8), else bf16. `vec`: bit 0 16-byte copies of the weights, bit 1 of
// the activations (see above).
template <bool TF32, int EPI, int S = MMA_STAGES>
__device__ __forceinline__ void conv_fwd_mma(const float* __restrict__ x, const float* __restrict__ w,
                                             float* __restrict__ y, int N, int C, int H, int W, int CO, int KH,
                                             int KW, int stride, int pad, int vec, const float* __restrict__ ss,
                                             const float* __restrict__ res, int relu, double* __restrict__ part_s,
                                             double* __restrict__ part_q) {
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int OH = conv_out(H, KH, stride, pad), OW = conv_out(W, KW, stride, pad);
    const int M = CO, KHW = KH * KW, K = C * KHW, OHW = OH * OW, Pn = N * OHW;
    const int m0 = blockIdx.y * MBM, p0 = blockIdx.x * MBN;
    const bool vec_a = vec & 1, vec_b = vec & 2;

    // B, 4-byte copies: this thread's fixed pixel column bn, rows bk + 2q.
    const int bn = tid & (MBN - 1), bk = tid >> 7;
    const int p = p0 + bn;
    const bool p_ok = p < Pn;
    int ih0 = 0, iw0 = 0;
    const float* xb = x;
    if (p_ok) {
        int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
        ih0 = oh * stride - pad;
        iw0 = ow * stride - pad;
        xb = x + (size_t)n * C * H * W;
    }

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = t * MBK;
        mma_weights_cp(As, w, M, K, m0, k0, vec_a, tid);
        if (vec_b) {
            // 1x1, stride 1, no padding, OHW = H*W % 4 == 0: rows are input channels.
            mma_rows_cp16(Bs, MLDB, x, C, OHW, p0, Pn, k0, K, tid);
        } else {
#pragma unroll
            for (int q = 0; q < 16; ++q) {
                const int kl = bk + 2 * q, k = k0 + kl;
                const float* src = x;
                bool ok = p_ok && k < K;
                if (ok) {
                    int ci = k / KHW, rr = k - ci * KHW, kh = rr / KW, kw = rr - kh * KW;
                    int ih = ih0 + kh, iw = iw0 + kw;
                    ok = ih >= 0 && ih < H && iw >= 0 && iw < W;
                    if (ok) src = xb + ((size_t)ci * H + ih) * W + iw;
                }
                cp4(Bs + kl * MLDB + bn, src, ok);
            }
        }
    };

    float acc[4][4][4];
    mma_mainloop<TF32, false, false, MBM, S>(smem, (K + MBK - 1) / MBK, issue, acc);
    float* Cs = (float*)smem;
    mma_store(Cs, acc);
    if constexpr (EPI == EPI_STATS) {
        // Tiles of 64 pixels (conv.rs: STATS_TILE), T = ceil(Pn / 64) of them; this block has
        // tiles 2*blockIdx.x + half. Thread: row tid / 2, half tid % 2, its 64 values in order.
        const int T = (Pn + 63) / 64;
        const int row = tid >> 1, half = tid & 1, m = m0 + row, tile = 2 * blockIdx.x + half;
        const int nv = min(64, Pn - (p0 + 64 * half));
        if (m < M && nv > 0) {
            const float* cr = Cs + row * MLDC + 64 * half;
            double sum = 0.0;
            for (int k = 0; k < nv; ++k) sum += (double)cr[k];
            const double mean = sum / (double)nv;
            double q = 0.0;
            for (int k = 0; k < nv; ++k) {
                const double d = (double)cr[k] - mean;
                q += d * d;
            }
            part_s[(size_t)m * T + tile] = sum;
            part_q[(size_t)m * T + tile] = q;
        }
    }
    if (!p_ok) return;
    const int n = p / OHW, r = p - n * OHW;
#pragma unroll 4
    for (int i = 0; i < MBM / 2; ++i) {
        const int ml = bk + 2 * i, m = m0 + ml;
        if (m >= M) break;
        const size_t o = ((size_t)n * CO + m) * OHW + r;
        if constexpr (EPI == EPI_BN)
            y[o] = bn_epilogue(Cs[ml * MLDC + bn], ss, CO, m, res, o, relu);
        else
            y[o] = Cs[ml * MLDC + bn];
    }
}


// The data gradient of one output phase (PhaseGemm with 128-pixel tiles; the grid's x holds
// stride^2 runs of tiles), as conv_bwd_data_tc: M = C_in, K = C_out * KP, one split. vec bit
// 1: 16-byte copies of dy, whose rows are contiguous pixels for a 1x1 stride-1 unpadded conv
// with H*W % 4 == 0 (mma_vec in conv.rs); the transposed weights are gathered 4 bytes at a
// time.
template <bool TF32, int S = MMA_STAGES>
__device__ __forceinline__ void conv_bwd_data_mma(const float* __restrict__ dy, const float* __restrict__ w,
                                                  float* __restrict__ dx, int N, int C, int H, int W, int CO,
                                                  int KH, int KW, int stride, int pad, int vec) {
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int OH = conv_out(H, KH, stride, pad), OW = conv_out(W, KW, stride, pad);
    const PhaseGemm ph = phase_gemm(N, H, W, KH, KW, stride, pad, MBN);
    const int M = C, K = CO * ph.KP, HWp = ph.Hp * ph.Wp, OHW = OH * OW, Pn = N * HWp;
    const int m0 = blockIdx.y * MBM, p0 = ph.tile * MBN;
    if (p0 >= Pn) return;  // the whole block: this phase has fewer pixels than the largest
    const bool vec_b = vec & 2;

    // B, 4-byte copies: this thread's fixed input-pixel column bn, rows bk + 2q.
    const int bn = tid & (MBN - 1), bk = tid >> 7;
    const int p = p0 + bn;
    const bool p_ok = p < Pn;
    int ohb = 0, owb = 0;
    const float* dyb = dy;
    if (p_ok) {
        int n = p / HWp, r = p - n * HWp, i = r / ph.Wp;
        ohb = ph.oh0 + i;
        owb = ph.ow0 + r - i * ph.Wp;
        dyb = dy + (size_t)n * CO * OHW;
    }

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = t * MBK;
        // A[ci][(co,a,b)] = w[co][ci][py + a*stride][px + b*stride]: column tid % 32, rows
        // tid / 32 + 8q.
        const int ka = k0 + (tid & 31);
        const bool ka_ok = ka < K;
        const float* wk = w;
        if (ka_ok) {
            int co = ka / ph.KP, rr = ka - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
            wk = w + (size_t)co * C * KH * KW + (ph.py + a * stride) * KW + ph.px + b * stride;
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            const int ml = (tid >> 5) + 8 * q, m = m0 + ml;
            const bool ok = m < M && ka_ok;
            cp4(As + ml * MLDA + (tid & 31), ok ? wk + (size_t)m * KH * KW : w, ok);
        }
        if (vec_b) {
            // One phase, K = C_out, HWp = OHW: rows are output channels.
            mma_rows_cp16(Bs, MLDB, dy, CO, OHW, p0, Pn, k0, K, tid);
        } else {
#pragma unroll
            for (int q = 0; q < 16; ++q) {
                const int kl = bk + 2 * q, k = k0 + kl;
                const float* src = dy;
                bool ok = p_ok && k < K;
                if (ok) {
                    int co = k / ph.KP, rr = k - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
                    int oh = ohb - a, ow = owb - b;
                    ok = oh >= 0 && oh < OH && ow >= 0 && ow < OW;
                    if (ok) src = dyb + ((size_t)co * OH + oh) * OW + ow;
                }
                cp4(Bs + kl * MLDB + bn, src, ok);
            }
        }
    };

    float acc[4][4][4];
    mma_mainloop<TF32, false, false, MBM, S>(smem, (K + MBK - 1) / MBK, issue, acc);
    float* Cs = (float*)smem;
    mma_store(Cs, acc);
    if (!p_ok) return;
    const int n = p / HWp, r = p - n * HWp, i = r / ph.Wp;
    const size_t pix = (size_t)(ph.ihs + i * stride) * W + ph.iws + (r - i * ph.Wp) * stride;
#pragma unroll 4
    for (int q = 0; q < MBM / 2; ++q) {
        const int ml = bk + 2 * q, m = m0 + ml;
        if (m >= M) break;
        dx[((size_t)n * C + m) * H * W + pix] = Cs[ml * MLDC + bn];
    }
}

// dW[co][(ci,kh,kw)] = sum over pixels of dy . col(x): M = C_out, N = C_in*KH*KW, K = batch
// pixels, split over K by blockIdx.z ([z*chunk, (z+1)*chunk), chunk a multiple of MBK) into
// the workspace [splits][C_out][N] that conv_splitk_reduce sums (out = dw with one split).
// vec bit 0: 16-byte copies of dy, whose rows are contiguous pixels of one image when
// OH*OW % 4 == 0; the im2col of x is gathered 4 bytes at a time.
template <bool TF32, int S = MMA_STAGES>
__device__ __forceinline__ void conv_bwd_weight_mma(const float* __restrict__ x, const float* __restrict__ dy,
                                                    float* __restrict__ out, int N, int C, int H, int W, int CO,
                                                    int KH, int KW, int stride, int pad, int OH, int OW,
                                                    int chunk, int vec) {
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int M = CO, KHW = KH * KW, NC = C * KHW, OHW = OH * OW, K = N * OHW;
    const int m0 = blockIdx.y * MBM, c0 = blockIdx.x * MBN;
    // 64-bit bounds: kbeg + chunk can pass INT_MAX on the last split.
    const long long kbeg = (long long)blockIdx.z * chunk;
    const int kend = (int)min((long long)K, kbeg + chunk);
    const bool vec_a = vec & 1;

    // B: this thread's fixed column c = (ci, kh, kw), rows (pixels) bk + 2q.
    const int bn = tid & (MBN - 1), bk = tid >> 7;
    const int c = c0 + bn;
    const bool c_ok = c < NC;
    int ci = 0, kh = 0, kw = 0;
    if (c_ok) {
        ci = c / KHW;
        const int rr = c - ci * KHW;
        kh = rr / KW;
        kw = rr - kh * KW;
    }

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = (int)kbeg + t * MBK;
        if (vec_a) {
            // 4 chunks of 4 pixels per thread: rows (co) tid / 8 + 32q, pixels k0 + 4 * (tid % 8).
            const int kc = k0 + 4 * (tid & 7);
            const int nk = min(4, max(0, kend - kc));
            int n = 0, r = 0;
            if (nk > 0) {
                n = kc / OHW;
                r = kc - n * OHW;
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int ml = (tid >> 3) + 32 * q, m = m0 + ml;
                const bool ok = m < M && nk > 0;
                __pipeline_memcpy_async(As + ml * MLDA + 4 * (tid & 7), ok ? dy + ((size_t)n * CO + m) * OHW + r : dy,
                                        16, ok ? 16 - 4 * nk : 16);
            }
        } else {
            const int k = k0 + (tid & 31);
            const bool k_ok = k < kend;
            int n = 0, r = 0;
            if (k_ok) {
                n = k / OHW;
                r = k - n * OHW;
            }
#pragma unroll
            for (int q = 0; q < 16; ++q) {
                const int ml = (tid >> 5) + 8 * q, m = m0 + ml;
                const bool ok = k_ok && m < M;
                cp4(As + ml * MLDA + (tid & 31), ok ? dy + ((size_t)n * CO + m) * OHW + r : dy, ok);
            }
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            const int kl = bk + 2 * q, k = k0 + kl;
            const float* src = x;
            bool ok = c_ok && k < kend;
            if (ok) {
                const int n = k / OHW, r = k - n * OHW, oh = r / OW, ow = r - oh * OW;
                const int ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
                ok = ih >= 0 && ih < H && iw >= 0 && iw < W;
                if (ok) src = x + (((size_t)n * C + ci) * H + ih) * W + iw;
            }
            cp4(Bs + kl * MLDB + bn, src, ok);
        }
    };

    float acc[4][4][4];
    const int klen = kend > kbeg ? kend - (int)kbeg : 0;
    mma_mainloop<TF32, false, false, MBM, S>(smem, (klen + MBK - 1) / MBK, issue, acc);
    float* Cs = (float*)smem;
    mma_store(Cs, acc);
    float* o = out + (size_t)blockIdx.z * M * NC;
    if (!c_ok) return;
#pragma unroll 4
    for (int i = 0; i < MBM / 2; ++i) {
        const int ml = bk + 2 * i, m = m0 + ml;
        if (m >= M) break;
        o[(size_t)m * NC + c] = Cs[ml * MLDC + bn];
    }
}

// The entries: bf16 (ldmatrix, m16n8k16) and tf32 (m16n8k8).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_mma_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                    int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_fwd_mma<false, EPI_NONE>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr, 0, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                       int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                       const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    conv_fwd_mma<false, EPI_BN>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, ss, res, relu, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                          int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                          double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    conv_fwd_mma<false, EPI_STATS>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr, 0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_mma_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                    int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_fwd_mma<true, EPI_NONE>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr, 0, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                       int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                       const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    conv_fwd_mma<true, EPI_BN>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, ss, res, relu, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                          int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                          double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    conv_fwd_mma<true, EPI_STATS>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr, 0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_bf16(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                         int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_bwd_data_mma<false>(dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_bf16(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out, int N,
                           int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                           int chunk, int vec) {
    conv_bwd_weight_mma<false>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_tf32(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                         int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_bwd_data_mma<true>(dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_tf32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out, int N,
                           int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                           int chunk, int vec) {
    conv_bwd_weight_mma<true>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

// The same entries on the 2-stage ring (`_s2`, MmaBNchw99k: 87.5 KiB at bf16, 69 KiB at
// tf32 of dynamic shared memory), which conv.rs launches where the device cannot give the
// 3-stage ring (99 KiB per block: sm_86, sm_89); the same arithmetic in the same order.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_mma_bf16_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                       int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_fwd_mma<false, EPI_NONE, MMA_STAGES_99K>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr,
                                                  0, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_bf16_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                          int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                          const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    conv_fwd_mma<false, EPI_BN, MMA_STAGES_99K>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, ss, res, relu,
                                                nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_bf16_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                             int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                             double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    conv_fwd_mma<false, EPI_STATS, MMA_STAGES_99K>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr,
                                                   nullptr, 0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_mma_tf32_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                       int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_fwd_mma<true, EPI_NONE, MMA_STAGES_99K>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr,
                                                 0, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_tf32_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                          int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                          const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    conv_fwd_mma<true, EPI_BN, MMA_STAGES_99K>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, ss, res, relu,
                                               nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_tf32_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                             int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                             double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    conv_fwd_mma<true, EPI_STATS, MMA_STAGES_99K>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, vec, nullptr, nullptr,
                                                  0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_bf16_s2(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                            int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_bwd_data_mma<false, MMA_STAGES_99K>(dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_bf16_s2(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                              int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                              int chunk, int vec) {
    conv_bwd_weight_mma<false, MMA_STAGES_99K>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_tf32_s2(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                            int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    conv_bwd_data_mma<true, MMA_STAGES_99K>(dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_tf32_s2(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                              int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                              int chunk, int vec) {
    conv_bwd_weight_mma<true, MMA_STAGES_99K>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

// ==== Channels-last (NHWC) eval forward ==================================================
//
// conv + eval-mode batch norm (+ residual) (+ ReLU) on channels-last activations: x
// [N][H][W][C], residual and y [N][OH][OW][CO], the weights OIHW. The GEMM is the forward's,
// M = CO, N = N*OH*OW pixels, with K = KH*KW*C ordered (kh, kw, c), c fastest, so that a K
// run of one pixel is contiguous channels of x. A = the weights with K in that order: OHWI
// [CO][KH][KW][C], which is the OIHW tensor itself for a 1x1 and otherwise a copy the host
// makes per call into scratch (conv_weight_ohwi below: a 4-byte gather of w[m][c][kh][kw]
// in the tile loop would touch one 32-byte sector per element for a 3x3, 8x the L2 traffic
// of the contiguous rows, on every pixel tile); its copies are mma_weights_cp's. B is staged
// [pixel][k] (MmaB<true>: rows of 32 k like A's) and multiplied by the same mma_mainloop /
// mma_tile (bf16: non-transposed ldmatrix) / mma_tile_tf32 as the NCHW kernels. B's copies
// (vec bit 1, C % 4 == 0 and x 16-byte aligned: the host's test): 16 bytes = 4 channels of one
// tap of one pixel (C % 4 == 0 keeps them in one tap and 16-byte aligned), thread column
// 4 * (tid % 8), pixels tid / 8 + 32q, 4 per thread, a warp copying 4 pixels x 128 bytes;
// otherwise 4-byte copies, column tid % 32, pixels tid / 32 + 8q (a warp: 32 consecutive k of
// one pixel, contiguous in x and in the stage), any C. Outside the image (padding), past K or
// past the pixels: the zero-fill form. The block's pixels are decoded once into `pix` (static
// shared memory) instead of per copy. The epilogue stores the accumulators transposed
// (mma_store<true>: [n][m]) and writes y along m: 32 lanes = 32 consecutive channels of one
// pixel (128 bytes), the f32 tile read conflict-free along its rows. The training forward
// (conv2d_fwd_stats_mma_nhwc_*) is the same kernel with the EPI_STATS epilogue: z = acc, and
// per output channel and 64-pixel tile (pixels in order n, oh, ow: NCHW's order, so the
// partials are conv_fwd_mma's, [c * T + t]) the f64 sum and the sum of squared deviations
// from the tile's mean, from the f32 tile in shared memory: thread = channel tid % 128 and
// tile half tid / 128, a warp reading 32 consecutive channels of one pixel row per step
// (conflict-free), each sum in pixel order.

// One pixel of the block's tile: x's pixel index of (its image, 0, 0) and the input row and
// column of its tap (0, 0); ih0 = iw0 = -2^30 past the pixels, so that every tap is outside.
// out: the data gradient's dx pixel index (nhwc_phase_pixels; unused by the forward).
struct __align__(16) NhwcPixel {
    int base, ih0, iw0, out;
};

// The block's BN pixels p0.. (of Pn, OH*OW = OHW per image) decoded into pix, then a barrier.
template <int BN = MBN>
__device__ __forceinline__ void nhwc_pixels(NhwcPixel* pix, int p0, int Pn, int OHW, int OW, int H, int W,
                                            int stride, int pad) {
    static_assert(BN <= MMA_THREADS, "one pixel per thread");
    const int tid = threadIdx.x;
    if (tid < BN) {
        const int p = p0 + tid;
        NhwcPixel e = {0, -(1 << 30), -(1 << 30), 0};
        if (p < Pn) {
            const int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
            e.base = n * H * W;
            e.ih0 = oh * stride - pad;
            e.iw0 = ow * stride - pad;
        }
        pix[tid] = e;
    }
    __syncthreads();
}

// One thread's copies of B in one K tile: its column k = (tap (kh, kw), channel c) for the NQ
// pixels nl0 + STEP * q of the table; copy(nl, ok, i) with ok = inside the image and k < K,
// i = x's element index of (that pixel's tap, c) where ok, else 0 (padding, past K or past
// the pixels: the caller's zero fill, reading nothing).
template <int NQ, int STEP, class Copy>
__device__ __forceinline__ void nhwc_gather(const NhwcPixel* pix, int nl0, int k, int K, int C, int H, int W, int KW,
                                            Copy copy) {
    const bool k_ok = k < K;
    int c = 0, kh = 0, kw = 0;
    if (k_ok) {
        const int tap = k / C;
        c = k - tap * C;
        kh = tap / KW;
        kw = tap - kh * KW;
    }
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
        const int nl = nl0 + STEP * q;
        const NhwcPixel e = pix[nl];
        const int ih = e.ih0 + kh, iw = e.iw0 + kw;
        const bool ok = k_ok && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
        copy(nl, ok, ok ? (size_t)(e.base + ih * W + iw) * C + c : (size_t)0);
    }
}

// The channels-last forward; EPI_BN (eval: ss, res, relu) or EPI_STATS (training: z = acc and
// part_s, part_q, C_out * T values each, T = ceil(N*OH*OW / 64)); the block tile BM x BN
// (MmaTile: 128 x 128, or 64 x 256 for C_out <= 64), pix BN entries; S stages (the `_s2`
// kernels: MMA_STAGES_99K).
template <bool TF32, int EPI, int BM = MBM, int S = MMA_STAGES>
__device__ __forceinline__ void conv_fwd_mma_nhwc(NhwcPixel* pix, const float* __restrict__ x,
                                                  const float* __restrict__ w, float* __restrict__ y, int N, int C,
                                                  int H, int W, int CO, int KH, int KW, int stride, int pad,
                                                  const float* __restrict__ ss, const float* __restrict__ res,
                                                  int relu, double* __restrict__ part_s, double* __restrict__ part_q,
                                                  int vec) {
    typedef MmaTile<BM> T;
    constexpr int BN = T::BN, LDC = T::LDC;
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int OH = conv_out(H, KH, stride, pad), OW = conv_out(W, KW, stride, pad);
    const int M = CO, K = KH * KW * C, OHW = OH * OW, Pn = N * OHW;
    const int m0 = blockIdx.y * BM, p0 = blockIdx.x * BN;
    const bool vec_a = vec & 1, vec_b = vec & 2;
    nhwc_pixels<BN>(pix, p0, Pn, OHW, OW, H, W, stride, pad);

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = t * MBK;
        mma_weights_cp<BM>(As, w, M, K, m0, k0, vec_a, tid);
        if (vec_b) {
            const int kl = 4 * (tid & 7);
            nhwc_gather<BN / 32, 32>(pix, tid >> 3, k0 + kl, K, C, H, W, KW, [&](int nl, bool ok, size_t i) {
                __pipeline_memcpy_async(Bs + nl * MLDA + kl, x + i, 16, ok ? 0 : 16);
            });
        } else {
            const int kl = tid & 31;
            nhwc_gather<BN / 8, 8>(pix, tid >> 5, k0 + kl, K, C, H, W, KW,
                               [&](int nl, bool ok, size_t i) { cp4(Bs + nl * MLDA + kl, x + i, ok); });
        }
    };

    float acc[4][4][4];
    mma_mainloop<TF32, true, false, BM, S>(smem, (K + MBK - 1) / MBK, issue, acc);
    float* Cs = (float*)smem;
    mma_store<true, BM>(Cs, acc);
    // Channel tid % BM of pixels tid / BM + (256 / BM) i: a warp writes 32 consecutive
    // channels.
    const int ml = tid & (BM - 1), m = m0 + ml;
    if (m >= M) return;
    if constexpr (EPI == EPI_STATS) {
        // Tile (BN / 64) * blockIdx.x + sub of NT (the block's BN / 64 tiles, sub = tid / BM):
        // pixels 64 * sub.. of the block, column ml of Cs.
        const int NT = (Pn + 63) / 64, sub = tid >> T::M_SHIFT;
        const int nv = min(64, Pn - (p0 + 64 * sub));
        if (nv > 0) {
            const float* cc = Cs + 64 * sub * LDC + ml;
            double sum = 0.0;
            for (int k = 0; k < nv; ++k) sum += (double)cc[k * LDC];
            const double mean = sum / (double)nv;
            double q = 0.0;
            for (int k = 0; k < nv; ++k) {
                const double d = (double)cc[k * LDC] - mean;
                q += d * d;
            }
            const size_t o = (size_t)m * NT + (BN / 64) * blockIdx.x + sub;
            part_s[o] = sum;
            part_q[o] = q;
        }
    }
    constexpr int PS = MMA_THREADS / BM;  // pixels per pass
#pragma unroll 4
    for (int i = 0; i < BN / PS; ++i) {
        const int nl = (tid >> T::M_SHIFT) + PS * i, p = p0 + nl;
        if (p >= Pn) break;
        const size_t o = (size_t)p * CO + m;
        if constexpr (EPI == EPI_BN)
            y[o] = bn_epilogue(Cs[nl * LDC + ml], ss, CO, m, res, o, relu);
        else
            y[o] = Cs[nl * LDC + ml];
    }
}

// The weights OIHW [CO][C][KHW] as OHWI [CO][KHW][C] (the channels-last forward's A, K
// ordered (kh, kw, c)), rows of KP >= K = C*KHW elements zero past K: wt[o * KP + r * C + c] =
// w[(o * C + c) * KHW + r], len = CO*KP; T float (KP = K) or bf16 (rounded to nearest even,
// as __float2bfloat16_rn and bf16x8 round).
__device__ __forceinline__ void ohwi_store(float* d, float v) { *d = v; }
__device__ __forceinline__ void ohwi_store(__nv_bfloat16* d, float v) { *d = __float2bfloat16_rn(v); }
template <class T>
__device__ __forceinline__ void weight_ohwi(const float* __restrict__ w, T* __restrict__ wt, int C, int KHW, int KP,
                                            int len) {
    const int K = C * KHW;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)len; i += (size_t)gridDim.x * blockDim.x) {
        const size_t o = i / KP;
        const int k = (int)(i - o * KP);
        float v = 0.0f;
        if (k < K) {
            const int r = k / C, c = k - r * C;
            v = w[(o * C + c) * KHW + r];
        }
        ohwi_store(wt + i, v);
    }
}

extern "C" __global__ void conv_weight_ohwi(const float* __restrict__ w, float* __restrict__ wt, int C, int KHW,
                                            int len) {
    weight_ohwi(w, wt, C, KHW, C * KHW, len);
}

// The bf16 copy of the bf16-storage forward: rows padded to KP = K rounded up to 8 (16 bytes).
extern "C" __global__ void conv_weight_ohwi_bf16(const float* __restrict__ w, __nv_bfloat16* __restrict__ wt, int C,
                                                 int KHW, int KP, int len) {
    weight_ohwi(w, wt, C, KHW, KP, len);
}

// The channels-last eval forward (bf16: ldmatrix and m16n8k16; tf32: m16n8k8), one split, a
// grid of (pixel tiles, channel tiles) 128x128 blocks: w OHWI (conv_weight_ohwi, or the OIHW
// tensor of a 1x1), ss = {scale, shift} per output channel, res the residual (y's shape) or
// null, relu 0/1, vec bit 0 16-byte copies of w's rows (K % 4 == 0), bit 1 of x (C % 4 == 0).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                            int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                            const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<false, EPI_BN>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr,
                                     nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                            int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                            const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<true, EPI_BN>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr,
                                    nullptr, vec);
}

// The same with the 64 x 256 tile (MmaTile<64>: C_out <= 64; a grid of (256-pixel tiles,
// 64-channel tiles), MmaBNhwc64::SMEM / SMEM_F32 bytes of dynamic shared memory).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16_m64(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc<false, EPI_BN, 64>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr,
                                         nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_tf32_m64(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc<true, EPI_BN, 64>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr,
                                        nullptr, vec);
}

// The channels-last training forward: z = conv(x, w) (NHWC) and the batch-norm partial
// statistics per (output channel, 64-pixel tile), part_s and part_q C_out * ceil(N*OH*OW / 64)
// values each (as conv2d_fwd_stats_mma_*: norm.cu's bn_stats_finalize combines them); w and
// vec as the eval forward's.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                               int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                               double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<false, EPI_STATS>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0,
                                        part_s, part_q, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                               int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                               double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<true, EPI_STATS>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0,
                                       part_s, part_q, vec);
}

// The same with the 64 x 256 tile (C_out <= 64): each block writes its four 64-pixel tiles.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16_m64(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                                   int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                   double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc<false, EPI_STATS, 64>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0,
                                            part_s, part_q, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_tf32_m64(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                                   int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                   double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc<true, EPI_STATS, 64>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0,
                                           part_s, part_q, vec);
}

// The channels-last forwards on the 2-stage ring (`_s2`, for 99 KiB per block: sm_86, sm_89),
// the same arithmetic in the same order: 128 x 128 at bf16 and tf32 (MmaBNhwc99k::SMEM /
// SMEM_F32 bytes of dynamic shared memory), 64 x 256 at tf32 (MmaBNhwc64_99k::SMEM_F32).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                               int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                               const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<false, EPI_BN, MBM, MMA_STAGES_99K>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res,
                                                          relu, nullptr, nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_tf32_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N,
                               int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                               const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<true, EPI_BN, MBM, MMA_STAGES_99K>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res,
                                                         relu, nullptr, nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_tf32_m64_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                   int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                   const float* __restrict__ ss, const float* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc<true, EPI_BN, 64, MMA_STAGES_99K>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res,
                                                        relu, nullptr, nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                                  int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                  double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<false, EPI_STATS, MBM, MMA_STAGES_99K>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad,
                                                             nullptr, nullptr, 0, part_s, part_q, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_tf32_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                                  int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                  double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc<true, EPI_STATS, MBM, MMA_STAGES_99K>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad,
                                                            nullptr, nullptr, 0, part_s, part_q, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_tf32_m64_s2(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ z,
                                      int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                      double* __restrict__ part_s, double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc<true, EPI_STATS, 64, MMA_STAGES_99K>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr,
                                                           nullptr, 0, part_s, part_q, vec);
}

// ---- Channels-last data gradient ---------------------------------------------------------
//
// dx = conv_transpose(dy, w) on channels-last tensors: dy [N][OH][OW][CO], dx [N][H][W][C],
// the weights OIHW. Per output phase as conv_bwd_data_mma (PhaseGemm: the input pixels with
// (ih + pad) % stride == py and (iw + pad) % stride == px, and only the taps kh = py + a*stride,
// kw = px + b*stride that reach them: a stride-2 layer multiplies none of its structurally
// zero taps), an implicit GEMM M = C (input channels), N = the phase's N*Hp*Wp pixels, K =
// KP*CO ordered (tap, co), co fastest, so that a K run of one pixel is contiguous channels of
// dy. The taps of a phase are taken in reverse, (a', b') = (KHp-1-a, KWp-1-b), so that dy's
// row of tap a' is ih0 + a' with ih0 = oh0 + i - (KHp-1) (oh = oh0 + i - a, PhaseGemm's oh0):
// the forward's pixel table and gather (nhwc_gather with dy as x, KWp as KW, OH x OW as the
// image) serve unchanged, the table built by nhwc_phase_pixels (which also records dx's pixel
// index). A = the weights in the same order per phase: the host's per-call copy
// conv_weight_bwd_nhwc, phases one after another (row-major (py, px)), each [C][KP][CO] (for
// stride 1 one phase: [C][KH][KW][CO] with the taps reversed), so that a phase's A is
// row-major [M][K] and mma_weights_cp copies it (16 bytes where K % 4 == 0 and the phase's
// block is 16-byte aligned, i.e. CO % 4 == 0, or 4-byte copies). B as the forward's: 16-byte
// copies of 4 channels (vec bit 1: CO % 4 == 0 and dy 16-byte aligned), else 4-byte copies,
// zero-filled outside dy, past K and past the pixels. A phase without taps (a 1x1 stride 2's
// three others) has K = 0: its pixels get zeros. The epilogue is the forward's, transposed
// (mma_store<true>): a warp writes 32 consecutive channels of one dx pixel.

// Taps of phase (py, px) along kh / kw: KHp = ceil((KH - py) / s) (0 when py >= KH).
__device__ __forceinline__ int phase_taps(int K, int p, int s) { return p < K ? (K - p + s - 1) / s : 0; }

// Elements of conv_weight_bwd_nhwc's copy before phase (py, px): C * CO * the taps of the
// phases before it in row-major order.
__device__ __forceinline__ int phase_weight_offset(int C, int CO, int KH, int KW, int s, int py, int px) {
    int taps = 0;
    for (int y = 0; y < py; ++y) taps += phase_taps(KH, y, s) * KW;
    for (int x = 0; x < px; ++x) taps += phase_taps(KH, py, s) * phase_taps(KW, x, s);
    return C * CO * taps;
}

// The weights OIHW [CO][C][KH][KW] in the data gradient's order: per phase (row-major (py,
// px)) [C][KP][CO], tap (a', b') = a' * KWp + b' holding w[co][ci][py + (KHp-1-a')*s][px +
// (KWp-1-b')*s]; len = CO*C*KH*KW (every tap in exactly one phase).
extern "C" __global__ void conv_weight_bwd_nhwc(const float* __restrict__ w, float* __restrict__ wt, int C, int CO,
                                                int KH, int KW, int s, int len) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += gridDim.x * blockDim.x) {
        int off = 0;
        for (int py = 0; py < s; ++py)
            for (int px = 0; px < s; ++px) {
                const int KHp = phase_taps(KH, py, s), KWp = phase_taps(KW, px, s), KP = KHp * KWp;
                const int n = C * CO * KP;
                if (i >= off && i < off + n) {
                    int r = i - off;
                    const int ci = r / (KP * CO);
                    r -= ci * KP * CO;
                    const int tap = r / CO, co = r - tap * CO;
                    const int a = KHp - 1 - tap / KWp, b = KWp - 1 - (tap - (tap / KWp) * KWp);
                    wt[i] = w[(((size_t)co * C + ci) * KH + py + a * s) * KW + px + b * s];
                }
                off += n;
            }
    }
}

// The data gradient's pixel table: the block's MBN pixels p0.. of the phase (Pn = N*Hp*Wp, in
// order n, i, j) as dy's pixel index of (n, 0, 0) (base), dy's row and column of reversed tap
// (0, 0) (ih0 = oh0 + i - (KHp-1), iw0 = ow0 + j - (KWp-1)) and dx's pixel index (out); past
// the pixels as nhwc_pixels. Then a barrier. BN pixels (the block tile's).
template <int BN = MBN>
__device__ __forceinline__ void nhwc_phase_pixels(NhwcPixel* pix, const PhaseGemm& ph, int KHp, int p0, int Pn,
                                                  int OHW, int H, int W, int stride) {
    static_assert(BN <= MMA_THREADS, "one pixel per thread");
    const int tid = threadIdx.x;
    if (tid < BN) {
        const int p = p0 + tid;
        NhwcPixel e = {0, -(1 << 30), -(1 << 30), 0};
        if (p < Pn) {
            const int HWp = ph.Hp * ph.Wp;
            const int n = p / HWp, r = p - n * HWp, i = r / ph.Wp, j = r - i * ph.Wp;
            e.base = n * OHW;
            e.ih0 = ph.oh0 + i - (KHp - 1);
            e.iw0 = ph.ow0 + j - (ph.KWp - 1);
            e.out = (n * H + ph.ihs + i * stride) * W + ph.iws + j * stride;
        }
        pix[tid] = e;
    }
    __syncthreads();
}

// BM: the block tile BM x BN (MmaTile: 128 x 128, or 64 x 256 for C_in <= 64, M being C_in
// here), pix BN entries, each phase's pixels in runs of BN; S stages (the `_s2` kernels:
// MMA_STAGES_99K).
template <bool TF32, int BM = MBM, int S = MMA_STAGES>
__device__ __forceinline__ void conv_bwd_data_mma_nhwc(NhwcPixel* pix, const float* __restrict__ dy,
                                                       const float* __restrict__ wt, float* __restrict__ dx, int N,
                                                       int C, int H, int W, int CO, int KH, int KW, int stride,
                                                       int pad, int vec) {
    typedef MmaTile<BM> T;
    constexpr int BN = T::BN, LDC = T::LDC;
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int OH = conv_out(H, KH, stride, pad), OW = conv_out(W, KW, stride, pad);
    const PhaseGemm ph = phase_gemm(N, H, W, KH, KW, stride, pad, BN);
    const int KHp = phase_taps(KH, ph.py, stride);
    const int M = C, K = ph.KP * CO, Pn = N * ph.Hp * ph.Wp;
    const int m0 = blockIdx.y * BM, p0 = ph.tile * BN;
    if (p0 >= Pn) return;  // the whole block: this phase has fewer pixels than the largest
    const int off = phase_weight_offset(C, CO, KH, KW, stride, ph.py, ph.px);
    const float* wp = wt + off;
    const bool vec_a = (vec & 1) && !(K & 3) && !(off & 3), vec_b = vec & 2;
    nhwc_phase_pixels<BN>(pix, ph, KHp, p0, Pn, OH * OW, H, W, stride);

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = t * MBK;
        mma_weights_cp<BM>(As, wp, M, K, m0, k0, vec_a, tid);
        if (vec_b) {
            const int kl = 4 * (tid & 7);
            nhwc_gather<BN / 32, 32>(pix, tid >> 3, k0 + kl, K, CO, OH, OW, ph.KWp, [&](int nl, bool ok, size_t i) {
                __pipeline_memcpy_async(Bs + nl * MLDA + kl, dy + i, 16, ok ? 0 : 16);
            });
        } else {
            const int kl = tid & 31;
            nhwc_gather<BN / 8, 8>(pix, tid >> 5, k0 + kl, K, CO, OH, OW, ph.KWp,
                               [&](int nl, bool ok, size_t i) { cp4(Bs + nl * MLDA + kl, dy + i, ok); });
        }
    };

    float acc[4][4][4];
    mma_mainloop<TF32, true, false, BM, S>(smem, (K + MBK - 1) / MBK, issue, acc);
    float* Cs = (float*)smem;
    mma_store<true, BM>(Cs, acc);
    // Channel tid % BM of pixels tid / BM + (256 / BM) i: a warp writes 32 consecutive
    // channels.
    const int ml = tid & (BM - 1), m = m0 + ml;
    if (m >= M) return;
    constexpr int PS = MMA_THREADS / BM;  // pixels per pass
#pragma unroll 4
    for (int i = 0; i < BN / PS; ++i) {
        const int nl = (tid >> T::M_SHIFT) + PS * i;
        if (p0 + nl >= Pn) break;
        dx[(size_t)pix[nl].out * C + m] = Cs[nl * LDC + ml];
    }
}

// The channels-last data gradient (bf16: ldmatrix and m16n8k16; tf32: m16n8k8), one split, a
// grid of (stride^2 runs of pixel tiles, as conv2d_bwd_data_mma_*, channel tiles) 128x128
// blocks with the channels-last forward's dynamic shared memory: dy and dx NHWC, wt the
// weights as conv_weight_bwd_nhwc copies them, vec bit 0 wt 16-byte aligned, bit 1 16-byte
// copies of dy (CO % 4 == 0, dy 16-byte aligned).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                              int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_bwd_data_mma_nhwc<false>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_tf32(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                              int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_bwd_data_mma_nhwc<true>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

// The same with the 64 x 256 tile (C_in <= 64): per phase runs of 256-pixel tiles, 64-channel
// tiles of dx, the 64 x 256 forward's dynamic shared memory.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16_m64(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                                  int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_bwd_data_mma_nhwc<false, 64>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_tf32_m64(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                                  int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_bwd_data_mma_nhwc<true, 64>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

// The same on the 2-stage ring (`_s2`, for 99 KiB per block), as the forwards': 128 x 128 at
// bf16 and tf32, 64 x 256 at tf32.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16_s2(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                                 int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_bwd_data_mma_nhwc<false, MBM, MMA_STAGES_99K>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_tf32_s2(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                                 int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_bwd_data_mma_nhwc<true, MBM, MMA_STAGES_99K>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_tf32_m64_s2(const float* __restrict__ dy, const float* __restrict__ wt,
                                     float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW,
                                     int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_bwd_data_mma_nhwc<true, 64, MMA_STAGES_99K>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

// ---- The same with bf16 activation storage (--precision bf16) ----------------------------
//
// conv2d_fwd_bn_mma_nhwc_bf16s: x, the residual and y are NHWC tensors of bf16 values
// (element i = the i-th 16-bit half of the buffer, the host's f32 slots holding two each),
// the weights the bf16 OHWI copy conv_weight_ohwi_bf16 makes per call (rows of KP = K
// rounded up to 8, zero past K, rounded to nearest even), ss f32. Both operands thus arrive
// in the precision the tensor cores multiply, and are copied as they are (no f32 stage, no
// rounding pass, no second barrier per tile): a ring of HS_STAGES bf16 stages, each A
// [MBM][MLDAH] and B [MBN][MLDAH] (the bf16 tile's 80-byte rows, conflict-free for ldmatrix),
// from which mma_tile<true> multiplies directly. A: 16-byte copies (8 k of a padded row,
// always aligned), row tid / 4 + 64q, k 8 * (tid % 4), 2 per thread. B by the host's `vec`:
// bit 1 (C % 8 == 0, x 16-byte aligned): 16 bytes = 8 channels of one tap, column 8 * (tid %
// 4), pixels tid / 4 + 64q, 2 per thread; bit 2 (C even otherwise): 4 bytes = 2 channels,
// column 2 * (tid % 16), pixels tid / 16 + 16q, 8 per thread; neither (C odd): plain 2-byte
// loads and shared stores, column tid % 32, pixels tid / 32 + 8q, 16 per thread (a plain
// store lands before the barrier that makes the stage everyone's, as a copy does). Zero fill
// as above. Epilogue: the f32 accumulators transposed through shared memory (mma_store<true>,
// over the ring), then per pair of channels (tid % 64) of pixels tid / 64 + 4i: bn_epilogue_v
// with the residual read as bf16, rounded to nearest even, stored as one 32-bit word of two
// bf16 (even CO: a warp writes 128 contiguous bytes of one pixel), or with odd CO as 2-byte
// halves (a pair may straddle two words).
// The training forward conv2d_fwd_stats_mma_nhwc_bf16s is the same kernel (the GEMM and the
// stores shared: conv_fwd_mma_nhwc_bf16s<EPI>) with the EPI_STATS epilogue: z = acc rounded to
// nearest even, and the partials of conv_fwd_mma_nhwc's layout and arithmetic taken from the
// f32 tile with each value rounded first (bf16_round, the same rounding as the store), so they
// are the statistics of what z holds. The data gradient conv2d_bwd_data_mma_nhwc_bf16s (below)
// runs the same ring (bf16s_gemm) on dy.

// The bf16 ring: HS_STAGES stages of A and B, 20 KiB each; 6 stages (120 KiB, the f32 ring's
// 3 stages and bf16 tile took 128 KiB) keep 5 K tiles in flight; the epilogue's f32 tile
// [MBN][MLDC] (66 KiB) is laid over them.
#define HS_STAGES 6
#define HSTAGE (MBM * MLDAH + MBN * MLDAH)
#define HS_SMEM (HS_STAGES * HSTAGE * 2)
static_assert(MBN * MLDC * 4 <= HS_SMEM, "the epilogue's f32 tile fits in the bf16 ring");
static_assert(HS_SMEM == 122880, "conv.rs's mma_smem_nhwc_bf16s");
static_assert(MBM * MBK == 8 * 2 * MMA_THREADS, "two 16-byte copies of A and of B per thread");
// The ring of the block tile BM x BN (MmaTile): stages of A [BM][MLDAH] and B [BN][MLDAH];
// 64 x 256: 25 KiB each, 150 KiB in all (with the pixel table's 4 KiB under sm_90's limit).
// S (default HS_STAGES): the ring's depth; the `_s4` (128 x 128) and `_m64_s3` (64 x 256)
// kernels run HS_STAGES_99K / HS_STAGES_99K_M64, the deepest rings that fit, with the pixel
// table, the 99 KiB of sm_86 / sm_89 (the order of the arithmetic is the same at any depth).
template <int BM, int S = HS_STAGES>
struct Bf16sRing {
    enum : int { STAGE = (BM + MmaTile<BM>::BN) * MLDAH, SMEM = S * STAGE * 2 };
    static_assert(MmaTile<BM>::BN * MmaTile<BM>::LDC * 4 <= SMEM, "the epilogue's f32 tile fits in the ring");
    static_assert(SMEM <= 227 * 1024 - 4 * 1024, "the opt-in limit of sm_90 (and the pixel table)");
};
static_assert(Bf16sRing<MBM>::STAGE == HSTAGE && Bf16sRing<MBM>::SMEM == HS_SMEM, "the 128 x 128 ring");
static_assert(Bf16sRing<64>::SMEM == 153600, "conv.rs's mma_smem_nhwc_bf16s (64 x 256)");
#define HS_STAGES_99K 4
#define HS_STAGES_99K_M64 3
static_assert(Bf16sRing<MBM, HS_STAGES_99K>::SMEM == 81920 && Bf16sRing<64, HS_STAGES_99K_M64>::SMEM == 76800,
              "conv.rs's shared_memory (bf16 storage, _s4 / _m64_s3)");
static_assert(Bf16sRing<MBM, HS_STAGES_99K>::SMEM + MBN * 16 <= SMEM_99K &&
                  Bf16sRing<MBM, HS_STAGES_99K + 1>::SMEM + MBN * 16 > SMEM_99K,
              "the deepest 128 x 128 ring (and its pixel table) of 99 KiB");
static_assert(Bf16sRing<64, HS_STAGES_99K_M64>::SMEM + 256 * 16 <= SMEM_99K &&
                  Bf16sRing<64, HS_STAGES_99K_M64 + 1>::SMEM + 256 * 16 > SMEM_99K,
              "the deepest 64 x 256 ring (and its pixel table) of 99 KiB");

// One K tile's copies of the bf16 ring (conv_fwd_mma_nhwc_bf16s, conv_bwd_data_mma_nhwc_bf16s):
// A = rows m0.. of a bf16 [M][KP] matrix (KP % 8 == 0, 16-byte aligned, zero past the GEMM's
// K), 16 bytes per copy; B = the pixel table's gather of the NHWC bf16 tensor src with C
// channels, H x W pixels, taps KW wide (K = taps * C), by `vec` (bit 1: 16-byte copies of 8
// channels, bit 2: 4-byte copies of 2, neither: 2-byte loads and shared stores).
template <int BM = MBM>
__device__ __forceinline__ void bf16s_issue(const NhwcPixel* pix, __nv_bfloat16* As, __nv_bfloat16* Bs,
                                            const __nv_bfloat16* __restrict__ w, int M, int KP, int m0,
                                            const __nv_bfloat16* __restrict__ src, int K, int C, int H, int W,
                                            int KW, int vec, int k0, int tid) {
    constexpr int BN = MmaTile<BM>::BN;
    const int ka = 8 * (tid & 3);
#pragma unroll
    for (int q = 0; q < BM / 64; ++q) {
        const int ml = (tid >> 2) + 64 * q, m = m0 + ml;
        const bool ok = m < M && k0 + ka < KP;
        __pipeline_memcpy_async(As + ml * MLDAH + ka, ok ? w + (size_t)m * KP + k0 + ka : w, 16, ok ? 0 : 16);
    }
    if (vec & 2) {
        const int kl = 8 * (tid & 3);
        nhwc_gather<BN / 64, 64>(pix, tid >> 2, k0 + kl, K, C, H, W, KW, [&](int nl, bool ok, size_t i) {
            __pipeline_memcpy_async(Bs + nl * MLDAH + kl, src + i, 16, ok ? 0 : 16);
        });
    } else if (vec & 4) {
        const int kl = 2 * (tid & 15);
        nhwc_gather<BN / 16, 16>(pix, tid >> 4, k0 + kl, K, C, H, W, KW, [&](int nl, bool ok, size_t i) {
            __pipeline_memcpy_async(Bs + nl * MLDAH + kl, src + i, 4, ok ? 0 : 4);
        });
    } else {
        const int kl = tid & 31;
        const unsigned short* xs = (const unsigned short*)src;
        unsigned short* bs = (unsigned short*)Bs;
        nhwc_gather<BN / 8, 8>(pix, tid >> 5, k0 + kl, K, C, H, W, KW, [&](int nl, bool ok, size_t i) {
            bs[nl * MLDAH + kl] = ok ? xs[i] : (unsigned short)0;
        });
    }
}

// The bf16 ring's GEMM of bf16s_issue's operands (K tiles of the GEMM's K), then the block's
// f32 result transposed into Cs = the ring's shared memory, [BN][LDC] (mma_store<true>); the
// block tile BM x BN (MmaTile).
template <int BM = MBM, int S = HS_STAGES>
__device__ __forceinline__ void bf16s_gemm(const NhwcPixel* pix, const __nv_bfloat16* __restrict__ w, int M, int KP,
                                           int m0, const __nv_bfloat16* __restrict__ src, int K, int C, int H, int W,
                                           int KW, int vec) {
    unsigned char* smem = mma_smem;
    typedef MmaTile<BM> T;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> T::WN_SHIFT, wn = warp & (T::WN - 1);
    float acc[4][4][4];
    mma_zero(acc);
    mma_ring<S, Bf16sRing<BM, S>::STAGE, BM * MLDAH>(
        (__nv_bfloat16*)smem, (K + MBK - 1) / MBK, [&](__nv_bfloat16* As, __nv_bfloat16* Bs, int t) {
            bf16s_issue<BM>(pix, As, Bs, w, M, KP, m0, src, K, C, H, W, KW, vec, t * MBK, tid);
        },
        [&](const __nv_bfloat16* A, const __nv_bfloat16* B) { mma_tile<true>(A, B, acc, wm, wn, lane); });
    mma_store<true, BM>((float*)smem, acc);
}

// The value bf16 storage holds for v (rounded to nearest even, as __floats2bfloat162_rn).
__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// The bf16-storage channels-last forward; EPI_BN (eval: ss, res, relu) or EPI_STATS
// (training: z = acc rounded to bf16, and part_s, part_q as conv_fwd_mma_nhwc's, C_out * T
// values each, of the ROUNDED values: what z holds).
// The block tile BM x BN (MmaTile: 128 x 128, or 64 x 256 for C_out <= 64), pix BN entries.
template <int EPI, int BM = MBM, int S = HS_STAGES>
__device__ __forceinline__ void conv_fwd_mma_nhwc_bf16s(NhwcPixel* pix, const __nv_bfloat16* __restrict__ x,
                                                        const __nv_bfloat16* __restrict__ w,
                                                        __nv_bfloat16* __restrict__ y, int N, int C, int H, int W,
                                                        int CO, int KH, int KW, int stride, int pad,
                                                        const float* __restrict__ ss,
                                                        const __nv_bfloat16* __restrict__ res, int relu,
                                                        double* __restrict__ part_s, double* __restrict__ part_q,
                                                        int vec) {
    typedef MmaTile<BM> T;
    constexpr int BN = T::BN, LDC = T::LDC;
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int OH = conv_out(H, KH, stride, pad), OW = conv_out(W, KW, stride, pad);
    const int M = CO, K = KH * KW * C, KP = (K + 7) & ~7, OHW = OH * OW, Pn = N * OHW;
    const int m0 = blockIdx.y * BM, p0 = blockIdx.x * BN;
    nhwc_pixels<BN>(pix, p0, Pn, OHW, OW, H, W, stride, pad);
    bf16s_gemm<BM, S>(pix, w, M, KP, m0, x, K, C, H, W, KW, vec);
    const float* Cs = (const float*)smem;
    if constexpr (EPI == EPI_STATS) {
        // As conv_fwd_mma_nhwc's: channel tid % BM, tile (BN / 64) * blockIdx.x + tid / BM,
        // each value rounded as the store below rounds it.
        const int NT = (Pn + 63) / 64, sub = tid >> T::M_SHIFT, mc = m0 + (tid & (BM - 1));
        const int nv = min(64, Pn - (p0 + 64 * sub));
        if (mc < M && nv > 0) {
            const float* cc = Cs + 64 * sub * LDC + (tid & (BM - 1));
            double sum = 0.0;
            for (int k = 0; k < nv; ++k) sum += (double)bf16_round(cc[k * LDC]);
            const double mean = sum / (double)nv;
            double q = 0.0;
            for (int k = 0; k < nv; ++k) {
                const double d = (double)bf16_round(cc[k * LDC]) - mean;
                q += d * d;
            }
            const size_t o = (size_t)mc * NT + (BN / 64) * blockIdx.x + sub;
            part_s[o] = sum;
            part_q[o] = q;
        }
    }
    // Channels m, m + 1 (pair tid % (BM / 2)) of pixels tid / (BM / 2) + (512 / BM) i.
    constexpr int PS = 2 * MMA_THREADS / BM;  // pixels per pass
    const int ml = 2 * (tid & (BM / 2 - 1)), m = m0 + ml;
    if (m >= M) return;
    const bool has_res = EPI == EPI_BN && res != nullptr;
    auto epi = [&](float v, int c, float r) {
        if constexpr (EPI == EPI_BN)
            return bn_epilogue_v(v, ss, CO, c, has_res, r, relu);
        else
            return v;
    };
    if (!(CO & 1)) {
        // p * CO + m even: one aligned word of two bf16.
#pragma unroll 4
        for (int i = 0; i < BN / PS; ++i) {
            const int nl = (tid >> (T::M_SHIFT - 1)) + PS * i, p = p0 + nl;
            if (p >= Pn) break;
            const size_t o = (size_t)p * CO + m;
            const float2 v = *(const float2*)(Cs + nl * LDC + ml);
            float r0 = 0.0f, r1 = 0.0f;
            if (has_res) {
                const __nv_bfloat162 r = *(const __nv_bfloat162*)(res + o);
                r0 = __bfloat162float(r.x);
                r1 = __bfloat162float(r.y);
            }
            *(__nv_bfloat162*)(y + o) = __floats2bfloat162_rn(epi(v.x, m, r0), epi(v.y, m + 1, r1));
        }
    } else {
        const int ne = min(2, M - m);
#pragma unroll 2
        for (int i = 0; i < BN / PS; ++i) {
            const int nl = (tid >> (T::M_SHIFT - 1)) + PS * i, p = p0 + nl;
            if (p >= Pn) break;
            for (int e = 0; e < ne; ++e) {
                const size_t o = (size_t)p * CO + m + e;
                const float r = has_res ? __bfloat162float(res[o]) : 0.0f;
                y[o] = __float2bfloat16_rn(epi(Cs[nl * LDC + ml + e], m + e, r));
            }
        }
    }
}

// The bf16-storage channels-last eval forward (bf16 operands only), one split, a grid of
// (pixel tiles, channel tiles) 128x128 blocks with HS_SMEM bytes of dynamic shared memory: x,
// res (or null) and y bf16 NHWC, w the bf16 OHWI copy (conv_weight_ohwi_bf16: rows of KP),
// ss = {scale, shift} f32, relu 0/1, vec bit 1 16-byte copies of x (C % 8 == 0, aligned), bit
// 2 4-byte copies (C even), neither: 2-byte loads.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16s(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                             __nv_bfloat16* __restrict__ y, int N, int C, int H, int W, int CO, int KH, int KW,
                             int stride, int pad, const float* __restrict__ ss, const __nv_bfloat16* __restrict__ res,
                             int relu, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc_bf16s<EPI_BN>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr,
                                    nullptr, vec);
}

// The bf16-storage channels-last training forward: the same GEMM with the EPI_STATS epilogue,
// z bf16 NHWC (rounded to nearest even) and the batch-norm partials part_s, part_q (C_out * T
// f64 each, T = ceil(N*OH*OW / 64), conv2d_fwd_stats_mma_nhwc_*'s layout) of the rounded z.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16s(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                __nv_bfloat16* __restrict__ z, int N, int C, int H, int W, int CO, int KH, int KW,
                                int stride, int pad, double* __restrict__ part_s, double* __restrict__ part_q,
                                int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc_bf16s<EPI_STATS>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0,
                                       part_s, part_q, vec);
}

// The two with the 64 x 256 tile (C_out <= 64): a grid of (256-pixel tiles, 64-channel
// tiles), Bf16sRing<64>::SMEM bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16s_m64(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                 __nv_bfloat16* __restrict__ y, int N, int C, int H, int W, int CO, int KH, int KW,
                                 int stride, int pad, const float* __restrict__ ss,
                                 const __nv_bfloat16* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc_bf16s<EPI_BN, 64>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr,
                                        nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16s_m64(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                    __nv_bfloat16* __restrict__ z, int N, int C, int H, int W, int CO, int KH, int KW,
                                    int stride, int pad, double* __restrict__ part_s, double* __restrict__ part_q,
                                    int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc_bf16s<EPI_STATS, 64>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0,
                                           part_s, part_q, vec);
}

// The four on the shallow rings (99 KiB per block: sm_86, sm_89): `_s4` 128 x 128 with
// Bf16sRing<128, 4>::SMEM (80 KiB), `_m64_s3` 64 x 256 with Bf16sRing<64, 3>::SMEM (75 KiB).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16s_s4(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                __nv_bfloat16* __restrict__ y, int N, int C, int H, int W, int CO, int KH, int KW,
                                int stride, int pad, const float* __restrict__ ss,
                                const __nv_bfloat16* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc_bf16s<EPI_BN, MBM, HS_STAGES_99K>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res,
                                                         relu, nullptr, nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16s_s4(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                   __nv_bfloat16* __restrict__ z, int N, int C, int H, int W, int CO, int KH, int KW,
                                   int stride, int pad, double* __restrict__ part_s, double* __restrict__ part_q,
                                   int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_fwd_mma_nhwc_bf16s<EPI_STATS, MBM, HS_STAGES_99K>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr,
                                                            nullptr, 0, part_s, part_q, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_bn_mma_nhwc_bf16s_m64_s3(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                    __nv_bfloat16* __restrict__ y, int N, int C, int H, int W, int CO, int KH, int KW,
                                    int stride, int pad, const float* __restrict__ ss,
                                    const __nv_bfloat16* __restrict__ res, int relu, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc_bf16s<EPI_BN, 64, HS_STAGES_99K_M64>(pix, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res,
                                                            relu, nullptr, nullptr, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_fwd_stats_mma_nhwc_bf16s_m64_s3(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                       __nv_bfloat16* __restrict__ z, int N, int C, int H, int W, int CO, int KH,
                                       int KW, int stride, int pad, double* __restrict__ part_s,
                                       double* __restrict__ part_q, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_fwd_mma_nhwc_bf16s<EPI_STATS, 64, HS_STAGES_99K_M64>(pix, x, w, z, N, C, H, W, CO, KH, KW, stride, pad,
                                                               nullptr, nullptr, 0, part_s, part_q, vec);
}

// conv2d_bwd_data_mma_nhwc_bf16s: the channels-last data gradient (as conv2d_bwd_data_mma_nhwc_*,
// per output phase) with dy in bf16 storage and dx f32: the same bf16 ring (bf16s_gemm), dy
// gathered as the forward gathers x (nhwc_phase_pixels' table, dy as the image, KWp as KW;
// vec bit 1 16-byte copies of 8 channels where CO % 8 == 0, bit 2 4-byte copies where CO is
// even, else 2-byte loads), A = the bf16 copy conv_weight_bwd_nhwc_bf16 makes per call:
// conv_weight_bwd_nhwc's order with each phase's rows [C][KPP] padded to KPP = KP*CO rounded
// up to 8 (zeros past K), so that every row and every phase starts 16-byte aligned. The
// epilogue is conv_bwd_data_mma_nhwc's (f32 dx, a warp writing 32 consecutive channels).

// Padded row length (bf16) of phase (py, px)'s weights in conv_weight_bwd_nhwc_bf16's copy.
__device__ __forceinline__ int phase_row_bf16(int CO, int KH, int KW, int s, int py, int px) {
    return (phase_taps(KH, py, s) * phase_taps(KW, px, s) * CO + 7) & ~7;
}

// Elements of conv_weight_bwd_nhwc_bf16's copy before phase (py, px).
__device__ __forceinline__ int phase_weight_offset_bf16(int C, int CO, int KH, int KW, int s, int py, int px) {
    int off = 0;
    for (int ph = 0; ph < py * s + px; ++ph) off += C * phase_row_bf16(CO, KH, KW, s, ph / s, ph % s);
    return off;
}

// The weights OIHW as conv_weight_bwd_nhwc orders them, in bf16 (nearest even), each phase's
// rows padded to phase_row_bf16 with zeros; len = C * the sum of the phases' padded rows (the
// host's bf16s_bwd_weight_len).
extern "C" __global__ void conv_weight_bwd_nhwc_bf16(const float* __restrict__ w, __nv_bfloat16* __restrict__ wt,
                                                     int C, int CO, int KH, int KW, int s, int len) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += gridDim.x * blockDim.x) {
        int off = 0;
        for (int py = 0; py < s; ++py)
            for (int px = 0; px < s; ++px) {
                const int KHp = phase_taps(KH, py, s), KWp = phase_taps(KW, px, s), KP = KHp * KWp;
                const int row = phase_row_bf16(CO, KH, KW, s, py, px), n = C * row;
                if (i >= off && i < off + n) {
                    const int r = i - off, ci = r / row, k = r - ci * row;
                    float v = 0.0f;
                    if (k < KP * CO) {
                        const int tap = k / CO, co = k - tap * CO;
                        const int a = KHp - 1 - tap / KWp, b = KWp - 1 - (tap - (tap / KWp) * KWp);
                        v = w[(((size_t)co * C + ci) * KH + py + a * s) * KW + px + b * s];
                    }
                    wt[i] = __float2bfloat16_rn(v);
                }
                off += n;
            }
    }
}

// The block tile BM x BN (MmaTile: 128 x 128, or 64 x 256 for C_in <= 64), pix BN entries.
template <int BM = MBM, int S = HS_STAGES>
__device__ __forceinline__ void conv_bwd_data_mma_nhwc_bf16s(NhwcPixel* pix, const __nv_bfloat16* __restrict__ dy,
                                                             const __nv_bfloat16* __restrict__ wt,
                                                             float* __restrict__ dx, int N, int C, int H, int W,
                                                             int CO, int KH, int KW, int stride, int pad, int vec) {
    typedef MmaTile<BM> T;
    constexpr int BN = T::BN, LDC = T::LDC;
    const int tid = threadIdx.x;
    const int OH = conv_out(H, KH, stride, pad), OW = conv_out(W, KW, stride, pad);
    const PhaseGemm ph = phase_gemm(N, H, W, KH, KW, stride, pad, BN);
    const int KHp = phase_taps(KH, ph.py, stride);
    const int M = C, K = ph.KP * CO, KPP = (K + 7) & ~7, Pn = N * ph.Hp * ph.Wp;
    const int m0 = blockIdx.y * BM, p0 = ph.tile * BN;
    if (p0 >= Pn) return;  // the whole block: this phase has fewer pixels than the largest
    const __nv_bfloat16* wp = wt + phase_weight_offset_bf16(C, CO, KH, KW, stride, ph.py, ph.px);
    nhwc_phase_pixels<BN>(pix, ph, KHp, p0, Pn, OH * OW, H, W, stride);
    bf16s_gemm<BM, S>(pix, wp, M, KPP, m0, dy, K, CO, OH, OW, ph.KWp, vec);
    const float* Cs = (const float*)mma_smem;
    // Channel tid % BM of pixels tid / BM + (256 / BM) i: a warp writes 32 consecutive
    // channels.
    const int ml = tid & (BM - 1), m = m0 + ml;
    if (m >= M) return;
    constexpr int PS = MMA_THREADS / BM;  // pixels per pass
#pragma unroll 4
    for (int i = 0; i < BN / PS; ++i) {
        const int nl = (tid >> T::M_SHIFT) + PS * i;
        if (p0 + nl >= Pn) break;
        dx[(size_t)pix[nl].out * C + m] = Cs[nl * LDC + ml];
    }
}

// The bf16-storage channels-last data gradient, one split, the grid of conv2d_bwd_data_mma_nhwc_*
// with HS_SMEM bytes of dynamic shared memory: dy bf16 NHWC, wt conv_weight_bwd_nhwc_bf16's
// copy, dx f32 NHWC, vec as conv2d_fwd_bn_mma_nhwc_bf16s's for dy's CO channels.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16s(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ wt,
                               float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW,
                               int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_bwd_data_mma_nhwc_bf16s(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

// The same with the 64 x 256 tile (C_in <= 64): per phase runs of 256-pixel tiles, 64-channel
// tiles of dx, Bf16sRing<64>::SMEM bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16s_m64(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ wt,
                                   float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW,
                                   int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_bwd_data_mma_nhwc_bf16s<64>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

// The two on the shallow rings (99 KiB per block), as the forwards': `_s4` 128 x 128,
// `_m64_s3` 64 x 256.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16s_s4(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ wt,
                                  float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW,
                                  int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MBN];
    conv_bwd_data_mma_nhwc_bf16s<MBM, HS_STAGES_99K>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_data_mma_nhwc_bf16s_m64_s3(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ wt,
                                      float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW,
                                      int stride, int pad, int vec) {
    __shared__ NhwcPixel pix[MmaTile<64>::BN];
    conv_bwd_data_mma_nhwc_bf16s<64, HS_STAGES_99K_M64>(pix, dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad, vec);
}

// ==== Channels-last (NHWC) weight gradient ===============================================
//
// dW = sum over the batch of x (*) dy on channels-last activations: x [N][H][W][C], dy
// [N][OH][OW][CO], dW written OIHW [CO][C][KH][KW] (the model's layout; overwritten). The
// GEMM: M = CO, N = KH*KW*C ordered (kh, kw, c), c fastest, K = the N*OH*OW pixels (n, oh,
// ow), split over K by blockIdx.z like conv_bwd_weight_mma ([z*chunk, (z+1)*chunk), chunk a
// multiple of MBK, into the workspace [splits][CO][C*KH*KW] that conv.cu's
// conv_splitk_reduce sums in split order: deterministic, no atomics; out = dW with one split).
// In NHWC both operands are stored k-major (a pixel's channels contiguous): A[m = co][k = p]
// is dy[p][co] and B[k = p][n = (tap, c)] is x[p's input pixel at the tap][c]; so both are
// staged [k][*] as MmaB<false, true> says (A transposed, [MBK][MLDB]: mma_tile's AT loads it
// by ldmatrix.trans at bf16, mma_tile_tf32's AT by index at tf32; B as the NCHW kernels' B)
// and multiplied by the same mma_mainloop (bf16 m16n8k16 / tf32 m16n8k8, f32 accumulation).
// Copies: thread tid's rows (pixels) of a K tile are tid / 32 + 8q, q < 4, decoded once per
// tile (two divisions each) for both operands. A, vec bit 0 (CO % 4 == 0, dy 16-byte aligned:
// the host's test): one 16-byte copy of channels 4 * (tid % 32).. per row, a warp copying one
// pixel's 128 channels (512 contiguous bytes); else 4-byte copies of channels tid % 32 + 32j,
// j < 4. B, vec bit 1 (C % 4 == 0, x 16-byte aligned): one 16-byte copy per row of columns
// 4 * (tid % 32).. (4 channels of one tap, C % 4 == 0 keeps them in one tap and aligned);
// else 4-byte copies of columns tid % 32 + 32j. A thread's columns are fixed for the whole
// kernel and decoded once (c << 16 | kh << 8 | kw: C < 2^15, KH, KW <= 255, the host's test;
// -1 past N). Past the pixels, past CO / N, or outside the image (padding): the zero-fill
// form. Epilogue: the accumulators through the f32 tile [MBM][MLDC] (mma_store), then column
// n = tid % 128 of rows tid / 128 + 2i written straight to its OIHW place m*N + c*KH*KW + tap
// (no scratch and no permute pass; a warp's 32 consecutive c land KH*KW floats apart for a
// 3x3, contiguous for a 1x1: the output is small next to the reduction).

typedef MmaB<false, true> WgradNhwc;
static_assert(WgradNhwc::SMEM == 118784 && WgradNhwc::SMEM_F32 == 101376, "conv.rs's mma_smem_wgrad_nhwc");
static_assert(MBM * MLDC * 4 <= WgradNhwc::SMEM_F32, "the epilogue's f32 tile fits in the stages");
// The 2-stage ring at bf16 (`_s2`, for 99 KiB per block: sm_86, sm_89): 83 KiB; tf32's
// 3-stage ring takes 99 KiB exactly and runs there as it is.
typedef MmaB<false, true, MBM, MBN, MMA_STAGES_99K> WgradNhwc99k;
static_assert(WgradNhwc99k::SMEM == 84992 && WgradNhwc99k::SMEM <= SMEM_99K, "conv.rs's shared_memory (WgradNhwc, _s2)");
static_assert(WgradNhwc::SMEM > SMEM_99K && WgradNhwc::SMEM_F32 <= SMEM_99K, "bf16's 3 stages do not fit 99 KiB, tf32's do");
static_assert(MBM * MLDC * 4 <= WgradNhwc99k::SMEM_F32, "the epilogue's f32 tile fits in the _s2 stages");
static_assert(MBK == 4 * 8 && MBM == 4 * 32 && MBN == 4 * 32, "4 rows per thread, a warp's 32 lanes x 4 columns");

// Column n of the weight gradient's GEMM (tap, c) packed as c << 16 | kh << 8 | kw, or -1 past NC.
__device__ __forceinline__ int wgrad_col(int n, int NC, int C, int KW) {
    if (n >= NC) return -1;
    const int tap = n / C, c = n - tap * C, kh = tap / KW;
    return (c << 16) | (kh << 8) | (tap - kh * KW);
}

// The epilogue of the channels-last weight gradients: the block's accumulators through the
// f32 tile Cs [MBM][MLDC] (mma_store, over the stages), then column n = tid % 128 of rows
// tid / 128 + 2i written to its OIHW place m*NC + c*KHW + tap of split blockIdx.z's output.
__device__ __forceinline__ void wgrad_nhwc_store(float* Cs, const float (&acc)[4][4][4], float* __restrict__ out,
                                                 int M, int NC, int C, int KHW, int m0, int n0) {
    const int tid = threadIdx.x;
    mma_store(Cs, acc);
    float* o = out + (size_t)blockIdx.z * M * NC;
    const int nl = tid & (MBN - 1), n = n0 + nl;
    if (n >= NC) return;
    const int tap = n / C, c = n - tap * C;
    o += (size_t)c * KHW + tap;
#pragma unroll 4
    for (int i = 0; i < MBM / 2; ++i) {
        const int ml = (tid >> 7) + 2 * i, m = m0 + ml;
        if (m >= M) break;
        o[(size_t)m * NC] = Cs[ml * MLDC + nl];
    }
}

// S: the ring's depth (MMA_STAGES; MMA_STAGES_99K for `_s2`), the arithmetic the same at any.
template <bool TF32, int S = MMA_STAGES>
__device__ __forceinline__ void conv_bwd_weight_mma_nhwc(const float* __restrict__ x, const float* __restrict__ dy,
                                                         float* __restrict__ out, int N, int C, int H, int W, int CO,
                                                         int KH, int KW, int stride, int pad, int OH, int OW,
                                                         int chunk, int vec) {
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x;
    const int M = CO, KHW = KH * KW, NC = KHW * C, OHW = OH * OW, K = N * OHW;
    const int m0 = blockIdx.y * MBM, n0 = blockIdx.x * MBN;
    // 64-bit bounds: kbeg + chunk can pass INT_MAX on the last split.
    const long long kbeg = (long long)blockIdx.z * chunk;
    const int kend = (int)min((long long)K, kbeg + chunk);
    const bool vec_a = vec & 1, vec_b = vec & 2;
    const int lane = tid & 31;

    int col[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) col[j] = wgrad_col(n0 + (vec_b ? 4 * lane : lane + 32 * j), NC, C, KW);

    auto issue = [&](float* As, float* Bs, int t) {
        const int k0 = (int)kbeg + t * MBK;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int kl = (tid >> 5) + 8 * q, p = k0 + kl;
            const bool p_ok = p < kend;
            int base = 0, ih0 = 0, iw0 = 0;
            if (p_ok) {
                const int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
                base = n * H * W;
                ih0 = oh * stride - pad;
                iw0 = ow * stride - pad;
            }
            // A: dy's row p, channels m0.. (contiguous).
            float* arow = As + kl * MLDB;
            const float* dyrow = dy + (size_t)(p_ok ? p : 0) * CO + m0;
            if (vec_a) {
                const bool ok = p_ok && m0 + 4 * lane < M;
                __pipeline_memcpy_async(arow + 4 * lane, ok ? dyrow + 4 * lane : dy, 16, ok ? 0 : 16);
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int ml = lane + 32 * j;
                    const bool ok = p_ok && m0 + ml < M;
                    cp4(arow + ml, ok ? dyrow + ml : dy, ok);
                }
            }
            // B: x at pixel p's tap (kh, kw), channel c, of each of this thread's columns.
            float* brow = Bs + kl * MLDB;
            auto src = [&](int info, bool& ok) -> const float* {
                const int ih = ih0 + ((info >> 8) & 255), iw = iw0 + (info & 255);
                ok = p_ok && info >= 0 && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
                return ok ? x + (size_t)(base + ih * W + iw) * C + (info >> 16) : x;
            };
            if (vec_b) {
                bool ok;
                const float* s = src(col[0], ok);
                __pipeline_memcpy_async(brow + 4 * lane, s, 16, ok ? 0 : 16);
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    bool ok;
                    const float* s = src(col[j], ok);
                    cp4(brow + lane + 32 * j, s, ok);
                }
            }
        }
    };

    float acc[4][4][4];
    const int klen = kend > kbeg ? kend - (int)kbeg : 0;
    mma_mainloop<TF32, false, true, MBM, S>(smem, (klen + MBK - 1) / MBK, issue, acc);
    wgrad_nhwc_store((float*)smem, acc, out, M, NC, C, KHW, m0, n0);
}

// The channels-last weight gradient (bf16: ldmatrix(.trans) and m16n8k16; tf32: m16n8k8), a
// grid of (column tiles, channel tiles, splits) 128x128 blocks with WgradNhwc::SMEM (bf16) or
// ::SMEM_F32 (tf32) bytes of dynamic shared memory: x, dy NHWC, out = dW (OIHW) with one
// split, else the workspace [splits][CO][C*KH*KW]; chunk the split's run of pixels (a
// multiple of MBK); vec bit 0 16-byte copies of dy (CO % 4 == 0), bit 1 of x (C % 4 == 0).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_nhwc_bf16(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                                int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                                int OW, int chunk, int vec) {
    conv_bwd_weight_mma_nhwc<false>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_nhwc_tf32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                                int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                                int OW, int chunk, int vec) {
    conv_bwd_weight_mma_nhwc<true>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

// The bf16 one on the 2-stage ring (`_s2`: WgradNhwc99k::SMEM, 84,992 bytes of dynamic shared
// memory), which conv.rs launches where the device cannot give the 3-stage ring (99 KiB per
// block: sm_86, sm_89); the same arithmetic in the same order.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_nhwc_bf16_s2(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                                   int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                                   int OW, int chunk, int vec) {
    conv_bwd_weight_mma_nhwc<false, MMA_STAGES_99K>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk,
                                                    vec);
}

// ---- The weight gradient with bf16 activation storage (--precision bf16) ----------------
//
// conv2d_bwd_weight_mma_nhwc_bf16s: the GEMM above on x [N][H][W][C] and dy [N][OH][OW][CO]
// stored in bf16 (value i = the i-th 16-bit half of the buffer, the host's f32 slots holding
// two each; see conv2d_fwd_bn_mma_nhwc_bf16s), dW OIHW f32 (overwritten; or the split-K
// workspace, as above). Both operands arrive in the precision the tensor cores multiply and
// are copied as they are into a bf16-only ring (no f32 stage, no rounding pass, no second
// barrier per tile): WS_STAGES stages, each A (dy, transposed) [MBK][MLDBH] and B (x's
// columns) [MBK][MLDBH], row k = pixel (MmaB<false, true>'s bf16 tile, 272-byte rows:
// conflict-free for ldmatrix.trans), from which mma_tile<false, true> multiplies directly
// (A by ldmatrix.trans, as the f32-storage kernel's AT path). A thread's rows (pixels) of a K
// tile are tid / 16 + 16q, q < 2, decoded once per tile for both operands; its columns are
// fixed (l = tid % 16). Copies by the host's `vec` (x: bit 1 / bit 2, dy: bit 5 / bit 6, as
// mma_vec_nhwc_bf16s says for each tensor's channel count and address): 16 bytes = 8
// channels (channel count % 8 == 0 and the tensor 16-byte aligned), column 8l, one per row;
// else 4 bytes = 2 channels (even channel count: a pair never straddles a pixel or a tap),
// columns 2(l + 16j), j < 4; else (odd) plain 2-byte loads and shared stores, columns
// l + 16j, j < 8 (a plain store lands before the barrier that makes the stage everyone's, as
// a copy does). x's columns (tap, c) are decoded once per kernel (wgrad_col). Past the
// pixels, past CO / NC, or outside the image (padding): zeros (the zero-fill form, or a zero
// store). Epilogue: wgrad_nhwc_store, over the ring.

// The bf16 ring: 6 stages of 17 KiB (5 K tiles in flight, as the eval forward's); the
// epilogue's f32 tile [MBM][MLDC] (66 KiB) is laid over them.
#define WS_STAGES 6
#define WSTAGE (2 * MBK * MLDBH)
#define WS_SMEM (WS_STAGES * WSTAGE * 2)
static_assert(WS_SMEM == 104448, "conv.rs's MMA_SMEM_WGRAD_NHWC_BF16S");
static_assert(MBM * MLDC * 4 <= WS_SMEM, "the epilogue's f32 tile fits in the bf16 ring");
static_assert(MBK == 2 * 16 && MBM == 16 * 8 && MBN == 16 * 8, "2 rows per thread, 16 lanes x 8 columns per row");
// The shallow ring (`_s5`, 99 KiB per block: sm_86, sm_89): 5 stages, 85 KiB, the deepest that
// fits (6 are 102 KiB); the epilogue's f32 tile still fits over it.
#define WS_STAGES_99K 5
static_assert(WS_STAGES_99K * WSTAGE * 2 == 87040, "conv.rs's shared_memory (WgradNhwcBf16s, _s5)");
static_assert(WS_STAGES_99K * WSTAGE * 2 <= SMEM_99K && (WS_STAGES_99K + 1) * WSTAGE * 2 > SMEM_99K,
              "the deepest weight-gradient ring of 99 KiB");
static_assert(MBM * MLDC * 4 <= WS_STAGES_99K * WSTAGE * 2, "the epilogue's f32 tile fits in the _s5 ring");

// S: the ring's depth (WS_STAGES; WS_STAGES_99K for `_s5`), the arithmetic the same at any.
template <int S = WS_STAGES>
__device__ __forceinline__ void conv_bwd_weight_mma_nhwc_bf16s(const __nv_bfloat16* __restrict__ x,
                                                               const __nv_bfloat16* __restrict__ dy,
                                                               float* __restrict__ out, int N, int C, int H, int W,
                                                               int CO, int KH, int KW, int stride, int pad, int OH,
                                                               int OW, int chunk, int vec) {
    unsigned char* smem = mma_smem;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
    const int M = CO, KHW = KH * KW, NC = KHW * C, OHW = OH * OW, K = N * OHW;
    const int m0 = blockIdx.y * MBM, n0 = blockIdx.x * MBN;
    // 64-bit bounds: kbeg + chunk can pass INT_MAX on the last split.
    const long long kbeg = (long long)blockIdx.z * chunk;
    const int kend = (int)min((long long)K, kbeg + chunk);
    const int l = tid & 15;
    const unsigned short* xs = (const unsigned short*)x;
    const unsigned short* dys = (const unsigned short*)dy;

    int col[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
        col[j] = wgrad_col(n0 + ((vec & 2) ? 8 * l : (vec & 4) ? 2 * (l + 16 * j) : l + 16 * j), NC, C, KW);

    auto issue = [&](__nv_bfloat16* As, __nv_bfloat16* Bs, int t) {
        const int k0 = (int)kbeg + t * MBK;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int kl = (tid >> 4) + 16 * q, p = k0 + kl;
            const bool p_ok = p < kend;
            int base = 0, ih0 = 0, iw0 = 0;
            if (p_ok) {
                const int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
                base = n * H * W;
                ih0 = oh * stride - pad;
                iw0 = ow * stride - pad;
            }
            // A: dy's row p, channels m0.. (contiguous).
            __nv_bfloat16* arow = As + kl * MLDBH;
            const size_t drow = (size_t)(p_ok ? p : 0) * CO + m0;
            if (vec & 32) {
                const int ml = 8 * l;
                const bool ok = p_ok && m0 + ml < M;
                __pipeline_memcpy_async(arow + ml, ok ? dy + drow + ml : dy, 16, ok ? 0 : 16);
            } else if (vec & 64) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int ml = 2 * (l + 16 * j);
                    const bool ok = p_ok && m0 + ml < M;
                    __pipeline_memcpy_async(arow + ml, ok ? dy + drow + ml : dy, 4, ok ? 0 : 4);
                }
            } else {
                unsigned short* as = (unsigned short*)arow;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int ml = l + 16 * j;
                    as[ml] = p_ok && m0 + ml < M ? dys[drow + ml] : (unsigned short)0;
                }
            }
            // B: x at pixel p's tap (kh, kw), channel c, of each of this thread's columns.
            __nv_bfloat16* brow = Bs + kl * MLDBH;
            auto src = [&](int info, bool& ok) -> size_t {
                const int ih = ih0 + ((info >> 8) & 255), iw = iw0 + (info & 255);
                ok = p_ok && info >= 0 && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
                return ok ? (size_t)(base + ih * W + iw) * C + (info >> 16) : (size_t)0;
            };
            if (vec & 2) {
                bool ok;
                const size_t i = src(col[0], ok);
                __pipeline_memcpy_async(brow + 8 * l, x + i, 16, ok ? 0 : 16);
            } else if (vec & 4) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    bool ok;
                    const size_t i = src(col[j], ok);
                    __pipeline_memcpy_async(brow + 2 * (l + 16 * j), x + i, 4, ok ? 0 : 4);
                }
            } else {
                unsigned short* bs = (unsigned short*)brow;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    bool ok;
                    const size_t i = src(col[j], ok);
                    bs[l + 16 * j] = ok ? xs[i] : (unsigned short)0;
                }
            }
        }
    };

    float acc[4][4][4];
    mma_zero(acc);
    const int klen = kend > kbeg ? kend - (int)kbeg : 0;
    mma_ring<S, WSTAGE, MBK * MLDBH>((__nv_bfloat16*)smem, (klen + MBK - 1) / MBK, issue,
                                     [&](const __nv_bfloat16* A, const __nv_bfloat16* B) {
                                         mma_tile<false, true>(A, B, acc, wm, wn, lane);
                                     });
    wgrad_nhwc_store((float*)smem, acc, out, M, NC, C, KHW, m0, n0);
}

// The bf16-storage channels-last weight gradient (bf16 operands only), a grid of (column
// tiles, channel tiles, splits) 128x128 blocks with WS_SMEM bytes of dynamic shared memory: x,
// dy NHWC in bf16 storage, out = dW (OIHW, f32) with one split, else the workspace
// [splits][CO][C*KH*KW]; chunk the split's run of pixels (a multiple of MBK); vec: x's copies
// in bits 1 (16-byte) / 2 (4-byte), dy's in bits 5 / 6, neither: 2-byte loads.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_nhwc_bf16s(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ dy,
                                 float* __restrict__ out, int N, int C, int H, int W, int CO, int KH, int KW,
                                 int stride, int pad, int OH, int OW, int chunk, int vec) {
    conv_bwd_weight_mma_nhwc_bf16s(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk, vec);
}

// The same on the 5-stage ring (`_s5`: 87,040 bytes of dynamic shared memory), which conv.rs
// launches where the device cannot give the 6-stage ring (99 KiB per block: sm_86, sm_89).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
conv2d_bwd_weight_mma_nhwc_bf16s_s5(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ dy,
                                    float* __restrict__ out, int N, int C, int H, int W, int CO, int KH, int KW,
                                    int stride, int pad, int OH, int OW, int chunk, int vec) {
    conv_bwd_weight_mma_nhwc_bf16s<WS_STAGES_99K>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk,
                                                  vec);
}
