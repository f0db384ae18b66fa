// Host-side argument checking and geometry of pykernels::drop_path_add_{fwd,bwd}, shared by the CPU kernels
// (csrc/cpu/drop_path.cpp) and the CUDA kernels (csrc/cuda/drop_path.cu) so that both accept and reject exactly
// the same calls, with the same messages.
//
// Memory model. B = branch.size(0) samples; every data tensor t (out, branch, residual, grad_out, grad_branch)
// holds sample b as one dense row of R = numel / B elements at t_ptr + b * t.stride(0) + r, r in [0, R), laid out
// in out's (grad_out's) memory order: dims 1.. of every data tensor share out's strides (size-1 dims ignored), and
// only the batch stride may differ (x[:, 1:] token views, batch slices). With C = branch.size(channel_dim) and
// CS = out.stride(channel_dim), a row is O = R / (C * CS) repetitions of [C channels][CS elements each], so the
// channel of offset r is (r / CS) % C: CS == 1 for channels-last images and (B, N, C) tokens, CS == H * W for NCHW.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace pykernels {
namespace drop_path {

// Row geometry (see the comment on top). Without gamma, or with C == 1, the whole row is one run: C = 1, CS = R.
struct Geometry {
  int64_t batch = 0;           // B
  int64_t row_numel = 0;       // R: elements of one sample
  int64_t channels = 1;        // C: length of gamma
  int64_t channel_stride = 0;  // CS: elements between consecutive channels (length of a constant-gamma run)
  int64_t outer = 1;           // O = R / (C * CS)

  bool empty() const { return batch == 0 || row_numel == 0; }
  // Channels innermost (channels-last, tokens): gamma varies along the row with period C.
  bool channels_inner() const { return channels > 1 && channel_stride == 1; }
};

inline bool is_reduced_or_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

// Data tensors (branch / residual / out, grad_out / branch / grad_branch) are each float16, bfloat16 or float32 in
// any combination, or all float64.
inline void check_data_dtypes(const char* op, const std::vector<std::pair<const char*, at::ScalarType>>& tensors) {
  bool any_double = false;
  bool all_double = true;
  for (const auto& named : tensors) {
    any_double |= named.second == at::kDouble;
    all_double &= named.second == at::kDouble;
  }
  const bool ok = any_double ? all_double : std::all_of(tensors.begin(), tensors.end(), [](const auto& named) {
    return is_reduced_or_float(named.second);
  });
  if (ok) return;  // the message is built only when it is raised (this check runs on every call)
  std::string found;
  for (const auto& named : tensors) {
    found += std::string(found.empty() ? "" : ", ") + named.first + "=" + c10::toString(named.second);
  }
  TORCH_CHECK(false, op, ": unsupported dtypes (", found,
              "): supported are float16, bfloat16 and float32 in any combination, or all float64");
}

// Asserts that dims 1.. of t (size-1 dims ignored) tile a dense block, i.e. row r of sample b is at
// t_ptr + b * t.stride(0) + r.
inline void check_dense_rows(const char* op, const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  std::vector<std::pair<int64_t, int64_t>> stride_size;
  for (int64_t d = 1; d < t.dim(); ++d) {
    if (t.size(d) > 1) stride_size.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(stride_size.begin(), stride_size.end());
  int64_t expected = 1;
  for (const auto& ss : stride_size) {
    TORCH_CHECK(ss.first == expected, op, ": ", name, " (sizes ", t.sizes(), ", strides ", t.strides(),
                ") must be dense on every dim but 0 (call .contiguous() or keep a dense memory format)");
    expected *= ss.second;
  }
}

// Asserts that t has ref's strides on dims 1.. (size-1 dims ignored): only the batch stride may differ.
inline void check_same_row_layout(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                                  const char* ref_name) {
  for (int64_t d = 1; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) == ref.stride(d), op, ": ", name, " (sizes ", t.sizes(), ", strides ",
                t.strides(), ") must have the strides of ", ref_name, " (", ref.strides(),
                ") on every dim but 0; only the batch stride may differ");
  }
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but branch is on ", ref.device(),
              "; all tensors must be on the same device");
}

inline void check_float_vector(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must have a floating-point dtype, got ",
              t.scalar_type());
}

// Geometry of `layout` (out or grad_out: dense rows) for a branch of the same shape; channel_dim only matters when
// with_gamma.
inline Geometry make_geometry(const char* op, const at::Tensor& layout, bool with_gamma, int64_t channel_dim) {
  TORCH_CHECK(layout.dim() >= 1, op, ": branch must have a batch dim, got a 0-d tensor");
  Geometry geo;
  geo.batch = layout.size(0);
  geo.row_numel = geo.batch == 0 ? 0 : layout.numel() / geo.batch;
  if (with_gamma) {
    TORCH_CHECK(channel_dim >= 1 && channel_dim < layout.dim(), op, ": channel_dim must be in [1, ", layout.dim(),
                ") for a branch of shape ", layout.sizes(), ", got ", channel_dim);
    geo.channels = layout.size(channel_dim);
  }
  if (geo.empty()) return geo;
  if (geo.channels > 1) {
    geo.channel_stride = layout.stride(channel_dim);
    geo.outer = geo.row_numel / (geo.channels * geo.channel_stride);
  } else {
    geo.channels = 1;
    geo.channel_stride = geo.row_numel;
    geo.outer = 1;
  }
  return geo;
}

inline void check_scale_gamma(const char* op, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& gamma, const at::Tensor& branch, int64_t channel_dim) {
  if (scale.has_value()) {
    check_same_device(op, *scale, "scale", branch);
    check_float_vector(op, *scale, "scale");
    TORCH_CHECK(scale->dim() == 1 && scale->numel() == branch.size(0), op, ": scale must have shape (B,) = (",
                branch.size(0), ",), got ", scale->sizes());
  }
  if (gamma.has_value()) {
    check_same_device(op, *gamma, "gamma", branch);
    check_float_vector(op, *gamma, "gamma");
    TORCH_CHECK(channel_dim >= 1 && channel_dim < branch.dim(), op, ": channel_dim must be in [1, ", branch.dim(),
                ") for a branch of shape ", branch.sizes(), ", got ", channel_dim);
    TORCH_CHECK(gamma->numel() == branch.size(channel_dim), op, ": gamma must have branch.size(channel_dim) = ",
                branch.size(channel_dim), " elements, got shape ", gamma->sizes());
  }
}

// scale / gamma in the compute dtype, flat and contiguous (they are tiny); undefined when absent.
inline at::Tensor flat_in(const c10::optional<at::Tensor>& t, at::ScalarType compute) {
  if (!t.has_value()) return at::Tensor();
  if (t->dim() == 1 && t->scalar_type() == compute && t->is_contiguous()) return *t;  // as it comes: no op to call
  return t->reshape(-1).to(compute).contiguous();
}

// Calls f(TypeTag<T>{}) with T the C++ type of a float16 / bfloat16 / float32 data tensor.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
inline void dispatch_reduced_or_float(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kHalf:
      return f(TypeTag<c10::Half>{});
    case at::kBFloat16:
      return f(TypeTag<c10::BFloat16>{});
    case at::kFloat:
      return f(TypeTag<float>{});
    default:
      TORCH_CHECK(false, "drop_path: unexpected dtype ", t);
  }
}

// Calls f(TypeTag<float>{}) or f(TypeTag<double>{}) for the compute dtype.
template <typename F>
inline void dispatch_compute(at::ScalarType t, const F& f) {
  if (t == at::kDouble) return f(TypeTag<double>{});
  return f(TypeTag<float>{});
}

// ---- drop_path_add_fwd ------------------------------------------------------------------------------------------
struct FwdPlan {
  at::Tensor out;            // empty_like(branch, out_dtype)
  at::Tensor residual;       // undefined when absent
  at::Tensor scale;          // (B,) in compute dtype, undefined when absent
  at::Tensor gamma;          // (C,) in compute dtype, undefined when absent
  at::ScalarType compute;    // kFloat, or kDouble when the output or any input is float64
  Geometry geo;
};

inline FwdPlan plan_fwd(const c10::optional<at::Tensor>& residual, const at::Tensor& branch,
                        const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& gamma,
                        int64_t channel_dim, c10::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "drop_path_add_fwd";
  TORCH_CHECK(branch.dim() >= 1, op, ": branch must have a batch dim, got a 0-d tensor");
  if (residual.has_value()) {
    check_same_device(op, *residual, "residual", branch);
    TORCH_CHECK(residual->sizes() == branch.sizes(), op, ": residual must have branch's shape ", branch.sizes(),
                ", got ", residual->sizes());
  }
  check_scale_gamma(op, scale, gamma, branch, channel_dim);

  at::ScalarType out_type = branch.scalar_type();
  if (gamma.has_value()) out_type = at::promote_types(out_type, gamma->scalar_type());
  if (residual.has_value()) out_type = at::promote_types(out_type, residual->scalar_type());
  if (out_dtype.has_value()) out_type = *out_dtype;
  std::vector<std::pair<const char*, at::ScalarType>> data = {{"branch", branch.scalar_type()}, {"out", out_type}};
  if (residual.has_value()) data.emplace_back("residual", residual->scalar_type());
  check_data_dtypes(op, data);

  bool any_double = out_type == at::kDouble || branch.scalar_type() == at::kDouble ||
                    (residual.has_value() && residual->scalar_type() == at::kDouble) ||
                    (scale.has_value() && scale->scalar_type() == at::kDouble) ||
                    (gamma.has_value() && gamma->scalar_type() == at::kDouble);
  FwdPlan plan;
  plan.compute = any_double ? at::kDouble : at::kFloat;
  plan.out = at::empty_like(branch, branch.options().dtype(out_type));
  plan.geo = make_geometry(op, plan.out, gamma.has_value(), channel_dim);
  if (plan.geo.empty()) return plan;

  check_dense_rows(op, plan.out, "out = empty_like(branch)");
  check_same_row_layout(op, branch, "branch", plan.out, "out = empty_like(branch)");
  if (residual.has_value()) {
    check_same_row_layout(op, *residual, "residual", plan.out, "out = empty_like(branch)");
    plan.residual = *residual;
  }
  plan.scale = flat_in(scale, plan.compute);
  plan.gamma = flat_in(gamma, plan.compute);
  return plan;
}

// ---- drop_path_add_bwd ------------------------------------------------------------------------------------------
struct BwdPlan {
  at::Tensor grad_branch;  // empty_like(grad_out, branch.dtype), or empty (0,) when !need_grad_branch
  at::Tensor scale;        // (B,) in compute dtype, undefined when absent
  at::Tensor gamma;        // (C,) in compute dtype
  at::ScalarType compute;  // kFloat, or kDouble when any input is float64
  Geometry geo;
};

inline BwdPlan plan_bwd(const at::Tensor& grad_out, const at::Tensor& branch, const c10::optional<at::Tensor>& scale,
                        const at::Tensor& gamma, int64_t channel_dim, bool need_grad_branch) {
  constexpr const char* op = "drop_path_add_bwd";
  TORCH_CHECK(branch.dim() >= 1, op, ": branch must have a batch dim, got a 0-d tensor");
  check_same_device(op, grad_out, "grad_out", branch);
  TORCH_CHECK(grad_out.sizes() == branch.sizes(), op, ": grad_out must have branch's shape ", branch.sizes(), ", got ",
              grad_out.sizes());
  check_scale_gamma(op, scale, gamma, branch, channel_dim);
  check_data_dtypes(op, {{"grad_out", grad_out.scalar_type()}, {"branch", branch.scalar_type()}});

  bool any_double = grad_out.scalar_type() == at::kDouble || branch.scalar_type() == at::kDouble ||
                    gamma.scalar_type() == at::kDouble ||
                    (scale.has_value() && scale->scalar_type() == at::kDouble);
  BwdPlan plan;
  plan.compute = any_double ? at::kDouble : at::kFloat;
  plan.grad_branch = need_grad_branch ? at::empty_like(grad_out, grad_out.options().dtype(branch.scalar_type()))
                                      : at::empty({0}, branch.options());
  plan.geo = make_geometry(op, grad_out, true, channel_dim);
  if (plan.geo.empty()) return plan;

  check_dense_rows(op, grad_out, "grad_out");
  check_same_row_layout(op, branch, "branch", grad_out, "grad_out");
  if (need_grad_branch) {
    check_same_row_layout(op, plan.grad_branch, "grad_branch = empty_like(grad_out)", grad_out, "grad_out");
  }
  plan.scale = flat_in(scale, plan.compute);
  plan.gamma = flat_in(gamma, plan.compute);
  return plan;
}

}  // namespace drop_path
}  // namespace pykernels
