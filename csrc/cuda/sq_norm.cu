// CUDA kernels of gradreg_fast::sq_norm and its backward.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace gradreg {
namespace {

constexpr int kThreads = 256;

// Grid (blocks_per_row, B): each block reduces a slice of one row; several blocks per row
// combine with atomicAdd (only when a row is long and the batch small).
template <typename scalar_t, typename acc_t>
__global__ void sq_norm_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, int64_t N,
                               bool atomic) {
  const int64_t b = blockIdx.y;
  const scalar_t* row = x + b * N;
  acc_t sum = 0;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < N;
       j += (int64_t)gridDim.x * blockDim.x) {
    const acc_t v = static_cast<acc_t>(row[j]);
    sum += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffff, sum, offset);
  __shared__ acc_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffff, sum, offset);
    if (lane == 0) {
      if (atomic) atomicAdd(out + b, sum);
      else out[b] = sum;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sq_norm_backward_kernel(const acc_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ out, int64_t N, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = static_cast<scalar_t>(acc_t(2) * g[i / N] * static_cast<acc_t>(x[i]));
  }
}

at::Tensor sq_norm_cuda(const at::Tensor& x_in) {
  check_batched_floating(x_in, "sq_norm", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t N = B == 0 ? 0 : x.numel() / B;
  at::Tensor out = at::zeros({B}, x.options().dtype(reduction_dtype(x.scalar_type())));
  if (B == 0 || N == 0) return out;
  TORCH_CHECK(B <= 65535, "gradreg_fast::sq_norm (CUDA): batch size ", B, " exceeds 65535");
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_row = (N + kThreads * 4 - 1) / (kThreads * 4);
  const int64_t wanted = std::max<int64_t>(1, (4 * sms + B - 1) / B);
  const int blocks_per_row = static_cast<int>(std::min<int64_t>(per_row, wanted));
  const dim3 grid(blocks_per_row, static_cast<unsigned>(B));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sq_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sq_norm_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), N, blocks_per_row > 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sq_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_batched_floating(x_in, "sq_norm_backward", "x");
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == x_in.size(0),
              "gradreg_fast::sq_norm_backward: grad must have shape (B,) = (", x_in.size(0),
              ",), got ", grad_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t total = x.numel();
  const int64_t N = B == 0 ? 0 : total / B;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (total == 0) return out;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 32 * sms));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sq_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    sq_norm_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N,
        total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CUDA, m) {
  m.impl("sq_norm", &sq_norm_cuda);
  m.impl("sq_norm_backward", &sq_norm_backward_cuda);
}

}  // namespace gradreg
