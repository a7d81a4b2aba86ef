// Small cases of every CUDA kernel in csrc/cuda (and the test-only fragment-loader self-test), for
// compute-sanitizer (memcheck, racecheck, initcheck, synccheck). No torch: the sanitizer
// instruments these kernels alone and the program starts in a second. Every tensor is its own
// cudaMalloc of exactly its size, so a read or write one element past any of them is caught; the
// tensor-core paths get q, k, v and dO as the binding hands them over (channel-major, positions
// padded with zeros to whole 16-byte chunks). Exit status 0 when every launch succeeded and every
// output is finite. benchmarks/gpu_check.sh links it with the JIT build's kernel objects; by hand:
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc/cuda -Itests/cuda benchmarks/sanitizer_cases.cu \
//        tests/cuda/ptx_selftest.cu csrc/cuda/*.cu -o sanitizer_cases
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "kernels.h"
#include "ptx_selftest.h"

namespace {

using sagan_ext::DType;

int failures = 0;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "FAILED %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);  // a failed launch leaves the context unusable
  }
}

size_t element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

float to_float(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

void from_float(void* p, DType t, size_t i, float x) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = x; break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half(x); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(x);
  }
}

// A device tensor of `count` elements, exactly that size; random normal * scale, or uninitialised
// (an output: initcheck then reports any element a kernel reads before writing it).
struct Tensor {
  void* ptr = nullptr;
  size_t count = 0;
  DType dtype = DType::kFloat32;
  Tensor(size_t n, DType t, std::mt19937& rng, float scale) : count(n), dtype(t) {
    check(cudaMalloc(&ptr, n * element_size(t)), "cudaMalloc");
    if (scale < 0) check(cudaMemset(ptr, 0, n * element_size(t)), "cudaMemset");  // zeros
    if (scale > 0) {
      std::normal_distribution<float> normal(0.f, scale);
      std::vector<char> host(n * element_size(t));
      for (size_t i = 0; i < n; ++i) from_float(host.data(), t, i, normal(rng));
      check(cudaMemcpy(ptr, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
    }
  }
  Tensor(const Tensor&) = delete;
  ~Tensor() { cudaFree(ptr); }
  float* f() const { return static_cast<float*>(ptr); }
};

void expect_finite(const Tensor& t, const char* what, const char* name) {
  std::vector<char> host(t.count * element_size(t.dtype));
  check(cudaMemcpy(host.data(), t.ptr, host.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
  for (size_t i = 0; i < t.count; ++i) {
    if (!std::isfinite(to_float(host.data(), t.dtype, i))) {
      std::fprintf(stderr, "FAILED %s: %s[%zu] is not finite\n", what, name, i);
      ++failures;
      return;
    }
  }
}

const char* dtype_name(DType t, bool tf32) {
  return t == DType::kFloat32 ? (tf32 ? "tf32" : "fp32") : t == DType::kFloat16 ? "fp16" : "bf16";
}

// A (B, rows, cols) operand: channel-major (positions contiguous, `pitch` positions per channel
// row) as ops.py passes them, or position-major (channels contiguous).
sagan_ext::Matrix matrix(const Tensor& t, int rows, int cols, bool channel_major, int pitch) {
  return channel_major ? sagan_ext::Matrix{t.ptr, int64_t(pitch) * cols, 1, pitch}
                       : sagan_ext::Matrix{t.ptr, int64_t(rows) * cols, cols, 1};
}

void attention_case(DType dtype, bool tf32, int b, int n, int m, int dk, int dv, bool channel_major, bool residual,
                    bool deterministic, std::mt19937& rng) {
  sagan_ext::AttentionParams p;
  p.batch = b, p.n = n, p.m = m, p.dk = dk, p.dv = dv, p.dtype = dtype, p.tf32 = tf32;
  const bool tensor_cores = sagan_ext::uses_tensor_cores(p);
  channel_major = channel_major || tensor_cores;  // the binding's channel_major() copy
  const int chunk = 16 / static_cast<int>(element_size(dtype));
  const int n_pitch = tensor_cores ? (n + chunk - 1) / chunk * chunk : n;
  const int m_pitch = tensor_cores ? (m + chunk - 1) / chunk * chunk : m;
  char what[200];
  std::snprintf(what, sizeof what, "attention %s B=%d N=%d M=%d dk=%d dv=%d %s%s%s", dtype_name(dtype, tf32), b, n, m,
                dk, dv, channel_major ? "channel-major" : "position-major", residual ? " +residual" : "",
                deterministic ? " deterministic" : "");
  const float qk_scale = std::pow(9.f / dk, 0.25f);  // scores with standard deviation 3
  // padded positions hold zeros, as the binding's copies do
  const auto input = [&](int rows, int pitch, int cols, float scale) {
    auto t = std::make_unique<Tensor>(size_t(b) * pitch * cols, dtype, rng, -1.f);
    Tensor values(size_t(b) * rows * cols, dtype, rng, scale);
    for (int bi = 0; bi < b; ++bi)  // rows x cols values into [channel][pitch] (or [row][col]) storage
      check(cudaMemcpy2D(static_cast<char*>(t->ptr) + size_t(bi) * pitch * cols * element_size(dtype),
                         (channel_major ? pitch : cols) * element_size(dtype),
                         static_cast<char*>(values.ptr) + size_t(bi) * rows * cols * element_size(dtype),
                         (channel_major ? rows : cols) * element_size(dtype), (channel_major ? rows : cols) * element_size(dtype),
                         channel_major ? cols : rows, cudaMemcpyDeviceToDevice),
            "cudaMemcpy2D");
    return t;
  };
  const auto q = input(n, n_pitch, dk, qk_scale), k = input(m, m_pitch, dk, qk_scale);
  const auto v = input(m, m_pitch, dv, 1.f), d_o = input(n, n_pitch, dv, 1.f);
  Tensor o(size_t(b) * n * dv, dtype, rng, 0.f), stats(size_t(b) * 2 * n, DType::kFloat32, rng, 0.f);
  Tensor x(size_t(b) * dv * n, dtype, rng, 1.f), out(size_t(b) * dv * n, dtype, rng, 0.f), gamma(1, dtype, rng, 1.f);
  Tensor delta(size_t(b) * n, DType::kFloat32, rng, 0.f);
  Tensor dq(size_t(b) * n * dk, dtype, rng, 0.f), dq_accum(size_t(b) * n * dk, DType::kFloat32, rng, -1.f);
  Tensor dk_out(size_t(b) * m * dk, dtype, rng, 0.f), dv_out(size_t(b) * m * dv, dtype, rng, 0.f);
  Tensor turns(size_t(b) * ((n + sagan_ext::kBackwardQueryBlock - 1) / sagan_ext::kBackwardQueryBlock + 1), DType::kFloat32,
               rng, -1.f);  // int32 counters, zeroed

  p.q = matrix(*q, n, dk, channel_major, n_pitch), p.k = matrix(*k, m, dk, channel_major, m_pitch);
  p.v = matrix(*v, m, dv, channel_major, m_pitch);
  p.o = matrix(o, n, dv, false, n), p.stats = stats.f();  // o (B, N, dv) contiguous, as the binding allocates it
  if (residual) {  // x, out (B, dv, N) contiguous: (batch, channel, position) strides
    p.x = {x.ptr, int64_t(dv) * n, n, 1}, p.out = {out.ptr, int64_t(dv) * n, n, 1}, p.gamma = gamma.ptr;
  }
  check(sagan_ext::attention_forward(p, nullptr), what);
  check(cudaDeviceSynchronize(), what);
  p.d_o = matrix(*d_o, n, dv, channel_major, n_pitch), p.delta = delta.f();
  p.dk_out = matrix(dk_out, m, dk, false, m), p.dv_out = matrix(dv_out, m, dv, false, m);
  if (tensor_cores) {
    p.dq_accum = dq_accum.f();
    if (deterministic) p.dq_turn = static_cast<int*>(turns.ptr);
  } else {
    p.dq = matrix(dq, n, dk, false, n);
  }
  check(sagan_ext::attention_backward(p, nullptr), what);
  check(cudaDeviceSynchronize(), what);
  expect_finite(o, what, "o"), expect_finite(stats, what, "stats"), expect_finite(tensor_cores ? dq_accum : dq, what, "dq");
  expect_finite(dk_out, what, "dk"), expect_finite(dv_out, what, "dv");
  if (residual) expect_finite(out, what, "out");
  std::printf("ok  %s\n", what);
}

void spectral_norm_case(DType dtype, int rows, int cols, int row_stride, int iterations, std::mt19937& rng) {
  char what[120];
  std::snprintf(what, sizeof what, "spectral_norm %s %dx%d (row stride %d) iterations %d", dtype_name(dtype, false),
                rows, cols, row_stride, iterations);
  Tensor w(size_t(rows - 1) * row_stride + cols, dtype, rng, 1.f);
  Tensor u(rows, DType::kFloat32, rng, 1.f), v(cols, DType::kFloat32, rng, 1.f);
  Tensor w_sn(size_t(rows) * cols, dtype, rng, 0.f), sigma(1, DType::kFloat32, rng, 0.f);
  Tensor scratch(sagan_ext::spectral_norm_scratch_floats(rows, cols), DType::kFloat32, rng, 0.f);
  Tensor grad(size_t(rows) * cols, dtype, rng, 1.f), grad_sigma(1, DType::kFloat32, rng, 1.f);
  Tensor grad_w(size_t(rows) * cols, dtype, rng, 0.f);
  sagan_ext::SpectralNormParams p;
  p.w = w.ptr, p.w_row_stride = row_stride, p.rows = rows, p.cols = cols, p.dtype = dtype;
  p.u = u.f(), p.v = v.f(), p.iterations = iterations, p.w_sn = w_sn.ptr, p.sigma = sigma.f(), p.scratch = scratch.f();
  check(sagan_ext::spectral_norm_forward(p, nullptr), what);
  check(cudaDeviceSynchronize(), what);
  // the backward reads the contiguous w_sn (the binding makes it so)
  p.w = w_sn.ptr, p.w_row_stride = cols, p.grad_w_sn = grad.ptr, p.grad_sigma = grad_sigma.f(), p.grad_w = grad_w.ptr;
  check(sagan_ext::spectral_norm_backward(p, nullptr), what);
  check(cudaDeviceSynchronize(), what);
  expect_finite(w_sn, what, "w_sn"), expect_finite(sigma, what, "sigma"), expect_finite(grad_w, what, "grad_w");
  std::printf("ok  %s\n", what);
}

void ptx_case(DType dtype, bool tf32, int variant, std::mt19937& rng) {
  char what[80];
  std::snprintf(what, sizeof what, "ptx_mma_selftest %s variant %d", dtype_name(dtype, tf32), variant);
  const int kk = dtype == DType::kFloat32 ? 8 : 16;
  Tensor a(16 * kk, dtype, rng, 1.f), bm(kk * 16, dtype, rng, 1.f), d(16 * 16, DType::kFloat32, rng, 0.f);
  check(sagan_ext::ptx_mma_selftest(a.ptr, bm.ptr, d.f(), dtype, tf32, variant, nullptr), what);
  check(cudaDeviceSynchronize(), what);
  expect_finite(d, what, "d");
  std::printf("ok  %s\n", what);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  struct Path { DType dtype; bool tf32; };
  const Path paths[] = {{DType::kFloat32, false}, {DType::kFloat32, true}, {DType::kFloat16, false},
                        {DType::kBFloat16, false}};
  for (const Path& path : paths) {
    // one key; ragged N = M with the residual epilogue; pooled M = N / 4; dk 8..64 buckets; dv to
    // 512 (the wide backward); the ordered (deterministic) dQ
    attention_case(path.dtype, path.tf32, 1, 1, 1, 8, 8, true, false, false, rng);
    attention_case(path.dtype, path.tf32, 2, 63, 63, 24, 130, true, true, false, rng);
    attention_case(path.dtype, path.tf32, 1, 63, 15, 64, 8, false, false, false, rng);
    attention_case(path.dtype, path.tf32, 1, 300, 75, 32, 256, false, true, false, rng);
    attention_case(path.dtype, path.tf32, 1, 130, 70, 16, 512, true, false, false, rng);
    attention_case(path.dtype, path.tf32, 2, 130, 150, 32, 64, true, false, true, rng);
    if (path.dtype == DType::kFloat32 && path.tf32) continue;  // the spectral norm takes no TF32
    spectral_norm_case(path.dtype, 63, 300, 304, 1, rng);
    spectral_norm_case(path.dtype, 300, 17, 17, 0, rng);
  }
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32})
    for (int variant = 0; variant < sagan_ext::kPtxSelftestVariants; ++variant) ptx_case(dtype, dtype == DType::kFloat32, variant, rng);
  if (failures) std::fprintf(stderr, "%d case(s) produced non-finite outputs\n", failures);
  std::printf("sanitizer_cases: %s\n", failures ? "FAILED" : "done");
  return failures ? 1 : 0;
}
