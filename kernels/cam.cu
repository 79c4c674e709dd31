// Class activation maps: weighting of the last block's features, Grad-CAM, bilinear
// resize (PyTorch's align_corners=False) and per-row min-max normalisation.

// cam[i, p] = sum_c weights[c] * features[i, c, p], c ascending.
extern "C" __global__ void cam_weight(const float* __restrict__ features, const float* __restrict__ weights,
                                      float* __restrict__ cam, int n, int c, int hw) {
    const size_t total = (size_t)n * hw;  // < 2^31 (checked on the host)
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int idx = (int)i0;
        int i = idx / hw, p = idx - i * hw;
        const float* f = features + (size_t)i * c * hw + p;
        float s = 0.0f;
        for (int k = 0; k < c; ++k) s = fmaf(weights[k], f[(size_t)k * hw], s);
        cam[idx] = s;
    }
}

// One warp per row of [rows, hw]: out[r] = mean(x[r, :]).
extern "C" __global__ void row_mean(const float* __restrict__ x, float* __restrict__ out, int rows, int hw) {
    const size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= (size_t)rows) return;
    const float* xr = x + warp * hw;
    float s = 0.0f;
    for (size_t i = lane; i < (size_t)hw; i += 32) s += xr[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) out[warp] = s / (float)hw;
}

// out[i, p] = relu(sum_c alpha[i, c] * features[i, c, p]).
extern "C" __global__ void gradcam_combine(const float* __restrict__ features, const float* __restrict__ alpha,
                                           float* __restrict__ out, int n, int c, int hw) {
    const size_t total = (size_t)n * hw;  // < 2^31 (checked on the host)
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int idx = (int)i0;
        int i = idx / hw, p = idx - i * hw;
        const float* f = features + (size_t)i * c * hw + p;
        const float* a = alpha + (size_t)i * c;
        float s = 0.0f;
        for (int k = 0; k < c; ++k) s = fmaf(a[k], f[(size_t)k * hw], s);
        out[idx] = s > 0.0f ? s : 0.0f;
    }
}

__device__ __forceinline__ void source_index(int dst, float scale, int in, int& i0, int& i1, float& l1) {
    float src = ((float)dst + 0.5f) * scale - 0.5f;
    if (src < 0.0f) src = 0.0f;
    i0 = (int)src;
    if (i0 > in - 1) i0 = in - 1;
    i1 = i0 < in - 1 ? i0 + 1 : i0;
    l1 = src - (float)i0;
}

// [n, h, w] -> [n, oh, ow], align_corners=False, scale = in / out.
extern "C" __global__ void upsample_bilinear(const float* __restrict__ x, float* __restrict__ y, int n,
                                             int h, int w, int oh, int ow) {
    const size_t total = (size_t)n * oh * ow;  // < 2^31 (checked on the host)
    float sh = (float)h / (float)oh, sw = (float)w / (float)ow;
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int idx = (int)i0;
        int ox = idx % ow, t = idx / ow, oy = t % oh, i = t / oh;
        int y0, y1, x0, x1;
        float ly, lx;
        source_index(oy, sh, h, y0, y1, ly);
        source_index(ox, sw, w, x0, x1, lx);
        const float* xi = x + (size_t)i * h * w;
        float v00 = xi[y0 * w + x0], v01 = xi[y0 * w + x1], v10 = xi[y1 * w + x0], v11 = xi[y1 * w + x1];
        y[idx] = (1.0f - ly) * ((1.0f - lx) * v00 + lx * v01) + ly * ((1.0f - lx) * v10 + lx * v11);
    }
}

// The block's minimum and maximum of every thread's (lo, hi), returned to every thread
// (blockDim.x a multiple of 32, at most 1024; every thread of the block calls it).
__device__ void block_min_max(float& lo, float& hi) {
    __shared__ float smin[32], smax[32];
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_down_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_down_sync(0xffffffffu, hi, o));
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        smin[warp] = lo;
        smax[warp] = hi;
    }
    __syncthreads();
    if (warp == 0) {
        lo = lane < nw ? smin[lane] : __int_as_float(0x7f800000);
        hi = lane < nw ? smax[lane] : __int_as_float(0xff800000);
        for (int o = 16; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_down_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_down_sync(0xffffffffu, hi, o));
        }
        if (lane == 0) {
            smin[0] = lo;
            smax[0] = hi;
        }
    }
    __syncthreads();
    lo = smin[0];
    hi = smax[0];
}

// One block (256 threads) per row: (x - min) / (max - min); a constant row becomes zeros.
extern "C" __global__ void minmax_normalize(const float* __restrict__ x, float* __restrict__ y, int n, int len) {
    const float* xr = x + (size_t)blockIdx.x * len;
    float* yr = y + (size_t)blockIdx.x * len;
    float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
    for (size_t i = threadIdx.x; i < (size_t)len; i += blockDim.x) {
        float v = xr[i];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    block_min_max(lo, hi);
    float range = hi - lo;
    for (size_t i = threadIdx.x; i < (size_t)len; i += blockDim.x) yr[i] = range > 0.0f ? (xr[i] - lo) / range : 0.0f;
}

// The whole vanilla-CAM tail in one kernel, one block per slice i: the weighted sum of the
// features (as cam_weight) into cam[i] and into shared memory, then the bilinear resize to
// oh x ow (as upsample_bilinear) read twice from shared memory: once for the slice's min
// and max, once to write (v - min) / (max - min) (as minmax_normalize; a constant slice
// becomes zeros). Nothing at the input resolution is written but the normalised map.
// Dynamic shared memory: fh * fw floats (the host checks the size).
extern "C" __global__ void cam_fused(const float* __restrict__ features, const float* __restrict__ weights,
                                     float* __restrict__ cam, float* __restrict__ norm, int n, int c, int fh, int fw,
                                     int oh, int ow) {
    extern __shared__ float smap[];
    const int i = blockIdx.x;
    const int hw = fh * fw, len = oh * ow;
    const float* f = features + (size_t)i * c * hw;
    for (int p = threadIdx.x; p < hw; p += blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < c; ++k) s = fmaf(weights[k], f[(size_t)k * hw + p], s);
        smap[p] = s;
        cam[(size_t)i * hw + p] = s;
    }
    __syncthreads();
    const float sh = (float)fh / (float)oh, sw = (float)fw / (float)ow;
    float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
    for (int q = threadIdx.x; q < len; q += blockDim.x) {
        int ox = q % ow, oy = q / ow;
        int y0, y1, x0, x1;
        float ly, lx;
        source_index(oy, sh, fh, y0, y1, ly);
        source_index(ox, sw, fw, x0, x1, lx);
        float v00 = smap[y0 * fw + x0], v01 = smap[y0 * fw + x1], v10 = smap[y1 * fw + x0], v11 = smap[y1 * fw + x1];
        float v = (1.0f - ly) * ((1.0f - lx) * v00 + lx * v01) + ly * ((1.0f - lx) * v10 + lx * v11);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    block_min_max(lo, hi);
    const float range = hi - lo;
    float* out = norm + (size_t)i * len;
    for (int q = threadIdx.x; q < len; q += blockDim.x) {
        int ox = q % ow, oy = q / ow;
        int y0, y1, x0, x1;
        float ly, lx;
        source_index(oy, sh, fh, y0, y1, ly);
        source_index(ox, sw, fw, x0, x1, lx);
        float v00 = smap[y0 * fw + x0], v01 = smap[y0 * fw + x1], v10 = smap[y1 * fw + x0], v11 = smap[y1 * fw + x1];
        float v = (1.0f - ly) * ((1.0f - lx) * v00 + lx * v01) + ly * ((1.0f - lx) * v10 + lx * v11);
        out[q] = range > 0.0f ? (v - lo) / range : 0.0f;
    }
}
