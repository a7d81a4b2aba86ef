"""sagan_ext.spectral_norm against torch.nn.utils.spectral_norm given the same u and v."""
import copy

import pytest
import torch
from torch import nn

import sagan_ext
from sagan_ext import ops, reference

from sagan_ext_testing import CPU_BACKENDS

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(6, 10, 3), lambda: torch.randn(2, 6, 7, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(6, 4, 4, stride=2), lambda: torch.randn(2, 6, 3, 3)),
    "linear": (lambda: nn.Linear(13, 7), lambda: torch.randn(5, 13)),
    "embedding": (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (9,))),
}


def _pair(kind, backend, n_power_iterations=1):
    make, make_input = LAYERS[kind]
    base = make().double()
    theirs = torch.nn.utils.spectral_norm(copy.deepcopy(base), n_power_iterations=n_power_iterations)
    ours = sagan_ext.spectral_norm(copy.deepcopy(base), n_power_iterations=n_power_iterations, backend=backend)
    ours.load_state_dict(theirs.state_dict())  # same weight_orig, u and v
    x = make_input()
    return theirs, ours, (x.double() if x.is_floating_point() else x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("n_power_iterations", [1, 3])
def test_training_steps_match_torch(backend, kind, n_power_iterations):
    theirs, ours, x = _pair(kind, backend, n_power_iterations)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(4):
        y_t, y_o = theirs(x), ours(x)
        torch.testing.assert_close(y_o, y_t, rtol=1e-10, atol=1e-12, msg=f"step {step}: output")
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-10, atol=1e-12)
        for buf in ("weight_u", "weight_v"):
            torch.testing.assert_close(getattr(ours, buf), getattr(theirs, buf), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sagan_ext.sigma(ours), torch.dot(theirs.weight_u, reference.weight_matrix(
            theirs.weight_orig, 1 if kind == "conv_transpose2d" else 0) @ theirs.weight_v).detach(), rtol=1e-10, atol=0)
        g = torch.randn_like(y_t)
        opt_t.zero_grad(), opt_o.zero_grad()
        y_t.backward(g), y_o.backward(g)
        torch.testing.assert_close(ours.weight_orig.grad, theirs.weight_orig.grad, rtol=1e-9, atol=1e-12)
        opt_t.step(), opt_o.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eval_mode_keeps_u_v_and_matches_torch(backend):
    theirs, ours, x = _pair("conv2d", backend)
    theirs(x), ours(x)  # one training step first
    theirs.eval(), ours.eval()
    u = ours.weight_u.clone()
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-12)
    assert torch.equal(ours.weight_u, u)


@pytest.mark.parametrize("kind", LAYERS)
def test_state_dicts_load_both_ways(kind):
    theirs, ours, x = _pair(kind, "auto")
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight_orig", "weight_u", "weight_v"} | (
        {"bias"} if getattr(theirs, "bias", None) is not None else set())
    theirs(x)  # advance theirs, then load it into a fresh one of ours, and ours back into torch's
    fresh = sagan_ext.spectral_norm(LAYERS[kind][0]().double())
    fresh.load_state_dict(theirs.state_dict())
    fresh.eval(), theirs.eval()
    torch.testing.assert_close(fresh(x), theirs(x), rtol=1e-10, atol=1e-12)
    back = torch.nn.utils.spectral_norm(LAYERS[kind][0]().double()).eval()
    back.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(back(x), fresh(x), rtol=1e-10, atol=1e-12)


def test_remove_spectral_norm_both_ways():
    ours = sagan_ext.spectral_norm(nn.Linear(5, 4))
    ours(torch.randn(2, 5))
    expected = ours.weight.detach().clone()
    sagan_ext.remove_spectral_norm(ours)
    assert set(ours.state_dict()) == {"weight", "bias"} and torch.equal(ours.weight.detach(), expected)
    again = sagan_ext.spectral_norm(nn.Linear(5, 4))
    torch.nn.utils.remove_spectral_norm(again)  # torch's remover recognises our hook
    assert isinstance(again.weight, nn.Parameter)
    with pytest.raises(RuntimeError, match="two spectral_norm hooks"):
        sagan_ext.spectral_norm(sagan_ext.spectral_norm(nn.Linear(3, 3)))


def test_sigma_converges_to_the_largest_singular_value():
    # A known spectrum with a gap (2 vs <= 1), so 50 iterations converge to ~1e-15.
    u_, _, vh = torch.linalg.svd(torch.randn(30, 40, dtype=torch.float64), full_matrices=False)
    spectrum = torch.cat([torch.tensor([2.0]), torch.rand(29) * 0.9 + 0.1]).double()
    layer = nn.Linear(40, 30).double()
    with torch.no_grad():
        layer.weight.copy_(u_ @ torch.diag(spectrum) @ vh)
    layer = sagan_ext.spectral_norm(layer, n_power_iterations=50)
    layer(torch.randn(1, 40, dtype=torch.float64))
    expected = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(sagan_ext.sigma(layer), expected, rtol=1e-6, atol=0)
    assert sagan_ext.spectral_norm_sigmas(nn.Sequential(layer)) == {"0.weight": pytest.approx(expected.item())}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck_weight_and_sigma(backend, dim):
    w = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h = w.shape[dim]
    u = torch.nn.functional.normalize(torch.randn(h, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(w.numel() // h, dtype=torch.float64), dim=0)

    def f(weight):  # eval mode: u, v fixed, so the function is deterministic
        w_sn, sigma = sagan_ext.spectral_normalize(weight, u, v, dim=dim, training=False, backend=backend)
        return w_sn, sigma

    assert torch.autograd.gradcheck(f, (w,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_and_bfloat16(backend):
    w = torch.randn(32, 64)
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    v = torch.nn.functional.normalize(torch.randn(64), dim=0)
    exact = reference.spectral_norm(w.double(), u.double(), v.double(), 0, 1, 1e-12, True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        u_, v_ = u.clone().to(dtype), v.clone().to(dtype)
        w_sn, sigma = sagan_ext.spectral_normalize(w.to(dtype), u_, v_, backend=backend)
        assert w_sn.dtype == dtype
        assert ((w_sn.double() - exact[0]).norm() / exact[0].norm()) < tol
        assert abs(sigma.double() - exact[1]) / exact[1] < tol


def test_bad_arguments():
    w, u, v = torch.randn(4, 6), torch.randn(4), torch.randn(6)
    with pytest.raises(ValueError, match="u must have shape"):
        sagan_ext.spectral_normalize(w, torch.randn(5), v)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        sagan_ext.spectral_normalize(w.long(), u, v)
    with pytest.raises(TypeError, match="v has dtype"):
        sagan_ext.spectral_normalize(w, u, v.double())
    with pytest.raises(ValueError, match="dim must be in"):
        sagan_ext.spectral_normalize(w, u, v, dim=2)
    with pytest.raises(ValueError, match="non-empty"):
        sagan_ext.spectral_normalize(torch.randn(0, 3), torch.randn(0), torch.randn(3))
    with pytest.raises(ValueError, match="n_power_iterations"):
        sagan_ext.spectral_norm(nn.Linear(3, 3), n_power_iterations=0)
    with pytest.raises(ValueError, match="no parameter named"):
        sagan_ext.spectral_norm(nn.Linear(3, 3), name="scale")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    w = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(6, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    torch.library.opcheck(ops.spectral_norm, (w, u, v, 0, 1, 1e-12, True, backend))
    u1, v1 = torch.randn(3, dtype=torch.float64), torch.randn(24, dtype=torch.float64)  # dim=1: 3 x 24
    torch.library.opcheck(ops.spectral_norm, (w, u1, v1, 1, 2, 1e-12, False, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward(backend):
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(6, dtype=torch.float64), dim=0)
    f = lambda weight: sagan_ext.spectral_normalize(weight, u, v, training=False, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (w,))
