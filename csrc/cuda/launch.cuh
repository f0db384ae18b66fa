// The one way pykernels launches a CUDA kernel.
//
//   PYKERNELS_LAUNCH(kernel, grid, block, shared_mem_bytes, stream, args...)
//
// expands to kernel<<<grid, block, shared_mem_bytes, stream>>>(args...) followed by C10_CUDA_KERNEL_LAUNCH_CHECK().
// Every kernel launch goes through this macro so that a host emulation layer can redefine it and run the unmodified
// kernel code on the CPU. `kernel` must be one token: bind a template instance to a local first, e.g.
//   const auto kernel = &my_kernel<float, 4>;
//   PYKERNELS_LAUNCH(kernel, grid, block, 0, stream, out, in, n);
#pragma once

#include <c10/cuda/CUDAException.h>

#define PYKERNELS_LAUNCH(kernel, grid, block, shared_mem_bytes, stream, ...)   \
  do {                                                                         \
    kernel<<<(grid), (block), (shared_mem_bytes), (stream)>>>(__VA_ARGS__);    \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                            \
  } while (0)
