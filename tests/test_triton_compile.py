"""The Triton kernels compile for real GPUs (sm_80 and sm_90), on this machine with no GPU: every
kernel, dtype and kept autotune config that tests/triton_compile.py lists, with Triton's own
argument binding; no compile error, no config over the GPU's shared memory, at most a few hundred
bytes of spills, tensor-core instructions for fp16/bf16/tf32 dots. Run against the installed
Triton and against the oldest one the GPU machines carry (3.6; .ci/run installs it in a throwaway
folder named by SAGAN_EXT_OLDEST_TRITON). The figures (registers, spills, shared memory) are
printed. The interpreter (conftest's TRITON_INTERPRET=1) cannot compile, so each target compiles
in its own process without it, two at a time."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed on this platform")
SCRIPT = Path(__file__).with_name("triton_compile.py")
OLDEST = "3.6.0"


def compile_for_gpus(extra_path=None, quick=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = lambda arch: [sys.executable, str(SCRIPT), str(arch)] + (["--quick"] if quick else [])  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda arch: subprocess.run(command(arch), env=env, capture_output=True, text=True,
                                                         timeout=900), (80, 90)))


def check(runs, capsys):
    with capsys.disabled():  # the figures belong in CI's log even when the test passes
        for run in runs:
            print("\n" + run.stdout)
    for run in runs:
        assert run.returncode == 0, (run.stdout[-6000:] + run.stderr[-3000:])
    return [run.stdout.splitlines()[0] for run in runs]


def test_kernels_compile_for_sm80_and_sm90(capsys):
    check(compile_for_gpus(), capsys)


@pytest.mark.skipif(not os.environ.get("SAGAN_EXT_OLDEST_TRITON"), reason="SAGAN_EXT_OLDEST_TRITON (a folder with "
                    f"triton=={OLDEST}, as .ci/run installs it) is not set")
def test_kernels_compile_with_the_oldest_triton(capsys):
    headers = check(compile_for_gpus(os.environ["SAGAN_EXT_OLDEST_TRITON"], quick=True), capsys)
    assert all(h.startswith(f"triton {OLDEST},") for h in headers), headers
