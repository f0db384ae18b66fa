// Emulation shim (tests/cuda_emu/shim shadows torch's CUDA headers): one null stream.
#pragma once

#include <c10/core/Device.h>

namespace at::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace at::cuda
