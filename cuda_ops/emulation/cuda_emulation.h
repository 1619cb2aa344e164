// A CUDA execution model for the host C++ compiler: enough of CUDA to run
// cuda_ops/ms_deform_attn_kernels.cuh on the CPU, in CI, where no GPU is lent, and to make the
// mistakes a GPU punishes fail loudly instead of passing by luck.
//
//   - Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread; the blocks of a
//     grid run one after another. threadIdx/blockIdx/blockDim/gridDim are set for the fiber running.
//   - A warp is 32 consecutive threads of a block. At __shfl_xor_sync a lane waits until every lane
//     named in `mask` has reached a shuffle with the same mask, then all exchange their values at
//     once (lockstep), `width` applied as PTX shfl.sync.bfly does. A lane of the mask that has
//     returned, waits at __syncthreads, or names another mask is an error: on a GPU it hangs or
//     returns garbage.
//   - __syncthreads is a barrier of the block's live threads; __shared__ variables are statics
//     (blocks never overlap, and CUDA leaves shared memory uninitialised anyway).
//   - Kernel pointers are Checked<T>: every access through one is checked against the bounds of
//     the tensor it was made from and against alignof(T): a 16-byte Pack must be 16-byte aligned,
//     as the GPU's vector loads require (they fault otherwise).
//   - atomicAdd for float and double; the float2/float4 forms only where nvcc has them (sm_90).
// A failure raises msda_emu::Fault (std::runtime_error; RuntimeError in Python) naming the block,
// the thread and the access.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The running fiber's indices (thread_local: two OS threads may each run a launch).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace msda_emu {

constexpr int kWarpSize = 32;

// An error a GPU would turn into a fault, a hang or garbage.
struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& what);  // throws Fault, prefixed with the running thread

// A pointer into one tensor's memory [begin, end), named for the messages. Arithmetic is free (as
// on a GPU, a pointer may point anywhere); every dereference checks bounds and alignment.
template <typename T>
class Checked {
 public:
  Checked(T* p, uintptr_t begin, uintptr_t end, const char* name)
      : addr_(reinterpret_cast<uintptr_t>(p)), begin_(begin), end_(end), name_(name) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Checked(const Checked<U>& other)  // NOLINT: implicit, as T* -> const T*
      : addr_(other.addr()), begin_(other.begin()), end_(other.end()), name_(other.name()) {}

  Checked operator+(int64_t i) const { return {addr_ + static_cast<uintptr_t>(i * int64_t(sizeof(T))), *this}; }
  T& operator*() const {
    check();
    return *reinterpret_cast<T*>(addr_);
  }
  T& operator[](int64_t i) const { return *(*this + i); }

  uintptr_t addr() const { return addr_; }
  uintptr_t begin() const { return begin_; }
  uintptr_t end() const { return end_; }
  const char* name() const { return name_; }

 private:
  Checked(uintptr_t addr, const Checked& bounds)
      : addr_(addr), begin_(bounds.begin_), end_(bounds.end_), name_(bounds.name_) {}
  void check() const {
    if (addr_ < begin_ || addr_ + sizeof(T) > end_) {
      fail(std::to_string(sizeof(T)) + "-byte access out of bounds of " + name_ + ": byte offset " +
           std::to_string(static_cast<int64_t>(addr_ - begin_)) + " of " + std::to_string(end_ - begin_));
    }
    if (addr_ % alignof(T) != 0) {
      fail("misaligned " + std::to_string(sizeof(T)) + "-byte access to " + name_ + ": address % " +
           std::to_string(alignof(T)) + " = " + std::to_string(addr_ % alignof(T)) + " (byte offset " +
           std::to_string(addr_ - begin_) + ")");
    }
  }

  uintptr_t addr_, begin_, end_;
  const char* name_;
};

// p seen as a pointer to U (a Pack or a vector type); the access through it checks U's alignment.
template <typename U, typename T>
Checked<U> vector_cast(const Checked<T>& p) {
  static_assert(std::is_const_v<U> || !std::is_const_v<T>, "vector_cast must not drop const");
  return Checked<U>(reinterpret_cast<U*>(p.addr()), p.begin(), p.end(), p.name());
}

// What the kernels run on this OS thread did, since the last reset: lets the tests see which
// branch an architecture took (sm_90's vector atomics) rather than assume it.
struct Counters {
  int64_t shuffles = 0, atomics = 0, atomics_float2 = 0, atomics_float4 = 0;
};
inline thread_local Counters counters;

// The collective a lane is waiting at: the scheduler completes it when the lanes it names arrive.
struct Collective {
  enum Kind { kShuffleXor, kSyncThreads } kind;
  unsigned mask;
  int lane_mask, width;
  size_t bytes;
  unsigned char value[8], result[8];
};

// Suspends the running fiber at `c` until the scheduler completes it.
void wait_at(Collective& c);

// Runs `body` as gridDim * blockDim CUDA threads; throws Fault (after the block stops) on an error.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// kernel<<<grid, block>>>(args...), run to completion.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  run_grid(grid, block, [&] { kernel(args...); });
}

// A Checked<T> over a tensor-like buffer of n elements.
template <typename T>
Checked<T> checked(T* data, int64_t n, const char* name) {
  const auto begin = reinterpret_cast<uintptr_t>(data);
  return Checked<T>(data, begin, begin + static_cast<uintptr_t>(n) * sizeof(T), name);
}

}  // namespace msda_emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = msda_emu::kWarpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  ++msda_emu::counters.shuffles;
  msda_emu::Collective c{msda_emu::Collective::kShuffleXor, mask, lane_mask, width, sizeof(T), {}, {}};
  std::memcpy(c.value, &var, sizeof(T));
  msda_emu::wait_at(c);
  T out;
  std::memcpy(&out, c.result, sizeof(T));
  return out;
}

inline void __syncthreads() {
  msda_emu::Collective c{msda_emu::Collective::kSyncThreads, 0, 0, 0, 0, {}, {}};
  msda_emu::wait_at(c);
}

// One fiber runs at a time and only collectives switch fibers: a read-modify-write is atomic.
inline float atomicAdd(msda_emu::Checked<float> p, float v) {
  ++msda_emu::counters.atomics;
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(msda_emu::Checked<double> p, double v) {
  ++msda_emu::counters.atomics;
  const double old = *p;
  *p = old + v;
  return old;
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // the vector forms exist from sm_90 on: elsewhere, a compile error
inline float2 atomicAdd(msda_emu::Checked<float2> p, float2 v) {
  ++msda_emu::counters.atomics_float2;
  const float2 old = *p;
  *p = make_float2(old.x + v.x, old.y + v.y);
  return old;
}
inline float4 atomicAdd(msda_emu::Checked<float4> p, float4 v) {
  ++msda_emu::counters.atomics_float4;
  const float4 old = *p;
  *p = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
  return old;
}
#endif
