"""The public API's contract: argument errors, backend choice, torch.library registration."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import sagan_ext
from sagan_ext import ops

from sagan_ext_testing import CPU_BACKENDS, TinyDiscriminator, attention_inputs


def _call(x=None, **over):
    inputs = {k: v.detach() for k, v in attention_inputs("sagan", 2, 16, 4, 4, dtype=torch.float32).items()}
    inputs.update(over)
    x = inputs["x"] if x is None else x
    return sagan_ext.self_attention(x, inputs["wq"], inputs["wk"], inputs["wv"], inputs["gamma"],
                                    query_bias=inputs["bq"], key_bias=inputs["bk"], value_bias=inputs["bv"],
                                    **{k: v for k, v in over.items() if k in ("backend", "pool", "out_weight")})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(x=torch.randn(2, 16, 16)), ValueError, "x must be a 4-D"),
    (dict(x=torch.randint(0, 3, (2, 16, 4, 4))), TypeError, "x must be a floating-point"),
    (dict(x=torch.randn(0, 16, 4, 4)), ValueError, "x must not be empty"),
    (dict(x=torch.randn(2, 12, 4, 4)), ValueError, r"query_weight must have shape \(out_channels, 12\)"),
    (dict(wk=torch.randn(3, 16)), ValueError, "key_weight must have shape"),
    (dict(wv=torch.randn(8, 16)), ValueError, "value_weight must have 16 output channels"),
    (dict(bq=torch.randn(3)), ValueError, "query_bias must have shape"),
    (dict(wq=torch.randn(2, 16, dtype=torch.float64)), TypeError, "query_weight has dtype"),
    (dict(gamma=torch.zeros(2)), ValueError, "gamma must hold a single value"),
    (dict(wq=torch.randn(2, 16, 3, 3)), ValueError, "query_weight must be a"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda' cannot run"),
    (dict(x=torch.randn(2, 16, 1, 4), pool=True, out_weight=torch.randn(16, 16)), ValueError, "height and width >= 2"),
])
def test_bad_attention_inputs_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(**kwargs)


def test_device_mismatch_is_a_value_error():
    meta = torch.empty(2, 16, device="meta")
    with pytest.raises(ValueError, match="query_weight is on meta but x is on cpu"):
        _call(wq=meta)


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="in_channels=12 must be a positive int divisible by qk_reduction=8"):
        sagan_ext.FusedSelfAttention(12)
    with pytest.raises(ValueError, match="variant must be"):
        sagan_ext.FusedSelfAttention(16, "transformer")
    with pytest.raises(ValueError, match="divisible by v_reduction=3"):
        sagan_ext.FusedSelfAttention(16, "biggan", v_reduction=3)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', .*got 'bogus'"):
        sagan_ext.FusedSelfAttention(16, backend="bogus")  # at construction, not at the first forward
    with pytest.raises(ValueError, match="backend must be one of"):
        sagan_ext.spectral_norm(nn.Linear(3, 4), backend="bogus")
    with pytest.raises(ValueError, match="power_iteration_in_eval=True needs spectral_norm=True"):
        sagan_ext.FusedSelfAttention(16, power_iteration_in_eval=True)


@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_module_channel_mismatch_names_in_channels(variant):
    block = sagan_ext.FusedSelfAttention(32, variant)
    with pytest.raises(ValueError, match=r"x has 16 channels \(shape \(2, 16, 4, 4\)\) but this FusedSelfAttention "
                                         r"has in_channels=32"):
        block(torch.randn(2, 16, 4, 4))


def test_available_backends_explain_themselves():
    status = sagan_ext.available_backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"] is None and status["cpu"] is None  # the C++ build must work here
    if not torch.cuda.is_available():
        assert isinstance(status["cuda"], str) and status["cuda"]
    from sagan_ext.backends import select
    assert select("auto", torch.device("cpu"), torch.float32).name == "cpu"


@pytest.fixture
def restore_tf32_flag():
    """Puts torch.backends.cuda.matmul.allow_tf32 back after the test. Not monkeypatch: the flag is
    a property of torch's cuBLASModule (not in its __dict__), which pytest 9's monkeypatch cannot undo."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_backward_gets_the_forwards_tf32_choice(monkeypatch, restore_tf32_flag):
    # GPU backends recompute the scores in the backward with the forward's arithmetic: if the TF32
    # flag flips between forward and backward (a context manager around the forward, say), the
    # backward must still be told what the forward did, or p = exp(s - m) / l stops summing to 1.
    reference_backend = sagan_ext.backends.BACKENDS["reference"]
    seen = []
    backward = reference_backend.attention_core_backward
    monkeypatch.setattr(reference_backend, "attention_core_backward",
                        lambda *args: seen.append(args[-1]) or backward(*args))
    inputs = attention_inputs("sagan", 1, 16, 3, 4, dtype=torch.float32)
    for forward_flag in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = forward_flag
        out = sagan_ext.self_attention(inputs["x"], inputs["wq"], inputs["wk"], inputs["wv"], inputs["gamma"],
                                       backend="reference")
        torch.backends.cuda.matmul.allow_tf32 = not forward_flag
        out.sum().backward()
    assert seen == [True, False]


@pytest.mark.parametrize("capability, fp16_refused, tf32", [((7, 5), True, False), ((8, 0), False, True),
                                                       ((9, 0), False, True)])
def test_cuda_backend_keeps_tensor_core_paths_to_sm80(monkeypatch, capability, fp16_refused, tf32):
    # The mma.sync kernels need sm_80: on a T4 or V100 fp16/bf16 must go to the next backend, and
    # fp32 to the FFMA kernels even with TF32 allowed. (Dispatch only: no GPU here.)
    cuda = sagan_ext.backends.BACKENDS["cuda"]
    monkeypatch.setattr(type(cuda), "unavailable", lambda self: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    device = torch.device("cuda", 0)
    for dtype in (torch.float16, torch.bfloat16):
        reason = cuda.refusal(device, dtype)
        assert (reason is not None and "sm_80" in reason) == fp16_refused, reason
    assert cuda.refusal(device, torch.float32) is None
    assert cuda._tf32(torch.empty(0, device="meta"), True) is tf32


@pytest.mark.parametrize("cls", [sagan_ext.FusedSelfAttention, sagan_ext.EagerSelfAttention])
def test_return_attention_is_keyword_only_and_y_is_taken_only_where_biggan_passes_it(cls):
    x, y = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    plain = cls(16, "biggan")
    with pytest.raises(TypeError, match=r"takes x as its only positional argument \(return_attention is keyword-only\)"
                                        r", got a second one of type bool"):
        plain(x, True)
    with pytest.raises(TypeError, match="got a second one of type Tensor; .* accepts_y=True"):
        plain(x, y)
    taking_y = cls(16, "biggan", accepts_y=True)
    taking_y.load_state_dict(plain.state_dict())
    torch.testing.assert_close(taking_y(x, y), plain(x), rtol=0, atol=0)
    out, attention = taking_y(x, y, return_attention=True)
    assert attention.shape == (2, 16, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["sagan", "biggan"])
def test_opcheck_attention(backend, variant):
    inputs = attention_inputs(variant, 2, 16, 4, 6, dtype=torch.float64)
    x, wq, wk, wv, gamma = (inputs[k] for k in ("x", "wq", "wk", "wv", "gamma"))
    args = (x, wq, inputs.get("bq"), wk, inputs.get("bk"), wv, inputs.get("bv"), inputs.get("wo"), gamma,
            variant == "biggan", backend)
    torch.library.opcheck(ops.attention_forward, args)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager = TinyDiscriminator()
    compiled = TinyDiscriminator()
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        eager.attention.gamma.fill_(0.5), compiled.attention.gamma.fill_(0.5)
    step = torch.compile(compiled, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):  # two training steps: u, v buffers advance in both
        y_e, y_c = eager(x), step(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
        y_e.sum().backward(), y_c.sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(compiled.conv.weight_u, eager.conv.weight_u)


# One compile of a block, run in a fresh process against a given inductor cache: what the caches
# said (hits and misses of inductor's FX graph cache and AOTAutograd's) and the ops' names.
_COMPILE_ONCE = r"""
import json, sys, torch
from torch._dynamo.utils import counters
import sagan_ext
x, wq, wk, wv = torch.randn(2, 16, 4, 4), torch.randn(2, 16), torch.randn(2, 16), torch.randn(16, 16)
block = torch.compile(lambda x: sagan_ext.self_attention(x, wq, wk, wv, torch.ones(1), backend="reference"),
                      fullgraph=True)
with torch.no_grad():
    block(x)
cache = {k: v for group in ("inductor", "aot_autograd") for k, v in counters[group].items() if "cache" in k}
print(json.dumps(dict(cache=cache, op=str(sagan_ext.ops.attention_forward), file=sagan_ext.__file__)))
"""


def _compile_once(package_parent, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE"))}
    env.update(PYTHONPATH=str(package_parent), TORCHINDUCTOR_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], env=env, cwd=str(package_parent), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).parent.parent == Path(package_parent), result  # the copy meant, not another
    result["hits"] = sum(v for k, v in result["cache"].items() if k.endswith("_hit"))
    return result


def test_a_warm_compile_cache_never_replays_graphs_of_another_operator_contract(tmp_path):
    """An older sagan_ext (here: the attention op's fake implementation before the row statistics
    became (B, 2, N)) compiled a graph into the inductor cache; this sagan_ext must compile its own
    instead of replaying that one, and must still reuse its own graphs."""
    package = Path(sagan_ext.__file__).parent
    old = tmp_path / "old"
    shutil.copytree(package, old / "sagan_ext", ignore=shutil.ignore_patterns("__pycache__", "csrc", "*.so"))
    ops_file = old / "sagan_ext" / "ops.py"
    source = ops_file.read_text()
    assert source.count("x.new_empty((b, 2, n), dtype=") == 1, "the stats line of the fake moved: update this test"
    ops_file.write_text(source.replace("x.new_empty((b, 2, n), dtype=", "x.new_empty((b, n), dtype="))
    cache = tmp_path / "inductor-cache"

    older = _compile_once(old, cache)
    assert older["hits"] == 0, older  # a cold cache: compiled and stored
    current = _compile_once(package.parent, cache)
    assert current["hits"] == 0, f"a graph compiled against another contract was replayed: {current}"
    assert current["op"] != older["op"]
    again = _compile_once(package.parent, cache)
    assert again["hits"] > 0 and again["op"] == current["op"], f"the cache should serve its own graphs: {again}"


def test_the_contract_covers_what_the_traced_formulas_call(monkeypatch):
    """The autograd formulas call the reference module under create_graph (the attention block's
    double backward, spectral norm's backward: a gradient penalty traces them) and the fakes call
    it too: its source is in the contract's fingerprint, so a change there renames the ops."""
    from sagan_ext import ops, reference
    hashed = []
    monkeypatch.setattr(ops, "_source", lambda obj: hashed.append(obj) or b"")
    ops.contract_fingerprint()
    assert reference in hashed and ops._attention_double_backward in hashed


def test_renamed_names_still_work_and_say_their_new_names():
    """Names that meant two things were renamed; the old ones work as before, with a DeprecationWarning."""
    from sagan_ext import biggan_checkpoints, dropin, models
    from sagan_ext.attention import SelfAttentionBlock

    eager = sagan_ext.EagerSelfAttention(16)  # no longer a FusedSelfAttention: both are SelfAttentionBlocks
    assert isinstance(eager, SelfAttentionBlock) and type(eager).__mro__[1] is SelfAttentionBlock
    with pytest.warns(DeprecationWarning, match="EagerSelfAttention is no longer a FusedSelfAttention"):
        assert isinstance(eager, sagan_ext.FusedSelfAttention)
    with pytest.warns(DeprecationWarning, match="SelfAttentionBlock"):
        assert issubclass(sagan_ext.EagerSelfAttention, sagan_ext.FusedSelfAttention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(sagan_ext.FusedSelfAttention(16), sagan_ext.FusedSelfAttention)
        assert not isinstance(nn.Linear(2, 2), sagan_ext.FusedSelfAttention)
    # sagan_ext.biggan named the attention variant and BigGAN-PyTorch's checkpoint format
    for old, new in (("replace_attention", dropin.replace_biggan_attention),
                     ("from_biggan_state_dict", biggan_checkpoints.from_biggan_state_dict),
                     ("to_biggan_state_dict", biggan_checkpoints.to_biggan_state_dict)):
        with pytest.warns(DeprecationWarning, match=f"sagan_ext.biggan.{old} is deprecated: use {new.__module__}"):
            assert getattr(sagan_ext.biggan, old) is new
    # models.apply_spectral_norm (a whole model) beside sagan_ext.spectral_norm (one layer)
    with pytest.warns(DeprecationWarning, match="use spectral_norm_every_layer"):
        model = models.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4)))
    assert set(model.state_dict()) == {"0.weight_orig", "0.weight_u", "0.weight_v", "0.bias"}
    # sagan_ext.train's helpers, now in the modules of their concerns
    from sagan_ext import run_folder, sample, train, train_config
    for old, new in (("parser", train_config.parser), ("sample_parser", sample.parser),
                     ("prune_checkpoints", run_folder.prune_checkpoints), ("holds_run", run_folder.holds_run)):
        with pytest.warns(DeprecationWarning, match=f"sagan_ext.train.{old} is deprecated: use {new.__module__}"):
            assert getattr(train, old) is new
    with pytest.warns(DeprecationWarning, match="TrainConfig.runtime_names"):
        assert "steps" in train.RUNTIME_OPTIONS and "ch" not in train.RUNTIME_OPTIONS
    with pytest.warns(DeprecationWarning, match="TrainConfig.check"):
        with pytest.raises(train_config.UsageError, match="--steps must be a positive integer"):
            train.check_options({**train.DEFAULTS, "steps": 0})
