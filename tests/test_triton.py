"""The Triton backend against the reference: forward and every gradient (fp32 to 1e-4 of float64,
fp16 like eager), both variants, N = 1, 15, 63 (7 x 9), 256 and a ragged 300, query/key dim 1 to
64, value dim up to 512, batch 1-2, large logits (fp32 gradients within 3x of eager's own error),
channel-major and position-major q/k/v/dO; its spectral norm against torch's. Without a GPU the
kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), with one pinned small
block config so that every shape has ragged tails; bf16 is refused there (the interpreter's bf16
dot is wrong) and proven by tests/test_triton_compile.py instead."""
import pytest
import torch
from torch import nn

import sagan_ext
from sagan_ext import reference

from sagan_ext_testing import (assert_grads, assert_relative, attention_grads, attention_inputs, check_large_logits,
                               check_low_precision, reference_grads)

triton = pytest.importorskip("triton", reason="triton is not installed on this platform")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels interpreted

# (variant, (B, C, H, W), C / query-key dim): dk 1, 2, 8, 16, 32, 48 (padded to 64 in the kernel), 64;
# dv 8 to 512 (16 per interpreted tile: 32 tiles at 512)
CASES = [("sagan", (2, 8, 1, 1), 8), ("sagan", (2, 8, 7, 9), 8), ("sagan", (1, 64, 16, 16), 8),
         ("sagan", (1, 16, 15, 20), 8), ("biggan", (2, 64, 7, 9), 8), ("biggan", (1, 16, 16, 16), 8),
         ("sagan", (1, 512, 3, 5), 8), ("sagan", (2, 32, 9, 7), 2), ("biggan", (1, 64, 6, 10), 2),
         ("sagan", (1, 48, 20, 15), 1)]


def test_triton_backend_is_available_here():
    assert sagan_ext.available_backends()["triton"] is None


@pytest.mark.parametrize("variant, shape, reduction", CASES, ids=[f"{v}-{'x'.join(map(str, s))}-dk{max(s[1] // r, 1)}"
                                                                  for v, s, r in CASES])
def test_float32_forward_and_every_gradient(variant, shape, reduction):
    inputs = attention_inputs(variant, *shape, dtype=torch.float32, qk_reduction=reduction, device=DEVICE)
    out, grads = attention_grads(inputs, "triton")
    ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    assert out.dtype == torch.float32 and grads.keys() == ref_grads.keys()
    assert_relative(out, ref_out, 1e-4, "out")
    if shape[2:] == (1, 1):  # one key: softmax is 1 whatever q and k are, so their gradients are 0
        for name in ("wq", "bq", "wk", "bk"):
            assert_relative(grads[name], ref_grads[name], 1e-4, f"d{name}", scale=ref_grads["x"].norm())
        grads = {k: v for k, v in grads.items() if k not in ("wq", "bq", "wk", "bk")}
    assert_grads(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("variant, shape, reduction", [("sagan", (2, 16, 9, 8), 8), ("biggan", (2, 16, 9, 8), 8),
                                                      ("sagan", (1, 128, 5, 7), 2)])
def test_float16_like_eager(variant, shape, reduction):
    inputs = attention_inputs(variant, *shape, dtype=torch.float16, qk_reduction=reduction, device=DEVICE)
    check_low_precision("triton", torch.float16, inputs)


@pytest.mark.parametrize("variant, x_scale", [("sagan", 10.0), ("sagan", 30.0), ("biggan", 10.0)])
def test_float32_large_logits_as_accurate_as_eager(variant, x_scale):
    """Scores of ~1e3 (x_scale 10) and ~1e4 (30): the backward recomputes s with the forward's own
    arithmetic and p = exp(s - m) / l from the saved row max and sum (a saved fp32 log-sum-exp put
    the 20-100% errors of issue 10 into the gradients)."""
    check_large_logits("triton", variant, x_scale, device=DEVICE)


@pytest.mark.parametrize("layout", ["channel-major", "position-major"])
def test_core_reads_either_layout_through_strides(layout):
    """The core ops on q, k, v, dO as ops.py passes them (channel-major views of one (B, P, N)
    projection) and as other callers do (contiguous, position-major): o, stats (row max and sum)
    and every gradient against the reference core in float64."""
    from sagan_ext import triton_kernels  # registers torch.ops.sagan_ext_triton
    b, n, dk, dv = 2, 37, 8, 40

    def views(proj, g):  # q, k, v, dO in the layout under test
        q, k, v = proj.transpose(1, 2).split([dk, dk, dv], dim=2)
        tensors = (q, k, v, g.transpose(1, 2))
        return tensors if layout == "channel-major" else tuple(t.contiguous() for t in tensors)
    proj, g = torch.randn(b, 2 * dk + dv, n, dtype=torch.float64), torch.randn(b, dv, n, dtype=torch.float64)
    q, k, v, do = views(proj, g)
    q32, k32, v32, do32 = views(proj.float().to(DEVICE), g.float().to(DEVICE))
    if layout == "channel-major":
        assert q32.stride() == ((2 * dk + dv) * n, 1, n) and do32.stride() == (dv * n, 1, n)
    ref_o, ref_stats = reference.attention_core(q, k, v)
    ref_grads = reference.attention_core_backward(do, q, k, v, ref_o, ref_stats)
    (forward,), _ = triton_kernels._forward_launches(q32, k32, v32, False)
    (_, backward), _ = triton_kernels._backward_launches(do32, q32, k32, v32, *forward.args[3:5], False)
    assert all(a is b for a, b in zip(forward.args, (q32, k32, v32))), "the forward copied an input"
    assert all(a is b for a, b in zip(backward.args, (q32, k32, v32, do32))), "the backward copied an input"
    o, stats = torch.ops.sagan_ext_triton.attention_forward(q32, k32, v32, False)
    assert stats.shape == (b, 2, n) and stats.dtype == torch.float32 and stats.is_contiguous()
    assert_relative(o.cpu(), ref_o, 1e-5, "o")
    assert_relative(stats.cpu(), ref_stats, 1e-5, "stats")
    grads = torch.ops.sagan_ext_triton.attention_backward(do32, q32, k32, v32, o, stats, False)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert_relative(g.cpu(), ref, 1e-5, name)


def _tma_is_testable():
    return not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not _tma_is_testable(), reason="TMA needs a Hopper (sm_90) or newer GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant, shape", [("sagan", (2, 16, 8, 6)), ("biggan", (1, 32, 8, 16))])
def test_forward_tma_path_like_the_reference(variant, shape, dtype, monkeypatch):
    """SAGAN_EXT_TRITON_TMA=1: the forward copies q, k, v tiles with TMA descriptors (on the CPU
    the interpreter runs their arithmetic: a transposed channel-major descriptor, zero padding of
    dk to DK_PAD and of the ragged tails; on a Hopper GPU the real copies). The whole block and its
    gradients, with the TMA launch checked to have been the one taken."""
    from sagan_ext import triton_kernels
    monkeypatch.setenv("SAGAN_EXT_TRITON_TMA", "1")
    taken = []
    run = triton_kernels._run
    monkeypatch.setattr(triton_kernels, "_run", lambda launches: (taken.extend(l.kwargs.get("TMA") for l in launches),
                                                                   run(launches))[1])
    inputs = attention_inputs(variant, *shape, dtype=dtype, device=DEVICE)
    if dtype == torch.float16:
        check_low_precision("triton", dtype, inputs)
    else:
        out, grads = attention_grads(inputs, "triton")
        ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
        assert_relative(out, ref_out, 1e-4, "out")
        assert_grads(grads, ref_grads, 1e-4)
    assert True in taken, f"no forward launch took the TMA path ({taken})"


@pytest.mark.parametrize("layout", ["channel-major", "position-major"])
def test_tma_only_where_its_alignment_holds(layout):
    """TMA needs every stride but the unit one and the base at 16 bytes: other inputs take the
    pointer path (whatever SAGAN_EXT_TRITON_TMA says), never a misaligned descriptor."""
    from sagan_ext import triton_kernels

    def qkv(n, dk=8, dv=16):
        proj = torch.randn(2, 2 * dk + dv, n)
        q, k, v = proj.transpose(1, 2).split([dk, dk, dv], dim=2)
        return (q, k, v) if layout == "channel-major" else tuple(t.contiguous() for t in (q, k, v))
    expected = layout == "channel-major"
    assert triton_kernels.tma_layout(*qkv(40)) is expected
    if layout == "channel-major":
        assert triton_kernels.tma_layout(*qkv(37)) is None  # 37 positions: 148-byte channel stride
        assert triton_kernels.tma_layout(*(t[:, 1:] for t in qkv(40))) is None  # bases 4 bytes off
    else:
        assert triton_kernels.tma_layout(*qkv(40, dk=6)) is None  # 24-byte row stride
    (forward,), _ = triton_kernels._forward_launches(*qkv(37), False, tma=True)
    assert forward.kwargs["TMA"] is (layout == "position-major")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for the interpreter")
def test_bfloat16_refused_under_the_interpreter():
    with pytest.raises(ValueError, match="interpreter.*bf16"):
        sagan_ext.self_attention(torch.randn(1, 8, 2, 2, dtype=torch.bfloat16), torch.randn(1, 8, dtype=torch.bfloat16),
                                 torch.randn(1, 8, dtype=torch.bfloat16), torch.randn(8, 8, dtype=torch.bfloat16),
                                 torch.zeros(1, dtype=torch.bfloat16), backend="triton")


def test_large_logits_stay_finite_and_exact():
    inputs = attention_inputs("sagan", 1, 16, 6, 6, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        inputs["wq"].mul_(60), inputs["wk"].mul_(60)  # scores of order 1e3: exp() overflows without the max
    out, grads = attention_grads(inputs, "triton")
    ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    q = reference.project(*(inputs[k].detach() for k in ("x", "wq", "bq", "wk", "bk", "wv", "bv")), False)
    assert torch.bmm(q[0], q[1].transpose(1, 2)).abs().max() > 500
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert_relative(out, ref_out, 1e-4, "out")
    for name in ("x", "wv", "gamma"):
        assert_relative(grads[name], ref_grads[name], 1e-3, f"d{name}")


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(24, 40, 3), lambda: nn.Linear(100, 33),
                                  lambda: nn.ConvTranspose2d(12, 6, 4)], ids=["conv", "linear", "conv_transpose"])
def test_spectral_norm_matches_torch(make):
    torch.manual_seed(0)
    base = make()
    theirs = torch.nn.utils.spectral_norm(make().to(DEVICE), n_power_iterations=2)
    ours = sagan_ext.spectral_norm(make().to(DEVICE), n_power_iterations=2, backend="triton")
    ours.load_state_dict(theirs.state_dict())
    shapes = {nn.Conv2d: (24, 9, 9), nn.ConvTranspose2d: (12, 5, 5), nn.Linear: (100,)}
    shape = shapes[type(base)]
    x = torch.randn(3, *shape, device=DEVICE)
    for step in range(3):
        y_t, y_o = theirs(x), ours(x)
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        for buf in ("weight_u", "weight_v"):
            torch.testing.assert_close(getattr(ours, buf), getattr(theirs, buf), rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y_t)
        theirs.zero_grad(), ours.zero_grad()
        y_t.backward(g), y_o.backward(g)
        torch.testing.assert_close(ours.weight_orig.grad, theirs.weight_orig.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for m in (theirs, ours):
                m.weight_orig.sub_(0.1 * m.weight_orig.grad)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_spectral_norm_gradient_of_sigma():
    w = torch.randn(20, 30, device=DEVICE, requires_grad=True)
    u = nn.functional.normalize(torch.randn(20, device=DEVICE), dim=0)
    v = nn.functional.normalize(torch.randn(30, device=DEVICE), dim=0)
    gs = torch.randn((), device=DEVICE)
    g = torch.randn(20, 30, device=DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        w_sn, sigma = sagan_ext.spectral_normalize(w, u.clone(), v.clone(), backend=backend)
        results[backend] = torch.autograd.grad((w_sn * g).sum() + gs * sigma, w)[0]
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: under the interpreter, fake-tensor tracing "
                    "would launch the interpreted kernels on meta tensors")
@pytest.mark.parametrize("tma", ["0", "1"])
def test_opcheck_triton_ops(tma, monkeypatch):
    monkeypatch.setenv("SAGAN_EXT_TRITON_TMA", tma)  # "1": TMA when run, the pointer path when traced
    q, k, v = (torch.randn(2, 20, d, device="cuda") for d in (8, 8, 24))
    torch.library.opcheck(torch.ops.sagan_ext_triton.attention_forward, (q, k, v, False))
    stats = torch.ops.sagan_ext_triton.attention_forward(q, k, v, False)[1]
    o, do = torch.randn(2, 20, 24, device="cuda"), torch.randn(2, 20, 24, device="cuda")
    torch.library.opcheck(torch.ops.sagan_ext_triton.attention_backward, (do, q, k, v, o, stats, False))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "cropped", "one_row"])
def test_fused_residual_epilogue_writes_x_layout(layout):
    """The paper variant's residual x + gamma * o is written by the forward kernel's epilogue in
    x's own layout (NCHW, channels_last, a strided view, H = 1); x whose H and W do not merge (a
    cropped view) takes the unfused residual."""
    h = 1 if layout == "one_row" else 6
    inputs = attention_inputs("sagan", 2, 16, h, 10, dtype=torch.float32, device=DEVICE)
    x = inputs["x"].detach()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], 3)[..., ::2]
    elif layout == "cropped":
        x = torch.cat([x, x], 3)[..., :10]
    inputs["x"] = x.requires_grad_()
    out, grads = attention_grads(inputs, "triton")
    ref_out, ref_grads = reference_grads({k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    assert_relative(out, ref_out, 1e-4, "out")
    assert_grads(grads, ref_grads, 1e-4)


def _core_case(device, dtype=torch.float32, dv=64, n=64, seed=0):
    """q, k, v, dO of one (B=1, n, dk=16, dv) core in `dtype`, and the gradients of those same
    (rounded) values in float64."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, n, 16, generator=g) * 0.7 for _ in range(2))
    v, do = torch.randn(1, n, dv, generator=g), torch.randn(1, n, dv, generator=g)
    inputs = [t.to(dtype) for t in (q, k, v, do)]
    q, k, v, do = (t.double() for t in inputs)
    ref_o, ref_stats = reference.attention_core(q, k, v)
    ref_grads = reference.attention_core_backward(do, q, k, v, ref_o, ref_stats)
    return [t.to(device) for t in inputs], ref_grads


def test_autotuning_does_not_add_its_timed_runs_into_the_gradients(monkeypatch):
    """The backward adds dQ and dK into zeroed buffers with atomics; the autotuner times each config
    by running the kernel many times on the call's own buffers. Driven here through Triton's own
    Autotuner (its timing function replaced by one that runs the kernel 3 times, as do_bench runs it
    many), on the CPU under the interpreter: the first backward at a new shape, the one that tunes,
    must equal float64, not the sum of every timed run."""
    from sagan_ext import triton_kernels
    timed = []

    def run_three_times(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        timed.append(kernel_call)
        return [100.0 - len(timed)] * len(quantiles)  # the last config timed "wins"

    (q, k, v, do), ref_grads = _core_case(DEVICE)
    tiles = triton_kernels.kept_tiles(triton_kernels.BACKWARD_TILES, "fma", 64, 64, 64)
    tuner = triton_kernels.autotuned(tiles=tiles, **triton_kernels.BACKWARD_TUNING, do_bench=run_three_times)
    monkeypatch.setattr(triton_kernels, "_tuned_kernel", lambda tuning, tiles: tuner if tuning["kernel"] is tuner.fn
                        else tuning["kernel"])
    monkeypatch.setattr(triton_kernels, "PINNED", {})  # the tuner's configs pick the tiles
    o, stats = reference.attention_core(q, k, v)
    grads = torch.ops.sagan_ext_triton.attention_backward(do, q, k, v, o, stats, False)
    assert len(timed) >= 2, "the autotuner did not time several configs: this test proves nothing"
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_relative(got.cpu(), want, 1e-5, name)
    # inside CUDA-graph capture the tuner is bypassed: the config it chose for these arguments
    (_, launch), _ = triton_kernels._backward_launches(do, q, k, v, o, stats, False)
    kernel, kwargs = triton_kernels.untuned_launch(launch.kernel, launch.args, launch.kwargs)
    assert kernel is tuner.fn and kwargs == {**launch.kwargs, **tuner.best_config.all_kwargs()}
    assert tuner.best_config is not tuner.configs[0], "the first config won: the cache lookup is not tested"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter never autotunes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_backward_after_tuning_matches_float64_on_the_gpu(dtype):
    """On a GPU, the first backward at a shape no test used before (the call that autotunes, its
    tuning cache emptied first) against float64."""
    from sagan_ext import triton_kernels
    triton_kernels._tuners.clear()  # fresh autotuners: this call tunes
    (q, k, v, do), ref_grads = _core_case("cuda", dtype, dv=192, n=1000, seed=1)
    o, stats = torch.ops.sagan_ext_triton.attention_forward(q, k, v, False)
    grads = torch.ops.sagan_ext_triton.attention_backward(do, q, k, v, o, stats, False)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_relative(got.double().cpu(), want, tol, name)


def test_every_autotuner_resets_what_its_kernel_accumulates(monkeypatch):
    """Each autotuner the launch builders make (as on a GPU) declares reset_to_zero for every
    buffer its kernel adds to with tl.atomic_add, and has no prune_configs_by: torch.compile's
    tracing rebuilds an autotuner that has one without its reset_to_zero (found by opcheck's
    aot_dispatch_dynamic on the first GPU run), so pruning happens before the tuner is chosen."""
    import inspect
    import re
    from sagan_ext import triton_kernels
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    monkeypatch.setattr(triton_kernels, "_tuners", {})
    checked = 0
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False)):
        for n, m, dv in ((1, 1, 8), (63, 15, 130), (1024, 1024, 256)):
            q, k = torch.randn(2, n, 16, dtype=dtype), torch.randn(2, m, 16, dtype=dtype)
            v, do = torch.randn(2, m, dv, dtype=dtype), torch.randn(2, n, dv, dtype=dtype)
            forward, (_, o, stats) = triton_kernels._forward_launches(q, k, v, tf32)
            backward, _ = triton_kernels._backward_launches(do, q, k, v, o, stats, tf32)
            for launch in forward + backward:
                if not isinstance(launch.kernel, triton.runtime.Autotuner):
                    continue
                source = inspect.getsource(launch.kernel.base_fn)
                accumulated = set(re.findall(r"tl\.atomic_add\((\w+)", source))
                assert accumulated <= set(launch.kernel.reset_to_zero), (launch.kernel.base_fn.__name__, accumulated)
                assert launch.kernel.early_config_prune is None and launch.kernel.perf_model is None
                checked += 1
    tuned = {name for name, _ in triton_kernels._tuners}
    assert checked == 18 and tuned == {"_attention_forward", "_attention_backward"}


@pytest.mark.parametrize("mean", [0.0, 10.0])
def test_ds_rounded_once_whatever_the_value_tiles(mean):
    """fp16 dK with the value dim split into tiles (4 of 16 under the interpreter; on a GPU where
    dv > 256): dS = p (dP - delta) is rounded to fp16 once, from the whole dP. Rounding each tile's
    partial dS instead made the error grow with the features' mean (GAN features are not zero-mean):
    dK's error against float64 went from 2.5e-3 (mean 0) to 3e-2 (mean 10) at N = 1024."""
    from sagan_ext import triton_kernels  # noqa: F401  (registers the ops)
    g = torch.Generator().manual_seed(3)
    b, n, dk, dv = 1, 96, 16, 64
    q, k = (torch.randn(b, n, dk, generator=g) * 0.7 for _ in range(2))
    v, do = (torch.randn(b, n, dv, generator=g) + mean for _ in range(2))
    q, k, v, do = (t.to(torch.float16).to(DEVICE) for t in (q, k, v, do))
    o, stats = torch.ops.sagan_ext_triton.attention_forward(q, k, v, False)
    _, dk_, _ = torch.ops.sagan_ext_triton.attention_backward(do, q, k, v, o, stats, False)
    q64, k64, v64, do64 = (t.double().cpu() for t in (q, k, v, do))
    ref_o, ref_stats = reference.attention_core(q64, k64, v64)
    _, ref_dk, _ = reference.attention_core_backward(do64, q64, k64, v64, ref_o, ref_stats)
    assert_relative(dk_.cpu(), ref_dk, 4e-3, f"dk at mean {mean}")
