// Dense products for the linear layers and the LSTM: a tiled SGEMM with optional transposes,
// C[M,N] = op(A)[M,K] . op(B)[K,N] (+ bias[N]) (+ C when accumulate), row-major, with
// op(A)[m,k] = transA ? A[k*lda + m] : A[m*lda + k] and op(B)[k,n] = transB ? B[n*ldb + k]
// : B[k*ldb + n]. Block tile 64x64, K tile 16, 256 threads, 4x4 outputs per thread; each
// operand is loaded along its contiguous dimension. Plus column sums (bias gradients).

#define BM 64
#define BN 64
#define BK 16
#define PAD 4

extern "C" __global__ void __launch_bounds__(256)
sgemm(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ Cm,
      const float* __restrict__ bias, int M, int N, int K, int lda, int ldb, int ldc, int transA,
      int transB, int accumulate) {
    __shared__ float As[BK][BM + PAD];
    __shared__ float Bs[BK][BN + PAD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    // Each thread's four A and four B elements of a K tile, loaded along the operand's
    // contiguous dimension; the next tile is loaded while the current one is multiplied.
    float ra[4], rb[4];
    auto load = [&](int k0) {
        if (!transA) {  // contiguous along k
            int kk = tid & 15, mm = tid >> 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int m = m0 + mm + 16 * q, k = k0 + kk;
                ra[q] = (m < M && k < K) ? A[(size_t)m * lda + k] : 0.0f;
            }
        } else {  // contiguous along m
            int mm = tid & 63, kk = tid >> 6;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int m = m0 + mm, k = k0 + kk + 4 * q;
                ra[q] = (m < M && k < K) ? A[(size_t)k * lda + m] : 0.0f;
            }
        }
        if (!transB) {  // contiguous along n
            int nn = tid & 63, kk = tid >> 6;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int n = n0 + nn, k = k0 + kk + 4 * q;
                rb[q] = (n < N && k < K) ? B[(size_t)k * ldb + n] : 0.0f;
            }
        } else {  // contiguous along k
            int kk = tid & 15, nn = tid >> 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int n = n0 + nn + 16 * q, k = k0 + kk;
                rb[q] = (n < N && k < K) ? B[(size_t)n * ldb + k] : 0.0f;
            }
        }
    };
    float acc[4][4] = {};
    if (K > 0) load(0);
    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (!transA) As[tid & 15][(tid >> 4) + 16 * q] = ra[q];
            else As[(tid >> 6) + 4 * q][tid & 63] = ra[q];
            if (!transB) Bs[(tid >> 6) + 4 * q][tid & 63] = rb[q];
            else Bs[tid & 15][(tid >> 4) + 16 * q] = rb[q];
        }
        __syncthreads();
        if (k0 + BK < K) load(k0 + BK);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int n = n0 + tx + 16 * j;
            if (n >= N) continue;
            float v = acc[i][j];
            if (bias) v += bias[n];
            float* c = Cm + (size_t)m * ldc + n;
            *c = accumulate ? *c + v : v;
        }
    }
}

// out[n] = sum over m of X[m, n] for X [M, N], m ascending (deterministic).
extern "C" __global__ void colsum(const float* __restrict__ X, float* __restrict__ out, int M, int N) {
    for (size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x; n < (size_t)N; n += (size_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int m = 0; m < M; ++m) s += X[(size_t)m * N + n];
        out[n] = s;
    }
}
