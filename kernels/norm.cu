// Batch norm over x [n, c, hw], statistics per channel. Training forward and backward use
// one block per channel with f64 partial sums (two passes for the variance: mean first,
// then squared deviations), so the result does not depend on the launch shape beyond
// rounding of the final f32 values. Eval forward is elementwise.

#define BN_THREADS 512

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sum; every thread gets the result. `sh` holds >= 32 doubles.
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

// grid = C blocks of BN_THREADS.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_train_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
             const float* __restrict__ beta, float* __restrict__ running_mean,
             float* __restrict__ running_var, float* __restrict__ save_mean,
             float* __restrict__ save_invstd, float* __restrict__ y, int N, int C, int HW,
             double eps, double momentum, int relu) {
    __shared__ double sh[33];
    const int c = blockIdx.x;
    const double cnt = (double)N * (double)HW;
    double s = 0.0;
    for (int n = 0; n < N; ++n) {
        const float* xc = x + ((size_t)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) s += (double)xc[i];
    }
    const double mean = block_sum_d(s, sh) / cnt;
    double ss = 0.0;
    for (int n = 0; n < N; ++n) {
        const float* xc = x + ((size_t)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            double d = (double)xc[i] - mean;
            ss += d * d;
        }
    }
    ss = block_sum_d(ss, sh);
    const double var = ss / cnt;
    const double invstd = 1.0 / sqrt(var + eps);
    if (threadIdx.x == 0) {
        double unbiased = cnt > 1.0 ? ss / (cnt - 1.0) : var;
        running_mean[c] = (float)((1.0 - momentum) * (double)running_mean[c] + momentum * mean);
        running_var[c] = (float)((1.0 - momentum) * (double)running_var[c] + momentum * unbiased);
        save_mean[c] = (float)mean;
        save_invstd[c] = (float)invstd;
    }
    const float fm = (float)mean, fi = (float)invstd, g = gamma[c], b = beta[c];
    for (int n = 0; n < N; ++n) {
        const float* xc = x + ((size_t)n * C + c) * HW;
        float* yc = y + ((size_t)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            float v = (xc[i] - fm) * fi * g + b;
            yc[i] = (relu && v < 0.0f) ? 0.0f : v;
        }
    }
}

extern "C" __global__ void bn_eval_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                       const float* __restrict__ beta,
                                       const float* __restrict__ running_mean,
                                       const float* __restrict__ running_var, float* __restrict__ y,
                                       int total, int C, int HW, float eps, int relu) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int c = (i / HW) % C;
        float inv = 1.0f / sqrtf(running_var[c] + eps);
        float v = (x[i] - running_mean[c]) * inv * gamma[c] + beta[c];
        y[i] = (relu && v < 0.0f) ? 0.0f : v;
    }
}

// grid = C blocks of BN_THREADS. dy is masked by (y > 0) when relu.
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd(const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ dy,
       const float* __restrict__ gamma, const float* __restrict__ save_mean,
       const float* __restrict__ save_invstd, float* __restrict__ dx, float* __restrict__ dgamma,
       float* __restrict__ dbeta, int N, int C, int HW, int relu) {
    __shared__ double sh[33];
    const int c = blockIdx.x;
    const double cnt = (double)N * (double)HW;
    const double mean = (double)save_mean[c], invstd = (double)save_invstd[c];
    double sdy = 0.0, sdyx = 0.0;
    for (int n = 0; n < N; ++n) {
        size_t base = ((size_t)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            float g = dy[base + i];
            if (relu && !(y[base + i] > 0.0f)) g = 0.0f;
            sdy += (double)g;
            sdyx += (double)g * (((double)x[base + i] - mean) * invstd);
        }
    }
    sdy = block_sum_d(sdy, sh);
    sdyx = block_sum_d(sdyx, sh);
    if (threadIdx.x == 0) {
        dbeta[c] = (float)sdy;
        dgamma[c] = (float)sdyx;
    }
    // dx = gamma*invstd/cnt * (cnt*dy - sum(dy) - xhat*sum(dy*xhat))
    const double k = (double)gamma[c] * invstd / cnt;
    const double mdy = sdy, mdyx = sdyx;
    for (int n = 0; n < N; ++n) {
        size_t base = ((size_t)n * C + c) * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            float g = dy[base + i];
            if (relu && !(y[base + i] > 0.0f)) g = 0.0f;
            double xhat = ((double)x[base + i] - mean) * invstd;
            dx[base + i] = (float)(k * (cnt * (double)g - mdy - xhat * mdyx));
        }
    }
}
