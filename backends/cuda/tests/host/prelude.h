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
#include <barrier>
#include <cstring>
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
