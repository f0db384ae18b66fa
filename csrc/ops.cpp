// pykernels._C: the one TORCH_LIBRARY block that defines the schema of every compiled kernel.
//
// The CPU implementations live in csrc/cpu/<stem>.cpp (TORCH_LIBRARY_IMPL(pykernels, CPU)), the CUDA ones in
// csrc/cuda/<stem>.cu (TORCH_LIBRARY_IMPL(pykernels, CUDA)). Fake (meta) kernels and autograd are registered
// from Python (pykernels/ops/<stem>.py); the public, autograd-aware ops (pykernels::drop_path_add, ...) are
// Python custom ops that dispatch to these kernels, to Triton, or to the pure-PyTorch reference.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import pykernels._C` loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pykernels compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pykernels, m) {
  // ---- drop_path -------------------------------------------------------------------------------------------
  // out = residual + (branch * gamma[c]) * scale[b]   (each of residual, scale, gamma optional)
  //   branch   (B, ...) any float dtype; residual: same shape; scale: (B,); gamma: numel == branch.size(channel_dim)
  //   out dtype: out_dtype if given, else promote_types(branch, gamma, residual); layout: empty_like(branch).
  //   residual/branch must share out's strides on every dim but 0 (the Python layer guarantees it).
  m.def(
      "drop_path_add_fwd(Tensor? residual, Tensor branch, Tensor? scale, Tensor? gamma, int channel_dim, "
      "ScalarType? out_dtype=None) -> Tensor");
  // Backward of drop_path_add_fwd when gamma needs a gradient:
  //   grad_branch = (grad_out * gamma[c]) * scale[b]           (branch's dtype; empty (0,) if !need_grad_branch)
  //   grad_gamma[c] = sum_{b, other dims} grad_out * branch * scale[b]   (gamma's dtype, shape (C,))
  m.def(
      "drop_path_add_bwd(Tensor grad_out, Tensor branch, Tensor? scale, Tensor gamma, int channel_dim, "
      "bool need_grad_branch) -> (Tensor, Tensor)");

  // ---- dwconv_ln -------------------------------------------------------------------------------------------
  // out[b, h, w, :] = LayerNorm_C(depthwise_conv_kxk(x)[b, :, h, w] + conv_bias)  (ConvNeXt's dwconv -> norm)
  //   x          (B, C, H, W), NCHW-contiguous or channels_last-contiguous (the Python layer guarantees one of the two)
  //   weight     (C, 1, k, k) contiguous, k odd in 3..13; stride 1, zero "same" padding k / 2
  //   conv_bias, ln_weight, ln_bias: (C,) or None; x dtype float32 / float16 / bfloat16 (cpu also float64);
  //              each parameter either x's dtype or float32
  //   out        (B, H, W, C) contiguous, x's dtype; mean, rstd: (B, H, W) float32 (float64 for float64 x)
  //   math: fp32 accumulation (fp64 for fp64); conv summed over (i, j) row-major, then + conv_bias;
  //         biased variance; rstd = 1 / sqrt(var + eps); out = (y - mean) * rstd * ln_weight + ln_bias
  m.def(
      "dwconv_ln_fwd(Tensor x, Tensor weight, Tensor? conv_bias, Tensor? ln_weight, Tensor? ln_bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Backward (conv_bias / ln_bias are passed for their presence and dtype): recomputes y = conv(x) + conv_bias (nothing of size B*H*W*C is saved besides x).
  //   grad_out (B, H, W, C) contiguous (any of the float dtypes above); mean, rstd from the forward.
  //   returns (grad_x, grad_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias):
  //     grad_x: empty_like(x) layout (NCHW or channels_last as x), x's dtype; (0,) if !need_grad_x
  //     grad_weight (C, 1, k, k), grad_conv_bias, grad_ln_weight, grad_ln_bias (C,): each in its parameter's dtype;
  //     (0,) when that parameter is None or !need_grad_params
  m.def(
      "dwconv_ln_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? conv_bias, Tensor? ln_weight, "
      "Tensor? ln_bias, Tensor mean, Tensor rstd, bool need_grad_x, bool need_grad_params) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- mbconv_se -------------------------------------------------------------------------------------------
  // The depthwise stage of an MBConv block (MobileNet-V2/V3, EfficientNet) with the squeeze of its SE layer:
  //   y0[b, c, i, j] = sum_{u, v < k} weight[c, 0, u, v] * x[b, c, i * stride - pad_t + u, j * stride - pad_l + v]
  //                    + conv_bias[c]                       (x is 0 outside [0, H) x [0, W): zero padding)
  //   batch_stats: mean, var = biased statistics of y0 over (B, out_h, out_w) (no E[y^2] - E[y]^2 cancellation);
  //   else mean, var = running_mean, running_var
  //   y = (y0 - mean[c]) * rsqrt(var[c] + eps) * bn_weight[c] + bn_bias[c];  z = act(y)
  //   act: "none", "relu", "relu6", "silu", "hardswish" (PyTorch's definitions)
  //   x          (B, C, H, W) NCHW- or channels_last-contiguous, float16 / bfloat16 / float32 (cpu also float64)
  //   weight     (C, 1, k, k) contiguous, k in {3, 5, 7}; stride 1 or 2; pad_t, pad_l >= 0; out_h, out_w >= 1
  //              (the bottom / right padding is whatever out_h, out_w imply: asymmetric "same" padding included)
  //   conv_bias, bn_weight, bn_bias (C,) or None (0, 1, 0); running_mean, running_var (C,), needed unless
  //              batch_stats; every parameter x's dtype or float32 (float64 x: float64)
  //   returns    out (B, out_h, out_w, C) contiguous in x's dtype (= z; a channels_last (B, C, out_h, out_w) view),
  //              pooled (B, C) = sum over (out_h, out_w) of z, and (batch_stats) mean, var (C,); stats dtype
  //              float32 (float64 for float64 x); mean, var are (0,) unless batch_stats
  //   math: fp32 accumulation (fp64 for fp64); taps summed row-major (u, then v)
  m.def(
      "mbconv_se_fwd(Tensor x, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? running_mean, Tensor? running_var, float eps, int stride, int pad_t, int pad_l, int out_h, int out_w, "
      "str act, bool batch_stats) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward (recomputes y0 from x: nothing of size B*H*W*C is saved besides x):
  //   mean, var: the statistics the forward used (running, or the batch's it returned)
  //   g = (grad_out + grad_pooled[b, c]) * act'(y);  xhat = (y0 - mean) * rstd
  //   grad_bn_bias = sum g;  grad_bn_weight = sum g * xhat         (sums over b, i, j)
  //   dy0 = rstd * bn_weight * g                                   (running statistics)
  //   dy0 = rstd * bn_weight * (g - sum g / N - xhat * sum(g * xhat) / N),  N = B * out_h * out_w   (batch_stats)
  //   grad_conv_bias = sum dy0; grad_x = the transposed strided depthwise conv of dy0; grad_weight = sum dy0 * x
  //   grad_out (B, out_h, out_w, C) contiguous; grad_pooled (B, C) float32 or None
  //   returns (grad_x: empty_like(x), x's dtype, (0,) unless need_grad_x; grad_weight, grad_conv_bias,
  //            grad_bn_weight, grad_bn_bias: each its parameter's shape and dtype, (0,) of x's dtype when that
  //            parameter is None or !need_grad_params)
  m.def(
      "mbconv_se_bwd(Tensor grad_out, Tensor? grad_pooled, Tensor x, Tensor weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, float eps, int stride, int pad_t, int pad_l, "
      "str act, bool batch_stats, bool need_grad_x, bool need_grad_params) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
