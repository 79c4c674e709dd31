// wgmma kernels of the emulator's self-test (emu/tests/selftest.cpp): the sm_90a primitives of
// emu/shim/emu_wgmma.h that kernels/conv_wgmma.cu wraps around its inline PTX. The shared
// tiles, the descriptors and the accumulator fragments are written here from the PTX ISA's
// documented layouts on their own (not through the shim's code): a swizzled tile as "16-byte
// chunk c of row r stored at chunk position c ^ (r % 8)", a non-swizzled one as 8x16-byte
// core matrices with distinct LBO and SBO, so a shim that decodes the descriptor, the swizzle
// or the fragment otherwise gives a wrong product. Host build only (emuModuleLoadHost).

extern __shared__ __align__(16) unsigned char wg_smem[];

// Byte offset of element (r, k) of an R-row, K-major tile of 16-bit values:
// mode 1, 2, 3 (128-, 64-, 32-byte swizzle, W = 128, 64, 32 bytes per row: W / 2 k): k in
//   blocks of W / 2, block kb at kb * R * W; 8-row group r / 8 at (r / 8) * 8W, row r % 8 at
//   (r % 8) * W, and its 16-byte chunk c = (k % (W / 2)) / 8 at chunk position c ^ phase, the
//   phase of the row in its pattern: r % 8 (128-byte), (r % 8) / 2 (64-byte: pairs of rows
//   share one), (r % 8) / 4 (32-byte) (the tile 1024-byte aligned).
// mode 0 (no swizzle): core matrices of 8 rows x 8 k (128 contiguous bytes, rows 16 bytes
//   apart), the next 8 rows SBO = 128 bytes on, the next 8 k LBO = R * 16 bytes on.
__device__ unsigned st_off(int mode, int R, int r, int k) {
    if (mode != 0) {
        const int W = 128 >> (mode - 1), kpr = W / 2;
        const int kb = k / kpr, c = (k % kpr) / 8;
        const int phase = mode == 1 ? r % 8 : mode == 2 ? (r % 8) / 2 : (r % 8) / 4;
        return kb * R * W + (r / 8) * 8 * W + (r % 8) * W + (c ^ phase) * 16 + (k % 8) * 2;
    }
    return (r / 8) * 128 + (k / 8) * (R * 16) + (r % 8) * 16 + (k % 8) * 2;
}

// The matrix descriptor: start, LBO and SBO >> 4 in bits 0-13, 16-29, 32-45; swizzle bits 62-63.
__device__ unsigned long long st_desc(unsigned addr, unsigned lbo, unsigned sbo, unsigned mode) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | ((unsigned long long)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFFu) >> 4) << 32) | ((unsigned long long)mode << 62);
}

// Descriptor of the 64-row (A, rows r0..) or N-row (B) operand of k step ks (16 k) of an R-row tile at `base`.
__device__ unsigned long long st_operand(int mode, unsigned base, int R, int r0, int ks) {
    if (mode != 0) {
        // A W-byte row holds W / 32 k steps of 16 k (32 bytes each); SBO = 8 rows.
        const int W = 128 >> (mode - 1), steps = W / 32;
        return st_desc(base + (ks / steps) * R * W + (r0 / 8) * 8 * W + (ks % steps) * 32, 16, 8 * W, mode);
    }
    return st_desc(base + (r0 / 8) * 128 + ks * 2 * (R * 16), R * 16, 128, 0);
}

// The accumulator fragment of m64nNk16 (f32): element i of thread tid of warpgroup wg is
// D[64 wg + 16 w + g + 8 ((i / 2) % 2)][8 (i / 4) + 2 q + i % 2], w = tid / 32 % 4, g = lane / 4, q = lane % 4.
__device__ int st_frag(int tid, int i, int N) {
    const int wg = tid / 128, w = (tid / 32) % 4, lane = tid % 32, g = lane / 4, q = lane % 4;
    return (64 * wg + 16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + i % 2;
}

// D (64 WG x N f32) = A (64 WG x K bf16 bits, row-major) . B^T (B: N x K, row-major) + (scale_d ? C : 0),
// WG = blockDim.x / 128 warpgroups sharing B, K / 16 wgmma per warpgroup, one commit and wait.
extern "C" __global__ void st_wgmma(const unsigned short* A, const unsigned short* B, const float* C, float* D, int mode,
                                    int N, int K, int scale_d) {
    const int tid = threadIdx.x, R = blockDim.x / 2;  // A's rows: 64 per warpgroup
    const unsigned s0 = ptx_smem_addr(wg_smem), pad = (1024 - s0 % 1024) % 1024;
    unsigned char* base = wg_smem + pad;
    unsigned char* bbase = base + R * K * 2;
    for (int i = tid; i < R * K; i += blockDim.x) *(unsigned short*)(base + st_off(mode, R, i / K, i % K)) = A[i];
    for (int i = tid; i < N * K; i += blockDim.x) *(unsigned short*)(bbase + st_off(mode, N, i / K, i % K)) = B[i];
    ptx_fence_proxy_async();
    __syncthreads();
    float d[64];
    for (int i = 0; i < N / 2; ++i) d[i] = C[st_frag(tid, i, N)];
    const unsigned sa = s0 + pad, sb = sa + R * K * 2;
    ptx_wgmma_fence();
    for (int ks = 0; ks < K / 16; ++ks) {
        const unsigned long long da = st_operand(mode, sa, R, 64 * (tid / 128), ks), db = st_operand(mode, sb, N, 0, ks);
        const int sd = ks == 0 ? scale_d : 1;
        if (N == 64)
            ptx_wgmma_m64n64k16_f32_bf16(*(float(*)[32])d, da, db, sd);
        else
            ptx_wgmma_m64n128k16_f32_bf16(*(float(*)[64])d, da, db, sd);
    }
    ptx_wgmma_commit_group();
    ptx_wgmma_wait_group<0>();
    for (int i = 0; i < N / 2; ++i) D[st_frag(tid, i, N)] = d[i];
}

// MN-major (imm-trans 1) operands, laid out from the PTX ISA's MN-major figures and its exact
// layouts for bf16 ("MN-Major, 64B swizzling": Swizzle<2,4,3> o ((8,4,2),(8,2)):((1,8,256),
// (32,512)), LBO 256 and SBO 512 elements; the no-swizzle one ((8,1,2),(8,2)):((1,8,64),
// (8,128)), SBO 64 and LBO 128 elements), written here as tiles of atoms on their own: element
// (r, k) of an R x K tile (r the contiguous m or n), 16-bit values:
// mode 1, 2, 3 (W = 128, 64, 32 bytes): atoms of 8 k-rows x W bytes (E = W / 2 consecutive r in
//   a row), atom (r / E, k / 8) at index (k / 8) * (R / E) + r / E (order 0: the r-atoms of
//   one k group adjacent) or (r / E) * (K / 8) + k / 8 (order 1), 8W bytes each; in it row k % 8
//   at (k % 8) * W, its 16-byte chunk (r % E) / 8 at chunk position chunk ^ phase (the
//   swizzle's, as above, of row k % 8 of the atom) and r % 8 at 2 (r % 8) in it.
// mode 0: core matrices of 8 k-rows x 16 bytes (8 r), core (r / 8, k / 8) at index
//   (k / 8) * (R / 8) + r / 8 (order 0) or (r / 8) * (K / 8) + k / 8 (order 1), 128 bytes each.
// The descriptors name the offsets by their role in the ISA's tables ("Leading dimension
// byte offset" / "Stride dimension byte offset" for MN-major): swizzled, LBO = the offset of
// the next W/2 rows of r (the next atom along m or n), SBO = of the next 8 k; no swizzle, LBO =
// the next 8 k, SBO = the next 8 r.
__device__ unsigned st_off_mn(int mode, int order, int R, int K, int r, int k) {
    if (mode != 0) {
        const int W = 128 >> (mode - 1), E = W / 2, row = k % 8;
        const int atom = order == 0 ? (k / 8) * (R / E) + r / E : (r / E) * (K / 8) + k / 8;
        const int phase = mode == 1 ? row : mode == 2 ? row / 2 : row / 4;
        return atom * 8 * W + row * W + ((((r % E) / 8) ^ phase) * 16) + (r % 8) * 2;
    }
    const int core = order == 0 ? (k / 8) * (R / 8) + r / 8 : (r / 8) * (K / 8) + k / 8;
    return core * 128 + (k % 8) * 16 + (r % 8) * 2;
}

// The MN-major descriptor of rows r0.. (64 of A, or B's N) and k step ks of an R x K tile at `base`.
__device__ unsigned long long st_operand_mn(int mode, int order, unsigned base, int R, int K, int r0, int ks) {
    if (mode != 0) {
        const int W = 128 >> (mode - 1), E = W / 2, atom_bytes = 8 * W;
        const int atom = order == 0 ? (2 * ks) * (R / E) + r0 / E : (r0 / E) * (K / 8) + 2 * ks;
        const unsigned next_r = order == 0 ? atom_bytes : (K / 8) * atom_bytes;  // the next atom along r
        const unsigned next_k = order == 0 ? (R / E) * atom_bytes : atom_bytes;  // the next 8 k
        return st_desc(base + atom * atom_bytes, next_r, next_k, mode);
    }
    const int core = order == 0 ? (2 * ks) * (R / 8) + r0 / 8 : (r0 / 8) * (K / 8) + 2 * ks;
    const unsigned next_r = order == 0 ? 128 : (K / 8) * 128;
    const unsigned next_k = order == 0 ? (R / 8) * 128 : 128;
    return st_desc(base + core * 128, next_k, next_r, 0);
}

template <int TA, int TB>
__device__ void st_mma_trans(float* d, int N, unsigned long long da, unsigned long long db, int sd) {
    if (N == 64)
        ptx_wgmma_m64n64k16_f32_bf16_trans<TA, TB>(*(float(*)[32])d, da, db, sd);
    else
        ptx_wgmma_m64n128k16_f32_bf16_trans<TA, TB>(*(float(*)[64])d, da, db, sd);
}

// st_wgmma with A MN-major where ta, B where tb (the other K-major as st_wgmma lays it out),
// the MN-major ones in atom order `order`.
extern "C" __global__ void st_wgmma_mn(const unsigned short* A, const unsigned short* B, const float* C, float* D,
                                       int mode, int N, int K, int scale_d, int ta, int tb, int order) {
    const int tid = threadIdx.x, R = blockDim.x / 2;
    const unsigned s0 = ptx_smem_addr(wg_smem), pad = (1024 - s0 % 1024) % 1024;
    unsigned char* base = wg_smem + pad;
    unsigned char* bbase = base + R * K * 2;
    for (int i = tid; i < R * K; i += blockDim.x) {
        const int r = i / K, k = i % K;
        *(unsigned short*)(base + (ta ? st_off_mn(mode, order, R, K, r, k) : st_off(mode, R, r, k))) = A[i];
    }
    for (int i = tid; i < N * K; i += blockDim.x) {
        const int r = i / K, k = i % K;
        *(unsigned short*)(bbase + (tb ? st_off_mn(mode, order, N, K, r, k) : st_off(mode, N, r, k))) = B[i];
    }
    ptx_fence_proxy_async();
    __syncthreads();
    float d[64];
    for (int i = 0; i < N / 2; ++i) d[i] = C[st_frag(tid, i, N)];
    const unsigned sa = s0 + pad, sb = sa + R * K * 2;
    ptx_wgmma_fence();
    for (int ks = 0; ks < K / 16; ++ks) {
        const int r0 = 64 * (tid / 128);
        const unsigned long long da =
            ta ? st_operand_mn(mode, order, sa, R, K, r0, ks) : st_operand(mode, sa, R, r0, ks);
        const unsigned long long db = tb ? st_operand_mn(mode, order, sb, N, K, 0, ks) : st_operand(mode, sb, N, 0, ks);
        const int sd = ks == 0 ? scale_d : 1;
        if (ta && tb)
            st_mma_trans<1, 1>(d, N, da, db, sd);
        else if (ta)
            st_mma_trans<1, 0>(d, N, da, db, sd);
        else if (tb)
            st_mma_trans<0, 1>(d, N, da, db, sd);
        else
            st_mma_trans<0, 0>(d, N, da, db, sd);
    }
    ptx_wgmma_commit_group();
    ptx_wgmma_wait_group<0>();
    for (int i = 0; i < N / 2; ++i) D[st_frag(tid, i, N)] = d[i];
}

// What the emulator must refuse (one warpgroup, A and B 64 x 16 of ones, 128B swizzle), by `what`:
// 0 correct (out[tid] = d[0] = 16), 1 no wgmma.fence, 2 an A element overwritten before the
// wait, 3 d read before the wait (out = NaN: the results land at the wait), 4 called by warps
// 1-4 of a 160-thread block (a warpgroup must start at a warp index divisible by 4), 5 a start
// address in row 1 of its swizzle pattern, 6 no fence.proxy.async, 7 a block of 96 threads,
// 8 an MN-major (imm-trans-a 1) A whose 128B-swizzled start is 64 bytes into its pattern's first
// row (K-major accepts such a start: not modelled for MN-major), 9 both operands MN-major
// (correct: out[tid] = 16).
extern "C" __global__ void st_wgmma_bad(float* out, int what) {
    const int tid = threadIdx.x;
    const unsigned s0 = ptx_smem_addr(wg_smem), pad = (1024 - s0 % 1024) % 1024;
    unsigned char* base = wg_smem + pad;
    for (int i = tid; i < 2 * 64 * 64; i += blockDim.x) ((unsigned short*)base)[i] = 0x3f80;  // bf16 1.0
    if (what != 6) ptx_fence_proxy_async();
    __syncthreads();
    const bool in = what == 4 ? tid >= 32 : true;
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.0f;
    if (in) {
        const unsigned sa = s0 + pad, sb = sa + 8192;
        if (what != 1) ptx_wgmma_fence();
        const unsigned long long da = st_desc(sa + (what == 5 ? 128 : what == 8 ? 64 : 0), 16, 1024, 1),
                                 db = st_desc(sb, 16, 1024, 1);
        if (what == 8)
            ptx_wgmma_m64n64k16_f32_bf16_trans<1, 0>(d, da, db, 0);
        else if (what == 9)
            ptx_wgmma_m64n64k16_f32_bf16_trans<1, 1>(d, da, db, 0);
        else
            ptx_wgmma_m64n64k16_f32_bf16(d, da, db, 0);
        ptx_wgmma_commit_group();
        if (what == 2 && tid == 0) ((unsigned short*)base)[3] = 0x4000;
        if (what == 3) out[tid] = d[0];
        ptx_wgmma_wait_group<0>();
        if (what != 3) out[tid] = d[0];
    }
}
