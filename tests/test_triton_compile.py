"""The Triton kernels compile for real GPUs (sm_80 and sm_90), on this machine with no GPU: every
kernel, dtype and kept autotune config that tests/triton_compile.py lists, with Triton's own
argument binding; no compile error, no config over the GPU's shared memory, at most a few hundred
bytes of spills, tensor-core instructions for fp16/bf16/tf32 dots. Run against the installed
Triton and against the oldest one the kernels support and the GPU machines carry (3.6, setup.py's
lower bound), which the test installs by itself with pip into a throwaway folder beside the
installed one (or takes from the folder SAGAN_EXT_OLDEST_TRITON names, for a machine with no
package index). The figures (registers, spills, shared memory) are printed. The interpreter
(conftest's TRITON_INTERPRET=1) cannot compile, so each target compiles in its own process without
it, two at a time."""
import os
import subprocess
import sys
import tempfile
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


@pytest.fixture(scope="module")
def oldest_triton():
    """A folder holding triton==OLDEST alone (its own dependencies are the installed ones), put
    before the installed Triton on the compiling processes' path; removed afterwards (600+ MB)."""
    given = os.environ.get("SAGAN_EXT_OLDEST_TRITON")
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="sagan_ext_triton_") as folder:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-deps", "--target", folder, f"triton=={OLDEST}"],
                             capture_output=True, text=True, timeout=900)
        if pip.returncode != 0:  # no package index (offline), or no pip in this environment
            pytest.skip(f"could not install triton=={OLDEST} with pip ({(pip.stderr or pip.stdout).strip()[-300:]}); "
                        f"SAGAN_EXT_OLDEST_TRITON can name a folder that holds it")
        yield folder


def test_kernels_compile_with_the_oldest_triton(capsys, oldest_triton):
    headers = check(compile_for_gpus(oldest_triton, quick=True), capsys)
    assert all(h.startswith(f"triton {OLDEST},") for h in headers), headers
