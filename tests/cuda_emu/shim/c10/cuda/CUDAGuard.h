// Emulation shim (tests/cuda_emu/shim shadows torch's CUDA headers): device guards are no-ops on the host.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Optional.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
  explicit OptionalCUDAGuard(c10::Device) {}
  void set_device(c10::Device) {}
};
}  // namespace c10::cuda
