// Argument checks of the Philox ops (gaussian_like, project, project_backward), shared by the CPU
// and CUDA kernels. The Python wrappers check first with friendlier messages; these guard direct
// torch.ops.gradreg_fast.* calls.
#pragma once
#include <ATen/ATen.h>

namespace gradreg {

inline void check_offset(int64_t offset, const char* op) {
  TORCH_CHECK(offset >= 0, "gradreg_fast::", op, ": offset must be >= 0, got ", offset);
}

inline void check_stream_args(const at::Tensor& x, int64_t offset, const char* op) {
  TORCH_CHECK(x.is_floating_point(), "gradreg_fast::", op, ": x must be a floating tensor, got ",
              x.scalar_type());
  check_offset(offset, op);
}

inline void check_project_args(const at::Tensor& out, int64_t offset, const char* op) {
  TORCH_CHECK(out.is_floating_point(), "gradreg_fast::", op, ": out must be a floating tensor, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2, "gradreg_fast::", op, ": out must have shape (B, K), got ", out.sizes());
  check_offset(offset, op);
}

inline void check_project_backward_args(const at::Tensor& grad, int64_t offset, int64_t num_outputs,
                                        at::ScalarType dtype) {
  TORCH_CHECK(grad.dim() == 1, "gradreg_fast::project_backward: grad must have shape (B,), got ",
              grad.sizes());
  TORCH_CHECK(grad.is_floating_point(), "gradreg_fast::project_backward: grad must be floating, got ",
              grad.scalar_type());
  TORCH_CHECK(num_outputs >= 0, "gradreg_fast::project_backward: num_outputs must be >= 0, got ",
              num_outputs);
  TORCH_CHECK(at::isFloatingType(dtype), "gradreg_fast::project_backward: dtype must be floating, got ",
              dtype);
  check_offset(offset, "project_backward");
}

}  // namespace gradreg
