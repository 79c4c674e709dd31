// Max pooling (padding is -inf) and global average pooling, NCHW.
// The max-pool backward is a gather: each input element visits the outputs whose window
// holds it and takes dy from those whose first maximum (row-major scan) it is; the scan runs
// only for a window whose maximum equals the element. No atomics, so the result is
// deterministic and the sum order per input is output-row-major.

extern "C" __global__ void maxpool2d_fwd(const float* __restrict__ x, float* __restrict__ y,
                                         int NC, int H, int W, int K, int stride, int pad, int OH,
                                         int OW) {
    const size_t total = (size_t)NC * OH * OW;  // < 2^31 (checked on the host)
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)i0;
        int ow = i % OW, t = i / OW, oh = t % OH, nc = t / OH;
        const float* xp = x + (size_t)nc * H * W;
        int h0 = oh * stride - pad, w0 = ow * stride - pad;
        float best = __int_as_float(0xff800000); // -inf
        for (int kh = 0; kh < K; ++kh) {
            int ih = h0 + kh;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < K; ++kw) {
                int iw = w0 + kw;
                if (iw < 0 || iw >= W) continue;
                float v = xp[(size_t)ih * W + iw];
                // NaN wins and stays, as in PyTorch and the CPU reference.
                if ((v > best || v != v) && best == best) best = v;
            }
        }
        y[i] = best;
    }
}

extern "C" __global__ void maxpool2d_bwd(const float* __restrict__ x, const float* __restrict__ y,
                                         const float* __restrict__ dy, float* __restrict__ dx,
                                         int NC, int H, int W, int K, int stride, int pad, int OH,
                                         int OW) {
    const size_t total = (size_t)NC * H * W;  // < 2^31 (checked on the host)
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)i0;
        int iw = i % W, t = i / W, ih = t % H, nc = t / H;
        const float* xp = x + (size_t)nc * H * W;
        const float* yp = y + (size_t)nc * OH * OW;
        const float* dyp = dy + (size_t)nc * OH * OW;
        // outputs whose window [o*stride - pad, o*stride - pad + K) contains ih
        int oh_lo = ih + pad - K + 1;
        oh_lo = oh_lo <= 0 ? 0 : (oh_lo + stride - 1) / stride;
        int oh_hi = min(OH - 1, (ih + pad) / stride);
        int ow_lo = iw + pad - K + 1;
        ow_lo = ow_lo <= 0 ? 0 : (ow_lo + stride - 1) / stride;
        int ow_hi = min(OW - 1, (iw + pad) / stride);
        const float self = xp[(size_t)ih * W + iw];
        float g = 0.0f;
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
            for (int ow = ow_lo; ow <= ow_hi; ++ow) {
                float m = yp[oh * OW + ow];
                // Only an element equal to the window's maximum can be its first maximum:
                // the others (most) skip the scan (on an H200 the scan for every element
                // made this one launch 5.4 ms of a 63 ms ResNet-18 train step).
                if (!(self == m || (m != m && self != self))) continue;
                int h0 = oh * stride - pad, w0 = ow * stride - pad;
                // first position of the maximum in this window, row-major
                int fh = -1, fw = -1;
                for (int kh = 0; kh < K && fh < 0; ++kh) {
                    int hh = h0 + kh;
                    if (hh < 0 || hh >= H) continue;
                    for (int kw = 0; kw < K; ++kw) {
                        int ww = w0 + kw;
                        if (ww < 0 || ww >= W) continue;
                        float v = xp[(size_t)hh * W + ww];
                        if (v == m || (m != m && v != v)) {
                            fh = hh;
                            fw = ww;
                            break;
                        }
                    }
                }
                if (fh == ih && fw == iw) g += dyp[oh * OW + ow];
            }
        }
        dx[i] = g;
    }
}

// One warp per row of [rows, hw]: y[r] = mean(x[r, :]).
extern "C" __global__ void gap_fwd(const float* __restrict__ x, float* __restrict__ y, int rows,
                                   int hw) {
    const size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= (size_t)rows) return;
    const float* xr = x + warp * hw;
    float s = 0.0f;
    for (size_t i = lane; i < (size_t)hw; i += 32) s += xr[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) y[warp] = s / (float)hw;
}

extern "C" __global__ void gap_bwd(const float* __restrict__ dy, float* __restrict__ dx, int rows,
                                   int hw) {
    const size_t total = (size_t)rows * hw;
    float inv = 1.0f / (float)hw;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        dx[i] = dy[i / hw] * inv;
    }
}
