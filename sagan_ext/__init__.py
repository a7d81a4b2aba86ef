"""sagan_ext: fused SAGAN self-attention and spectral norm for PyTorch, with CPU (C++), CUDA,
Triton and plain-PyTorch reference backends behind one API."""
import importlib

# ops registers the sagan_ext:: operators; biggan_checkpoints: BigGAN-PyTorch's checkpoint format
from . import backends, biggan_checkpoints, dropin, ops
from .attention import EagerSelfAttention, FusedSelfAttention, self_attention
from .backends import available_backends
from .dropin import fuse
from .spectral_norm import (remove_spectral_norm, sigma, spectral_norm, spectral_norm_sigmas,
                            spectral_normalize)

__version__ = "0.1.0"

__all__ = [
    "fuse", "FusedSelfAttention", "EagerSelfAttention", "self_attention", "spectral_norm", "remove_spectral_norm",
    "spectral_normalize", "sigma", "spectral_norm_sigmas", "available_backends", "__version__",
]


def __getattr__(name: str):
    if name == "biggan":  # the deprecated module, imported (and warning) only when asked for
        return importlib.import_module(".biggan", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
