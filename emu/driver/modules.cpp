// The host-compiled kernel modules: every target/cuda-emu/kernels/*.so (one per
// kernels/*.cu, built by scripts/cuda-emu.sh) is loaded once, and a PTX module handed to
// cuModuleLoadData is matched with the one whose kernels are exactly the PTX's .entry
// names. A PTX entry without a host build, or a host build that lacks or adds kernels,
// is a load error that says to rebuild the emulator (a stale build never runs silently).
#include <dirent.h>
#include <dlfcn.h>
#include <link.h>
#include <string.h>

#include <algorithm>
#include <set>

#include "emu_internal.h"

namespace emu {
namespace {

std::mutex g_mu;
bool g_scanned = false;
std::vector<HostModule*> g_modules;
std::string g_scan_error;

struct TlsQuery {
    size_t modid;
    size_t size;
};

int tls_size_cb(struct dl_phdr_info* info, size_t, void* data) {
    TlsQuery* q = static_cast<TlsQuery*>(data);
    if (info->dlpi_tls_modid != q->modid) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS) q->size = info->dlpi_phdr[i].p_memsz;
    return 1;
}

Status open_module(const std::string& path, HostModule** out) {
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) return Status::fail(CUDA_ERROR_SHARED_OBJECT_INIT_FAILED, std::string("cannot load ") + path + ": " + dlerror());
    emu_module_fn fn = reinterpret_cast<emu_module_fn>(dlsym(h, "emu_module"));
    if (!fn) {
        dlclose(h);
        return Status::fail(CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND, path + " is not an emulated kernel module (no emu_module)");
    }
    const emu_module_t* m = fn();
    if (!m || m->abi_version != EMU_ABI_VERSION) {
        dlclose(h);
        return Status::fail(CUDA_ERROR_SHARED_OBJECT_INIT_FAILED,
                            path + " was built for another emulator ABI: rebuild with scripts/cuda-emu.sh build");
    }
    HostModule* hm = new HostModule;
    hm->path = path;
    hm->handle = h;
    hm->m = m;
    size_t modid = 0;
    if (dlinfo(h, RTLD_DI_TLS_MODID, &modid) == 0 && modid != 0) {
        TlsQuery q{modid, 0};
        dl_iterate_phdr(tls_size_cb, &q);
        hm->tls_modid = modid;
        hm->tls_size = q.size;
    }
    *out = hm;
    return Status{};
}

// Loads every *.so of the kernel folders (EMU_KERNEL_DIR, folders separated by ':').
void scan_locked() {
    if (g_scanned) return;
    g_scanned = true;
    std::vector<std::string> files;
    const std::string& dirs = config().kernel_dir;
    for (size_t b = 0; b <= dirs.size();) {
        size_t e = dirs.find(':', b);
        if (e == std::string::npos) e = dirs.size();
        std::string dir = dirs.substr(b, e - b);
        b = e + 1;
        if (dir.empty()) continue;
        DIR* d = opendir(dir.c_str());
        if (!d) {
            g_scan_error = "the emulated kernels folder " + dir + " cannot be read (build it: scripts/cuda-emu.sh build)";
            continue;
        }
        std::vector<std::string> here;
        while (struct dirent* ent = readdir(d)) {
            std::string n = ent->d_name;
            if (n.size() > 3 && n.compare(n.size() - 3, 3, ".so") == 0) here.push_back(dir + "/" + n);
        }
        closedir(d);
        std::sort(here.begin(), here.end());
        files.insert(files.end(), here.begin(), here.end());
    }
    for (const std::string& f : files) {
        HostModule* hm = nullptr;
        Status s = open_module(f, &hm);
        if (!s.ok()) {
            g_scan_error = s.detail;
            continue;
        }
        g_modules.push_back(hm);
    }
    if (g_modules.empty() && g_scan_error.empty())
        g_scan_error = "no emulated kernel modules in " + dirs + " (build them: scripts/cuda-emu.sh build)";
}

}  // namespace

const emu_kernel_t* host_kernel(const HostModule* hm, const std::string& name) {
    for (int i = 0; i < hm->m->nkernels; ++i)
        if (name == hm->m->kernels[i].name) return &hm->m->kernels[i];
    return nullptr;
}

Status find_host_module(const PtxModule& ptx, HostModule** out) {
    std::lock_guard<std::mutex> g(g_mu);
    scan_locked();
    std::set<std::string> want;
    for (const PtxEntry& e : ptx.entries) want.insert(e.name);
    if (want.empty()) return Status::fail(CUDA_ERROR_INVALID_PTX, "the PTX module has no .entry");
    HostModule* best = nullptr;
    size_t best_common = 0;
    for (HostModule* hm : g_modules) {
        std::set<std::string> have;
        for (int i = 0; i < hm->m->nkernels; ++i) have.insert(hm->m->kernels[i].name);
        if (have == want) {
            *out = hm;
            return Status{};
        }
        size_t common = 0;
        for (const std::string& n : want) common += have.count(n);
        if (common > best_common) {
            best_common = common;
            best = hm;
        }
    }
    std::string entries;
    for (const std::string& n : want) entries += (entries.empty() ? "" : ", ") + n;
    if (!best) {
        std::string why = g_scan_error.empty() ? "" : " (" + g_scan_error + ")";
        return Status::fail(CUDA_ERROR_NOT_FOUND,
                            "no host-compiled kernel module in " + config().kernel_dir + " has the PTX's kernels " + entries +
                                why + ": rebuild with scripts/cuda-emu.sh build");
    }
    std::string missing, extra;
    std::set<std::string> have;
    for (int i = 0; i < best->m->nkernels; ++i) have.insert(best->m->kernels[i].name);
    for (const std::string& n : want)
        if (!have.count(n)) missing += " " + n;
    for (const std::string& n : have)
        if (!want.count(n)) extra += " " + n;
    return Status::fail(CUDA_ERROR_NOT_FOUND,
                        "the host build " + best->path + " (from " + best->m->source + ") does not match the PTX:" +
                            (missing.empty() ? "" : " missing" + missing + ";") + (extra.empty() ? "" : " not in the PTX" + extra + ";") +
                            " the emulator is stale: rebuild with scripts/cuda-emu.sh build");
}

Status load_host_module(const std::string& path, HostModule** out) {
    std::lock_guard<std::mutex> g(g_mu);
    for (HostModule* hm : g_modules)
        if (hm->path == path) {
            *out = hm;
            return Status{};
        }
    HostModule* hm = nullptr;
    Status s = open_module(path, &hm);
    if (!s.ok()) return s;
    g_modules.push_back(hm);
    *out = hm;
    return Status{};
}

}  // namespace emu
