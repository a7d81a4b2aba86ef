// The bf16 instantiations of the tensor-core attention backward (one file per type and pass, so that
// the JIT build compiles them in parallel).
#include "switch.cuh"

namespace sagan_ext {

template <>
cudaError_t attention_backward_mma_launch<__nv_bfloat16>(const AttentionParams& p, cudaStream_t stream) {
  return mma::backward_switch<__nv_bfloat16>(p, stream);
}

}  // namespace sagan_ext
