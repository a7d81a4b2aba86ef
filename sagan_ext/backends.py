"""Backends: the kernels behind the public operators (ops.py). Each is a `Backend`, which declares
what it runs (devices, dtypes, shape limits through `refusal`, whether it fuses the residual) and
implements the kernels below; `select` is the one policy that picks a backend for an input and,
when none fits, says why each was refused. A backend never hands an input to another one.

The kernels, with q (B, N, dk), k (B, M, dk), v (B, M, dv) and grad_o (B, N, dv) as strided views
(channel-major from ops.py's projection GEMM, position-major from other callers):
  attention_core_forward(q, k, v, tf32) -> (o, stats)
  attention_core_forward_residual(q, k, v, x, gamma, tf32) -> (x + gamma * o in x's layout, o, stats)
      only where `fuses_residual` is declared
  attention_core_backward(grad_o, q, k, v, o, stats, tf32) -> (grad_q, grad_k, grad_v)
o (B, N, dv) contiguous; stats (B, 2, N), contiguous, in the accumulation dtype: each row's max
score m and its sum l = sum_j exp(s_j - m) (reference.attention_core says why not the log-sum-exp).
tf32: this float32 input's products may run as TF32 (ops.py passes precision(dtype, tf32) ==
"tf32": False for every other dtype); the forward's value is passed to the backward, which must
recompute the scores with the forward's arithmetic.
  spectral_norm_forward(w, u, v, iterations, eps) -> (w / sigma, sigma, u_new, v_new)
  spectral_norm_backward(grad_w_sn, grad_sigma, w_sn, u, v, sigma) -> grad_w
w is the (h, w) matrix view; u_new, v_new are new tensors of u's and v's dtype after `iterations`
power-iteration steps (copies when there are none). No kernel mutates its inputs.
Everything around the kernels (projections, pooling, residual, weight views) is shared, in ops.py.
"""
from __future__ import annotations

import abc
import os
from typing import ClassVar, Optional

import torch

from . import _build, reference
from ._checks import FLOATING


def tf32_allowed() -> bool:
    """Whether fp32 products may run as TF32: torch's own switch for fp32 matmuls, read when a
    forward runs (as torch's matmuls read it) and passed on as the ops' `tf32`."""
    return torch.backends.cuda.matmul.allow_tf32


PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def precision(dtype: torch.dtype, tf32: bool) -> str:
    """The arithmetic an input runs in: "tf32" for float32 when `tf32` allows it (the one rule for
    when TF32 applies), else its dtype's name ("bf16", "fp16", "fp32", "fp64")."""
    return "tf32" if tf32 and dtype == torch.float32 else PRECISION_NAMES.get(dtype, str(dtype))


class Backend(abc.ABC):
    """One set of kernels. A subclass declares `name`, `devices`, `dtypes`, `fuses_residual` and
    `materializes_scores`, implements the kernels (module docstring), and may refuse inputs it
    cannot run in `unavailable` (this machine) and `input_refusal` (this input)."""

    name: ClassVar[str]
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOATING
    fuses_residual: ClassVar[bool] = False  # implements attention_core_forward_residual
    materializes_scores: ClassVar[bool] = False  # keeps the N x M score map (O(N^2) memory)

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (None if it can)."""
        return None

    def input_refusal(self, device: torch.device, dtype: torch.dtype, query_key_dim: Optional[int],
                      value_dim: Optional[int]) -> Optional[str]:
        """Why this backend cannot run this input, which is on one of its devices, in one of its
        dtypes, on a machine where it is available (None if it can)."""
        return None

    def dtype_refusal(self, dtype: torch.dtype) -> Optional[str]:
        """Why this backend takes no `dtype` input (None if it does)."""
        return None if dtype in self.dtypes else f"does not support {dtype}"

    def refusal(self, device: torch.device, dtype: torch.dtype, query_key_dim: Optional[int] = None,
                value_dim: Optional[int] = None) -> Optional[str]:
        """Why this backend cannot run an input on `device` with `dtype` and, for attention, these
        query/key and value dims (None if it can)."""
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {device.type}"
        return (self.dtype_refusal(dtype) or self.unavailable()
                or self.input_refusal(device, dtype, query_key_dim, value_dim))

    @abc.abstractmethod
    def attention_core_forward(self, q, k, v, tf32):
        ...

    def attention_core_forward_residual(self, q, k, v, x, gamma, tf32):
        raise NotImplementedError(f"the {self.name} backend does not declare fuses_residual")

    @abc.abstractmethod
    def attention_core_backward(self, grad_o, q, k, v, o, stats, tf32):
        ...

    @abc.abstractmethod
    def spectral_norm_forward(self, w, u, v, iterations, eps):
        ...

    @abc.abstractmethod
    def spectral_norm_backward(self, grad_w_sn, grad_sigma, w_sn, u, v, sigma):
        ...


class ReferenceBackend(Backend):
    """The plain-PyTorch definition: any device, materialises the N x M map."""

    name, devices, materializes_scores = "reference", ("cpu", "cuda"), True

    def attention_core_forward(self, q, k, v, tf32):
        return reference.attention_core(q, k, v)

    def attention_core_backward(self, grad_o, q, k, v, o, stats, tf32):
        return reference.attention_core_backward(grad_o, q, k, v, o, stats)

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        return reference.spectral_norm(w, u, v, 0, iterations, eps, True)

    def spectral_norm_backward(self, grad_w_sn, grad_sigma, w_sn, u, v, sigma):
        return reference.spectral_norm_backward(grad_w_sn, grad_sigma, w_sn, u, v, sigma, 0)


class CpuBackend(Backend):
    """C++ kernels (csrc/cpu). fp32/fp64 natively; bf16/fp16 are computed in fp32."""

    name, devices = "cpu", ("cpu",)
    NATIVE = (torch.float32, torch.float64)

    def unavailable(self):
        return _build.load("cpu")

    @property
    def ops(self):
        return torch.ops.sagan_ext_cpu

    @classmethod
    def _native(cls, *tensors):
        return [t if t.dtype in cls.NATIVE else t.float() for t in tensors]

    def attention_core_forward(self, q, k, v, tf32):
        o, stats = self.ops.attention_forward(*self._native(q, k, v))
        return o.to(q.dtype), stats

    def attention_core_backward(self, grad_o, q, k, v, o, stats, tf32):
        grads = self.ops.attention_backward(*self._native(grad_o, q, k, v, o), stats)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        # the C++ op updates the u and v it is given in place: it gets copies (fp32 ones for
        # low-precision weights, whose math runs in fp32)
        native = w.dtype in self.NATIVE
        u_new, v_new = (u.clone(), v.clone()) if native else (u.float(), v.float())
        w_sn, sigma = self.ops.spectral_norm_forward(w if native else w.float(), u_new, v_new, iterations, eps)
        return w_sn.to(w.dtype), sigma.to(w.dtype), u_new.to(u.dtype), v_new.to(v.dtype)

    def spectral_norm_backward(self, grad_w_sn, grad_sigma, w_sn, u, v, sigma):
        dtype = w_sn.dtype
        grad_w_sn, w_sn = self._native(grad_w_sn, w_sn)
        grad_w = self.ops.spectral_norm_backward(grad_w_sn, grad_sigma.to(w_sn.dtype), w_sn, u.to(w_sn.dtype),
                                                 v.to(w_sn.dtype), sigma.to(w_sn.dtype))
        return grad_w.to(dtype)


class CudaBackend(Backend):
    """CUDA C++ kernels (csrc/cuda), query/key dim up to 64. Attention: fp16 and bf16 on tensor
    cores (mma.sync m16n8k16, fp32 accumulation; value dim up to 512); fp32 on tensor cores as
    TF32 (m16n8k8) when the op's tf32 is set and the value dim is at most 256, else on CUDA cores
    (FFMA, full fp32, any value dim). The paper variant's residual x + gamma * o is written by the
    forward's epilogue. The tensor cores need sm_80+: on older GPUs fp16/bf16 are refused and fp32
    runs on FFMA. Spectral norm in one cooperative launch each way."""

    name, devices, fuses_residual = "cuda", ("cuda",), True
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    max_query_key_dim = 64  # csrc/cuda/kernels.h kMaxQueryKeyDim
    max_tensor_core_value_dim = 512  # fp16/bf16 (csrc/cuda/switch.cuh); fp32 runs wider ones on FFMA

    def unavailable(self):
        return _build.load("cuda")

    def input_refusal(self, device, dtype, query_key_dim, value_dim):
        if dtype != torch.float32 and not self._tensor_cores(device):
            return f"{dtype} runs on tensor cores (mma.sync), which need sm_80 or newer"
        if query_key_dim is not None and query_key_dim > self.max_query_key_dim:
            return f"query/key dim {query_key_dim} is above the CUDA kernels' {self.max_query_key_dim}"
        if value_dim is not None and dtype != torch.float32 and value_dim > self.max_tensor_core_value_dim:
            return (f"value dim {value_dim} is above the {self.max_tensor_core_value_dim} of the {dtype} "
                    f"tensor-core kernels")
        return None

    @property
    def ops(self):
        return torch.ops.sagan_ext_cuda

    @staticmethod
    def _tensor_cores(device):
        return torch.cuda.get_device_capability(device) >= (8, 0)

    @staticmethod
    def _stream(t):
        return torch.cuda.current_stream(t.device).cuda_stream

    def _tf32(self, t, tf32):
        """TF32 where the op allows it and the GPU has the tensor cores for it."""
        return tf32 and self._tensor_cores(t.device)

    def attention_core_forward(self, q, k, v, tf32):
        with torch.cuda.device(q.device):
            return self.ops.attention_forward(q, k, v, self._tf32(q, tf32), self._stream(q))

    def attention_core_forward_residual(self, q, k, v, x, gamma, tf32):
        with torch.cuda.device(q.device):
            return self.ops.attention_forward_residual(q, k, v, x, gamma.reshape(1).to(x.dtype), self._tf32(q, tf32),
                                                       self._stream(q))

    def attention_core_backward(self, grad_o, q, k, v, o, stats, tf32):
        with torch.cuda.device(q.device):
            return self.ops.attention_backward(grad_o, q, k, v, o, stats, self._tf32(q, tf32), self._stream(q))

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        with torch.cuda.device(w.device):  # u_new, v_new: float32 copies
            w_sn, sigma, u_new, v_new = self.ops.spectral_norm_forward(w, u, v, iterations, eps, self._stream(w))
        return w_sn, sigma.to(w.dtype), u_new.to(u.dtype), v_new.to(v.dtype)

    def spectral_norm_backward(self, grad_w_sn, grad_sigma, w_sn, u, v, sigma):
        with torch.cuda.device(grad_w_sn.device):
            return self.ops.spectral_norm_backward(grad_w_sn, grad_sigma, w_sn, u, v, sigma, self._stream(grad_w_sn))


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    """Triton kernels (triton_kernels.py) on CUDA GPUs; on the CPU only under the Triton
    interpreter (TRITON_INTERPRET=1: exact, slow; for tests), which takes fp32 and fp16 but not
    bf16. fp16/bf16/fp32 on GPUs; fp32 dots are TF32 when the op's tf32 is set. The paper
    variant's residual is written by the forward's epilogue."""

    name, fuses_residual = "triton", True
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    @property
    def devices(self):
        return ("cuda", "cpu") if interpreting_triton() else ("cuda",)

    def dtype_refusal(self, dtype):
        if dtype == torch.bfloat16 and interpreting_triton():
            # Triton 3.9's interpreter: a bare 16x16 bf16 tl.dot of N(0, 1) inputs is off by ~2e10;
            # bf16 is proven by the sm_80/sm_90 compile test (tests/test_triton_compile.py) instead
            return "Triton's interpreter (TRITON_INTERPRET=1) computes bf16 tl.dot wrongly, so bf16 is refused under it"
        return super().dtype_refusal(dtype)

    def unavailable(self):
        try:
            self._kernels()
        except ImportError as e:
            return f"triton is not installed ({e})"
        except Exception as e:  # a triton whose API this code does not match: say so, do not crash
            return f"the triton kernels failed to load ({type(e).__name__}: {e})"
        if not interpreting_triton() and not torch.cuda.is_available():
            return "needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly; not bf16)"
        return None

    @staticmethod
    def _kernels():
        # imported on first use (importing triton is slow); select() asks unavailable() before
        # any kernel runs, so the torch.ops.sagan_ext_triton operators exist by then
        from . import triton_kernels
        return triton_kernels

    @property
    def ops(self):
        return torch.ops.sagan_ext_triton

    def attention_core_forward(self, q, k, v, tf32):
        return self.ops.attention_forward(q, k, v, tf32)

    def attention_core_forward_residual(self, q, k, v, x, gamma, tf32):
        return self.ops.attention_forward_residual(q, k, v, x, gamma, tf32)

    def attention_core_backward(self, grad_o, q, k, v, o, stats, tf32):
        return self.ops.attention_backward(grad_o, q, k, v, o, stats, tf32)

    def spectral_norm_forward(self, w, u, v, iterations, eps):
        w_sn, sigma, u_new, v_new = self.ops.spectral_norm_forward(w, u, v, iterations, eps)  # float32 copies
        return w_sn, sigma.to(w.dtype), u_new.to(u.dtype), v_new.to(v.dtype)

    def spectral_norm_backward(self, grad_w_sn, grad_sigma, w_sn, u, v, sigma):
        return self.ops.spectral_norm_backward(grad_w_sn, grad_sigma, w_sn, u, v, sigma)


BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CpuBackend(), CudaBackend(), TritonBackend())}

# What "auto" tries, fastest first, per device and precision (`precision`; "*": any other), as
# measured on an H200 (benchmarks/results/gpu, the paper block forward+backward, the training
# step's shape): the CUDA kernels lead in bf16/fp16 (N = 4096: 14.6 ms against Triton's 16.6 and
# eager's 26.3; N = 16384: 45.5 against 53.1) and in full fp32 (FFMA: 236 ms against 548), Triton
# in TF32 (42.5 against 53.6). The reference (O(N^2) memory) always serves, so "auto" never fails.
AUTO_ORDER = {"cpu": {"*": ("cpu", "reference")},
              "cuda": {"bf16": ("cuda", "triton", "reference"), "fp16": ("cuda", "triton", "reference"),
                       "tf32": ("triton", "cuda", "reference"), "*": ("cuda", "triton", "reference")}}


def names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def check_name(backend) -> None:
    if backend not in names():
        raise ValueError(f"backend must be one of {names()}, got {backend!r}")


def auto_order(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> tuple[str, ...]:
    """The backends "auto" tries, in order, for an input on `device` with `dtype` (`tf32`: float32
    products may run as TF32)."""
    orders = AUTO_ORDER.get(device.type, {"*": ("reference",)})
    return orders.get(precision(dtype, tf32), orders["*"])


def select(name: str, device: torch.device, dtype: torch.dtype, tf32: bool = False, *,
           query_key_dim: Optional[int] = None, value_dim: Optional[int] = None) -> Backend:
    """The backend that will run an input on `device` with `dtype` (and, for attention, these
    query/key and value dims), or ValueError saying why not. A named backend runs the input or
    refuses it; "auto" takes the first of `auto_order` that does not refuse it."""
    check_name(name)
    facts = dict(query_key_dim=query_key_dim, value_dim=value_dim)
    if name != "auto":
        reason = BACKENDS[name].refusal(device, dtype, **facts)
        if reason:
            raise ValueError(f"backend={name!r} cannot run a {dtype} input on {device}: {reason}")
        return BACKENDS[name]
    refusals = []
    for candidate in auto_order(device, dtype, tf32):
        reason = BACKENDS[candidate].refusal(device, dtype, **facts)
        if reason is None:
            return BACKENDS[candidate]
        refusals.append(f"{candidate}: {reason}")
    raise ValueError(f"no backend can run a {dtype} input on {device}: " + "; ".join(refusals))


def available_backends() -> dict[str, Optional[str]]:
    """{backend: None if it works on this machine, else the reason it does not}."""
    return {name: backend.unavailable() for name, backend in BACKENDS.items()}
