// Mean binary cross-entropy with logits and PyTorch's pos_weight, numerically stable.
// One block: the loss is summed in f64 with a fixed tree order (deterministic), the
// gradient is written per element.

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Launch with one block of 256 threads.
extern "C" __global__ void bce_with_logits(const float* __restrict__ logits,
                                           const float* __restrict__ targets, float pos_weight,
                                           float* __restrict__ dlogits, double* __restrict__ loss,
                                           int n) {
    __shared__ double partial[32];
    double acc = 0.0;
    // f64 per element: there are few logits (one per slice), and f32 loses the gradient
    // of a confidently right logit to cancellation in sigma(x) - 1.
    const double inv_n = 1.0 / (double)n, pw = (double)pos_weight;
    for (size_t i = threadIdx.x; i < (size_t)n; i += blockDim.x) {
        double x = (double)logits[i];
        double y = (double)targets[i];
        // -log sigma(x) = softplus(-x); -log(1 - sigma(x)) = softplus(x)
        double sp_pos = log1p(exp(-fabs(x))) + fmax(x, 0.0);
        double sp_neg = log1p(exp(-fabs(x))) + fmax(-x, 0.0);
        acc += pw * y * sp_neg + (1.0 - y) * sp_pos;
        double e = exp(-fabs(x));
        double s = x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);      // sigma(x)
        double sn = x >= 0.0 ? e / (1.0 + e) : 1.0 / (1.0 + e);     // sigma(-x) = 1 - sigma(x)
        dlogits[i] = (float)(((1.0 - y) * s - pw * y * sn) * inv_n);
    }
    acc = warp_sum_d(acc);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        double v = lane < nw ? partial[lane] : 0.0;
        v = warp_sum_d(v);
        if (lane == 0) loss[0] = v / (double)n;
    }
}
