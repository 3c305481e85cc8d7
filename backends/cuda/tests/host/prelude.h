// What a CUDA translation unit of CubeCL's takes from the device, for a host compiler: a
// kernel that synchronises its cube runs as one host thread per unit, a cube at a time,
// `__syncthreads` a barrier of the cube's threads; one that does not, its units one after
// another on the caller's thread. NVIDIA's own headers give the bf16 and f16 types and their conversions (the
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
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <memory>
#include <thread>
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
static thread_local std::barrier<>* nf_cube;
// The cube's dynamic shared memory (`host.rs` points each kernel's `extern __shared__` here).
static thread_local char* nf_shared;

// Shared memory as CUDA aligns it: to 16 bytes at least.
struct alignas(16) nf_words {
    float f[4];
};

static inline void __syncthreads() { nf_cube->arrive_and_wait(); }

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
static void nf_poison(std::vector<nf_words>& memory) noexcept {
    for (auto& w : memory)
        for (float& v : w.f) v = NAN;
}

// The launch of a kernel that never synchronises its cube: every unit of every cube in turn,
// on the calling thread (its units share nothing a unit reads after another wrote it).
template <typename... A>
static void nf_launch_serial(void (*f)(A...), unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args) {
    blockDim = {units, 1, 1};
    gridDim = {gx, gy, gz};
    std::vector<nf_words> memory(shared / sizeof(nf_words) + 1);
    nf_shared = reinterpret_cast<char*>(memory.data());
    const size_t cubes = size_t(gx) * gy * gz;
    for (size_t c = 0; c < cubes; ++c) {
        nf_poison(memory);
        blockIdx = {unsigned(c % gx), unsigned(c / gx % gy), unsigned(c / (size_t(gx) * gy))};
        for (unsigned u = 0; u < units; ++u) {
            threadIdx = {u, 0, 0};
            nf_call(f, args, std::index_sequence_for<A...>{});
        }
    }
}

// The launch of a kernel that does: cubes in order, `units` threads running each in turn (one
// thread per unit for the whole launch). Each cube has a barrier of its own for
// `__syncthreads`, which a unit returning early leaves.
template <typename... A>
static void nf_launch(void (*f)(A...), unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args) {
    const size_t cubes = size_t(gx) * gy * gz;
    std::vector<nf_words> memory(shared / sizeof(nf_words) + 1);
    auto poison = [&memory]() noexcept { nf_poison(memory); };
    poison();
    std::vector<std::unique_ptr<std::barrier<>>> inside;
    inside.reserve(cubes);
    for (size_t c = 0; c < cubes; ++c) inside.push_back(std::make_unique<std::barrier<>>(units));
    std::barrier between(units, poison);
    std::vector<std::thread> threads;
    threads.reserve(units);
    for (unsigned u = 0; u < units; ++u)
        threads.emplace_back([&, u] {
            threadIdx = {u, 0, 0};
            blockDim = {units, 1, 1};
            gridDim = {gx, gy, gz};
            nf_shared = reinterpret_cast<char*>(memory.data());
            for (size_t c = 0; c < cubes; ++c) {
                blockIdx = {unsigned(c % gx), unsigned(c / gx % gy), unsigned(c / (size_t(gx) * gy))};
                nf_cube = inside[c].get();
                nf_call(f, args, std::index_sequence_for<A...>{});
                nf_cube->arrive_and_drop();
                between.arrive_and_wait();
            }
        });
    for (auto& t : threads) t.join();
}

// Out-of-bounds accesses, which a GPU faults on (ending the context) or lets corrupt its
// neighbours, and a CPU's heap mostly forgives. For a launch, each run of a kernel's buffers
// that overlap one another is copied to the end of a mapping whose next page is inaccessible,
// keeping its address modulo 16 (the kernels' widest access), and copied back after; a
// zero-length buffer points into such a page. A kernel touching one stops the test, naming
// itself and the buffer.

// A guard page of a running launch, for the fault handler.
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
            char text[512];
            int n = snprintf(text, sizeof text,
                             "out of bounds: kernel %s touched %zu bytes past the end of its buffer %d "
                             "(on a GPU, an illegal address or another tensor's memory)\n",
                             g.kernel, size_t(at - p), g.buffer);
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
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
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
        const size_t data = (r.bytes + 16 + page - 1) / page * page;
        r.map_len = data + page;
        r.map = static_cast<char*>(mmap(nullptr, r.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (r.map == MAP_FAILED) {
            fprintf(stderr, "guarding a launch of %s: mmap failed\n", kernel);
            abort();
        }
        char* guard = r.map + data;
        mprotect(guard, page, PROT_NONE);
        // An empty buffer inside the guard page, so that any read of it faults.
        char* end = guard - r.bytes;
        r.copy = r.bytes == 0 ? guard + (uintptr_t(r.start) & 15) : end - ((uintptr_t(end) - uintptr_t(r.start)) & 15);
        if (r.bytes > 0) memcpy(r.copy, r.start, r.bytes);
        std::lock_guard<std::mutex> hold(nf_guards_taken);
        for (size_t k = 0; k < std::size(nf_guards); ++k) {
            if (nf_guards[k].page.load() == nullptr) {
                nf_guards[k].kernel = kernel;
                nf_guards[k].buffer = r.first;
                nf_guards[k].page.store(guard);
                slots.push_back(int(k));
                break;
            }
        }
    }
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
}
