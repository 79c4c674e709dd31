// Per-channel bias of a convolution over [n, c, hw]: the forward add with the ReLU after it
// fused (in place), and the backward reduction db[ch] = sum over the batch and the pixels
// of dy, also over a channel slice of a wider buffer (the U-Net's up-convolution bias).
// The reduction is deterministic: a 2-D grid (splits, channels) of fixed-order f64 block
// sums, then one thread per channel adds its splits in order.

__device__ __forceinline__ double bias_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void bias_relu_assign(float* __restrict__ y, const float* __restrict__ b,
                                            int total, int c, int hw, int relu) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        float v = y[i] + b[(i / hw) % c];
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

// part[ch * gridDim.x + blockIdx.x] = sum of x[img, c_off + ch, p] over the block's chunk of
// the n*hw (img, p) pairs of channel ch = blockIdx.y; x is [n, c_total, hw].
// Launch with (splits, c) blocks of 256 threads.
extern "C" __global__ void channel_sum_partial(const float* __restrict__ x,
                                               double* __restrict__ part, int n, int c_total,
                                               int c_off, int hw, int chunk) {
    __shared__ double warps[32];
    const int ch = blockIdx.y, split = blockIdx.x;
    const long long count = (long long)n * hw;
    const long long q0 = (long long)split * chunk;
    long long q1 = q0 + chunk;
    if (q1 > count) q1 = count;
    double acc = 0.0;
    for (long long q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
        long long img = q / hw, p = q % hw;
        acc += (double)x[(img * c_total + c_off + ch) * hw + p];
    }
    acc = bias_warp_sum(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        double v = lane < nw ? warps[lane] : 0.0;
        v = bias_warp_sum(v);
        if (lane == 0) part[(size_t)ch * gridDim.x + split] = v;
    }
}

// out[ch] = sum over s < splits of part[ch * splits + s], in order.
extern "C" __global__ void channel_sum_finalize(const double* __restrict__ part,
                                                float* __restrict__ out, int c, int splits) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0;
    for (int k = 0; k < splits; ++k) s += part[(size_t)ch * splits + k];
    out[ch] = (float)s;
}
