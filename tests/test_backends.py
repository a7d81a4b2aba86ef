"""The backend interface (sagan_ext/backends.py): what each backend declares, select as the one
policy (a named backend runs an input or refuses it, never hands it on), one contract per kernel.
The CUDA backend's Python side runs here on the CPU against stand-ins of its operators and of the
GPU (no GPU runs these tests): the arguments it passes, the refusals, the residual path."""
import contextlib
import inspect
from types import SimpleNamespace

import pytest
import torch

import sagan_ext
from sagan_ext import backends, reference
from sagan_ext.backends import BACKENDS, Backend, select

from sagan_ext_testing import attention_grads, attention_inputs, reference_grads

CUDA = torch.device("cuda", 0)


def test_every_backend_is_a_declared_backend():
    for name, backend in BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == name
        assert set(backend.dtypes) <= set(sagan_ext._checks.FLOATING), name
        residual = type(backend).attention_core_forward_residual
        assert backend.fuses_residual == (residual is not Backend.attention_core_forward_residual), name
    assert [name for name, b in BACKENDS.items() if b.fuses_residual] == ["cuda", "triton"]
    with pytest.raises(NotImplementedError, match="cpu backend does not declare fuses_residual"):
        BACKENDS["cpu"].attention_core_forward_residual(*[None] * 6)


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in GPU of the given compute capability, with the cuda backend built for it."""
    def make(capability=(9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(backends.CudaBackend, "unavailable", lambda self: None)
        return BACKENDS["cuda"]
    return make


@pytest.mark.parametrize("dtype, query_key_dim, value_dim, refused", [
    (torch.float16, 64, 512, None), (torch.bfloat16, 8, 513, "value dim 513 is above the 512"),
    (torch.float16, 65, 64, "query/key dim 65 is above the CUDA kernels' 64"),
    (torch.float32, 64, 4096, None),  # fp32 runs wide value dims on FFMA (TF32 too: above 256)
    (torch.float32, 80, 64, "query/key dim 80"), (torch.float32, None, None, None),  # spectral norm: no dims
])
def test_cuda_refuses_what_its_kernels_cannot_run_and_auto_moves_on(gpu, dtype, query_key_dim, value_dim, refused):
    cuda = gpu()
    reason = cuda.refusal(CUDA, dtype, query_key_dim, value_dim)
    assert (reason is None) == (refused is None) and (refused is None or refused in reason), reason
    dims = dict(query_key_dim=query_key_dim, value_dim=value_dim)
    if refused:  # named, it refuses with the reason (it once sent dk > 64 to triton silently)
        with pytest.raises(ValueError, match=f"backend='cuda' cannot run a {dtype} input on cuda:0: {refused}"):
            select("cuda", CUDA, dtype, **dims)
        assert select("auto", CUDA, dtype, **dims).name != "cuda"
    else:
        assert select("cuda", CUDA, dtype, **dims) is cuda
        assert select("auto", CUDA, dtype, **dims).name == "cuda"  # the first of auto's order here (TF32 off)


def test_auto_order_is_per_precision():
    assert backends.auto_order(CUDA, torch.float32) == ("cuda", "triton", "reference")
    assert backends.auto_order(CUDA, torch.float32, True) == ("triton", "cuda", "reference")
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, True)):
        assert backends.auto_order(CUDA, dtype, tf32) == ("cuda", "triton", "reference")
    assert backends.auto_order(torch.device("cpu"), torch.float64, True) == ("cpu", "reference")
    assert [backends.precision(d, True) for d in (torch.float32, torch.bfloat16, torch.float64)] == ["tf32", "bf16",
                                                                                                      "fp64"]


class FakeCudaOps:
    """torch.ops.sagan_ext_cuda's signatures (csrc/cuda/bindings.cpp), computed by the reference on
    the CPU; records each call's TF32 flag and stream, and what its inputs held."""

    def __init__(self):
        self.calls = []

    def _record(self, op, allow_tf32, stream, *inputs):
        assert isinstance(allow_tf32, bool) and stream == 1234, (op, allow_tf32, stream)
        self.calls.append((op, allow_tf32))

    def attention_forward(self, q, k, v, allow_tf32, stream):
        self._record("attention_forward", allow_tf32, stream)
        return reference.attention_core(q, k, v)

    def attention_forward_residual(self, q, k, v, x, gamma, allow_tf32, stream):
        self._record("attention_forward_residual", allow_tf32, stream)
        assert gamma.shape == (1,) and gamma.dtype == x.dtype
        o, stats = reference.attention_core(q, k, v)
        return x + gamma * o.transpose(1, 2).reshape(x.shape), o, stats

    def attention_backward(self, grad_o, q, k, v, o, stats, allow_tf32, stream):
        self._record("attention_backward", allow_tf32, stream)
        return reference.attention_core_backward(grad_o, q, k, v, o, stats)

    def spectral_norm_forward(self, w, u, v, iterations, eps, stream):
        self._record("spectral_norm_forward", False, stream)
        w_sn, sigma, u_new, v_new = reference.spectral_norm(w.float(), u.float(), v.float(), 0, iterations, eps, True)
        return w_sn.to(w.dtype), sigma, u_new, v_new  # as the CUDA op: sigma, u', v' float32

    def spectral_norm_backward(self, grad, grad_sigma, w_sn, u, v, sigma, stream):
        self._record("spectral_norm_backward", False, stream)
        return reference.spectral_norm_backward(grad, grad_sigma, w_sn, u, v, sigma, 0)


@pytest.fixture
def cuda_on_cpu(gpu, monkeypatch):
    """The cuda backend's own code run on CPU tensors: its operators are FakeCudaOps, its device
    and stream calls stand-ins."""
    def make(capability=(9, 0)):
        cuda = gpu(capability)
        fake = FakeCudaOps()
        monkeypatch.setattr(backends.CudaBackend, "ops", property(lambda self: fake))
        monkeypatch.setattr(backends.CudaBackend, "devices", ("cuda", "cpu"))
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=1234))
        return cuda, fake
    return make


@pytest.fixture
def restore_tf32_flag():
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("variant", ["sagan", "biggan"])
@pytest.mark.parametrize("capability, tf32, runs_tf32", [((9, 0), True, True), ((8, 0), False, False),
                                                          ((7, 5), True, False)])
def test_cuda_backend_block_on_stand_in_ops(cuda_on_cpu, restore_tf32_flag, variant, capability, tf32, runs_tf32):
    """The whole block through the cuda backend's Python side: the paper variant through the fused
    residual op, BigGAN's through the plain forward; the TF32 flag each op gets (TF32 needs sm_80);
    forward and every gradient as the reference's."""
    _, fake = cuda_on_cpu(capability)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    inputs = attention_inputs(variant, 2, 16, 4, 6, dtype=torch.float32)
    out, grads = attention_grads(inputs, "cuda")
    ref_out, ref_grads = reference_grads(inputs)
    forward = "attention_forward_residual" if variant == "sagan" else "attention_forward"
    assert fake.calls == [(forward, runs_tf32), ("attention_backward", runs_tf32)]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_backend_spectral_norm_on_stand_in_ops(cuda_on_cpu, dim):
    """sagan_ext.spectral_normalize through the cuda backend's Python side: the module's u and v
    advance as the reference's, and the weight's and sigma's gradients match."""
    _, fake = cuda_on_cpu()
    w = torch.randn(6, 4, 3)
    u0 = torch.nn.functional.normalize(torch.randn(w.shape[dim]), dim=0)
    v0 = torch.nn.functional.normalize(torch.randn(w.numel() // w.shape[dim]), dim=0)
    results = {}
    for backend in ("cuda", "reference"):
        weight, u, v = w.clone().requires_grad_(), u0.clone(), v0.clone()
        w_sn, sigma = sagan_ext.spectral_normalize(weight, u, v, dim=dim, n_power_iterations=2, backend=backend)
        (grad,) = torch.autograd.grad((w_sn * torch.linspace(-1, 1, w.numel()).view(w.shape)).sum() + sigma, weight)
        results[backend] = (w_sn, sigma, u, v, grad)
    assert fake.calls == [("spectral_norm_forward", False), ("spectral_norm_backward", False)]
    for got, want in zip(results["cuda"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tf32_reaches_the_kernels_of_float32_inputs_only(cuda_on_cpu, restore_tf32_flag):
    _, fake = cuda_on_cpu()
    torch.backends.cuda.matmul.allow_tf32 = True
    for dtype, runs_tf32 in ((torch.bfloat16, False), (torch.float32, True)):
        fake.calls.clear()
        attention_grads(attention_inputs("biggan", 1, 16, 2, 4, dtype=dtype), "cuda")
        assert fake.calls == [("attention_forward", runs_tf32), ("attention_backward", runs_tf32)], dtype


@pytest.mark.parametrize("name, dtype", [(name, dtype) for name, backend in BACKENDS.items()
                                         for dtype in (torch.float32, torch.bfloat16, torch.float64)
                                         if backend.dtype_refusal(dtype) is None])
@pytest.mark.parametrize("iterations", [0, 2])
def test_spectral_norm_kernels_return_new_u_v_and_mutate_nothing(cuda_on_cpu, name, dtype, iterations):
    """One contract for every backend: (w / sigma, sigma, u', v') with u', v' new tensors of u's
    dtype (copies when no iteration ran), the inputs untouched. (The CPU op updates the u and v it
    is given: its backend hands it copies.)"""
    cuda_on_cpu()
    backend = BACKENDS[name]
    device = "cpu" if "cpu" in backend.devices else "cuda"  # triton on a GPU machine
    assert select(name, torch.device(device), dtype) is backend  # (which loads its kernels)
    w = torch.randn(6, 10).to(device, dtype)
    u = torch.nn.functional.normalize(torch.randn(6), dim=0).to(device, dtype)
    v = torch.ones(10, device=device, dtype=dtype)
    inputs = [t.clone() for t in (w, u, v)]
    w_sn, sigma, u_new, v_new = backend.spectral_norm_forward(w, u, v, iterations, 1e-12)
    for given, before in zip((w, u, v), inputs):
        assert torch.equal(given, before)
    assert (w_sn.dtype, sigma.dtype, u_new.dtype, v_new.dtype) == (dtype,) * 4
    assert all(new.data_ptr() != old.data_ptr() for new, old in ((u_new, u), (v_new, v)))
    exact = reference.spectral_norm(w.double(), u.double(), v.double(), 0, iterations, 1e-12, True)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in zip((w_sn, sigma, u_new, v_new), exact):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tol, atol=tol)


def test_kernel_signatures_are_the_interface():
    """Every backend's kernels take the interface's arguments, by the interface's names."""
    for name, backend in BACKENDS.items():
        for kernel in ("attention_core_forward", "attention_core_forward_residual", "attention_core_backward",
                       "spectral_norm_forward", "spectral_norm_backward"):
            declared = inspect.signature(getattr(Backend, kernel)).parameters.keys()
            assert inspect.signature(getattr(type(backend), kernel)).parameters.keys() == declared, (name, kernel)
