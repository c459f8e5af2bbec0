// Operator schemas of gradreg_fast: the one place where every op is declared.
// Backend implementations live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the fake (meta)
// kernels and the autograd formulas are registered from Python (gradreg_fast/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing gradreg_fast._C loads this library and with it the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gradreg_fast, m) {
  // Per-sample squared L2 norm over all non-batch dims: out[b] = sum_j x[b, j]^2.
  // Output dtype: float32 for fp16/bf16/fp32 inputs, float64 for fp64 inputs.
  m.def("sq_norm(Tensor x) -> Tensor");
  // Its backward: grad_x[b, j] = 2 * grad[b] * x[b, j], in x's dtype.
  m.def("sq_norm_backward(Tensor grad, Tensor x) -> Tensor");
  // Finite-difference step per sample: n[b] = ||g[b]||, out[b] = x[b] + h * g[b] / n[b] (x[b] where
  // n[b] = 0). Returns (out in x's dtype and shape, n of shape (B,) in the reduction dtype).
  m.def("fd_direction(Tensor x, Tensor g, float h) -> (Tensor, Tensor)");
  // Softmax cross-entropy per sample: loss[b] = lse[b] - z[b, y[b]], lse[b] = logsumexp(z[b]).
  // Returns (loss, lse): loss (B,) in the reduction dtype, lse (B,) in float64 (saved for the backward).
  m.def("cross_entropy(Tensor logits, Tensor y) -> (Tensor, Tensor)");
  // Its backward: grad_z[b, k] = grad[b] * (p[b, k] - [k == y[b]]), p = exp(z - lse), logits' dtype.
  m.def("cross_entropy_backward(Tensor grad, Tensor logits, Tensor y, Tensor lse) -> Tensor");
  // The backward's backward in one pass: hvp[b] = scale[b] * (diag(p[b]) - p[b] p[b]^T) u[b] (u's
  // dtype) and dot[b] = <p[b] - onehot(y[b]), u[b]> (reduction dtype).
  m.def("cross_entropy_hvp(Tensor u, Tensor scale, Tensor logits, Tensor y, Tensor lse) -> (Tensor, Tensor)");

  // Counter-based Gaussian stream (Philox 4x32-10 + Box-Muller; gradreg_fast/reference/philox.py
  // defines it). seed: the uint64 key as int64 bits; offset >= 0 selects an independent stream.
  // x-shaped N(0, 1) numbers in x's dtype (contiguous); x is only a template (shape/dtype/device).
  m.def("gaussian_like(Tensor x, int seed, int offset, bool per_sample) -> Tensor");
  // s[i] = sum_k r[i, k] * out[i, k], r regenerated from (seed, offset); out (B, K);
  // float32 output for fp16/bf16/fp32, float64 for fp64.
  m.def("project(Tensor out, int seed, int offset, bool per_sample) -> Tensor");
  // Its backward: grad_out[i, k] = grad[i] * r[i, k], shape (B, num_outputs), in dtype.
  m.def("project_backward(Tensor grad, int seed, int offset, bool per_sample, int num_outputs, "
        "ScalarType dtype) -> Tensor");

  // Fused bias + activation (csrc/bias_act.h): y = act(x + b), b of shape (x.shape[dim],) or None;
  // act codes as gradreg_fast.ops.bias_act.ACTIVATIONS; alpha: leaky_relu slope / elu alpha.
  m.def("bias_act(Tensor x, Tensor? b, int act, int dim, float alpha) -> Tensor");
  // grad * act'(z), from y for linear/relu/leaky_relu(alpha>=0)/tanh/sigmoid, else from x + b.
  m.def("bias_act_grad(Tensor grad, Tensor? x, Tensor? b, Tensor? y, int act, int dim, float alpha) -> Tensor");
  // gg * grad * d act'/d ref (ref = y or z as above): the second-order term.
  m.def("bias_act_grad2(Tensor gg, Tensor grad, Tensor? x, Tensor? b, Tensor? y, int act, int dim, float alpha) -> Tensor");
}
