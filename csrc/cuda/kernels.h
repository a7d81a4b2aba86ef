// The CUDA kernels' interface: plain structs of pointers, strides (in elements) and sizes, and
// launchers that take them with a cudaStream_t. No torch headers here or in the .cu files, so
// that every kernel compiles with plain nvcc (CI has no torch CUDA headers); bindings.cpp turns
// tensors into these structs.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sagan_ext {

enum class DType { kFloat32, kFloat16, kBFloat16 };

constexpr int kMaxQueryKeyDim = 64;  // query/key channels (SAGAN: C/8 for C up to 512)

// Position-major attention core (reference.py): q (B, N, dk), k (B, M, dk), v (B, M, dv),
// o (B, N, dv); unit stride along channels; lse and delta (B, N) float32, contiguous.
// Gradients dq, dk, dv have the strides of q, k, v; d_o the strides of o.
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0;
  int batch = 0, n = 0, m = 0, dk = 0, dv = 0;
  DType dtype = DType::kFloat32;

  void* o = nullptr;  // forward output; backward input
  int64_t o_batch_stride = 0, o_row_stride = 0;
  float* lse = nullptr;  // forward output (natural log); backward input

  const void* d_o = nullptr;  // backward
  float* delta = nullptr;     // backward scratch: rowsum(dO * O)
  void* dq = nullptr;
  void* dk_out = nullptr;
  void* dv_out = nullptr;
};

// o = softmax(q k^T) v with unscaled scores, online softmax in float32, lse saved.
cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream);
// FlashAttention-2 style: delta = rowsum(dO * O), then dV, dK and dQ, recomputing p from lse.
cudaError_t attention_backward(const AttentionParams& p, cudaStream_t stream);

// Spectral norm of a (rows, cols) matrix w (unit column stride), u (rows) and v (cols) float32.
struct SpectralNormParams {
  const void* w = nullptr;
  int64_t w_row_stride = 0;
  int rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  float* u = nullptr;  // updated in place by the forward's power iteration
  float* v = nullptr;
  int iterations = 1;  // 0: evaluation, sigma from the stored u, v
  float eps = 1e-12f;
  void* w_sn = nullptr;   // forward output (rows, cols), contiguous
  float* sigma = nullptr;  // forward output (1); backward input
  float* scratch = nullptr;  // spectral_norm_scratch_floats(rows, cols) floats

  const void* grad_w_sn = nullptr;   // backward, (rows, cols) contiguous
  const float* grad_sigma = nullptr;  // backward (1)
  void* grad_w = nullptr;             // backward output (rows, cols) contiguous
};

int64_t spectral_norm_scratch_floats(int rows, int cols);
// One launch: power iteration, sigma and w / sigma (a cooperative grid, synchronised between passes).
cudaError_t spectral_norm_forward(const SpectralNormParams& p, cudaStream_t stream);
// One launch: dW = (G - (<G, W_sn> - g_sigma * sigma) u v^T) / sigma.
cudaError_t spectral_norm_backward(const SpectralNormParams& p, cudaStream_t stream);

}  // namespace sagan_ext
