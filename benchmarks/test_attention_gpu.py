"""The GPU benchmarks (one skip without CUDA): every contender side by side in one process, each
case recording its median time, TFLOP/s (useful FLOPs: blocks.attention_flops), % of the bf16 dense
datasheet peak and of the measured matmul rate in its own precision, and peak memory above the
inputs; OOM, or the error, instead of a time when a contender cannot run the case.

- test_gpu_headline: the paper block (B=64, C=256: dk 32, dv 256) at N = 1024 and 4096, in bf16,
  fp32 with TF32 allowed and full fp32, forward and forward+backward: sagan_ext's backends (cuda,
  triton, reference; triton_tma: triton with SAGAN_EXT_TRITON_TMA=1, not in full fp32) against the eager bmm/softmax block, the block on
  F.scaled_dot_product_attention(scale=1.0) and on torch.compile'd flex_attention; then
  N = 16384, B = 16 in bf16.
- test_gpu_grid_*: the wider grid (N 256 to 16384, C 64 to 512, fp16 too, each SDPA kernel forced,
  the BigGAN variant, torch.compile of the eager block).

SAGAN_EXT_BENCH_DEADLINE skips the cases that would start after it (blocks.seconds_left).
"""
import os
import time

import pytest
import torch

import blocks

if not torch.cuda.is_available():  # one skip line for the whole module, not one per case
    pytest.skip("the GPU grid needs a CUDA GPU", allow_module_level=True)

# name -> (dtype, TF32 allowed). "fp32" is full fp32 everywhere (matmuls and cuDNN convs).
PRECISIONS = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
              "tf32": (torch.float32, True)}
BF16_DENSE_PEAK_TFLOPS = 989.0  # H100/H200 SXM datasheet, dense
SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"]
shape_id = lambda s: "B%d-C%d-%dx%d" % (s[0], s[1], s[2], s[2])  # noqa: E731


def contender_fn(name):
    if name == "triton_tma":  # the Triton forward with TMA copies: opt-in until measured here
        def with_tma(block, x):
            block.backend = "triton"
            os.environ["SAGAN_EXT_TRITON_TMA"] = "1"
            try:
                return block(x)
            finally:
                del os.environ["SAGAN_EXT_TRITON_TMA"]
        return with_tma
    if name in ("cuda", "triton", "reference"):
        def fused(block, x):
            block.backend = name
            return block(x)
        return fused
    if name.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name[5:]]

        def forced(block, x):
            with sdpa_kernel(backend):
                return blocks.sdpa(block, x)
        return forced
    return getattr(blocks, name)


def run_case(benchmark, contender, variant, shape, precision, backward, needs_s=10, rounds=20):
    blocks.skip_past_deadline(needs_s)
    dtype, tf32 = PRECISIONS[precision]
    torch.backends.cuda.matmul.allow_tf32 = tf32  # sagan_ext reads it at each forward, as torch's matmuls do
    torch.backends.cudnn.allow_tf32 = tf32  # the 1x1 projections are cuDNN convolutions
    torch.cuda.empty_cache()
    info = dict(n=shape[2] ** 2, batch=shape[0], channels=shape[1], variant=variant, dtype=precision,
                mode="fwd+bwd" if backward else "fwd", contender=contender,
                flops=blocks.attention_flops(*shape, backward=backward, variant=variant))
    block = x = grad = None
    try:
        block, x = blocks.make(*shape, device="cuda", dtype=dtype, variant=variant)
        grad = torch.randn_like(x)
        fn = contender_fn(contender)

        def step():
            if backward:
                x.grad = None
                fn(block, x).backward(grad)
            else:
                with torch.no_grad():
                    fn(block, x)
            torch.cuda.synchronize()

        step()  # warm-up: kernels built, autotuned, compiled
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        slow = time.perf_counter() - start > 0.05  # steps of 50 ms and more: 5 rounds are enough for a median
        benchmark.pedantic(step, rounds=5 if slow else rounds, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:
        info["status"] = "OOM"
    except Exception as e:  # a contender that cannot run the case (an SDPA kernel refusing it, a compile failure)
        info["status"] = "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    else:
        tflops = info["flops"] / benchmark.stats.stats.median / 1e12
        info.update(status="ok", tflops_per_s=tflops, pct_of_bf16_peak=100 * tflops / BF16_DENSE_PEAK_TFLOPS)
    finally:
        del block, x, grad
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if info.get("status") != "ok":
        if contender.startswith("sdpa_") and info["status"].startswith("error"):
            pytest.skip(f"{contender} refuses this case: {info['status'][7:]}")
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the row still shows, as OOM / error
    benchmark.extra_info.update(info)


# ---------------------------------------------------------------------------------------------
# the headline: the paper block at N = 1024 and 4096, then 16384

PAPER_BLOCKS = [(64, 256, 32), (64, 256, 64)]  # (batch, channels, size): dk 32, dv 256, N = 1024, 4096
LONG_BLOCK = (16, 256, 128)  # N = 16384
# In the order a time-limited lease should measure them (a deadline skips the rest): bf16, then
# TF32, then full fp32, each with flex_attention (a compile per case) after the others; N = 16384 last.
HEADLINE = []
for precision in ("bf16", "tf32", "fp32"):
    HEADLINE += [(shape, precision, backward, contender) for shape in PAPER_BLOCKS for backward in (False, True)
                 for contender in ("eager", "sdpa", "reference", "cuda", "triton")
                 + (("triton_tma",) if precision != "fp32" else ())]
    HEADLINE += [(shape, precision, backward, "flex") for shape in PAPER_BLOCKS for backward in (False, True)]
HEADLINE += [(LONG_BLOCK, "bf16", True, contender) for contender in ("eager", "sdpa", "cuda", "triton")]
case_id = lambda c: f"{shape_id(c[0])}-{c[1]}-{'fwd+bwd' if c[2] else 'fwd'}-{c[3]}"  # noqa: E731


@pytest.mark.parametrize("shape, precision, backward, contender", HEADLINE, ids=[case_id(c) for c in HEADLINE])
def test_gpu_headline(benchmark, shape, precision, backward, contender):
    run_case(benchmark, contender, "sagan", shape, precision, backward, needs_s=60 if contender == "flex" else 10)


# ---------------------------------------------------------------------------------------------
# the wider grid

# (batch, channels, size): N = 256 .. 16384, C = 64, 256, 512 (q/k dim C/8, v dim C)
SHAPES = [(64, 64, 16), (64, 256, 32), (64, 256, 64), (16, 256, 128), (64, 512, 32)]
CONTENDERS = ["eager", "sdpa", *(f"sdpa_{b}" for b in SDPA_BACKENDS), "compiled_eager", "cuda", "triton"]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gpu_grid_sagan(benchmark, contender, precision, shape):
    if contender == "compiled_eager" and (precision != "bf16" or shape[2] > 64):
        pytest.skip("torch.compile anchor only for bf16 up to 64 x 64 (compile time)")
    run_case(benchmark, contender, "sagan", shape, precision, backward=True, rounds=10)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", PAPER_BLOCKS, ids=shape_id)
def test_gpu_grid_biggan(benchmark, contender, shape):
    if contender == "compiled_eager" and shape[2] > 32:
        pytest.skip("torch.compile anchor only up to 32 x 32 (compile time)")
    run_case(benchmark, contender, "biggan", shape, "bf16", backward=True, rounds=10)
