"""Spectral norm of every SN layer of the trainer's SAGAN-128 G and D, one training forward+backward:
sagan_ext.spectral_norm vs torch.nn.utils.spectral_norm, fp32 weights (as under AMP), on the GPU
when there is one."""
import pytest
import torch

import blocks
import sagan_ext
from sagan_ext import models


def sagan_layers(ch=64):
    """Every spectrally normalised layer of the trainer's 128 x 128 G and D (base width `ch`)."""
    g, d = models.Generator(128, 3, 1000, ch=ch), models.Discriminator(128, 3, 1000, ch=ch)
    return models.spectral_norm_layers(g) + models.spectral_norm_layers(d)


@pytest.mark.parametrize("impl", ["torch", "sagan_ext"])
def test_all_layers_forward_backward(benchmark, impl):
    blocks.skip_past_deadline(20)
    torch.manual_seed(0)
    apply = torch.nn.utils.spectral_norm if impl == "torch" else sagan_ext.spectral_norm
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = [apply(m).to(device) for m in sagan_layers()]
    hooks = [next(iter(m._forward_pre_hooks.values())) for m in layers]

    def step():  # what the modules' forward pre-hooks do each step, then the weights' backward
        weights = []
        for m, hook in zip(layers, hooks):
            hook(m, ())
            weights.append(m.weight)
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    n_bytes = sum(m.weight_orig.numel() * 4 for m in layers)
    benchmark.extra_info.update(layers=len(layers), weight_bytes=n_bytes, device=device,
                                # floor: forward reads W twice and writes W/sigma, backward reads 2, writes 1
                                min_bytes_moved=n_bytes * 6)
