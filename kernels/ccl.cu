// 3-D connected-component labelling of a binary u8 volume [z, y, x] (non-zero = foreground).
//
// 26-connectivity: block-based union-find (BUF) after Allegretti, Bolelli, Grana, "Optimized
// Block-Based Algorithms to Label Connected Components on GPUs", IEEE TPDS 2020. The volume
// is cut into 2x2x2 blocks; the foreground voxels of one block are always 26-connected to
// each other, so union-find runs over blocks (8x fewer nodes than voxels):
//   ccl_init_blocks    one 8-bit occupancy mask per block (bit = z*4 + y*2 + x), parent = self
//   ccl_merge_blocks26 for each occupied block, union with each of its 13 earlier neighbour
//                      blocks (faces, edges, corners) when a voxel pair touches across them
//   ccl_compress       parent = root (full path compression)
//   ccl_block_stats    per root: its component's first voxel (raster order) and voxel count
//   ccl_first_count / ccl_scan_chunks / ccl_first_ids
//                      consecutive ids 1..n in raster order of each component's first voxel,
//                      the same numbering as the CPU (src/engine/cpu/ccl.rs), and the sizes by id
//   ccl_finalize_blocks every voxel gets its block's id (0 for background)
// 6- and 18-connectivity do not hold inside a 2x2x2 block, so they run the same union-find
// on single voxels (ccl_init_vox, ccl_merge_vox, ccl_vox_stats, ccl_root_count, ccl_root_ids,
// ccl_finalize_vox); there a root is its component's smallest voxel index, i.e. its first
// voxel, so the numbering is the same. The voxel path accepts 26 too, which the tests use as
// a second opinion on the block path.
//
// Nothing waits on the host between the kernels: the count n and the sizes are read back
// once at the end.
//
// Union is the lock-free atomicMin union of the paper's reference code: both roots are found,
// the larger one is linked below the smaller with atomicMin, and if another thread linked it
// first (atomicMin did not see a root) the loop retries from what it found. Parents only ever
// decrease and parent[i] <= i, so every find terminates and the root of a set is its minimum.
//
// Then per-component statistics of a value volume: ccl_component_stats counts each
// component's voxels at or above a threshold and finds its largest value; given the host's
// lookup table, ccl_select writes the selected components' voxels as a 0/1 mask.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// Parents are read while other threads write them (atomicMin): volatile keeps every hop a
// real load.
__device__ __forceinline__ u32 find_root(const volatile u32* parent, u32 i) {
    u32 p = parent[i];
    while (p != i) {
        i = p;
        p = parent[i];
    }
    return i;
}

__device__ __forceinline__ void unite(u32* parent, u32 a, u32 b) {
    bool done;
    do {
        a = find_root(parent, a);
        b = find_root(parent, b);
        if (a < b) {
            u32 old = atomicMin(parent + b, a);
            done = (old == b);
            b = old;
        } else if (b < a) {
            u32 old = atomicMin(parent + a, b);
            done = (old == a);
            a = old;
        } else {
            done = true;
        }
    } while (!done);
}

// Bits of a 2x2x2 block's mask whose voxel has coordinate `c` (0/1) along the axis with bit
// weight `w` (x: 1, y: 2, z: 4).
__device__ __forceinline__ u32 side_bits(int w, int c) {
    u32 m = 0;
#pragma unroll
    for (int bit = 0; bit < 8; ++bit) {
        if (((bit & w) != 0) == (c != 0)) m |= 1u << bit;
    }
    return m;
}

// Voxels of this block that can touch a neighbour block at offset d (per axis -1/0/+1):
// along an axis with d = -1 only the block's coordinate 0, with d = +1 only coordinate 1.
__device__ __forceinline__ u32 touch_bits(int dz, int dy, int dx) {
    u32 m = 0xffu;
    if (dx != 0) m &= side_bits(1, dx > 0);
    if (dy != 0) m &= side_bits(2, dy > 0);
    if (dz != 0) m &= side_bits(4, dz > 0);
    return m;
}

extern "C" __global__ void ccl_init_blocks(const u8* __restrict__ mask, int nz, int ny, int nx, int nbz, int nby,
                                           int nbx, u8* __restrict__ occ, u32* __restrict__ parent,
                                           u32* __restrict__ first, u32* __restrict__ size_root) {
    u64 nb = (u64)nbz * nby * nbx;
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < nb; b += (u64)gridDim.x * blockDim.x) {
        int bx = (int)(b % nbx);
        int by = (int)((b / nbx) % nby);
        int bz = (int)(b / ((u64)nbx * nby));
        u32 m = 0;
#pragma unroll
        for (int bit = 0; bit < 8; ++bit) {
            int z = 2 * bz + (bit >> 2);
            int y = 2 * by + ((bit >> 1) & 1);
            int x = 2 * bx + (bit & 1);
            if (z < nz && y < ny && x < nx) {
                if (mask[((u64)z * ny + y) * nx + x] != 0) m |= 1u << bit;
            }
        }
        occ[b] = (u8)m;
        parent[b] = (u32)b;
        first[b] = 0xffffffffu;
        size_root[b] = 0;
    }
}

extern "C" __global__ void ccl_merge_blocks26(const u8* __restrict__ occ, u32* parent, int nbz, int nby, int nbx) {
    u64 nb = (u64)nbz * nby * nbx;
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < nb; b += (u64)gridDim.x * blockDim.x) {
        u32 m = occ[b];
        if (m == 0) continue;
        int bx = (int)(b % nbx);
        int by = (int)((b / nbx) % nby);
        int bz = (int)(b / ((u64)nbx * nby));
        // The 13 neighbours that come earlier in raster order; each unordered pair of
        // blocks is examined exactly once, by the later block.
#pragma unroll
        for (int dz = -1; dz <= 0; ++dz) {
#pragma unroll
            for (int dy = -1; dy <= 1; ++dy) {
#pragma unroll
                for (int dx = -1; dx <= 1; ++dx) {
                    if (dz == 0 && (dy > 0 || (dy == 0 && dx >= 0))) continue;
                    int qz = bz + dz, qy = by + dy, qx = bx + dx;
                    if (qz < 0 || qy < 0 || qy >= nby || qx < 0 || qx >= nbx) continue;
                    u64 q = ((u64)qz * nby + qy) * nbx + qx;
                    u32 mq = occ[q];
                    if ((m & touch_bits(dz, dy, dx)) != 0 && (mq & touch_bits(-dz, -dy, -dx)) != 0) {
                        unite(parent, (u32)b, (u32)q);
                    }
                }
            }
        }
    }
}

// The voxel-level path: every voxel is a node (background ones stay singletons).
extern "C" __global__ void ccl_init_vox(u64 n, u32* __restrict__ parent, u32* __restrict__ size_root) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        parent[i] = (u32)i;
        size_root[i] = 0;
    }
}

extern "C" __global__ void ccl_merge_vox(const u8* __restrict__ mask, u32* parent, int nz, int ny, int nx, int conn) {
    u64 n = (u64)nz * ny * nx;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        if (mask[i] == 0) continue;
        int x = (int)(i % nx);
        int y = (int)((i / nx) % ny);
        int z = (int)(i / ((u64)nx * ny));
        for (int dz = -1; dz <= 0; ++dz) {
            for (int dy = -1; dy <= 1; ++dy) {
                for (int dx = -1; dx <= 1; ++dx) {
                    if (dz == 0 && (dy > 0 || (dy == 0 && dx >= 0))) continue;
                    int order = (dz != 0) + (dy != 0) + (dx != 0);
                    if ((conn == 6 && order > 1) || (conn == 18 && order > 2)) continue;
                    int qz = z + dz, qy = y + dy, qx = x + dx;
                    if (qz < 0 || qy < 0 || qy >= ny || qx < 0 || qx >= nx) continue;
                    u64 q = ((u64)qz * ny + qy) * nx + qx;
                    if (mask[q] != 0) unite(parent, (u32)i, (u32)q);
                }
            }
        }
    }
}

// Shared by both paths: `occ` is the block occupancy or the voxel mask (non-zero = node in use).
extern "C" __global__ void ccl_compress(const u8* __restrict__ occ, u32* parent, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        if (occ[i] == 0) continue;
        u32 r = find_root(parent, (u32)i);
        if (r != parent[i]) parent[i] = r;
    }
}

// One atomic per distinct index per warp: a large component would otherwise send millions
// of atomics to one address. OP 0 = add, 1 = min, 2 = max. Every lane of the warp must call
// it (the callers' loops are warp-uniform); inactive lanes take no part.
template <int OP>
__device__ __forceinline__ void warp_atomic(u32* arr, bool active, u32 idx, u32 val) {
    int lane = threadIdx.x & 31;
    u32 key = active ? idx : 0xffffffffu;
    u32 peers = __match_any_sync(FULL_MASK, key);
    u32 acc = OP == 1 ? 0xffffffffu : 0u;
#pragma unroll
    for (int l = 0; l < 32; ++l) {
        u32 x = __shfl_sync(FULL_MASK, val, l);
        if ((peers >> l) & 1u) acc = OP == 0 ? acc + x : (OP == 1 ? min(acc, x) : max(acc, x));
    }
    if (active && lane == __ffs(peers) - 1) {
        if (OP == 0) atomicAdd(arr + idx, acc);
        else if (OP == 1) atomicMin(arr + idx, acc);
        else atomicMax(arr + idx, acc);
    }
}

__device__ __forceinline__ u64 voxel_of_block(int bz, int by, int bx, int bit, int ny, int nx) {
    return ((u64)(2 * bz + (bit >> 2)) * ny + (2 * by + ((bit >> 1) & 1))) * nx + (2 * bx + (bit & 1));
}

// Per occupied block: first[root] = min over the component of its voxels' raster index (a
// block's lowest set bit is its first voxel: bits run in z, y, x order), size_root[root] +=
// the block's voxels.
extern "C" __global__ void ccl_block_stats(const u8* __restrict__ occ, const u32* __restrict__ parent, int ny,
                                           int nx, int nbz, int nby, int nbx, u32* __restrict__ first,
                                           u32* __restrict__ size_root) {
    u64 nb = (u64)nbz * nby * nbx;
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 b0 = (u64)blockIdx.x * blockDim.x; b0 < nb; b0 += stride) {
        u64 b = b0 + threadIdx.x;
        u32 m = b < nb ? occ[b] : 0u;
        u32 r = 0, v0 = 0;
        if (m != 0) {
            r = parent[b];
            int bx = (int)(b % nbx);
            int by = (int)((b / nbx) % nby);
            int bz = (int)(b / ((u64)nbx * nby));
            v0 = (u32)voxel_of_block(bz, by, bx, __ffs(m) - 1, ny, nx);
        }
        warp_atomic<1>(first, m != 0, r, v0);
        warp_atomic<0>(size_root, m != 0, r, m != 0 ? (u32)__popc(m) : 0u);
    }
}

// Per foreground voxel of the voxel path: size_root[root] += 1.
extern "C" __global__ void ccl_vox_stats(const u8* __restrict__ mask, const u32* __restrict__ parent, u64 n,
                                         u32* __restrict__ size_root) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i0 = (u64)blockIdx.x * blockDim.x; i0 < n; i0 += stride) {
        u64 i = i0 + threadIdx.x;
        bool fg = i < n && mask[i] != 0;
        warp_atomic<0>(size_root, fg, fg ? parent[i] : 0u, 1u);
    }
}

// Consecutive ids: the flagged elements (roots, or first voxels) are counted per chunk of
// CHUNK elements, the chunk counts scanned in one block, then each flagged element's id =
// its chunk's offset + its rank in the chunk + 1. The chunk kernels run with exactly
// SCAN_THREADS threads per block; elements are visited in index order within a chunk.
#define SCAN_THREADS 256
#define SCAN_ITEMS 8
#define CHUNK (SCAN_THREADS * SCAN_ITEMS)

struct RootFlag {
    const u8* occ;
    const u32* parent;
    u64 n;
    __device__ __forceinline__ bool operator()(u64 i) const { return i < n && occ[i] != 0 && parent[i] == (u32)i; }
    __device__ __forceinline__ u32 root(u64 i) const { return (u32)i; }
};

struct FirstFlag {
    const u8* mask;
    const u32* parent;
    const u32* first;
    int ny, nx, nby, nbx;
    u64 n;
    __device__ __forceinline__ u32 root(u64 i) const {
        int x = (int)(i % nx);
        int y = (int)((i / nx) % ny);
        u64 z = i / ((u64)nx * ny);
        u64 b = (z / 2 * nby + (u64)(y / 2)) * nbx + (u64)(x / 2);
        return parent[b];
    }
    __device__ __forceinline__ bool operator()(u64 i) const { return i < n && mask[i] != 0 && first[root(i)] == (u32)i; }
};

template <class F>
__device__ __forceinline__ void chunk_count(const F& flag, u32* chunk_counts) {
    __shared__ u32 warp_tot[SCAN_THREADS / 32];
    u64 base = (u64)blockIdx.x * CHUNK;
    u32 cnt = 0;
#pragma unroll
    for (int it = 0; it < SCAN_ITEMS; ++it) cnt += flag(base + (u64)it * SCAN_THREADS + threadIdx.x) ? 1u : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_down_sync(FULL_MASK, cnt, o);
    if ((threadIdx.x & 31) == 0) warp_tot[threadIdx.x >> 5] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 s = 0;
        for (int w = 0; w < SCAN_THREADS / 32; ++w) s += warp_tot[w];
        chunk_counts[blockIdx.x] = s;
    }
}

// ids[root] = id and sizes[id - 1] = size_root[root] for each flagged element.
template <class F>
__device__ __forceinline__ void chunk_ids(const F& flag, const u32* offsets, const u32* size_root, u32* ids,
                                          u32* sizes) {
    __shared__ u32 warp_tot[SCAN_THREADS / 32];
    u64 base = (u64)blockIdx.x * CHUNK;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 running = offsets[blockIdx.x];
    for (int it = 0; it < SCAN_ITEMS; ++it) {
        u64 i = base + (u64)it * SCAN_THREADS + threadIdx.x;
        bool f = flag(i);
        u32 ballot = __ballot_sync(FULL_MASK, f);
        u32 rank_in_warp = __popc(ballot & ((1u << lane) - 1u));
        if (lane == 0) warp_tot[warp] = __popc(ballot);
        __syncthreads();
        u32 before = running;
        u32 all = 0;
        for (int w = 0; w < SCAN_THREADS / 32; ++w) {
            u32 t = warp_tot[w];
            if (w < warp) before += t;
            all += t;
        }
        if (f) {
            u32 id = before + rank_in_warp + 1;
            u32 r = flag.root(i);
            ids[r] = id;
            sizes[id - 1] = size_root[r];
        }
        running += all;
        __syncthreads();
    }
}

extern "C" __global__ void ccl_root_count(const u8* __restrict__ occ, const u32* __restrict__ parent, u64 n,
                                          u32* __restrict__ chunk_counts) {
    chunk_count(RootFlag{occ, parent, n}, chunk_counts);
}

extern "C" __global__ void ccl_root_ids(const u8* __restrict__ occ, const u32* __restrict__ parent, u64 n,
                                        const u32* __restrict__ offsets, const u32* __restrict__ size_root,
                                        u32* __restrict__ ids, u32* __restrict__ sizes) {
    chunk_ids(RootFlag{occ, parent, n}, offsets, size_root, ids, sizes);
}

extern "C" __global__ void ccl_first_count(const u8* __restrict__ mask, const u32* __restrict__ parent,
                                           const u32* __restrict__ first, int nz, int ny, int nx, int nby, int nbx,
                                           u32* __restrict__ chunk_counts) {
    chunk_count(FirstFlag{mask, parent, first, ny, nx, nby, nbx, (u64)nz * ny * nx}, chunk_counts);
}

extern "C" __global__ void ccl_first_ids(const u8* __restrict__ mask, const u32* __restrict__ parent,
                                         const u32* __restrict__ first, int nz, int ny, int nx, int nby, int nbx,
                                         const u32* __restrict__ offsets, const u32* __restrict__ size_root,
                                         u32* __restrict__ ids, u32* __restrict__ sizes) {
    chunk_ids(FirstFlag{mask, parent, first, ny, nx, nby, nbx, (u64)nz * ny * nx}, offsets, size_root, ids, sizes);
}

// One block of SCAN_THREADS threads: exclusive scan of `counts` into `offsets`, total into
// `total[0]`.
extern "C" __global__ void ccl_scan_chunks(const u32* __restrict__ counts, int nchunks_, u32* __restrict__ offsets,
                                           u32* __restrict__ total) {
    __shared__ u32 warp_tot[SCAN_THREADS / 32];
    __shared__ u32 carry;
    u32 nchunks = (u32)nchunks_;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (u32 base = 0; base < nchunks; base += SCAN_THREADS) {
        u32 i = base + threadIdx.x;
        u32 v = i < nchunks ? counts[i] : 0;
        u32 incl = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u32 t = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane >= o) incl += t;
        }
        if (lane == 31) warp_tot[warp] = incl;
        __syncthreads();
        u32 before = carry;
        for (int w = 0; w < warp; ++w) before += warp_tot[w];
        if (i < nchunks) offsets[i] = before + incl - v;
        __syncthreads();
        if (threadIdx.x == SCAN_THREADS - 1) carry = before + incl;
        __syncthreads();
    }
    if (threadIdx.x == 0) total[0] = carry;
}

// One thread per block writes its 8 voxels (0 for background), so every voxel of `labels` is
// written.
extern "C" __global__ void ccl_finalize_blocks(const u8* __restrict__ occ, const u32* __restrict__ parent,
                                               const u32* __restrict__ ids, int nz, int ny, int nx, int nbz, int nby,
                                               int nbx, u32* __restrict__ labels) {
    u64 nb = (u64)nbz * nby * nbx;
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < nb; b += (u64)gridDim.x * blockDim.x) {
        u32 m = occ[b];
        u32 id = m != 0 ? ids[parent[b]] : 0u;
        int bx = (int)(b % nbx);
        int by = (int)((b / nbx) % nby);
        int bz = (int)(b / ((u64)nbx * nby));
#pragma unroll
        for (int bit = 0; bit < 8; ++bit) {
            int z = 2 * bz + (bit >> 2);
            int y = 2 * by + ((bit >> 1) & 1);
            int x = 2 * bx + (bit & 1);
            if (z < nz && y < ny && x < nx) {
                labels[((u64)z * ny + y) * nx + x] = ((m >> bit) & 1u) ? id : 0u;
            }
        }
    }
}

extern "C" __global__ void ccl_finalize_vox(const u8* __restrict__ mask, const u32* __restrict__ parent,
                                            const u32* __restrict__ ids, u64 n, u32* __restrict__ labels) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        labels[i] = mask[i] != 0 ? ids[parent[i]] : 0u;
    }
}

// f32 -> u32 key whose unsigned order is the float order (for atomicMax on a float).
__device__ __forceinline__ u32 float_key(float v) {
    u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The statistics of src/engine/cpu/ccl.rs component_stats: for each component,
// inside[id - 1] = its voxels with x >= threshold, peak[id - 1] = its largest value as a
// float_key (NaN never counts; zero the arrays first: key 0 is below every float).
extern "C" __global__ void ccl_component_stats(const u32* __restrict__ labels, const float* __restrict__ x,
                                               float threshold, u64 n, u32* __restrict__ inside, u32* __restrict__ peak) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i0 = (u64)blockIdx.x * blockDim.x; i0 < n; i0 += stride) {
        u64 i = i0 + threadIdx.x;
        u32 l = i < n ? labels[i] : 0u;
        float v = l != 0 ? x[i] : 0.0f;
        bool in = l != 0 && v >= threshold;
        warp_atomic<0>(inside, in, in ? l - 1 : 0u, 1u);
        bool pk = l != 0 && !isnan(v);
        warp_atomic<2>(peak, pk, pk ? l - 1 : 0u, pk ? float_key(v) : 0u);
    }
}

// out = 1 where lut[label] != 0 (lut[0] = 0 for the background), else 0.
extern "C" __global__ void ccl_select(const u32* __restrict__ labels, const u32* __restrict__ lut, u64 n,
                                         u8* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = lut[labels[i]] != 0 ? 1 : 0;
    }
}
