// Optimizer steps, one thread per parameter, PyTorch's update rules in f32.

// SGD with momentum (dampening 0, no Nesterov): g' = g + wd*p; m = momentum*m + g'
// (m = g' on the first step); p -= lr*m.
extern "C" __global__ void sgd_step(float* __restrict__ p, const float* __restrict__ g,
                                    float* __restrict__ m, float lr, float momentum,
                                    float weight_decay, int first_step, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        float gi = g[i] + weight_decay * pi;
        float mi = first_step ? gi : momentum * m[i] + gi;
        m[i] = mi;
        p[i] = pi - lr * mi;
    }
}

// Adam with L2 weight decay; step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t),
// both computed on the host in f64 as PyTorch does.
extern "C" __global__ void adam_step(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, float beta1,
                                     float beta2, float eps, float weight_decay, float step_size,
                                     float bc2_sqrt, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        float gi = g[i] + weight_decay * pi;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi - step_size * (mi / denom);
    }
}

// The same two steps with the step-dependent scalars read from device memory (`hyper`),
// which the host writes before each launch of a captured CUDA graph: a graph replays the
// kernel arguments it was captured with, so a learning rate or a step count passed by value
// would be frozen at capture time. The arithmetic is exactly that of the kernels above.
// sgd_step_dev: hyper = {lr, first_step (0 or 1)}.
extern "C" __global__ void sgd_step_dev(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, const float* __restrict__ hyper,
                                        float momentum, float weight_decay, int n) {
    const float lr = hyper[0];
    const int first_step = hyper[1] != 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        float gi = g[i] + weight_decay * pi;
        float mi = first_step ? gi : momentum * m[i] + gi;
        m[i] = mi;
        p[i] = pi - lr * mi;
    }
}

// adam_step_dev: hyper = {step_size, bc2_sqrt} (adam_step's, computed on the host in f64).
extern "C" __global__ void adam_step_dev(float* __restrict__ p, const float* __restrict__ g,
                                         float* __restrict__ m, float* __restrict__ v,
                                         const float* __restrict__ hyper, float beta1, float beta2,
                                         float eps, float weight_decay, int n) {
    const float step_size = hyper[0], bc2_sqrt = hyper[1];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        float gi = g[i] + weight_decay * pi;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi - step_size * (mi / denom);
    }
}
