// A CPU emulator of the CUDA execution model, for testing beit_fast's CUDA kernels on machines without a GPU.
// The kernel headers (csrc/*_kernels.cuh) are compiled by g++ with the definitions below: every thread of a
// block runs as a fiber (ucontext) on one OS thread; __syncthreads() and the warp shuffles are scheduling
// points. The blocks of a grid run one after another, so `static` stands in for __shared__.
//
// Scheduling: within a block, the warps run in a pseudo-random order (seeded, so a run is reproducible), each
// warp for as long as it can: its shuffles complete at once and it runs on to the next barrier. A warp thus
// races ahead of the others exactly where a GPU may let it, and a missing __syncthreads between a shared-memory
// read and the next write shows up as a wrong result.
//
// What it checks: the index math, the launch geometry, the reductions (block sums, warp shuffles, partial-sum
// buffers), that every barrier can be reached by all live threads of the block and every full-mask shuffle by
// all 32 lanes of the warp (else: an error describing where the threads wait), that vectorized accesses are
// aligned to their size (BEIT_VECTOR_ACCESS), and reads of shared memory the block has not written (shared
// arrays are filled with NaN bytes at the start of each block: BEIT_SHARED_ARRAY). Threads that have exited do
// not hold a barrier up (as on current GPUs). What it does not check: timing, coalescing, races between
// blocks (blocks run one after another), races inside a warp (its lanes run in ascending order, so a lane
// reading a lower lane's shared-memory write without __syncwarp passes), read-modify-write races between warps
// within one barrier phase (each warp runs to its next barrier uninterrupted, so unsynchronized += adds up),
// barriers or shuffles reached from different call sites (they count as one), __launch_bounds__, register
// use, grid limits, streams and devices, and device arithmetic (the CUDA build uses -fmad=false, the CPU
// twins -ffp-contract=off, and the per-element formulas are shared).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables of the running thread (set by the scheduler before it resumes a fiber).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulator {

enum class State { kReady, kBarrier, kShuffle, kDone, kFailed };

struct Fiber {
  ucontext_t ctx{};
  char* stack = nullptr;
  State state = State::kReady;
  dim3 tid;
  float shfl_value = 0.f, shfl_result = 0.f;
  int shfl_src = 0;
};

constexpr size_t kStackBytes = 64 * 1024;  // the kernels need a few KiB; AddressSanitizer clears the whole stack at each switch

struct Scheduler {
  ucontext_t main{};
  std::vector<Fiber> fibers;
  size_t n = 0;  // threads of the current block
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<const void*> shared_seen;  // shared arrays already filled with NaN in this block
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  int64_t launches = 0, blocks = 0, barriers = 0, shuffles = 0;  // counted since the module was loaded
  std::string error;                                             // set by a fiber (which cannot throw)

  ~Scheduler() {
    for (Fiber& f : fibers) std::free(f.stack);
  }
};

inline Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

inline void fiber_entry() {
  Scheduler& s = scheduler();
  (*s.body)();
  s.current->state = State::kDone;  // returning resumes uc_link, the scheduler
}

inline void yield_to_scheduler(State st) {
  Scheduler& s = scheduler();
  Fiber* self = s.current;
  self->state = st;
  swapcontext(&self->ctx, &s.main);
}

// Stops the calling thread for good and makes the launch fail with msg (the first message wins).
[[noreturn]] inline void fail(const std::string& msg) {
  Scheduler& s = scheduler();
  if (s.error.empty()) s.error = msg;
  yield_to_scheduler(State::kFailed);
  std::abort();  // never resumed
}

inline std::string describe(const Scheduler& s) {
  int ready = 0, bar = 0, shfl = 0, done = 0;
  for (size_t i = 0; i < s.n; ++i) {
    const State st = s.fibers[i].state;
    ready += st == State::kReady;
    bar += st == State::kBarrier;
    shfl += st == State::kShuffle;
    done += st == State::kDone;
  }
  return "block of " + std::to_string(s.n) + " threads: " + std::to_string(bar) + " at __syncthreads, " +
         std::to_string(shfl) + " at a warp shuffle, " + std::to_string(done) + " exited, " +
         std::to_string(ready) + " ready";
}

// Runs one warp's ready lanes, completing its shuffles as they come, until it waits at a barrier, exits, or
// is stuck (lanes split between a shuffle and something else).
inline void run_warp(Scheduler& s, size_t lo, size_t hi) {
  for (;;) {
    for (size_t i = lo; i < hi; ++i) {
      Fiber& f = s.fibers[i];
      if (f.state != State::kReady) continue;
      s.current = &f;
      threadIdx = f.tid;
      swapcontext(&s.main, &f.ctx);
      if (!s.error.empty()) return;
    }
    bool all_shuffle = hi - lo == 32;
    for (size_t i = lo; i < hi; ++i) all_shuffle = all_shuffle && s.fibers[i].state == State::kShuffle;
    if (!all_shuffle) return;
    for (size_t i = lo; i < hi; ++i) s.fibers[i].shfl_result = s.fibers[lo + s.fibers[i].shfl_src].shfl_value;
    for (size_t i = lo; i < hi; ++i) s.fibers[i].state = State::kReady;
    ++s.shuffles;
  }
}

// Runs body once per thread of the grid; throws std::runtime_error on a deadlock, a shuffle with lanes
// missing, or a failed check (misaligned vector access, ...).
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  Scheduler& s = scheduler();
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  if (n == 0 || n > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535)
    throw std::runtime_error("cuda_emulator: launch with grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + ") and block of " +
                             std::to_string(n) + " threads is beyond CUDA's limits");
  if (s.fibers.size() < n) {
    const size_t old = s.fibers.size();
    s.fibers.resize(n);
    for (size_t i = old; i < n; ++i) {
      s.fibers[i].stack = static_cast<char*>(std::malloc(kStackBytes));
      if (s.fibers[i].stack == nullptr) throw std::bad_alloc();
    }
  }
  s.n = n;
  s.body = &body;
  s.error.clear();
  ++s.launches;
  blockDim = block;
  gridDim = grid;
  const size_t warps = (n + 31) / 32;
  std::vector<size_t> order(warps);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        ++s.blocks;
        s.shared_seen.clear();
        for (size_t i = 0; i < n; ++i) {
          Fiber& f = s.fibers[i];
          f.tid = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                       static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y)));
          f.state = State::kReady;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &s.main;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
          for (size_t w = 0; w < warps; ++w) order[w] = w;
          for (size_t w = warps; w > 1; --w) {  // Fisher-Yates with a 64-bit LCG
            s.rng = s.rng * 6364136223846793005ull + 1442695040888963407ull;
            std::swap(order[w - 1], order[(s.rng >> 33) % w]);
          }
          for (size_t w : order) {
            run_warp(s, w * 32, std::min(n, w * 32 + 32));
            if (!s.error.empty()) throw std::runtime_error("cuda_emulator: " + s.error);
          }
          bool live = false, all_at_barrier = true;
          for (size_t i = 0; i < n; ++i) {
            const State st = s.fibers[i].state;
            live = live || st != State::kDone;
            all_at_barrier = all_at_barrier && (st == State::kBarrier || st == State::kDone);
          }
          if (!live) break;
          if (!all_at_barrier)
            throw std::runtime_error("cuda_emulator: deadlock in block (" + std::to_string(bx) + ", " +
                                     std::to_string(by) + ", " + std::to_string(bz) + "), " + describe(s));
          for (size_t i = 0; i < n; ++i)
            if (s.fibers[i].state == State::kBarrier) s.fibers[i].state = State::kReady;
          ++s.barriers;
        }
      }
}

// BEIT_SHARED_ARRAY: the first thread of a block to declare the array fills it with NaN bytes.
inline void shared_array(const void* p, size_t bytes) {
  Scheduler& s = scheduler();
  if (std::find(s.shared_seen.begin(), s.shared_seen.end(), p) != s.shared_seen.end()) return;
  s.shared_seen.push_back(p);
  std::memset(const_cast<void*>(p), 0xFF, bytes);
}

// BEIT_VECTOR_ACCESS: a vector access must be aligned to its size.
inline void vector_access(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
  fail("misaligned " + std::to_string(bytes) + "-byte vector access at address " +
       std::to_string(reinterpret_cast<uintptr_t>(p)) + " by thread " + std::to_string(threadIdx.x) +
       " of block " + std::to_string(blockIdx.x));
}

}  // namespace cuda_emulator

#define BEIT_SHARED_ARRAY(a) ::cuda_emulator::shared_array(&(a), sizeof(a))
#define BEIT_VECTOR_ACCESS(p, bytes) ::cuda_emulator::vector_access((p), (bytes))

inline void __syncthreads() { cuda_emulator::yield_to_scheduler(cuda_emulator::State::kBarrier); }

// Full-warp shuffles only (the kernels use mask 0xffffffff).
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) cuda_emulator::fail("only full-warp shuffles are emulated");
  cuda_emulator::Scheduler& s = cuda_emulator::scheduler();
  cuda_emulator::Fiber* self = s.current;
  const size_t lane = static_cast<size_t>(self - s.fibers.data()) % 32;
  self->shfl_value = v;
  self->shfl_src = static_cast<int>(lane ^ static_cast<size_t>(lane_mask & 31));
  cuda_emulator::yield_to_scheduler(cuda_emulator::State::kShuffle);
  return self->shfl_result;
}

namespace cuda_emulator {

// The launcher the kernel headers call (see csrc/launch.cuh): the arguments convert implicitly to the
// kernel's parameter types, as in a CUDA launch, then every thread of the grid runs it.
struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    const std::function<void()> body = [&] { kernel(args...); };
    run_grid(grid, block, body);
  }

  // No occupancy here: a fixed 8 blocks per multiprocessor (the tests pass the multiprocessor count).
  template <typename... Params>
  int blocks_per_sm(void (*)(Params...), int) const { return 8; }
};

}  // namespace cuda_emulator
