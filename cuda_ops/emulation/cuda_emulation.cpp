// The scheduler behind cuda_emulation.h: one block at a time, each CUDA thread a ucontext fiber.
//
// A fiber runs until it returns or waits at a collective (a shuffle or __syncthreads); when no
// fiber can run, the collectives whose lanes have all arrived are completed and their lanes
// resume. Nothing else switches fibers, so the order of the threads' other work is the natural
// one, and a collective that can never complete (a lane gone or elsewhere) is reported.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <vector>

namespace msda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // room for a thrown exception's unwinding, too

struct Lane {
  ucontext_t context;
  uint3 index;
  enum State { kReady, kWaiting, kDone } state = kReady;
  Collective* waiting_at = nullptr;
  std::string error;  // set when the lane's code threw
};

// The fibers' stacks: one mapping for a block, a guard page below each stack (an overflow faults
// instead of corrupting its neighbour). Untouched pages cost nothing.
class Stacks {
 public:
  explicit Stacks(size_t count) : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    bytes_ = count * (kStackBytes + page_);
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Fault("emulation: cannot map the fibers' stacks");
    base_ = static_cast<char*>(p);
    for (size_t i = 0; i < count; ++i) mprotect(base_ + i * (kStackBytes + page_), page_, PROT_NONE);
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* stack(size_t i) const { return base_ + i * (kStackBytes + page_) + page_; }

 private:
  size_t page_, bytes_;
  char* base_;
};

// The block being run on this OS thread.
struct Block {
  std::vector<Lane> lanes;
  ucontext_t scheduler;
  size_t running = 0;
  const std::function<void()>* body = nullptr;
};
thread_local Block* current_block = nullptr;

std::string where(const Lane& lane) {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ") thread (" + std::to_string(lane.index.x) + "," +
         std::to_string(lane.index.y) + "," + std::to_string(lane.index.z) + ")";
}

void fiber_main() {
  Block& block = *current_block;
  Lane& lane = block.lanes[block.running];
  try {
    (*block.body)();
  } catch (const std::exception& e) {
    lane.error = e.what();
  } catch (...) {
    lane.error = "unknown exception";
  }
  lane.state = Lane::kDone;
  swapcontext(&lane.context, &block.scheduler);  // never resumed
}

void run_lane(Block& block, size_t i) {
  block.running = i;
  threadIdx = block.lanes[i].index;
  swapcontext(&block.scheduler, &block.lanes[i].context);
  if (!block.lanes[i].error.empty()) throw Fault(block.lanes[i].error);
}

// The value lane `lane` receives from shfl.sync.bfly (PTX ISA): source lane ^ lane_mask, unless
// that lies past the end of the lane's width-segment, in which case the lane keeps its own value.
int shuffle_source(int lane, int lane_mask, int width) {
  const int segment_mask = (kWarpSize - width) & 0x1f;
  const int max_lane = (lane & segment_mask) | (0x1f & ~segment_mask);
  const int source = lane ^ (lane_mask & 0x1f);
  return source <= max_lane ? source : lane;
}

std::string hex(unsigned v) {
  char buf[16];
  snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// Completes the shuffles of warp `w` whose lanes have all arrived; false if there were none.
bool complete_shuffles(Block& block, size_t w) {
  const size_t first = w * kWarpSize;
  const size_t lanes = std::min<size_t>(kWarpSize, block.lanes.size() - first);
  bool progressed = false;
  for (size_t i = 0; i < lanes; ++i) {
    Lane& lane = block.lanes[first + i];
    if (lane.state != Lane::kWaiting || lane.waiting_at->kind != Collective::kShuffleXor) continue;
    const Collective& c = *lane.waiting_at;
    const std::string what = where(lane) + ": __shfl_xor_sync(mask " + hex(c.mask) + ") ";
    if (!(c.mask >> i & 1u)) throw Fault(what + "by a lane not in its mask");
    if (c.width <= 0 || c.width > kWarpSize || (c.width & (c.width - 1)) != 0) {
      throw Fault(what + "with width " + std::to_string(c.width) + ", not a power of two <= 32");
    }
    for (int j = 0; j < kWarpSize; ++j) {  // every lane named must be waiting at the same shuffle
      if (!(c.mask >> j & 1u)) continue;
      if (static_cast<size_t>(j) >= lanes) throw Fault(what + "names lane " + std::to_string(j) + ", not in the block");
      const Lane& other = block.lanes[first + j];
      if (other.state == Lane::kDone) throw Fault(what + "but lane " + std::to_string(j) + " has returned");
      const Collective* oc = other.waiting_at;
      if (other.state != Lane::kWaiting || oc->kind != Collective::kShuffleXor || oc->mask != c.mask ||
          oc->bytes != c.bytes) {
        throw Fault(what + "but lane " + std::to_string(j) + " waits at another collective");
      }
    }
    for (int j = 0; j < kWarpSize; ++j) {
      if (!(c.mask >> j & 1u)) continue;
      Lane& member = block.lanes[first + j];
      Collective& mc = *member.waiting_at;
      const int source = shuffle_source(j, mc.lane_mask, mc.width);
      if (!(c.mask >> source & 1u)) {
        throw Fault(where(member) + ": __shfl_xor_sync reads lane " + std::to_string(source) + ", not in the mask");
      }
      std::memcpy(mc.result, block.lanes[first + source].waiting_at->value, mc.bytes);
    }
    for (int j = 0; j < kWarpSize; ++j) {
      if (c.mask >> j & 1u) block.lanes[first + j].state = Lane::kReady;
    }
    progressed = true;
  }
  return progressed;
}

// Releases __syncthreads once every live thread of the block waits there; false if not all do.
bool complete_barrier(Block& block) {
  bool any = false;
  for (const Lane& lane : block.lanes) {
    if (lane.state == Lane::kDone) continue;
    if (lane.waiting_at->kind != Collective::kSyncThreads) return false;
    any = true;
  }
  for (Lane& lane : block.lanes) {
    if (lane.state == Lane::kWaiting) lane.state = Lane::kReady;
  }
  return any;
}

void run_block(Block& block, const Stacks& stacks) {
  for (size_t i = 0; i < block.lanes.size(); ++i) {
    Lane& lane = block.lanes[i];
    lane.state = Lane::kReady;
    lane.waiting_at = nullptr;
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = stacks.stack(i);
    lane.context.uc_stack.ss_size = kStackBytes;
    lane.context.uc_link = nullptr;
    makecontext(&lane.context, fiber_main, 0);
  }
  while (true) {
    bool all_done = true;
    for (size_t i = 0; i < block.lanes.size(); ++i) {
      if (block.lanes[i].state == Lane::kReady) run_lane(block, i);
      all_done = all_done && block.lanes[i].state == Lane::kDone;
    }
    if (all_done) return;
    bool progressed = false;
    for (size_t w = 0; w * kWarpSize < block.lanes.size(); ++w) progressed |= complete_shuffles(block, w);
    if (!progressed && !complete_barrier(block)) {
      for (const Lane& lane : block.lanes) {  // name one stuck lane
        if (lane.state == Lane::kWaiting) {
          throw Fault(where(lane) + ": deadlock: a collective that can never complete (__syncthreads not "
                      "reached by every thread, or a shuffle's lanes waiting elsewhere)");
        }
      }
    }
  }
}

}  // namespace

void fail(const std::string& what) {
  Block* block = current_block;
  throw Fault(block ? where(block->lanes[block->running]) + ": " + what : what);
}

void wait_at(Collective& c) {
  Block& block = *current_block;
  Lane& lane = block.lanes[block.running];
  lane.state = Lane::kWaiting;
  lane.waiting_at = &c;
  swapcontext(&lane.context, &block.scheduler);
}

void run_grid(dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  const size_t threads = size_t(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024) throw Fault("emulation: a block must have 1..1024 threads");
  if (current_block != nullptr) throw Fault("emulation: a kernel launched from a kernel");
  Stacks stacks(threads);
  Block block;
  block.lanes.resize(threads);
  for (size_t t = 0; t < threads; ++t) {  // x fastest, as CUDA numbers threads into warps
    block.lanes[t].index.x = static_cast<unsigned>(t % block_dim.x);
    block.lanes[t].index.y = static_cast<unsigned>(t / block_dim.x % block_dim.y);
    block.lanes[t].index.z = static_cast<unsigned>(t / (size_t(block_dim.x) * block_dim.y));
  }
  block.body = &body;
  gridDim = grid;
  blockDim = block_dim;
  current_block = &block;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          run_block(block, stacks);
        }
      }
    }
  } catch (...) {
    current_block = nullptr;
    throw;
  }
  current_block = nullptr;
}

}  // namespace msda_emu
