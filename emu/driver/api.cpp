// The CUDA driver API of the emulated device (libcuda.so): one sm_90 device with 132 SMs
// whose memory is host memory. Every call cudarc's safe and result layers make is
// implemented here (the others answer CUDA_ERROR_NOT_SUPPORTED from stubs.cpp). Work is
// executed when it is enqueued, in stream order, except on a capturing stream, where it is
// recorded for a graph and run by cuGraphLaunch (operations a capture cannot hold are refused
// and invalidate it, as on a GPU), and except the copies a GPU's copy engine would still be
// running: an asynchronous copy from page-locked memory runs when something orders work
// after it, and one into page-locked memory writes it when the host synchronises with it
// (flush_host); a kernel's failure is reported the way a GPU reports it: the launch
// succeeds and the error is sticky, returned by the next call that touches any context's
// work, and by the next context creation (poisoned; CUDA_LAUNCH_BLOCKING=1 returns it from
// the launch itself), and cuGetErrorString explains it, naming the kernel, block and thread.
//
// What it catches like a GPU: zero-byte allocations, copies outside an allocation, block
// and grid limits, __launch_bounds__, shared memory over 48 KiB without the opt-in (227 KiB
// with it), PTX newer than the driver, kernel pointer arguments that are not device
// addresses; and beyond a GPU, a graph replayed through a pointer whose allocation was freed,
// or freed and allocated again, since the capture (allocation ids, check_refs). Fresh
// allocations are filled with 0xFF bytes (NaN in f32/f64); a freed block is handed out
// again to the next allocation of its size, as a GPU's caching allocator does.
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>

#include "emu_internal.h"

namespace emu {

// ---- configuration -------------------------------------------------------------------------

static std::string self_dir() {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&self_dir), &info) && info.dli_fname) {
        std::string p = info.dli_fname;
        size_t s = p.rfind('/');
        if (s != std::string::npos) return p.substr(0, s);
    }
    return ".";
}

const Config& config() {
    static Config* c = [] {
        Config* c = new Config;
        if (const char* s = getenv("EMU_SEED")) {
            if (strcmp(s, "random") == 0) {
                timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                c->seed = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)getpid());
                fprintf(stderr, "emu: EMU_SEED=%llu\n", (unsigned long long)c->seed);
            } else {
                c->seed = strtoull(s, nullptr, 0);
            }
        }
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        c->threads = cpus < 1 ? 1 : cpus > 8 ? 8 : (int)cpus;
        if (const char* s = getenv("EMU_THREADS")) c->threads = atoi(s) > 0 ? atoi(s) : 1;
        if (const char* s = getenv("EMU_STACK_KB")) c->stack_kb = (size_t)(atoi(s) >= 16 ? atoi(s) : 16);
        if (const char* s = getenv("CUDA_LAUNCH_BLOCKING")) c->launch_blocking = strcmp(s, "1") == 0;
        if (const char* s = getenv("EMU_VERBOSE")) c->verbose = strcmp(s, "1") == 0;
        if (const char* s = getenv("EMU_POISON")) c->poison = strcmp(s, "0") != 0;
        if (const char* s = getenv("EMU_WATCHDOG_S")) c->watchdog_s = atof(s) > 0 ? atof(s) : c->watchdog_s;
        if (const char* s = getenv("EMU_KERNEL_DIR"))
            c->kernel_dir = s;
        else
            c->kernel_dir = self_dir() + "/../kernels:" + self_dir() + "/../test-kernels";
#if defined(__SANITIZE_ADDRESS__)
        if (c->stack_kb < 256) c->stack_kb = 256;  // instrumented frames are larger
#endif
        return c;
    }();
    return *c;
}

// ---- error strings -------------------------------------------------------------------------

namespace {
std::mutex g_err_mu;
std::set<std::string> g_strings;  // interned: cuGetErrorString hands out pointers into it
std::unordered_map<int, std::string> g_detail;
thread_local std::unordered_map<int, std::string>* t_detail = nullptr;

const char* intern(const std::string& s) {
    std::lock_guard<std::mutex> g(g_err_mu);
    return g_strings.insert(s).first->c_str();
}
}  // namespace

CUresult report(CUresult code, const std::string& detail) {
    if (code == CUDA_SUCCESS) return code;
    if (!t_detail) t_detail = new std::unordered_map<int, std::string>;
    (*t_detail)[code] = detail;
    {
        std::lock_guard<std::mutex> g(g_err_mu);
        g_detail[code] = detail;
    }
    if (config().verbose && !detail.empty()) fprintf(stderr, "emu: error %d: %s\n", (int)code, detail.c_str());
    return code;
}
CUresult report(const Status& s) { return report(s.code, s.detail); }

static std::string detail_of(int code) {
    if (t_detail) {
        auto it = t_detail->find(code);
        if (it != t_detail->end()) return it->second;
    }
    std::lock_guard<std::mutex> g(g_err_mu);
    auto it = g_detail.find(code);
    return it == g_detail.end() ? std::string() : it->second;
}

// ---- device memory -------------------------------------------------------------------------

Allocations& allocations() {
    static Allocations* a = new Allocations;
    return *a;
}

uint64_t next_allocation_id() {
    static std::atomic<uint64_t> ids{0};
    return ++ids;
}

// The block of `m` holding [p, p + n) (n = 0: p inside it or at its end), or id 0.
static Owner owner_in(const std::map<uintptr_t, Block>& m, uintptr_t p, size_t n) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return Owner{};
    --it;
    size_t off = p - it->first;
    if (off > it->second.size || n > it->second.size - off) return Owner{};
    return Owner{it->first, it->second.size, it->second.id};
}

bool Allocations::contains(uintptr_t p, size_t n) { return owner(p, n).id != 0; }

Owner Allocations::owner(uintptr_t p, size_t n) {
    std::lock_guard<std::mutex> g(mu);
    return owner_in(live, p, n);
}

bool Allocations::find(uintptr_t p, uintptr_t* base, size_t* size) {
    std::lock_guard<std::mutex> g(mu);
    auto it = live.upper_bound(p);
    if (it == live.begin()) return false;
    --it;
    if (p - it->first >= it->second.size) return false;
    *base = it->first;
    *size = it->second.size;
    return true;
}

}  // namespace emu

using namespace emu;

// ---- driver objects ------------------------------------------------------------------------

namespace {

constexpr size_t kReuseBlockMax = (size_t)64 << 20, kReuseMax = (size_t)256 << 20;  // freed blocks kept for reuse
constexpr size_t kMaxSharedDefault = 48 * 1024;
constexpr size_t kMaxSharedOptin = 232448;  // 227 KiB, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN on H100
constexpr int kSMs = 132;
const char* kDeviceName = "ichcam emulated CUDA device (sm_90, 132 SMs, host memory; no GPU)";

struct Context {
    uint32_t magic = 0x63747831;  // "ctx1"
    std::mutex mu;
    unsigned flags = 0;
    size_t limits[16] = {1024, 1 << 20, 8 << 20, 2, 2048, 64, 0, 48 * 1024, 0, 0, 0, 0, 0, 0, 0, 0};
};

struct Graph;

struct Stream {
    uint32_t magic = 0x73746d31;  // "stm1"
    Context* ctx = nullptr;
    std::mutex mu;
    // Stream capture: while `capture` is set, the work enqueued on the stream is recorded
    // into it instead of running; `invalidated` once a forbidden operation broke it.
    Graph* capture = nullptr;
    bool invalidated = false;
    int capture_mode = 0;  // CUstreamCaptureMode: 0 global, 1 thread-local, 2 relaxed
    uint64_t capture_id = 0;
    std::thread::id capture_thread;  // the thread that began the capture
    // Copies from page-locked memory enqueued on this stream and not run yet (deferred
    // copies, see flush_locked): {dst, src, bytes}.
    struct Pending {
        void* dst;
        const void* src;
        size_t n;
    };
    std::vector<Pending> pending;
    uint64_t waits = 0;  // cuStreamWaitEvent calls on this stream
    // Device-to-host copies into page-locked memory whose host-visible write is held back
    // until the host synchronises with them (see flush_host): the bytes were read from the
    // device in stream order at the enqueue. An entry with `dep` set is a cuStreamWaitEvent
    // on this stream: synchronising past it synchronises with `dep` up to `dep_seq` too.
    struct HostWrite {
        uint64_t seq;
        void* dst;
        std::vector<unsigned char> bytes;
        Stream* dep;
        uint64_t dep_seq;
    };
    std::deque<HostWrite> host_writes;
    uint64_t seq = 0;       // numbers host_writes entries and the events recorded here
    bool blocking = true;   // created without CU_STREAM_NON_BLOCKING: the legacy stream syncs it
};

// One recorded operation of a graph, replayed in capture order.
struct Node {
    enum Kind { KERNEL, COPY, MEMSET, HOST } kind = KERNEL;
    // KERNEL: the function, its shape and a copy of each argument's bytes.
    Function* f = nullptr;
    unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
    unsigned shmem = 0;
    std::vector<std::vector<unsigned char>> args;
    // COPY: n bytes from src to dst (device or pinned host addresses).
    void* dst = nullptr;
    const void* src = nullptr;
    size_t n = 0;
    // MEMSET: count elements of `elem` bytes set to `value` at dst.
    uint32_t value = 0;
    unsigned elem = 1;
    // HOST: fn(data).
    CUhostFn fn = nullptr;
    void* data = nullptr;
    // Every pointer the node holds (a kernel's non-null pointer arguments, a copy's
    // destination and source, a memset's destination) with the allocation it fell in at
    // the capture: the replay runs the node only if that same allocation (by id, so not
    // merely some live allocation at that address) still holds it.
    struct Ref {
        int arg = 0;          // kernel parameter index; for a copy or memset kDst or kSrc
        uintptr_t addr = 0;   // the pointer
        bool pinned = false;  // page-locked host memory (a copy's host side), not device memory
        Owner at_capture;     // the allocation that held it at the capture
    };
    static constexpr int kDst = -1, kSrc = -2;
    std::vector<Ref> refs;
};

struct Graph {
    uint32_t magic = 0x67726131;  // "gra1"
    std::vector<Node> nodes;
};

struct GraphExec {
    uint32_t magic = 0x67657831;  // "gex1"
    std::vector<Node> nodes;
};

// Streams capturing, any mode (g_capturing below lists them): "unsafe" calls (synchronous
// allocation, synchronisation, synchronous copies) are checked against them while any is.
std::atomic<int> g_active_captures{0};
std::atomic<uint64_t> g_capture_ids{0};

// Page-locked host memory (cuMemHostAlloc): base -> bytes and allocation id.
std::mutex g_pinned_mu;
std::map<uintptr_t, Block> g_pinned;

// The page-locked allocation holding [p, p + n) (n = 0: p inside it or at its end), or id 0.
Owner pinned_owner(const void* p, size_t n) {
    std::lock_guard<std::mutex> g(g_pinned_mu);
    return owner_in(g_pinned, (uintptr_t)p, n);
}
bool is_pinned(const void* p, size_t n) { return pinned_owner(p, n).id != 0; }

struct Event {
    uint32_t magic = 0x65766e31;  // "evn1"
    double t = 0;
    bool recorded = false;
    Stream* stream = nullptr;  // where it was last recorded (null: the null stream, or never)
    // For the held-back host writes: the stream it was last recorded on (the null stream
    // included; null when never recorded) and that stream's `seq` then.
    Stream* host_stream = nullptr;
    uint64_t seq = 0;
};

struct MemPool {
    uint32_t magic = 0x706f6f31;  // "poo1"
    uint64_t attrs[16] = {0};
};

std::atomic<bool> g_init{false};
Context g_primary;
std::atomic<int> g_primary_refs{0};
MemPool g_default_pool;
Stream g_null_stream;
thread_local Context* t_current = nullptr;

bool valid_ctx(Context* c) { return c && c->magic == 0x63747831; }

double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// The context calls run against: the current one, else the primary.
Context* ctx_now() { return t_current ? t_current : &g_primary; }

// A kernel that faulted (an illegal address, an assert, any launch failure) poisons the
// process's CUDA state, as on a GPU: every later call that touches a context's work (a
// launch, copy, memset, allocation, free, synchronisation, stream or event operation, module
// load, graph operation) in any context, and the creation or retaining of a context, returns
// that same error. Device and context queries still answer. Only cuDevicePrimaryCtxReset
// clears it (on a GPU the process should be restarted; the emulator's self-test resets to
// go on); releasing the primary context does not.
std::mutex g_poison_mu;
std::atomic<int> g_poison{0};
std::string g_poison_detail;

// CUDA_SUCCESS, or the sticky error (with its explanation again).
CUresult poisoned() {
    int s = g_poison.load();
    if (s == 0) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> g(g_poison_mu);
    return report((CUresult)s, g_poison_detail);
}

CUresult check_ready() {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    return poisoned();
}

Stream* stream_of(CUstream s) {
    // 0 (legacy default), 1 (CU_STREAM_LEGACY), 2 (CU_STREAM_PER_THREAD): the null stream.
    if ((uintptr_t)s <= 2) return &g_null_stream;
    Stream* st = reinterpret_cast<Stream*>(s);
    return st->magic == 0x73746d31 ? st : nullptr;
}

// Stream-ordered operations run under their stream's lock: in order with a launch that
// another host thread runs on the same stream.
// Deferred copies: an asynchronous copy from page-locked host memory on a created stream
// does not run when it is enqueued (everything else does) but when something orders work
// after it: the next operation on its stream, a synchronisation of its stream, of an event
// recorded after it or of the context, another stream waiting for such an event
// (cuStreamWaitEvent), a synchronous copy, or a free. So a consumer on another stream that
// does not wait for the copy's event reads the old contents, and a host that overwrites the
// page-locked source before the copy's event completed changes what the copy delivers, as
// on a GPU where the copy engine runs concurrently. EMU_DEFER_COPIES=0 runs them at once.
bool defer_copies() {
    static const bool on = [] {
        const char* e = getenv("EMU_DEFER_COPIES");
        return !(e && e[0] == '0');
    }();
    return on;
}
std::mutex g_streams_mu;
std::set<Stream*> g_streams;  // created streams (deferred copies live only on these)

void flush_locked(Stream* st) {
    for (const Stream::Pending& p : st->pending) memcpy(p.dst, p.src, p.n);
    st->pending.clear();
}
void flush_stream(Stream* st) {
    if (!st) return;
    std::lock_guard<std::mutex> g(st->mu);
    flush_locked(st);
}
// Held-back host writes: an asynchronous device-to-host copy into page-locked memory on a
// created stream reads the device memory when it is enqueued (in stream order) but its
// destination keeps its old bytes until the host synchronises with the copy: a
// synchronisation of its stream (cuStreamSynchronize, a cuStreamQuery that succeeds), of
// an event recorded on its stream after it (cuEventSynchronize, cuEventQuery), of a stream
// that waited for such an event, of the context, or a synchronous copy or a free that
// orders after it. An event that was never recorded synchronises with nothing. So a host
// that reads the destination without that synchronisation reads the old value, as on a GPU
// whose copy engine has not written it yet. EMU_DEFER_COPIES=0 writes at once.
//
// Makes the host writes of `st` up to `upto` (its seq numbering) visible, with those of the
// streams it waited for before that point. The caller must hold no stream's lock.
void flush_host(Stream* st, uint64_t upto) {
    if (!st) return;
    std::vector<std::pair<Stream*, uint64_t>> deps;
    {
        std::lock_guard<std::mutex> g(st->mu);
        while (!st->host_writes.empty() && st->host_writes.front().seq <= upto) {
            Stream::HostWrite& w = st->host_writes.front();
            if (w.dep)
                deps.emplace_back(w.dep, w.dep_seq);
            else if (!w.bytes.empty())
                memcpy(w.dst, w.bytes.data(), w.bytes.size());
            st->host_writes.pop_front();
        }
    }
    // Entries are removed before their dependencies are followed: a cycle of waits ends.
    for (auto& d : deps) flush_host(d.first, d.second);
}
void flush_host_all(Stream* st) { flush_host(st, UINT64_MAX); }

std::vector<Stream*> created_streams() {
    std::lock_guard<std::mutex> g(g_streams_mu);
    return std::vector<Stream*>(g_streams.begin(), g_streams.end());
}

// The legacy default stream waits for the work of every blocking stream: synchronising
// it (or an event recorded on it) makes their host writes visible.
void flush_host_legacy() {
    flush_host_all(&g_null_stream);
    for (Stream* st : created_streams())
        if (st->blocking) flush_host_all(st);
}

// Runs every deferred copy and, unless `host` is false, makes every held-back host write
// visible (a synchronisation of the device). The caller must hold no stream's lock: this
// takes each stream's in turn.
void flush_all(bool host = true) {
    std::vector<Stream*> all = created_streams();
    for (Stream* st : all) flush_stream(st);
    if (!host) return;
    flush_host_all(&g_null_stream);
    for (Stream* st : all) flush_host_all(st);
}

// Stream-ordered operations run under their stream's lock, after the stream's deferred
// copies: in order with a launch that another host thread runs on the same stream.
#define EMU_ON_STREAM(s)                                                      \
    Stream* st_ = stream_of(s);                                               \
    if (!st_) return report(CUDA_ERROR_INVALID_HANDLE, "not a stream handle"); \
    std::lock_guard<std::mutex> stream_guard_(st_->mu);                       \
    flush_locked(st_)

// A launch failure on `c`'s behalf: the process's sticky error from now on (see poisoned).
void set_sticky(Context* c, const Status& s) {
    (void)c;
    std::lock_guard<std::mutex> g(g_poison_mu);
    if (g_poison.load() == 0) {
        g_poison_detail = s.detail;
        g_poison = (int)s.code;
    }
}

CUresult check_range(CUdeviceptr p, size_t n, const char* what) {
    if (n == 0) return CUDA_SUCCESS;
    if (!allocations().contains((uintptr_t)p, n)) {
        char b[200];
        snprintf(b, sizeof b, "%s: [0x%llx, +%zu bytes) is not inside one live device allocation", what, (unsigned long long)p, n);
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    return CUDA_SUCCESS;
}

CUresult alloc(CUdeviceptr* out, size_t bytes, const char* what) {
    if (!out) return report(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": null result pointer");
    if (bytes == 0) return report(CUDA_ERROR_INVALID_VALUE, std::string(what) + " of 0 bytes (a GPU refuses zero-length allocations)");
    void* p = nullptr;
    size_t rounded = (bytes + 255) & ~(size_t)255;
    {
        Allocations& a = allocations();
        std::lock_guard<std::mutex> g(a.mu);
        auto it = a.reuse.find(rounded);
        if (it != a.reuse.end() && !it->second.empty()) {
            p = it->second.back();
            it->second.pop_back();
            a.reuse_bytes -= rounded;
        }
    }
    if (!p && (posix_memalign(&p, 256, rounded) != 0 || !p)) {
        char b[120];
        snprintf(b, sizeof b, "%s of %zu bytes: host memory exhausted", what, bytes);
        return report(CUDA_ERROR_OUT_OF_MEMORY, b);
    }
    // 0xFF bytes: NaN in f32 and f64, so a kernel that reads what nobody wrote shows it.
    if (config().poison) memset(p, 0xff, rounded);
    {
        Allocations& a = allocations();
        std::lock_guard<std::mutex> g(a.mu);
        a.live[(uintptr_t)p] = Block{bytes, next_allocation_id()};
        a.bytes_in_use += bytes;
    }
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p, const char* what) {
    size_t bytes = 0;
    {
        Allocations& a = allocations();
        std::lock_guard<std::mutex> g(a.mu);
        auto it = a.live.find((uintptr_t)p);
        if (it == a.live.end()) {
            char b[160];
            snprintf(b, sizeof b, "%s(0x%llx): not the start of a live device allocation (double free?)", what,
                     (unsigned long long)p);
            return report(CUDA_ERROR_INVALID_VALUE, b);
        }
        bytes = it->second.size;
        a.bytes_in_use -= bytes;
        a.live.erase(it);
    }
    if (config().poison) memset(reinterpret_cast<void*>(p), 0xff, bytes);
#if !defined(__SANITIZE_ADDRESS__)
    // Kept for the next allocation of its size (see Allocations::reuse), up to 64 MiB a
    // block and 256 MiB in all.
    size_t rounded = (bytes + 255) & ~(size_t)255;
    if (rounded <= kReuseBlockMax) {
        Allocations& a = allocations();
        std::lock_guard<std::mutex> g(a.mu);
        if (a.reuse_bytes + rounded <= kReuseMax) {
            a.reuse[rounded].push_back(reinterpret_cast<void*>(p));
            a.reuse_bytes += rounded;
            return CUDA_SUCCESS;
        }
    }
#endif
    free(reinterpret_cast<void*>(p));
    return CUDA_SUCCESS;
}

size_t host_memory() {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (size_t)pages * (size_t)page : (size_t)16 << 30;
}

Function* function_of(CUfunction f) {
    Function* fn = reinterpret_cast<Function*>(f);
    return fn && fn->magic == 0x66756e31 ? fn : nullptr;
}

// The PTX ISA a CUDA 13.0 driver reads.
constexpr int kPtxMajor = 9, kPtxMinor = 0;

std::string param_desc(const emu_param_t& p) {
    static const char* kinds[] = {"integer", "floating-point", "pointer", "struct"};
    char b[80];
    snprintf(b, sizeof b, "%u-byte %s", p.size, kinds[p.kind < 4 ? p.kind : 3]);
    return b;
}

CUresult load_ptx(CUmodule* out, const char* text) {
    if (!out || !text) return report(CUDA_ERROR_INVALID_VALUE, "cuModuleLoadData: null argument");
    if ((unsigned char)text[0] == 0x7f && text[1] == 'E' && text[2] == 'L' && text[3] == 'F')
        return report(CUDA_ERROR_INVALID_IMAGE, "cubin images cannot be emulated: pass PTX (the emulator maps PTX entries to host-compiled kernels)");
    PtxModule ptx;
    Status s = parse_ptx(text, &ptx);
    if (!s.ok()) return report(s);
    if (ptx.version_major > kPtxMajor || (ptx.version_major == kPtxMajor && ptx.version_minor > kPtxMinor)) {
        char b[200];
        snprintf(b, sizeof b, "PTX ISA %d.%d is newer than this driver's %d.%d (CUDA 13.0): NVRTC newer than the driver",
                 ptx.version_major, ptx.version_minor, kPtxMajor, kPtxMinor);
        return report(CUDA_ERROR_UNSUPPORTED_PTX_VERSION, b);
    }
    if (ptx.target_sm > 90) {
        char b[120];
        snprintf(b, sizeof b, "PTX for sm_%d cannot run on an sm_90 device", ptx.target_sm);
        return report(CUDA_ERROR_NO_BINARY_FOR_GPU, b);
    }
    HostModule* hm = nullptr;
    s = find_host_module(ptx, &hm);
    if (!s.ok()) return report(s);
    Module* m = new Module;
    m->host = hm;
    for (const PtxEntry& e : ptx.entries) {
        const emu_kernel_t* k = host_kernel(hm, e.name);
        if ((int)e.params.size() != k->nparams) {
            char b[300];
            snprintf(b, sizeof b, "kernel `%s`: the PTX has %zu parameters, the host build %d: the emulator is stale (scripts/cuda-emu.sh build)",
                     e.name.c_str(), e.params.size(), k->nparams);
            delete m;
            return report(CUDA_ERROR_INVALID_IMAGE, b);
        }
        for (int i = 0; i < k->nparams; ++i) {
            const PtxParam& p = e.params[i];
            const emu_param_t& h = k->params[i];
            bool ok = p.size == h.size && (p.is_float == (h.kind == EMU_PARAM_FLOAT));
            if (!ok) {
                char b[300];
                snprintf(b, sizeof b, "kernel `%s` parameter %d: .%s (%u bytes) in the PTX but a %s in the host build: the emulator is stale",
                         e.name.c_str(), i, p.type.c_str(), p.size, param_desc(h).c_str());
                delete m;
                return report(CUDA_ERROR_INVALID_IMAGE, b);
            }
        }
        Function* f = new Function;
        f->module = m;
        f->name = e.name;
        f->ptx = e;
        f->kernel = k;
        f->max_dyn_shared = (int)(kMaxSharedDefault - std::min(kMaxSharedDefault, e.static_shared));
        m->functions.push_back(f);
    }
    if (config().verbose)
        fprintf(stderr, "emu: loaded PTX %d.%d sm_%d with %zu kernels from %s\n", ptx.version_major, ptx.version_minor, ptx.target_sm,
                ptx.entries.size(), hm->path.c_str());
    *out = reinterpret_cast<CUmodule>(m);
    return CUDA_SUCCESS;
}

// EMU_PROFILE=1: time per kernel, printed at exit (where the emulator spends its time).
struct Prof {
    double seconds = 0;
    uint64_t launches = 0, blocks = 0, threads = 0;
    bool fibers = false;
};
std::mutex g_prof_mu;
std::map<std::string, Prof>* g_prof = nullptr;

void print_profile() {
    std::lock_guard<std::mutex> g(g_prof_mu);
    std::vector<std::pair<std::string, Prof>> v(g_prof->begin(), g_prof->end());
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    double total = 0;
    for (auto& e : v) total += e.second.seconds;
    fprintf(stderr, "emu profile: %.2f s in kernels\n%-28s %9s %9s %12s %14s %6s\n", total, "kernel", "seconds", "launches",
            "blocks", "threads", "mode");
    for (auto& e : v)
        fprintf(stderr, "%-28s %9.3f %9llu %12llu %14llu %6s\n", e.first.c_str(), e.second.seconds,
                (unsigned long long)e.second.launches, (unsigned long long)e.second.blocks, (unsigned long long)e.second.threads,
                e.second.fibers ? "fibers" : "direct");
}

void profile(const Function* f, const Launch& L, double seconds) {
    std::lock_guard<std::mutex> g(g_prof_mu);
    if (!g_prof) {
        g_prof = new std::map<std::string, Prof>;
        atexit(print_profile);
    }
    Prof& p = (*g_prof)[f->name];
    p.seconds += seconds;
    p.launches++;
    uint64_t blocks = (uint64_t)L.grid[0] * L.grid[1] * L.grid[2];
    p.blocks += blocks;
    p.threads += blocks * L.block[0] * L.block[1] * L.block[2];
    p.fibers = f->ptx.collective;
}

// The error of an operation on a stream whose capture a forbidden operation invalidated.
CUresult capture_invalidated(const char* what) {
    return report(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                  std::string(what) + ": the stream's capture was invalidated by an operation not permitted during capture; "
                                      "end it (cuStreamEndCapture) and capture again");
}

// An operation a capturing stream cannot record: it invalidates the capture (as on a GPU).
CUresult capture_forbid(Stream* st, const std::string& what) {
    st->invalidated = true;
    return report(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                  what + " is not permitted while the stream is capturing a graph (the capture is now invalidated)");
}

// A "potentially unsafe" call (synchronous allocation or copy, a synchronisation) while
// streams capture, by the real driver's rule (CUDA programming guide, "Prohibited and
// Unhandled Operations"; cuThreadExchangeStreamCaptureMode): the calling thread (whose
// interaction mode is the default, global) is prohibited from it while it has a capture of
// its own begun in global or thread-local mode, or while any thread has one begun in global
// mode; a relaxed capture prohibits nothing, and a thread-local capture on another thread is
// ignored. Refused with the prohibiting captures invalidated. `encompassing` (a context
// synchronisation): a handle that encompasses every stream, so any active capture (any mode,
// any thread) makes it invalid, and it invalidates them all.
std::vector<Stream*> g_capturing;  // guarded by g_pinned_mu (a small global lock)
CUresult refuse_if_capturing(const char* what, bool encompassing = false) {
    if (g_active_captures.load() == 0) return CUDA_SUCCESS;
    const std::thread::id me = std::this_thread::get_id();
    bool refused = false;
    {
        std::lock_guard<std::mutex> g(g_pinned_mu);
        for (Stream* s : g_capturing) {
            bool prohibits = encompassing || s->capture_mode == 0 || (s->capture_mode == 1 && s->capture_thread == me);
            if (prohibits) {
                s->invalidated = true;
                refused = true;
            }
        }
    }
    if (!refused) return CUDA_SUCCESS;
    return report(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                  std::string(what) +
                      (encompassing ? " is not permitted while any stream is capturing a graph (it encompasses the capture)"
                                    : " is not permitted while this thread captures a graph (global or thread-local mode) "
                                      "or another thread captures one in global mode") +
                      "; the capture is now invalidated");
}

// Runs one kernel launch now on `c`'s behalf; a failure becomes the context's sticky error.
// A pointer a captured node holds, with the allocation holding [p, p + n) now (device
// memory, else page-locked host memory; n = 0: p inside it or at its end).
Node::Ref capture_ref(int arg, const void* p, size_t n) {
    Node::Ref r;
    r.arg = arg;
    r.addr = (uintptr_t)p;
    r.at_capture = allocations().owner(r.addr, n);
    if (r.at_capture.id == 0) {
        r.pinned = true;
        r.at_capture = pinned_owner(p, n);
    }
    return r;
}

// Node i of a graph at replay: CUDA_SUCCESS when every pointer it holds still lies in the
// allocation it fell in at the capture (one lookup per pointer; ids are never reused, so the
// same id is the same base and size, and the capture checked the range against it), else
// CUDA_ERROR_ILLEGAL_ADDRESS naming the node, its operation and the pointer: freed since the
// capture, or freed and its memory allocated again (a stale pointer into someone else's
// buffer, which a GPU's replay would silently read or write).
Status check_refs(const Node& nd, size_t i) {
    for (const Node::Ref& r : nd.refs) {
        Owner now = r.pinned ? pinned_owner(reinterpret_cast<const void*>(r.addr), 0) : allocations().owner(r.addr, 0);
        if (now.id != 0 && now.id == r.at_capture.id) continue;
        char what[400], b[1000];
        const char* mem = r.pinned ? "page-locked host" : "device";
        if (nd.kind == Node::KERNEL) {
            bool named = nd.f->has_ptx && r.arg < (int)nd.f->ptx.params.size();
            snprintf(what, sizeof what, "node %zu (kernel `%s`): pointer argument %d%s%s%s 0x%llx", i, nd.f->name.c_str(), r.arg,
                     named ? " (" : "", named ? nd.f->ptx.params[r.arg].name.c_str() : "", named ? ")" : "",
                     (unsigned long long)r.addr);
        } else {
            snprintf(what, sizeof what, "node %zu (a %s of %zu bytes): its %s 0x%llx", i, nd.kind == Node::COPY ? "copy" : "memset",
                     nd.n * (nd.kind == Node::MEMSET ? nd.elem : 1), r.arg == Node::kDst ? "destination" : "source",
                     (unsigned long long)r.addr);
        }
        const Owner& was = r.at_capture;
        if (now.id == 0)
            snprintf(b, sizeof b,
                     "graph replay: %s is no longer inside a live %s allocation: allocation #%llu [0x%llx, +%zu bytes) that held "
                     "it at the capture was freed since the capture",
                     what, mem, (unsigned long long)was.id, (unsigned long long)was.base, was.size);
        else
            snprintf(b, sizeof b,
                     "graph replay: %s lies in %s allocation #%llu [0x%llx, +%zu bytes), not in allocation #%llu [0x%llx, +%zu "
                     "bytes) that held it at the capture: that one was freed and its memory allocated again (the graph holds a "
                     "stale pointer; on a GPU the replay would read or write the new buffer)",
                     what, mem, (unsigned long long)now.id, (unsigned long long)now.base, now.size, (unsigned long long)was.id,
                     (unsigned long long)was.base, was.size);
        return Status::fail(CUDA_ERROR_ILLEGAL_ADDRESS, b);
    }
    return Status{};
}

CUresult run_launch(Context* c, Launch& L) {
    static const bool prof = getenv("EMU_PROFILE") && strcmp(getenv("EMU_PROFILE"), "1") == 0;
    double t0 = prof ? now_s() : 0;
    Status failure = execute(L);
    if (prof) profile(L.f, L, now_s() - t0);
    if (!failure.ok()) {
        set_sticky(c, failure);
        if (config().verbose || getenv("EMU_QUIET") == nullptr)
            fprintf(stderr, "emu: launch failed: %s\n", failure.detail.c_str());
        if (config().launch_blocking) return report(failure);
    }
    return CUDA_SUCCESS;
}

CUresult launch(CUfunction func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shmem,
                CUstream hs, void** params, void** extra, bool cooperative) {
    CUresult r = check_ready();
    if (r) return r;
    Function* f = function_of(func);
    if (!f) return report(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: not a function handle");
    Stream* st = stream_of(hs);
    if (!st) return report(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: not a stream handle");
    const std::string& name = f->name;
    char b[400];
    if (extra) return report(CUDA_ERROR_NOT_SUPPORTED, "kernel `" + name + "`: arguments through `extra` are not emulated");
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0) {
        snprintf(b, sizeof b, "kernel `%s`: a zero grid or block dimension (grid %u,%u,%u block %u,%u,%u)", name.c_str(), gx, gy, gz, bx, by, bz);
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    uint64_t threads = (uint64_t)bx * by * bz;
    if (bx > 1024 || by > 1024 || bz > 64 || threads > 1024) {
        snprintf(b, sizeof b, "kernel `%s`: block %ux%ux%u exceeds the limits (1024 threads, 1024x1024x64)", name.c_str(), bx, by, bz);
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    if (gx > 2147483647u || gy > 65535 || gz > 65535) {
        snprintf(b, sizeof b, "kernel `%s`: grid %ux%ux%u exceeds the limits (2^31-1 x 65535 x 65535)", name.c_str(), gx, gy, gz);
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    if (f->ptx.maxntid && threads > f->ptx.maxntid) {
        snprintf(b, sizeof b, "kernel `%s`: %llu threads per block but __launch_bounds__ (.maxntid) allows %u", name.c_str(),
                 (unsigned long long)threads, f->ptx.maxntid);
        // INVALID_VALUE, as an H200 (driver 580) answered (2026-12-04), not OUT_OF_RESOURCES.
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    if (f->ptx.reqntid[0] && (bx != f->ptx.reqntid[0] || by != f->ptx.reqntid[1] || bz != f->ptx.reqntid[2])) {
        snprintf(b, sizeof b, "kernel `%s`: block %ux%ux%u but .reqntid is %ux%ux%u", name.c_str(), bx, by, bz, f->ptx.reqntid[0],
                 f->ptx.reqntid[1], f->ptx.reqntid[2]);
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    if (shmem > (unsigned)f->max_dyn_shared || f->ptx.static_shared + shmem > kMaxSharedOptin) {
        snprintf(b, sizeof b,
                 "kernel `%s`: %u bytes of dynamic shared memory (+%zu static) exceed the limit of %d (48 KiB in all unless "
                 "raised with cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES), at most 227 KiB)",
                 name.c_str(), shmem, f->ptx.static_shared, f->max_dyn_shared);
        return report(CUDA_ERROR_INVALID_VALUE, b);
    }
    if (shmem > 0 && f->module->host->m->ndyn_shared == 0 && f->has_ptx && f->ptx.dyn_shared) {
        return report(CUDA_ERROR_INVALID_IMAGE, "kernel `" + name + "`: the host build has no dynamic shared array (stale emulator)");
    }
    if (cooperative && (uint64_t)gx * gy * gz > (uint64_t)kSMs * (2048 / threads)) {
        snprintf(b, sizeof b, "kernel `%s`: a cooperative grid of %llu blocks cannot be co-resident on 132 SMs", name.c_str(),
                 (unsigned long long)gx * gy * gz);
        return report(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, b);
    }
    const emu_kernel_t* k = f->kernel;
    if (k->nparams > 0 && !params) return report(CUDA_ERROR_INVALID_VALUE, "kernel `" + name + "`: no kernelParams");
    for (int i = 0; i < k->nparams; ++i)
        if (!params[i]) {
            snprintf(b, sizeof b, "kernel `%s`: kernelParams[%d] is null", name.c_str(), i);
            return report(CUDA_ERROR_INVALID_VALUE, b);
        }
    Context* c = st->ctx ? st->ctx : ctx_now();
    Status failure;
    // A pointer argument that is not a device address faults on a GPU when dereferenced.
    for (int i = 0; i < k->nparams && failure.ok(); ++i) {
        if (k->params[i].kind != EMU_PARAM_POINTER) continue;
        uint64_t v;
        memcpy(&v, params[i], 8);
        if (v != 0 && !allocations().contains((uintptr_t)v, 0)) {
            snprintf(b, sizeof b,
                     "kernel `%s`: pointer argument %d%s%s%s is 0x%llx, not inside a live device allocation (freed, a host "
                     "address, or an argument of the wrong kind or position)",
                     name.c_str(), i, f->has_ptx ? " (" : "", f->has_ptx ? f->ptx.params[i].name.c_str() : "", f->has_ptx ? ")" : "",
                     (unsigned long long)v);
            failure = Status::fail(CUDA_ERROR_ILLEGAL_ADDRESS, b);
        }
    }
    if (failure.ok()) {
        std::lock_guard<std::mutex> g(st->mu);
        if (st->capture) {
            if (st->invalidated) return capture_invalidated("cuLaunchKernel");
            Node nd;
            nd.kind = Node::KERNEL;
            nd.f = f;
            nd.grid[0] = gx, nd.grid[1] = gy, nd.grid[2] = gz;
            nd.block[0] = bx, nd.block[1] = by, nd.block[2] = bz;
            nd.shmem = shmem;
            for (int i = 0; i < k->nparams; ++i) {
                const unsigned char* a = static_cast<const unsigned char*>(params[i]);
                nd.args.emplace_back(a, a + k->params[i].size);
                if (k->params[i].kind != EMU_PARAM_POINTER) continue;
                uint64_t v;
                memcpy(&v, params[i], 8);
                if (v != 0) nd.refs.push_back(capture_ref(i, reinterpret_cast<const void*>(v), 0));
            }
            st->capture->nodes.push_back(std::move(nd));
            return CUDA_SUCCESS;
        }
        Launch L;
        L.f = f;
        L.grid[0] = gx;
        L.grid[1] = gy;
        L.grid[2] = gz;
        L.block[0] = bx;
        L.block[1] = by;
        L.block[2] = bz;
        L.dyn_shared = shmem;
        L.args = params;
        L.ordinal = __atomic_fetch_add(&f->launches, 1, __ATOMIC_RELAXED);
        return run_launch(c, L);
    }
    if (!failure.ok()) {
        set_sticky(c, failure);
        if (config().verbose || getenv("EMU_QUIET") == nullptr)
            fprintf(stderr, "emu: launch failed: %s\n", failure.detail.c_str());
        if (config().launch_blocking) return report(failure);
    }
    return CUDA_SUCCESS;
}

CUresult copy(void* dst, const void* src, size_t n) {
    if (n) memmove(dst, src, n);
    return CUDA_SUCCESS;
}

}  // namespace

// ==== the API ===============================================================================

CUDAAPI CUresult cuInit(unsigned int flags) {
    if (flags != 0) return report(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0");
    (void)config();
    install_fault_handler();
    g_init = true;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDriverGetVersion(int* v) {
    if (!v) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *v = 13000;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuGetErrorName(CUresult e, const char** out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = nullptr;
    for (const auto& n : kCudaErrorNames)
        if (n.code == (int)e) {
            *out = n.name;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_INVALID_VALUE;
}

CUDAAPI CUresult cuGetErrorString(CUresult e, const char** out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    static const struct {
        int code;
        const char* text;
    } texts[] = {{0, "no error"},
                 {1, "invalid argument"},
                 {2, "out of memory"},
                 {3, "initialization error"},
                 {100, "no CUDA-capable device is detected"},
                 {101, "invalid device ordinal"},
                 {200, "device kernel image is invalid"},
                 {201, "invalid device context"},
                 {209, "no kernel image is available for execution on the device"},
                 {218, "a PTX JIT compilation failed"},
                 {222, "the provided PTX was compiled with an unsupported toolchain."},
                 {302, "shared object symbol not found"},
                 {303, "shared object initialization failed"},
                 {400, "invalid resource handle"},
                 {500, "named symbol not found"},
                 {600, "device not ready"},
                 {700, "an illegal memory access was encountered"},
                 {701, "too many resources requested for launch"},
                 {702, "the launch timed out and was terminated"},
                 {710, "device-side assert triggered"},
                 {719, "unspecified launch failure"},
                 {720, "too many blocks in cooperative launch"},
                 {801, "operation not supported"},
                 {999, "unknown error"}};
    const char* base = nullptr;
    for (const auto& t : texts)
        if (t.code == (int)e) base = t.text;
    if (!base) {
        const char* name = nullptr;
        if (cuGetErrorName(e, &name) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
        base = name;
    }
    std::string d = detail_of((int)e);
    *out = d.empty() ? base : intern(std::string(base) + " [cuda-emu: " + d + "]");
    return CUDA_SUCCESS;
}

// ---- device --------------------------------------------------------------------------------

CUDAAPI CUresult cuDeviceGetCount(int* n) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!n) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *n = 1;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!d) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (ordinal != 0) return report(CUDA_ERROR_INVALID_DEVICE, "the emulator has one device, ordinal 0");
    *d = 0;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!name || len <= 0) return report(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetName: bad buffer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    snprintf(name, (size_t)len, "%s", kDeviceName);
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceGetUuid(CUuuid* u, CUdevice d) {
    if (!u) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    memcpy(u->bytes, "ichcam-cuda-emu0", 16);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuDeviceGetUuid_v2(CUuuid* u, CUdevice d) { return cuDeviceGetUuid(u, d); }

CUDAAPI CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    *bytes = host_memory();
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!v) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    int r = 0;
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: r = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: r = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: r = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: r = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: r = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: r = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: r = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: r = 49152; break;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: r = 65536; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: r = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_PITCH: r = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: r = 65536; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: r = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: r = 512; break;
        case CU_DEVICE_ATTRIBUTE_GPU_OVERLAP: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: r = kSMs; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: r = 2619000; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: r = 5120; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: r = 52428800; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: r = 2048; break;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: r = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: r = 0; break;
        case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: r = 233472; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: r = 65536; break;
        case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: r = 0; break;
        case CU_DEVICE_ATTRIBUTE_SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO: r = 2; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: r = (int)kMaxSharedOptin; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: r = 32; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: r = 1; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: r = 0; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: r = 0; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: r = 0; break;
        default:
            if ((int)a <= 0 || (int)a >= (int)CU_DEVICE_ATTRIBUTE_MAX)
                return report(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute: unknown attribute");
            r = 0;
    }
    *v = r;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceComputeCapability(int* major, int* minor, CUdevice d) {
    if (!major || !minor) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    *major = 9;
    *minor = 0;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceCanAccessPeer(int* can, CUdevice, CUdevice) {
    if (!can) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *can = 0;
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* p, CUdevice d) {
    if (!p) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    *p = reinterpret_cast<CUmemoryPool>(&g_default_pool);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuDeviceGetMemPool(CUmemoryPool* p, CUdevice d) { return cuDeviceGetDefaultMemPool(p, d); }
CUDAAPI CUresult cuDeviceSetMemPool(CUdevice d, CUmemoryPool) {
    return d == 0 ? CUDA_SUCCESS : report(CUDA_ERROR_INVALID_DEVICE, "no such device");
}

CUDAAPI CUresult cuMemPoolSetAttribute(CUmemoryPool p, CUmemPool_attribute a, void* v) {
    MemPool* mp = reinterpret_cast<MemPool*>(p);
    if (!mp || mp->magic != 0x706f6f31 || !v || (int)a <= 0 || (int)a >= 16) return report(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute");
    if (a == CU_MEMPOOL_ATTR_RELEASE_THRESHOLD || a >= CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        memcpy(&mp->attrs[a], v, 8);
    else
        mp->attrs[a] = (uint64_t) * static_cast<int*>(v);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemPoolGetAttribute(CUmemoryPool p, CUmemPool_attribute a, void* v) {
    MemPool* mp = reinterpret_cast<MemPool*>(p);
    if (!mp || mp->magic != 0x706f6f31 || !v || (int)a <= 0 || (int)a >= 16) return report(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute");
    uint64_t r = mp->attrs[a];
    if (a == CU_MEMPOOL_ATTR_USED_MEM_CURRENT || a == CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT) {
        std::lock_guard<std::mutex> g(allocations().mu);
        r = allocations().bytes_in_use;
    }
    if (a == CU_MEMPOOL_ATTR_RELEASE_THRESHOLD || a >= CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        memcpy(v, &r, 8);
    else
        *static_cast<int*>(v) = (int)r;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return CUDA_SUCCESS; }

// ---- contexts ------------------------------------------------------------------------------

CUDAAPI CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!c) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    if (CUresult r = poisoned()) return r;
    g_primary_refs++;
    *c = reinterpret_cast<CUcontext>(&g_primary);
    return CUDA_SUCCESS;
}

// Releasing the last reference destroys the primary context, but a sticky error stays (an
// H200 answered the next retain with it); only a reset clears it (see poisoned).
CUDAAPI CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    if (g_primary_refs.load() <= 0) return report(CUDA_ERROR_INVALID_CONTEXT, "primary context released more often than retained");
    --g_primary_refs;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuDevicePrimaryCtxReset_v2(CUdevice d) {
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    flush_all();  // the work in flight completes first
    std::lock_guard<std::mutex> g(g_poison_mu);
    g_poison = 0;
    g_poison_detail.clear();
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned* flags, int* active) {
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    if (flags) *flags = g_primary.flags;
    if (active) *active = g_primary_refs.load() > 0;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned flags) {
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    g_primary.flags = flags;
    return CUDA_SUCCESS;
}

static CUresult create_ctx(CUcontext* out, unsigned flags, CUdevice d) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!out) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (d != 0) return report(CUDA_ERROR_INVALID_DEVICE, "no such device");
    if (CUresult r = poisoned()) return r;
    Context* c = new Context;
    c->flags = flags;
    t_current = c;
    *out = reinterpret_cast<CUcontext>(c);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxCreate_v2(CUcontext* c, unsigned flags, CUdevice d) { return create_ctx(c, flags, d); }
CUDAAPI CUresult cuCtxCreate_v3(CUcontext* c, void*, int, unsigned flags, CUdevice d) { return create_ctx(c, flags, d); }
CUDAAPI CUresult cuCtxCreate_v4(CUcontext* c, void*, unsigned flags, CUdevice d) { return create_ctx(c, flags, d); }
CUDAAPI CUresult cuCtxDestroy_v2(CUcontext c) {
    Context* x = reinterpret_cast<Context*>(c);
    if (!valid_ctx(x)) return report(CUDA_ERROR_INVALID_CONTEXT, "cuCtxDestroy: not a context");
    if (t_current == x) t_current = nullptr;
    if (x != &g_primary) x->magic = 0;  // leaked on purpose: handles may still be around
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    if (!c) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *c = reinterpret_cast<CUcontext>(t_current);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxSetCurrent(CUcontext c) {
    if (!g_init) return report(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    Context* x = reinterpret_cast<Context*>(c);
    if (x && !valid_ctx(x)) return report(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: not a context");
    t_current = x;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
CUDAAPI CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = reinterpret_cast<CUcontext>(t_current);
    t_current = nullptr;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *d = 0;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxSynchronize() {
    CUresult r = refuse_if_capturing("cuCtxSynchronize", true);
    if (!r) flush_all();
    return r ? r : check_ready();
}
CUDAAPI CUresult cuCtxGetLimit(size_t* v, CUlimit l) {
    if (!v || (int)l < 0 || (int)l >= 16) return report(CUDA_ERROR_INVALID_VALUE, "cuCtxGetLimit");
    *v = ctx_now()->limits[l];
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxSetLimit(CUlimit l, size_t v) {
    if ((int)l < 0 || (int)l >= 16) return report(CUDA_ERROR_INVALID_VALUE, "cuCtxSetLimit");
    ctx_now()->limits[l] = v;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxGetCacheConfig(CUfunc_cache* c) {
    if (!c) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *c = (CUfunc_cache)0;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxSetCacheConfig(CUfunc_cache) { return CUDA_SUCCESS; }
CUDAAPI CUresult cuCtxSetFlags(unsigned flags) {
    ctx_now()->flags = flags;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxGetFlags(unsigned* flags) {
    if (!flags) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *flags = ctx_now()->flags;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuCtxGetApiVersion(CUcontext, unsigned* v) {
    if (!v) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *v = 13000;
    return CUDA_SUCCESS;
}

// ---- streams and events --------------------------------------------------------------------

CUDAAPI CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    CUresult r = check_ready();
    if (r) return r;
    if (!s) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    Stream* st = new Stream;
    st->ctx = ctx_now();
    st->blocking = (flags & 1) == 0;  // CU_STREAM_NON_BLOCKING = 1
    {
        std::lock_guard<std::mutex> g(g_streams_mu);
        g_streams.insert(st);
    }
    *s = reinterpret_cast<CUstream>(st);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) { return cuStreamCreate(s, flags); }
CUDAAPI CUresult cuStreamDestroy_v2(CUstream s) {
    Stream* st = stream_of(s);
    if (!st) return report(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: not a stream");
    if (st != &g_null_stream) {
        {
            std::lock_guard<std::mutex> g(g_streams_mu);
            g_streams.erase(st);
        }
        {
            std::lock_guard<std::mutex> g(st->mu);
            flush_locked(st);  // the work queued on a destroyed stream still completes
        }
        flush_host_all(st);  // and lands (leniently at once: nothing could wait for it later)
        std::lock_guard<std::mutex> g(st->mu);
        st->magic = 0;  // leaked: an in-flight user may still hold it
    }
    return check_ready();
}
CUDAAPI CUresult cuStreamSynchronize(CUstream s) {
    Stream* st = stream_of(s);
    if (!st) return report(CUDA_ERROR_INVALID_HANDLE, "cuStreamSynchronize: not a stream");
    {
        std::lock_guard<std::mutex> g(st->mu);  // an operation another thread runs on it ends
        if (st->capture) return st->invalidated ? capture_invalidated("cuStreamSynchronize") : capture_forbid(st, "cuStreamSynchronize");
        flush_locked(st);
    }
    CUresult r = refuse_if_capturing("cuStreamSynchronize");
    if (r) return r;
    if (st == &g_null_stream)
        flush_host_legacy();
    else
        flush_host_all(st);
    return check_ready();
}
CUDAAPI CUresult cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }
static Event* event_of(CUevent e);
// The waiting stream's later work is ordered after the event's stream's work up to the
// event: the deferred copies there run now (a wait captured into a graph records nothing,
// the emulated graph being one sequence on one stream).
CUDAAPI CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    Stream* st = stream_of(s);
    if (!st) return report(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent: not a stream");
    Event* ev = event_of(e);
    if (!ev) return report(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent: not an event");
    if (ev->stream && ev->stream != st) flush_stream(ev->stream);
    // The host writes the event covers land when the host synchronises with this stream
    // past this point (an entry only when some are held back there).
    Stream* from = ev->host_stream;
    bool holds = false;
    if (from && from != st) {
        std::lock_guard<std::mutex> g(from->mu);
        holds = !from->host_writes.empty() && from->host_writes.front().seq <= ev->seq;
    }
    {
        std::lock_guard<std::mutex> g(st->mu);
        ++st->waits;
        if (holds) {
            uint64_t q = ++st->seq;
            st->host_writes.push_back(Stream::HostWrite{q, nullptr, {}, from, ev->seq});
        }
    }
    return check_ready();
}
static CUstreamCaptureStatus capture_status(Stream* st) {
    if (!st->capture) return CU_STREAM_CAPTURE_STATUS_NONE;
    return st->invalidated ? CU_STREAM_CAPTURE_STATUS_INVALIDATED : CU_STREAM_CAPTURE_STATUS_ACTIVE;
}
CUDAAPI CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus* out) {
    Stream* st = stream_of(s);
    if (!st || !out) return report(CUDA_ERROR_INVALID_VALUE, "cuStreamIsCapturing");
    std::lock_guard<std::mutex> g(st->mu);
    *out = capture_status(st);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuStreamGetCaptureInfo_v2(CUstream s, CUstreamCaptureStatus* out, unsigned long long* id, CUgraph* graph,
                                           const CUgraphNode** deps, size_t* ndeps) {
    Stream* st = stream_of(s);
    if (!st || !out) return report(CUDA_ERROR_INVALID_VALUE, "cuStreamGetCaptureInfo");
    std::lock_guard<std::mutex> g(st->mu);
    *out = capture_status(st);
    if (id) *id = st->capture ? st->capture_id : 0;
    if (graph) *graph = reinterpret_cast<CUgraph>(st->capture);
    if (deps) *deps = nullptr;  // the emulated graph is a sequence: no node handles
    if (ndeps) *ndeps = 0;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuStreamGetCaptureInfo_v3(CUstream s, CUstreamCaptureStatus* out, unsigned long long* id, CUgraph* graph,
                                           const CUgraphNode** deps, const CUgraphEdgeData** edges, size_t* ndeps) {
    if (edges) *edges = nullptr;
    return cuStreamGetCaptureInfo_v2(s, out, id, graph, deps, ndeps);
}

// Stream capture: every launch, memset and copy (device, or pinned host memory) enqueued
// on the stream is recorded in order instead of running; cuGraphLaunch replays them.
CUDAAPI CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    CUresult r = check_ready();
    if (r) return r;
    Stream* st = stream_of(s);
    if (!st) return report(CUDA_ERROR_INVALID_HANDLE, "cuStreamBeginCapture: not a stream");
    if (st == &g_null_stream) return report(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: the legacy default stream cannot be captured");
    if (mode < 0 || mode > 2) return report(CUDA_ERROR_INVALID_VALUE, "cuStreamBeginCapture: not a capture mode");
    std::lock_guard<std::mutex> g(st->mu);
    if (st->capture) return report(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture: the stream is already capturing");
    st->capture = new Graph;
    st->invalidated = false;
    st->capture_mode = mode;
    st->capture_id = ++g_capture_ids;
    st->capture_thread = std::this_thread::get_id();
    {
        std::lock_guard<std::mutex> gp(g_pinned_mu);
        g_capturing.push_back(st);
    }
    ++g_active_captures;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuStreamEndCapture(CUstream s, CUgraph* out) {
    Stream* st = stream_of(s);
    if (!st || !out) return report(CUDA_ERROR_INVALID_VALUE, "cuStreamEndCapture");
    std::lock_guard<std::mutex> g(st->mu);
    if (!st->capture) return report(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture: the stream is not capturing");
    Graph* graph = st->capture;
    st->capture = nullptr;
    {
        std::lock_guard<std::mutex> gp(g_pinned_mu);
        g_capturing.erase(std::remove(g_capturing.begin(), g_capturing.end(), st), g_capturing.end());
    }
    --g_active_captures;
    if (st->invalidated) {
        st->invalidated = false;
        delete graph;
        *out = nullptr;
        return capture_invalidated("cuStreamEndCapture");
    }
    *out = reinterpret_cast<CUgraph>(graph);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuStreamAttachMemAsync(CUstream, CUdeviceptr, size_t, unsigned) { return check_ready(); }
CUDAAPI CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void* data) {
    CUresult r = check_ready();
    if (r) return r;
    Stream* st = stream_of(s);
    if (!st || !fn) return report(CUDA_ERROR_INVALID_VALUE, "cuLaunchHostFunc");
    std::lock_guard<std::mutex> g(st->mu);
    if (st->capture) {
        if (st->invalidated) return capture_invalidated("cuLaunchHostFunc");
        Node nd;
        nd.kind = Node::HOST;
        nd.fn = fn;
        nd.data = data;
        st->capture->nodes.push_back(nd);
        return CUDA_SUCCESS;
    }
    fn(data);
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuEventCreate(CUevent* e, unsigned) {
    if (CUresult r = check_ready()) return r;
    if (!e) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    *e = reinterpret_cast<CUevent>(new Event);
    return CUDA_SUCCESS;
}
static Event* event_of(CUevent e) {
    Event* ev = reinterpret_cast<Event*>(e);
    return ev && ev->magic == 0x65766e31 ? ev : nullptr;
}
CUDAAPI CUresult cuEventDestroy_v2(CUevent e) {
    Event* ev = event_of(e);
    if (!ev) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventDestroy: not an event");
    ev->magic = 0;
    delete ev;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuEventRecord(CUevent e, CUstream s) {
    Event* ev = event_of(e);
    if (!ev || !stream_of(s)) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord");
    ev->t = now_s();
    ev->recorded = true;
    Stream* st = stream_of(s);
    ev->stream = st == &g_null_stream ? nullptr : st;
    {
        std::lock_guard<std::mutex> g(st->mu);
        ev->host_stream = st;
        ev->seq = st->seq;
    }
    return check_ready();
}
// The host writes an event covers: those of its stream enqueued before it was recorded (on
// the legacy stream, those of every blocking stream); none when it was never recorded.
static void flush_host_event(Event* ev) {
    if (!ev->host_stream) return;
    if (ev->host_stream == &g_null_stream)
        flush_host_legacy();
    else
        flush_host(ev->host_stream, ev->seq);
}
CUDAAPI CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
CUDAAPI CUresult cuEventSynchronize(CUevent e) {
    Event* ev = event_of(e);
    if (!ev) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventSynchronize: not an event");
    flush_stream(ev->stream);
    flush_host_event(ev);
    return check_ready();
}
CUDAAPI CUresult cuEventQuery(CUevent e) {
    Event* ev = event_of(e);
    if (!ev) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventQuery: not an event");
    flush_stream(ev->stream);
    flush_host_event(ev);  // the emulated event has always completed: the query succeeds
    return check_ready();
}
CUDAAPI CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    Event *ea = event_of(a), *eb = event_of(b);
    if (!ms || !ea || !eb) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime");
    if (!ea->recorded || !eb->recorded) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was never recorded");
    *ms = (float)((eb->t - ea->t) * 1e3);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// ---- memory --------------------------------------------------------------------------------

CUDAAPI CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    CUresult r = check_ready();
    if (!r) r = refuse_if_capturing("cuMemAlloc");
    return r ? r : alloc(p, n, "cuMemAlloc");
}
// Stream-ordered allocation and free on a capturing stream: a GPU records them as graph
// memory nodes; the emulator does not emulate those and refuses them (stricter than a GPU).
CUDAAPI CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream s) {
    CUresult r = check_ready();
    if (r) return r;
    EMU_ON_STREAM(s);
    if (st_->capture)
        return st_->invalidated ? capture_invalidated("cuMemAllocAsync")
                                : capture_forbid(st_, "cuMemAllocAsync (graph memory nodes are not emulated)");
    return alloc(p, n, "cuMemAllocAsync");
}
CUDAAPI CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t n, CUmemoryPool, CUstream s) { return cuMemAllocAsync(p, n, s); }
CUDAAPI CUresult cuMemAllocManaged(CUdeviceptr* p, size_t n, unsigned) {
    CUresult r = check_ready();
    return r ? r : alloc(p, n, "cuMemAllocManaged");
}
CUDAAPI CUresult cuMemFree_v2(CUdeviceptr p) {
    CUresult r = check_ready();
    if (!r) r = refuse_if_capturing("cuMemFree");
    if (!r) flush_all();
    return r ? r : release(p, "cuMemFree");
}
CUDAAPI CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    CUresult r = check_ready();
    if (r) return r;
    Stream* st = stream_of(s);
    if (!st) return report(CUDA_ERROR_INVALID_HANDLE, "not a stream handle");
    // Every stream's deferred copies first, each under its own lock alone: flushing the
    // others while holding this stream's lock deadlocked two host threads freeing on two
    // streams (each holding its own lock and waiting for the other's). Host writes stay
    // held back: a stream-ordered free does not synchronise the host.
    flush_all(false);
    std::lock_guard<std::mutex> g(st->mu);
    flush_locked(st);
    if (st->capture)
        return st->invalidated ? capture_invalidated("cuMemFreeAsync")
                               : capture_forbid(st, "cuMemFreeAsync (graph memory nodes are not emulated)");
    return release(p, "cuMemFreeAsync");
}
// Page-locked host memory: plain host memory, registered so that copies from and to it
// may be captured (a copy involving pageable memory may not).
CUDAAPI CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    if (!p) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    CUresult r = check_ready();
    if (!r) r = refuse_if_capturing("cuMemHostAlloc");
    if (r) return r;
    size_t bytes = n ? n : 1;
    void* q = nullptr;
    if (posix_memalign(&q, 4096, (bytes + 4095) & ~(size_t)4095) != 0 || !q) return report(CUDA_ERROR_OUT_OF_MEMORY, "cuMemHostAlloc");
    {
        std::lock_guard<std::mutex> g(g_pinned_mu);
        g_pinned[(uintptr_t)q] = Block{bytes, next_allocation_id()};
    }
    *p = q;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemAllocHost_v2(void** p, size_t n) { return cuMemHostAlloc(p, n, 0); }
CUDAAPI CUresult cuMemFreeHost(void* p) {
    CUresult r = check_ready();
    if (!r) r = refuse_if_capturing("cuMemFreeHost");
    if (r) return r;
    flush_all();
    {
        std::lock_guard<std::mutex> g(g_pinned_mu);
        auto it = g_pinned.find((uintptr_t)p);
        if (it == g_pinned.end()) return report(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost: not a pointer from cuMemHostAlloc");
        g_pinned.erase(it);
    }
    free(p);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemHostGetFlags(unsigned* flags, void* p) {
    if (!flags || !is_pinned(p, 0)) return report(CUDA_ERROR_INVALID_VALUE, "cuMemHostGetFlags: not page-locked host memory");
    *flags = 0;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    size_t t = host_memory(), used;
    {
        std::lock_guard<std::mutex> g(allocations().mu);
        used = allocations().bytes_in_use;
    }
    if (free_b) *free_b = used < t ? t - used : 0;
    if (total) *total = t;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, size_t* size, CUdeviceptr p) {
    uintptr_t b;
    size_t s;
    if (!allocations().find((uintptr_t)p, &b, &s)) return report(CUDA_ERROR_NOT_FOUND, "cuMemGetAddressRange: not a device address");
    if (base) *base = b;
    if (size) *size = s;
    return CUDA_SUCCESS;
}

// A copy enqueued on a capturing stream: recorded when its host side (if any) is pinned.
static CUresult capture_copy(Stream* st, void* dst, const void* src, size_t n, const void* host, const char* what) {
    if (st->invalidated) return capture_invalidated(what);
    if (host && !is_pinned(host, n))
        return capture_forbid(st, std::string(what) + " from or to pageable host memory (only page-locked memory, cuMemHostAlloc, can be captured)");
    Node nd;
    nd.kind = Node::COPY;
    nd.dst = dst;
    nd.src = src;
    nd.n = n;
    if (n) nd.refs = {capture_ref(Node::kDst, dst, n), capture_ref(Node::kSrc, src, n)};
    st->capture->nodes.push_back(nd);
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    CUresult r = check_ready();
    if (r) return r;
    if ((r = refuse_if_capturing("cuMemcpyHtoD (synchronous)"))) return r;
    flush_all();
    if ((r = check_range(dst, n, "cuMemcpyHtoD destination"))) return r;
    return copy(reinterpret_cast<void*>(dst), src, n);
}
CUDAAPI CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    EMU_ON_STREAM(s);
    if (st_->capture) {
        CUresult r = check_range(dst, n, "cuMemcpyHtoDAsync destination");
        return r ? r : capture_copy(st_, reinterpret_cast<void*>(dst), src, n, src, "cuMemcpyHtoDAsync");
    }
    CUresult r = check_ready();
    if (!r) r = check_range(dst, n, "cuMemcpyHtoD destination");
    if (r) return r;
    if (st_ != &g_null_stream && defer_copies() && is_pinned(src, n)) {
        st_->pending.push_back({reinterpret_cast<void*>(dst), src, n});
        return CUDA_SUCCESS;
    }
    return copy(reinterpret_cast<void*>(dst), src, n);
}
CUDAAPI CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    CUresult r = check_ready();
    if (r) return r;
    if ((r = refuse_if_capturing("cuMemcpyDtoH (synchronous)"))) return r;
    flush_all();
    if ((r = check_range(src, n, "cuMemcpyDtoH source"))) return r;
    return copy(dst, reinterpret_cast<const void*>(src), n);
}
CUDAAPI CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    EMU_ON_STREAM(s);
    if (st_->capture) {
        CUresult r = check_range(src, n, "cuMemcpyDtoHAsync source");
        return r ? r : capture_copy(st_, dst, reinterpret_cast<const void*>(src), n, dst, "cuMemcpyDtoHAsync");
    }
    CUresult r = check_ready();
    if (!r) r = check_range(src, n, "cuMemcpyDtoH source");
    if (r) return r;
    // Into page-locked memory on a created stream: read now, written for the host when it
    // synchronises with the copy (see flush_host).
    if (st_ != &g_null_stream && defer_copies() && n && is_pinned(dst, n)) {
        const unsigned char* from = reinterpret_cast<const unsigned char*>(src);
        uint64_t q = ++st_->seq;
        st_->host_writes.push_back(Stream::HostWrite{q, dst, std::vector<unsigned char>(from, from + n), nullptr, 0});
        return CUDA_SUCCESS;
    }
    return copy(dst, reinterpret_cast<const void*>(src), n);
}
CUDAAPI CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult r = check_ready();
    if (r) return r;
    if ((r = refuse_if_capturing("cuMemcpyDtoD (synchronous)"))) return r;
    flush_all();
    if ((r = check_range(src, n, "cuMemcpyDtoD source"))) return r;
    if ((r = check_range(dst, n, "cuMemcpyDtoD destination"))) return r;
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
}
CUDAAPI CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    EMU_ON_STREAM(s);
    CUresult r = check_ready();
    if (r) return r;
    if ((r = check_range(src, n, "cuMemcpyDtoDAsync source"))) return r;
    if ((r = check_range(dst, n, "cuMemcpyDtoDAsync destination"))) return r;
    if (st_->capture) return capture_copy(st_, reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n, nullptr, "cuMemcpyDtoDAsync");
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
}
CUDAAPI CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult r = check_ready();
    if (r) return r;
    flush_all();
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
}
CUDAAPI CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) { return cuMemcpy(dst, src, n); }
CUDAAPI CUresult cuMemcpyPeer(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t n) { return cuMemcpyDtoD_v2(dst, src, n); }
CUDAAPI CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}

template <class T>
static CUresult memset_n(CUdeviceptr dst, T v, size_t n, const char* what) {
    CUresult r = check_ready();
    if (r) return r;
    if ((r = check_range(dst, n * sizeof(T), what))) return r;
    if (dst % sizeof(T) != 0) return report(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": misaligned address");
    T* p = reinterpret_cast<T*>(dst);
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    CUresult r = check_ready();
    if (r) return r;
    if ((r = refuse_if_capturing("cuMemsetD8 (synchronous)"))) return r;
    if ((r = check_range(d, n, "cuMemsetD8"))) return r;
    memset(reinterpret_cast<void*>(d), v, n);
    return CUDA_SUCCESS;
}
// A memset enqueued on a capturing stream: checked now, recorded for the replay.
static CUresult capture_memset(Stream* st, CUdeviceptr d, uint32_t v, unsigned elem, size_t n, const char* what) {
    if (st->invalidated) return capture_invalidated(what);
    CUresult r = check_range(d, n * elem, what);
    if (r) return r;
    if (d % elem != 0) return report(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": misaligned address");
    Node nd;
    nd.kind = Node::MEMSET;
    nd.dst = reinterpret_cast<void*>(d);
    nd.value = v;
    nd.elem = elem;
    nd.n = n;
    if (n) nd.refs = {capture_ref(Node::kDst, nd.dst, n * elem)};
    st->capture->nodes.push_back(nd);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
    EMU_ON_STREAM(s);
    if (st_->capture) return capture_memset(st_, d, v, 1, n, "cuMemsetD8Async");
    return memset_n<unsigned char>(d, v, n, "cuMemsetD8");
}
CUDAAPI CUresult cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n) {
    CUresult r = refuse_if_capturing("cuMemsetD16 (synchronous)");
    return r ? r : memset_n<unsigned short>(d, v, n, "cuMemsetD16");
}
CUDAAPI CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream s) {
    EMU_ON_STREAM(s);
    if (st_->capture) return capture_memset(st_, d, v, 2, n, "cuMemsetD16Async");
    return memset_n<unsigned short>(d, v, n, "cuMemsetD16");
}
CUDAAPI CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned int v, size_t n) {
    CUresult r = refuse_if_capturing("cuMemsetD32 (synchronous)");
    return r ? r : memset_n<unsigned int>(d, v, n, "cuMemsetD32");
}
CUDAAPI CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUstream s) {
    EMU_ON_STREAM(s);
    if (st_->capture) return capture_memset(st_, d, v, 4, n, "cuMemsetD32Async");
    return memset_n<unsigned int>(d, v, n, "cuMemsetD32");
}

// ---- modules and functions -----------------------------------------------------------------

CUDAAPI CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    CUresult r = check_ready();
    return r ? r : load_ptx(m, static_cast<const char*>(image));
}
CUDAAPI CUresult cuModuleLoadDataEx(CUmodule* m, const void* image, unsigned, void*, void**) { return cuModuleLoadData(m, image); }
CUDAAPI CUresult cuModuleLoad(CUmodule* m, const char* path) {
    CUresult r = check_ready();
    if (r) return r;
    FILE* f = path ? fopen(path, "rb") : nullptr;
    if (!f) return report(CUDA_ERROR_FILE_NOT_FOUND, std::string("cuModuleLoad: cannot open ") + (path ? path : "(null)"));
    std::string text;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
    fclose(f);
    return load_ptx(m, text.c_str());
}
CUDAAPI CUresult cuModuleUnload(CUmodule m) {
    Module* mod = reinterpret_cast<Module*>(m);
    if (!mod || mod->magic != 0x6d6f6431) return report(CUDA_ERROR_INVALID_HANDLE, "cuModuleUnload: not a module");
    return CUDA_SUCCESS;  // functions stay valid: cudarc keeps them alive with the module anyway
}
CUDAAPI CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    Module* mod = reinterpret_cast<Module*>(m);
    if (!f || !name) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    if (!mod || mod->magic != 0x6d6f6431) return report(CUDA_ERROR_INVALID_HANDLE, "cuModuleGetFunction: not a module");
    for (Function* fn : mod->functions)
        if (fn->name == name) {
            *f = reinterpret_cast<CUfunction>(fn);
            return CUDA_SUCCESS;
        }
    return report(CUDA_ERROR_NOT_FOUND, std::string("no kernel `") + name + "` in the module");
}
CUDAAPI CUresult cuModuleGetGlobal_v2(CUdeviceptr*, size_t*, CUmodule, const char* name) {
    return report(CUDA_ERROR_NOT_FOUND, std::string("module globals (`") + (name ? name : "") + "`) are not emulated");
}

CUDAAPI CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction func) {
    Function* f = function_of(func);
    if (!v || !f) return report(CUDA_ERROR_INVALID_VALUE, "cuFuncGetAttribute");
    switch (a) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = f->ptx.maxntid ? (int)f->ptx.maxntid : 1024; break;
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *v = (int)f->ptx.static_shared; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 32; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: *v = 90; break;
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *v = 90; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *v = f->max_dyn_shared; break;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: *v = -1; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuFuncSetAttribute(CUfunction func, CUfunction_attribute a, int v) {
    Function* f = function_of(func);
    if (!f) return report(CUDA_ERROR_INVALID_HANDLE, "cuFuncSetAttribute: not a function");
    if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        if (v < 0 || (size_t)v + f->ptx.static_shared > kMaxSharedOptin) {
            char b[200];
            snprintf(b, sizeof b, "kernel `%s`: %d bytes of dynamic shared memory + %zu static exceed the 227 KiB opt-in limit",
                     f->name.c_str(), v, f->ptx.static_shared);
            return report(CUDA_ERROR_INVALID_VALUE, b);
        }
        f->max_dyn_shared = v;
    }
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache) {
    return function_of(f) ? CUDA_SUCCESS : report(CUDA_ERROR_INVALID_HANDLE, "not a function");
}

CUDAAPI CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                                unsigned shmem, CUstream s, void** params, void** extra) {
    return launch(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra, false);
}
CUDAAPI CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                           unsigned bz, unsigned shmem, CUstream s, void** params) {
    return launch(f, gx, gy, gz, bx, by, bz, shmem, s, params, nullptr, true);
}

CUDAAPI CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, CUfunction func, int block, size_t dyn, unsigned) {
    Function* f = function_of(func);
    if (!n || !f || block <= 0) return report(CUDA_ERROR_INVALID_VALUE, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    int by_threads = 2048 / block;
    size_t shared = f->ptx.static_shared + dyn;
    int by_shared = shared ? (int)(233472 / shared) : 32;
    int r = std::min(std::min(by_threads, by_shared), 32);
    *n = r < 0 ? 0 : r;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, CUfunction f, int block, size_t dyn) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n, f, block, dyn, 0);
}
CUDAAPI CUresult cuOccupancyMaxPotentialBlockSizeWithFlags(int* grid, int* block, CUfunction func, size_t (*)(int), size_t dyn,
                                                          int limit, unsigned) {
    Function* f = function_of(func);
    if (!grid || !block || !f) return report(CUDA_ERROR_INVALID_VALUE, "cuOccupancyMaxPotentialBlockSize");
    int b = f->ptx.maxntid ? (int)f->ptx.maxntid : 1024;
    if (limit > 0 && limit < b) b = limit;
    *block = b;
    int per = 0;
    cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&per, func, b, dyn, 0);
    *grid = per * kSMs;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuOccupancyMaxPotentialBlockSize(int* grid, int* block, CUfunction f, size_t (*fn)(int), size_t dyn, int limit) {
    return cuOccupancyMaxPotentialBlockSizeWithFlags(grid, block, f, fn, dyn, limit, 0);
}
CUDAAPI CUresult cuOccupancyAvailableDynamicSMemPerBlock(size_t* out, CUfunction func, int, int) {
    Function* f = function_of(func);
    if (!out || !f) return report(CUDA_ERROR_INVALID_VALUE, "cuOccupancyAvailableDynamicSMemPerBlock");
    *out = kMaxSharedOptin - f->ptx.static_shared;
    return CUDA_SUCCESS;
}

// ---- graphs (from stream capture) ----------------------------------------------------------

static Graph* graph_of(CUgraph g) {
    Graph* p = reinterpret_cast<Graph*>(g);
    return p && p->magic == 0x67726131 ? p : nullptr;
}
static GraphExec* exec_of(CUgraphExec g) {
    GraphExec* p = reinterpret_cast<GraphExec*>(g);
    return p && p->magic == 0x67657831 ? p : nullptr;
}
CUDAAPI CUresult cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph g, unsigned long long flags) {
    CUresult r = check_ready();
    if (r) return r;
    Graph* graph = graph_of(g);
    if (!out || !graph) return report(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiateWithFlags: not a graph");
    // AUTO_FREE_ON_LAUNCH 1, UPLOAD 2, DEVICE_LAUNCH 4, USE_NODE_PRIORITY 8.
    if (flags & ~0xfull) return report(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiateWithFlags: unknown flags");
    if (flags & 4) return report(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiateWithFlags: device launch is not emulated");
    GraphExec* e = new GraphExec;
    e->nodes = graph->nodes;
    *out = reinterpret_cast<CUgraphExec>(e);
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuGraphUpload(CUgraphExec g, CUstream s) {
    if (!exec_of(g) || !stream_of(s)) return report(CUDA_ERROR_INVALID_HANDLE, "cuGraphUpload");
    return check_ready();
}
// Replays the recorded operations in capture order on `s`, each checked again first
// (check_refs): a pointer into a buffer freed since the capture, or into memory freed and
// allocated again for another buffer, is an illegal address, a launch failure naming the
// node; that node and the rest do not run.
CUDAAPI CUresult cuGraphLaunch(CUgraphExec g, CUstream s) {
    CUresult r = check_ready();
    if (r) return r;
    GraphExec* e = exec_of(g);
    if (!e) return report(CUDA_ERROR_INVALID_HANDLE, "cuGraphLaunch: not an instantiated graph");
    EMU_ON_STREAM(s);
    if (st_->capture) return st_->invalidated ? capture_invalidated("cuGraphLaunch") : capture_forbid(st_, "cuGraphLaunch (child graphs are not emulated)");
    Context* c = st_->ctx ? st_->ctx : ctx_now();
    for (size_t i = 0; i < e->nodes.size(); ++i) {
        Node& nd = e->nodes[i];
        if (g_poison.load()) break;  // a failed kernel: the rest does not run
        Status bad = check_refs(nd, i);
        if (!bad.ok()) {  // a launch failure, as the access faults on a GPU (or worse)
            set_sticky(c, bad);
            if (config().verbose || getenv("EMU_QUIET") == nullptr) fprintf(stderr, "emu: launch failed: %s\n", bad.detail.c_str());
            if (config().launch_blocking) return report(bad);
            break;
        }
        switch (nd.kind) {
            case Node::KERNEL: {
                std::vector<void*> args(nd.args.size());
                for (size_t a = 0; a < nd.args.size(); ++a) args[a] = nd.args[a].data();
                Launch L;
                L.f = nd.f;
                for (int d = 0; d < 3; ++d) L.grid[d] = nd.grid[d], L.block[d] = nd.block[d];
                L.dyn_shared = nd.shmem;
                L.args = args.data();
                L.ordinal = __atomic_fetch_add(&nd.f->launches, 1, __ATOMIC_RELAXED);
                if ((r = run_launch(c, L))) return r;
                break;
            }
            case Node::COPY:
                copy(nd.dst, nd.src, nd.n);
                break;
            case Node::MEMSET: {
                unsigned char* p = static_cast<unsigned char*>(nd.dst);
                for (size_t k = 0; k < nd.n; ++k) memcpy(p + k * nd.elem, &nd.value, nd.elem);
                break;
            }
            case Node::HOST:
                nd.fn(nd.data);
                break;
        }
    }
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuGraphExecDestroy(CUgraphExec g) {
    GraphExec* e = exec_of(g);
    if (!e) return report(CUDA_ERROR_INVALID_HANDLE, "cuGraphExecDestroy: not an instantiated graph");
    e->magic = 0;
    delete e;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuGraphDestroy(CUgraph g) {
    Graph* graph = graph_of(g);
    if (!graph) return report(CUDA_ERROR_INVALID_HANDLE, "cuGraphDestroy: not a graph");
    graph->magic = 0;
    delete graph;
    return CUDA_SUCCESS;
}
CUDAAPI CUresult cuGraphGetNodes(CUgraph g, CUgraphNode* nodes, size_t* n) {
    Graph* graph = graph_of(g);
    if (!graph || !n) return report(CUDA_ERROR_INVALID_VALUE, "cuGraphGetNodes");
    if (nodes)
        for (size_t i = 0; i < *n && i < graph->nodes.size(); ++i) nodes[i] = reinterpret_cast<CUgraphNode>(&graph->nodes[i]);
    *n = graph->nodes.size();
    return CUDA_SUCCESS;
}

CUDAAPI CUresult cuProfilerStart() { return CUDA_SUCCESS; }
CUDAAPI CUresult cuProfilerStop() { return CUDA_SUCCESS; }

// ---- the emulator's own entry points (not CUDA) --------------------------------------------

// Loads a host-compiled kernel module without PTX (for kernels NVRTC cannot compile here,
// e.g. the WMMA self-test, whose headers are not in the NVRTC wheel): no PTX checks, and
// every kernel runs with one fiber per thread.
CUDAAPI CUresult emuModuleLoadHost(CUmodule* out, const char* path) {
    CUresult r = check_ready();
    if (r) return r;
    if (!out || !path) return report(CUDA_ERROR_INVALID_VALUE, "null pointer");
    HostModule* hm = nullptr;
    Status s = load_host_module(path, &hm);
    if (!s.ok()) return report(s);
    Module* m = new Module;
    m->host = hm;
    for (int i = 0; i < hm->m->nkernels; ++i) {
        const emu_kernel_t* k = &hm->m->kernels[i];
        Function* f = new Function;
        f->module = m;
        f->name = k->name;
        f->kernel = k;
        f->has_ptx = false;
        f->ptx.name = k->name;
        f->ptx.collective = true;
        f->ptx.dyn_shared = hm->m->ndyn_shared > 0;
        f->max_dyn_shared = (int)kMaxSharedDefault;
        m->functions.push_back(f);
    }
    *out = reinterpret_cast<CUmodule>(m);
    return CUDA_SUCCESS;
}

// Whether this libcuda is the emulator (for tools that want to say so).
CUDAAPI int emuIsEmulator() { return 1; }
// How many times a stream waited for an event (cuStreamWaitEvent), and how many deferred
// copies it holds now (-1: not a stream): for tests of cross-stream ordering.
CUDAAPI long long emuStreamWaits(CUstream s) {
    Stream* st = stream_of(s);
    if (!st) return -1;
    std::lock_guard<std::mutex> g(st->mu);
    return (long long)st->waits;
}
CUDAAPI long long emuStreamPending(CUstream s) {
    Stream* st = stream_of(s);
    if (!st) return -1;
    std::lock_guard<std::mutex> g(st->mu);
    return (long long)st->pending.size();
}

// Whether it is the AddressSanitizer build (faults are then ASan's to report).
CUDAAPI int emuSanitized() {
#if defined(__SANITIZE_ADDRESS__)
    return 1;
#else
    return 0;
#endif
}
