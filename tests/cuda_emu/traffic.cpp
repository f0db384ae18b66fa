// Global-memory traffic of emulated CUDA launches: the runtime of the "traffic" build variant (tests/cuda_emu/emu.py).
//
// That variant compiles every translation unit with
//   -O0 -fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0 --param asan-stack=0
//   --param asan-globals=0 -DCUDA_EMU_TRAFFIC
// and links no sanitizer runtime: gcc then calls __asan_{load,store}{1,2,4,8,16}_noabort(addr) or
// __asan_{load,store}N_noabort(addr, size) before every memory access (memcpy / memset included), and this file
// defines those callbacks. -O0 because at -O1 and above gcc's sanopt pass drops a check that a check of the same
// address dominates, whatever its kind: the store of `p[i] += v` would go uncounted.
//
// What counts as global memory: the allocations of torch's CPU allocator (every tensor: the inputs, the outputs and
// the workspaces the launchers allocate), tracked by a wrapper allocator that traffic_enable() installs. Shared
// memory (static arrays, the emulator's dynamic buffer), locals, kernel parameters and the emulator's own data are
// elsewhere and never counted. An access counts only while a launch runs (cuda_emu_traffic_begin / _end, called by
// cuda_emu.h's run_grid): the launchers' host code is not kernel traffic. Atomics (cuda_emu.h's atomic* functions,
// whose own accesses are not instrumented) are counted once each, as atomics.
//
// Per launch and per allocation touched: requested bytes read / written (the sum of access sizes), distinct bytes
// read / written / touched by atomics, and distinct 32-byte sectors (address / 32: the DRAM granule; the CPU allocator
// aligns allocations to 64 bytes, as cudaMalloc's 256 do not change which sectors a tensor covers).
//
// The callbacks run in the emulated threads, one at a time (the emulator's baton), and must call no instrumented
// code: they use plain arrays, libc and no C++ library templates.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#define TRAFFIC_NO_INSTRUMENT __attribute__((no_sanitize_address, noinline))

namespace {

// ---- the allocations (tensors) --------------------------------------------------------------------------------

std::mutex& live_mutex() {
  static std::mutex m;
  return m;
}
struct Allocation {
  std::size_t bytes;
  std::int64_t seq;  // allocation number (0, 1, ... since traffic_enable)
};
std::map<std::uintptr_t, Allocation>& live() {  // base -> every live allocation of the wrapper
  static std::map<std::uintptr_t, Allocation> ranges;
  return ranges;
}
std::int64_t g_next_seq = 0;
std::vector<std::int64_t>& allocation_log() {  // bytes of every allocation since traffic_mark(), in order
  static std::vector<std::int64_t> log;
  return log;
}
bool g_dry = false;  // traffic_dry(true): launches are recorded, not run (sizes of the buffers at other shapes)

struct Tracked {
  c10::DataPtr inner;
  std::uintptr_t base;
};

void delete_tracked(void* context) {
  auto* tracked = static_cast<Tracked*>(context);
  {
    std::lock_guard<std::mutex> lock(live_mutex());
    live().erase(tracked->base);
  }
  delete tracked;  // frees the allocation through the inner allocator's deleter
}

struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  c10::DataPtr allocate(std::size_t n) override {
    c10::DataPtr data = inner->allocate(n);
    void* pointer = data.get();
    if (n == 0 || pointer == nullptr) return data;
    const c10::Device device = data.device();
    const auto base = reinterpret_cast<std::uintptr_t>(pointer);
    {
      std::lock_guard<std::mutex> lock(live_mutex());
      live()[base] = Allocation{n, g_next_seq++};
      allocation_log().push_back(static_cast<std::int64_t>(n));
    }
    return {pointer, new Tracked{std::move(data), base}, &delete_tracked, device};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// ---- the launch in progress (plain data only: read and written by the callbacks) -------------------------------

struct Range {
  std::uintptr_t begin, end;
  std::int64_t seq;
  unsigned char* flags;  // per byte: 1 read, 2 written, 4 atomic (allocated on the first access)
  std::uint64_t read, written;
};
constexpr unsigned char kRead = 1, kWritten = 2, kAtomic = 4;

bool g_active = false;
Range* g_ranges = nullptr;  // sorted by begin
std::size_t g_count = 0;
std::uintptr_t g_low = 0, g_high = 0;
std::uint64_t g_atomics = 0;
const void* g_kernel = nullptr;

TRAFFIC_NO_INSTRUMENT void note(std::uintptr_t address, std::size_t size, unsigned char kind) {
  if (!g_active || size == 0 || address >= g_high || address + size <= g_low) return;
  std::size_t low = 0, high = g_count;  // the last range that begins at or before address
  while (low < high) {
    const std::size_t mid = (low + high) / 2;
    if (g_ranges[mid].begin <= address) low = mid + 1;
    else high = mid;
  }
  if (low == 0) return;
  Range& r = g_ranges[low - 1];
  if (address >= r.end) return;
  if (r.flags == nullptr) r.flags = static_cast<unsigned char*>(std::calloc(r.end - r.begin, 1));
  if (kind == kRead) r.read += size;
  if (kind == kWritten) r.written += size;
  const std::size_t n = address + size <= r.end ? size : r.end - address;  // an access is within one allocation
  unsigned char* flags = r.flags + (address - r.begin);
  for (std::size_t i = 0; i < n; ++i) flags[i] |= kind;
}

std::vector<std::string>& finished() {  // one JSON object per finished launch, until traffic_take()
  static std::vector<std::string> launches;
  return launches;
}

std::string kernel_ref(const void* kernel) {  // "<lib>.so+0x<offset>": emu.py names it with nm
  Dl_info info{};
  if (!dladdr(kernel, &info) || info.dli_fname == nullptr) return "unknown kernel";
  const char* slash = std::strrchr(info.dli_fname, '/');
  char offset[32];
  std::snprintf(offset, sizeof(offset), "+0x%zx",
                static_cast<std::size_t>(static_cast<const char*>(kernel) - static_cast<const char*>(info.dli_fbase)));
  return std::string(slash ? slash + 1 : info.dli_fname) + offset;
}

// ---- ops ------------------------------------------------------------------------------------------------------

void traffic_enable() {
  static TrackingAllocator* tracking = nullptr;
  if (tracking != nullptr) return;
  tracking = new TrackingAllocator();
  tracking->inner = c10::GetCPUAllocator();
  c10::SetCPUAllocator(tracking, /*priority=*/100);
}

// The number the next allocation gets; forgets the allocation log.
std::int64_t traffic_mark() {
  std::lock_guard<std::mutex> lock(live_mutex());
  allocation_log().clear();
  return g_next_seq;
}

std::vector<std::int64_t> traffic_allocations() {
  std::lock_guard<std::mutex> lock(live_mutex());
  return allocation_log();
}

void traffic_dry(bool dry) { g_dry = dry; }

std::vector<std::string> traffic_take() {
  std::vector<std::string> out;
  out.swap(finished());
  return out;
}

}  // namespace

// ---- the hooks ------------------------------------------------------------------------------------------------

extern "C" {

void cuda_emu_traffic_begin(const void* kernel) {
  {
    std::lock_guard<std::mutex> lock(live_mutex());
    g_count = live().size();
    g_ranges = static_cast<Range*>(std::calloc(g_count ? g_count : 1, sizeof(Range)));
    std::size_t i = 0;
    for (const auto& [base, a] : live()) g_ranges[i++] = Range{base, base + a.bytes, a.seq, nullptr, 0, 0};
  }
  g_low = g_count ? g_ranges[0].begin : 0;
  g_high = g_count ? g_ranges[g_count - 1].end : 0;
  g_atomics = 0;
  g_kernel = kernel;
  g_active = true;
}

void cuda_emu_traffic_end() {
  g_active = false;
  std::string json = "{\"kernel\": \"" + kernel_ref(g_kernel) + "\", \"atomics\": " + std::to_string(g_atomics) +
                     ", \"ranges\": [";
  bool first = true;
  for (std::size_t i = 0; i < g_count; ++i) {
    Range& r = g_ranges[i];
    if (r.flags == nullptr) continue;
    std::uint64_t read = 0, written = 0, atomic = 0, sectors = 0;
    const std::size_t bytes = r.end - r.begin;
    for (std::size_t b = 0; b < bytes; ++b) {
      read += (r.flags[b] & kRead) != 0;
      written += (r.flags[b] & kWritten) != 0;
      atomic += (r.flags[b] & kAtomic) != 0;
    }
    for (std::uintptr_t sector = r.begin / 32; sector <= (r.end - 1) / 32; ++sector) {
      const std::uintptr_t lo = sector * 32 < r.begin ? r.begin : sector * 32;
      const std::uintptr_t hi = sector * 32 + 32 > r.end ? r.end : sector * 32 + 32;
      bool touched = false;
      for (std::uintptr_t a = lo; a < hi && !touched; ++a) touched = r.flags[a - r.begin] != 0;
      sectors += touched;
    }
    char entry[360];
    std::snprintf(entry, sizeof(entry),
                  "%s{\"base\": %llu, \"seq\": %lld, \"size\": %zu, \"bytes_read\": %llu, \"bytes_written\": %llu, "
                  "\"distinct_read\": %llu, \"distinct_written\": %llu, \"distinct_atomic\": %llu, \"sectors\": %llu}",
                  first ? "" : ", ", static_cast<unsigned long long>(r.begin), static_cast<long long>(r.seq), bytes,
                  static_cast<unsigned long long>(r.read), static_cast<unsigned long long>(r.written),
                  static_cast<unsigned long long>(read), static_cast<unsigned long long>(written),
                  static_cast<unsigned long long>(atomic), static_cast<unsigned long long>(sectors));
    json += entry;
    first = false;
    std::free(r.flags);
  }
  json += "]}";
  std::free(g_ranges);
  g_ranges = nullptr;
  g_count = 0;
  finished().push_back(std::move(json));
}

bool cuda_emu_traffic_skip(const void* kernel) {
  if (!g_dry) return false;
  finished().push_back("{\"kernel\": \"" + kernel_ref(kernel) + "\", \"dry\": true, \"atomics\": 0, \"ranges\": []}");
  return true;
}

TRAFFIC_NO_INSTRUMENT void cuda_emu_traffic_atomic(const void* address, std::size_t bytes) {
  if (!g_active) return;
  ++g_atomics;
  note(reinterpret_cast<std::uintptr_t>(address), bytes, kAtomic);
}

#define TRAFFIC_HOOKS(n)                                                                                          \
  TRAFFIC_NO_INSTRUMENT void __asan_load##n##_noabort(std::uintptr_t address) { note(address, n, kRead); }      \
  TRAFFIC_NO_INSTRUMENT void __asan_store##n##_noabort(std::uintptr_t address) { note(address, n, kWritten); } \
  TRAFFIC_NO_INSTRUMENT void __asan_load##n(std::uintptr_t address) { note(address, n, kRead); }                \
  TRAFFIC_NO_INSTRUMENT void __asan_store##n(std::uintptr_t address) { note(address, n, kWritten); }
TRAFFIC_HOOKS(1)
TRAFFIC_HOOKS(2)
TRAFFIC_HOOKS(4)
TRAFFIC_HOOKS(8)
TRAFFIC_HOOKS(16)
#undef TRAFFIC_HOOKS
TRAFFIC_NO_INSTRUMENT void __asan_loadN_noabort(std::uintptr_t address, std::size_t size) {
  note(address, size, kRead);
}
TRAFFIC_NO_INSTRUMENT void __asan_storeN_noabort(std::uintptr_t address, std::size_t size) {
  note(address, size, kWritten);
}
TRAFFIC_NO_INSTRUMENT void __asan_loadN(std::uintptr_t address, std::size_t size) { note(address, size, kRead); }
TRAFFIC_NO_INSTRUMENT void __asan_storeN(std::uintptr_t address, std::size_t size) { note(address, size, kWritten); }
TRAFFIC_NO_INSTRUMENT void __asan_handle_no_return() {}
TRAFFIC_NO_INSTRUMENT void __asan_before_dynamic_init(const char*) {}  // initialisation-order checks: none
TRAFFIC_NO_INSTRUMENT void __asan_after_dynamic_init() {}

}  // extern "C"

TORCH_LIBRARY_FRAGMENT(pykernels_emu, m) {
  m.def("traffic_enable() -> ()", &traffic_enable);
  m.def("traffic_take() -> str[]", &traffic_take);
  m.def("traffic_mark() -> int", &traffic_mark);
  m.def("traffic_allocations() -> int[]", &traffic_allocations);
  m.def("traffic_dry(bool dry) -> ()", &traffic_dry);
}
