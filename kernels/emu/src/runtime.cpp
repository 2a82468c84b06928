// The emulator's runtime: launches, barriers and warp shuffles (see include/herd_emu.h).
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "herd_emu.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

// A reusable barrier whose members can leave (a returned thread) and which aborts instead of
// hanging when its members never all arrive.
class Barrier {
 public:
  void reset(unsigned members) {
    std::lock_guard<std::mutex> g(m_);
    members_ = members;
    arrived_ = 0;
  }

  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> g(m_);
    const unsigned long gen = gen_;
    if (++arrived_ == members_) {
      release();
      return;
    }
    if (!cv_.wait_for(g, std::chrono::seconds(30), [&] { return gen_ != gen; })) {
      fprintf(stderr,
              "herd-emu: deadlock at %s in block %u: %u of %u threads arrived (a barrier in "
              "divergent code?)\n",
              what, blockIdx.x, arrived_, members_);
      abort();
    }
  }

  void leave() {
    std::lock_guard<std::mutex> g(m_);
    --members_;
    if (members_ > 0 && arrived_ == members_) release();
  }

 private:
  void release() { // with m_ held
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }

  std::mutex m_;
  std::condition_variable cv_;
  unsigned members_ = 0, arrived_ = 0;
  unsigned long gen_ = 0;
};

struct Block {
  Barrier sync;               // __syncthreads
  std::vector<Barrier> warps; // one per warp, for shuffles
  std::vector<float> slots;   // one per thread, for shuffles
};

thread_local Block* block;

unsigned warp_size(unsigned warp, unsigned threads) {
  const unsigned rest = threads - warp * 32;
  return rest < 32 ? rest : 32;
}

} // namespace

void __syncthreads() { block->sync.arrive_and_wait("__syncthreads"); }

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu || lane_mask < 0 || lane_mask > 31) {
    fprintf(stderr, "herd-emu: __shfl_xor_sync supports the full mask and lane masks < 32\n");
    abort();
  }
  const unsigned t = threadIdx.x, other = t ^ (unsigned)lane_mask;
  Barrier& warp = block->warps[t / 32];
  block->slots[t] = v;
  warp.arrive_and_wait("__shfl_xor_sync (write)");
  if (other >= blockDim.x) {
    fprintf(stderr, "herd-emu: __shfl_xor_sync from lane %u of a partial warp\n", other);
    abort();
  }
  const float r = block->slots[other];
  warp.arrive_and_wait("__shfl_xor_sync (read)");
  return r;
}

// Runs `body(ctx)` as every thread of `blocks` blocks of `threads` threads, block after block.
extern "C" void herd_emu_launch(unsigned blocks, unsigned threads, void (*body)(const void*),
                                const void* ctx) {
  if (threads == 0 || threads > 1024) {
    fprintf(stderr, "herd-emu: %u threads per block (1..=1024)\n", threads);
    abort();
  }
  // __shared__ variables are function statics, one copy per process: launches take turns, as
  // kernels on one stream do.
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> turn(one_launch_at_a_time);
  Block b;
  b.warps = std::vector<Barrier>((threads + 31) / 32);
  b.slots.assign(threads, 0.f);
  for (unsigned blk = 0; blk < blocks; ++blk) {
    b.sync.reset(threads);
    for (unsigned w = 0; w < b.warps.size(); ++w) b.warps[w].reset(warp_size(w, threads));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {blk, 0, 0};
        blockDim = {threads, 1, 1};
        gridDim = {blocks, 1, 1};
        block = &b;
        body(ctx);
        b.warps[t / 32].leave();
        b.sync.leave();
      });
    }
    for (auto& th : pool) th.join();
  }
}
