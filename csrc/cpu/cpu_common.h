// Building blocks shared by the CPU kernels: row-major GEMM through the Fortran BLAS that
// libtorch_cpu exports (ATen's C++ cpublas entry points are not exported from the wheel), and an
// exp that GCC vectorises (std::exp does not vectorise without -ffast-math, which we avoid
// because it changes floating-point state for the whole process).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace sagan_ext_cpu {

// Row-major C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C. Column-major BLAS sees the
// transposes, so it computes C^T = op(B)^T op(A)^T: swap the operands and m/n.
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  sgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double* a,
                 int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  dgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// exp for softmax arguments x <= 0 (x - rowmax), accurate to about 2 ulp: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2 (n rounded to nearest), then a degree-7 Taylor polynomial (truncation ~5e-9) and 2^n built
// in the exponent bits. Below -87 the result underflows to (nearly) zero, as softmax wants.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (exact for |t| < 2^22): unlike floorf,
  // this vectorises under GCC's default -ftrapping-math.
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace sagan_ext_cpu
