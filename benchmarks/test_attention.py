"""SAGAN block forward+backward: eager vs SDPA vs sagan_ext, side by side in one run.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:shape
"""
import pytest
import torch

import blocks

# (batch, channels, size): the CPU shapes, and a 128 x 128 map at batch 1.
SHAPES = [(8, 64, 32), (2, 64, 64), (8, 256, 32)]
MEMORY_SHAPES = [(2, 64, 64), (1, 64, 128)]


@pytest.mark.parametrize("contender", list(blocks.CONTENDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-C%d-%dx%d" % (s[0], s[1], s[2], s[2]))
def test_forward_backward(benchmark, contender, shape):
    block, x = blocks.make(*shape)
    grad = torch.randn_like(x)
    fn = blocks.CONTENDERS[contender]
    benchmark.pedantic(lambda: fn(block, x).backward(grad), rounds=5, warmup_rounds=1)
    flops = blocks.attention_flops(*shape)
    benchmark.extra_info.update(flops=flops, gflops_per_s=flops / benchmark.stats.stats.median / 1e9,
                                n=shape[2] ** 2)


@pytest.mark.parametrize("contender", list(blocks.CONTENDERS))
@pytest.mark.parametrize("shape", MEMORY_SHAPES, ids=lambda s: "B%d-C%d-%dx%d" % (s[0], s[1], s[2], s[2]))
def test_peak_memory(benchmark, contender, shape):
    """Peak memory above the inputs for one forward+backward (fresh process). The eager and SDPA
    blocks hold N x N maps (1 GiB per image at 128 x 128); the fused block holds O(N*C)."""
    peak = benchmark.pedantic(blocks.cpu_peak_extra_bytes, args=(contender, *shape), rounds=1, iterations=1)
    n = shape[2] ** 2
    benchmark.extra_info.update(peak_extra_bytes=peak, peak_extra_mib=None if peak is None else peak / 2**20,
                                n=n, nxn_map_mib=shape[0] * n * n * 4 / 2**20, status="ok" if peak else "failed/OOM")
