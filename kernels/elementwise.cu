// Elementwise ops over flat f32 buffers: fill, ReLU fwd/bwd (bwd also reading y in bf16 storage), the residual join
// (add + ReLU), y += x, y *= alpha. Grid-stride loops with a 64-bit index (an int index would
// overflow on its last step when n is near INT_MAX); n fits in an int (checked on the host).

extern "C" __global__ void fill_f32(float* __restrict__ y, float value, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        y[i] = value;
    }
}

extern "C" __global__ void relu_fwd(const float* __restrict__ x, float* __restrict__ y, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v > 0.0f ? v : 0.0f;
    }
}

extern "C" __global__ void relu_bwd(const float* __restrict__ y, const float* __restrict__ dy,
                                    float* __restrict__ dx, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
    }
}

// relu_bwd with y in bf16 storage (the channels-last training activations at --precision bf16,
// channels.cu: value i the 16-bit half at index i of the packed buffer): dx = dy * (y > 0),
// y's value read exactly (the sign and zero test need only its bits).
extern "C" __global__ void relu_bwd_bf16(const unsigned short* __restrict__ y, const float* __restrict__ dy,
                                         float* __restrict__ dx, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = __uint_as_float((unsigned int)y[i] << 16);
        dx[i] = v > 0.0f ? dy[i] : 0.0f;
    }
}

extern "C" __global__ void add_relu_fwd(const float* __restrict__ a, const float* __restrict__ b,
                                        float* __restrict__ y, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float v = a[i] + b[i];
        y[i] = v > 0.0f ? v : 0.0f;
    }
}

extern "C" __global__ void add_assign(float* __restrict__ y, const float* __restrict__ x, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        y[i] += x[i];
    }
}

extern "C" __global__ void scale_assign(float* __restrict__ y, float alpha, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        y[i] *= alpha;
    }
}
