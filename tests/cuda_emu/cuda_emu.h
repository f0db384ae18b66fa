// cuda_emu.h - run unmodified CUDA kernel source on the CPU, for tests (never shipped).
//
// Force-included (g++ -include tests/cuda_emu/cuda_emu.h) into a translation unit that #includes a csrc/cuda/*.cu
// file; tests/cuda_emu/shim/ shadows the CUDA-only torch headers (CUDAGuard, CUDAContext, CUDAException) and
// csrc/cuda/launch.cuh routes PYKERNELS_LAUNCH to cuda_emu::launch when PYKERNELS_CUDA_EMU is defined. The build
// (tests/cuda_emu/build.py) adds AddressSanitizer + UndefinedBehaviorSanitizer and -ffp-contract=off.
//
// Execution model
//   * Blocks run one after another. The threads of a block are host threads (one std::thread per CUDA thread,
//     created once per launch and reused for every block) that run the kernel body concurrently but never in
//     parallel: exactly one holds the "baton" and runs; it passes the baton on only when it blocks (at
//     __syncthreads, a warp collective or the end of the kernel). The order is deterministic and adversarial: the
//     next thread is the runnable one with the LOWEST linear index in even blocks and the HIGHEST in odd blocks
//     (CUDA_EMU_ORDER=low|high overrides), so one warp races as far ahead of the others as the synchronisation
//     allows, in both directions. A missing __syncthreads then reads stale or not-yet-written shared memory
//     instead of passing by luck; the same input always gives the same run.
//   * __syncthreads: a thread waits until every thread of the block that has not exited waits there too.
//   * Warp collectives (__shfl*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp): each lane deposits its
//     value and waits until every lane named in `mask` has arrived at a collective with the same mask and kind; the
//     last one to arrive computes every lane's result into that lane's own slot (so no lane can overwrite a value
//     another has not read yet). Errors, reported as a failed launch: the calling lane is not in the mask, the mask
//     names lanes that do not exist (partial warp) or have exited, lanes disagree on the mask or the kind, a width
//     that is not a power of two <= 32, or a deadlock (e.g. __syncthreads in divergent code). A source lane that is
//     in the warp but not in the mask yields an all-ones bit pattern (NaN for floats): undefined on a GPU.
//   * __shared__ is `static`: one instance per kernel instantiation, kept between blocks (not re-initialised: a read
//     before the first write sees zeros or the previous block's data); UBSan's bounds check covers fixed-size
//     arrays. Dynamic shared memory (PYKERNELS_DYNAMIC_SHARED in launch.cuh) is a heap buffer of exactly the
//     launch's byte count (ASan catches any access past it), filled with 0xFF bytes (NaN) before every block.
//   * Dynamic shared memory over 48 KB needs cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
//     bytes) first (<= 227 KB), as on a GPU; a launch without it fails as an invalid launch configuration.
//   * Atomics are plain read-modify-writes: only the baton holder runs.
//   * Threads whose kernel body throws, and every error above, abort the launch: a std::runtime_error naming the
//     kernel and the block (RuntimeError in Python). One launch at a time per process (a global mutex).
// Limits: no spin-waiting on other threads or blocks (nothing pre-empts a running thread); no streams, events,
// cooperative groups, textures, clusters or inter-block synchronisation.
#pragma once

#define PYKERNELS_CUDA_EMU 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- keywords and built-in variables -----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
typedef struct CUstream_st* cudaStream_t;
constexpr int warpSize = 32;
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

// ---- math intrinsics (IEEE round-to-nearest; the TU is built with -ffp-contract=off) -------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return std::isnan(a) ? 0.0f : std::min(1.0f, std::max(0.0f, a)); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
// __expf, __logf, __sinf, __cosf, __powf: glibc's <math.h> declares them (the accurate versions).

// ---- half / bfloat16: the c10 types, which round to nearest even like the CUDA conversions --------------------------
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }

template <typename T>
inline T __ldg(const T* ptr) {
  return *ptr;
}

// ---- memory-traffic counting (the "traffic" build variant only: tests/cuda_emu/traffic.cpp) -----------------------
// That variant compiles the kernels with -fsanitize=kernel-address and no sanitizer runtime: every memory access calls
// one of traffic.cpp's __asan_{load,store}*_noabort, which counts it while a launch runs (begin / end below) when it
// falls in a tensor's memory. Atomics are counted once, as atomics: their own read-modify-write is not instrumented.
#ifdef CUDA_EMU_TRAFFIC
extern "C" void cuda_emu_traffic_begin(const void* kernel);
extern "C" void cuda_emu_traffic_end();
extern "C" void cuda_emu_traffic_atomic(const void* address, std::size_t bytes);
extern "C" bool cuda_emu_traffic_skip(const void* kernel);  // a dry run: the launch is recorded, not run
#define CUDA_EMU_ATOMIC_ATTR __attribute__((no_sanitize_address))
#define CUDA_EMU_ATOMIC_NOTE(address) cuda_emu_traffic_atomic(address, sizeof(*(address)))
#else
#define CUDA_EMU_ATOMIC_ATTR
#define CUDA_EMU_ATOMIC_NOTE(address) ((void)0)
#endif

// ---- the runtime ------------------------------------------------------------------------------------------------
namespace cuda_emu {

enum class Wait : unsigned char { kRun, kBarrier, kWarp, kDone };
enum class WarpOp : unsigned char { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot };
inline const char* op_name(WarpOp op) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__ballot_sync/__any_sync/__all_sync"};
  return names[static_cast<int>(op)];
}

struct Aborted {};  // thrown inside a waiting thread to unwind its kernel body when the launch fails

struct Lane {  // one CUDA thread of the current block
  std::binary_semaphore wake{0};
  Wait wait = Wait::kRun;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0;
  int width = 32;
  std::uint64_t value = 0;
  std::uint64_t result = 0;
};

struct Launch {
  std::function<void()> body;
  unsigned threads = 0;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::binary_semaphore block_done{0};
  uint3 block{0, 0, 0};
  bool high_first = false;  // scheduling order of this block
  bool finished = false;
  bool aborted = false;
  std::string error;
  std::vector<unsigned char> dynamic_smem;
};

inline Launch* current = nullptr;              // the launch in progress (one at a time: launch_mutex)
inline thread_local unsigned this_thread = 0;  // linear thread index within the block

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
// kernel address -> the dynamic shared memory it may use above the default 48 KB (cudaFuncSetAttribute)
inline std::map<const void*, std::size_t>& smem_optin() {
  static std::map<const void*, std::size_t> optin;
  return optin;
}
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;
constexpr std::size_t kMaxDynamicSmem = 227 * 1024;
// kernel address -> number of launches (read by the tests through pykernels_emu::emu_launches)
inline std::map<const void*, long>& launch_log() {
  static std::map<const void*, long> log;
  return log;
}

// Records the first error and wakes the launching thread; the caller must stop running kernel code.
inline void fail(Launch& l, const std::string& message) {
  if (!l.aborted) {
    l.aborted = true;
    l.error = message;
    l.block_done.release();
  }
}

inline std::string lane_name(unsigned t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", lane " + std::to_string(t % 32) + ")";
}

// Called by the baton holder once it stopped running (waits or exited): wakes the next runnable thread, releases a
// complete barrier, ends the block, or reports a deadlock.
inline void pass_baton(Launch& l) {
  if (l.aborted) return;
  auto pick = [&]() -> int {
    for (unsigned i = 0; i < l.threads; ++i) {
      const unsigned t = l.high_first ? l.threads - 1 - i : i;
      if (l.lanes[t]->wait == Wait::kRun) return static_cast<int>(t);
    }
    return -1;
  };
  int next = pick();
  if (next < 0) {
    unsigned live = 0, at_barrier = 0;
    for (const auto& lane : l.lanes) {
      live += lane->wait != Wait::kDone;
      at_barrier += lane->wait == Wait::kBarrier;
    }
    if (live == 0) {
      l.block_done.release();
      return;
    }
    if (at_barrier != live) {
      // Describe, per warp, the first waiting collective and where the lanes it waits for are.
      std::string what = "deadlock:";
      for (unsigned w = 0; w * 32 < l.threads; ++w) {
        for (unsigned t = w * 32; t < std::min(l.threads, w * 32 + 32); ++t) {
          const Lane& lane = *l.lanes[t];
          if (lane.wait != Wait::kWarp) continue;
          char mask[16];
          std::snprintf(mask, sizeof(mask), "0x%08x", lane.mask);
          what += std::string(" warp ") + std::to_string(w) + " waits in " + op_name(lane.op) + " (mask " + mask + ")";
          unsigned exited = 0, in_barrier = 0;
          for (unsigned i = 0; i < 32 && w * 32 + i < l.threads; ++i) {
            if (!(lane.mask >> i & 1u)) continue;
            exited += l.lanes[w * 32 + i]->wait == Wait::kDone;
            in_barrier += l.lanes[w * 32 + i]->wait == Wait::kBarrier;
          }
          what += " for lanes of which " + std::to_string(exited) + " exited and " + std::to_string(in_barrier) +
                  " wait in __syncthreads;";
          break;
        }
      }
      what += " " + std::to_string(at_barrier) + " of " + std::to_string(live) + " live threads wait in __syncthreads";
      fail(l, what);
      return;
    }
    for (auto& lane : l.lanes) {
      if (lane->wait == Wait::kBarrier) lane->wait = Wait::kRun;
    }
    next = pick();
  }
  l.lanes[next]->wake.release();
}

// The calling thread (state already set) gives the baton away and sleeps until it is runnable and picked again.
inline void block_here(Launch& l, Lane& me) {
  pass_baton(l);
  me.wake.acquire();
  if (l.aborted) throw Aborted{};
}

inline std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t value, int arg, int width) {
  Launch& l = *current;
  const unsigned t = this_thread, warp = t / 32, lane = t % 32;
  const unsigned in_warp = std::min(32u, l.threads - warp * 32);
  const unsigned existing = in_warp == 32 ? 0xffffffffu : (1u << in_warp) - 1;
  char mask_text[16];
  std::snprintf(mask_text, sizeof(mask_text), "0x%08x", mask);
  auto error = [&](const std::string& what) {
    fail(l, std::string(op_name(op)) + " in " + lane_name(t) + " with mask " + mask_text + ": " + what);
    throw Aborted{};
  };
  if (!(mask >> lane & 1u)) error("the calling lane is not in the mask");
  if (mask & ~existing) {
    error("the mask names lanes that do not exist (this warp has " + std::to_string(in_warp) + " threads)");
  }
  if (op != WarpOp::kSync && op != WarpOp::kBallot && (width < 1 || width > 32 || (width & (width - 1)))) {
    error("width " + std::to_string(width) + " is not a power of two <= 32");
  }
  Lane* lanes[32] = {};
  for (unsigned i = 0; i < in_warp; ++i) lanes[i] = l.lanes[warp * 32 + i].get();
  for (unsigned i = 0; i < in_warp; ++i) {
    if ((mask >> i & 1u) && lanes[i]->wait == Wait::kDone) error("lane " + std::to_string(i) + " has exited");
  }
  Lane& me = *lanes[lane];
  me.wait = Wait::kWarp;
  me.op = op;
  me.mask = mask;
  me.value = value;
  me.arg = arg;
  me.width = width;
  bool complete = true;
  for (unsigned i = 0; i < in_warp; ++i) complete &= !(mask >> i & 1u) || lanes[i]->wait == Wait::kWarp;
  if (complete) {  // the last lane to arrive computes everybody's result
    std::uint64_t ballot = 0;
    for (unsigned i = 0; i < in_warp; ++i) {
      if (!(mask >> i & 1u)) continue;
      const Lane& other = *lanes[i];
      if (other.op != op || other.mask != mask) {
        char other_mask[16];
        std::snprintf(other_mask, sizeof(other_mask), "0x%08x", other.mask);
        error("lane " + std::to_string(i) + " is in " + op_name(other.op) + " with mask " + other_mask);
      }
      ballot |= static_cast<std::uint64_t>(other.value != 0) << i;
    }
    for (unsigned i = 0; i < in_warp; ++i) {
      if (!(mask >> i & 1u)) continue;
      Lane& dst = *lanes[i];
      const unsigned w = static_cast<unsigned>(dst.width), base = i & ~(w - 1);
      unsigned src = i;
      switch (op) {
        case WarpOp::kShflIdx: src = base + (static_cast<unsigned>(dst.arg) & (w - 1)); break;
        case WarpOp::kShflUp: src = i >= base + static_cast<unsigned>(dst.arg) ? i - dst.arg : i; break;
        case WarpOp::kShflDown: src = i + dst.arg < base + w ? i + dst.arg : i; break;
        case WarpOp::kShflXor: src = (i ^ static_cast<unsigned>(dst.arg)) < base + w ? i ^ dst.arg : i; break;
        default: break;
      }
      if (op == WarpOp::kBallot) dst.result = ballot;
      else dst.result = (src < in_warp && (mask >> src & 1u)) ? lanes[src]->value : ~std::uint64_t(0);
      dst.wait = Wait::kRun;
    }
  }
  block_here(l, me);
  return me.result;
}

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffles move values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(op, mask, bits, arg, width);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

inline void thread_main(Launch& l, unsigned t) {
  this_thread = t;
  threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
  Lane& me = *l.lanes[t];
  for (;;) {
    me.wake.acquire();
    if (l.finished || l.aborted) return;
    blockIdx = l.block;
    try {
      l.body();
    } catch (const Aborted&) {
      return;
    } catch (const std::exception& e) {
      fail(l, std::string("the kernel threw: ") + e.what());
      return;
    }
    me.wait = Wait::kDone;
    pass_baton(l);
  }
}

// Fills dynamic shared memory with 0xFF bytes (NaN in every float format) before each block.
inline void poison(std::vector<unsigned char>& bytes) { std::fill(bytes.begin(), bytes.end(), 0xff); }

// "libfoo.so+0x1234": kernels have internal linkage (no dynamic symbol); tests/cuda_emu/emu.py names them with nm.
inline std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (!dladdr(kernel, &info) || info.dli_fname == nullptr) return "kernel at unknown address";
  const char* base = std::strrchr(info.dli_fname, '/');
  char offset[32];
  std::snprintf(offset, sizeof(offset), "+0x%zx", static_cast<std::size_t>(static_cast<const char*>(kernel) -
                                                                           static_cast<const char*>(info.dli_fbase)));
  return std::string("kernel ") + (base ? base + 1 : info.dli_fname) + offset;
}

inline void run_grid(const void* kernel, std::function<void()> body, dim3 grid, dim3 block, std::size_t smem) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 || grid.y > 65535 || grid.z > 65535 ||
      smem > 227 * 1024) {
    throw std::runtime_error("cuda_emu: invalid launch configuration of " + kernel_name(kernel) + ": grid (" +
                             std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                             "), block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                             std::to_string(block.z) + "), " + std::to_string(smem) + " B dynamic shared memory");
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  if (smem > kDefaultDynamicSmem && smem_optin()[kernel] < smem) {
    throw std::runtime_error("cuda_emu: invalid launch configuration of " + kernel_name(kernel) + ": " +
                             std::to_string(smem) + " B dynamic shared memory (over 48 KB) needs "
                             "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first");
  }
  ++launch_log()[kernel];
#ifdef CUDA_EMU_TRAFFIC
  if (cuda_emu_traffic_skip(kernel)) return;
#endif
  const char* order = std::getenv("CUDA_EMU_ORDER");
  const int forced = order == nullptr                   ? -1
                     : std::strcmp(order, "high") == 0 ? 1
                     : std::strcmp(order, "low") == 0  ? 0
                                                       : -1;
  Launch l;
  l.body = std::move(body);
  l.threads = static_cast<unsigned>(threads);
  l.dynamic_smem.resize(smem);
  for (unsigned t = 0; t < l.threads; ++t) l.lanes.push_back(std::make_unique<Lane>());
  blockDim = block;
  gridDim = grid;
  current = &l;
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < l.threads; ++t) workers.emplace_back(thread_main, std::ref(l), t);
#ifdef CUDA_EMU_TRAFFIC
  cuda_emu_traffic_begin(kernel);
#endif
  unsigned long long linear = 0;
  for (unsigned z = 0; z < grid.z && !l.aborted; ++z) {
    for (unsigned y = 0; y < grid.y && !l.aborted; ++y) {
      for (unsigned x = 0; x < grid.x && !l.aborted; ++x, ++linear) {
        l.block = {x, y, z};
        l.high_first = forced >= 0 ? forced == 1 : linear % 2 == 1;
        poison(l.dynamic_smem);
        for (auto& lane : l.lanes) lane->wait = Wait::kRun;
        pass_baton(l);  // wakes the first thread of the block
        l.block_done.acquire();
      }
    }
  }
  l.finished = true;
  for (auto& lane : l.lanes) lane->wake.release();
  for (auto& w : workers) w.join();
#ifdef CUDA_EMU_TRAFFIC
  cuda_emu_traffic_end();
#endif
  current = nullptr;
  if (l.aborted) {
    throw std::runtime_error("cuda_emu: " + kernel_name(kernel) + " block (" + std::to_string(l.block.x) + ", " +
                             std::to_string(l.block.y) + ", " + std::to_string(l.block.z) + "): " + l.error);
  }
}

// PYKERNELS_LAUNCH(kernel, grid, block, smem, stream, args...) under the emulator. The arguments are converted to
// the kernel's parameter types once, as a <<<>>> launch does, and every thread calls the kernel with them.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t /*stream*/,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<Params>...> params{static_cast<std::decay_t<Params>>(std::forward<Args>(args))...};
  run_grid(reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, params); }, grid, block, smem);
}

template <typename T>
T* dynamic_shared() {
  return current->dynamic_smem.empty() ? nullptr : reinterpret_cast<T*>(current->dynamic_smem.data());
}

}  // namespace cuda_emu

// ---- runtime API: the calls the launchers make -------------------------------------------------------------------
enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef enum cudaError cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}
// Only the dynamic shared memory opt-in is modelled: a launch with more than 48 KB needs it (as on a GPU).
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<std::size_t>(value) > cuda_emu::kMaxDynamicSmem) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(cuda_emu::launch_mutex());
  cuda_emu::smem_optin()[reinterpret_cast<const void*>(kernel)] = static_cast<std::size_t>(value);
  return cudaSuccess;
}

// ---- synchronisation, warp collectives, atomics ------------------------------------------------------------------
inline void __syncthreads() {
  cuda_emu::Launch& l = *cuda_emu::current;
  cuda_emu::Lane& me = *l.lanes[cuda_emu::this_thread];
  me.wait = cuda_emu::Wait::kBarrier;
  cuda_emu::block_here(l, me);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::warp_collective(cuda_emu::WarpOp::kSync, mask, 0, 0, 32);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflIdx, mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflUp, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflDown, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflXor, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(cuda_emu::warp_collective(cuda_emu::WarpOp::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
inline unsigned __activemask() {
  const cuda_emu::Launch& l = *cuda_emu::current;
  const unsigned warp = cuda_emu::this_thread / 32, in_warp = std::min(32u, l.threads - warp * 32);
  unsigned mask = 0;
  for (unsigned i = 0; i < in_warp; ++i) mask |= (l.lanes[warp * 32 + i]->wait != cuda_emu::Wait::kDone) << i;
  return mask;
}

template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicAdd(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = static_cast<T>(old + static_cast<T>(value));
  return old;
}
template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicSub(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = static_cast<T>(old - static_cast<T>(value));
  return old;
}
template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicExch(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = static_cast<T>(value);
  return old;
}
template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicMin(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = std::min(old, static_cast<T>(value));
  return old;
}
template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicMax(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = std::max(old, static_cast<T>(value));
  return old;
}
template <typename T>
CUDA_EMU_ATOMIC_ATTR inline T atomicCAS(T* address, T compare, T value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicAnd(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = old & static_cast<T>(value);
  return old;
}
template <typename T, typename V>
CUDA_EMU_ATOMIC_ATTR inline T atomicOr(T* address, V value) {
  CUDA_EMU_ATOMIC_NOTE(address);
  const T old = *address;
  *address = old | static_cast<T>(value);
  return old;
}
