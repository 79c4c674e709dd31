// The executor of the emulated driver: runs the blocks of a launch, each CUDA thread as a
// call of the kernel's thunk with its threadIdx set.
//
// - A kernel whose PTX has no barrier or warp collective runs its threads one after the
//   other (in a seeded order) on one fiber: no context switch per thread.
// - Otherwise every CUDA thread of the block gets its own fiber (a stack and a saved
//   context), and a scheduler runs the ready fibers in a seeded random order until each
//   blocks in __syncthreads or a warp collective or exits. A barrier releases when all
//   threads of the block are in it; a warp collective completes when every lane its mask
//   names is in it with the same operation and mask. When nothing can run and some
//   thread still waits, the block is deadlocked: a launch failure naming the kernel, the
//   block and who waits where.
// - Static __shared__ arrays are the kernel module's thread_local data: poisoned (0xFF) at
//   every block start, like the garbage a real SM leaves there.
// - Blocks of one launch are spread over EMU_THREADS OS threads (each with its own fibers
//   and shared memory); the order of blocks and threads comes from EMU_SEED.
// - A fault inside a kernel (SIGSEGV/SIGBUS, incl. a fiber stack overflow) ends the launch
//   with CUDA_ERROR_ILLEGAL_ADDRESS instead of killing the process.
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <list>
#include <thread>

#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

extern "C" void* __tls_get_addr(void*);

namespace emu {

uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

namespace {

// ---- context switch ------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void** save_sp, void* next_sp);
extern "C" void emu_ctx_trampoline();
asm(R"(
    .text
    .p2align 4
    .globl emu_ctx_switch
    .hidden emu_ctx_switch
    .type emu_ctx_switch,@function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch

    .p2align 4
    .globl emu_ctx_trampoline
    .hidden emu_ctx_trampoline
    .type emu_ctx_trampoline,@function
emu_ctx_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_ctx_trampoline, .-emu_ctx_trampoline
)");

// A fresh context on [lo, lo + size) that calls fn(arg) when first switched to. The
// switch saves the callee-saved registers only: kernels never change the MXCSR or x87
// control words (rounding modes), so all fibers share the scheduler's.
void* make_context(char* lo, size_t size, void (*fn)(void*), void* arg) {
    uintptr_t top = ((uintptr_t)(lo + size)) & ~(uintptr_t)15;
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
    memset(sp, 0, 88);
    sp[2] = 0;                                           // r15
    sp[3] = 0;                                           // r14
    sp[4] = reinterpret_cast<uint64_t>(fn);              // r13
    sp[5] = reinterpret_cast<uint64_t>(arg);             // r12
    sp[6] = 0;                                           // rbx
    sp[7] = 0;                                           // rbp
    sp[8] = reinterpret_cast<uint64_t>(&emu_ctx_trampoline);  // return address
    return sp;
}
inline void switch_to(void** save, void* next) { emu_ctx_switch(save, next); }
#else
struct UCtx {
    ucontext_t uc;
};
void* make_context(char* lo, size_t size, void (*fn)(void*), void* arg) {
    UCtx* c = new UCtx;
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, (void (*)())fn, 1, arg);
    return c;
}
thread_local UCtx g_sched_uc;
inline void switch_to(void** save, void* next) {
    UCtx* self = static_cast<UCtx*>(*save);
    if (!self) {
        self = new UCtx;
        *save = self;
    }
    swapcontext(&self->uc, &static_cast<UCtx*>(next)->uc);
}
#endif

// ---- per OS thread state -------------------------------------------------------------------

enum FiberState { F_READY, F_RUNNING, F_BARRIER, F_WARP, F_DONE, F_FAILED };

struct Fiber {
    emu_thread_t thr;
    void* sp = nullptr;
    char* stack_lo = nullptr;
    size_t stack_size = 0;
    int state = F_READY;
    int wop = 0;
    unsigned wmask = 0;
    uint64_t wval = 0;
    int wb = 0, wc = 0;
    uint64_t wres = 0;
    int bop = 0, bpred = 0, bres = 0;
    uint32_t atomics = 0;
    void* fake = nullptr;
};

constexpr unsigned kMaxThreads = 1024;
constexpr uint64_t kSpinYieldLimit = 20000000;

struct Worker {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;  // one per fiber slot, mmapped with a guard page below
    size_t stack_size = 0;
    void* sched_sp = nullptr;
    const void* sched_lo = nullptr;
    size_t sched_size = 0;
    void* sched_fake = nullptr;
    emu_block_t block{};
    const emu_thread_t* cur_thr = nullptr;
    emu_thread_t direct_thr{};
    Fiber* cur = nullptr;
    // The running block.
    const Launch* L = nullptr;
    unsigned nthreads = 0;
    bool direct = false;
    bool in_kernel = false;
    std::vector<int> ready;
    unsigned bar_count = 0;
    unsigned bar_sum = 0;
    std::vector<uint32_t> warp_arrived, warp_exist;
    uint64_t rng = 0;
    uint64_t spin_yields = 0;
    bool failed = false;
    CUresult fail_code = CUDA_SUCCESS;
    std::string fail_msg;
    char* altstack = nullptr;
};

// initial-exec: one pointer of static TLS (libcuda is dlopened; glibc keeps room for this).
__attribute__((tls_model("initial-exec"))) thread_local Worker* tw = nullptr;

// xorshift64*: the scheduler draws a number per released fiber, so it must be cheap.
uint64_t next_rand(Worker* W) {
    uint64_t x = W->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    W->rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

// Uniform in [0, n) (n < 2^32).
size_t below(Worker* W, size_t n) { return (size_t)(((next_rand(W) >> 32) * (uint64_t)n) >> 32); }

char* map_stack(size_t size) {
    long page = sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, size + (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, (size_t)page, PROT_NONE);  // guard page: an overflow faults
    return static_cast<char*>(p) + page;
}

Worker* worker() {
    if (tw) return tw;
    Worker* W = new Worker;
    W->stack_size = config().stack_kb * 1024;
    W->fibers.resize(kMaxThreads);
    W->stacks.assign(kMaxThreads, nullptr);
    W->warp_arrived.assign(kMaxThreads / 32, 0);
    W->warp_exist.assign(kMaxThreads / 32, 0);
#if defined(EMU_ASAN)
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void* lo = nullptr;
        size_t size = 0;
        pthread_attr_getstack(&attr, &lo, &size);
        W->sched_lo = lo;
        W->sched_size = size;
        pthread_attr_destroy(&attr);
    }
#else
    stack_t ss;
    W->altstack = static_cast<char*>(malloc(64 * 1024));
    ss.ss_sp = W->altstack;
    ss.ss_size = 64 * 1024;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
#endif
    tw = W;
    return W;
}

// ---- fiber switches (with AddressSanitizer's fiber annotations) ----------------------------

void to_fiber(Worker* W, Fiber* f) {
#if defined(EMU_ASAN)
    __sanitizer_start_switch_fiber(&W->sched_fake, f->stack_lo, f->stack_size);
#endif
    W->cur = f;
    switch_to(&W->sched_sp, f->sp);
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(W->sched_fake, nullptr, nullptr);
#endif
}

void to_scheduler(Worker* W, Fiber* f, bool final) {
#if defined(EMU_ASAN)
    __sanitizer_start_switch_fiber(final ? nullptr : &f->fake, W->sched_lo, W->sched_size);
#else
    (void)final;
#endif
    switch_to(&f->sp, W->sched_sp);
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(f->fake, nullptr, nullptr);
#endif
}

// The next ready fiber: the top of the ready stack (see shuffle_released).
Fiber* pick_ready(Worker* W);

// The running fiber `f` blocks (or exits, `final`): the next ready fiber runs, straight from
// this one (one switch, not two through the scheduler); with none ready, the scheduler.
void yield_next(Worker* W, Fiber* f, bool final) {
    if (W->ready.empty() || W->failed) {
        to_scheduler(W, f, final);
        return;
    }
    Fiber* g = pick_ready(W);
    g->state = F_RUNNING;
    W->cur = g;
    W->cur_thr = &g->thr;
    if (g == f) return;  // the seeded order picked the fiber that just released the others
#if defined(EMU_ASAN)
    __sanitizer_start_switch_fiber(final ? nullptr : &f->fake, g->stack_lo, g->stack_size);
#endif
    switch_to(&f->sp, g->sp);
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(f->fake, nullptr, nullptr);
#endif
}

void fiber_started(Worker* W) {
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#else
    (void)W;
#endif
}

// ---- descriptions --------------------------------------------------------------------------

std::string fmt3(const emu_uint3& v) {
    char b[64];
    snprintf(b, sizeof b, "(%u,%u,%u)", v.x, v.y, v.z);
    return b;
}

std::string where(Worker* W) {
    std::string s = "kernel `" + W->L->f->name + "`, block " + fmt3(W->block.bid);
    if (W->cur_thr) s += ", thread " + fmt3(W->cur_thr->tid);
    return s;
}

const char* warp_op_name(int op) {
    static const char* names[EMU_WARP_OPS] = {"__shfl_sync",      "__shfl_up_sync",    "__shfl_down_sync",  "__shfl_xor_sync",
                                              "__ballot_sync",    "__any_sync",        "__all_sync",        "__match_any_sync",
                                              "__match_all_sync", "__syncwarp",        "__reduce_add_sync", "__reduce_min_sync",
                                              "__reduce_max_sync", "__reduce_min_sync", "__reduce_max_sync", "__reduce_and_sync",
                                              "__reduce_or_sync", "__reduce_xor_sync", "a wmma collective",
                                              "a warpgroup collective (wgmma)"};
    return op >= 0 && op < EMU_WARP_OPS ? names[op] : "a warp collective";
}

std::string lanes(uint32_t m) {
    std::string s;
    for (int l = 0; l < 32;) {
        if (!((m >> l) & 1u)) {
            ++l;
            continue;
        }
        int e = l;
        while (e + 1 < 32 && ((m >> (e + 1)) & 1u)) ++e;
        char b[24];
        snprintf(b, sizeof b, e == l ? "%d" : "%d-%d", l, e);
        s += (s.empty() ? "" : ",") + std::string(b);
        l = e + 1;
    }
    return s.empty() ? "none" : s;
}

[[noreturn]] void fail_now(Worker* W, CUresult code, const std::string& msg) {
    W->failed = true;
    W->fail_code = code;
    W->fail_msg = where(W) + ": " + msg;
    Fiber* f = W->cur;
    f->state = F_FAILED;
    to_scheduler(W, f, true);
    __builtin_unreachable();
}

std::string describe_deadlock(Worker* W) {
    unsigned at_bar = 0, in_warp = 0, done = 0;
    int first_done = -1;
    for (unsigned i = 0; i < W->nthreads; ++i) {
        int s = W->fibers[i].state;
        if (s == F_BARRIER) ++at_bar;
        if (s == F_WARP) ++in_warp;
        if (s == F_DONE) {
            ++done;
            if (first_done < 0) first_done = (int)i;
        }
    }
    char b[256];
    std::string msg = "deadlock: ";
    if (at_bar) {
        snprintf(b, sizeof b, "__syncthreads reached by %u of %u threads", at_bar, W->nthreads);
        msg += b;
        if (done) {
            snprintf(b, sizeof b, "; %u exited without reaching it (e.g. thread %s)", done,
                     fmt3(W->fibers[first_done].thr.tid).c_str());
            msg += b;
        }
        if (in_warp) {
            snprintf(b, sizeof b, "; %u wait in a warp collective instead", in_warp);
            msg += b;
        }
    }
    for (unsigned w = 0; w * 32 < W->nthreads; ++w) {
        uint32_t arrived = 0;
        int op = -1;
        unsigned mask = 0;
        for (unsigned l = 0; l < 32 && w * 32 + l < W->nthreads; ++l) {
            const Fiber& f = W->fibers[w * 32 + l];
            if (f.state == F_WARP) {
                arrived |= 1u << l;
                op = f.wop;
                mask = f.wmask;
            }
        }
        if (!arrived) continue;
        if (op == EMU_WARP_GROUP && arrived == W->warp_exist[w]) {
            snprintf(b, sizeof b, "%swarp %u: in a wgmma, waiting for the other warps of warpgroup %u (warps %u-%u)",
                     at_bar || msg.size() > 10 ? "; " : "", w, w / 4, w / 4 * 4, w / 4 * 4 + 3);
            msg += b;
            continue;
        }
        uint32_t missing = mask & W->warp_exist[w] & ~arrived;
        uint32_t gone = 0, barrier = 0;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((missing >> l) & 1u)) continue;
            int s = W->fibers[w * 32 + l].state;
            if (s == F_DONE) gone |= 1u << l;
            if (s == F_BARRIER) barrier |= 1u << l;
        }
        snprintf(b, sizeof b, "%swarp %u: %s (mask 0x%08x) reached by lanes %s only", at_bar || msg.size() > 10 ? "; " : "", w,
                 warp_op_name(op), mask, lanes(arrived).c_str());
        msg += b;
        if (gone) msg += "; lanes " + lanes(gone) + " had exited";
        if (barrier) msg += "; lanes " + lanes(barrier) + " wait in __syncthreads";
    }
    return msg;
}

// ---- the collectives, called from kernel code (exported below) ----------------------------

void push_ready(Worker* W, Fiber* f) {
    f->state = F_READY;
    W->ready.push_back((int)(f - W->fibers.data()));
}

// Shuffles the last `n` entries of the ready stack (a group just released together): they
// run next, in a seeded random order. Keeping a released warp together keeps its 32 stacks
// in the cache; the order within it, and across the block after a barrier, stays random.
void shuffle_released(Worker* W, size_t n) {
    size_t end = W->ready.size(), begin = end - n;
    for (size_t i = end - 1; i > begin; --i) {
        size_t j = begin + below(W, i - begin + 1);
        std::swap(W->ready[i], W->ready[j]);
    }
}

int barrier(int op, int pred) {
    Worker* W = tw;
    if (!W || !W->in_kernel) {
        fprintf(stderr, "emu: __syncthreads called outside a kernel launch\n");
        abort();
    }
    if (W->direct)
        fail_now(W, CUDA_ERROR_LAUNCH_FAILED,
                 "__syncthreads in a kernel whose PTX has no barrier (emulator error: the PTX and the host build differ)");
    Fiber* f = W->cur;
    f->state = F_BARRIER;
    f->bop = op;
    f->bpred = pred;
    W->bar_count++;
    W->bar_sum += pred ? 1u : 0u;
    if (W->bar_count == W->nthreads) {
        unsigned sum = W->bar_sum;
        for (unsigned i = 0; i < W->nthreads; ++i) {
            Fiber& g = W->fibers[i];
            g.bres = g.bop == 1 ? (int)sum : g.bop == 2 ? (sum == W->nthreads) : g.bop == 3 ? (sum > 0) : 0;
            push_ready(W, &g);
        }
        shuffle_released(W, W->nthreads);
        W->bar_count = 0;
        W->bar_sum = 0;
    }
    yield_next(W, f, false);
    return f->bres;
}

void complete_warp(Worker* W, unsigned w, uint32_t group, int op) {
    Fiber* base = &W->fibers[w * 32];
    uint64_t res[32] = {0};
    if (op <= EMU_WARP_SHFL_XOR) {
        for (unsigned l = 0; l < 32; ++l) {
            if (!((group >> l) & 1u)) continue;
            const Fiber& f = base[l];
            int width = f.wc;
            if (width < 1 || width > 32 || (width & (width - 1)))
                fail_now(W, CUDA_ERROR_LAUNCH_FAILED, std::string(warp_op_name(op)) + ": width must be a power of 2 up to 32");
            int seg = 32 - width;
            int clamp = op == EMU_WARP_SHFL_UP ? 0 : 0x1f;
            int lane = (int)l, b = f.wb;
            int max_lane = (lane & seg) | (clamp & ~seg), min_lane = lane & seg;
            int j;
            bool pval;
            switch (op) {
                case EMU_WARP_SHFL_UP: j = lane - b; pval = j >= max_lane; break;
                case EMU_WARP_SHFL_DOWN: j = lane + b; pval = j <= max_lane; break;
                case EMU_WARP_SHFL_XOR: j = lane ^ b; pval = j <= max_lane; break;
                default: j = min_lane | (b & 0x1f & ~seg); pval = j <= max_lane; break;
            }
            if (!pval) j = lane;
            if (j < 0 || j > 31 || !((group >> j) & 1u)) {
                char m[200];
                snprintf(m, sizeof m, "%s: lane %d reads lane %d, which is not in the mask 0x%08x (undefined on a GPU)",
                         warp_op_name(op), lane, j, f.wmask);
                fail_now(W, CUDA_ERROR_LAUNCH_FAILED, m);
            }
            res[l] = base[j].wval;
        }
    } else if (op == EMU_WARP_BALLOT || op == EMU_WARP_ANY || op == EMU_WARP_ALL) {
        uint32_t bits = 0;
        for (unsigned l = 0; l < 32; ++l)
            if (((group >> l) & 1u) && base[l].wval) bits |= 1u << l;
        uint64_t r = op == EMU_WARP_BALLOT ? bits : op == EMU_WARP_ANY ? (bits != 0) : (bits == group);
        for (unsigned l = 0; l < 32; ++l) res[l] = r;
    } else if (op == EMU_WARP_MATCH_ANY || op == EMU_WARP_MATCH_ALL) {
        bool all = true;
        uint64_t first = 0;
        bool have = false;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((group >> l) & 1u)) continue;
            uint32_t same = 0;
            for (unsigned k = 0; k < 32; ++k)
                if (((group >> k) & 1u) && base[k].wval == base[l].wval) same |= 1u << k;
            res[l] = same;
            if (!have) {
                first = base[l].wval;
                have = true;
            } else if (base[l].wval != first) {
                all = false;
            }
        }
        if (op == EMU_WARP_MATCH_ALL)
            for (unsigned l = 0; l < 32; ++l) res[l] = all ? group : 0;
    } else if (op >= EMU_WARP_REDUX_ADD && op <= EMU_WARP_REDUX_XOR) {
        uint32_t acc = 0;
        bool have = false;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((group >> l) & 1u)) continue;
            uint32_t v = (uint32_t)base[l].wval;
            if (!have) {
                acc = v;
                have = true;
                continue;
            }
            switch (op) {
                case EMU_WARP_REDUX_ADD: acc += v; break;
                case EMU_WARP_REDUX_MIN: acc = v < acc ? v : acc; break;
                case EMU_WARP_REDUX_MAX: acc = v > acc ? v : acc; break;
                case EMU_WARP_REDUX_MINS: acc = (int32_t)v < (int32_t)acc ? v : acc; break;
                case EMU_WARP_REDUX_MAXS: acc = (int32_t)v > (int32_t)acc ? v : acc; break;
                case EMU_WARP_REDUX_AND: acc &= v; break;
                case EMU_WARP_REDUX_OR: acc |= v; break;
                default: acc ^= v; break;
            }
        }
        for (unsigned l = 0; l < 32; ++l) res[l] = acc;
    } else if (op == EMU_WARP_WMMA) {
        if (group != 0xffffffffu)
            fail_now(W, CUDA_ERROR_LAUNCH_FAILED, "a wmma operation needs all 32 lanes of a full warp; lanes " + lanes(group) + " only");
        for (unsigned l = 1; l < 32; ++l)
            if (base[l].wval != base[0].wval || base[l].wb != base[0].wb)
                fail_now(W, CUDA_ERROR_LAUNCH_FAILED,
                         "the lanes of a warp passed different pointers, strides or operations to a wmma collective");
    }
    for (unsigned l = 0; l < 32; ++l) {
        if (!((group >> l) & 1u)) continue;
        base[l].wres = res[l];
        push_ready(W, &base[l]);
    }
    shuffle_released(W, (size_t)__builtin_popcount(group));
    W->warp_arrived[w] &= ~group;
}

// A warpgroup collective (EMU_WARP_GROUP, wgmma): warp w has all its 32 lanes in it; the
// group completes when the 4 warps 4k..4k+3 (k = w / 4) all have, with the same value (the
// caller's key of its operands). A block whose warpgroup is not 4 complete warps cannot run
// one: a launch failure, as a GPU's would be undefined.
void complete_warpgroup(Worker* W, unsigned w) {
    const unsigned g0 = w / 4 * 4;
    for (unsigned k = g0; k < g0 + 4; ++k) {
        if ((size_t)(k + 1) * 32 > W->nthreads || W->warp_exist[k] != 0xffffffffu) {
            char m[240];
            snprintf(m, sizeof m,
                     "a wgmma (warpgroup collective) needs the 4 complete warps %u-%u of warpgroup %u (a warpgroup starts at a "
                     "warp index divisible by 4); the block has %u threads",
                     g0, g0 + 3, g0 / 4, W->nthreads);
            fail_now(W, CUDA_ERROR_LAUNCH_FAILED, m);
        }
        if (W->warp_arrived[k] != 0xffffffffu) return;  // that warp is not all there yet
        for (unsigned l = 0; l < 32; ++l) {
            const Fiber& f = W->fibers[k * 32 + l];
            if (f.wop != EMU_WARP_GROUP) return;  // cannot happen: a full warp agrees on its op
            if (f.wval != W->fibers[g0 * 32].wval || f.wb != W->fibers[g0 * 32].wb)
                fail_now(W, CUDA_ERROR_LAUNCH_FAILED,
                         "the threads of a warpgroup passed different descriptors, scale-d or shapes to a wgmma");
        }
    }
    for (unsigned k = g0; k < g0 + 4; ++k) {
        for (unsigned l = 0; l < 32; ++l) {
            W->fibers[k * 32 + l].wres = 0;
            push_ready(W, &W->fibers[k * 32 + l]);
        }
        W->warp_arrived[k] = 0;
    }
    shuffle_released(W, 128);
}

uint64_t warp(int op, unsigned mask, uint64_t value, int b, int c) {
    Worker* W = tw;
    if (!W || !W->in_kernel) {
        fprintf(stderr, "emu: a warp collective called outside a kernel launch\n");
        abort();
    }
    if (W->direct)
        fail_now(W, CUDA_ERROR_LAUNCH_FAILED,
                 std::string(warp_op_name(op)) + " in a kernel whose PTX has no warp collective (emulator error)");
    Fiber* f = W->cur;
    unsigned lane = f->thr.lane, w = f->thr.warp;
    if (!((mask >> lane) & 1u)) {
        char m[160];
        snprintf(m, sizeof m, "%s with mask 0x%08x, which does not include the calling lane %u", warp_op_name(op), mask, lane);
        fail_now(W, CUDA_ERROR_LAUNCH_FAILED, m);
    }
    f->state = F_WARP;
    f->wop = op;
    f->wmask = mask;
    f->wval = value;
    f->wb = b;
    f->wc = c;
    uint32_t need = mask & W->warp_exist[w];
    uint32_t before = need & W->warp_arrived[w];
    W->warp_arrived[w] |= 1u << lane;
    uint32_t here = before | (1u << lane);
    // Every lane already waiting was checked against the first when it came: compare with it.
    if (before) {
        unsigned l = (unsigned)__builtin_ctz(before);
        const Fiber& g = W->fibers[w * 32 + l];
        if (g.wmask != mask || g.wop != op) {
            char m[240];
            snprintf(m, sizeof m, "lanes of warp %u disagree: lane %u calls %s with mask 0x%08x while lane %u waits in %s with mask 0x%08x",
                     w, lane, warp_op_name(op), mask, l, warp_op_name(g.wop), g.wmask);
            fail_now(W, CUDA_ERROR_LAUNCH_FAILED, m);
        }
    }
    if (op == EMU_WARP_GROUP) {
        if (here == need) complete_warpgroup(W, w);
    } else if (here == need) {
        complete_warp(W, w, need, op);
    }
    yield_next(W, f, false);
    return f->wres;
}

void atomic_hook() {
    Worker* W = tw;
    if (!W || !W->in_kernel || W->direct) return;
    Fiber* f = W->cur;
    if ((++f->atomics & 63u) != 0 || W->ready.empty()) return;
    if (++W->spin_yields > kSpinYieldLimit)
        fail_now(W, CUDA_ERROR_LAUNCH_TIMEOUT,
                 "a spin-wait on an atomic does not end (the emulator runs one block at a time: a block cannot wait for another)");
    push_ready(W, f);
    yield_next(W, f, false);
}

// ---- running a block -----------------------------------------------------------------------

void poison_shared(Worker* W, const Launch& L) {
    HostModule* hm = L.f->module->host;
    const emu_module_t* m = hm->m;
    if (!config().poison) return;
    if (hm->tls_size != 0) {
        struct {
            unsigned long mod, off;
        } ti{hm->tls_modid, 0};
        char* base = static_cast<char*>(__tls_get_addr(&ti));
        // Everything but the dynamic arrays, then their requested part.
        std::vector<std::pair<char*, size_t>> skip;
        for (int i = 0; i < m->ndyn_shared; ++i)
            skip.push_back({static_cast<char*>(m->dyn_shared[i].addr()), m->dyn_shared[i].capacity});
        std::sort(skip.begin(), skip.end());
        char* p = base;
        char* end = base + hm->tls_size;
        for (auto& s : skip) {
            if (s.first > p && s.first <= end) memset(p, 0xff, (size_t)(s.first - p));
            if (s.first + s.second > p) p = s.first + s.second;
        }
        if (p < end) memset(p, 0xff, (size_t)(end - p));
    }
    for (int i = 0; i < m->ndyn_shared; ++i) {
        char* a = static_cast<char*>(m->dyn_shared[i].addr());
        size_t n = L.dyn_shared < m->dyn_shared[i].capacity ? L.dyn_shared : m->dyn_shared[i].capacity;
#if defined(EMU_ASAN)
        // Beyond the bytes the launch asked for, the dynamic shared array is out of bounds.
        ASAN_UNPOISON_MEMORY_REGION(a, m->dyn_shared[i].capacity);
        ASAN_POISON_MEMORY_REGION(a + n, m->dyn_shared[i].capacity - n);
#endif
        memset(a, 0xff, n);
    }
}

void fiber_main(void* arg) {
    Worker* W = tw;
    fiber_started(W);
    Fiber* f = static_cast<Fiber*>(arg);
    W->L->f->kernel->thunk(W->L->args);
    f->state = F_DONE;
    W->cur_thr = nullptr;
    yield_next(W, f, true);
    __builtin_unreachable();
}

Fiber* pick_ready(Worker* W) {
    int fi = W->ready.back();
    W->ready.pop_back();
    return &W->fibers[fi];
}

// Affine permutation i -> (a*i + c) mod n, a coprime to n.
struct Perm {
    uint64_t a = 1, c = 0, n = 1;
    Perm(uint64_t n_, uint64_t r) : n(n_) {
        if (n <= 1) return;
        c = r % n;
        uint64_t x = mix64(r) % n;
        for (;; x = (x + 1) % n) {
            uint64_t g = x, h = n;
            while (h) {
                uint64_t t = g % h;
                g = h;
                h = t;
            }
            if (x != 0 && g == 1) break;
        }
        a = x;
    }
    uint64_t operator()(uint64_t i) const { return (uint64_t)(((unsigned __int128)a * i + c) % n); }
};

void direct_main(void* arg) {
    Worker* W = tw;
    fiber_started(W);
    Fiber* f = static_cast<Fiber*>(arg);
    const Launch& L = *W->L;
    unsigned bx = L.block[0], by = L.block[1];
    Perm perm(W->nthreads, next_rand(W));
    for (unsigned i = 0; i < W->nthreads; ++i) {
        unsigned t = (unsigned)perm(i);
        W->direct_thr.tid = emu_uint3{t % bx, (t / bx) % by, t / (bx * by)};
        W->direct_thr.lane = t & 31u;
        W->direct_thr.warp = t >> 5;
        W->cur_thr = &W->direct_thr;
        L.f->kernel->thunk(L.args);
    }
    f->state = F_DONE;
    W->cur_thr = nullptr;
    to_scheduler(W, f, true);
    __builtin_unreachable();
}

bool ensure_stack(Worker* W, unsigned i) {
    if (!W->stacks[i]) W->stacks[i] = map_stack(W->stack_size);
#if defined(EMU_ASAN)
    // A fiber of an earlier block never returned from its frames (it exited by switching
    // away, or was abandoned after a failure): their redzones are still poisoned.
    if (W->stacks[i]) ASAN_UNPOISON_MEMORY_REGION(W->stacks[i], W->stack_size);
#endif
    return W->stacks[i] != nullptr;
}

Status run_block(Worker* W, const Launch& L, uint64_t linear) {
    unsigned gx = L.grid[0], gy = L.grid[1];
    W->block.bid = emu_uint3{(unsigned)(linear % gx), (unsigned)((linear / gx) % gy), (unsigned)(linear / ((uint64_t)gx * gy))};
    W->block.bdim = emu_uint3{L.block[0], L.block[1], L.block[2]};
    W->block.gdim = emu_uint3{L.grid[0], L.grid[1], L.grid[2]};
    W->L = &L;
    W->nthreads = L.block[0] * L.block[1] * L.block[2];
    W->direct = !L.f->ptx.collective;
    W->failed = false;
    W->fail_msg.clear();
    W->spin_yields = 0;
    W->ready.clear();
    W->bar_count = W->bar_sum = 0;
    W->cur_thr = nullptr;
    W->rng = mix64(config().seed ^ mix64(std::hash<std::string>()(L.f->name)) ^ mix64(L.ordinal * 0x100000001b3ull + linear));
    poison_shared(W, L);
    W->in_kernel = true;
    if (W->direct) {
        if (!ensure_stack(W, 0)) return Status::fail(CUDA_ERROR_OUT_OF_MEMORY, "cannot map a fiber stack");
        Fiber* f = &W->fibers[0];
        f->stack_lo = W->stacks[0];
        f->stack_size = W->stack_size;
        f->state = F_RUNNING;
        f->sp = make_context(f->stack_lo, f->stack_size, direct_main, f);
        to_fiber(W, f);
    } else {
        for (unsigned w = 0; w * 32 < W->nthreads; ++w) {
            unsigned n = W->nthreads - w * 32;
            W->warp_exist[w] = n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
            W->warp_arrived[w] = 0;
        }
        unsigned bx = L.block[0], by = L.block[1];
        for (unsigned i = 0; i < W->nthreads; ++i) {
            if (!ensure_stack(W, i)) {
                W->in_kernel = false;
                return Status::fail(CUDA_ERROR_OUT_OF_MEMORY, "cannot map fiber stacks");
            }
            Fiber& f = W->fibers[i];
            f.thr.tid = emu_uint3{i % bx, (i / bx) % by, i / (bx * by)};
            f.thr.lane = i & 31u;
            f.thr.warp = i >> 5;
            f.stack_lo = W->stacks[i];
            f.stack_size = W->stack_size;
            f.state = F_READY;
            f.atomics = 0;
            f.fake = nullptr;
            // Stack tops at different offsets modulo the cache's set size: stacks 64 KiB apart
            // would put every fiber's hot frames in the same cache sets.
            size_t color = (size_t)(i % 53) * 320;
            f.sp = make_context(f.stack_lo, f.stack_size - color, fiber_main, &f);
            W->ready.push_back((int)i);
        }
        shuffle_released(W, W->nthreads);
        while (!W->ready.empty() && !W->failed) {
            Fiber* f = pick_ready(W);
            f->state = F_RUNNING;
            W->cur_thr = &f->thr;
            to_fiber(W, f);
        }
        if (!W->failed) {
            for (unsigned i = 0; i < W->nthreads; ++i) {
                if (W->fibers[i].state != F_DONE) {
                    W->cur_thr = nullptr;
                    W->in_kernel = false;
                    return Status::fail(CUDA_ERROR_LAUNCH_FAILED, where(W) + ": " + describe_deadlock(W));
                }
            }
        }
    }
    W->in_kernel = false;
    W->cur_thr = nullptr;
    if (W->failed) return Status::fail(W->fail_code, W->fail_msg);
    return Status{};
}

// ---- the pool of OS threads that share the blocks of one launch ----------------------------

struct Pool {
    std::mutex mu;
    std::condition_variable cv, done_cv;
    std::vector<std::thread> threads;
    std::function<void()> job;
    uint64_t generation = 0;
    int busy = 0;
    std::mutex exclusive;  // one launch uses the pool at a time
};
Pool& pool() {
    static Pool* p = new Pool;
    return *p;
}
void pool_start(int n) {
    Pool& P = pool();
    std::lock_guard<std::mutex> g(P.mu);
    while ((int)P.threads.size() < n) {
        P.threads.emplace_back([&P] {
            uint64_t seen = 0;
            for (;;) {
                std::function<void()> job;
                {
                    std::unique_lock<std::mutex> lk(P.mu);
                    P.cv.wait(lk, [&] { return P.generation != seen; });
                    seen = P.generation;
                    job = P.job;
                }
                job();
                std::lock_guard<std::mutex> lk(P.mu);
                if (--P.busy == 0) P.done_cv.notify_all();
            }
        });
        P.threads.back().detach();
    }
}

// ---- watchdog ------------------------------------------------------------------------------

struct Active {
    std::string name;
    double start;
};
std::mutex g_active_mu;
std::list<Active> g_active;

double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void watchdog_start() {
    static std::once_flag once;
    std::call_once(once, [] {
        std::thread([] {
            for (;;) {
                sleep(2);
                double t = now_s();
                std::lock_guard<std::mutex> g(g_active_mu);
                for (const Active& a : g_active)
                    if (t - a.start > config().watchdog_s) {
                        fprintf(stderr,
                                "emu: kernel `%s` has run for %.0f s (EMU_WATCHDOG_S=%.0f): a thread spinning on a value no "
                                "other thread will write? CUDA_ERROR_LAUNCH_TIMEOUT; aborting\n",
                                a.name.c_str(), t - a.start, config().watchdog_s);
                        _exit(70);
                    }
            }
        }).detach();
    });
}

// ---- faults inside kernels -----------------------------------------------------------------

#if !defined(EMU_ASAN)
struct sigaction g_old_segv, g_old_bus;

void fault_handler(int sig, siginfo_t* si, void* uc) {
    Worker* W = tw;
    if (W && W->in_kernel && W->cur && W->cur->state == F_RUNNING) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, sig);
        pthread_sigmask(SIG_UNBLOCK, &s, nullptr);
        char m[200];
        const char* a = static_cast<const char*>(si->si_addr);
        long page = sysconf(_SC_PAGESIZE);
        if (a >= W->cur->stack_lo - page && a < W->cur->stack_lo)
            snprintf(m, sizeof m, "stack overflow of the CUDA thread (EMU_STACK_KB=%zu)", config().stack_kb);
        else
            snprintf(m, sizeof m, "illegal memory access at address %p (%s)", si->si_addr, sig == SIGBUS ? "SIGBUS" : "SIGSEGV");
        fail_now(W, CUDA_ERROR_ILLEGAL_ADDRESS, m);
    }
    struct sigaction* old = sig == SIGBUS ? &g_old_bus : &g_old_segv;
    if (old->sa_flags & SA_SIGINFO) {
        if (old->sa_sigaction) {
            old->sa_sigaction(sig, si, uc);
            return;
        }
    } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
        old->sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}
#endif

}  // namespace

void install_fault_handler() {
#if !defined(EMU_ASAN)
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
    });
#endif
}

Status execute(const Launch& L) {
    uint64_t nblocks = (uint64_t)L.grid[0] * L.grid[1] * L.grid[2];
    Perm order(nblocks, mix64(config().seed ^ 0x51ed ^ mix64(std::hash<std::string>()(L.f->name)) ^ L.ordinal));
    watchdog_start();
    std::list<Active>::iterator me;
    {
        std::lock_guard<std::mutex> g(g_active_mu);
        me = g_active.insert(g_active.end(), Active{L.f->name, now_s()});
    }
    std::atomic<uint64_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex err_mu;
    Status first;
    auto run = [&] {
        Worker* W = worker();
        for (;;) {
            if (stop.load(std::memory_order_relaxed)) return;
            uint64_t i = next.fetch_add(1);
            if (i >= nblocks) return;
            Status s = run_block(W, L, order(i));
            if (!s.ok()) {
                std::lock_guard<std::mutex> g(err_mu);
                if (first.ok()) first = s;
                stop = true;
                return;
            }
        }
    };
    int want = config().threads;
    Pool& P = pool();
    if (want > 1 && nblocks > 1 && P.exclusive.try_lock()) {
        int helpers = (int)std::min<uint64_t>((uint64_t)want - 1, nblocks - 1);
        pool_start(helpers);
        {
            std::lock_guard<std::mutex> g(P.mu);
            P.job = run;
            P.busy = (int)P.threads.size();
            ++P.generation;
        }
        P.cv.notify_all();
        run();
        {
            std::unique_lock<std::mutex> lk(P.mu);
            P.done_cv.wait(lk, [&] { return P.busy == 0; });
            P.job = nullptr;
        }
        P.exclusive.unlock();
    } else {
        run();
    }
    {
        std::lock_guard<std::mutex> g(g_active_mu);
        g_active.erase(me);
    }
    return first;
}

}  // namespace emu

// ---- the ABI exported to the kernels -------------------------------------------------------

using emu::tw;

extern "C" __attribute__((visibility("default"))) const emu_thread_t* emu_thread(void) { return tw->cur_thr; }
extern "C" __attribute__((visibility("default"))) const emu_block_t* emu_block(void) { return &tw->block; }
extern "C" __attribute__((visibility("default"))) int emu_barrier(int op, int pred) { return emu::barrier(op, pred); }
extern "C" __attribute__((visibility("default"))) uint64_t emu_warp(int op, unsigned int mask, uint64_t value, int b, int c) {
    return emu::warp(op, mask, value, b, c);
}
extern "C" __attribute__((visibility("default"))) unsigned int emu_activemask(void) {
    emu::Worker* W = tw;
    if (!W || !W->in_kernel || !W->cur_thr) return 0;
    if (W->direct) return 1u << W->cur_thr->lane;
    unsigned w = W->cur_thr->warp;
    uint32_t m = 0;
    for (unsigned l = 0; l < 32 && w * 32 + l < W->nthreads; ++l)
        if (W->fibers[w * 32 + l].state != emu::F_DONE) m |= 1u << l;
    return m;
}
extern "C" __attribute__((visibility("default"))) void emu_atomic_hook(void) { emu::atomic_hook(); }
extern "C" __attribute__((visibility("default"))) void emu_fail(const char* msg) {
    emu::Worker* W = tw;
    if (!W || !W->in_kernel || !W->cur) {
        fprintf(stderr, "emu: %s (outside a kernel launch)\n", msg);
        abort();
    }
    emu::fail_now(W, strncmp(msg, "assertion", 9) == 0 ? CUDA_ERROR_ASSERT : CUDA_ERROR_LAUNCH_FAILED, msg);
}
