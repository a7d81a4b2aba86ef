"""Triton kernels: the "triton" backend's attention core (flash-style forward, FlashAttention-2
style backward) and spectral norm. Position-major inputs as in reference.py: q (B, N, dk),
k (B, M, dk), v (B, M, dv), unit stride along channels.

- Scores are unscaled (SAGAN); the online softmax runs in base 2 on s * log2(e), in float32.
- dk (8..64) is padded to a power of two >= 16 inside the kernel with masks, never in memory.
- dv (up to 512) is tiled across programs (BLOCK_DV) in the forward and in dV; the cheap q k^T is
  recomputed per tile instead of holding a 512-wide accumulator.
- fp32 inputs go through tl.dot as TF32 when torch.backends.cuda.matmul.allow_tf32 is set, else
  in full precision ("ieee").
- Block sizes are tl.constexpr, autotuned over a short pruned list on GPUs; under the interpreter
  (TRITON_INTERPRET=1, which runs these kernels exactly on the CPU) one small config is pinned so
  that tests run fast and exercise ragged tails.

The kernels are registered as torch.library.triton_op's (sagan_ext_triton::*), which
torch.compile can trace into.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# tiles: rows x channels blocks of a (rows, channels) matrix with unit channel stride


@triton.jit
def _load_tile(base, rows, cols, row_stride, n_rows, n_cols):
    """base[rows, cols], zero outside the (n_rows, n_cols) matrix."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(base, rows, cols, row_stride, n_rows, n_cols, value):
    tl.store(base + rows[:, None] * row_stride + cols[None, :], value.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


# ---------------------------------------------------------------------------------------------
# attention forward


@triton.jit
def _attention_forward(
    Q, K, V, O, LSE, stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    N, M, DK, DV,
    X, OUT, GAMMA, stride_xb, stride_xc, stride_xn, stride_outb, stride_outc, stride_outn,  # RESIDUAL: OUT = X + gamma O
    DK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, RESIDUAL: tl.constexpr,
):
    pid_m, b, pid_dv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, DK_PAD)
    dvs = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * stride_qb, rows, dks, stride_qn, N, DK)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K + b * stride_kb, cols, dks, stride_kn, M, DK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * LOG2E
        s = tl.where(cols[None, :] < M, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + b * stride_vb, cols, dvs, stride_vn, M, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(O + b * stride_ob, rows, dvs, stride_on, N, DV, acc)
    if RESIDUAL:  # written straight into x's (B, C, H, W) layout: channels dvs, positions rows
        mask = (rows[:, None] < N) & (dvs[None, :] < DV)
        x = tl.load(X + b * stride_xb + dvs[None, :] * stride_xc + rows[:, None] * stride_xn, mask=mask, other=0.0)
        gamma = tl.load(GAMMA).to(tl.float32)
        out = x.to(tl.float32) + gamma * acc.to(O.dtype.element_ty).to(tl.float32)
        tl.store(OUT + b * stride_outb + dvs[None, :] * stride_outc + rows[:, None] * stride_outn,
                 out.to(OUT.dtype.element_ty), mask=mask)
    if pid_dv == 0:
        tl.store(LSE + b * N + rows, (m_i + tl.log2(l_i)) / LOG2E, mask=rows < N)


# ---------------------------------------------------------------------------------------------
# attention backward: delta = rowsum(dO * O); dV per (key block, dv tile); dK per key block; dQ
# per query block. dK and dQ each recompute p and dP = dO V^T (looping over dv in chunks).


@triton.jit
def _attention_backward_delta(O, DO, DELTA, stride_ob, stride_on, N, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, b = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for c in range(0, DV, BLOCK_DV):
        dvs = c + tl.arange(0, BLOCK_DV)
        offs = b * stride_ob + rows[:, None] * stride_on + dvs[None, :]
        mask = (rows[:, None] < N) & (dvs[None, :] < DV)
        o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(DELTA + b * N + rows, acc, mask=rows < N)


@triton.jit
def _probabilities(q, k, lse, rows, cols, N, M, PRECISION: tl.constexpr):
    """p = exp(q k^T - lse) for one (query block, key block) tile, zero outside the matrix."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * LOG2E
    p = tl.exp2(s - lse[:, None] * LOG2E)
    return tl.where((rows[:, None] < N) & (cols[None, :] < M), p, 0.0)


@triton.jit
def _attention_backward_dv(
    Q, K, DO, LSE, DV_OUT, stride_qb, stride_qn, stride_kb, stride_kn, stride_ob, stride_on, stride_vb, stride_vn,
    N, M, DK, DV,
    DK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n, b, pid_dv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dks = tl.arange(0, DK_PAD)
    dvs = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * stride_kb, cols, dks, stride_kn, M, DK)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(Q + b * stride_qb, rows, dks, stride_qn, N, DK)
        lse = tl.load(LSE + b * N + rows, mask=rows < N, other=0.0)
        p = _probabilities(q, k, lse, rows, cols, N, M, PRECISION)
        do = _load_tile(DO + b * stride_ob, rows, dvs, stride_on, N, DV)
        acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    _store_tile(DV_OUT + b * stride_vb, cols, dvs, stride_vn, M, DV, acc)


@triton.jit
def _score_gradient(q, k, do_ptrs_base, v_ptrs_base, lse, delta, rows, cols, stride_on, stride_vn, N, M, DV,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dS = p * (dO V^T - delta) for one tile, dO V^T accumulated over dv in BLOCK_DV chunks."""
    p = _probabilities(q, k, lse, rows, cols, N, M, PRECISION)
    dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for c in range(0, DV, BLOCK_DV):
        dvs = c + tl.arange(0, BLOCK_DV)
        do = _load_tile(do_ptrs_base, rows, dvs, stride_on, N, DV)
        v = _load_tile(v_ptrs_base, cols, dvs, stride_vn, M, DV)
        dp += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p * (dp - delta[:, None])


@triton.jit
def _attention_backward_dk(
    Q, K, V, DO, LSE, DELTA, DK_OUT, stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_ob, stride_on, N, M, DK, DV,
    DK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n, b = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dks = tl.arange(0, DK_PAD)
    k = _load_tile(K + b * stride_kb, cols, dks, stride_kn, M, DK)
    acc = tl.zeros([BLOCK_N, DK_PAD], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(Q + b * stride_qb, rows, dks, stride_qn, N, DK)
        lse = tl.load(LSE + b * N + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + b * N + rows, mask=rows < N, other=0.0)
        ds = _score_gradient(q, k, DO + b * stride_ob, V + b * stride_vb, lse, delta, rows, cols, stride_on, stride_vn,
                             N, M, DV, BLOCK_M, BLOCK_N, BLOCK_DV, PRECISION)
        acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_tile(DK_OUT + b * stride_kb, cols, dks, stride_kn, M, DK, acc)


@triton.jit
def _attention_backward_dq(
    Q, K, V, DO, LSE, DELTA, DQ_OUT, stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_ob, stride_on, N, M, DK, DV,
    DK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, b = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dks = tl.arange(0, DK_PAD)
    q = _load_tile(Q + b * stride_qb, rows, dks, stride_qn, N, DK)
    lse = tl.load(LSE + b * N + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + b * N + rows, mask=rows < N, other=0.0)
    acc = tl.zeros([BLOCK_M, DK_PAD], tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K + b * stride_kb, cols, dks, stride_kn, M, DK)
        ds = _score_gradient(q, k, DO + b * stride_ob, V + b * stride_vb, lse, delta, rows, cols, stride_on, stride_vn,
                             N, M, DV, BLOCK_M, BLOCK_N, BLOCK_DV, PRECISION)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ_OUT + b * stride_qb, rows, dks, stride_qn, N, DK, acc)


# ---------------------------------------------------------------------------------------------
# spectral norm: the forward is one program (the power iteration needs a global order between
# its passes); the backward a parallel reduction of <G, W_sn> and a parallel elementwise pass.


@triton.jit
def _transposed_matvec_pass(W, X, Y, H, WD, stride_h, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Y = W^T X in float32 (one pass over W); returns ||Y||^2."""
    sq = tl.zeros([1], tl.float32)
    for c0 in range(0, WD, BLOCK_W):
        cols = c0 + tl.arange(0, BLOCK_W)
        acc = tl.zeros([BLOCK_W], tl.float32)
        for r0 in range(0, H, BLOCK_H):
            rows = r0 + tl.arange(0, BLOCK_H)
            w = _load_tile(W, rows, cols, stride_h, H, WD).to(tl.float32)
            acc += tl.sum(w * tl.load(X + rows, mask=rows < H, other=0.0)[:, None], 0)
        tl.store(Y + cols, acc, mask=cols < WD)
        sq += tl.sum(acc * acc, 0)
    tl.debug_barrier()
    return sq


@triton.jit
def _matvec_pass(W, X, Y, H, WD, stride_h, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Y = W X in float32 (one pass over W); returns ||Y||^2."""
    sq = tl.zeros([1], tl.float32)
    for r0 in range(0, H, BLOCK_H):
        rows = r0 + tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], tl.float32)
        for c0 in range(0, WD, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            w = _load_tile(W, rows, cols, stride_h, H, WD).to(tl.float32)
            acc += tl.sum(w * tl.load(X + cols, mask=cols < WD, other=0.0)[None, :], 1)
        tl.store(Y + rows, acc, mask=rows < H)
        sq += tl.sum(acc * acc, 0)
    tl.debug_barrier()
    return sq


@triton.jit
def _scale_pass(Y, LEN, scale, BLOCK: tl.constexpr):
    for o0 in range(0, LEN, BLOCK):
        offs = o0 + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(Y + offs, mask=offs < LEN) * scale, mask=offs < LEN)
    tl.debug_barrier()


@triton.jit
def _spectral_norm_forward(W, U, V, WSN, SIGMA, H, WD, stride_h, iterations, eps,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """In one program: `iterations` rounds of v = normalize(W^T u), u = normalize(W v) (U, V
    updated in place, float32), sigma = u . (W v), WSN = W / sigma."""
    sigma = tl.zeros([1], tl.float32)
    for _ in range(iterations):
        sq = _transposed_matvec_pass(W, U, V, H, WD, stride_h, BLOCK_H, BLOCK_W)
        _scale_pass(V, WD, 1.0 / tl.maximum(tl.sqrt(sq), eps), BLOCK_W)
        sq = _matvec_pass(W, V, U, H, WD, stride_h, BLOCK_H, BLOCK_W)  # U holds t = W v
        norm = tl.maximum(tl.sqrt(sq), eps)
        _scale_pass(U, H, 1.0 / norm, BLOCK_H)
        sigma = sq / norm  # u . (W v) = ||t||^2 / max(||t||, eps), no further pass over W
    if iterations == 0:  # eval: sigma from the stored u, v
        sigma = tl.zeros([1], tl.float32)
        for r0 in range(0, H, BLOCK_H):
            rows = r0 + tl.arange(0, BLOCK_H)
            acc = tl.zeros([BLOCK_H], tl.float32)
            for c0 in range(0, WD, BLOCK_W):
                cols = c0 + tl.arange(0, BLOCK_W)
                w = _load_tile(W, rows, cols, stride_h, H, WD).to(tl.float32)
                acc += tl.sum(w * tl.load(V + cols, mask=cols < WD, other=0.0)[None, :], 1)
            sigma += tl.sum(acc * tl.load(U + rows, mask=rows < H, other=0.0), 0)
    tl.store(SIGMA + tl.arange(0, 1), sigma)
    inv = 1.0 / sigma
    for r0 in range(0, H, BLOCK_H):
        rows = r0 + tl.arange(0, BLOCK_H)
        for c0 in range(0, WD, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            mask = (rows[:, None] < H) & (cols[None, :] < WD)
            w = tl.load(W + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(WSN + rows[:, None] * WD + cols[None, :], (w * inv[:, None]).to(WSN.dtype.element_ty), mask=mask)


@triton.jit
def _spectral_norm_backward_dot(G, WSN, DOT, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(G + offs, mask=offs < numel, other=0.0).to(tl.float32)
    w = tl.load(WSN + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.atomic_add(DOT, tl.sum(g * w, 0))


@triton.jit
def _spectral_norm_backward_apply(G, U, V, DOT, GRAD_SIGMA, SIGMA, DW, H, WD, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """dW = (G - (<G, W_sn> - g_sigma * sigma) u v^T) / sigma."""
    rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < H) & (cols[None, :] < WD)
    sigma = tl.load(SIGMA)
    c = tl.load(DOT) - tl.load(GRAD_SIGMA) * sigma
    u = tl.load(U + rows, mask=rows < H, other=0.0)
    v = tl.load(V + cols, mask=cols < WD, other=0.0)
    g = tl.load(G + rows[:, None] * WD + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dw = (g - c * u[:, None] * v[None, :]) / sigma
    tl.store(DW + rows[:, None] * WD + cols[None, :], dw.to(DW.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration: a short autotuned list on GPUs, one pinned small config when interpreted


def _attention_configs() -> list[triton.Config]:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bdv), num_warps=w, num_stages=s)
            for bm, bn, bdv, w, s in [(64, 64, 64, 4, 2), (128, 64, 64, 4, 3), (128, 64, 128, 8, 3),
                                      (64, 32, 128, 4, 2), (128, 128, 64, 8, 2), (32, 32, 64, 4, 2)]]


def _prune(configs, named_args, **_):
    """Drop configs whose tiles exceed the problem (they only add masked work)."""
    n, m, dv = named_args["N"], named_args["M"], named_args["DV"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(n))
            and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_DV"] <= max(16, triton.next_power_of_2(dv))]
    return kept or configs[-1:]


PINNED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DV=16)  # interpreter: small tiles, ragged tails everywhere
_KEY = ["N", "M", "DK_PAD", "DV", "PRECISION"]


def _tuned(kernel, key=_KEY):
    if interpreting():
        return kernel
    return triton.autotune(_attention_configs(), key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


_forward_kernel = _tuned(_attention_forward, _KEY + ["RESIDUAL"])
_dv_kernel = _tuned(_attention_backward_dv)
_dk_kernel = _tuned(_attention_backward_dk)
_dq_kernel = _tuned(_attention_backward_dq)


def _launch_args():
    return PINNED if interpreting() else {}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


def _dk_pad(dk: int) -> int:
    return max(16, triton.next_power_of_2(dk))


def _unit_stride(*tensors: Tensor) -> list[Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _forward(q: Tensor, k: Tensor, v: Tensor, x=None, gamma=None):
    q, k, v = _unit_stride(q, k, v)
    b, n, dk = q.shape
    m, dv = k.shape[1], v.shape[2]
    o = q.new_empty((b, n, dv))
    lse = q.new_empty((b, n), dtype=torch.float32)
    residual = x is not None
    out = torch.empty_like(x) if residual else o  # x's layout when dense, else contiguous
    # (batch, channel, position) strides; a position steps like W does, as H and W merge (checked by the caller)
    strides = (x.stride(0), x.stride(1), x.stride(3), out.stride(0), out.stride(1), out.stride(3)) if residual else (0,) * 6
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b, triton.cdiv(dv, meta["BLOCK_DV"]))  # noqa: E731
    torch.library.wrap_triton(_forward_kernel)[grid](
        q, k, v, o, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), n, m, dk, dv, x if residual else o, out, gamma if residual else o, *strides,
        DK_PAD=_dk_pad(dk), PRECISION=_precision(q.dtype), RESIDUAL=residual, **_launch_args())
    return out, o, lse


@torch.library.triton_op("sagan_ext_triton::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    _, o, lse = _forward(q, k, v)
    return o, lse


@torch.library.triton_op("sagan_ext_triton::attention_forward_residual", mutates_args=())
def attention_forward_residual(q: Tensor, k: Tensor, v: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(out, o, lse) with out = x + gamma * o written into x's (B, C, H, W) layout by the epilogue;
    x's H and W must share one stride step (NCHW or channels_last), v's channels are x's."""
    return _forward(q, k, v, x, gamma.reshape(1))


@torch.library.triton_op("sagan_ext_triton::attention_backward", mutates_args=())
def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = _unit_stride(q, k, v)
    do, o = (t.contiguous() for t in (do, o))
    b, n, dk = q.shape
    m, dv = k.shape[1], v.shape[2]
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)
    torch.library.wrap_triton(_attention_backward_delta)[(triton.cdiv(n, 64), b)](
        o, do, delta, o.stride(0), o.stride(1), n, dv, BLOCK_M=64, BLOCK_DV=64)
    dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(DK_PAD=_dk_pad(dk), PRECISION=_precision(q.dtype), **_launch_args())
    torch.library.wrap_triton(_dv_kernel)[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), b, triton.cdiv(dv, meta["BLOCK_DV"]))](
        q, k, do, lse, dv_, q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
        dv_.stride(0), dv_.stride(1), n, m, dk, dv, **common)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    torch.library.wrap_triton(_dk_kernel)[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), b)](
        q, k, v, do, lse, delta, dk_, *strides, n, m, dk, dv, **common)
    torch.library.wrap_triton(_dq_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b)](
        q, k, v, do, lse, delta, dq, *strides, n, m, dk, dv, **common)
    return dq, dk_, dv_


@torch.library.triton_op("sagan_ext_triton::spectral_norm_forward", mutates_args=())
def spectral_norm_forward(w: Tensor, u: Tensor, v: Tensor, iterations: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w / sigma, sigma, u', v') for a (h, w) matrix; u', v' float32."""
    w = w if w.stride(-1) == 1 else w.contiguous()
    h, wd = w.shape
    u32, v32 = u.float().clone(), v.float().clone()
    w_sn = torch.empty((h, wd), dtype=w.dtype, device=w.device)
    sigma = torch.empty((1,), dtype=torch.float32, device=w.device)
    torch.library.wrap_triton(_spectral_norm_forward)[(1,)](
        w, u32, v32, w_sn, sigma, h, wd, w.stride(0), iterations, eps, BLOCK_H=32, BLOCK_W=64 if interpreting() else 128)
    return w_sn, sigma.reshape(()), u32, v32


@torch.library.triton_op("sagan_ext_triton::spectral_norm_backward", mutates_args=())
def spectral_norm_backward(g: Tensor, grad_sigma: Tensor, w_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    g, w_sn = g.contiguous(), w_sn.contiguous()
    h, wd = g.shape
    dot = torch.zeros((1,), dtype=torch.float32, device=g.device)
    block = 1024
    torch.library.wrap_triton(_spectral_norm_backward_dot)[(triton.cdiv(g.numel(), block),)](
        g, w_sn, dot, g.numel(), BLOCK=block)
    dw = torch.empty_like(g)
    scalars = [t.float().reshape(1).contiguous() for t in (grad_sigma, sigma)]
    torch.library.wrap_triton(_spectral_norm_backward_apply)[(triton.cdiv(h, 32), triton.cdiv(wd, 64))](
        g, u.float().contiguous(), v.float().contiguous(), dot, *scalars, dw, h, wd, BLOCK_H=32, BLOCK_W=64)
    return dw
