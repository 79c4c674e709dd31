// The C ABI between the host-compiled kernels (target/cuda-emu/kernels/*.so) and the
// emulated driver (libcuda.so): what a kernel module exports (its entry points, their
// parameter types, its dynamic shared arrays) and what the driver exports to the kernels
// (the current CUDA thread and block, barriers, warp collectives, failure). Both sides are
// built by scripts/cuda-emu.sh from this one header; EMU_ABI_VERSION guards a stale mix.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define EMU_ABI_VERSION 3

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    unsigned int x, y, z;
} emu_uint3;

// Parameter classes, compared with the PTX .param list at module load.
enum { EMU_PARAM_INT = 0, EMU_PARAM_FLOAT = 1, EMU_PARAM_POINTER = 2, EMU_PARAM_STRUCT = 3 };

typedef struct {
    uint32_t size;
    uint32_t align;
    uint32_t kind;  // EMU_PARAM_*
} emu_param_t;

typedef struct {
    const char* name;                // the extern "C" name, = the PTX .entry name
    void (*thunk)(void* const* args);  // unpacks cuLaunchKernel's void** with the C++ types
    const emu_param_t* params;
    int nparams;
} emu_kernel_t;

typedef struct {
    void* (*addr)(void);  // the calling OS thread's instance of the array
    size_t capacity;      // bytes
} emu_dyn_shared_t;

typedef struct {
    int abi_version;
    const char* source;  // the .cu file it was built from
    const emu_kernel_t* kernels;
    int nkernels;
    const emu_dyn_shared_t* dyn_shared;  // `extern __shared__ T name[]` arrays of the file
    int ndyn_shared;
    size_t dyn_shared_max;  // capacity of every dynamic shared array (the opt-in limit)
} emu_module_t;

// Every kernel module exports `const emu_module_t* emu_module(void)`.
typedef const emu_module_t* (*emu_module_fn)(void);

// ---- exported by the driver, called from kernel code -------------------------------------

typedef struct {
    emu_uint3 tid;  // threadIdx
    unsigned int lane, warp;
} emu_thread_t;

typedef struct {
    emu_uint3 bid;   // blockIdx
    emu_uint3 bdim;  // blockDim
    emu_uint3 gdim;  // gridDim
    void* dyn_shared;
} emu_block_t;

// The running CUDA thread and its block. Constant for the duration of one thread's body
// (each fiber has its own record), hence `const` for the compiler.
const emu_thread_t* emu_thread(void) __attribute__((const));
const emu_block_t* emu_block(void) __attribute__((const));

// __syncthreads and its reductions: op 0 plain, 1 count, 2 and, 3 or.
int emu_barrier(int op, int pred);

// Warp collectives (op: EMU_WARP_*), over the lanes of `mask`.
enum {
    EMU_WARP_SHFL_IDX = 0,
    EMU_WARP_SHFL_UP = 1,
    EMU_WARP_SHFL_DOWN = 2,
    EMU_WARP_SHFL_XOR = 3,
    EMU_WARP_BALLOT = 4,
    EMU_WARP_ANY = 5,
    EMU_WARP_ALL = 6,
    EMU_WARP_MATCH_ANY = 7,
    EMU_WARP_MATCH_ALL = 8,
    EMU_WARP_SYNC = 9,
    EMU_WARP_REDUX_ADD = 10,
    EMU_WARP_REDUX_MIN = 11,   // unsigned
    EMU_WARP_REDUX_MAX = 12,   // unsigned
    EMU_WARP_REDUX_MINS = 13,  // signed
    EMU_WARP_REDUX_MAXS = 14,  // signed
    EMU_WARP_REDUX_AND = 15,
    EMU_WARP_REDUX_OR = 16,
    EMU_WARP_REDUX_XOR = 17,
    EMU_WARP_WMMA = 18,  // a WMMA load/store/mma: every lane must pass the same value (b: which)
    EMU_WARP_GROUP = 19,  // a warpgroup collective (wgmma): the 4 warps 4k..4k+3, all 128 threads
                          // with the same value
    EMU_WARP_OPS = 20
};
// `value` carries the lane's operand (shuffled bits, predicate, match key, WMMA pointer);
// `b` the lane/delta/xor mask, `c` the width. Returns the lane's result.
uint64_t emu_warp(int op, unsigned int mask, uint64_t value, int b, int c);
unsigned int emu_activemask(void);

// Called by every atomic: lets a spin-wait on an atomic make progress by yielding now and
// then to the other threads of the block.
void emu_atomic_hook(void);

// Ends the launch with a launch failure naming the kernel, the block, the thread and `msg`.
void emu_fail(const char* msg) __attribute__((noreturn));

#ifdef __cplusplus
}
#endif
