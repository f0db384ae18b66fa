// The one way pykernels launches a CUDA kernel, and the other seams between the CUDA code and the host emulation.
//
//   PYKERNELS_LAUNCH(kernel, grid, block, shared_mem_bytes, stream, args...)
//
// expands to kernel<<<grid, block, shared_mem_bytes, stream>>>(args...) followed by C10_CUDA_KERNEL_LAUNCH_CHECK().
// Every kernel launch goes through this macro so that the host emulation layer (tests/cuda_emu, which defines
// PYKERNELS_CUDA_EMU) can run the unmodified kernel code on the CPU. `kernel` must be one token: bind a template
// instance to a local first, e.g.
//   const auto kernel = &my_kernel<float, 4>;
//   PYKERNELS_LAUNCH(kernel, grid, block, 0, stream, out, in, n);
//
//   PYKERNELS_DYNAMIC_SHARED(T, name)      in a kernel: `extern __shared__ T name[]` (16-byte aligned), the dynamic
//                                          shared memory of the launch (the emulator hands out a pointer instead)
//   PYKERNELS_ON_DEVICE(tensor)            the tensor is on the kernels' device (is_cuda(); on the CPU when emulated)
//   TORCH_LIBRARY_IMPL(PYKERNELS_LIBRARY, PYKERNELS_DEVICE, m)
//                                          registers the launchers as pykernels::<op> for CUDA (pykernels_emu::<op>
//                                          for CPU tensors when emulated)
#pragma once

#ifdef PYKERNELS_CUDA_EMU  // host emulation: tests/cuda_emu/cuda_emu.h is force-included

#define PYKERNELS_LAUNCH(kernel, grid, block, shared_mem_bytes, stream, ...) \
  ::cuda_emu::launch(kernel, (grid), (block), (shared_mem_bytes), (stream), __VA_ARGS__)
#define PYKERNELS_DYNAMIC_SHARED(T, name) T* const name = ::cuda_emu::dynamic_shared<T>()
#define PYKERNELS_LIBRARY pykernels_emu
#define PYKERNELS_DEVICE CPU

#else

#include <c10/cuda/CUDAException.h>

#define PYKERNELS_LAUNCH(kernel, grid, block, shared_mem_bytes, stream, ...)   \
  do {                                                                         \
    kernel<<<(grid), (block), (shared_mem_bytes), (stream)>>>(__VA_ARGS__);    \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                            \
  } while (0)
#define PYKERNELS_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#define PYKERNELS_LIBRARY pykernels
#define PYKERNELS_DEVICE CUDA

#endif

#define PYKERNELS_ON_DEVICE(tensor) ((tensor).device().type() == c10::DeviceType::PYKERNELS_DEVICE)
