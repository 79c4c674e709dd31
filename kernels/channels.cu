// Channel-slice copies between two [n, *, hw] buffers: the U-Net's skip concatenation and,
// accumulating, its backward. dst[img, dst_off + ch, p] = (or +=) src[img, src_off + ch, p]
// for ch < c; grid-stride over the n*c*hw copied elements (the count fits an int, checked on
// the host), 64-bit offsets.

extern "C" __global__ void copy_channels(const float* __restrict__ src, float* __restrict__ dst,
                                         int n, int c, int hw, int src_c, int src_off, int dst_c,
                                         int dst_off, int accumulate) {
    const int total = n * c * hw;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const long long p = i % hw, t = i / hw;
        const long long ch = t % c, img = t / c;
        const size_t s = (size_t)((img * src_c + src_off + ch) * hw + p);
        const size_t d = (size_t)((img * dst_c + dst_off + ch) * hw + p);
        dst[d] = accumulate ? dst[d] + src[s] : src[s];
    }
}

// bf16 storage (the channels-last eval activations at --precision bf16): a tensor of L values
// in an f32 buffer of (L + 1) / 2 slots, value i the 16-bit half at index i (the low half of
// slot i / 2 for even i, little-endian). A value is stored rounded to nearest, ties to even
// (as __float2bfloat16_rn; a NaN stays a quiet NaN), by integer arithmetic, bit for bit what
// the host's `precision::bf16_bits` computes.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float load_value(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_value(const unsigned short* p, long long i) {
    return __uint_as_float((unsigned int)p[i] << 16);
}
__device__ __forceinline__ void store_value(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_value(unsigned short* p, long long i, float v) {
    p[i] = bf16_bits(v);
}

// Per image dst[j, i] = src[i, j] for src [n, rows, cols] and dst [n, cols, rows]: the layout
// changes between channels-first [n, c, hw] and channels-last [n, hw, c] (rows = c,
// cols = hw one way, the other way back). A block of 256 threads moves 32x32 tiles through
// shared memory: it reads a tile's rows (32 consecutive columns per warp, coalesced) and
// writes its columns as the destination's rows (32 consecutive values per warp, coalesced);
// the tile is 32x33 so that reading a column of it hits 32 different banks. Grid-stride
// over the tiles (x: columns, y: rows, z: images; the grid's limits checked on the host);
// every branch around the barriers is uniform over the block. 64-bit offsets. S and D are
// float (f32) or unsigned short (bf16 storage: read exactly, written rounded); the tile
// holds f32 either way.
template <typename S, typename D>
__device__ __forceinline__ void transpose_tiles_t(const S* __restrict__ src, D* __restrict__ dst,
                                                  int n, int rows, int cols) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8
    const int tiles_r = (rows + 31) / 32, tiles_c = (cols + 31) / 32;
    const long long img = (long long)rows * cols;
    for (int im = blockIdx.z; im < n; im += gridDim.z) {
        const long long base = im * img;
        for (int tr = blockIdx.y; tr < tiles_r; tr += gridDim.y) {
            for (int tc = blockIdx.x; tc < tiles_c; tc += gridDim.x) {
                const int r0 = tr * 32, c0 = tc * 32;
                for (int k = ty; k < 32; k += 8) {
                    const int r = r0 + k, c = c0 + tx;
                    if (r < rows && c < cols) tile[k][tx] = load_value(src, base + (long long)r * cols + c);
                }
                __syncthreads();
                for (int k = ty; k < 32; k += 8) {
                    const int c = c0 + k, r = r0 + tx;
                    if (c < cols && r < rows) store_value(dst, base + (long long)c * rows + r, tile[tx][k]);
                }
                __syncthreads();
            }
        }
    }
}

extern "C" __global__ void transpose_tiles(const float* __restrict__ src, float* __restrict__ dst,
                                           int n, int rows, int cols) {
    transpose_tiles_t(src, dst, n, rows, cols);
}

// The transpose from f32 into bf16 storage (dst: (n * rows * cols + 1) / 2 slots).
extern "C" __global__ void transpose_tiles_to_bf16(const float* __restrict__ src,
                                                   float* __restrict__ dst, int n, int rows,
                                                   int cols) {
    transpose_tiles_t(src, (unsigned short*)dst, n, rows, cols);
}

// The transpose from bf16 storage (src: (n * rows * cols + 1) / 2 slots) into f32.
extern "C" __global__ void transpose_tiles_from_bf16(const float* __restrict__ src,
                                                     float* __restrict__ dst, int n, int rows,
                                                     int cols) {
    transpose_tiles_t((const unsigned short*)src, dst, n, rows, cols);
}

// f32 [len] into bf16 storage [(len + 1) / 2 slots]: a thread per slot, both halves written
// at once (the high half of an odd length's last slot 0). Grid-stride, 64-bit offsets.
extern "C" __global__ void pack_bf16(const float* __restrict__ src, float* __restrict__ dst,
                                     unsigned long long len) {
    const unsigned long long slots = (len + 1) / 2;
    unsigned int* d = (unsigned int*)dst;
    for (unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; j < slots;
         j += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned int lo = bf16_bits(src[2 * j]);
        const unsigned int hi = 2 * j + 1 < len ? bf16_bits(src[2 * j + 1]) : 0u;
        d[j] = lo | (hi << 16);
    }
}

// bf16 storage [(len + 1) / 2 slots] into f32 [len], exactly. Grid-stride, 64-bit offsets.
extern "C" __global__ void unpack_bf16(const float* __restrict__ src, float* __restrict__ dst,
                                       unsigned long long len) {
    const unsigned short* s = (const unsigned short*)src;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = load_value(s, (long long)i);
}
