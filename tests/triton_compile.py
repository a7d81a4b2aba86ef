"""Compile every Triton kernel of sagan_ext for a real GPU target, on a machine with no GPU.

    python tests/triton_compile.py 90 [--quick]   # sm_90; or 80 for sm_80

Each launch is built by the backend's own launch builders (triton_kernels._forward_launches, ...)
from CPU tensors in the layouts ops.py passes (channel-major views of the projection GEMM), and
compiled through the kernel's own `warmup`: the autotuner's pruning, then Triton's argument
binding and specialisation (alignment, strides equal to 1), exactly as a launch on that GPU would
do, down to a cubin by the ptxas bundled with Triton. A stand-in driver supplies the target
instead of a GPU. Must run without TRITON_INTERPRET (under it, triton.jit builds interpreted
functions that cannot compile), in a fresh process per target (Triton caches the target per device).

Prints, per compiled kernel, registers, spill bytes and shared memory; exits non-zero if any
launch fails to compile, a kept config needs more shared memory than the target has per block,
spills more than SPILL_LIMIT bytes, or a fp16/bf16/tf32 dot is not a tensor-core instruction.

The matrix (the subset that covers every code path within CI's time; the full product is ~4x):
- every dtype: fp32 with "ieee" dots (FMA configs) and with TF32 dots, fp16, bf16 (tensor-core configs);
- every autotune config the pruning keeps, for the largest shapes (dk 64, dv 512, N = M = 4096: the
  most registers and shared memory), of the forward with the fused residual epilogue (the paper
  variant's path) and of the backward, in fp32 ieee, tf32 and bf16 (fp16 compiles to bf16's
  tiles, instructions and figures: once per launch suffices);
- one pruned launch each of: the BigGAN variant (forward without the epilogue, pooled k/v views,
  dk 32), a tiny odd block (dk 1 padded to 16, N = 63: unaligned strides, the epilogue), and
  position-major (contiguous) q, k, v, dO once per dot kind;
- the delta and spectral-norm kernels;
- the forward's TMA path on sm_90 (the paper block, both layouts);
- the attention kernels widen the batch index to int64 before the batch offsets (read from the TTIR),
  and their loops prefetch (asynchronous copies in the TTGIR) where they must (must_pipeline);
- --quick (for the oldest supported Triton): one pruned launch of each, no sweeps.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: the interpreter does not compile"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sagan_ext_triton_cache_")  # compile, never reuse
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sagan_ext
from sagan_ext import ops, triton_kernels  # noqa: E402

SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}  # A100, H100/H200 (opt-in maximum)
SPILL_LIMIT = 256  # bytes of spill stores per kernel
DTYPES = [("fp32-ieee", torch.float32, False), ("fp32-tf32", torch.float32, True),
          ("fp16", torch.float16, None), ("bf16", torch.bfloat16, None)]


class TargetOnlyDriver:
    """What JITFunction.warmup asks of the driver, for a GPU that is not there."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise RuntimeError("no GPU: nothing can be benchmarked")


def block_inputs(variant, c, h, w, dtype):
    """q, k, v and dO exactly as ops.attention_forward/backward pass them (channel-major views),
    and x, gamma for the fused residual."""
    x = torch.randn(1, c, h, w).to(dtype)
    dk, dv = max(c // 8, 1), c if variant == "sagan" else c // 2
    weights = [torch.randn(d, c).to(dtype) for d in (dk, dk, dv)]
    q, k, v, _, _ = ops._projections(x, weights[0], None, weights[1], None, weights[2], None, variant == "biggan")
    do = torch.randn(1, dv, h * w).to(dtype).transpose(1, 2)
    return q, k, v, do, x, torch.ones(1, dtype=dtype)


def attention_launches(q, k, v, do, x=None, gamma=None, tma=False):
    tf32 = torch.backends.cuda.matmul.allow_tf32  # set per dtype row by main()
    forward, (_, o, stats) = triton_kernels._forward_launches(q, k, v, tf32, x, gamma, tma=tma)
    backward, _ = triton_kernels._backward_launches(do, q, k, v, o, stats, tf32)
    return forward, backward


def sweep(name, launch, everything):
    """Compile `launch` for every config its pruning keeps, or the first only -> [(name, kernel, ptxas log)]."""
    kernel, grid, args, kwargs = launch
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [(name, *compile_one(kernel, args, dict(kwargs, grid=grid)))]
    kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.run/warmup set before pruning
    kept = kernel.prune_configs(dict(kwargs, grid=grid))
    kernel.nargs = None
    return [(f"{name} {config_name(c)}", *compile_one(kernel.fn, args, dict(kwargs, grid=grid, **c.all_kwargs())))
            for c in (kept if everything else kept[:1])]


def compile_one(kernel, args, kwargs):
    """JITFunction.warmup (binding, specialisation, compile) -> (compiled kernel, ptxas -v log)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = kernel.warmup(*args, **kwargs)
    figures = PTXAS_FIGURES.search(log.getvalue())
    if figures:
        PTXAS_LOGS[compiled.hash] = figures.groups()
    return compiled, PTXAS_LOGS[compiled.hash]  # the same specialisation compiled earlier: its figures


def config_name(config):
    blocks = "BM{BLOCK_M} BN{BLOCK_N} BDV{BLOCK_DV}".format(**config.kwargs)
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def launches_for(label, dtype, sweeps, arch):
    """[(name, launch, every kept config?)] for one dtype."""
    big = block_inputs("sagan", 512, 64, 64, dtype)  # dk 64, dv 512, N = M = 4096
    forward, backward = attention_launches(*big)
    out = [("forward+residual dk64 dv512", forward[0], sweeps), ("backward dk64 dv512", backward[1], sweeps),
           ("delta dv512", backward[0], False)]
    pooled = block_inputs("biggan", 256, 64, 64, dtype)  # dk 32, dv 128, M = 1024: k and v pooled views
    forward, backward = attention_launches(*pooled[:4])
    out += [("forward dk32 dv128 M1024 (biggan)", forward[0], False),
            ("backward dk32 dv128 M1024 (biggan)", backward[1], False)]
    tiny = block_inputs("sagan", 8, 7, 9, dtype)  # dk 1 -> 16, dv 8, N = 63: unaligned strides
    forward, backward = attention_launches(*tiny)
    out += [("forward+residual dk1 dv8 N63", forward[0], False), ("backward dk1 dv8 N63", backward[1], False)]
    if label in ("fp32-ieee", "bf16"):  # position-major (contiguous) q, k, v, dO, once per dot kind
        q, k, v, do = (t.contiguous() for t in block_inputs("sagan", 256, 64, 64, dtype)[:4])
        forward, backward = attention_launches(q, k, v, do)
        out += [("forward dk32 dv256 position-major", forward[0], False),
                ("backward dk32 dv256 position-major", backward[1], False)]
    if arch >= 90 and label != "fp32-ieee":  # the forward's TMA path (Hopper): the paper block, both layouts
        paper = block_inputs("sagan", 256, 64, 64, dtype)
        forward, _ = attention_launches(*paper, tma=True)
        out.append(("forward+residual dk32 dv256 TMA", forward[0], sweeps))
        forward, _ = attention_launches(*(t.contiguous() for t in paper[:4]), tma=True)
        out.append(("forward dk32 dv256 position-major TMA", forward[0], False))
        assert all(launch.kwargs["TMA"] for _, launch, _ in out[-2:]), "TMA refused the paper block"
    w = torch.randn(64, 300).to(dtype)
    u, vv = torch.randn(64), torch.randn(300)
    sn_forward, (w_sn, sigma, u32, v32) = triton_kernels._spectral_norm_forward_launches(w, u, vv, 1, 1e-12)
    sn_backward, _ = triton_kernels._spectral_norm_backward_launches(w, torch.ones(()), w_sn, u32, v32, sigma)
    out += [("spectral_norm_forward", sn_forward[0], False), ("spectral_norm_backward_dot", sn_backward[0], False),
            ("spectral_norm_backward_apply", sn_backward[1], False)]
    return out


PTXAS_FIGURES = re.compile(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads.*?Used (\d+) registers", re.S)
PTXAS_LOGS = {}  # compiled kernel's hash -> its ptxas figures


def main(arch: int, quick: bool) -> int:
    driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's figures, printed by Triton after each compile
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    failures, start = [], time.time()
    print(f"triton {triton.__version__}, sm_{arch}: kernel, registers, spill stores, stack, shared memory, dots")
    for label, dtype, tf32 in DTYPES:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        tensor_cores = label != "fp32-ieee"
        # fp16 compiles to the same tiles, instructions and figures as bf16 (checked with full sweeps)
        sweeps = not quick and label != "fp16"
        for name, launch, everything in launches_for(label, dtype, sweeps, arch):
            try:
                compiled = sweep(f"{label} {name}", launch, everything)
            except Exception as e:  # a compile error: report it with the launch, keep going
                failures.append(f"{label} {name}: {type(e).__name__}: {str(e)[-1500:]}")
                print(f"  FAILED {label} {name}: {type(e).__name__}: {str(e)[-300:]}")
                continue
            for kname, kernel, (_, stack, spill, _, regs) in compiled:
                shared = kernel.metadata.shared
                dots = dot_instructions(kernel, arch)
                copies = asynchronous_copies(kernel)
                print(f"  {kname:<72} regs {regs:>3}  spill {spill:>5} B  stack {stack:>5} B  "
                      f"shared {shared / 1024:6.1f} KiB  {dots:<9}  async copies {copies}")
                if tensor_cores and must_pipeline(kname, launch) and not (copies and loops(kernel) == 1):
                    failures.append(f"{kname}: its loop's loads are not pipelined ({copies} asynchronous copies, "
                                    f"{loops(kernel)} loops in the TTGIR)")
                if shared > limit:
                    failures.append(f"{kname}: {shared} bytes of shared memory > {limit} on sm_{arch}")
                if int(spill) > SPILL_LIMIT:
                    failures.append(f"{kname}: spills {spill} bytes (limit {SPILL_LIMIT})")
                if tensor_cores and "fma" in dots:
                    failures.append(f"{kname}: a {label} dot is not a tensor-core instruction ({dots})")
                if "spectral_norm" not in kname and not batch_index_is_int64(kernel.asm["ttir"]):
                    failures.append(f"{kname}: the batch index (program_id 1) is not widened to int64 before its offsets")
    print(f"sm_{arch}: compiled in {time.time() - start:.0f} s; {len(failures)} failure(s)")
    for failure in failures:
        print("FAILURE:", failure)
    return 1 if failures else 0


def asynchronous_copies(kernel) -> int:
    """cp.async (or TMA) copies in the TTGIR: what Triton's software pipeliner emits for the loads it
    prefetches into shared memory. It pipelines innermost loops only."""
    return len(re.findall(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy", kernel.asm["ttgir"]))


def loops(kernel) -> int:
    return kernel.asm["ttgir"].count("scf.for ")


def must_pipeline(kname: str, launch) -> bool:
    """The attention kernels whose one loop must prefetch its tiles: the forward, and the backward
    when one value tile (BLOCK_DV, in the config's name) spans dv (else the other tiles' loop nests
    in it, and Triton pipelines innermost loops only); not with odd sizes (N63), whose 2-byte-aligned
    rows no cp.async can copy."""
    kind = kname.split()[1]
    if kind not in ("forward", "forward+residual", "backward") or "N63" in kname:
        return False
    dv = launch.args[launch.kernel.arg_names.index("DV")]
    return kind != "backward" or dv <= int(re.search(r"BDV(\d+)", kname).group(1))


def batch_index_is_int64(ttir: str) -> bool:
    """The attention kernels' batch offsets are b * batch_stride, past 2^31 elements from B N dv of
    2^31 on (e.g. N = 65536 at B = 64, dv 512): the batch index must be widened to int64 first."""
    found = re.search(r"(%\w+) = tt\.get_program_id y : i32", ttir)
    return bool(found) and re.search(rf"= arith\.extsi {re.escape(found.group(1))} : i32 to i64", ttir) is not None


def dot_instructions(kernel, arch) -> str:
    """How the kernel's tl.dot's compiled: 'wgmma' / 'mma' (tensor cores, from the PTX), 'fma' if
    any dot in the TTGIR kept a non-MMA (FMA) layout, '-' for none."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    dots = re.findall(r"= tt\.dot .*?-> tensor<[^,]+, (#\w+)>", ttgir)
    mma_layouts = set(re.findall(r"^(#\w+) = #ttg\.nvidia_mma", ttgir, re.M))
    kinds = []
    if "wgmma.mma_async" in ptx:
        kinds.append("wgmma")
    if re.search(r"\bmma\.sync\.aligned", ptx):
        kinds.append("mma")
    if any(layout not in mma_layouts for layout in dots):
        kinds.append("fma")
    return "+".join(kinds) or "-"


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), "--quick" in sys.argv[2:]))
