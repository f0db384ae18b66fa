// A kernel whose global-memory traffic is known exactly, to test the counter of the traffic variant (traffic.cpp;
// tests/gpu_check/test_cuda_traffic.py). Built into that variant only, registered as pykernels_emu::traffic_probe.
//
// x: n float32; 64 threads per block, ceil(n / 64) blocks. Thread t of block b (i = 64 b + t, first = 64 b):
//   i < n:  reads x[i] and x[first] (8 B), stages their sum in shared memory (not global: not counted);
//   i < n:  writes out[i] = 2 * (the staged value of thread 63 - t, or of t when that one is past n) (4 B);
//   t == 0: reads x[first .. first + 3] as one 16-byte load, writes sums[b] (4 B), atomicAdd(counter, 1).
// Requested: read 8 n + 16 blocks, written 4 n + 4 blocks; distinct: read 4 n (x), written 4 n + 4 blocks, one
// atomic per block on 4 distinct bytes; sectors ceil(4 n / 32) + ceil(4 n / 32) + ceil(4 blocks / 32) + 1.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "launch.cuh"

namespace {

struct __align__(16) Quad {
  float v[4];
};

__global__ void traffic_probe_kernel(float* __restrict__ out, float* __restrict__ sums, int* __restrict__ counter,
                                     const float* __restrict__ x, int n) {
  __shared__ float tile[64];
  const int t = threadIdx.x, first = blockIdx.x * 64, i = first + t;
  tile[t] = i < n ? x[i] + x[first] : 0.0f;
  __syncthreads();
  const int mirror = first + 63 - t < n ? 63 - t : t;
  if (i < n) out[i] = 2.0f * tile[mirror];
  if (t == 0) {
    const Quad q = *reinterpret_cast<const Quad*>(x + first);
    sums[blockIdx.x] = q.v[0] + q.v[1] + q.v[2] + q.v[3];
    atomicAdd(counter, 1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> traffic_probe(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() >= 4 &&
                  x.numel() % 4 == 0,
              "traffic_probe: x must be a contiguous float32 vector of a multiple of 4 elements");
  const int n = static_cast<int>(x.numel()), blocks = (n + 63) / 64;
  at::Tensor out = at::empty_like(x);
  at::Tensor sums = at::empty({blocks}, x.options());
  at::Tensor counter = at::zeros({1}, x.options().dtype(at::kInt));
  const auto kernel = &traffic_probe_kernel;
  PYKERNELS_LAUNCH(kernel, dim3(blocks), dim3(64), 0, nullptr, out.mutable_data_ptr<float>(),
                   sums.mutable_data_ptr<float>(), counter.mutable_data_ptr<int>(), x.const_data_ptr<float>(), n);
  return {out, sums, counter};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykernels_emu, m) { m.def("traffic_probe(Tensor x) -> (Tensor, Tensor, Tensor)", &traffic_probe); }
