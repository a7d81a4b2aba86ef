// Every inline PTX instruction the kernels use, as named wrappers (sm_80+). Kernels call only these.
// Section numbers are the PTX ISA 8.x manual's. Fragment notation: g = lane / 4 (the "groupID"),
// t = lane % 4 (the "threadID_in_group"); (r, c) is (row, column) of the operand matrix.
#pragma once

#include <cstdint>

namespace sagan_ext {
namespace ptx {

// 9.7.14.5.8, mma.m16n8k16 with .f16 / .bf16 operands and .f32 accumulators, A row-major, B column-major:
//   A (16x16): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..),
//              two 16-bit values per register, the lower column in the low half;
//   B (16x8):  b[0] = (2t..2t+1, g), b[1] = (2t+8..2t+9, g), the lower row in the low half;
//   C, D (16x8): c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1).
// d = a b + c.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 9.7.14.5.7, mma.m16n8k8 with .tf32 operands (32-bit registers holding tf32 from cvt_tf32):
//   A (16x8): a[0] = (g, t), a[1] = (g+8, t), a[2] = (g, t+4), a[3] = (g+8, t+4);
//   B (8x8):  b[0] = (t, g), b[1] = (t+4, g);   C, D as for m16n8k16.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 9.7.9.21 cvt: float32 -> tf32 rounded to nearest, ties away from zero (.rna), as cuBLAS rounds;
// the tensor core ignores the low 13 bits, so without this they would be truncated.
__device__ __forceinline__ uint32_t cvt_tf32(float x) {
  uint32_t r;
  asm volatile("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// 9.7.9.21 cvt with .f16x2 / .bf16x2: two float32 -> one register, `lo` in the low half (the
// instruction puts its first source in the high half), as mma fragments want consecutive columns.
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  uint32_t r;
  asm volatile("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm volatile("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// 9.7.9.25 ldmatrix.m8n8.b16: each lane i of 8*x lanes gives the shared address of row i % 8 of
// matrix i / 8 (8 consecutive 16-bit values, 16-byte aligned). Lane l receives, in r[j], elements
// (l / 4, 2 (l % 4)..+1) of matrix j; with .trans, elements (2 (l % 4)..+1, l / 4), i.e. the
// fragment of the transposed matrix. Those are exactly an mma operand's 8x8 sub-fragments.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// 9.7.9.25.3 cp.async.cg (16 bytes, L2 only): copies 16 bytes from global to shared, or, with
// `zeros` (the ignore-src predicate), writes 16 zero bytes and reads nothing; both addresses
// 16-byte aligned. Completes at cp_async_wait.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* global, bool zeros) {
  asm volatile(
      "{\n .reg .pred z;\n setp.ne.b32 z, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, z;\n}\n" ::"r"(smem_addr),
      "l"(global), "r"(static_cast<int>(zeros)));
}
// 9.7.9.25.3.2 cp.async.commit_group: closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// 9.7.9.25.3.3 cp.async.wait_group N: waits until at most N committed groups are still in flight
// (the calling thread's own copies; a __syncthreads after it publishes them to the block).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N == 0 || N == 1, "the kernels keep at most two groups in flight");
  if constexpr (N == 0) asm volatile("cp.async.wait_group 0;\n" ::);
  else asm volatile("cp.async.wait_group 1;\n" ::);
}

// A generic pointer into shared memory as the 32-bit shared-window address the instructions take.
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

}  // namespace ptx
}  // namespace sagan_ext
