// The tf32 instantiations of the tensor-core attention forward (one file per type and pass, so that
// the JIT build compiles them in parallel).
#include "switch.cuh"

namespace sagan_ext {

template <>
cudaError_t attention_forward_mma_launch<float>(const AttentionParams& p, cudaStream_t stream) {
  return mma::forward_switch<float>(p, stream);
}

}  // namespace sagan_ext
