// Flash-style SAGAN attention on the CPU: o = softmax(q k^T) v with unscaled scores.
// Forward: each task owns a block of query rows and streams key blocks through an online softmax,
// so memory is O(block_rows * block_cols) per thread, never N x N; it saves each row's max m and
// sum l = sum_j exp(s_j - m) (stats, (B, 2, N)). Backward recomputes p = exp(s - m) / l with the
// forward's own GEMM calls, so s - m is exact even for huge unscaled scores, where a saved
// log-sum-exp m + log(l) would carry ulp(m) into every p. Shapes q (B, N, dk), k (B, M, dk),
// v (B, M, dv), dO and o (B, N, dv); q, k, v, dO and o may be position-major (channels contiguous)
// or channel-major (positions contiguous: views of NCHW projections), which BLAS reads through
// its transpose flags, so the caller never copies x or the gradients into another layout.
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

// A (B, rows, channels) tensor: element (b, r, c) at p[b * bs + r * rs + c * cs], with rs == 1
// or cs == 1 and a leading dimension BLAS accepts (checked by blas_ready).
template <typename T>
struct View {
  const T* p;
  int64_t bs, rs, cs;
  bool channel_major;  // rs == 1 and cs >= rows; else cs == 1 and rs >= channels
  T at(int64_t b, int64_t r, int64_t c) const { return p[b * bs + r * rs + c * cs]; }
};

// Rows r0.. of image b as a row-major BLAS operand (rows x channels): a pointer, its leading
// dimension, and whether it is stored transposed (channel-major: a channels x rows block).
template <typename T>
struct Operand {
  const T* p;
  int ld;
  bool transposed;
};

template <typename T>
Operand<T> rows_of(const View<T>& v, int64_t b, int64_t r0) {
  const T* p = v.p + b * v.bs + r0 * v.rs;
  if (v.channel_major) return {p, static_cast<int>(v.cs), true};
  return {p, static_cast<int>(v.rs), false};
}

template <typename T>
void attention_forward_kernel(View<T> q, View<T> k, View<T> v, T* o, T* stats, Sizes s) {
  const int64_t row_blocks = (s.n + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, s.batch * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kBlockRows * kBlockCols), acc(kBlockRows * s.dv);
    std::vector<T> row_max(kBlockRows), row_sum(kBlockRows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_blocks, i0 = (task % row_blocks) * kBlockRows;
      const int rows = static_cast<int>(std::min(kBlockRows, s.n - i0));
      const Operand<T> qb = rows_of(q, b, i0);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 < s.m; j0 += kBlockCols) {
        const int cols = static_cast<int>(std::min(kBlockCols, s.m - j0));
        const Operand<T> kb = rows_of(k, b, j0), vb = rows_of(v, b, j0);
        gemm(qb.transposed, !kb.transposed, rows, cols, s.dk, T(1), qb.p, qb.ld, kb.p, kb.ld, T(0),
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
        gemm(false, vb.transposed, rows, s.dv, cols, T(1), scores.data(), kBlockCols, vb.p, vb.ld,
             T(1), acc.data(), s.dv);
      }
      for (int r = 0; r < rows; ++r) {
        const T inv = T(1) / row_sum[r];
        T* orow = o + (b * s.n + i0 + r) * s.dv;
        const T* ar = acc.data() + r * s.dv;
        for (int64_t c = 0; c < s.dv; ++c) orow[c] = ar[c] * inv;
        stats[b * 2 * s.n + i0 + r] = row_max[r];
        stats[(b * 2 + 1) * s.n + i0 + r] = row_sum[r];
      }
    }
  });
}

// One block of query rows against every key: adds its share of dK and dV into dk_acc/dv_acc
// (the caller decides whose buffers those are) and writes the block's dQ.
template <typename T>
void attention_backward_rows(View<T> dout, View<T> q, View<T> k, View<T> v, View<T> o,
                             const T* stats, T* dq, T* dk_acc, T* dv_acc, Sizes s, int64_t b,
                             int64_t i0, std::vector<T>& p, std::vector<T>& dp,
                             std::vector<T>& delta) {
  const int rows = static_cast<int>(std::min(kBlockRows, s.n - i0));
  const Operand<T> qb = rows_of(q, b, i0), dob = rows_of(dout, b, i0);
  const T* row_max = stats + b * 2 * s.n + i0;
  const T* row_sum = row_max + s.n;
  T* dqb = dq + (b * s.n + i0) * s.dk;
  std::fill(delta.begin(), delta.begin() + rows, T(0));
  for (int64_t c = 0; c < s.dv; ++c)  // delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i)
    for (int r = 0; r < rows; ++r) delta[r] += dout.at(b, i0 + r, c) * o.at(b, i0 + r, c);
  std::fill(dqb, dqb + rows * s.dk, T(0));
  for (int64_t j0 = 0; j0 < s.m; j0 += kBlockCols) {
    const int cols = static_cast<int>(std::min(kBlockCols, s.m - j0));
    const Operand<T> kb = rows_of(k, b, j0), vb = rows_of(v, b, j0);
    gemm(qb.transposed, !kb.transposed, rows, cols, s.dk, T(1), qb.p, qb.ld, kb.p, kb.ld, T(0), p.data(),
         kBlockCols);
    for (int r = 0; r < rows; ++r) {
      T* pr = p.data() + r * kBlockCols;
      const T mx = row_max[r], inv = T(1) / row_sum[r];
      for (int c = 0; c < cols; ++c) pr[c] = exp_nonpositive(pr[c] - mx) * inv;
    }
    // dV_j += P^T dO ; dP = dO V_j^T
    gemm(true, dob.transposed, cols, s.dv, rows, T(1), p.data(), kBlockCols, dob.p, dob.ld, T(1),
         dv_acc + j0 * s.dv, s.dv);
    gemm(dob.transposed, !vb.transposed, rows, cols, s.dv, T(1), dob.p, dob.ld, vb.p, vb.ld, T(0), dp.data(),
         kBlockCols);
    for (int r = 0; r < rows; ++r) {  // dS = P * (dP - delta), in place in dp
      T* dpr = dp.data() + r * kBlockCols;
      const T* pr = p.data() + r * kBlockCols;
      const T d = delta[r];
      for (int c = 0; c < cols; ++c) dpr[c] = pr[c] * (dpr[c] - d);
    }
    // dQ += dS K_j ; dK_j += dS^T Q
    gemm(false, kb.transposed, rows, s.dk, cols, T(1), dp.data(), kBlockCols, kb.p, kb.ld, T(1),
         dqb, s.dk);
    gemm(true, qb.transposed, cols, s.dk, rows, T(1), dp.data(), kBlockCols, qb.p, qb.ld, T(1),
         dk_acc + j0 * s.dk, s.dk);
  }
}

template <typename T>
void attention_backward_kernel(View<T> dout, View<T> q, View<T> k, View<T> v, View<T> o,
                               const T* stats, T* dq, T* dk, T* dv, Sizes s) {
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
          attention_backward_rows(dout, q, k, v, o, stats, dq, dk + b * s.m * s.dk,
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
      attention_backward_rows(dout, q, k, v, o, stats, dq, mine + b * s.m * s.dk,
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

bool position_major(const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) >= std::max<int64_t>(t.size(2), 1); }
bool channel_major(const at::Tensor& t) { return t.stride(1) == 1 && t.stride(2) >= std::max<int64_t>(t.size(1), 1); }

// Position-major or channel-major with a leading dimension BLAS accepts; anything else is copied.
at::Tensor blas_ready(const at::Tensor& t) {
  return position_major(t) || channel_major(t) ? t : t.contiguous();
}

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), !position_major(t)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in) {
  const Sizes s = sizes_of(q_in, k_in, v_in);
  auto q = blas_ready(q_in), k = blas_ready(k_in), v = blas_ready(v_in);
  auto o = at::empty({s.batch, s.n, s.dv}, q.options());
  auto stats = at::empty({s.batch, 2, s.n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sagan_ext_cpu::attention_forward", [&] {
    attention_forward_kernel<scalar_t>(view_of<scalar_t>(q), view_of<scalar_t>(k), view_of<scalar_t>(v),
                                       o.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), s);
  });
  return {o, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& stats_in) {
  const Sizes s = sizes_of(q_in, k_in, v_in);
  auto q = blas_ready(q_in), k = blas_ready(k_in), v = blas_ready(v_in);
  auto dout = blas_ready(dout_in.to(q.scalar_type())), o = blas_ready(o_in.to(q.scalar_type()));
  auto stats = stats_in.contiguous().to(q.scalar_type());
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == s.batch && stats.size(1) == 2 && stats.size(2) == s.n,
              "stats must be (B, 2, N), got ", stats.sizes());
  auto dq = at::empty({s.batch, s.n, s.dk}, q.options()), dk = at::empty({s.batch, s.m, s.dk}, q.options());
  auto dv = at::empty({s.batch, s.m, s.dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sagan_ext_cpu::attention_backward", [&] {
    attention_backward_kernel<scalar_t>(view_of<scalar_t>(dout), view_of<scalar_t>(q), view_of<scalar_t>(k),
                                        view_of<scalar_t>(v), view_of<scalar_t>(o), stats.data_ptr<scalar_t>(),
                                        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                        dv.data_ptr<scalar_t>(), s);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagan_ext_cpu, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor stats)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sagan_ext_cpu, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace sagan_ext_cpu
