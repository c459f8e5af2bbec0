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
}

// Fused bias + activation (csrc/bias_act.h): y = act(x + b), b of shape (x.shape[dim],) or None;
// act codes as gradreg_fast.ops.bias_act.ACTIVATIONS; alpha: leaky_relu slope / elu alpha.
TORCH_LIBRARY_FRAGMENT(gradreg_fast, m) {
  m.def("bias_act(Tensor x, Tensor? b, int act, int dim, float alpha) -> Tensor");
  // grad * act'(z), from y for linear/relu/leaky_relu(alpha>=0)/tanh/sigmoid, else from x + b.
  m.def("bias_act_grad(Tensor grad, Tensor? x, Tensor? b, Tensor? y, int act, int dim, float alpha) -> Tensor");
  // gg * grad * d act'/d ref (ref = y or z as above): the second-order term.
  m.def("bias_act_grad2(Tensor gg, Tensor grad, Tensor? x, Tensor? b, Tensor? y, int act, int dim, float alpha) -> Tensor");
}
