// Test-only (tests/test_gpu.py builds it beside the library): d = a b through the tensor-core
// kernels' own fragment loaders (csrc/cuda/mma.cuh), one mma per n-tile, so that a GPU run checks
// each loader's fragment layout directly, on values every format holds exactly. a (16, K) and
// b (K, 16) row-major in the operand type (K = 16 for fp16/bf16, 8 for TF32), d (16, 16) float32.
// `variant`: 0 A by load_a ([row][k], staged with cp.async), B by load_b2 ([n][k]); 1 A by
// load_a_t ([k][row]), B by load_b2_t ([k][n]); 2 A packed from an accumulator
// (a_from_accumulator), B by load_b2_pairs; 3 as 0 with B by load_b1 per n-tile; 4 as 1 with
// B by load_b1<transposed>.
#include "ptx_selftest.h"

#include "mma.cuh"

namespace sagan_ext {
namespace {

using namespace mma;

template <typename T>
__global__ void __launch_bounds__(32) ptx_mma_selftest_kernel(const T* a, const T* b, float* d, int variant) {
#if SAGAN_EXT_TENSOR_CORES
  constexpr int kK = Mma<T>::kK;
  __shared__ __align__(16) T a_s[Tile<T, 16, 16>::kElems];  // either orientation of A (16 x kK)
  __shared__ __align__(16) T b_s[Tile<T, 16, 16>::kElems];  // either orientation of B (kK x 16)
  const int lane = lane_id();
  const Tile<T, 16, kK> a_rk{a_s};  // [row][k]
  const Tile<T, kK, 16> a_kr{a_s};  // [k][row]
  const Tile<T, 16, kK> b_nk{b_s};  // [n][k]
  const Tile<T, kK, 16> b_kn{b_s};  // [k][n]
  const bool a_transposed = variant == 1 || variant == 4, b_transposed = variant == 1 || variant == 4;
  if (variant == 0 || variant == 3) {  // A with cp.async, 16-byte chunks of its rows
    constexpr int kChunk = 16 / sizeof(T);
    for (int c = lane; c < 16 * kK / kChunk; c += 32) {
      const int r = c / (kK / kChunk), i = c % (kK / kChunk) * kChunk;
      ptx::cp_async_16(a_rk.addr(r, i), a + r * kK + i, false);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
  } else {
    for (int i = lane; i < 16 * kK; i += 32) *(a_transposed ? a_kr.at(i % kK, i / kK) : a_rk.at(i / kK, i % kK)) = a[i];
  }
  for (int i = lane; i < kK * 16; i += 32) *(b_transposed ? b_kn.at(i / 16, i % 16) : b_nk.at(i % 16, i / 16)) = b[i];
  __syncwarp();
  uint32_t af[4], bf[2][2];
  if (variant == 2) {  // A's values as a 16 x kK accumulator (C layout), then packed
    float c[kK / 8][4];
#pragma unroll
    for (int nt = 0; nt < kK / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[nt][e] = load(a + acc_row(e) * kK + 8 * nt + acc_col(e));
    a_from_accumulator<T>(af, c, 0);
    load_b2_pairs(bf, b_nk, 0, 0);
  } else {
    if (a_transposed) load_a_t(af, a_kr, 0, 0);
    else load_a(af, a_rk, 0, 0);
    if (variant == 0) load_b2(bf, b_nk, 0, 0);
    if (variant == 1) load_b2_t(bf, b_kn, 0, 0);
    if (variant == 3) load_b1<false>(bf[0], b_nk, 0, 0), load_b1<false>(bf[1], b_nk, 8, 0);
    if (variant == 4) load_b1<true>(bf[0], b_kn, 0, 0), load_b1<true>(bf[1], b_kn, 8, 0);
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    Mma<T>::run(c, af, bf[nt]);
#pragma unroll
    for (int e = 0; e < 4; ++e) d[acc_row(e) * 16 + 8 * nt + acc_col(e)] = c[e];
  }
#else
  __trap();
#endif
}

}  // namespace

cudaError_t ptx_mma_selftest(const void* a, const void* b, float* d, DType dtype, bool tf32, int variant,
                             cudaStream_t stream) {
  if (variant < 0 || variant >= kPtxSelftestVariants || (dtype == DType::kFloat32 && !tf32)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    ptx_mma_selftest_kernel<T><<<1, 32, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b), d, variant);
    return cudaGetLastError();
  });
}

}  // namespace sagan_ext
