// CPU kernel of gradreg_fast::fd_direction: per row, one reduction pass over g (the row stays in
// cache for the second pass) and one elementwise pass reading x and g and writing the output.
#include <ATen/Parallel.h>
#include <cmath>
#include <torch/library.h>

#include "ce_fd.h"

namespace gradreg {
namespace {

constexpr int kLanes = 8;  // independent partial sums so the compiler can vectorize

std::tuple<at::Tensor, at::Tensor> fd_direction_cpu(const at::Tensor& x_in, const at::Tensor& g_in, double h) {
  check_fd_direction(x_in, g_in, h);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t N = B == 0 ? 0 : x.numel() / B;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor norms = at::empty({B}, x.options().dtype(reduction_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fd_direction_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t* np = norms.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* grow = gp + b * N;
        const scalar_t* xrow = xp + b * N;
        scalar_t* orow = op + b * N;
        double lane[kLanes] = {};  // sums in double, as sq_norm's CPU kernel
        int64_t j = 0;
        for (; j + kLanes <= N; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const double v = static_cast<double>(grow[j + l]);
            lane[l] += v * v;
          }
        }
        double total = 0;
        for (int l = 0; l < kLanes; ++l) total += lane[l];
        for (; j < N; ++j) {
          const double v = static_cast<double>(grow[j]);
          total += v * v;
        }
        const double n = std::sqrt(total);
        np[b] = static_cast<acc_t>(n);
        const acc_t scale = n > 0 ? static_cast<acc_t>(h / n) : acc_t(0);
        for (j = 0; j < N; ++j) {
          orow[j] = static_cast<scalar_t>(static_cast<acc_t>(xrow[j]) + scale * static_cast<acc_t>(grow[j]));
        }
      }
    });
  });
  return {out, norms};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CPU, m) {
  m.impl("fd_direction", &fd_direction_cpu);
}

}  // namespace gradreg
