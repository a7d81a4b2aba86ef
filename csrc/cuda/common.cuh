// Small device helpers shared by the kernels: loads and stores that convert to and from float32,
// warp and block sums, and the dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace sagan_ext {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ __forceinline__ float block_sum(float x, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  x = warp_sum(x);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < warps ? shared[lane] : 0.f;
  return warp_sum(x);
}

// One batch's slice of a Matrix: element (r, c) through the strides.
template <typename T>
struct BatchView {
  T* p;
  int64_t row_stride, col_stride;
  __device__ BatchView(const Matrix& m, int b)
      : p(static_cast<T*>(m.ptr) + b * m.batch_stride), row_stride(m.row_stride), col_stride(m.col_stride) {}
  __device__ T* at(int r, int c) const { return p + r * row_stride + c * col_stride; }
};

// The forward's output element o[b, row, c] = value, and with a residual also
// out[b, c, row] = x[b, c, row] + gamma * value in x's layout.
template <typename T>
__device__ __forceinline__ void store_output(const AttentionParams& p, int b, int row, int c, float value) {
  store(BatchView<T>(p.o, b).at(row, c), value);
  if (p.gamma != nullptr) {
    const float x = load(BatchView<const T>(p.x, b).at(c, row));
    store(BatchView<T>(p.out, b).at(c, row), fmaf(load(static_cast<const T*>(p.gamma)), value, x));
  }
}

// stats[b, 0, row] = m, stats[b, 1, row] = l (CONTRACT: the row max and row sum, kept apart).
__device__ __forceinline__ float* row_stats(const AttentionParams& p, int b) { return p.stats + static_cast<int64_t>(b) * 2 * p.n; }

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace sagan_ext
