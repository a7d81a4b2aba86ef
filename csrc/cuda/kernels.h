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

// One (B, rows, cols) operand of the attention core, strides in elements. q, k, v and dO arrive as
// channel-major views of the projection GEMM's output (row_stride 1: positions contiguous) or
// position-major (col_stride 1), or any other strides; the kernels read them through the strides,
// never through a copy.
struct Matrix {
  void* ptr = nullptr;
  int64_t batch_stride = 0, row_stride = 0, col_stride = 0;
};

// The attention core of reference.py: q (B, N, dk), k (B, M, dk), v (B, M, dv) -> o (B, N, dv) and
// stats (B, 2, N) float32, contiguous: stats[:, 0] the row max m of the unscaled scores q k^T,
// stats[:, 1] the row sum l of exp(s - m). The backward recomputes p = exp(s - m) / l with the
// forward's own score arithmetic.
struct AttentionParams {
  Matrix q, k, v;
  int batch = 0, n = 0, m = 0, dk = 0, dv = 0;
  DType dtype = DType::kFloat32;
  bool tf32 = false;  // float32 on tensor cores (TF32 operands); otherwise float32 runs the FFMA kernels

  Matrix o;              // forward output; backward input
  float* stats = nullptr;  // forward output; backward input

  // Forward, optional: out = x + gamma * o^T written in x's layout, x and out (B, dv, N) with
  // (batch, channel, position) strides; gamma one element of the input dtype.
  Matrix x, out;
  const void* gamma = nullptr;

  Matrix d_o;               // backward input (B, N, dv)
  float* delta = nullptr;   // backward scratch (B, N): rowsum(dO * O)
  Matrix dq, dk_out, dv_out;  // backward outputs, shaped like q, k, v
  // Tensor-core backward: dQ is added into dq_accum (B, N, dk) float32, zeroed, contiguous (the
  // FFMA kernels write dq instead). With dq_turn, (B, ceil(N / kBackwardQueryBlock)) int32
  // zeroed, the additions are ordered (deterministic mode).
  float* dq_accum = nullptr;
  int* dq_turn = nullptr;
};

constexpr int kBackwardQueryBlock = 64;  // query rows per step of the tensor-core backward
constexpr int kMaxTf32ValueDim = 256;    // wider value dims run TF32 inputs on the FFMA kernels (full fp32)

// Whether attention_forward / attention_backward run the tensor-core kernels for p: fp16 and bf16
// always, fp32 as TF32 when p.tf32 (and dv <= kMaxTf32ValueDim). Those kernels read q, k, v and
// dO channel-major (row_stride 1) with 16-byte aligned rows; the binding copies other layouts.
inline bool uses_tensor_cores(const AttentionParams& p) {
  return p.dtype != DType::kFloat32 || (p.tf32 && p.dv <= kMaxTf32ValueDim);
}

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_backward(const AttentionParams& p, cudaStream_t stream);

// Tensor-core kernels (attention_mma.cu and one file per dtype and pass): what attention_forward and
// attention_backward call when uses_tensor_cores(p).
cudaError_t attention_forward_mma(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_backward_mma(const AttentionParams& p, cudaStream_t stream);
template <typename T>
cudaError_t attention_forward_mma_launch(const AttentionParams& p, cudaStream_t stream);
template <typename T>
cudaError_t attention_backward_mma_launch(const AttentionParams& p, cudaStream_t stream);
// rowsum(dO * O) into p.delta (shared by both backward paths).
cudaError_t attention_delta(const AttentionParams& p, cudaStream_t stream);

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
