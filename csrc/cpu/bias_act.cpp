// CPU kernels of gradreg_fast::bias_act, bias_act_grad and bias_act_grad2 (formulas in bias_act.h).
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <torch/library.h>

#include "bias_act.h"

namespace gradreg {
namespace bias_act {
namespace {

constexpr int64_t kGrain = 16384;

// The element loops: body(k) for k in [s, e). They are compiled twice: for the baseline x86-64 ISA
// (SSE2), and with AVX2 + FMA for the CPUs that have them (chosen at run time, once): the math of
// bias_act.h is plain arithmetic that vectorizes 8-wide there (measured 3.5-7.7x on the
// transcendental activations). `flatten` inlines body and the math into the AVX2 copy; the
// out-of-line functions stay baseline code, so nothing AVX2 leaks to CPUs without it.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define GRADREG_X86_AVX2_DISPATCH 1
template <typename Body>
__attribute__((target("avx2,fma"), flatten)) void loop_avx2(int64_t s, int64_t e, const Body& body) {
  for (int64_t k = s; k < e; ++k) body(k);
}

// GRADREG_CPU_BASELINE=1 (read once) forces the baseline loops: tests run both copies.
bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          !(std::getenv("GRADREG_CPU_BASELINE") && std::string(std::getenv("GRADREG_CPU_BASELINE")) == "1");
  return yes;
}
#endif

template <typename Body>
void run_loop(int64_t s, int64_t e, const Body& body) {
#ifdef GRADREG_X86_AVX2_DISPATCH
  if (cpu_has_avx2_fma()) {
    loop_avx2(s, e, body);
    return;
  }
#endif
  for (int64_t k = s; k < e; ++k) body(k);
}

// Walks [0, numel) in parallel chunks split into segments along which the bias is constant or
// contiguous: f(begin, end, bias) with bias(k) the bias of element k, a functor the compiler
// inlines, so the inner loops stay simple enough to vectorize.
template <typename acc_t, typename scalar_t, typename F>
void for_each_segment(const Geometry& g, const scalar_t* bp, F&& f) {
  at::parallel_for(0, g.numel, kGrain, [&](int64_t begin, int64_t end) {
    if (bp == nullptr) {
      f(begin, end, [](int64_t) { return acc_t(0); });
      return;
    }
    int64_t i = begin;
    while (i < end) {
      if (g.inner == 1 && g.C > 1) {  // the bias dimension is innermost in memory
        const int64_t c = i % g.C;
        const int64_t e = std::min(end, i + (g.C - c));
        const int64_t off = c - i;
        f(i, e, [bp, off](int64_t k) { return static_cast<acc_t>(bp[k + off]); });
        i = e;
      } else {  // one bias value for a run of `inner` elements
        const int64_t row = i / g.inner;
        const int64_t e = std::min(end, (row + 1) * g.inner);
        const acc_t bv = static_cast<acc_t>(bp[row % g.C]);
        f(i, e, [bv](int64_t) { return bv; });
        i = e;
      }
    }
  });
}

// out[k] = element<MODE>(ref[k] + bias(k), a, g, k) over the operands, in parallel segments.
template <int MODE>
at::Tensor run(const Operands& o, int64_t act, double alpha) {
  if (o.geo.numel == 0) return o.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.out.scalar_type(), "bias_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const scalar_t* rp = ptr(o.r.ref);
    const scalar_t* ap = ptr(o.a);
    const scalar_t* gp = ptr(o.g);
    scalar_t* op = o.out.mutable_data_ptr<scalar_t>();
    const acc_t al = static_cast<acc_t>(alpha);
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t A = decltype(act_c)::value;
      if constexpr (MODE == 2 && !has_second_derivative(A)) {
        return;  // grad2_operands returned zeros (geo.numel 0)
      } else {
        for_each_segment<acc_t>(o.geo, ptr(o.r.bias), [&](int64_t s, int64_t e, auto bias) {
          if constexpr (MODE == 1 && A == kLinear) {  // act' = 1: no reference value
            for (int64_t k = s; k < e; ++k) op[k] = ap[k];
          } else {
            run_loop(s, e, [&](int64_t k) {
              op[k] = element<MODE, A>(static_cast<acc_t>(rp[k]) + bias(k), ap, gp, k, al);
            });
          }
        });
      }
    });
  });
  return o.out;
}

at::Tensor bias_act_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& b, int64_t act, int64_t dim,
                        double alpha) {
  return run<0>(forward_operands(x, b, act, dim, alpha), act, alpha);
}

at::Tensor bias_act_grad_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                             const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y,
                             int64_t act, int64_t dim, double alpha) {
  return run<1>(grad_operands(grad, x, b, y, act, dim, alpha), act, alpha);
}

at::Tensor bias_act_grad2_cpu(const at::Tensor& gg, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                              const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y, int64_t act,
                              int64_t dim, double alpha) {
  return run<2>(grad2_operands(gg, grad, x, b, y, act, dim, alpha), act, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_grad", &bias_act_grad_cpu);
  m.impl("bias_act_grad2", &bias_act_grad2_cpu);
}

}  // namespace bias_act
}  // namespace gradreg
