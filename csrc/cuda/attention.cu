// Fused SAGAN attention core on CUDA cores (FFMA, float32 accumulation): the path for float32
// without TF32 (fp16/bf16 and TF32 run the tensor-core kernels of attention_mma.cu; kernels.h's
// uses_tensor_cores says which), and the routing between the two. One query (forward, dQ) or key (dV, dK) row per thread; the other side's rows are
// staged through shared memory kTile at a time, where every thread reads the same element (a
// broadcast). The query/key dim is padded to DK (16 or 64) in registers with zeros, never in memory.
// The value dim is tiled across blocks (kDvTile) in the forward and dV, recomputing the cheap
// q.k per tile; dK and dQ contract dO.v over the whole value dim in kChunk steps.
#include <math.h>

#include <type_traits>

#include "common.cuh"

namespace sagan_ext {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;
constexpr int kDvTile = 64;
constexpr int kChunk = 32;

template <typename T, int DK>
__device__ __forceinline__ void load_row(float (&dst)[DK], const BatchView<T>& rows, int row, int valid_rows, int dk) {
#pragma unroll
  for (int d = 0; d < DK; ++d) dst[d] = (row < valid_rows && d < dk) ? load(rows.at(row, d)) : 0.f;
}

// dst[r][c] = rows(r0 + r, c0 + c), zero outside (valid_rows, valid_cols)
template <typename T, int R, int C>
__device__ __forceinline__ void stage(float (&dst)[R][C], const BatchView<T>& rows, int r0, int valid_rows, int c0,
                                      int valid_cols) {
  for (int idx = threadIdx.x; idx < R * C; idx += blockDim.x) {
    const int r = idx / C, c = idx % C;
    dst[r][c] = (r0 + r < valid_rows && c0 + c < valid_cols) ? load(rows.at(r0 + r, c0 + c)) : 0.f;
  }
}

template <int DK>
__device__ __forceinline__ float dot(const float (&a)[DK], const float* b) {
  float s = 0.f;
#pragma unroll
  for (int d = 0; d < DK; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

template <typename T, int DK>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(AttentionParams p) {
  const int b = blockIdx.y, row = blockIdx.x * kThreads + threadIdx.x, c0 = blockIdx.z * kDvTile;
  const BatchView<const T> q_rows(p.q, b), k_rows(p.k, b), v_rows(p.v, b);
  __shared__ float k_s[kTile][DK];
  __shared__ float v_s[kTile][kDvTile];
  float q[DK];
  load_row<const T, DK>(q, q_rows, row, p.n, p.dk);
  float m = -INFINITY, l = 0.f, acc[kDvTile];
#pragma unroll
  for (int c = 0; c < kDvTile; ++c) acc[c] = 0.f;
  for (int j0 = 0; j0 < p.m; j0 += kTile) {
    const int tile = min(kTile, p.m - j0);
    __syncthreads();
    stage<const T, kTile, DK>(k_s, k_rows, j0, p.m, 0, p.dk);
    stage<const T, kTile, kDvTile>(v_s, v_rows, j0, p.m, c0, p.dv);
    __syncthreads();
    float s[kTile], tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      s[j] = j < tile ? dot<DK>(q, k_s[j]) : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(m, tile_max);  // finite: every tile has a key
    const float alpha = expf(m - m_new);      // 0 on the first tile
    l *= alpha;
#pragma unroll
    for (int c = 0; c < kDvTile; ++c) acc[c] *= alpha;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const float pj = expf(s[j] - m_new);  // 0 past the last key
      l += pj;
#pragma unroll
      for (int c = 0; c < kDvTile; ++c) acc[c] = fmaf(pj, v_s[j][c], acc[c]);
    }
    m = m_new;
  }
  if (row >= p.n) return;
  const float inv = 1.f / l;
#pragma unroll
  for (int c = 0; c < kDvTile; ++c)
    if (c0 + c < p.dv) store_output<T>(p, b, row, c0 + c, acc[c] * inv);
  if (blockIdx.z == 0) row_stats(p, b)[row] = m, row_stats(p, b)[p.n + row] = l;
}

// p_ij = exp(s_ij - m_i) / l_i with s_ij from dot<DK>, the forward's arithmetic (fmaf is symmetric
// in its factors, so dot(k, q) == dot(q, k) bit for bit).
__device__ __forceinline__ float probability(float s, float m, float l) { return expf(s - m) / l; }

// dV[j, c0:c0+kDvTile] = sum_i p_ij dO[i, c0:...]: one key per thread, queries staged.
template <typename T, int DK>
__global__ void __launch_bounds__(kThreads) attention_dv_kernel(AttentionParams p) {
  const int b = blockIdx.y, key = blockIdx.x * kThreads + threadIdx.x, c0 = blockIdx.z * kDvTile;
  const BatchView<const T> q_rows(p.q, b), k_rows(p.k, b), do_rows(p.d_o, b);
  const float* stats = row_stats(p, b);
  __shared__ float q_s[kTile][DK];
  __shared__ float do_s[kTile][kDvTile];
  __shared__ float m_s[kTile], l_s[kTile];
  float k[DK], acc[kDvTile];
  load_row<const T, DK>(k, k_rows, key, p.m, p.dk);
#pragma unroll
  for (int c = 0; c < kDvTile; ++c) acc[c] = 0.f;
  for (int i0 = 0; i0 < p.n; i0 += kTile) {
    const int tile = min(kTile, p.n - i0);
    __syncthreads();
    stage<const T, kTile, DK>(q_s, q_rows, i0, p.n, 0, p.dk);
    stage<const T, kTile, kDvTile>(do_s, do_rows, i0, p.n, c0, p.dv);
    if (threadIdx.x < tile) m_s[threadIdx.x] = stats[i0 + threadIdx.x], l_s[threadIdx.x] = stats[p.n + i0 + threadIdx.x];
    __syncthreads();
    for (int i = 0; i < tile; ++i) {
      const float pij = probability(dot<DK>(k, q_s[i]), m_s[i], l_s[i]);
#pragma unroll
      for (int c = 0; c < kDvTile; ++c) acc[c] = fmaf(pij, do_s[i][c], acc[c]);
    }
  }
  if (key >= p.m) return;
  const BatchView<T> dv(p.dv_out, b);
#pragma unroll
  for (int c = 0; c < kDvTile; ++c)
    if (c0 + c < p.dv) store(dv.at(key, c0 + c), acc[c]);
}

// dK[j] = sum_i dS_ij q_i with dS_ij = p_ij (dO_i . v_j - delta_i): one key per thread.
template <typename T, int DK>
__global__ void __launch_bounds__(kThreads) attention_dk_kernel(AttentionParams p) {
  const int b = blockIdx.y, key = blockIdx.x * kThreads + threadIdx.x;
  const BatchView<const T> q_rows(p.q, b), k_rows(p.k, b), v_rows(p.v, b), do_rows(p.d_o, b);
  const float* stats = row_stats(p, b);
  const float* delta = p.delta + static_cast<int64_t>(b) * p.n;
  __shared__ float q_s[kTile][DK];
  __shared__ float do_s[kTile][kChunk];
  __shared__ float m_s[kTile], l_s[kTile], delta_s[kTile];
  float k[DK], acc[DK];
  load_row<const T, DK>(k, k_rows, key, p.m, p.dk);
#pragma unroll
  for (int d = 0; d < DK; ++d) acc[d] = 0.f;
  for (int i0 = 0; i0 < p.n; i0 += kTile) {
    const int tile = min(kTile, p.n - i0);
    __syncthreads();
    stage<const T, kTile, DK>(q_s, q_rows, i0, p.n, 0, p.dk);
    if (threadIdx.x < tile) {
      m_s[threadIdx.x] = stats[i0 + threadIdx.x], l_s[threadIdx.x] = stats[p.n + i0 + threadIdx.x];
      delta_s[threadIdx.x] = delta[i0 + threadIdx.x];
    }
    float dp[kTile];
#pragma unroll
    for (int i = 0; i < kTile; ++i) dp[i] = 0.f;
    for (int c0 = 0; c0 < p.dv; c0 += kChunk) {
      __syncthreads();
      stage<const T, kTile, kChunk>(do_s, do_rows, i0, p.n, c0, p.dv);
      __syncthreads();
      float v[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) v[c] = (key < p.m && c0 + c < p.dv) ? load(v_rows.at(key, c0 + c)) : 0.f;
#pragma unroll
      for (int i = 0; i < kTile; ++i)
#pragma unroll
        for (int c = 0; c < kChunk; ++c) dp[i] = fmaf(do_s[i][c], v[c], dp[i]);
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      if (i < tile) {
        const float ds = probability(dot<DK>(k, q_s[i]), m_s[i], l_s[i]) * (dp[i] - delta_s[i]);
#pragma unroll
        for (int d = 0; d < DK; ++d) acc[d] = fmaf(ds, q_s[i][d], acc[d]);
      }
    }
  }
  if (key >= p.m) return;
  const BatchView<T> dk(p.dk_out, b);
#pragma unroll
  for (int d = 0; d < DK; ++d)
    if (d < p.dk) store(dk.at(key, d), acc[d]);
}

// dQ[i] = sum_j dS_ij k_j: one query per thread, keys and value chunks staged.
template <typename T, int DK>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(AttentionParams p) {
  const int b = blockIdx.y, row = blockIdx.x * kThreads + threadIdx.x;
  const BatchView<const T> q_rows(p.q, b), k_rows(p.k, b), v_rows(p.v, b), do_rows(p.d_o, b);
  const bool active = row < p.n;
  const float* stats = row_stats(p, b);
  const float m = active ? stats[row] : 0.f, l = active ? stats[p.n + row] : 1.f;
  const float delta = active ? p.delta[static_cast<int64_t>(b) * p.n + row] : 0.f;
  __shared__ float k_s[kTile][DK];
  __shared__ float v_s[kTile][kChunk];
  float q[DK], acc[DK];
  load_row<const T, DK>(q, q_rows, row, p.n, p.dk);
#pragma unroll
  for (int d = 0; d < DK; ++d) acc[d] = 0.f;
  for (int j0 = 0; j0 < p.m; j0 += kTile) {
    const int tile = min(kTile, p.m - j0);
    __syncthreads();
    stage<const T, kTile, DK>(k_s, k_rows, j0, p.m, 0, p.dk);
    float dp[kTile];
#pragma unroll
    for (int j = 0; j < kTile; ++j) dp[j] = 0.f;
    for (int c0 = 0; c0 < p.dv; c0 += kChunk) {
      __syncthreads();
      stage<const T, kTile, kChunk>(v_s, v_rows, j0, p.m, c0, p.dv);
      __syncthreads();
      float d_o[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) d_o[c] = (active && c0 + c < p.dv) ? load(do_rows.at(row, c0 + c)) : 0.f;
#pragma unroll
      for (int j = 0; j < kTile; ++j)
#pragma unroll
        for (int c = 0; c < kChunk; ++c) dp[j] = fmaf(d_o[c], v_s[j][c], dp[j]);
    }
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      if (j < tile) {
        const float ds = probability(dot<DK>(q, k_s[j]), m, l) * (dp[j] - delta);
#pragma unroll
        for (int d = 0; d < DK; ++d) acc[d] = fmaf(ds, k_s[j][d], acc[d]);
      }
    }
  }
  if (!active) return;
  const BatchView<T> dq(p.dq, b);
#pragma unroll
  for (int d = 0; d < DK; ++d)
    if (d < p.dk) store(dq.at(row, d), acc[d]);
}

// delta[b, i] = sum_c dO[b, i, c] O[b, i, c], 32 rows per block of 256 threads. o is (B, N, dv)
// contiguous and dO usually channel-major (positions contiguous): each 32 x 32 (row, channel)
// patch is read into shared memory along whichever index is contiguous in each operand, so that
// both reads are coalesced, then each row's products are summed by 8 threads.
template <typename T>
__global__ void __launch_bounds__(256) attention_delta_kernel(AttentionParams p) {
  constexpr int kRows = 32;
  __shared__ float o_s[kRows][kRows + 1], do_s[kRows][kRows + 1];  // [row][channel], padded against bank conflicts
  const int b = blockIdx.y, r0 = blockIdx.x * kRows, x = threadIdx.x % 32, y = threadIdx.x / 32;
  const BatchView<const T> o(p.o, b), d_o(p.d_o, b);
  const auto stage = [&](float (&dst)[kRows][kRows + 1], const BatchView<const T>& src, int c0) {
    const bool rows_contiguous = src.row_stride == 1;
#pragma unroll
    for (int i = 0; i < kRows / 8; ++i) {
      const int r = rows_contiguous ? x : y * (kRows / 8) + i, c = rows_contiguous ? y * (kRows / 8) + i : x;
      dst[r][c] = (r0 + r < p.n && c0 + c < p.dv) ? load(src.at(r0 + r, c0 + c)) : 0.f;
    }
  };
  const int row = threadIdx.x / 8, part = threadIdx.x % 8;  // 8 threads per row, 4 channels each per patch
  float acc = 0.f;
  for (int c0 = 0; c0 < p.dv; c0 += kRows) {
    __syncthreads();
    stage(o_s, o, c0), stage(do_s, d_o, c0);
    __syncthreads();
#pragma unroll
    for (int c = 4 * part; c < 4 * part + 4; ++c) acc = fmaf(o_s[row][c], do_s[row][c], acc);
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  if (part == 0 && r0 + row < p.n) p.delta[static_cast<int64_t>(b) * p.n + r0 + row] = acc;
}

// dk <= 16 runs the narrow instantiation; up to kMaxQueryKeyDim the wide one (two per kernel and
// dtype keeps the JIT build small).
template <typename F>
cudaError_t dispatch_dk(int dk, F&& f) {
  if (dk <= 0 || dk > kMaxQueryKeyDim) return cudaErrorInvalidValue;
  if (dk <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, kMaxQueryKeyDim>{});
}

int blocks(int n, int per_block) { return (n + per_block - 1) / per_block; }

}  // namespace

cudaError_t attention_delta(const AttentionParams& p, cudaStream_t stream) {  // N > 0: attention_backward's
  return dispatch_dtype(p.dtype, [&](auto type) {
    attention_delta_kernel<decltype(type)><<<dim3(blocks(p.n, 32), p.batch), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.n == 0) return cudaSuccess;
  if (p.m <= 0 || p.dv <= 0 || p.batch > 65535) return cudaErrorInvalidValue;
  if (uses_tensor_cores(p)) return attention_forward_mma(p, stream);
  return dispatch_dk(p.dk, [&](auto dk) {
    const dim3 grid(blocks(p.n, kThreads), p.batch, blocks(p.dv, kDvTile));
    attention_forward_kernel<float, decltype(dk)::value><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

// N = 0 is refused: no query attends, so dK = dV = 0, which the caller writes (bindings.cpp) without
// a launch; the tensor-core kernel's first copies would start at the empty q's null pointer.
cudaError_t attention_backward(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.n <= 0 || p.m <= 0 || p.dv <= 0 || p.batch > 65535) return cudaErrorInvalidValue;
  if (const cudaError_t e = attention_delta(p, stream); e != cudaSuccess) return e;
  if (uses_tensor_cores(p)) return attention_backward_mma(p, stream);
  return dispatch_dk(p.dk, [&](auto dk) {
    constexpr int DK = decltype(dk)::value;
    attention_dv_kernel<float, DK><<<dim3(blocks(p.m, kThreads), p.batch, blocks(p.dv, kDvTile)), kThreads, 0, stream>>>(p);
    attention_dk_kernel<float, DK><<<dim3(blocks(p.m, kThreads), p.batch), kThreads, 0, stream>>>(p);
    attention_dq_kernel<float, DK><<<dim3(blocks(p.n, kThreads), p.batch), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace sagan_ext
