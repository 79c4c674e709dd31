// The channels-last eval-mode conv + batch norm (+ residual) (+ ReLU) forward on activations
// stored in bf16, on Hopper's warpgroup tensor-core instruction `wgmma` (sm_90a): the contract
// of kernels/conv_tc.cu's conv2d_fwd_bn_mma_nhwc_bf16s (x, the residual and y NHWC bf16 values,
// element i the i-th 16-bit half of the buffer; the weights the bf16 OHWI copy that
// conv_tc.cu's conv_weight_ohwi_bf16 makes per call, rows of KP = K rounded up to 8, zero past
// K; ss = {scale, shift} f32 per output channel; y rounded to nearest even), as an implicit
// GEMM with the pixels as M and the output channels as N:
//
//   D [pixels][c_out] = im2col(x) [pixels][K] . W^T, K = KH*KW*C ordered (kh, kw, c), both
//   operands K-major (x's channels and the OHWI rows are contiguous in k)
//
// Supported: C % 8 == 0 and x 16-byte aligned (a 16-byte chunk of 8 k is 8 channels of one
// tap of one pixel), any kernel size, stride and padding, any c_out (conv_wgmma.rs's
// `supported`); the host falls back to the mma.sync kernel otherwise.
//
// Block: 256 threads = 2 warpgroups, a tile of 128 pixels x BN output channels (BN = 128, or
// 64 for c_out <= 64: conv2d_fwd_bn_wgmma_n128 / _n64), each warpgroup 64 pixels by one
// wgmma.mma_async m64nBNk16 per 16 k. K tiles of 64 (one 128-byte row per pixel or channel)
// in a ring of WG_STAGES stages, each A [128][64] and B [BN][64] bf16 in the canonical K-major
// layout with the 128-byte swizzle: row r at (r / 8) * 1024 + (r % 8) * 128, its 16-byte chunk
// c at chunk position c ^ (r % 8) (conflict-free for the copies and for the tensor cores), the
// stages 1024-byte aligned in the shared window. Descriptors: start address of the warpgroup's
// 64 rows + 32 bytes per 16 k, SBO 1024 (the next 8 rows), LBO 16 (unused with the swizzle),
// swizzle mode 1 (bits 62-63). Loads: 16-byte cp.async with zero fill (outside the image, past
// K, past the pixels or channels), 4 + BN/32 per thread and stage; tile t + STAGES - 1 is in
// flight while tile t is multiplied. Per tile: wait for its copies, fence.proxy.async (the
// copies are generic-proxy writes that the tensor cores read through the async proxy),
// barrier, wgmma.fence, 4 wgmma, commit, then the next tile's copies into the stage tile t-1
// used, then wgmma.wait_group 0 (the stage is free again after the next barrier).
// Epilogue from the accumulator fragment: thread (warp w of its warpgroup, lane g*4 + q) holds
// d[i] = D[16w + g + 8 ((i/2) % 2)][8 (i/4) + 2q + i % 2], i.e. channel pairs of two pixels per
// 8-channel block: bn_epilogue's arithmetic (each step rounded, no FMA contraction, as the CPU
// reference), the residual read as bf16, one 32-bit store of two bf16 (2-byte stores at an odd
// c_out or past c_out).
//
// The training forward conv2d_fwd_stats_wgmma_n128 / _n64 is the same kernel (the GEMM and
// the stores shared: conv_fwd_wgmma<BN, EPI>) with the EPI_STATS epilogue, the contract of
// conv_tc.cu's conv2d_fwd_stats_mma_nhwc_bf16s: z = acc rounded to nearest even (no batch
// norm, no residual, no ReLU), and per output channel c and 64-pixel tile t (of the N*OH*OW
// pixels in order: a warpgroup's 64 rows are tile 2 * blockIdx.x + wg) part_s[c * T + t] = the
// f64 sum of the ROUNDED z over the tile and part_q[c * T + t] the f64 sum of its squared
// deviations from the tile's mean, T = ceil(N*OH*OW / 64), in that kernel's order (k = 0..63
// in pixel order, two passes), so that norm.rs's batchnorm_train_from_partials combines them
// unchanged. The rounded values go through shared memory (the ring, free once every
// warpgroup's wgmma has completed: a barrier), [128 pixels][BN + 8] f32, then thread tid
// takes channel tid % BN of tile tid / BN.
//
// The PTX lives in the ptx_* wrappers below, the one conditional of the file: under the
// emulated driver (ICHCAM_CUDA_EMU) emu/shim/emu_wgmma.h defines them with the ISA's layouts;
// for NVRTC they are the asm, which exists only for compute_90a (sm_90a code runs on compute
// capability 9.0 exactly; the feature macro __CUDA_ARCH_FEAT_SM90_ALL is what tells build.rs
// that this file is sm_90a code): build.rs precompiles this file for compute_90a and module.rs
// loads that PTX on such a device (NVRTC at run time where the build had none), and build.rs's
// compute_90 / compute_75 PTX of it (the same source, every kernel file is precompiled so)
// gets trapping bodies and is never loaded.

#define WG_THREADS 256
#define WG_BM 128
#define WG_BK 64
#define WG_STAGES 4
// Bytes of one stage's A (128 rows of 128 bytes) and of B at BN = 128.
#define WG_A_BYTES (WG_BM * WG_BK * 2)
#define WG_B_BYTES_MAX (128 * WG_BK * 2)
// Dynamic shared memory: 1 KiB of alignment slack, the ring, the pixel table (conv_wgmma.rs's WG_SMEM).
#define WG_SMEM (1024 + WG_STAGES * (WG_A_BYTES + WG_B_BYTES_MAX) + WG_BM * 16)
static_assert(WG_SMEM == 134144, "conv_wgmma.rs's WG_SMEM");
static_assert(WG_SMEM <= 227 * 1024, "the opt-in limit of sm_90");
// The epilogues (conv_tc.cu's values): eval batch norm, or z and the batch-norm partials.
#define EPI_BN 1
#define EPI_STATS 2
// Row length (f32) of the EPI_STATS epilogue's tile of rounded z, [WG_BM][BN + WG_LDZ_PAD]
// over the ring.
#define WG_LDZ_PAD 8

extern __shared__ __align__(16) unsigned char wg_smem[];

#ifndef ICHCAM_CUDA_EMU
__device__ __forceinline__ unsigned ptx_smem_addr(const void* p) {
    unsigned r;
    asm("{\n.reg .u64 t;\ncvta.to.shared.u64 t, %1;\ncvt.u32.u64 %0, t;\n}\n" : "=r"(r) : "l"(p));
    return r;
}
template <int N>
__device__ __forceinline__ void ptx_wgmma_fence_operand(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void ptx_cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ptx_smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void ptx_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void ptx_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ptx_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void ptx_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void ptx_wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void ptx_wgmma_wait_group() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// wgmma m64nNk16 (N = 64, 128) f32 += bf16 x bf16 with imm-trans-a = TA, imm-trans-b = TB (0:
// that operand K-major in shared memory; 1: MN-major, A M-major, B N-major:
// emu/shim/emu_wgmma.h's layouts), scale-d by the predicate, scale-a = scale-b = 1.
template <int TA, int TB>
__device__ __forceinline__ void ptx_wgmma_m64n64k16_f32_bf16_trans(float (&d)[32], unsigned long long desc_a,
                                                               unsigned long long desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TA), "n"(TB)
        : "memory");
}
template <int TA, int TB>
__device__ __forceinline__ void ptx_wgmma_m64n128k16_f32_bf16_trans(float (&d)[64], unsigned long long desc_a,
                                                               unsigned long long desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TA), "n"(TB)
        : "memory");
}
#else
// Not compute_90a (build.rs's compute_90 and compute_75 PTX of this file, never loaded): no
// wgmma there, so the wrappers trap.
__device__ __forceinline__ void ptx_cp_async_16(void*, const void*, int) { __trap(); }
__device__ __forceinline__ void ptx_cp_async_commit() { __trap(); }
template <int N>
__device__ __forceinline__ void ptx_cp_async_wait() { __trap(); }
__device__ __forceinline__ void ptx_fence_proxy_async() { __trap(); }
__device__ __forceinline__ void ptx_wgmma_fence() { __trap(); }
__device__ __forceinline__ void ptx_wgmma_commit_group() { __trap(); }
template <int N>
__device__ __forceinline__ void ptx_wgmma_wait_group() { __trap(); }
template <int TA, int TB>
__device__ __forceinline__ void ptx_wgmma_m64n64k16_f32_bf16_trans(float (&)[32], unsigned long long, unsigned long long,
                                                                   int) {
    __trap();
}
template <int TA, int TB>
__device__ __forceinline__ void ptx_wgmma_m64n128k16_f32_bf16_trans(float (&)[64], unsigned long long, unsigned long long,
                                                                    int) {
    __trap();
}
#endif
// Both operands K-major (the forward and the data gradient).
__device__ __forceinline__ void ptx_wgmma_m64n64k16_f32_bf16(float (&d)[32], unsigned long long desc_a,
                                                         unsigned long long desc_b, int scale_d) {
    ptx_wgmma_m64n64k16_f32_bf16_trans<0, 0>(d, desc_a, desc_b, scale_d);
}
__device__ __forceinline__ void ptx_wgmma_m64n128k16_f32_bf16(float (&d)[64], unsigned long long desc_a,
                                                          unsigned long long desc_b, int scale_d) {
    ptx_wgmma_m64n128k16_f32_bf16_trans<0, 0>(d, desc_a, desc_b, scale_d);
}
#endif

// One pixel of the block's tile: x's pixel index of (its image, 0, 0) and the input row and
// column of its tap (0, 0); ih0 = iw0 = -2^30 past the pixels, so that every tap is outside.
// The data gradient's table (dy as the image) also records dx's pixel index (out; unused by
// the forward).
struct __align__(16) WgPixel {
    int base, ih0, iw0, out;
};

__device__ __forceinline__ int wg_conv_out(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

// Byte offset of 16-byte chunk c (k 8c..8c+7) of row r in a 128-byte-swizzled K-major tile
// (1024-byte aligned): the canonical layout of the PTX ISA's 128B swizzle mode.
__device__ __forceinline__ unsigned wg_sw128(int r, int c) { return (r >> 3) * 1024 + (r & 7) * 128 + ((c ^ (r & 7)) << 4); }

// The matrix descriptor of a K-major 128-byte-swizzled operand whose first row starts at
// shared address `saddr` (8-row groups 1024 bytes apart): start >> 4 (bits 0-13), LBO 16 >> 4
// (bits 16-29, unused with the swizzle), SBO 1024 >> 4 (bits 32-45), base offset 0, mode 1
// (bits 62-63: 128-byte swizzle).
__device__ __forceinline__ unsigned long long wg_desc(unsigned saddr) {
    return (unsigned long long)((saddr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

// bf16 bits of v rounded to nearest even (NaN kept quiet), and back.
__device__ __forceinline__ unsigned wg_bf16_bits(float v) {
    const unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ float wg_bf16(unsigned h) { return __uint_as_float(h << 16); }

// conv_tc.cu's bn_epilogue_v: each step rounded on its own, as the CPU reference.
__device__ __forceinline__ float wg_epilogue(float acc, float scale, float shift, bool has_res, float r, int relu) {
    float v = __fadd_rn(__fmul_rn(acc, scale), shift);
    if (has_res) v = __fadd_rn(v, r);
    return relu ? fmaxf(v, 0.0f) : v;
}

template <int BN>
__device__ __forceinline__ void wgmma_k16(float (&acc)[BN / 2], unsigned long long da, unsigned long long db, int scale_d);
template <>
__device__ __forceinline__ void wgmma_k16<64>(float (&acc)[32], unsigned long long da, unsigned long long db, int scale_d) {
    ptx_wgmma_m64n64k16_f32_bf16(acc, da, db, scale_d);
}
template <>
__device__ __forceinline__ void wgmma_k16<128>(float (&acc)[64], unsigned long long da, unsigned long long db, int scale_d) {
    ptx_wgmma_m64n128k16_f32_bf16(acc, da, db, scale_d);
}

// The block's ring: the dynamic shared memory from its first 1024-byte-aligned byte (the
// swizzle is a function of the address); sring its shared-window address.
__device__ __forceinline__ unsigned char* wg_ring(unsigned& sring) {
    const unsigned s0 = ptx_smem_addr(wg_smem), align = (1024u - (s0 & 1023u)) & 1023u;
    sring = s0 + align;
    return wg_smem + align;
}

// wgmma's scale-d of k group ks of K tile t: 0 on the first (acc = the product), else 1.
__device__ __forceinline__ int wg_scale_d(int t, int ks) { return (t > 0 || ks > 0) ? 1 : 0; }

// The ring's main loop, shared by the three GEMMs of this file: acc zeroed, then nk K tiles
// of WG_BK through WG_STAGES stages of A (WG_A_BYTES) then B (BN rows of WG_BK) at shared
// address sring, 1024-byte aligned. issue(t): this thread's copies of tile t into stage
// t % WG_STAGES (cp.async); mma(sa, sb, t, ks): the wgmma of k group ks (16 k) of tile t from
// the stage's A at sa and B at sb into acc, scale-d wg_scale_d(t, ks). Tile
// t + WG_STAGES - 1 is in flight while tile t is multiplied. Ends with every copy landed; the
// ring is free once every warpgroup is past it (a barrier).
template <int BN, typename Issue, typename Mma>
__device__ __forceinline__ void wg_mainloop(float (&acc)[BN / 2], unsigned sring, int nk, Issue& issue, Mma& mma) {
    constexpr int STAGE = WG_A_BYTES + BN * WG_BK * 2;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int s = 0; s < WG_STAGES - 1; ++s) {
        if (s < nk) issue(s);
        ptx_cp_async_commit();
    }
    for (int t = 0; t < nk; ++t) {
        // Tile t has landed (this thread's copies), is visible to the async proxy, and after
        // the barrier everyone's; every warpgroup is done with tile t - 1 (waited below).
        ptx_cp_async_wait<WG_STAGES - 2>();
        ptx_fence_proxy_async();
        __syncthreads();
        const unsigned sa = sring + (t % WG_STAGES) * STAGE;
        const unsigned sb = sa + WG_A_BYTES;
        ptx_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < WG_BK / 16; ++ks) mma(sa, sb, t, ks);
        ptx_wgmma_commit_group();
        // The stage tile t - 1 used refills while the tensor cores work on tile t.
        if (t + WG_STAGES - 1 < nk) issue(t + WG_STAGES - 1);
        ptx_cp_async_commit();
        ptx_wgmma_wait_group<0>();
        ptx_wgmma_fence_operand(acc);
    }
    ptx_cp_async_wait<0>();
}

// The implicit GEMM of the forward and of the data gradient, warpgroup wg's 64 rows of the
// block's 128 x BN tile into acc (the fragment): acc[r][n] = sum over k < KB of A[r][k] B[n][k],
// A = the pixel table's gather of the NHWC bf16 tensor src (C channels, H x W pixels, taps KW
// wide, k = (tap, c), zero outside the image and from K = taps * C on), B = rows n0.. of the
// bf16 [NB][KB] matrix w (KB % 8 == 0, zero past NB rows). C % 8 == 0 and src 16-byte aligned.
// Ends with every copy landed; the ring is free once every warpgroup is past it (a barrier).
template <int BN>
__device__ __forceinline__ void wg_gemm(float (&acc)[BN / 2], unsigned char* ring, unsigned sring, const WgPixel* pix,
                                        const unsigned short* __restrict__ src, int C, int H, int W, int KW, int K,
                                        const unsigned short* __restrict__ w, int KB, int n0, int NB) {
    constexpr int STAGE = WG_A_BYTES + BN * WG_BK * 2;
    const int tid = threadIdx.x, wg = tid >> 7;
    // Tile t's copies into stage t % WG_STAGES: A = 128 pixels x 8 chunks (4 per thread), B =
    // BN rows x 8 chunks (BN / 32 per thread); chunk i = tid + 256 q is row i / 8, chunk i % 8.
    auto issue = [&](int t) {
        unsigned char* As = ring + (t % WG_STAGES) * STAGE;
        unsigned char* Bs = As + WG_A_BYTES;
        const int k0 = t * WG_BK;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int i = tid + WG_THREADS * q, r = i >> 3, c = i & 7, k = k0 + 8 * c;
            const WgPixel e = pix[r];
            bool ok = k < K;
            size_t off = 0;
            if (ok) {
                const int tap = k / C, ch = k - tap * C, kh = tap / KW, kw = tap - kh * KW;
                const int ih = e.ih0 + kh, iw = e.iw0 + kw;
                ok = (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
                if (ok) off = (size_t)(e.base + ih * W + iw) * C + ch;
            }
            ptx_cp_async_16(As + wg_sw128(r, c), src + off, ok ? 16 : 0);
        }
#pragma unroll
        for (int q = 0; q < BN / 32; ++q) {
            const int i = tid + WG_THREADS * q, r = i >> 3, c = i & 7, k = k0 + 8 * c, n = n0 + r;
            const bool ok = n < NB && k < KB;
            ptx_cp_async_16(Bs + wg_sw128(r, c), ok ? w + (size_t)n * KB + k : w, ok ? 16 : 0);
        }
    };

    // K-major operands: the warpgroup's 64 rows of A 8 KiB into the stage, 16 k 32 bytes on.
    auto mma = [&](unsigned sa, unsigned sb, int t, int ks) {
        wgmma_k16<BN>(acc, wg_desc(sa + wg * 8 * 1024 + 32 * ks), wg_desc(sb + 32 * ks), wg_scale_d(t, ks));
    };
    wg_mainloop<BN>(acc, sring, (KB + WG_BK - 1) / WG_BK, issue, mma);
}

// The forward on wgmma; EPI_BN (eval: ss, res, relu; y) or EPI_STATS (training: y = z rounded,
// part_s, part_q as conv2d_fwd_stats_mma_nhwc_bf16s's of the rounded z).
template <int BN, int EPI>
__device__ __forceinline__ void conv_fwd_wgmma(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                               unsigned short* __restrict__ y, int N, int C, int H, int W, int CO, int KH,
                                               int KW, int stride, int pad, const float* __restrict__ ss,
                                               const unsigned short* __restrict__ res, int relu,
                                               double* __restrict__ part_s, double* __restrict__ part_q) {
    static_assert(EPI == EPI_BN || EPI == EPI_STATS, "an epilogue of this file");
    constexpr int STAGE = WG_A_BYTES + BN * WG_BK * 2;
    constexpr int LDZ = BN + WG_LDZ_PAD;
    static_assert(WG_BM * LDZ * 4 <= WG_STAGES * STAGE, "the statistics tile fits in the ring");
    const int tid = threadIdx.x, wg = tid >> 7;
    const int OH = wg_conv_out(H, KH, stride, pad), OW = wg_conv_out(W, KW, stride, pad);
    const int K = KH * KW * C, KP = (K + 7) & ~7, OHW = OH * OW, P = N * OHW;
    const int m0 = blockIdx.x * WG_BM, n0 = blockIdx.y * BN;
    unsigned sring;
    unsigned char* ring = wg_ring(sring);
    WgPixel* pix = (WgPixel*)(ring + WG_STAGES * STAGE);
    if (tid < WG_BM) {
        const int p = m0 + tid;
        WgPixel e = {0, -(1 << 30), -(1 << 30), 0};
        if (p < P) {
            const int n = p / OHW, r = p - n * OHW, oh = r / OW, ow = r - oh * OW;
            e.base = n * H * W;
            e.ih0 = oh * stride - pad;
            e.iw0 = ow * stride - pad;
        }
        pix[tid] = e;
    }
    __syncthreads();

    float acc[BN / 2];
    wg_gemm<BN>(acc, ring, sring, pix, x, C, H, W, KW, K, w, KP, n0, CO);

    // Epilogue from the fragment: channels co, co + 1 of pixels p (r = 0) and p + 8 (r = 1).
    const int wq = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, q = lane & 3;
    const bool has_res = EPI == EPI_BN && res != nullptr;
    auto epi = [&](float v, int c, float r) {
        if constexpr (EPI == EPI_BN)
            return wg_epilogue(v, ss[c], ss[CO + c], has_res, r, relu);
        else
            return v;
    };
    // EPI_STATS: the rounded z, [pixel][channel] of the block, laid over the ring once every
    // warpgroup's wgmma has read it (each waited for its own; the barrier for the other's).
    float* zs = (float*)ring;
    if constexpr (EPI == EPI_STATS) __syncthreads();
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        const int cl = 8 * j + 2 * q, co = n0 + cl;
        if (co >= CO) continue;
        const int ne = min(2, CO - co);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int pl = 64 * wg + 16 * wq + g + 8 * r, p = m0 + pl;
            if (p >= P) continue;
            const size_t o = (size_t)p * CO + co;
            const float v0 = acc[4 * j + 2 * r], v1 = acc[4 * j + 2 * r + 1];
            if (!(CO & 1)) {
                // o even: one aligned word of two bf16 (res and y are buffers of f32 slots).
                const unsigned rr = has_res ? *(const unsigned*)(res + o) : 0u;
                const unsigned h0 = wg_bf16_bits(epi(v0, co, wg_bf16(rr & 0xffffu)));
                const unsigned h1 = wg_bf16_bits(epi(v1, co + 1, wg_bf16(rr >> 16)));
                *(unsigned*)(y + o) = h0 | (h1 << 16);
                if constexpr (EPI == EPI_STATS) {
                    zs[pl * LDZ + cl] = wg_bf16(h0);
                    zs[pl * LDZ + cl + 1] = wg_bf16(h1);
                }
            } else {
                for (int e = 0; e < ne; ++e) {
                    const float rv = has_res ? wg_bf16(res[o + e]) : 0.0f;
                    const unsigned h = wg_bf16_bits(epi(e ? v1 : v0, co + e, rv));
                    y[o + e] = (unsigned short)h;
                    if constexpr (EPI == EPI_STATS) zs[pl * LDZ + cl + e] = wg_bf16(h);
                }
            }
        }
    }
    if constexpr (EPI == EPI_STATS) {
        __syncthreads();
        // Channel tid % BN of the block's tile (2 * blockIdx.x + tid / BN), conv_tc.cu's
        // arithmetic: the f64 sum in pixel order, then the squared deviations from its mean.
        const int NT = (P + 63) / 64;
        for (int i = tid; i < 2 * BN; i += WG_THREADS) {
            const int cl = i % BN, sub = i / BN, mc = n0 + cl;
            const int nv = min(64, P - (m0 + 64 * sub));
            if (mc >= CO || nv <= 0) continue;
            const float* zc = zs + 64 * sub * LDZ + cl;
            double sum = 0.0;
            for (int k = 0; k < nv; ++k) sum += (double)zc[k * LDZ];
            const double mean = sum / (double)nv;
            double sq = 0.0;
            for (int k = 0; k < nv; ++k) {
                const double d = (double)zc[k * LDZ] - mean;
                sq += d * d;
            }
            const size_t o = (size_t)mc * NT + 2 * blockIdx.x + sub;
            part_s[o] = sum;
            part_q[o] = sq;
        }
    }
}

// The bf16-storage channels-last eval forward on wgmma (sm_90a), a grid of (pixel tiles of 128,
// channel tiles of BN) blocks of 256 threads with WG_SMEM bytes of dynamic shared memory: x, res
// (or null) and y bf16 NHWC, w the bf16 OHWI copy (conv_weight_ohwi_bf16: rows of KP), ss =
// {scale, shift} f32, relu 0/1. C % 8 == 0 and x 16-byte aligned (the host's `supported`).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_fwd_bn_wgmma_n128(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                         unsigned short* __restrict__ y, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                         int pad, const float* __restrict__ ss, const unsigned short* __restrict__ res, int relu) {
    conv_fwd_wgmma<128, EPI_BN>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr, nullptr);
}

// The same with 64 output channels per block (c_out <= 64: no half-empty tiles).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_fwd_bn_wgmma_n64(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                        unsigned short* __restrict__ y, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                        int pad, const float* __restrict__ ss, const unsigned short* __restrict__ res, int relu) {
    conv_fwd_wgmma<64, EPI_BN>(x, w, y, N, C, H, W, CO, KH, KW, stride, pad, ss, res, relu, nullptr, nullptr);
}

// The bf16-storage channels-last training forward on wgmma (sm_90a), the grid and shared memory
// of conv2d_fwd_bn_wgmma_n128: x and z bf16 NHWC (z rounded to nearest even), w the bf16 OHWI
// copy, part_s, part_q C_out * T f64 each (T = ceil(N*OH*OW / 64), conv2d_fwd_stats_mma_nhwc_*'s
// layout) of the rounded z. C % 8 == 0 and x 16-byte aligned.
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_fwd_stats_wgmma_n128(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                            unsigned short* __restrict__ z, int N, int C, int H, int W, int CO, int KH, int KW,
                            int stride, int pad, double* __restrict__ part_s, double* __restrict__ part_q) {
    conv_fwd_wgmma<128, EPI_STATS>(x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0, part_s, part_q);
}

// The same with 64 output channels per block (c_out <= 64).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_fwd_stats_wgmma_n64(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                           unsigned short* __restrict__ z, int N, int C, int H, int W, int CO, int KH, int KW,
                           int stride, int pad, double* __restrict__ part_s, double* __restrict__ part_q) {
    conv_fwd_wgmma<64, EPI_STATS>(x, w, z, N, C, H, W, CO, KH, KW, stride, pad, nullptr, nullptr, 0, part_s, part_q);
}

// ==== The channels-last data gradient on wgmma ===========================================
//
// conv2d_bwd_data_wgmma_n128 / _n64: the contract of conv_tc.cu's conv2d_bwd_data_mma_nhwc_bf16s
// (dy bf16 NHWC [N][OH][OW][CO], element i the i-th 16-bit half of the buffer; dx f32 NHWC
// [N][H][W][C], every value written, zeros where no tap reaches it; wt the bf16 copy that
// conv_tc.cu's conv_weight_bwd_nhwc_bf16 makes per call: per output phase (py, px), row-major,
// C rows of KPP = KP * CO rounded up to 8, k = (reversed tap (a', b') = a' * KWp + b', co),
// zero past KP * CO), per output phase as that kernel (WgPhase = conv_tc.cu's PhaseGemm: the
// input pixels with (ih + pad) % stride == py and (iw + pad) % stride == px, and only the
// KP = KHp * KWp taps that reach them, so a stride-2 layer multiplies none of its structurally
// zero taps), as the forward's implicit GEMM with the phase's input pixels as M and the input
// channels as N:
//
//   dx [phase pixels][C] = col'(dy) [phase pixels][KP * CO] . Wp^T, K ordered (tap, co)
//
// K in the mma.sync kernel's order (so on the emulator, where both instructions accumulate
// with fmaf in k order from zero, the same bits). With the taps reversed, dy's row of tap a'
// of phase pixel (n, i, j) is oh0 + i - (KHp - 1) + a' (PhaseGemm's oh0): the forward's pixel
// table and gather serve unchanged with dy as the image (OH x OW, CO channels) and KWp as KW
// (wg_phase_pixels builds the table, with dx's pixel index as `out`), and so does its GEMM
// (wg_gemm): A = the gathered dy (CO % 8 == 0 and dy 16-byte aligned, the host's check: a
// 16-byte chunk is 8 channels of one tap), B = the phase's rows n0.. of KPP weights (every
// phase and row starts 16-byte aligned). Grid: x = stride^2 runs (row-major phases) of
// ceil(N * ceil(H / stride) * ceil(W / stride) / 128) pixel tiles (conv.rs's phase_grid), y =
// the C tiles of BN (128, or 64 for C <= 64); block and shared memory as the forward's
// (WG_SMEM). A block past its phase's pixels returns at once; a phase without taps (K = 0)
// writes zeros. Epilogue from the fragment: channels ci, ci + 1 of phase pixels (row 16w + g)
// and (+ 8): one 8-byte store of the two f32 where C is even and dx 8-byte aligned, else two
// 4-byte stores.

// Taps of phase p along a kernel side of K taps at stride s: ceil((K - p) / s), 0 when p >= K
// (conv_tc.cu's phase_taps).
__device__ __forceinline__ int wg_phase_taps(int K, int p, int s) { return p < K ? (K - p + s - 1) / s : 0; }

// Padded row length (bf16) of phase (py, px)'s weights in conv_weight_bwd_nhwc_bf16's copy
// (conv_tc.cu's phase_row_bf16).
__device__ __forceinline__ int wg_phase_row(int CO, int KH, int KW, int s, int py, int px) {
    return (wg_phase_taps(KH, py, s) * wg_phase_taps(KW, px, s) * CO + 7) & ~7;
}

// This block's output phase (conv_tc.cu's PhaseGemm / phase_gemm with 128-pixel tiles, and
// the phase's weights): the grid's x holds stride^2 runs of `tiles` blocks.
struct WgPhase {
    int tile;      // this block's tile of the phase's pixels
    int ihs, iws;  // its first input row / column
    int Hp, Wp;    // its rows / columns of input pixels
    int KHp, KWp;  // its taps along kh / kw
    int oh0, ow0;  // dy row / column of pixel (ihs, iws) and tap (py, px)
    int off;       // elements of conv_weight_bwd_nhwc_bf16's copy before the phase
};

__device__ __forceinline__ WgPhase wg_phase(int N, int C, int H, int W, int CO, int KH, int KW, int s, int pad) {
    WgPhase g;
    const int tiles = (N * ((H + s - 1) / s) * ((W + s - 1) / s) + WG_BM - 1) / WG_BM;
    const int phase = blockIdx.x / tiles, py = phase / s, px = phase - py * s;
    g.tile = blockIdx.x - phase * tiles;
    g.ihs = ((py - pad) % s + s) % s;
    g.iws = ((px - pad) % s + s) % s;
    g.Hp = g.ihs < H ? (H - g.ihs + s - 1) / s : 0;
    g.Wp = g.iws < W ? (W - g.iws + s - 1) / s : 0;
    g.KHp = wg_phase_taps(KH, py, s);
    g.KWp = wg_phase_taps(KW, px, s);
    g.oh0 = (g.ihs + pad - py) / s;
    g.ow0 = (g.iws + pad - px) / s;
    g.off = 0;
    for (int p = 0; p < phase; ++p) g.off += C * wg_phase_row(CO, KH, KW, s, p / s, p % s);
    return g;
}

// The data gradient on wgmma: dy bf16 NHWC, wt conv_weight_bwd_nhwc_bf16's copy, dx f32 NHWC.
template <int BN>
__device__ __forceinline__ void conv_bwd_data_wgmma(const unsigned short* __restrict__ dy,
                                                    const unsigned short* __restrict__ wt, float* __restrict__ dx,
                                                    int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                                                    int pad) {
    constexpr int STAGE = WG_A_BYTES + BN * WG_BK * 2;
    const int tid = threadIdx.x, wg = tid >> 7;
    const int OH = wg_conv_out(H, KH, stride, pad), OW = wg_conv_out(W, KW, stride, pad);
    const WgPhase ph = wg_phase(N, C, H, W, CO, KH, KW, stride, pad);
    const int K = ph.KHp * ph.KWp * CO, KPP = (K + 7) & ~7, HWp = ph.Hp * ph.Wp, P = N * HWp;
    const int m0 = ph.tile * WG_BM, n0 = blockIdx.y * BN;
    if (m0 >= P) return;  // the whole block: this phase has fewer pixels than the largest
    unsigned sring;
    unsigned char* ring = wg_ring(sring);
    WgPixel* pix = (WgPixel*)(ring + WG_STAGES * STAGE);
    if (tid < WG_BM) {
        // Phase pixel p = (n, i, j): dy's pixel index of (n, 0, 0), dy's row and column of
        // reversed tap (0, 0), dx's pixel index.
        const int p = m0 + tid;
        WgPixel e = {0, -(1 << 30), -(1 << 30), 0};
        if (p < P) {
            const int n = p / HWp, r = p - n * HWp, i = r / ph.Wp, j = r - i * ph.Wp;
            e.base = n * OH * OW;
            e.ih0 = ph.oh0 + i - (ph.KHp - 1);
            e.iw0 = ph.ow0 + j - (ph.KWp - 1);
            e.out = (n * H + ph.ihs + i * stride) * W + ph.iws + j * stride;
        }
        pix[tid] = e;
    }
    __syncthreads();

    float acc[BN / 2];
    wg_gemm<BN>(acc, ring, sring, pix, dy, CO, OH, OW, ph.KWp, K, wt + ph.off, KPP, n0, C);

    // Channels ci, ci + 1 of phase pixels pl (r = 0) and pl + 8 (r = 1).
    const int wq = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, q = lane & 3;
    const bool pair = !(C & 1) && !((size_t)dx & 7);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        const int ci = n0 + 8 * j + 2 * q;
        if (ci >= C) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int pl = 64 * wg + 16 * wq + g + 8 * r;
            if (m0 + pl >= P) continue;
            float* o = dx + (size_t)pix[pl].out * C + ci;
            const float v0 = acc[4 * j + 2 * r], v1 = acc[4 * j + 2 * r + 1];
            if (pair) {
                *(float2*)o = make_float2(v0, v1);
            } else {
                o[0] = v0;
                if (ci + 1 < C) o[1] = v1;
            }
        }
    }
}

// The bf16-storage channels-last data gradient on wgmma (sm_90a), a grid of (stride^2 runs of
// 128-pixel tiles, C tiles of BN) blocks of 256 threads with WG_SMEM bytes of dynamic shared
// memory: dy bf16 NHWC, wt conv_weight_bwd_nhwc_bf16's copy, dx f32 NHWC. CO % 8 == 0 and dy
// 16-byte aligned (the host's `supported_bwd_data`).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_bwd_data_wgmma_n128(const unsigned short* __restrict__ dy, const unsigned short* __restrict__ wt,
                           float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                           int pad) {
    conv_bwd_data_wgmma<128>(dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad);
}

// The same with 64 input channels per block (C <= 64: no half-empty tiles).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_bwd_data_wgmma_n64(const unsigned short* __restrict__ dy, const unsigned short* __restrict__ wt,
                          float* __restrict__ dx, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                          int pad) {
    conv_bwd_data_wgmma<64>(dy, wt, dx, N, C, H, W, CO, KH, KW, stride, pad);
}

// ---- The weight gradient on wgmma (channels-last, bf16 storage) ---------------------------
//
// conv2d_bwd_weight_wgmma_n128 / _n64: the contract of conv_tc.cu's
// conv2d_bwd_weight_mma_nhwc_bf16s (x [N][H][W][C] and dy [N][OH][OW][CO] bf16 values, element
// i the i-th 16-bit half of the buffer; out = dW OIHW f32 with one split, else split
// blockIdx.z's slice of the workspace [splits][CO][C*KH*KW] that conv_splitk_reduce sums in
// split order; chunk the split's run of pixels, the mma.sync kernel's), as the GEMM
//
//   dW [c_out][n = (kh, kw, c)] = sum over the pixels p of dy [p][c_out] . x [p's input pixel at tap (kh, kw)][c]
//
// with K = the pixels: in NHWC both operands are MN-major (for one pixel, dy's channels and a
// tap's channels contiguous), so wgmma reads both with imm-trans 1
// (ptx_wgmma_m64nBNk16_f32_bf16_trans<1, 1>). The same products in the same order as the
// mma.sync kernel: per output, from 0, the pixels kbeg.. of the split in order (the tensor
// cores' k order within each 16; past kend zeros, which add nothing), so that on the emulated
// driver (fmaf in k order for both) the two agree bit for bit.
//
// Supported: C % 8 == 0, CO % 8 == 0, x and dy 16-byte aligned (a 16-byte copy is 8 channels
// of one tap of x, or 8 output channels of dy; conv_wgmma.rs's `wgrad_supported`); else the
// mma.sync kernel.
//
// Block: 256 threads = 2 warpgroups, a tile of 128 output channels (64 per warpgroup: A) x BN
// columns (128, or 64 where C*KH*KW <= 64: B), K tiles of WG_BK = 64 pixels in the forward's
// ring (WG_STAGES stages, 1024-byte aligned, WG_SMEM bytes). A stage holds A [128][64] and B
// [BN][64] in the canonical MN-major layout with the 128-byte swizzle: atoms of 8 pixels
// (rows, 128 bytes each) x 64 channels or columns, atom (r / 64, pixel / 8) at (r / 64) * 8 +
// pixel / 8 (1024 bytes each; the 8 atoms of a row block's 64 pixels adjacent), 16-byte chunk
// c of a row at chunk position c ^ (pixel % 8). Descriptors: start = the atom of the
// warpgroup's rows (A) or of the block's first columns (B) at k group 2 * ks, LBO 8192 (the
// next 64 rows along m or n: unused by A's 64 rows and by B at BN = 64), SBO 1024 (the next 8
// pixels), swizzle mode 1. Copies (16-byte cp.async, zero fill past the split's pixels, past
// c_out or C*KH*KW, outside the image): A chunk tid % 16 (output channels 8 (tid % 16)..) of
// pixels tid / 16 + 16 q, q < 4; B chunk j = tid % (BN / 8) (columns 8j.., one tap's channels,
// decoded once per kernel) of pixels tid / (BN / 8) + (2048 / BN) q, q < BN / 32. The main
// loop is the forward's (wg_mainloop, with these copies and descriptors). Epilogue: straight from the accumulator fragment (rows co, columns
// n) to out[co * C*KH*KW + c * KH*KW + tap].

// Byte offset of 16-byte chunk `ch` (8 consecutive rows, ch / 8 the 64-row block) of pixel
// `kl` of a K tile in the 128-byte-swizzled MN-major layout above (the tile 1024-byte aligned).
__device__ __forceinline__ unsigned wgw_mn128(int ch, int kl) {
    return ((ch >> 3) * (WG_BK / 8) + (kl >> 3)) * 1024 + (kl & 7) * 128 + (((ch & 7) ^ (kl & 7)) << 4);
}

// The descriptor of an MN-major 128-byte-swizzled operand at shared address `saddr` (an
// atom's start): LBO 8192 (the next 64 rows), SBO 1024 (the next 8 pixels), mode 1.
__device__ __forceinline__ unsigned long long wgw_desc(unsigned saddr) {
    return (unsigned long long)((saddr & 0x3FFFFu) >> 4) | ((unsigned long long)(8192 >> 4) << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

template <int BN>
__device__ __forceinline__ void wgmma_k16_tt(float (&acc)[BN / 2], unsigned long long da, unsigned long long db,
                                             int scale_d);
template <>
__device__ __forceinline__ void wgmma_k16_tt<64>(float (&acc)[32], unsigned long long da, unsigned long long db,
                                                 int scale_d) {
    ptx_wgmma_m64n64k16_f32_bf16_trans<1, 1>(acc, da, db, scale_d);
}
template <>
__device__ __forceinline__ void wgmma_k16_tt<128>(float (&acc)[64], unsigned long long da, unsigned long long db,
                                                  int scale_d) {
    ptx_wgmma_m64n128k16_f32_bf16_trans<1, 1>(acc, da, db, scale_d);
}

template <int BN>
__device__ __forceinline__ void conv_bwd_weight_wgmma(const unsigned short* __restrict__ x,
                                                      const unsigned short* __restrict__ dy, float* __restrict__ out,
                                                      int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                                                      int pad, int OH, int OW, int chunk) {
    constexpr int STAGE = WG_A_BYTES + BN * WG_BK * 2;
    constexpr int CPR = BN / 8;  // B's 16-byte chunks per pixel
    static_assert(1024 + WG_STAGES * STAGE <= WG_SMEM, "the ring fits the forward's shared memory");
    static_assert(WG_THREADS % CPR == 0 && WG_THREADS % 16 == 0, "a thread's chunks are fixed");
    const int tid = threadIdx.x, wg = tid >> 7;
    const int KHW = KH * KW, NC = KHW * C, OHW = OH * OW, K = N * OHW;
    const int m0 = blockIdx.y * WG_BM, n0 = blockIdx.x * BN;
    // 64-bit bounds: kbeg + chunk can pass INT_MAX on the last split.
    const long long kbeg = (long long)blockIdx.z * chunk;
    const int kend = (int)min((long long)K, kbeg + chunk);
    unsigned sring;
    unsigned char* ring = wg_ring(sring);

    // This thread's fixed chunks: A's output channels co.., B's columns n.. (tap, channel cc).
    const int ai = tid & 15, co = m0 + 8 * ai;
    const bool co_ok = co < CO;
    const int bj = tid % CPR, n = n0 + 8 * bj;
    const bool col_ok = n < NC;
    int ckh = 0, ckw = 0, cc = 0;
    if (col_ok) {
        const int tap = n / C;
        cc = n - tap * C;
        ckh = tap / KW;
        ckw = tap - ckh * KW;
    }

    auto issue = [&](int t) {
        unsigned char* As = ring + (t % WG_STAGES) * STAGE;
        unsigned char* Bs = As + WG_A_BYTES;
        const int k0 = (int)kbeg + t * WG_BK;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int kl = (tid >> 4) + 16 * q, p = k0 + kl;
            const bool ok = co_ok && p < kend;
            ptx_cp_async_16(As + wgw_mn128(ai, kl), ok ? dy + (size_t)p * CO + co : dy, ok ? 16 : 0);
        }
#pragma unroll
        for (int q = 0; q < BN / 32; ++q) {
            const int kl = tid / CPR + (WG_THREADS / CPR) * q, p = k0 + kl;
            bool ok = col_ok && p < kend;
            size_t off = 0;
            if (ok) {
                const int img = p / OHW, r = p - img * OHW, oh = r / OW, ow = r - oh * OW;
                const int ih = oh * stride - pad + ckh, iw = ow * stride - pad + ckw;
                ok = (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
                if (ok) off = ((size_t)(img * H + ih) * W + iw) * C + cc;
            }
            ptx_cp_async_16(Bs + wgw_mn128(bj, kl), x + off, ok ? 16 : 0);
        }
    };

    float acc[BN / 2];
    // MN-major operands: the warpgroup's atoms of A 8 KiB into the stage, 16 k (2 atoms) 2 KiB on.
    auto mma = [&](unsigned sa, unsigned sb, int t, int ks) {
        wgmma_k16_tt<BN>(acc, wgw_desc(sa + (wg * (WG_BK / 8) + 2 * ks) * 1024), wgw_desc(sb + 2 * ks * 1024),
                         wg_scale_d(t, ks));
    };
    const int klen = kend > kbeg ? kend - (int)kbeg : 0;
    wg_mainloop<BN>(acc, sring, (klen + WG_BK - 1) / WG_BK, issue, mma);

    // Epilogue: d[i] = D[16 wq + g + 8 ((i / 2) % 2)][8 (i / 4) + 2 q + i % 2] of the warpgroup's rows.
    const int wq = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, q = lane & 3;
    float* o = out + (size_t)blockIdx.z * CO * NC;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int nn = n0 + 8 * j + 2 * q + e;
            if (nn >= NC) continue;
            const int tap = nn / C, c = nn - tap * C;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int m = m0 + 64 * wg + 16 * wq + g + 8 * r;
                if (m < CO) o[(size_t)m * NC + (size_t)c * KHW + tap] = acc[4 * j + 2 * r + e];
            }
        }
    }
}

// The bf16-storage channels-last weight gradient on wgmma (sm_90a), a grid of (column tiles of
// 128, channel tiles of 128, splits) blocks of 256 threads with WG_SMEM bytes of dynamic shared
// memory: x, dy NHWC bf16, out = dW (OIHW f32) with one split, else the workspace
// [splits][CO][C*KH*KW]; chunk the split's run of pixels. C % 8 == 0, CO % 8 == 0, x and dy
// 16-byte aligned (the host's `wgrad_supported`).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_bwd_weight_wgmma_n128(const unsigned short* __restrict__ x, const unsigned short* __restrict__ dy,
                             float* __restrict__ out, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                             int pad, int OH, int OW, int chunk) {
    conv_bwd_weight_wgmma<128>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}

// The same with 64 columns per block (C*KH*KW <= 64: no half-empty tiles).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
conv2d_bwd_weight_wgmma_n64(const unsigned short* __restrict__ x, const unsigned short* __restrict__ dy,
                            float* __restrict__ out, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
                            int pad, int OH, int OW, int chunk) {
    conv_bwd_weight_wgmma<64>(x, dy, out, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, chunk);
}
