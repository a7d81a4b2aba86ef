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

sagan_ext::AttentionParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  check_same(k, q, "k");
  check_same(v, q, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (B, N, d) tensors");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(1) == k.size(1),
              "q (B, N, dk), k (B, M, dk), v (B, M, dv) shapes do not match");
  TORCH_CHECK(q.size(2) <= sagan_ext::kMaxQueryKeyDim, "query/key dim ", q.size(2), " is above the CUDA kernels' ",
              sagan_ext::kMaxQueryKeyDim);
  sagan_ext::AttentionParams p;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1);
  p.batch = static_cast<int>(q.size(0)), p.n = static_cast<int>(q.size(1)), p.m = static_cast<int>(k.size(1));
  p.dk = static_cast<int>(q.size(2)), p.dv = static_cast<int>(v.size(2));
  p.dtype = dtype_of(q);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                     int64_t stream) {
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto p = attention_params(q, k, v);
  auto o = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr(), p.o_batch_stride = o.stride(0), p.o_row_stride = o.stride(1);
  p.lse = lse.data_ptr<float>();
  check_cuda(sagan_ext::attention_forward(p, as_stream(stream)), "attention_forward");
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& d_o_, const at::Tensor& q_,
                                                                  const at::Tensor& k_, const at::Tensor& v_,
                                                                  const at::Tensor& o_, const at::Tensor& lse_,
                                                                  int64_t stream) {
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous();
  const auto d_o = d_o_.contiguous(), lse = lse_.to(at::kFloat).contiguous();
  auto p = attention_params(q, k, v);
  check_same(o, q, "o");
  check_same(d_o, q, "grad_o");
  TORCH_CHECK(o.sizes() == d_o.sizes() && o.size(1) == q.size(1) && o.size(2) == v.size(2), "o / grad_o shape mismatch");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1), "lse must be (B, N)");
  auto delta = at::empty_like(lse);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  p.o = o.data_ptr(), p.o_batch_stride = o.stride(0), p.o_row_stride = o.stride(1);
  p.lse = lse.data_ptr<float>();
  p.d_o = d_o.data_ptr(), p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk_out = dk.data_ptr(), p.dv_out = dv.data_ptr();
  check_cuda(sagan_ext::attention_backward(p, as_stream(stream)), "attention_backward");
  return {dq, dk, dv};
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
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, int stream) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("spectral_norm_forward(Tensor w, Tensor u, Tensor v, int iterations, float eps, int stream) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("spectral_norm_backward(Tensor grad, Tensor grad_sigma, Tensor w_sn, Tensor u, Tensor v, Tensor sigma, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagan_ext_cuda, CUDA, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
  m.impl("spectral_norm_forward", &spectral_norm_forward);
  m.impl("spectral_norm_backward", &spectral_norm_backward);
}
