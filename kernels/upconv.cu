// Transposed convolution whose kernel equals its stride (the U-Net's ConvTranspose2d 2x2/2),
// with bias, writing channels [y_off, y_off + c_out) of a wider output y [n, y_c, k*h, k*w].
// Windows do not overlap: each output element is one dot product over the input channels,
// y[img, y_off + co, k*i + a, k*j + b] = bias[co] + sum_ci x[img, ci, i, j] * w[ci, co, a, b]
// (w in PyTorch's [c_in, c_out, k, k] layout). The data gradient is one dot product per input
// element over (co, a, b); the weight gradient one block per weight element, a fixed-order
// f64 reduction over the batch and the pixels (deterministic). The bias gradient is the
// channel sum of kernels/bias.cu over the slice.

__device__ __forceinline__ double upconv_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// One thread per element of the slice: total = n * c_out * (k*h) * (k*w).
extern "C" __global__ void upconv_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ bias, float* __restrict__ y,
                                      int n, int c_in, int h, int wd, int c_out, int k, int y_c,
                                      int y_off) {
    const int oh = k * h, ow = k * wd;
    const long long total = (long long)n * c_out * oh * ow;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int ox = (int)(idx % ow);
        long long t = idx / ow;
        const int oy = (int)(t % oh);
        t /= oh;
        const int co = (int)(t % c_out);
        const long long img = t / c_out;
        const int i = oy / k, a = oy % k, j = ox / k, b = ox % k;
        const float* xp = x + (size_t)img * c_in * h * wd + (size_t)i * wd + j;
        const float* wp = w + ((size_t)co * k + a) * k + b;
        const size_t hw = (size_t)h * wd, wstride = (size_t)c_out * k * k;
        float acc = 0.0f;
        for (int ci = 0; ci < c_in; ++ci) acc = fmaf(xp[ci * hw], wp[ci * wstride], acc);
        y[((size_t)(img * y_c + y_off + co) * oh + oy) * ow + ox] = acc + bias[co];
    }
}

// One thread per input element: dx[img, ci, i, j] = sum_{co,a,b} w[ci, co, a, b] *
// dy[img, y_off + co, k*i + a, k*j + b].
extern "C" __global__ void upconv_bwd_data(const float* __restrict__ dy,
                                           const float* __restrict__ w, float* __restrict__ dx,
                                           int n, int c_in, int h, int wd, int c_out, int k,
                                           int y_c, int y_off) {
    const int oh = k * h, ow = k * wd;
    const long long total = (long long)n * c_in * h * wd;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(idx % wd);
        long long t = idx / wd;
        const int i = (int)(t % h);
        t /= h;
        const int ci = (int)(t % c_in);
        const long long img = t / c_in;
        const float* wp = w + (size_t)ci * c_out * k * k;
        float acc = 0.0f;
        for (int co = 0; co < c_out; ++co) {
            const float* dp =
                dy + ((size_t)(img * y_c + y_off + co) * oh + (size_t)k * i) * ow + (size_t)k * j;
            for (int a = 0; a < k; ++a)
                for (int b = 0; b < k; ++b)
                    acc = fmaf(wp[(co * k + a) * k + b], dp[(size_t)a * ow + b], acc);
        }
        dx[idx] = acc;
    }
}

// One block (256 threads) per weight element (ci, co, a, b) = blockIdx.x in w's layout:
// dw = sum over img, i, j of x[img, ci, i, j] * dy[img, y_off + co, k*i + a, k*j + b].
extern "C" __global__ void upconv_bwd_weight(const float* __restrict__ x,
                                             const float* __restrict__ dy,
                                             float* __restrict__ dw, int n, int c_in, int h,
                                             int wd, int c_out, int k, int y_c, int y_off) {
    __shared__ double warps[32];
    const int oh = k * h, ow = k * wd;
    const long long e = blockIdx.x;
    const int b = (int)(e % k), a = (int)((e / k) % k);
    const int co = (int)((e / ((long long)k * k)) % c_out);
    const int ci = (int)(e / ((long long)k * k * c_out));
    const long long hw = (long long)h * wd, count = (long long)n * hw;
    double acc = 0.0;
    for (long long q = threadIdx.x; q < count; q += blockDim.x) {
        const long long img = q / hw, p = q % hw;
        const long long i = p / wd, j = p % wd;
        const float xv = x[(size_t)((img * c_in + ci) * hw + p)];
        const float g = dy[(size_t)(((img * y_c + y_off + co) * oh + k * i + a) * ow + k * j + b)];
        acc += (double)xv * (double)g;
    }
    acc = upconv_warp_sum(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        double v = lane < nw ? warps[lane] : 0.0;
        v = upconv_warp_sum(v);
        if (lane == 0) dw[e] = (float)v;
    }
}
