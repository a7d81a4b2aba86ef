"""pytest-benchmark set-up for the side-by-side runs: machine info (with the measured matmul peak),
pytest-benchmark's own table grouped per test and shape, and, at the end of the run, the comparison
tables (report.py's, the same as `python benchmarks/report.py results.json` writes)."""
import os
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
    if torch.cuda.is_available():  # the ceilings (METHOD.md's two numbers), measured here
        machine_info["measured_matmul_gflops_by_dtype"] = {
            name: _matmul_peak_gflops(dtype, tf32) for name, dtype, tf32 in (
                ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False), ("fp32", torch.float32, False),
                ("tf32", torch.float32, True))}
        machine_info["measured_copy_gb_per_s"] = _copy_bandwidth_gb_per_s()
    machine_info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                      if ln.startswith("model name")), platform.processor())
    machine_info["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _machine_info.update(machine_info)


def _matmul_peak_gflops(dtype=torch.float32, tf32=False):
    """The device's matrix-product rate through torch in `dtype` (random data: zeros run faster),
    the ceiling for '% of floor'."""
    import time
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        start, reps = time.perf_counter(), 10 if device == "cuda" else 5
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _copy_bandwidth_gb_per_s():
    """A 4 GiB device-to-device copy, bytes read plus written per second: the memory ceiling."""
    src = torch.empty(2**29, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3) / 1e9
