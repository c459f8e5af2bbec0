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
    out[i] = element<MODE, A>(r, a, g, i, alpha);
  }
}

template <int MODE>
at::Tensor launch(const Operands& o, int64_t act, double alpha) {
  const Geometry& geo = o.geo;
  if (geo.numel == 0) return o.out;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((geo.numel + kThreads - 1) / kThreads, 32 * sms));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.out.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t A = decltype(act_c)::value;
      if constexpr (MODE == 2 && !has_second_derivative(A)) {
        return;  // never launched: grad2_operands returned zeros
      } else {
        bias_act_kernel<MODE, A, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            o.out.mutable_data_ptr<scalar_t>(), ptr(o.r.ref), ptr(o.a), ptr(o.g), ptr(o.r.bias), geo.numel, geo.C,
            geo.inner, static_cast<acc_t>(alpha));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return o.out;
}

at::Tensor bias_act_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& b, int64_t act, int64_t dim,
                         double alpha) {
  const c10::cuda::CUDAGuard guard(x.device());
  return launch<0>(forward_operands(x, b, act, dim, alpha), act, alpha);
}

at::Tensor bias_act_grad_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                              const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y,
                              int64_t act, int64_t dim, double alpha) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return launch<1>(grad_operands(grad, x, b, y, act, dim, alpha), act, alpha);
}

at::Tensor bias_act_grad2_cuda(const at::Tensor& gg, const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                               const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& y, int64_t act,
                               int64_t dim, double alpha) {
  const c10::cuda::CUDAGuard guard(gg.device());
  return launch<2>(grad2_operands(gg, grad, x, b, y, act, dim, alpha), act, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_grad", &bias_act_grad_cuda);
  m.impl("bias_act_grad2", &bias_act_grad2_cuda);
}

}  // namespace bias_act
}  // namespace gradreg
