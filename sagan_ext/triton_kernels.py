"""Triton kernels: the "triton" backend's attention core (flash-style forward, FlashAttention-2
style backward) and spectral norm, on (B, N, d) tensors read through their strides: q (B, N, dk),
k (B, M, dk), v (B, M, dv), dO (B, N, dv), channel-major views of the projection GEMM as ops.py
passes them, or position-major as tests do; no copies.

- Scores are unscaled (SAGAN). The forward keeps, per query row, the running max m of s = q k^T
  and the sum l of exp(s - m) in float32 and saves both (stats, (B, 2, N)); the backward recomputes
  s with the same helper on the same (query, key) tile shape and takes exp(s - m) / l, so s - m is
  exact even at scores of 1e5 (a saved lse = m + log l would carry ulp(m) into every p).
  Base 2 for speed, subtracting first: exp2((s - m) * log2 e).
- dk (8..64) is padded to a power of two >= 16 inside the kernel with masks, never in memory.
- dv (up to 512) is tiled across programs (BLOCK_DV) in the forward and the backward; the cheap
  q k^T (dk <= 64) is recomputed per tile instead of holding a 512-wide accumulator.
- fp32 inputs go through tl.dot as TF32 when the op's tf32 is set (the caller's
  torch.backends.cuda.matmul.allow_tf32, decided once in the forward and passed to the backward), else in
  full precision ("ieee", FMA: smaller tiles, or the accumulators spill).
- Loads are pipelined by Triton (cp.async, 3 stages on tensor cores). On Hopper the forward can
  copy its q, k, v tiles with TMA instead (SAGAN_EXT_TRITON_TMA=1; opt-in until it has run on a GPU),
  where strides and bases allow it (tma_layout).
- Block sizes are tl.constexpr, autotuned over short pruned lists on GPUs; under the interpreter
  (TRITON_INTERPRET=1, which runs these kernels exactly on the CPU) one small config is pinned so
  that tests run fast and exercise ragged tails.
- Every launch is built by one function (_forward_launches, _backward_launches, ...) that returns
  the kernel, grid and arguments; the ops run them, and tests/triton_compile.py compiles the same
  launches for sm_80/sm_90 without a GPU.

The kernels are registered as torch.library.triton_op's (sagan_ext_triton::*), which
torch.compile can trace into.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # a global that compiled kernels read must be a constexpr


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# tiles: rows x channels blocks of a (rows, channels) matrix, any strides


@triton.jit
def _load_tile(base, rows, cols, row_stride, col_stride, n_rows, n_cols):
    """base[rows, cols], zero outside the (n_rows, n_cols) matrix."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(base, rows, cols, row_stride, col_stride, n_rows, n_cols, value):
    tl.store(base + rows[:, None] * row_stride + cols[None, :] * col_stride, value.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _tile_descriptor(base, n_rows, n_cols, row_stride, col_stride, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr, CHANNEL_MAJOR: tl.constexpr):
    """A TMA descriptor (Hopper's bulk tensor copies) of the (n_rows, n_cols) matrix at base, for
    [BLOCK_ROWS, BLOCK_COLS] tiles, zero outside it. A channel-major matrix (row_stride 1) is
    described as its transpose, since TMA needs the last dimension contiguous; _load_described
    transposes its tiles back."""
    if CHANNEL_MAJOR:
        return tl.make_tensor_descriptor(base, [n_cols, n_rows], [col_stride, 1], [BLOCK_COLS, BLOCK_ROWS])
    else:
        return tl.make_tensor_descriptor(base, [n_rows, n_cols], [row_stride, 1], [BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def _load_described(descriptor, row, col, CHANNEL_MAJOR: tl.constexpr):
    """The [BLOCK_ROWS, BLOCK_COLS] tile at (row, col) of _tile_descriptor's matrix."""
    if CHANNEL_MAJOR:
        return tl.trans(descriptor.load([col, row]))
    else:
        return descriptor.load([row, col])


@triton.jit
def _scores(q, k, PRECISION: tl.constexpr):
    """s = q k^T for one (query block, key block) tile: the forward and the backward both call this
    on [BLOCK_M, DK_PAD] x [BLOCK_N, DK_PAD] tiles, so the backward's s is the forward's."""
    return tl.dot(q, tl.trans(k), input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# attention forward


@triton.jit
def _attention_forward(
    Q, K, V, O, STATS, stride_qb, stride_qn, stride_qc, stride_kb, stride_km, stride_kc,
    stride_vb, stride_vm, stride_vc, N, M, DK, DV,
    X, OUT, GAMMA, stride_xb, stride_xc, stride_xn, stride_outb, stride_outc, stride_outn,  # RESIDUAL: OUT = X + gamma O
    DK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, RESIDUAL: tl.constexpr, TMA: tl.constexpr, CHANNEL_MAJOR: tl.constexpr,
):
    """O (B, N, DV) contiguous; STATS (B, 2, N): row max m and row sum l = sum exp(s - m).
    TMA (Hopper): q, k, v tiles copied by TMA descriptors (CHANNEL_MAJOR: all three are), not by
    per-thread loads; the caller checked the 16-byte alignment TMA needs."""
    pid_m, b, pid_dv = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)  # int64: B N dv > 2^31
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, DK_PAD)
    dvs = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    if TMA:
        q = _load_described(_tile_descriptor(Q + b * stride_qb, N, DK, stride_qn, stride_qc, BLOCK_M, DK_PAD,
                                             CHANNEL_MAJOR), pid_m * BLOCK_M, 0, CHANNEL_MAJOR)
        k_tiles = _tile_descriptor(K + b * stride_kb, M, DK, stride_km, stride_kc, BLOCK_N, DK_PAD, CHANNEL_MAJOR)
        v_tiles = _tile_descriptor(V + b * stride_vb, M, DV, stride_vm, stride_vc, BLOCK_N, BLOCK_DV, CHANNEL_MAJOR)
    else:
        q = _load_tile(Q + b * stride_qb, rows, dks, stride_qn, stride_qc, N, DK)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if TMA:
            k = _load_described(k_tiles, start, 0, CHANNEL_MAJOR)
        else:
            k = _load_tile(K + b * stride_kb, cols, dks, stride_km, stride_kc, M, DK)
        s = tl.where(cols[None, :] < M, _scores(q, k, PRECISION), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2((s - m_new[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = _load_described(v_tiles, start, pid_dv * BLOCK_DV, CHANNEL_MAJOR)
        else:
            v = _load_tile(V + b * stride_vb, cols, dvs, stride_vm, stride_vc, M, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(O + b * N * DV, rows, dvs, DV, 1, N, DV, acc)
    if RESIDUAL:  # written straight into x's (B, C, H, W) layout: channels dvs, positions rows
        mask = (rows[:, None] < N) & (dvs[None, :] < DV)
        x = tl.load(X + b * stride_xb + dvs[None, :] * stride_xc + rows[:, None] * stride_xn, mask=mask, other=0.0)
        gamma = tl.load(GAMMA).to(tl.float32)
        out = x.to(tl.float32) + gamma * acc.to(O.dtype.element_ty).to(tl.float32)
        tl.store(OUT + b * stride_outb + dvs[None, :] * stride_outc + rows[:, None] * stride_outn,
                 out.to(OUT.dtype.element_ty), mask=mask)
    if pid_dv == 0:
        tl.store(STATS + b * 2 * N + rows, m_i, mask=rows < N)
        tl.store(STATS + b * 2 * N + N + rows, l_i, mask=rows < N)


# ---------------------------------------------------------------------------------------------
# attention backward: delta = rowsum(dO * O), then one program per (key block, value tile) that
# walks the query blocks and computes, per (query block, key block) tile:
#   s = q k^T            2 BLOCK_M BLOCK_N dk    FLOPs
#   p = exp(s - m) / l
#   dV += p^T dO         2 BLOCK_M BLOCK_N BLOCK_DV   (this program's value tile)
#   dP = dO V^T          2 BLOCK_M BLOCK_N dv         (over the whole value dim)
#   dS = p (dP - delta)  (rounded once to the operand type, whole: not per value tile)
#   dK += dS^T q         2 BLOCK_M BLOCK_N dk   } the first value tile's program only: dK is
#   dQ += dS k           2 BLOCK_M BLOCK_N dk   } stored, dQ added with fp32 atomics
# Per (query, key) pair, with T = cdiv(dv, BLOCK_DV) value tiles: T (2 dk + 2 dv) + 2 dv + 4 dk
# FLOPs; FlashAttention-2's 4 dv + 6 dk when one tile spans dv, which the pruning keeps for dv up
# to 256 (the paper's C and BigGAN's C / 2); wider value dims recompute s and dP per tile.
# benchmarks/blocks.py counts useful FLOPs only (backward 4 dv + 4 dk), whatever the kernel recomputes.
# The dQ atomics are relaxed: only their sum is read, after the kernel ends (the default acq_rel
# wraps each 16-byte add in a full GPU fence, MEMBAR.ALL.GPU + CCTL.IVALL in the sm_90 SASS).


@triton.jit
def _attention_backward_delta(O, DO, DELTA, stride_dob, stride_don, stride_doc, N, DV,
                              BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for c in range(0, DV, BLOCK_DV):
        dvs = c + tl.arange(0, BLOCK_DV)
        o = _load_tile(O + b * N * DV, rows, dvs, DV, 1, N, DV).to(tl.float32)
        do = _load_tile(DO + b * stride_dob, rows, dvs, stride_don, stride_doc, N, DV).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(DELTA + b * N + rows, acc, mask=rows < N)


@triton.jit
def _attention_backward(
    Q, K, V, DO, STATS, DELTA, DQ, DK_OUT, DV_OUT,
    stride_qb, stride_qn, stride_qc, stride_kb, stride_km, stride_kc, stride_vb, stride_vm, stride_vc,
    stride_dob, stride_don, stride_doc, N, M, DK, DV,
    DK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, ONE_VALUE_TILE: tl.constexpr,
):
    """DQ (B, N, DK) zeroed float32, added to atomically; DK_OUT (B, M, DK) and DV_OUT (B, M, DV) stored.
    ONE_VALUE_TILE: BLOCK_DV >= DV (the same for every config the pruning keeps)."""
    pid_n, b, pid_dv = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dks = tl.arange(0, DK_PAD)
    c0 = pid_dv * BLOCK_DV
    dvs = c0 + tl.arange(0, BLOCK_DV)
    Q, K, V, DO = Q + b * stride_qb, K + b * stride_kb, V + b * stride_vb, DO + b * stride_dob
    k = _load_tile(K, cols, dks, stride_km, stride_kc, M, DK)
    v = _load_tile(V, cols, dvs, stride_vm, stride_vc, M, DV)
    dk_acc = tl.zeros([BLOCK_N, DK_PAD], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, rows, dks, stride_qn, stride_qc, N, DK)
        # p = 0 outside the matrix without an exp2 of a huge positive number: keys past M score
        # -inf as in the forward, rows past N take m = +inf
        s = tl.where(cols[None, :] < M, _scores(q, k, PRECISION), float("-inf"))
        m = tl.load(STATS + b * 2 * N + rows, mask=rows < N, other=float("inf"))
        l = tl.load(STATS + b * 2 * N + N + rows, mask=rows < N, other=1.0)
        p = tl.exp2((s - m[:, None]) * LOG2E) / l[:, None]
        do = _load_tile(DO, rows, dvs, stride_don, stride_doc, N, DV)
        dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if not ONE_VALUE_TILE:  # the other value tiles' share of dP (a nested loop: this one then is not pipelined)
            for t in range(0, DV, BLOCK_DV):
                if t != c0:
                    t_dvs = t + tl.arange(0, BLOCK_DV)
                    do_t = _load_tile(DO, rows, t_dvs, stride_don, stride_doc, N, DV)
                    v_t = _load_tile(V, cols, t_dvs, stride_vm, stride_vc, M, DV)
                    dp += tl.dot(do_t, tl.trans(v_t), input_precision=PRECISION)
        if pid_dv == 0:
            delta = tl.load(DELTA + b * N + rows, mask=rows < N, other=0.0)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk_acc += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
            dq = tl.dot(ds, k, input_precision=PRECISION)
            tl.atomic_add(DQ + b * N * DK + rows[:, None] * DK + dks[None, :], dq,
                          mask=(rows[:, None] < N) & (dks[None, :] < DK), sem="relaxed")
    _store_tile(DV_OUT + b * M * DV, cols, dvs, DV, 1, M, DV, dv_acc)
    if pid_dv == 0:
        _store_tile(DK_OUT + b * M * DK, cols, dks, DK, 1, M, DK, dk_acc)


# ---------------------------------------------------------------------------------------------
# spectral norm, spread over the GPU: each pass of the power iteration over W is its own launch of
# many programs (a pass needs the previous one's whole result). Each program writes its share of
# its pass's reduction (a squared norm, a dot product) to a partials array that the next launch
# sums: no atomics, so sigma is the same in every run.


@triton.jit
def _sum_partials(P, n, NP: tl.constexpr):
    offs = tl.arange(0, NP)
    return tl.sum(tl.load(P + offs, mask=offs < n, other=0.0), 0)


@triton.jit
def _sn_transposed_matvec(W, X, XP, n_xp, Y, YP, H, WD, stride_h, eps, NORMALIZE_X: tl.constexpr, NP: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Y = W^T x on this program's BLOCK_W columns, x = X / max(||X||, eps) (||X||^2: the sum of
    XP's n_xp partials) if NORMALIZE_X else X; YP[program] = ||Y's columns||^2."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_W + tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_W], tl.float32)
    for r0 in range(0, H, BLOCK_H):
        rows = r0 + tl.arange(0, BLOCK_H)
        w = _load_tile(W, rows, cols, stride_h, 1, H, WD).to(tl.float32)
        acc += tl.sum(w * tl.load(X + rows, mask=rows < H, other=0.0)[:, None], 0)
    if NORMALIZE_X:
        acc = acc / tl.maximum(tl.sqrt(_sum_partials(XP, n_xp, NP)), eps)
    tl.store(Y + cols, acc, mask=cols < WD)
    tl.store(YP + pid, tl.sum(acc * acc, 0))


@triton.jit
def _sn_matvec(W, X, XP, n_xp, U, Y, YP, H, WD, stride_h, eps, NORMALIZE_X: tl.constexpr, DOT_U: tl.constexpr,
               NP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Y = W x on this program's BLOCK_H rows, x as in _sn_transposed_matvec; YP[program] = ||Y's
    rows||^2, or with DOT_U (evaluation: sigma = u . W v) U's rows . Y's rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], tl.float32)
    for c0 in range(0, WD, BLOCK_W):
        cols = c0 + tl.arange(0, BLOCK_W)
        w = _load_tile(W, rows, cols, stride_h, 1, H, WD).to(tl.float32)
        acc += tl.sum(w * tl.load(X + cols, mask=cols < WD, other=0.0)[None, :], 1)
    if NORMALIZE_X:
        acc = acc / tl.maximum(tl.sqrt(_sum_partials(XP, n_xp, NP)), eps)
    tl.store(Y + rows, acc, mask=rows < H)
    if DOT_U:
        tl.store(YP + pid, tl.sum(acc * tl.load(U + rows, mask=rows < H, other=0.0), 0))
    else:
        tl.store(YP + pid, tl.sum(acc * acc, 0))


@triton.jit
def _sn_finish(W, WSN, SIGMA, U, UP, n_up, V, VP, n_vp, H, WD, stride_h, eps, TRAINING: tl.constexpr,
               NP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """sigma, then WSN = W / sigma on this program's tile. Training: U holds t = W v, UP its
    squared norm's partials: sigma = ||t||^2 / max(||t||, eps) (= u . W v, no pass over W), and the
    first column of programs writes u = t / max(||t||, eps), the first row v = V / max(||V||, eps).
    Evaluation: sigma is the sum of UP (u . W v)."""
    pid_h, pid_w = tl.program_id(0), tl.program_id(1)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    total = _sum_partials(UP, n_up, NP)
    sigma = total
    if TRAINING:
        norm = tl.maximum(tl.sqrt(total), eps)
        sigma = total / norm
        if pid_w == 0:
            tl.store(U + rows, tl.load(U + rows, mask=rows < H, other=0.0) / norm, mask=rows < H)
        if pid_h == 0:
            v_norm = tl.maximum(tl.sqrt(_sum_partials(VP, n_vp, NP)), eps)
            tl.store(V + cols, tl.load(V + cols, mask=cols < WD, other=0.0) / v_norm, mask=cols < WD)
    if (pid_h == 0) & (pid_w == 0):
        tl.store(SIGMA + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + sigma)
    mask = (rows[:, None] < H) & (cols[None, :] < WD)
    w = tl.load(W + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(WSN + rows[:, None] * WD + cols[None, :], (w / sigma).to(WSN.dtype.element_ty), mask=mask)


@triton.jit
def _spectral_norm_backward_dot(G, WSN, DOTP, numel, BLOCK: tl.constexpr):
    """DOTP[program] = this program's share of <G, W_sn> (a grid-stride loop)."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, numel, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += (tl.load(G + offs, mask=offs < numel, other=0.0).to(tl.float32) *
                tl.load(WSN + offs, mask=offs < numel, other=0.0).to(tl.float32))
    tl.store(DOTP + pid, tl.sum(acc, 0))


@triton.jit
def _spectral_norm_backward_apply(G, U, V, DOTP, n_dotp, GRAD_SIGMA, SIGMA, DW, H, WD, NP: tl.constexpr,
                                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """dW = (G - (<G, W_sn> - g_sigma * sigma) u v^T) / sigma."""
    rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < H) & (cols[None, :] < WD)
    sigma = tl.load(SIGMA)
    c = _sum_partials(DOTP, n_dotp, NP) - tl.load(GRAD_SIGMA) * sigma
    u = tl.load(U + rows, mask=rows < H, other=0.0)
    v = tl.load(V + cols, mask=cols < WD, other=0.0)
    g = tl.load(G + rows[:, None] * WD + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dw = (g - c * u[:, None] * v[None, :]) / sigma
    tl.store(DW + rows[:, None] * WD + cols[None, :], dw.to(DW.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration: short autotuned lists on GPUs, one pinned small config when interpreted

# (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages), per dot kind: fp16/bf16 and TF32 on tensor
# cores (operands in shared memory, accumulators in MMA fragments; TF32's 4-byte operands take
# twice the shared memory, so its tiles are smaller), and fp32 "ieee" dots as FMA loops over
# register tiles (smaller still: 64x32 and 64x64 query x key tiles spilled up to 13 KB with dk 64).
# Value tiles up to 256 wide, so that one program spans the paper's and BigGAN's value dims: the
# pruning keeps only the configs with the fewest value tiles. The tensor-core configs pipeline 3
# stages (TF32's backward 2, for shared memory); the backward's loop is pipelined only when one
# value tile spans dv (ONE_VALUE_TILE: no nested loop in it; Triton pipelines innermost loops only),
# as for the paper's and BigGAN's blocks. Every config fits sm_80 and sm_90 and spills at most a few
# hundred bytes: tests/triton_compile.py prints registers, spills, shared memory and asynchronous
# copies for each and fails when one does not fit or an attention loop that must prefetch does not.
FORWARD_TILES = {
    "tensor_core": [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3),
                    (64, 64, 256, 8, 3), (32, 32, 64, 4, 2)],
    "tf32": [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 128, 4, 3), (64, 32, 256, 8, 2), (32, 32, 64, 4, 2)],
    "fma": [(32, 32, 64, 8, 2), (16, 64, 32, 4, 2), (16, 32, 64, 4, 2), (32, 32, 32, 4, 2)],
}
BACKWARD_TILES = {
    "tensor_core": [(64, 64, 64, 4, 3), (32, 64, 128, 4, 3), (64, 64, 128, 8, 3), (32, 64, 256, 8, 3),
                    (32, 32, 64, 4, 2)],
    "tf32": [(64, 64, 64, 4, 2), (32, 64, 128, 8, 2), (32, 16, 128, 4, 2), (32, 32, 64, 4, 2)],
    "fma": [(32, 32, 32, 8, 1), (16, 32, 32, 4, 1), (32, 16, 32, 4, 1), (16, 16, 32, 4, 1)],
}
PINNED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DV=16)  # interpreter: small tiles, ragged tails everywhere
_KEY = ["N", "M", "DK_PAD", "DV", "PRECISION"]


def dot_kind(precision: str, dtype: torch.dtype) -> str:
    if precision == "ieee" and dtype == torch.float32:
        return "fma"
    return "tf32" if dtype == torch.float32 else "tensor_core"


def kept_tiles(tiles: dict, kind: str, n, m, dv) -> tuple:
    """This dot kind's tiles with the fewest value tiles for dv, less those whose blocks exceed the
    problem (they only add masked work); the smallest if none fits. (A power-of-two block b fits
    a size s when b <= 16 or b < 2 s, i.e. b <= max(16, next_power_of_2(s)): comparisons that
    symbolic sizes take too.)"""
    own = tiles[kind]
    fits = lambda block, size: block <= 16 or 2 * size > block  # noqa: E731
    value_tiles = lambda t: (dv + t[2] - 1) // t[2]  # noqa: E731
    fewest = min(value_tiles(t) for t in own)
    kept = tuple(t for t in own if value_tiles(t) == fewest and fits(t[0], n) and fits(t[1], m) and fits(t[2], dv))
    return kept or tuple(own[-1:])


def autotuned(kernel, tiles, key=_KEY, accumulated=(), do_bench=None):
    """`kernel` autotuned over `tiles` (already pruned to the problem: a triton.autotune with
    prune_configs_by is rebuilt by torch.compile's tracing without its reset_to_zero,
    torch/_higher_order_ops/triton_kernel_wrap.py). The tuner times each config by running the
    kernel many times on the call's own buffers, so every output the kernel adds to
    (`accumulated`: atomics into buffers the caller zeroed) is zeroed before each timed run and
    once more before the real one; without that, the first call at each new shape returns the sum
    of every timed run."""
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bdv), num_warps=w, num_stages=s)
               for bm, bn, bdv, w, s in tiles]
    # cache_results: the choice is kept on disk (Triton's cache), so a shape is timed once per
    # machine, not once per process and rank
    return triton.autotune(configs, key=key, reset_to_zero=list(accumulated) or None, do_bench=do_bench,
                           cache_results=True)(kernel)


FORWARD_TUNING = dict(kernel=_attention_forward, key=_KEY + ["RESIDUAL"])
BACKWARD_TUNING = dict(kernel=_attention_backward, accumulated=("DQ",))
_tuners: dict = {}  # (kernel name, tiles) -> its autotuner: one per pruned config list, kept for its tuning cache


def _tuned_kernel(tuning: dict, tiles: tuple):
    """The kernel to launch: under the interpreter the plain kernel (one pinned config, PINNED),
    else the autotuner over `tiles`."""
    if interpreting():
        return tuning["kernel"]
    name = (tuning["kernel"].__name__, tiles)
    if name not in _tuners:
        _tuners[name] = autotuned(tiles=tiles, **tuning)
    return _tuners[name]


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.float32 and not tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


def _dk_pad(dk: int) -> int:
    return max(16, triton.next_power_of_2(dk))


class Launch(NamedTuple):
    kernel: Any  # a @triton.jit kernel, or its autotuner
    grid: Callable | tuple
    args: tuple
    kwargs: dict


def _run(launches: list[Launch]) -> None:
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    for kernel, grid, args, kwargs in launches:
        if kwargs.get("TMA") and not interpreting():  # set per launch: Triton's allocator is per thread
            triton.set_allocator(_descriptor_scratch)
        if capturing and isinstance(kernel, triton.runtime.Autotuner):
            kernel, kwargs = untuned_launch(kernel, args, kwargs)
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def untuned_launch(tuner, args, kwargs):
    """(kernel, kwargs) that launch `tuner`'s kernel without timing anything: inside CUDA-graph
    capture the tuner's timed runs would be captured into the graph. The config tuned for these
    arguments before the capture (a warm-up step outside it), else the first one."""
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    key = [named[name] for name in tuner.keys if name in named]  # the tuner's own key (Autotuner.run)
    key += [str(arg.dtype) for name, arg in named.items() if name in tuner.arg_names and hasattr(arg, "dtype")]
    config = tuner.cache.get(tuple(key), tuner.configs[0])
    return tuner.fn, {**kwargs, **config.all_kwargs()}


def _tuned_args(**constexprs) -> dict:
    return {**constexprs, **(PINNED if interpreting() else {})}


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def tma_wanted(device: torch.device) -> bool:
    """The forward's TMA path, opt-in (SAGAN_EXT_TRITON_TMA=1) until it has run on a GPU: on Hopper
    or newer, and under the interpreter (which runs the descriptors' arithmetic, for tests)."""
    if os.environ.get("SAGAN_EXT_TRITON_TMA") != "1":
        return False
    return interpreting() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_layout(*tensors: Tensor) -> bool | None:
    """CHANNEL_MAJOR if TMA can copy the (B, rows, cols) tensors' tiles: each contiguous along the
    same dimension (cols: position-major; rows: channel-major) and every other stride and the base
    a multiple of 16 bytes; None if not, or while torch.compile traces (no data pointer to check)."""
    if torch.compiler.is_compiling() or any(torch._subclasses.fake_tensor.is_fake(t) for t in tensors):
        return None
    for channel_major in (True, False):
        unit = 1 if channel_major else 2
        if all(t.stride(unit) == 1 and t.data_ptr() % 16 == 0
               and all(t.stride(d) * t.element_size() % 16 == 0 for d in (0, 1, 2) if d != unit) for t in tensors):
            return channel_major
    return None


def _descriptor_scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory for the TMA descriptors a kernel builds (tl.make_tensor_descriptor), per launch."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _forward_launches(q: Tensor, k: Tensor, v: Tensor, tf32: bool, x=None, gamma=None, tma=None):
    """The forward's launches and (out, o, stats); out is x + gamma * o^T in x's layout if x is
    given, else o. tma: use TMA copies (when the layouts allow), default tma_wanted()."""
    b, n, dk = q.shape
    m, dv = k.shape[1], v.shape[2]
    o = q.new_empty((b, n, dv))
    stats = q.new_empty((b, 2, n), dtype=torch.float32)
    residual = x is not None
    out = torch.empty_like(x) if residual else o  # x's layout when dense, else contiguous
    # (batch, channel, position) strides; a position steps like W does, as H and W merge (checked by the caller)
    xs = (x.stride(0), x.stride(1), x.stride(3), out.stride(0), out.stride(1), out.stride(3)) if residual else (0,) * 6
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b, triton.cdiv(dv, meta["BLOCK_DV"]))  # noqa: E731
    args = (q, k, v, o, stats, *_strides(q), *_strides(k), *_strides(v), n, m, dk, dv,
            x if residual else o, out, gamma if residual else o, *xs)
    precision = _precision(q.dtype, tf32)
    kernel = _tuned_kernel(FORWARD_TUNING, kept_tiles(FORWARD_TILES, dot_kind(precision, q.dtype), n, m, dv))
    channel_major = tma_layout(q, k, v) if (tma_wanted(q.device) if tma is None else tma) else None
    kwargs = _tuned_args(DK_PAD=_dk_pad(dk), PRECISION=precision, RESIDUAL=residual,
                         TMA=channel_major is not None, CHANNEL_MAJOR=bool(channel_major))
    return [Launch(kernel, grid, args, kwargs)], (out, o, stats)


def _backward_launches(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, stats: Tensor, tf32: bool):
    """The backward's launches and (dq, dk, dv); dq float32 (atomically added to)."""
    b, n, dk = q.shape
    m, dv = k.shape[1], v.shape[2]
    o = o.contiguous()  # our forward's own output: already contiguous
    delta = q.new_empty((b, n), dtype=torch.float32)
    dq = q.new_zeros((b, n, dk), dtype=torch.float32)
    dk_ = k.new_empty((b, m, dk))
    dv_ = v.new_empty((b, m, dv))
    launches = [Launch(_attention_backward_delta, (triton.cdiv(n, 64), b),
                       (o, do, delta, *_strides(do), n, dv), dict(BLOCK_M=64, BLOCK_DV=64))]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), b, triton.cdiv(dv, meta["BLOCK_DV"]))  # noqa: E731
    args = (q, k, v, do, stats, delta, dq, dk_, dv_, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            n, m, dk, dv)
    precision = _precision(q.dtype, tf32)
    tiles = kept_tiles(BACKWARD_TILES, dot_kind(precision, q.dtype), n, m, dv)
    kwargs = _tuned_args(DK_PAD=_dk_pad(dk), PRECISION=precision)
    block_dv = kwargs.get("BLOCK_DV", tiles[0][2])  # pinned, or the tuned one: the kept tiles agree on T
    kwargs["ONE_VALUE_TILE"] = bool(dv <= block_dv)
    launches.append(Launch(_tuned_kernel(BACKWARD_TUNING, tiles), grid, args, kwargs))
    return launches, (dq, dk_, dv_)


@torch.library.triton_op("sagan_ext_triton::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, tf32: bool) -> tuple[Tensor, Tensor]:
    launches, (_, o, stats) = _forward_launches(q, k, v, tf32)
    _run(launches)
    return o, stats


@torch.library.triton_op("sagan_ext_triton::attention_forward_residual", mutates_args=())
def attention_forward_residual(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor, tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, o, stats) with out = x + gamma * o written into x's (B, C, H, W) layout by the epilogue;
    x's H and W must share one stride step (NCHW or channels_last), v's channels are x's."""
    launches, outputs = _forward_launches(q, k, v, tf32, x, gamma.reshape(1))
    _run(launches)
    return outputs


@torch.library.triton_op("sagan_ext_triton::attention_backward", mutates_args=())
def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, stats: Tensor, tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    launches, (dq, dk, dv) = _backward_launches(do, q, k, v, o, stats, tf32)
    _run(launches)
    return dq.to(q.dtype), dk.to(k.dtype), dv


SN_BLOCK_H, SN_BLOCK_W = 32, 128  # a pass's program: 32 rows or 128 columns of W; the finish, 32 x 128 tiles
SN_DOT_PROGRAMS, SN_DOT_BLOCK = 256, 1024  # the backward's <G, W_sn>: at most 256 partials


def _spectral_norm_forward_launches(w: Tensor, u: Tensor, v: Tensor, iterations: int, eps: float):
    """`iterations` rounds of v = normalize(W^T u), u = normalize(W v), then sigma and W / sigma:
    2 launches per round and one to finish; evaluation (0 rounds): sigma = u . W v, 2 launches."""
    h, wd = w.shape
    u32, v32 = u.float().clone(), v.float().clone()
    w_sn = torch.empty((h, wd), dtype=w.dtype, device=w.device)
    sigma = torch.empty((1,), dtype=torch.float32, device=w.device)
    block_h, block_w = (16, 32) if interpreting() else (SN_BLOCK_H, SN_BLOCK_W)
    row_programs, col_programs = triton.cdiv(h, block_h), triton.cdiv(wd, block_w)
    up = torch.empty((row_programs,), dtype=torch.float32, device=w.device)  # partials of the u pass
    vp = torch.empty((col_programs,), dtype=torch.float32, device=w.device)  # and of the v pass
    np_ = triton.next_power_of_2(max(row_programs, col_programs))
    blocks = dict(NP=np_, BLOCK_H=block_h, BLOCK_W=block_w)
    launches = []
    for i in range(iterations):
        launches.append(Launch(_sn_transposed_matvec, (col_programs,),  # v (unnormalized) = W^T u
                               (w, u32, up, row_programs, v32, vp, h, wd, w.stride(0), eps), dict(NORMALIZE_X=i > 0, **blocks)))
        launches.append(Launch(_sn_matvec, (row_programs,),  # t = W normalize(v), into u32
                               (w, v32, vp, col_programs, u32, u32, up, h, wd, w.stride(0), eps),
                               dict(NORMALIZE_X=True, DOT_U=False, **blocks)))
    if iterations == 0:  # t = W v into a scratch row vector, its dot with u
        t = torch.empty((h,), dtype=torch.float32, device=w.device)
        launches.append(Launch(_sn_matvec, (row_programs,), (w, v32, vp, 0, u32, t, up, h, wd, w.stride(0), eps),
                               dict(NORMALIZE_X=False, DOT_U=True, **blocks)))
    launches.append(Launch(_sn_finish, (row_programs, col_programs),
                           (w, w_sn, sigma, u32, up, row_programs, v32, vp, col_programs, h, wd, w.stride(0), eps),
                           dict(TRAINING=iterations > 0, **blocks)))
    return launches, (w_sn, sigma, u32, v32)


def _spectral_norm_backward_launches(g: Tensor, grad_sigma: Tensor, w_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor):
    h, wd = g.shape
    programs = min(SN_DOT_PROGRAMS, triton.cdiv(g.numel(), SN_DOT_BLOCK))
    dotp = torch.empty((programs,), dtype=torch.float32, device=g.device)
    dw = torch.empty_like(g)
    scalars = [t.float().reshape(1).contiguous() for t in (grad_sigma, sigma)]
    return [Launch(_spectral_norm_backward_dot, (programs,), (g, w_sn, dotp, g.numel()), dict(BLOCK=SN_DOT_BLOCK)),
            Launch(_spectral_norm_backward_apply, (triton.cdiv(h, 32), triton.cdiv(wd, 64)),
                   (g, u.float().contiguous(), v.float().contiguous(), dotp, programs, *scalars, dw, h, wd),
                   dict(NP=triton.next_power_of_2(programs), BLOCK_H=32, BLOCK_W=64))], dw


@torch.library.triton_op("sagan_ext_triton::spectral_norm_forward", mutates_args=())
def spectral_norm_forward(w: Tensor, u: Tensor, v: Tensor, iterations: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w / sigma, sigma, u', v') for a (h, w) matrix; u', v' float32."""
    launches, (w_sn, sigma, u32, v32) = _spectral_norm_forward_launches(w if w.stride(-1) == 1 else w.contiguous(), u, v,
                                                                        iterations, eps)
    _run(launches)
    return w_sn, sigma.reshape(()), u32, v32


@torch.library.triton_op("sagan_ext_triton::spectral_norm_backward", mutates_args=())
def spectral_norm_backward(g: Tensor, grad_sigma: Tensor, w_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    launches, dw = _spectral_norm_backward_launches(g.contiguous(), grad_sigma, w_sn.contiguous(), u, v, sigma)
    _run(launches)
    return dw
