// WMMA kernels of the emulator's self-test (emu/tests/selftest.cpp): one warp (or two)
// computes D = A . B + C with nvcuda::wmma for f16, bf16 and tf32 inputs and f32
// accumulation, checked there against a double-precision reference. Host build only: the
// NVRTC wheel CI uses has no <mma.h>, so there is no PTX of this file (it is loaded with
// emuModuleLoadHost).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

using namespace nvcuda;

// One warp computes D = A . B + C on one 16x16 tile with WMMA, for f16 and bf16 (16x16x16)
// and tf32 (16x16x8, K looped), A row-major, B col-major, C/D row-major (ldm 16 or 24).
extern "C" __global__ void st_wmma_f16(const __half* a, const __half* b, const float* c, float* d, int k_tiles) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
    for (int t = 0; t < k_tiles; ++t) {
        wmma::load_matrix_sync(fa, a + t * 16, 16 * k_tiles);
        wmma::load_matrix_sync(fb, b + t * 16, 16 * k_tiles);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

extern "C" __global__ void st_wmma_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c, float* d, int k_tiles) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
    for (int t = 0; t < k_tiles; ++t) {
        wmma::load_matrix_sync(fa, a + t * 16, 16 * k_tiles);
        wmma::load_matrix_sync(fb, b + t * 16, 16 * k_tiles);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

extern "C" __global__ void st_wmma_tf32(const float* a, const float* b, float* d, int k_tiles) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int t = 0; t < k_tiles; ++t) {
        wmma::load_matrix_sync(fa, a + t * 8, 8 * k_tiles);
        wmma::load_matrix_sync(fb, b + t * 8 * 16, 16);
        for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
        for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    // Elementwise work on a fragment is uniform across lanes: scale by 2.
    for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.0f;
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_col_major);
}

// Only half a warp reaches a wmma load: an error.
extern "C" __global__ void st_wmma_partial(const __half* a) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    if ((threadIdx.x & 31) < 16) wmma::load_matrix_sync(fa, a, 16);
}
