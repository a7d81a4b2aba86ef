"""Existing GANs on the fused operators: sagan_ext.fuse(model), in place, by one call; and
replace_biggan_attention(model), which swaps BigGAN-PyTorch's attention blocks for FusedSelfAttention.

Each attention block fuse recognises keeps its object; only its class is swapped for a subclass of
its own class whose forward calls sagan_ext.self_attention on the block's own weights (the technique
torch.nn.utils.parametrize uses). Replacing the module instead would need each of these rebuilt by
hand; keeping it keeps them all:
- isinstance: StudioGAN's Generator dispatches on isinstance(block, ops.SelfAttention);
- the Parameter objects, in order: optimizers built before the call (BigGAN-PyTorch builds G.optim
  in the constructor), their state, EMA copies holding state-dict tensors, DDP wrappers;
- the state-dict keys and layout (BigGAN's u0/sv0 too): checkpoints load both ways, strictly;
- the convs' spectral norm: BigGAN-PyTorch's SNConv2d runs its own W_() (power iteration in eval
  too, as theirs), torch's or sagan_ext's hook runs as in the conv's forward;
- DataParallel replicas (made with type(module)) and deepcopy.

A block is recognised by the names and shapes of its parts (LAYOUTS), then verified: its own forward
and the fused one run on float64 copies of it (gamma != 0) and must agree, and that probe also shows
the call convention to keep: forward(x) or forward(x, y=None) (y ignored, as BigGAN's Attention
does), returning out or heykeetae's (out, attention). A block that fails is left unchanged with a
warning, so fuse never changes what a model computes.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends, reference
from .attention import FusedSelfAttention, SelfAttentionBlock, conv_weight, self_attention
from .biggan_checkpoints import has_torch_spectral_norm
from .spectral_norm import SpectralNorm

torch_sn = importlib.import_module("torch.nn.utils.spectral_norm")


@dataclass(frozen=True)
class Layout:
    """Where a block keeps its parts: the query, key, value and output 1x1 convs, the gain."""
    repo: str
    convs: tuple[str, str, str, Optional[str]]
    gamma: str
    pool: bool  # keys and values 2x2 max-pooled


LAYOUTS = (
    Layout("heykeetae/Self-Attention-GAN Self_Attn", ("query_conv", "key_conv", "value_conv", None), "gamma", False),
    Layout("BigGAN-PyTorch Attention", ("theta", "phi", "g", "o"), "gamma", True),
    Layout("PyTorch-StudioGAN SelfAttention", ("conv1x1_theta", "conv1x1_phi", "conv1x1_g", "conv1x1_attn"),
           "sigma", True),
)


def fuse(model: nn.Module, *, backend: str = "auto", spectral_norm: bool = True,
         attention_maps: bool = False) -> dict[str, str]:
    """Make `model`'s attention blocks (heykeetae `Self_Attn`, BigGAN-PyTorch `Attention`, StudioGAN
    `SelfAttention`) run on sagan_ext's fused operator and, with `spectral_norm`, every
    torch.nn.utils.spectral_norm hook on sagan_ext's (same buffers and state dict). In place; the
    model keeps its classes, Parameters, state-dict keys, call conventions and eval behaviour.

    attention_maps: blocks whose convention returns (out, attention) (heykeetae's) return the
    (B, N, N) map, detached, for visualisation; otherwise (out, None), so that a model that never
    reads the map never computes it. Set per block later with `block.return_attention`.

    Returns {qualified module name: what changed} ('' is `model` itself). Calling it again changes
    nothing more."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backends.check_name(backend)
    changed = {}
    for name, module in model.named_modules():
        what = []
        layout = _layout(module)
        if layout is not None:
            fused, reason = _verified_class(module, layout)
            if fused is None:
                warnings.warn(f"sagan_ext.fuse: {name or 'the model'} has the layout of {layout.repo} but is left "
                              f"unchanged: {reason}", stacklevel=2)
            else:
                module.__class__ = fused
                module.sagan_ext_backend = backend
                if issubclass(fused, ReturnsMap):
                    module.return_attention = attention_maps
                what.append(f"attention ({layout.repo})")
        if spectral_norm:
            for key, hook in list(module._forward_pre_hooks.items()):
                if type(hook) is torch_sn.SpectralNorm:  # exactly torch's: sagan_ext's subclass is left as it is
                    # no sigma buffer is added: EMA code that zips two models' buffers must still line up
                    module._forward_pre_hooks[key] = SpectralNorm(hook.name, hook.n_power_iterations, hook.dim,
                                                                  hook.eps, backend)
                    what.append(f"spectral_norm({hook.name})")
        if what:
            changed[name] = ", ".join(what)
    return changed


def _layout(module: nn.Module) -> Optional[Layout]:
    if isinstance(module, (SelfAttentionBlock, Fused)):  # sagan_ext's own blocks, or fused already
        return None
    for layout in LAYOUTS:
        convs = [getattr(module, n, None) for n in layout.convs if n is not None]
        gamma = getattr(module, layout.gamma, None)
        if all(isinstance(c, nn.Conv2d) for c in convs) and isinstance(gamma, Tensor) and gamma.numel() == 1:
            return layout
    return None


def _unsupported_conv(name: str, conv: nn.Conv2d, is_out: bool) -> Optional[str]:
    """Why the fused op cannot stand in for this conv's forward, or None."""
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
        return f"{name} is not a plain 1x1 conv"
    if is_out and conv.bias is not None:
        return f"{name} has a bias (the fused op's output projection has none)"
    if conv._forward_hooks or any(not isinstance(h, torch_sn.SpectralNorm) for h in conv._forward_pre_hooks.values()):
        return f"{name} has hooks other than spectral norm, which the fused op would skip"
    if not callable(getattr(conv, "W_", None)) and type(conv).forward is not nn.Conv2d.forward:
        return f"{name} ({type(conv).__name__}) has its own forward"
    return None


def _weight(conv: nn.Conv2d) -> Tensor:
    w_ = getattr(conv, "W_", None)  # BigGAN-PyTorch's SN layers: W / sigma by their own power iteration
    return w_() if callable(w_) else conv_weight(conv)


def _attention(block: nn.Module, x: Tensor, with_map: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The block's forward on the fused op: each conv's (normalised) weight is computed once, as the
    block's own forward does, so spectral norm's power iteration advances once per call."""
    layout = block.sagan_ext_layout
    q, k, v, o = (None if n is None else getattr(block, n) for n in layout.convs)
    wq, wk, wv = _weight(q), _weight(k), _weight(v)
    wo = None if o is None else _weight(o)
    out = self_attention(x, wq, wk, wv, getattr(block, layout.gamma), query_bias=q.bias, key_bias=k.bias,
                         value_bias=v.bias, out_weight=wo, pool=layout.pool, backend=block.sagan_ext_backend)
    if not with_map:
        return out, None
    with torch.no_grad():  # (B, N, N_keys), B*N*N_keys floats: for visualisation only
        attention = reference.attention_map(x, wq.flatten(1), q.bias, wk.flatten(1), k.bias, wv.flatten(1), v.bias,
                                            layout.pool)
    return out, attention


class Fused:
    """Base of the fused blocks' mixins. The class is made at run time from the block's own class,
    so pickling names the original class and the mixin instead."""
    sagan_ext_layout: Layout
    sagan_ext_base: type
    sagan_ext_mixin: type

    def __reduce_ex__(self, protocol):
        return _fused_instance, (self.sagan_ext_base, self.sagan_ext_mixin, self.sagan_ext_layout), self.__getstate__()


class TakesX(Fused):
    def forward(self, x):
        return _attention(self, x, False)[0]


class TakesXAndY(Fused):
    def forward(self, x, y=None):  # BigGAN-PyTorch's G calls every block as block(h, y); attention ignores y
        return _attention(self, x, False)[0]


class ReturnsMap(Fused):
    return_attention = False

    def forward(self, x):  # heykeetae's models unpack `out, p1 = self.attn1(out)`
        return _attention(self, x, self.return_attention)


_CLASSES: dict = {}


def _fused_class(base: type, mixin: type, layout: Layout) -> type:
    key = (base, mixin, layout)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Fused{base.__name__}", (mixin, base),
                             {"sagan_ext_layout": layout, "sagan_ext_base": base, "sagan_ext_mixin": mixin,
                              "__qualname__": f"Fused{base.__qualname__}"})
    return _CLASSES[key]


def _fused_instance(base: type, mixin: type, layout: Layout) -> nn.Module:
    return object.__new__(_fused_class(base, mixin, layout))


def forward_takes_y(block: nn.Module) -> tuple[Optional[bool], Optional[str]]:
    """Whether forward is (x) or (x, y=None), or why it is neither."""
    try:
        params = list(inspect.signature(type(block).forward).parameters.values())[1:]
    except (TypeError, ValueError) as e:
        return None, f"its forward's signature cannot be read ({e})"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) == 1 and params[0].kind in positional:
        return False, None
    optional = len(params) == 2 and params[1].default is not inspect.Parameter.empty
    if optional and all(p.kind in positional for p in params):
        return True, None
    return None, f"its forward{inspect.signature(type(block).forward)} is neither forward(x) nor forward(x, y=None)"


def _verified_class(block: nn.Module, layout: Layout) -> tuple[Optional[type], Optional[str]]:
    """The fused class for `block` if its own forward and the fused one agree on a probe, else why not."""
    convs = [(n, getattr(block, n)) for n in layout.convs if n is not None]
    for i, (name, conv) in enumerate(convs):
        reason = _unsupported_conv(name, conv, is_out=i == 3)
        if reason:
            return None, reason
    takes_y, reason = forward_takes_y(block)
    if reason:
        return None, reason
    # float64 copies in eval (no u saved), gamma != 0 (0 at init in every repo, which would hide the
    # attention), a fixed input from a private generator (the global RNG is left as it was)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, convs[0][1].in_channels, 4, 4, dtype=torch.float64, generator=generator)
    try:
        theirs, ours = (_probe_copy(block).to("cpu", torch.float64).eval() for _ in range(2))
    except (RuntimeError, TypeError, copy.Error) as e:
        return None, f"it cannot be copied for the probe ({type(e).__name__}: {e})"
    y = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        for copied in (theirs, ours):
            getattr(copied, layout.gamma).fill_(0.5)
        try:
            expected = theirs(x)
            if takes_y and not _same(theirs(x, y), expected):
                return None, "its output depends on y"
        except Exception as e:  # their code on a probe input: any failure means it is not a block we know
            return None, f"its own forward failed on a probe input ({type(e).__name__}: {e})"
    if isinstance(expected, Tensor):
        mixin = TakesXAndY if takes_y else TakesX
    elif isinstance(expected, tuple) and len(expected) == 2 and all(isinstance(t, Tensor) for t in expected) \
            and not takes_y:
        mixin = ReturnsMap
    else:
        return None, f"its forward returns {type(expected).__name__}, not out or (out, attention)"
    fused = _fused_class(type(block), mixin, layout)
    ours.__class__ = fused
    ours.sagan_ext_backend, ours.return_attention = "reference", True
    with torch.no_grad():
        try:
            got = ours(x)
        except (ValueError, TypeError) as e:  # shapes the fused op refuses
            return None, f"the fused op cannot run it ({e})"
    if not _same(got, expected):
        return None, "its forward computes something else than the SAGAN block (the probe's outputs differ)"
    return fused, None


def _probe_copy(block: nn.Module) -> nn.Module:
    """deepcopy, with the tensors a forward leaves in attributes (torch's spectral norm sets `weight`,
    a non-leaf that deepcopy refuses) detached: the copy's next forward computes them again."""
    memo = {id(t): t.detach() for m in block.modules() for t in vars(m).values()
            if isinstance(t, Tensor) and not t.is_leaf}
    return copy.deepcopy(block, memo)


def _same(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    return isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and all(map(_same, a, b))


def replace_biggan_attention(model: nn.Module, *, backend: str = "auto",
                             power_iteration_in_eval: bool = False) -> list[str]:
    """Swap every BigGAN-PyTorch `Attention` in `model` (a whole BigGAN G or D) for a
    FusedSelfAttention holding its weights and SN state, on the same device, dtype and mode.
    Returns the swapped modules' names. The model's state dict keeps loading BigGAN checkpoints
    (the attention entries are converted on load); its attention entries are saved in torch's
    layout (biggan_checkpoints.to_biggan_state_dict converts back). BigGAN's eval power iteration:
    see biggan_checkpoints.

    The new block keeps the old one's Parameter objects (weights and gamma, same order), so an
    optimizer built before the swap (BigGAN's G.optim, D.optim) trains it, and it takes BigGAN's
    block(h, y) calls (accepts_y). The SN buffers are new (torch's layout): code holding the old
    block's state-dict tensors (BigGAN's utils.ema) does not see them. fuse(model) keeps the
    module objects and BigGAN's layout instead, and is the drop-in for training code."""
    swapped = []
    for name, old in list(model.named_modules())[1:]:  # the root itself cannot be swapped in place
        convs = [getattr(old, n, None) for n in ("theta", "phi", "g", "o")]
        if isinstance(old, SelfAttentionBlock) or not all(isinstance(c, nn.Conv2d) for c in convs) \
                or not isinstance(getattr(old, "gamma", None), Tensor):
            continue
        theta, _, g, _ = convs
        channels = theta.in_channels
        biggan_sn = hasattr(theta, "u0")
        if biggan_sn and getattr(theta, "num_itrs", 1) != 1:
            raise ValueError(f"{name}: BigGAN SN with num_itrs={theta.num_itrs} is not supported "
                             f"(1 is BigGAN's default)")
        spectral_norm = biggan_sn or has_torch_spectral_norm(theta)
        new = FusedSelfAttention(channels, "biggan", spectral_norm=spectral_norm,
                                 backend=backend, qk_reduction=channels // theta.out_channels,
                                 v_reduction=channels // g.out_channels,
                                 power_iteration_in_eval=power_iteration_in_eval,
                                 accepts_y=forward_takes_y(old)[0] is True)
        new.to(device=theta.weight.device, dtype=theta.weight.dtype)
        new.load_state_dict(old.state_dict())
        for conv, old_conv in zip(new._convs(), convs):
            for hook in conv._forward_pre_hooks.values():
                if isinstance(hook, torch_sn.SpectralNorm):
                    hook.eps = getattr(old_conv, "eps", hook.eps)
            # the old Parameter objects, holding the values just loaded: optimizers built before keep training them
            old_weight = old_conv.weight_orig if has_torch_spectral_norm(old_conv) else old_conv.weight
            conv._parameters["weight_orig" if spectral_norm else "weight"] = old_weight
        new.gamma = old.gamma
        new.train(old.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped
