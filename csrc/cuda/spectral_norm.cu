// Spectral norm in one launch each way: a cooperative grid (all blocks resident) that runs the
// passes over W in order, synchronised with grid.sync(). Norms are summed from per-block partials
// in a fixed order, so results do not depend on scheduling.
//   forward, per power iteration: v_raw = W^T u (one pass over W), u_raw = W v (one pass); then
//   sigma = u . (W v) = ||u_raw||^2 / max(||u_raw||, eps), and w_sn = W / sigma (a third pass).
//   backward: c = <G, W_sn> - g_sigma * sigma (one pass over G and W_sn), dW = (G - c u v^T) / sigma.
#include <cooperative_groups.h>

#include <algorithm>
#include <math.h>

#include "common.cuh"

namespace sagan_ext {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

// scratch layout: v_raw (cols) | u_raw (rows) | two partial-sum arrays (kMaxBlocks each), so a
// pass can write one while the other may still be read
struct Scratch {
  float *v_raw, *u_raw, *partial_a, *partial_b;
  __device__ explicit Scratch(const SpectralNormParams& p)
      : v_raw(p.scratch), u_raw(p.scratch + p.cols), partial_a(p.scratch + p.cols + p.rows),
        partial_b(p.scratch + p.cols + p.rows + kMaxBlocks) {}
};

// the block's partial sum of x into partial[blockIdx.x]; after grid.sync(), total() reads them all
__device__ void write_partial(float x, float* partial, float* shared) {
  x = block_sum(x, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = x;
}

__device__ float total(const float* partial) {
  float s = 0.f;
  for (int i = 0; i < static_cast<int>(gridDim.x); ++i) s += partial[i];
  return s;
}

// y[c] = scale_x * sum_r W[r, c] x[r] for every column: consecutive threads read consecutive columns
template <typename T>
__device__ float transposed_matvec(const SpectralNormParams& p, const float* x, float scale_x, float* y) {
  const T* w = static_cast<const T*>(p.w);
  float sq = 0.f;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < p.cols; c += gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int r = 0; r < p.rows; ++r) acc = fmaf(load(w + r * p.w_row_stride + c), x[r], acc);
    acc *= scale_x;
    y[c] = acc;
    sq = fmaf(acc, acc, sq);
  }
  return sq;
}

// y[r] = scale_x * sum_c W[r, c] x[c] for every row: one warp per row, lanes along the row
template <typename T>
__device__ float matvec(const SpectralNormParams& p, const float* x, float scale_x, float* y, const float* weights_of_rows) {
  const T* w = static_cast<const T*>(p.w);
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * blockDim.x / 32;
  float sum = 0.f;  // sum_r y[r]^2, or sum_r weights_of_rows[r] y[r] when given
  for (int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32; r < p.rows; r += warps) {
    float acc = 0.f;
    for (int c = lane; c < p.cols; c += 32) acc = fmaf(load(w + r * p.w_row_stride + c), x[c], acc);
    acc = warp_sum(acc) * scale_x;
    if (lane == 0) {
      if (y) y[r] = acc;
      sum += weights_of_rows ? weights_of_rows[r] * acc : acc * acc;
    }
  }
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spectral_norm_forward_kernel(SpectralNormParams p) {
  cg::grid_group grid = cg::this_grid();
  __shared__ float shared[32];
  const Scratch s(p);
  const int thread = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  float sigma = 0.f, u_scale = 1.f, v_scale = 1.f;
  for (int it = 0; it < p.iterations; ++it) {
    // v = normalize(W^T u), with u = u_raw * u_scale after the first iteration
    write_partial(transposed_matvec<T>(p, it == 0 ? p.u : s.u_raw, it == 0 ? 1.f : u_scale, s.v_raw), s.partial_a, shared);
    grid.sync();
    v_scale = 1.f / fmaxf(sqrtf(total(s.partial_a)), p.eps);
    // u = normalize(W v)
    write_partial(matvec<T>(p, s.v_raw, v_scale, s.u_raw, nullptr), s.partial_b, shared);
    grid.sync();
    const float norm = fmaxf(sqrtf(total(s.partial_b)), p.eps);
    u_scale = 1.f / norm;
    sigma = total(s.partial_b) / norm;
  }
  if (p.iterations > 0) {
    for (int c = thread; c < p.cols; c += stride) p.v[c] = s.v_raw[c] * v_scale;
    for (int r = thread; r < p.rows; r += stride) p.u[r] = s.u_raw[r] * u_scale;
  } else {  // evaluation: sigma = u . (W v) from the stored vectors
    write_partial(matvec<T>(p, p.v, 1.f, nullptr, p.u), s.partial_a, shared);
    grid.sync();
    sigma = total(s.partial_a);
  }
  if (thread == 0) *p.sigma = sigma;
  const T* w = static_cast<const T*>(p.w);
  T* w_sn = static_cast<T*>(p.w_sn);
  const int64_t numel = static_cast<int64_t>(p.rows) * p.cols;
  for (int64_t i = thread; i < numel; i += stride) {
    const int64_t r = i / p.cols, c = i % p.cols;
    store(w_sn + i, load(w + r * p.w_row_stride + c) / sigma);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spectral_norm_backward_kernel(SpectralNormParams p) {
  cg::grid_group grid = cg::this_grid();
  __shared__ float shared[32];
  const Scratch s(p);
  const T* g = static_cast<const T*>(p.grad_w_sn);
  const T* w_sn = static_cast<const T*>(p.w_sn);
  const int64_t numel = static_cast<int64_t>(p.rows) * p.cols;
  const int thread = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  float dot = 0.f;
  for (int64_t i = thread; i < numel; i += stride) dot = fmaf(load(g + i), load(w_sn + i), dot);
  write_partial(dot, s.partial_a, shared);
  grid.sync();
  const float sigma = *p.sigma, c = total(s.partial_a) - *p.grad_sigma * sigma;
  T* dw = static_cast<T*>(p.grad_w);
  for (int64_t i = thread; i < numel; i += stride) {
    const int64_t r = i / p.cols, col = i % p.cols;
    store(dw + i, (load(g + i) - c * p.u[r] * p.v[col]) / sigma);
  }
}

template <typename Kernel>
cudaError_t launch_cooperative(Kernel kernel, const SpectralNormParams& p, int64_t work, cudaStream_t stream) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (e != cudaSuccess) return e;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, int64_t(sms) * per_sm, kMaxBlocks})));
  SpectralNormParams args = p;
  void* kernel_args[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, kThreads, kernel_args, 0, stream);
}

}  // namespace

int64_t spectral_norm_scratch_floats(int rows, int cols) { return int64_t(rows) + cols + 2 * kMaxBlocks; }

cudaError_t spectral_norm_forward(const SpectralNormParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0 || p.iterations < 0) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto type) {
    return launch_cooperative(spectral_norm_forward_kernel<decltype(type)>, p, int64_t(p.rows) * p.cols / 8, stream);
  });
}

cudaError_t spectral_norm_backward(const SpectralNormParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto type) {
    return launch_cooperative(spectral_norm_backward_kernel<decltype(type)>, p, int64_t(p.rows) * p.cols / 8, stream);
  });
}

}  // namespace sagan_ext
