// The warp-level tensor-core primitives of inline PTX for the host-compiled kernels (part of
// cuda_shim.h): ldmatrix and mma.sync, with the per-lane register layouts of the PTX ISA.
//
// A kernel that uses inline PTX wraps each instruction in a small __device__ function (e.g.
// kernels/conv_mma.cu: ptx_ldmatrix_x4, ptx_mma_bf16_m16n8k16), whose body is the `asm` for
// NVRTC and, under the emulator (ICHCAM_CUDA_EMU, the one guard such a file has), comes from
// here under the same name and signature:
//
//   ptx_ldmatrix_x1/_x2/_x4(r, p)        ldmatrix.sync.aligned.m8n8.x{1,2,4}.shared.b16
//   ptx_ldmatrix_x1/_x2/_x4_trans(r, p)  ... .trans
//   ptx_mma_bf16_m16n8k16(d, a, b, c)    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//   ptx_mma_tf32_m16n8k8(d, a, b, c)     mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
//
// Unlike WMMA (emu_wmma.h, whose per-lane layout CUDA leaves unspecified, so every lane holds
// the whole tile there), these registers have a documented owner per element, and the code
// around them indexes by it; so each lane holds exactly its own registers, and the
// collectives move the elements between lanes as the hardware does (g = lane / 4,
// t = lane % 4):
//
// - ldmatrix m8n8 .b16: lane 8*j + i gives the address of row i of matrix j (16 bytes,
//   16-byte aligned; lanes 0-7 for .x1, 0-15 for .x2, all for .x4, the others' addresses
//   ignored); register r[j] of lane L holds row g, columns 2t and 2t+1 of matrix j (lower
//   column in the low 16 bits); with .trans, rows 2t and 2t+1 of column g.
// - mma m16n8k16 bf16: A (16x16, row) a[0..3] = (row g, cols 2t, 2t+1), (g+8, 2t..),
//   (g, 2t+8..), (g+8, 2t+8..); B (16x8, col) b[0] = (k 2t, 2t+1; n g), b[1] = (k 2t+8,
//   2t+9; n g); C and D (16x8 f32) c[i] = (row g + 8*(i/2), col 2t + i%2).
// - mma m16n8k8 tf32: A (16x8) a[0] = (g, t), a[1] = (g+8, t), a[2] = (g, t+4), a[3] =
//   (g+8, t+4); B (8x8) b[0] = (k t, n g), b[1] = (k t+4, n g); C, D as above. The
//   operands are read as tf32: the low 13 mantissa bits ignored (truncated).
//
// Each is a warp collective of all 32 lanes (.sync.aligned): a lane publishes what it
// holds (an ldmatrix lane the 16 bytes of the row it addresses, read before the collective,
// so that no lane can have written shared memory in between, as in the one instruction of a
// GPU; an mma lane its A and B registers) in a per-warp exchange area, the scheduler waits
// for every lane with the same operation (else the launch fails, naming who waits where),
// and each lane then takes its own results from the area. Two areas alternate, so a lane
// that runs ahead to the next primitive cannot overwrite what a slower lane still reads.
// The products of bf16 and tf32 values are exact in f32; each D element is accumulated in
// k order from c with fmaf (a GPU's tensor core adds in its own order: results agree to f32
// rounding, not bit for bit).
#pragma once

#include <pthread.h>

#include <map>
#include <mutex>
#include <vector>

struct emu_mma_slot {
    uint32_t w[6];
};

struct emu_mma_state {
    emu_uint3 bid = {~0u, ~0u, ~0u};
    std::vector<emu_mma_slot> slots;  // [2 areas][warps][32 lanes]
    std::vector<unsigned> phase;      // per thread of the block: primitives it has run
};

// The exchange areas of the running block, one set per OS thread (like __shared__), emptied
// when a new block starts on it (the thread_local pointer is poisoned at every block start,
// as emu_pipeline.h explains; the block index is compared too, for EMU_POISON=0).
static inline emu_mma_state& emu_mma_area() {
    thread_local emu_mma_state* cur = nullptr;
    const emu_block_t* b = emu_block();
    const size_t n = (size_t)b->bdim.x * b->bdim.y * b->bdim.z;
    const size_t warps = (n + 31) / 32;
    bool reset = false;
    if (cur == nullptr || cur == (emu_mma_state*)~(uintptr_t)0) {
        static std::mutex mu;
        static std::map<pthread_t, emu_mma_state*> states;
        std::lock_guard<std::mutex> g(mu);
        emu_mma_state*& s = states[pthread_self()];
        if (s == nullptr) s = new emu_mma_state();
        cur = s;
        reset = true;
    }
    if (cur->bid.x != b->bid.x || cur->bid.y != b->bid.y || cur->bid.z != b->bid.z) reset = true;
    if (reset) {
        cur->bid = b->bid;
        cur->phase.assign(n, 0);
        cur->slots.assign(2 * warps * 32, emu_mma_slot{});
    }
    if (cur->phase.size() < n) cur->phase.resize(n, 0);
    if (cur->slots.size() < 2 * warps * 32) cur->slots.resize(2 * warps * 32);
    return *cur;
}

// Publishes `n` words of the calling lane, waits for the warp's 32 lanes in primitive `op`,
// and returns the warp's 32 published slots.
static inline const emu_mma_slot* emu_mma_exchange(const uint32_t* words, int n, unsigned op) {
    emu_mma_state& st = emu_mma_area();
    const emu_thread_t* t = emu_thread();
    const emu_block_t* b = emu_block();
    const size_t tid = t->tid.x + (size_t)b->bdim.x * (t->tid.y + (size_t)b->bdim.y * t->tid.z);
    const size_t warps = st.slots.size() / 64;
    unsigned& ph = st.phase[tid];
    emu_mma_slot* area = &st.slots[((ph & 1u) * warps + t->warp) * 32];
    ph++;
    memcpy(area[t->lane].w, words, (size_t)n * 4);
    (void)emu_warp(EMU_WARP_WMMA, 0xffffffffu, 0x6d6d610000ull | op, (int)op, 32);
    return area;
}

static inline float emu_bf16_bits_to_f(uint32_t h) { return emu_bits<float>((h & 0xffffu) << 16); }
static inline uint32_t emu_half_of(const emu_mma_slot& s, int reg, int hi) { return (s.w[reg] >> (16 * hi)) & 0xffffu; }

template <int NUM, bool TRANS>
static inline void emu_ldmatrix(uint32_t* r, const void* p) {
    const unsigned lane = emu_thread()->lane;
    uint32_t row[4] = {0, 0, 0, 0};
    if (lane < 8u * NUM) {
        if ((uintptr_t)p & 15u) emu_fail("ldmatrix: a row address is not 16-byte aligned");
        memcpy(row, p, 16);
    }
    const emu_mma_slot* s = emu_mma_exchange(row, 4, 0x10u + NUM * 2 + (TRANS ? 1 : 0));
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < NUM; ++j) {
        if (!TRANS) {
            r[j] = s[j * 8 + g].w[t];  // row g, columns 2t, 2t+1
        } else {
            // Column g of rows 2t and 2t+1: element g of those rows (16-bit word g).
            const uint32_t lo = emu_half_of(s[j * 8 + 2 * t], g / 2, g & 1);
            const uint32_t hi = emu_half_of(s[j * 8 + 2 * t + 1], g / 2, g & 1);
            r[j] = lo | (hi << 16);
        }
    }
}

static inline void ptx_ldmatrix_x1(unsigned (&r)[1], const void* p) { emu_ldmatrix<1, false>(r, p); }
static inline void ptx_ldmatrix_x2(unsigned (&r)[2], const void* p) { emu_ldmatrix<2, false>(r, p); }
static inline void ptx_ldmatrix_x4(unsigned (&r)[4], const void* p) { emu_ldmatrix<4, false>(r, p); }
static inline void ptx_ldmatrix_x1_trans(unsigned (&r)[1], const void* p) { emu_ldmatrix<1, true>(r, p); }
static inline void ptx_ldmatrix_x2_trans(unsigned (&r)[2], const void* p) { emu_ldmatrix<2, true>(r, p); }
static inline void ptx_ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu_ldmatrix<4, true>(r, p); }

// D = A . B + C, m16n8k16, bf16 operands, f32 accumulation: lane L's d[i] (row g + 8*(i/2),
// column 2t + i%2) from row `row` of A and column `col` of B, each element taken from the
// lane and register the layout above assigns it.
static inline void ptx_mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                         const float (&c)[4]) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const emu_mma_slot* s = emu_mma_exchange(mine, 6, 0x20u);
    const int lane = (int)emu_thread()->lane, g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
        float av[16], bv[16];
        for (int k = 0; k < 16; ++k) {
            // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 * (k >= 8).
            av[k] = emu_bf16_bits_to_f(emu_half_of(s[(row % 8) * 4 + (k % 8) / 2], (row >= 8) + 2 * (k >= 8), k & 1));
            // B[k][col]: lane col * 4 + (k % 8) / 2, register 4 + (k >= 8).
            bv[k] = emu_bf16_bits_to_f(emu_half_of(s[col * 4 + (k % 8) / 2], 4 + (k >= 8), k & 1));
        }
        out[i] = emu_mma_dot(c[i], av, bv, 16);
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// D = A . B + C, m16n8k8, tf32 operands (f32 bits, the low 13 mantissa bits ignored).
static inline void ptx_mma_tf32_m16n8k8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                        const float (&c)[4]) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const emu_mma_slot* s = emu_mma_exchange(mine, 6, 0x21u);
    const int lane = (int)emu_thread()->lane, g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
        float av[8], bv[8];
        for (int k = 0; k < 8; ++k) {
            // A[row][k]: lane (row % 8) * 4 + k % 4, register (row >= 8) + 2 * (k >= 4).
            av[k] = emu_bits<float>(s[(row % 8) * 4 + k % 4].w[(row >= 8) + 2 * (k >= 4)] & 0xffffe000u);
            // B[k][col]: lane col * 4 + k % 4, register 4 + (k >= 4).
            bv[k] = emu_bits<float>(s[col * 4 + k % 4].w[4 + (k >= 4)] & 0xffffe000u);
        }
        out[i] = emu_mma_dot(c[i], av, bv, 8);
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}
