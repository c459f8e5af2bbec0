// CUDA kernels of gradreg_fast::bias_act, bias_act_grad and bias_act_grad2 (formulas in bias_act.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bias_act.h"

namespace gradreg {
namespace bias_act {
namespace {

constexpr int kThreads = 256;

// MODE 0: out = act(ref + b)   MODE 1: out = a * act'(r)   MODE 2: out = a * g * d act'/dr (r)
// r = ref + b[(i / inner) % C] (no bias when b is null; ref null only for linear's act' = 1).
template <int MODE, int64_t A, typename scalar_t, typename acc_t>
__global__ void bias_act_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ ref,
                                const scalar_t* __restrict__ a, const scalar_t* __restrict__ g,
                                const scalar_t* __restrict__ b, int64_t n, int64_t C, int64_t inner,
                                acc_t alpha) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    acc_t r = ref != nullptr ? static_cast<acc_t>(ref[i]) : acc_t(0);
    if (b != nullptr) r += static_cast<acc_t>(b[(i / inner) % C]);
    acc_t v;
    if constexpr (MODE == 0) {
      v = forward<A>(r, alpha);
    } else if constexpr (MODE == 1) {
      v = static_cast<acc_t>(a[i]) * first<A>(r, alpha);
    } else {
      v = static_cast<acc_t>(a[i]) * static_cast<acc_t>(g[i]) * second<A>(r, alpha);
    }
    out[i] = static_cast<scalar_t>(v);
  }
}

template <int MODE>
void launch(const at::Tensor& out, const at::Tensor& ref, const at::Tensor& a, const at::Tensor& g,
            const at::Tensor& b, const Geometry& geo, int64_t act, double alpha) {
  if (geo.numel == 0) return;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((geo.numel + kThreads - 1) / kThreads, 32 * sms));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t A = decltype(act_c)::value;
      if constexpr (MODE == 2 && !has_second_derivative(A)) {
        return;  // never launched: the caller returns zeros
      } else {
        bias_act_kernel<MODE, A, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            out.mutable_data_ptr<scalar_t>(), ptr(ref), ptr(a), ptr(g), ptr(b), geo.numel, geo.C, geo.inner,
            static_cast<acc_t>(alpha));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

at::Tensor bias_act_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& b, int64_t act,
                         int64_t dim, double alpha) {
  check_main(x_in, "bias_act", "x");
  check_act(act, alpha, "bias_act");
  dim = check_bias(b, x_in, dim, "bias_act");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool with_bias = b.has_value() && b->defined();
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  const at::Tensor bc = with_bias ? b->contiguous() : at::Tensor();
  launch<0>(out, x, at::Tensor(), at::Tensor(), bc, geometry(x, dim, fmt, with_bias), act, alpha);
  return out;
}

at::Tensor bias_act_grad_cuda(const at::Tensor& grad_in, const c10::optional<at::Tensor>& x,
                              const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y,
                              int64_t act, int64_t dim, double alpha) {
  check_main(grad_in, "bias_act_grad", "grad");
  check_act(act, alpha, "bias_act_grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto fmt = layout_of(grad_in);
  const at::Tensor grad = grad_in.contiguous(fmt);
  const Reference r = reference_value(x, b, y, grad, act, dim, alpha, fmt, "bias_act_grad");
  at::Tensor out = at::empty_like(grad, grad.options().memory_format(fmt));
  launch<1>(out, r.ref, grad, at::Tensor(), r.bias, geometry(grad, r.dim, fmt, r.bias.defined()), act, alpha);
  return out;
}

at::Tensor bias_act_grad2_cuda(const at::Tensor& gg_in, const at::Tensor& grad_in,
                               const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& b,
                               const c10::optional<at::Tensor>& y, int64_t act, int64_t dim, double alpha) {
  check_main(gg_in, "bias_act_grad2", "gg");
  check_act(act, alpha, "bias_act_grad2");
  check_like(grad_in, gg_in, "bias_act_grad2", "grad");
  const c10::cuda::CUDAGuard guard(gg_in.device());
  const auto fmt = layout_of(gg_in);
  const at::Tensor gg = gg_in.contiguous(fmt);
  if (!has_second_derivative(act)) return at::zeros_like(gg, gg.options().memory_format(fmt));
  const at::Tensor grad = grad_in.contiguous(fmt);
  const Reference r = reference_value(x, b, y, gg, act, dim, alpha, fmt, "bias_act_grad2");
  at::Tensor out = at::empty_like(gg, gg.options().memory_format(fmt));
  launch<2>(out, r.ref, gg, grad, r.bias, geometry(gg, r.dim, fmt, r.bias.defined()), act, alpha);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_grad", &bias_act_grad_cuda);
  m.impl("bias_act_grad2", &bias_act_grad2_cuda);
}

}  // namespace bias_act
}  // namespace gradreg
