// The attention forward on tensor cores (FlashAttention-2): a CTA of 8 warps owns 128 query rows
// (16 per warp) and DV value channels (all of them up to 256; wider value dims take 256-wide
// slices across grid.z, each recomputing the cheap scores), and walks the key blocks: S = Q K^T
// from Q fragments held in registers, online softmax on the S fragments (one FFMA and one ex2 per
// score; the O accumulator rescaled only when a row's max moved), P converted in registers into
// the A operand of O += P V. K and V blocks are double-buffered global -> shared with cp.async:
// the next block's copies fly while this one computes. The epilogue writes O, the row statistics
// (max m and sum l, kept apart: reference.attention_core says why) and, for the paper's block, the
// residual x + gamma O in x's layout.
#pragma once

#include <type_traits>

#include "mma.cuh"

namespace sagan_ext {
namespace mma {

template <typename T, int DK, int DV>
struct ForwardTraits {
  static constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
  // keys per block: 64; TF32 32, whose 4-byte operands take twice the shared memory and whose
  // scalar fragment loads hold more registers (64 spilled at DV 128)
  static constexpr int kBlockN = sizeof(T) == 4 ? 32 : 64;
  using QTile = Tile<T, DK, kBlockM>;  // [channel][query]
  using KTile = Tile<T, DK, kBlockN>;  // [channel][key], two buffers
  using VTile = Tile<T, DV, kBlockN>;  // [channel][key], two buffers
  static constexpr int kSmemBytes = QTile::kBytes + 2 * (KTile::kBytes + VTile::kBytes);
  static_assert(kSmemBytes <= 163 * 1024, "fits sm_80's shared memory per block");
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_mma_kernel(const AttentionParams p) {
#if SAGAN_EXT_TENSOR_CORES
  using Tr = ForwardTraits<T, DK, DV>;
  constexpr int kK = Mma<T>::kK, kBlockN = Tr::kBlockN;
  constexpr int kSTiles = kBlockN / 8, kOTiles = DV / 8;  // n-tiles of S and of O per warp
  extern __shared__ __align__(128) unsigned char smem[];
  const typename Tr::QTile q_s{reinterpret_cast<T*>(smem)};
  T* const k_base = q_s.p + Tr::QTile::kElems;            // two K buffers
  T* const v_base = k_base + 2 * Tr::KTile::kElems;       // two V buffers
  // buffer i of each, by arithmetic: an array of tiles indexed at run time would live in local memory
  const auto k_s = [&](int i) { return typename Tr::KTile{k_base + i * Tr::KTile::kElems}; };
  const auto v_s = [&](int i) { return typename Tr::VTile{v_base + i * Tr::VTile::kElems}; };

  const int b = blockIdx.y, row0 = blockIdx.x * Tr::kBlockM, c0 = blockIdx.z * DV, warp_row0 = 16 * warp_id();
  const ChannelStager<kThreads, T, DK, Tr::kBlockM> q_copy(BatchView<const T>(p.q, b), 0, p.dk);
  const ChannelStager<kThreads, T, DK, kBlockN> k_copy(BatchView<const T>(p.k, b), 0, p.dk);
  const ChannelStager<kThreads, T, DV, kBlockN> v_copy(BatchView<const T>(p.v, b), c0, p.dv);
  // Key blocks in the order: the partial last block first (the only one that masks keys, so the
  // loop over the others carries no masking), then the rest; online softmax takes any order.
  const int key_blocks = (p.m + kBlockN - 1) / kBlockN;
  const bool partial = p.m % kBlockN != 0;
  const auto key_block = [&](int step) { return partial ? (step == 0 ? key_blocks - 1 : step - 1) : step; };
  q_copy.copy(q_s, row0, p.n);
  ptx::cp_async_commit();
  k_copy.copy(k_s(0), key_block(0) * kBlockN, p.m);  // partial: positions past m are zeros
  v_copy.copy(v_s(0), key_block(0) * kBlockN, p.m);
  ptx::cp_async_commit();
  // Q's fragments: fp16/bf16 hold them for the whole loop; TF32 (twice as many, 32 registers at dk
  // 64) reloads them from shared memory per block, which kept its 256-wide O from spilling
  constexpr bool kHoldQ = sizeof(T) == 2;
  uint32_t q_frag[DK / kK][4];
  ptx::cp_async_wait<1>();  // Q (the first group) has landed
  __syncthreads();
  if constexpr (kHoldQ) load_q(q_frag, q_s, warp_row0);

  // m: the running row max of the scores; m_log2e = m log2(e), rounded once, as the backward
  // recomputes it from the saved m; l: the running sum of this thread's columns
  float acc[kOTiles][4], m[2] = {-INFINITY, -INFINITY}, m_log2e[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  zero(acc);
  // One key block: S = Q K^T, online softmax, O += P V. MASKED: keys past m score -inf.
  const auto step = [&](int j0, int buf, auto masked) {
    if constexpr (!kHoldQ) load_q(q_frag, q_s, warp_row0);
    float s[kSTiles][4];
    scores<T, DK>(s, q_frag, k_s(buf), 0);
    if constexpr (decltype(masked)::value) {
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j0 + 8 * nt + acc_col(e) >= p.m) s[nt][e] = -INFINITY;
    }
    // online softmax in base 2: p = exp2(s log2(e) - m log2(e)), one FFMA and one ex2 per score
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m_new = m[h];
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) m_new = fmaxf(m_new, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 1));  // a row lives in the 4 lanes of a quad
      m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 2));
      const float m_new_log2e = m_new * kLog2e;
      alpha[h] = exp2f(m_log2e[h] - m_new_log2e);  // 0 on the first block (m_new is finite: a block has a key)
      m[h] = m_new, m_log2e[h] = m_new_log2e;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(fmaf(s[nt][e], kLog2e, -m_log2e[e >> 1]));
        l[e >> 1] += s[nt][e];
      }
    // Once the running maxima settle (a few blocks in), alpha is exactly 1 for the whole warp:
    // skip the DV / 2 multiplies per thread.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int nt = 0; nt < kOTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e >> 1];
    }
    // O += P V: P from the S registers, V (B^T of the product) as stored, [channel][key]
#pragma unroll
    for (int ks = 0; ks < kBlockN / kK; ++ks) {
      uint32_t a[4];
      a_from_accumulator<T>(a, s, ks);
#pragma unroll
      for (int nt = 0; nt < kOTiles; nt += 2) {
        uint32_t bf[2][2];
        load_b2_pairs(bf, v_s(buf), 8 * nt, ks * kK);
        Mma<T>::run(acc[nt], a, bf[0]);
        Mma<T>::run(acc[nt + 1], a, bf[1]);
      }
    }
  };
  // step i: the next block's copies fly while this one computes (every block after the first is
  // whole: the partial one goes first)
  const auto prefetch = [&](int i) {
    if (i + 1 < key_blocks) {
      const int next = key_block(i + 1) * kBlockN, buf = (i + 1) & 1;
      k_copy.template copy<true>(k_s(buf), next, p.m);
      v_copy.template copy<true>(v_s(buf), next, p.m);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
  };
  prefetch(0);
  step(key_block(0) * kBlockN, 0, std::true_type{});  // masks keys past m if the block is partial
  for (int i = 1; i < key_blocks; ++i) {
    __syncthreads();  // step i - 1's buffers are free for step i + 1's copies
    prefetch(i);
    step(key_block(i) * kBlockN, i & 1, std::false_type{});
  }

  // epilogue: o = acc / l; stats; the residual out = x + gamma o in x's layout
  float inv_l[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    inv_l[h] = 1.f / l[h];
  }
  const BatchView<T> o(p.o, b);
  const bool residual = p.gamma != nullptr;
  const float gamma = residual ? load(static_cast<const T*>(p.gamma)) : 0.f;
#pragma unroll
  for (int nt = 0; nt < kOTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + warp_row0 + acc_row(e), c = c0 + 8 * nt + acc_col(e);
      if (row < p.n && c < p.dv) {
        const float value = acc[nt][e] * inv_l[e >> 1];
        store(o.at(row, c), value);
        if (residual) {
          const float x = load(BatchView<const T>(p.x, b).at(c, row));
          store(BatchView<T>(p.out, b).at(c, row), fmaf(gamma, value, x));
        }
      }
    }
  if (blockIdx.z == 0 && (lane_id() & 3) == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp_row0 + acc_row(2 * h);
      if (row < p.n) row_stats(p, b)[row] = m[h], row_stats(p, b)[p.n + row] = l[h];
    }
  }
#else
  __trap();
#endif
}

template <typename T, int DK, int DV>
cudaError_t launch_attention_forward_mma(const AttentionParams& p, cudaStream_t stream) {
  using Tr = ForwardTraits<T, DK, DV>;
  const dim3 grid((p.n + Tr::kBlockM - 1) / Tr::kBlockM, p.batch, (p.dv + DV - 1) / DV);
  return launch(attention_forward_mma_kernel<T, DK, DV>, grid, Tr::kSmemBytes, p, stream);
}

}  // namespace mma
}  // namespace sagan_ext
