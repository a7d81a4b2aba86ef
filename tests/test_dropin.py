"""sagan_ext.fuse(model) inside the models of heykeetae/Self-Attention-GAN, BigGAN-PyTorch (BigGAN and
BigGAN-deep) and PyTorch-StudioGAN (stand-ins in third_party_models.py): one call per model, after
which the model trains as the original to float64 rounding with optimizers and EMA built before
the call, keeps its classes, call conventions and checkpoints, and evaluates as before."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sagan_ext

from sagan_ext_testing import CPU_BACKENDS
from sagan_modules import BigGANAttention, BigGANSNConv2d, HeykeetaeSelfAttn, StudioGANSelfAttention
from third_party_models import (BigGANGenerator, biggan_models, biggan_step, heykeetae_models, heykeetae_step,
                                studiogan_models, studiogan_step)

ATTENTION = (HeykeetaeSelfAttn, BigGANAttention, StudioGANSelfAttention)
HEYKEETAE = "attention (heykeetae/Self-Attention-GAN Self_Attn)"
BIGGAN = "attention (BigGAN-PyTorch Attention)"
STUDIOGAN = "attention (PyTorch-StudioGAN SelfAttention)"


def set_gains(*models):
    """Every attention gain non-zero (0 at init in all three repos, which would zero the gradients of
    the blocks' convs), the same in each model."""
    for model in models:
        blocks = [m for m in model.modules() if isinstance(m, ATTENTION)]
        with torch.no_grad():
            for i, block in enumerate(blocks):
                getattr(block, "sigma", getattr(block, "gamma", None)).fill_(0.6 - 0.3 * i)


def attention_parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if any(k in n for k in ("attn", "theta", "phi", ".g.", ".o.", "gamma", "conv1x1", "sigma"))}


def assert_same_records(ours, theirs):
    assert ours.keys() == theirs.keys()
    for phase in theirs:
        assert ours[phase].keys() == theirs[phase].keys()
        for name, expected in theirs[phase].items():
            if expected is None:
                assert ours[phase][name] is None, f"{phase}: {name}"
            else:
                torch.testing.assert_close(ours[phase][name], expected, rtol=1e-9, atol=1e-12, msg=f"{phase}: d{name}")


def assert_same_state(ours, theirs):
    # atol 1e-7, against steps of ~lr = 1e-3..2e-2: a conv bias before batch norm has a true gradient
    # of 0, so its float64 gradient is rounding noise (up to ~1e-14, unequal in the two models) that
    # Adam turns into a step of lr * |g| / (|g| + eps), up to ~1e-8 with eps = 1e-8
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert list(ours) == list(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-7, msg=name)


def assert_moved(model, before):
    """Every parameter the step can train moved. A key bias cannot: it adds one constant to every
    score of a row, which softmax ignores, so its gradient is exactly zero (sagan_ext returns 0;
    autograd on the original sums rounding noise of ~1e-17) and Adam leaves it where it was."""
    for name, value in before.items():
        if name.endswith("key_conv.bias"):
            continue
        assert not torch.equal(dict(model.named_parameters())[name], value), f"{name} did not train"


def fuse_and_check_identity(model, backend, expected):
    """fuse(model) keeps every Parameter object (in order) and the state-dict keys."""
    params, keys = list(model.parameters()), list(model.state_dict())
    changed = sagan_ext.fuse(model, backend=backend)
    assert {n: w for n, w in changed.items() if w.startswith("attention")} == expected
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert list(model.state_dict()) == keys
    for name in expected:
        assert isinstance(model.get_submodule(name), ATTENTION)
    return changed


def assert_round_trips(fused, plain, make_plain, forward):
    """Checkpoints load strictly both ways between fused and unfused models, and run the same."""
    unfused = make_plain()
    unfused.load_state_dict(fused.state_dict())
    refused = make_plain()
    sagan_ext.fuse(refused)
    refused.load_state_dict(plain.state_dict())
    for model in (fused, plain, unfused, refused):
        model.eval()
    expected = forward(plain)
    for model in (fused, unfused, refused):
        got = forward(model)
        for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, expected))):
            if b is not None and a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def double(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# heykeetae/Self-Attention-GAN


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("adv_loss", ["hinge", "wgan-gp"])
def test_heykeetae_training_step_equals_theirs(backend, adv_loss):
    # their models unpack `out, p1 = self.attn1(out)` at batch 3: a plain tensor would not unpack
    theirs, ours = heykeetae_models(0), heykeetae_models(0)  # optimizers built before fuse
    set_gains(theirs.G, theirs.D, ours.G, ours.D)
    before = attention_parameters(ours.G) | {"D." + n: p for n, p in attention_parameters(ours.D).items()}
    fuse_and_check_identity(ours.G, backend, {"attn1": HEYKEETAE, "attn2": HEYKEETAE})
    fuse_and_check_identity(ours.D, backend, {"attn1": HEYKEETAE, "attn2": HEYKEETAE})
    gen = torch.Generator().manual_seed(1)
    real = torch.tanh(double(3, 3, 64, 64, generator=gen))
    z, alpha = [double(3, 16, generator=gen) for _ in range(2)], torch.rand(3, 1, 1, 1, generator=gen).double()
    assert_same_records(heykeetae_step(ours, real, z, alpha, adv_loss),
                        heykeetae_step(theirs, real, z, alpha, adv_loss))
    assert_same_state(ours.G, theirs.G), assert_same_state(ours.D, theirs.D)
    assert_moved(ours.G, {n: p for n, p in before.items() if not n.startswith("D.")})
    assert_moved(ours.D, {n[2:]: p for n, p in before.items() if n.startswith("D.")})


def test_heykeetae_checkpoints_and_attention_maps_only_when_asked():
    theirs, ours = heykeetae_models(0), heykeetae_models(0)
    set_gains(theirs.G, ours.G)
    sagan_ext.fuse(ours.G)
    z = torch.randn(3, 16, dtype=torch.float64)
    image, p1, p2 = ours.G(z)  # the (B, N, N) maps are not computed unless asked for
    assert p1 is None and p2 is None
    expected = theirs.G(z)
    torch.testing.assert_close(image, expected[0], rtol=1e-9, atol=1e-12)
    for block in (ours.G.attn1, ours.G.attn2):
        block.return_attention = True
    got = ours.G(z)
    assert got[1].shape == (3, 16 * 16, 16 * 16) and got[2].shape == (3, 32 * 32, 32 * 32)
    for a, b in zip(got, theirs.G(z)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert not got[1].requires_grad  # for visualisation: the map keeps no N x N graph alive
    asked = heykeetae_models(0).G
    sagan_ext.fuse(asked, attention_maps=True)
    assert asked.attn1.return_attention and asked.attn2.return_attention
    assert_round_trips(ours.G, theirs.G, lambda: heykeetae_models(3).G, lambda G: G(z))


# ----------------------------------------------------------------------------------------------
# BigGAN-PyTorch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("deep", [False, True], ids=["BigGAN", "BigGAN-deep"])
def test_biggan_training_step_equals_theirs(backend, deep):
    theirs, ours = biggan_models(0, deep), biggan_models(0, deep)  # G.optim, D.optim and the EMA built before fuse
    set_gains(theirs.G, theirs.D, ours.G, ours.D)
    before_g, before_d = attention_parameters(ours.G), attention_parameters(ours.D)
    fuse_and_check_identity(ours.G, backend, {"blocks.1.1": BIGGAN})  # G calls it as block(h, y)
    fuse_and_check_identity(ours.D, backend, {"blocks.1.1": BIGGAN})
    gen = torch.Generator().manual_seed(1)
    x, y = torch.tanh(double(3, 3, 16, 16, generator=gen)), torch.randint(0, 5, (3,), generator=gen)
    z = [double(3, 12, generator=gen) for _ in range(2)]
    gy = [torch.randint(0, 5, (3,), generator=gen) for _ in range(2)]
    assert_same_records(biggan_step(ours, x, y, z, gy), biggan_step(theirs, x, y, z, gy))
    for a, b in ((ours.G, theirs.G), (ours.D, theirs.D), (ours.G_ema, theirs.G_ema)):
        assert_same_state(a, b)  # u0, sv0 too; G_ema: the EMA's state-dict tensors are still the model's
    assert_moved(ours.G, before_g), assert_moved(ours.D, before_d)
    assert not torch.equal(ours.G_ema.blocks[1][1].gamma, before_g["blocks.1.1.gamma"])


def test_biggan_checkpoints_and_eval_power_iteration():
    theirs, ours = biggan_models(0, False), biggan_models(0, False)
    set_gains(theirs.G, ours.G)
    sagan_ext.fuse(ours.G)
    z, y = torch.randn(2, 12, dtype=torch.float64), torch.randint(0, 5, (2,))
    ours.G(z, ours.G.shared(y)), theirs.G(z, theirs.G.shared(y))  # a training forward: u0 advances in both
    u0 = ours.G.blocks[1][1].theta.u0.clone()
    ours.G.eval(), theirs.G.eval()
    for _ in range(2):  # BigGAN's eval: one more power iteration from u0 each forward, nothing saved
        torch.testing.assert_close(ours.G(z, ours.G.shared(y)), theirs.G(z, theirs.G.shared(y)), rtol=1e-9, atol=1e-12)
    assert torch.equal(ours.G.blocks[1][1].theta.u0, u0)
    assert_round_trips(ours.G, theirs.G, lambda: BigGANGenerator().double(), lambda G: G(z, G.shared(y)))


# ----------------------------------------------------------------------------------------------
# PyTorch-StudioGAN


def torch_spectral_norms(model):
    return sum(type(h) is torch.nn.utils.spectral_norm.__globals__["SpectralNorm"]
               for m in model.modules() for h in m._forward_pre_hooks.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("apply_sn", [True, False], ids=["snconv2d", "conv2d"])
def test_studiogan_training_step_equals_theirs(backend, apply_sn):
    theirs, ours = studiogan_models(0, apply_sn), studiogan_models(0, apply_sn)  # optimizers and Gen_ema before fuse
    set_gains(theirs.Gen, theirs.Dis, theirs.Gen_ema, ours.Gen, ours.Dis, ours.Gen_ema)
    before_g, before_d = attention_parameters(ours.Gen), attention_parameters(ours.Dis)
    sn_layers = torch_spectral_norms(ours.Gen)
    # G dispatches on isinstance(block, SelfAttention); torch's SN hooks (eps 1e-6) become sagan_ext's
    changed = fuse_and_check_identity(ours.Gen, backend, {"blocks.1.0": STUDIOGAN})
    assert sum("spectral_norm(weight)" in w for w in changed.values()) == sn_layers and (sn_layers > 0) == apply_sn
    assert torch_spectral_norms(ours.Gen) == 0
    fuse_and_check_identity(ours.Dis, backend, {"blocks.2.0": STUDIOGAN})
    # Gen_ema is left unfused: its Ema zips Gen's and Gen_ema's buffers, which line up only if fuse adds none
    gen = torch.Generator().manual_seed(1)
    real, labels = torch.tanh(double(3, 3, 16, 16, generator=gen)), torch.randint(0, 5, (3,), generator=gen)
    zs, fake_labels = [double(3, 12, generator=gen) for _ in range(2)], [torch.randint(0, 5, (3,), generator=gen)
                                                                          for _ in range(2)]
    assert_same_records(studiogan_step(ours, real, labels, zs, fake_labels),
                        studiogan_step(theirs, real, labels, zs, fake_labels))
    for a, b in ((ours.Gen, theirs.Gen), (ours.Dis, theirs.Dis), (ours.Gen_ema, theirs.Gen_ema)):
        assert_same_state(a, b)
    assert_moved(ours.Gen, before_g), assert_moved(ours.Dis, before_d)


def test_studiogan_checkpoints_eval_and_copies():
    theirs, ours = studiogan_models(0, True), studiogan_models(0, True)
    set_gains(theirs.Gen, ours.Gen)
    sagan_ext.fuse(ours.Gen)
    # a copy made after fuse, as StudioGAN makes Gen_ema (before any forward: torch's SN leaves a
    # non-leaf `weight` behind that deepcopy refuses, fused or not), is fused and has its own weights
    ema = copy.deepcopy(ours.Gen)
    assert type(ema.blocks[1][0]) is type(ours.Gen.blocks[1][0])
    z, label = torch.randn(2, 12, dtype=torch.float64), torch.randint(0, 5, (2,))
    with torch.no_grad():
        ema.blocks[1][0].sigma.fill_(-1.0)
    out, _ = ours.Gen(z, label), theirs.Gen(z, label)  # a training forward: u, v advance in both
    assert not torch.allclose(ema(z, label), out)
    assert sagan_ext.spectral_norm_sigmas(ours.Gen) == {}  # fuse's hooks keep no sigma buffer
    assert_round_trips(ours.Gen, theirs.Gen, lambda: studiogan_models(3, True).Gen, lambda G: G(z, label))


# ----------------------------------------------------------------------------------------------
# fuse itself


class PrePermuteFixSelfAttn(HeykeetaeSelfAttn):
    """heykeetae's Self_Attn before its 2018-06-15 fix: attention.permute(0, 1, 2), i.e. A not A^T."""

    def forward(self, x):
        b, c, h, w = x.shape
        attention = self.softmax(torch.bmm(self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1),
                                           self.key_conv(x).view(b, -1, h * w)))
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attention.permute(0, 1, 2)).view(b, c, h, w)
        return self.gamma * out + x, attention


class ConditionalAttention(BigGANAttention):
    def forward(self, x, y):  # y required: not BigGAN's convention
        return super().forward(x) * y.view(-1, 1, 1, 1)


def _hooked():
    block = BigGANAttention(16)
    block.theta.register_forward_hook(lambda *args: None)
    return block


@pytest.mark.parametrize("make, reason", [
    (lambda: PrePermuteFixSelfAttn(16), "its forward computes something else than the SAGAN block"),
    (lambda: ConditionalAttention(16), r"its forward\(self, x, y\) is neither forward\(x\) nor forward\(x, y=None\)"),
    (_hooked, "theta has hooks other than spectral norm"),
    (lambda: BigGANAttention(16, lambda *a, **k: nn.Conv2d(*a, **{**k, "bias": True})), "o has a bias"),
])
def test_blocks_fuse_cannot_verify_are_left_unchanged_with_a_warning(make, reason):
    model = nn.Sequential(make())
    cls, state = type(model[0]), copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"sagan_ext.fuse: 0 has the layout of .* left unchanged: " + reason):
        assert sagan_ext.fuse(model) == {}
    assert type(model[0]) is cls
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])


def test_fuse_after_training_forwards():
    # torch's spectral norm leaves a non-leaf `weight` on each conv after a forward, which deepcopy
    # (fuse's probe copies the block) refuses
    Gen = studiogan_models(0, True).Gen
    Gen(torch.randn(2, 12, dtype=torch.float64), torch.randint(0, 5, (2,)))
    assert sagan_ext.fuse(Gen)["blocks.1.0"] == STUDIOGAN


def test_fuse_is_idempotent_and_leaves_the_global_rng_alone():
    G = biggan_models(0, False).G
    rng = torch.random.get_rng_state()
    assert sagan_ext.fuse(G) == {"blocks.1.1": BIGGAN}
    assert sagan_ext.fuse(G) == {}
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_fused_models_pickle():
    model = nn.Sequential(BigGANAttention(16, BigGANSNConv2d), HeykeetaeSelfAttn(16)).double()
    set_gains(model)
    sagan_ext.fuse(model, attention_maps=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded[0]) is type(model[0]) and loaded[1].return_attention
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    model.eval(), loaded.eval()
    for a, b in zip(loaded(x), model(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert type(pickle.loads(pickle.dumps(model[0]))) is type(model[0])


def test_fuse_argument_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        sagan_ext.fuse({})
    with pytest.raises(ValueError, match="backend must be one of"):
        sagan_ext.fuse(nn.Sequential(), backend="tpu")
