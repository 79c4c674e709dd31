// cuda_shim.h: the CUDA device-side language on the host, for the emulated driver.
// scripts/cuda-emu.sh compiles every unchanged kernels/*.cu with
//   g++ -include emu/shim/cuda_shim.h -I emu/shim/include -x c++
// so that each kernel becomes a plain C++ function run once per CUDA thread:
// - threadIdx/blockIdx/blockDim/gridDim read the running fiber's and block's records
//   (emu_thread()/emu_block(), exported by libcuda.so);
// - __shared__ is `thread_local`: one block runs at a time on an OS thread, and all the
//   fibers of a block share that thread's copy. `extern __shared__ T a[]` is defined by the
//   generated registration of each file (emu/tools/gen_register.py);
// - __syncthreads, warp shuffles/votes/matches/reductions and the WMMA API are collectives
//   of the driver's scheduler, which checks that every thread (lane) they name takes part;
// - atomics are the host's atomics (CAS loops for float add, min/max);
// - math, bit and conversion intrinsics are their IEEE host equivalents.
// Nothing here knows about any particular kernel.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <type_traits>

#include "emu_abi.h"

#define __CUDA_ARCH__ 900
#define ICHCAM_CUDA_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __restrict __restrict__

// ---- built-in variables --------------------------------------------------------------------

typedef emu_uint3 uint3;
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};

#define threadIdx (emu_thread()->tid)
#define blockIdx (emu_block()->bid)
#define blockDim (emu_block()->bdim)
#define gridDim (emu_block()->gdim)
#define warpSize 32

// ---- vector types --------------------------------------------------------------------------

#define EMU_VEC2(T, N, A)                              \
    struct __attribute__((aligned(A))) N##2 { T x, y; }; \
    static inline N##2 make_##N##2(T a, T b) { return N##2{a, b}; }
#define EMU_VEC3(T, N)                    \
    struct N##3 { T x, y, z; };           \
    static inline N##3 make_##N##3(T a, T b, T c) { return N##3{a, b, c}; }
#define EMU_VEC4(T, N, A)                                  \
    struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    static inline N##4 make_##N##4(T a, T b, T c, T d) { return N##4{a, b, c, d}; }
EMU_VEC2(float, float, 8)
EMU_VEC3(float, float)
EMU_VEC4(float, float, 16)
EMU_VEC2(int, int, 8)
EMU_VEC3(int, int)
EMU_VEC4(int, int, 16)
EMU_VEC2(unsigned int, uint, 8)
EMU_VEC4(unsigned int, uint, 16)
EMU_VEC2(double, double, 16)
static inline uint3 make_uint3(unsigned a, unsigned b, unsigned c) { return uint3{a, b, c}; }
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

// ---- min / max as CUDA overloads them ------------------------------------------------------

#define EMU_MINMAX(T)                                                    \
    static inline T min(T a, T b) { return b < a ? b : a; }             \
    static inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned int)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
#undef EMU_MINMAX
// Mixed signedness: CUDA converts to the unsigned type.
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
static inline unsigned long long min(long long a, unsigned long long b) { return min((unsigned long long)a, b); }
static inline unsigned long long min(unsigned long long a, long long b) { return min(a, (unsigned long long)b); }
static inline unsigned long long max(long long a, unsigned long long b) { return max((unsigned long long)a, b); }
static inline unsigned long long max(unsigned long long a, long long b) { return max(a, (unsigned long long)b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ---- bit casts and conversions -------------------------------------------------------------

template <class To, class From>
static inline To emu_bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
    To t;
    memcpy(&t, &v, sizeof(To));
    return t;
}
static inline float __int_as_float(int v) { return emu_bits<float>(v); }
static inline int __float_as_int(float v) { return emu_bits<int>(v); }
static inline float __uint_as_float(unsigned int v) { return emu_bits<float>(v); }
static inline unsigned int __float_as_uint(float v) { return emu_bits<unsigned int>(v); }
static inline double __longlong_as_double(long long v) { return emu_bits<double>(v); }
static inline long long __double_as_longlong(double v) { return emu_bits<long long>(v); }
static inline double __hiloint2double(int hi, int lo) {
    return emu_bits<double>((long long)(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo));
}
static inline int __double2hiint(double v) { return (int)(emu_bits<unsigned long long>(v) >> 32); }
static inline int __double2loint(double v) { return (int)emu_bits<unsigned long long>(v); }

static inline int __float2int_rn(float v) { return (int)lrintf(v); }
static inline int __float2int_rz(float v) { return (int)v; }
static inline int __float2int_rd(float v) { return (int)floorf(v); }
static inline int __float2int_ru(float v) { return (int)ceilf(v); }
static inline unsigned int __float2uint_rn(float v) { return (unsigned int)llrintf(v); }
static inline unsigned int __float2uint_rz(float v) { return (unsigned int)v; }
static inline float __int2float_rn(int v) { return (float)v; }
static inline float __uint2float_rn(unsigned int v) { return (float)v; }
static inline long long __float2ll_rn(float v) { return llrintf(v); }
static inline long long __double2ll_rn(double v) { return llrint(v); }
static inline int __double2int_rn(double v) { return (int)lrint(v); }
static inline float __double2float_rn(double v) { return (float)v; }

// ---- single and double precision math ------------------------------------------------------
// IEEE round-to-nearest host arithmetic; the kernels are compiled with -ffp-contract=off, so
// a*b+c is never fused unless written as fmaf (NVRTC does fuse by default: see emu/README.md).

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __fdividef(float a, float b) { return a / b; }
// glibc declares these names itself (as its internal aliases): macros, not functions.
#define __expf(a) expf(a)
#define __exp10f(a) powf(10.0f, (a))
#define __logf(a) logf(a)
#define __log2f(a) log2f(a)
#define __log10f(a) log10f(a)
#define __powf(a, b) powf((a), (b))
#define __sinf(a) sinf(a)
#define __cosf(a) cosf(a)
#define __tanf(a) tanf(a)
#define __sincosf(a, s, c) (*(s) = sinf(a), *(c) = cosf(a), (void)0)
static inline float __saturatef(float a) { return a != a ? 0.0f : (a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a)); }
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
static inline double rsqrt(double a) { return 1.0 / sqrt(a); }
static inline float rcbrtf(float a) { return 1.0f / cbrtf(a); }
static inline float normcdff(float a) { return 0.5f * erfcf(-a * 0.70710678118654752f); }
static inline float saturate(float a) { return __saturatef(a); }

// ---- integer intrinsics --------------------------------------------------------------------

static inline int __popc(unsigned int v) { return __builtin_popcount(v); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
static inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
static inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline int __ffsll(long long v) { return __builtin_ffsll(v); }
static inline unsigned int __brev(unsigned int v) {
    v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
    v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
    v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
    v = ((v >> 8) & 0x00ff00ffu) | ((v & 0x00ff00ffu) << 8);
    return (v >> 16) | (v << 16);
}
static inline unsigned long long __brevll(unsigned long long v) {
    return ((unsigned long long)__brev((unsigned)v) << 32) | __brev((unsigned)(v >> 32));
}
static inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
static inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int sh) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned int)((v << (sh & 31)) >> 32);
}
static inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int sh) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned int)(v >> (sh & 31));
}
static inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
static inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xffffffu) * (b & 0xffffffu); }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
static inline int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }
static inline unsigned int __uhadd(unsigned int a, unsigned int b) { return (unsigned)(((unsigned long long)a + b) >> 1); }
static inline unsigned int __sad(int a, int b, unsigned int c) { return c + (unsigned)(a > b ? a - b : b - a); }
static inline unsigned int __usad(unsigned int a, unsigned int b, unsigned int c) { return c + (a > b ? a - b : b - a); }

// ---- block and warp synchronisation --------------------------------------------------------

static inline void __syncthreads() { (void)emu_barrier(0, 0); }
static inline int __syncthreads_count(int p) { return emu_barrier(1, p != 0); }
static inline int __syncthreads_and(int p) { return emu_barrier(2, p != 0); }
static inline int __syncthreads_or(int p) { return emu_barrier(3, p != 0); }
static inline void __syncwarp(unsigned int mask = 0xffffffffu) { (void)emu_warp(EMU_WARP_SYNC, mask, 0, 0, 32); }
static inline unsigned int __activemask() { return emu_activemask(); }
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline unsigned int __lanemask_lt() { return (1u << emu_thread()->lane) - 1u; }
static inline unsigned int __lanemask_le() { return (2u << emu_thread()->lane) - 1u; }
static inline unsigned int __lanemask_eq() { return 1u << emu_thread()->lane; }

template <class T>
static inline uint64_t emu_to_u64(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp collective on an unsupported type");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
static inline T emu_from_u64(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
template <class T>
static inline T __shfl_sync(unsigned int mask, T v, int src, int width = 32) {
    return emu_from_u64<T>(emu_warp(EMU_WARP_SHFL_IDX, mask, emu_to_u64(v), src, width));
}
template <class T>
static inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return emu_from_u64<T>(emu_warp(EMU_WARP_SHFL_UP, mask, emu_to_u64(v), (int)delta, width));
}
template <class T>
static inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return emu_from_u64<T>(emu_warp(EMU_WARP_SHFL_DOWN, mask, emu_to_u64(v), (int)delta, width));
}
template <class T>
static inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    return emu_from_u64<T>(emu_warp(EMU_WARP_SHFL_XOR, mask, emu_to_u64(v), lane_mask, width));
}
static inline unsigned int __ballot_sync(unsigned int mask, int p) {
    return (unsigned int)emu_warp(EMU_WARP_BALLOT, mask, p != 0, 0, 32);
}
static inline int __any_sync(unsigned int mask, int p) { return (int)emu_warp(EMU_WARP_ANY, mask, p != 0, 0, 32); }
static inline int __all_sync(unsigned int mask, int p) { return (int)emu_warp(EMU_WARP_ALL, mask, p != 0, 0, 32); }
static inline int __uni_sync(unsigned int mask, int p) {
    return __all_sync(mask, p) || !__any_sync(mask, p);
}
template <class T>
static inline unsigned int __match_any_sync(unsigned int mask, T v) {
    return (unsigned int)emu_warp(EMU_WARP_MATCH_ANY, mask, emu_to_u64(v), (int)sizeof(T), 32);
}
template <class T>
static inline unsigned int __match_all_sync(unsigned int mask, T v, int* pred) {
    unsigned int r = (unsigned int)emu_warp(EMU_WARP_MATCH_ALL, mask, emu_to_u64(v), (int)sizeof(T), 32);
    *pred = r != 0;
    return r;
}
static inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)emu_warp(EMU_WARP_REDUX_ADD, mask, v, 0, 32);
}
static inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)emu_warp(EMU_WARP_REDUX_MIN, mask, v, 0, 32);
}
static inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)emu_warp(EMU_WARP_REDUX_MAX, mask, v, 0, 32);
}
static inline int __reduce_add_sync(unsigned int mask, int v) {
    return (int)emu_warp(EMU_WARP_REDUX_ADD, mask, (unsigned int)v, 0, 32);
}
static inline int __reduce_min_sync(unsigned int mask, int v) {
    return (int)emu_warp(EMU_WARP_REDUX_MINS, mask, (unsigned int)v, 0, 32);
}
static inline int __reduce_max_sync(unsigned int mask, int v) {
    return (int)emu_warp(EMU_WARP_REDUX_MAXS, mask, (unsigned int)v, 0, 32);
}
static inline unsigned int __reduce_and_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)emu_warp(EMU_WARP_REDUX_AND, mask, v, 0, 32);
}
static inline unsigned int __reduce_or_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)emu_warp(EMU_WARP_REDUX_OR, mask, v, 0, 32);
}
static inline unsigned int __reduce_xor_sync(unsigned int mask, unsigned int v) {
    return (unsigned int)emu_warp(EMU_WARP_REDUX_XOR, mask, v, 0, 32);
}

// ---- atomics: host atomics on the (host) device memory -------------------------------------

#define EMU_ATOMIC_RMW(NAME, BUILTIN, T)                                   \
    static inline T NAME(T* a, T v) {                                      \
        emu_atomic_hook();                                                 \
        return BUILTIN(a, v, __ATOMIC_SEQ_CST);                            \
    }
#define EMU_ATOMIC_INT(T)                                  \
    EMU_ATOMIC_RMW(atomicAdd, __atomic_fetch_add, T)       \
    EMU_ATOMIC_RMW(atomicSub, __atomic_fetch_sub, T)       \
    EMU_ATOMIC_RMW(atomicAnd, __atomic_fetch_and, T)       \
    EMU_ATOMIC_RMW(atomicOr, __atomic_fetch_or, T)         \
    EMU_ATOMIC_RMW(atomicXor, __atomic_fetch_xor, T)       \
    EMU_ATOMIC_RMW(atomicExch, __atomic_exchange_n, T)     \
    static inline T atomicCAS(T* a, T cmp, T v) {          \
        emu_atomic_hook();                                 \
        __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
        return cmp;                                        \
    }                                                      \
    static inline T atomicMin(T* a, T v) {                 \
        emu_atomic_hook();                                 \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);      \
        while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                  \
        return old;                                        \
    }                                                      \
    static inline T atomicMax(T* a, T v) {                 \
        emu_atomic_hook();                                 \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);      \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                  \
        return old;                                        \
    }
EMU_ATOMIC_INT(int)
EMU_ATOMIC_INT(unsigned int)
EMU_ATOMIC_INT(long long)
EMU_ATOMIC_INT(unsigned long long)
#undef EMU_ATOMIC_INT
#undef EMU_ATOMIC_RMW
static inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
    emu_atomic_hook();
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}

// Floating-point read-modify-write: a CAS loop on the bits, as CUDA's own fallback does.
template <class F, class U, class Op>
static inline F emu_atomic_float(F* a, Op op) {
    emu_atomic_hook();
    U* p = reinterpret_cast<U*>(a);
    U old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        U want = emu_bits<U>(op(emu_bits<F>(old)));
        if (__atomic_compare_exchange_n(p, &old, want, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return emu_bits<F>(old);
    }
}
static inline float atomicAdd(float* a, float v) {
    return emu_atomic_float<float, unsigned int>(a, [v](float x) { return x + v; });
}
static inline double atomicAdd(double* a, double v) {
    return emu_atomic_float<double, unsigned long long>(a, [v](double x) { return x + v; });
}
static inline float atomicExch(float* a, float v) {
    return emu_atomic_float<float, unsigned int>(a, [v](float) { return v; });
}
// CUDA's float atomicMin/Max (sm_90): IEEE min/max semantics on the values.
static inline float atomicMin(float* a, float v) {
    return emu_atomic_float<float, unsigned int>(a, [v](float x) { return fminf(x, v); });
}
static inline float atomicMax(float* a, float v) {
    return emu_atomic_float<float, unsigned int>(a, [v](float x) { return fmaxf(x, v); });
}
static inline unsigned int atomicInc(unsigned int* a, unsigned int lim) {
    emu_atomic_hook();
    unsigned int old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(a, &old, old >= lim ? 0u : old + 1u, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline unsigned int atomicDec(unsigned int* a, unsigned int lim) {
    emu_atomic_hook();
    unsigned int old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(a, &old, (old == 0 || old > lim) ? lim : old - 1u, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}
#define EMU_SCOPED_ATOMICS(S)                                                              \
    template <class T, class V> static inline T atomicAdd##S(T* a, V v) { return atomicAdd(a, (T)v); } \
    template <class T, class V> static inline T atomicMin##S(T* a, V v) { return atomicMin(a, (T)v); } \
    template <class T, class V> static inline T atomicMax##S(T* a, V v) { return atomicMax(a, (T)v); } \
    template <class T, class V> static inline T atomicExch##S(T* a, V v) { return atomicExch(a, (T)v); } \
    template <class T, class V> static inline T atomicCAS##S(T* a, V c, V v) { return atomicCAS(a, (T)c, (T)v); }
EMU_SCOPED_ATOMICS(_block)
EMU_SCOPED_ATOMICS(_system)
#undef EMU_SCOPED_ATOMICS

// ---- memory access hints, clocks, traps ----------------------------------------------------

template <class T>
static inline T __ldg(const T* p) { return *p; }
template <class T>
static inline T __ldcg(const T* p) { return *p; }
template <class T>
static inline T __ldcs(const T* p) { return *p; }
template <class T>
static inline T __ldlu(const T* p) { return *p; }
template <class T>
static inline T __ldcv(const T* p) { return *(const volatile T*)p; }
template <class T>
static inline void __stcg(T* p, T v) { *p = v; }
template <class T>
static inline void __stcs(T* p, T v) { *p = v; }
template <class T>
static inline void __stwt(T* p, T v) { *p = v; }
static inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
static inline unsigned long long __globaltimer() { return (unsigned long long)__builtin_ia32_rdtsc(); }
static inline void __nanosleep(unsigned int) { emu_atomic_hook(); }
static inline void __trap() { emu_fail("__trap() called"); }
static inline void __brkpt() { emu_fail("__brkpt() called"); }
static inline void __builtin_assume_emu(bool) {}
#define __assume(x) ((void)0)

// Device-side assert: a failure ends the launch (CUDA_ERROR_ASSERT-like) instead of aborting
// the host process.
#include <assert.h>
#undef assert
#define assert(e) ((e) ? (void)0 : emu_fail("assertion failed: " #e " (" __FILE__ ")"))

#include "emu_half.h"
#include "emu_accum.h"
#include "emu_wmma.h"
#include "emu_pipeline.h"
#include "emu_mma.h"
#include "emu_wgmma.h"
