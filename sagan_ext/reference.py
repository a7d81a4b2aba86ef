"""The math of sagan_ext in plain PyTorch. Every backend is tested against these functions.

Shapes: x is (B, C, H, W); N = H*W query positions; M key positions (N, or N/4 when the keys
and values are 2x2 max-pooled as in the TF/BigGAN variant). The projections here are
position-major tensors, q (B, N, dk), k (B, M, dk), v (B, M, dv), the plainest form of the math;
the kernels read the same shapes through strides (ops.py passes channel-major views).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_core(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """o = softmax(q k^T) v with unscaled scores (as in SAGAN), and the row statistics `stats`
    (B, 2, N): each row's max score m and its sum l = sum_j exp(s_j - m).

    The backward recomputes p = exp(s - m) / l. Keeping m and l apart (not lse = m + log(l)) is
    what keeps p accurate for SAGAN's unscaled scores: at |s| ~ 1e5, an fp32 lse rounds by
    ulp(m) ~ 8e-3, an error that every recomputed p would carry; s - m recomputed with the
    forward's arithmetic is exact. Materialises the (B, N, M) score map: this is the definition,
    not a kernel.
    """
    acc = accumulation_dtype(q.dtype)
    s = torch.bmm(q.to(acc), k.to(acc).transpose(1, 2))
    row_max = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - row_max)
    row_sum = e.sum(dim=-1, keepdim=True)
    o = torch.bmm(e / row_sum, v.to(acc))
    return o.to(q.dtype), torch.cat([row_max, row_sum], dim=-1).transpose(1, 2).contiguous()


def attention_core_backward(
    grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, stats: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_core for q, k, v, recomputing p from the saved row statistics."""
    acc = stats.dtype
    q_, k_, v_, grad_o_ = q.to(acc), k.to(acc), v.to(acc), grad_o.to(acc)
    row_max, row_sum = stats[:, 0].unsqueeze(-1), stats[:, 1].unsqueeze(-1)
    p = torch.exp(torch.bmm(q_, k_.transpose(1, 2)) - row_max) / row_sum
    delta = (grad_o_ * o.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
    grad_s = p * (torch.bmm(grad_o_, v_.transpose(1, 2)) - delta)
    grad_q = torch.bmm(grad_s, k_)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q_)
    grad_v = torch.bmm(p.transpose(1, 2), grad_o_)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def positions(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C) view (a copy only if the strides cannot merge)."""
    return t.flatten(2).transpose(1, 2)


def positions_contiguous(t: Tensor) -> Tensor:
    """positions(t) made contiguous once (free for channels_last), so that the GEMMs that read it
    do not each make their own transposed copy."""
    return positions(t).contiguous()


def max_pool_positions(t: Tensor, height: int, width: int) -> Tensor:
    """2x2 max-pool of a position-major (B, H*W, C) tensor, returned as (B, H/2*W/2, C)."""
    grid = t.transpose(1, 2).unflatten(2, (height, width))
    return positions(F.max_pool2d(grid, kernel_size=2))


def project(
    x: Tensor,
    wq: Tensor, bq: Optional[Tensor],
    wk: Tensor, bk: Optional[Tensor],
    wv: Tensor, bv: Optional[Tensor],
    pool: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The 1x1-conv projections (weights as (out, in) matrices), keys/values pooled if asked."""
    xt = positions_contiguous(x)
    q, k, v = F.linear(xt, wq, bq), F.linear(xt, wk, bk), F.linear(xt, wv, bv)
    if pool:
        h, w = x.shape[-2:]
        k, v = max_pool_positions(k, h, w), max_pool_positions(v, h, w)
    return q, k, v


def self_attention(
    x: Tensor,
    wq: Tensor, bq: Optional[Tensor],
    wk: Tensor, bk: Optional[Tensor],
    wv: Tensor, bv: Optional[Tensor],
    wo: Optional[Tensor],
    gamma: Tensor,
    pool: bool,
) -> Tensor:
    """The whole SAGAN block: out = x + gamma * Wo(softmax(q k^T) v), differentiable by autograd.

    Paper/heykeetae variant: biases, no pooling, no Wo (value dim = C).
    TF/BigGAN variant: no biases, 2x2-pooled keys and values, Wo maps C/2 back to C.
    """
    q, k, v = project(x, wq, bq, wk, bk, wv, bv, pool)
    acc = accumulation_dtype(x.dtype)
    s = torch.bmm(q.to(acc), k.to(acc).transpose(1, 2))
    o = torch.bmm(torch.softmax(s, dim=-1), v.to(acc)).to(x.dtype)
    y = o if wo is None else F.linear(o, wo)
    return x + gamma.reshape(()) * y.transpose(1, 2).reshape(x.shape)


def attention_map(x, wq, bq, wk, bk, wv, bv, pool) -> Tensor:
    """The (B, N, M) softmax map, for visualisation only."""
    q, k, _ = project(x, wq, bq, wk, bk, wv, bv, pool)
    acc = accumulation_dtype(x.dtype)
    return torch.softmax(torch.bmm(q.to(acc), k.to(acc).transpose(1, 2)), dim=-1)


def weight_matrix(weight: Tensor, dim: int) -> Tensor:
    """View a weight as the [weight.size(dim), -1] matrix that spectral norm works on."""
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.reshape(weight.shape[0], -1)


def matrix_as_weight(matrix: Tensor, shape, dim: int) -> Tensor:
    """The inverse of weight_matrix: a [shape[dim], -1] matrix viewed in the weight's `shape`."""
    if dim == 0:
        return matrix.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(dim))
    return matrix.reshape(moved).movedim(0, dim)


def spectral_norm(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch.nn.utils.spectral_norm's computation: returns (weight / sigma, sigma, u', v'), u' and
    v' new tensors: in training, u and v after n_power_iterations steps of power iteration
    (without gradient), else copies. u and v are left as they are."""
    w = weight_matrix(weight, dim)
    u, v = u.clone(), v.clone()
    if training:
        with torch.no_grad():
            for _ in range(n_power_iterations):
                v = F.normalize(torch.mv(w.t(), u), dim=0, eps=eps)
                u = F.normalize(torch.mv(w, v), dim=0, eps=eps)
    sigma = torch.dot(u, torch.mv(w, v))
    return weight / sigma, sigma, u, v


def spectral_norm_backward(
    grad_weight_sn: Tensor, grad_sigma: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int
) -> Tensor:
    """dW = (G - (<G, W_sn> - g_sigma * sigma) u v^T) / sigma, u and v held constant."""
    g = weight_matrix(grad_weight_sn, dim)
    c = (g * weight_matrix(weight_sn, dim)).sum() - grad_sigma * sigma
    return matrix_as_weight((g - c * torch.outer(u, v)) / sigma, weight_sn.shape, dim)
