// Elementwise steps of the CAM refinement on [z, y, x] volumes: the binary CAM region on
// the positive slices, the subdural window (level 80 / width 200), the chosen k-means
// cluster as a mask, and a count of non-zero voxels. Each mirrors src/seg bit for bit:
// plain IEEE f32 arithmetic (no fast math), comparisons that NaN never passes.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

// out = 1 where slice z is positive and cam >= threshold (NaN fails the comparison).
extern "C" __global__ void seg_cam_region(const float* __restrict__ cam, const u8* __restrict__ slice_positive,
                                          float threshold, u64 slice_len, u64 n, u8* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = i / slice_len;
        out[i] = (slice_positive[z] != 0 && cam[i] >= threshold) ? 1 : 0;
    }
}

// The subdural window as src/seg/refine.rs computes it: ((hu + 20) / 200) clamped to
// [0, 1]; NaN stays NaN, like Rust's f32::clamp.
extern "C" __global__ void seg_subdural(const float* __restrict__ hu, u64 n, float* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = (hu[i] + 20.0f) / 200.0f;
        if (v < 0.0f) v = 0.0f;
        if (v > 1.0f) v = 1.0f;
        out[i] = v;
    }
}

// out = 1 where the voxel's k-means label is its segment's chosen cluster (chosen < 0: none).
// Voxels outside the region carry label 255 and never match.
extern "C" __global__ void seg_select_cluster(const u8* __restrict__ labels, const int* __restrict__ chosen,
                                              u64 seg_len, u64 n, u8* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        int c = chosen[i / seg_len];
        out[i] = (c >= 0 && (int)labels[i] == c) ? 1 : 0;
    }
}

// count[0] += number of non-zero bytes (integer atomics: the total is exact). `count` must
// be zeroed first.
extern "C" __global__ void seg_count_nonzero(const u8* __restrict__ mask, u64 n, u64* __restrict__ count) {
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
