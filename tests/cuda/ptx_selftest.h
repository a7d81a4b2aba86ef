// Test-only: the fragment-loader self-test of the tensor-core kernels (ptx_selftest.cu). Torch-free,
// so that benchmarks/sanitizer_cases.cu runs it under compute-sanitizer too.
#pragma once

#include "kernels.h"

namespace sagan_ext {

constexpr int kPtxSelftestVariants = 5;
cudaError_t ptx_mma_selftest(const void* a, const void* b, float* d, DType dtype, bool tf32, int variant,
                             cudaStream_t stream);

}  // namespace sagan_ext
