// Spectral norm on the CPU, following torch.nn.utils.spectral_norm: in training, power iteration
// v = normalize(W^T u), u = normalize(W v), then sigma = u^T W v and W_sn = W / sigma.
// W is the contiguous (h, w) matrix view. Passes over W: one per W^T u, one per W v, one to write
// W / sigma; sigma reuses the last W v instead of a third product. The backward is one kernel:
// a reduction <G, W_sn> and one pass writing dW.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace sagan_ext_cpu {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per task: W of SAGAN layers is 32..1024 rows

template <typename T>
void matvec(const T* w, const T* x, T* y, int64_t h, int64_t wd) {  // y = W x
  at::parallel_for(0, h, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = w + i * wd;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < wd; ++j) sum += row[j] * x[j];
      y[i] = sum;
    }
  });
}

template <typename T>
void matvec_transposed(const T* w, const T* x, T* y, int64_t h, int64_t wd) {  // y = W^T x
  // Split columns across threads so every thread streams whole rows' slices and owns its outputs.
  at::parallel_for(0, wd, 256, [&](int64_t begin, int64_t end) {
    std::fill(y + begin, y + end, T(0));
    for (int64_t i = 0; i < h; ++i) {
      const T* row = w + i * wd;
      const T xi = x[i];
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) y[j] += row[j] * xi;
    }
  });
}

template <typename T>
T norm(const T* x, int64_t n) {
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return std::sqrt(sum);
}

template <typename T>
void normalize_into(const T* x, T* out, int64_t n, double eps) {  // F.normalize(x, dim=0, eps)
  const T denom = std::max(norm(x, n), static_cast<T>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / denom;
}

template <typename T>
T spectral_norm_forward_kernel(const T* w, T* u, T* v, T* w_sn, int64_t h, int64_t wd,
                               int64_t iterations, double eps) {
  std::vector<T> wv(h), wtu(wd);
  for (int64_t it = 0; it < iterations; ++it) {
    matvec_transposed(w, u, wtu.data(), h, wd);
    normalize_into(wtu.data(), v, wd, eps);
    matvec(w, v, wv.data(), h, wd);
    normalize_into(wv.data(), u, h, eps);
  }
  if (iterations == 0) matvec(w, v, wv.data(), h, wd);
  T sigma = 0;
  for (int64_t i = 0; i < h; ++i) sigma += u[i] * wv[i];
  at::parallel_for(0, h * wd, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) w_sn[i] = w[i] / sigma;
  });
  return sigma;
}

template <typename T>
void spectral_norm_backward_kernel(const T* g, const T* w_sn, const T* u, const T* v, T sigma,
                                   T grad_sigma, T* dw, int64_t h, int64_t wd) {
  const int64_t n = h * wd;
  const T dot = at::parallel_reduce(
      0, n, 4096, T(0),
      [&](int64_t begin, int64_t end, T partial) {
#pragma omp simd reduction(+ : partial)
        for (int64_t i = begin; i < end; ++i) partial += g[i] * w_sn[i];
        return partial;
      },
      std::plus<T>());
  const T c = dot - grad_sigma * sigma;
  at::parallel_for(0, h, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T cu = c * u[i];
#pragma omp simd
      for (int64_t j = 0; j < wd; ++j) dw[i * wd + j] = (g[i * wd + j] - cu * v[j]) / sigma;
    }
  });
}

void check_matrix(const at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
  TORCH_CHECK(w.dim() == 2 && u.dim() == 1 && v.dim() == 1 && u.size(0) == w.size(0) &&
                  v.size(0) == w.size(1),
              "spectral norm expects W (h, w), u (h), v (w); got ", w.sizes(), u.sizes(), v.sizes());
  TORCH_CHECK(u.is_contiguous() && v.is_contiguous(), "u and v must be contiguous");
}

// Returns (W / sigma, sigma); u and v are updated in place when iterations > 0.
std::tuple<at::Tensor, at::Tensor> spectral_norm_forward(const at::Tensor& w_in, at::Tensor u,
                                                         at::Tensor v, int64_t iterations,
                                                         double eps) {
  check_matrix(w_in, u, v);
  auto w = w_in.contiguous();
  auto w_sn = at::empty_like(w);
  auto sigma = at::empty({}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sagan_ext_cpu::spectral_norm_forward", [&] {
    sigma.fill_(spectral_norm_forward_kernel<scalar_t>(
        w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        w_sn.data_ptr<scalar_t>(), w.size(0), w.size(1), iterations, eps));
  });
  return {w_sn, sigma};
}

at::Tensor spectral_norm_backward(const at::Tensor& g_in, const at::Tensor& grad_sigma,
                                  const at::Tensor& w_sn_in, const at::Tensor& u,
                                  const at::Tensor& v, const at::Tensor& sigma) {
  check_matrix(w_sn_in, u, v);
  auto g = g_in.contiguous(), w_sn = w_sn_in.contiguous();
  auto dw = at::empty_like(w_sn);
  AT_DISPATCH_FLOATING_TYPES(w_sn.scalar_type(), "sagan_ext_cpu::spectral_norm_backward", [&] {
    spectral_norm_backward_kernel<scalar_t>(
        g.data_ptr<scalar_t>(), w_sn.data_ptr<scalar_t>(), u.contiguous().data_ptr<scalar_t>(),
        v.contiguous().data_ptr<scalar_t>(), sigma.item<scalar_t>(),
        grad_sigma.item<scalar_t>(), dw.data_ptr<scalar_t>(), w_sn.size(0), w_sn.size(1));
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagan_ext_cpu, m) {
  m.def("spectral_norm_forward(Tensor w, Tensor(a!) u, Tensor(b!) v, int iterations, float eps)"
        " -> (Tensor, Tensor)");
  m.def("spectral_norm_backward(Tensor g, Tensor grad_sigma, Tensor w_sn, Tensor u, Tensor v,"
        " Tensor sigma) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagan_ext_cpu, CPU, m) {
  m.impl("spectral_norm_forward", &spectral_norm_forward);
  m.impl("spectral_norm_backward", &spectral_norm_backward);
}

}  // namespace sagan_ext_cpu
