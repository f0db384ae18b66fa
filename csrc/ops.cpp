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
}
