// DropPath (stochastic depth; Huang et al. 2016, "Deep Networks with Stochastic Depth") fused with layer-scale
// (CaiT; Touvron et al. 2021, "Going deeper with Image Transformers") and the residual add, as in the blocks of
// timm's ViT / ConvNeXt / EfficientNet: the CUDA kernels of pykernels::drop_path_add_fwd / drop_path_add_bwd.
//
//   forward:   out[b, r]         = residual[b, r] + (branch[b, r] * gamma[c]) * scale[b]    (scale = mask / keep_prob)
//   backward:  grad_branch[b, r] = (grad_out[b, r] * gamma[c]) * scale[b]
//              grad_gamma[c]     = sum over b and the positions r of channel c of grad_out * branch * scale[b]
//
// Row geometry (B samples of R elements, C channels CS elements apart, O = R / (C * CS)): csrc/drop_path_args.h.
// Forward: a 2-D grid (x: stretches of a row, y: samples); each thread handles kVec consecutive elements per step
// (vector loads when every tensor is aligned) and tracks the channel of its offset by counting, not dividing.
// Multiplies and adds use __fmul_rn / __fadd_rn (no FMA contraction): float32 outputs are bit-identical to eager.
// Backward, one pass over grad_out and branch, two layouts:
//   channels inner (CS == 1: channels-last, tokens): each thread owns kVec channels and walks rows; no block-level
//     reduction is needed;
//   channels outer (CS > 1: NCHW): block (c, g) walks channel c's elements and reduces them with warp shuffles.
// Both write per-block partial sums to a (G, C) buffer whose sum(0) is grad_gamma: deterministic, and the grid (so
// the rounding) depends on the shape only, not on the GPU.
// Every launch goes through PYKERNELS_LAUNCH, the device check and registration through the macros of launch.cuh
// (tests/cuda_emu runs this file unmodified on the CPU).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "drop_path_args.h"
#include "launch.cuh"

namespace pykernels {
namespace drop_path {
namespace {

constexpr int kVec = 4;                  // elements per vector load/store when aligned
constexpr int kMaxThreads = 256;         // threads per block
constexpr int64_t kMaxGridY = 65535;     // gridDim.y limit
constexpr int64_t kRowsPerThread = 8;    // backward, channels inner: rows each thread sums (about)
constexpr int64_t kStepsPerThread = 16;  // backward, channels outer: vectors each thread sums (about)

// ---- device helpers --------------------------------------------------------------------------------------------
// Separately rounded multiply / add, never contracted into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// N elements loaded / stored with one instruction (the caller guarantees the alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

// Sum of `value` over the block, valid in thread 0; fixed order (deterministic). blockDim.x is a multiple of 32.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* warp_sums) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// ---- forward ---------------------------------------------------------------------------------------------------
// grid (x: stretches of kVecN * blockDim.x elements of a row, y: samples), both grid-strided.
template <typename out_t, typename branch_t, typename residual_t, typename acc_t, int kVecN, bool kResidual>
__global__ void drop_path_add_fwd_kernel(out_t* __restrict__ out, const branch_t* __restrict__ branch,
                                         const residual_t* __restrict__ residual, const acc_t* __restrict__ scale,
                                         const acc_t* __restrict__ gamma, int64_t out_batch_stride,
                                         int64_t branch_batch_stride, int64_t residual_batch_stride, int64_t batch,
                                         int64_t row_numel, int64_t channels, int64_t channel_stride) {
  // This thread's first row offset and its step, each as (channel, position in the channel's run): offsets are
  // then advanced by counting, with no division in the loop.
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVecN;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * kVecN;
  const int64_t first_run = first / channel_stride;
  const int64_t first_channel = first_run % channels;
  const int64_t first_in_run = first - first_run * channel_stride;
  const int64_t step_runs = step / channel_stride;
  const int64_t step_channels = step_runs % channels;
  const int64_t step_in_run = step - step_runs * channel_stride;

  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const acc_t keep_scale = scale != nullptr ? scale[b] : acc_t(1);
    out_t* out_row = out + b * out_batch_stride;
    const branch_t* branch_row = branch + b * branch_batch_stride;
    const residual_t* residual_row = kResidual ? residual + b * residual_batch_stride : nullptr;
    int64_t channel = first_channel;
    int64_t in_run = first_in_run;
    for (int64_t r = first; r < row_numel; r += step) {
      const Pack<branch_t, kVecN> branch_v = load_pack<kVecN>(branch_row + r);
      Pack<residual_t, kVecN> residual_v;
      if (kResidual) residual_v = load_pack<kVecN>(residual_row + r);
      Pack<out_t, kVecN> out_v;
      int64_t c = channel;
      int64_t i_run = in_run;
#pragma unroll
      for (int i = 0; i < kVecN; ++i) {
        const acc_t gamma_c = gamma != nullptr ? gamma[c] : acc_t(1);
        acc_t value = mul_rn(static_cast<acc_t>(branch_v.val[i]), gamma_c);
        value = mul_rn(value, keep_scale);
        if (kResidual) value = add_rn(value, static_cast<acc_t>(residual_v.val[i]));
        out_v.val[i] = static_cast<out_t>(value);
        if (++i_run == channel_stride) {
          i_run = 0;
          if (++c == channels) c = 0;
        }
      }
      store_pack(out_row + r, out_v);
      // Advance (channel, in_run) by step.
      in_run += step_in_run;
      channel += step_channels;
      if (in_run >= channel_stride) {
        in_run -= channel_stride;
        ++channel;
      }
      if (channel >= channels) channel -= channels;
    }
  }
}

// ---- backward, channels inner (CS == 1) ------------------------------------------------------------------------
// grid (x: tiles of kVecN * blockDim.x channels, y: G groups of rows). Thread t of block (x, g) owns channels
// [c0, c0 + kVecN) and rows g, g + G, g + 2G, ... of the B * O rows (row = (b, o)); it writes grad_branch there and
// its kVecN sums to partial[g, c0:c0 + kVecN]. grad_branch == nullptr: grad_branch is not needed.
template <typename grad_t, typename branch_t, typename acc_t, int kVecN>
__global__ void drop_path_add_bwd_channels_inner_kernel(
    branch_t* __restrict__ grad_branch, acc_t* __restrict__ partial, const grad_t* __restrict__ grad_out,
    const branch_t* __restrict__ branch, const acc_t* __restrict__ scale, const acc_t* __restrict__ gamma,
    int64_t grad_branch_batch_stride, int64_t grad_out_batch_stride, int64_t branch_batch_stride, int64_t batch,
    int64_t outer, int64_t channels) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVecN;
  if (c0 >= channels) return;  // no block-level synchronisation below
  acc_t gamma_v[kVecN];
  acc_t sums[kVecN];
#pragma unroll
  for (int i = 0; i < kVecN; ++i) {
    gamma_v[i] = gamma[c0 + i];
    sums[i] = acc_t(0);
  }
  // Rows as (b, o), advanced by gridDim.y rows at a time by counting.
  int64_t b = blockIdx.y / outer;
  int64_t o = blockIdx.y % outer;
  const int64_t step_b = gridDim.y / outer;
  const int64_t step_o = gridDim.y % outer;
  while (b < batch) {
    const acc_t keep_scale = scale != nullptr ? scale[b] : acc_t(1);
    const int64_t offset = o * channels + c0;
    const Pack<grad_t, kVecN> grad_v = load_pack<kVecN>(grad_out + b * grad_out_batch_stride + offset);
    const Pack<branch_t, kVecN> branch_v = load_pack<kVecN>(branch + b * branch_batch_stride + offset);
    Pack<branch_t, kVecN> grad_branch_v;
#pragma unroll
    for (int i = 0; i < kVecN; ++i) {
      const acc_t grad = static_cast<acc_t>(grad_v.val[i]);
      grad_branch_v.val[i] = static_cast<branch_t>(mul_rn(mul_rn(grad, gamma_v[i]), keep_scale));
      sums[i] += grad * static_cast<acc_t>(branch_v.val[i]) * keep_scale;
    }
    if (grad_branch != nullptr) store_pack(grad_branch + b * grad_branch_batch_stride + offset, grad_branch_v);
    o += step_o;
    b += step_b;
    if (o >= outer) {
      o -= outer;
      ++b;
    }
  }
#pragma unroll
  for (int i = 0; i < kVecN; ++i) partial[blockIdx.y * channels + c0 + i] = sums[i];
}

// ---- backward, channels outer (CS > 1) -------------------------------------------------------------------------
// grid (x: channel c, y: G groups). Channel c's elements are (b, o, v): sample, outer repetition, and vector of kVecN
// elements within its run of CS (CS % kVecN == 0). Block (c, g) visits vectors g * blockDim.x + t, stepping by
// G * blockDim.x, writes grad_branch there and the block's sum to partial[g, c].
template <typename grad_t, typename branch_t, typename acc_t, int kVecN>
__global__ void drop_path_add_bwd_channels_outer_kernel(
    branch_t* __restrict__ grad_branch, acc_t* __restrict__ partial, const grad_t* __restrict__ grad_out,
    const branch_t* __restrict__ branch, const acc_t* __restrict__ scale, const acc_t* __restrict__ gamma,
    int64_t grad_branch_batch_stride, int64_t grad_out_batch_stride, int64_t branch_batch_stride, int64_t batch,
    int64_t outer, int64_t channels, int64_t channel_stride) {
  __shared__ acc_t warp_sums[32];
  const int64_t c = blockIdx.x;
  const acc_t gamma_c = gamma[c];
  const int64_t run_vectors = channel_stride / kVecN;
  // This thread's first vector and its step, as (b, o, v), advanced by counting.
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  int64_t v = first % run_vectors;
  int64_t o = (first / run_vectors) % outer;
  int64_t b = (first / run_vectors) / outer;
  const int64_t step_v = step % run_vectors;
  const int64_t step_o = (step / run_vectors) % outer;
  const int64_t step_b = (step / run_vectors) / outer;

  acc_t sum = acc_t(0);
  while (b < batch) {
    const acc_t keep_scale = scale != nullptr ? scale[b] : acc_t(1);
    const int64_t offset = (o * channels + c) * channel_stride + v * kVecN;
    const Pack<grad_t, kVecN> grad_v = load_pack<kVecN>(grad_out + b * grad_out_batch_stride + offset);
    const Pack<branch_t, kVecN> branch_v = load_pack<kVecN>(branch + b * branch_batch_stride + offset);
    Pack<branch_t, kVecN> grad_branch_v;
    acc_t dot = acc_t(0);
#pragma unroll
    for (int i = 0; i < kVecN; ++i) {
      const acc_t grad = static_cast<acc_t>(grad_v.val[i]);
      grad_branch_v.val[i] = static_cast<branch_t>(mul_rn(mul_rn(grad, gamma_c), keep_scale));
      dot += grad * static_cast<acc_t>(branch_v.val[i]);
    }
    sum += dot * keep_scale;
    if (grad_branch != nullptr) store_pack(grad_branch + b * grad_branch_batch_stride + offset, grad_branch_v);
    v += step_v;
    if (v >= run_vectors) {
      v -= run_vectors;
      ++o;
    }
    o += step_o;
    if (o >= outer) {
      o -= outer;
      ++b;
    }
    b += step_b;
  }
  sum = block_sum(sum, warp_sums);
  if (threadIdx.x == 0) partial[blockIdx.y * channels + c] = sum;
}

// ---- launchers -------------------------------------------------------------------------------------------------
// Threads per block for `work` parallel items: a multiple of 32, at most kMaxThreads.
int threads_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (work + 31) / 32 * 32)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when t's data pointer and batch stride allow Pack<T, kVec> accesses at every multiple of kVec.
bool vector_aligned(const at::Tensor& t) {
  const auto address = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  return address % (t.element_size() * kVec) == 0 && t.stride(0) % kVec == 0;
}

at::Tensor drop_path_add_fwd_cuda(const c10::optional<at::Tensor>& residual, const at::Tensor& branch,
                                  const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& gamma,
                                  int64_t channel_dim, c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(PYKERNELS_ON_DEVICE(branch), "drop_path_add_fwd (CUDA kernel): branch must be a CUDA tensor, got ",
              branch.device());
  const c10::cuda::CUDAGuard device_guard(branch.device());
  FwdPlan plan = plan_fwd(residual, branch, scale, gamma, channel_dim, out_dtype);
  if (plan.geo.empty()) return plan.out;
  const Geometry& geo = plan.geo;
  const bool has_residual = plan.residual.defined();
  const bool vectorized = geo.row_numel % kVec == 0 && vector_aligned(plan.out) && vector_aligned(branch) &&
                          (!has_residual || vector_aligned(plan.residual));
  const int vec = vectorized ? kVec : 1;
  const int threads = threads_for(ceil_div(geo.row_numel, vec));
  const dim3 grid(static_cast<unsigned>(ceil_div(geo.row_numel, static_cast<int64_t>(vec) * threads)),
                  static_cast<unsigned>(std::min(geo.batch, kMaxGridY)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // residual_tag is out_tag when there is no residual (kResidual false), so that no kernel is compiled twice.
  auto launch = [&](auto out_tag, auto branch_tag, auto residual_tag, auto acc_tag, auto has_residual_tag) {
    using out_t = typename decltype(out_tag)::type;
    using branch_t = typename decltype(branch_tag)::type;
    using residual_t = typename decltype(residual_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    constexpr bool kResidual = decltype(has_residual_tag)::value;
    auto run = [&](auto kernel) {
      PYKERNELS_LAUNCH(kernel, grid, threads, 0, stream, plan.out.mutable_data_ptr<out_t>(),
                       branch.const_data_ptr<branch_t>(),
                       has_residual ? plan.residual.const_data_ptr<residual_t>() : nullptr,
                       plan.scale.defined() ? plan.scale.const_data_ptr<acc_t>() : nullptr,
                       plan.gamma.defined() ? plan.gamma.const_data_ptr<acc_t>() : nullptr, plan.out.stride(0),
                       branch.stride(0), has_residual ? plan.residual.stride(0) : int64_t(0), geo.batch,
                       geo.row_numel, geo.channels, geo.channel_stride);
    };
    if (vectorized) run(&drop_path_add_fwd_kernel<out_t, branch_t, residual_t, acc_t, kVec, kResidual>);
    else run(&drop_path_add_fwd_kernel<out_t, branch_t, residual_t, acc_t, 1, kResidual>);
  };

  if (plan.out.scalar_type() == at::kDouble) {  // then every data tensor is float64
    if (has_residual) launch(TypeTag<double>{}, TypeTag<double>{}, TypeTag<double>{}, TypeTag<double>{}, std::true_type{});
    else launch(TypeTag<double>{}, TypeTag<double>{}, TypeTag<double>{}, TypeTag<double>{}, std::false_type{});
    return plan.out;
  }
  dispatch_compute(plan.compute, [&](auto acc_tag) {
    dispatch_reduced_or_float(plan.out.scalar_type(), [&](auto out_tag) {
      dispatch_reduced_or_float(branch.scalar_type(), [&](auto branch_tag) {
        if (has_residual) {
          dispatch_reduced_or_float(plan.residual.scalar_type(),
                                    [&](auto residual_tag) { launch(out_tag, branch_tag, residual_tag, acc_tag, std::true_type{}); });
        } else {
          launch(out_tag, branch_tag, out_tag, acc_tag, std::false_type{});
        }
      });
    });
  });
  return plan.out;
}

std::tuple<at::Tensor, at::Tensor> drop_path_add_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& branch,
                                                          const c10::optional<at::Tensor>& scale,
                                                          const at::Tensor& gamma, int64_t channel_dim,
                                                          bool need_grad_branch) {
  TORCH_CHECK(PYKERNELS_ON_DEVICE(branch), "drop_path_add_bwd (CUDA kernel): branch must be a CUDA tensor, got ",
              branch.device());
  const c10::cuda::CUDAGuard device_guard(branch.device());
  BwdPlan plan = plan_bwd(grad_out, branch, scale, gamma, channel_dim, need_grad_branch);
  const Geometry& geo = plan.geo;
  if (geo.empty()) {
    return std::make_tuple(plan.grad_branch, at::zeros({geo.channels}, gamma.options()));
  }
  const bool inner = geo.channels_inner();
  const bool vectorized = (inner ? geo.channels : geo.channel_stride) % kVec == 0 && vector_aligned(grad_out) &&
                          vector_aligned(branch) && (!need_grad_branch || vector_aligned(plan.grad_branch));
  const int vec = vectorized ? kVec : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Grid and partial-sum buffer (G, C); the grid depends on the shape only.
  int threads;
  dim3 grid;
  if (inner) {
    threads = threads_for(ceil_div(geo.channels, vec));
    const int64_t groups = std::min(kMaxGridY, ceil_div(geo.batch * geo.outer, kRowsPerThread));
    grid = dim3(static_cast<unsigned>(ceil_div(geo.channels, static_cast<int64_t>(vec) * threads)),
                static_cast<unsigned>(groups));
  } else {
    const int64_t vectors_per_channel = geo.batch * geo.outer * (geo.channel_stride / vec);
    threads = threads_for(vectors_per_channel);
    const int64_t groups = std::min(kMaxGridY, ceil_div(vectors_per_channel, threads * kStepsPerThread));
    grid = dim3(static_cast<unsigned>(geo.channels), static_cast<unsigned>(groups));
  }
  at::Tensor partial = at::empty({static_cast<int64_t>(grid.y), geo.channels}, gamma.options().dtype(plan.compute));

  auto launch = [&](auto grad_tag, auto branch_tag, auto acc_tag) {
    using grad_t = typename decltype(grad_tag)::type;
    using branch_t = typename decltype(branch_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    branch_t* grad_branch = need_grad_branch ? plan.grad_branch.mutable_data_ptr<branch_t>() : nullptr;
    const int64_t grad_branch_batch_stride = need_grad_branch ? plan.grad_branch.stride(0) : 0;
    const acc_t* scale_ptr = plan.scale.defined() ? plan.scale.const_data_ptr<acc_t>() : nullptr;
    if (inner) {
      auto run = [&](auto kernel) {
        PYKERNELS_LAUNCH(kernel, grid, threads, 0, stream, grad_branch, partial.mutable_data_ptr<acc_t>(),
                         grad_out.const_data_ptr<grad_t>(), branch.const_data_ptr<branch_t>(), scale_ptr,
                         plan.gamma.const_data_ptr<acc_t>(), grad_branch_batch_stride, grad_out.stride(0),
                         branch.stride(0), geo.batch, geo.outer, geo.channels);
      };
      if (vectorized) run(&drop_path_add_bwd_channels_inner_kernel<grad_t, branch_t, acc_t, kVec>);
      else run(&drop_path_add_bwd_channels_inner_kernel<grad_t, branch_t, acc_t, 1>);
    } else {
      auto run = [&](auto kernel) {
        PYKERNELS_LAUNCH(kernel, grid, threads, 0, stream, grad_branch, partial.mutable_data_ptr<acc_t>(),
                         grad_out.const_data_ptr<grad_t>(), branch.const_data_ptr<branch_t>(), scale_ptr,
                         plan.gamma.const_data_ptr<acc_t>(), grad_branch_batch_stride, grad_out.stride(0),
                         branch.stride(0), geo.batch, geo.outer, geo.channels, geo.channel_stride);
      };
      if (vectorized) run(&drop_path_add_bwd_channels_outer_kernel<grad_t, branch_t, acc_t, kVec>);
      else run(&drop_path_add_bwd_channels_outer_kernel<grad_t, branch_t, acc_t, 1>);
    }
  };

  if (branch.scalar_type() == at::kDouble) {  // then grad_out is float64 too
    launch(TypeTag<double>{}, TypeTag<double>{}, TypeTag<double>{});
  } else {
    dispatch_compute(plan.compute, [&](auto acc_tag) {
      dispatch_reduced_or_float(grad_out.scalar_type(), [&](auto grad_tag) {
        dispatch_reduced_or_float(branch.scalar_type(), [&](auto branch_tag) { launch(grad_tag, branch_tag, acc_tag); });
      });
    });
  }
  // Partial sums of the G groups, added up by one deterministic reduction.
  return std::make_tuple(plan.grad_branch, partial.sum(0).to(gamma.scalar_type()));
}

}  // namespace
}  // namespace drop_path
}  // namespace pykernels

TORCH_LIBRARY_IMPL(PYKERNELS_LIBRARY, PYKERNELS_DEVICE, m) {
  m.impl("drop_path_add_fwd", &pykernels::drop_path::drop_path_add_fwd_cuda);
  m.impl("drop_path_add_bwd", &pykernels::drop_path::drop_path_add_bwd_cuda);
}
