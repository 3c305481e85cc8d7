// What a CUDA translation unit of CubeCL's takes from the device, for a host compiler: a
// kernel that synchronises its cube runs as one coroutine per unit, a cube at a time,
// `__syncthreads` where each yields (`nf_launch`); one that does not, its units one after
// another. Both on the caller's thread. NVIDIA's own headers give the bf16 and f16 types and their conversions (the
// host forms of what NVRTC compiles), <math.h> the float overloads of the functions the kernels
// call. Included ahead of the kernel's source, which `mod.rs` wraps in a namespace so that its
// own integer typedefs do not clash with the host's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __launch_bounds__(...)
#undef __device__
#define __device__
#undef __align__
#define __align__(n) alignas(n)

struct nf_dim3 {
    unsigned x, y, z;
};
// Per thread, all four: test threads may launch the same kernel at once.
static thread_local nf_dim3 threadIdx, blockIdx, blockDim, gridDim;
// The cube's dynamic shared memory (`host.rs` points each kernel's `extern __shared__` here),
// as long as the launch gives, and aligned as CUDA aligns it: to 16 bytes at least.
static thread_local char* nf_shared;

static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }
static inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }

// Calls `f` with its arguments as the driver takes them: `args[i]` points at the i-th.
template <typename... A, size_t... I>
static void nf_call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}

// A cube's shared memory, as NaNs, so a value read before a unit wrote it shows.
static void nf_poison(size_t shared) noexcept {
    float* v = reinterpret_cast<float*>(nf_shared);
    for (size_t i = 0; i < shared / sizeof(float); ++i) v[i] = NAN;
}

// Every cube of a launch in order, on the calling thread: its shared memory poisoned and
// `blockIdx` set, then `run_cube(c)` for the c-th.
template <typename F>
static void nf_each_cube(unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, F&& run_cube) {
    blockDim = {units, 1, 1};
    gridDim = {gx, gy, gz};
    const size_t cubes = size_t(gx) * gy * gz;
    for (size_t c = 0; c < cubes; ++c) {
        nf_poison(shared);
        blockIdx = {unsigned(c % gx), unsigned(c / gx % gy), unsigned(c / (size_t(gx) * gy))};
        run_cube(c);
    }
}

// The launch of a kernel that never synchronises its cube: every unit of every cube in turn
// (its units share nothing a unit reads after another wrote it).
template <typename... A>
static void nf_launch_serial(void (*f)(A...), unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args) {
    nf_each_cube(gx, gy, gz, units, shared, [&](size_t) {
        for (unsigned u = 0; u < units; ++u) {
            threadIdx = {u, 0, 0};
            nf_call(f, args, std::index_sequence_for<A...>{});
        }
    });
}

// The launch of a kernel that does: cubes in order, each unit of a cube a coroutine on the
// calling thread with a stack of its own, run in turn up to its next `__syncthreads` (or its
// end) — forward in one round, backward in the next, and the other way round in odd cubes —,
// so a unit reading what another writes in the same round, without a barrier between, reads
// the stale value in one of the two orders, every run the same (threads would race, and pass
// most runs). A unit returning early leaves the rounds.
static constexpr size_t nf_stack_bytes = size_t(1) << 18;

// `units` stacks for a launch, each with an inaccessible page below it (an overflow faults).
// Every kernel's library has the prelude's statics of its own, so none is kept past a launch.
struct nf_stacks {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t length;
    char* base;
    explicit nf_stacks(unsigned units) : length(units * (nf_stack_bytes + page)) {
        void* m = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "stacks for %u units: mmap failed: %s\n", units, strerror(errno));
            abort();
        }
        base = static_cast<char*>(m);
        for (unsigned u = 0; u < units; ++u) mprotect(base + u * (nf_stack_bytes + page), page, PROT_NONE);
    }
    ~nf_stacks() { munmap(base, length); }
    char* stack(unsigned u) const { return base + u * (nf_stack_bytes + page) + page; }
};

#if defined(__x86_64__)
// A switch between coroutines that saves only what the calling convention keeps across a call.
// `ucontext`'s also saves the signal mask, a system call each way, which took most of a
// launch's time: a reduction's tree meets at a barrier per level, each unit switching twice.
// Stores the caller's stack pointer in `*from` and resumes the coroutine whose stack pointer
// `to` is, where it switched away (or, new, at the address its stack holds: `nf_start`). Opaque
// to the optimiser (`noipa`), which must take it to read and write everything.
__attribute__((naked, noinline, noipa)) static void nf_switch(void** from, void* to) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}
using nf_context = void*;
#else
using nf_context = ucontext_t;
#endif

// A launch's coroutines, reached through one plain thread-local pointer: a thread-local of a
// class type costs a call to its initialiser at each use, in the barrier's path.
struct nf_cube {
    std::vector<nf_context> units;
    nf_context scheduler;
    unsigned running;
    std::vector<char> done;
    std::function<void()> body;
    // A value per unit, for `__shfl_xor_sync`.
    std::vector<uint64_t> slots;
};
static thread_local nf_cube* nf_this_cube;

static void nf_unit_entry();

#if defined(__x86_64__)
static void __syncthreads() {
    nf_cube& c = *nf_this_cube;
    nf_switch(&c.units[c.running], c.scheduler);
}
static void nf_resume(nf_cube& c, unsigned u) { nf_switch(&c.scheduler, c.units[u]); }
static void nf_finish(nf_cube& c) {
    void* finished;
    nf_switch(&finished, c.scheduler);
    __builtin_unreachable();
}
// A coroutine not yet run, on the stack `stack`: six zeroed registers for `nf_switch` to pop,
// then `nf_unit_entry` to return into, which it enters with its stack aligned as after a call
// (16 bytes, less the return address). Nothing lies above to return to: a unit hands the
// thread back for good when its kernel returns (`nf_finish`).
static void nf_start(nf_cube& c, unsigned u, char* stack) {
    void** sp = reinterpret_cast<void**>(stack + nf_stack_bytes) - 8;
    for (int r = 0; r < 6; ++r) sp[r] = nullptr;
    sp[6] = reinterpret_cast<void*>(&nf_unit_entry);
    sp[7] = nullptr;
    c.units[u] = sp;
}
#else
static void __syncthreads() {
    nf_cube& c = *nf_this_cube;
    swapcontext(&c.units[c.running], &c.scheduler);
}
static void nf_resume(nf_cube& c, unsigned u) { swapcontext(&c.scheduler, &c.units[u]); }
static void nf_finish(nf_cube&) {}  // `uc_link` resumes the scheduler
static void nf_start(nf_cube& c, unsigned u, char* stack) {
    getcontext(&c.units[u]);
    c.units[u].uc_stack.ss_sp = stack;
    c.units[u].uc_stack.ss_size = nf_stack_bytes;
    c.units[u].uc_link = &c.scheduler;
    makecontext(&c.units[u], nf_unit_entry, 0);
}
#endif

static void nf_unit_entry() {
    nf_cube& c = *nf_this_cube;
    c.body();
    c.done[c.running] = 1;
    nf_finish(c);
}

// A warp's exchange. The kernels shuffle only where every unit of the cube does, outside any
// branch (`tree`), so each unit leaves its value in a slot of the cube's, all meet at a barrier,
// each reads that of the unit whose position in its warp of 32 differs by `mask`'s bits, and
// all meet again before the slots are written anew.
static unsigned __activemask() { return 0xffffffffu; }
template <typename T>
static T __shfl_xor_sync(unsigned, T v, unsigned mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffled value fits a slot");
    nf_cube* c = nf_this_cube;
    if (c == nullptr) {
        fprintf(stderr, "__shfl_xor_sync in a kernel with no __syncthreads: the host runs its units one after another\n");
        abort();
    }
    const unsigned u = threadIdx.x;
    std::memcpy(&c->slots[u], &v, sizeof(T));
    __syncthreads();
    T out;
    std::memcpy(&out, &c->slots[(u & ~31u) | ((u ^ mask) & 31u)], sizeof(T));
    __syncthreads();
    return out;
}

template <typename... A>
static void nf_launch(void (*f)(A...), unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args) {
    const nf_stacks stacks(units);
    nf_cube c{std::vector<nf_context>(units), {}, 0, std::vector<char>(units), [f, args] { nf_call(f, args, std::index_sequence_for<A...>{}); }, std::vector<uint64_t>(units)};
    nf_this_cube = &c;
    nf_dim3& unit = threadIdx;
    nf_each_cube(gx, gy, gz, units, shared, [&](size_t cube) {
        for (unsigned u = 0; u < units; ++u) {
            c.done[u] = 0;
            nf_start(c, u, stacks.stack(u));
        }
        for (size_t round = cube % 2, live = units; live > 0; ++round) {
            live = 0;
            for (unsigned i = 0; i < units; ++i) {
                const unsigned u = round % 2 == 0 ? i : units - 1 - i;
                if (c.done[u]) continue;
                unit = {u, 0, 0};
                c.running = u;
                nf_resume(c, u);
                live += !c.done[u];
            }
        }
    });
    nf_this_cube = nullptr;
}

// Out-of-bounds accesses, which a GPU faults on (ending the context) or lets corrupt its
// neighbours, and a CPU's heap mostly forgives. For a launch, each run of a kernel's buffers
// that overlap one another is copied to the end of a mapping whose next page is inaccessible,
// keeping its address modulo 16 (the kernels' widest access), and copied back after; a
// zero-length buffer points into such a page; the cube's shared memory ends at one too. A
// kernel touching one stops the test, naming itself and the buffer.

// A guard page of a running launch, for the fault handler: after buffer `buffer`, or after the
// shared memory (-1).
struct nf_guard {
    std::atomic<char*> page;
    const char* kernel;
    int buffer;
};
static nf_guard nf_guards[1024];
static std::mutex nf_guards_taken;
static struct sigaction nf_previous;

static void nf_on_fault(int sig, siginfo_t* info, void*) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    char* at = static_cast<char*>(info->si_addr);
    for (auto& g : nf_guards) {
        char* p = g.page.load();
        if (p != nullptr && at >= p && at < p + page) {
            char what[32] = "shared memory";
            if (g.buffer >= 0) snprintf(what, sizeof what, "buffer %d", g.buffer);
            char text[512];
            int n = snprintf(text, sizeof text,
                             "out of bounds: kernel %s touched %zu bytes past the end of its %s "
                             "(on a GPU, an illegal address or memory it does not own)\n",
                             g.kernel, size_t(at - p), what);
            if (n > 0) (void)!write(2, text, size_t(std::min(n, int(sizeof text) - 1)));
            _exit(70);
        }
    }
    // Not ours (Rust's stack guard, say): the fault again, under the handler before ours.
    sigaction(sig, &nf_previous, nullptr);
}

// One run of overlapping buffers, copied out of bounds' way.
struct nf_region {
    char* start;
    size_t bytes;
    char* map;
    size_t map_len;
    char* copy;
    int first;
};

// Maps `r` a place ending at a guard page, registered for the fault handler in `slots`: its
// copy at the same address modulo 16 as its start, within 16 bytes of the guard — inside it,
// for an empty buffer, so that any read of it faults.
static void nf_map_guarded(nf_region& r, const char* kernel, std::vector<int>& slots) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t data = (r.bytes + 16 + page - 1) / page * page;
    r.map_len = data + page;
    r.map = static_cast<char*>(mmap(nullptr, r.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (r.map == MAP_FAILED) {
        fprintf(stderr, "guarding a launch of %s: mmap of %zu bytes failed: %s\n", kernel, r.map_len, strerror(errno));
        abort();
    }
    char* guard = r.map + data;
    mprotect(guard, page, PROT_NONE);
    char* end = guard - r.bytes;
    r.copy = r.bytes == 0 ? guard + (uintptr_t(r.start) & 15) : end - ((uintptr_t(end) - uintptr_t(r.start)) & 15);
    std::lock_guard<std::mutex> hold(nf_guards_taken);
    for (size_t k = 0; k < std::size(nf_guards); ++k) {
        if (nf_guards[k].page.load() == nullptr) {
            nf_guards[k].kernel = kernel;
            nf_guards[k].buffer = r.first;
            nf_guards[k].page.store(guard);
            slots.push_back(int(k));
            return;
        }
    }
}

template <typename... A>
static void nf_guarded(void (*f)(A...), const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args,
                       void (*launch)(void (*)(A...), unsigned, unsigned, unsigned, unsigned, size_t, void**)) {
    static std::once_flag installed;
    std::call_once(installed, [] {
        struct sigaction on;
        memset(&on, 0, sizeof on);
        on.sa_sigaction = nf_on_fault;
        on.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&on.sa_mask);
        sigaction(SIGSEGV, &on, &nf_previous);
    });
    constexpr size_t n = sizeof...(A) - 1;  // the buffers; the last parameter is the info
    // A buffer's length counts its elements: a vector buffer's, vectors (as CubeCL counts them).
    const size_t sizes[] = {sizeof(std::remove_pointer_t<A>)...};
    const uint32_t* lengths = *static_cast<const uint32_t* const*>(args[n]);
    struct span {
        char* start;
        size_t bytes;
        int buffer;
    };
    std::vector<span> spans;
    for (size_t i = 0; i < n; ++i) spans.push_back({*static_cast<char**>(args[i]), size_t(lengths[i]) * sizes[i], int(i)});
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return spans[a].start < spans[b].start; });
    std::vector<nf_region> regions;
    std::vector<size_t> region_of(n);
    for (size_t i : order) {
        const span& s = spans[i];
        if (!regions.empty() && s.bytes > 0 && regions.back().bytes > 0 && s.start < regions.back().start + regions.back().bytes) {
            auto& r = regions.back();
            r.bytes = std::max(r.bytes, size_t(s.start + s.bytes - r.start));
        } else {
            regions.push_back({s.start, s.bytes, nullptr, 0, nullptr, s.buffer});
        }
        region_of[i] = regions.size() - 1;
    }
    std::vector<int> slots;
    for (auto& r : regions) {
        nf_map_guarded(r, kernel, slots);
        if (r.bytes > 0) memcpy(r.copy, r.start, r.bytes);
    }
    // The shared memory, as if a buffer starting at a whole vector.
    nf_region memory{nullptr, (shared + 15) / 16 * 16, nullptr, 0, nullptr, -1};
    nf_map_guarded(memory, kernel, slots);
    nf_shared = memory.copy;
    std::vector<char*> moved(n);
    std::vector<void*> moved_args(args, args + n + 1);
    for (size_t i = 0; i < n; ++i) {
        const nf_region& r = regions[region_of[i]];
        moved[i] = r.copy + (spans[i].start - r.start);
        moved_args[i] = &moved[i];
    }
    launch(f, gx, gy, gz, units, shared, moved_args.data());
    {
        std::lock_guard<std::mutex> hold(nf_guards_taken);
        for (int k : slots) nf_guards[k].page.store(nullptr);
    }
    for (auto& r : regions) {
        if (r.bytes > 0) memcpy(r.start, r.copy, r.bytes);
        munmap(r.map, r.map_len);
    }
    munmap(memory.map, memory.map_len);
    nf_shared = nullptr;
}
