"""BigGAN-PyTorch (ajbrock/BigGAN-PyTorch) checkpoints in and out of sagan_ext: the checkpoint
format, not the attention variant of the same name (FusedSelfAttention(C, "biggan")).

BigGAN-PyTorch's SNConv2d / SNLinear / SNEmbedding keep their spectral norm beside the raw `weight`
as `u0` (1, out), the left singular vector estimate, and `sv0` (1,), the sigma of the last training
forward (for logging only). torch's spectral norm, and sagan_ext's, keep `weight_orig`, `weight_u`
(out,) and `weight_v` (in,). Both normalise the weight viewed as (out, -1) and, in training, run
v = normalize(W^T u), u = normalize(W v), sigma = u . W v, save u and divide W by sigma (gradient
through W only). So a converted layer's training forwards and gradients are BigGAN's exactly.

Eval differs. BigGAN runs one more power iteration from the stored u0 and saves nothing; torch
divides by u . W v with the stored u and v. `power_iteration_in_eval=True` (sagan_ext.spectral_norm,
FusedSelfAttention, sagan_ext.dropin.replace_biggan_attention) gives BigGAN's eval instead.

Conversion keeps u0 as weight_u and rebuilds weight_v as the v of the power-iteration step that
produced u0: the unit vector in W's row space with normalize(W v) = u0, i.e. normalize(pinv(W) u0).
With the weights of that step, the stored pair then gives sigma = sv0; after an optimiser step it is
the same estimate torch's own hook would hold. Only u0 is used: BigGAN's extra singular vectors
(num_svs > 1: u1, sv1, ...) do not change W / sigma and are dropped.
"""
from __future__ import annotations

import importlib
import re
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

torch_sn = importlib.import_module("torch.nn.utils.spectral_norm")


def _implied_v(weight: Tensor, u: Tensor, eps: float = 1e-12) -> Tensor:
    """The unit v in W's row space whose power-iteration step gives u = normalize(W v)."""
    w = weight.reshape(weight.shape[0], -1).double()
    return F.normalize(torch.linalg.pinv(w) @ u.double(), dim=0, eps=eps).to(weight.dtype)


def layer_from_biggan(state_dict: dict, prefix: str) -> Optional[Tensor]:
    """Rewrite one BigGAN SN layer's entries (`<prefix>weight`, `u0`, `sv0`) in `state_dict`, in
    place, into torch's layout (`weight_orig`, `weight_u`, `weight_v`). Returns sv0 (the sigma
    BigGAN last logged), or None if `prefix` names no BigGAN SN layer."""
    if prefix + "u0" not in state_dict or prefix + "weight" not in state_dict:
        return None
    weight, u0 = state_dict[prefix + "weight"], state_dict[prefix + "u0"]
    if tuple(u0.shape) != (1, weight.shape[0]):
        raise ValueError(f"{prefix}u0 must have shape (1, {weight.shape[0]}) for {prefix}weight of shape "
                         f"{tuple(weight.shape)} (BigGAN-PyTorch's SN layout), got {tuple(u0.shape)}")
    sv0 = state_dict.get(prefix + "sv0")
    extra = re.compile(re.escape(prefix) + r"(u|sv)\d+")  # u0, sv0 and any further singular vectors
    for key in [k for k in state_dict if extra.fullmatch(k)] + [prefix + "weight"]:
        del state_dict[key]
    u = u0[0].to(weight.dtype)
    state_dict[prefix + "weight_orig"] = weight
    state_dict[prefix + "weight_u"] = u
    state_dict[prefix + "weight_v"] = _implied_v(weight, u)
    return sv0


def from_biggan_state_dict(state_dict: dict) -> dict:
    """A whole BigGAN-PyTorch state dict (G.pth, D.pth, ...) with every SN layer in torch's layout,
    for a model whose layers use torch's or sagan_ext's spectral_norm (and FusedSelfAttention, whose
    load_state_dict converts its own entries without this)."""
    out = _copy(state_dict)
    for key in [k for k in state_dict if k.endswith("u0")]:
        layer_from_biggan(out, key[:-2])
    return out


def to_biggan_state_dict(state_dict: dict) -> dict:
    """The inverse: every torch-layout SN layer (`weight_orig`, `weight_u`, `weight_v`) back in
    BigGAN-PyTorch's (`weight`, `u0` = weight_u, `sv0` = u . W v, the sigma the stored pair gives).
    BigGAN's training forwards from it match sagan_ext's; its eval adds its extra power iteration."""
    out = _copy(state_dict)
    for key in [k for k in state_dict if k.endswith("weight_orig")]:
        prefix = key[: -len("weight_orig")]
        if prefix + "weight_u" not in out or prefix + "weight_v" not in out:
            continue
        weight, u, v = out.pop(key), out.pop(prefix + "weight_u"), out.pop(prefix + "weight_v")
        out[prefix + "weight"] = weight
        out[prefix + "u0"] = u.unsqueeze(0).clone()
        out[prefix + "sv0"] = torch.dot(u, weight.reshape(weight.shape[0], -1) @ v).reshape(1)
    return out


def _copy(state_dict) -> OrderedDict:
    out = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):  # module versions, as load_state_dict reads them
        out._metadata = state_dict._metadata
    return out


def has_torch_spectral_norm(conv: nn.Module) -> bool:
    """Whether torch's spectral norm hook (or sagan_ext's, its subclass) normalises the conv."""
    return any(isinstance(h, torch_sn.SpectralNorm) for h in conv._forward_pre_hooks.values())


def attention_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs) -> None:
    """FusedSelfAttention's load_state_dict pre-hook: BigGAN-PyTorch `Attention` entries
    (`theta.u0`, ...) load into the spectral-norm variant; into one without spectral norm they would
    run on un-normalised weights, so that is an error (whatever `strict` says)."""
    for name in ("theta", "phi", "g", "o"):
        conv = getattr(module, name, None)
        if conv is None or prefix + f"{name}.u0" not in state_dict:
            continue
        if not has_torch_spectral_norm(conv):
            raise ValueError(
                f"{prefix or 'the state dict'}: {prefix}{name}.u0 is BigGAN-PyTorch's spectral norm state; this "
                f"FusedSelfAttention has no spectral norm, so its weights would run un-normalised. Build it with "
                f"FusedSelfAttention({module.in_channels}, 'biggan', spectral_norm=True)")
        sv0 = layer_from_biggan(state_dict, prefix + f"{name}.")
        sigma = getattr(conv, "weight_sigma", None)  # sagan_ext's logged sigma: BigGAN's until the next forward
        if sv0 is not None and isinstance(sigma, Tensor) and sv0.numel() == 1:
            with torch.no_grad():
                sigma.copy_(sv0.reshape(()))
