// DropPath (stochastic depth; Huang et al. 2016, "Deep Networks with Stochastic Depth") fused with layer-scale
// (CaiT; Touvron et al. 2021, "Going deeper with Image Transformers") and the residual add, as in the blocks of
// timm's ViT / ConvNeXt / EfficientNet: the CPU kernels of pykernels::drop_path_add_fwd / drop_path_add_bwd.
//
//   forward:   out[b, r]         = residual[b, r] + (branch[b, r] * gamma[c]) * scale[b]    (scale = mask / keep_prob)
//   backward:  grad_branch[b, r] = (grad_out[b, r] * gamma[c]) * scale[b]
//              grad_gamma[c]     = sum over b and the positions r of channel c of grad_out * branch * scale[b]
//
// One pass over memory. Work is cut into pieces of runs (see csrc/drop_path_args.h for the row geometry):
//   channels inner (CS == 1: channels-last, tokens): a run is one group of C channels, gamma a vector along it;
//   channels outer (CS > 1: NCHW, or no gamma):     a run is the CS elements of one channel, gamma a scalar over it.
// Runs longer than kPieceNumel are cut, so that even B == 1 spreads over all threads. Pieces go to at::parallel_for;
// the inner loops are plain loops over restrict pointers that gcc vectorizes. The build passes -ffp-contract=off, so
// every multiply and add is rounded on its own and float32 outputs are bit-identical to eager PyTorch. Compute is in
// float32 (float64 when any tensor is float64); float16 tensors pass through float tiles (F16C when the CPU has it).
// The backward reduction is deterministic: the pieces are split into a fixed number of tasks (independent of the
// thread count), each with its own partial sums of C values, added up in task order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/half_convert.h"
#include "drop_path_args.h"


namespace pykernels {
namespace drop_path {
namespace {

constexpr int64_t kPieceNumel = 16384;      // longest stretch of a run handled as one work unit
constexpr int64_t kGrainNumel = 32768;      // fewest elements worth a thread in the forward
constexpr int64_t kTaskNumel = 1 << 16;     // elements per backward task (partial-sum buffer)
constexpr int64_t kMaxTasks = 256;          // at most this many partial-sum buffers of C values
constexpr int kLanes = 16;                  // independent accumulators of a constant-gamma dot product
constexpr int64_t kStageNumel = 512;        // float16 elements converted to float at a time

// ---- float16: tiles converted by the shared run converters (half_convert.h) -------------------------------------
template <typename T>
constexpr bool is_half_v = std::is_same_v<T, c10::Half>;

// The type a tile of T is computed in: float for float16, T itself otherwise.
template <typename T>
using staged_t = std::conditional_t<is_half_v<T>, float, T>;

// Runs loop(out, in_a, in_b, offset, numel) over a piece of `numel` elements with pointers of the staged types:
// float16 inputs are converted to float tiles first and a float16 output is converted back after, tile by tile;
// other pieces go straight through as one tile. out and in_b may be null (no output / input).
template <typename out_t, typename a_t, typename b_t, typename Loop>
void staged(out_t* out, const a_t* in_a, const b_t* in_b, int64_t numel, const Loop& loop) {
  if constexpr (!is_half_v<out_t> && !is_half_v<a_t> && !is_half_v<b_t>) {
    loop(out, in_a, in_b, int64_t(0), numel);
  } else {
    const cpu::HalfRuns& convert = cpu::half_runs();
    staged_t<out_t> out_tile[is_half_v<out_t> ? kStageNumel : 1];
    staged_t<a_t> a_tile[is_half_v<a_t> ? kStageNumel : 1];
    staged_t<b_t> b_tile[is_half_v<b_t> ? kStageNumel : 1];
    for (int64_t offset = 0; offset < numel; offset += kStageNumel) {
      const int64_t n = std::min(kStageNumel, numel - offset);
      staged_t<out_t>* out_view = nullptr;
      const staged_t<a_t>* a_view = nullptr;
      const staged_t<b_t>* b_view = nullptr;
      if constexpr (is_half_v<out_t>) {
        out_view = out != nullptr ? out_tile : nullptr;
      } else {
        out_view = out != nullptr ? out + offset : nullptr;
      }
      if constexpr (is_half_v<a_t>) {
        convert.to_float(in_a + offset, a_tile, n);
        a_view = a_tile;
      } else {
        a_view = in_a + offset;
      }
      if constexpr (is_half_v<b_t>) {
        if (in_b != nullptr) {
          convert.to_float(in_b + offset, b_tile, n);
          b_view = b_tile;
        }
      } else {
        b_view = in_b != nullptr ? in_b + offset : nullptr;
      }
      loop(out_view, a_view, b_view, offset, n);
      if constexpr (is_half_v<out_t>) {
        if (out != nullptr) convert.from_float(out_tile, out + offset, n);
      }
    }
  }
}

// ---- iteration space ------------------------------------------------------------------------------------------
// Units are the pieces of the runs of every row, in memory order: a mixed-radix counter (b, o, c, piece) with
// radices (B, O, run_channels, pieces). run_channels is C when channels are outer (each run has one channel) and 1
// when they are inner (each run spans all C channels).
struct RunSpace {
  int64_t batch;
  int64_t outer;
  int64_t run_channels;
  int64_t run_numel;
  int64_t pieces;  // pieces per run

  explicit RunSpace(const Geometry& geo)
      : batch(geo.batch),
        outer(geo.outer),
        run_channels(geo.channels_inner() ? 1 : geo.channels),
        run_numel(geo.channels_inner() ? geo.channels : geo.channel_stride),
        pieces((run_numel + kPieceNumel - 1) / kPieceNumel) {}

  int64_t units() const { return batch * outer * run_channels * pieces; }
  int64_t unit_numel() const { return std::min(run_numel, kPieceNumel); }
};

// Calls body(b, c, row_offset, run_offset, numel) for the units [begin, end): sample b, channel c of the run (0 when
// channels are inner), offset of the piece in the row and in its run, and its length. Divides once, then counts.
template <typename Body>
void for_each_piece(const RunSpace& space, int64_t begin, int64_t end, const Body& body) {
  int64_t piece = begin % space.pieces;
  int64_t run = begin / space.pieces;
  int64_t c = run % space.run_channels;
  run /= space.run_channels;
  int64_t o = run % space.outer;
  int64_t b = run / space.outer;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t run_offset = piece * kPieceNumel;
    const int64_t numel = std::min(kPieceNumel, space.run_numel - run_offset);
    const int64_t row_offset = (o * space.run_channels + c) * space.run_numel + run_offset;
    body(b, c, row_offset, run_offset, numel);
    // Advance the (b, o, c, piece) counter.
    if (++piece == space.pieces) {
      piece = 0;
      if (++c == space.run_channels) {
        c = 0;
        if (++o == space.outer) {
          o = 0;
          ++b;
        }
      }
    }
  }
}

// ---- forward inner loop ----------------------------------------------------------------------------------------
// gamma is a scalar (constant over the piece: channels outer, or no gamma) or a pointer (channels inner).
template <typename acc_t>
inline acc_t gamma_at(acc_t gamma, int64_t) {
  return gamma;
}

template <typename acc_t>
inline acc_t gamma_at(const acc_t* __restrict__ gamma, int64_t i) {
  return gamma[i];
}

// out[i] = residual[i] + (branch[i] * gamma) * scale over one tile; residual may be null. Element types are float,
// bfloat16 or double (float16 is staged to float).
template <typename out_t, typename branch_t, typename residual_t, typename acc_t, typename Gamma>
void fwd_tile(out_t* __restrict__ out, const branch_t* __restrict__ branch, const residual_t* __restrict__ residual,
              Gamma gamma, acc_t scale, int64_t numel) {
  if (residual != nullptr) {
    for (int64_t i = 0; i < numel; ++i) {
      acc_t value = static_cast<acc_t>(branch[i]) * gamma_at(gamma, i);
      value = value * scale;
      value = value + static_cast<acc_t>(residual[i]);
      out[i] = static_cast<out_t>(value);
    }
  } else {
    for (int64_t i = 0; i < numel; ++i) {
      acc_t value = static_cast<acc_t>(branch[i]) * gamma_at(gamma, i);
      value = value * scale;
      out[i] = static_cast<out_t>(value);
    }
  }
}

template <typename out_t, typename branch_t, typename residual_t, typename acc_t>
void fwd_cpu(const FwdPlan& plan, const at::Tensor& branch) {
  const RunSpace space(plan.geo);
  const bool channels_inner = plan.geo.channels_inner();
  out_t* out = plan.out.mutable_data_ptr<out_t>();
  const branch_t* branch_ptr = branch.const_data_ptr<branch_t>();
  const residual_t* residual = plan.residual.defined() ? plan.residual.const_data_ptr<residual_t>() : nullptr;
  const acc_t* scale = plan.scale.defined() ? plan.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* gamma = plan.gamma.defined() ? plan.gamma.const_data_ptr<acc_t>() : nullptr;
  const int64_t out_batch_stride = plan.out.stride(0);
  const int64_t branch_batch_stride = branch.stride(0);
  const int64_t residual_batch_stride = residual != nullptr ? plan.residual.stride(0) : 0;

  const int64_t grain = std::max<int64_t>(1, kGrainNumel / space.unit_numel());
  at::parallel_for(0, space.units(), grain, [&](int64_t begin, int64_t end) {
    for_each_piece(space, begin, end, [&](int64_t b, int64_t c, int64_t row_offset, int64_t run_offset, int64_t n) {
      const acc_t keep_scale = scale != nullptr ? scale[b] : acc_t(1);
      out_t* out_piece = out + b * out_batch_stride + row_offset;
      const branch_t* branch_piece = branch_ptr + b * branch_batch_stride + row_offset;
      const residual_t* residual_piece = residual != nullptr ? residual + b * residual_batch_stride + row_offset
                                                             : nullptr;
      if (channels_inner) {
        const acc_t* gamma_piece = gamma + run_offset;
        staged(out_piece, branch_piece, residual_piece, n, [&](auto* out_tile, auto* branch_tile, auto* residual_tile,
                                                               int64_t offset, int64_t tile_numel) {
          fwd_tile(out_tile, branch_tile, residual_tile, gamma_piece + offset, keep_scale, tile_numel);
        });
      } else {
        const acc_t gamma_c = gamma != nullptr ? gamma[c] : acc_t(1);
        staged(out_piece, branch_piece, residual_piece, n, [&](auto* out_tile, auto* branch_tile, auto* residual_tile,
                                                               int64_t, int64_t tile_numel) {
          fwd_tile(out_tile, branch_tile, residual_tile, gamma_c, keep_scale, tile_numel);
        });
      }
    });
  });
}

// ---- backward inner loops --------------------------------------------------------------------------------------
// Element types are float, bfloat16 or double (float16 is staged to float); grad_branch is null when not needed.
// Channels inner: grad_branch[i] = (grad_out[i] * gamma[i]) * scale; partial[i] += (grad_out[i] * branch[i]) * scale.
template <typename branch_t, typename grad_t, typename acc_t>
void bwd_tile_vector_gamma(branch_t* __restrict__ grad_branch, const grad_t* __restrict__ grad_out,
                           const branch_t* __restrict__ branch, const acc_t* __restrict__ gamma, acc_t scale,
                           acc_t* __restrict__ partial, int64_t numel) {
  if (grad_branch != nullptr) {
    for (int64_t i = 0; i < numel; ++i) {
      const acc_t grad = static_cast<acc_t>(grad_out[i]);
      acc_t value = grad * gamma[i];
      value = value * scale;
      grad_branch[i] = static_cast<branch_t>(value);
      acc_t product = grad * static_cast<acc_t>(branch[i]);
      product = product * scale;
      partial[i] = partial[i] + product;
    }
  } else {
    for (int64_t i = 0; i < numel; ++i) {
      acc_t product = static_cast<acc_t>(grad_out[i]) * static_cast<acc_t>(branch[i]);
      product = product * scale;
      partial[i] = partial[i] + product;
    }
  }
}

// Channels outer: grad_branch[i] = (grad_out[i] * gamma) * scale; returns sum_i grad_out[i] * branch[i], kept in
// kLanes independent accumulators (so the loop vectorizes) that are added up in a fixed order.
template <bool kGradBranch, typename branch_t, typename grad_t, typename acc_t>
acc_t bwd_tile_scalar_gamma_impl(branch_t* __restrict__ grad_branch, const grad_t* __restrict__ grad_out,
                                 const branch_t* __restrict__ branch, acc_t gamma, acc_t scale, int64_t numel) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= numel; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const acc_t grad = static_cast<acc_t>(grad_out[i + lane]);
      if (kGradBranch) {
        acc_t value = grad * gamma;
        value = value * scale;
        grad_branch[i + lane] = static_cast<branch_t>(value);
      }
      lanes[lane] = lanes[lane] + grad * static_cast<acc_t>(branch[i + lane]);
    }
  }
  acc_t tail = 0;
  for (; i < numel; ++i) {
    const acc_t grad = static_cast<acc_t>(grad_out[i]);
    if (kGradBranch) {
      acc_t value = grad * gamma;
      value = value * scale;
      grad_branch[i] = static_cast<branch_t>(value);
    }
    tail = tail + grad * static_cast<acc_t>(branch[i]);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] = lanes[lane] + lanes[lane + width];
  }
  return lanes[0] + tail;
}

template <typename branch_t, typename grad_t, typename acc_t>
acc_t bwd_tile_scalar_gamma(branch_t* grad_branch, const grad_t* grad_out, const branch_t* branch, acc_t gamma,
                            acc_t scale, int64_t numel) {
  return grad_branch != nullptr
             ? bwd_tile_scalar_gamma_impl<true>(grad_branch, grad_out, branch, gamma, scale, numel)
             : bwd_tile_scalar_gamma_impl<false>(grad_branch, grad_out, branch, gamma, scale, numel);
}

template <typename grad_t, typename branch_t, typename acc_t>
void bwd_cpu(const BwdPlan& plan, const at::Tensor& grad_out, const at::Tensor& branch, bool need_grad_branch,
             at::Tensor& grad_gamma_acc) {
  const RunSpace space(plan.geo);
  const bool channels_inner = plan.geo.channels_inner();
  const int64_t channels = plan.geo.channels;
  branch_t* grad_branch = need_grad_branch ? plan.grad_branch.mutable_data_ptr<branch_t>() : nullptr;
  const grad_t* grad_out_ptr = grad_out.const_data_ptr<grad_t>();
  const branch_t* branch_ptr = branch.const_data_ptr<branch_t>();
  const acc_t* scale = plan.scale.defined() ? plan.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* gamma = plan.gamma.const_data_ptr<acc_t>();
  const int64_t grad_branch_batch_stride = need_grad_branch ? plan.grad_branch.stride(0) : 0;
  const int64_t grad_out_batch_stride = grad_out.stride(0);
  const int64_t branch_batch_stride = branch.stride(0);

  // A fixed number of tasks (a function of the shape only), each summing its contiguous range of units into its
  // own row of partial sums: the result does not depend on the thread count or scheduling.
  const int64_t units = space.units();
  const int64_t numel = plan.geo.batch * plan.geo.row_numel;
  const int64_t tasks = std::max<int64_t>(1, std::min({(numel + kTaskNumel - 1) / kTaskNumel, kMaxTasks, units}));
  std::vector<acc_t> partials(tasks * channels, acc_t(0));

  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      acc_t* partial = partials.data() + task * channels;
      for_each_piece(space, units * task / tasks, units * (task + 1) / tasks,
                     [&](int64_t b, int64_t c, int64_t row_offset, int64_t run_offset, int64_t n) {
                       const acc_t keep_scale = scale != nullptr ? scale[b] : acc_t(1);
                       branch_t* grad_branch_piece =
                           need_grad_branch ? grad_branch + b * grad_branch_batch_stride + row_offset : nullptr;
                       const grad_t* grad_out_piece = grad_out_ptr + b * grad_out_batch_stride + row_offset;
                       const branch_t* branch_piece = branch_ptr + b * branch_batch_stride + row_offset;
                       if (channels_inner) {
                         const acc_t* gamma_piece = gamma + run_offset;
                         acc_t* partial_piece = partial + run_offset;
                         staged(grad_branch_piece, grad_out_piece, branch_piece, n,
                                [&](auto* grad_branch_tile, auto* grad_out_tile, auto* branch_tile, int64_t offset,
                                    int64_t tile_numel) {
                                  bwd_tile_vector_gamma(grad_branch_tile, grad_out_tile, branch_tile,
                                                        gamma_piece + offset, keep_scale, partial_piece + offset,
                                                        tile_numel);
                                });
                       } else {
                         acc_t dot = 0;
                         staged(grad_branch_piece, grad_out_piece, branch_piece, n,
                                [&](auto* grad_branch_tile, auto* grad_out_tile, auto* branch_tile, int64_t,
                                    int64_t tile_numel) {
                                  dot = dot + bwd_tile_scalar_gamma(grad_branch_tile, grad_out_tile, branch_tile,
                                                                    gamma[c], keep_scale, tile_numel);
                                });
                         partial[c] = partial[c] + dot * keep_scale;
                       }
                     });
    }
  });

  // Add the tasks' partial sums in task order.
  acc_t* grad_gamma = grad_gamma_acc.mutable_data_ptr<acc_t>();
  for (int64_t task = 0; task < tasks; ++task) {
    const acc_t* partial = partials.data() + task * channels;
    for (int64_t c = 0; c < channels; ++c) grad_gamma[c] = grad_gamma[c] + partial[c];
  }
}

// ---- ops -------------------------------------------------------------------------------------------------------
at::Tensor drop_path_add_fwd_cpu(const c10::optional<at::Tensor>& residual, const at::Tensor& branch,
                                 const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& gamma,
                                 int64_t channel_dim, c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(branch.device().is_cpu(), "drop_path_add_fwd (CPU kernel): branch must be a CPU tensor, got ",
              branch.device());
  FwdPlan plan = plan_fwd(residual, branch, scale, gamma, channel_dim, out_dtype);
  if (plan.geo.empty()) return plan.out;

  if (plan.out.scalar_type() == at::kDouble) {  // then every data tensor is float64
    fwd_cpu<double, double, double, double>(plan, branch);
    return plan.out;
  }
  const at::ScalarType residual_type = residual.has_value() ? residual->scalar_type() : plan.out.scalar_type();
  dispatch_compute(plan.compute, [&](auto acc_tag) {
    dispatch_reduced_or_float(plan.out.scalar_type(), [&](auto out_tag) {
      dispatch_reduced_or_float(branch.scalar_type(), [&](auto branch_tag) {
        dispatch_reduced_or_float(residual_type, [&](auto residual_tag) {
          fwd_cpu<typename decltype(out_tag)::type, typename decltype(branch_tag)::type,
                  typename decltype(residual_tag)::type, typename decltype(acc_tag)::type>(plan, branch);
        });
      });
    });
  });
  return plan.out;
}

std::tuple<at::Tensor, at::Tensor> drop_path_add_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& branch,
                                                         const c10::optional<at::Tensor>& scale,
                                                         const at::Tensor& gamma, int64_t channel_dim,
                                                         bool need_grad_branch) {
  TORCH_CHECK(branch.device().is_cpu(), "drop_path_add_bwd (CPU kernel): branch must be a CPU tensor, got ",
              branch.device());
  BwdPlan plan = plan_bwd(grad_out, branch, scale, gamma, channel_dim, need_grad_branch);
  at::Tensor grad_gamma_acc = at::zeros({plan.geo.channels}, gamma.options().dtype(plan.compute));
  if (!plan.geo.empty()) {
    auto run = [&](auto grad_tag, auto branch_tag, auto acc_tag) {
      bwd_cpu<typename decltype(grad_tag)::type, typename decltype(branch_tag)::type,
              typename decltype(acc_tag)::type>(plan, grad_out, branch, need_grad_branch, grad_gamma_acc);
    };
    if (branch.scalar_type() == at::kDouble) {  // then grad_out is float64 too
      run(TypeTag<double>{}, TypeTag<double>{}, TypeTag<double>{});
    } else {
      dispatch_compute(plan.compute, [&](auto acc_tag) {
        dispatch_reduced_or_float(grad_out.scalar_type(), [&](auto grad_tag) {
          dispatch_reduced_or_float(branch.scalar_type(), [&](auto branch_tag) { run(grad_tag, branch_tag, acc_tag); });
        });
      });
    }
  }
  return std::make_tuple(plan.grad_branch, grad_gamma_acc.to(gamma.scalar_type()));
}

}  // namespace
}  // namespace drop_path
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("drop_path_add_fwd", &pykernels::drop_path::drop_path_add_fwd_cpu);
  m.impl("drop_path_add_bwd", &pykernels::drop_path::drop_path_add_bwd_cpu);
}
