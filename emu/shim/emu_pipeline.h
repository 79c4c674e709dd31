// The asynchronous-copy primitives of <cuda_pipeline_primitives.h> (cp.async) for the
// host-compiled kernels (part of cuda_shim.h): __pipeline_memcpy_async, __pipeline_commit,
// __pipeline_wait_prior.
//
// A copy reads its source when it is issued (as a GPU may) and lands in shared memory only
// when the issuing thread waits for its group: __pipeline_wait_prior(n) completes every
// copy of that thread's committed groups but the n most recent ones; copies not yet
// committed stay pending. A kernel that reads a stage before waiting for it (a wrong wait
// count, a missing wait) therefore reads what was there before (the 0xFF poison of a fresh
// block: NaN), as a GPU could, instead of the data; a __syncthreads does not complete
// anything, as on a GPU. Size 4, 8 or 16 bytes, zfill <= size (the last zfill bytes are
// zeros and that much less is read: zfill == size reads nothing, the src-size 0 form), and
// both pointers aligned to the size, else the launch fails as the hardware would fault.
//
// The pending copies of each CUDA thread live on the heap, one table per OS thread (one
// block at a time runs on it, like __shared__), found through a thread_local pointer. That
// pointer is module TLS, which the driver poisons (0xFF) at every block start with the
// static __shared__ arrays: a poisoned or null pointer means a new block, and the table is
// then emptied. Copies a thread never waited for are thus dropped when its block ends (on a
// GPU they would land in the dead block's shared memory). With EMU_POISON=0 the table is
// emptied when a thread's slot last served another block index instead.
#pragma once

#include <pthread.h>

#include <map>
#include <mutex>
#include <vector>

struct emu_async_copy {
    unsigned char* dst;
    unsigned char data[16];
    unsigned size;
    unsigned long long group;  // the thread's commit count when it was issued
};

struct emu_pipe_state {
    emu_uint3 bid = {~0u, ~0u, ~0u};
    unsigned long long committed = 0;
    std::vector<emu_async_copy> pending;
};

// The calling CUDA thread's pending copies.
static inline emu_pipe_state& emu_pipe() {
    typedef std::vector<emu_pipe_state> table;
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
        for (emu_pipe_state& s : *cur) {
            s.committed = 0;
            s.pending.clear();
        }
    }
    if (cur->size() < n) cur->resize(n);
    emu_pipe_state& s = (*cur)[i];
    if (s.bid.x != b->bid.x || s.bid.y != b->bid.y || s.bid.z != b->bid.z) {
        s.bid = b->bid;
        s.committed = 0;
        s.pending.clear();
    }
    return s;
}

static inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                           size_t size_and_align, size_t zfill = 0) {
    if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
        emu_fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes");
    if (zfill > size_and_align) emu_fail("__pipeline_memcpy_async: zfill is larger than the copy");
    if (((uintptr_t)dst_shared | (uintptr_t)src_global) & (size_and_align - 1))
        emu_fail("__pipeline_memcpy_async: a pointer is not aligned to the copy size");
    emu_pipe_state& s = emu_pipe();
    emu_async_copy c;
    c.dst = (unsigned char*)dst_shared;
    c.size = (unsigned)size_and_align;
    c.group = s.committed;
    memset(c.data, 0, sizeof c.data);
    memcpy(c.data, src_global, size_and_align - zfill);
    s.pending.push_back(c);
}

static inline void __pipeline_commit() { emu_pipe().committed++; }

static inline void __pipeline_wait_prior(size_t prior) {
    emu_pipe_state& s = emu_pipe();
    if (prior > 8) prior = 8;  // as cuda_pipeline_primitives.h clamps it
    if (s.committed <= prior) return;
    const unsigned long long done = s.committed - prior;  // groups [0, done) complete
    size_t keep = 0;
    for (size_t i = 0; i < s.pending.size(); ++i) {
        emu_async_copy& c = s.pending[i];
        if (c.group < done)
            memcpy(c.dst, c.data, c.size);
        else
            s.pending[keep++] = c;
    }
    s.pending.resize(keep);
}
