"""Shared test helpers: random block inputs and their gradients through a backend or the reference."""
import torch

import sagan_ext
from sagan_ext import reference


def attention_inputs(variant, b, c, h, w, dtype=torch.float64, qk_reduction=8, device="cpu"):
    """Fresh random leaf tensors (weights scaled like a 1x1 conv's init; gamma non-zero)."""
    dk = max(c // qk_reduction, 1)
    dv = c if variant == "sagan" else c // 2
    rand = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()  # noqa: E731
    inputs = dict(x=rand(b, c, h, w), wq=rand(dk, c, scale=c ** -0.5), wk=rand(dk, c, scale=c ** -0.5),
                  wv=rand(dv, c, scale=c ** -0.5))
    if variant == "sagan":
        inputs.update(bq=rand(dk, scale=0.1), bk=rand(dk, scale=0.1), bv=rand(dv, scale=0.1))
    else:
        inputs["wo"] = rand(c, dv, scale=dv ** -0.5)
    inputs["gamma"] = (torch.tensor([0.8], dtype=torch.float64).to(device, dtype)).requires_grad_()
    return inputs


def _call(inputs, fn):
    return fn(inputs["x"], inputs["wq"], inputs.get("bq"), inputs["wk"], inputs.get("bk"), inputs["wv"],
              inputs.get("bv"), inputs.get("wo"), inputs["gamma"], "wo" in inputs)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(inputs.values()), g)
    return out.detach(), dict(zip(inputs, grads))


def attention_grads(inputs, backend):
    def fused(x, wq, bq, wk, bk, wv, bv, wo, gamma, pool):
        return sagan_ext.self_attention(x, wq, wk, wv, gamma, query_bias=bq, key_bias=bk, value_bias=bv,
                                        out_weight=wo, pool=pool, backend=backend)
    return _grads(_call(inputs, fused), inputs)


def reference_grads(inputs):
    return _grads(_call(inputs, reference.self_attention), inputs)


def positional_block(names, variant, backend):
    """sagan_ext.self_attention as a function of the tensors in `names` order (for gradcheck)."""
    def block(*tensors):
        kw = dict(zip(names, tensors))
        return sagan_ext.self_attention(
            kw["x"], kw["wq"], kw["wk"], kw["wv"], kw["gamma"], query_bias=kw.get("bq"), key_bias=kw.get("bk"),
            value_bias=kw.get("bv"), out_weight=kw.get("wo"), pool=variant == "biggan", backend=backend)
    return block


def large_logit_errors(backend, variant, x_scale, shape=(2, 16, 9, 7), device="cpu"):
    """Norm-wise errors against float64 of the fused block and of the eager (reference) block, both
    in fp32, with x scaled by `x_scale` so that the unscaled scores are huge. Returns
    {output or gradient: (fused error, eager error)} and the largest |score|."""
    inputs = attention_inputs(variant, *shape, dtype=torch.float64)
    with torch.no_grad():
        inputs["x"].mul_(x_scale)
    q, k, _ = reference.project(inputs["x"], inputs["wq"], inputs.get("bq"), inputs["wk"], inputs.get("bk"),
                                inputs["wv"], inputs.get("bv"), False)
    largest = torch.bmm(q, k.transpose(1, 2)).abs().max().item()
    exact_out, exact = reference_grads(inputs)
    low = {n: t.detach().to(device, torch.float32).requires_grad_() for n, t in inputs.items()}
    fused_out, fused = attention_grads(low, backend)
    eager_out, eager = reference_grads(low)
    exact["out"], fused["out"], eager["out"] = exact_out, fused_out, eager_out

    def error(actual, name):
        # d(key bias) is 0 in exact arithmetic: its noise is measured against d(query bias)
        scale = exact["bq"].norm() if name == "bk" else exact[name].norm().clamp_min(1e-30)
        return ((actual.detach().cpu().double() - exact[name]).norm() / scale).item()
    return {n: (error(fused[n], n), error(eager[n], n)) for n in exact}, largest
