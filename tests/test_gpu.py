"""GPU checks (they skip without CUDA): the cuda and triton backends against the reference on
float64-upcast inputs, fp32/bf16/fp16, odd shapes, outputs allocated in NaN-poisoned memory (an
element a kernel forgets to write stays NaN); spectral norm against torch's; torch.compile
through the CUDA path. benchmarks/gpu_check.sh runs these on the lent GPU."""
from pathlib import Path

import pytest
import torch
from torch import nn

import sagan_ext

from sagan_ext_testing import (GPU_BACKENDS, TinyDiscriminator, assert_grads, assert_relative, attention_grads,
                               attention_inputs, check_large_logits, check_low_precision, reference_grads)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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
        assert_relative(out, ref_out, 1e-4, f"{shape} out")
        if shape[2:] == (1, 1):  # one key: q and k get exactly zero gradient
            grads = {k: v for k, v in grads.items() if k not in ("wq", "bq", "wk", "bk")}
        assert_grads(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_low_precision_like_eager(backend, dtype, variant):
    for shape in ((2, 64, 15, 20), (2, 256, 32, 32)):
        poison_allocator()
        check_low_precision(backend, dtype, attention_inputs(variant, *shape, dtype=dtype, device="cuda"))


@pytest.fixture
def full_fp32():
    """fp32 matmuls and cuDNN convolutions in full fp32: cuDNN's default TF32 rounds a conv's
    operands to 10 bits, so two evaluations of one conv on weights one ulp apart differ by ~1e-3."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_spectral_norm_matches_torch(backend, full_fp32):
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


# The CUDA kernels' own paths: FFMA (fp32 without TF32), tensor cores (tf32, fp16, bf16).
CUDA_PATHS = {"fp32": (torch.float32, False, 1e-4), "tf32": (torch.float32, True, 4e-3),
              "fp16": (torch.float16, False, 2e-3), "bf16": (torch.bfloat16, False, 1.6e-2)}
# (B, N, M, dk, dv): one key; ragged N with the paper's M = N; pooled M = N / 4; dk 8..64 buckets; dv up to 512
CORE_SHAPES = [(1, 1, 1, 8, 8), (3, 63, 63, 24, 130), (1, 300, 300, 32, 64), (3, 63, 15, 64, 8),
               (1, 300, 75, 8, 256), (1, 1024, 256, 32, 512), (3, 1024, 1024, 64, 256)]


def _core_ops():
    from sagan_ext.backends import BACKENDS
    assert BACKENDS["cuda"].unavailable() is None
    return torch.ops.sagan_ext_cuda


def _relative(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("channel_major", [True, False], ids=["channel_major", "position_major"])
def test_attention_core_kernels_match_float64(path, channel_major):
    """Each kernel path on the attention core directly, against float64 on the same rounded inputs;
    channel-major views (as ops.py passes them) and position-major tensors; outputs in NaN memory."""
    ops, (dtype, tf32, tol) = _core_ops(), CUDA_PATHS[path]
    torch.manual_seed(0)
    for b, n, m, dk, dv in CORE_SHAPES:
        sd = (9.0 / dk) ** 0.25  # scores with standard deviation 3
        q, k, v, do = (t.to("cuda", dtype) for t in (torch.randn(b, n, dk) * sd, torch.randn(b, m, dk) * sd,
                                                       torch.randn(b, m, dv), torch.randn(b, n, dv)))
        if channel_major:
            q, k, v, do = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, do))
        x, gamma = torch.randn(b, dv, 1, n, device="cuda", dtype=dtype), torch.tensor([0.7], device="cuda", dtype=dtype)
        stream = torch.cuda.current_stream().cuda_stream
        poison_allocator()
        out, o, stats = ops.attention_forward_residual(q, k, v, x, gamma, tf32, stream)
        dq, dk_, dv_ = ops.attention_backward(do, q, k, v, o, stats, tf32, stream)
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        s = q64 @ k64.transpose(1, 2)
        o64 = torch.softmax(s, -1) @ v64
        grads = torch.autograd.grad(o64, (q64, k64, v64), do.double())
        m64 = s.max(-1).values.detach()
        l64 = torch.exp(s - m64[..., None]).sum(-1).detach()
        o64 = o64.detach()
        shape = (path, b, n, m, dk, dv)
        assert o.is_contiguous() and stats.is_contiguous(), "every backend returns o (B, N, dv) contiguous"
        for t in (out, o, stats, dq, dk_, dv_):
            assert torch.isfinite(t).all(), shape
        assert _relative(o, o64) < tol, shape
        assert _relative(out, x.double() + gamma.double() * o64.transpose(1, 2).reshape(x.shape)) < tol, shape
        assert _relative(stats[:, 0], m64) < (1e-3 if tf32 else 1e-5), shape
        assert _relative(stats[:, 1], l64) < (4e-3 if tf32 else 1e-5), shape
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk_, dv_), grads):
            assert _relative(got, want) < tol, (name, shape)


@pytest.mark.parametrize("path", CUDA_PATHS)
def test_no_queries_gives_zero_key_and_value_gradients(path):
    """N = 0 queries (keys remain): the forward returns empty o and stats; the backward still writes
    dK and dV, as zeros (no query attends to any key), into outputs that start as NaN."""
    ops, (dtype, tf32, _) = _core_ops(), CUDA_PATHS[path]
    stream = torch.cuda.current_stream().cuda_stream
    q, k, v = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((2, 0, 32), (2, 5, 32), (2, 5, 64)))
    o, stats = ops.attention_forward(q, k, v, tf32, stream)
    assert o.shape == (2, 0, 64) and stats.shape == (2, 2, 0)
    poison_allocator()
    dq, dk, dv = ops.attention_backward(torch.randn(2, 0, 64, device="cuda", dtype=dtype), q, k, v, o, stats, tf32, stream)
    assert dq.shape == (2, 0, 32) and dk.shape == k.shape and dv.shape == v.shape
    assert (dk == 0).all() and (dv == 0).all()


def test_backward_refuses_stats_on_another_device():
    ops = _core_ops()
    stream = torch.cuda.current_stream().cuda_stream
    q, k, v = (torch.randn(1, 6, d, device="cuda") for d in (8, 8, 16))
    o, stats = ops.attention_forward(q, k, v, False, stream)
    with pytest.raises(RuntimeError, match="stats must be on cuda"):
        ops.attention_backward(torch.randn_like(o), q, k, v, o, stats.cpu(), False, stream)


@pytest.mark.parametrize("path", ["tf32", "fp16", "bf16"])
def test_deterministic_mode_is_bitwise_repeatable(path):
    """torch.use_deterministic_algorithms(True): the tensor-core backward adds dQ in key-block
    order (per-query-block counters), so two runs are bitwise equal; and the result is the atomic
    mode's to rounding. Several key blocks add to every dQ row here (M = 300, 64-key blocks)."""
    ops, (dtype, tf32, tol) = _core_ops(), CUDA_PATHS[path]
    torch.manual_seed(0)
    b, n, m, dk, dv = 2, 200, 300, 24, 130
    q, k, v, do = (torch.randn(*shape, device="cuda").to(dtype)
                   for shape in ((b, n, dk), (b, m, dk), (b, m, dv), (b, n, dv)))
    stream = torch.cuda.current_stream().cuda_stream
    o, stats = ops.attention_forward(q, k, v, tf32, stream)
    atomic = ops.attention_backward(do, q, k, v, o, stats, tf32, stream)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [ops.attention_backward(do, q, k, v, o, stats, tf32, stream) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for run in runs[1:]:
        for name, got, first in zip(("dq", "dk", "dv"), run, runs[0]):
            assert torch.equal(got, first), f"{name} differs between deterministic runs"
    for name, got, other in zip(("dq", "dk", "dv"), runs[0], atomic):
        assert _relative(got, other.double()) < tol, name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mean_shifted_features_like_eager(backend, dtype):
    """GAN features are not zero-mean: x shifted by +3 (so v and dO too) in fp16/bf16, against
    float64 within twice eager's own error (a dS rounded per value tile grew with the mean)."""
    for variant in ("sagan", "biggan"):
        inputs = attention_inputs(variant, 2, 256, 32, 32, dtype=dtype, device="cuda")
        with torch.no_grad():
            inputs["x"].add_(3.0)
        poison_allocator()
        check_low_precision(backend, dtype, inputs)


@pytest.fixture(scope="module")
def ptx_selftest():
    """The test-only fragment-loader self-test (tests/cuda), built for this GPU beside the library."""
    from torch.utils import cpp_extension
    from sagan_ext import _build
    _core_ops()  # the library's own build first: the same flags
    here = Path(__file__).resolve().parent / "cuda"
    cpp_extension.load(name="sagan_ext_ptx_selftest",
                       sources=[str(here / "ptx_selftest.cu"), str(here / "ptx_selftest_binding.cpp")],
                       extra_include_paths=[str(_build.csrc_dir() / "cuda"), str(here)], is_python_module=False,
                       extra_cuda_cflags=_build.nvcc_flags() + _build._device_arch_flags(), verbose=False)
    return torch.ops.sagan_ext_test.ptx_mma_selftest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])
def test_fragment_loaders_match_matmul(ptx_selftest, dtype, variant):
    """One mma per n-tile through each of the tensor-core kernels' fragment loaders (ldmatrix x4 /
    x2, .trans, cp.async, packing from an accumulator, cvt to TF32) against torch.matmul, on
    values every format holds exactly (so the result is exact): a wrong fragment layout moves
    elements and fails here before it can hide in attention's error."""
    kk = 8 if dtype == torch.float32 else 16
    torch.manual_seed(variant)
    a = (torch.randint(-8, 9, (16, kk)) / 4).to("cuda", dtype)
    b = (torch.randint(-8, 9, (kk, 16)) / 4).to("cuda", dtype)
    d = ptx_selftest(a, b, dtype == torch.float32, variant, torch.cuda.current_stream().cuda_stream)
    torch.testing.assert_close(d, torch.matmul(a.double(), b.double()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("variant, x_scale", [("sagan", 10.0), ("biggan", 10.0)])
def test_float32_large_logits_as_accurate_as_eager(variant, x_scale):
    """fp32 without TF32 (the FFMA kernels) at scores ~1e3: within 3x of eager's own fp32 error."""
    torch.backends.cuda.matmul.allow_tf32 = False
    check_large_logits("cuda", variant, x_scale, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_tf32_block_like_eager_tf32(backend, variant):
    """fp32 with TF32 allowed (tensor cores, 10-bit operands): against float64, at most twice the
    eager block's own error with TF32 allowed, plus 1e-2, as for bf16/fp16. The first GPU run
    measured dx at 1.2e-2 (BigGAN block, 2x256x32x32): a fixed 5e-3 was below what TF32 itself does."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for shape in ((2, 64, 15, 20), (2, 256, 32, 32)):
            poison_allocator()
            inputs = attention_inputs(variant, *shape, dtype=torch.float32, device="cuda")
            check_low_precision(backend, torch.float32, inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_auto_picks_the_measured_fastest_and_compile_fullgraph_matches_eager():
    from sagan_ext.backends import select
    for dtype, tf32, fastest in ((torch.float16, False, "cuda"), (torch.bfloat16, False, "cuda"),
                                 (torch.float32, True, "triton"), (torch.float32, False, "cuda")):
        assert select("auto", torch.device("cuda"), dtype, tf32).name == fastest, (dtype, tf32)
    torch.manual_seed(0)
    eager, compiled = TinyDiscriminator().cuda(), TinyDiscriminator().cuda()
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    for _ in range(2):
        torch.testing.assert_close(step(x), eager(x), rtol=1e-4, atol=1e-5)
