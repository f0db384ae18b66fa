// Host-side argument checking, geometry and output allocation of pykernels::dwconv_ln_{fwd,bwd} (depthwise k x k
// conv + LayerNorm over channels, ConvNeXt's block front; Liu et al. 2022, "A ConvNet for the 2020s"), shared by the
// CPU kernels (csrc/cpu/dwconv_ln.cpp) and the CUDA kernels (csrc/cuda/dwconv_ln.cu) so that both accept and reject
// exactly the same calls, with the same messages, and return exactly the layouts stated in csrc/ops.cpp.
//
// Host-only code (no CUDA headers): it compiles with g++, nvcc and the CUDA emulator of tests/cuda_emu.
//
// Memory model. x is (B, C, H, W), dense in one of two memory formats:
//   NCHW-contiguous:          x[b, c, h, w] at b * C*H*W + c * H*W + h * W + w
//   channels_last-contiguous: x[b, c, h, w] at b * H*W*C + (h * W + w) * C + c
// Geometry holds the canonical strides of the format it picked (size-1 dims may carry any stride in the tensor; the
// canonical ones address the same elements). When both formats describe x (C == 1, or H == W == 1) the channels-last
// one is picked. grad_x = empty_like(x) has x's strides, so it is addressed with the same Geometry strides.
// out and grad_out are (B, H, W, C) contiguous; mean and rstd are (B, H, W) (kernels read them via .contiguous()).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace pykernels {
namespace dwconv_ln {

constexpr int64_t kMinKernel = 3;
constexpr int64_t kMaxKernel = 13;

struct Geometry {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // C
  int64_t height = 0;    // H
  int64_t width = 0;     // W
  int64_t kernel = 0;    // k (odd, 3..13)
  int64_t pad = 0;       // k / 2
  // Canonical element strides of x (and grad_x) in the picked memory format.
  int64_t x_stride_b = 0;
  int64_t x_stride_c = 0;
  int64_t x_stride_h = 0;
  int64_t x_stride_w = 0;
  bool channels_last = false;  // true: x is channels_last-contiguous (x_stride_c == 1)

  int64_t pixels() const { return batch * height * width; }  // B * H * W: rows of out / grad_out
  bool empty() const { return batch == 0 || height == 0 || width == 0; }
};

// Accumulation dtype: float64 for float64 x, float32 otherwise. mean / rstd are stored in it.
inline at::ScalarType compute_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_reduced_or_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

// torch's Python name of a dtype ("float32"), so that messages read as pykernels/ops/dwconv_ln.py's.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

// The argument rules below are pykernels/ops/dwconv_ln.py's check_args, in the same order and with the same
// messages (after this op's "dwconv_ln_fwd: " prefix): tests/test_dwconv_ln.py::test_compiled_and_python_rules_agree
// proves it. Layout rules (contiguity) are the compiled side's own: the Python op hands over contiguous tensors.

inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; put them on one device");
}

// x: 4-d, float16 / bfloat16 / float32 (and float64 when allow_double), at least one channel, NCHW- or
// channels_last-contiguous.
inline void check_x(const char* op, const at::Tensor& x, bool allow_double) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (B, C, H, W) tensor (NCHW or channels_last), got shape ",
              x.sizes());
  TORCH_CHECK(is_reduced_or_float(x.scalar_type()) || (allow_double && x.scalar_type() == at::kDouble), op,
              ": x must be float16, bfloat16, float32", allow_double ? " or float64" : " (float64 only on the CPU)",
              ", got ", dtype_name(x.scalar_type()));
  TORCH_CHECK(x.size(1) >= 1, op, ": x has 0 channels: LayerNorm over channels needs C >= 1");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op,
              ": x must have H, W >= 1 (a convolution over an empty image), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": x (sizes ", x.sizes(),
              ", strides ", x.strides(),
              ") must be NCHW-contiguous or channels_last-contiguous (call .contiguous() or "
              ".contiguous(memory_format=torch.channels_last))");
}

// Each parameter is x's dtype or float32; float64 x takes float64 parameters.
inline void check_param_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  const at::ScalarType xt = x.scalar_type();
  const bool ok = t.scalar_type() == xt || (t.scalar_type() == at::kFloat && xt != at::kDouble);
  TORCH_CHECK(ok, op, ": ", name, " is ", dtype_name(t.scalar_type()), " but x is ", dtype_name(xt),
              ": each parameter must be x's dtype or float32 (float32 parameters with bfloat16 / float16 "
              "activations; float64 x needs float64 parameters); cast one of them");
}

// weight (C, 1, k, k) contiguous, k odd in 3..13.
inline void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3), op,
              ": weight must be a depthwise conv weight of shape (C, 1, k, k) (nn.Conv2d(C, C, k, groups=C).weight), "
              "got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) == channels, op, ": weight has ", weight.size(0), " channels but x has C = ", channels,
              " (x.shape[1]); a depthwise conv weight is (C, 1, k, k)");
  const int64_t k = weight.size(2);
  TORCH_CHECK(k % 2 == 1 && k >= kMinKernel && k <= kMaxKernel, op, ": kernel size ", k,
              " not supported: dwconv_ln takes odd k from 3 to 13 (3, 5, 7, 9, 11, 13; stride 1, 'same' zero padding "
              "k // 2)");
  check_same_device(op, weight, "weight", x);
  check_param_dtype(op, weight, "weight", x);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (strides ", weight.strides(), ") must be contiguous");
}

inline void check_vector_param(const char* op, const c10::optional<at::Tensor>& t, const char* name,
                               const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must have shape (C,) = (", x.size(1),
              ",), got ", t->sizes());
  check_same_device(op, *t, name, x);
  check_param_dtype(op, *t, name, x);
}

inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight) {
  Geometry geo;
  geo.batch = x.size(0);
  geo.channels = x.size(1);
  geo.height = x.size(2);
  geo.width = x.size(3);
  geo.kernel = weight.size(2);
  geo.pad = geo.kernel / 2;
  geo.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t hw = geo.height * geo.width;
  geo.x_stride_b = geo.channels * hw;
  if (geo.channels_last) {
    geo.x_stride_c = 1;
    geo.x_stride_h = geo.width * geo.channels;
    geo.x_stride_w = geo.channels;
  } else {
    geo.x_stride_c = hw;
    geo.x_stride_h = geo.width;
    geo.x_stride_w = 1;
  }
  return geo;
}

// ---- dwconv_ln_fwd ----------------------------------------------------------------------------------------------
// allow_double: the backend supports float64 x (the CPU one does).
inline Geometry check_fwd_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias,
                               const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                               double eps, bool allow_double) {
  constexpr const char* op = "dwconv_ln_fwd";
  check_x(op, x, allow_double);
  check_weight(op, weight, x);
  check_vector_param(op, conv_bias, "conv_bias", x);
  check_vector_param(op, ln_weight, "ln_weight", x);
  check_vector_param(op, ln_bias, "ln_bias", x);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);  // ostream's default format: Python's {:g}
  return make_geometry(x, weight);
}

struct FwdOutputs {
  at::Tensor out;   // (B, H, W, C) contiguous, x's dtype
  at::Tensor mean;  // (B, H, W) contiguous, compute_dtype(x)
  at::Tensor rstd;  // (B, H, W) contiguous, compute_dtype(x)
};

inline FwdOutputs alloc_fwd(const at::Tensor& x, const Geometry& geo) {
  FwdOutputs o;
  o.out = at::empty({geo.batch, geo.height, geo.width, geo.channels}, x.options());
  const auto stats = x.options().dtype(compute_dtype(x.scalar_type()));
  o.mean = at::empty({geo.batch, geo.height, geo.width}, stats);
  o.rstd = at::empty({geo.batch, geo.height, geo.width}, stats);
  return o;
}

// ---- dwconv_ln_bwd ----------------------------------------------------------------------------------------------
// grad_out (B, H, W, C) contiguous, float16 / bfloat16 / float32 (float64 when x is float64); mean, rstd (B, H, W)
// in compute_dtype(x) (any strides).
inline Geometry check_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& ln_weight,
                               const c10::optional<at::Tensor>& ln_bias, const at::Tensor& mean, const at::Tensor& rstd,
                               bool allow_double) {
  constexpr const char* op = "dwconv_ln_bwd";
  check_x(op, x, allow_double);
  check_weight(op, weight, x);
  check_vector_param(op, conv_bias, "conv_bias", x);
  check_vector_param(op, ln_weight, "ln_weight", x);
  check_vector_param(op, ln_bias, "ln_bias", x);
  check_same_device(op, grad_out, "grad_out", x);
  check_same_device(op, mean, "mean", x);
  check_same_device(op, rstd, "rstd", x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == H && grad_out.size(2) == W &&
                  grad_out.size(3) == C,
              op, ": grad_out must have shape (B, H, W, C) = (", B, ", ", H, ", ", W, ", ", C, "), got ",
              grad_out.sizes());
  const bool x_double = x.scalar_type() == at::kDouble;
  TORCH_CHECK(x_double ? grad_out.scalar_type() == at::kDouble : is_reduced_or_float(grad_out.scalar_type()), op,
              ": unsupported grad_out dtype ", grad_out.scalar_type(), " for x of dtype ", x.scalar_type(),
              x_double ? "; float64 x needs float64 grad_out" : "; supported are float16, bfloat16 and float32");
  TORCH_CHECK(grad_out.is_contiguous(), op, ": grad_out (strides ", grad_out.strides(),
              ") must be contiguous (B, H, W, C) (call .contiguous())");
  const at::ScalarType stats = compute_dtype(x.scalar_type());
  for (const auto& named : {std::make_pair("mean", &mean), std::make_pair("rstd", &rstd)}) {
    const at::Tensor& t = *named.second;
    TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == H && t.size(2) == W, op, ": ", named.first,
                " must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == stats, op, ": ", named.first, " must be ", stats, " (the forward's statistics for x ",
                "of dtype ", x.scalar_type(), "), got ", t.scalar_type());
  }
  return make_geometry(x, weight);
}

struct BwdOutputs {
  at::Tensor grad_x;          // empty_like(x) (x's layout and dtype), or (0,) in x's dtype when !need_grad_x
  at::Tensor grad_weight;     // (C, 1, k, k) contiguous in weight's dtype, or (0,) when !need_grad_params
  at::Tensor grad_conv_bias;  // (C,) in conv_bias' dtype, or (0,) when conv_bias is None or !need_grad_params
  at::Tensor grad_ln_weight;  // (C,) in ln_weight's dtype, or (0,) when ln_weight is None or !need_grad_params
  at::Tensor grad_ln_bias;    // (C,) in ln_bias' dtype, or (0,) when ln_bias is None or !need_grad_params
  // Which parameter grads the kernel must write.
  bool want_weight = false, want_conv_bias = false, want_ln_weight = false, want_ln_bias = false;
};

// The (0,) placeholders are in x's dtype (as the torch backend, reference.dwconv_ln_bwd, returns them).
inline BwdOutputs alloc_bwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias,
                            const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                            bool need_grad_x, bool need_grad_params) {
  BwdOutputs o;
  // a fresh (0,) tensor per placeholder: op outputs must not alias each other (opcheck)
  const auto empty = [&x] { return at::empty({0}, x.options()); };
  o.grad_x = need_grad_x ? at::empty_like(x) : empty();
  o.want_weight = need_grad_params;
  o.want_conv_bias = need_grad_params && conv_bias.has_value();
  o.want_ln_weight = need_grad_params && ln_weight.has_value();
  o.want_ln_bias = need_grad_params && ln_bias.has_value();
  o.grad_weight = o.want_weight ? at::empty(weight.sizes(), weight.options()) : empty();
  o.grad_conv_bias = o.want_conv_bias ? at::empty({x.size(1)}, conv_bias->options()) : empty();
  o.grad_ln_weight = o.want_ln_weight ? at::empty({x.size(1)}, ln_weight->options()) : empty();
  o.grad_ln_bias = o.want_ln_bias ? at::empty({x.size(1)}, ln_bias->options()) : empty();
  return o;
}

// A (C,) parameter (or the flattened weight) converted to `compute` and made contiguous; undefined when absent.
inline at::Tensor param_in(const c10::optional<at::Tensor>& t, at::ScalarType compute) {
  return t.has_value() ? t->reshape(-1).to(compute).contiguous() : at::Tensor();
}

}  // namespace dwconv_ln
}  // namespace pykernels
