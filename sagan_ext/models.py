"""The SAGAN generator and discriminator (Zhang et al. 2019), laid out like the official code:
residual up/down blocks, conditional batch norm in G (per-class gain and bias), a projection
discriminator, one self-attention block at a chosen feature-map resolution in each network, and
spectral norm on every layer of both (the conditional-BN embeddings excepted, as in the official
code). `ops="fused"` builds them on sagan_ext's operators, `ops="eager"` on plain PyTorch modules
(eager bmm/softmax attention, torch.nn.utils.spectral_norm); the two have identical parameters
and state dicts, so one checkpoint runs on either."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import EagerSelfAttention, FusedSelfAttention, SelfAttentionBlock
from .spectral_norm import spectral_norm as fused_spectral_norm

IMAGE_SIZES = (32, 64, 128)
# channel multipliers of the base width `ch`; G: at 4 x 4, then after each up block;
# D: after each block (all downsample but the last)
G_CHANNELS = {32: (4, 4, 2, 1), 64: (8, 8, 4, 2, 1), 128: (16, 16, 8, 4, 2, 1)}
D_CHANNELS = {32: (1, 2, 4, 4), 64: (1, 2, 4, 8, 8), 128: (1, 2, 4, 8, 16, 16)}


def attention_resolutions(image_size: int) -> tuple[int, ...]:
    """Feature-map sizes where both G and D have a block output to attend over."""
    return tuple(r for r in (8, 16, 32, 64) if r <= image_size // 2)


def default_attention_resolution(image_size: int) -> int:
    return min(32, image_size // 2)


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose gain and bias are looked up per class (plain affine BN if num_classes == 0)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=num_classes == 0)
        if num_classes:
            self.gain, self.bias = nn.Embedding(num_classes, num_features), nn.Embedding(num_classes, num_features)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        x = self.bn(x)
        if not hasattr(self, "gain"):
            return x
        return x * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class _AllReduceSum(torch.autograd.Function):
    """The sum over the default process group's ranks, differentiable: every rank's output is the
    same sum of every rank's input, so an input's gradient is the sum of every rank's output
    gradient, another all-reduce. (torch.distributed.nn.functional.all_reduce does this but is
    deprecated: it warned at every step; its suggested replacement is a private module.)"""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def all_reduce(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are the global batch's across the processes of
    the default process group (BigGAN's cross-replica BN; torch.nn.SyncBatchNorm runs on GPUs
    only). The per-channel sums go through an autograd all-reduce, so the output, the gradients
    and the running statistics are those of one process holding the whole batch. In eval mode
    or without a process group it is BatchNorm2d; the state dict is BatchNorm2d's."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32 at least
        local = torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // x.shape[1])])  # sums, values per channel
        total = all_reduce(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = xf - mean[:, None, None]
        var = all_reduce(centred.square().sum(dims)) / count  # two passes: no E[x^2] - mean^2 cancellation
        y = centred * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), factor)  # unbiased
        return y.to(x.dtype)


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm2d of `model` a SyncBatchNorm2d, in place (the same objects, re-classed:
    parameters, buffers and state dict unchanged)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return model


class GBlock(nn.Module):
    """BN-ReLU-upsample-conv3x3-BN-ReLU-conv3x3, plus an upsampled 1x1 conv shortcut. The convs
    have no bias (see Generator)."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int, conv_bias: bool = False):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, num_classes)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=conv_bias)
        self.bn2 = ConditionalBatchNorm2d(out_channels, num_classes)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=conv_bias)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=conv_bias)

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2.0)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0))


class DBlock(nn.Module):
    """(ReLU)-conv3x3-ReLU-conv3x3-(avgpool), plus a 1x1 conv shortcut; the first block skips the
    leading ReLU (it sees the image) and pools before its shortcut conv."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, first: bool = False):
        super().__init__()
        self.downsample, self.first = downsample, first
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first and self.downsample:
            s = F.avg_pool2d(s, 2)
        s = self.shortcut(s)
        if self.downsample and not self.first:
            s = F.avg_pool2d(s, 2)
        return h + s


def _attention(channels: int, variant: str, ops: str) -> SelfAttentionBlock:
    return (FusedSelfAttention if ops == "fused" else EagerSelfAttention)(channels, variant)


def _attend(attention: SelfAttentionBlock, h: Tensor, return_attention: bool) -> tuple[Tensor, Tensor | None]:
    """h through the attention block, and its (B, N, N_keys) map if asked for (else None)."""
    return attention(h, return_attention=True) if return_attention else (attention(h), None)


class Generator(nn.Module):
    """The GBlocks' convs have no bias. Each feeds a batch norm, which removes any per-channel
    constant: conv1 feeds bn2; conv2 and the shortcut add to the residual stream, which the next
    block's bn1 (or G's last bn) reads and the next shortcut passes on as a constant. Only the
    attention block sees such a constant otherwise, by gamma-small terms that its own query and
    value biases can take over ("sagan" variant). So the gradient of such a bias is zero or nearly:
    Adam's normalised step walked it on rounding noise, and two summation orders (K processes or
    one, one CPU or another) trained different Gs, which the attention then passed on to the
    images. G.linear keeps its bias: its output is (C, 4, 4), and the bias's per-position part is
    a learned 4 x 4 template that no batch norm removes.

    conv_bias=True builds the convs with biases, as sagan_ext's G had before: only to load
    (resume, sample) checkpoints written then, which sagan-train and sagan-sample do by themselves.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: int = 10, *, ch: int = 32,
                 z_dim: int = 128, attention_res: int | None = None, attention: str = "sagan", ops: str = "fused",
                 conv_bias: bool = False):
        super().__init__()
        _check_architecture(image_size, ch, attention_res)
        if not isinstance(conv_bias, bool):
            raise TypeError(f"conv_bias must be a bool, got {type(conv_bias).__name__}")
        widths = [ch * m for m in G_CHANNELS[image_size]]
        self.z_dim, self.num_classes = z_dim, num_classes
        self.attention_res = attention_res or default_attention_resolution(image_size)
        self.linear = nn.Linear(z_dim, widths[0] * 4 * 4)
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes, conv_bias) for a, b in zip(widths, widths[1:]))
        self.attention_after = (self.attention_res // 8).bit_length() - 1  # block i outputs 8 * 2^i
        self.attention = _attention(widths[self.attention_after + 1], attention, ops)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.to_image = nn.Conv2d(widths[-1], channels, 3, padding=1)
        _init_weights(self)

    def forward(self, z: Tensor, y: Tensor | None = None, return_attention: bool = False):
        h = self.linear(z).view(z.shape[0], -1, 4, 4)
        attention = None
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if i == self.attention_after:
                h, attention = _attend(self.attention, h, return_attention)
        image = torch.tanh(self.to_image(F.relu(self.bn(h))))
        return (image, attention) if return_attention else image


class Discriminator(nn.Module):
    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: int = 10, *, ch: int = 32,
                 attention_res: int | None = None, attention: str = "sagan", ops: str = "fused"):
        super().__init__()
        _check_architecture(image_size, ch, attention_res)
        widths = [ch * m for m in D_CHANNELS[image_size]]
        self.num_classes = num_classes
        self.attention_res = attention_res or default_attention_resolution(image_size)
        ins = [channels] + widths[:-1]
        self.blocks = nn.ModuleList(DBlock(a, b, downsample=i < len(widths) - 1, first=i == 0)
                                    for i, (a, b) in enumerate(zip(ins, widths)))
        self.attention_after = (image_size // self.attention_res).bit_length() - 2  # block i outputs size / 2^(i+1)
        self.attention = _attention(widths[self.attention_after], attention, ops)
        self.linear = nn.Linear(widths[-1], 1)
        if num_classes:
            self.embed = nn.Embedding(num_classes, widths[-1])  # the projection: <embed(y), features>
        _init_weights(self)

    def forward(self, x: Tensor, y: Tensor | None = None, return_attention: bool = False):
        h, attention = x, None
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attention_after:
                h, attention = _attend(self.attention, h, return_attention)
        features = F.relu(h).sum(dim=(2, 3))
        logits = self.linear(features).squeeze(1)
        if self.num_classes:
            logits = logits + (self.embed(y) * features).sum(1)
        return (logits, attention) if return_attention else logits


def _check_architecture(image_size: int, ch: int, attention_res: int | None) -> None:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image size must be one of {IMAGE_SIZES}, got {image_size}")
    if ch <= 0 or ch % 8:
        raise ValueError(f"the base width ch must be a positive multiple of 8 (attention uses C/8 channels), got {ch}")
    if attention_res is not None and attention_res not in attention_resolutions(image_size):
        raise ValueError(f"attention resolution for {image_size}-pixel images must be one of "
                         f"{attention_resolutions(image_size)}, got {attention_res}")


def has_conv_bias(g_state: dict) -> bool:
    """Whether a G state dict is of the earlier G whose block convs had biases (Generator's conv_bias)."""
    return any(k.startswith("blocks.") and k.endswith((".conv1.bias", ".conv2.bias", ".shortcut.bias"))
               for k in g_state)


def _init_weights(model: nn.Module) -> None:
    """Orthogonal init of every conv and linear layer (as BigGAN), zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def spectral_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every conv, linear and projection-embedding layer; conditional-BN embeddings excluded."""
    cbn_embeddings = {id(e) for m in model.modules() if isinstance(m, ConditionalBatchNorm2d)
                      for e in m.children() if isinstance(e, nn.Embedding)}
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)) and id(m) not in cbn_embeddings]


def spectral_norm_every_layer(model: nn.Module, ops: str = "fused") -> nn.Module:
    """Spectral norm on every layer of spectral_norm_layers(model), sagan_ext's (ops="fused") or
    torch's (ops="eager"), in place."""
    add = fused_spectral_norm if ops == "fused" else nn.utils.spectral_norm
    for layer in spectral_norm_layers(model):
        add(layer)
    return model


def apply_spectral_norm(model: nn.Module, ops: str = "fused") -> nn.Module:
    """Deprecated name of spectral_norm_every_layer (sagan_ext.spectral_norm normalises one layer)."""
    warnings.warn("sagan_ext.models.apply_spectral_norm is deprecated: use spectral_norm_every_layer",
                  DeprecationWarning, stacklevel=2)
    return spectral_norm_every_layer(model, ops)


def build_models(image_size: int, channels: int, num_classes: int, *, ch: int = 32, z_dim: int = 128,
                 attention_res: int | None = None, attention: str = "sagan", ops: str = "fused",
                 d_ch: int | None = None, g_conv_bias: bool = False) -> tuple[Generator, Discriminator]:
    """G and D, spectrally normalised throughout, on the fused operators or eager PyTorch.
    g_conv_bias: G's block convs with biases, for checkpoints of the earlier G (Generator's conv_bias)."""
    if ops not in ("fused", "eager"):
        raise ValueError(f"ops must be 'fused' or 'eager', got {ops!r}")
    if attention not in ("sagan", "biggan"):
        raise ValueError(f"attention must be 'sagan' or 'biggan', got {attention!r}")
    g = Generator(image_size, channels, num_classes, ch=ch, z_dim=z_dim, attention_res=attention_res,
                  attention=attention, ops=ops, conv_bias=g_conv_bias)
    d = Discriminator(image_size, channels, num_classes, ch=d_ch or ch, attention_res=attention_res,
                      attention=attention, ops=ops)
    return spectral_norm_every_layer(g, ops), spectral_norm_every_layer(d, ops)


def layer_sigmas(model: nn.Module) -> dict[str, Tensor]:
    """{layer: sigma = u^T W v} from each spectral-norm layer's buffers (either implementation)."""
    sigmas = {}
    for name, m in model.named_modules():
        u, v, w = getattr(m, "weight_u", None), getattr(m, "weight_v", None), getattr(m, "weight_orig", None)
        if u is None or v is None or w is None:
            continue
        dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0
        w = w.detach().movedim(dim, 0).flatten(1)
        sigmas[name] = torch.dot(u, w.to(u.dtype) @ v)
    return sigmas
