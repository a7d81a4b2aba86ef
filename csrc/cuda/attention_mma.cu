// The tensor-core attention (mma.sync, sm_80+) by operand type: fp16 and bf16 with m16n8k16, fp32
// as TF32 with m16n8k8. The kernels are attention_forward_mma.cuh and attention_backward_mma.cuh,
// their tiles and fragments mma.cuh; each type's instantiations live in their own file.
#include "common.cuh"

namespace sagan_ext {

cudaError_t attention_forward_mma(const AttentionParams& p, cudaStream_t stream) {
  if (!uses_tensor_cores(p)) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto type) { return attention_forward_mma_launch<decltype(type)>(p, stream); });
}

cudaError_t attention_backward_mma(const AttentionParams& p, cudaStream_t stream) {
  if (!uses_tensor_cores(p) || p.dq_accum == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto type) { return attention_backward_mma_launch<decltype(type)>(p, stream); });
}

}  // namespace sagan_ext
