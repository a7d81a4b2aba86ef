"""The Triton backend against the reference: forward and every gradient (fp32 to 1e-4 of float64,
fp16 like eager), both variants, N = 1, 63 (7 x 9), 256 and a ragged 300, C = 8 and 64, batch
1-2, large logits; its spectral norm against torch's. Without a GPU the kernels run under Triton's
interpreter (conftest sets TRITON_INTERPRET=1), with one pinned small block config so that every
shape has ragged tails."""
import pytest
import torch
from torch import nn

import sagan_ext
from sagan_ext import reference

from sagan_ext_testing import attention_grads, attention_inputs, reference_grads
from test_attention import _assert_grads, _assert_relative, check_low_precision

triton = pytest.importorskip("triton", reason="triton is not installed on this platform")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels interpreted

# (variant, (B, C, H, W))
CASES = [("sagan", (2, 8, 1, 1)), ("sagan", (2, 8, 7, 9)), ("sagan", (1, 64, 16, 16)), ("sagan", (1, 16, 15, 20)),
         ("biggan", (2, 64, 7, 9)), ("biggan", (1, 16, 16, 16))]


def test_triton_backend_is_available_here():
    assert sagan_ext.available_backends()["triton"] is None


@pytest.mark.parametrize("variant, shape", CASES, ids=[f"{v}-{'x'.join(map(str, s))}" for v, s in CASES])
def test_float32_forward_and_every_gradient(variant, shape):
    inputs = attention_inputs(variant, *shape, dtype=torch.float32, device=DEVICE)
    out, grads = attention_grads(inputs, "triton")
    ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    assert out.dtype == torch.float32 and grads.keys() == ref_grads.keys()
    _assert_relative(out, ref_out, 1e-4, "out")
    if shape[2:] == (1, 1):  # one key: softmax is 1 whatever q and k are, so their gradients are 0
        for name in ("wq", "bq", "wk", "bk"):
            _assert_relative(grads[name], ref_grads[name], 1e-4, f"d{name}", scale=ref_grads["x"].norm())
        grads = {k: v for k, v in grads.items() if k not in ("wq", "bq", "wk", "bk")}
    _assert_grads(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_float16_like_eager(variant):
    check_low_precision("triton", torch.float16, attention_inputs(variant, 2, 16, 9, 8, dtype=torch.float16, device=DEVICE))


def test_large_logits_stay_finite_and_exact():
    inputs = attention_inputs("sagan", 1, 16, 6, 6, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        inputs["wq"].mul_(60), inputs["wk"].mul_(60)  # scores of order 1e3: exp() overflows without the max
    out, grads = attention_grads(inputs, "triton")
    ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    q = reference.project(*(inputs[k].detach() for k in ("x", "wq", "bq", "wk", "bk", "wv", "bv")), False)
    assert torch.bmm(q[0], q[1].transpose(1, 2)).abs().max() > 500
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    _assert_relative(out, ref_out, 1e-4, "out")
    for name in ("x", "wv", "gamma"):
        _assert_relative(grads[name], ref_grads[name], 1e-3, f"d{name}")


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(24, 40, 3), lambda: nn.Linear(100, 33),
                                  lambda: nn.ConvTranspose2d(12, 6, 4)], ids=["conv", "linear", "conv_transpose"])
def test_spectral_norm_matches_torch(make):
    torch.manual_seed(0)
    base = make()
    theirs = torch.nn.utils.spectral_norm(make().to(DEVICE), n_power_iterations=2)
    ours = sagan_ext.spectral_norm(make().to(DEVICE), n_power_iterations=2, backend="triton")
    ours.load_state_dict(theirs.state_dict())
    shape = (24, 9, 9) if isinstance(base, nn.Conv2d) else (12, 5, 5) if isinstance(base, nn.ConvTranspose2d) else (100,)
    x = torch.randn(3, *shape, device=DEVICE)
    for step in range(3):
        y_t, y_o = theirs(x), ours(x)
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        for buf in ("weight_u", "weight_v"):
            torch.testing.assert_close(getattr(ours, buf), getattr(theirs, buf), rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y_t)
        theirs.zero_grad(), ours.zero_grad()
        y_t.backward(g), y_o.backward(g)
        torch.testing.assert_close(ours.weight_orig.grad, theirs.weight_orig.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for m in (theirs, ours):
                m.weight_orig.sub_(0.1 * m.weight_orig.grad)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_spectral_norm_gradient_of_sigma():
    w = torch.randn(20, 30, device=DEVICE, requires_grad=True)
    u = nn.functional.normalize(torch.randn(20, device=DEVICE), dim=0)
    v = nn.functional.normalize(torch.randn(30, device=DEVICE), dim=0)
    gs = torch.randn((), device=DEVICE)
    g = torch.randn(20, 30, device=DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        w_sn, sigma = sagan_ext.spectral_normalize(w, u.clone(), v.clone(), backend=backend)
        results[backend] = torch.autograd.grad((w_sn * g).sum() + gs * sigma, w)[0]
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: under the interpreter, fake-tensor tracing "
                    "would launch the interpreted kernels on meta tensors")
def test_opcheck_triton_ops():
    q, k, v = (torch.randn(2, 20, d, device="cuda") for d in (8, 8, 24))
    torch.library.opcheck(torch.ops.sagan_ext_triton.attention_forward, (q, k, v))
    lse = torch.ops.sagan_ext_triton.attention_forward(q, k, v)[1]
    o, do = torch.randn(2, 20, 24, device="cuda"), torch.randn(2, 20, 24, device="cuda")
    torch.library.opcheck(torch.ops.sagan_ext_triton.attention_backward, (do, q, k, v, o, lse))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "cropped", "one_row"])
def test_fused_residual_epilogue_writes_x_layout(layout):
    """The paper variant's residual x + gamma * o is written by the forward kernel's epilogue in
    x's own layout (NCHW, channels_last, a strided view, H = 1); x whose H and W do not merge (a
    cropped view) takes the unfused residual."""
    h = 1 if layout == "one_row" else 6
    inputs = attention_inputs("sagan", 2, 16, h, 10, dtype=torch.float32, device=DEVICE)
    x = inputs["x"].detach()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], 3)[..., ::2]
    elif layout == "cropped":
        x = torch.cat([x, x], 3)[..., :10]
    inputs["x"] = x.requires_grad_()
    out, grads = attention_grads(inputs, "triton")
    ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    _assert_relative(out, ref_out, 1e-4, "out")
    _assert_grads(grads, ref_grads, 1e-4)


def test_kernels_load_for_gpus_too():
    """Without the interpreter the kernels are wrapped in autotuners (what a GPU runs): building
    those must work here too, so that a bad autotune key cannot reach a GPU first."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sagan_ext.triton_kernels as t; print(type(t._forward_kernel).__name__, type(t._dq_kernel).__name__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["Autotuner", "Autotuner"]
