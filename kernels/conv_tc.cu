// 2-D convolution (no bias), NCHW, as implicit GEMMs on the tensor cores (nvcuda::wmma):
// the same three GEMMs as kernels/conv.cu (the f32 SIMT reference), with the operands
// rounded to bf16 (16x16x16 fragments) or tf32 (16x16x8) as they are stored into shared
// memory, and f32 accumulation.
//
//   forward     M = C_out, N = batch*OH*OW, K = C_in*KH*KW:  y = W . col(x)
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
// Block tile 64x64, K tile 32, 128 threads = 4 warps in 2x2, each warp 32x32 (2x2 WMMA
// accumulators). The next K tile is gathered into registers (f32) while the current one is
// multiplied; the epilogue stores the accumulators through shared memory so that the
// global writes are coalesced. Needs sm_80 or newer (bf16/tf32 WMMA): build.rs compiles this
// file for compute_90 only, with the CUDA headers' include folder (mma.h).

#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

#define TBM 64
#define TBN 64
#define TBK 32
#define TC_THREADS 128
#define TC_LDC (TBN + 4)
// Shared bytes: the largest of the operand tiles (tf32: 64x36 + 64x36 floats) and the
// f32 output tile (64x68 floats).
#define TC_SMEM 18432

// Operands rounded to bf16, 16x16x16 fragments.
struct PrecBf16 {
    typedef __nv_bfloat16 S;  // shared-memory element
    typedef __nv_bfloat16 F;  // fragment element type
    static constexpr int KS = 16;
    static constexpr int PADE = 8;  // row padding: 16 bytes
    static __device__ __forceinline__ S cvt(float v) { return __float2bfloat16_rn(v); }
};

// Operands rounded to tf32, 16x16x8 fragments.
struct PrecTf32 {
    typedef float S;
    typedef wmma::precision::tf32 F;
    static constexpr int KS = 8;
    static constexpr int PADE = 4;
    static __device__ __forceinline__ S cvt(float v) { return wmma::__float_to_tf32(v); }
};

template <bool COL>
struct BLayout {
    typedef wmma::row_major T;
};
template <>
struct BLayout<true> {
    typedef wmma::col_major T;
};

// Leading dimensions of the tiles in shared memory: A is [TBM][TBK] row-major; B is
// [TBK][TBN] row-major, or [TBN][TBK] (column-major B) when BCOL.
template <class P, bool BCOL>
struct Tiles {
    static constexpr int LDA = TBK + P::PADE;
    static constexpr int LDB = BCOL ? TBK + P::PADE : TBN + P::PADE;
    static constexpr int A_ELEMS = TBM * LDA;
};

template <class P>
struct Acc {
    wmma::fragment<wmma::accumulator, 16, 16, P::KS, float> f[2][2];
};

// This warp's 32x32 of the block tile times one K tile in shared memory.
template <class P, bool BCOL>
__device__ __forceinline__ void tc_tile(const typename P::S* As, const typename P::S* Bs, Acc<P>& acc,
                                        int wm, int wn) {
    typedef Tiles<P, BCOL> T;
#pragma unroll
    for (int kk = 0; kk < TBK; kk += P::KS) {
        wmma::fragment<wmma::matrix_a, 16, 16, P::KS, typename P::F, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, P::KS, typename P::F, typename BLayout<BCOL>::T> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + 16 * i) * T::LDA + kk, T::LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const typename P::S* b =
                BCOL ? Bs + (wn * 32 + 16 * j) * T::LDB + kk : Bs + kk * T::LDB + wn * 32 + 16 * j;
            wmma::load_matrix_sync(fb[j], b, T::LDB);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
    }
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

template <class P>
__device__ __forceinline__ void conv_fwd_tc(unsigned char* smem, const float* __restrict__ x,
                                            const float* __restrict__ w, float* __restrict__ y, int N, int C,
                                            int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                                            int OW, int chunk) {
    typedef Tiles<P, false> T;
    typename P::S* As = (typename P::S*)smem;
    typename P::S* Bs = As + T::A_ELEMS;
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
    // A tile (weights, contiguous along k): column ak, rows am + 4q.
    const int ak = tid & 31, am = tid >> 5;

    float ra[16], rb[16];
    auto load = [&](int k0) {
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            int m = m0 + am + 4 * q, k = k0 + ak;
            ra[q] = (m < M && k < kend) ? w[(size_t)m * K + k] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            int k = k0 + bk + 2 * q;
            float v = 0.0f;
            if (p_ok && k < kend) {
                int ci = k / KHW, rr = k - ci * KHW, kh = rr / KW, kw = rr - kh * KW;
                int ih = ih0 + kh, iw = iw0 + kw;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = xb[((size_t)ci * H + ih) * W + iw];
            }
            rb[q] = v;
        }
    };

    Acc<P> acc;
    tc_zero(acc);
    load(kbeg);
    for (int k0 = kbeg; k0 < kend; k0 += TBK) {
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            As[(am + 4 * q) * T::LDA + ak] = P::cvt(ra[q]);
            Bs[(bk + 2 * q) * T::LDB + bn] = P::cvt(rb[q]);
        }
        __syncthreads();
        if (k0 + TBK < kend) load(k0 + TBK);
        tc_tile<P, false>(As, Bs, acc, wm, wn);
        __syncthreads();
    }
    float* Cs = (float*)smem;
    tc_store(Cs, acc, wm, wn);
    if (!p_ok) return;
    const int n = p / OHW, r = p - n * OHW;
#pragma unroll 4
    for (int i = 0; i < TBM / 2; ++i) {
        int ml = bk + 2 * i, m = m0 + ml;
        if (m < M) y[((size_t)n * CO + m) * OHW + r] = Cs[ml * TC_LDC + bn];
    }
}

// The data gradient of one output phase (PhaseGemm): the structurally zero taps of a
// stride > 1 are not in its K = C_out * KP.
template <class P>
__device__ __forceinline__ void conv_bwd_data_tc(unsigned char* smem, const float* __restrict__ dy,
                                                 const float* __restrict__ w, float* __restrict__ dx, int N,
                                                 int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                                                 int OH, int OW, int chunk) {
    typedef Tiles<P, false> T;
    typename P::S* As = (typename P::S*)smem;
    typename P::S* Bs = As + T::A_ELEMS;
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
    // A[ci][(co,a,b)] = w[co][ci][py + a*stride][px + b*stride]: column ak, rows am + 4q.
    const int ak = tid & 31, am = tid >> 5;

    float ra[16], rb[16];
    auto load = [&](int k0) {
        const int ka = k0 + ak;
        const bool ka_ok = ka < kend;
        const float* wk = w;
        if (ka_ok) {
            int co = ka / ph.KP, rr = ka - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
            wk = w + (size_t)co * C * KH * KW + (ph.py + a * stride) * KW + ph.px + b * stride;
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            int m = m0 + am + 4 * q;
            ra[q] = (m < M && ka_ok) ? wk[(size_t)m * KH * KW] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            int k = k0 + bk + 2 * q;
            float v = 0.0f;
            if (p_ok && k < kend) {
                int co = k / ph.KP, rr = k - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
                int oh = ohb - a, ow = owb - b;
                if (oh >= 0 && oh < OH && ow >= 0 && ow < OW) v = dyb[((size_t)co * OH + oh) * OW + ow];
            }
            rb[q] = v;
        }
    };

    Acc<P> acc;
    tc_zero(acc);
    load(kbeg);
    for (int k0 = kbeg; k0 < kend; k0 += TBK) {
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            As[(am + 4 * q) * T::LDA + ak] = P::cvt(ra[q]);
            Bs[(bk + 2 * q) * T::LDB + bn] = P::cvt(rb[q]);
        }
        __syncthreads();
        if (k0 + TBK < kend) load(k0 + TBK);
        tc_tile<P, false>(As, Bs, acc, wm, wn);
        __syncthreads();
    }
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
    typedef Tiles<P, true> T;
    typename P::S* As = (typename P::S*)smem;
    typename P::S* Bs = As + T::A_ELEMS;
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

    // Both tiles are gathered with the reduction index (pixel) fastest: k = tid & 31;
    // A rows (co) and B columns (ci,kh,kw) lr + 4q.
    const int lk = tid & 31, lr = tid >> 5;

    float ra[16], rb[16];
    auto load = [&](long long k0) {
        const bool k_ok = k0 + lk < kend;
        int n = 0, oh = 0, ow = 0, r = 0;
        if (k_ok) {
            int k = (int)(k0 + lk);
            n = k / OHW;
            r = k - n * OHW;
            oh = r / OW;
            ow = r - oh * OW;
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            int m = m0 + lr + 4 * q;
            ra[q] = (k_ok && m < M) ? dy[((size_t)n * CO + m) * OHW + r] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            int info = colinfo[lr + 4 * q];
            float v = 0.0f;
            if (k_ok && info >= 0) {
                int ci = info >> 16, kh = (info >> 8) & 255, kw = info & 255;
                int ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = x[(((size_t)n * C + ci) * H + ih) * W + iw];
            }
            rb[q] = v;
        }
    };

    Acc<P> acc;
    tc_zero(acc);
    if (kbeg < kend) load(kbeg);
    for (long long k0 = kbeg; k0 < kend; k0 += TBK) {
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            As[(lr + 4 * q) * T::LDA + lk] = P::cvt(ra[q]);
            Bs[(lr + 4 * q) * T::LDB + lk] = P::cvt(rb[q]);
        }
        __syncthreads();
        if (k0 + TBK < kend) load(k0 + TBK);
        tc_tile<P, true>(As, Bs, acc, wm, wn);
        __syncthreads();
    }
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

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv2d_fwd_bf16(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[TC_SMEM];
    conv_fwd_tc<PrecBf16>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv2d_fwd_tf32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int N, int C,
                int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[TC_SMEM];
    conv_fwd_tc<PrecTf32>(smem, x, w, y, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv2d_bwd_data_bf16(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                     int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[TC_SMEM];
    conv_bwd_data_tc<PrecBf16>(smem, dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv2d_bwd_data_tf32(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                     int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                int chunk) {
    __shared__ __align__(128) unsigned char smem[TC_SMEM];
    conv_bwd_data_tc<PrecTf32>(smem, dy, w, dx, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv2d_bwd_weight_bf16(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out, int N,
                       int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                       int chunk) {
    __shared__ __align__(128) unsigned char smem[TC_SMEM];
    __shared__ int colinfo[TBN];
    conv_bwd_weight_tc<PrecBf16>(smem, colinfo, x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv2d_bwd_weight_tf32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out, int N,
                       int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW,
                       int chunk) {
    __shared__ __align__(128) unsigned char smem[TC_SMEM];
    __shared__ int colinfo[TBN];
    conv_bwd_weight_tc<PrecTf32>(smem, colinfo, x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}
