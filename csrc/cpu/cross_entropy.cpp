// CPU kernels of gradreg_fast::cross_entropy, its backward and the Hessian-vector product of its
// backward. One pass per row over the logits (plus a second over a cached row for the softmax);
// p = exp(z - lse) is recomputed from the saved lse instead of being stored.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <torch/library.h>

#include "ce_fd.h"

namespace gradreg {
namespace {

inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

inline void check_label(int64_t label, int64_t K, const char* op) {
  TORCH_CHECK(label >= 0 && label < K, "gradreg_fast::", op, ": label ", label, " out of range [0, ", K,
              "); y must hold class indices in [0, K)");
}

// exp over a flat buffer, in place. float on x86-64: SSE2 (the x86-64 baseline, so no special
// build flags) with Cody–Waite reduction x = k ln2 + r and a degree-6 polynomial for e^r (the
// Cephes expf coefficients, about 1 ulp), four lanes at a time; std::exp is a libm call per element
// and the compiler does not vectorize the scalar form of this polynomial (the clamps are
// comparisons that may trap). Inputs below -87.3 give 0 (so -inf gives 0), NaN stays NaN; the
// callers pass x <= ~0 (z - max, z - lse).
inline void exp_inplace(double* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

#if defined(__SSE2__)
inline __m128 exp4(__m128 x0) {
  const __m128 lo = _mm_set1_ps(-87.3f);
  // NaN in the second operand of max/min is returned as is, so NaN passes through
  const __m128 x = _mm_min_ps(_mm_set1_ps(88.3f), _mm_max_ps(lo, x0));
  const __m128 magic = _mm_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m128 kf = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)), magic), magic);
  __m128 r = _mm_sub_ps(x, _mm_mul_ps(kf, _mm_set1_ps(0.693359375f)));
  r = _mm_sub_ps(r, _mm_mul_ps(kf, _mm_set1_ps(-2.12194440e-4f)));
  __m128 y = _mm_set1_ps(1.9875691500e-4f);
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(1.3981999507e-3f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(8.3334519073e-3f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(4.1665795894e-2f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(1.6666665459e-1f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(5.0000001201e-1f));
  y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(_mm_mul_ps(y, r), r), r), _mm_set1_ps(1.0f));
  const __m128i bits = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(kf), _mm_set1_epi32(127)), 23);
  const __m128 e = _mm_mul_ps(y, _mm_castsi128_ps(bits));
  return _mm_andnot_ps(_mm_cmplt_ps(x0, lo), e);  // underflow (and -inf) to 0
}

inline void exp_inplace(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(v + i, exp4(_mm_loadu_ps(v + i)));
  if (i < n) {
    alignas(16) float tail[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t j = i; j < n; ++j) tail[j - i] = v[j];
    _mm_store_ps(tail, exp4(_mm_load_ps(tail)));
    for (int64_t j = i; j < n; ++j) v[j] = tail[j - i];
  }
}
#else
inline void exp_inplace(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}
#endif

// Rows are processed in tiles so that the exponentials run over one flat buffer of up to
// kTileElems values (long vectorizable loops even when K is small, e.g. 10 classes).
constexpr int64_t kTileElems = 2048;
inline int64_t tile_rows(int64_t K) { return std::max<int64_t>(1, kTileElems / std::max<int64_t>(K, 1)); }

// The softmax rows of the backward and the Hessian-vector product: body(b, p) for every row b of the
// (B, K) logits z, with p = exp(z_b - lse_b) (K values of acc_t), rows split across threads and the
// exponentials of a tile of rows taken over one flat buffer. Checks each label on the way.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_softmax_row(const scalar_t* zp, const int64_t* yp, const double* sp, int64_t B, int64_t K,
                          const char* op, const Body& body) {
  const int64_t T = tile_rows(K);
  at::parallel_for(0, B, row_grain(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(T * K);
    for (int64_t b0 = begin; b0 < end; b0 += T) {
      const int64_t rows = std::min(T, end - b0);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* row = zp + (b0 + r) * K;
        check_label(yp[b0 + r], K, op);
        const double s = sp[b0 + r];  // z - lse in double: exact enough for fp32 exp arguments
        for (int64_t k = 0; k < K; ++k) buf[r * K + k] = static_cast<acc_t>(static_cast<double>(row[k]) - s);
      }
      exp_inplace(buf.data(), rows * K);
      for (int64_t r = 0; r < rows; ++r) body(b0 + r, buf.data() + r * K);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& labels) {
  const CrossEntropyOperands o = ce_forward_operands(logits, labels);
  const int64_t B = o.B, K = o.K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = o.z.const_data_ptr<scalar_t>();
    const int64_t* yp = o.y.const_data_ptr<int64_t>();
    acc_t* lp = o.loss.mutable_data_ptr<acc_t>();
    double* sp = o.lse.mutable_data_ptr<double>();
    const int64_t T = tile_rows(K);
    at::parallel_for(0, B, row_grain(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(T * K), rmax(T);
      for (int64_t b0 = begin; b0 < end; b0 += T) {
        const int64_t rows = std::min(T, end - b0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = zp + (b0 + r) * K;
          check_label(yp[b0 + r], K, "cross_entropy");
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for (int64_t k = 0; k < K; ++k) m = std::max(m, static_cast<acc_t>(row[k]));
          rmax[r] = m;
          const acc_t shift = std::isfinite(m) ? m : acc_t(0);  // all -inf: exp gives 0, lse = -inf
          for (int64_t k = 0; k < K; ++k) buf[r * K + k] = static_cast<acc_t>(row[k]) - shift;
        }
        exp_inplace(buf.data(), rows * K);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = b0 + r;
          acc_t sum = 0;
          for (int64_t k = 0; k < K; ++k) sum += buf[r * K + k];
          const acc_t m = rmax[r];
          // +inf and NaN propagate; the sum is taken to double before the log (lse is stored in double)
          const double s = std::isfinite(m) ? static_cast<double>(m) + std::log(static_cast<double>(sum)) : m;
          sp[b] = s;
          lp[b] = static_cast<acc_t>(s - static_cast<double>(zp[b * K + yp[b]]));
        }
      }
    });
  });
  return {o.loss, o.lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                      const at::Tensor& lse) {
  const CrossEntropyOperands o = ce_backward_operands(grad, logits, labels, lse);
  const int64_t B = o.B, K = o.K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = o.z.const_data_ptr<scalar_t>();
    const int64_t* yp = o.y.const_data_ptr<int64_t>();
    const acc_t* gp = o.grad.const_data_ptr<acc_t>();
    const double* sp = o.lse.const_data_ptr<double>();
    scalar_t* op = o.out.mutable_data_ptr<scalar_t>();
    for_each_softmax_row<scalar_t, acc_t>(zp, yp, sp, B, K, "cross_entropy_backward", [&](int64_t b, const acc_t* p) {
      const acc_t gb = gp[b];
      scalar_t* orow = op + b * K;
      for (int64_t k = 0; k < K; ++k) orow[k] = static_cast<scalar_t>(gb * p[k]);
      orow[yp[b]] = static_cast<scalar_t>(gb * (p[yp[b]] - acc_t(1)));
    });
  });
  return o.out;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_hvp_cpu(const at::Tensor& u, const at::Tensor& scale,
                                                         const at::Tensor& logits, const at::Tensor& labels,
                                                         const at::Tensor& lse) {
  const CrossEntropyOperands o = ce_hvp_operands(u, scale, logits, labels, lse);
  const int64_t B = o.B, K = o.K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "cross_entropy_hvp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = o.z.const_data_ptr<scalar_t>();
    const scalar_t* up = o.u.const_data_ptr<scalar_t>();
    const int64_t* yp = o.y.const_data_ptr<int64_t>();
    const acc_t* cp = o.scale.const_data_ptr<acc_t>();
    const double* sp = o.lse.const_data_ptr<double>();
    scalar_t* hp = o.out.mutable_data_ptr<scalar_t>();
    acc_t* dp = o.dot.mutable_data_ptr<acc_t>();
    for_each_softmax_row<scalar_t, acc_t>(zp, yp, sp, B, K, "cross_entropy_hvp", [&](int64_t b, const acc_t* p) {
      const scalar_t* urow = up + b * K;
      scalar_t* hrow = hp + b * K;
      acc_t pu = 0;
      for (int64_t k = 0; k < K; ++k) pu += p[k] * static_cast<acc_t>(urow[k]);
      const acc_t c = cp[b];
      for (int64_t k = 0; k < K; ++k) hrow[k] = static_cast<scalar_t>(c * p[k] * (static_cast<acc_t>(urow[k]) - pu));
      dp[b] = pu - static_cast<acc_t>(urow[yp[b]]);
    });
  });
  return {o.out, o.dot};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_hvp", &cross_entropy_hvp_cpu);
}

}  // namespace gradreg
