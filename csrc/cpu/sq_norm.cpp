// CPU kernels of gradreg_fast::sq_norm and its backward.
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>

#include "common.h"

namespace gradreg {
namespace {

constexpr int kLanes = 8;  // independent partial sums so the compiler can vectorize

at::Tensor sq_norm_cpu(const at::Tensor& x_in) {
  check_batched_floating(x_in, "sq_norm", "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t N = B == 0 ? 0 : x.numel() / B;
  at::Tensor out = at::empty({B}, x.options().dtype(reduction_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sq_norm_cpu", [&] {
    // Sums run in double on the CPU (the kernel is memory-bound, so this costs nothing measurable)
    // and are stored in the output dtype (fp32, or fp64 for fp64 inputs).
    using acc_t = double;
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    out_t* op = out.mutable_data_ptr<out_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = xp + b * N;
        acc_t lane[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= N; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const acc_t v = static_cast<acc_t>(row[j + l]);
            lane[l] += v * v;
          }
        }
        acc_t total = 0;
        for (int l = 0; l < kLanes; ++l) total += lane[l];
        for (; j < N; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          total += v * v;
        }
        op[b] = static_cast<out_t>(total);
      }
    });
  });
  return out;
}

at::Tensor sq_norm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_batched_floating(x_in, "sq_norm_backward", "x");
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == x_in.size(0),
              "gradreg_fast::sq_norm_backward: grad must have shape (B,) = (", x_in.size(0),
              ",), got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t N = B == 0 ? 0 : x.numel() / B;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sq_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 4096, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {  // walk the chunk row by row: one division per row, not per element
        const int64_t b = i / N;
        const int64_t row_end = std::min(end, (b + 1) * N);
        const acc_t two_g = acc_t(2) * gp[b];
        for (; i < row_end; ++i) op[i] = static_cast<scalar_t>(two_g * static_cast<acc_t>(xp[i]));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CPU, m) {
  m.impl("sq_norm", &sq_norm_cpu);
  m.impl("sq_norm_backward", &sq_norm_backward_cpu);
}

}  // namespace gradreg
