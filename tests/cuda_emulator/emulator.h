// A CPU emulator of the CUDA execution model, for testing beit_fast's CUDA kernels on machines without a GPU.
// The kernel headers (csrc/*_kernels.cuh) are compiled by g++ with the definitions below: every thread of a
// block runs as a fiber (ucontext) on one OS thread; __syncthreads() and the warp shuffles are scheduling
// points. The blocks of a grid run one after another, so `static` stands in for __shared__.
//
// What it checks: the index math, the launch geometry, the vectorized accesses, the reductions (block sums,
// warp shuffles, partial-sum buffers) and that every barrier is reached by all live threads of the block and
// every full-mask shuffle by all 32 lanes of the warp (otherwise: an error naming the kernel's barrier state).
// What it does not: timing, memory coalescing, races between blocks (blocks never overlap here), and device
// arithmetic differences (the CUDA build uses -fmad=false, and the shared per-element formulas run in both).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
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

enum class State { kReady, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t ctx{};
  char* stack = nullptr;
  State state = State::kReady;
  dim3 tid;
  float shfl_value = 0.f, shfl_result = 0.f;
  int shfl_src = 0;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Scheduler {
  ucontext_t main{};
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  int64_t launches = 0, blocks = 0, barriers = 0, shuffles = 0;  // counted since the module was loaded
  std::string error;                   // set inside a fiber (which cannot throw across its context)

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

inline std::string describe(const std::vector<Fiber>& fs) {
  int ready = 0, bar = 0, shfl = 0, done = 0;
  for (const Fiber& f : fs) {
    if (f.state == State::kReady) ++ready;
    if (f.state == State::kBarrier) ++bar;
    if (f.state == State::kShuffle) ++shfl;
    if (f.state == State::kDone) ++done;
  }
  return std::to_string(bar) + " threads at __syncthreads, " + std::to_string(shfl) + " at a warp shuffle, " +
         std::to_string(done) + " exited, " + std::to_string(ready) + " ready";
}

// Runs body once per thread of the grid; throws std::runtime_error on a deadlock or a shuffle with lanes
// missing (undefined behaviour on a GPU).
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  Scheduler& s = scheduler();
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  if (n == 0 || n > 1024) throw std::runtime_error("cuda_emulator: block of " + std::to_string(n) +
                                                   " threads (a CUDA block has 1 to 1024)");
  if (block.z > 64 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("cuda_emulator: launch dimensions beyond CUDA's limits");
  if (s.fibers.size() < n) {
    const size_t old = s.fibers.size();
    s.fibers.resize(n);
    for (size_t i = old; i < n; ++i) {
      s.fibers[i].stack = static_cast<char*>(std::malloc(kStackBytes));
      if (s.fibers[i].stack == nullptr) throw std::bad_alloc();
    }
  }
  s.body = &body;
  ++s.launches;
  s.error.clear();
  blockDim = block;
  gridDim = grid;
  const size_t warps = (n + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        ++s.blocks;
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
          for (size_t i = 0; i < n; ++i) {
            Fiber& f = s.fibers[i];
            if (f.state != State::kReady) continue;
            s.current = &f;
            threadIdx = f.tid;
            swapcontext(&s.main, &f.ctx);
          }
          bool released = false, live = false;
          // A warp whose lanes all wait at a shuffle exchanges values; a lane that exited or waits at a barrier
          // while others shuffle is an error once nothing else can move.
          for (size_t w = 0; w < warps; ++w) {
            const size_t lo = w * 32, hi = std::min(n, lo + 32);
            bool any = false, all = hi - lo == 32;
            for (size_t i = lo; i < hi; ++i) {
              any = any || s.fibers[i].state == State::kShuffle;
              all = all && s.fibers[i].state == State::kShuffle;
            }
            if (!any || !all) continue;
            for (size_t i = lo; i < hi; ++i) s.fibers[i].shfl_result = s.fibers[lo + s.fibers[i].shfl_src].shfl_value;
            for (size_t i = lo; i < hi; ++i) s.fibers[i].state = State::kReady;
            ++s.shuffles;
            released = true;
          }
          bool all_at_barrier = true;
          for (size_t i = 0; i < n; ++i) {
            const State st = s.fibers[i].state;
            live = live || st != State::kDone;
            all_at_barrier = all_at_barrier && (st == State::kBarrier || st == State::kDone);
          }
          if (!s.error.empty()) throw std::runtime_error("cuda_emulator: " + s.error);
          if (!live) break;
          if (!released && all_at_barrier) {  // threads that exited do not hold a barrier up (as on sm_70+)
            for (size_t i = 0; i < n; ++i)
              if (s.fibers[i].state == State::kBarrier) s.fibers[i].state = State::kReady;
            ++s.barriers;
            released = true;
          }
          if (!released)
            throw std::runtime_error("cuda_emulator: deadlock in block (" + std::to_string(bx) + ", " +
                                     std::to_string(by) + ", " + std::to_string(bz) + "): " + describe(s.fibers));
        }
      }
}

}  // namespace cuda_emulator

inline void __syncthreads() { cuda_emulator::yield_to_scheduler(cuda_emulator::State::kBarrier); }

// Full-warp shuffles only (the kernels use mask 0xffffffff).
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  cuda_emulator::Scheduler& s = cuda_emulator::scheduler();
  if (mask != 0xffffffffu || width != 32) s.error = "only full-warp shuffles are emulated";
  cuda_emulator::Fiber* self = s.current;
  const size_t lane = static_cast<size_t>(self - s.fibers.data()) % 32;
  self->shfl_value = v;
  self->shfl_src = static_cast<int>(lane ^ static_cast<size_t>(lane_mask & 31));
  cuda_emulator::yield_to_scheduler(cuda_emulator::State::kShuffle);
  return self->shfl_result;
}

namespace cuda_emulator {

// The launcher the kernel headers call (see csrc/launch.cuh): the kernel's arguments are converted to its
// parameter types exactly as a CUDA launch would, then every thread of the grid runs it.
struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    const std::function<void()> body = [&] { kernel(static_cast<Params>(args)...); };
    run_grid(grid, block, body);
  }
};

}  // namespace cuda_emulator
