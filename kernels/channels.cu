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

// Per image dst[j, i] = src[i, j] for src [n, rows, cols] and dst [n, cols, rows]: the layout
// changes between channels-first [n, c, hw] and channels-last [n, hw, c] (rows = c,
// cols = hw one way, the other way back). A block of 256 threads moves 32x32 tiles through
// shared memory: it reads a tile's rows (32 consecutive columns per warp, coalesced) and
// writes its columns as the destination's rows (32 consecutive values per warp, coalesced);
// the tile is 32x33 so that reading a column of it hits 32 different banks. Grid-stride
// over the tiles (x: columns, y: rows, z: images; the grid's limits checked on the host);
// every branch around the barriers is uniform over the block. 64-bit offsets.
extern "C" __global__ void transpose_tiles(const float* __restrict__ src, float* __restrict__ dst,
                                           int n, int rows, int cols) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8
    const int tiles_r = (rows + 31) / 32, tiles_c = (cols + 31) / 32;
    const long long img = (long long)rows * cols;
    for (int im = blockIdx.z; im < n; im += gridDim.z) {
        const float* s = src + im * img;
        float* d = dst + im * img;
        for (int tr = blockIdx.y; tr < tiles_r; tr += gridDim.y) {
            for (int tc = blockIdx.x; tc < tiles_c; tc += gridDim.x) {
                const int r0 = tr * 32, c0 = tc * 32;
                for (int k = ty; k < 32; k += 8) {
                    const int r = r0 + k, c = c0 + tx;
                    if (r < rows && c < cols) tile[k][tx] = s[(long long)r * cols + c];
                }
                __syncthreads();
                for (int k = ty; k < 32; k += 8) {
                    const int c = c0 + k, r = r0 + tx;
                    if (c < cols && r < rows) d[(long long)c * rows + r] = tile[tx][k];
                }
                __syncthreads();
            }
        }
    }
}
