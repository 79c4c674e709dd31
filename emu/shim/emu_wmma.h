// nvcuda::wmma for the host-compiled kernels (part of cuda_shim.h).
//
// The per-lane layout of a real fragment is unspecified by CUDA, so here every lane holds
// the whole tile (num_elements = rows * cols, row-major in x[]): code that treats fragment
// elements uniformly (scaling, conversion, activation) behaves as on a GPU. load, store and
// mma_sync are warp collectives: all 32 lanes must call them with the same pointer and
// stride (the scheduler checks it, else the launch fails), and the alignment rules of the
// hardware are enforced (256-bit aligned pointer, ldm a multiple of 16 bytes).
// mma_sync multiplies in f32 (the products of f16/bf16/tf32 inputs are exact in f32) and
// accumulates in f32 in k order; tf32 inputs are truncated to 10 mantissa bits as the
// tensor cores read them. Shapes: 16x16x16, 32x8x16, 8x32x16 (f16, bf16), 16x16x8 (tf32).
#pragma once

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <class T>
struct emu_storage {
    typedef T type;
};
template <>
struct emu_storage<precision::tf32> {
    typedef float type;
};

template <class Use, int M, int N, int K>
struct emu_dims;
template <int M, int N, int K>
struct emu_dims<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct emu_dims<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct emu_dims<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <int M, int N, int K, class T>
struct emu_shape_ok {
    static constexpr bool value = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                                  (M == 8 && N == 32 && K == 16);
};
template <int M, int N, int K>
struct emu_shape_ok<M, N, K, precision::tf32> {
    static constexpr bool value = M == 16 && N == 16 && K == 8;
};
template <int M, int N, int K>
struct emu_shape_ok<M, N, K, float> {  // accumulators take the shape of their operands
    static constexpr bool value = emu_shape_ok<M, N, K, __half>::value || emu_shape_ok<M, N, K, precision::tf32>::value;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(emu_shape_ok<M, N, K, T>::value, "WMMA shape not supported for this element type");

   public:
    typedef typename emu_storage<T>::type storage_element_type;
    typedef T element_type;
    static constexpr int rows = emu_dims<Use, M, N, K>::rows;
    static constexpr int cols = emu_dims<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    storage_element_type x[num_elements];
};

template <class Use, int M, int N, int K, class T, class L>
static inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const typename emu_storage<T>::type& v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

static inline float __float_to_tf32(float v) {
    unsigned int u = emu_bits<unsigned int>(v);
    if ((u & 0x7f800000u) == 0x7f800000u) return v;  // inf, NaN
    u = (u + 0x1000u) & 0xffffe000u;                // to nearest, ties away from zero
    return emu_bits<float>(u);
}

// A warp collective: every lane passes the same (pointer, ldm), all 32 lanes must come.
static inline void emu_wmma_sync(const void* p, unsigned ldm, int which) {
    uint64_t key = (uint64_t)(uintptr_t)p ^ ((uint64_t)ldm << 52) ^ ((uint64_t)which << 48);
    (void)emu_warp(EMU_WARP_WMMA, 0xffffffffu, key, which, 32);
}
static inline void emu_wmma_check(const void* p, unsigned ldm, size_t elem) {
    if (((uintptr_t)p & 31u) != 0) emu_fail("wmma load/store: pointer not 256-bit aligned");
    if ((ldm * elem) % 16 != 0) emu_fail("wmma load/store: ldm is not a multiple of 16 bytes");
}

template <class Use, int M, int N, int K, class T, class L, class P>
static inline void emu_load(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm, bool col) {
    emu_wmma_check(p, ldm, sizeof(P));
    emu_wmma_sync(p, ldm, 1);
    typedef typename emu_storage<T>::type S;
    for (int r = 0; r < f.rows; ++r)
        for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = (S)(col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]);
}

template <int M, int N, int K, class T, class P>
static inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, row_major>& f, const P* p, unsigned ldm) {
    emu_load(f, p, ldm, false);
}
template <int M, int N, int K, class T, class P>
static inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, col_major>& f, const P* p, unsigned ldm) {
    emu_load(f, p, ldm, true);
}
template <int M, int N, int K, class T, class P>
static inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, row_major>& f, const P* p, unsigned ldm) {
    emu_load(f, p, ldm, false);
}
template <int M, int N, int K, class T, class P>
static inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, col_major>& f, const P* p, unsigned ldm) {
    emu_load(f, p, ldm, true);
}
template <int M, int N, int K, class T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t l) {
    emu_load(f, p, ldm, l == mem_col_major);
}
template <int M, int N, int K, class T>
static inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
    emu_wmma_check(p, ldm, sizeof(T));
    emu_wmma_sync(p, ldm, 2);
    for (int r = 0; r < f.rows; ++r)
        for (int c = 0; c < f.cols; ++c) {
            T v = f.x[r * f.cols + c];
            if (l == mem_col_major)
                p[(size_t)c * ldm + r] = v;
            else
                p[(size_t)r * ldm + c] = v;
        }
    // No lane may run ahead and overwrite the tile before every lane has stored it.
    emu_wmma_sync(p, ldm, 3);
}

template <class S>
static inline float emu_operand(S v, bool tf32) {
    float f = (float)v;
    return tf32 ? emu_bits<float>(emu_bits<unsigned int>(f) & 0xffffe000u) : f;
}

template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
static inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                            const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                            bool satf = false) {
    static_assert(std::is_same<TA, TB>::value, "mma_sync: A and B must have the same element type");
    static_assert(std::is_same<TC, float>::value, "mma_sync: only f32 accumulators are emulated");
    const bool tf32 = std::is_same<TA, precision::tf32>::value;
    emu_wmma_sync(nullptr, 0, 4);  // lanes' fragments live on their own stacks: no pointer to compare
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float av[K], bv[K];
            for (int k = 0; k < K; ++k) {
                av[k] = emu_operand(a.x[i * K + k], tf32);
                bv[k] = emu_operand(b.x[k * N + j], tf32);
            }
            const float acc = emu_mma_dot(c.x[i * N + j], av, bv, K);
            out[i * N + j] = satf ? (acc != acc ? 0.0f : fminf(fmaxf(acc, 0.0f), 1.0f)) : acc;
        }
    for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
