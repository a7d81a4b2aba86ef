// The tensor-core kernels' compile-time choices, in one place: the query/key dim bucket (DK 16,
// 32, 64: zero-padded in shared memory) and the value dim bucket (DV 64, 128, 256; the fp16/bf16
// backward also 512; the forward takes wider value dims in slices; TF32 runs value dims up to
// kMaxTf32ValueDim, wider ones go to the FFMA kernels). The operand type is chosen
// by attention_mma.cu, one file per type and pass instantiating what these switches reach.
#pragma once

#include <type_traits>

#include "attention_backward_mma.cuh"
#include "attention_forward_mma.cuh"

namespace sagan_ext {
namespace mma {

template <typename F>
cudaError_t dk_switch(int dk, F&& f) {
  if (dk <= 0 || dk > kMaxQueryKeyDim) return cudaErrorInvalidValue;
  if (dk <= 16) return f(std::integral_constant<int, 16>{});
  if (dk <= 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 64>{});
}

// The smallest value dim bucket that holds dv, and MAX_DV for wider ones (the forward's slices).
template <int MAX_DV, typename F>
cudaError_t dv_switch(int dv, F&& f) {
  if (dv <= 0) return cudaErrorInvalidValue;
  if (dv <= 64) return f(std::integral_constant<int, 64>{});
  if constexpr (MAX_DV >= 128) {
    if (MAX_DV == 128 || dv <= 128) return f(std::integral_constant<int, 128>{});
  }
  if constexpr (MAX_DV >= 256) {
    if (MAX_DV == 256 || dv <= 256) return f(std::integral_constant<int, 256>{});
  }
  if constexpr (MAX_DV >= 512) return f(std::integral_constant<int, 512>{});
  return cudaErrorInvalidValue;
}

// Forward value slices: 256 wide, TF32's 128 (its 4-byte scalar fragments beside a 256-wide O
// spilled 52-68 bytes; a second slice recomputes q k^T, 2 dk of 2 dk + 2 dv FLOPs per pair).
template <typename T>
constexpr int kForwardMaxDv = sizeof(T) == 4 ? 128 : 256;
// Backward value dims, in one pass (dP needs all of them): up to 512, TF32 up to kMaxTf32ValueDim.
template <typename T>
constexpr int kBackwardMaxDv = sizeof(T) == 4 ? kMaxTf32ValueDim : 512;

template <typename T>
cudaError_t forward_switch(const AttentionParams& p, cudaStream_t stream) {
  return dk_switch(p.dk, [&](auto dk) {
    return dv_switch<kForwardMaxDv<T>>(p.dv, [&](auto dv) {
      return launch_attention_forward_mma<T, decltype(dk)::value, decltype(dv)::value>(p, stream);
    });
  });
}

template <typename T>
cudaError_t backward_switch(const AttentionParams& p, cudaStream_t stream) {
  if (p.dv > kBackwardMaxDv<T>) return cudaErrorInvalidValue;
  return dk_switch(p.dk, [&](auto dk) {
    return dv_switch<kBackwardMaxDv<T>>(p.dv, [&](auto dv) {
      return launch_attention_backward_mma<T, decltype(dk)::value, decltype(dv)::value>(p, stream);
    });
  });
}

}  // namespace mma
}  // namespace sagan_ext
