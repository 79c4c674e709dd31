// The PTX reader of the emulated driver: from the PTX that NVRTC made of a kernel file it
// takes what a real driver enforces at load and launch time and the emulator cannot know
// otherwise: the ISA version and target, each .entry's .param list (count, type, width),
// its .maxntid/.reqntid, the bytes of .shared memory it uses, and whether it (or a .func it
// calls) contains a barrier or warp collective (then every CUDA thread needs its own
// fiber). It does not read instructions beyond that: no code is generated from PTX.
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "emu_internal.h"

namespace emu {
namespace {

std::string strip_comments(const char* s) {
    std::string out;
    size_t n = strlen(s);
    out.reserve(n);
    for (size_t i = 0; i < n;) {
        if (s[i] == '/' && i + 1 < n && s[i + 1] == '/') {
            while (i < n && s[i] != '\n') ++i;
        } else if (s[i] == '/' && i + 1 < n && s[i + 1] == '*') {
            i += 2;
            while (i + 1 < n && !(s[i] == '*' && s[i + 1] == '/')) ++i;
            i += 2;
        } else if (s[i] == '"') {
            out.push_back(s[i++]);
            while (i < n && s[i] != '"') out.push_back(s[i++]);
            if (i < n) out.push_back(s[i++]);
        } else {
            out.push_back(s[i++]);
        }
    }
    return out;
}

bool ident_char(char c) { return isalnum((unsigned char)c) || c == '_' || c == '$' || c == '%'; }

// Width in bytes of a PTX fundamental type name without the dot ("u64" -> 8, "pred" -> 1).
uint32_t type_width(const std::string& t) {
    if (t == "pred") return 1;
    if (t.size() < 2) return 0;
    char k = t[0];
    if (k != 'u' && k != 's' && k != 'b' && k != 'f') return 0;
    int bits = atoi(t.c_str() + 1);
    if (bits != 8 && bits != 16 && bits != 32 && bits != 64 && bits != 128) return 0;
    return (uint32_t)bits / 8;
}

struct Decl {
    std::string name;
    size_t bytes = 0;
    bool dynamic = false;
};

// Parses ".shared [.align N] .TYPE name[COUNT]" starting after ".shared"; `ext` for .extern.
bool parse_shared_decl(const std::string& s, size_t i, Decl* d) {
    uint32_t width = 0;
    while (i < s.size()) {
        while (i < s.size() && isspace((unsigned char)s[i])) ++i;
        if (i < s.size() && s[i] == '.') {
            size_t j = i + 1;
            while (j < s.size() && ident_char(s[j])) ++j;
            std::string tok = s.substr(i + 1, j - i - 1);
            i = j;
            if (tok == "align") {
                while (i < s.size() && isspace((unsigned char)s[i])) ++i;
                while (i < s.size() && isdigit((unsigned char)s[i])) ++i;
            } else if (type_width(tok) != 0) {
                width = type_width(tok);
            }
            continue;
        }
        break;
    }
    size_t j = i;
    while (j < s.size() && ident_char(s[j])) ++j;
    if (j == i || width == 0) return false;
    d->name = s.substr(i, j - i);
    size_t count = 1;
    while (j < s.size() && isspace((unsigned char)s[j])) ++j;
    if (j < s.size() && s[j] == '[') {
        size_t k = j + 1;
        while (k < s.size() && isspace((unsigned char)s[k])) ++k;
        if (k < s.size() && s[k] == ']') {
            d->dynamic = true;
            count = 0;
        } else {
            count = strtoull(s.c_str() + k, nullptr, 10);
        }
    }
    d->bytes = (size_t)width * count;
    return true;
}

// Every occurrence of `word` as a whole PTX token in s[b, e).
bool has_token(const std::string& s, size_t b, size_t e, const std::string& word) {
    size_t p = b;
    while ((p = s.find(word, p)) != std::string::npos && p < e) {
        bool left = p == 0 || !ident_char(s[p - 1]);
        bool right = p + word.size() >= s.size() || !ident_char(s[p + word.size()]);
        if (left && right) return true;
        p += word.size();
    }
    return false;
}

const char* kCollectives[] = {"bar.sync",  "bar.red",   "bar.arrive", "barrier.sync", "barrier.red",
                              "barrier.arrive", "barrier.cta", "bar.warp.sync", "shfl.sync", "vote.sync",
                              "match.sync", "redux.sync", "wmma.",      "mma.sync",     "activemask", "wgmma."};

bool body_has_collective(const std::string& s, size_t b, size_t e) {
    for (const char* c : kCollectives) {
        size_t p = b;
        std::string w = c;
        while ((p = s.find(w, p)) != std::string::npos && p < e) {
            if (p == 0 || !ident_char(s[p - 1])) return true;
            p += w.size();
        }
    }
    return false;
}

struct Body {
    std::string name;
    size_t begin = 0, end = 0;  // inside the braces
    bool is_entry = false;
};

// Parses one ".param ..." declaration (without the trailing comma).
bool parse_param(const std::string& decl, PtxParam* p) {
    size_t i = decl.find(".param");
    if (i == std::string::npos) return false;
    i += 6;
    uint32_t width = 0, align = 0;
    std::string type;
    bool is_float = false;
    while (i < decl.size()) {
        while (i < decl.size() && isspace((unsigned char)decl[i])) ++i;
        if (i < decl.size() && decl[i] == '.') {
            size_t j = i + 1;
            while (j < decl.size() && ident_char(decl[j])) ++j;
            std::string tok = decl.substr(i + 1, j - i - 1);
            i = j;
            if (tok == "align") {
                while (i < decl.size() && isspace((unsigned char)decl[i])) ++i;
                align = (uint32_t)strtoul(decl.c_str() + i, nullptr, 10);
                while (i < decl.size() && isdigit((unsigned char)decl[i])) ++i;
            } else if (type_width(tok) != 0) {
                width = type_width(tok);
                type = tok;
                is_float = tok[0] == 'f';
            }  // .ptr, .global, .const...: qualifiers of a pointer parameter
            continue;
        }
        break;
    }
    size_t j = i;
    while (j < decl.size() && ident_char(decl[j])) ++j;
    if (j == i || width == 0) return false;
    p->name = decl.substr(i, j - i);
    uint32_t count = 1;
    size_t k = decl.find('[', j);
    if (k != std::string::npos) count = (uint32_t)strtoul(decl.c_str() + k + 1, nullptr, 10);
    p->type = type;
    p->size = width * count;
    p->align = align ? align : width;
    p->is_float = is_float && count == 1;
    return true;
}

}  // namespace

Status parse_ptx(const char* text, PtxModule* out) {
    if (text == nullptr) return Status::fail(CUDA_ERROR_INVALID_VALUE, "no PTX image");
    std::string s = strip_comments(text);
    PtxModule m;
    size_t v = s.find(".version");
    if (v == std::string::npos) return Status::fail(CUDA_ERROR_INVALID_PTX, "the image has no .version directive: not PTX");
    if (sscanf(s.c_str() + v, ".version %d.%d", &m.version_major, &m.version_minor) != 2)
        return Status::fail(CUDA_ERROR_INVALID_PTX, "unreadable .version directive");
    size_t t = s.find(".target");
    if (t == std::string::npos) return Status::fail(CUDA_ERROR_INVALID_PTX, "the PTX has no .target directive");
    {
        size_t p = s.find("sm_", t);
        size_t eol = s.find('\n', t);
        if (p == std::string::npos || p > eol) return Status::fail(CUDA_ERROR_INVALID_PTX, "unreadable .target directive");
        m.target_sm = atoi(s.c_str() + p + 3);
    }

    // Pass 1: top-level declarations and function bodies (brace depth 0 -> 1).
    std::map<std::string, size_t> module_shared;  // module-scope .shared arrays
    std::set<std::string> module_dyn_shared;
    std::vector<Body> bodies;
    std::map<std::string, std::pair<size_t, size_t>> headers;  // entry name -> [params begin, end)
    std::map<std::string, std::string> directives;            // entry name -> text between ')' and '{'
    int depth = 0;
    size_t stmt_start = 0;
    for (size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        if (c == '{') {
            if (depth == 0) {
                std::string head = s.substr(stmt_start, i - stmt_start);
                size_t e = head.find(".entry");
                size_t f = head.find(".func");
                Body b;
                b.begin = i + 1;
                if (e != std::string::npos || f != std::string::npos) {
                    bool is_entry = e != std::string::npos;
                    size_t k = (is_entry ? e + 6 : f + 5);
                    // .func may have a return list "(.param ...)" before the name.
                    while (k < head.size() && isspace((unsigned char)head[k])) ++k;
                    if (!is_entry && k < head.size() && head[k] == '(') {
                        int d = 0;
                        for (; k < head.size(); ++k) {
                            if (head[k] == '(') ++d;
                            if (head[k] == ')' && --d == 0) {
                                ++k;
                                break;
                            }
                        }
                        while (k < head.size() && isspace((unsigned char)head[k])) ++k;
                    }
                    size_t j = k;
                    while (j < head.size() && ident_char(head[j])) ++j;
                    b.name = head.substr(k, j - k);
                    b.is_entry = is_entry;
                    if (is_entry) {
                        size_t po = head.find('(', j);
                        size_t pc = head.rfind(')');
                        if (po == std::string::npos || pc == std::string::npos || pc < po)
                            return Status::fail(CUDA_ERROR_INVALID_PTX, "unreadable parameter list of .entry " + b.name);
                        headers[b.name] = {stmt_start + po + 1, stmt_start + pc};
                        directives[b.name] = head.substr(pc + 1);
                    }
                }
                bodies.push_back(b);
            }
            ++depth;
        } else if (c == '}') {
            --depth;
            if (depth == 0 && !bodies.empty()) bodies.back().end = i;
            if (depth == 0) stmt_start = i + 1;
        } else if (c == ';' && depth == 0) {
            std::string st = s.substr(stmt_start, i - stmt_start);
            size_t sh = st.find(".shared");
            if (sh != std::string::npos) {
                Decl d;
                if (parse_shared_decl(st, sh + 7, &d)) {
                    if (d.dynamic)
                        module_dyn_shared.insert(d.name);
                    else
                        module_shared[d.name] = d.bytes;
                }
            }
            stmt_start = i + 1;
        }
    }
    if (depth != 0) return Status::fail(CUDA_ERROR_INVALID_PTX, "unbalanced braces");

    // Per body: its own .shared declarations, the module ones it names, what it calls.
    struct Info {
        size_t shared = 0;
        std::set<std::string> uses_shared;
        bool dyn = false;
        bool collective = false;
        std::set<std::string> calls;
    };
    std::map<std::string, Info> info;
    std::set<std::string> func_names;
    for (const Body& b : bodies)
        if (!b.name.empty()) func_names.insert(b.name);
    for (const Body& b : bodies) {
        if (b.name.empty()) continue;
        Info in;
        // Statements of the body: ".shared" declarations (demoted function-scope arrays) and
        // "call" instructions.
        size_t st = b.begin;
        for (size_t i = b.begin; i <= b.end; ++i) {
            char c = i < b.end ? s[i] : ';';
            if (c != ';' && c != '{' && c != '}') continue;
            size_t a = st;
            while (a < i && isspace((unsigned char)s[a])) ++a;
            std::string stmt = s.substr(a, i - a);
            st = i + 1;
            if (stmt.compare(0, 7, ".shared") == 0) {
                Decl d;
                if (parse_shared_decl(stmt, 7, &d)) in.shared += d.bytes;
            } else if (stmt.compare(0, 4, "call") == 0) {
                for (const std::string& f : func_names)
                    if (has_token(stmt, 0, stmt.size(), f)) in.calls.insert(f);
            }
        }
        for (const auto& kv : module_shared)
            if (has_token(s, b.begin, b.end, kv.first)) in.uses_shared.insert(kv.first);
        for (const std::string& d : module_dyn_shared)
            if (has_token(s, b.begin, b.end, d)) in.dyn = true;
        in.collective = body_has_collective(s, b.begin, b.end);
        info[b.name] = in;
    }

    for (const Body& b : bodies) {
        if (!b.is_entry) continue;
        PtxEntry e;
        e.name = b.name;
        // Transitive closure over called functions.
        std::set<std::string> seen{b.name};
        std::vector<std::string> todo{b.name};
        std::set<std::string> shared_names;
        while (!todo.empty()) {
            std::string n = todo.back();
            todo.pop_back();
            const Info& in = info[n];
            e.static_shared += in.shared;
            e.collective = e.collective || in.collective;
            e.dyn_shared = e.dyn_shared || in.dyn;
            shared_names.insert(in.uses_shared.begin(), in.uses_shared.end());
            for (const std::string& c : in.calls)
                if (seen.insert(c).second) todo.push_back(c);
        }
        for (const std::string& n : shared_names) e.static_shared += module_shared[n];
        // Parameters.
        auto h = headers[b.name];
        std::string plist = s.substr(h.first, h.second - h.first);
        size_t q = 0;
        while (q < plist.size()) {
            size_t comma = plist.find(',', q);
            if (comma == std::string::npos) comma = plist.size();
            std::string decl = plist.substr(q, comma - q);
            q = comma + 1;
            bool blank = true;
            for (char c : decl)
                if (!isspace((unsigned char)c)) blank = false;
            if (blank) continue;
            PtxParam p;
            if (!parse_param(decl, &p))
                return Status::fail(CUDA_ERROR_INVALID_PTX, "unreadable parameter `" + decl + "` of .entry " + b.name);
            e.params.push_back(p);
        }
        // Launch bounds.
        const std::string& dir = directives[b.name];
        size_t mx = dir.find(".maxntid");
        if (mx != std::string::npos) {
            unsigned a = 1, bb = 1, c = 1;
            int got = sscanf(dir.c_str() + mx, ".maxntid %u , %u , %u", &a, &bb, &c);
            if (got >= 1) e.maxntid = a * (got >= 2 ? bb : 1) * (got >= 3 ? c : 1);
        }
        size_t rq = dir.find(".reqntid");
        if (rq != std::string::npos) {
            unsigned a = 1, bb = 1, c = 1;
            int got = sscanf(dir.c_str() + rq, ".reqntid %u , %u , %u", &a, &bb, &c);
            if (got >= 1) {
                e.reqntid[0] = a;
                e.reqntid[1] = got >= 2 ? bb : 1;
                e.reqntid[2] = got >= 3 ? c : 1;
            }
        }
        m.entries.push_back(e);
    }
    *out = std::move(m);
    return Status{};
}

}  // namespace emu
