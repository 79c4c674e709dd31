// Hopper's warpgroup-level tensor-core instructions (sm_90a `wgmma`) for the host-compiled
// kernels (part of cuda_shim.h), with the operand layouts, descriptor encoding, accumulator
// fragment and asynchronous completion of the PTX ISA ("Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate Operation"). A kernel wraps each instruction in a __device__ function
// (kernels/conv_wgmma.cu), whose body is the `asm` for NVRTC and, under the emulator
// (ICHCAM_CUDA_EMU, the one guard of the file), comes from here with the same signature:
//
//   ptx_smem_addr(p)                   cvta.to.shared.u32: the shared-window address of p
//   ptx_fence_proxy_async()            fence.proxy.async.shared::cta
//   ptx_wgmma_fence()                  wgmma.fence.sync.aligned
//   ptx_wgmma_commit_group()           wgmma.commit_group.sync.aligned
//   ptx_wgmma_wait_group<N>()          wgmma.wait_group.sync.aligned N
//   ptx_wgmma_m64n{64,128}k16_f32_bf16(d, desc_a, desc_b, scale_d)
//       wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 d, desc-a, desc-b, p, 1, 1, 0, 0
//       (p = scale_d != 0; both operands K-major in shared memory, not negated, not transposed)
//   ptx_wgmma_m64n{64,128}k16_f32_bf16_trans<TA, TB>(d, desc_a, desc_b, scale_d)
//       the same with imm-trans-a = TA, imm-trans-b = TB (`..., p, 1, 1, TA, TB`): an operand
//       with 1 is MN-major (A M-major, B N-major)
//
// What is modelled, exactly as the ISA lays it out:
//
// - The shared window. The descriptors carry 18-bit shared-memory addresses. Here the window
//   of a block is the kernel file's (first) `extern __shared__` array, and its address 0 is
//   that array's host address rounded down to 1024 bytes, so the swizzle bits of a window
//   address are those of the host address: a kernel that aligns its tiles to 1024 bytes in
//   the window (as it must on a GPU, whose dynamic shared memory starts at a low window
//   address) is aligned here too. An operand outside the array is a launch failure; so is
//   ptx_smem_addr of anything else (static __shared__ arrays are not in the window here).
// - Descriptors (64 bits): start address bits 0-13, leading-dimension byte offset (LBO) bits
//   16-29, stride-dimension byte offset (SBO) bits 32-45, each the byte value >> 4; matrix
//   base offset bits 49-51; swizzle mode bits 62-63 (0 none, 1 128-byte, 2 64-byte, 3 32-byte).
//   Reserved bits set, a nonzero base offset (not modelled), or a swizzled start address that
//   is not in the first row of its pattern (which needs the base offset) fail the launch.
// - K-major operands of 16-bit elements (A: 64 rows m, B: N rows n, 16 k each), the canonical
//   layouts (T = 8 elements = 16 bytes; row r, element k; byte offset from the start):
//     no swizzle: 8x16-byte core matrices, (r % 8) * 16 + (r / 8) * SBO + (k / 8) * LBO + (k % 8) * 2
//     W-byte swizzle (W = 128, 64, 32): (r % 8) * W + (r / 8) * SBO + 2k, then the address's
//     16-byte chunk bits [4, 4 + log2(W/16)) XORed with its bits [7, 7 + log2(W/16)) (the
//     swizzle is a function of the window address: cute's Swizzle<3,4,3>, <2,4,3>, <1,4,3>);
//     LBO is unused there (the 32 bytes of k fit in one swizzle row).
// - MN-major operands of 16-bit elements (imm-trans 1; row r is m of A or n of B, the
//   contiguous index), the ISA's canonical MN-major layouts (its "Canonical Layouts" table in
//   CuTe notation, T = 8: none ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)); W-byte swizzle
//   ((T,W/16,m),(8,k)):((1,T,LBO),(W/2,SBO)); as cute's make_gmma_desc for Major::MN):
//     no swizzle: core matrices of 8 k x 16 bytes (8 r each), (r % 8) * 2 + (r / 8) * SBO +
//       (k % 8) * 16 + (k / 8) * LBO
//     W-byte swizzle: atoms of 8 k x W bytes (W/2 r each), (r % (W/2)) * 2 + (r / (W/2)) * LBO +
//       (k % 8) * W + (k / 8) * SBO, then the same XOR of the address as K-major
//   i.e. the roles of the offsets swap between the two: LBO steps k without swizzle and m/n
//   with it (unused where the operand's 64 or N rows fit one atom), SBO the other way. A
//   swizzled MN-major start address that is not the start of its pattern (8W-byte aligned)
//   fails the launch (not modelled).
// - The accumulator fragment of m64nNk16 with f32 D: thread t of the warpgroup (warp w = t /
//   32 % 4, lane l, g = l / 4, q = l % 4) holds d[i], i < N/2, = D[16w + g + 8 * ((i / 2) % 2)]
//   [8 * (i / 4) + 2q + i % 2]. D = A . B^T + (scale_d ? D : 0), products of bf16 exact in
//   f32, accumulated in k order from the old D with fmaf (as emu_mma.h: a GPU agrees to f32
//   rounding, not bit for bit).
// - The warpgroup: wgmma.mma_async is a collective of the 4 warps 4k..4k+3 (k = warp / 4),
//   all 128 threads with the same descriptors, scale-d and shape (the driver's
//   EMU_WARP_GROUP); a warpgroup that is not 4 complete warps of the block, a thread that
//   does not arrive, or different operands fail the launch, naming the kernel.
// - Asynchrony. mma_async reads its operands at issue (a snapshot of what this thread's
//   elements depend on: A rows 16w + g and + 8, B rows 8j + 2q and + 1) and poisons d with
//   NaN: the results land only when wgmma.wait_group(N) completes the committed group it
//   belongs to (every group but the N most recent; uncommitted ones stay pending). So a
//   kernel that reads the accumulators before the wait reads NaN, and at the wait the
//   shared memory the operation read is compared with the snapshot: a kernel that
//   overwrote an operand before waiting fails the launch ("overwritten before
//   wgmma.wait_group"). Successive mma_async on the same d chain in issue order (the ISA's
//   exception that needs no fence between them).
// - Ordering rules: a wgmma.mma_async needs a wgmma.fence by its thread since that thread's
//   last wgmma.wait_group (or the kernel's start), and at least one fence.proxy.async by its
//   thread since the block started; else a launch failure.
//
// Not modelled: the hardware's timing and any overlap (everything runs at issue / wait);
// operands from registers (the A-in-registers form), MN-major operands of other element
// sizes (tf32 has none; 8-bit types), the negate immediates, other types and shapes; whether the generic-proxy stores of each
// thread that wrote an operand were fenced (only that the issuing thread fenced once); the
// base offset; `.sync.aligned` of fence, commit and wait (per thread here, not collectives).
#pragma once

#include <pthread.h>

#include <map>
#include <mutex>
#include <vector>

extern "C" const emu_module_t* emu_module(void);

// The block's shared window: [lo, hi) the dynamic shared array, base its address 0.
struct emu_wg_window_t {
    unsigned char *base, *lo, *hi;
};

static inline emu_wg_window_t emu_wg_window() {
    const emu_module_t* m = emu_module();
    if (m->ndyn_shared < 1) emu_fail("wgmma: the kernel file has no extern __shared__ array (the emulator's shared window)");
    unsigned char* a = (unsigned char*)m->dyn_shared[0].addr();
    emu_wg_window_t w;
    w.base = (unsigned char*)((uintptr_t)a & ~(uintptr_t)1023);
    w.lo = a;
    w.hi = a + m->dyn_shared[0].capacity;
    return w;
}

static inline unsigned ptx_smem_addr(const void* p) {
    const emu_wg_window_t w = emu_wg_window();
    const unsigned char* c = (const unsigned char*)p;
    if (c < w.lo || c >= w.hi)
        emu_fail("ptx_smem_addr: the pointer is not in the kernel file's extern __shared__ array (the emulator's shared "
                 "window for wgmma descriptors)");
    return (unsigned)(c - w.base);
}

struct emu_wg_desc {
    unsigned start, lbo, sbo, mode;
};

static inline emu_wg_desc emu_wg_decode(uint64_t d, const char* which) {
    char m[200];
    const uint64_t reserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3ffull << 52);
    if (d & reserved) {
        snprintf(m, sizeof m, "wgmma: descriptor of %s 0x%016llx has reserved bits set", which, (unsigned long long)d);
        emu_fail(m);
    }
    if ((d >> 49) & 7u) {
        snprintf(m, sizeof m, "wgmma: descriptor of %s 0x%016llx has matrix base offset %u (not modelled: only 0)", which,
                 (unsigned long long)d, (unsigned)((d >> 49) & 7u));
        emu_fail(m);
    }
    emu_wg_desc r;
    r.start = (unsigned)(d & 0x3fffu) << 4;
    r.lbo = (unsigned)((d >> 16) & 0x3fffu) << 4;
    r.sbo = (unsigned)((d >> 32) & 0x3fffu) << 4;
    r.mode = (unsigned)(d >> 62);
    if (r.mode != 0) {
        const unsigned W = 128u >> (r.mode - 1);  // 1: 128, 2: 64, 3: 32 bytes
        if (r.start % (8 * W) >= W) {
            snprintf(m, sizeof m,
                     "wgmma: descriptor of %s 0x%016llx: start address 0x%x is not in the first row of its %u-byte swizzle "
                     "pattern (that needs the matrix base offset, not modelled)",
                     which, (unsigned long long)d, r.start, 8 * W);
            emu_fail(m);
        }
    }
    return r;
}

// The window address of element (row, k) of a 16-bit operand (see the top): K-major, or
// MN-major where `trans` (imm-trans-a / imm-trans-b 1; row is then m or n, the contiguous one).
static inline unsigned emu_wg_addr(const emu_wg_desc& d, int row, int k, bool trans) {
    if (!trans) {
        if (d.mode == 0) return d.start + (row & 7) * 16 + (row >> 3) * d.sbo + (k >> 3) * d.lbo + (k & 7) * 2;
        const unsigned W = 128u >> (d.mode - 1), mask = W / 16 - 1;
        const unsigned a = d.start + (row & 7) * W + (row >> 3) * d.sbo + 2 * k;
        return a ^ (((a >> 7) & mask) << 4);
    }
    // MN-major: 8 k of a core matrix / swizzle atom are its rows, 16 (none) or W bytes apart;
    // none: the next 8 rows (m or n) SBO on, the next 8 k LBO on; W-byte swizzle: the next
    // W / 2 rows LBO on, the next 8 k SBO on (the roles of the two offsets swap).
    if (d.mode == 0) return d.start + (row & 7) * 2 + (row >> 3) * d.sbo + (k & 7) * 16 + (k >> 3) * d.lbo;
    const unsigned W = 128u >> (d.mode - 1), E = W / 2, mask = W / 16 - 1;
    const unsigned a = d.start + (row % E) * 2 + (row / E) * d.lbo + (k & 7) * W + (k >> 3) * d.sbo;
    return a ^ (((a >> 7) & mask) << 4);
}

// MN-major and swizzled: the start address must be the start of its swizzle pattern (8W bytes
// aligned): an MN-major start inside the pattern's first row is not modelled.
static inline void emu_wg_check_trans(const emu_wg_desc& r, uint64_t d, const char* which) {
    if (r.mode == 0) return;
    const unsigned W = 128u >> (r.mode - 1);
    if (r.start % (8 * W) != 0) {
        char m[240];
        snprintf(m, sizeof m,
                 "wgmma: descriptor of %s 0x%016llx (MN-major, imm-trans 1): start address 0x%x is not the start of its "
                 "%u-byte swizzle pattern (an MN-major start inside the pattern is not modelled)",
                 which, (unsigned long long)d, r.start, 8 * W);
        emu_fail(m);
    }
}

static inline uint16_t emu_wg_read(const emu_wg_window_t& w, unsigned a, const char* which, int row, int k) {
    const unsigned char* p = w.base + a;
    if (p < w.lo || p + 2 > w.hi) {
        char m[200];
        snprintf(m, sizeof m, "wgmma: %s row %d, k %d lies at shared address 0x%x, outside the dynamic shared memory", which,
                 row, k, a);
        emu_fail(m);
    }
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

struct emu_wg_op {
    float* d;
    int n;  // N of m64nNk16
    int scale_d;
    bool chained;  // d is the accumulator of an earlier pending op: its result is this one's C
    uint64_t da, db;
    bool ta, tb;  // imm-trans-a, imm-trans-b: MN-major A / B
    unsigned long long group;
    std::vector<float> c;       // N/2 (unless chained)
    std::vector<uint16_t> snap;  // A rows 16w+g, +8 (16 k each), then B rows 8j+2q+e (16 k each)
};

struct emu_wg_thread {
    emu_uint3 bid = {~0u, ~0u, ~0u};
    unsigned long long committed = 0;
    bool fenced = false, proxy = false;
    std::vector<emu_wg_op> pending;
};

// The calling CUDA thread's wgmma state (one table per OS thread, emptied for a new block,
// as emu_pipeline.h's).
static inline emu_wg_thread& emu_wg() {
    typedef std::vector<emu_wg_thread> table;
    thread_local table* cur = nullptr;  // poisoned at every block start
    const emu_block_t* b = emu_block();
    const emu_uint3 t = emu_thread()->tid;
    const size_t n = (size_t)b->bdim.x * b->bdim.y * b->bdim.z;
    const size_t i = t.x + (size_t)b->bdim.x * (t.y + (size_t)b->bdim.y * t.z);
    if (cur == nullptr || cur == (table*)~(uintptr_t)0) {
        static std::mutex mu;
        static std::map<pthread_t, table*> tables;
        std::lock_guard<std::mutex> g(mu);
        table*& tb = tables[pthread_self()];
        if (tb == nullptr) tb = new table();
        cur = tb;
        for (emu_wg_thread& s : *cur) s = emu_wg_thread();
    }
    if (cur->size() < n) cur->resize(n);
    emu_wg_thread& s = (*cur)[i];
    if (s.bid.x != b->bid.x || s.bid.y != b->bid.y || s.bid.z != b->bid.z) {
        s = emu_wg_thread();
        s.bid = b->bid;
    }
    return s;
}

// The elements op's thread depends on, in snapshot order: (is_b, row, k) for each entry.
template <class F>
static inline void emu_wg_elements(int n, F f) {
    const emu_thread_t* t = emu_thread();
    const int w = (int)(t->warp & 3u), g = (int)t->lane / 4, q = (int)t->lane % 4;
    for (int r = 0; r < 2; ++r)
        for (int k = 0; k < 16; ++k) f(false, 16 * w + g + 8 * r, k);
    for (int j = 0; j < n / 8; ++j)
        for (int e = 0; e < 2; ++e)
            for (int k = 0; k < 16; ++k) f(true, 8 * j + 2 * q + e, k);
}

template <int N>
static inline void emu_wgmma_bf16(float* d, uint64_t da, uint64_t db, int scale_d, bool ta = false, bool tb = false) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "m64nNk16: N a multiple of 8 up to 256");
    emu_wg_thread& s = emu_wg();
    if (!s.fenced)
        emu_fail("wgmma.mma_async without a wgmma.fence since this thread's last wgmma.wait_group (or the kernel start): "
                 "the ISA requires the fence before the first wgmma and after the accumulators were accessed");
    if (!s.proxy)
        emu_fail("wgmma.mma_async by a thread that never executed fence.proxy.async: shared memory written by ordinary "
                 "stores is not visible to the async proxy that wgmma reads through");
    // The rendezvous of the warpgroup, every thread with the same operands.
    uint64_t key = da * 0x9E3779B97F4A7C15ull ^ (db + 0x632BE59BD9B4E019ull) * 0xD6E8FEB86659FD93ull;
    key ^= (uint64_t)(scale_d != 0) << 63 | (uint64_t)ta << 62 | (uint64_t)tb << 61;
    (void)emu_warp(EMU_WARP_GROUP, 0xffffffffu, key, N, 0);
    const emu_wg_desc a = emu_wg_decode(da, "A"), b = emu_wg_decode(db, "B");
    if (ta) emu_wg_check_trans(a, da, "A");
    if (tb) emu_wg_check_trans(b, db, "B");
    const emu_wg_window_t win = emu_wg_window();
    emu_wg_op op;
    op.d = d;
    op.n = N;
    op.scale_d = scale_d != 0;
    op.da = da;
    op.db = db;
    op.ta = ta;
    op.tb = tb;
    op.group = s.committed;
    op.chained = false;
    for (const emu_wg_op& p : s.pending)
        if (p.d == d) op.chained = true;
    if (!op.chained) op.c.assign(d, d + N / 2);
    op.snap.reserve(32 + N / 4 * 16);
    emu_wg_elements(N, [&](bool is_b, int row, int k) {
        op.snap.push_back(is_b ? emu_wg_read(win, emu_wg_addr(b, row, k, tb), "B", row, k)
                               : emu_wg_read(win, emu_wg_addr(a, row, k, ta), "A", row, k));
    });
    const float nan = emu_bits<float>(0x7fc00000u);
    for (int i = 0; i < N / 2; ++i) d[i] = nan;
    s.pending.push_back(std::move(op));
}

static inline float emu_wg_bf16(uint16_t h) { return emu_bits<float>((uint32_t)h << 16); }

// Completes op: checks that shared memory still holds what it read, then writes d.
static inline void emu_wg_complete(const emu_wg_op& op) {
    const emu_wg_desc a = emu_wg_decode(op.da, "A"), b = emu_wg_decode(op.db, "B");
    const emu_wg_window_t win = emu_wg_window();
    size_t i = 0;
    emu_wg_elements(op.n, [&](bool is_b, int row, int k) {
        const unsigned addr = is_b ? emu_wg_addr(b, row, k, op.tb) : emu_wg_addr(a, row, k, op.ta);
        if (emu_wg_read(win, addr, is_b ? "B" : "A", row, k) != op.snap[i]) {
            char m[240];
            snprintf(m, sizeof m,
                     "wgmma: operand %s (row %d, k %d, shared address 0x%x) was overwritten before wgmma.wait_group completed "
                     "the wgmma that reads it",
                     is_b ? "B" : "A", row, k, addr);
            emu_fail(m);
        }
        ++i;
    });
    const uint16_t* as = op.snap.data();
    const uint16_t* bs = as + 32;
    float out[128];
    for (int e = 0; e < op.n / 2; ++e) {
        const int j = e / 4, r = (e / 2) % 2, col = e % 2;
        float acc = op.scale_d ? (op.chained ? op.d[e] : op.c[e]) : 0.0f;
        const uint16_t* ar = as + 16 * r;
        const uint16_t* br = bs + 16 * (2 * j + col);
        for (int k = 0; k < 16; ++k) acc = fmaf(emu_wg_bf16(ar[k]), emu_wg_bf16(br[k]), acc);
        out[e] = acc;
    }
    for (int e = 0; e < op.n / 2; ++e) op.d[e] = out[e];
}

static inline void ptx_fence_proxy_async() { emu_wg().proxy = true; }
static inline void ptx_wgmma_fence() { emu_wg().fenced = true; }
static inline void ptx_wgmma_commit_group() { emu_wg().committed++; }

template <int N>
static inline void ptx_wgmma_wait_group() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group N: 0..7");
    emu_wg_thread& s = emu_wg();
    s.fenced = false;
    if (s.committed <= (unsigned long long)N) return;
    const unsigned long long done = s.committed - N;  // groups [0, done) complete
    size_t keep = 0;
    for (size_t i = 0; i < s.pending.size(); ++i) {
        if (s.pending[i].group < done)
            emu_wg_complete(s.pending[i]);
        else
            s.pending[keep++] = std::move(s.pending[i]);
    }
    s.pending.resize(keep);
}

static inline void ptx_wgmma_m64n64k16_f32_bf16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    emu_wgmma_bf16<64>(d, desc_a, desc_b, scale_d);
}
static inline void ptx_wgmma_m64n128k16_f32_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    emu_wgmma_bf16<128>(d, desc_a, desc_b, scale_d);
}
// The same with imm-trans-a = TA, imm-trans-b = TB (1: that operand MN-major).
template <int TA, int TB>
static inline void ptx_wgmma_m64n64k16_f32_bf16_trans(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1), "imm-trans-a, imm-trans-b: 0 or 1");
    emu_wgmma_bf16<64>(d, desc_a, desc_b, scale_d, TA != 0, TB != 0);
}
template <int TA, int TB>
static inline void ptx_wgmma_m64n128k16_f32_bf16_trans(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1), "imm-trans-a, imm-trans-b: 0 or 1");
    emu_wgmma_bf16<128>(d, desc_a, desc_b, scale_d, TA != 0, TB != 0);
}

// No-op here: on a GPU an empty asm with "+f" on each accumulator, so that the compiler
// neither moves their reads above wgmma.wait_group nor keeps copies across it.
template <int N>
static inline void ptx_wgmma_fence_operand(float (&)[N]) {}

// cp.async of 16 bytes (cp.async.cg.shared.global [dst], [src], 16, src_bytes: the last 16 -
// src_bytes bytes zero), its commit and wait_group: the <cuda_pipeline_primitives.h> model of
// emu_pipeline.h (a copy lands when its group is waited for).
static inline void ptx_cp_async_16(void* dst, const void* src, int src_bytes) {
    if (src_bytes < 0 || src_bytes > 16) emu_fail("cp.async: src-size must be 0..16");
    __pipeline_memcpy_async(dst, src, 16, (size_t)(16 - src_bytes));
}
static inline void ptx_cp_async_commit() { __pipeline_commit(); }
template <int N>
static inline void ptx_cp_async_wait() {
    __pipeline_wait_prior(N);
}
