// 1-D k-means (Lloyd) over many independent segments at once (one segment per slice, or one
// for the whole volume), the device twin of src/engine/cpu/kmeans.rs. A segment is `seg_len`
// consecutive voxels; only voxels with region != 0 take part, in raster order.
//
// Same start, same steps, same result as the CPU:
// - init: the values' nearest-rank quantiles at (i + 0.5) / k, found exactly by a 4-pass
//   radix select (8 bits a pass) on keys ordered like f32::total_cmp;
// - assign: nearest centroid by |v - c| in f32, ties to the lowest index;
// - update: per-cluster sums in f64 and counts, reduced in a fixed order (no float atomics),
//   mean stored as f32, an empty cluster keeps its centroid;
// - the loop: a segment stops once an assignment (after the first) changes nothing; one not
//   converged after max_iter gets a last assignment. Per-segment flags carry this on the
//   device, so the host launches max_iter iterations without waiting on any of them.
//
// k <= KM_KMAX here (the wrapper checks).

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define KM_KMAX 16
#define KM_THREADS 256
#define FULL_MASK 0xffffffffu

// f32 bits -> u32 key whose unsigned order is f32::total_cmp's order.
__device__ __forceinline__ u32 order_key(float v) {
    u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(u32 k) {
    u32 b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(b);
}

// Per segment (one block of KM_THREADS each): n = region voxels; the target ranks
// min(floor((i + 0.5) / k * n), n - 1), the radix prefixes zeroed. A segment with n = 0
// gets k zero centroids and is done at once.
extern "C" __global__ void km_init(const u8* __restrict__ region, u64 seg_len, int k, u32* __restrict__ n_out,
                                   u32* __restrict__ rank, u32* __restrict__ prefix, float* __restrict__ centroids,
                                   u32* __restrict__ done) {
    __shared__ u32 warp_tot[KM_THREADS / 32];
    u64 seg = blockIdx.x;
    const u8* r = region + seg * seg_len;
    u32 c = 0;
    for (u64 i = threadIdx.x; i < seg_len; i += KM_THREADS) c += r[i] != 0 ? 1u : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(FULL_MASK, c, o);
    if ((threadIdx.x & 31) == 0) warp_tot[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 n = 0;
        for (int w = 0; w < KM_THREADS / 32; ++w) n += warp_tot[w];
        n_out[seg] = n;
        for (int i = 0; i < k; ++i) {
            double q = ((double)i + 0.5) / (double)k * (double)n;
            u64 idx = (u64)floor(q);
            if (n > 0 && idx > n - 1) idx = n - 1;
            rank[seg * k + i] = n > 0 ? (u32)idx : 0u;
            prefix[seg * k + i] = 0;
            centroids[seg * k + i] = 0.0f;
        }
        done[seg] = n == 0 ? 1u : 0u;
    }
}

// One radix pass: per (segment, target) a 256-bin histogram of the pass's 8 key bits over
// the values whose higher bits equal the target's prefix so far. Grid (chunks, segments),
// KM_THREADS threads; `hist` [segments, k, 256] must be zero.
extern "C" __global__ void km_radix_hist(const float* __restrict__ values, const u8* __restrict__ region,
                                         u64 seg_len, int k, int pass, const u32* __restrict__ prefix,
                                         const u32* __restrict__ done, u32* __restrict__ hist) {
    __shared__ u32 sh[KM_KMAX * 256];
    __shared__ u32 pre[KM_KMAX];
    u64 seg = blockIdx.y;
    if (done[seg]) return;
    for (int i = threadIdx.x; i < k * 256; i += KM_THREADS) sh[i] = 0;
    if (threadIdx.x < k) pre[threadIdx.x] = prefix[seg * k + threadIdx.x];
    __syncthreads();
    int shift = 24 - 8 * pass;
    u32 hi_mask = pass == 0 ? 0u : (0xffffffffu << (32 - 8 * pass));
    const float* v = values + seg * seg_len;
    const u8* r = region + seg * seg_len;
    for (u64 i = (u64)blockIdx.x * KM_THREADS + threadIdx.x; i < seg_len; i += (u64)gridDim.x * KM_THREADS) {
        if (r[i] == 0) continue;
        u32 key = order_key(v[i]);
        u32 bin = (key >> shift) & 255u;
        for (int t = 0; t < k; ++t) {
            if ((key & hi_mask) == (pre[t] & hi_mask)) atomicAdd(&sh[t * 256 + bin], 1u);
        }
    }
    __syncthreads();
    u32* h = hist + seg * (u64)k * 256;
    for (int i = threadIdx.x; i < k * 256; i += KM_THREADS) {
        u32 c = sh[i];
        if (c != 0) atomicAdd(&h[i], c);
    }
}

// After a pass: per (segment, target) find the bin holding the target rank, extend the
// prefix, make the rank relative to the bin, and clear the histogram for the next pass.
// After the last pass the prefix is the quantile's key: it becomes the centroid.
extern "C" __global__ void km_radix_pick(int nseg, int k, int pass, u32* __restrict__ hist, u32* __restrict__ prefix,
                                         u32* __restrict__ rank, const u32* __restrict__ done,
                                         float* __restrict__ centroids) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nseg * k) return;
    int seg = t / k;
    u32* h = hist + (u64)t * 256;
    if (done[seg]) return;
    int shift = 24 - 8 * pass;
    u32 r = rank[t];
    u32 cum = 0;
    int bin = 255;
    for (int b = 0; b < 256; ++b) {
        u32 c = h[b];
        if (r < cum + c) {
            bin = b;
            break;
        }
        cum += c;
    }
    for (int b = 0; b < 256; ++b) h[b] = 0;
    u32 p = prefix[t] | ((u32)bin << shift);
    prefix[t] = p;
    rank[t] = r - cum;
    if (pass == 3) centroids[t] = key_value(p);
}

// Fills every label with 255 (no cluster), so the first assignment counts as a change.
extern "C" __global__ void km_labels_init(u64 n, u8* __restrict__ labels) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        labels[i] = 255;
    }
}

__device__ __forceinline__ u32 nearest(float v, const float* c, int k) {
    u32 best = 0;
    float best_d = __int_as_float(0x7f800000);  // +inf
    for (int i = 0; i < k; ++i) {
        float d = fabsf(v - c[i]);
        if (d < best_d) {
            best_d = d;
            best = (u32)i;
        }
    }
    return best;
}

// Assignment step for segments not done: labels = nearest centroid; changed[seg] = 1 if any
// label changed (the host zeroes `changed` before each assignment). Grid (chunks, segments).
extern "C" __global__ void km_assign(const float* __restrict__ values, const u8* __restrict__ region, u64 seg_len,
                                     int k, const float* __restrict__ centroids, const u32* __restrict__ done,
                                     u8* __restrict__ labels, u32* __restrict__ changed) {
    __shared__ float c[KM_KMAX];
    __shared__ u32 any;
    u64 seg = blockIdx.y;
    if (done[seg]) return;
    if (threadIdx.x < k) c[threadIdx.x] = centroids[seg * k + threadIdx.x];
    if (threadIdx.x == 0) any = 0;
    __syncthreads();
    const float* v = values + seg * seg_len;
    const u8* r = region + seg * seg_len;
    u8* l = labels + seg * seg_len;
    bool ch = false;
    for (u64 i = (u64)blockIdx.x * KM_THREADS + threadIdx.x; i < seg_len; i += (u64)gridDim.x * KM_THREADS) {
        if (r[i] == 0) continue;
        u8 nl = (u8)nearest(v[i], c, k);
        if (nl != l[i]) {
            l[i] = nl;
            ch = true;
        }
    }
    if (ch) any = 1;  // benign race: every writer stores 1
    __syncthreads();
    if (threadIdx.x == 0 && any) changed[seg] = 1;
}

// Partial sums of the update step: grid (chunks, segments), each block sums its chunk per
// cluster in f64 (fixed order: per thread, then a shuffle tree, then the warps in order) into
// psum/pcnt [segments, chunks, k]. Skips done segments and, from the second iteration on,
// segments whose last assignment changed nothing (they are about to be marked done).
extern "C" __global__ void km_partial(const float* __restrict__ values, const u8* __restrict__ labels, u64 seg_len,
                                      int k, int iter, int counts_only, const u32* __restrict__ done,
                                      const u32* __restrict__ changed, double* __restrict__ psum,
                                      u32* __restrict__ pcnt) {
    __shared__ double wsum[KM_THREADS / 32][KM_KMAX];
    __shared__ u32 wcnt[KM_THREADS / 32][KM_KMAX];
    u64 seg = blockIdx.y;
    if (!counts_only && (done[seg] || (iter > 0 && changed[seg] == 0))) return;
    double s[KM_KMAX];
    u32 n[KM_KMAX];
#pragma unroll
    for (int c = 0; c < KM_KMAX; ++c) {
        s[c] = 0.0;
        n[c] = 0;
    }
    const float* v = values + seg * seg_len;
    const u8* l = labels + seg * seg_len;
    for (u64 i = (u64)blockIdx.x * KM_THREADS + threadIdx.x; i < seg_len; i += (u64)gridDim.x * KM_THREADS) {
        u32 li = l[i];
        if (li >= (u32)k) continue;
        double x = (double)v[i];
#pragma unroll
        for (int c = 0; c < KM_KMAX; ++c) {
            if ((u32)c == li) {
                s[c] += x;
                n[c] += 1;
            }
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int c = 0; c < KM_KMAX; ++c) {
        if (c >= k) break;
        double a = s[c];
        u32 b = n[c];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(FULL_MASK, a, o);
            b += __shfl_down_sync(FULL_MASK, b, o);
        }
        if (lane == 0) {
            wsum[warp][c] = a;
            wcnt[warp][c] = b;
        }
    }
    __syncthreads();
    if (threadIdx.x < k) {
        int c = threadIdx.x;
        double a = 0.0;
        u32 b = 0;
        for (int w = 0; w < KM_THREADS / 32; ++w) {
            a += wsum[w][c];
            b += wcnt[w][c];
        }
        u64 o = (seg * gridDim.x + blockIdx.x) * (u64)k + c;
        psum[o] = a;
        pcnt[o] = b;
    }
}

// Finishes an update step, one thread per (segment, cluster): the chunks' partial sums added
// in chunk order. A segment not done whose assignment changed nothing (after the first) is
// marked done; otherwise the centroid becomes the mean (an empty cluster keeps its centroid).
// `changed` is only read here (threads of one segment may sit in different warps). With
// counts_only the
// counts are written for every segment and nothing else moves.
extern "C" __global__ void km_finish(int nseg, int k, int nchunks, int iter, int counts_only,
                                     const double* __restrict__ psum, const u32* __restrict__ pcnt,
                                     u32* __restrict__ done, const u32* __restrict__ changed,
                                     float* __restrict__ centroids, u32* __restrict__ counts) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nseg * k) return;
    int seg = t / k, c = t % k;
    if (!counts_only && done[seg]) return;
    if (!counts_only && iter > 0 && changed[seg] == 0) {
        // Every thread of the segment stores the same 1.
        done[seg] = 1;
        return;
    }
    double a = 0.0;
    u32 b = 0;
    for (int ch = 0; ch < nchunks; ++ch) {
        u64 o = ((u64)seg * nchunks + ch) * k + c;
        a += psum[o];
        b += pcnt[o];
    }
    counts[t] = b;
    if (counts_only) return;
    if (b > 0) centroids[t] = (float)(a / (double)b);
}
