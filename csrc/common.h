// Shared helpers for the backend kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace gradreg {

// Checks shared by the per-sample ops: a floating tensor with a batch dimension.
inline void check_batched_floating(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_floating_point(), "gradreg_fast::", op, ": ", name,
              " must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "gradreg_fast::", op, ": ", name,
              " needs a batch dimension (shape (B, ...)), got a 0-d tensor");
}

// Dtype of the per-sample reductions: fp32 for half types and fp32, fp64 for fp64.
inline at::ScalarType reduction_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gradreg
