"""Fused SAGAN self-attention: the functional operator and the drop-in module (FusedSelfAttention),
and the same block computed eagerly (EagerSelfAttention), for A/B comparisons."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, backends, biggan_checkpoints, ops, reference
from .spectral_norm import spectral_norm as add_spectral_norm  # the blocks' `spectral_norm` flag has the plain name


def self_attention(
    x: Tensor, query_weight: Tensor, key_weight: Tensor, value_weight: Tensor, gamma: Tensor, *,
    query_bias: Optional[Tensor] = None, key_bias: Optional[Tensor] = None, value_bias: Optional[Tensor] = None,
    out_weight: Optional[Tensor] = None, pool: bool = False, backend: str = "auto",
) -> Tensor:
    """out = x + gamma * Wo(softmax(q k^T) v), q = Wq x + bq, k = Wk x + bk, v = Wv x + bv (1x1 convs;
    weights as (out, in) or (out, in, 1, 1)), unscaled scores, keys/values 2x2 max-pooled if `pool`.
    Never materialises the N x N map (backends other than "reference")."""
    wq, wk, wv = (_checks.as_matrix(n, t) for n, t in
                  (("query_weight", query_weight), ("key_weight", key_weight), ("value_weight", value_weight)))
    wo = None if out_weight is None else _checks.as_matrix("out_weight", out_weight)
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        # autocast's rule for a matmul: floating tensors of its device go to its dtype, float64
        # ones stay (fp32 weights meet bf16 x; a float64 block stays float64)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, wq, wk, wv, gamma, query_bias, key_bias, value_bias, wo = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == x.device.type else t
            for t in (x, wq, wk, wv, gamma, query_bias, key_bias, value_bias, wo))
    _checks.check_attention(x, wq, query_bias, wk, key_bias, wv, value_bias, wo, gamma, pool)
    out, _, _ = ops.attention_forward(x, wq, query_bias, wk, key_bias, wv, value_bias, wo, gamma, pool, backend,
                                      backends.tf32_allowed())
    return out


def conv_weight(conv: nn.Conv2d) -> Tensor:
    """The conv's effective weight, running its forward pre-hooks (spectral norm: sagan_ext's or
    torch's) since the fused op reads the weight without calling the conv."""
    for hook in conv._forward_pre_hooks.values():
        hook(conv, ())
    return conv.weight


class SelfAttentionBlock(nn.Module):
    """A SAGAN self-attention block's parameters, state dict and argument checks, shared by
    FusedSelfAttention (sagan_ext's operator) and EagerSelfAttention (bmm and softmax); each
    subclass computes the forward its own way.

    variant="sagan" (the paper / heykeetae `Self_Attn`): query_conv, key_conv (C -> C/qk_reduction),
    value_conv (C -> C), all with bias; gamma of shape (1,), initialised to 0.
    variant="biggan" (the official TF code / BigGAN-PyTorch `Attention`): theta, phi (C -> C/qk_reduction),
    g (C -> C/v_reduction), o (C/v_reduction -> C), no biases, keys/values 2x2 max-pooled; gamma a scalar.
    State dicts of those modules load unchanged. BigGAN-PyTorch's own `Attention` (SNConv2d:
    `theta.weight`, `theta.u0`, `theta.sv0`, ...) loads into `spectral_norm=True`, converted on load
    (sagan_ext/biggan_checkpoints.py); into the variant without spectral norm it is a ValueError.

    spectral_norm: sagan_ext.spectral_norm on every conv. power_iteration_in_eval: eval forwards
    also run the power iteration from the stored u, saving nothing (BigGAN-PyTorch's eval); by
    default they use the stored u, v (torch's).

    forward(x, *, return_attention=False). accepts_y: forward also takes a second positional
    argument y and ignores it, as BigGAN-PyTorch's `Attention.forward(x, y=None)` does (its G calls
    every block as block(h, y)); replace_biggan_attention sets it for blocks it replaces. Without it a
    second positional argument is a TypeError, never silently ignored.
    """

    accepts_y = False  # class default: modules pickled before the option existed

    def __init__(self, in_channels: int, variant: str = "sagan", *, spectral_norm: bool = False,
                 backend: str = "auto", qk_reduction: int = 8, v_reduction: Optional[int] = None,
                 power_iteration_in_eval: bool = False, accepts_y: bool = False):
        super().__init__()
        if variant not in ("sagan", "biggan"):
            raise ValueError(f"variant must be 'sagan' or 'biggan', got {variant!r}")
        backends.check_name(backend)
        if power_iteration_in_eval and not spectral_norm:
            raise ValueError("power_iteration_in_eval=True needs spectral_norm=True")
        if v_reduction is None:
            v_reduction = 1 if variant == "sagan" else 2
        if variant == "sagan" and v_reduction != 1:
            raise ValueError("variant='sagan' has value channels = in_channels (v_reduction=1); use variant='biggan'")
        for name, r in (("qk_reduction", qk_reduction), ("v_reduction", v_reduction)):
            if not isinstance(in_channels, int) or in_channels <= 0 or in_channels % r:
                raise ValueError(f"in_channels={in_channels!r} must be a positive int divisible by {name}={r}")
        self.in_channels, self.variant, self.backend, self.accepts_y = in_channels, variant, backend, accepts_y
        query_key_dim, value_dim = in_channels // qk_reduction, in_channels // v_reduction
        conv = lambda i, o, bias: nn.Conv2d(i, o, kernel_size=1, bias=bias)  # noqa: E731
        if variant == "sagan":
            self.query_conv = conv(in_channels, query_key_dim, True)
            self.key_conv = conv(in_channels, query_key_dim, True)
            self.value_conv = conv(in_channels, value_dim, True)
            self.gamma = nn.Parameter(torch.zeros(1))
        else:
            self.theta, self.phi = conv(in_channels, query_key_dim, False), conv(in_channels, query_key_dim, False)
            self.g, self.o = conv(in_channels, value_dim, False), conv(value_dim, in_channels, False)
            self.gamma = nn.Parameter(torch.tensor(0.0))
        if spectral_norm:
            for m in self._convs():
                add_spectral_norm(m, backend=backend, power_iteration_in_eval=power_iteration_in_eval)
        self._register_load_state_dict_pre_hook(biggan_checkpoints.attention_load_pre_hook, with_module=True)

    def _convs(self) -> list[nn.Conv2d]:
        if self.variant == "sagan":
            return [self.query_conv, self.key_conv, self.value_conv]
        return [self.theta, self.phi, self.g, self.o]

    def _check_y(self, y) -> None:
        if y is not None and not self.accepts_y:
            raise TypeError(
                f"{type(self).__name__}.forward takes x as its only positional argument (return_attention is "
                f"keyword-only), got a second one of type {type(y).__name__}; a block standing in for BigGAN-PyTorch's "
                f"Attention, which its G calls as block(h, y), is built with accepts_y=True")

    def extra_repr(self) -> str:
        accepts_y = ", accepts_y=True" if self.accepts_y else ""
        return f"in_channels={self.in_channels}, variant={self.variant!r}, backend={self.backend!r}{accepts_y}"


class _FusedSelfAttentionType(type):
    """EagerSelfAttention used to subclass FusedSelfAttention; isinstance and issubclass against
    FusedSelfAttention still hold for it, with a DeprecationWarning (SelfAttentionBlock is the
    class both share)."""

    def __instancecheck__(cls, instance) -> bool:
        return super().__instancecheck__(instance) or (cls is FusedSelfAttention and _deprecated_eager(type(instance)))

    def __subclasscheck__(cls, subclass) -> bool:
        return super().__subclasscheck__(subclass) or (cls is FusedSelfAttention and _deprecated_eager(subclass))


def _deprecated_eager(cls) -> bool:
    if not (isinstance(cls, type) and issubclass(cls, EagerSelfAttention)):
        return False
    warnings.warn("EagerSelfAttention is no longer a FusedSelfAttention: test for "
                  "sagan_ext.attention.SelfAttentionBlock, the class both share", DeprecationWarning, stacklevel=3)
    return True


class FusedSelfAttention(SelfAttentionBlock, metaclass=_FusedSelfAttentionType):
    """Drop-in SAGAN self-attention block on sagan_ext's fused operator, which never keeps the
    N x N map (parameters, state dict and options: SelfAttentionBlock)."""

    def _arguments(self):
        convs = self._convs()
        weights = [conv_weight(c).flatten(1) for c in convs]
        biases = [c.bias for c in convs[:3]]
        wo = weights[3] if len(weights) == 4 else None
        return weights[0], biases[0], weights[1], biases[1], weights[2], biases[2], wo

    def forward(self, x: Tensor, y=None, *, return_attention: bool = False):
        self._check_y(y)
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but this FusedSelfAttention "
                             f"has in_channels={self.in_channels}")
        wq, bq, wk, bk, wv, bv, wo = self._arguments()
        pool = self.variant == "biggan"
        out = self_attention(x, wq, wk, wv, self.gamma, query_bias=bq, key_bias=bk, value_bias=bv,
                             out_weight=wo, pool=pool, backend=self.backend)
        if not return_attention:
            return out
        with torch.no_grad():  # (B, N, N_keys), for visualisation only
            attention = reference.attention_map(x, wq, bq, wk, bk, wv, bv, pool)
        return out, attention


class EagerSelfAttention(SelfAttentionBlock):
    """The same block (same parameters and state dict) computed the way users' code does today:
    1x1 convs, a B x N x N bmm, softmax, another bmm. The A/B anchor (`sagan-train --ops eager`,
    the benchmarks); it keeps the N x N map alive for the backward."""

    def forward(self, x: Tensor, y=None, *, return_attention: bool = False):
        self._check_y(y)
        b, _, h, w = x.shape
        if self.variant == "sagan":
            q, k, v = (conv(x).flatten(2) for conv in (self.query_conv, self.key_conv, self.value_conv))
        else:
            q = self.theta(x).flatten(2)
            k, v = F.max_pool2d(self.phi(x), 2).flatten(2), F.max_pool2d(self.g(x), 2).flatten(2)
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N, N_keys), unscaled scores
        o = torch.bmm(v, attention.transpose(1, 2)).view(b, -1, h, w)
        if self.variant == "biggan":
            o = self.o(o)
        out = x + self.gamma * o
        return (out, attention) if return_attention else out
