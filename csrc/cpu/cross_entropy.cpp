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

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits_in, const at::Tensor& y_in) {
  const int64_t K = check_logits_labels(logits_in, y_in, "cross_entropy");
  const at::Tensor z = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t B = z.size(0);
  at::Tensor loss = at::empty({B}, z.options().dtype(reduction_dtype(z.scalar_type())));
  at::Tensor lse = at::empty({B}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    double* sp = lse.mutable_data_ptr<double>();
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
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in, const at::Tensor& y_in,
                                      const at::Tensor& lse_in) {
  const int64_t K = check_logits_labels(logits_in, y_in, "cross_entropy_backward");
  const at::Tensor grad = per_sample(grad_in, logits_in, "cross_entropy_backward", "grad");
  const at::Tensor lse = lse_per_sample(lse_in, logits_in, "cross_entropy_backward");
  const at::Tensor z = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t B = z.size(0);
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const double* sp = lse.const_data_ptr<double>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t T = tile_rows(K);
    at::parallel_for(0, B, row_grain(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(T * K);
      for (int64_t b0 = begin; b0 < end; b0 += T) {
        const int64_t rows = std::min(T, end - b0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = zp + (b0 + r) * K;
          check_label(yp[b0 + r], K, "cross_entropy_backward");
          const double s = sp[b0 + r];  // z - lse in double: exact enough for fp32 exp arguments
          for (int64_t k = 0; k < K; ++k) buf[r * K + k] = static_cast<acc_t>(static_cast<double>(row[k]) - s);
        }
        exp_inplace(buf.data(), rows * K);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = b0 + r;
          const acc_t gb = gp[b];
          scalar_t* orow = op + b * K;
          const acc_t* p = buf.data() + r * K;
          for (int64_t k = 0; k < K; ++k) orow[k] = static_cast<scalar_t>(gb * p[k]);
          orow[yp[b]] = static_cast<scalar_t>(gb * (p[yp[b]] - acc_t(1)));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_hvp_cpu(const at::Tensor& u_in, const at::Tensor& scale_in,
                                                         const at::Tensor& logits_in, const at::Tensor& y_in,
                                                         const at::Tensor& lse_in) {
  const int64_t K = check_logits_labels(logits_in, y_in, "cross_entropy_hvp");
  TORCH_CHECK(u_in.sizes() == logits_in.sizes(), "gradreg_fast::cross_entropy_hvp: u must have the shape of logits ",
              logits_in.sizes(), ", got ", u_in.sizes());
  TORCH_CHECK(u_in.scalar_type() == logits_in.scalar_type(),
              "gradreg_fast::cross_entropy_hvp: u must have the dtype of logits (", logits_in.scalar_type(), "), got ",
              u_in.scalar_type());
  const at::Tensor scale = per_sample(scale_in, logits_in, "cross_entropy_hvp", "scale");
  const at::Tensor lse = lse_per_sample(lse_in, logits_in, "cross_entropy_hvp");
  const at::Tensor z = logits_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t B = z.size(0);
  at::Tensor hvp = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor dot = at::empty({B}, z.options().dtype(reduction_dtype(z.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_hvp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const acc_t* cp = scale.const_data_ptr<acc_t>();
    const double* sp = lse.const_data_ptr<double>();
    scalar_t* hp = hvp.mutable_data_ptr<scalar_t>();
    acc_t* dp = dot.mutable_data_ptr<acc_t>();
    const int64_t T = tile_rows(K);
    at::parallel_for(0, B, row_grain(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(T * K);
      for (int64_t b0 = begin; b0 < end; b0 += T) {
        const int64_t rows = std::min(T, end - b0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = zp + (b0 + r) * K;
          check_label(yp[b0 + r], K, "cross_entropy_hvp");
          const double s = sp[b0 + r];  // z - lse in double: exact enough for fp32 exp arguments
          for (int64_t k = 0; k < K; ++k) buf[r * K + k] = static_cast<acc_t>(static_cast<double>(row[k]) - s);
        }
        exp_inplace(buf.data(), rows * K);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = b0 + r;
          const scalar_t* urow = up + b * K;
          scalar_t* hrow = hp + b * K;
          const acc_t* p = buf.data() + r * K;
          acc_t pu = 0;
          for (int64_t k = 0; k < K; ++k) pu += p[k] * static_cast<acc_t>(urow[k]);
          const acc_t c = cp[b];
          for (int64_t k = 0; k < K; ++k) {
            hrow[k] = static_cast<scalar_t>(c * p[k] * (static_cast<acc_t>(urow[k]) - pu));
          }
          dp[b] = pu - static_cast<acc_t>(urow[yp[b]]);
        }
      }
    });
  });
  return {hvp, dot};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_hvp", &cross_entropy_hvp_cpu);
}

}  // namespace gradreg
