// Host-side argument checks shared by the CPU and CUDA kernels of fd_direction and cross_entropy.
#pragma once
#include <cmath>

#include "common.h"

namespace gradreg {

inline void check_fd_direction(const at::Tensor& x, const at::Tensor& g, double h) {
  check_batched_floating(x, "fd_direction", "x");
  check_batched_floating(g, "fd_direction", "g");
  TORCH_CHECK(x.sizes() == g.sizes(), "gradreg_fast::fd_direction: x and g must have the same shape, got ",
              x.sizes(), " and ", g.sizes());
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), "gradreg_fast::fd_direction: x and g must have the same dtype, got ",
              x.scalar_type(), " and ", g.scalar_type());
  TORCH_CHECK(x.device() == g.device(), "gradreg_fast::fd_direction: x and g must be on the same device");
  TORCH_CHECK(std::isfinite(h), "gradreg_fast::fd_direction: h must be finite, got ", h);
}

// logits (B, K) floating, y (B,) int64; returns K.
inline int64_t check_logits_labels(const at::Tensor& logits, const at::Tensor& y, const char* op) {
  TORCH_CHECK(logits.is_floating_point(), "gradreg_fast::", op, ": logits must be a floating tensor, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, "gradreg_fast::", op, ": logits must have shape (B, K), got ", logits.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong, "gradreg_fast::", op, ": y must be an int64 tensor of class indices, got ",
              y.scalar_type());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == logits.size(0), "gradreg_fast::", op, ": y must have shape (B,) = (",
              logits.size(0), ",), got ", y.sizes());
  TORCH_CHECK(y.device() == logits.device(), "gradreg_fast::", op, ": logits and y must be on the same device");
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, "gradreg_fast::", op, ": logits need at least one class");
  return logits.size(1);
}

// The direction u of cross_entropy_hvp: the shape and dtype of the logits.
inline void check_hvp_direction(const at::Tensor& u, const at::Tensor& logits) {
  TORCH_CHECK(u.sizes() == logits.sizes(), "gradreg_fast::cross_entropy_hvp: u must have the shape of logits ",
              logits.sizes(), ", got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == logits.scalar_type(), "gradreg_fast::cross_entropy_hvp: u must have the dtype of logits (",
              logits.scalar_type(), "), got ", u.scalar_type());
}

// A per-sample vector (B,) of the reduction dtype, made contiguous.
inline at::Tensor per_sample(const at::Tensor& v, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(0), "gradreg_fast::", op, ": ", name,
              " must have shape (B,) = (", logits.size(0), ",), got ", v.sizes());
  return v.to(reduction_dtype(logits.scalar_type())).contiguous();
}

// The saved log-sum-exp (B,) in float64 for every logits dtype, made contiguous: p = exp(z - lse)
// then keeps fp32 accuracy when |lse| is large (an fp32 lse of about 100 is off by up to 4e-6).
inline at::Tensor lse_per_sample(const at::Tensor& v, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(0), "gradreg_fast::", op, ": lse must have shape (B,) = (",
              logits.size(0), ",), got ", v.sizes());
  return v.to(at::kDouble).contiguous();
}

// The operands of cross_entropy, cross_entropy_backward and cross_entropy_hvp, checked and made
// contiguous, with the outputs allocated; shared by the CPU and CUDA kernels.
struct CrossEntropyOperands {
  int64_t B = 0, K = 0;
  at::Tensor z, y;             // logits (B, K) and labels (B,)
  at::Tensor lse;              // (B,) float64: cross_entropy's second output, the others' input
  at::Tensor loss;             // cross_entropy's (B,) losses
  at::Tensor grad, scale, u;   // the backward's grad (B,); the hvp's scale (B,) and direction (B, K)
  at::Tensor out, dot;         // the backward's gradient or the hvp's product (B, K); the hvp's dot (B,)
};

inline CrossEntropyOperands ce_forward_operands(const at::Tensor& logits, const at::Tensor& y) {
  CrossEntropyOperands o;
  o.K = check_logits_labels(logits, y, "cross_entropy");
  o.z = logits.contiguous();
  o.y = y.contiguous();
  o.B = o.z.size(0);
  o.loss = at::empty({o.B}, o.z.options().dtype(reduction_dtype(o.z.scalar_type())));
  o.lse = at::empty({o.B}, o.z.options().dtype(at::kDouble));
  return o;
}

inline CrossEntropyOperands ce_backward_operands(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& y,
                                                 const at::Tensor& lse) {
  CrossEntropyOperands o;
  o.K = check_logits_labels(logits, y, "cross_entropy_backward");
  o.grad = per_sample(grad, logits, "cross_entropy_backward", "grad");
  o.lse = lse_per_sample(lse, logits, "cross_entropy_backward");
  o.z = logits.contiguous();
  o.y = y.contiguous();
  o.B = o.z.size(0);
  o.out = at::empty_like(o.z, at::MemoryFormat::Contiguous);
  return o;
}

inline CrossEntropyOperands ce_hvp_operands(const at::Tensor& u, const at::Tensor& scale, const at::Tensor& logits,
                                            const at::Tensor& y, const at::Tensor& lse) {
  CrossEntropyOperands o;
  o.K = check_logits_labels(logits, y, "cross_entropy_hvp");
  check_hvp_direction(u, logits);
  o.scale = per_sample(scale, logits, "cross_entropy_hvp", "scale");
  o.lse = lse_per_sample(lse, logits, "cross_entropy_hvp");
  o.z = logits.contiguous();
  o.u = u.contiguous();
  o.y = y.contiguous();
  o.B = o.z.size(0);
  o.out = at::empty_like(o.u, at::MemoryFormat::Contiguous);
  o.dot = at::empty({o.B}, o.z.options().dtype(reduction_dtype(o.z.scalar_type())));
  return o;
}

}  // namespace gradreg
