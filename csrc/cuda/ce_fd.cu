// CUDA kernels of gradreg_fast::fd_direction and gradreg_fast::cross_entropy (+ backward, hvp).
// One translation unit for both ops (each .cu that includes ATen costs minutes to compile).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cmath>

#include "ce_fd.h"

namespace gradreg {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float dev_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_sqrt(float x) { return ::sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return ::sqrt(x); }

// Sum over the whole block (kThreads threads); every thread gets the result.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? partial[lane] : acc_t(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  __syncthreads();  // partial may be reused by a following call
  return v;
}

// ------------------------------------ fd_direction ----------------------------------------------
// Row kernel (enough rows to fill the GPU): one block per row reduces sum g^2, then streams x, g
// once more (g from L2) and writes the output: one launch.
template <typename scalar_t, typename acc_t>
__global__ void fd_direction_row_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                        scalar_t* __restrict__ out, acc_t* __restrict__ norms, int64_t N,
                                        acc_t h) {
  const int64_t b = blockIdx.x;
  const scalar_t* grow = g + b * N;
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(grow[j]);
    sum += v * v;
  }
  const acc_t n = dev_sqrt(block_sum(sum));
  const acc_t scale = n > acc_t(0) ? h / n : acc_t(0);
  if (threadIdx.x == 0) norms[b] = n;
  const scalar_t* xrow = x + b * N;
  scalar_t* orow = out + b * N;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    orow[j] = static_cast<scalar_t>(static_cast<acc_t>(xrow[j]) + scale * static_cast<acc_t>(grow[j]));
  }
}

// Split path (a few long rows): grid (blocks_per_row, B) partial sums with atomicAdd ...
template <typename scalar_t, typename acc_t>
__global__ void fd_direction_sumsq_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ sums, int64_t N) {
  const int64_t b = blockIdx.y;
  const scalar_t* grow = g + b * N;
  acc_t sum = 0;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < N; j += (int64_t)gridDim.x * blockDim.x) {
    const acc_t v = static_cast<acc_t>(grow[j]);
    sum += v * v;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) atomicAdd(sums + b, sum);
}

// ... then one elementwise pass over all of x and g.
template <typename scalar_t, typename acc_t>
__global__ void fd_direction_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ out, const acc_t* __restrict__ sums, int64_t N,
                                          int64_t total, acc_t h) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t n = dev_sqrt(sums[i / N]);
    const acc_t scale = n > acc_t(0) ? h / n : acc_t(0);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + scale * static_cast<acc_t>(g[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> fd_direction_cuda(const at::Tensor& x_in, const at::Tensor& g_in, double h) {
  check_fd_direction(x_in, g_in, h);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t total = x.numel();
  const int64_t N = B == 0 ? 0 : total / B;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor norms = at::zeros({B}, x.options().dtype(reduction_dtype(x.scalar_type())));
  if (B == 0 || N == 0) return {out, norms};
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool split = B < 2 * sms && N > 8 * kThreads && B <= 65535;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fd_direction_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t* np = norms.mutable_data_ptr<acc_t>();
    if (!split) {
      fd_direction_row_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          xp, gp, op, np, N, static_cast<acc_t>(h));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t per_row = (N + kThreads * 4 - 1) / (kThreads * 4);
      const int blocks_per_row = static_cast<int>(std::min<int64_t>(per_row, (4 * sms + B - 1) / B));
      fd_direction_sumsq_kernel<scalar_t, acc_t><<<dim3(blocks_per_row, static_cast<unsigned>(B)), kThreads, 0,
                                                   stream>>>(gp, np, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 32 * sms));
      fd_direction_apply_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(xp, gp, op, np, N, total,
                                                                                  static_cast<acc_t>(h));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (split) norms.sqrt_();  // sums of squares -> norms (same stream)
  return {out, norms};
}

// ------------------------------------ cross_entropy ---------------------------------------------
// A group of G lanes (G = 8, 16 or 32, the smallest >= K up to a warp) owns one row; a block of
// kThreads threads handles kThreads / G rows. Rows are re-read from L1/L2 for the second pass.
template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o, G);
  return v;
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t v) {
  for (int o = G / 2; o > 0; o >>= 1) v = ::max(v, __shfl_xor_sync(0xffffffff, v, o, G));
  return v;
}

template <int G, typename scalar_t, typename acc_t>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y,
                                  acc_t* __restrict__ loss, double* __restrict__ lse, int64_t B, int64_t K) {
  const int lane = threadIdx.x % G;
  const int64_t b = blockIdx.x * (int64_t)(kThreads / G) + threadIdx.x / G;
  const bool valid = b < B;  // invalid groups still join the shuffles
  const scalar_t* row = z + (valid ? b : 0) * K;
  acc_t m = -INFINITY;
  if (valid) for (int64_t k = lane; k < K; k += G) m = ::max(m, static_cast<acc_t>(row[k]));
  m = group_max<G>(m);
  const bool finite = isfinite(m);
  acc_t s = 0;
  if (valid && finite) for (int64_t k = lane; k < K; k += G) s += dev_exp(static_cast<acc_t>(row[k]) - m);
  s = group_sum<G>(s);
  if (valid && lane == 0) {
    const int64_t label = y[b];
    CUDA_KERNEL_ASSERT(label >= 0 && label < K);
    // all -inf: -inf; +inf and NaN propagate. Stored in double (see lse_per_sample).
    const double out = finite ? static_cast<double>(m) + ::log(static_cast<double>(s)) : static_cast<double>(m);
    lse[b] = out;
    loss[b] = static_cast<acc_t>(out - static_cast<double>(row[label]));
  }
}

template <int G, typename scalar_t, typename acc_t>
__global__ void ce_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ z,
                                   const int64_t* __restrict__ y, const double* __restrict__ lse,
                                   scalar_t* __restrict__ out, int64_t B, int64_t K) {
  const int lane = threadIdx.x % G;
  const int64_t b = blockIdx.x * (int64_t)(kThreads / G) + threadIdx.x / G;
  if (b >= B) return;  // no shuffles in this kernel
  const int64_t label = y[b];
  CUDA_KERNEL_ASSERT(label >= 0 && label < K);
  const acc_t gb = grad[b];
  const double s = lse[b];
  const scalar_t* row = z + b * K;
  scalar_t* orow = out + b * K;
  for (int64_t k = lane; k < K; k += G) {
    const acc_t p = dev_exp(static_cast<acc_t>(static_cast<double>(row[k]) - s)) - (k == label ? acc_t(1) : acc_t(0));
    orow[k] = static_cast<scalar_t>(gb * p);
  }
}

template <int G, typename scalar_t, typename acc_t>
__global__ void ce_hvp_kernel(const scalar_t* __restrict__ u, const acc_t* __restrict__ scale,
                              const scalar_t* __restrict__ z, const int64_t* __restrict__ y,
                              const double* __restrict__ lse, scalar_t* __restrict__ hvp, acc_t* __restrict__ dot,
                              int64_t B, int64_t K) {
  const int lane = threadIdx.x % G;
  const int64_t b = blockIdx.x * (int64_t)(kThreads / G) + threadIdx.x / G;
  const bool valid = b < B;
  const int64_t base = (valid ? b : 0) * K;
  const double s = valid ? lse[b] : 0.0;
  acc_t pu = 0;
  if (valid) {
    for (int64_t k = lane; k < K; k += G) {
      pu += dev_exp(static_cast<acc_t>(static_cast<double>(z[base + k]) - s)) * static_cast<acc_t>(u[base + k]);
    }
  }
  pu = group_sum<G>(pu);
  if (!valid) return;
  const acc_t c = scale[b];
  for (int64_t k = lane; k < K; k += G) {
    const acc_t p = dev_exp(static_cast<acc_t>(static_cast<double>(z[base + k]) - s));
    hvp[base + k] = static_cast<scalar_t>(c * p * (static_cast<acc_t>(u[base + k]) - pu));
  }
  if (lane == 0) {
    const int64_t label = y[b];
    CUDA_KERNEL_ASSERT(label >= 0 && label < K);
    dot[b] = pu - static_cast<acc_t>(u[base + label]);
  }
}

// Calls f.template operator()<G>() with the group width for K.
template <typename F>
void with_group(int64_t K, F&& f) {
  if (K <= 8) f(std::integral_constant<int, 8>{});
  else if (K <= 16) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}

inline unsigned ce_blocks(int64_t B, int G) {
  const int64_t rows = kThreads / G;
  return static_cast<unsigned>((B + rows - 1) / rows);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& labels) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyOperands o = ce_forward_operands(logits, labels);
  if (o.B == 0) return {o.loss, o.lse};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "cross_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_group(o.K, [&](auto g) {
      constexpr int G = decltype(g)::value;
      ce_forward_kernel<G, scalar_t, acc_t><<<ce_blocks(o.B, G), kThreads, 0, stream>>>(
          o.z.const_data_ptr<scalar_t>(), o.y.const_data_ptr<int64_t>(), o.loss.mutable_data_ptr<acc_t>(),
          o.lse.mutable_data_ptr<double>(), o.B, o.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {o.loss, o.lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyOperands o = ce_backward_operands(grad, logits, labels, lse);
  if (o.B == 0) return o.out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_group(o.K, [&](auto g) {
      constexpr int G = decltype(g)::value;
      ce_backward_kernel<G, scalar_t, acc_t><<<ce_blocks(o.B, G), kThreads, 0, stream>>>(
          o.grad.const_data_ptr<acc_t>(), o.z.const_data_ptr<scalar_t>(), o.y.const_data_ptr<int64_t>(),
          o.lse.const_data_ptr<double>(), o.out.mutable_data_ptr<scalar_t>(), o.B, o.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return o.out;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_hvp_cuda(const at::Tensor& u, const at::Tensor& scale,
                                                          const at::Tensor& logits, const at::Tensor& labels,
                                                          const at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyOperands o = ce_hvp_operands(u, scale, logits, labels, lse);
  if (o.B == 0) return {o.out, o.dot};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "cross_entropy_hvp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_group(o.K, [&](auto g) {
      constexpr int G = decltype(g)::value;
      ce_hvp_kernel<G, scalar_t, acc_t><<<ce_blocks(o.B, G), kThreads, 0, stream>>>(
          o.u.const_data_ptr<scalar_t>(), o.scale.const_data_ptr<acc_t>(), o.z.const_data_ptr<scalar_t>(),
          o.y.const_data_ptr<int64_t>(), o.lse.const_data_ptr<double>(), o.out.mutable_data_ptr<scalar_t>(),
          o.dot.mutable_data_ptr<acc_t>(), o.B, o.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {o.out, o.dot};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradreg_fast, CUDA, m) {
  m.impl("fd_direction", &fd_direction_cuda);
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
  m.impl("cross_entropy_hvp", &cross_entropy_hvp_cuda);
}

}  // namespace gradreg
