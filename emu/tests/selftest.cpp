// The emulated driver's self-test, on the driver API (no cargo, no NVRTC): what it must do
// (device queries, copies, warp collectives, atomics, dynamic shared memory, WMMA numerics
// for f16/bf16/tf32 against a double-precision reference) and what it must catch like a GPU
// or better (zero-length allocations, block/grid/shared-memory limits, PTX older/newer than
// the driver and parameter lists that differ from the host build, deadlocks of barriers and
// shuffles, a missing barrier, uninitialised memory, pointer arguments that are not device
// addresses, asserts and faults, sticky errors that name the kernel and poison the process
// (a new context included) until a reset, graph replays through pointers whose buffers were
// freed, or freed and allocated again, since the capture; the capture modes' rule for
// "unsafe" calls on the capturing thread and on others; asynchronous copies into
// page-locked memory that the host sees only once it synchronises with them).
// Run by `scripts/cuda-emu.sh test`; prints one line per check and "N passed, M failed".
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <functional>
#include <limits>

#include <string>
#include <thread>
#include <vector>

#include "cuda_api.h"

extern "C" {
CUresult cuInit(unsigned);
CUresult cuDeviceGet(CUdevice*, int);
CUresult cuDeviceGetName(char*, int, CUdevice);
CUresult cuDeviceGetAttribute(int*, CUdevice_attribute, CUdevice);
CUresult cuDevicePrimaryCtxRetain(CUcontext*, CUdevice);
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice);
CUresult cuDevicePrimaryCtxReset_v2(CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuCtxSynchronize();
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void*, size_t);
CUresult cuMemcpyDtoH_v2(void*, CUdeviceptr, size_t);
CUresult cuMemsetD8_v2(CUdeviceptr, unsigned char, size_t);
CUresult cuModuleLoadData(CUmodule*, const void*);
CUresult cuModuleGetFunction(CUfunction*, CUmodule, const char*);
CUresult cuFuncSetAttribute(CUfunction, CUfunction_attribute, int);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void**, void**);
CUresult cuGetErrorString(CUresult, const char**);
CUresult cuStreamCreate(CUstream*, unsigned);
CUresult cuStreamDestroy_v2(CUstream);
CUresult cuStreamBeginCapture_v2(CUstream, int);
CUresult cuStreamEndCapture(CUstream, CUgraph*);
CUresult cuGraphInstantiateWithFlags(CUgraphExec*, CUgraph, unsigned long long);
CUresult cuGraphLaunch(CUgraphExec, CUstream);
CUresult cuGraphExecDestroy(CUgraphExec);
CUresult cuGraphDestroy(CUgraph);
CUresult cuMemsetD32Async(CUdeviceptr, unsigned int, size_t, CUstream);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr, CUdeviceptr, size_t, CUstream);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr, const void*, size_t, CUstream);
CUresult cuMemHostAlloc(void**, size_t, unsigned);
CUresult cuMemFreeHost(void*);
CUresult cuMemcpyDtoHAsync_v2(void*, CUdeviceptr, size_t, CUstream);
CUresult cuStreamSynchronize(CUstream);
CUresult cuStreamQuery(CUstream);
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned);
CUresult cuEventCreate(CUevent*, unsigned);
CUresult cuEventRecord(CUevent, CUstream);
CUresult cuEventSynchronize(CUevent);
CUresult cuEventQuery(CUevent);
CUresult cuEventDestroy_v2(CUevent);
CUresult cuCtxCreate_v2(CUcontext*, unsigned, CUdevice);
CUresult cuCtxDestroy_v2(CUcontext);
CUresult cuCtxGetDevice(CUdevice*);
CUresult emuModuleLoadHost(CUmodule*, const char*);
int emuSanitized();
}

static int g_pass = 0, g_fail = 0;

static void check(bool ok, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    (ok ? g_pass : g_fail)++;
}

static std::string err(CUresult r) {
    const char* s = nullptr;
    cuGetErrorString(r, &s);
    return s ? s : "?";
}

static CUcontext g_ctx;
static CUmodule g_mod, g_wmma, g_pipe, g_mma, g_wgmma;

// A fresh primary context: the previous one is released and the device reset (a fault's
// sticky error poisons the process until then).
static void fresh_context() {
    cuDevicePrimaryCtxRelease_v2(0);
    cuDevicePrimaryCtxReset_v2(0);
    cuDevicePrimaryCtxRetain(&g_ctx, 0);
    cuCtxSetCurrent(g_ctx);
}

static CUfunction fn(const char* name) {
    CUfunction f = nullptr;
    CUmodule m = strncmp(name, "st_wgmma", 8) == 0                                       ? g_wgmma
                 : strncmp(name, "st_wmma", 7) == 0                                      ? g_wmma
                 : strncmp(name, "st_pipe", 7) == 0                                      ? g_pipe
                 : strncmp(name, "st_mma", 6) == 0 || strncmp(name, "st_ldmatrix", 11) == 0 ? g_mma
                                                                                         : g_mod;
    CUresult r = cuModuleGetFunction(&f, m, name);
    if (r) {
        printf("FAIL no kernel %s: %s\n", name, err(r).c_str());
        exit(1);
    }
    return f;
}

template <class T>
static CUdeviceptr up(const std::vector<T>& v) {
    CUdeviceptr p = 0;
    cuMemAlloc_v2(&p, v.size() * sizeof(T));
    cuMemcpyHtoD_v2(p, v.data(), v.size() * sizeof(T));
    return p;
}
template <class T>
static std::vector<T> down(CUdeviceptr p, size_t n) {
    std::vector<T> v(n);
    cuMemcpyDtoH_v2(v.data(), p, n * sizeof(T));
    return v;
}

static CUresult launch(const char* name, unsigned grid, unsigned block, unsigned shmem, std::vector<void*> args) {
    return cuLaunchKernel(fn(name), grid, 1, 1, block, 1, 1, shmem, nullptr, args.data(), nullptr);
}

// After a failing launch: the next synchronising call returns the sticky error.
static std::string sticky_error(CUresult* code) {
    *code = cuCtxSynchronize();
    return err(*code);
}

static unsigned short f2h(float f);
static float h2f(unsigned short h);
static unsigned short f2bf(float f);

static uint64_t g_rng = 12345;
static float frand() {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_rng >> 40) & 0xffffff) / (float)(1 << 24) * 2.0f - 1.0f;
}

static void device_queries() {
    char name[256];
    cuDeviceGetName(name, sizeof name, 0);
    int sms = 0, major = 0, minor = 0, optin = 0;
    cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0);
    cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0);
    cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0);
    cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, 0);
    check(strstr(name, "emulated") != nullptr, "the device name says it is emulated: \"%s\"", name);
    check(sms == 132 && major == 9 && minor == 0, "sm_90 with 132 SMs (got sm_%d%d, %d SMs)", major, minor, sms);
    check(optin == 232448, "227 KiB opt-in shared memory per block");
}

static void memory() {
    CUdeviceptr p = 0;
    CUresult r = cuMemAlloc_v2(&p, 0);
    check(r == CUDA_ERROR_INVALID_VALUE, "a zero-length allocation is refused like on a GPU (%s)", err(r).c_str());
    r = cuMemAlloc_v2(&p, 1000);
    std::vector<float> f = down<float>(p, 250);
    bool all_nan = true;
    for (float v : f) all_nan = all_nan && isnan(v);
    check(r == 0 && all_nan, "a fresh allocation reads as NaN");
    std::vector<float> big(300, 1.0f);
    r = cuMemcpyHtoD_v2(p, big.data(), big.size() * 4);
    check(r == CUDA_ERROR_INVALID_VALUE, "a copy past the end of an allocation is an error (%s)", err(r).c_str());
    r = cuMemsetD8_v2(p + 8, 0, 100);
    std::vector<unsigned char> b = down<unsigned char>(p, 120);
    check(r == 0 && b[7] == 0xff && b[8] == 0 && b[107] == 0 && b[108] == 0xff, "cuMemsetD8 writes exactly its range");
    cuMemFree_v2(p);
    r = cuMemFree_v2(p);
    check(r == CUDA_ERROR_INVALID_VALUE, "a double free is an error (%s)", err(r).c_str());
}

static void limits() {
    CUdeviceptr in = up(std::vector<float>(256, 0.0f)), out = up(std::vector<float>(256, 0.0f));
    int n = 256;
    CUresult r = launch("st_reverse", 1, 1025, 0, {&in, &out, &n});
    check(r == CUDA_ERROR_INVALID_VALUE, "a block of 1025 threads is refused (%s)", err(r).c_str());
    r = cuLaunchKernel(fn("st_reverse"), 1, 65536, 1, 32, 1, 1, 0, nullptr, std::vector<void*>{&in, &out, &n}.data(), nullptr);
    check(r == CUDA_ERROR_INVALID_VALUE, "grid.y = 65536 is refused (%s)", err(r).c_str());
    r = cuLaunchKernel(fn("st_reverse"), 1, 1, 1, 32, 32, 2, 0, nullptr, std::vector<void*>{&in, &out, &n}.data(), nullptr);
    check(r == CUDA_ERROR_INVALID_VALUE, "a block of 32x32x2 is refused (%s)", err(r).c_str());
    // Dynamic shared memory: 48 KiB by default, up to 227 KiB after cuFuncSetAttribute.
    int m = 16384;  // floats: 64 KiB
    CUfunction f = fn("st_dyn_shared");
    std::vector<void*> args{&out, &m};
    r = cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 65536, nullptr, args.data(), nullptr);
    check(r == CUDA_ERROR_INVALID_VALUE, "64 KiB of dynamic shared memory without the opt-in is refused (%s)", err(r).c_str());
    r = cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 232448 + 4);
    check(r == CUDA_ERROR_INVALID_VALUE, "an opt-in beyond 227 KiB is refused (%s)", err(r).c_str());
    r = cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 65536);
    CUresult r2 = cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 65536, nullptr, args.data(), nullptr);
    std::vector<float> o = down<float>(out, 256);
    // thread t sums buf[n-1-i] for i = t, t+256, ...: values n-1-i.
    double want0 = 0;
    for (int i = 0; i < m; i += 256) want0 += (double)(m - 1 - i);
    check(r == 0 && r2 == 0 && fabs(o[0] - want0) < 1e-3 * want0, "64 KiB of dynamic shared memory after the opt-in works");
    int m2 = 16385;
    std::vector<void*> args2{&out, &m2};
    r = cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 65540, nullptr, args2.data(), nullptr);
    check(r == CUDA_ERROR_INVALID_VALUE, "4 bytes more than the function's 64 KiB opt-in are refused (%s)", err(r).c_str());
    r = cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 232448);
    r2 = cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 232448 + 4, nullptr, args2.data(), nullptr);
    check(r == 0 && r2 == CUDA_ERROR_INVALID_VALUE,
          "after a 227 KiB opt-in, a launch over the device's 227 KiB per block is refused (%s)", err(r2).c_str());
    cuMemFree_v2(in);
    cuMemFree_v2(out);
}

static void barriers() {
    std::vector<float> h(256);
    for (int i = 0; i < 256; ++i) h[i] = (float)i;
    CUdeviceptr in = up(h), out = up(std::vector<float>(256, -1.0f));
    int n = 256;
    CUresult r = launch("st_reverse", 1, 256, 0, {&in, &out, &n});
    std::vector<float> o = down<float>(out, 256);
    bool ok = r == 0;
    for (int i = 0; i < 256; ++i) ok = ok && o[i] == (float)(255 - i);
    check(ok, "a block reversal through shared memory with __syncthreads is right");
    int wrong = 0;
    for (int rep = 0; rep < 3; ++rep) {
        launch("st_reverse_racy", 1, 256, 0, {&in, &out, &n});
        o = down<float>(out, 256);
        for (int i = 0; i < 256; ++i) wrong += o[i] != (float)(255 - i);
    }
    check(wrong > 0, "without the barrier the seeded thread order gives a wrong result (%d wrong of 768)", wrong);

    fresh_context();
    in = up(h);
    out = up(std::vector<float>(256, -1.0f));
    r = launch("st_partial_barrier", 2, 64, 0, {&out});
    CUresult code;
    std::string e = sticky_error(&code);
    check(r == 0 && code == CUDA_ERROR_LAUNCH_FAILED && e.find("st_partial_barrier") != std::string::npos &&
              e.find("deadlock") != std::string::npos,
          "__syncthreads reached by half a block: a launch failure naming the kernel (%s)", e.c_str());
    CUdeviceptr p = 0;
    r = cuMemAlloc_v2(&p, 16);
    check(r == CUDA_ERROR_LAUNCH_FAILED, "the failure is sticky: the next allocation fails too");

    fresh_context();
    out = up(std::vector<float>(64, -1.0f));
    launch("st_partial_shuffle", 1, 64, 0, {&out});
    e = sticky_error(&code);
    check(code == CUDA_ERROR_LAUNCH_FAILED && e.find("__shfl_down_sync") != std::string::npos &&
              e.find("st_partial_shuffle") != std::string::npos,
          "a shuffle reached by half a warp: a launch failure naming the kernel (%s)", e.c_str());
    fresh_context();
}

static void warp_ops() {
    std::vector<int> v(64);
    for (int i = 0; i < 64; ++i) v[i] = (i * 7 + 3) % 23;
    CUdeviceptr in = up(v), out = up(std::vector<int>(64 * 12, 0));
    CUresult r = launch("st_warp_ops", 1, 64, 0, {&in, &out});
    std::vector<int> o = down<int>(out, 64 * 12);
    int bad = r != 0;
    int count_odd = 0;
    for (int i = 0; i < 64; ++i) count_odd += v[i] & 1;
    for (int t = 0; t < 64; ++t) {
        int w = t / 32 * 32, lane = t % 32;
        const int* q = &o[t * 12];
        int up = lane >= 2 ? v[t - 2] : v[t];
        int dn = lane + 5 <= 31 ? v[t + 5] : v[t];
        int seg = lane & ~7, dn8 = (lane & 7) + 1 <= 7 ? v[w + seg + (lane & 7) + 1] : v[t];
        unsigned ballot = 0, match = 0;
        int sum = 0, any7 = 0, allpos = 1;
        for (int l = 0; l < 32; ++l) {
            ballot |= (unsigned)(v[w + l] & 1) << l;
            if (v[w + l] % 3 == v[t] % 3) match |= 1u << l;
            sum += v[w + l];
            any7 |= v[w + l] == 7;
            allpos &= v[w + l] >= 0;
        }
        int want[12] = {v[w + 3], up, dn, v[w + (lane ^ 9)], dn8, (int)ballot, (int)match, sum, count_odd, any7 + 2 * allpos,
                        lane < 16 ? 0x0000ffff : 0, lane < 16};
        for (int k = 0; k < 12; ++k)
            if (q[k] != want[k]) {
                if (bad < 5) printf("     thread %d op %d: got %d want %d\n", t, k, q[k], want[k]);
                ++bad;
            }
    }
    check(bad == 0, "shuffles (idx/up/down/xor/width 8), ballot, match_any/all, reduce, any/all, __syncthreads_count");
    cuMemFree_v2(in);
    cuMemFree_v2(out);
}

static void atomics() {
    int n = 5000;
    std::vector<float> x(n);
    double sum = 0;
    for (int i = 0; i < n; ++i) {
        x[i] = frand();
        sum += x[i];
    }
    CUdeviceptr dx = up(x), cnt = up(std::vector<unsigned>{0}), s = up(std::vector<float>{0.0f}),
                lo = up(std::vector<int>{1 << 30}), hi = up(std::vector<int>{-(1 << 30)}), cas = up(std::vector<unsigned>{0});
    CUresult r = launch("st_atomics", (n + 127) / 128, 128, 0, {&dx, &n, &cnt, &s, &lo, &hi, &cas});
    unsigned c = down<unsigned>(cnt, 1)[0], k = down<unsigned>(cas, 1)[0];
    float fs = down<float>(s, 1)[0];
    int l = down<int>(lo, 1)[0], h = down<int>(hi, 1)[0];
    int wl = 1 << 30, wh = -(1 << 30);
    for (float v : x) {
        wl = std::min(wl, (int)(v * 1000.0f));
        wh = std::max(wh, (int)(v * 1000.0f));
    }
    check(r == 0 && c == (unsigned)n && k == 2u * n && l == wl && h == wh && fabs(fs - sum) < 1e-3,
          "atomicAdd (u32, f32), atomicMin/Max, atomicCAS loops over %d threads", n);
}

static void poison_and_faults() {
    CUdeviceptr out = up(std::vector<float>(32, 0.0f));
    launch("st_uninit_shared", 1, 32, 0, {&out});
    std::vector<float> o = down<float>(out, 32);
    bool nan = true;
    for (float v : o) nan = nan && isnan(v);
    check(nan, "shared memory nobody wrote reads as NaN");

    std::vector<int> ones(32, 0);
    ones[5] = 1;
    CUdeviceptr x = up(ones);
    launch("st_assert", 1, 32, 0, {&x});
    CUresult code;
    std::string e = sticky_error(&code);
    check(code == CUDA_ERROR_ASSERT && e.find("st_assert") != std::string::npos && e.find("thread (5,0,0)") != std::string::npos,
          "a failed device assert names the kernel and the thread (%s)", e.c_str());
    fresh_context();

    if (emuSanitized()) {
        printf("skip a read of an illegal address (under AddressSanitizer, ASan reports it and stops)\n");
    } else {
        out = up(std::vector<float>(32, 0.0f));
        launch("st_fault", 1, 32, 0, {&out});
        e = sticky_error(&code);
        check(code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find("st_fault") != std::string::npos,
              "a read of an illegal address is CUDA_ERROR_ILLEGAL_ADDRESS naming the kernel (%s)", e.c_str());
        fresh_context();
    }

    CUdeviceptr in = up(std::vector<float>(256, 0.0f));
    out = up(std::vector<float>(256, 0.0f));
    CUdeviceptr freed = up(std::vector<float>(256, 0.0f));
    cuMemFree_v2(freed);
    int n = 256;
    launch("st_reverse", 1, 256, 0, {&in, &freed, &n});
    e = sticky_error(&code);
    check(code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find("pointer argument 1") != std::string::npos,
          "a freed buffer as a kernel argument is caught (%s)", e.c_str());
    fresh_context();
}

// ---- device-to-host copies into page-locked memory -------------------------------------------

// What the host sees of an asynchronous copy into page-locked memory: the old bytes until it
// synchronises with the copy (its stream, an event recorded after it, a stream that waited
// for that event, the context, a synchronous copy), the device's bytes as they were at the
// enqueue after. An event never recorded, or recorded before the copy, synchronises nothing.
static void host_visible_copies() {
    const char* defer = getenv("EMU_DEFER_COPIES");
    if (defer && defer[0] == '0') {
        printf("skip held-back device-to-host copies (EMU_DEFER_COPIES=0)\n");
        return;
    }
    const int n = 4;
    CUdeviceptr d = up(std::vector<float>{1, 2, 3, 4});
    float* h = nullptr;
    CUresult r = cuMemHostAlloc(reinterpret_cast<void**>(&h), n * sizeof(float), 0);
    if (r || !h) {
        check(false, "cuMemHostAlloc (%s)", err(r).c_str());
        return;
    }
    CUstream st = nullptr, other = nullptr;
    cuStreamCreate(&st, 1);  // CU_STREAM_NON_BLOCKING, as cudarc creates them
    cuStreamCreate(&other, 1);
    CUevent never = nullptr, before = nullptr, after = nullptr;
    cuEventCreate(&never, 0);
    cuEventCreate(&before, 0);
    cuEventCreate(&after, 0);
    auto reset = [&] {
        for (int i = 0; i < n; ++i) h[i] = -1.0f;
    };
    auto old = [&] {
        for (int i = 0; i < n; ++i)
            if (h[i] != -1.0f) return false;
        return true;
    };
    auto arrived = [&](float first) { return h[0] == first && h[1] == first + 1 && h[2] == first + 2 && h[3] == first + 3; };

    // The copy reads the device at the enqueue; a later memset on the stream does not show.
    reset();
    cuEventRecord(before, st);
    r = cuMemcpyDtoHAsync_v2(h, d, n * sizeof(float), st);
    cuMemsetD32Async(d, 0, n, st);  // the next operation on the stream: the host still waits
    bool held = old();
    CUresult rn = cuEventSynchronize(never);
    CUresult rq = cuEventQuery(never);
    bool held_never = old();
    CUresult rb = cuEventSynchronize(before);
    bool held_before = old();
    check(r == 0 && held && rn == 0 && rq == 0 && held_never && held_before,
          "a copy into page-locked memory is not visible before the host synchronises with it: not after the next operation "
          "on its stream, nor after synchronising an event never recorded or one recorded before the copy (%s, %s, %s)",
          err(r).c_str(), err(rn).c_str(), err(rb).c_str());
    cuEventRecord(after, st);
    r = cuEventSynchronize(after);
    check(r == 0 && arrived(1.0f), "an event recorded after the copy, synchronised, delivers the device's bytes of the enqueue "
                                   "(got %g %g %g %g)", h[0], h[1], h[2], h[3]);

    // cuStreamSynchronize, cuStreamQuery, cuEventQuery, cuCtxSynchronize, a synchronous copy.
    cuMemcpyHtoD_v2(d, std::vector<float>{10, 11, 12, 13}.data(), n * sizeof(float));
    struct Way {
        const char* name;
        std::function<CUresult()> sync;
    } ways[] = {{"cuStreamSynchronize", [&] { return cuStreamSynchronize(st); }},
                {"cuStreamQuery", [&] { return cuStreamQuery(st); }},
                {"cuEventQuery of an event recorded after it",
                 [&] {
                     cuEventRecord(after, st);
                     return cuEventQuery(after);
                 }},
                {"cuCtxSynchronize", [&] { return cuCtxSynchronize(); }},
                {"a synchronous copy", [&] {
                     float x;
                     return cuMemcpyDtoH_v2(&x, d, sizeof x);
                 }}};
    for (const Way& w : ways) {
        reset();
        r = cuMemcpyDtoHAsync_v2(h, d, n * sizeof(float), st);
        held = old();
        CUresult rs = w.sync();
        check(r == 0 && held && rs == 0 && arrived(10.0f), "%s makes a held-back copy into page-locked memory visible (%s)", w.name,
              err(rs).c_str());
    }

    // Another stream: synchronising it shows the copy only once it waited for the copy's event.
    reset();
    cuMemcpyDtoHAsync_v2(h, d, n * sizeof(float), st);
    cuStreamSynchronize(other);
    held = old();
    cuEventRecord(after, st);
    cuStreamWaitEvent(other, after, 0);
    bool still = old();
    r = cuStreamSynchronize(other);
    check(r == 0 && held && still && arrived(10.0f),
          "synchronising another stream shows the copy only after that stream waited for an event recorded after it (%s)",
          err(r).c_str());

    // Pageable memory: the copy is done when the call returns.
    std::vector<float> pageable(n, -1.0f);
    r = cuMemcpyDtoHAsync_v2(pageable.data(), d, n * sizeof(float), st);
    check(r == 0 && pageable[0] == 10.0f && pageable[3] == 13.0f, "a copy into pageable memory is visible at once");

    cuEventDestroy_v2(never);
    cuEventDestroy_v2(before);
    cuEventDestroy_v2(after);
    cuStreamDestroy_v2(st);
    cuStreamDestroy_v2(other);
    cuMemFreeHost(h);
    cuMemFree_v2(d);
}

// ---- sticky faults ---------------------------------------------------------------------------

// A kernel's fault poisons the process as on a GPU: every later call that touches the work
// of a context, any context, and a new context's creation (plain or primary, after the last
// release) return the same error; device and context queries still answer; a reset clears it.
static void sticky_faults() {
    fresh_context();
    CUdeviceptr in = up(std::vector<float>(64, 1.0f));
    CUdeviceptr good = up(std::vector<float>(64, 0.0f));
    CUdeviceptr freed = up(std::vector<float>(64, 0.0f));
    cuMemFree_v2(freed);
    CUstream st = nullptr;
    cuStreamCreate(&st, 1);
    int n = 64;
    launch("st_reverse", 1, 64, 0, {&in, &freed, &n});  // faults (a freed pointer argument)
    CUresult code;
    std::string e = sticky_error(&code);
    check(code == CUDA_ERROR_ILLEGAL_ADDRESS, "the fault is reported by the next synchronisation (%s)", e.c_str());
    CUdeviceptr p = 0;
    std::vector<float> host(64, 0.0f);
    CUevent ev = nullptr;
    CUstream st2 = nullptr;
    void* pinned = nullptr;
    struct Call {
        const char* name;
        CUresult r;
    } calls[] = {
        {"cuCtxSynchronize", cuCtxSynchronize()},
        {"cuStreamSynchronize", cuStreamSynchronize(st)},
        {"cuMemAlloc", cuMemAlloc_v2(&p, 256)},
        {"cuMemHostAlloc", cuMemHostAlloc(&pinned, 256, 0)},
        {"cuMemcpyHtoD", cuMemcpyHtoD_v2(good, host.data(), 256)},
        {"cuMemcpyDtoH", cuMemcpyDtoH_v2(host.data(), good, 256)},
        {"cuMemcpyDtoHAsync", cuMemcpyDtoHAsync_v2(host.data(), good, 256, st)},
        {"cuMemsetD8", cuMemsetD8_v2(good, 0, 256)},
        {"cuMemsetD32Async", cuMemsetD32Async(good, 0, 64, st)},
        {"a good launch", launch("st_reverse", 1, 64, 0, {&in, &good, &n})},
        {"cuStreamCreate", cuStreamCreate(&st2, 1)},
        {"cuEventCreate", cuEventCreate(&ev, 0)},
        {"cuModuleLoadData", [] {
             CUmodule m = nullptr;
             return cuModuleLoadData(&m, ".version 8.0\n.target sm_90\n.address_size 64\n");
         }()},
    };
    for (const Call& c : calls)
        check(c.r == CUDA_ERROR_ILLEGAL_ADDRESS, "after a fault %s returns the sticky error (%s)", c.name, err(c.r).c_str());
    int sms = 0;
    CUdevice dev = -1;
    CUresult ra = cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0);
    CUresult rd = cuCtxGetDevice(&dev);
    check(ra == 0 && sms == 132 && rd == 0 && dev == 0, "device and context queries still answer after a fault (%s, %s)",
          err(ra).c_str(), err(rd).c_str());
    cuDevicePrimaryCtxRelease_v2(0);
    CUcontext c2 = nullptr;
    CUresult rr = cuDevicePrimaryCtxRetain(&c2, 0);
    CUresult rc = cuCtxCreate_v2(&c2, 0, 0);
    check(rr == CUDA_ERROR_ILLEGAL_ADDRESS && rc == CUDA_ERROR_ILLEGAL_ADDRESS,
          "a new context after the fault, primary (released first) or plain, is refused with the sticky error (%s, %s)",
          err(rr).c_str(), err(rc).c_str());
    cuDevicePrimaryCtxReset_v2(0);
    rr = cuDevicePrimaryCtxRetain(&g_ctx, 0);
    cuCtxSetCurrent(g_ctx);
    CUresult rl = launch("st_reverse", 1, 64, 0, {&in, &good, &n});
    CUresult rs = cuCtxSynchronize();
    check(rr == 0 && rl == 0 && rs == 0, "cuDevicePrimaryCtxReset clears it (%s, %s, %s)", err(rr).c_str(), err(rl).c_str(),
          err(rs).c_str());
    cuStreamDestroy_v2(st);
    cuMemFree_v2(in);
    cuMemFree_v2(good);
}

// ---- graph replays through stale pointers ----------------------------------------------------

// A graph captured on `st` from `record` (which enqueues on the stream), instantiated.
template <class F>
static CUgraphExec capture(CUstream st, F record) {
    CUgraph g = nullptr;
    CUgraphExec e = nullptr;
    CUresult r = cuStreamBeginCapture_v2(st, 2);
    if (!r) r = record();
    CUresult r2 = cuStreamEndCapture(st, &g);
    if (!r) r = r2;
    if (!r) r = cuGraphInstantiateWithFlags(&e, g, 0);
    if (g) cuGraphDestroy(g);
    if (r) {
        printf("FAIL capture: %s\n", err(r).c_str());
        exit(1);
    }
    return e;
}

// A new device buffer of `bytes` that the allocator placed inside the freed [stale, stale +
// range), within 64 allocations (the misses are freed again), or 0. The emulator hands a
// freed block out again for the next request of its size.
static CUdeviceptr alloc_again(CUdeviceptr stale, size_t range, size_t bytes) {
    std::vector<CUdeviceptr> misses;
    CUdeviceptr p = 0;
    for (int k = 0; k < 64 && !p; ++k) {
        cuMemAlloc_v2(&p, bytes);
        if (p < stale || p >= stale + range) misses.push_back(p), p = 0;
    }
    for (CUdeviceptr q : misses) cuMemFree_v2(q);
    return p;
}

// Whether the device buffer holds `n` floats equal to v.
static bool holds(CUdeviceptr p, size_t n, float v) {
    bool all = true;
    for (float x : down<float>(p, n)) all = all && x == v;
    return all;
}

// A replay after a buffer a node holds was freed: with nothing allocated since, and with the
// memory allocated again for a new buffer (the same size, at the same address; a smaller one,
// wherever it lands), in a kernel's, a copy's and a memset's arguments. Every case is
// CUDA_ERROR_ILLEGAL_ADDRESS before the node runs, naming the node, the operation and the
// argument, and the new buffer keeps its contents.
static void graph_stale_pointers() {
    const size_t kBytes = 4096;  // each captured buffer: 1024 floats
    CUstream st = nullptr;
    cuStreamCreate(&st, 0);
    std::vector<float> ramp(1024);
    for (int i = 0; i < 1024; ++i) ramp[i] = (float)i;
    CUdeviceptr in = up(ramp), out = 0;
    int n = 256;
    CUresult code;
    std::string e;

    // Nothing freed: the replay runs (it reverses in[0..256) into out).
    CUfunction rev = fn("st_reverse");
    auto record_rev = [&] {
        void* args[] = {&in, &out, &n};
        return cuLaunchKernel(rev, 1, 1, 1, 256, 1, 1, 0, st, args, nullptr);
    };
    out = up(std::vector<float>(1024, 0.0f));
    CUgraphExec g = capture(st, record_rev);
    CUresult r = cuGraphLaunch(g, st);
    std::vector<float> o = down<float>(out, 256);
    check(r == CUDA_SUCCESS && cuCtxSynchronize() == CUDA_SUCCESS && o[0] == 255.0f && o[255] == 0.0f,
          "a graph whose buffers are all live replays (%s)", err(r).c_str());

    // Freed, nothing allocated since: the message of before.
    cuMemFree_v2(out);
    cuGraphLaunch(g, st);
    e = sticky_error(&code);
    check(code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find("freed since the capture") != std::string::npos &&
              e.find("st_reverse") != std::string::npos && e.find("pointer argument 1") != std::string::npos,
          "a replay through a freed buffer is CUDA_ERROR_ILLEGAL_ADDRESS naming the kernel and the argument (%s)", e.c_str());
    fresh_context();
    cuGraphExecDestroy(g);
    if (emuSanitized()) {
        printf("skip graph replays into memory allocated again (the sanitizer build does not reuse freed blocks)\n");
        cuMemFree_v2(in);
        cuStreamDestroy_v2(st);
        return;
    }

    // Freed and allocated again for a new buffer of the same size, at the same address.
    out = up(std::vector<float>(1024, 0.0f));
    g = capture(st, record_rev);
    CUdeviceptr stale = out;
    cuMemFree_v2(out);
    CUdeviceptr fresh = alloc_again(stale, kBytes, kBytes);
    check(fresh == stale, "the freed buffer's address is handed out again for a new buffer of its size (%#llx)",
          (unsigned long long)fresh);
    if (fresh) {
        cuMemsetD8_v2(fresh, 0, kBytes);
        cuGraphLaunch(g, st);
        e = sticky_error(&code);
        check(code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find("allocated again") != std::string::npos &&
                  e.find("node 0 (kernel `st_reverse`): pointer argument 1") != std::string::npos,
              "a replay through a pointer into memory freed and allocated again is CUDA_ERROR_ILLEGAL_ADDRESS naming the "
              "node, the kernel and the argument (%s)",
              e.c_str());
        fresh_context();
        check(holds(fresh, 1024, 0.0f), "the new buffer at the stale address was not written by the replay");
        cuMemFree_v2(fresh);
    }
    cuGraphExecDestroy(g);

    // Freed and a smaller buffer allocated: were it placed inside the freed one, the kernel
    // would write past its end (into the allocator's own data: a crash later) if it ran.
    // The emulator keeps a freed block for the next request of its own size, so whether a
    // smaller one lands inside is glibc's choice: either way the replay fails first.
    out = up(std::vector<float>(1024, 0.0f));
    g = capture(st, record_rev);
    stale = out;
    cuMemFree_v2(out);
    fresh = alloc_again(stale, kBytes, 256);
    bool inside = fresh != 0;
    if (!inside) cuMemAlloc_v2(&fresh, 256);
    cuMemsetD8_v2(fresh, 0, 256);
    cuGraphLaunch(g, st);
    e = sticky_error(&code);
    check(code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find(inside ? "allocated again" : "freed since the capture") != std::string::npos,
          "a replay after a smaller buffer was allocated (%s the freed one) fails before the kernel runs (%s)",
          inside ? "inside" : "not inside", e.c_str());
    fresh_context();
    check(holds(fresh, 64, 0.0f), "the smaller buffer was not written by the replay");
    cuMemFree_v2(fresh);
    cuGraphExecDestroy(g);

    // A copy's source and a memset's destination, freed and allocated again.
    CUdeviceptr dst = up(std::vector<float>(1024, 0.0f)), src = up(ramp);
    g = capture(st, [&] {
        CUresult r = cuMemsetD32Async(dst, 0, 1024, st);
        return r ? r : cuMemcpyDtoDAsync_v2(dst, src, kBytes, st);
    });
    cuMemFree_v2(src);
    fresh = alloc_again(src, kBytes, kBytes);
    cuGraphLaunch(g, st);
    e = sticky_error(&code);
    check(fresh && code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find("node 1 (a copy of 4096 bytes): its source") != std::string::npos &&
              e.find("allocated again") != std::string::npos,
          "a replayed copy whose source was freed and allocated again is caught (%s)", e.c_str());
    fresh_context();
    if (fresh) cuMemFree_v2(fresh);
    cuGraphExecDestroy(g);
    g = capture(st, [&] { return cuMemsetD32Async(dst, 0, 1024, st); });
    cuMemFree_v2(dst);
    fresh = alloc_again(dst, kBytes, kBytes);
    if (fresh) cuMemsetD8_v2(fresh, 0xab, kBytes);
    cuGraphLaunch(g, st);
    e = sticky_error(&code);
    check(fresh && code == CUDA_ERROR_ILLEGAL_ADDRESS &&
              e.find("node 0 (a memset of 4096 bytes): its destination") != std::string::npos &&
              e.find("allocated again") != std::string::npos,
          "a replayed memset whose destination was freed and allocated again is caught (%s)", e.c_str());
    fresh_context();
    if (fresh) {
        std::vector<unsigned char> b(kBytes);
        cuMemcpyDtoH_v2(b.data(), fresh, kBytes);
        bool kept = true;
        for (unsigned char x : b) kept = kept && x == 0xab;
        check(kept, "the new buffer at the memset's stale address was not written by the replay");
        cuMemFree_v2(fresh);
    }
    cuGraphExecDestroy(g);

    // A copy from page-locked host memory freed and allocated again.
    void *host = nullptr, *host2 = nullptr;
    cuMemHostAlloc(&host, kBytes, 0);
    dst = up(std::vector<float>(1024, 0.0f));
    g = capture(st, [&] { return cuMemcpyHtoDAsync_v2(dst, host, kBytes, st); });
    cuMemFreeHost(host);
    cuMemHostAlloc(&host2, kBytes, 0);
    cuGraphLaunch(g, st);
    e = sticky_error(&code);
    check(code == CUDA_ERROR_ILLEGAL_ADDRESS && e.find("page-locked host") != std::string::npos &&
              e.find(host2 == host ? "allocated again" : "freed since the capture") != std::string::npos,
          "a replayed copy whose page-locked source was freed%s is caught (%s)", host2 == host ? " and allocated again" : "",
          e.c_str());
    fresh_context();
    cuMemFreeHost(host2);
    cuMemFree_v2(dst);
    cuGraphExecDestroy(g);
    cuMemFree_v2(in);
    cuStreamDestroy_v2(st);
}

static void ptx_checks() {
    // PTX written for these checks: the driver reads .version, .target and .param lists.
    const char* newer = ".version 9.9\n.target sm_90\n.address_size 64\n.visible .entry st_reverse(.param .u64 a, .param .u64 b, .param .u32 c)\n{\nret;\n}\n";
    CUmodule m;
    CUresult r = cuModuleLoadData(&m, newer);
    check(r == CUDA_ERROR_UNSUPPORTED_PTX_VERSION, "PTX newer than the driver's 9.0 is refused (%s)", err(r).c_str());
    const char* sm100 = ".version 9.0\n.target sm_100\n.address_size 64\n.visible .entry st_reverse(.param .u64 a, .param .u64 b, .param .u32 c)\n{\nret;\n}\n";
    r = cuModuleLoadData(&m, sm100);
    check(r == CUDA_ERROR_NO_BINARY_FOR_GPU, "PTX for sm_100 is refused on sm_90 (%s)", err(r).c_str());
    const char* unknown = ".version 9.0\n.target sm_90\n.address_size 64\n.visible .entry no_such_kernel(.param .u64 a)\n{\nret;\n}\n";
    r = cuModuleLoadData(&m, unknown);
    check(r == CUDA_ERROR_NOT_FOUND, "a PTX entry without a host build is a load error (%s)", err(r).c_str());
}

// ---- WMMA ----------------------------------------------------------------------------------

static unsigned short f2h(float f) {
    unsigned x;
    memcpy(&x, &f, 4);
    unsigned sign = (x >> 16) & 0x8000u, e = (x >> 23) & 0xff, m = x & 0x7fffff;
    int exp = (int)e - 127 + 15;
    if (exp <= 0) return (unsigned short)sign;  // the test values are normal halves
    unsigned h = ((unsigned)exp << 10) | (m >> 13), rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return (unsigned short)(sign | h);
}
static float h2f(unsigned short h) {
    unsigned sign = (unsigned)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    unsigned x = e == 0 ? sign : sign | ((e - 15 + 127) << 23) | (m << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}
static unsigned short f2bf(float f) {
    unsigned x;
    memcpy(&x, &f, 4);
    x += 0x7fff + ((x >> 16) & 1);
    return (unsigned short)(x >> 16);
}
static float bf2f(unsigned short b) {
    unsigned x = (unsigned)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}
static float tf32(float f) {
    unsigned x;
    memcpy(&x, &f, 4);
    x = (x + 0x1000) & 0xffffe000u;
    memcpy(&f, &x, 4);
    return f;
}

// D = A (16 x K, row-major) . B (K x 16, col-major) + C, in f16 or bf16, f32 accumulate.
static void wmma_16bit(bool bf) {
    const int kt = 3, K = 16 * kt;
    std::vector<unsigned short> a(16 * K), b(16 * K);
    std::vector<float> af(16 * K), bf_(16 * K), c(256);
    for (int i = 0; i < 16 * K; ++i) {
        float x = frand(), y = frand();
        a[i] = bf ? f2bf(x) : f2h(x);
        b[i] = bf ? f2bf(y) : f2h(y);
        af[i] = bf ? bf2f(a[i]) : h2f(a[i]);
        bf_[i] = bf ? bf2f(b[i]) : h2f(b[i]);
    }
    for (float& v : c) v = frand();
    CUdeviceptr da = up(a), db = up(b), dc = up(c), dd = up(std::vector<float>(256, 0.0f));
    int k_tiles = kt;
    CUresult r = launch(bf ? "st_wmma_bf16" : "st_wmma_f16", 1, 64, 0, {&da, &db, &dc, &dd, &k_tiles});
    std::vector<float> d = down<float>(dd, 256);
    double worst = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            double want = c[i * 16 + j], mag = fabs(want);
            for (int k = 0; k < K; ++k) {
                double p = (double)af[i * K + k] * (double)bf_[j * K + k];  // B col-major: B[k][j] at j*K + k
                want += p;
                mag += fabs(p);
            }
            worst = std::max(worst, fabs(d[i * 16 + j] - want) / (mag * 1e-6 * K));
        }
    check(r == 0 && worst < 1.0, "wmma %s 16x16x16 (K = %d, two warps): D = A.B + C within f32 accumulation error (worst %.2g of the bound)",
          bf ? "bf16" : "f16", K, worst);
}

static void wmma_tf32() {
    const int kt = 4, K = 8 * kt;
    std::vector<float> a(16 * K), b(K * 16);
    for (float& v : a) v = frand();
    for (float& v : b) v = frand();
    CUdeviceptr da = up(a), db = up(b), dd = up(std::vector<float>(256, 0.0f));
    int k_tiles = kt;
    CUresult r = launch("st_wmma_tf32", 1, 32, 0, {&da, &db, &dd, &k_tiles});
    std::vector<float> d = down<float>(dd, 256);
    double worst = 0, worst_unrounded = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            double want = 0, raw = 0, mag = 0;
            for (int k = 0; k < K; ++k) {
                want += (double)tf32(a[i * K + k]) * (double)tf32(b[k * 16 + j]);
                raw += (double)a[i * K + k] * (double)b[k * 16 + j];
                mag += fabs((double)a[i * K + k] * b[k * 16 + j]);
            }
            double got = d[j * 16 + i] / 2.0;  // stored col-major, scaled by 2 in the kernel
            worst = std::max(worst, fabs(got - want) / (mag * 1e-6 * K));
            worst_unrounded = std::max(worst_unrounded, fabs(got - raw) / mag);
        }
    check(r == 0 && worst < 1.0 && worst_unrounded > 1e-6,
          "wmma tf32 16x16x8 (K = %d): inputs rounded to tf32, f32 accumulate, col-major store (worst %.2g of the bound; "
          "%.1e from the unrounded product, as on a tensor core)",
          K, worst, worst_unrounded);

    fresh_context();
    CUdeviceptr x = up(std::vector<unsigned short>(256, 0));
    launch("st_wmma_partial", 1, 32, 0, {&x});
    CUresult code;
    std::string e = sticky_error(&code);
    check(code == CUDA_ERROR_LAUNCH_FAILED && e.find("st_wmma_partial") != std::string::npos,
          "a wmma load reached by half a warp is a launch failure (%s)", e.c_str());
    fresh_context();
}

// cp.async (emu/tests/pipeline.cu): 4/8/16-byte copies with zero fill land when their
// group is waited for, not before (not at a barrier either), and a misaligned copy fails.
static void pipeline() {
    std::vector<float> src(256);
    for (int i = 0; i < 256; ++i) src[i] = (float)(i + 1);
    CUdeviceptr ds = up(src), dout = up(std::vector<float>(768, 0.0f));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    // mode 0: what every slot must hold after waiting for all groups (NaN: never written).
    std::vector<float> want(768, nan);
    for (int j = 0; j < 64; ++j) want[j] = (j & 1) ? 0.0f : src[j];
    for (int j = 0; j < 128; ++j) want[256 + j] = ((j & 1) && (j / 2) % 3 == 0) ? 0.0f : src[j];
    for (int j = 0; j < 256; ++j) want[512 + j] = ((j % 4) != 0 && (j / 4) % 4 == 0) ? 0.0f : src[j];
    const char* what[3] = {"after waiting for every group all copies landed, zero fill included",
                           "waiting for all but the newest group leaves the newest unlanded",
                           "without a wait nothing landed, the barrier notwithstanding"};
    for (int mode = 0; mode < 3; ++mode) {
        int m = mode;
        CUresult r = launch("st_pipe_stages", 1, 64, 0, {&ds, &dout, &m});
        cuCtxSynchronize();
        std::vector<float> got = down<float>(dout, 768);
        int bad = 0;
        for (int i = 0; i < 768; ++i) {
            bool landed = i < 256 * (mode == 0 ? 3 : mode == 1 ? 2 : 0);
            float w = landed ? want[i] : nan;
            bool same = std::isnan(w) ? std::isnan(got[i]) : got[i] == w;
            bad += !same;
        }
        check(r == 0 && bad == 0, "cp.async: %s (%d wrong of 768)", what[mode], bad);
    }
    fresh_context();
    launch("st_pipe_misaligned", 1, 1, 0, {&ds});
    CUresult code;
    std::string e = sticky_error(&code);
    check(code == CUDA_ERROR_LAUNCH_FAILED && e.find("not aligned") != std::string::npos,
          "a cp.async of 8 bytes to a 4-byte-aligned address is a launch failure (%s)", e.c_str());
    fresh_context();
}

// ldmatrix and mma.sync (emu/tests/mma.cu, emu/shim/emu_mma.h): every lane's registers as
// the PTX ISA lays them out. The kernels build the fragments from global memory by the
// documented layout (written out there), with a different value in every element, so a
// shim that gives a lane other elements fails the product.
static void mma_primitives() {
    // mma m16n8k16 bf16: D = A . B + C.
    std::vector<unsigned short> a(256), b(128);
    std::vector<float> af(256), bfv(128), c(128);
    for (int i = 0; i < 256; ++i) af[i] = bf2f(a[i] = f2bf(frand()));
    for (int i = 0; i < 128; ++i) bfv[i] = bf2f(b[i] = f2bf(frand()));
    for (float& v : c) v = frand();
    CUdeviceptr da = up(a), db = up(b), dc = up(c), dd = up(std::vector<float>(128, 0.0f));
    CUresult r = launch("st_mma_bf16", 1, 32, 0, {&da, &db, &dc, &dd});
    std::vector<float> d = down<float>(dd, 128);
    double worst = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double want = c[i * 8 + j], mag = fabs(want);
            for (int k = 0; k < 16; ++k) {
                want += (double)af[i * 16 + k] * bfv[k * 8 + j];
                mag += fabs((double)af[i * 16 + k] * bfv[k * 8 + j]);
            }
            worst = std::max(worst, fabs(d[i * 8 + j] - want) / (mag * 1e-6 * 16));
        }
    check(r == 0 && worst < 1.0, "mma.sync m16n8k16 bf16: D = A.B + C from the documented fragment layout (worst %.2g of the bound)",
          worst);

    // mma m16n8k8 tf32: operands truncated to tf32 (the low 13 bits ignored).
    std::vector<float> ta(128), tb(64), tc(128);
    for (float& v : ta) v = frand();
    for (float& v : tb) v = frand();
    for (float& v : tc) v = frand();
    CUdeviceptr ta_ = up(ta), tb_ = up(tb), tc_ = up(tc), td_ = up(std::vector<float>(128, 0.0f));
    r = launch("st_mma_tf32", 1, 32, 0, {&ta_, &tb_, &tc_, &td_});
    d = down<float>(td_, 128);
    auto trunc = [](float v) {
        uint32_t u;
        memcpy(&u, &v, 4);
        u &= 0xffffe000u;
        memcpy(&v, &u, 4);
        return v;
    };
    worst = 0;
    double unrounded = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double want = tc[i * 8 + j], raw = want, mag = fabs(want);
            for (int k = 0; k < 8; ++k) {
                want += (double)trunc(ta[i * 8 + k]) * trunc(tb[k * 8 + j]);
                raw += (double)ta[i * 8 + k] * tb[k * 8 + j];
                mag += fabs((double)ta[i * 8 + k] * tb[k * 8 + j]);
            }
            worst = std::max(worst, fabs(d[i * 8 + j] - want) / (mag * 1e-6 * 8));
            unrounded = std::max(unrounded, fabs(d[i * 8 + j] - raw) / mag);
        }
    check(r == 0 && worst < 1.0 && unrounded > 1e-6,
          "mma.sync m16n8k8 tf32: D = A.B + C from the documented layout, operands truncated to tf32 (worst %.2g of the bound, "
          "%.1e from the unrounded product)",
          worst, unrounded);

    // ldmatrix x1/x2/x4, with and without .trans, from a padded shared tile.
    std::vector<unsigned short> m(32 * 16);
    for (int i = 0; i < 32 * 16; ++i) m[i] = (unsigned short)(i * 7 + 3);
    CUdeviceptr dm = up(m), dout = up(std::vector<unsigned>(128, 0));
    for (int mode = 0; mode < 6; ++mode)
        for (int cb = 0; cb < 2; ++cb) {
            int md = mode, colblk = cb;
            r = launch("st_ldmatrix", 1, 32, 0, {&dm, &dout, &md, &colblk});
            std::vector<unsigned> o = down<unsigned>(dout, 128);
            const int num = 1 << (mode % 3);
            const bool trans = mode >= 3;
            int bad = 0;
            for (int lane = 0; lane < 32; ++lane)
                for (int j = 0; j < 4; ++j) {
                    unsigned want = 0xdeadbeefu;
                    const int g = lane / 4, t = lane % 4;
                    auto at = [&](int row, int col) { return (unsigned)m[(8 * j + row) * 16 + 8 * cb + col]; };
                    if (j < num) want = trans ? at(2 * t, g) | (at(2 * t + 1, g) << 16) : at(g, 2 * t) | (at(g, 2 * t + 1) << 16);
                    bad += o[lane * 4 + j] != want;
                }
            if (cb == 1 || bad)
                check(r == 0 && bad == 0, "ldmatrix m8n8.x%d%s: every lane's registers as documented (%d wrong of %d)", num,
                      trans ? ".trans" : "", bad, 128);
        }

    // ldmatrix.x4 (A) and .x4.trans (B stored [k][n]) feeding two mma: D = A . B.
    std::vector<unsigned short> a2(256), b2(256);
    std::vector<float> a2f(256), b2f(256);
    for (int i = 0; i < 256; ++i) {
        a2f[i] = bf2f(a2[i] = f2bf(frand()));
        b2f[i] = bf2f(b2[i] = f2bf(frand()));
    }
    CUdeviceptr a2d = up(a2), b2d = up(b2), d2d = up(std::vector<float>(256, 0.0f));
    r = launch("st_ldmatrix_mma", 1, 32, 0, {&a2d, &b2d, &d2d});
    d = down<float>(d2d, 256);
    worst = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            double want = 0, mag = 0;
            for (int k = 0; k < 16; ++k) {
                want += (double)a2f[i * 16 + k] * b2f[k * 16 + j];
                mag += fabs((double)a2f[i * 16 + k] * b2f[k * 16 + j]);
            }
            worst = std::max(worst, fabs(d[i * 16 + j] - want) / (mag * 1e-6 * 16 + 1e-30));
        }
    check(r == 0 && worst < 1.0, "ldmatrix.x4 + ldmatrix.x4.trans + mma m16n8k16: a 16x16x16 product (worst %.2g of the bound)", worst);

    fresh_context();
    CUdeviceptr x = up(std::vector<float>(32, 0.0f));
    launch("st_mma_partial", 1, 32, 0, {&x});
    CUresult code;
    std::string e = sticky_error(&code);
    check(code == CUDA_ERROR_LAUNCH_FAILED && e.find("st_mma_partial") != std::string::npos,
          "an mma.sync reached by half a warp is a launch failure (%s)", e.c_str());
    fresh_context();
}

// wgmma (emu/tests/wgmma.cu, emu/shim/emu_wgmma.h): the kernels lay out the shared tiles, the
// descriptors and the accumulator fragment from the PTX ISA's documented layouts (written out
// there), with a different value in every element, so a shim that decodes a descriptor field,
// the swizzle or the fragment otherwise fails the product; then what it must refuse.
static void wgmma_primitives() {
    struct Case {
        int mode, n, k, warpgroups, scale_d;
        const char* what;
    } cases[] = {
        {1, 128, 64, 2, 1, "m64n128k16, 128-byte swizzle, two warpgroups, 4 k steps in one swizzle row"},
        {0, 64, 32, 1, 1, "m64n64k16, no swizzle (8x16-byte core matrices, LBO 1024 != SBO 128)"},
        {1, 64, 128, 1, 0, "m64n64k16, 128-byte swizzle, 8 k steps over two 64-wide blocks, scale-d 0 (C ignored)"},
        {2, 64, 64, 1, 1, "m64n64k16, 64-byte swizzle, 4 k steps over two 32-wide blocks"},
        {3, 128, 32, 2, 1, "m64n128k16, 32-byte swizzle, two warpgroups, 2 k steps over two 16-wide blocks"},
    };
    for (const Case& cs : cases) {
        const int M = 64 * cs.warpgroups, N = cs.n, K = cs.k;
        std::vector<unsigned short> a(M * K), b(N * K);
        std::vector<float> af(M * K), bfv(N * K), c(M * N);
        for (int i = 0; i < M * K; ++i) af[i] = bf2f(a[i] = f2bf(frand()));
        for (int i = 0; i < N * K; ++i) bfv[i] = bf2f(b[i] = f2bf(frand()));
        for (float& v : c) v = frand();
        CUdeviceptr da = up(a), db = up(b), dc = up(c), dd = up(std::vector<float>(M * N, 0.0f));
        int mode = cs.mode, n = N, k = K, sd = cs.scale_d;
        const unsigned smem = (unsigned)(M * K * 2 + N * K * 2 + 1024);
        CUresult r = launch("st_wgmma", 1, 128 * cs.warpgroups, smem, {&da, &db, &dc, &dd, &mode, &n, &k, &sd});
        std::vector<float> d = down<float>(dd, M * N);
        double worst = 0;
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < N; ++j) {
                double want = cs.scale_d ? c[i * N + j] : 0.0, mag = fabs(want);
                for (int kk = 0; kk < K; ++kk) {
                    want += (double)af[i * K + kk] * bfv[j * K + kk];
                    mag += fabs((double)af[i * K + kk] * bfv[j * K + kk]);
                }
                const double e = fabs(d[i * N + j] - want) / (mag * 1e-6 * K);
                worst = std::isnan(e) ? 1e30 : std::max(worst, e);
            }
        check(r == 0 && worst < 1.0, "wgmma %s: D = A.B^T + C from the documented layouts (worst %.2g of the bound)", cs.what,
              worst);
        cuMemFree_v2(da);
        cuMemFree_v2(db);
        cuMemFree_v2(dc);
        cuMemFree_v2(dd);
    }

    // MN-major (imm-trans 1) operands: laid out by wgmma.cu's st_off_mn from the ISA's
    // MN-major layouts; the other operand K-major where only one is transposed.
    struct CaseMn {
        int mode, n, k, warpgroups, scale_d, ta, tb, order;
        const char* what;
    } mn_cases[] = {
        {1, 128, 64, 2, 1, 1, 1, 0, "MN-major A and B, 128-byte swizzle, m64n128k16, two warpgroups, B's two atoms LBO 1024 apart, 4 k steps (SBO 2048)"},
        {1, 64, 32, 1, 0, 1, 1, 1, "MN-major A and B, 128-byte swizzle, m64n64k16, k groups adjacent (SBO 1024), scale-d 0"},
        {2, 128, 32, 1, 1, 1, 1, 0, "MN-major A and B, 64-byte swizzle (32-row atoms: A 2, B 4 along m/n, LBO 512; SBO 1024 / 2048)"},
        {3, 64, 48, 2, 1, 1, 1, 1, "MN-major A and B, 32-byte swizzle (16-row atoms, LBO 1536; SBO 256), 3 k steps"},
        {0, 128, 32, 1, 1, 1, 1, 0, "MN-major A and B, no swizzle (8-row core matrices SBO 128, next 8 k LBO 1024 / 2048)"},
        {0, 64, 32, 2, 1, 1, 1, 1, "MN-major A and B, no swizzle, k adjacent (LBO 128, SBO 512), two warpgroups"},
        {1, 64, 64, 1, 1, 1, 0, 0, "MN-major A, K-major B (imm-trans-a 1, imm-trans-b 0), 128-byte swizzle"},
        {1, 128, 64, 2, 1, 0, 1, 1, "K-major A, MN-major B (imm-trans-a 0, imm-trans-b 1), 128-byte swizzle, two warpgroups"},
        {2, 64, 32, 1, 1, 0, 1, 0, "K-major A, MN-major B, 64-byte swizzle"},
    };
    for (const CaseMn& cs : mn_cases) {
        const int M = 64 * cs.warpgroups, N = cs.n, K = cs.k;
        std::vector<unsigned short> a(M * K), b(N * K);
        std::vector<float> af(M * K), bfv(N * K), c(M * N);
        for (int i = 0; i < M * K; ++i) af[i] = bf2f(a[i] = f2bf(frand()));
        for (int i = 0; i < N * K; ++i) bfv[i] = bf2f(b[i] = f2bf(frand()));
        for (float& v : c) v = frand();
        CUdeviceptr da = up(a), db = up(b), dc = up(c), dd = up(std::vector<float>(M * N, 0.0f));
        int mode = cs.mode, n = N, k = K, sd = cs.scale_d, ta = cs.ta, tb = cs.tb, order = cs.order;
        const unsigned smem = (unsigned)(M * K * 2 + N * K * 2 + 1024);
        CUresult r = launch("st_wgmma_mn", 1, 128 * cs.warpgroups, smem,
                            {&da, &db, &dc, &dd, &mode, &n, &k, &sd, &ta, &tb, &order});
        std::vector<float> d = down<float>(dd, M * N);
        double worst = 0;
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < N; ++j) {
                double want = cs.scale_d ? c[i * N + j] : 0.0, mag = fabs(want);
                for (int kk = 0; kk < K; ++kk) {
                    want += (double)af[i * K + kk] * bfv[j * K + kk];
                    mag += fabs((double)af[i * K + kk] * bfv[j * K + kk]);
                }
                const double e = fabs(d[i * N + j] - want) / (mag * 1e-6 * K);
                worst = std::isnan(e) ? 1e30 : std::max(worst, e);
            }
        check(r == 0 && worst < 1.0, "wgmma %s: D = A.B^T + C (worst %.2g of the bound)", cs.what, worst);
        cuMemFree_v2(da);
        cuMemFree_v2(db);
        cuMemFree_v2(dc);
        cuMemFree_v2(dd);
    }

    struct Bad {
        int what;
        unsigned threads;
        const char* expect;
        const char* desc;
    } bad[] = {
        {0, 128, nullptr, "a correct wgmma (the refusals below differ from it in one thing)"},
        {1, 128, "wgmma.fence", "a wgmma without a wgmma.fence before it is a launch failure"},
        {2, 128, "overwritten before wgmma.wait_group", "an operand overwritten before the wgmma.wait_group is a launch failure"},
        {4, 256, "warpgroup", "a wgmma by warps 1-4 (a warpgroup starts at a warp index divisible by 4) is a launch failure"},
        {5, 128, "first row of its", "a 128-byte-swizzled start address in row 1 of its pattern (base offset 0) is a launch failure"},
        {6, 128, "fence.proxy.async", "a wgmma by a thread that never ran fence.proxy.async is a launch failure"},
        {7, 96, "4 complete warps", "a wgmma in a block of 96 threads is a launch failure"},
        {8, 128, "not the start of its", "an MN-major A whose swizzled start is 64 bytes into its pattern is a launch failure (not modelled)"},
        {9, 128, nullptr, "MN-major A and B (imm-trans 1, 1) with 128-byte-swizzled descriptors"},
    };
    CUdeviceptr out = up(std::vector<float>(256, 0.0f));
    for (const Bad& b : bad) {
        fresh_context();
        out = up(std::vector<float>(256, 0.0f));
        int what = b.what;
        CUresult r = launch("st_wgmma_bad", 1, b.threads, 20 * 1024, {&out, &what});
        CUresult code;
        std::string e = sticky_error(&code);
        if (!b.expect) {
            std::vector<float> o = down<float>(out, 128);
            bool ok = true;
            for (float v : o) ok = ok && v == 16.0f;
            check(r == 0 && code == 0 && ok, "%s: every thread's d[0] = 16 (%s)", b.desc, e.c_str());
        } else {
            check(code == CUDA_ERROR_LAUNCH_FAILED && e.find("st_wgmma_bad") != std::string::npos &&
                      e.find(b.expect) != std::string::npos,
                  "%s (%s)", b.desc, e.c_str());
        }
    }
    fresh_context();
    out = up(std::vector<float>(256, 0.0f));
    int what = 3;
    CUresult r = launch("st_wgmma_bad", 1, 128, 20 * 1024, {&out, &what});
    std::vector<float> o = down<float>(out, 128);
    bool all_nan = true;
    for (float v : o) all_nan = all_nan && std::isnan(v);
    check(r == 0 && all_nan, "the accumulators read before wgmma.wait_group are NaN (the results land at the wait)");
    fresh_context();
}

// The capture modes (CUstreamCaptureMode) by the real driver's rule: a thread-local capture
// prohibits "unsafe" calls (synchronous allocation or copy, synchronisation) on its own
// thread only, a global one on every thread, a relaxed one on none; a context
// synchronisation encompasses every capture, so any active one makes it invalid from any
// thread. A refused call invalidates the capture (cuStreamEndCapture then fails).
static void capture_modes() {
    fresh_context();
    CUstream st = nullptr;
    cuStreamCreate(&st, 1);
    // `call` on another thread (the same context current there): its result.
    auto on_other_thread = [](auto call) {
        CUresult r = CUDA_SUCCESS;
        std::thread t([&] {
            cuCtxSetCurrent(g_ctx);
            r = call();
        });
        t.join();
        return r;
    };
    auto alloc_free = [] {
        CUdeviceptr p = 0;
        CUresult r = cuMemAlloc_v2(&p, 256);
        if (!r) r = cuMemFree_v2(p);
        return r;
    };
    auto copy_back = [] {
        CUdeviceptr p = 0;
        CUresult r = cuMemAlloc_v2(&p, 16);
        float h[4] = {1, 2, 3, 4}, back[4] = {};
        if (!r) r = cuMemcpyHtoD_v2(p, h, sizeof h);
        if (!r) r = cuMemcpyDtoH_v2(back, p, sizeof back);
        if (!r && back[3] != 4) r = CUDA_ERROR_UNKNOWN;
        if (p) cuMemFree_v2(p);
        return r;
    };
    // End the capture on `st`: whether it ended valid (a graph).
    auto end_valid = [&] {
        CUgraph g = nullptr;
        CUresult r = cuStreamEndCapture(st, &g);
        if (g) cuGraphDestroy(g);
        return r == CUDA_SUCCESS && g != nullptr;
    };

    // Thread-local (1): another thread's synchronous allocation and copies are allowed and
    // leave the capture valid; the capturing thread's own allocation is refused.
    CUresult r = cuStreamBeginCapture_v2(st, 1);
    CUresult rb_alloc = on_other_thread(alloc_free);
    CUresult rb_copy = on_other_thread(copy_back);
    check(r == CUDA_SUCCESS && rb_alloc == CUDA_SUCCESS && rb_copy == CUDA_SUCCESS && end_valid(),
          "thread-local capture: another thread's synchronous allocation and copies run (%s, %s), the capture stays valid",
          err(rb_alloc).c_str(), err(rb_copy).c_str());
    r = cuStreamBeginCapture_v2(st, 1);
    CUdeviceptr p = 0;
    CUresult ra = cuMemAlloc_v2(&p, 256);
    bool valid = end_valid();
    check(r == CUDA_SUCCESS && ra == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED && !valid,
          "thread-local capture: the capturing thread's synchronous allocation is refused (%s) and invalidates it",
          err(ra).c_str());
    // ... and another thread's context synchronisation, which encompasses the capture.
    r = cuStreamBeginCapture_v2(st, 1);
    CUresult rs = on_other_thread([] { return cuCtxSynchronize(); });
    valid = end_valid();
    check(r == CUDA_SUCCESS && rs == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED && !valid,
          "thread-local capture: another thread's cuCtxSynchronize is refused (%s) and invalidates it", err(rs).c_str());

    // Global (0): another thread's synchronous allocation is refused too.
    r = cuStreamBeginCapture_v2(st, 0);
    rb_alloc = on_other_thread(alloc_free);
    valid = end_valid();
    check(r == CUDA_SUCCESS && rb_alloc == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED && !valid,
          "global capture: another thread's synchronous allocation is refused (%s) and invalidates it",
          err(rb_alloc).c_str());

    // Relaxed (2): synchronous allocation and copies allowed on either thread.
    r = cuStreamBeginCapture_v2(st, 2);
    ra = alloc_free();
    rb_copy = on_other_thread(copy_back);
    check(r == CUDA_SUCCESS && ra == CUDA_SUCCESS && rb_copy == CUDA_SUCCESS && end_valid(),
          "relaxed capture: synchronous allocation and copies run on either thread (%s, %s)", err(ra).c_str(),
          err(rb_copy).c_str());
    cuStreamDestroy_v2(st);
    fresh_context();
}

int main(int, char** argv) {
    // target/cuda-emu/bin/selftest -> target/cuda-emu/test-kernels/{selftest,wmma,pipeline}.so
    std::string self = argv[0];
    size_t s = self.rfind('/');
    std::string dir = (s == std::string::npos ? std::string(".") : self.substr(0, s)) + "/../test-kernels/";
    if (cuInit(0) != 0) {
        printf("FAIL cuInit\n");
        return 1;
    }
    cuDevicePrimaryCtxRetain(&g_ctx, 0);
    cuCtxSetCurrent(g_ctx);
    for (auto [mod, name] : {std::make_pair(&g_mod, "selftest.so"), std::make_pair(&g_wmma, "wmma.so"),
                             std::make_pair(&g_pipe, "pipeline.so"), std::make_pair(&g_mma, "mma.so"),
                             std::make_pair(&g_wgmma, "wgmma.so")}) {
        std::string so = dir + name;
        CUresult r = emuModuleLoadHost(mod, so.c_str());
        if (r) {
            printf("FAIL cannot load %s: %s\n", so.c_str(), err(r).c_str());
            return 1;
        }
    }
    device_queries();
    memory();
    limits();
    barriers();
    warp_ops();
    atomics();
    poison_and_faults();
    host_visible_copies();
    sticky_faults();
    graph_stale_pointers();
    capture_modes();
    ptx_checks();
    wmma_16bit(false);
    wmma_16bit(true);
    wmma_tf32();
    pipeline();
    mma_primitives();
    wgmma_primitives();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
