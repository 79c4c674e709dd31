// Registration of one host-compiled kernel file, included by the translation unit that
// emu/tools/gen_register.py generates for each kernels/X.cu (after including X.cu itself):
// a template thunk per kernel that unpacks cuLaunchKernel's `void**` with the kernel's own
// parameter types, the parameter descriptions the driver checks against the PTX `.param`
// list, and the dynamic shared arrays of the file. Nothing here is written per kernel.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "emu_abi.h"

#ifndef EMU_DYN_SHARED_MAX
#define EMU_DYN_SHARED_MAX (227u * 1024u)  // sm_90: 227 KiB per block after opt-in
#endif

template <class A>
constexpr emu_param_t emu_param_of() {
    using T = std::remove_cv_t<A>;
    return emu_param_t{(uint32_t)sizeof(T), (uint32_t)alignof(T),
                       std::is_pointer<T>::value                                    ? (uint32_t)EMU_PARAM_POINTER
                       : std::is_floating_point<T>::value                           ? (uint32_t)EMU_PARAM_FLOAT
                       : (std::is_integral<T>::value || std::is_enum<T>::value)     ? (uint32_t)EMU_PARAM_INT
                                                                                    : (uint32_t)EMU_PARAM_STRUCT};
}

template <class F, F f>
struct emu_kernel_of;

template <class... A, void (*f)(A...)>
struct emu_kernel_of<void (*)(A...), f> {
    template <size_t... I>
    static void unpack(void* const* args, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    static void thunk(void* const* args) { unpack(args, std::index_sequence_for<A...>{}); }
    static const emu_param_t* params() {
        static const emu_param_t p[sizeof...(A) + 1] = {emu_param_of<A>()..., emu_param_t{0, 0, 0}};
        return p;
    }
    static constexpr int nparams = (int)sizeof...(A);
};

#define EMU_KERNEL(f)                                                                          \
    emu_kernel_t {                                                                             \
        #f, &emu_kernel_of<decltype(&f), &f>::thunk, emu_kernel_of<decltype(&f), &f>::params(), \
            emu_kernel_of<decltype(&f), &f>::nparams                                           \
    }

// `extern __shared__ T name[]` of the kernel file: its definition, sized for the opt-in limit,
// and an accessor for the calling OS thread's instance.
#define EMU_DYN_SHARED(T, name)                                                   \
    alignas(16) thread_local T name[EMU_DYN_SHARED_MAX / sizeof(T)];              \
    static void* emu_dyn_addr_##name() { return static_cast<void*>(&name[0]); }

#define EMU_DYN_SHARED_ENTRY(T, name) \
    emu_dyn_shared_t { &emu_dyn_addr_##name, (size_t)(EMU_DYN_SHARED_MAX / sizeof(T)) * sizeof(T) }
