// One LSTM layer (PyTorch gate order i, f, g, o; batch_first). The input projection of all
// steps is one GEMM (dense.cu's sgemm) before the recurrence; each step here is one fused
// kernel: recurrent product h_{t-1} . W_hh^T + projection + both biases + nonlinearities +
// c/h update. BPTT: per step a pointwise kernel (gate gradients, carried dc), then
// dh_{t-1} = dgates_t . W_hh as a GEMM; the weight gradients are GEMMs over all steps at the end.

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// grid = (ceil(H / 8), B), 256 threads (8 warps, one hidden unit each), dynamic shared H floats.
// pre [B, T, 4H] = x . W_ih^T (no bias); writes gates/c/h of step t.
extern "C" __global__ void __launch_bounds__(256)
lstm_step_fwd(const float* __restrict__ pre, const float* __restrict__ w_hh,
              const float* __restrict__ b_ih, const float* __restrict__ b_hh,
              float* __restrict__ h_seq, float* __restrict__ c_seq, float* __restrict__ gates,
              int B, int T, int H, int t) {
    extern __shared__ float h_prev[];
    const int b = blockIdx.y;
    for (int k = threadIdx.x; k < H; k += blockDim.x)
        h_prev[k] = t > 0 ? h_seq[((size_t)b * T + (t - 1)) * H + k] : 0.0f;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int u = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (u >= H) return;
    const float* wi = w_hh + (size_t)u * H;
    const float* wf = w_hh + (size_t)(H + u) * H;
    const float* wg = w_hh + (size_t)(2 * H + u) * H;
    const float* wo = w_hh + (size_t)(3 * H + u) * H;
    float di = 0.0f, df = 0.0f, dg = 0.0f, dob = 0.0f;
    for (int k = lane; k < H; k += 32) {
        float hk = h_prev[k];
        di = fmaf(wi[k], hk, di);
        df = fmaf(wf[k], hk, df);
        dg = fmaf(wg[k], hk, dg);
        dob = fmaf(wo[k], hk, dob);
    }
    for (int o = 16; o > 0; o >>= 1) {
        di += __shfl_xor_sync(0xffffffffu, di, o);
        df += __shfl_xor_sync(0xffffffffu, df, o);
        dg += __shfl_xor_sync(0xffffffffu, dg, o);
        dob += __shfl_xor_sync(0xffffffffu, dob, o);
    }
    if (lane != 0) return;
    const size_t row = (size_t)b * T + t;
    const float* p = pre + row * 4 * H;
    float ig = sigmoidf_(p[u] + b_ih[u] + b_hh[u] + di);
    float fg = sigmoidf_(p[H + u] + b_ih[H + u] + b_hh[H + u] + df);
    float gg = tanhf(p[2 * H + u] + b_ih[2 * H + u] + b_hh[2 * H + u] + dg);
    float og = sigmoidf_(p[3 * H + u] + b_ih[3 * H + u] + b_hh[3 * H + u] + dob);
    float c_prev = t > 0 ? c_seq[(row - 1) * H + u] : 0.0f;
    float c = fg * c_prev + ig * gg;
    float h = og * tanhf(c);
    float* gr = gates + row * 4 * H;
    gr[u] = ig;
    gr[H + u] = fg;
    gr[2 * H + u] = gg;
    gr[3 * H + u] = og;
    c_seq[row * H + u] = c;
    h_seq[row * H + u] = h;
}

// One thread per (b, u) of step t. dh_rec [B, H] is dL/dh_t from step t+1 (zero at the last
// step); dc [B, H] carries dL/dc_t in and dL/dc_{t-1} out. Writes pre-activation gate
// gradients dgates[b, t, :].
extern "C" __global__ void lstm_step_bwd(const float* __restrict__ gates, const float* __restrict__ c_seq,
                                         const float* __restrict__ dh_seq,
                                         const float* __restrict__ dh_rec, float* __restrict__ dc,
                                         float* __restrict__ dgates, int B, int T, int H, int t) {
    long long idx0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx0 >= (long long)B * H) return;
    const int idx = (int)idx0;
    int b = idx / H, u = idx - b * H;
    const size_t row = (size_t)b * T + t;
    const float* gr = gates + row * 4 * H;
    float ig = gr[u], fg = gr[H + u], gg = gr[2 * H + u], og = gr[3 * H + u];
    float c = c_seq[row * H + u];
    float c_prev = t > 0 ? c_seq[(row - 1) * H + u] : 0.0f;
    float tc = tanhf(c);
    float dh = dh_seq[row * H + u] + dh_rec[idx];
    float dcc = dc[idx] + dh * og * (1.0f - tc * tc);
    float d_o = dh * tc;
    float d_i = dcc * gg;
    float d_f = dcc * c_prev;
    float d_g = dcc * ig;
    float* dgr = dgates + row * 4 * H;
    dgr[u] = d_i * ig * (1.0f - ig);
    dgr[H + u] = d_f * fg * (1.0f - fg);
    dgr[2 * H + u] = d_g * (1.0f - gg * gg);
    dgr[3 * H + u] = d_o * og * (1.0f - og);
    dc[idx] = dcc * fg;
}

// hprev[b, t, :] = h[b, t-1, :] (zeros at t = 0): the left operand of dW_hh as one GEMM.
extern "C" __global__ void lstm_shift_h(const float* __restrict__ h_seq, float* __restrict__ hprev,
                                        int B, int T, int H) {
    const size_t total = (size_t)B * T * H;  // < 2^31 (checked on the host)
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)i0;
        int t = (i / H) % T;
        hprev[i] = t > 0 ? h_seq[i - H] : 0.0f;
    }
}
