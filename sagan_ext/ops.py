"""The public operators, registered with torch.library so that torch.compile and opcheck see them:
a schema, a fake (shape-only) implementation and the autograd formula, for each op, in one place.

sagan_ext::attention_forward / attention_backward: the whole self-attention block. The shared
composition (1x1 projections, pooling, residual, projection gradients) lives here once; the
backend (backends.py) runs only the attention core (Backend.attention_core_forward, ...), which
never materialises the N x N map.

sagan_ext::spectral_norm / spectral_norm_backward: functional, returning the power-iterated u and
v; the Python wrappers copy them into the module's buffers. (torch.library refuses autograd for
ops whose schema mutates inputs, so the in-place update sits just outside the op.)

Each registered name ends in a fingerprint of the operators' contract (CONTRACT: a hash of every
op's signature, fake implementation and autograd formula), e.g. sagan_ext::attention_forward_1a2b3c4d.
torch.compile's caches (inductor's FX graph cache, AOTAutograd's cache) key a graph on its code,
which names the ops it calls, but not on what those ops' fake implementations say about their
outputs: with a fixed name, a sagan_ext whose op returns another shape would be handed graphs
compiled against the old one from a warm cache. A contract change renames the ops, so such
graphs are never found; a change elsewhere (the kernels, the op bodies) keeps the names and the
cache. The Python objects (ops.attention_forward, ...) keep their names.
"""
from __future__ import annotations

import hashlib
import inspect
import marshal
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .backends import precision, select

# ----------------------------------------------------------------------------------------------
# attention


def _projections(x, wq, bq, wk, bk, wv, bv, pool):
    """q, k, v as (B, N, d) views of one channel-major GEMM over x (x itself is never copied into
    another layout), keys and values 2x2 max-pooled if `pool`; also the concatenated weight and
    the pooling indices, for the backward."""
    b, c, h, w = x.shape
    dk, dv = wq.shape[0], wv.shape[0]
    weight = torch.cat([wq, wk, wv])
    xc = x.reshape(b, c, h * w)  # a view for NCHW and channels_last
    if bq is None and bk is None and bv is None:
        proj = torch.matmul(weight, xc)  # (B, P, N)
    else:
        bias = torch.cat([t if t is not None else x.new_zeros(d) for t, d in ((bq, dk), (bk, dk), (bv, dv))])
        proj = torch.baddbmm(bias.view(1, -1, 1), weight.expand(b, -1, -1), xc)
    indices = None
    if pool:  # keys and values pooled together, as an NCHW map
        kv, indices = F.max_pool2d(proj[:, dk:].unflatten(2, (h, w)), kernel_size=2, return_indices=True)
        q, (k, v) = proj[:, :dk], kv.flatten(2).split([dk, dv], dim=1)
    else:
        q, k, v = proj.split([dk, dk, dv], dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), weight, indices


def _attention_backend(backend: str, x: Tensor, wq: Tensor, wv: Tensor, tf32: bool):
    """The backend for this block's input, and whether its kernels run the products as TF32: only
    a float32 input's, and only where `tf32` allows it (backends.precision)."""
    kernels = select(backend, x.device, x.dtype, tf32, query_key_dim=wq.shape[0], value_dim=wv.shape[0])
    return kernels, precision(x.dtype, tf32) == "tf32"


def _attention_forward(
    x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor],
    wv: Tensor, bv: Optional[Tensor], wo: Optional[Tensor], gamma: Tensor, pool: bool, backend: str,
    tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, o, stats): out = x + gamma * Wo(o); o (B, N, dv) and the row statistics stats
    (B, 2, N: each row's max score and exp-sum, see reference.attention_core) for the backward.
    `tf32`: fp32 products may run as TF32 on GPUs (torch.backends.cuda.matmul.allow_tf32 at the
    call). It is an argument, not read from the flag inside, so that the backward recomputes the
    scores with the forward's arithmetic even if the flag changed in between."""
    kernels, kernel_tf32 = _attention_backend(backend, x, wq, wv, tf32)
    q, k, v, _, _ = _projections(x, wq, bq, wk, bk, wv, bv, pool)
    h, w = x.shape[-2:]
    if wo is None and kernels.fuses_residual and (h == 1 or x.stride(2) == w * x.stride(3)):
        return kernels.attention_core_forward_residual(q, k, v, x, gamma, kernel_tf32)  # the residual in the epilogue
    o, stats = kernels.attention_core_forward(q, k, v, kernel_tf32)
    y = o.transpose(1, 2) if wo is None else torch.matmul(wo, o.transpose(1, 2))  # (B, C, N)
    out = torch.empty_like(x)
    torch.addcmul(x, gamma.reshape(()), y.reshape(x.shape), out=out)
    return out, o, stats


def _attention_forward_fake(x, wq, bq, wk, bk, wv, bv, wo, gamma, pool, backend, tf32=False):
    b, _, h, w = x.shape
    n = h * w
    return (torch.empty_like(x), x.new_empty((b, n, wv.shape[0])),
            x.new_empty((b, 2, n), dtype=reference.accumulation_dtype(x.dtype)))


def _attention_backward(
    grad_out: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor],
    wv: Tensor, bv: Optional[Tensor], wo: Optional[Tensor], gamma: Tensor, o: Tensor, stats: Tensor,
    pool: bool, backend: str, tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dgamma); an absent input gets an empty tensor."""
    kernels, kernel_tf32 = _attention_backend(backend, x, wq, wv, tf32)
    b, c, h, w = x.shape
    sizes = [wq.shape[0], wk.shape[0], wv.shape[0]]  # query, key and value channels
    # Recompute the projections (one GEMM) rather than keep them alive since the forward.
    q, k, v, weight, indices = _projections(x, wq, bq, wk, bk, wv, bv, pool)
    xc, gc = x.reshape(b, c, h * w), grad_out.reshape(b, c, h * w)  # channel-major (B, C, N) views
    # out = x + gamma * y with y = Wo o^T: dgamma = <g, y> = <Wo^T g, o^T>, so the product Wo^T g
    # that the backward needs anyway also gives dgamma, with no recomputation of y.
    g_o = gc if wo is None else torch.matmul(wo.t(), gc)  # (B, dv, N)
    acc = reference.accumulation_dtype(x.dtype)
    dgamma = (g_o.to(acc) * o.transpose(1, 2).to(acc)).sum().reshape(gamma.shape).to(gamma.dtype)
    grad_o = (g_o * gamma.reshape(()).to(g_o.dtype)).transpose(1, 2)  # (B, N, dv), channel-major
    dwo = x.new_empty(0) if wo is None else torch.matmul(gc, o).sum(0) * gamma.reshape(()).to(x.dtype)
    grad_q, grad_k, grad_v = kernels.attention_core_backward(grad_o, q, k, v, o, stats, kernel_tf32)
    if pool:  # unpool the key and value gradients together through the forward's indices
        grad_kv = torch.cat([grad_k, grad_v], dim=-1).transpose(1, 2).unflatten(2, indices.shape[-2:])
        grad_kv = F.max_unpool2d(grad_kv, indices, kernel_size=2, output_size=(h, w)).flatten(2)
        dproj = torch.cat([grad_q.transpose(1, 2), grad_kv], dim=1)  # (B, P, N)
    else:
        dproj = torch.cat([grad_q, grad_k, grad_v], dim=-1).transpose(1, 2)
    # one GEMM each for the three weights together and for dx (plus the residual's g)
    dwq, dwk, dwv = torch.matmul(dproj, xc.transpose(1, 2)).sum(0).split(sizes)
    dx = torch.baddbmm(gc, weight.t().expand(b, -1, -1), dproj).view(b, c, h, w)
    dbq, dbk, dbv = dproj.sum((0, 2)).split(sizes)
    # The key bias adds the constant q_i . b_k to every score of query i's row, which softmax
    # ignores: its gradient is exactly zero. Summed, it is pure rounding noise, amplified by the
    # delta = rowsum(dO O) identity with O rounded to bf16: 5e-2 of d(query bias)'s norm on the
    # H200 with features of mean 3, against eager's 5e-3.
    dbk = torch.zeros_like(dbk)
    bias_grad = lambda bias, d: x.new_empty(0) if bias is None else d.clone()  # noqa: E731
    # split() gives views of one buffer; outputs of a custom op must not alias each other
    return (dx, dwq.clone(), bias_grad(bq, dbq), dwk.clone(), bias_grad(bk, dbk),
            dwv.clone(), bias_grad(bv, dbv), dwo, dgamma)


def _attention_backward_fake(grad_out, x, wq, bq, wk, bk, wv, bv, wo, gamma, o, stats, pool, backend, tf32=False):
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return (torch.empty_like(x), like(wq), like(bq), like(wk), like(bk), like(wv), like(bv), like(wo),
            torch.empty_like(gamma))


def _attention_setup_context(ctx, inputs, output):
    x, wq, bq, wk, bk, wv, bv, wo, gamma, pool, backend, tf32 = inputs
    _, o, stats = output
    ctx.save_for_backward(x, wq, bq, wk, bk, wv, bv, wo, gamma, o, stats)
    ctx.pool, ctx.backend, ctx.tf32 = pool, backend, tf32
    ctx.present = [t is not None for t in (bq, bk, bv, wo)]


def _attention_autograd(ctx, grad_out, _grad_o, _grad_stats):
    if torch.is_grad_enabled():
        return _attention_double_backward(ctx, grad_out)
    grads = attention_backward(grad_out, *ctx.saved_tensors, ctx.pool, ctx.backend, ctx.tf32)
    dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dgamma = grads
    has_bq, has_bk, has_bv, has_wo = ctx.present
    return (dx, dwq, dbq if has_bq else None, dwk, dbk if has_bk else None, dwv,
            dbv if has_bv else None, dwo if has_wo else None, dgamma, None, None, None)


def _attention_double_backward(ctx, grad_out):
    """create_graph=True (a gradient penalty, say): differentiate the reference block instead, so
    the gradient is itself differentiable. Correct but O(N^2) memory, like the eager block."""
    x, wq, bq, wk, bk, wv, bv, wo, gamma, _, _ = ctx.saved_tensors
    inputs = (x, wq, bq, wk, bk, wv, bv, wo, gamma)
    out = reference.self_attention(*inputs, ctx.pool)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs) + (None, None, None)


# ----------------------------------------------------------------------------------------------
# spectral norm


def _spectral_norm(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float,
    training: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weight / sigma, sigma, u', v'): u', v' are u, v after power iteration (copies if none ran)."""
    kernels = select(backend, weight.device, weight.dtype)
    w_sn, sigma, u_new, v_new = kernels.spectral_norm_forward(
        reference.weight_matrix(weight, dim), u, v, n_power_iterations if training else 0, eps)
    return reference.matrix_as_weight(w_sn, weight.shape, dim).contiguous(), sigma, u_new, v_new


def _spectral_norm_fake(weight, u, v, dim, n_power_iterations, eps, training, backend):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty(()),
            torch.empty_like(u), torch.empty_like(v))


def _spectral_norm_backward(
    grad_weight_sn: Tensor, grad_sigma: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor,
    dim: int, backend: str,
) -> Tensor:
    kernels = select(backend, weight_sn.device, weight_sn.dtype)
    dw = kernels.spectral_norm_backward(reference.weight_matrix(grad_weight_sn, dim), grad_sigma,
                                        reference.weight_matrix(weight_sn, dim), u, v, sigma)
    return reference.matrix_as_weight(dw, weight_sn.shape, dim).contiguous()


def _spectral_norm_backward_fake(grad_weight_sn, grad_sigma, weight_sn, u, v, sigma, dim, backend):
    return torch.empty_like(weight_sn, memory_format=torch.contiguous_format)


def _sn_setup_context(ctx, inputs, output):
    weight, u, v, dim, n_power_iterations, eps, training, backend = inputs
    w_sn, sigma, u_new, v_new = output
    ctx.save_for_backward(w_sn, sigma, u_new, v_new)
    ctx.dim, ctx.backend = dim, backend
    ctx.mark_non_differentiable(u_new, v_new)


def _sn_autograd(ctx, grad_w_sn, grad_sigma, _gu, _gv):
    w_sn, sigma, u, v = ctx.saved_tensors
    if grad_w_sn is None:
        grad_w_sn = torch.zeros_like(w_sn)
    if grad_sigma is None:
        grad_sigma = torch.zeros_like(sigma)
    if torch.is_grad_enabled():  # create_graph=True: the same formula in differentiable torch ops
        return reference.spectral_norm_backward(grad_w_sn, grad_sigma, w_sn, u, v, sigma, ctx.dim), *([None] * 7)
    dw = spectral_norm_backward(grad_w_sn, grad_sigma, w_sn, u, v, sigma, ctx.dim, ctx.backend)
    return dw, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# registration, under names that carry the contract's fingerprint

# (name, implementation, fake, (autograd formula, its setup_context) or None)
_OPS = [
    ("attention_forward", _attention_forward, _attention_forward_fake,
     (_attention_autograd, _attention_setup_context)),
    ("attention_backward", _attention_backward, _attention_backward_fake, None),
    ("spectral_norm", _spectral_norm, _spectral_norm_fake, (_sn_autograd, _sn_setup_context)),
    ("spectral_norm_backward", _spectral_norm_backward, _spectral_norm_backward_fake, None),
]
# what a compiled graph depends on beyond its own code: every op's signature (its schema), fake
# implementation (output shapes, dtypes, strides) and autograd formula (what the traced backward
# calls with what), and what those call while tracing. Not the op bodies or kernels: they run at
# call time, never traced, and their outputs must match the fakes (opcheck, in the tests). The
# reference module whole: the autograd formulas call it under create_graph (the attention block's
# double backward, spectral norm's backward) and the fakes for accumulation_dtype.
_TRACED_HELPERS = [_attention_double_backward, reference]


def _source(obj) -> bytes:
    """A function's or module's source; without source shipped, its bytecode (line numbers too: it
    only errs towards renaming)."""
    try:
        return inspect.getsource(obj).encode()
    except (OSError, TypeError):
        if inspect.ismodule(obj):
            return b"".join(marshal.dumps(f.__code__) for f in vars(obj).values() if inspect.isfunction(f))
        return marshal.dumps(obj.__code__)


def contract_fingerprint() -> str:
    """8 hex digits of a hash of the operators' contract (see the module's docstring)."""
    digest = hashlib.sha256()
    for name, impl, fake, autograd in _OPS:
        digest.update(f"\0{name}{inspect.signature(impl)}\0".encode())
        for fn in (fake, *(autograd or ())):
            digest.update(_source(fn))
    for fn in _TRACED_HELPERS:
        digest.update(_source(fn))
    return digest.hexdigest()[:8]


CONTRACT = contract_fingerprint()


def _register(name: str, impl: Callable, fake: Callable, autograd) -> torch.library.CustomOpDef:
    op = torch.library.custom_op(f"sagan_ext::{name}_{CONTRACT}", impl, mutates_args=())
    op.register_fake(fake)
    if autograd is not None:
        backward, setup_context = autograd
        op.register_autograd(backward, setup_context=setup_context)
    return op


attention_forward, attention_backward, spectral_norm, spectral_norm_backward = (_register(*op) for op in _OPS)
