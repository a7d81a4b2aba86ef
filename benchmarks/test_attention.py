"""SAGAN block forward+backward: eager vs SDPA vs sagan_ext, side by side in one run.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:shape
"""
import time

import pytest
import torch

import blocks

# The reduced grid for a 2-core CPU (a few minutes): (batch, channels, size), N = size^2 from
# 256 to 4096, C = 64 and 256; the full grid (N to 16384, C to 512, fp16/bf16) is for GPUs.
SHAPES = [(32, 64, 16), (8, 64, 32), (2, 64, 64), (8, 256, 32)]
MEMORY_SHAPES = [(2, 64, 64), (1, 64, 128)]
shape_id = lambda s: "B%d-C%d-%dx%d" % (s[0], s[1], s[2], s[2])  # noqa: E731


def _record(benchmark, shape, variant, backward):
    flops = blocks.attention_flops(*shape, backward=backward, variant=variant)
    benchmark.extra_info.update(flops=flops, gflops_per_s=flops / benchmark.stats.stats.median / 1e9,
                                n=shape[2] ** 2, batch=shape[0], channels=shape[1], variant=variant,
                                mode="fwd+bwd" if backward else "fwd", dtype="float32")


@pytest.mark.parametrize("contender", list(blocks.CONTENDERS))
@pytest.mark.parametrize("variant", ["sagan", "biggan"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_backward(benchmark, contender, variant, shape):
    block, x = blocks.make(*shape, variant=variant)
    grad = torch.randn_like(x)
    fn = blocks.CONTENDERS[contender]
    benchmark.pedantic(lambda: fn(block, x).backward(grad), rounds=5, warmup_rounds=1)
    _record(benchmark, shape, variant, True)


def _timed_compiled(benchmark, run, rounds):
    """Time a torch.compile'd contender's steady state: its first call compiles (15-20 s here: the
    graph, inductor's C++ kernels by g++) and is not timed, its seconds go to extra_info; two more
    calls warm it; then the timed rounds, which fail if torch.compile compiled anything inside them
    (a recompile there would be timed as one slow call)."""
    graphs = torch._dynamo.utils.counters["stats"]
    start = time.perf_counter()
    run()
    benchmark.extra_info["compile_s"] = time.perf_counter() - start
    compiled = graphs["unique_graphs"]
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
    assert graphs["unique_graphs"] == compiled, "torch.compile compiled again inside the timed rounds"


@pytest.mark.parametrize("contender", list(blocks.CONTENDERS) + ["compiled_eager"])
@pytest.mark.parametrize("shape", [(8, 64, 32)], ids=shape_id)
def test_forward(benchmark, contender, shape):
    """Forward only (no_grad). 11 rounds, not 5: at ~40 ms a round, 5 rounds are one 0.2 s window,
    and on a shared 2-core machine their median followed whatever else ran in it (the compiled
    forward measured 44-56 ms in one run and 120-144 ms in the next, same code, no compile in the
    timed rounds)."""
    block, x = blocks.make(*shape)
    fn = getattr(blocks, contender) if contender == "compiled_eager" else blocks.CONTENDERS[contender]
    with torch.no_grad():
        if contender == "compiled_eager":
            _timed_compiled(benchmark, lambda: fn(block, x), rounds=11)
        else:
            benchmark.pedantic(lambda: fn(block, x), rounds=11, warmup_rounds=2)
    _record(benchmark, shape, "sagan", False)


@pytest.mark.parametrize("shape", [(8, 64, 32)], ids=shape_id)
def test_forward_backward_compiled_eager(benchmark, shape):
    """torch.compile of the eager block: the anchor a user gets for free."""
    block, x = blocks.make(*shape)
    grad = torch.randn_like(x)
    _timed_compiled(benchmark, lambda: blocks.compiled_eager(block, x).backward(grad), rounds=5)
    _record(benchmark, shape, "sagan", True)


@pytest.mark.parametrize("contender", list(blocks.CONTENDERS))
@pytest.mark.parametrize("shape", MEMORY_SHAPES, ids=lambda s: "B%d-C%d-%dx%d" % (s[0], s[1], s[2], s[2]))
def test_peak_memory(benchmark, contender, shape):
    """Peak memory above the inputs for one forward+backward (fresh process). The eager and SDPA
    blocks hold N x N maps (1 GiB per image at 128 x 128); the fused block holds O(N*C)."""
    peak = benchmark.pedantic(blocks.cpu_peak_extra_bytes, args=(contender, *shape), rounds=1, iterations=1)
    n = shape[2] ** 2
    benchmark.extra_info.update(peak_extra_bytes=peak, peak_extra_mib=None if peak is None else peak / 2**20,
                                n=n, nxn_map_mib=shape[0] * n * n * 4 / 2**20, status="ok" if peak else "failed/OOM")
