"""The contenders, built once for the benchmarks: the eager heykeetae-style block (bmm, softmax,
bmm), the same block on F.scaled_dot_product_attention(scale=1.0), and sagan_ext's fused block,
all sharing one set of weights. Also the FLOP count and a peak-memory probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sagan_ext

ROOT = Path(__file__).resolve().parent.parent


def seconds_left() -> float:
    """Seconds to SAGAN_EXT_BENCH_DEADLINE (seconds since the epoch; benchmarks/gpu_check.sh sets it
    so that a run inside a time-limited GPU lease skips the cases it has no time for, ends, and
    writes its JSON); infinite when unset."""
    deadline = os.environ.get("SAGAN_EXT_BENCH_DEADLINE")
    return float("inf") if not deadline else float(deadline) - time.time()


def skip_past_deadline(needs_s: float) -> None:
    import pytest
    if seconds_left() < needs_s:
        pytest.skip(f"SAGAN_EXT_BENCH_DEADLINE: under {needs_s:.0f} s of the lease left for this case")


def make(batch, channels, size, device="cpu", dtype=torch.float32, backend="auto", seed=0, variant="sagan"):
    torch.manual_seed(seed)
    block = sagan_ext.FusedSelfAttention(channels, variant, backend=backend).to(device, dtype)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
    return block, x


def eager(block, x):
    """The eager bmm/softmax block on the same weights (heykeetae's Self_Attn / BigGAN's Attention)."""
    return sagan_ext.EagerSelfAttention.forward(block, x)


def _with_attention(block, x, attend):
    """The block around an attention function attend(q, k, v) on (B, 1, L, C) position-major
    tensors, unscaled scores (SAGAN): the block's own projections, pooling and residual."""
    positions = lambda t: t.flatten(2).transpose(1, 2).unsqueeze(1)  # noqa: E731  (B, 1, L, C)
    if block.variant == "biggan":
        q, k, v = positions(block.theta(x)), positions(F.max_pool2d(block.phi(x), 2)), positions(F.max_pool2d(block.g(x), 2))
    else:
        q, k, v = (positions(conv(x)) for conv in (block.query_conv, block.key_conv, block.value_conv))
    o = attend(q, k, v).squeeze(1)
    if block.variant == "biggan":
        return block.gamma * block.o(o.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:])) + x
    return block.gamma * o.transpose(1, 2).reshape(x.shape) + x


def sdpa(block, x):
    """The block on F.scaled_dot_product_attention(scale=1.0), PyTorch's choice of kernel."""
    return _with_attention(block, x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0))


_flex_attention = None


def flex(block, x):
    """The block on torch.compile'd flex_attention (scale=1.0; it takes a value dim other than the
    query/key dim), compiled once per input shape and dtype."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_attention = torch.compile(flex_attention, dynamic=False)
    return _with_attention(block, x, lambda q, k, v: _flex_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                                     scale=1.0))


_compiled = {}


def compiled_eager(block, x):
    """torch.compile of the eager block (inductor), compiled once per block."""
    if block not in _compiled:
        _compiled[block] = torch.compile(lambda x: eager(block, x))
    return _compiled[block](x)


def fused(block, x):
    return block(x)


CONTENDERS = {"eager": eager, "sdpa": sdpa, "fused": fused}


def attention_flops(batch, channels, size, backward=True, variant="sagan"):
    """Useful work (no recomputation counted): QK^T and PV forward; dV, dP, dQ, dK backward (2x
    the forward); plus the 1x1 projections (and, backward, their two gradients)."""
    n = size * size
    dk = channels // 8
    if variant == "sagan":
        m, dv, proj_out = n, channels, 2 * dk + channels
    else:
        m, dv, proj_out = n // 4, channels // 2, dk + channels  # theta, phi, g; plus o: dv -> C
    core = 2 * batch * n * m * (dk + dv)
    proj = 2 * batch * n * channels * proj_out
    return (core + proj) * (3 if backward else 1)


_PROBE = r"""
import json, sys, torch
sys.path.insert(0, {bench!r})
import blocks
block, x = blocks.make({batch}, {channels}, {size})
grad = torch.randn_like(x)
blocks.sagan_ext.available_backends()  # load the kernels before the peak is reset
fn = blocks.CONTENDERS[{name!r}]
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS")
fn(block, x).backward(grad)
print(json.dumps({{"peak_extra_bytes": rss("VmHWM") - base}}))
"""


def cpu_peak_extra_bytes(name, batch, channels, size):
    """Peak resident memory above the inputs for one forward+backward, in a fresh process (so no
    allocator cache from earlier cases hides it). None if the probe fails (OOM, say)."""
    code = _PROBE.format(bench=str(Path(__file__).parent), name=name, batch=batch, channels=channels, size=size)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
