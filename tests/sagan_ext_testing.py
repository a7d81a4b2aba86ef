"""The tests' shared helpers, in one module that test files import by name (conftest holds
fixtures only, and no test file imports another): the backends under test, read from the
registry; random block inputs and their gradients through a backend or the reference; the
accuracy checks the CPU, Triton and GPU tests share; a small model for torch.compile; tiny
sagan-train runs."""
import csv
import shutil
import socket
from pathlib import Path

import torch
from torch import nn

import sagan_ext
from sagan_ext import reference
from sagan_ext.backends import BACKENDS

# Backends that run float64 on this machine's CPU, against which the CPU tests compare to 1e-10:
# reference and cpu. (Triton runs on the CPU only under its interpreter, which tests/test_triton.py
# covers, and takes no float64.)
CPU_BACKENDS = [name for name, backend in BACKENDS.items()
                if "cpu" in backend.devices and torch.float64 in backend.dtypes]
# The fused kernels of CUDA tensors (tests/test_gpu.py): cuda and triton.
GPU_BACKENDS = [name for name, backend in BACKENDS.items()
                if "cuda" in backend.devices and not backend.materializes_scores]


def attention_inputs(variant, b, c, h, w, dtype=torch.float64, qk_reduction=8, device="cpu"):
    """Fresh random leaf tensors (weights scaled like a 1x1 conv's init; gamma non-zero)."""
    dk = max(c // qk_reduction, 1)
    dv = c if variant == "sagan" else c // 2
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    inputs = dict(x=rand(b, c, h, w), wq=rand(dk, c, scale=c ** -0.5), wk=rand(dk, c, scale=c ** -0.5),
                  wv=rand(dv, c, scale=c ** -0.5))
    if variant == "sagan":
        inputs.update(bq=rand(dk, scale=0.1), bk=rand(dk, scale=0.1), bv=rand(dv, scale=0.1))
    else:
        inputs["wo"] = rand(c, dv, scale=dv ** -0.5)
    inputs["gamma"] = (torch.tensor([0.8], dtype=torch.float64).to(device, dtype)).requires_grad_()
    return inputs


def _call(inputs, fn):
    return fn(inputs["x"], inputs["wq"], inputs.get("bq"), inputs["wk"], inputs.get("bk"), inputs["wv"],
              inputs.get("bv"), inputs.get("wo"), inputs["gamma"], "wo" in inputs)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(inputs.values()), g)
    return out.detach(), dict(zip(inputs, grads))


def attention_grads(inputs, backend):
    def fused(x, wq, bq, wk, bk, wv, bv, wo, gamma, pool):
        return sagan_ext.self_attention(x, wq, wk, wv, gamma, query_bias=bq, key_bias=bk, value_bias=bv,
                                        out_weight=wo, pool=pool, backend=backend)
    return _grads(_call(inputs, fused), inputs)


def reference_grads(inputs):
    return _grads(_call(inputs, reference.self_attention), inputs)


def positional_block(names, variant, backend):
    """sagan_ext.self_attention as a function of the tensors in `names` order (for gradcheck)."""
    def block(*tensors):
        kw = dict(zip(names, tensors))
        return sagan_ext.self_attention(
            kw["x"], kw["wq"], kw["wk"], kw["wv"], kw["gamma"], query_bias=kw.get("bq"), key_bias=kw.get("bk"),
            value_bias=kw.get("bv"), out_weight=kw.get("wo"), pool=variant == "biggan", backend=backend)
    return block


def check_block(check, variant, shape, backend, **tolerances) -> bool:
    """torch.autograd.gradcheck or gradgradcheck (`check`) of the block on random float64 inputs."""
    inputs = attention_inputs(variant, *shape, dtype=torch.float64)
    return check(positional_block(list(inputs), variant, backend), tuple(inputs.values()), **tolerances)


def large_logit_errors(backend, variant, x_scale, shape=(2, 16, 9, 7), device="cpu"):
    """Norm-wise errors against float64 of the fused block and of the eager (reference) block, both
    in fp32, with x scaled by `x_scale` so that the unscaled scores are huge. Returns
    {output or gradient: (fused error, eager error)} and the largest |score|."""
    inputs = attention_inputs(variant, *shape, dtype=torch.float64)
    with torch.no_grad():
        inputs["x"].mul_(x_scale)
    q, k, _ = reference.project(inputs["x"], inputs["wq"], inputs.get("bq"), inputs["wk"], inputs.get("bk"),
                                inputs["wv"], inputs.get("bv"), False)
    largest = torch.bmm(q, k.transpose(1, 2)).abs().max().item()
    exact_out, exact = reference_grads(inputs)
    low = {n: t.detach().to(device, torch.float32).requires_grad_() for n, t in inputs.items()}
    fused_out, fused = attention_grads(low, backend)
    eager_out, eager = reference_grads(low)
    exact["out"], fused["out"], eager["out"] = exact_out, fused_out, eager_out

    def error(actual, name):
        # d(key bias) is 0 in exact arithmetic: its noise is measured against d(query bias)
        scale = exact["bq"].norm() if name == "bk" else exact[name].norm().clamp_min(1e-30)
        return ((actual.detach().cpu().double() - exact[name]).norm() / scale).item()
    return {n: (error(fused[n], n), error(eager[n], n)) for n in exact}, largest


def assert_grads(grads, ref_grads, tol):
    for name in grads:
        # d(key bias) is zero in exact arithmetic (a constant added to every score of a row does
        # not change its softmax): its rounding noise is measured against d(query bias), the sum
        # of terms of the same size.
        scale = ref_grads["bq"].norm() if name == "bk" else None
        assert_relative(grads[name], ref_grads[name], tol, f"d{name}", scale)


def assert_relative(actual, expected, tol, what, scale=None):
    """Norm-wise relative error ||actual - expected|| / ||expected|| (METHOD.md)."""
    scale = expected.norm().clamp_min(1e-30) if scale is None else scale
    err = (actual.double() - expected).norm() / scale
    assert err < tol, f"{what}: relative error {err:.2e} > {tol}"


def check_low_precision(backend, dtype, inputs):
    # Norm-wise error against float64 on the same (rounded) inputs: at most twice what eager
    # PyTorch itself makes in this dtype, plus 1e-2 (FlashAttention's rule). Gamma's gradient sums
    # thousands of cancelling low-precision products, so even eager is off by ~4e-2 there.
    out, grads = attention_grads(inputs, backend)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    exact_out, exact_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    eager_out, eager_grads = reference_grads(inputs)
    for name, got, exact, eager in [("out", out, exact_out, eager_out)] + [
            (f"d{n}", grads[n], exact_grads[n], eager_grads[n]) for n in grads]:
        # d(key bias) is 0 in exact arithmetic: its noise is measured against d(query bias)
        scale = exact_grads["bq"].norm() if name == "dbk" else None
        tol = 2 * _error(eager, exact, scale) + 1e-2
        assert _error(got, exact, scale) < tol, f"{name}: error {_error(got, exact, scale):.2e} > {tol:.2e}"


def _error(actual, expected, scale=None):
    scale = expected.norm().clamp_min(1e-30) if scale is None else scale
    return ((actual.double() - expected).norm() / scale).item()


def check_large_logits(backend, variant, x_scale, device="cpu"):
    """SAGAN's scores are unscaled: x_scale 10 gives scores of ~1e3, 30 of ~1e4. The backward
    recomputes p = exp(s - m) / l from the saved row max and sum; a saved fp32 log-sum-exp put
    ulp(m) into every p (fp32 gradients 20-100% off, eager within 1e-4).
    Paper block: within 3x of eager's own fp32 error. Two exceptions, both from the FlashAttention
    identity delta = rowsum(dO * O) (eager's softmax backward sums P * dP instead, consistent with
    its own p): d(key bias), zero in exact arithmetic, whose noise is that of delta; and the
    BigGAN block, whose sharper pooled attention amplifies O's rounding in delta (up to ~5x eager's
    error, measured): these are held to the fp32 standard, 1e-4 relative."""
    errors, largest = large_logit_errors(backend, variant, x_scale, device=device)
    assert largest > 5e2
    for name, (fused, eager) in errors.items():
        if variant == "sagan" and name != "bk":
            assert fused <= 3 * eager + 1e-6, f"{name}: fused fp32 error {fused:.2e} > 3x eager's {eager:.2e}"
        else:
            assert fused < 1e-4, f"{name}: fused fp32 error {fused:.2e} (eager {eager:.2e})"


class TinyDiscriminator(nn.Module):
    """A spectrally normalised conv, a fused attention block and a linear head (torch.compile tests)."""

    def __init__(self):
        super().__init__()
        self.conv = sagan_ext.spectral_norm(nn.Conv2d(3, 16, 3, padding=1))
        self.attention = sagan_ext.FusedSelfAttention(16, spectral_norm=True)
        self.head = sagan_ext.spectral_norm(nn.Linear(16, 1))

    def forward(self, x):
        h = self.attention(torch.relu(self.conv(x)))
        return self.head(h.sum((2, 3)))


# ---------------------------------------------------------------------------------------------
# sagan-train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--ch", "8", "--batch-size", "2", "--eval-samples", "20", "--log-every", "1", "--no-progress"]


def run(out: Path, classifier_file: Path, *args: str) -> int:
    """sagan-train into `out`, tiny, with the session's proxy classifier (conftest's classifier_file)."""
    from sagan_ext import train

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "classifier.pt").exists():
        shutil.copy(classifier_file, out / "classifier.pt")
    return train.main(["--out", str(out), *TINY, *args])


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
