// Internal interfaces of the emulated CUDA driver (libcuda.so): the driver's object model
// (api.cpp), the PTX reader (ptx.cpp), the host kernel modules (modules.cpp) and the
// executor of launches (exec.cpp). See emu/README.md for what the emulator is and is not.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../shim/emu_abi.h"
#include "cuda_api.h"

namespace emu {

// ---- configuration (environment, read once) ------------------------------------------------

struct Config {
    uint64_t seed = 0x1c4ca3ull;  // EMU_SEED
    int threads = 1;              // EMU_THREADS: OS threads that run the blocks of one launch (default: the CPUs, at most 8)
    size_t stack_kb = 64;         // EMU_STACK_KB: stack of one CUDA thread (fiber)
    bool launch_blocking = false; // CUDA_LAUNCH_BLOCKING=1: launch errors returned by the launch
    bool verbose = false;         // EMU_VERBOSE=1: log module loads and failures to stderr
    bool poison = true;           // EMU_POISON=0: no NaN poisoning of allocations/shared memory
    double watchdog_s = 900.0;    // EMU_WATCHDOG_S: abort a launch that runs longer than this
    std::string kernel_dir;       // EMU_KERNEL_DIR (default: ../kernels next to libcuda.so)
};
const Config& config();

// A failure with its CUDA code and a sentence for cuGetErrorString.
struct Status {
    CUresult code = CUDA_SUCCESS;
    std::string detail;
    bool ok() const { return code == CUDA_SUCCESS; }
    static Status fail(CUresult c, std::string d) { return Status{c, std::move(d)}; }
};

// Records `detail` as the explanation of `code` (shown by cuGetErrorString) and returns code.
CUresult report(CUresult code, const std::string& detail);
CUresult report(const Status& s);

// ---- device memory (host memory, registered) -----------------------------------------------

// One allocation: its bytes and its id. Ids are never reused (one counter for device and
// page-locked host memory), so an address range that was freed and allocated again belongs
// to a new id: a graph replay tells a stale pointer from a live one by it.
struct Block {
    size_t size = 0;
    uint64_t id = 0;
};
// The allocation holding an address: id 0 when none does.
struct Owner {
    uintptr_t base = 0;
    size_t size = 0;
    uint64_t id = 0;
};
uint64_t next_allocation_id();

struct Allocations {
    std::mutex mu;
    std::map<uintptr_t, Block> live;  // base -> bytes and id
    size_t bytes_in_use = 0;
    // Freed blocks kept for reuse, per rounded size, the newest last: the next allocation
    // of that size gets the block freed last, at the same address, as a GPU's caching
    // allocator does (so a stale pointer aliases a live buffer there too). Not under
    // AddressSanitizer, which must see a freed block as freed.
    std::map<size_t, std::vector<void*>> reuse;
    size_t reuse_bytes = 0;
    // Whether [p, p + n) lies inside one live allocation (n = 0: p inside or at its end).
    bool contains(uintptr_t p, size_t n);
    // Base and size of the allocation holding p, if any.
    bool find(uintptr_t p, uintptr_t* base, size_t* size);
    // The live allocation holding [p, p + n) (n = 0: p inside or at its end), or id 0.
    Owner owner(uintptr_t p, size_t n);
};
Allocations& allocations();

// ---- PTX -----------------------------------------------------------------------------------

struct PtxParam {
    std::string name;
    std::string type;  // "u64", "f32", "b8", ...
    uint32_t size = 0;
    uint32_t align = 0;
    bool is_float = false;
};

struct PtxEntry {
    std::string name;
    std::vector<PtxParam> params;
    size_t static_shared = 0;  // bytes of .shared used by the entry (incl. called functions)
    bool collective = false;   // uses barriers or warp collectives (needs one fiber per thread)
    bool dyn_shared = false;   // references an .extern .shared array
    unsigned maxntid = 0;      // product of .maxntid (0: none)
    unsigned reqntid[3] = {0, 0, 0};
};

struct PtxModule {
    int version_major = 0, version_minor = 0;
    int target_sm = 0;  // e.g. 90
    std::vector<PtxEntry> entries;
};

// Parses PTX text (NUL-terminated). On error returns CUDA_ERROR_INVALID_PTX with a reason.
Status parse_ptx(const char* text, PtxModule* out);

// ---- host-compiled kernels -----------------------------------------------------------------

struct HostModule {
    std::string path;
    void* handle = nullptr;
    const emu_module_t* m = nullptr;
    size_t tls_modid = 0;
    size_t tls_size = 0;  // bytes of the module's TLS block: its static __shared__ arrays
};

// The host module holding exactly the kernels of `ptx` (loads the kernel directory once).
Status find_host_module(const PtxModule& ptx, HostModule** out);
// Loads one host module by path (the emulator's own tests; no PTX).
Status load_host_module(const std::string& path, HostModule** out);
const emu_kernel_t* host_kernel(const HostModule* hm, const std::string& name);

// ---- driver objects ------------------------------------------------------------------------

struct Function;

struct Module {
    uint32_t magic = 0x6d6f6431;  // "mod1"
    HostModule* host = nullptr;
    std::vector<Function*> functions;
};

struct Function {
    uint32_t magic = 0x66756e31;  // "fun1"
    Module* module = nullptr;
    std::string name;
    PtxEntry ptx;  // from the PTX (or, for a host-only module, from the C++ signature)
    bool has_ptx = true;
    const emu_kernel_t* kernel = nullptr;
    int max_dyn_shared = 0;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    uint64_t launches = 0;
};

struct Launch {
    Function* f = nullptr;
    unsigned grid[3] = {1, 1, 1};
    unsigned block[3] = {1, 1, 1};
    size_t dyn_shared = 0;
    void* const* args = nullptr;
    uint64_t ordinal = 0;  // how many launches of this function came before
};

// Runs every block of the launch; a launch failure (deadlock, trap, illegal address...)
// comes back as LAUNCH_FAILED etc. with a sentence naming the kernel.
Status execute(const Launch& l);

// Installs the SIGSEGV/SIGBUS handler that turns a fault inside a kernel into a launch
// failure (not under AddressSanitizer, which reports faults itself).
void install_fault_handler();

uint64_t mix64(uint64_t x);

}  // namespace emu
