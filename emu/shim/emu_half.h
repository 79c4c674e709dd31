// __half and __nv_bfloat16 for the host-compiled kernels (part of cuda_shim.h): storage
// types with CUDA's conversions (round to nearest even, NaN and infinity kept, subnormal
// halves exact) and arithmetic through f32, as sm_90 does it for scalar half math.
#pragma once

static inline unsigned short emu_f32_to_f16_bits(float f) {
    unsigned int x = emu_bits<unsigned int>(f);
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int e = (x >> 23) & 0xffu;
    unsigned int m = x & 0x7fffffu;
    if (e == 0xff) return (unsigned short)(sign | 0x7c00u | (m ? 0x200u | (m >> 13) : 0u));
    int exp = (int)e - 127 + 15;
    if (exp >= 31) return (unsigned short)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (unsigned short)sign;
        m |= 0x800000u;
        int shift = 14 - exp;  // 14..24
        unsigned int h = m >> shift;
        unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) ++h;
        return (unsigned short)(sign | h);
    }
    unsigned int h = ((unsigned int)exp << 10) | (m >> 13);
    unsigned int rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: right
    return (unsigned short)(sign | h);
}

static inline float emu_f16_bits_to_f32(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    unsigned int x;
    if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {
            int s = 0;
            while (!(m & 0x400u)) {
                m <<= 1;
                ++s;
            }
            x = sign | ((unsigned int)(127 - 15 - s + 1) << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e - 15 + 127) << 23) | (m << 13);
    }
    return emu_bits<float>(x);
}

static inline unsigned short emu_f32_to_bf16_bits(float f) {
    unsigned int x = emu_bits<unsigned int>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}

struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(emu_f32_to_f16_bits(f)) {}
    __half(double f) : __x(emu_f32_to_f16_bits((float)f)) {}
    __half(int v) : __x(emu_f32_to_f16_bits((float)v)) {}
    operator float() const { return emu_f16_bits_to_f32(__x); }
};
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(emu_f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(emu_f32_to_bf16_bits((float)f)) {}
    __nv_bfloat16(int v) : __x(emu_f32_to_bf16_bits((float)v)) {}
    operator float() const { return emu_bits<float>((unsigned int)__x << 16); }
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
struct __half2 {
    __half x, y;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

static inline __half __float2half(float f) { return __half(f); }
static inline __half __float2half_rn(float f) { return __half(f); }
static inline float __half2float(__half h) { return (float)h; }
static inline __half __ushort_as_half(unsigned short v) { __half h; h.__x = v; return h; }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { __nv_bfloat16 h; h.__x = v; return h; }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }

#define EMU_HALF_OPS(H, P)                                                                     \
    static inline H operator+(H a, H b) { return H((float)a + (float)b); }                    \
    static inline H operator-(H a, H b) { return H((float)a - (float)b); }                    \
    static inline H operator*(H a, H b) { return H((float)a * (float)b); }                    \
    static inline H operator/(H a, H b) { return H((float)a / (float)b); }                    \
    static inline H operator-(H a) { H r = a; r.__x ^= 0x8000u; return r; }                    \
    static inline H& operator+=(H& a, H b) { return a = a + b; }                               \
    static inline H& operator-=(H& a, H b) { return a = a - b; }                               \
    static inline H& operator*=(H& a, H b) { return a = a * b; }                               \
    static inline bool operator<(H a, H b) { return (float)a < (float)b; }                     \
    static inline bool operator>(H a, H b) { return (float)a > (float)b; }                     \
    static inline bool operator<=(H a, H b) { return (float)a <= (float)b; }                   \
    static inline bool operator>=(H a, H b) { return (float)a >= (float)b; }                   \
    static inline bool operator==(H a, H b) { return (float)a == (float)b; }                   \
    static inline bool operator!=(H a, H b) { return (float)a != (float)b; }                   \
    static inline H P##add(H a, H b) { return a + b; }                                         \
    static inline H P##sub(H a, H b) { return a - b; }                                         \
    static inline H P##mul(H a, H b) { return a * b; }                                         \
    static inline H P##div(H a, H b) { return a / b; }                                         \
    static inline H P##fma(H a, H b, H c) { return H(fmaf((float)a, (float)b, (float)c)); } \
    static inline H P##neg(H a) { return -a; }                                                 \
    static inline H P##abs(H a) { H r = a; r.__x &= 0x7fffu; return r; }                        \
    static inline H P##max(H a, H b) { return H(fmaxf((float)a, (float)b)); }                  \
    static inline H P##min(H a, H b) { return H(fminf((float)a, (float)b)); }                  \
    static inline bool P##lt(H a, H b) { return a < b; }                                       \
    static inline bool P##gt(H a, H b) { return a > b; }                                       \
    static inline bool P##eq(H a, H b) { return a == b; }                                      \
    static inline bool P##isnan(H a) { return (float)a != (float)a; }
// __hadd etc. for __half (overloads of the integer __hadd above), __hadd etc. for bf16 too.
EMU_HALF_OPS(__half, __h)
EMU_HALF_OPS(__nv_bfloat16, __h)
#undef EMU_HALF_OPS
static inline __half hexp(__half a) { return __half(expf((float)a)); }
static inline __half hsqrt(__half a) { return __half(sqrtf((float)a)); }
