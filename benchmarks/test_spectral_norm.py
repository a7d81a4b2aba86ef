"""Spectral norm of every SN layer of a SAGAN-sized G and D, one training forward+backward:
sagan_ext.spectral_norm vs torch.nn.utils.spectral_norm."""
import pytest
import torch
from torch import nn

import sagan_ext


def sagan_layers(ch=64):
    """The conv/linear shapes of a 64x64 SAGAN G and D (channel widths as in the paper's code)."""
    layers = [nn.Linear(128, 4 * 4 * ch * 8)]
    for cin, cout in ((8, 4), (4, 2), (2, 1)):  # G blocks
        layers += [nn.Conv2d(ch * cin, ch * cout, 3, padding=1), nn.Conv2d(ch * cout, ch * cout, 3, padding=1),
                   nn.Conv2d(ch * cin, ch * cout, 1)]
    for cin, cout in ((1, 2), (2, 4), (4, 8), (8, 16)):  # D blocks
        layers += [nn.Conv2d(ch * cin, ch * cout, 3, padding=1), nn.Conv2d(ch * cout, ch * cout, 3, padding=1),
                   nn.Conv2d(ch * cin, ch * cout, 1)]
    layers += [nn.Linear(ch * 16, 1), nn.Conv2d(ch, 3, 3, padding=1)]
    return layers


@pytest.mark.parametrize("impl", ["torch", "sagan_ext"])
def test_all_layers_forward_backward(benchmark, impl):
    torch.manual_seed(0)
    apply = torch.nn.utils.spectral_norm if impl == "torch" else sagan_ext.spectral_norm
    layers = [apply(m) for m in sagan_layers()]
    hooks = [next(iter(m._forward_pre_hooks.values())) for m in layers]

    def step():  # what the modules' forward pre-hooks do each step, then the weights' backward
        weights = []
        for m, hook in zip(layers, hooks):
            hook(m, ())
            weights.append(m.weight)
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    n_bytes = sum(m.weight_orig.numel() * 4 for m in layers)
    benchmark.extra_info.update(layers=len(layers), weight_bytes=n_bytes,
                                # floor: forward reads W twice and writes W/sigma, backward reads 2, writes 1
                                min_bytes_moved=n_bytes * 6)
