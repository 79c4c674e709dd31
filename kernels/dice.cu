// The segmentation output: the sigmoid (forward and backward) and the soft Dice loss
// 1 - mean_c(2 * sum(p * t) / (sum(p + t) + eps)) over [n, c, hw] with its gradient
// dL/dp = a[ch] * t + b[ch]. The sums are deterministic f64 reductions: a 2-D grid (splits,
// channels) of fixed-order block sums, then one thread adds the splits in order and writes
// the loss and the per-channel coefficients.

__device__ __forceinline__ double dice_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void sigmoid_fwd(const float* __restrict__ x, float* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = x[i];
        if (v >= 0.0f) {
            y[i] = 1.0f / (1.0f + expf(-v));
        } else {
            float e = expf(v);
            y[i] = e / (1.0f + e);
        }
    }
}

extern "C" __global__ void sigmoid_bwd(const float* __restrict__ y, const float* __restrict__ dy,
                                       float* __restrict__ dx, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float s = y[i];
        dx[i] = dy[i] * s * (1.0f - s);
    }
}

// Block (split, ch): sums of p*t and p+t over its chunk of the channel's n*hw values.
// Launch with (splits, c) blocks of 256 threads.
extern "C" __global__ void dice_partial(const float* __restrict__ p, const float* __restrict__ t,
                                        double* __restrict__ part_inter,
                                        double* __restrict__ part_total, int n, int c, int hw,
                                        int chunk) {
    __shared__ double wi[32], wt[32];
    const int ch = blockIdx.y, split = blockIdx.x;
    const long long count = (long long)n * hw;
    const long long q0 = (long long)split * chunk;
    long long q1 = q0 + chunk;
    if (q1 > count) q1 = count;
    double inter = 0.0, total = 0.0;
    for (long long q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
        const long long img = q / hw, px = q % hw;
        const size_t k = (size_t)((img * c + ch) * hw + px);
        const double pv = (double)p[k], tv = (double)t[k];
        inter += pv * tv;
        total += pv + tv;
    }
    inter = dice_warp_sum(inter);
    total = dice_warp_sum(total);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        wi[warp] = inter;
        wt[warp] = total;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        double a = lane < nw ? wi[lane] : 0.0, b = lane < nw ? wt[lane] : 0.0;
        a = dice_warp_sum(a);
        b = dice_warp_sum(b);
        if (lane == 0) {
            part_inter[(size_t)ch * gridDim.x + split] = a;
            part_total[(size_t)ch * gridDim.x + split] = b;
        }
    }
}

// One thread: out[0] = loss, out[1] = 1 if a denominator is 0 (else 0), coef[2ch], coef[2ch+1]
// = the gradient's a and b of channel ch.
extern "C" __global__ void dice_finalize(const double* __restrict__ part_inter,
                                         const double* __restrict__ part_total,
                                         double* __restrict__ coef, double* __restrict__ out,
                                         int c, int splits, double eps) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const double inv_c = 1.0 / (double)c;
    double loss = 1.0, zero_den = 0.0;
    for (int ch = 0; ch < c; ++ch) {
        double inter = 0.0, total = 0.0;
        for (int k = 0; k < splits; ++k) {
            inter += part_inter[(size_t)ch * splits + k];
            total += part_total[(size_t)ch * splits + k];
        }
        const double den = total + eps;
        if (den == 0.0) zero_den = 1.0;
        loss -= inv_c * 2.0 * inter / den;
        coef[2 * ch] = -inv_c * 2.0 / den;
        coef[2 * ch + 1] = inv_c * 2.0 * inter / (den * den);
    }
    out[0] = loss;
    out[1] = zero_den;
}

// dp[i] = a[ch] * t[i] + b[ch], ch the channel of element i.
extern "C" __global__ void dice_grad(const float* __restrict__ t, const double* __restrict__ coef,
                                     float* __restrict__ dp, int total, int c, int hw) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int ch = (i / hw) % c;
        const float a = (float)coef[2 * ch], b = (float)coef[2 * ch + 1];
        dp[i] = a * t[i] + b;
    }
}
