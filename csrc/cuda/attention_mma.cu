// The attention core on tensor cores (mma.sync, sm_80+): fp16/bf16 operands with m16n8k16, fp32 as
// TF32 with m16n8k8; float32 accumulation and softmax everywhere.
//
// Forward (FlashAttention-2): a CTA of 4 warps owns kBlockM = 64 query rows (16 per warp) and one
// kDvTile = 64 slice of the value dim, and loops over kBlockN = 64 key blocks. S = Q K^T with mma,
// online softmax on the S fragments (row max and sum across a quad with shuffles), P converted in
// registers into the A operand of P V. K and V blocks are double-buffered global -> shared with
// cp.async. The value dim is tiled across CTAs (grid.z) so that the O accumulator of a warp is
// 16 x 64 fp32 (32 registers); every slice recomputes the cheap S (dk <= 64). The query/key dim is
// padded to DK = 16/32/64 with zeros in shared memory, never in global memory.
//
// Backward: delta = rowsum(dO O) (attention.cu), then three kernels that recompute P with score_tile,
// the forward's own function, and the saved (m, l):
//   dV: a CTA owns 64 keys and a 64-wide value slice; dV += P^T dO, P passed through shared memory;
//   dK: a CTA owns 64 keys; dP = dO V^T over the whole value dim, dS = P (dP - delta), dK += dS^T Q;
//   dQ: a CTA owns 64 queries; the same dS, dQ += dS K in registers.
// dQ by a second pass rather than fp32 atomics from the dK kernel: deterministic, no fp32 scratch
// or zeroing launch, and no atomics traffic (64 x dk per key block per query block); the price is
// recomputing S and dP once more, about a quarter of the backward's FLOPs at dk 32, dv 256. Until a
// GPU measures the atomics variant, determinism decides.
//
// Shared layouts: every global tile is staged in the orientation its memory has (a channel-major
// operand, positions contiguous, is stored transposed), so that copies are 16-byte cp.async
// chunks where strides and alignment allow; ldmatrix or ldmatrix.trans then turns either
// orientation into the fragment the mma wants. Rows are padded by 16 bytes against bank conflicts.
#include <math.h>

#include <type_traits>

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
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
constexpr int kBlockN = 64;           // keys per block
constexpr int kDvTile = 64;           // value channels per CTA
constexpr int kMinBlocks = 2;         // CTAs per SM: lets ptxas use up to 255 registers (its own choice spilled)
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// shared-memory tiles

// A view of a shared tile: element (r, c) at p[r * ld + c], or at p[c * ld + r] when `t` (the
// tile holds the transpose). transpose() views the same memory as the transposed matrix.
// Element access goes through two strides, so that the orientation costs no select per access.
template <typename T>
struct Tile {
  T* p;
  int ld;
  bool t;
  __device__ int row_stride() const { return t ? 1 : ld; }
  __device__ int col_stride() const { return t ? ld : 1; }
  __device__ T& at(int r, int c) const { return p[r * row_stride() + c * col_stride()]; }
  __device__ Tile transpose() const { return {p, ld, !t}; }
};

__host__ __device__ constexpr int pad_elems(int bytes_per_elem) { return 16 / bytes_per_elem; }

// Elements a ROWS x COLS tile needs in either orientation.
template <typename T, int ROWS, int COLS>
__host__ __device__ constexpr int tile_elems() {
  return (ROWS * (COLS + pad_elems(sizeof(T))) > COLS * (ROWS + pad_elems(sizeof(T))))
             ? ROWS * (COLS + pad_elems(sizeof(T)))
             : COLS * (ROWS + pad_elems(sizeof(T)));
}

// Copies the ROWS x COLS block at (r0, c0) of a batch's operand into `smem`, zero outside
// (rows, cols), and returns the tile. A channel-major operand (unit row stride) is stored
// transposed. Copies are cp.async 16-byte chunks along the unit-stride dimension when the
// addresses allow (the caller commits and waits); otherwise plain loads and stores.
template <typename T, int ROWS, int COLS>
__device__ Tile<T> stage_tile(T* smem, const BatchView<const T>& src, int r0, int rows, int c0, int cols) {
  constexpr int kChunk = 16 / sizeof(T);
  const bool transposed = src.row_stride == 1 && src.col_stride != 1;
  const Tile<T> tile{smem, (transposed ? ROWS : COLS) + pad_elems(sizeof(T)), transposed};
  // inner: the unit-stride dimension (positions if transposed), outer: the other one
  const int inner0 = transposed ? r0 : c0, inner_valid = transposed ? rows : cols, inner_n = transposed ? ROWS : COLS;
  const int outer0 = transposed ? c0 : r0, outer_valid = transposed ? cols : rows, outer_n = transposed ? COLS : ROWS;
  const int64_t outer_stride = transposed ? src.col_stride : src.row_stride;
  const bool unit = (transposed ? src.row_stride : src.col_stride) == 1;
  const bool aligned = unit && reinterpret_cast<uintptr_t>(src.p) % 16 == 0 && outer_stride % kChunk == 0 &&
                       inner0 % kChunk == 0;
  if (aligned) {
    const int chunks_per_outer = inner_n / kChunk;
    for (int idx = threadIdx.x; idx < outer_n * chunks_per_outer; idx += kThreads) {
      const int o = idx / chunks_per_outer, i = (idx % chunks_per_outer) * kChunk;
      const int valid = (outer0 + o < outer_valid) ? min(kChunk, max(0, inner_valid - (inner0 + i))) : 0;
      const T* g = valid > 0 ? src.p + (outer0 + o) * outer_stride + inner0 + i : src.p;
      ptx::cp_async_16(ptx::smem_u32(smem + o * tile.ld + i), g, valid * static_cast<int>(sizeof(T)));
    }
  } else {
    for (int idx = threadIdx.x; idx < outer_n * inner_n; idx += kThreads) {
      const int o = idx / inner_n, i = idx % inner_n;  // consecutive threads: consecutive inner elements
      const int r = transposed ? i : o, c = transposed ? o : i;
      const bool valid = r0 + r < rows && c0 + c < cols;
      smem[o * tile.ld + i] = valid ? *src.at(r0 + r, c0 + c) : T{};  // T{}: +0 without a float conversion, which
      // torch's JIT flags (-D__CUDA_NO_HALF_CONVERSIONS__ ...) remove from __half and __nv_bfloat16
    }
  }
  return tile;
}

// ---------------------------------------------------------------------------------------------
// mma fragments

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static constexpr int kK = 16;
  static __device__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { ptx::mma_m16n8k16_f16(d, a, b); }
  static __device__ uint32_t pack(float lo, float hi) { return ptx::pack_f16x2(lo, hi); }
};
template <>
struct Mma<__nv_bfloat16> {
  static constexpr int kK = 16;
  static __device__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { ptx::mma_m16n8k16_bf16(d, a, b); }
  static __device__ uint32_t pack(float lo, float hi) { return ptx::pack_bf16x2(lo, hi); }
};
template <>
struct Mma<float> {  // TF32
  static constexpr int kK = 8;
  static __device__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { ptx::mma_m16n8k8_tf32(d, a, b); }
};

__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }

// A operand (16 x kK) at rows r0.., columns k0.. of a tile view (fragment layouts: ptx.cuh).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Tile<T>& v, int r0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {  // four 8x8 matrices: (rows r0.. | r0+8..) x (cols k0.. | k0+8..)
    const int mat = lane / 8, i = lane % 8, r = r0 + 8 * (mat & 1), c = k0 + 8 * (mat >> 1);
    if (!v.t) ptx::ldmatrix_x4(a, ptx::smem_u32(&v.p[(r + i) * v.ld + c]));
    else ptx::ldmatrix_x4_trans(a, ptx::smem_u32(&v.p[(c + i) * v.ld + r]));
  } else {
    const int rs = v.row_stride(), cs = v.col_stride();
    const T* x = &v.at(r0 + lane / 4, k0 + lane % 4);
    a[0] = ptx::cvt_tf32(x[0]), a[1] = ptx::cvt_tf32(x[8 * rs]), a[2] = ptx::cvt_tf32(x[4 * cs]), a[3] = ptx::cvt_tf32(x[8 * rs + 4 * cs]);
  }
}

// B operand (kK x 8) for output columns n0..n0+7 and reduction indices k0.., from a view oriented
// (n, k), i.e. holding B^T.
template <typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const Tile<T>& v, int n0, int k0) {
  const int lane = lane_id();
  if constexpr (sizeof(T) == 2) {  // two 8x8 matrices: k0.. and k0+8..; lanes 16-31 repeat 0-15
    const int mat = (lane / 8) & 1, i = lane % 8;
    if (!v.t) ptx::ldmatrix_x2(b, ptx::smem_u32(&v.p[(n0 + i) * v.ld + k0 + 8 * mat]));
    else ptx::ldmatrix_x2_trans(b, ptx::smem_u32(&v.p[(k0 + 8 * mat + i) * v.ld + n0]));
  } else {
    const T* x = &v.at(n0 + lane / 4, k0 + lane % 4);
    b[0] = ptx::cvt_tf32(x[0]), b[1] = ptx::cvt_tf32(x[4 * v.col_stride()]);
  }
}

// The A operand of k-step `ks` taken from a 16 x (8 * NT) float accumulator (C layout), for
// P V and dS K. For 16-bit types the accumulator's column pairs are exactly A's. For TF32 they
// are not (A wants columns t and t + 4, a thread holds 2t and 2t + 1), so the k-step's reduction
// index is permuted instead of the data: A's index t means column 2t, index t + 4 column 2t + 1,
// and load_b_pairs reads B with the same permutation. No shuffles.
template <typename T, int NT>
__device__ __forceinline__ void a_from_accumulator(uint32_t (&a)[4], const float (&c)[NT][4], int ks) {
  if constexpr (sizeof(T) == 2) {
    a[0] = Mma<T>::pack(c[2 * ks][0], c[2 * ks][1]), a[1] = Mma<T>::pack(c[2 * ks][2], c[2 * ks][3]);
    a[2] = Mma<T>::pack(c[2 * ks + 1][0], c[2 * ks + 1][1]), a[3] = Mma<T>::pack(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  } else {
    a[0] = ptx::cvt_tf32(c[ks][0]), a[1] = ptx::cvt_tf32(c[ks][2]), a[2] = ptx::cvt_tf32(c[ks][1]), a[3] = ptx::cvt_tf32(c[ks][3]);
  }
}

// load_b for an A operand made by a_from_accumulator.
template <typename T>
__device__ __forceinline__ void load_b_pairs(uint32_t (&b)[2], const Tile<T>& v, int n0, int k0) {
  if constexpr (sizeof(T) == 2) {
    load_b(b, v, n0, k0);
  } else {
    const T* x = &v.at(n0 + lane_id() / 4, k0 + 2 * (lane_id() % 4));
    b[0] = ptx::cvt_tf32(x[0]), b[1] = ptx::cvt_tf32(x[v.col_stride()]);
  }
}

template <typename T, int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// the pieces the forward and backward share

// s = q k^T for a warp's 16 query rows (from `row` of q_tile) and a 64-key block (k_tile oriented
// (key, channel)). The one definition of the score arithmetic: the forward and all three backward
// kernels call it, so the backward recomputes exactly the forward's s (same tiles, same k-step
// order). Q's fragments are reloaded from shared memory per block rather than held in registers
// (up to 32 of them for TF32 at dk 64), which kept the TF32 forward from spilling.
template <typename T, int DK>
__device__ __forceinline__ void score_tile(float (&s)[kBlockN / 8][4], const Tile<T>& q_tile, int row, const Tile<T>& k_tile) {
  zero<T>(s);
#pragma unroll
  for (int ks = 0; ks < DK / Mma<T>::kK; ++ks) {
    uint32_t a[4];
    load_a(a, q_tile, row, ks * Mma<T>::kK);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      uint32_t b[2];
      load_b(b, k_tile, nt * 8, ks * Mma<T>::kK);
      Mma<T>::run(s[nt], a, b);
    }
  }
}

// Accumulator element e of n-tile nt sits at row g + 8 (e / 2), column nt * 8 + 2t + e % 2.
__device__ __forceinline__ int acc_row(int e) { return lane_id() / 4 + 8 * (e / 2); }
__device__ __forceinline__ int acc_col(int nt, int e) { return nt * 8 + 2 * (lane_id() % 4) + e % 2; }

// The saved statistics of a thread's two accumulator rows (rows past n give p = 0).
struct RowStats {
  float m[2], inv_l[2], delta[2];
  __device__ RowStats(const AttentionParams& p, int b, int warp_row0) {
    const float* stats = row_stats(p, b);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + acc_row(2 * h);
      const bool valid = row < p.n;
      m[h] = valid ? stats[row] : INFINITY;
      inv_l[h] = valid ? 1.f / stats[p.n + row] : 0.f;
      delta[h] = valid ? p.delta[static_cast<int64_t>(b) * p.n + row] : 0.f;
    }
  }
};

// s -> p = exp(s - m) / l in place; keys past m give 0. exp2 of the difference, as the forward.
__device__ __forceinline__ void probabilities(float (&s)[kBlockN / 8][4], int j0, int keys, const RowStats& r) {
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s[nt][e] = j0 + acc_col(nt, e) < keys ? exp2f((s[nt][e] - r.m[e / 2]) * kLog2e) * r.inv_l[e / 2] : 0.f;
}

// dp = dO V^T for a warp's 16 query rows (from i0 + 16 warp) and the 64-key block at j0, over the
// whole value dim in kDvTile slices staged through do_s and v_s. Starts and ends with all of the
// block's threads; the caller's other tiles stay untouched.
template <typename T>
__device__ void dp_tile(float (&dp)[kBlockN / 8][4], T* do_s, T* v_s, const AttentionParams& p, int b, int i0, int j0) {
  const BatchView<const T> d_o(p.d_o, b), v(p.v, b);
  const int warp = threadIdx.x / 32;
  zero<T>(dp);
  for (int c0 = 0; c0 < p.dv; c0 += kDvTile) {
    __syncthreads();  // the previous slice's readers are done
    const Tile<T> do_tile = stage_tile<T, kBlockM, kDvTile>(do_s, d_o, i0, p.n, c0, p.dv);
    const Tile<T> v_tile = stage_tile<T, kBlockN, kDvTile>(v_s, v, j0, p.m, c0, p.dv);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
#pragma unroll 1  // ks only addresses shared memory: a rolled loop saves registers
    for (int ks = 0; ks < kDvTile / Mma<T>::kK; ++ks) {
      uint32_t a[4];
      load_a(a, do_tile, 16 * warp, ks * Mma<T>::kK);
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        uint32_t bf[2];
        load_b(bf, v_tile, nt * 8, ks * Mma<T>::kK);
        Mma<T>::run(dp[nt], a, bf);
      }
    }
  }
}

// Stores a warp's 16 x (8 NT) accumulator at rows row0.., columns c0.. of a batch's operand.
template <typename T, int NT>
__device__ __forceinline__ void store_accumulator(const BatchView<T>& dst, const float (&c)[NT][4], int row0, int rows, int c0,
                                                  int cols) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + acc_row(e), col = c0 + acc_col(nt, e);
      if (r < rows && col < cols) store(dst.at(r, col), c[nt][e]);
    }
}

template <typename T, int ROWS, int COLS>
__host__ __device__ constexpr int tile_bytes() {
  return tile_elems<T, ROWS, COLS>() * static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// forward

template <typename T, int DK>
constexpr int forward_smem() {
  return tile_bytes<T, kBlockM, DK>() + 2 * tile_bytes<T, kBlockN, DK>() + 2 * tile_bytes<T, kBlockN, kDvTile>();
}

template <typename T, int DK>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attention_forward_mma_kernel(AttentionParams p) {
#if SAGAN_EXT_TENSOR_CORES
  constexpr int kK = Mma<T>::kK;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const q_s = reinterpret_cast<T*>(smem);
  T* const k_s = q_s + tile_elems<T, kBlockM, DK>();    // two buffers
  T* const v_s = k_s + 2 * tile_elems<T, kBlockN, DK>();  // two buffers
  const int b = blockIdx.y, row0 = blockIdx.x * kBlockM, c0 = blockIdx.z * kDvTile, warp = threadIdx.x / 32;
  const BatchView<const T> q(p.q, b), k(p.k, b), v(p.v, b);
  const auto k_buffer = [&](int i) { return k_s + (i % 2) * tile_elems<T, kBlockN, DK>(); };
  const auto v_buffer = [&](int i) { return v_s + (i % 2) * tile_elems<T, kBlockN, kDvTile>(); };

  const Tile<T> q_tile = stage_tile<T, kBlockM, DK>(q_s, q, row0, p.n, 0, p.dk);
  Tile<T> k_tile = stage_tile<T, kBlockN, DK>(k_buffer(0), k, 0, p.m, 0, p.dk);
  Tile<T> v_tile = stage_tile<T, kBlockN, kDvTile>(v_buffer(0), v, 0, p.m, c0, p.dv);
  ptx::cp_async_commit();

  float acc[kDvTile / 8][4], m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // l: this thread's columns
  zero<T>(acc);
  const int key_blocks = (p.m + kBlockN - 1) / kBlockN;
  for (int jb = 0; jb < key_blocks; ++jb) {
    const int j0 = jb * kBlockN;
    Tile<T> k_next = k_tile, v_next = v_tile;
    if (jb + 1 < key_blocks) {  // the next block's copies fly while this one computes
      k_next = stage_tile<T, kBlockN, DK>(k_buffer(jb + 1), k, j0 + kBlockN, p.m, 0, p.dk);
      v_next = stage_tile<T, kBlockN, kDvTile>(v_buffer(jb + 1), v, j0 + kBlockN, p.m, c0, p.dv);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();

    float s[kBlockN / 8][4];
    score_tile<T, DK>(s, q_tile, 16 * warp, k_tile);
    float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (j0 + acc_col(nt, e) >= p.m) s[nt][e] = -INFINITY;
        m_new[e / 2] = fmaxf(m_new[e / 2], s[nt][e]);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // a row lives in the 4 lanes of a quad
      m_new[h] = fmaxf(m_new[h], __shfl_xor_sync(0xffffffffu, m_new[h], 1));
      m_new[h] = fmaxf(m_new[h], __shfl_xor_sync(0xffffffffu, m_new[h], 2));
      alpha[h] = exp2f((m_run[h] - m_new[h]) * kLog2e);  // 0 on the first block (m_new is finite: a block has a key)
      l_run[h] *= alpha[h];
      m_run[h] = m_new[h];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f((s[nt][e] - m_new[e / 2]) * kLog2e);  // subtract first (CONTRACT)
        l_run[e / 2] += s[nt][e];
      }
#pragma unroll
    for (int nt = 0; nt < kDvTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e / 2];
    const Tile<T> v_by_channel = v_tile.transpose();  // (channel, key): B^T of P V
#pragma unroll
    for (int ks = 0; ks < kBlockN / kK; ++ks) {
      uint32_t pa[4];
      a_from_accumulator<T>(pa, s, ks);
#pragma unroll
      for (int nt = 0; nt < kDvTile / 8; ++nt) {
        uint32_t bf[2];
        load_b_pairs(bf, v_by_channel, nt * 8, ks * kK);
        Mma<T>::run(acc[nt], pa, bf);
      }
    }
    __syncthreads();  // this block's buffers are free for the copies of block jb + 2
    k_tile = k_next, v_tile = v_next;
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  const int warp_row0 = row0 + 16 * warp;
#pragma unroll
  for (int nt = 0; nt < kDvTile / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = warp_row0 + acc_row(e), c = c0 + acc_col(nt, e);
      if (row < p.n && c < p.dv) store_output<T>(p, b, row, c, acc[nt][e] / l_run[e / 2]);
    }
  if (blockIdx.z == 0 && lane_id() % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + acc_row(2 * h);
      if (row < p.n) row_stats(p, b)[row] = m_run[h], row_stats(p, b)[p.n + row] = l_run[h];
    }
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// backward

// dQ for 64 query rows: loops over key blocks; dS = P (dP - delta) in registers, dQ += dS K.
template <typename T, int DK>
constexpr int dq_smem() {
  return tile_bytes<T, kBlockM, DK>() + tile_bytes<T, kBlockN, DK>() + tile_bytes<T, kBlockM, kDvTile>() +
         tile_bytes<T, kBlockN, kDvTile>();
}

template <typename T, int DK>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attention_dq_mma_kernel(AttentionParams p) {
#if SAGAN_EXT_TENSOR_CORES
  constexpr int kK = Mma<T>::kK;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const q_s = reinterpret_cast<T*>(smem);
  T* const k_s = q_s + tile_elems<T, kBlockM, DK>();
  T* const do_s = k_s + tile_elems<T, kBlockN, DK>();
  T* const v_s = do_s + tile_elems<T, kBlockM, kDvTile>();
  const int b = blockIdx.y, row0 = blockIdx.x * kBlockM, warp = threadIdx.x / 32;
  const BatchView<const T> q(p.q, b), k(p.k, b);
  const Tile<T> q_tile = stage_tile<T, kBlockM, DK>(q_s, q, row0, p.n, 0, p.dk);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  const RowStats stats(p, b, row0 + 16 * warp);
  float dq[DK / 8][4];
  zero<T>(dq);
  for (int j0 = 0; j0 < p.m; j0 += kBlockN) {
    __syncthreads();  // the previous block's K readers are done
    const Tile<T> k_tile = stage_tile<T, kBlockN, DK>(k_s, k, j0, p.m, 0, p.dk);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    score_tile<T, DK>(s, q_tile, 16 * warp, k_tile);
    probabilities(s, j0, p.m, stats);
    dp_tile<T>(dp, do_s, v_s, p, b, row0, j0);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - stats.delta[e / 2]);  // dS
    const Tile<T> k_by_channel = k_tile.transpose();
#pragma unroll
    for (int ks = 0; ks < kBlockN / kK; ++ks) {
      uint32_t a[4];
      a_from_accumulator<T>(a, dp, ks);
#pragma unroll
      for (int nt = 0; nt < DK / 8; ++nt) {
        uint32_t bf[2];
        load_b_pairs(bf, k_by_channel, nt * 8, ks * kK);
        Mma<T>::run(dq[nt], a, bf);
      }
    }
  }
  store_accumulator(BatchView<T>(p.dq, b), dq, row0 + 16 * warp, p.n, 0, p.dk);
#else
  __trap();
#endif
}

// Writes a warp's 16 x 64 accumulator (rows 16 warp.., as T) into a (query, key) shared tile, so
// that the warps owning keys can read it transposed.
template <typename T>
__device__ __forceinline__ Tile<T> share_accumulator(T* smem, const float (&c)[kBlockN / 8][4]) {
  const Tile<T> tile{smem, kBlockN + pad_elems(sizeof(T)), false};
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) store(&tile.at(16 * warp + acc_row(e), acc_col(nt, e)), c[nt][e]);
  return tile;
}

// dK for 64 keys: loops over query blocks; every warp computes P and dS for its 16 query rows
// (score_tile as in the forward), shares dS through shared memory, then owns 16 keys for
// dK += dS^T Q.
template <typename T, int DK>
constexpr int dk_smem() {
  return tile_bytes<T, kBlockN, DK>() + tile_bytes<T, kBlockM, DK>() + tile_bytes<T, kBlockM, kDvTile>() +
         tile_bytes<T, kBlockN, kDvTile>() + tile_bytes<T, kBlockM, kBlockN>();
}

template <typename T, int DK>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attention_dk_mma_kernel(AttentionParams p) {
#if SAGAN_EXT_TENSOR_CORES
  constexpr int kK = Mma<T>::kK;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const k_s = reinterpret_cast<T*>(smem);
  T* const q_s = k_s + tile_elems<T, kBlockN, DK>();
  T* const do_s = q_s + tile_elems<T, kBlockM, DK>();
  T* const v_s = do_s + tile_elems<T, kBlockM, kDvTile>();
  T* const ds_s = v_s + tile_elems<T, kBlockN, kDvTile>();
  const int b = blockIdx.y, j0 = blockIdx.x * kBlockN, warp = threadIdx.x / 32;
  const BatchView<const T> q(p.q, b), k(p.k, b);
  const Tile<T> k_tile = stage_tile<T, kBlockN, DK>(k_s, k, j0, p.m, 0, p.dk);
  ptx::cp_async_commit();
  float dk[DK / 8][4];
  zero<T>(dk);
  for (int i0 = 0; i0 < p.n; i0 += kBlockM) {
    __syncthreads();  // the previous block's Q and dS readers are done
    const Tile<T> q_tile = stage_tile<T, kBlockM, DK>(q_s, q, i0, p.n, 0, p.dk);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    const RowStats stats(p, b, i0 + 16 * warp);
    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    score_tile<T, DK>(s, q_tile, 16 * warp, k_tile);
    probabilities(s, j0, p.m, stats);
    dp_tile<T>(dp, do_s, v_s, p, b, i0, j0);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - stats.delta[e / 2]);  // dS
    const Tile<T> ds_by_key = share_accumulator<T>(ds_s, dp).transpose();
    __syncthreads();
    const Tile<T> q_by_channel = q_tile.transpose();
#pragma unroll 1
    for (int ks = 0; ks < kBlockM / kK; ++ks) {
      uint32_t a[4];
      load_a(a, ds_by_key, 16 * warp, ks * kK);
#pragma unroll
      for (int nt = 0; nt < DK / 8; ++nt) {
        uint32_t bf[2];
        load_b(bf, q_by_channel, nt * 8, ks * kK);
        Mma<T>::run(dk[nt], a, bf);
      }
    }
  }
  store_accumulator(BatchView<T>(p.dk_out, b), dk, j0 + 16 * warp, p.m, 0, p.dk);
#else
  __trap();
#endif
}

// dV for 64 keys and a kDvTile slice of the value dim: dV += P^T dO, P shared as dS is above.
template <typename T, int DK>
constexpr int dv_smem() {
  return tile_bytes<T, kBlockN, DK>() + tile_bytes<T, kBlockM, DK>() + tile_bytes<T, kBlockM, kDvTile>() +
         tile_bytes<T, kBlockM, kBlockN>();
}

template <typename T, int DK>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attention_dv_mma_kernel(AttentionParams p) {
#if SAGAN_EXT_TENSOR_CORES
  constexpr int kK = Mma<T>::kK;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const k_s = reinterpret_cast<T*>(smem);
  T* const q_s = k_s + tile_elems<T, kBlockN, DK>();
  T* const do_s = q_s + tile_elems<T, kBlockM, DK>();
  T* const p_s = do_s + tile_elems<T, kBlockM, kDvTile>();
  const int b = blockIdx.y, j0 = blockIdx.x * kBlockN, c0 = blockIdx.z * kDvTile, warp = threadIdx.x / 32;
  const BatchView<const T> q(p.q, b), k(p.k, b), d_o(p.d_o, b);
  const Tile<T> k_tile = stage_tile<T, kBlockN, DK>(k_s, k, j0, p.m, 0, p.dk);
  ptx::cp_async_commit();
  float dv[kDvTile / 8][4];
  zero<T>(dv);
  for (int i0 = 0; i0 < p.n; i0 += kBlockM) {
    __syncthreads();  // the previous block's readers are done
    const Tile<T> q_tile = stage_tile<T, kBlockM, DK>(q_s, q, i0, p.n, 0, p.dk);
    const Tile<T> do_tile = stage_tile<T, kBlockM, kDvTile>(do_s, d_o, i0, p.n, c0, p.dv);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    float s[kBlockN / 8][4];
    score_tile<T, DK>(s, q_tile, 16 * warp, k_tile);
    probabilities(s, j0, p.m, RowStats(p, b, i0 + 16 * warp));
    const Tile<T> p_by_key = share_accumulator<T>(p_s, s).transpose();
    __syncthreads();
    const Tile<T> do_by_channel = do_tile.transpose();
#pragma unroll 1
    for (int ks = 0; ks < kBlockM / kK; ++ks) {
      uint32_t a[4];
      load_a(a, p_by_key, 16 * warp, ks * kK);
#pragma unroll
      for (int nt = 0; nt < kDvTile / 8; ++nt) {
        uint32_t bf[2];
        load_b(bf, do_by_channel, nt * 8, ks * kK);
        Mma<T>::run(dv[nt], a, bf);
      }
    }
  }
  store_accumulator(BatchView<T>(p.dv_out, b), dv, j0 + 16 * warp, p.m, c0, p.dv);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// launches

int blocks(int n, int per_block) { return (n + per_block - 1) / per_block; }

template <typename... Args>
cudaError_t launch(void (*kernel)(Args...), dim3 grid, int smem_bytes, cudaStream_t stream, const AttentionParams& p) {
  if (smem_bytes > 48 * 1024) {  // above the default limit the kernel must opt in
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// Operand type of the tensor-core path: fp16, bf16, and float (as TF32).
template <typename F>
cudaError_t dispatch_mma(const AttentionParams& p, F&& f) {
  const auto with_dk = [&](auto type) {
    if (p.dk <= 16) return f(type, std::integral_constant<int, 16>{});
    if (p.dk <= 32) return f(type, std::integral_constant<int, 32>{});
    if (p.dk <= kMaxQueryKeyDim) return f(type, std::integral_constant<int, 64>{});
    return cudaErrorInvalidValue;
  };
  if (p.dk <= 0) return cudaErrorInvalidValue;
  if (p.dtype == DType::kFloat32 && !p.tf32) return cudaErrorInvalidValue;  // FFMA's (attention.cu)
  return dispatch_dtype(p.dtype, with_dk);
}

// ---------------------------------------------------------------------------------------------
// test-only: one mma through each wrapper path (kernels.h, ptx_mma_selftest)

template <typename T>
__global__ void __launch_bounds__(32) ptx_mma_selftest_kernel(const T* a, const T* b, float* d, int variant) {
#if SAGAN_EXT_TENSOR_CORES
  constexpr int kK = Mma<T>::kK, kPad = pad_elems(sizeof(T));
  __shared__ __align__(16) T a_s[16 * (16 + 8)];  // either orientation of A (16 x kK) or B (kK x 8)
  __shared__ __align__(16) T b_s[16 * (16 + 8)];
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  const bool transposed = variant == 1 || variant == 3;  // A stored (k, m) / B stored (n, k)
  const Tile<T> a_tile{a_s, transposed ? 16 + kPad : kK + kPad, transposed};
  const Tile<T> b_tile = transposed ? Tile<T>{b_s, kK + kPad, false} : Tile<T>{b_s, 8 + kPad, false}.transpose();
  if (!transposed) {  // cp.async, 16-byte chunks of rows
    constexpr int kChunk = 16 / sizeof(T);
    for (int c = lane; c < 16 * kK / kChunk; c += 32) {
      const int r = c / (kK / kChunk), i = c % (kK / kChunk) * kChunk;
      ptx::cp_async_16(ptx::smem_u32(&a_s[r * a_tile.ld + i]), a + r * kK + i, 16);
    }
    for (int c = lane; c < kK * 8 / kChunk; c += 32) {
      const int r = c / (8 / kChunk), i = c % (8 / kChunk) * kChunk;
      ptx::cp_async_16(ptx::smem_u32(&b_s[r * (8 + kPad) + i]), b + r * 8 + i, 16);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
  } else {
    for (int i = lane; i < 16 * kK; i += 32) a_tile.at(i / kK, i % kK) = a[i];
    for (int i = lane; i < kK * 8; i += 32) b_tile.at(i % 8, i / 8) = b[i];
  }
  __syncwarp();
  uint32_t af[4], bf[2];
  if (variant < 2 || sizeof(T) == 4) {
    load_a(af, a_tile, 0, 0);
    load_b(bf, b_tile, 0, 0);
  } else {  // A packed from registers, B by single 8x8 loads
    if constexpr (sizeof(T) == 2) {
      const auto at = [&](int r, int c) { return load(a + r * kK + c); };
      af[0] = Mma<T>::pack(at(g, 2 * t), at(g, 2 * t + 1)), af[1] = Mma<T>::pack(at(g + 8, 2 * t), at(g + 8, 2 * t + 1));
      af[2] = Mma<T>::pack(at(g, 2 * t + 8), at(g, 2 * t + 9)), af[3] = Mma<T>::pack(at(g + 8, 2 * t + 8), at(g + 8, 2 * t + 9));
    }
    const int i = lane % 8;
    for (int half = 0; half < 2; ++half) {
      uint32_t r[1];
      if (b_tile.t) ptx::ldmatrix_x1_trans(r, ptx::smem_u32(&b_s[(8 * half + i) * b_tile.ld]));  // stored (k, n)
      else ptx::ldmatrix_x1(r, ptx::smem_u32(&b_s[i * b_tile.ld + 8 * half]));                   // stored (n, k)
      bf[half] = r[0];
    }
  }
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  Mma<T>::run(c, af, bf);
  d[g * 8 + 2 * t] = c[0], d[g * 8 + 2 * t + 1] = c[1], d[(g + 8) * 8 + 2 * t] = c[2], d[(g + 8) * 8 + 2 * t + 1] = c[3];
#else
  __trap();
#endif
}

}  // namespace

cudaError_t attention_forward_mma(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_mma(p, [&](auto type, auto dk) {
    using T = decltype(type);
    constexpr int DK = decltype(dk)::value;
    const dim3 grid(blocks(p.n, kBlockM), p.batch, blocks(p.dv, kDvTile));
    return launch(attention_forward_mma_kernel<T, DK>, grid, forward_smem<T, DK>(), stream, p);
  });
}

cudaError_t attention_backward_mma(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_mma(p, [&](auto type, auto dk) {
    using T = decltype(type);
    constexpr int DK = decltype(dk)::value;
    cudaError_t e = launch(attention_dv_mma_kernel<T, DK>, dim3(blocks(p.m, kBlockN), p.batch, blocks(p.dv, kDvTile)),
                           dv_smem<T, DK>(), stream, p);
    if (e == cudaSuccess) e = launch(attention_dk_mma_kernel<T, DK>, dim3(blocks(p.m, kBlockN), p.batch), dk_smem<T, DK>(), stream, p);
    if (e == cudaSuccess) e = launch(attention_dq_mma_kernel<T, DK>, dim3(blocks(p.n, kBlockM), p.batch), dq_smem<T, DK>(), stream, p);
    return e;
  });
}

cudaError_t ptx_mma_selftest(const void* a, const void* b, float* d, DType dtype, bool tf32, int variant, cudaStream_t stream) {
  if (variant < 0 || variant > 3 || (dtype == DType::kFloat32 && (!tf32 || variant > 1))) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    ptx_mma_selftest_kernel<T><<<1, 32, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b), d, variant);
    return cudaGetLastError();
  });
}

}  // namespace sagan_ext
