// Kernels of the emulator's self-test (emu/tests/selftest.cpp, which loads the host build
// without PTX) and of tests/cuda_errors.rs (which NVRTC-compiles this file and loads the
// PTX through cudarc): each exercises one thing the emulated driver must do or catch.
// Compiled for the host by scripts/cuda-emu.sh build like kernels/*.cu. Plain CUDA, no
// headers, so that NVRTC compiles it as it is.

typedef unsigned long long emu_uptr;

// out[i] = in[n - 1 - i] through shared memory, with the barrier it needs.
extern "C" __global__ void st_reverse(const float* in, float* out, int n) {
    __shared__ float s[256];
    int t = threadIdx.x;
    if (t < n) s[t] = in[t];
    __syncthreads();
    if (t < n) out[t] = s[n - 1 - t];
}

// The same without the barrier: a thread may read its mirror's slot before it is written.
extern "C" __global__ void st_reverse_racy(const float* in, float* out, int n) {
    __shared__ float s[256];
    int t = threadIdx.x;
    if (t < n) s[t] = in[t];
    if (t < n) out[t] = s[n - 1 - t];
}

// Half of the block skips the barrier: a deadlock on a GPU.
extern "C" __global__ void st_partial_barrier(float* out) {
    if (threadIdx.x < blockDim.x / 2) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Lanes 16..31 exit before a full-mask shuffle.
extern "C" __global__ void st_partial_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if ((threadIdx.x & 31) >= 16) return;
    v += __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// Warp collectives: shuffles of every kind, ballot, match, reductions, block reductions.
extern "C" __global__ void st_warp_ops(const int* in, int* out) {
    int t = threadIdx.x, lane = t & 31;
    int v = in[t];
    int* o = out + t * 12;
    o[0] = __shfl_sync(0xffffffffu, v, 3);
    o[1] = __shfl_up_sync(0xffffffffu, v, 2);
    o[2] = __shfl_down_sync(0xffffffffu, v, 5);
    o[3] = __shfl_xor_sync(0xffffffffu, v, 9);
    o[4] = __shfl_down_sync(0xffffffffu, v, 1, 8);  // width 8
    o[5] = (int)__ballot_sync(0xffffffffu, v & 1);
    o[6] = (int)__match_any_sync(0xffffffffu, v % 3);
    o[7] = __reduce_add_sync(0xffffffffu, v);
    o[8] = __syncthreads_count(v & 1);
    o[9] = __any_sync(0xffffffffu, v == 7) + 2 * __all_sync(0xffffffffu, v >= 0);
    int pred = 0;
    unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    o[10] = (int)__match_all_sync(half, lane < 16 ? 5 : lane, &pred);
    o[11] = pred;
}

// Atomics from every thread of many blocks: integer add, float add (CAS loop), min, max, CAS.
extern "C" __global__ void st_atomics(const float* x, int n, unsigned* count, float* sum, int* lo, int* hi, unsigned* cas) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(count, 1u);
    atomicAdd(sum, x[i]);
    atomicMin(lo, (int)(x[i] * 1000.0f));
    atomicMax(hi, (int)(x[i] * 1000.0f));
    unsigned old = *cas, seen;
    while ((seen = atomicCAS(cas, old, old + 2u)) != old) old = seen;
}

// Dynamic shared memory of the size the launch asks for.
extern "C" __global__ void st_dyn_shared(float* out, int n) {
    extern __shared__ float buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)i;
    __syncthreads();
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += buf[n - 1 - i];
    out[threadIdx.x] = s;
}

// Reads shared memory nobody wrote: the emulator poisons it at block start.
extern "C" __global__ void st_uninit_shared(float* out) {
    __shared__ float s[32];
    out[threadIdx.x] = s[threadIdx.x];
}

// A device-side assert.
extern "C" __global__ void st_assert(const int* x) { assert(x[threadIdx.x] == 0); }

// An illegal address.
extern "C" __global__ void st_fault(float* out) {
    float* bad = (float*)(emu_uptr)0x10;
    out[threadIdx.x] = *bad;
}
