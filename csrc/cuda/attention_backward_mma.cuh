// The attention backward on tensor cores (FlashAttention-2's structure), after the delta =
// rowsum(dO O) pre-pass: one kernel, a CTA of 8 warps per block of kBlockN keys. K and V are
// staged once; the CTA walks the query blocks (64 rows), their Q and dO double-buffered with
// cp.async, and for each computes, once:
//   S = Q K^T, P = exp(S - m) / l (the forward's score arithmetic and saved m, l), dP = dO V^T,
//   dS = P (dP - delta)                        (each warp a 16 x kBlockN/2 tile; P and dS to shared)
//   dV += P^T dO,  dK += dS^T Q               (accumulated in registers over the query blocks)
//   dQ += dS K                                (fp32 atomics into a zeroed float32 buffer)
// FLOPs per (query, key) pair: 4 dv + 6 dk, the five products' minimum. Deterministic mode
// (torch.use_deterministic_algorithms) orders the dQ additions: for each query block the CTA of
// key block j waits until the CTA of key block j - 1 has added its share (a per-(batch, query
// block) counter, FlashAttention-3's scheme), so the float32 sums are the same in every run. CTAs
// start in block-index order, so the one waited for is always running or done.
#pragma once

#include "mma.cuh"

namespace sagan_ext {
namespace mma {

template <typename T, int DK, int DV>
struct BackwardTraits {
  // Value dims over 256, and TF32 (4-byte tiles, scalar fragment loads), take 32-key blocks, so
  // that the dV accumulator stays at 64 registers per thread and the tiles fit sm_80's 163 KB;
  // Q and dO are double-buffered where that still fits.
  static constexpr bool kWide = DV > 256 || sizeof(T) == 4;
  static constexpr int kBlockM = kBackwardQueryBlock;  // query rows per step (kernels.h: the dQ turn counters)
  static constexpr int kBlockN = kWide ? 32 : 64;      // keys per CTA
  using KTile = Tile<T, DK, kBlockN>;   // [channel][key]
  using VTile = Tile<T, DV, kBlockN>;   // [channel][key]
  using QTile = Tile<T, DK, kBlockM>;   // [channel][query]
  using DoTile = Tile<T, DV, kBlockM>;  // [channel][query]
  using PTile = Tile<T, kBlockM, kBlockN>;  // P and dS, [query][key]
  using SGrid = WarpGrid<kWarps, kBlockM, kBlockN>;  // S, dP, dS
  using VGrid = WarpGrid<kWarps, kBlockN, DV>;       // dV
  using KGrid = WarpGrid<kWarps, kBlockN, DK>;       // dK
  using QGrid = WarpGrid<kWarps, kBlockM, DK>;       // dQ
  static constexpr int kSmemLimit = 163 * 1024;  // sm_80's shared memory per block
  static constexpr int kStageBytes = QTile::kBytes + DoTile::kBytes;
  static constexpr int kFixedBytes = KTile::kBytes + VTile::kBytes + 2 * PTile::kBytes;
  static constexpr int kStages = kFixedBytes + 2 * kStageBytes <= kSmemLimit ? 2 : 1;  // Q and dO buffers
  static constexpr int kSmemBytes = kFixedBytes + kStages * kStageBytes;
  static_assert(kSmemBytes <= kSmemLimit, "fits sm_80's shared memory per block");
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_mma_kernel(const AttentionParams p) {
#if SAGAN_EXT_TENSOR_CORES
  using Tr = BackwardTraits<T, DK, DV>;
  using SGrid = typename Tr::SGrid;
  using VGrid = typename Tr::VGrid;
  using KGrid = typename Tr::KGrid;
  using QGrid = typename Tr::QGrid;
  constexpr int kK = Mma<T>::kK, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  extern __shared__ __align__(128) unsigned char smem[];
  const typename Tr::KTile k_s{reinterpret_cast<T*>(smem)};
  const typename Tr::VTile v_s{k_s.p + Tr::KTile::kElems};
  const typename Tr::PTile p_s{v_s.p + Tr::VTile::kElems}, ds_s{p_s.p + Tr::PTile::kElems};
  T* const stage_base = ds_s.p + Tr::PTile::kElems;  // kStages x (Q, dO)
  constexpr int kStageElems = Tr::QTile::kElems + Tr::DoTile::kElems;
  // stage i's tiles, by arithmetic: an array of tiles indexed at run time would live in local memory
  const auto q_s = [&](int i) { return typename Tr::QTile{stage_base + i * kStageElems}; };
  const auto do_s = [&](int i) { return typename Tr::DoTile{stage_base + i * kStageElems + Tr::QTile::kElems}; };

  const int b = blockIdx.y, j0 = blockIdx.x * kBlockN;
  const int query_blocks = (p.n + kBlockM - 1) / kBlockM;
  const int dp_channels = min(DV, (p.dv + kK - 1) / kK * kK);  // channels of dP's reduction that hold data
  const ChannelStager<kThreads, T, DK, kBlockM> q_copy(BatchView<const T>(p.q, b), 0, p.dk);
  const ChannelStager<kThreads, T, DV, kBlockM> do_copy(BatchView<const T>(p.d_o, b), 0, p.dv);
  {
    const ChannelStager<kThreads, T, DK, kBlockN> k_copy(BatchView<const T>(p.k, b), 0, p.dk);
    const ChannelStager<kThreads, T, DV, kBlockN> v_copy(BatchView<const T>(p.v, b), 0, p.dv);
    k_copy.copy(k_s, j0, p.m);
    v_copy.copy(v_s, j0, p.m);
  }
  q_copy.copy(q_s(0), 0, p.n);
  do_copy.copy(do_s(0), 0, p.n);
  ptx::cp_async_commit();

  // This warp's S tile: 16 query rows from s_row0 of each block, keys s_col0.. of the CTA's block.
  // Keys past m (zero-filled K, so scores of 0) get a -inf bias: the same columns in every step.
  const int s_row0 = SGrid::row0(), s_col0 = SGrid::col0();
  float key_bias[SGrid::kTilesPerWarp][2];
#pragma unroll
  for (int nt = 0; nt < SGrid::kTilesPerWarp; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) key_bias[nt][c] = j0 + s_col0 + 8 * nt + acc_col(c) < p.m ? 0.f : -INFINITY;
  // This thread's rows of the statistics, step 0; the next step's are read while a step computes.
  const float* const m_rows = row_stats(p, b) + s_row0 + acc_row(0);
  const float* const delta_rows = p.delta + static_cast<int64_t>(b) * p.n + s_row0 + acc_row(0);
  const auto read_stats = [&](RowStats& r, int i0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool valid = i0 + s_row0 + acc_row(2 * h) < p.n;
      r.m_log2e[h] = valid ? m_rows[i0 + 8 * h] * kLog2e : INFINITY;
      r.inv_l[h] = valid ? m_rows[p.n + i0 + 8 * h] : INFINITY;  // l now, 1 / l when the step uses it
      r.delta[h] = valid ? delta_rows[i0 + 8 * h] : 0.f;
    }
  };
  RowStats stats;
  read_stats(stats, 0);
  // This thread's dQ elements: rows q_row0 + g (+ 8) of each block, columns q_col0 + 8 nt + 2t (+ 1).
  const int q_row = QGrid::row0() + acc_row(0), q_col = QGrid::col0() + acc_col(0);
  float* const dq_rows = p.dq_accum + (static_cast<int64_t>(b) * p.n + q_row) * p.dk + q_col;
  int* const turns = p.dq_turn != nullptr ? p.dq_turn + static_cast<int64_t>(b) * query_blocks : nullptr;

  float dv_acc[VGrid::kTilesPerWarp][4], dk_acc[KGrid::kTilesPerWarp][4];
  zero(dv_acc), zero(dk_acc);
  for (int ib = 0; ib < query_blocks; ++ib) {
    const int i0 = ib * kBlockM, buf = Tr::kStages == 2 ? (ib & 1) : 0;
    if (Tr::kStages == 2 && ib + 1 < query_blocks) {  // the next block's copies fly while this one computes
      q_copy.copy(q_s(buf ^ 1), i0 + kBlockM, p.n);
      do_copy.copy(do_s(buf ^ 1), i0 + kBlockM, p.n);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    RowStats row = stats;
#pragma unroll
    for (int h = 0; h < 2; ++h) row.inv_l[h] = 1.f / row.inv_l[h];  // rows past n: 1 / inf = 0
    if (ib + 1 < query_blocks) read_stats(stats, i0 + kBlockM);

    // S, P, dP, dS: one 16 x (kBlockN / 2) tile per warp
    {
      uint32_t q_frag[DK / kK][4];
      load_q(q_frag, q_s(buf), s_row0);
      float s[SGrid::kTilesPerWarp][4], dp[SGrid::kTilesPerWarp][4];
      scores<T, DK>(s, q_frag, k_s, s_col0);
#pragma unroll
      for (int nt = 0; nt < SGrid::kTilesPerWarp; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] += key_bias[nt][e & 1];
      zero(dp);
      accumulate_dp(dp, do_s(buf), s_row0, v_s, s_col0, dp_channels);
      softmax_grad(s, dp, row);
      store_tile(p_s, s, s_row0, s_col0);
      store_tile(ds_s, dp, s_row0, s_col0);
    }
    __syncthreads();
    if (VGrid::active()) gemm<true, kBlockM>(dv_acc, p_s, VGrid::row0(), do_s(buf), VGrid::col0());   // dV += P^T dO
    if (KGrid::active()) gemm<true, kBlockM>(dk_acc, ds_s, KGrid::row0(), q_s(buf), KGrid::col0());  // dK += dS^T Q
    // dQ += dS K, added into the float32 accumulator
    float dq[QGrid::kTilesPerWarp][4];
    if (QGrid::active()) {
      zero(dq);
      gemm<false, kBlockN>(dq, ds_s, QGrid::row0(), k_s, QGrid::col0());
    }
    if (turns != nullptr) {  // deterministic: key block j adds after key block j - 1
      if (threadIdx.x == 0)
        while (atomicAdd(turns + ib, 0) != static_cast<int>(blockIdx.x)) {
        }
      __syncthreads();
      __threadfence();
    }
    if (QGrid::active()) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (i0 + q_row + 8 * h >= p.n) continue;
        float* const dq_row = dq_rows + static_cast<int64_t>(i0 + 8 * h) * p.dk;
#pragma unroll
        for (int nt = 0; nt < QGrid::kTilesPerWarp; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            if (q_col + 8 * nt + c < p.dk) atomicAdd(dq_row + 8 * nt + c, dq[nt][2 * h + c]);
      }
    }
    if (turns != nullptr) {
      __threadfence();  // this block's additions land before the next key block's
      __syncthreads();
      if (threadIdx.x == 0) atomicExch(turns + ib, static_cast<int>(blockIdx.x) + 1);
    }
    __syncthreads();  // P, dS and this step's Q, dO buffers are free
    if (Tr::kStages == 1 && ib + 1 < query_blocks) {
      q_copy.copy(q_s(0), i0 + kBlockM, p.n);
      do_copy.copy(do_s(0), i0 + kBlockM, p.n);
      ptx::cp_async_commit();
    }
  }
  if (VGrid::active()) store_global(BatchView<T>(p.dv_out, b), dv_acc, j0 + VGrid::row0(), p.m, VGrid::col0(), p.dv);
  if (KGrid::active()) store_global(BatchView<T>(p.dk_out, b), dk_acc, j0 + KGrid::row0(), p.m, KGrid::col0(), p.dk);
#else
  __trap();
#endif
}

template <typename T, int DK, int DV>
cudaError_t launch_attention_backward_mma(const AttentionParams& p, cudaStream_t stream) {
  using Tr = BackwardTraits<T, DK, DV>;
  const dim3 grid((p.m + Tr::kBlockN - 1) / Tr::kBlockN, p.batch);
  return launch(attention_backward_mma_kernel<T, DK, DV>, grid, Tr::kSmemBytes, p, stream);
}

}  // namespace mma
}  // namespace sagan_ext
