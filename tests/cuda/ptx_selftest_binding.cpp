// The test-only operator sagan_ext_test::ptx_mma_selftest (tests/test_gpu.py builds this folder).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ptx_selftest.h"

namespace {

at::Tensor ptx_mma_selftest(const at::Tensor& a, const at::Tensor& b, bool allow_tf32, int64_t variant, int64_t stream) {
  TORCH_CHECK(a.is_cuda() && b.device() == a.device() && b.scalar_type() == a.scalar_type(), "a and b: one CUDA device and dtype");
  const auto dtype = a.scalar_type() == at::kFloat ? sagan_ext::DType::kFloat32
                     : a.scalar_type() == at::kHalf ? sagan_ext::DType::kFloat16
                                                    : sagan_ext::DType::kBFloat16;
  const int64_t kk = a.scalar_type() == at::kFloat ? 8 : 16;
  TORCH_CHECK(a.dim() == 2 && a.size(0) == 16 && a.size(1) == kk && b.dim() == 2 && b.size(0) == kk && b.size(1) == 16,
              "a must be (16, ", kk, ") and b (", kk, ", 16)");
  const auto ac = a.contiguous(), bc = b.contiguous();
  auto d = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const auto e = sagan_ext::ptx_mma_selftest(ac.data_ptr(), bc.data_ptr(), d.data_ptr<float>(), dtype, allow_tf32,
                                             static_cast<int>(variant), reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(e == cudaSuccess, "ptx_mma_selftest failed: ", cudaGetErrorString(e));
  return d;
}

}  // namespace

TORCH_LIBRARY(sagan_ext_test, m) {
  m.def("ptx_mma_selftest(Tensor a, Tensor b, bool allow_tf32, int variant, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagan_ext_test, CUDA, m) { m.impl("ptx_mma_selftest", &ptx_mma_selftest); }
