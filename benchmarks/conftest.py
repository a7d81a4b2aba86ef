"""pytest-benchmark set-up for the side-by-side runs: machine info (with the measured matmul peak),
pytest-benchmark's own table grouped per test and shape, and, at the end of the run, the comparison
tables (report.py's, the same as `python benchmarks/report.py results.json` writes)."""
import platform
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402

_machine_info = {}  # measured once per run: the JSON and the closing tables quote the same peak


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """pytest-benchmark's table per test and shape, rather than one list sorted by time across
    shapes; the peak-memory probes are left out of it (their 'time' is a subprocess's, not a
    measurement: their MiB are in the closing tables). An explicit --benchmark-group-by wins."""
    if group_by != "group":
        return None
    groups = defaultdict(list)
    for bench in benchmarks:
        if bench["name"].startswith("test_peak_memory"):
            continue
        shape = (bench.get("params") or {}).get("shape")
        key = bench["name"].split("[")[0] + (" B%d-C%d-%dx%d" % (*shape, shape[-1]) if shape else "")
        groups[key].append(bench)
    for members in groups.values():
        members.sort(key=lambda bench: bench["name"])
    return sorted(groups.items())


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table: the run ends with the answer
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    ran = [bench for bench in getattr(session, "benchmarks", []) if bench]
    if not ran or session.disabled:
        return
    data = {"machine_info": session.get_machine_info(),
            "benchmarks": [bench.as_dict(include_data=False) for bench in ran]}
    terminalreporter.write_sep("=", "sagan_ext side by side (medians; ratios > 1x: fused is faster)")
    terminalreporter.write_line(report.markdown(*report.parse(data)).rstrip())


def pytest_benchmark_update_machine_info(config, machine_info):
    if _machine_info:
        machine_info.update(_machine_info)
        return
    import sagan_ext
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["sagan_ext_backends"] = {k: v or "available" for k, v in sagan_ext.available_backends().items()}
    machine_info["measured_matmul_gflops"] = _matmul_peak_gflops()
    if torch.cuda.is_available():  # the ceiling for % of floor of the GPU grid, per dtype
        machine_info["measured_matmul_gflops_by_dtype"] = {
            name: _matmul_peak_gflops(dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                                 ("fp32", torch.float32))}
    machine_info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                      if ln.startswith("model name")), platform.processor())
    _machine_info.update(machine_info)


def _matmul_peak_gflops(dtype=torch.float32):
    """The device's matrix-product rate through torch in `dtype`, the ceiling for '% of floor'."""
    import time
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 4096 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
