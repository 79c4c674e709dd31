// cp.async kernels of the emulator's self-test (emu/tests/selftest.cpp): the
// __pipeline_memcpy_async / __pipeline_commit / __pipeline_wait_prior primitives that
// kernels/conv_tc.cu uses, with 4-, 8- and 16-byte copies and zero fill. Host build only
// (loaded with emuModuleLoadHost), like wmma.cu: the NVRTC wheel alone has no
// <cuda_pipeline_primitives.h>.
#include <cuda_pipeline_primitives.h>

// 64 threads. Group 0: thread t copies src[t] (4 bytes; odd t: zfill 4, nothing read);
// group 1: src[2t..2t+1] (8 bytes; t % 3 == 0: zfill 4); group 2: src[4t..4t+3] (16 bytes;
// t % 4 == 0: zfill 12). Then mode 0 waits for every group, mode 1 for all but the newest,
// mode 2 for none; after a barrier each thread reads slots that other threads copied.
extern "C" __global__ void st_pipe_stages(const float* src, float* out, int mode) {
    __shared__ __align__(16) float s[3][256];
    const int t = threadIdx.x;
    __pipeline_memcpy_async(&s[0][t], &src[t], 4, (t & 1) ? 4 : 0);
    __pipeline_commit();
    __pipeline_memcpy_async(&s[1][2 * t], &src[2 * t], 8, t % 3 == 0 ? 4 : 0);
    __pipeline_commit();
    __pipeline_memcpy_async(&s[2][4 * t], &src[4 * t], 16, t % 4 == 0 ? 12 : 0);
    __pipeline_commit();
    if (mode == 0) __pipeline_wait_prior(0);
    if (mode == 1) __pipeline_wait_prior(1);
    __syncthreads();
    for (int k = 0; k < 3; ++k)
        for (int j = t; j < 256; j += 64) out[k * 256 + j] = s[k][j];
}

// An 8-byte copy to a 4-byte-aligned address: a launch failure.
extern "C" __global__ void st_pipe_misaligned(const float* src) {
    __shared__ __align__(16) float s[4];
    __pipeline_memcpy_async(&s[1], src, 8, 0);
    __pipeline_commit();
    __pipeline_wait_prior(0);
}
