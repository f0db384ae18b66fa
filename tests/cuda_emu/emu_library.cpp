// The op schemas of csrc/ops.cpp, defined again under the namespace pykernels_emu (the emulated CUDA launchers of
// csrc/cuda/*.cu register there, for CPU tensors), plus the emulator's launch log. The token `pykernels` in ops.cpp
// outside comments and strings is only TORCH_LIBRARY(pykernels, m), whose C10_STRINGIZE(ns) expands the macro.
#define pykernels pykernels_emu
#define PyInit__C PyInit__pykernels_emu_unused
#include "ops.cpp"
#undef PyInit__C
#undef pykernels

#include <dlfcn.h>

namespace {
// "<offset in the .so> <launches>" for every kernel launched so far (tests/cuda_emu/emu.py names them with nm).
std::vector<std::string> emu_launches() {
  std::lock_guard<std::mutex> lock(cuda_emu::launch_mutex());
  std::vector<std::string> out;
  for (const auto& [kernel, count] : cuda_emu::launch_log()) {
    Dl_info info{};
    if (!dladdr(kernel, &info)) continue;
    const auto offset = static_cast<const char*>(kernel) - static_cast<const char*>(info.dli_fbase);
    out.push_back(std::to_string(offset) + " " + std::to_string(count));
  }
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pykernels_emu, m) { m.def("emu_launches() -> str[]", &emu_launches); }
