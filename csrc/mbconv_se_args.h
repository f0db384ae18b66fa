// Host-side argument checking, geometry and output allocation of pykernels::mbconv_se_{fwd,bwd} (the depthwise stage
// of an MBConv block with the SE squeeze: depthwise k x k conv -> BatchNorm -> activation, plus per-(b, c) sums),
// shared by the CPU kernels (csrc/cpu/mbconv_se.cpp) and the CUDA kernels (csrc/cuda/mbconv_se.cu), so that both
// accept and reject exactly the same calls, with the same messages, and return exactly the layouts stated in
// csrc/ops.cpp.
//
// The argument rules are pykernels/ops/mbconv_se.py's check_args, in the same order and with the same messages (after
// this op's "mbconv_se_fwd: " prefix); tests/test_mbconv_se.py::test_compiled_and_python_rules_agree proves it.
// Layout rules (contiguity) are the compiled side's own: the Python op hands over contiguous tensors.
//
// Host-only code (no CUDA headers): it compiles with g++, nvcc and the CUDA emulator of tests/cuda_emu.
//
// Memory model. x is (B, C, H, W), dense in one of two memory formats:
//   NCHW-contiguous:          x[b, c, h, w] at b * C*H*W + c * H*W + h * W + w
//   channels_last-contiguous: x[b, c, h, w] at b * H*W*C + (h * W + w) * C + c
// Geometry holds the canonical strides of the format it picked (when both formats describe x - C == 1, or
// H == W == 1 - the channels-last one). grad_x = empty_like(x) has x's strides, so it is addressed the same way.
// out and grad_out are (B, out_h, out_w, C) contiguous; pooled and grad_pooled (B, C) contiguous.
// Output pixel (i, j) reads input rows i * stride - pad_t + u and columns j * stride - pad_l + v, u, v in [0, k);
// rows / columns outside [0, H) x [0, W) are zero.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace pykernels {
namespace mbconv_se {

enum class Act : int { kNone = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kHardswish = 4 };

struct Geometry {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // C
  int64_t height = 0;    // H
  int64_t width = 0;     // W
  int64_t kernel = 0;    // k (3, 5 or 7)
  int64_t stride = 1;    // 1 or 2
  int64_t pad_t = 0;     // in [0, k)
  int64_t pad_l = 0;     // in [0, k)
  int64_t out_h = 0;     // >= 1
  int64_t out_w = 0;     // >= 1
  // Canonical element strides of x (and grad_x) in the picked memory format.
  int64_t x_stride_b = 0;
  int64_t x_stride_c = 0;
  int64_t x_stride_h = 0;
  int64_t x_stride_w = 0;
  bool channels_last = false;  // true: x is channels_last-contiguous (x_stride_c == 1)
  Act act = Act::kNone;
  bool batch_stats = false;

  int64_t out_pixels() const { return batch * out_h * out_w; }  // rows of out / grad_out; N of the batch statistics
  bool empty() const { return batch == 0; }
};

// Accumulation dtype: float64 for float64 x, float32 otherwise. pooled and the statistics are stored in it.
inline at::ScalarType compute_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_reduced_or_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

// torch's Python name of a dtype ("float32"), so that messages read as pykernels/ops/mbconv_se.py's.
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
    default: return c10::toString(t);
  }
}

inline Act parse_act(const char* op, c10::string_view act) {
  if (act == "none") return Act::kNone;
  if (act == "relu") return Act::kRelu;
  if (act == "relu6") return Act::kRelu6;
  if (act == "silu") return Act::kSilu;
  if (act == "hardswish") return Act::kHardswish;
  TORCH_CHECK(false, op, ": activation '", std::string(act),
              "' not supported: mbconv_se takes none, relu, relu6, silu, hardswish");
  return Act::kNone;
}

inline void check_param(const char* op, const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                        bool vector) {
  if (!t.has_value()) return;
  if (vector) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must have shape (C,) = (", x.size(1),
                ",), got ", t->sizes());
  }
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device(),
              "; put them on one device");
  const at::ScalarType xt = x.scalar_type(), pt = t->scalar_type();
  TORCH_CHECK(pt == xt || (pt == at::kFloat && xt != at::kDouble), op, ": ", name, " is ", dtype_name(pt),
              " but x is ", dtype_name(xt), ": each parameter must be x's dtype or float32 (float64 x needs float64 ",
              "parameters)");
}

// ---- mbconv_se_fwd ----------------------------------------------------------------------------------------------
// allow_double: the backend supports float64 x (the CPU one does).
inline Geometry check_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& bn_weight,
                               const c10::optional<at::Tensor>& bn_bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, double eps, int64_t stride,
                               int64_t pad_t, int64_t pad_l, int64_t out_h, int64_t out_w, c10::string_view act,
                               bool batch_stats, bool allow_double, const char* op = "mbconv_se_fwd") {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (B, C, H, W) tensor (NCHW or channels_last), got shape ",
              x.sizes());
  TORCH_CHECK(is_reduced_or_float(x.scalar_type()) || (allow_double && x.scalar_type() == at::kDouble), op,
              ": x must be float16, bfloat16, float32", allow_double ? " or float64" : " (float64 only on the CPU)",
              ", got ", dtype_name(x.scalar_type()));
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op, ": x must have C, H, W >= 1, got shape ",
              x.sizes());
  const int64_t channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3), op,
              ": weight must be a depthwise conv weight of shape (C, 1, k, k) (nn.Conv2d(C, C, k, groups=C).weight), "
              "got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) == channels, op, ": weight has ", weight.size(0), " channels but x has C = ", channels,
              " (x.shape[1])");
  const int64_t k = weight.size(2);
  TORCH_CHECK(k == 3 || k == 5 || k == 7, op, ": kernel size ", k,
              " not supported: mbconv_se takes k in {3, 5, 7} (square, dilation 1)");
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride ", stride,
              " not supported: mbconv_se takes stride 1 or 2 (the same along H and W)");
  Geometry geo;
  geo.act = parse_act(op, act);
  const int64_t sizes[2] = {x.size(2), x.size(3)};
  const int64_t pads[2] = {pad_t, pad_l};
  const int64_t outs[2] = {out_h, out_w};
  const char* names[2] = {"top", "left"};
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(pads[d] >= 0 && pads[d] < k, op, ": padding ", names[d], " = ", pads[d], " must be in [0, k) = [0, ",
                k, ")");
    TORCH_CHECK(outs[d] >= 1 && (outs[d] - 1) * stride - pads[d] < sizes[d], op, ": output size ", outs[d],
                " along ", d == 0 ? "H" : "W", " does not fit the input (", sizes[d], ") with stride ", stride,
                " and padding ", names[d], " ", pads[d], ": every output window must start inside the image");
  }
  check_param(op, weight, "weight", x, /*vector=*/false);
  check_param(op, conv_bias, "conv_bias", x, true);
  check_param(op, bn_weight, "bn_weight", x, true);
  check_param(op, bn_bias, "bn_bias", x, true);
  check_param(op, running_mean, "running_mean", x, true);
  check_param(op, running_var, "running_var", x, true);
  TORCH_CHECK(batch_stats || (running_mean.has_value() && running_var.has_value()), op,
              ": running_mean and running_var are needed unless batch_stats=True (BatchNorm in training)");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);  // ostream's default format: Python's {:g}
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": x (sizes ", x.sizes(),
              ", strides ", x.strides(),
              ") must be NCHW-contiguous or channels_last-contiguous (call .contiguous() or "
              ".contiguous(memory_format=torch.channels_last))");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (strides ", weight.strides(), ") must be contiguous");

  geo.batch = x.size(0);
  geo.channels = channels;
  geo.height = x.size(2);
  geo.width = x.size(3);
  geo.kernel = k;
  geo.stride = stride;
  geo.pad_t = pad_t;
  geo.pad_l = pad_l;
  geo.out_h = out_h;
  geo.out_w = out_w;
  geo.batch_stats = batch_stats;
  geo.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t hw = geo.height * geo.width;
  geo.x_stride_b = channels * hw;
  if (geo.channels_last) {
    geo.x_stride_c = 1;
    geo.x_stride_h = geo.width * channels;
    geo.x_stride_w = channels;
  } else {
    geo.x_stride_c = hw;
    geo.x_stride_h = geo.width;
    geo.x_stride_w = 1;
  }
  return geo;
}

struct FwdOutputs {
  at::Tensor out;     // (B, out_h, out_w, C) contiguous, x's dtype
  at::Tensor pooled;  // (B, C) contiguous, compute_dtype(x)
  at::Tensor mean;    // (C,) compute_dtype(x) when batch_stats, else (0,)
  at::Tensor var;     // (C,) compute_dtype(x) when batch_stats, else (0,)
};

inline FwdOutputs alloc_fwd(const at::Tensor& x, const Geometry& geo) {
  FwdOutputs o;
  o.out = at::empty({geo.batch, geo.out_h, geo.out_w, geo.channels}, x.options());
  const auto stats = x.options().dtype(compute_dtype(x.scalar_type()));
  o.pooled = at::empty({geo.batch, geo.channels}, stats);
  o.mean = at::empty({geo.batch_stats ? geo.channels : 0}, stats);
  o.var = at::empty({geo.batch_stats ? geo.channels : 0}, stats);
  return o;
}

// ---- mbconv_se_bwd ----------------------------------------------------------------------------------------------
// grad_out (B, out_h, out_w, C) contiguous, float16 / bfloat16 / float32 (float64 when x is float64); grad_pooled
// (B, C) compute_dtype(x) or None; mean, var (C,) any float dtype: the statistics the forward used.
inline Geometry check_bwd_args(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pooled,
                               const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& bn_weight,
                               const c10::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                               double eps, int64_t stride, int64_t pad_t, int64_t pad_l, c10::string_view act,
                               bool batch_stats, bool allow_double) {
  constexpr const char* op = "mbconv_se_bwd";
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be (B, out_h, out_w, C), got shape ", grad_out.sizes());
  const Geometry geo = check_fwd_args(x, weight, conv_bias, bn_weight, bn_bias, mean, var, eps, stride, pad_t, pad_l,
                                      grad_out.size(1), grad_out.size(2), act, batch_stats, allow_double, op);
  TORCH_CHECK(grad_out.size(0) == geo.batch && grad_out.size(3) == geo.channels, op,
              ": grad_out must have shape (B, out_h, out_w, C) with B = ", geo.batch, ", C = ", geo.channels,
              ", got ", grad_out.sizes());
  const bool x_double = x.scalar_type() == at::kDouble;
  TORCH_CHECK(x_double ? grad_out.scalar_type() == at::kDouble : is_reduced_or_float(grad_out.scalar_type()), op,
              ": unsupported grad_out dtype ", dtype_name(grad_out.scalar_type()), " for x of dtype ",
              dtype_name(x.scalar_type()));
  TORCH_CHECK(grad_out.is_contiguous(), op, ": grad_out (strides ", grad_out.strides(), ") must be contiguous");
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ",
              x.device());
  if (grad_pooled.has_value()) {
    TORCH_CHECK(grad_pooled->dim() == 2 && grad_pooled->size(0) == geo.batch && grad_pooled->size(1) == geo.channels,
                op, ": grad_pooled must have shape (B, C) = (", geo.batch, ", ", geo.channels, "), got ",
                grad_pooled->sizes());
    TORCH_CHECK(grad_pooled->scalar_type() == compute_dtype(x.scalar_type()) && grad_pooled->is_contiguous(), op,
                ": grad_pooled must be a contiguous ", dtype_name(compute_dtype(x.scalar_type())), " tensor");
    TORCH_CHECK(grad_pooled->device() == x.device(), op, ": grad_pooled is on ", grad_pooled->device(),
                " but x is on ", x.device());
  }
  return geo;
}

struct BwdOutputs {
  at::Tensor grad_x;          // empty_like(x) (x's layout and dtype), or (0,) in x's dtype when !need_grad_x
  at::Tensor grad_weight;     // (C, 1, k, k) contiguous in weight's dtype, or (0,) when !need_grad_params
  at::Tensor grad_conv_bias;  // (C,) in conv_bias' dtype, or (0,) when conv_bias is None or !need_grad_params
  at::Tensor grad_bn_weight;  // (C,) in bn_weight's dtype, or (0,) when bn_weight is None or !need_grad_params
  at::Tensor grad_bn_bias;    // (C,) in bn_bias' dtype, or (0,) when bn_bias is None or !need_grad_params
  bool want_weight = false, want_conv_bias = false, want_bn_weight = false, want_bn_bias = false;
};

// The (0,) placeholders are in x's dtype (as the torch backend, reference/mbconv_se.py, returns them); a fresh one per
// placeholder: op outputs must not alias each other (opcheck).
inline BwdOutputs alloc_bwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias,
                            const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                            bool need_grad_x, bool need_grad_params) {
  BwdOutputs o;
  const auto empty = [&x] { return at::empty({0}, x.options()); };
  o.grad_x = need_grad_x ? at::empty_like(x) : empty();
  o.want_weight = need_grad_params;
  o.want_conv_bias = need_grad_params && conv_bias.has_value();
  o.want_bn_weight = need_grad_params && bn_weight.has_value();
  o.want_bn_bias = need_grad_params && bn_bias.has_value();
  o.grad_weight = o.want_weight ? at::empty(weight.sizes(), weight.options()) : empty();
  o.grad_conv_bias = o.want_conv_bias ? at::empty({x.size(1)}, conv_bias->options()) : empty();
  o.grad_bn_weight = o.want_bn_weight ? at::empty({x.size(1)}, bn_weight->options()) : empty();
  o.grad_bn_bias = o.want_bn_bias ? at::empty({x.size(1)}, bn_bias->options()) : empty();
  return o;
}

// A (C,) parameter converted to `compute` and made contiguous; `fill` values when absent (e.g. bn_weight: 1).
inline at::Tensor param_or(const c10::optional<at::Tensor>& t, int64_t channels, at::ScalarType compute,
                           const at::Tensor& like, double fill) {
  if (t.has_value()) return t->reshape(-1).to(compute).contiguous();
  return at::full({channels}, fill, like.options().dtype(compute));
}

}  // namespace mbconv_se
}  // namespace pykernels
