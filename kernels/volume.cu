// Elementwise and in-plane ops on [z, y, x] volumes: a threshold on the slices that are on,
// a clamped linear window, the in-plane box mean, a region cut to the values below a level,
// the band of each segment's values as a mask, and a count of non-zero voxels. Each mirrors
// src/engine/cpu/volume.rs bit for bit: plain IEEE f32 arithmetic (no fast math),
// comparisons that NaN never passes.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

// out = 1 where slice z is on and x >= threshold (NaN fails the comparison).
extern "C" __global__ void vol_threshold_slices(const float* __restrict__ x, const u8* __restrict__ slice_on,
                                                float threshold, u64 slice_len, u64 n, u8* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = i / slice_len;
        out[i] = (slice_on[z] != 0 && x[i] >= threshold) ? 1 : 0;
    }
}

// The clamped linear window as the CPU computes it: ((x - lo) / width) clamped to [0, 1];
// NaN stays NaN, like Rust's f32::clamp.
extern "C" __global__ void vol_window(const float* __restrict__ x, float lo, float width, u64 n,
                                     float* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = (x[i] - lo) / width;
        if (v < 0.0f) v = 0.0f;
        if (v > 1.0f) v = 1.0f;
        out[i] = v;
    }
}

// count[0] += number of non-zero bytes (integer atomics: the total is exact). `count` must
// be zeroed first.
extern "C" __global__ void vol_count_nonzero(const u8* __restrict__ mask, u64 n, u64* __restrict__ count) {
    __shared__ u32 warp_tot[32];
    u32 c = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        c += mask[i] != 0 ? 1u : 0u;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
    if ((threadIdx.x & 31) == 0) warp_tot[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 s = 0;
        for (int w = 0; w < (int)((blockDim.x + 31) >> 5); ++w) s += warp_tot[w];
        if (s != 0) atomicAdd(count, s);
    }
}

// In-plane box mean of radius r over the in-bounds neighbours of each voxel of [z, y, x]:
// the same f32 sum order as the CPU's box_mean (rows, then columns), so the means agree
// bit for bit; +inf where the box holds a value whose window (lo, width) reaches
// `saturation`.
extern "C" __global__ void vol_box_mean(const float* __restrict__ src, u64 nz, u64 ny, u64 nx, int r, float lo,
                                        float width, float saturation, float* __restrict__ out) {
    u64 n = nz * ny * nx;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        long long x = (long long)(i % nx);
        long long y = (long long)((i / nx) % ny);
        u64 base = (i / (nx * ny)) * nx * ny;
        long long y0 = y - r < 0 ? 0 : y - r, y1 = y + r > (long long)ny - 1 ? (long long)ny - 1 : y + r;
        long long x0 = x - r < 0 ? 0 : x - r, x1 = x + r > (long long)nx - 1 ? (long long)nx - 1 : x + r;
        float sum = 0.0f;
        unsigned int cnt = 0;
        bool hot = false;
        for (long long yy = y0; yy <= y1; ++yy) {
            for (long long xx = x0; xx <= x1; ++xx) {
                float v = src[base + (u64)yy * nx + (u64)xx];
                float w = __fdiv_rn(__fsub_rn(v, lo), width);
                if (w < 0.0f) w = 0.0f;
                if (w > 1.0f) w = 1.0f;
                hot = hot || (w >= saturation);
                sum = __fadd_rn(sum, v);
                ++cnt;
            }
        }
        out[i] = hot ? __int_as_float(0x7f800000) : __fdiv_rn(sum, (float)cnt);
    }
}

// region[i] = 0 unless values[i] < level. NaN values are cut too, as `v < level` is false
// for them.
extern "C" __global__ void vol_keep_below(const float* __restrict__ values, float level, u64 n,
                                          u8* __restrict__ region) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        if (!(values[i] < level)) region[i] = 0;
    }
}

// out = 1 where the voxel lies in the grow region, is below `below` (when has_below != 0)
// and reaches its segment's floor lo[seg] (+inf: nothing passes).
extern "C" __global__ void vol_band(const float* __restrict__ values, const u8* __restrict__ grow,
                                    const float* __restrict__ lo, u64 seg_len, u64 n, float below,
                                    int has_below, u8* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = values[i];
        bool take = grow[i] != 0 && (has_below == 0 || v < below);
        out[i] = (take && v >= lo[i / seg_len]) ? 1 : 0;
    }
}
