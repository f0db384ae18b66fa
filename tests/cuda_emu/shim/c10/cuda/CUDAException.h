// Emulation shim (tests/cuda_emu/shim shadows torch's CUDA headers): launches fail by throwing; C10_CUDA_CHECK
// throws on a runtime-API error of the emulator (cudaFuncSetAttribute).
#pragma once

#include <stdexcept>
#include <string>

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr)                                                                    \
  do {                                                                                          \
    const auto cuda_emu_error = (expr);                                                         \
    if (cuda_emu_error != cudaSuccess) {                                                        \
      throw std::runtime_error(std::string("cuda_emu: ") + #expr + ": " +                       \
                               cudaGetErrorString(cuda_emu_error));                             \
    }                                                                                           \
  } while (0)
