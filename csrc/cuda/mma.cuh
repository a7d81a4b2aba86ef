// Tiles and fragments of the tensor-core attention kernels (mma.sync, sm_80+): fp16/bf16 operands
// with m16n8k16, fp32 operands as TF32 with m16n8k8, float32 accumulators. Fragment layouts are in
// ptx.cuh. Everything here is decided at compile time: the operand type, the tile shapes and the
// orientation in which each operand sits in shared memory.
//
// Shared-memory layout. The kernels read q, k, v and dO channel-major (positions contiguous, as
// ops.py's projection GEMM leaves them; the binding copies other layouts into that one), so a
// block of positions x channels is staged as [channel][position] rows, 16-byte cp.async chunks
// along the positions. P and dS are written by the kernels as [query][key]. Rows are padded by 16
// bytes: a 64-element 16-bit row is 128 bytes, all 32 banks, and ldmatrix's eight rows at one
// column would hit the same banks; 144-byte rows put them on eight different 16-byte bank groups.
// The same padding makes the TF32 path's scalar loads (row t, column g of a 4 x 8 lane grid) hit
// 32 different banks.
//
// Operand loaders are named by the stored orientation: load_a reads an A operand (rows x k)
// stored row-major [row][k], load_a_t one stored transposed [k][row]; load_b reads a B operand
// (k x n) stored as [n][k], load_b_t one stored [k][n]. For 16-bit types they are one ldmatrix
// (.trans where the stored orientation is the transpose of the fragment's); for TF32 scalar loads
// and cvt.rna.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

// The tensor-core kernels need sm_80 (mma.m16n8k16, bf16, cp.async). Compiled for an older GPU (a
// JIT build on a V100 or T4, which builds for the GPU at hand) their bodies become a trap, so that
// the FFMA attention and the spectral norm still build there; CudaBackend never launches them there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SAGAN_EXT_TENSOR_CORES 1
#else
#define SAGAN_EXT_TENSOR_CORES 0
#endif

namespace sagan_ext {
namespace mma {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = 8, kThreads = 32 * kWarps;  // per CTA, in every kernel here

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// ---------------------------------------------------------------------------------------------
// the mma instruction per operand type

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static constexpr int kK = 16;
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16(d, a, b);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return ptx::pack_f16x2(lo, hi); }
};
template <>
struct Mma<__nv_bfloat16> {
  static constexpr int kK = 16;
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return ptx::pack_bf16x2(lo, hi); }
};
template <>
struct Mma<float> {  // TF32
  static constexpr int kK = 8;
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k8_tf32(d, a, b);
  }
};

template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// Accumulator element e of an n-tile sits at row g + 8 (e / 2), column 2t + e % 2 (g = lane / 4, t = lane % 4).
__device__ __forceinline__ int acc_row(int e) { return (lane_id() >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int acc_col(int e) { return 2 * (lane_id() & 3) + (e & 1); }

// ---------------------------------------------------------------------------------------------
// shared-memory tiles

// ROWS x COLS elements of T at p, rows padded by 16 bytes.
template <typename T, int ROWS, int COLS>
struct Tile {
  static constexpr int kRows = ROWS, kCols = COLS;
  static constexpr int kPitch = COLS + 16 / static_cast<int>(sizeof(T));  // elements
  static constexpr int kElems = ROWS * kPitch;
  static constexpr int kBytes = kElems * static_cast<int>(sizeof(T));
  T* p;
  __device__ __forceinline__ T* at(int r, int c) const { return p + r * kPitch + c; }
  __device__ __forceinline__ uint32_t addr(int r, int c) const { return ptx::smem_u32(at(r, c)); }
};

// Copies blocks of POS positions x CH channels (from ch0; zeros from nch on) of a channel-major
// operand into [channel][position] tiles with 16-byte cp.async chunks, block after block. The
// operand's rows (positions contiguous) start on 16 bytes and hold a whole number of chunks, or
// zeros up to the next whole one (the binding pads them): so a chunk is all inside the operand or
// all past npos, and past npos it writes zeros. Which chunks a thread copies, and from where, is
// worked out once; a block then costs a pointer add and a predicate per chunk. The caller commits.
template <int THREADS, typename T, int CH, int POS>
struct ChannelStager {
  using TileT = Tile<T, CH, POS>;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunksPerRow = POS / kChunk;
  static_assert(POS % kChunk == 0 && THREADS % kChunksPerRow == 0, "a thread's chunks share one column");
  static constexpr int kRowsPerPass = THREADS / kChunksPerRow;
  static constexpr int kPasses = (CH + kRowsPerPass - 1) / kRowsPerPass;
  static constexpr uint32_t kPassBytes = kRowsPerPass * TileT::kPitch * sizeof(T);
  const T* src;          // this thread's first chunk, block at position 0
  int64_t pass_stride;   // elements between this thread's passes (kRowsPerPass channels)
  uint32_t smem_offset;  // bytes from a tile's start to this thread's first chunk
  int pos;               // this thread's first position, block at position 0
  int row;               // this thread's first channel in the tile (then row + kRowsPerPass, ...)
  int passes;            // this thread's passes whose channel exists (below nch): a prefix

  __device__ __forceinline__ ChannelStager(const BatchView<const T>& view, int ch0, int nch) {
    const int chunk = threadIdx.x % kChunksPerRow;
    row = threadIdx.x / kChunksPerRow;
    pos = chunk * kChunk;
    src = view.p + static_cast<int64_t>(ch0 + row) * view.col_stride + pos;
    pass_stride = static_cast<int64_t>(kRowsPerPass) * view.col_stride;
    smem_offset = (row * TileT::kPitch + pos) * static_cast<uint32_t>(sizeof(T));
    const int rows = nch - ch0 - row;
    passes = rows > 0 ? (rows + kRowsPerPass - 1) / kRowsPerPass : 0;
  }

  // The block of positions pos0 .. pos0 + POS into `tile`; FULL: the caller knows it is inside
  // the operand.
  template <bool FULL = false>
  __device__ __forceinline__ void copy(const TileT& tile, int pos0, int npos) const {
    const bool inside = FULL || pos0 + pos < npos;
    const uint32_t dst = ptx::smem_u32(tile.p) + smem_offset;
    const T* from = src + pos0;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      if (CH % kRowsPerPass != 0 && i == kPasses - 1 && row + i * kRowsPerPass >= CH) break;  // past the tile
      ptx::cp_async_16(dst + i * kPassBytes, from + i * pass_stride, !(inside && i < passes));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// operand fragments (ptx.cuh has the layouts)

// A (16 x kK) at rows r0.., k0.. of a tile stored [row][k].
template <typename T, int R, int C>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Tile<T, R, C>& s, int r0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {  // matrices: (rows 0-7 | 8-15) x (k 0-7 | 8-15), row-block fastest
    const int mat = lane >> 3;
    ptx::ldmatrix_x4(a, s.addr(r0 + (lane & 7) + 8 * (mat & 1), k0 + 8 * (mat >> 1)));
  } else {
    const T* x = s.at(r0 + (lane >> 2), k0 + (lane & 3));
    a[0] = ptx::cvt_tf32(x[0]), a[1] = ptx::cvt_tf32(x[8 * s.kPitch]);
    a[2] = ptx::cvt_tf32(x[4]), a[3] = ptx::cvt_tf32(x[8 * s.kPitch + 4]);
  }
}

// A (16 x kK) at rows r0.., k0.. of a tile stored [k][row].
template <typename T, int R, int C>
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const Tile<T, R, C>& s, int r0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {
    const int mat = lane >> 3;
    ptx::ldmatrix_x4_trans(a, s.addr(k0 + (lane & 7) + 8 * (mat >> 1), r0 + 8 * (mat & 1)));
  } else {
    const T* x = s.at(k0 + (lane & 3), r0 + (lane >> 2));
    a[0] = ptx::cvt_tf32(x[0]), a[1] = ptx::cvt_tf32(x[8]);
    a[2] = ptx::cvt_tf32(x[4 * s.kPitch]), a[3] = ptx::cvt_tf32(x[4 * s.kPitch + 8]);
  }
}

// B (kK x 8) for two n-tiles, columns n0.. and n0 + 8.., k0.., of a tile stored [n][k].
template <typename T, int R, int C>
__device__ __forceinline__ void load_b2(uint32_t (&b)[2][2], const Tile<T, R, C>& s, int n0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {  // matrices: (n-tile 0, k 0-7), (0, k 8-15), (1, k 0-7), (1, k 8-15)
    const int mat = lane >> 3;
    uint32_t r[4];
    ptx::ldmatrix_x4(r, s.addr(n0 + (lane & 7) + 8 * (mat >> 1), k0 + 8 * (mat & 1)));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const T* x = s.at(n0 + 8 * h + (lane >> 2), k0 + (lane & 3));
      b[h][0] = ptx::cvt_tf32(x[0]), b[h][1] = ptx::cvt_tf32(x[4]);
    }
  }
}

// B (kK x 8) for two n-tiles, columns n0.. and n0 + 8.., k0.., of a tile stored [k][n].
template <typename T, int R, int C>
__device__ __forceinline__ void load_b2_t(uint32_t (&b)[2][2], const Tile<T, R, C>& s, int n0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {
    const int mat = lane >> 3;
    uint32_t r[4];
    ptx::ldmatrix_x4_trans(r, s.addr(k0 + (lane & 7) + 8 * (mat & 1), n0 + 8 * (mat >> 1)));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const T* x = s.at(k0 + (lane & 3), n0 + 8 * h + (lane >> 2));
      b[h][0] = ptx::cvt_tf32(x[0]), b[h][1] = ptx::cvt_tf32(x[4 * s.kPitch]);
    }
  }
}

// B (kK x 8) for one n-tile, columns n0.., k0.., of a tile stored [n][k] (TRANSPOSED: [k][n]); for
// products with an odd number of n-tiles.
template <bool TRANSPOSED, typename T, int R, int C>
__device__ __forceinline__ void load_b1(uint32_t (&b)[2], const Tile<T, R, C>& s, int n0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {  // matrices (k 0-7), (k 8-15); lanes 16-31 give addresses ldmatrix ignores
    const int i = lane & 15;
    if constexpr (TRANSPOSED) ptx::ldmatrix_x2_trans(b, s.addr(k0 + i, n0));
    else ptx::ldmatrix_x2(b, s.addr(n0 + (i & 7), k0 + 8 * (i >> 3)));
  } else {
    const T* x = TRANSPOSED ? s.at(k0 + (lane & 3), n0 + (lane >> 2)) : s.at(n0 + (lane >> 2), k0 + (lane & 3));
    b[0] = ptx::cvt_tf32(x[0]), b[1] = ptx::cvt_tf32(x[TRANSPOSED ? 4 * s.kPitch : 4]);
  }
}

// acc (16 x 8 NT) += A B over k = 0..K: A's 16 rows from r0 of a tile stored [row][k]
// (A_TRANSPOSED: [k][row]), B's columns from n0 of a tile stored [n][k].
template <bool A_TRANSPOSED, int K, typename T, int NT, int AR, int AC, int BR, int BC>
__device__ __forceinline__ void gemm(float (&acc)[NT][4], const Tile<T, AR, AC>& a_s, int r0, const Tile<T, BR, BC>& b_s,
                                     int n0) {
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += Mma<T>::kK) {
    uint32_t a[4];
    if constexpr (A_TRANSPOSED) load_a_t(a, a_s, r0, k0);
    else load_a(a, a_s, r0, k0);
#pragma unroll
    for (int nt = 0; nt + 1 < NT; nt += 2) {
      uint32_t b[2][2];
      load_b2(b, b_s, n0 + 8 * nt, k0);
      Mma<T>::run(acc[nt], a, b[0]);
      Mma<T>::run(acc[nt + 1], a, b[1]);
    }
    if constexpr (NT % 2 == 1) {
      uint32_t b[2];
      load_b1<false>(b, b_s, n0 + 8 * (NT - 1), k0);
      Mma<T>::run(acc[NT - 1], a, b);
    }
  }
}

// The A operand of k-step ks of a product whose left factor is a 16 x (8 NT) accumulator (P V in
// the forward, dS K in the deterministic dQ kernel). For 16-bit types the accumulator's column
// pairs are exactly A's. For TF32 they are not (A wants columns t and t + 4, a thread holds 2t and
// 2t + 1), so the k-step's reduction index is permuted instead of the data: A's index t means
// column 2t, index t + 4 column 2t + 1, and load_b2_pairs reads B with the same permutation.
template <typename T, int NT>
__device__ __forceinline__ void a_from_accumulator(uint32_t (&a)[4], const float (&c)[NT][4], int ks) {
  if constexpr (sizeof(T) == 2) {
    a[0] = Mma<T>::pack(c[2 * ks][0], c[2 * ks][1]), a[1] = Mma<T>::pack(c[2 * ks][2], c[2 * ks][3]);
    a[2] = Mma<T>::pack(c[2 * ks + 1][0], c[2 * ks + 1][1]), a[3] = Mma<T>::pack(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  } else {
    a[0] = ptx::cvt_tf32(c[ks][0]), a[1] = ptx::cvt_tf32(c[ks][2]);
    a[2] = ptx::cvt_tf32(c[ks][1]), a[3] = ptx::cvt_tf32(c[ks][3]);
  }
}

// load_b2 for an A operand made by a_from_accumulator.
template <typename T, int R, int C>
__device__ __forceinline__ void load_b2_pairs(uint32_t (&b)[2][2], const Tile<T, R, C>& s, int n0, int k0) {
  if constexpr (sizeof(T) == 2) {
    load_b2(b, s, n0, k0);
  } else {
    const int lane = lane_id();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const T* x = s.at(n0 + 8 * h + (lane >> 2), k0 + 2 * (lane & 3));
      b[h][0] = ptx::cvt_tf32(x[0]), b[h][1] = ptx::cvt_tf32(x[1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the score -> p -> dP -> dS sequence, once for every kernel

// The A fragments of a warp's 16 query rows (from r0) over the whole query/key dim, from a Q tile
// [channel][query]. Held in registers where a kernel reuses them across key blocks.
template <typename T, int DK, int BM>
__device__ __forceinline__ void load_q(uint32_t (&q)[DK / Mma<T>::kK][4], const Tile<T, DK, BM>& q_s, int r0) {
#pragma unroll
  for (int ks = 0; ks < DK / Mma<T>::kK; ++ks) load_a_t(q[ks], q_s, r0, ks * Mma<T>::kK);
}

// s = q k^T for a warp's 16 query rows and the 8 NT keys from n0 of a K tile [channel][key]. The
// one definition of the score arithmetic: the forward and both backward kernels compute s with
// this, from the same fragments in the same k-step order, so the backward's s is the forward's.
template <typename T, int DK, int NT, int BN>
__device__ __forceinline__ void scores(float (&s)[NT][4], const uint32_t (&q)[DK / Mma<T>::kK][4],
                                       const Tile<T, DK, BN>& k_s, int n0) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
  zero(s);
#pragma unroll
  for (int ks = 0; ks < DK / Mma<T>::kK; ++ks)
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[2][2];
      load_b2_t(b, k_s, n0 + 8 * nt, ks * Mma<T>::kK);
      Mma<T>::run(s[nt], q[ks], b[0]);
      Mma<T>::run(s[nt + 1], q[ks], b[1]);
    }
}

// dp += dO V^T over the `channels` (a multiple of kK) channels of a dO tile [channel][query] (rows
// r0..) and a V tile [channel][key] (keys n0..): the part of dP these tiles hold.
template <typename T, int NT, int DV, int BM, int BN>
__device__ __forceinline__ void accumulate_dp(float (&dp)[NT][4], const Tile<T, DV, BM>& do_s, int r0,
                                              const Tile<T, DV, BN>& v_s, int n0, int channels) {
#pragma unroll 2
  for (int k0 = 0; k0 < channels; k0 += Mma<T>::kK) {
    uint32_t a[4];
    load_a_t(a, do_s, r0, k0);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[2][2];
      load_b2_t(b, v_s, n0 + 8 * nt, k0);
      Mma<T>::run(dp[nt], a, b[0]);
      Mma<T>::run(dp[nt + 1], a, b[1]);
    }
  }
}

// The saved statistics of a thread's two accumulator rows (g and g + 8 of a warp's 16): m log2(e),
// 1 / l and delta. Rows past n have m = +inf and 1 / l = 0: p = 0, dS = 0.
struct RowStats {
  float m_log2e[2], inv_l[2], delta[2];
};

// p = exp2(s log2(e) - m log2(e)) / l (one FFMA and one ex2 per score, as the forward computes
// it) and ds = p (dp - delta), in place: s becomes p, dp becomes dS.
template <int NT>
__device__ __forceinline__ void softmax_grad(float (&s)[NT][4], float (&dp)[NT][4], const RowStats& r) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      const float p = exp2f(fmaf(s[nt][e], kLog2e, -r.m_log2e[h])) * r.inv_l[h];
      s[nt][e] = p;
      dp[nt][e] = p * (dp[nt][e] - r.delta[h]);
    }
}

// Writes a warp's 16 x (8 NT) accumulator as T at rows r0.., columns c0.. of a [row][col] tile
// (P and dS for the products that read them transposed).
template <typename T, int NT, int R, int C>
__device__ __forceinline__ void store_tile(const Tile<T, R, C>& s, const float (&c)[NT][4], int r0, int c0) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      T* x = s.at(r0 + acc_row(2 * h), c0 + 8 * nt + acc_col(0));
      if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<uint32_t*>(x) = Mma<T>::pack(c[nt][2 * h], c[nt][2 * h + 1]);
      } else {
        *reinterpret_cast<float2*>(x) = make_float2(c[nt][2 * h], c[nt][2 * h + 1]);
      }
    }
}

// Stores a warp's 16 x (8 NT) accumulator at rows r0.., columns c0.. of a batch's (rows, cols)
// operand, through its strides (the kernels' outputs are contiguous), scaled by `scale`.
template <typename T, int NT>
__device__ __forceinline__ void store_global(const BatchView<T>& dst, const float (&c)[NT][4], int r0, int rows, int c0,
                                             int cols) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + acc_row(e), col = c0 + 8 * nt + acc_col(e);
      if (r < rows && col < cols) store(dst.at(r, col), c[nt][e]);
    }
}

// ---------------------------------------------------------------------------------------------
// warp grids: how the warps of a CTA cover one product's ROWS x COLS output in 16 x 8 mma tiles

template <int WARPS, int ROWS, int COLS>
struct WarpGrid {
  static constexpr int kRowWarps = ROWS / 16 < WARPS ? ROWS / 16 : WARPS;
  static constexpr int kColWarps = (WARPS / kRowWarps < COLS / 8) ? WARPS / kRowWarps : COLS / 8;
  static constexpr int kRowsPerWarp = ROWS / kRowWarps;
  static constexpr int kTilesPerWarp = COLS / 8 / kColWarps;  // n-tiles per warp
  static_assert(ROWS % (16 * kRowWarps) == 0 && kRowsPerWarp == 16, "one 16-row mma tile per warp");
  static_assert(COLS % (8 * kColWarps) == 0, "whole n-tiles per warp");
  static __device__ __forceinline__ bool active() { return warp_id() < kRowWarps * kColWarps; }
  static __device__ __forceinline__ int row0() { return 16 * (warp_id() % kRowWarps); }
  static __device__ __forceinline__ int col0() { return 8 * kTilesPerWarp * (warp_id() / kRowWarps); }
};

// ---------------------------------------------------------------------------------------------
// launches

// kernel<<<grid, kThreads, smem_bytes, stream>>>(p), opting in to more than the default 48 KB of
// dynamic shared memory first.
template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int smem_bytes, const AttentionParams& p, cudaStream_t stream) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mma
}  // namespace sagan_ext
