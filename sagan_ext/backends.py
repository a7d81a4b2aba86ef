"""Backends: the kernels behind the public operators. Each says what it supports; `select` picks
one for an input and, when none fits, says why each was refused.

A backend implements four kernels; q (B, N, dk), k (B, M, dk), v (B, M, dv), do (B, N, dv) arrive
as strided views (channel-major from ops.py's projection GEMM, position-major from other callers):
  attention_forward(q, k, v, tf32) -> (o, stats)
    [optional: attention_forward_residual(q, k, v, x, gamma, tf32) -> (x + gamma * o in x's layout, o, stats)]
  attention_backward(do, q, k, v, o, stats, tf32) -> (dq, dk, dv)
stats (B, 2, N), contiguous, in the accumulation dtype: each row's max score m and its sum
l = sum_j exp(s_j - m) (reference.attention_core says why not the log-sum-exp). tf32: fp32 products
may run as TF32 (GPU backends); the forward's value is passed to the backward, which must
recompute the scores with the forward's arithmetic. The CPU backends compute fp32 exactly.
  spectral_norm_forward(w, u, v, iterations, eps) -> (w / sigma, sigma)   # w is (h, w); u, v updated in place
  spectral_norm_backward(g, grad_sigma, w_sn, u, v, sigma) -> dw
Everything around them (projections, pooling, residual, weight views) is shared, in ops.py.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _build, _checks, reference

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Backend:
    name: str = ""
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOATING

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (None if it can)."""
        return None

    def refusal(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            return f"does not support {dtype}"
        return self.unavailable()


class ReferenceBackend(Backend):
    """The plain-PyTorch definition: any device, materialises the N x M map."""

    name, devices = "reference", ("cpu", "cuda")

    @staticmethod
    def attention_forward(q, k, v, tf32):
        return reference.attention_core(q, k, v)

    @staticmethod
    def attention_backward(do, q, k, v, o, stats, tf32):
        return reference.attention_core_backward(do, q, k, v, o, stats)

    @staticmethod
    def spectral_norm_forward(w, u, v, iterations, eps):
        return reference.spectral_norm(w, u, v, 0, iterations, eps, True)

    @staticmethod
    def spectral_norm_backward(g, grad_sigma, w_sn, u, v, sigma):
        return reference.spectral_norm_backward(g, grad_sigma, w_sn, u, v, sigma, 0)


class CpuBackend(Backend):
    """C++ kernels (csrc/cpu). fp32/fp64 natively; bf16/fp16 are computed in fp32."""

    name, devices = "cpu", ("cpu",)

    def unavailable(self):
        return _build.load("cpu")

    @staticmethod
    def _native(*tensors):
        return [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors]

    def attention_forward(self, q, k, v, tf32):
        o, stats = torch.ops.sagan_ext_cpu.attention_forward(*self._native(q, k, v))
        return o.to(q.dtype), stats

    def attention_backward(self, do, q, k, v, o, stats, tf32):
        grads = torch.ops.sagan_ext_cpu.attention_backward(*self._native(do, q, k, v, o), stats)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        if w.dtype not in (torch.float32, torch.float64):  # low-precision weights: fp32 math
            u32, v32 = u.float(), v.float()
            w_sn, sigma = torch.ops.sagan_ext_cpu.spectral_norm_forward(w.float(), u32, v32, iterations, eps)
            u.copy_(u32), v.copy_(v32)
            return w_sn.to(w.dtype), sigma.to(w.dtype)
        return torch.ops.sagan_ext_cpu.spectral_norm_forward(w, u, v, iterations, eps)

    def spectral_norm_backward(self, g, grad_sigma, w_sn, u, v, sigma):
        dtype = w_sn.dtype
        g, w_sn = self._native(g, w_sn)
        dw = torch.ops.sagan_ext_cpu.spectral_norm_backward(
            g, grad_sigma.to(w_sn.dtype), w_sn, u.to(w_sn.dtype), v.to(w_sn.dtype), sigma.to(w_sn.dtype))
        return dw.to(dtype)


class CudaBackend(Backend):
    """CUDA C++ kernels (csrc/cuda), query/key dim up to 64 (wider ones run on the next backend
    that takes them). Attention: fp16 and bf16 on tensor cores (mma.sync m16n8k16, fp32
    accumulation); fp32 on tensor cores as TF32 (m16n8k8) when
    torch.backends.cuda.matmul.allow_tf32 is set, else on CUDA cores (FFMA, full fp32). The
    paper variant's residual x + gamma * o is written by the forward's epilogue. The tensor cores
    need sm_80+: on older GPUs fp16/bf16 are refused (auto moves on to triton) and fp32 runs on
    FFMA. Spectral norm in one cooperative launch each way."""

    name, devices = "cuda", ("cuda",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    max_query_key_dim = 64

    def unavailable(self):
        return _build.load("cuda")

    def refusal(self, device, dtype):
        reason = super().refusal(device, dtype)
        if reason is None and dtype != torch.float32 and not self._tensor_cores(device):
            return f"{dtype} runs on tensor cores (mma.sync), which need sm_80 or newer"
        return reason

    @staticmethod
    def _tensor_cores(device):
        return torch.cuda.get_device_capability(device) >= (8, 0)

    @staticmethod
    def _stream(t):
        return torch.cuda.current_stream(t.device).cuda_stream

    def _tf32(self, t, tf32):
        return tf32 and t.dtype == torch.float32 and self._tensor_cores(t.device)

    def _fallback(self, q):
        for name in ("triton", "reference"):
            backend = BACKENDS[name]
            if backend.refusal(q.device, q.dtype) is None:
                return backend
        raise AssertionError("the reference backend takes every input")

    def attention_forward(self, q, k, v, tf32):
        if q.shape[-1] > self.max_query_key_dim:
            return self._fallback(q).attention_forward(q, k, v, tf32)
        with torch.cuda.device(q.device):
            return torch.ops.sagan_ext_cuda.attention_forward(q, k, v, self._tf32(q, tf32), self._stream(q))

    def attention_forward_residual(self, q, k, v, x, gamma, tf32):
        if q.shape[-1] > self.max_query_key_dim:
            fallback = self._fallback(q)
            if hasattr(fallback, "attention_forward_residual"):
                return fallback.attention_forward_residual(q, k, v, x, gamma, tf32)
            o, stats = fallback.attention_forward(q, k, v, tf32)
            return torch.addcmul(x, gamma.reshape(()), o.transpose(1, 2).reshape(x.shape)), o, stats
        with torch.cuda.device(q.device):
            return torch.ops.sagan_ext_cuda.attention_forward_residual(
                q, k, v, x, gamma.reshape(1).to(x.dtype), self._tf32(q, tf32), self._stream(q))

    def attention_backward(self, do, q, k, v, o, stats, tf32):
        if q.shape[-1] > self.max_query_key_dim:
            return self._fallback(q).attention_backward(do, q, k, v, o, stats, tf32)
        with torch.cuda.device(q.device):
            return torch.ops.sagan_ext_cuda.attention_backward(do, q, k, v, o, stats, self._tf32(q, tf32), self._stream(q))

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        with torch.cuda.device(w.device):
            w_sn, sigma, u_new, v_new = torch.ops.sagan_ext_cuda.spectral_norm_forward(w, u, v, iterations, eps, self._stream(w))
        u.copy_(u_new), v.copy_(v_new)
        return w_sn, sigma.to(w.dtype)

    def spectral_norm_backward(self, g, grad_sigma, w_sn, u, v, sigma):
        with torch.cuda.device(g.device):
            return torch.ops.sagan_ext_cuda.spectral_norm_backward(g, grad_sigma, w_sn, u, v, sigma, self._stream(g))


class TritonBackend(Backend):
    """Triton kernels (triton_kernels.py) on CUDA GPUs; on the CPU only under the Triton
    interpreter (TRITON_INTERPRET=1: exact, slow; for tests), which takes fp32 and fp16 but not
    bf16. fp16/bf16/fp32 on GPUs; fp32 dots are TF32 when the op's tf32 is set
    (torch.backends.cuda.matmul.allow_tf32 at the forward's call)."""

    name = "triton"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    @property
    def devices(self):
        return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

    def refusal(self, device, dtype):
        if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            # Triton 3.9's interpreter: a bare 16x16 bf16 tl.dot of N(0, 1) inputs is off by ~2e10;
            # bf16 is proven by the sm_80/sm_90 compile test (tests/test_triton_compile.py) instead
            return "Triton's interpreter (TRITON_INTERPRET=1) computes bf16 tl.dot wrongly, so bf16 is refused under it"
        return super().refusal(device, dtype)

    def unavailable(self):
        try:
            self._kernels()
        except ImportError as e:
            return f"triton is not installed ({e})"
        except Exception as e:  # a triton whose API this code does not match: say so, do not crash
            return f"the triton kernels failed to load ({type(e).__name__}: {e})"
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            return "needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly; not bf16)"
        return None

    @staticmethod
    def _kernels():
        # imported on first use (importing triton is slow); select() asks unavailable() before
        # any kernel runs, so the torch.ops.sagan_ext_triton operators exist by then
        from . import triton_kernels
        return triton_kernels

    def attention_forward(self, q, k, v, tf32):
        return torch.ops.sagan_ext_triton.attention_forward(q, k, v, tf32)

    def attention_forward_residual(self, q, k, v, x, gamma, tf32):
        return torch.ops.sagan_ext_triton.attention_forward_residual(q, k, v, x, gamma, tf32)

    def attention_backward(self, do, q, k, v, o, stats, tf32):
        return torch.ops.sagan_ext_triton.attention_backward(do, q, k, v, o, stats, tf32)

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        w_sn, sigma, u_new, v_new = torch.ops.sagan_ext_triton.spectral_norm_forward(w, u, v, iterations, eps)
        u.copy_(u_new), v.copy_(v_new)
        return w_sn, sigma.to(w.dtype)

    def spectral_norm_backward(self, g, grad_sigma, w_sn, u, v, sigma):
        return torch.ops.sagan_ext_triton.spectral_norm_backward(g, grad_sigma, w_sn, u, v, sigma)


BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CpuBackend(), CudaBackend(), TritonBackend())}

# Fastest first, per device and precision ("tf32": float32 with TF32 allowed), as measured on an
# H200 (benchmarks/results/gpu: the paper block, N = 1024 to 16384, forward+backward): Triton
# leads in bf16 and TF32 (2x the eager block at N = 4096 bf16), the CUDA FFMA kernels in full
# fp32. The reference (O(N^2) memory) always serves, so "auto" never fails.
AUTO_ORDER = {"cpu": {"*": ("cpu", "reference")},
              "cuda": {"bf16": ("triton", "cuda", "reference"), "fp16": ("triton", "cuda", "reference"),
                       "tf32": ("triton", "cuda", "reference"), "*": ("cuda", "triton", "reference")}}
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def auto_order(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> tuple[str, ...]:
    """The backends "auto" tries, in order, for an input on `device` with `dtype` (`tf32`: float32
    products may run as TF32)."""
    precision = "tf32" if tf32 and dtype == torch.float32 else PRECISION_NAMES.get(dtype, "*")
    orders = AUTO_ORDER.get(device.type, {"*": ("reference",)})
    return orders.get(precision, orders["*"])


def select(name: str, device: torch.device, dtype: torch.dtype, tf32: bool = False) -> Backend:
    """The backend that will run an input on `device` with `dtype`, or ValueError saying why not."""
    _checks.check_backend(name)
    if name != "auto":
        reason = BACKENDS[name].refusal(device, dtype)
        if reason:
            raise ValueError(f"backend={name!r} cannot run a {dtype} input on {device}: {reason}")
        return BACKENDS[name]
    refusals = []
    for candidate in auto_order(device, dtype, tf32):
        reason = BACKENDS[candidate].refusal(device, dtype)
        if reason is None:
            return BACKENDS[candidate]
        refusals.append(f"{candidate}: {reason}")
    raise ValueError(f"no backend can run a {dtype} input on {device}: " + "; ".join(refusals))


def available_backends() -> dict[str, Optional[str]]:
    """{backend: None if it works on this machine, else the reason it does not}."""
    return {name: backend.unavailable() for name, backend in BACKENDS.items()}
