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

// The tensor-core kernels read a (B, N, d) operand channel-major (positions contiguous) in whole
// 16-byte chunks: rows starting on 16 bytes and N a multiple of 8 (fp16/bf16) or 4 (fp32), as
// ops.py's projection GEMM leaves q, k, v and dO for such N. Any other tensor is copied into that
// layout with zeros up to the next multiple (mma.cuh's ChannelStager reads them): O(N d), against
// the attention's O(N^2 d).
at::Tensor channel_major(const at::Tensor& t) {
  const int64_t align = 16 / t.element_size();
  const bool ready = t.size(1) % align == 0 && (t.size(1) == 1 || t.stride(1) == 1) && t.stride(2) % align == 0 &&
                     (t.size(0) == 1 || t.stride(0) % align == 0) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ready) return t;
  const int64_t padded = (t.size(1) + align - 1) / align * align;
  auto buffer = at::zeros({t.size(0), t.size(2), padded}, t.options());
  auto view = buffer.narrow(2, 0, t.size(1));
  view.copy_(t.transpose(1, 2));
  return view.transpose(1, 2);
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

// attention_params of the tensors the kernels will read: channel-major copies where needed.
struct Inputs {
  at::Tensor q, k, v;
  sagan_ext::AttentionParams p;
  Inputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, bool allow_tf32)
      : q(q_), k(k_), v(v_), p(attention_params(q_, k_, v_, allow_tf32)) {
    if (sagan_ext::uses_tensor_cores(p)) {
      q = channel_major(q_), k = channel_major(k_), v = channel_major(v_);
      p.q = matrix(q), p.k = matrix(k), p.v = matrix(v);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                     bool allow_tf32, int64_t stream) {
  const Inputs in(q_, k_, v_, allow_tf32);
  auto p = in.p;
  const auto& q = in.q;
  auto [o, stats] = forward_outputs(p, q);
  check_cuda(sagan_ext::attention_forward(p, as_stream(stream)), "attention_forward");
  return {o, stats};
}

// (out, o, stats), out = x + gamma * o^T written by the forward's epilogue in x's (B, C, H, W)
// layout; x's H and W must step alike (NCHW or channels_last), so positions have one stride.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_residual(const at::Tensor& q_, const at::Tensor& k_,
                                                                          const at::Tensor& v_, const at::Tensor& x,
                                                                          const at::Tensor& gamma, bool allow_tf32,
                                                                          int64_t stream) {
  const Inputs in(q_, k_, v_, allow_tf32);
  auto p = in.p;
  const auto& q = in.q;
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

// (dq, dk, dv), contiguous. The tensor-core kernels add dQ into a zeroed float32 buffer with
// atomics, in an order fixed by per-(batch, query block) counters when
// torch.use_deterministic_algorithms is on; the FFMA kernels write dq directly, deterministically.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& d_o_, const at::Tensor& q_,
                                                                  const at::Tensor& k_, const at::Tensor& v_,
                                                                  const at::Tensor& o, const at::Tensor& stats,
                                                                  bool allow_tf32, int64_t stream) {
  const Inputs in(q_, k_, v_, allow_tf32);
  auto p = in.p;
  const auto& q = in.q;
  check_same(o, q, "o");
  check_same(d_o_, q, "grad_o");
  TORCH_CHECK(o.dim() == 3 && o.sizes() == d_o_.sizes() && o.size(0) == p.batch && o.size(1) == p.n && o.size(2) == p.dv,
              "o and grad_o must be (B, N, dv)");
  TORCH_CHECK(stats.is_cuda() && stats.device() == q.device(), "stats must be on ", q.device(), ", got ", stats.device());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 3 && stats.size(0) == p.batch &&
                  stats.size(1) == 2 && stats.size(2) == p.n,
              "stats must be a contiguous float32 (B, 2, N) tensor");
  if (p.n == 0)  // no query attends to any key; nothing to launch (the kernels' copies would start at null)
    return {at::empty(q_.sizes(), q_.options()), at::zeros(k_.sizes(), k_.options()), at::zeros(v_.sizes(), v_.options())};
  const bool tensor_cores = sagan_ext::uses_tensor_cores(p);
  const auto d_o = tensor_cores ? channel_major(d_o_) : d_o_;
  auto delta = at::empty({p.batch, p.n}, stats.options());
  auto dk = at::empty(k_.sizes(), k_.options()), dv = at::empty(v_.sizes(), v_.options());
  at::Tensor dq, dq_accum, dq_turn;
  if (tensor_cores) {
    dq_accum = at::zeros(q_.sizes(), q_.options().dtype(at::kFloat));
    p.dq_accum = dq_accum.data_ptr<float>();
    if (at::globalContext().deterministicAlgorithms()) {
      const int64_t query_blocks = (p.n + sagan_ext::kBackwardQueryBlock - 1) / sagan_ext::kBackwardQueryBlock;
      dq_turn = at::zeros({p.batch, query_blocks}, q_.options().dtype(at::kInt));
      p.dq_turn = dq_turn.data_ptr<int>();
    }
  } else {
    dq = at::empty(q_.sizes(), q_.options());
    p.dq = matrix(dq);
  }
  p.o = matrix(o), p.stats = stats.data_ptr<float>();
  p.d_o = matrix(d_o), p.delta = delta.data_ptr<float>();
  p.dk_out = matrix(dk), p.dv_out = matrix(dv);
  check_cuda(sagan_ext::attention_backward(p, as_stream(stream)), "attention_backward");
  if (tensor_cores) dq = dq_accum.scalar_type() == q_.scalar_type() ? dq_accum : dq_accum.to(q_.scalar_type());
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
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, bool allow_tf32, int stream) -> (Tensor, Tensor)");
  m.def("attention_forward_residual(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma, bool allow_tf32, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor stats, bool allow_tf32, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("spectral_norm_forward(Tensor w, Tensor u, Tensor v, int iterations, float eps, int stream) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("spectral_norm_backward(Tensor grad, Tensor grad_sigma, Tensor w_sn, Tensor u, Tensor v, Tensor sigma, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagan_ext_cuda, CUDA, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_forward_residual", &attention_forward_residual);
  m.impl("attention_backward", &attention_backward);
  m.impl("spectral_norm_forward", &spectral_norm_forward);
  m.impl("spectral_norm_backward", &spectral_norm_backward);
}
