"""GPU checks (they skip without CUDA): the cuda and triton backends against the reference on
float64-upcast inputs, fp32/bf16/fp16, odd shapes, outputs allocated in NaN-poisoned memory (an
element a kernel forgets to write stays NaN); spectral norm against torch's; torch.compile
through the CUDA path. benchmarks/gpu_check.sh runs these on the lent GPU."""
import pytest
import torch
from torch import nn

import sagan_ext

from sagan_ext_testing import attention_grads, attention_inputs, reference_grads
from test_attention import _assert_grads, _assert_relative, check_low_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ["cuda", "triton"]
# N = 1, 63 (7 x 9), 300 (ragged), 1024 with C = 256 (dk 32, dv 256), 256 with C = 512 (dk 64, dv 512)
SHAPES = [(2, 8, 1, 1), (1, 8, 7, 9), (2, 64, 15, 20), (2, 256, 32, 32), (1, 512, 16, 16)]


def poison_allocator():
    """Fill the caching allocator's free memory with NaN so that fresh outputs start as NaN."""
    free, _ = torch.cuda.mem_get_info()
    blob = torch.full((min(free // 8, 1 << 28),), float("nan"), device="cuda")
    del blob


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_float32_matches_float64_reference(backend, variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    for shape in SHAPES:
        if variant == "biggan" and min(shape[2:]) < 2:
            continue
        inputs = attention_inputs(variant, *shape, dtype=torch.float32, device="cuda")
        poison_allocator()
        out, grads = attention_grads(inputs, backend)
        ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values()), shape
        _assert_relative(out, ref_out, 1e-4, f"{shape} out")
        if shape[2:] == (1, 1):  # one key: q and k get exactly zero gradient
            grads = {k: v for k, v in grads.items() if k not in ("wq", "bq", "wk", "bk")}
        _assert_grads(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_low_precision_like_eager(backend, dtype, variant):
    for shape in ((2, 64, 15, 20), (2, 256, 32, 32)):
        poison_allocator()
        check_low_precision(backend, dtype, attention_inputs(variant, *shape, dtype=dtype, device="cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_spectral_norm_matches_torch(backend):
    torch.manual_seed(0)
    for make, shape in ((lambda: nn.Conv2d(256, 512, 3), (2, 256, 8, 8)), (lambda: nn.Linear(1000, 7), (5, 1000))):
        theirs = torch.nn.utils.spectral_norm(make().cuda())
        ours = sagan_ext.spectral_norm(make().cuda(), backend=backend)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(*shape, device="cuda")
        for _ in range(3):
            poison_allocator()
            y_t, y_o = theirs(x), ours(x)
            torch.testing.assert_close(y_o, y_t, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.weight_u, theirs.weight_u, rtol=1e-4, atol=1e-6)
            g = torch.randn_like(y_t)
            theirs.zero_grad(), ours.zero_grad()
            y_t.backward(g), y_o.backward(g)
            torch.testing.assert_close(ours.weight_orig.grad, theirs.weight_orig.grad, rtol=1e-4, atol=1e-6)


def test_auto_picks_cuda_and_compile_fullgraph_matches_eager():
    from sagan_ext.backends import select
    assert select("auto", torch.device("cuda"), torch.float16).name == "cuda"
    from test_api import TinyDiscriminator
    torch.manual_seed(0)
    eager, compiled = TinyDiscriminator().cuda(), TinyDiscriminator().cuda()
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    for _ in range(2):
        torch.testing.assert_close(step(x), eager(x), rtol=1e-4, atol=1e-5)
