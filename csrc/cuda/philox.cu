// CUDA kernels of the Philox Gaussian stream: gaussian_like, project and project_backward.
// The stream is defined in gradreg_fast/reference/philox.py and implemented in csrc/philox.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "philox.h"
#include "philox_checks.h"

namespace gradreg {
namespace {

using philox::Stream;
constexpr int kThreads = 256;

int grid_for(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 32 * sms)));
}

// out[e] = z[e] for e < n: one thread per block of four (one Philox call, two Box-Muller pairs).
template <typename scalar_t>
__global__ void gaussian_kernel(scalar_t* __restrict__ out, int64_t n, Stream s) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < blocks;
       q += (int64_t)gridDim.x * blockDim.x) {
    float z[4];
    s.block(static_cast<uint64_t>(q), z);
    const int64_t e = 4 * q;
    if (e + 4 <= n) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        reinterpret_cast<float4*>(out)[q] = make_float4(z[0], z[1], z[2], z[3]);
      } else {
#pragma unroll
        for (int l = 0; l < 4; ++l) out[e + l] = static_cast<scalar_t>(z[l]);
      }
    } else {
      for (int l = 0; e + l < n; ++l) out[e + l] = static_cast<scalar_t>(z[l]);
    }
  }
}

// s[i] = sum_k z[e(i, k)] x[i, k]: one warp per row, rows grid-strided.
template <typename scalar_t, typename acc_t>
__global__ void project_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ s_out, int64_t B,
                               int64_t K, bool per_sample, Stream s) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  for (int64_t i = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; i < B; i += warps) {
    acc_t acc = 0;
    const int64_t base = per_sample ? i * K : 0;
    for (int64_t k = lane; k < K; k += 32) {
      acc += static_cast<acc_t>(s.at(static_cast<uint64_t>(base + k))) * static_cast<acc_t>(x[i * K + k]);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffff, acc, off);
    if (lane == 0) s_out[i] = acc;
  }
}

// out[i, k] = g[i] z[e(i, k)] over the flat (B K,) output.
template <typename scalar_t, typename acc_t>
__global__ void project_backward_kernel(const acc_t* __restrict__ g, scalar_t* __restrict__ out,
                                        int64_t total, int64_t K, bool per_sample, Stream s) {
  for (int64_t f = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; f < total;
       f += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = f / K;
    const int64_t e = per_sample ? f : f - i * K;
    out[f] = static_cast<scalar_t>(g[i] * static_cast<acc_t>(s.at(static_cast<uint64_t>(e))));
  }
}

at::Tensor gaussian_like_cuda(const at::Tensor& x, int64_t seed, int64_t offset, bool per_sample) {
  check_stream_args(x, offset, "gaussian_like");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t row = (per_sample || x.dim() == 0) ? numel : numel / x.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gaussian_like_cuda", [&] {
    gaussian_kernel<scalar_t><<<grid_for((row + 3) / 4), kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), row, Stream(seed, offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (row < numel) {  // shared across the batch: copy row 0 into the other rows
    const at::Tensor first = out.narrow(0, 0, 1);
    out.narrow(0, 1, x.size(0) - 1).copy_(first.expand_as(out.narrow(0, 1, x.size(0) - 1)));
  }
  return out;
}

at::Tensor project_cuda(const at::Tensor& out_in, int64_t seed, int64_t offset, bool per_sample) {
  check_project_args(out_in, offset, "project");
  const c10::cuda::CUDAGuard guard(out_in.device());
  const at::Tensor x = out_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor s = at::empty({B}, x.options().dtype(reduction_dtype(x.scalar_type())));
  if (B == 0) return s;
  if (K == 0) return s.zero_();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t warps_per_block = kThreads / 32;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((B + warps_per_block - 1) / warps_per_block, 32 * sms));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "project_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    project_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), s.mutable_data_ptr<acc_t>(), B, K, per_sample, Stream(seed, offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

at::Tensor project_backward_cuda(const at::Tensor& grad_in, int64_t seed, int64_t offset, bool per_sample,
                                 int64_t num_outputs, at::ScalarType dtype) {
  check_project_backward_args(grad_in, offset, num_outputs, dtype);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const int64_t B = grad_in.size(0), K = num_outputs;
  at::Tensor out = at::empty({B, K}, grad_in.options().dtype(dtype));
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "project_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    project_backward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), total, K, per_sample,
        Stream(seed, offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CUDA, m) {
  m.impl("gaussian_like", &gaussian_like_cuda);
  m.impl("project", &project_cuda);
  m.impl("project_backward", &project_backward_cuda);
}

}  // namespace gradreg
