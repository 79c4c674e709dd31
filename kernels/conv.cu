// 2-D convolution (no bias), NCHW, as implicit GEMMs: no im2col buffer; the gathered
// operand is read straight from the tensor into shared-memory tiles.
//
//   forward     M = C_out, N = batch*OH*OW, K = C_in*KH*KW:  y = W . col(x); conv2d_fwd_bn
//               is the same GEMM with the eval-mode batch norm (+ residual) (+ ReLU) in its
//               epilogue (bn_epilogue), conv_splitk_reduce_bn the same for the tensor-core
//               forward's split-K path; conv2d_fwd_stats writes with y the batch-norm
//               partial statistics per (channel, 64-pixel tile), conv_splitk_reduce_stats
//               the same on the split-K path
//   bwd-data    M = C_in,  N = batch*H*W,   K = C_out*KH*KW: dx = W^T . col'(dy)
//               (col'(dy) holds dy[n, co, oh, ow] where oh*stride = ih + pad - kh, else 0),
//               computed per output phase without the structurally zero taps of a stride
//               > 1 (PhaseGemm): s*s GEMMs of K = C_out*ceil(KH/s)*ceil(KW/s) at most
//   bwd-weight  M = C_out, N = C_in*KH*KW,  K = batch*OH*OW: dW = dy . col(x)^T, split
//               over K by blockIdx.z into a workspace that conv_splitk_reduce sums in a
//               fixed order (deterministic, no atomics).
//
// Block tile 64x64, K tile 16, 256 threads, each thread 4x4 outputs at a stride of 16 so
// that the 16 threads of a row write 16 consecutive pixels. Index arithmetic on tensor
// offsets is done in 64 bits; element counts fit in an int (checked on the host).

#define BM 64
#define BN 64
#define BK 16
#define PAD 4

__device__ __forceinline__ void tile_mma(const float (*As)[BM + PAD], const float (*Bs)[BN + PAD],
                                         float acc[4][4], int tx, int ty) {
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// The data gradient by output phase (sub-pixel decomposition): dx[ci, ih, iw] receives
// tap (kh, kw) only where (ih + pad - kh) and (iw + pad - kw) are multiples of the stride,
// so for stride s the input pixels split into s*s phases (py, px) = ((ih + pad) % s,
// (iw + pad) % s), each a dense GEMM over its own taps kh = py + a*s, kw = px + b*s only:
// dx[ci, ihs + i*s, iws + j*s] = sum over co, a, b of w[co, ci, kh, kw] * dy[co, oh0 + i - a,
// ow0 + j - b] (out-of-range dy rows/columns read as 0). No structurally zero product is
// computed; stride 1 is the one phase with every tap. The grid's x holds s*s runs of
// `tiles` blocks, one run per phase, each as long as the largest phase needs (the host
// sizes it the same way, conv.rs); a block past its phase's pixels returns at once.
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

// The fused eval-mode epilogue of the forward: y = act(acc * scale[c] + shift[c]
// (+ residual[i])), ss = {scale[0..C), shift[0..C)} (bn_eval_fold in norm.cu), each step
// rounded on its own (no FMA contraction) as the CPU reference's epilogue rounds it
// (cpu/conv.rs, apply_epilogue); act = ReLU (fmaxf: a NaN becomes 0, as the CPU's max) or none.
__device__ __forceinline__ float bn_epilogue(float acc, const float* __restrict__ ss, int C, int c,
                                             const float* __restrict__ res, size_t i, int relu) {
    float v = __fadd_rn(__fmul_rn(acc, ss[c]), ss[C + c]);
    if (res) v = __fadd_rn(v, res[i]);
    return relu ? fmaxf(v, 0.0f) : v;
}

// The epilogues of the forward GEMM.
#define EPI_NONE 0   // y = acc (conv2d_fwd)
#define EPI_BN 1     // y = bn_epilogue(acc) (conv2d_fwd_bn: eval mode)
#define EPI_STATS 2  // y = acc, and the batch-norm partial statistics (conv2d_fwd_stats)

// Sum over the 16 lanes of a half warp (xor butterfly: every lane ends with the same value,
// IEEE addition being commutative; the order is fixed, so the result is reproducible).
__device__ __forceinline__ double half_warp_sum_d(double v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The forward GEMM; EPI selects the epilogue: EPI_BN uses ss, res, relu; EPI_STATS writes,
// for every output channel m of the block and its tile of pixels t = blockIdx.x (the nv <=
// 64 valid ones), part_s[m * T + t] = sum of y and part_q[m * T + t] = sum of (y - mean_t)^2
// with mean_t = part_s / nv (f64, centred on the tile's own mean: no cancellation), T =
// gridDim.x; bn_stats_finalize (norm.cu) combines the tiles. EPI_NONE: the plain conv
// (conv2d_fwd, unchanged).
template <int EPI>
__device__ __forceinline__ void conv_fwd_f32(const float* __restrict__ x, const float* __restrict__ w,
                                             float* __restrict__ y, int N, int C, int H, int W, int CO,
                                             int KH, int KW, int stride, int pad, int OH, int OW,
                                             const float* __restrict__ ss, const float* __restrict__ res,
                                             int relu, double* __restrict__ part_s = nullptr,
                                             double* __restrict__ part_q = nullptr) {
    __shared__ float As[BK][BM + PAD];
    __shared__ float Bs[BK][BN + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int M = CO, KHW = KH * KW, K = C * KHW, OHW = OH * OW, P = N * OHW;
    const int m0 = blockIdx.y * BM, p0 = blockIdx.x * BN;

    // This thread's fixed pixel column of the B tile.
    const int bcol = tid & 63, brow = tid >> 6;
    const int p = p0 + bcol;
    const bool p_ok = p < P;
    int ih0 = 0, iw0 = 0;
    const float* xb = x;
    if (p_ok) {
        int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
        ih0 = oh * stride - pad;
        iw0 = ow * stride - pad;
        xb = x + (size_t)n * C * H * W;
    }
    // A tile (weights, contiguous along k): k = tid & 15, rows tid>>4 + 16q.
    const int ak = tid & 15, am = tid >> 4;

    // The next K tile is loaded into registers while the current one is multiplied.
    float ra[4], rb[4];
    auto load = [&](int k0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int m = m0 + am + 16 * q, k = k0 + ak;
            ra[q] = (m < M && k < K) ? w[(size_t)m * K + k] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int r = brow + 4 * q, k = k0 + r;
            float v = 0.0f;
            if (p_ok && k < K) {
                int ci = k / KHW, rr = k - ci * KHW, kh = rr / KW, kw = rr - kh * KW;
                int ih = ih0 + kh, iw = iw0 + kw;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = xb[((size_t)ci * H + ih) * W + iw];
            }
            rb[q] = v;
        }
    };

    float acc[4][4] = {};
    load(0);
    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            As[ak][am + 16 * q] = ra[q];
            Bs[brow + 4 * q][bcol] = rb[q];
        }
        __syncthreads();
        if (k0 + BK < K) load(k0 + BK);
        tile_mma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        int pp = p0 + tx + 16 * j;
        if (pp >= P) continue;
        int n = pp / OHW, r = pp - n * OHW;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int m = m0 + ty + 16 * i;
            if (m >= M) continue;
            const size_t o = ((size_t)n * CO + m) * OHW + r;
            if constexpr (EPI == EPI_BN)
                y[o] = bn_epilogue(acc[i][j], ss, CO, m, res, o, relu);
            else
                y[o] = acc[i][j];
        }
    }
    if constexpr (EPI == EPI_STATS) {
        // Row m = m0 + ty + 16i of the tile is held by the 16 lanes tx = 0..15 of a half
        // warp (pixels tx + 16j): a sum over j in each lane, then over the half warp; the
        // centred second pass reuses the accumulators.
        const int nv = min(BN, P - p0);
        const double inv = 1.0 / (double)nv;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            double sum = 0.0;
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (tx + 16 * j < nv) sum += (double)acc[i][j];
            sum = half_warp_sum_d(sum);
            const double mean = sum * inv;
            double q = 0.0;
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (tx + 16 * j < nv) {
                    const double d = (double)acc[i][j] - mean;
                    q += d * d;
                }
            q = half_warp_sum_d(q);
            const int m = m0 + ty + 16 * i;
            if (tx == 0 && m < M) {
                part_s[(size_t)m * gridDim.x + blockIdx.x] = sum;
                part_q[(size_t)m * gridDim.x + blockIdx.x] = q;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
           int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW) {
    conv_fwd_f32<EPI_NONE>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, nullptr, nullptr, 0);
}

// The output size of a convolution (the fused kernels take no OH, OW: 16 parameters at most).
__device__ __forceinline__ int conv_out(int H, int K, int stride, int pad) {
    return (H + 2 * pad - K) / stride + 1;
}

// conv2d_fwd with the eval-mode batch-norm epilogue (bn_epilogue): ss = {scale, shift} per
// output channel, res the residual (same shape as y) or null, relu 0/1.
extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd_bn(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
              int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
              const float* __restrict__ ss, const float* __restrict__ res, int relu) {
    conv_fwd_f32<EPI_BN>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, conv_out(H, KH, stride, pad),
                         conv_out(W, KW, stride, pad), ss, res, relu);
}

// conv2d_fwd that also writes the batch-norm partial statistics of y per (channel, pixel
// tile) (EPI_STATS): part_s, part_q hold C_out * gridDim.x values each.
extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd_stats(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                 int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad,
                 double* __restrict__ part_s, double* __restrict__ part_q) {
    conv_fwd_f32<EPI_STATS>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, conv_out(H, KH, stride, pad),
                            conv_out(W, KW, stride, pad), nullptr, nullptr, 0, part_s, part_q);
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_data(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                int OW) {
    __shared__ float As[BK][BM + PAD];
    __shared__ float Bs[BK][BN + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    // This block's phase (blockIdx.x / blocks per phase) and its dense GEMM (see above).
    const PhaseGemm ph = phase_gemm(N, H, W, KH, KW, stride, pad, BN);
    const int M = C, K = CO * ph.KP, OHW = OH * OW, P = N * ph.Hp * ph.Wp;
    const int m0 = blockIdx.y * BM, p0 = ph.tile * BN;
    if (p0 >= P) return;  // the whole block: this phase has fewer pixels than the largest

    // This thread's fixed input-pixel column of the B tile: dy rows oh = ohb - a, columns
    // ow = owb - b for tap (py + a*stride, px + b*stride).
    const int bcol = tid & 63, brow = tid >> 6;
    const int p = p0 + bcol;
    const bool p_ok = p < P;
    int ohb = 0, owb = 0;
    const float* dyb = dy;
    if (p_ok) {
        int n = p / (ph.Hp * ph.Wp), r = p - n * ph.Hp * ph.Wp, i = r / ph.Wp, j = r - i * ph.Wp;
        ohb = ph.oh0 + i;
        owb = ph.ow0 + j;
        dyb = dy + (size_t)n * CO * OHW;
    }
    // A[ci][(co,a,b)] = w[co][ci][py + a*stride][px + b*stride].
    const int ak = tid & 15, am = tid >> 4;

    float ra[4], rb[4];
    auto load = [&](int k0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int m = m0 + am + 16 * q, k = k0 + ak;
            float v = 0.0f;
            if (m < M && k < K) {
                int co = k / ph.KP, rr = k - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
                v = w[(((size_t)co * C + m) * KH + ph.py + a * stride) * KW + ph.px + b * stride];
            }
            ra[q] = v;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int r = brow + 4 * q, k = k0 + r;
            float v = 0.0f;
            if (p_ok && k < K) {
                int co = k / ph.KP, rr = k - co * ph.KP, a = rr / ph.KWp, b = rr - a * ph.KWp;
                int oh = ohb - a, ow = owb - b;
                if (oh >= 0 && oh < OH && ow >= 0 && ow < OW) v = dyb[((size_t)co * OH + oh) * OW + ow];
            }
            rb[q] = v;
        }
    };

    float acc[4][4] = {};
    load(0);
    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            As[ak][am + 16 * q] = ra[q];
            Bs[brow + 4 * q][bcol] = rb[q];
        }
        __syncthreads();
        if (k0 + BK < K) load(k0 + BK);
        tile_mma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        int pp = p0 + tx + 16 * j;
        if (pp >= P) continue;
        int n = pp / (ph.Hp * ph.Wp), r = pp - n * ph.Hp * ph.Wp, pi = r / ph.Wp;
        size_t pix = (size_t)(ph.ihs + pi * stride) * W + ph.iws + (r - pi * ph.Wp) * stride;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int m = m0 + ty + 16 * i;
            if (m < M) dx[((size_t)n * C + m) * H * W + pix] = acc[i][j];
        }
    }
}

// dW[co][(ci,kh,kw)] over the K range [z*chunk, min((z+1)*chunk, K)) of batch*OH*OW.
// out = dw when gridDim.z == 1, else the workspace [splits][CO][C*KH*KW].
extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_weight(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                  int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH,
                  int OW, int chunk) {
    __shared__ float As[BK][BM + PAD];
    __shared__ float Bs[BK][BN + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int M = CO, KHW = KH * KW, NC = C * KHW, OHW = OH * OW, K = N * OHW;
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    // 64-bit bounds: kbeg + chunk can pass INT_MAX on the last split.
    const long long kbeg = (long long)blockIdx.z * chunk;
    const long long kend = min((long long)K, kbeg + chunk);

    // Both tiles are loaded with the reduction index (pixel) fastest: k = tid & 15.
    const int lk = tid & 15, lr = tid >> 4;
    // This thread's four fixed (ci, kh, kw) columns of the B tile.
    int bci[4], bkh[4], bkw[4];
    bool bok[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        int c = c0 + lr + 16 * q;
        bok[q] = c < NC;
        int ci = c / KHW, rr = c - ci * KHW, kh = rr / KW;
        bci[q] = ci;
        bkh[q] = kh;
        bkw[q] = rr - kh * KW;
    }

    float ra[4], rb[4];
    auto load = [&](long long k0) {
        bool k_ok = k0 + lk < kend;
        int k = k_ok ? (int)(k0 + lk) : 0;
        int n = 0, oh = 0, ow = 0, r = 0;
        if (k_ok) {
            n = k / OHW;
            r = k - n * OHW;
            oh = r / OW;
            ow = r - oh * OW;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int m = m0 + lr + 16 * q;
            ra[q] = (k_ok && m < M) ? dy[((size_t)n * CO + m) * OHW + r] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float v = 0.0f;
            if (k_ok && bok[q]) {
                int ih = oh * stride - pad + bkh[q], iw = ow * stride - pad + bkw[q];
                if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                    v = x[(((size_t)n * C + bci[q]) * H + ih) * W + iw];
            }
            rb[q] = v;
        }
    };

    float acc[4][4] = {};
    if (kbeg < kend) load(kbeg);
    for (long long k0 = kbeg; k0 < kend; k0 += BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            As[lk][lr + 16 * q] = ra[q];
            Bs[lk][lr + 16 * q] = rb[q];
        }
        __syncthreads();
        if (k0 + BK < kend) load(k0 + BK);
        tile_mma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    float* o = out + (size_t)blockIdx.z * M * NC;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int c = c0 + tx + 16 * j;
            if (c < NC) o[(size_t)m * NC + c] = acc[i][j];
        }
    }
}

// dw[i] = sum over s of ws[s][i], s ascending.
extern "C" __global__ void conv_splitk_reduce(const float* __restrict__ ws, float* __restrict__ dw,
                                              int splits, int len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)len; i += (size_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(size_t)z * len + i];
        dw[i] = s;
    }
}

// conv_splitk_reduce with the eval-mode batch-norm epilogue (the tensor-core forward's
// split-K path): y[i] = bn_epilogue(sum over s of ws[s][i], s ascending), channel
// c = (i / HW) % C.
extern "C" __global__ void conv_splitk_reduce_bn(const float* __restrict__ ws, float* __restrict__ y, int splits,
                                                 int len, int C, int HW, const float* __restrict__ ss,
                                                 const float* __restrict__ res, int relu) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)len; i += (size_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(size_t)z * len + i];
        y[i] = bn_epilogue(s, ss, C, (int)((i / HW) % C), res, i, relu);
    }
}

// Sum over the 32 lanes of a warp (xor butterfly, fixed order: reproducible; every lane ends
// with the same value).
__device__ __forceinline__ double warp_sum_xor_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// conv_splitk_reduce with the batch-norm statistics epilogue (the tensor-core forward's
// split-K path in training): y[i] = sum over s of ws[s][i], s ascending (conv_splitk_reduce's
// order: y is bit for bit the unfused path's), and per output channel m and tile t of 64
// consecutive pixels of the N*HW (the nv <= 64 valid ones, fewer in the last tile)
// part_s[m * T + t] = sum of y over the tile, part_q[m * T + t] = sum of (y - mean_t)^2,
// mean_t = part_s / nv (f64), T = gridDim.x: the partials conv2d_fwd_stats* write, which
// bn_stats_finalize (norm.cu) combines. Grid (T, ceil(C / 8)), 256 threads: warp w takes
// channel blockIdx.y * 8 + w, lane l the tile's pixels l and l + 32 (consecutive lanes,
// consecutive pixels of an image: coalesced); the sums over the warp by a fixed butterfly.
extern "C" __global__ void __launch_bounds__(256)
conv_splitk_reduce_stats(const float* __restrict__ ws, float* __restrict__ y, int splits, int len, int C, int HW,
                         double* __restrict__ part_s, double* __restrict__ part_q) {
    const int lane = threadIdx.x & 31, m = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (m >= C) return;  // the whole warp (m is the warp's): its shuffles stay full
    const int P = len / C, p0 = blockIdx.x * 64, nv = min(64, P - p0);
    float v[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        float s = 0.0f;
        if (j < nv) {
            const int p = p0 + j, n = p / HW, r = p - n * HW;
            const size_t o = ((size_t)n * C + m) * HW + r;
            for (int z = 0; z < splits; ++z) s += ws[(size_t)z * len + o];
            y[o] = s;
        }
        v[h] = s;
    }
    double sum = 0.0;
#pragma unroll
    for (int h = 0; h < 2; ++h)
        if (lane + 32 * h < nv) sum += (double)v[h];
    sum = warp_sum_xor_d(sum);
    const double mean = sum / (double)nv;
    double q = 0.0;
#pragma unroll
    for (int h = 0; h < 2; ++h)
        if (lane + 32 * h < nv) {
            const double d = (double)v[h] - mean;
            q += d * d;
        }
    q = warp_sum_xor_d(q);
    if (lane == 0) {
        part_s[(size_t)m * gridDim.x + blockIdx.x] = sum;
        part_q[(size_t)m * gridDim.x + blockIdx.x] = q;
    }
}
