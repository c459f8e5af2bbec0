// The counter-based Gaussian stream of gradreg_fast, shared by the C++ and CUDA kernels.
//
// Definition (the same as gradreg_fast/reference/philox.py, whose docstring is the specification):
// stream (seed, offset), element e, q = e / 4:
//   Philox 4x32-10, key (seed_lo, seed_hi), counter (q_lo, q_hi, offset_lo, offset_hi) -> w0..w3;
//   Box-Muller in double on (w0, w1) and (w2, w3): u_a = (w_a + 1) 2^-32, u_b = w_b 2^-32,
//   rho = sqrt(-2 log u_a), theta = 2pi u_b; z[4q] = rho cos, z[4q+1] = rho sin (from w0, w1),
//   z[4q+2], z[4q+3] likewise from (w2, w3); each rounded once to float.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GRADREG_HD __host__ __device__ __forceinline__
#else
#define GRADREG_HD inline
#endif

namespace gradreg {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr double kTwoPi = 6.283185307179586;  // float64(2 pi), as in every backend
constexpr double kTwoPow32Inv = 2.3283064365386963e-10;  // 2^-32 (exact)

struct Words {
  uint32_t w[4];
};

GRADREG_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox 4x32-10 of counter c under key (k0, k1).
GRADREG_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// A stream: the key and the upper counter words, fixed for all elements.
struct Stream {
  uint32_t k0, k1, o0, o1;
  GRADREG_HD Stream(int64_t seed, int64_t offset)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        o0(static_cast<uint32_t>(static_cast<uint64_t>(offset))),
        o1(static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32)) {}

  GRADREG_HD Words words(uint64_t q) const {
    return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), o0, o1, k0, k1);
  }

  // Box-Muller of (radius word, angle word): (rho cos theta, rho sin theta), rounded to float.
  GRADREG_HD static void box_muller(uint32_t w_radius, uint32_t w_angle, float& z_cos, float& z_sin) {
    const double u_a = (static_cast<double>(w_radius) + 1.0) * kTwoPow32Inv;
    const double u_b = static_cast<double>(w_angle) * kTwoPow32Inv;
    const double rho = sqrt(-2.0 * log(u_a));
    const double theta = kTwoPi * u_b;
    z_cos = static_cast<float>(rho * cos(theta));
    z_sin = static_cast<float>(rho * sin(theta));
  }

  // z[4q .. 4q+3].
  GRADREG_HD void block(uint64_t q, float z[4]) const {
    const Words w = words(q);
    box_muller(w.w[0], w.w[1], z[0], z[1]);
    box_muller(w.w[2], w.w[3], z[2], z[3]);
  }

  // z[e] alone (one Box-Muller pair; the other half of the pair is discarded).
  GRADREG_HD float at(uint64_t e) const {
    const Words w = words(e >> 2);
    const int lane = static_cast<int>(e & 3);
    const uint32_t w_radius = lane < 2 ? w.w[0] : w.w[2];
    const uint32_t w_angle = lane < 2 ? w.w[1] : w.w[3];
    const double u_a = (static_cast<double>(w_radius) + 1.0) * kTwoPow32Inv;
    const double u_b = static_cast<double>(w_angle) * kTwoPow32Inv;
    const double rho = sqrt(-2.0 * log(u_a));
    const double theta = kTwoPi * u_b;
    return static_cast<float>(rho * ((lane & 1) ? sin(theta) : cos(theta)));
  }
};

}  // namespace philox
}  // namespace gradreg
