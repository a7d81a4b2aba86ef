// Flash-style SAGAN attention on the CPU: o = softmax(q k^T) v with unscaled scores.
// Forward: each task owns a block of query rows and streams key blocks through an online softmax,
// so memory is O(block_rows * block_cols) per thread, never N x N; it saves the per-row
// log-sum-exp. Backward recomputes p from it. Inputs are position-major and contiguous:
// q (B, N, dk), k (B, M, dk), v (B, M, dv), dO and o (B, N, dv), lse (B, N).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace sagan_ext_cpu {
namespace {

// 64 query rows x 256 keys: the score block (64 KiB in fp32) and a 64 x dv accumulator stay in L2,
// and the P*V GEMM has k = 256, long enough for BLAS to run near peak. Measured on a 2-core
// AVX-512 Xeon at (B, C, N) = (8, 64, 1024); see benchmarks/.
constexpr int64_t kBlockRows = 256;
constexpr int64_t kBlockCols = 256;

struct Sizes {
  int64_t batch, n, m, dk, dv;
};

template <typename T>
void attention_forward_kernel(const T* q, const T* k, const T* v, T* o, T* lse, Sizes s) {
  const int64_t row_blocks = (s.n + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, s.batch * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kBlockRows * kBlockCols), acc(kBlockRows * s.dv);
    std::vector<T> row_max(kBlockRows), row_sum(kBlockRows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_blocks, i0 = (task % row_blocks) * kBlockRows;
      const int rows = static_cast<int>(std::min(kBlockRows, s.n - i0));
      const T* qb = q + (b * s.n + i0) * s.dk;
      const T* kb = k + b * s.m * s.dk;
      const T* vb = v + b * s.m * s.dv;
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 < s.m; j0 += kBlockCols) {
        const int cols = static_cast<int>(std::min(kBlockCols, s.m - j0));
        gemm(false, true, rows, cols, s.dk, T(1), qb, s.dk, kb + j0 * s.dk, s.dk, T(0),
             scores.data(), kBlockCols);
        for (int r = 0; r < rows; ++r) {
          T* sr = scores.data() + r * kBlockCols;
          T mx = row_max[r];
          for (int c = 0; c < cols; ++c) mx = std::max(mx, sr[c]);
          for (int c = 0; c < cols; ++c) sr[c] = exp_nonpositive(sr[c] - mx);
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int c = 0; c < cols; ++c) sum += sr[c];
          const T rescale = std::exp(row_max[r] - mx);  // 0 on the first block (max was -inf)
          row_sum[r] = row_sum[r] * rescale + sum;
          row_max[r] = mx;
          if (rescale != T(1)) {
            T* ar = acc.data() + r * s.dv;
            for (int64_t c = 0; c < s.dv; ++c) ar[c] *= rescale;
          }
        }
        gemm(false, false, rows, s.dv, cols, T(1), scores.data(), kBlockCols, vb + j0 * s.dv, s.dv,
             T(1), acc.data(), s.dv);
      }
      for (int r = 0; r < rows; ++r) {
        const T inv = T(1) / row_sum[r];
        T* orow = o + (b * s.n + i0 + r) * s.dv;
        const T* ar = acc.data() + r * s.dv;
        for (int64_t c = 0; c < s.dv; ++c) orow[c] = ar[c] * inv;
        lse[b * s.n + i0 + r] = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

// One block of query rows against every key: adds its share of dK and dV into dk_acc/dv_acc
// (the caller decides whose buffers those are) and writes the block's dQ.
template <typename T>
void attention_backward_rows(const T* dout, const T* q, const T* k, const T* v, const T* o,
                             const T* lse, T* dq, T* dk_acc, T* dv_acc, Sizes s, int64_t b,
                             int64_t i0, std::vector<T>& p, std::vector<T>& dp,
                             std::vector<T>& delta) {
  const int rows = static_cast<int>(std::min(kBlockRows, s.n - i0));
  const T* qb = q + (b * s.n + i0) * s.dk;
  const T* dob = dout + (b * s.n + i0) * s.dv;
  const T* kb = k + b * s.m * s.dk;
  const T* vb = v + b * s.m * s.dv;
  const T* lseb = lse + b * s.n + i0;
  T* dqb = dq + (b * s.n + i0) * s.dk;
  for (int r = 0; r < rows; ++r) {  // delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i)
    const T* orow = o + (b * s.n + i0 + r) * s.dv;
    const T* dorow = dob + r * s.dv;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < s.dv; ++c) sum += dorow[c] * orow[c];
    delta[r] = sum;
  }
  std::fill(dqb, dqb + rows * s.dk, T(0));
  for (int64_t j0 = 0; j0 < s.m; j0 += kBlockCols) {
    const int cols = static_cast<int>(std::min(kBlockCols, s.m - j0));
    gemm(false, true, rows, cols, s.dk, T(1), qb, s.dk, kb + j0 * s.dk, s.dk, T(0), p.data(),
         kBlockCols);
    for (int r = 0; r < rows; ++r) {
      T* pr = p.data() + r * kBlockCols;
      const T l = lseb[r];
      for (int c = 0; c < cols; ++c) pr[c] = exp_nonpositive(pr[c] - l);
    }
    // dV_j += P^T dO ; dP = dO V_j^T
    gemm(true, false, cols, s.dv, rows, T(1), p.data(), kBlockCols, dob, s.dv, T(1),
         dv_acc + j0 * s.dv, s.dv);
    gemm(false, true, rows, cols, s.dv, T(1), dob, s.dv, vb + j0 * s.dv, s.dv, T(0), dp.data(),
         kBlockCols);
    for (int r = 0; r < rows; ++r) {  // dS = P * (dP - delta), in place in dp
      T* dpr = dp.data() + r * kBlockCols;
      const T* pr = p.data() + r * kBlockCols;
      const T d = delta[r];
      for (int c = 0; c < cols; ++c) dpr[c] = pr[c] * (dpr[c] - d);
    }
    // dQ += dS K_j ; dK_j += dS^T Q
    gemm(false, false, rows, s.dk, cols, T(1), dp.data(), kBlockCols, kb + j0 * s.dk, s.dk, T(1),
         dqb, s.dk);
    gemm(true, false, cols, s.dk, rows, T(1), dp.data(), kBlockCols, qb, s.dk, T(1),
         dk_acc + j0 * s.dk, s.dk);
  }
}

template <typename T>
void attention_backward_kernel(const T* dout, const T* q, const T* k, const T* v, const T* o,
                               const T* lse, T* dq, T* dk, T* dv, Sizes s) {
  const int64_t row_blocks = (s.n + kBlockRows - 1) / kBlockRows;
  const int64_t threads = at::get_num_threads();
  auto scratch = [&] {
    return std::make_tuple(std::vector<T>(kBlockRows * kBlockCols),
                           std::vector<T>(kBlockRows * kBlockCols), std::vector<T>(kBlockRows));
  };
  std::fill(dk, dk + s.batch * s.m * s.dk, T(0));
  std::fill(dv, dv + s.batch * s.m * s.dv, T(0));
  if (s.batch >= threads) {
    // Enough images to go round: one image per task, so each writes its own dK/dV directly.
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      auto [p, dp, delta] = scratch();
      for (int64_t b = begin; b < end; ++b)
        for (int64_t i0 = 0; i0 < s.n; i0 += kBlockRows)
          attention_backward_rows(dout, q, k, v, o, lse, dq, dk + b * s.m * s.dk,
                                  dv + b * s.m * s.dv, s, b, i0, p, dp, delta);
    });
    return;
  }
  // Few images (batch 1 at 128 x 128, say): split query blocks across threads. dK/dV get
  // contributions from every query block, so each thread sums into its own copy (O(M*C) each)
  // and the copies are added at the end: no atomics, deterministic for a fixed thread count.
  const int64_t dk_size = s.batch * s.m * s.dk, dv_size = s.batch * s.m * s.dv;
  std::vector<T> partial(threads * (dk_size + dv_size), T(0));
  at::parallel_for(0, s.batch * row_blocks, 1, [&](int64_t begin, int64_t end) {
    auto [p, dp, delta] = scratch();
    T* mine = partial.data() + at::get_thread_num() * (dk_size + dv_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_blocks, i0 = (task % row_blocks) * kBlockRows;
      attention_backward_rows(dout, q, k, v, o, lse, dq, mine + b * s.m * s.dk,
                              mine + dk_size + b * s.m * s.dv, s, b, i0, p, dp, delta);
    }
  });
  for (int64_t t = 0; t < threads; ++t) {
    const T* src = partial.data() + t * (dk_size + dv_size);
    for (int64_t i = 0; i < dk_size; ++i) dk[i] += src[i];
    for (int64_t i = 0; i < dv_size; ++i) dv[i] += src[dk_size + i];
  }
}

Sizes sizes_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (B, L, D)");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && k.size(1) == v.size(1) &&
                  q.size(2) == k.size(2),
              "q, k, v shapes do not match: ", q.sizes(), k.sizes(), v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  return {q.size(0), q.size(1), k.size(1), q.size(2), v.size(2)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in) {
  const Sizes s = sizes_of(q_in, k_in, v_in);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto o = at::empty({s.batch, s.n, s.dv}, q.options());
  auto lse = at::empty({s.batch, s.n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sagan_ext_cpu::attention_forward", [&] {
    attention_forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                       v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                       lse.data_ptr<scalar_t>(), s);
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse_in) {
  const Sizes s = sizes_of(q_in, k_in, v_in);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto dout = dout_in.contiguous().to(q.scalar_type()), o = o_in.contiguous().to(q.scalar_type());
  auto lse = lse_in.contiguous().to(q.scalar_type());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sagan_ext_cpu::attention_backward", [&] {
    attention_backward_kernel<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                        k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                        o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                        dv.data_ptr<scalar_t>(), s);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagan_ext_cpu, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sagan_ext_cpu, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace sagan_ext_cpu
