// Toy kernels that pin down the emulator's semantics (tests/gpu_check/test_cuda_emu.py): warp collectives with
// partial warps, masks and widths; dynamic shared memory; atomics; errors for misuse. Built into the emulated
// extension only (never by nvcc), registered as pykernels_emu::emu_*.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "launch.cuh"

namespace {

// One block of `threads`; thread t of warp w calls collective `op` with value 1000 + t when its lane is in
// mask & (lanes of its warp), else writes -2. op: 0 shfl, 1 shfl_up, 2 shfl_down, 3 shfl_xor, 4 ballot(t odd),
// 5 any(t == 3), 6 all(t < 40).
__global__ void collective_probe_kernel(int* out, int op, int arg, int width, unsigned mask) {
  const int t = threadIdx.x;
  const unsigned lanes = blockDim.x - t / 32 * 32 >= 32 ? 0xffffffffu : (1u << (blockDim.x % 32)) - 1;
  const unsigned m = mask & lanes;
  if (!(m >> (t % 32) & 1u)) {
    out[t] = -2;
    return;
  }
  const int v = 1000 + t;
  int r = 0;
  switch (op) {
    case 0: r = __shfl_sync(m, v, arg, width); break;
    case 1: r = __shfl_up_sync(m, v, arg, width); break;
    case 2: r = __shfl_down_sync(m, v, arg, width); break;
    case 3: r = __shfl_xor_sync(m, v, arg, width); break;
    case 4: r = static_cast<int>(__ballot_sync(m, t % 2)); break;
    case 5: r = __any_sync(m, t == 3); break;
    case 6: r = __all_sync(m, t < 40); break;
  }
  out[t] = r;
}

// out[b, t] = x[b, n - 1 - t] through dynamic shared memory of `smem_elems` floats.
__global__ void block_reverse_kernel(float* out, const float* x, int n) {
  PYKERNELS_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  buf[t] = x[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

// out[i] = dynamic shared memory word i as the block sees it before writing (the poison pattern).
__global__ void smem_poison_probe_kernel(float* out) {
  PYKERNELS_DYNAMIC_SHARED(float, buf);
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[threadIdx.x];
  buf[threadIdx.x] = 1.0f;
}

__global__ void histogram_kernel(int* bins, const int64_t* idx, int64_t n) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(&bins[idx[i]], 1);
  }
}

// kind 0: lanes 0-15 in a full-mask shuffle while 16-31 exit; 1: half the block in __syncthreads, half in a
// full-mask shuffle (deadlock); 2: a lane calls a shuffle whose mask does not name it.
__global__ void misuse_kernel(int* out, int kind) {
  const int t = threadIdx.x;
  if (kind == 0) {
    if (t >= 16) return;
    out[t] = __shfl_sync(0xffffffffu, t, 0);
  } else if (kind == 1) {
    if (t < 16) out[t] = __shfl_sync(0xffffffffu, t, 0);
    else __syncthreads();
  } else {
    out[t] = __shfl_sync(0x0000ffffu, t, 0);
  }
}

at::Tensor emu_collective(int64_t op, int64_t arg, int64_t width, int64_t mask, int64_t threads) {
  at::Tensor out = at::full({threads}, -3, at::kInt);
  const auto kernel = &collective_probe_kernel;
  PYKERNELS_LAUNCH(kernel, 1, static_cast<int>(threads), 0, nullptr, out.data_ptr<int>(), static_cast<int>(op),
                   static_cast<int>(arg), static_cast<int>(width), static_cast<unsigned>(mask));
  return out;
}

at::Tensor emu_block_reverse(const at::Tensor& x, int64_t smem_elems) {
  at::Tensor xc = x.contiguous().to(at::kFloat), out = at::empty_like(xc);
  const auto kernel = &block_reverse_kernel;
  PYKERNELS_LAUNCH(kernel, static_cast<unsigned>(xc.size(0)), static_cast<int>(xc.size(1)), smem_elems * sizeof(float),
                   nullptr, out.data_ptr<float>(), xc.data_ptr<float>(), static_cast<int>(xc.size(1)));
  return out;
}

at::Tensor emu_smem_poison(int64_t blocks, int64_t threads) {
  at::Tensor out = at::zeros({blocks, threads}, at::kFloat);
  const auto kernel = &smem_poison_probe_kernel;
  PYKERNELS_LAUNCH(kernel, static_cast<unsigned>(blocks), static_cast<int>(threads), threads * sizeof(float), nullptr,
                   out.data_ptr<float>());
  return out;
}

at::Tensor emu_histogram(const at::Tensor& idx, int64_t bins) {
  at::Tensor out = at::zeros({bins}, at::kInt), ic = idx.contiguous();
  const auto kernel = &histogram_kernel;
  PYKERNELS_LAUNCH(kernel, 3, 64, 0, nullptr, out.data_ptr<int>(), ic.data_ptr<int64_t>(), ic.numel());
  return out;
}

at::Tensor emu_misuse(int64_t kind) {
  at::Tensor out = at::zeros({32}, at::kInt);
  const auto kernel = &misuse_kernel;
  PYKERNELS_LAUNCH(kernel, 1, 32, 0, nullptr, out.data_ptr<int>(), static_cast<int>(kind));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykernels_emu, m) {
  m.def("emu_collective(int op, int arg, int width, int mask, int threads) -> Tensor", &emu_collective);
  m.def("emu_block_reverse(Tensor x, int smem_elems) -> Tensor", &emu_block_reverse);
  m.def("emu_smem_poison(int blocks, int threads) -> Tensor", &emu_smem_poison);
  m.def("emu_histogram(Tensor idx, int bins) -> Tensor", &emu_histogram);
  m.def("emu_misuse(int kind) -> Tensor", &emu_misuse);
}
