"""BigGAN-PyTorch checkpoints (SNConv2d's weight / u0 / sv0) load into FusedSelfAttention and whole
models, train exactly as BigGAN does, differ in eval only as documented, and convert back."""
import copy

import pytest
import torch
from torch import nn

import sagan_ext
from sagan_ext import biggan_checkpoints
from sagan_ext.dropin import replace_biggan_attention

from sagan_ext_testing import CPU_BACKENDS
from sagan_modules import BigGANAttention, BigGANSNConv2d
from third_party_models import biggan_models

CONVS = ("theta", "phi", "g", "o")


def trained_biggan_attention(ch=16, steps=2):
    """Their block after a few training forwards (u0, sv0 advanced) and an optimiser-like update."""
    theirs = BigGANAttention(ch, which_conv=BigGANSNConv2d).double()
    with torch.no_grad():
        theirs.gamma.fill_(0.6)
    for _ in range(steps):
        theirs(torch.randn(2, ch, 4, 4, dtype=torch.float64))
    with torch.no_grad():
        for name in CONVS:
            getattr(theirs, name).weight.mul_(1.05).add_(0.01)
    return theirs


def assert_same_step(ours, theirs, x, grad=True):
    """One forward of each: same output, same gradient for x and every weight, same saved u."""
    x = x.clone().requires_grad_()
    out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if grad:
        g = torch.randn_like(out)
        ours_params = [x, ours.gamma] + [getattr(ours, n).weight_orig for n in CONVS]
        their_params = [x, theirs.gamma] + [getattr(theirs, n).weight for n in CONVS]
        for a, b in zip(torch.autograd.grad(out, ours_params, g), torch.autograd.grad(expected, their_params, g)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for name in CONVS:
        torch.testing.assert_close(getattr(ours, name).weight_u, getattr(theirs, name).u0[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_biggan_checkpoint_trains_exactly_as_biggan(backend):
    theirs = trained_biggan_attention()
    ours = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True, backend=backend).double()
    ours.load_state_dict(theirs.state_dict())  # strict: every key accounted for
    for name in CONVS:  # the sigma BigGAN last logged, until our first forward
        assert sagan_ext.sigma(getattr(ours, name)).item() == getattr(theirs, name).sv0.item()
    for _ in range(3):  # power iteration advances u identically
        assert_same_step(ours, theirs, torch.randn(2, 16, 6, 4, dtype=torch.float64))


def test_eval_uses_the_stored_pair_or_biggan_extra_iteration():
    theirs = trained_biggan_attention()
    theirs(torch.randn(1, 16, 4, 4, dtype=torch.float64))  # a last training forward on the current weights
    x = torch.randn(2, 16, 4, 6, dtype=torch.float64)

    torch_like = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True).double()
    torch_like.load_state_dict(theirs.state_dict())
    torch_like.eval()
    # default (torch's eval): W / sigma with the stored u and the v that produced it, i.e. BigGAN's last sigma
    frozen = BigGANAttention(16).double()
    with torch.no_grad():
        frozen.gamma.copy_(theirs.gamma)
        for name in CONVS:
            getattr(frozen, name).weight.copy_(getattr(theirs, name).weight / getattr(theirs, name).sv0)
    torch.testing.assert_close(torch_like(x), frozen(x), rtol=1e-10, atol=1e-10)
    for name in CONVS:
        torch.testing.assert_close(sagan_ext.sigma(getattr(torch_like, name)).reshape(1), getattr(theirs, name).sv0,
                                   rtol=1e-10, atol=0)

    biggan_like = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True, power_iteration_in_eval=True).double()
    biggan_like.load_state_dict(theirs.state_dict())
    biggan_like.eval(), theirs.eval()
    stored = {n: getattr(biggan_like, n).weight_u.clone() for n in CONVS}
    for _ in range(2):  # BigGAN's eval: one more iteration each forward, nothing saved
        assert_same_step(biggan_like, theirs, x, grad=False)
    for name in CONVS:
        assert torch.equal(getattr(biggan_like, name).weight_u, stored[name])
    assert not torch.allclose(biggan_like(x), torch_like(x), rtol=1e-12, atol=1e-12)  # the difference is real


@pytest.mark.parametrize("strict", [True, False])
def test_biggan_checkpoint_into_the_variant_without_spectral_norm_is_an_error(strict):
    theirs = trained_biggan_attention()
    plain = sagan_ext.FusedSelfAttention(16, "biggan").double()
    with pytest.raises(ValueError, match=r"theta.u0 is BigGAN-PyTorch's spectral norm.*spectral_norm=True"):
        plain.load_state_dict(theirs.state_dict(), strict=strict)
    plain.load_state_dict(BigGANAttention(16).double().state_dict())  # their block without SN still loads


def test_further_singular_vectors_are_dropped_and_a_bad_u0_is_named():
    state = trained_biggan_attention().state_dict()
    state["theta.u1"], state["theta.sv1"] = torch.randn(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    ours = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True).double()
    ours.load_state_dict(state)  # num_svs > 1: W / sigma uses u0 only
    state["phi.u0"] = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"phi.u0 must have shape \(1, 2\) for phi.weight of shape \(2, 16, 1, 1\)"):
        ours.load_state_dict(state)


def test_round_trips():
    theirs = trained_biggan_attention()
    ours = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True).double()
    ours.load_state_dict(theirs.state_dict())
    ours(torch.randn(2, 16, 4, 4, dtype=torch.float64))  # u, v move on in our hands
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)

    saved = {k: v.clone() for k, v in ours.state_dict().items()}

    again = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True).double()  # ours -> ours: torch's layout
    again.load_state_dict(saved)
    torch.testing.assert_close(again(x), ours(x), rtol=0, atol=0)
    back = BigGANAttention(16, which_conv=BigGANSNConv2d).double()  # ours -> BigGAN
    back.load_state_dict(biggan_checkpoints.to_biggan_state_dict(saved))
    for name in CONVS:  # sv0: the sigma our stored pair gives
        sigma = saved[f"{name}.weight_u"] @ saved[f"{name}.weight_orig"].flatten(1) @ saved[f"{name}.weight_v"]
        torch.testing.assert_close(getattr(back, name).sv0, sigma.reshape(1), rtol=1e-12, atol=0)
    resumed = sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True).double()
    resumed.load_state_dict(saved)
    assert_same_step(resumed, back, x)  # BigGAN's next training step from our state is ours
    with pytest.raises(RuntimeError, match="Missing key"):  # BigGAN's code does not read torch's layout
        BigGANAttention(16, which_conv=BigGANSNConv2d).double().load_state_dict(ours.state_dict())


class TinyBigGANG(nn.Module):
    """A whole BigGAN-style model: SN convs around an Attention inside a block list."""

    def __init__(self, which_conv=BigGANSNConv2d, attention=None):
        super().__init__()
        attention = attention or BigGANAttention(16, BigGANSNConv2d)
        self.blocks = nn.ModuleList([nn.ModuleList([which_conv(3, 16, 1), attention]),
                                     nn.ModuleList([which_conv(16, 3, 1)])])

    def forward(self, x):
        for block in self.blocks:
            for layer in block:
                x = layer(x)
        return x


def test_whole_models_replace_attention_and_convert_state_dicts():
    theirs = TinyBigGANG().double()
    checkpoint = copy.deepcopy(theirs.state_dict())
    swapped = copy.deepcopy(theirs)
    assert replace_biggan_attention(swapped) == ["blocks.0.1"]
    assert isinstance(swapped.blocks[0][1], sagan_ext.FusedSelfAttention)
    swapped.load_state_dict(checkpoint)  # a whole BigGAN checkpoint still loads into the swapped model
    with torch.no_grad():
        theirs.blocks[0][1].gamma.fill_(0.5), swapped.blocks[0][1].gamma.fill_(0.5)
    for _ in range(2):
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(swapped(x), theirs(x), rtol=1e-10, atol=1e-10)

    # a model built on torch's / sagan_ext's spectral_norm loads the whole converted state dict
    def sn_conv(i, o, k):
        return sagan_ext.spectral_norm(nn.Conv2d(i, o, k))
    ported = TinyBigGANG(sn_conv, sagan_ext.FusedSelfAttention(16, "biggan", spectral_norm=True)).double()
    ported.load_state_dict(biggan_checkpoints.from_biggan_state_dict(theirs.state_dict()))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ported(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_replace_attention_takes_biggans_y_and_keeps_the_optimizer():
    # the older path to FusedSelfAttention modules (torch's SN layout): BigGAN's G calls block(h, y)
    theirs, ours = biggan_models(0, False), biggan_models(0, False)
    with torch.no_grad():
        theirs.G.blocks[1][1].gamma.fill_(0.6), ours.G.blocks[1][1].gamma.fill_(0.6)
    params = list(ours.G.parameters())
    assert replace_biggan_attention(ours.G) == ["blocks.1.1"]
    block = ours.G.blocks[1][1]
    assert isinstance(block, sagan_ext.FusedSelfAttention) and block.accepts_y
    # the same Parameter objects in the same order: G.optim, built in the constructor, trains the new block
    assert len(list(ours.G.parameters())) == len(params)
    assert all(a is b for a, b in zip(ours.G.parameters(), params))
    z, y = torch.randn(3, 12, dtype=torch.float64), torch.randint(0, 5, (3,))
    for t in (theirs, ours):
        t.G.optim.zero_grad()
        t.G(z, t.G.shared(y)).square().mean().backward()
        t.G.optim.step()
    for name in ("theta", "phi", "g", "o"):
        torch.testing.assert_close(getattr(block, name).weight_orig, getattr(theirs.G.blocks[1][1], name).weight,
                                   rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(block.gamma, theirs.G.blocks[1][1].gamma, rtol=1e-9, atol=1e-12)
    assert block.gamma.item() != 0.6
