// Hands tensors to the CUDA kernels: checks, the params structs, and the sagan_ext_cuda operators.
// It needs only torch's CPU headers and cuda_runtime.h: the current stream comes from Python
// (torch.cuda.current_stream().cuda_stream) and the device is set there, so CI compiles this file
// too, with no torch CUDA headers on the machine.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>

#include "kernels.h"

namespace {

using sagan_ext::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "sagan_ext cuda kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(handle)); }

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "sagan_ext cuda ", what, " failed: ", cudaGetErrorString(e));
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

sagan_ext::Matrix matrix(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// q, k, v are read through their strides (ops.py passes channel-major views of one projection
// GEMM; other callers position-major tensors): no copies.
sagan_ext::AttentionParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool allow_tf32) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  check_same(k, q, "k");
  check_same(v, q, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (B, N, d) tensors");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(1) == k.size(1),
              "q (B, N, dk), k (B, M, dk), v (B, M, dv) shapes do not match");
  TORCH_CHECK(q.size(2) <= sagan_ext::kMaxQueryKeyDim, "query/key dim ", q.size(2), " is above the CUDA kernels' ",
              sagan_ext::kMaxQueryKeyDim);
  sagan_ext::AttentionParams p;
  p.q = matrix(q), p.k = matrix(k), p.v = matrix(v);
  p.batch = static_cast<int>(q.size(0)), p.n = static_cast<int>(q.size(1)), p.m = static_cast<int>(k.size(1));
  p.dk = static_cast<int>(q.size(2)), p.dv = static_cast<int>(v.size(2));
  p.dtype = dtype_of(q);
  p.tf32 = allow_tf32;
  return p;
}

// o (B, N, dv) contiguous, as every backend returns it and the op's fake implementation says (a
// channel-major o failed torch.compile's stride check on the first GPU run); stats (B, 2, N) float32.
std::tuple<at::Tensor, at::Tensor> forward_outputs(sagan_ext::AttentionParams& p, const at::Tensor& q) {
  auto o = at::empty({p.batch, p.n, p.dv}, q.options());
  auto stats = at::empty({p.batch, 2, p.n}, q.options().dtype(at::kFloat));
  p.o = matrix(o), p.stats = stats.data_ptr<float>();
  return {o, stats};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool allow_tf32, int64_t stream) {
  auto p = attention_params(q, k, v, allow_tf32);
  auto [o, stats] = forward_outputs(p, q);
  check_cuda(sagan_ext::attention_forward(p, as_stream(stream)), "attention_forward");
  return {o, stats};
}

// (out, o, stats), out = x + gamma * o^T written by the forward's epilogue in x's (B, C, H, W)
// layout; x's H and W must step alike (NCHW or channels_last), so positions have one stride.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_residual(const at::Tensor& q, const at::Tensor& k,
                                                                          const at::Tensor& v, const at::Tensor& x,
                                                                          const at::Tensor& gamma, bool allow_tf32,
                                                                          int64_t stream) {
  auto p = attention_params(q, k, v, allow_tf32);
  check_same(x, q, "x");
  check_same(gamma, q, "gamma");
  TORCH_CHECK(x.dim() == 4 && x.size(0) == p.batch && x.size(1) == p.dv && x.size(2) * x.size(3) == p.n,
              "x must be (B, dv, H, W) with H W = N");
  TORCH_CHECK(x.size(2) == 1 || x.stride(2) == x.size(3) * x.stride(3), "x's H and W must share one stride step");
  TORCH_CHECK(gamma.numel() == 1, "gamma must have one element");
  auto out = at::empty_like(x);
  TORCH_CHECK(out.size(2) == 1 || out.stride(2) == out.size(3) * out.stride(3), "x must be dense");
  auto [o, stats] = forward_outputs(p, q);
  p.x = {x.data_ptr(), x.stride(0), x.stride(1), x.stride(3)};
  p.out = {out.data_ptr(), out.stride(0), out.stride(1), out.stride(3)};
  p.gamma = gamma.data_ptr();
  check_cuda(sagan_ext::attention_forward(p, as_stream(stream)), "attention_forward_residual");
  return {out, o, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& d_o, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& o, const at::Tensor& stats,
                                                                  bool allow_tf32, int64_t stream) {
  auto p = attention_params(q, k, v, allow_tf32);
  check_same(o, q, "o");
  check_same(d_o, q, "grad_o");
  TORCH_CHECK(o.dim() == 3 && o.sizes() == d_o.sizes() && o.size(0) == p.batch && o.size(1) == p.n && o.size(2) == p.dv,
              "o and grad_o must be (B, N, dv)");
  TORCH_CHECK(stats.is_cuda() && stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 3 &&
                  stats.size(0) == p.batch && stats.size(1) == 2 && stats.size(2) == p.n,
              "stats must be a contiguous float32 (B, 2, N) tensor");
  auto delta = at::empty({p.batch, p.n}, stats.options());
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  p.o = matrix(o), p.stats = stats.data_ptr<float>();
  p.d_o = matrix(d_o), p.delta = delta.data_ptr<float>();
  p.dq = matrix(dq), p.dk_out = matrix(dk), p.dv_out = matrix(dv);
  check_cuda(sagan_ext::attention_backward(p, as_stream(stream)), "attention_backward");
  return {dq, dk, dv};
}

// Test-only: a (16, K) @ b (K, 8) through one of the PTX wrappers' paths (kernels.h).
at::Tensor ptx_mma_selftest(const at::Tensor& a, const at::Tensor& b, bool allow_tf32, int64_t variant, int64_t stream) {
  TORCH_CHECK(a.is_cuda(), "a must be a CUDA tensor");
  check_same(b, a, "b");
  const int64_t kk = a.scalar_type() == at::kFloat ? 8 : 16;
  TORCH_CHECK(a.dim() == 2 && a.size(0) == 16 && a.size(1) == kk && b.dim() == 2 && b.size(0) == kk && b.size(1) == 8,
              "a must be (16, ", kk, ") and b (", kk, ", 8)");
  const auto ac = a.contiguous(), bc = b.contiguous();
  auto d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  check_cuda(sagan_ext::ptx_mma_selftest(ac.data_ptr(), bc.data_ptr(), d.data_ptr<float>(), dtype_of(a), allow_tf32,
                                         static_cast<int>(variant), as_stream(stream)),
             "ptx_mma_selftest");
  return d;
}

sagan_ext::SpectralNormParams spectral_norm_params(const at::Tensor& w) {
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 && w.stride(1) == 1, "w must be a (rows, cols) CUDA matrix with unit column stride");
  sagan_ext::SpectralNormParams p;
  p.w = w.data_ptr(), p.w_row_stride = w.stride(0);
  p.rows = static_cast<int>(w.size(0)), p.cols = static_cast<int>(w.size(1));
  p.dtype = dtype_of(w);
  return p;
}

// (w / sigma, sigma, u', v'): u' and v' are float32 copies after the power iteration.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_forward(const at::Tensor& w_, const at::Tensor& u,
                                                                                 const at::Tensor& v, int64_t iterations,
                                                                                 double eps, int64_t stream) {
  const auto w = w_.stride(1) == 1 ? w_ : w_.contiguous();
  auto p = spectral_norm_params(w);
  TORCH_CHECK(u.numel() == p.rows && v.numel() == p.cols, "u must have ", p.rows, " and v ", p.cols, " elements");
  auto u32 = u.to(u.options().dtype(at::kFloat), /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto v32 = v.to(v.options().dtype(at::kFloat), /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto w_sn = at::empty({p.rows, p.cols}, w.options());
  auto sigma = at::empty({}, w.options().dtype(at::kFloat));
  auto scratch = at::empty({sagan_ext::spectral_norm_scratch_floats(p.rows, p.cols)}, w.options().dtype(at::kFloat));
  p.u = u32.data_ptr<float>(), p.v = v32.data_ptr<float>();
  p.iterations = static_cast<int>(iterations), p.eps = static_cast<float>(eps);
  p.w_sn = w_sn.data_ptr(), p.sigma = sigma.data_ptr<float>(), p.scratch = scratch.data_ptr<float>();
  check_cuda(sagan_ext::spectral_norm_forward(p, as_stream(stream)), "spectral_norm_forward");
  return {w_sn, sigma, u32, v32};
}

at::Tensor spectral_norm_backward(const at::Tensor& g_, const at::Tensor& grad_sigma, const at::Tensor& w_sn_,
                                  const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t stream) {
  const auto g = g_.contiguous(), w_sn = w_sn_.contiguous();
  auto p = spectral_norm_params(w_sn);
  check_same(g, w_sn, "grad");
  const auto as_float = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const auto u32 = as_float(u), v32 = as_float(v), sigma32 = as_float(sigma), grad_sigma32 = as_float(grad_sigma);
  auto dw = at::empty_like(g);
  auto scratch = at::empty({sagan_ext::spectral_norm_scratch_floats(p.rows, p.cols)}, g.options().dtype(at::kFloat));
  p.u = const_cast<float*>(u32.data_ptr<float>()), p.v = const_cast<float*>(v32.data_ptr<float>());
  p.sigma = const_cast<float*>(sigma32.data_ptr<float>()), p.scratch = scratch.data_ptr<float>();
  p.w_sn = w_sn.data_ptr(), p.grad_w_sn = g.data_ptr(), p.grad_sigma = grad_sigma32.data_ptr<float>();
  p.grad_w = dw.data_ptr();
  check_cuda(sagan_ext::spectral_norm_backward(p, as_stream(stream)), "spectral_norm_backward");
  return dw;
}

}  // namespace

TORCH_LIBRARY(sagan_ext_cuda, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, bool allow_tf32, int stream) -> (Tensor, Tensor)");
  m.def("attention_forward_residual(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma, bool allow_tf32, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor stats, bool allow_tf32, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("ptx_mma_selftest(Tensor a, Tensor b, bool allow_tf32, int variant, int stream) -> Tensor");
  m.def("spectral_norm_forward(Tensor w, Tensor u, Tensor v, int iterations, float eps, int stream) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("spectral_norm_backward(Tensor grad, Tensor grad_sigma, Tensor w_sn, Tensor u, Tensor v, Tensor sigma, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagan_ext_cuda, CUDA, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_forward_residual", &attention_forward_residual);
  m.impl("attention_backward", &attention_backward);
  m.impl("ptx_mma_selftest", &ptx_mma_selftest);
  m.impl("spectral_norm_forward", &spectral_norm_forward);
  m.impl("spectral_norm_backward", &spectral_norm_backward);
}
