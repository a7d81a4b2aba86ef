"""The full GPU grid (skips without CUDA): every contender side by side per (shape, dtype), each
case recording time, peak memory, FLOPs, TFLOP/s and % of the device's measured matmul rate, and
OOM instead of a time when a contender runs out of memory.

Contenders: the eager heykeetae-style block; the block on F.scaled_dot_product_attention(scale=1)
with PyTorch's choice and with each SDPA backend forced (skipped when it refuses the shape);
torch.compile of the eager block; sagan_ext's cuda and triton backends.
"""
import pytest
import torch

import blocks

if not torch.cuda.is_available():  # one skip line for the whole grid, not one per case
    pytest.skip("the GPU grid needs a CUDA GPU", allow_module_level=True)

# (batch, channels, size): N = 256 .. 16384, C = 64, 256, 512 (q/k dim C/8, v dim C)
SHAPES = [(64, 64, 16), (64, 256, 32), (64, 256, 64), (16, 256, 128), (64, 512, 32)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"]
CONTENDERS = ["eager", "sdpa", *(f"sdpa_{b}" for b in SDPA_BACKENDS), "compiled_eager", "cuda", "triton"]
shape_id = lambda s: "B%d-C%d-%dx%d" % (s[0], s[1], s[2], s[2])  # noqa: E731


def contender_fn(name):
    if name in ("cuda", "triton"):
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


def run_case(benchmark, contender, variant, shape, dtype_name, backward):
    dtype = DTYPES[dtype_name]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (accurate path) everywhere
    if contender == "compiled_eager" and (dtype_name != "bf16" or shape[2] > 64):
        pytest.skip("torch.compile anchor only for bf16 up to 64 x 64 (compile time)")
    block, x = blocks.make(*shape, device="cuda", dtype=dtype, variant=variant)
    grad = torch.randn_like(x)
    fn = contender_fn(contender)

    def step():
        if backward:
            fn(block, x).backward(grad)
        else:
            with torch.no_grad():
                fn(block, x)
        torch.cuda.synchronize()

    flops = blocks.attention_flops(*shape, backward=backward, variant=variant)
    info = dict(n=shape[2] ** 2, batch=shape[0], channels=shape[1], variant=variant, dtype=dtype_name,
                mode="fwd+bwd" if backward else "fwd", contender=contender, flops=flops)
    try:
        step()  # warm-up: kernels built, autotuned, compiled
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.cuda.OutOfMemoryError:
        info["status"] = "OOM"
        benchmark.extra_info.update(info)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    except RuntimeError as e:  # a forced SDPA backend that refuses the shape or dtype
        if contender.startswith("sdpa_"):
            pytest.skip(f"{contender} refuses this case: {str(e).splitlines()[0][:120]}")
        raise
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    info.update(status="ok", tflops_per_s=flops / benchmark.stats.stats.median / 1e12)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gpu_grid_sagan(benchmark, contender, dtype_name, shape):
    run_case(benchmark, contender, "sagan", shape, dtype_name, backward=True)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", [(64, 256, 32), (64, 256, 64)], ids=shape_id)
def test_gpu_grid_biggan(benchmark, contender, shape):
    run_case(benchmark, contender, "biggan", shape, "bf16", backward=True)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", [(64, 256, 32), (64, 256, 64)], ids=shape_id)
def test_gpu_grid_forward(benchmark, contender, shape):
    run_case(benchmark, contender, "sagan", shape, "bf16", backward=False)
