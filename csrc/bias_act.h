// Fused bias + activation: the activation formulas and the host-side checks and geometry,
// shared by the CPU kernels (csrc/cpu/bias_act.cpp) and the CUDA kernels (csrc/cuda/bias_act.cu).
//
//   forward:   y = act(z),  z = x + b  (b broadcast along `dim`; absent b means z = x)
//   grad:      grad_z = grad * act'(z)                 -- op bias_act_grad
//   grad2:     out    = gg * grad * d act'(z) / d ref  -- op bias_act_grad2
//
// The first derivative is written in a "reference value" r: the output y for the activations
// whose derivative is a function of y (linear, relu, leaky_relu with alpha >= 0, tanh, sigmoid;
// nothing else needs to be saved for them), the pre-activation z = x + b otherwise.
// grad2 is the derivative of act' with respect to that reference value, so the second-order
// term flows to y (and on through the forward op) or to x and b.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/irange.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gradreg {
namespace bias_act {

// The activations: the rows of gradreg_fast/_bias_act_spec.py's TABLE, in its order (a row's
// position is its code; tests/test_bias_act.py parses this list and checks it against the table).
//   X(enumerator, act' is computed from the output y, act'' != 0, takes an alpha)
// (an activation with an alpha computes act' from y only when alpha >= 0: leaky_relu)
#define GRADREG_ACTIVATIONS(X) \
  X(kLinear, true, false, false)     \
  X(kRelu, true, false, false)       \
  X(kLeakyRelu, true, false, true)   \
  X(kTanh, true, true, false)        \
  X(kSigmoid, true, true, false)     \
  X(kSoftplus, false, true, false)   \
  X(kGelu, false, true, false)       \
  X(kGeluTanh, false, true, false)   \
  X(kSilu, false, true, false)       \
  X(kElu, false, true, true)

#define GRADREG_ACT_ENUMERATOR(name, from_y, second, with_alpha) name,
enum Act : int64_t { GRADREG_ACTIVATIONS(GRADREG_ACT_ENUMERATOR) kNumActs };
#undef GRADREG_ACT_ENUMERATOR

constexpr double kSoftplusThreshold = 20.0;  // torch.nn.Softplus default (beta = 1)
constexpr double kSqrt1_2 = 0.70710678118654752440;      // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2 pi)
constexpr double kGeluK = 0.79788456080286535588;        // sqrt(2/pi)
constexpr double kGeluC = 0.044715;

// act'' vanishes for the piecewise-linear activations: their grad2 is zero and never launched.
constexpr bool has_second_derivative(int64_t act) {
#define GRADREG_ACT_SECOND(name, from_y, second, with_alpha) \
  if (act == name) return second;
  GRADREG_ACTIVATIONS(GRADREG_ACT_SECOND)
#undef GRADREG_ACT_SECOND
  return false;
}

// Whether act' is written in the output y (which the forward then saves) rather than in z = x + b.
constexpr bool from_output(int64_t act, double alpha) {
#define GRADREG_ACT_FROM_OUTPUT(name, from_y, second, with_alpha) \
  if (act == name) return from_y && (!with_alpha || alpha >= 0);
  GRADREG_ACTIVATIONS(GRADREG_ACT_FROM_OUTPUT)
#undef GRADREG_ACT_FROM_OUTPUT
  return false;
}

// ---------------------------------------------------------------------------------------------
// Elementary functions. On the CPU, float (the opmath type of fp32/fp16/bf16) uses exp and expm1
// written in plain arithmetic, so that the element loops vectorize (libm calls do not): x = n ln2 + r
// with |r| <= ln2/2 (Cody-Waite), e^r - 1 from its Taylor polynomial to r^8/8! (relative error
// below 1e-9), 2^n from the exponent bits. CUDA and double use the library functions.

// Σ_i c[i] x^i by Horner's rule, c lowest degree first (a loop of constant length: unrolled).
template <typename T, int N>
C10_HOST_DEVICE inline T horner(const T (&c)[N], T x) {
  T p = c[N - 1];
  for (int i = N - 2; i >= 0; --i) p = p * x + c[i];
  return p;
}

// exp(x) = s (1 + q): s = 2^n, q = e^r - 1.
inline void exp_parts(float x, float& s, float& q) {  // host only
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  constexpr float kInvFactorials[7] = {0.5f, 1.0f / 6.0f, 1.0f / 24.0f, 1.0f / 120.0f, 1.0f / 720.0f,
                                       1.0f / 5040.0f, 1.0f / 40320.0f};  // 1 / (i + 2)!
  q = r + r * r * horner(kInvFactorials, r);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  std::memcpy(&s, &bits, sizeof(float));
}

template <typename T>
C10_HOST_DEVICE inline T exp_(T x) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) {
    float s, q;
    exp_parts(x, s, q);
    return x != x ? x : s + s * q;
  }
#endif
  return std::exp(x);
}

template <typename T>
C10_HOST_DEVICE inline T expm1_(T x) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) {
    float s, q;
    exp_parts(x, s, q);
    return x != x ? x : s * q + (s - 1.0f);
  }
#endif
  return std::expm1(x);
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T z) {
  return T(1) / (T(1) + exp_(-z));
}

// exp(x) and exp(x) - 1, each to full relative precision.
template <typename T>
C10_HOST_DEVICE inline void exp_and_expm1(T x, T& e, T& m) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) {
    float s, q;
    exp_parts(x, s, q);
    e = s + s * q;
    m = s * q + (s - 1.0f);
    return;
  }
#endif
  e = std::exp(x);
  m = std::expm1(x);
}

// tanh(u) and 1 - tanh(u)^2 = 4 e / (1 + e)^2 with e = exp(-2|u|): no cancellation when |t| -> 1.
template <typename T>
C10_HOST_DEVICE inline void tanh_sech2(T u, T& t, T& q) {
  T e, m;  // e = exp(-2|u|) in (0, 1], m = e - 1
  exp_and_expm1(T(-2) * (u < T(0) ? -u : u), e, m);
  const T d = T(2) + m;  // 1 + e
  const T ta = -m / d;
  t = u < T(0) ? -ta : ta;
  q = T(4) * e / (d * d);
}

template <typename T>
C10_HOST_DEVICE inline T tanh_(T u) {
  T t, q;
  tanh_sech2(u, t, q);
  return u != u ? u : t;
}

// Polynomial fits (numpy least squares at Chebyshev nodes; absolute error 1.5e-7 in float,
// 3e-15 in double): erf(z) = z P(z^2) for |z| < 1, 1 - exp(-z^2) Q(1 / (1 + |z|/2)) above,
// |z| clamped to 6. The same fits as the Triton kernels (gradreg_fast/triton/bias_act.py).
template <typename T>
C10_HOST_DEVICE inline T erf_(T z) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) {
    constexpr float P[11] = {1.128379167095513f, -0.37612638903177553f, 0.11283791670652926f,
                             -0.026866170594406182f, 0.005223977199712658f, -0.0008548306409616672f,
                             0.0001205471382158921f, -1.4913713278303188e-05f, 1.6313591021541446e-06f,
                             -1.5202359983515584e-07f, 9.454661204489945e-09f};
    constexpr float Q[15] = {1.5124761049145619e-07f, 0.2820889548126756f, 0.282199139702075f,
                             0.24568726759219245f, 0.18494109962974437f, 0.036543864143163345f,
                             0.18866482200407475f, -0.6557860486825482f, 1.3581453418521985f,
                             -2.499320097816156f, 3.258800206005376f, -2.7635733687378057f,
                             1.474510770936276f, -0.4557770177589461f, 0.06287574985514549f};
    float a = z < 0.0f ? -z : z;
    a = a > 6.0f ? 6.0f : a;
    const float u = a * a;
    const float p = horner(P, u);
    const float q = horner(Q, 1.0f / (1.0f + 0.5f * a));
    const float r = a < 1.0f ? a * p : 1.0f - exp_(-u) * q;
    return z != z ? z : (z < 0.0f ? -r : r);
  }
#endif
  return std::erf(z);
}

// log(1 + t) for t >= 0 as 2 atanh(s), s = t / (2 + t) in [0, 1): for t <= 1 (softplus's use)
// the odd series to s^15 is accurate to 2e-9 relative, with no cancellation for small t.
template <typename T>
C10_HOST_DEVICE inline T log1p_(T t) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) {
    constexpr float kInvOdd[8] = {1.0f, 1.0f / 3.0f, 1.0f / 5.0f, 1.0f / 7.0f, 1.0f / 9.0f, 1.0f / 11.0f,
                                  1.0f / 13.0f, 1.0f / 15.0f};  // 1 / (2i + 1)
    const float s = t / (2.0f + t);
    return 2.0f * s * horner(kInvOdd, s * s);
  }
#endif
  return std::log1p(t);
}

template <int64_t A, typename T>
C10_HOST_DEVICE inline T forward(T z, T alpha) {
  if constexpr (A == kLinear) return z;
  else if constexpr (A == kRelu) return z > T(0) ? z : T(0);
  else if constexpr (A == kLeakyRelu) return z > T(0) ? z : alpha * z;
  else if constexpr (A == kTanh) return tanh_(z);
  else if constexpr (A == kSigmoid) return sigmoid(z);
  else if constexpr (A == kSoftplus)  // log(1 + e^z) = max(z, 0) + log(1 + e^-|z|)
    return z > T(kSoftplusThreshold) ? z : (z > T(0) ? z : T(0)) + log1p_(exp_(z < T(0) ? z : -z));
  else if constexpr (A == kGelu) return T(0.5) * z * (T(1) + erf_(z * T(kSqrt1_2)));
  else if constexpr (A == kGeluTanh) {
    const T k = T(kGeluK);
    return T(0.5) * z * (T(1) + tanh_(k * (z + T(kGeluC) * z * z * z)));
  } else if constexpr (A == kSilu) return z * sigmoid(z);
  else return z > T(0) ? z : alpha * expm1_(z);  // kElu
}

// act'(z), written in the reference value r (y or z, see the top of this file).
template <int64_t A, typename T>
C10_HOST_DEVICE inline T first(T r, T alpha) {
  if constexpr (A == kLinear) return T(1);
  else if constexpr (A == kRelu) return r > T(0) ? T(1) : T(0);
  else if constexpr (A == kLeakyRelu) return r > T(0) ? T(1) : alpha;
  else if constexpr (A == kTanh) return T(1) - r * r;  // r = y
  else if constexpr (A == kSigmoid) return r * (T(1) - r);  // r = y
  else if constexpr (A == kSoftplus) return r > T(kSoftplusThreshold) ? T(1) : sigmoid(r);
  else if constexpr (A == kGelu) {
    const T cdf = T(0.5) * (T(1) + erf_(r * T(kSqrt1_2)));
    const T pdf = exp_(T(-0.5) * r * r) * T(kInvSqrt2Pi);
    return cdf + r * pdf;
  } else if constexpr (A == kGeluTanh) {
    const T k = T(kGeluK), c = T(kGeluC);
    T t, q;
    tanh_sech2(k * (r + c * r * r * r), t, q);
    const T du = k * (T(1) + T(3) * c * r * r);
    return T(0.5) * (T(1) + t) + T(0.5) * r * q * du;
  } else if constexpr (A == kSilu) {
    const T s = sigmoid(r);
    return s * (T(1) + r * (T(1) - s));
  } else return r > T(0) ? T(1) : alpha * exp_(r);  // kElu
}

// d first(r) / d r.
template <int64_t A, typename T>
C10_HOST_DEVICE inline T second(T r, T alpha) {
  if constexpr (A == kLinear || A == kRelu || A == kLeakyRelu) return T(0);
  else if constexpr (A == kTanh) return T(-2) * r;
  else if constexpr (A == kSigmoid) return T(1) - T(2) * r;
  else if constexpr (A == kSoftplus) {
    if (r > T(kSoftplusThreshold)) return T(0);
    const T s = sigmoid(r);
    return s * (T(1) - s);
  } else if constexpr (A == kGelu) {
    const T pdf = exp_(T(-0.5) * r * r) * T(kInvSqrt2Pi);
    return pdf * (T(2) - r * r);
  } else if constexpr (A == kGeluTanh) {
    const T k = T(kGeluK), c = T(kGeluC);
    T t, q;
    tanh_sech2(k * (r + c * r * r * r), t, q);
    const T du = k * (T(1) + T(3) * c * r * r), ddu = T(6) * k * c * r;
    return q * (du + T(0.5) * r * (ddu - T(2) * t * du * du));
  } else if constexpr (A == kSilu) {
    const T s = sigmoid(r);
    return s * (T(1) - s) * (T(2) + r * (T(1) - T(2) * s));
  } else return r > T(0) ? T(0) : alpha * exp_(r);  // kElu
}

// Element i of each op, at r = ref[i] + bias: MODE 0 (bias_act) act(r); MODE 1 (bias_act_grad)
// a[i] · act'(r); MODE 2 (bias_act_grad2) a[i] · g[i] · act''(r). The CPU and CUDA kernels' formula.
template <int MODE, int64_t A, typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t element(acc_t r, const scalar_t* a, const scalar_t* g, int64_t i, acc_t alpha) {
  if constexpr (MODE == 0) return static_cast<scalar_t>(forward<A>(r, alpha));
  else if constexpr (MODE == 1) return static_cast<scalar_t>(static_cast<acc_t>(a[i]) * first<A>(r, alpha));
  else return static_cast<scalar_t>(static_cast<acc_t>(a[i]) * static_cast<acc_t>(g[i]) * second<A>(r, alpha));
}

// Calls f(std::integral_constant<int64_t, A>{}) for the runtime activation code.
template <typename F>
inline void dispatch_act(int64_t act, F&& f) {
  switch (act) {
#define GRADREG_ACT_CASE(name, from_y, second, with_alpha) \
  case name: f(std::integral_constant<int64_t, name>{}); break;
    GRADREG_ACTIVATIONS(GRADREG_ACT_CASE)
#undef GRADREG_ACT_CASE
    default: TORCH_CHECK(false, "gradreg_fast::bias_act: unknown activation code ", act);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks and the memory layout the kernels walk.

// Contiguous, or channels_last for a 4-D tensor that is stored that way (kept, not copied).
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Elements in memory order; the bias index of element i is (i / inner) % C.
struct Geometry {
  int64_t numel = 0;
  int64_t C = 1;
  int64_t inner = 1;
};

inline Geometry geometry(const at::Tensor& t, int64_t dim, at::MemoryFormat fmt, bool with_bias) {
  Geometry g;
  g.numel = t.numel();
  if (!with_bias) {
    g.inner = std::max<int64_t>(g.numel, 1);
    return g;
  }
  const int64_t nd = t.dim();
  // Dimensions in the order they are laid out in memory (outermost first).
  std::vector<int64_t> order(nd);
  for (const auto i : c10::irange(nd)) order[i] = i;
  if (fmt == at::MemoryFormat::ChannelsLast) order = {0, 2, 3, 1};
  int64_t pos = 0;
  for (const auto i : c10::irange(nd)) if (order[i] == dim) pos = i;
  g.C = t.size(dim);
  for (int64_t i = pos + 1; i < nd; ++i) g.inner *= t.size(order[i]);
  return g;
}

inline void check_act(int64_t act, double alpha, const char* op) {
  TORCH_CHECK(act >= 0 && act < kNumActs, "gradreg_fast::", op, ": unknown activation code ", act,
              " (0..", kNumActs - 1, ")");
  (void)alpha;
}

inline void check_main(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_floating_point(), "gradreg_fast::", op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "gradreg_fast::", op, ": ", name, " must have shape ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "gradreg_fast::", op, ": ", name,
              " must have dtype ", like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "gradreg_fast::", op, ": ", name, " must be on ",
              like.device(), ", got ", t.device());
}

// Normalizes dim and checks the bias: 1-D, size x.size(dim), x's dtype and device.
inline int64_t check_bias(const c10::optional<at::Tensor>& b, const at::Tensor& like, int64_t dim,
                          const char* op) {
  if (!b.has_value() || !b->defined()) return dim;
  TORCH_CHECK(like.dim() >= 1, "gradreg_fast::", op, ": a bias needs x with at least one dimension");
  TORCH_CHECK(dim >= -like.dim() && dim < like.dim(), "gradreg_fast::", op, ": dim ", dim,
              " out of range for a ", like.dim(), "-d tensor");
  if (dim < 0) dim += like.dim();
  TORCH_CHECK(b->dim() == 1 && b->size(0) == like.size(dim), "gradreg_fast::", op,
              ": b must have shape (", like.size(dim), ",) = (x.shape[dim],), got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == like.scalar_type(), "gradreg_fast::", op, ": b must have dtype ",
              like.scalar_type(), ", got ", b->scalar_type());
  TORCH_CHECK(b->device() == like.device(), "gradreg_fast::", op, ": b must be on ", like.device(),
              ", got ", b->device());
  return dim;
}

// The tensors the backward ops read: the reference value is y when it is given (the activations
// whose derivative is a function of the output), else x (+ b).
struct Reference {
  at::Tensor ref;   // in the layout of the main tensor
  at::Tensor bias;  // undefined when the reference is y or there is no bias
  int64_t dim = 0;
};

inline Reference reference_value(const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& b,
                                 const c10::optional<at::Tensor>& y, const at::Tensor& like, int64_t act,
                                 int64_t dim, double alpha, at::MemoryFormat fmt, const char* op) {
  const bool has_x = x.has_value() && x->defined();
  const bool has_y = y.has_value() && y->defined();
  Reference r;
  if (act == kLinear) return r;  // act' = 1 needs nothing
  if (has_y && from_output(act, alpha)) {
    check_like(*y, like, op, "y");
    r.ref = y->contiguous(fmt);
    return r;
  }
  // act' of tanh and sigmoid is written in y only (relu's and leaky_relu's sign tests read x + b as well)
  TORCH_CHECK(!(from_output(act, alpha) && has_second_derivative(act)), "gradreg_fast::", op,
              ": this activation's derivative is computed from the output: pass y");
  TORCH_CHECK(has_x, "gradreg_fast::", op, ": this activation's derivative needs x (and b); pass x",
              act == kLeakyRelu ? " (leaky_relu with alpha < 0 cannot use y)" : "");
  check_like(*x, like, op, "x");
  r.ref = x->contiguous(fmt);
  r.dim = check_bias(b, like, dim, op);
  if (b.has_value() && b->defined()) r.bias = b->contiguous();
  return r;
}

// One op's operands, checked and laid out for the kernels of both devices: the reference value and
// bias (r), `a` (bias_act_grad's grad, bias_act_grad2's gg) and `g` (bias_act_grad2's grad) in the
// layout of the op's main input, the output in that layout and the walk over it (geo). geo.numel is 0
// when there is nothing to compute (an empty tensor, or bias_act_grad2 of an activation without a
// second derivative: out is then zeros).
struct Operands {
  Reference r;
  at::Tensor a, g, out;
  Geometry geo;
};

inline Operands forward_operands(const at::Tensor& x, const c10::optional<at::Tensor>& b, int64_t act, int64_t dim,
                                 double alpha) {
  check_main(x, "bias_act", "x");
  check_act(act, alpha, "bias_act");
  Operands o;
  o.r.dim = check_bias(b, x, dim, "bias_act");
  const auto fmt = layout_of(x);
  o.r.ref = x.contiguous(fmt);
  if (b.has_value() && b->defined()) o.r.bias = b->contiguous();
  o.out = at::empty_like(o.r.ref, o.r.ref.options().memory_format(fmt));
  o.geo = geometry(o.r.ref, o.r.dim, fmt, o.r.bias.defined());
  return o;
}

inline Operands grad_operands(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                              const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y, int64_t act,
                              int64_t dim, double alpha) {
  check_main(grad, "bias_act_grad", "grad");
  check_act(act, alpha, "bias_act_grad");
  Operands o;
  const auto fmt = layout_of(grad);
  o.a = grad.contiguous(fmt);
  o.r = reference_value(x, b, y, o.a, act, dim, alpha, fmt, "bias_act_grad");
  o.out = at::empty_like(o.a, o.a.options().memory_format(fmt));
  o.geo = geometry(o.a, o.r.dim, fmt, o.r.bias.defined());
  return o;
}

inline Operands grad2_operands(const at::Tensor& gg, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                               const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y, int64_t act,
                               int64_t dim, double alpha) {
  check_main(gg, "bias_act_grad2", "gg");
  check_act(act, alpha, "bias_act_grad2");
  check_like(grad, gg, "bias_act_grad2", "grad");
  Operands o;
  const auto fmt = layout_of(gg);
  o.a = gg.contiguous(fmt);
  if (!has_second_derivative(act)) {
    o.out = at::zeros_like(o.a, o.a.options().memory_format(fmt));
    return o;
  }
  o.g = grad.contiguous(fmt);
  o.r = reference_value(x, b, y, o.a, act, dim, alpha, fmt, "bias_act_grad2");
  o.out = at::empty_like(o.a, o.a.options().memory_format(fmt));
  o.geo = geometry(o.a, o.r.dim, fmt, o.r.bias.defined());
  return o;
}

}  // namespace bias_act
}  // namespace gradreg
