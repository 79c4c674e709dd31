// Batch norm over x [n, c, hw], statistics per channel.
//
// Training forward and backward reduce each channel over grid (S, C): block (s, c) sums a
// fixed chunk of the channel's n*hw values in f64 into a workspace, and one thread per
// channel then adds the S partial sums in order. The split S depends only on the shape,
// so results are deterministic. The variance takes two passes (mean first, then squared
// deviations), never E[x^2] - E[x]^2. Normalisation and dx are elementwise launches; the
// normalisation (bn_apply) can also add a residual block's shortcut and apply its ReLU.
// Channels-last (NHWC, [n*hw][c]) tensors take the same elementwise passes with HW = 1 (the
// channel of element i is then i % C), and bn_bwd_partial_nhwc for the backward's sums.
// After a convolution that took the statistics in its epilogue (per pixel tile: sum and
// centred sum of squares), bn_stats_finalize combines the tiles instead of the two passes
// over x. bn_eval_fold folds the running statistics into a scale and shift for a
// convolution's eval-mode epilogue.
//
// Workspace layout (f64): part[c * S + s] (and a second array for the backward's second sum),
// stats[2 * c] = {mean, invstd} (forward) or {sum dy, sum dy*xhat} (backward).

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sum; every thread gets the result. `sh` holds >= 33 doubles.
__device__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    return sh[32];
}

// Element j of channel c (j in [0, N*HW)).
__device__ __forceinline__ size_t bn_index(int j, int c, int C, int HW) {
    int n = j / HW;
    return ((size_t)n * C + c) * HW + (j - n * HW);
}

// bf16 storage (the channels-last training activations at --precision bf16): a tensor of L
// values in (L + 1) / 2 f32 slots, value i the 16-bit half at index i; stored rounded to
// nearest even. The same conversions as channels.cu's (each kernel file is its own module).
__device__ __forceinline__ unsigned short bn_bf16_bits(float x) {
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float bn_load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float bn_load(const unsigned short* p, size_t i) {
    return __uint_as_float((unsigned int)p[i] << 16);
}
__device__ __forceinline__ void bn_store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void bn_store(unsigned short* p, size_t i, float v) { p[i] = bn_bf16_bits(v); }

// grid (S, C). stats == nullptr: part = sum x; else part = sum (x - stats[2c])^2.
extern "C" __global__ void bn_partial(const float* __restrict__ x, const double* __restrict__ stats,
                                      double* __restrict__ part, int N, int C, int HW, int chunk) {
    __shared__ double sh[33];
    const int s = blockIdx.x, c = blockIdx.y, S = gridDim.x;
    const long long cnt = (long long)N * HW;
    const long long beg = (long long)s * chunk, end = min(cnt, beg + chunk);
    const double mean = stats ? stats[2 * c] : 0.0;
    double acc = 0.0;
    for (long long j = beg + threadIdx.x; j < end; j += blockDim.x) {
        double v = (double)x[bn_index((int)j, c, C, HW)];
        if (stats) {
            v -= mean;
            v *= v;
        }
        acc += v;
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) part[(size_t)c * S + s] = acc;
}

// One thread per channel: stats[2c] = mean.
extern "C" __global__ void bn_finalize_mean(const double* __restrict__ part, double* __restrict__ stats,
                                            int C, int S, int N, int HW) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0;
    for (int k = 0; k < S; ++k) s += part[(size_t)c * S + k];
    stats[2 * c] = s / ((double)N * (double)HW);
}

// Channel c's batch statistics from its mean and sum of squared deviations ss over cnt
// values: invstd (returned), running stats (PyTorch's momentum, unbiased variance), saved
// mean/invstd.
__device__ __forceinline__ double bn_finish(int c, double mean, double ss, double cnt, double eps, double momentum,
                                            float* __restrict__ running_mean, float* __restrict__ running_var,
                                            float* __restrict__ save_mean, float* __restrict__ save_invstd) {
    const double var = ss / cnt;
    const double invstd = 1.0 / sqrt(var + eps);
    double unbiased = cnt > 1.0 ? ss / (cnt - 1.0) : var;
    running_mean[c] = (float)((1.0 - momentum) * (double)running_mean[c] + momentum * mean);
    running_var[c] = (float)((1.0 - momentum) * (double)running_var[c] + momentum * unbiased);
    save_mean[c] = (float)mean;
    save_invstd[c] = (float)invstd;
    return invstd;
}

// One thread per channel, after the squared-deviation pass: invstd, running stats (PyTorch's
// momentum, unbiased variance), saved mean/invstd.
extern "C" __global__ void bn_finalize_var(const double* __restrict__ part, double* __restrict__ stats,
                                           float* __restrict__ running_mean, float* __restrict__ running_var,
                                           float* __restrict__ save_mean, float* __restrict__ save_invstd,
                                           int C, int S, int N, int HW, double eps, double momentum) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double ss = 0.0;
    for (int k = 0; k < S; ++k) ss += part[(size_t)c * S + k];
    const double cnt = (double)N * (double)HW;
    stats[2 * c + 1] =
        bn_finish(c, stats[2 * c], ss, cnt, eps, momentum, running_mean, running_var, save_mean, save_invstd);
}

// The batch statistics from a convolution's epilogue (conv2d_fwd_stats*, conv.cu /
// conv_tc.cu), grid (C), one block per channel: T tiles of `tile` consecutive pixels of the
// cnt = N*HW (the last one shorter), tile t with part_s[c * T + t] = its sum and
// part_q[c * T + t] = its sum of squared deviations from its own mean. Combined exactly
// (the parallel-axis form of Chan et al.'s formula): mean = sum of part_s / cnt, then
// ss = sum over t of part_q[t] + n_t * (part_s[t] / n_t - mean)^2, every term >= 0, so
// nothing cancels. Then bn_finish, as bn_finalize_var. Fixed per-thread strides and a fixed
// tree (block_sum_d): deterministic.
extern "C" __global__ void bn_stats_finalize(const double* __restrict__ part_s, const double* __restrict__ part_q,
                                             float* __restrict__ running_mean, float* __restrict__ running_var,
                                             float* __restrict__ save_mean, float* __restrict__ save_invstd,
                                             int T, int cnt, int tile, double eps, double momentum) {
    __shared__ double sh[33];
    const int c = blockIdx.x;
    const double* ps = part_s + (size_t)c * T;
    const double* pq = part_q + (size_t)c * T;
    double s = 0.0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) s += ps[t];
    const double n = (double)cnt;
    const double mean = block_sum_d(s, sh) / n;
    double q = 0.0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const double nt = (double)min(tile, cnt - t * tile);
        const double d = ps[t] / nt - mean;
        q += pq[t] + nt * d * d;
    }
    q = block_sum_d(q, sh);
    if (threadIdx.x == 0)
        bn_finish(c, mean, q, n, eps, momentum, running_mean, running_var, save_mean, save_invstd);
}

// y = (x - mean) * invstd * gamma + beta (+ ReLU) with mean/invstd as saved (f32). With a
// residual res (x's shape; null: none) y = act(v + res[i]), the residual block's join fused
// into this pass: the add rounded on its own and the ReLU as add_relu_fwd's (elementwise.cu:
// v > 0 ? v : 0), so y is bit for bit bn_apply then add_relu_fwd (or add_assign), the block
// output written once instead of bn(z) written, read and the sum written again.
// St: float, or unsigned short for x, res and y in bf16 storage (bn_apply_bf16: read exactly,
// y rounded when stored; the arithmetic in f32 as bn_apply's).
template <typename St>
__device__ void bn_apply_t(const St* __restrict__ x, const float* __restrict__ gamma,
                           const float* __restrict__ beta, const float* __restrict__ mean,
                           const float* __restrict__ invstd, const St* __restrict__ res,
                           St* __restrict__ y, int total, int C, int HW, int relu) {
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < (size_t)total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)i0;
        int c = (i / HW) % C;
        float v = (bn_load(x, i) - mean[c]) * invstd[c] * gamma[c] + beta[c];
        if (res) {
            v = __fadd_rn(v, bn_load(res, i));
            bn_store(y, i, (relu && !(v > 0.0f)) ? 0.0f : v);
        } else {
            bn_store(y, i, (relu && v < 0.0f) ? 0.0f : v);
        }
    }
}
extern "C" __global__ void bn_apply(const float* __restrict__ x, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, const float* __restrict__ mean,
                                    const float* __restrict__ invstd, const float* __restrict__ res,
                                    float* __restrict__ y, int total, int C, int HW, int relu) {
    bn_apply_t(x, gamma, beta, mean, invstd, res, y, total, C, HW, relu);
}
extern "C" __global__ void bn_apply_bf16(const unsigned short* __restrict__ x, const float* __restrict__ gamma,
                                         const float* __restrict__ beta, const float* __restrict__ mean,
                                         const float* __restrict__ invstd, const unsigned short* __restrict__ res,
                                         unsigned short* __restrict__ y, int total, int C, int HW, int relu) {
    bn_apply_t(x, gamma, beta, mean, invstd, res, y, total, C, HW, relu);
}

extern "C" __global__ void bn_eval_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                       const float* __restrict__ beta,
                                       const float* __restrict__ running_mean,
                                       const float* __restrict__ running_var, float* __restrict__ y,
                                       int total, int C, int HW, float eps, int relu) {
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < (size_t)total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)i0;
        int c = (i / HW) % C;
        float inv = 1.0f / sqrtf(running_var[c] + eps);
        float v = (x[i] - running_mean[c]) * inv * gamma[c] + beta[c];
        y[i] = (relu && v < 0.0f) ? 0.0f : v;
    }
}

// The eval-mode normalisation as a per-channel affine map for a fused convolution
// (conv2d_fwd_bn*, conv.cu / conv_tc.cu): ss[c] = scale = gamma / sqrt(var + eps),
// ss[C + c] = shift = beta - mean * scale, computed in f64 and rounded to f32 (as the CPU's
// eval_scale_shift). One thread per channel.
extern "C" __global__ void bn_eval_fold(const float* __restrict__ gamma, const float* __restrict__ beta,
                                        const float* __restrict__ running_mean,
                                        const float* __restrict__ running_var, float* __restrict__ ss, int C,
                                        double eps) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double g = (double)gamma[c] / sqrt((double)running_var[c] + eps);
    ss[c] = (float)g;
    // No FMA contraction: the product rounded on its own, as on the CPU.
    ss[C + c] = (float)__dsub_rn((double)beta[c], __dmul_rn((double)running_mean[c], g));
}

// Backward, grid (S, C): part1 = sum g, part2 = sum g * xhat, g = dy masked by (y > 0) when relu.
extern "C" __global__ void bn_bwd_partial(const float* __restrict__ x, const float* __restrict__ y,
                                          const float* __restrict__ dy, const float* __restrict__ save_mean,
                                          const float* __restrict__ save_invstd, double* __restrict__ part1,
                                          double* __restrict__ part2, int N, int C, int HW, int chunk, int relu) {
    __shared__ double sh[33];
    const int s = blockIdx.x, c = blockIdx.y, S = gridDim.x;
    const long long cnt = (long long)N * HW;
    const long long beg = (long long)s * chunk, end = min(cnt, beg + chunk);
    const double mean = (double)save_mean[c], invstd = (double)save_invstd[c];
    double a = 0.0, b = 0.0;
    for (long long j = beg + threadIdx.x; j < end; j += blockDim.x) {
        size_t k = bn_index((int)j, c, C, HW);
        float g = dy[k];
        if (relu && !(y[k] > 0.0f)) g = 0.0f;
        a += (double)g;
        b += (double)g * (((double)x[k] - mean) * invstd);
    }
    a = block_sum_d(a, sh);
    b = block_sum_d(b, sh);
    if (threadIdx.x == 0) {
        part1[(size_t)c * S + s] = a;
        part2[(size_t)c * S + s] = b;
    }
}

// The backward's partial sums over channels-last x, y, dy ([cnt pixels][C], NHWC): part1 =
// sum g, part2 = sum g * xhat, as bn_bwd_partial, in the same layout (part[c * S + s]: chunk s
// of `chunk` consecutive pixels of channel c), so that bn_bwd_finalize combines them. Grid
// (S, ceil(C / CT)), 256 threads: thread t takes channel blockIdx.y * CT + t % CT (the
// element's index % C) and pixels beg + t / CT, stepping by P = 256 / CT, so that
// consecutive threads read consecutive channels of a pixel (coalesced along the channels).
// Each thread sums in f64 in a fixed order, then one thread per channel adds the P row sums
// in order: deterministic, though not in bn_bwd_partial's order (the f64 sums may differ in
// their last bits).
// St: float, or unsigned short for x and y in bf16 storage (bn_bwd_partial_nhwc_bf16).
template <typename St>
__device__ void bn_bwd_partial_nhwc_t(const St* __restrict__ x, const St* __restrict__ y, const float* __restrict__ dy,
                    const float* __restrict__ save_mean, const float* __restrict__ save_invstd,
                    double* __restrict__ part1, double* __restrict__ part2, int cnt, int C, int CT,
                    int chunk, int relu) {
    __shared__ double sa[256], sb[256];
    const int s = blockIdx.x, S = gridDim.x;
    const int P = (int)blockDim.x / CT;
    const int lane = (int)threadIdx.x % CT, row = (int)threadIdx.x / CT;
    const int c = (int)blockIdx.y * CT + lane;
    const long long beg = (long long)s * chunk, end = min((long long)cnt, beg + chunk);
    double a = 0.0, b = 0.0;
    if (row < P && c < C) {
        const double mean = (double)save_mean[c], invstd = (double)save_invstd[c];
        for (long long p = beg + row; p < end; p += P) {
            const size_t k = (size_t)p * C + c;
            float g = dy[k];
            if (relu && !(bn_load(y, k) > 0.0f)) g = 0.0f;
            a += (double)g;
            b += (double)g * (((double)bn_load(x, k) - mean) * invstd);
        }
    }
    sa[threadIdx.x] = a;
    sb[threadIdx.x] = b;
    __syncthreads();
    if (row == 0 && c < C) {
        double ta = 0.0, tb = 0.0;
        for (int r = 0; r < P; ++r) {
            ta += sa[r * CT + lane];
            tb += sb[r * CT + lane];
        }
        part1[(size_t)c * S + s] = ta;
        part2[(size_t)c * S + s] = tb;
    }
}
extern "C" __global__ void __launch_bounds__(256)
bn_bwd_partial_nhwc(const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ dy,
                    const float* __restrict__ save_mean, const float* __restrict__ save_invstd,
                    double* __restrict__ part1, double* __restrict__ part2, int cnt, int C, int CT,
                    int chunk, int relu) {
    bn_bwd_partial_nhwc_t(x, y, dy, save_mean, save_invstd, part1, part2, cnt, C, CT, chunk, relu);
}
extern "C" __global__ void __launch_bounds__(256)
bn_bwd_partial_nhwc_bf16(const unsigned short* __restrict__ x, const unsigned short* __restrict__ y,
                         const float* __restrict__ dy, const float* __restrict__ save_mean,
                         const float* __restrict__ save_invstd, double* __restrict__ part1,
                         double* __restrict__ part2, int cnt, int C, int CT, int chunk, int relu) {
    bn_bwd_partial_nhwc_t(x, y, dy, save_mean, save_invstd, part1, part2, cnt, C, CT, chunk, relu);
}

// One thread per channel: stats[2c] = sum g, stats[2c+1] = sum g*xhat; dbeta, dgamma.
extern "C" __global__ void bn_bwd_finalize(const double* __restrict__ part1, const double* __restrict__ part2,
                                           double* __restrict__ stats, float* __restrict__ dgamma,
                                           float* __restrict__ dbeta, int C, int S) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double a = 0.0, b = 0.0;
    for (int k = 0; k < S; ++k) {
        a += part1[(size_t)c * S + k];
        b += part2[(size_t)c * S + k];
    }
    stats[2 * c] = a;
    stats[2 * c + 1] = b;
    dbeta[c] = (float)a;
    dgamma[c] = (float)b;
}

// dx = gamma*invstd/cnt * (cnt*g - sum g - xhat * sum(g*xhat)).
// St: float, or unsigned short for x, y and dx in bf16 storage (bn_bwd_apply_bf16: dx rounded
// from the f32 value bn_bwd_apply writes).
template <typename St>
__device__ void bn_bwd_apply_t(const St* __restrict__ x, const St* __restrict__ y,
                               const float* __restrict__ dy, const float* __restrict__ gamma,
                               const float* __restrict__ save_mean, const float* __restrict__ save_invstd,
                               const double* __restrict__ stats, St* __restrict__ dx, int total,
                               int C, int HW, double cnt, int relu) {
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < (size_t)total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)i0;
        int c = (i / HW) % C;
        float g = dy[i];
        if (relu && !(bn_load(y, i) > 0.0f)) g = 0.0f;
        double invstd = (double)save_invstd[c];
        double xhat = ((double)bn_load(x, i) - (double)save_mean[c]) * invstd;
        double k = (double)gamma[c] * invstd / cnt;
        bn_store(dx, i, (float)(k * (cnt * (double)g - stats[2 * c] - xhat * stats[2 * c + 1])));
    }
}
extern "C" __global__ void bn_bwd_apply(const float* __restrict__ x, const float* __restrict__ y,
                                        const float* __restrict__ dy, const float* __restrict__ gamma,
                                        const float* __restrict__ save_mean,
                                        const float* __restrict__ save_invstd,
                                        const double* __restrict__ stats, float* __restrict__ dx, int total,
                                        int C, int HW, double cnt, int relu) {
    bn_bwd_apply_t(x, y, dy, gamma, save_mean, save_invstd, stats, dx, total, C, HW, cnt, relu);
}
extern "C" __global__ void bn_bwd_apply_bf16(const unsigned short* __restrict__ x, const unsigned short* __restrict__ y,
                                             const float* __restrict__ dy, const float* __restrict__ gamma,
                                             const float* __restrict__ save_mean,
                                             const float* __restrict__ save_invstd,
                                             const double* __restrict__ stats, unsigned short* __restrict__ dx,
                                             int total, int C, int HW, double cnt, int relu) {
    bn_bwd_apply_t(x, y, dy, gamma, save_mean, save_invstd, stats, dx, total, C, HW, cnt, relu);
}
