// ldmatrix / mma.sync kernels of the emulator's self-test (emu/tests/selftest.cpp): the
// primitives of emu/shim/emu_mma.h that kernels/conv_mma.cu wraps around its inline PTX.
// Each lane builds or reads its registers by the PTX ISA's documented layout, written out
// here on its own (not through the shim's code), so that a shim whose lanes hold other
// elements gives a wrong product or wrong registers. Host build only (emuModuleLoadHost):
// the asm bodies are NVRTC's (kernels/conv_mma.cu), these call the shim's.
#include <cuda_bf16.h>

// One warp: D (16x8 f32) = A (16x16 bf16 bits, row-major) . B (16x8 bf16 bits, [k][n]) + C,
// the fragments gathered from global memory by the documented m16n8k16 layout.
extern "C" __global__ void st_mma_bf16(const unsigned short* A, const unsigned short* B, const float* C, float* D) {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        a[r] = A[row * 16 + col] | ((unsigned)A[row * 16 + col + 1] << 16);
    }
    for (int r = 0; r < 2; ++r) {
        const int k = 2 * t + 8 * r;
        b[r] = B[k * 8 + g] | ((unsigned)B[(k + 1) * 8 + g] << 16);
    }
    for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    ptx_mma_bf16_m16n8k16(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// One warp: D (16x8) = A (16x8 f32, row-major) . B (8x8 f32, [k][n]) + C, m16n8k8 tf32.
extern "C" __global__ void st_mma_tf32(const float* A, const float* B, const float* C, float* D) {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = t + 4 * (r >> 1);
        a[r] = __float_as_uint(A[row * 8 + col]);
    }
    for (int r = 0; r < 2; ++r) b[r] = __float_as_uint(B[(t + 4 * r) * 8 + g]);
    for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    ptx_mma_tf32_m16n8k8(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// One warp: a 32x16 matrix of 16-bit values (row-major in M) copied to shared memory with
// rows padded to 24 elements (48 bytes: 16-byte aligned rows); matrix j of an ldmatrix is
// the 8x8 block at rows 8*(j % 4)... see the host side: lane l addresses row (l % 8) of
// block j = l / 8, block j at rows 8 * j (j < 4), columns 8 * (mode's column). out[lane][4]
// receives the registers (mode: 0-2 x1/x2/x4, 3-5 the same .trans).
extern "C" __global__ void st_ldmatrix(const unsigned short* M, unsigned* out, int mode, int colblk) {
    __shared__ __align__(16) unsigned short s[32 * 24];
    const int lane = threadIdx.x;
    for (int i = lane; i < 32 * 16; i += 32) s[(i / 16) * 24 + i % 16] = M[i];
    __syncwarp();
    const unsigned short* p = &s[(8 * (lane / 8) + lane % 8) * 24 + 8 * colblk];
    unsigned r[4] = {0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu};
    switch (mode) {
        case 0: ptx_ldmatrix_x1(*(unsigned(*)[1])r, p); break;
        case 1: ptx_ldmatrix_x2(*(unsigned(*)[2])r, p); break;
        case 2: ptx_ldmatrix_x4(r, p); break;
        case 3: ptx_ldmatrix_x1_trans(*(unsigned(*)[1])r, p); break;
        case 4: ptx_ldmatrix_x2_trans(*(unsigned(*)[2])r, p); break;
        default: ptx_ldmatrix_x4_trans(r, p); break;
    }
    for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

// One warp, the way kernels/conv_mma.cu combines them: A (16x16 bf16, row-major) by one
// ldmatrix.x4 (lane l: row l % 16, columns 8 * (l / 16)), B (16 x 16 bf16 stored [k][n]) by
// one ldmatrix.x4.trans (lane l: k row l % 16, columns 8 * (l / 16): two n8 fragments),
// then two mma m16n8k16: D (16x16 f32, row-major) = A . B, C = 0. Rows padded to 24.
extern "C" __global__ void st_ldmatrix_mma(const unsigned short* A, const unsigned short* B, float* D) {
    __shared__ __align__(16) unsigned short sa[16 * 24], sb[16 * 24];
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    for (int i = lane; i < 256; i += 32) {
        sa[(i / 16) * 24 + i % 16] = A[i];
        sb[(i / 16) * 24 + i % 16] = B[i];
    }
    __syncwarp();
    unsigned a[4], bb[4];
    ptx_ldmatrix_x4(a, &sa[(lane % 16) * 24 + 8 * (lane / 16)]);
    ptx_ldmatrix_x4_trans(bb, &sb[(lane % 16) * 24 + 8 * (lane / 16)]);
    for (int nf = 0; nf < 2; ++nf) {
        const unsigned b[2] = {bb[2 * nf], bb[2 * nf + 1]};
        const float c[4] = {0, 0, 0, 0};
        float d[4];
        ptx_mma_bf16_m16n8k16(d, a, b, c);
        for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 16 + 8 * nf + 2 * t + i % 2] = d[i];
    }
}

// Half a warp reaches an mma: a launch failure (a GPU would hang or be undefined).
extern "C" __global__ void st_mma_partial(float* out) {
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0}, d[4];
    if (threadIdx.x < 16) ptx_mma_bf16_m16n8k16(d, a, b, c);
    out[threadIdx.x] = 0.0f;
}
