// CPU kernels of the Philox Gaussian stream: gaussian_like, project and project_backward.
// The stream is defined in gradreg_fast/reference/philox.py and implemented in csrc/philox.h.
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>
#include <vector>

#include "common.h"
#include "philox.h"
#include "philox_checks.h"

namespace gradreg {
namespace {

using philox::Stream;

// dst[j] = z[start + j] for j < n, one Philox call per aligned block of four.
template <typename scalar_t>
void fill_stream(const Stream& s, int64_t start, int64_t n, scalar_t* dst) {
  int64_t e = start;
  const int64_t end = start + n;
  float z[4];
  while (e < end) {
    const int64_t q = e >> 2;
    s.block(static_cast<uint64_t>(q), z);
    const int64_t stop = std::min(end, (q + 1) * 4);
    for (; e < stop; ++e) dst[e - start] = static_cast<scalar_t>(z[e & 3]);
  }
}

// body(i, r) for every row i in [0, B) of a (B, K) projection, with r the row's K stream values:
// z[0..K) drawn once and shared by the batch (per_sample false), or z[i·K..(i+1)·K) drawn per row;
// rows split across threads.
template <typename Body>
void for_each_projection_row(const Stream& stream, int64_t B, int64_t K, bool per_sample, const Body& body) {
  std::vector<float> shared;
  if (!per_sample) {
    shared.resize(K);
    fill_stream<float>(stream, 0, K, shared.data());
  }
  at::parallel_for(0, B, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> own(per_sample ? K : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const float* r = shared.data();
      if (per_sample) {
        fill_stream<float>(stream, i * K, K, own.data());
        r = own.data();
      }
      body(i, r);
    }
  });
}

at::Tensor gaussian_like_cpu(const at::Tensor& x, int64_t seed, int64_t offset, bool per_sample) {
  check_stream_args(x, offset, "gaussian_like");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const Stream s(seed, offset);
  const int64_t row = (per_sample || x.dim() == 0) ? numel : numel / x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gaussian_like_cpu", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // Chunks of whole blocks of four: each thread runs the Philox calls of its own elements.
    const int64_t blocks = (row + 3) / 4;
    at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
      const int64_t start = b0 * 4, stop = std::min(row, b1 * 4);
      fill_stream<scalar_t>(s, start, stop - start, op + start);
    });
    if (row < numel) {  // shared across the batch: copy row 0 into the other rows
      at::parallel_for(1, x.size(0), 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) std::copy(op, op + row, op + i * row);
      });
    }
  });
  return out;
}

at::Tensor project_cpu(const at::Tensor& out_in, int64_t seed, int64_t offset, bool per_sample) {
  check_project_args(out_in, offset, "project");
  const at::Tensor out = out_in.contiguous();
  const int64_t B = out.size(0), K = out.size(1);
  at::Tensor s = at::empty({B}, out.options().dtype(reduction_dtype(out.scalar_type())));
  if (B == 0) return s;
  const Stream stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "project_cpu", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = out.const_data_ptr<scalar_t>();
    out_t* sp = s.mutable_data_ptr<out_t>();
    for_each_projection_row(stream, B, K, per_sample, [&](int64_t i, const float* r) {
      double acc = 0;  // CPU sums in double, stored in the output dtype (as sq_norm)
      const scalar_t* row = xp + i * K;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(r[k]) * static_cast<double>(row[k]);
      sp[i] = static_cast<out_t>(acc);
    });
  });
  return s;
}

at::Tensor project_backward_cpu(const at::Tensor& grad_in, int64_t seed, int64_t offset, bool per_sample,
                                int64_t num_outputs, at::ScalarType dtype) {
  check_project_backward_args(grad_in, offset, num_outputs, dtype);
  const int64_t B = grad_in.size(0), K = num_outputs;
  at::Tensor out = at::empty({B, K}, grad_in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const Stream stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "project_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_projection_row(stream, B, K, per_sample, [&](int64_t i, const float* r) {
      for (int64_t k = 0; k < K; ++k) op[i * K + k] = static_cast<scalar_t>(gp[i] * static_cast<acc_t>(r[k]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CPU, m) {
  m.impl("gaussian_like", &gaussian_like_cpu);
  m.impl("project", &project_cpu);
  m.impl("project_backward", &project_backward_cpu);
}

}  // namespace gradreg
