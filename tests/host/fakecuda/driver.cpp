// driver.cpp: the CUDA driver API calls cudarc 0.19.10 makes for fnokern, on the host (part of
// the stand-in libcuda.so; see README.md here).
//
// One device (ordinal 0, "compute capability 9.0") with a primary context, the default stream,
// events, a memory table, modules made from the embedded fatbin, and cuLaunchKernel running the
// real kernels (kernels.cpp). Strict where a GPU is unforgiving: a current context on the calling
// thread for every call; fresh allocations filled with NaN bytes; a guard page right after every
// buffer, so that a kernel reading or writing one element past it faults (reported as
// CUDA_ERROR_ILLEGAL_ADDRESS, sticky, as on a GPU), and one before it, with NaN bytes between it
// and the buffer's start (a write there is found after the launch); freed buffers kept unmapped
// for a while, so a use after free faults too; copies to the host that arrive only at a
// synchronisation; every pointer given to a copy, a memset or a kernel inside a live allocation;
// launch geometry within the limits. Each refusal prints why on stderr ("fakecuda: <call>: ...").
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "fakecuda.h"
#include "kernels.h"

namespace {

constexpr uint64_t kPage = 4096;
constexpr unsigned kMagic = 0xfa4ec0de;

std::recursive_mutex g_lock;
bool g_init = false;

int env_int(const char* name, int fallback) {
    const char* v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}
// FAKECUDA_DEVICES=0 makes a driver that sees no GPU; FAKECUDA_MEMORY_MIB sets the card's size.
int device_count() { return env_int("FAKECUDA_DEVICES", 1); }
uint64_t total_memory() { return (uint64_t)env_int("FAKECUDA_MEMORY_MIB", 16384) << 20; }
bool trace() {
    static const bool t = env_int("FAKECUDA_TRACE", 0) != 0;
    return t;
}

// ---------------------------------------------------------------------------------------------
// Memory

// An allocation's mapping: [guard page][slack][buffer][guard page]. The buffer ends where the
// last guard page begins; the slack before it (less than a page) is filled with NaN bytes, so a
// read just before the start sees NaN and one further back faults, and a write into the slack is
// found after the launch (check_slack).
struct Alloc {
    uint64_t base, size;
    char* map;
    size_t map_len;
    bool pool;
};
std::map<uint64_t, Alloc> g_live;
std::deque<Alloc> g_freed;
uint64_t g_freed_bytes = 0, g_used = 0, g_pool_used = 0, g_pool_high = 0, g_release_threshold = 0;

uint64_t round_up(uint64_t v, uint64_t m) { return (v + m - 1) / m * m; }

const Alloc* live_at(uint64_t p) {
    auto it = g_live.upper_bound(p);
    if (it == g_live.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    return p >= a.base && p <= a.base + a.size ? &a : nullptr;
}
const Alloc* freed_at(uint64_t p) {
    for (auto it = g_freed.rbegin(); it != g_freed.rend(); ++it) {
        if (p >= (uint64_t)it->map && p < (uint64_t)it->map + it->map_len) return &*it;
    }
    return nullptr;
}

// Why p is not a pointer into live memory, for a diagnostic.
std::string describe(uint64_t p) {
    char buf[256];
    if (const Alloc* a = freed_at(p)) {
        snprintf(buf, sizeof buf, "0x%llx is %lld bytes into a %llu-byte allocation that was freed", (unsigned long long)p,
                 (long long)(p - a->base), (unsigned long long)a->size);
        return buf;
    }
    auto it = g_live.upper_bound(p);
    if (it != g_live.end()) {
        const Alloc& a = it->second;
        if (p >= (uint64_t)a.map && p < a.base) {
            snprintf(buf, sizeof buf, "0x%llx is %llu bytes before the start of a %llu-byte allocation", (unsigned long long)p,
                     (unsigned long long)(a.base - p), (unsigned long long)a.size);
            return buf;
        }
    }
    if (it != g_live.begin()) {
        --it;
        const Alloc& a = it->second;
        if (p >= a.base + a.size && p < a.base + a.size + kPage) {
            snprintf(buf, sizeof buf, "0x%llx is %llu bytes past the end of a %llu-byte allocation", (unsigned long long)p,
                     (unsigned long long)(p - a.base - a.size), (unsigned long long)a.size);
            return buf;
        }
    }
    snprintf(buf, sizeof buf, "0x%llx is not in any allocation", (unsigned long long)p);
    return buf;
}

CUresult do_alloc(const char* api, CUdeviceptr* out, uint64_t bytes, bool pool) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) {
        fakecuda_say(api, "a 0-byte allocation (the driver returns CUDA_ERROR_INVALID_VALUE)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (g_used + bytes > total_memory()) return CUDA_ERROR_OUT_OF_MEMORY;
    const uint64_t data = round_up(bytes, kPage);
    char* m = (char*)mmap(nullptr, kPage + data + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    mprotect(m, kPage, PROT_NONE);                 // the guard page before the slack
    mprotect(m + kPage + data, kPage, PROT_NONE);  // the guard page right after the buffer
    const uint64_t base = (uint64_t)(m + kPage + data - bytes);
    // Uninitialised device memory: NaN in every float format; the slack before it too.
    memset(m + kPage, 0xff, data);
    g_live[base] = Alloc{base, bytes, m, (size_t)(kPage + data + kPage), pool};
    g_used += bytes;
    if (pool) {
        g_pool_used += bytes;
        if (g_pool_used > g_pool_high) g_pool_high = g_pool_used;
    }
    *out = base;
    return CUDA_SUCCESS;
}

CUresult do_free(const char* api, CUdeviceptr p, bool pool) {
    auto it = g_live.find(p);
    if (it == g_live.end()) {
        fakecuda_say(api, "%s: not the start of a live allocation", describe(p).c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    Alloc a = it->second;
    if (a.pool != pool) {
        fakecuda_say(api, "0x%llx was allocated with %s", p, a.pool ? "cuMemAllocAsync" : "cuMemAlloc");
        return CUDA_ERROR_INVALID_VALUE;
    }
    g_live.erase(it);
    g_used -= a.size;
    if (a.pool) g_pool_used -= a.size;
    // Unmapped (but kept reserved) for a while, so that a later use faults.
    mprotect(a.map, a.map_len, PROT_NONE);
    g_freed.push_back(a);
    g_freed_bytes += a.map_len;
    while (g_freed.size() > 4096 || g_freed_bytes > (1ull << 30)) {
        munmap(g_freed.front().map, g_freed.front().map_len);
        g_freed_bytes -= g_freed.front().map_len;
        g_freed.pop_front();
    }
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Contexts, streams, events, modules

}  // namespace

struct FakeContext {
    unsigned magic = kMagic;
    int refs = 0;
    CUresult sticky = CUDA_SUCCESS;
};
// A created stream (cuStreamCreate): its work waits in `work` until something waits for it
// (see on_stream), each item with its position (the p-th call enqueued on the stream). A handle
// is live while it is in g_streams and not destroyed.
struct FakeStream {
    bool blocking = true;    // CU_STREAM_DEFAULT: the legacy default stream waits for its work
    bool destroyed = false;  // its handle is gone; its work still runs (see cuStreamDestroy_v2)
    uint64_t id = 0;         // never reused, unlike the address (events name their stream by it)
    std::deque<std::pair<uint64_t, std::function<CUresult()>>> work;
    uint64_t enqueued = 0;
};
struct FakeEvent {
    unsigned magic = kMagic;
    // The copies to the host enqueued before the event was recorded (see g_pending).
    uint64_t copies = 0;
    // Recorded on a created stream: that stream's id and its position then (else id 0).
    uint64_t stream = 0;
    uint64_t pos = 0;
};
struct FakeModule {
    unsigned magic = kMagic;
    std::vector<char> image;
};
struct FakeFunction {
    unsigned magic = kMagic;
    FakeModule* module;
    const FakeKernel* kernel;
};
struct FakePool {
    unsigned magic = kMagic;
};

namespace {
// Copies to the host complete only at a synchronisation, as on a GPU: cuMemcpyDtoHAsync takes
// the source's bytes at its place in the stream, fills the destination with NaN bytes, and the
// bytes arrive when the stream, the context or an event recorded after the copy is waited for.
// A host read before then sees NaN, not the data.
struct PendingCopy {
    uint64_t seq;
    void* dst;
    std::vector<char> bytes;
};
std::deque<PendingCopy> g_pending;
uint64_t g_copies = 0;

void complete_copies(uint64_t upto) {
    while (!g_pending.empty() && g_pending.front().seq <= upto) {
        PendingCopy& c = g_pending.front();
        memcpy(c.dst, c.bytes.data(), c.bytes.size());
        g_pending.pop_front();
    }
}

FakeContext g_primary;
FakePool g_pool;

// Streams. Work on the default stream (null, or the per-thread one) runs when it is called; work
// on a created stream is queued and runs only when something waits for it: a synchronisation of
// that stream or of the context, an event recorded after it that is synchronised, queried or
// waited for by another stream (cuStreamWaitEvent), or the legacy default stream's next call for
// a blocking stream (destroying a stream runs nothing). So work that another stream reads without an
// event between them has not happened yet (a fresh buffer reads NaN), as on a GPU it may not
// have. Work that fails when it runs (an illegal address) makes the context's error sticky, and
// the call that waited returns it.
std::vector<FakeStream*> g_streams;

bool is_created(CUstream s) { return s != nullptr && s != (CUstream)0x2; }

void flush(FakeStream* s, uint64_t upto) {
    while (!s->work.empty() && s->work.front().first <= upto) {
        std::function<CUresult()> item = std::move(s->work.front().second);
        s->work.pop_front();
        const CUresult r = item();
        if (r != CUDA_SUCCESS && g_primary.sticky == CUDA_SUCCESS) g_primary.sticky = r;
    }
}
void flush_all() {
    for (FakeStream* s : g_streams) flush(s, UINT64_MAX);
    // Destroyed streams whose work has now run are let go.
    for (auto it = g_streams.begin(); it != g_streams.end();) {
        if ((*it)->destroyed) {
            delete *it;
            it = g_streams.erase(it);
        } else {
            ++it;
        }
    }
}

// A call's work `f` on stream s: run now on the default stream (after the queued work of the
// blocking streams, for the legacy one), queued on a created stream.
CUresult on_stream(CUstream s, std::function<CUresult()> f) {
    if (is_created(s)) {
        s->work.emplace_back(++s->enqueued, std::move(f));
        return CUDA_SUCCESS;
    }
    if (s == nullptr) {
        for (FakeStream* b : g_streams)
            if (b->blocking) flush(b, UINT64_MAX);
    }
    return f();
}
// What a synchronising call returns after the work it waited for ran.
CUresult sticky_or_success() { return g_primary.sticky; }
thread_local CUcontext t_current = nullptr;
std::unordered_map<std::string, uint64_t> g_calls;

#define LOCK std::lock_guard<std::recursive_mutex> lock_(g_lock)
#define NEED_INIT \
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED
#define NEED_CONTEXT(api)                                     \
    do {                                                      \
        if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;       \
        if (!fakecuda_context_ok(api)) {                      \
            if (t_current == &g_primary && g_primary.sticky) return g_primary.sticky; \
            return CUDA_ERROR_INVALID_CONTEXT;                \
        }                                                     \
    } while (0)
#define NEED_STREAM(api, s) \
    if (!fakecuda_stream_ok(api, s)) return CUDA_ERROR_INVALID_HANDLE

CUresult check_device(CUdevice d) { return d >= 0 && d < device_count() ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }

// ---------------------------------------------------------------------------------------------
// Faults inside kernels: the guard pages turn an out-of-bounds access into SIGSEGV, which ends
// the launch (CUDA_ERROR_ILLEGAL_ADDRESS) instead of the process.

sigjmp_buf g_fault_jmp;
volatile sig_atomic_t g_in_kernel = 0;
pthread_t g_kernel_thread;
const char* g_kernel_name = "";
volatile uint64_t g_fault_addr = 0;
struct sigaction g_old_segv, g_old_bus;

// ---------------------------------------------------------------------------------------------
// The race check (`fakecuda_racecheck`, per calling thread): a GPU runs the blocks of a launch at
// once, so two blocks that write the same bytes without an atomic lose one of the writes, while
// the stand-in, running blocks one after another, would sum right. No fnokern kernel uses
// atomics: every output byte belongs to one block. With the check on, a launch makes every live
// buffer read-only; a block's first write to a page faults, the page is copied and made writable
// (the write then runs); when the block ends, the bytes that changed are compared with the
// blocks before it, and the page is read-only again. Two blocks that changed one byte fail the
// launch (CUDA_ERROR_LAUNCH_FAILED), naming the byte and both blocks.

thread_local bool t_racecheck = false;
constexpr size_t kRacePages = 4096;  // pages one block may write (16 MiB), checked
struct RaceState {
    std::vector<std::pair<char*, char*>> regions;  // read-only during the launch: [begin, end)
    char* copies = nullptr;                        // kRacePages page copies (mmap)
    char* pages[kRacePages];                       // the running block's written pages
    size_t n = 0;
    bool overflow = false;
    unsigned block = 0;
    std::unordered_map<uint64_t, std::vector<uint32_t>> owner;  // page -> block + 1 per byte
    bool race = false;
    uint64_t race_addr = 0;
    unsigned race_a = 0, race_b = 0;
};
RaceState g_race;
volatile sig_atomic_t g_race_on = 0;

bool race_fault(void* addr) {
    char* p = (char*)((uint64_t)addr & ~(kPage - 1));
    for (const auto& [b, e] : g_race.regions) {
        if (p >= b && p < e) {
            if (g_race.n == kRacePages) {
                g_race.overflow = true;
                return false;
            }
            memcpy(g_race.copies + g_race.n * kPage, p, kPage);
            g_race.pages[g_race.n++] = p;
            mprotect(p, kPage, PROT_READ | PROT_WRITE);
            return true;
        }
    }
    return false;
}

void race_block_begin(unsigned b) {
    g_race.block = b;
    g_race.n = 0;
}

void race_block_end(unsigned b) {
    for (size_t i = 0; i < g_race.n; i++) {
        char* p = g_race.pages[i];
        const char* before = g_race.copies + i * kPage;
        std::vector<uint32_t>& own = g_race.owner[(uint64_t)p];
        if (own.empty()) own.assign(kPage, 0);
        for (size_t j = 0; j < kPage; j++) {
            if (p[j] == before[j]) continue;
            if (own[j] != 0 && own[j] != b + 1 && !g_race.race) {
                g_race.race = true;
                g_race.race_addr = (uint64_t)(p + j);
                g_race.race_a = own[j] - 1;
                g_race.race_b = b;
            }
            own[j] = b + 1;
        }
        mprotect(p, kPage, PROT_READ);
    }
    g_race.n = 0;
}

// Makes every live buffer read-only for the launch that follows.
void race_begin() {
    if (!g_race.copies) {
        void* m = mmap(nullptr, kRacePages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) abort();
        g_race.copies = (char*)m;
    }
    g_race.regions.clear();
    g_race.owner.clear();
    g_race.n = 0;
    g_race.overflow = g_race.race = false;
    for (const auto& [base, a] : g_live) {
        char* b = (char*)(a.base & ~(kPage - 1));  // the page holding the slack and the start
        char* e = (char*)round_up(a.base + a.size, kPage);
        mprotect(b, e - b, PROT_READ);
        g_race.regions.push_back({b, e});
    }
    fakecuda_set_block_hooks(race_block_begin, race_block_end);
    g_race_on = 1;
}

// Every buffer writable again; the launch's verdict.
void race_end() {
    g_race_on = 0;
    fakecuda_set_block_hooks(nullptr, nullptr);
    for (const auto& [b, e] : g_race.regions) mprotect(b, e - b, PROT_READ | PROT_WRITE);
    g_race.regions.clear();
    g_race.owner.clear();
}

void on_fault(int sig, siginfo_t* info, void* uc) {
    if (g_race_on && sig == SIGSEGV && pthread_equal(pthread_self(), g_kernel_thread) && race_fault(info->si_addr)) return;
    if (g_in_kernel && pthread_equal(pthread_self(), g_kernel_thread)) {
        g_fault_addr = (uint64_t)info->si_addr;
        g_in_kernel = 0;
        siglongjmp(g_fault_jmp, 1);
    }
    // Not ours: the previous handler (Rust's stack-overflow report, or the default).
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    if (old->sa_flags & SA_SIGINFO) {
        old->sa_sigaction(sig, info, uc);
    } else if (old->sa_handler == SIG_DFL || old->sa_handler == SIG_IGN) {
        sigaction(sig, old, nullptr);  // re-raised when the faulting instruction runs again
    } else {
        old->sa_handler(sig);
    }
}

__attribute__((constructor)) void install_fault_handler() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

// A fault handler needs an alternate stack on the launching thread (a fiber may have overflowed
// its own); Rust's threads have one, others get one here.
void ensure_alt_stack() {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return;
    static thread_local std::vector<char> alt(1 << 16);
    stack_t st;
    st.ss_sp = alt.data();
    st.ss_size = alt.size();
    st.ss_flags = 0;
    sigaltstack(&st, nullptr);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Services for libcublas.so and libcufft.so

FAKE_API void fakecuda_lock() { g_lock.lock(); }
FAKE_API void fakecuda_unlock() { g_lock.unlock(); }

FAKE_API void fakecuda_say(const char* api, const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fakecuda: %s: %s\n", api, msg);
}

FAKE_API int fakecuda_context_ok(const char* api) {
    LOCK;
    if (t_current == nullptr) {
        fakecuda_say(api, "no current context on this thread (bind the context to the calling thread first)");
        return 0;
    }
    if (t_current != &g_primary || g_primary.refs <= 0) {
        fakecuda_say(api, "the current context has been released");
        return 0;
    }
    if (g_primary.sticky) {
        static bool said = false;  // once: every later call fails the same way
        if (!said) fakecuda_say(api, "the context is unusable after an earlier error (%d); so is every later call", g_primary.sticky);
        said = true;
        return 0;
    }
    return 1;
}

FAKE_API int fakecuda_stream_ok(const char* api, const void* stream) {
    if (stream == nullptr || stream == (const void*)0x2) return 1;
    LOCK;
    auto it = std::find(g_streams.begin(), g_streams.end(), (FakeStream*)stream);
    if (it != g_streams.end() && !(*it)->destroyed) return 1;
    fakecuda_say(api, "%p is not a live stream", stream);
    return 0;
}

FAKE_API int fakecuda_library_stream_ok(const char* api, const void* stream) {
    if (!fakecuda_stream_ok(api, stream)) return 0;
    if (stream == nullptr || stream == (const void*)0x2) return 1;
    fakecuda_say(api, "a created stream: the stand-in runs cuBLAS, cuFFT and NCCL calls when they are made, so only on the default stream");
    return 0;
}

FAKE_API int fakecuda_range_ok(const char* api, const char* what, uint64_t ptr, uint64_t bytes, uint64_t align) {
    LOCK;
    const Alloc* a = live_at(ptr);
    if (!a) {
        fakecuda_say(api, "%s: %s", what, describe(ptr).c_str());
        return 0;
    }
    if (ptr + bytes > a->base + a->size) {
        fakecuda_say(api, "%s: %llu bytes from 0x%llx run %llu bytes past the end of its %llu-byte allocation", what, (unsigned long long)bytes,
                     (unsigned long long)ptr, (unsigned long long)(ptr + bytes - a->base - a->size), (unsigned long long)a->size);
        return 0;
    }
    if (align > 1 && ptr % align != 0) {
        fakecuda_say(api, "%s: 0x%llx is not aligned to %llu bytes", what, (unsigned long long)ptr, (unsigned long long)align);
        return 0;
    }
    return 1;
}

FAKE_API int fakecuda_slack_ok(const char* api, const char* what, uint64_t ptr) {
    LOCK;
    const Alloc* a = live_at(ptr);
    if (!a) return 1;
    const unsigned char* slack = (const unsigned char*)a->map + kPage;
    const uint64_t n = a->base - (uint64_t)slack;
    for (uint64_t i = 0; i < n; i++) {
        if (slack[i] != 0xff) {
            fakecuda_say(api, "%s: something was written %llu bytes before the start of its %llu-byte allocation", what, (unsigned long long)(n - i),
                         (unsigned long long)a->size);
            memset((void*)slack, 0xff, n);  // reported once
            return 0;
        }
    }
    return 1;
}

FAKE_API uint64_t fakecuda_bytes_after(uint64_t ptr) {
    LOCK;
    const Alloc* a = live_at(ptr);
    return a ? a->base + a->size - ptr : 0;
}

FAKE_API void fakecuda_poison(uint64_t ptr, uint64_t bytes) { memset((void*)ptr, 0xff, bytes); }

FAKE_API void fakecuda_count(const char* name) {
    LOCK;
    g_calls[name]++;
    if (trace()) fprintf(stderr, "fakecuda: run %s\n", name);
}

FAKE_API uint64_t fakecuda_calls(const char* name) {
    LOCK;
    auto it = g_calls.find(name);
    return it == g_calls.end() ? 0 : it->second;
}

FAKE_API size_t fakecuda_counters(char* buf, size_t len) {
    LOCK;
    std::string all;
    for (const auto& [name, n] : g_calls) all += name + "=" + std::to_string(n) + "\n";
    if (buf && len > 0) snprintf(buf, len, "%s", all.c_str());
    return all.size();
}

// The race check for the launches this thread makes from now on (see RaceState), on or off.
FAKE_API void fakecuda_racecheck(int on) { t_racecheck = on != 0; }

FAKE_API void fakecuda_reset_calls() {
    LOCK;
    g_calls.clear();
}

// ---------------------------------------------------------------------------------------------
// Initialisation, devices

FAKE_API CUresult cuInit(unsigned flags) {
    LOCK;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    g_init = true;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetCount(int* n) {
    NEED_INIT;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = device_count();
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    NEED_INIT;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (check_device(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    NEED_INIT;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (check_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "fnokern CUDA stand-in (kernels on the host)");
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    NEED_INIT;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (check_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = total_memory();
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice d) {
    NEED_INIT;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (check_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    // An H100-like device: the limits the stand-in enforces at launch.
    switch (attrib) {
        case 1: *v = 1024; break;        // MAX_THREADS_PER_BLOCK
        case 2: *v = 1024; break;        // MAX_BLOCK_DIM_X
        case 3: *v = 1024; break;        // MAX_BLOCK_DIM_Y
        case 4: *v = 64; break;          // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;  // MAX_GRID_DIM_X
        case 6: *v = 65535; break;       // MAX_GRID_DIM_Y
        case 7: *v = 65535; break;       // MAX_GRID_DIM_Z
        case 8: *v = 49152; break;       // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *v = 65536; break;       // TOTAL_CONSTANT_MEMORY
        case 10: *v = 32; break;         // WARP_SIZE
        case 12: *v = 65536; break;      // MAX_REGISTERS_PER_BLOCK
        case 13: *v = 1755000; break;    // CLOCK_RATE (kHz)
        case 16: *v = 132; break;        // MULTIPROCESSOR_COUNT
        case 41: *v = 1; break;          // UNIFIED_ADDRESSING
        case 75: *v = 9; break;          // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;          // COMPUTE_CAPABILITY_MINOR
        case 115: *v = 1; break;         // MEMORY_POOLS_SUPPORTED
        default:
            fakecuda_say("cuDeviceGetAttribute", "attribute %d is not modelled by the stand-in", attrib);
            return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    LOCK;
    NEED_INIT;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (check_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    if (g_primary.refs == 0) g_primary.sticky = CUDA_SUCCESS;  // a new primary context
    g_primary.refs++;
    *ctx = &g_primary;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    LOCK;
    NEED_INIT;
    if (check_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    if (g_primary.refs <= 0) {
        fakecuda_say("cuDevicePrimaryCtxRelease_v2", "the primary context is not retained");
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    g_primary.refs--;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    NEED_INIT;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = t_current;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxSetCurrent(CUcontext ctx) {
    LOCK;
    NEED_INIT;
    if (ctx != nullptr && (ctx != &g_primary || g_primary.refs <= 0)) {
        fakecuda_say("cuCtxSetCurrent", "%p is not a live context", (void*)ctx);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    t_current = ctx;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxSynchronize() {
    LOCK;
    NEED_CONTEXT("cuCtxSynchronize");
    flush_all();
    complete_copies(g_copies);
    fakecuda_count("cuCtxSynchronize");
    return sticky_or_success();
}

FAKE_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCK;
    NEED_CONTEXT("cuMemGetInfo_v2");
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    *total = total_memory();
    *free_bytes = total_memory() - g_used;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Streams and events: work on the default stream runs when it is called, except the copies to
// the host, which waiting for the stream, the context or an event recorded after them completes;
// work on a created stream when something waits for it (on_stream).

FAKE_API CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    LOCK;
    NEED_CONTEXT("cuStreamCreate");
    if (!s || flags > 1) return CUDA_ERROR_INVALID_VALUE;
    FakeStream* st = new FakeStream;
    st->blocking = flags == 0;  // 1: CU_STREAM_NON_BLOCKING
    static uint64_t next_id = 0;
    st->id = ++next_id;
    g_streams.push_back(st);
    *s = st;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int priority) {
    (void)priority;
    return cuStreamCreate(s, flags);
}

FAKE_API CUresult cuStreamDestroy_v2(CUstream s) {
    LOCK;
    NEED_CONTEXT("cuStreamDestroy_v2");
    if (!is_created(s) || !fakecuda_stream_ok("cuStreamDestroy_v2", s)) return CUDA_ERROR_INVALID_HANDLE;
    // The call returns at once; the stream's queued work still runs, when the context is
    // synchronised (or an event recorded on it is waited for), and then the stream is let go.
    s->destroyed = true;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamQuery(CUstream s) {
    LOCK;
    NEED_CONTEXT("cuStreamQuery");
    NEED_STREAM("cuStreamQuery", s);
    if (is_created(s)) flush(s, UINT64_MAX);  // "complete" is what the query answers
    return sticky_or_success();
}

FAKE_API CUresult cuStreamSynchronize(CUstream s) {
    LOCK;
    NEED_CONTEXT("cuStreamSynchronize");
    NEED_STREAM("cuStreamSynchronize", s);
    if (is_created(s)) flush(s, UINT64_MAX);
    complete_copies(g_copies);
    fakecuda_count("cuStreamSynchronize");
    return sticky_or_success();
}

static bool event_ok(const char* api, CUevent e) {
    if (e && e->magic == kMagic) return true;
    fakecuda_say(api, "%p is not a live event", (void*)e);
    return false;
}

// The created stream the event was recorded on, while its work may still be queued.
static FakeStream* event_stream(CUevent e) {
    if (e->stream == 0) return nullptr;
    for (FakeStream* s : g_streams)
        if (s->id == e->stream) return s;
    return nullptr;
}

FAKE_API CUresult cuEventCreate(CUevent* e, unsigned flags) {
    LOCK;
    NEED_CONTEXT("cuEventCreate");
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    (void)flags;
    *e = new FakeEvent;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuEventDestroy_v2(CUevent e) {
    LOCK;
    NEED_CONTEXT("cuEventDestroy_v2");
    if (!event_ok("cuEventDestroy_v2", e)) return CUDA_ERROR_INVALID_HANDLE;
    e->magic = 0;
    delete e;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuEventRecord(CUevent e, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuEventRecord");
    NEED_STREAM("cuEventRecord", s);
    if (!event_ok("cuEventRecord", e)) return CUDA_ERROR_INVALID_HANDLE;
    e->copies = g_copies;
    e->stream = is_created(s) ? s->id : 0;
    e->pos = is_created(s) ? s->enqueued : 0;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuEventSynchronize(CUevent e) {
    LOCK;
    NEED_CONTEXT("cuEventSynchronize");
    if (!event_ok("cuEventSynchronize", e)) return CUDA_ERROR_INVALID_HANDLE;
    if (FakeStream* es = event_stream(e)) flush(es, e->pos);
    complete_copies(e->copies);
    fakecuda_count("cuEventSynchronize");
    return sticky_or_success();
}

FAKE_API CUresult cuEventQuery(CUevent e) {
    LOCK;
    NEED_CONTEXT("cuEventQuery");
    if (!event_ok("cuEventQuery", e)) return CUDA_ERROR_INVALID_HANDLE;
    if (FakeStream* es = event_stream(e)) flush(es, e->pos);
    complete_copies(e->copies);  // "complete" is what the query answers
    return sticky_or_success();
}

FAKE_API CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    LOCK;
    NEED_CONTEXT("cuStreamWaitEvent");
    NEED_STREAM("cuStreamWaitEvent", s);
    (void)flags;
    if (!event_ok("cuStreamWaitEvent", e)) return CUDA_ERROR_INVALID_HANDLE;
    // What the event covers runs now: before anything s runs after this call.
    if (FakeStream* es = event_stream(e); es && es != s) flush(es, e->pos);
    return sticky_or_success();
}

// ---------------------------------------------------------------------------------------------
// Memory: allocation, the pool's counters, copies and memset

FAKE_API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCK;
    NEED_CONTEXT("cuMemAlloc_v2");
    const CUresult r = do_alloc("cuMemAlloc_v2", p, bytes, false);
    if (r == CUDA_SUCCESS) fakecuda_count("cuMemAlloc_v2");
    return r;
}

FAKE_API CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    NEED_CONTEXT("cuMemFree_v2");
    const CUresult r = do_free("cuMemFree_v2", p, false);
    if (r == CUDA_SUCCESS) fakecuda_count("cuMemFree_v2");
    return r;
}

FAKE_API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuMemAllocAsync");
    NEED_STREAM("cuMemAllocAsync", s);
    const CUresult r = do_alloc("cuMemAllocAsync", p, bytes, true);
    if (r == CUDA_SUCCESS) fakecuda_count("cuMemAllocAsync");
    return r;
}

FAKE_API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuMemFreeAsync");
    NEED_STREAM("cuMemFreeAsync", s);
    if (g_live.find(p) == g_live.end()) return do_free("cuMemFreeAsync", p, true);  // says why
    // Freed in stream order: work queued before it still reads the buffer.
    return on_stream(s, [p] {
        const CUresult r = do_free("cuMemFreeAsync", p, true);
        if (r == CUDA_SUCCESS) fakecuda_count("cuMemFreeAsync");
        return r;
    });
}

FAKE_API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
    NEED_INIT;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    if (check_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &g_pool;
    return CUDA_SUCCESS;
}

// Attributes: 4 RELEASE_THRESHOLD, 5 RESERVED_MEM_CURRENT, 6 RESERVED_MEM_HIGH, 7 USED_MEM_CURRENT,
// 8 USED_MEM_HIGH (the stand-in reserves exactly what is in use).
FAKE_API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, int attr, void* value) {
    LOCK;
    NEED_INIT;
    if (pool != &g_pool || !value) return CUDA_ERROR_INVALID_VALUE;
    const uint64_t v = *(const uint64_t*)value;
    switch (attr) {
        case 4: g_release_threshold = v; return CUDA_SUCCESS;
        case 6:
        case 8:
            if (v != 0) {
                fakecuda_say("cuMemPoolSetAttribute", "a high-water mark may only be set to 0 (a reset)");
                return CUDA_ERROR_INVALID_VALUE;
            }
            g_pool_high = g_pool_used;
            return CUDA_SUCCESS;
        default:
            fakecuda_say("cuMemPoolSetAttribute", "attribute %d is not settable in the stand-in", attr);
            return CUDA_ERROR_INVALID_VALUE;
    }
}

FAKE_API CUresult cuMemPoolGetAttribute(CUmemoryPool pool, int attr, void* value) {
    LOCK;
    NEED_INIT;
    if (pool != &g_pool || !value) return CUDA_ERROR_INVALID_VALUE;
    uint64_t* out = (uint64_t*)value;
    switch (attr) {
        case 4: *out = g_release_threshold; return CUDA_SUCCESS;
        case 5:
        case 7: *out = g_pool_used; return CUDA_SUCCESS;
        case 6:
        case 8: *out = g_pool_high; return CUDA_SUCCESS;
        default:
            fakecuda_say("cuMemPoolGetAttribute", "attribute %d is not modelled by the stand-in", attr);
            return CUDA_ERROR_INVALID_VALUE;
    }
}

FAKE_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuMemcpyHtoDAsync_v2");
    NEED_STREAM("cuMemcpyHtoDAsync_v2", s);
    if (bytes == 0) return CUDA_SUCCESS;
    if (!src || !fakecuda_range_ok("cuMemcpyHtoDAsync_v2", "destination", dst, bytes, 1)) return CUDA_ERROR_INVALID_VALUE;
    // The host's bytes are taken now (pageable memory is staged before the call returns); they
    // reach the device at the copy's place in the stream.
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + bytes);
    return on_stream(s, [dst, staged] {
        if (!fakecuda_range_ok("cuMemcpyHtoDAsync_v2", "destination", dst, staged->size(), 1)) return (CUresult)CUDA_ERROR_ILLEGAL_ADDRESS;
        memcpy((void*)dst, staged->data(), staged->size());
        fakecuda_count("cuMemcpyHtoDAsync_v2");
        return (CUresult)CUDA_SUCCESS;
    });
}

FAKE_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuMemcpyDtoHAsync_v2");
    NEED_STREAM("cuMemcpyDtoHAsync_v2", s);
    if (bytes == 0) return CUDA_SUCCESS;
    if (!dst || !fakecuda_range_ok("cuMemcpyDtoHAsync_v2", "source", src, bytes, 1)) return CUDA_ERROR_INVALID_VALUE;
    memset(dst, 0xff, bytes);
    if (is_created(s)) {
        // Runs when something waits for the stream, so the bytes arrive then.
        return on_stream(s, [dst, src, bytes] {
            if (!fakecuda_range_ok("cuMemcpyDtoHAsync_v2", "source", src, bytes, 1)) return (CUresult)CUDA_ERROR_ILLEGAL_ADDRESS;
            memcpy(dst, (const void*)src, bytes);
            fakecuda_count("cuMemcpyDtoHAsync_v2");
            return (CUresult)CUDA_SUCCESS;
        });
    }
    g_pending.push_back(PendingCopy{++g_copies, dst, std::vector<char>((const char*)src, (const char*)src + bytes)});
    fakecuda_count("cuMemcpyDtoHAsync_v2");
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuMemcpyDtoDAsync_v2");
    NEED_STREAM("cuMemcpyDtoDAsync_v2", s);
    if (bytes == 0) return CUDA_SUCCESS;
    if (!fakecuda_range_ok("cuMemcpyDtoDAsync_v2", "source", src, bytes, 1) || !fakecuda_range_ok("cuMemcpyDtoDAsync_v2", "destination", dst, bytes, 1))
        return CUDA_ERROR_INVALID_VALUE;
    return on_stream(s, [dst, src, bytes] {
        if (!fakecuda_range_ok("cuMemcpyDtoDAsync_v2", "source", src, bytes, 1) || !fakecuda_range_ok("cuMemcpyDtoDAsync_v2", "destination", dst, bytes, 1))
            return (CUresult)CUDA_ERROR_ILLEGAL_ADDRESS;
        memmove((void*)dst, (const void*)src, bytes);
        fakecuda_count("cuMemcpyDtoDAsync_v2");
        return (CUresult)CUDA_SUCCESS;
    });
}

FAKE_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    LOCK;
    NEED_CONTEXT("cuMemsetD8Async");
    NEED_STREAM("cuMemsetD8Async", s);
    if (n == 0) return CUDA_SUCCESS;
    if (!fakecuda_range_ok("cuMemsetD8Async", "destination", dst, n, 1)) return CUDA_ERROR_INVALID_VALUE;
    return on_stream(s, [dst, v, n] {
        if (!fakecuda_range_ok("cuMemsetD8Async", "destination", dst, n, 1)) return (CUresult)CUDA_ERROR_ILLEGAL_ADDRESS;
        memset((void*)dst, v, n);
        fakecuda_count("cuMemsetD8Async");
        return (CUresult)CUDA_SUCCESS;
    });
}

// ---------------------------------------------------------------------------------------------
// Modules and launches

// A fatbin starts with magic 0xba55ed50, a 16-bit version, a 16-bit header size and a 64-bit
// payload size; anything else is refused (the stand-in loads what nvcc built, nothing else).
FAKE_API CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    LOCK;
    NEED_CONTEXT("cuModuleLoadData");
    if (!m || !image) return CUDA_ERROR_INVALID_VALUE;
    const unsigned char* p = (const unsigned char*)image;
    uint32_t magic;
    uint16_t header;
    uint64_t payload;
    memcpy(&magic, p, 4);
    memcpy(&header, p + 6, 2);
    memcpy(&payload, p + 8, 8);
    if (magic != 0xba55ed50u || header < 16 || payload == 0 || payload > (1ull << 31)) {
        fakecuda_say("cuModuleLoadData", "the image is not a fatbin (magic 0x%08x)", magic);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    FakeModule* mod = new FakeModule;
    mod->image.assign(p, p + header + payload);
    *m = mod;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuModuleUnload(CUmodule m) {
    LOCK;
    NEED_CONTEXT("cuModuleUnload");
    if (!m || m->magic != kMagic) return CUDA_ERROR_INVALID_HANDLE;
    m->magic = 0;  // its functions are invalid from now on; the object is kept so they can say so
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    LOCK;
    NEED_CONTEXT("cuModuleGetFunction");
    if (!f || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!m || m->magic != kMagic) return CUDA_ERROR_INVALID_HANDLE;
    // The kernel must be in the fatbin nvcc built (its code section is named .text.<name>)...
    const std::string section = std::string(".text.") + name;
    const char* img = m->image.data();
    if (!memmem(img, m->image.size(), section.c_str(), section.size() + 1)) {
        fakecuda_say("cuModuleGetFunction", "no kernel `%s` in the module", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    // ...and among the kernels the stand-in compiled for the host.
    const FakeKernel* k = fakecuda_kernel(name);
    if (!k) {
        fakecuda_say("cuModuleGetFunction", "`%s` is in the fatbin but the stand-in was not built with it (rebuild the stand-in)", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = new FakeFunction{kMagic, m, k};
    return CUDA_SUCCESS;
}

static CUresult run_launch(const char* name, bool racecheck, const std::function<CUresult()>& go);

FAKE_API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared, CUstream s,
                                 void** params, void** extra) {
    LOCK;
    NEED_CONTEXT("cuLaunchKernel");
    NEED_STREAM("cuLaunchKernel", s);
    if (!f || f->magic != kMagic || !f->module || f->module->magic != kMagic) {
        fakecuda_say("cuLaunchKernel", "not a function of a loaded module");
        return CUDA_ERROR_INVALID_HANDLE;
    }
    const char* name = f->kernel->name;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gy > 65535 || gz > 65535 || gx > 2147483647u) {
        fakecuda_say(name, "grid (%u, %u, %u) of blocks (%u, %u, %u): a zero or too large dimension", gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads > 1024 || bx > 1024 || by > 1024 || bz > 64) {
        fakecuda_say(name, "blocks of (%u, %u, %u) threads exceed the limit of 1024", bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (bx % 32 != 0) {
        fakecuda_say(name, "a block of %u threads: the kernels' block_sum needs a multiple of 32", bx);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (gy != 1 || gz != 1 || by != 1 || bz != 1) {
        fakecuda_say(name, "a %s-dimensional launch: the stand-in runs one-dimensional grids only", gy != 1 || gz != 1 ? "multi" : "block-multi");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (shared > 49152) {
        fakecuda_say(name, "%u bytes of dynamic shared memory exceed 48 KiB", shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (shared != 0) {
        fakecuda_say(name, "dynamic shared memory is not modelled by the stand-in");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (extra != nullptr || params == nullptr) {
        fakecuda_say(name, "arguments must come as kernelParams (extra is not supported)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (trace()) fprintf(stderr, "fakecuda: launch %s <<<%u, %u>>>%s\n", name, gx, bx, is_created(s) ? " (queued on a created stream)" : "");
    const bool racecheck = t_racecheck;
    if (is_created(s)) {
        std::function<CUresult(unsigned, unsigned)> bound = f->kernel->bind(f->kernel, params);
        return on_stream(s, [name, racecheck, bound, gx, bx] { return run_launch(name, racecheck, [&] { return bound(gx, bx); }); });
    }
    return on_stream(s, [&] { return run_launch(name, racecheck, [&] { return f->kernel->launch(f->kernel, params, gx, bx); }); });
}

// Runs one launch (`go`) with the fault handler armed and, with `racecheck`, the race check;
// counts it when it succeeds. An illegal address is sticky, as on a GPU.
static CUresult run_launch(const char* name, bool racecheck, const std::function<CUresult()>& go) {
    ensure_alt_stack();
    g_kernel_thread = pthread_self();
    g_kernel_name = name;
    if (sigsetjmp(g_fault_jmp, 1) != 0) {
        fakecuda_abandon_launch();
        if (racecheck) race_end();
        LOCK;
        const uint64_t addr = g_fault_addr;
        fakecuda_say(name, "illegal memory access: %s", describe(addr).c_str());
        g_primary.sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
        return CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    if (racecheck) race_begin();
    g_in_kernel = 1;
    CUresult r = go();
    g_in_kernel = 0;
    if (racecheck) {
        race_end();
        if (r == CUDA_SUCCESS && g_race.overflow) {
            fakecuda_say(name, "race check: a block wrote more than %zu pages", kRacePages);
            r = CUDA_ERROR_LAUNCH_FAILED;
        } else if (r == CUDA_SUCCESS && g_race.race) {
            const Alloc* a = live_at(g_race.race_addr);
            const std::string where = a ? "byte " + std::to_string(g_race.race_addr - a->base) + " of a " + std::to_string(a->size) + "-byte allocation"
                                        : describe(g_race.race_addr);
            fakecuda_say(name, "blocks %u and %u of one launch both wrote %s: a GPU runs them at once, and without an atomic one write is lost",
                         g_race.race_a, g_race.race_b, where.c_str());
            r = CUDA_ERROR_LAUNCH_FAILED;
        }
    }
    if (r == CUDA_SUCCESS) fakecuda_count(name);
    if (r == CUDA_ERROR_ILLEGAL_ADDRESS) g_primary.sticky = r;
    return r;
}

// ---------------------------------------------------------------------------------------------
// Errors

static const char* error_name(CUresult e) {
    switch (e) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        default: return nullptr;
    }
}

FAKE_API CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

FAKE_API CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    switch (e) {
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory"; return CUDA_SUCCESS;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered"; return CUDA_SUCCESS;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "invalid device context"; return CUDA_SUCCESS;
        case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; return CUDA_SUCCESS;
        default: return cuGetErrorName(e, s);
    }
}
