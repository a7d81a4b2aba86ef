// The tensor-core kernels' compile-time choices, in one place: the query/key dim bucket (DK 16,
// 32, 64: zero-padded in shared memory) and the value dim bucket (DV 64, 128, 256; the fp16/bf16
// backward also 512; the forward takes wider value dims in 256-wide slices; TF32 runs value dims
// up to kMaxTf32ValueDim, wider ones go to the FFMA kernels). The operand type is chosen
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

template <int MAX_DV, typename F>
cudaError_t dv_switch(int dv, F&& f) {
  if (dv <= 0) return cudaErrorInvalidValue;
  if (dv <= 64) return f(std::integral_constant<int, 64>{});
  if (dv <= 128) return f(std::integral_constant<int, 128>{});
  if (MAX_DV == 256 || dv <= 256) return f(std::integral_constant<int, 256>{});
  if (dv <= 512) return f(std::integral_constant<int, (MAX_DV > 256 ? 512 : 256)>{});
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t forward_switch(const AttentionParams& p, cudaStream_t stream) {
  return dk_switch(p.dk, [&](auto dk) {
    return dv_switch<256>(p.dv, [&](auto dv) {
      return launch_attention_forward_mma<T, decltype(dk)::value, decltype(dv)::value>(p, stream);
    });
  });
}

template <typename T>
cudaError_t backward_switch(const AttentionParams& p, cudaStream_t stream) {
  return dk_switch(p.dk, [&](auto dk) {
    return dv_switch<sizeof(T) == 4 ? kMaxTf32ValueDim : 512>(p.dv, [&](auto dv) {
      return launch_attention_backward_mma<T, decltype(dk)::value, decltype(dv)::value>(p, stream);
    });
  });
}

}  // namespace mma
}  // namespace sagan_ext
