"""`pytest benchmarks/ --benchmark-only` ends with the comparison (benchmarks/conftest.py's terminal
summary on report.py's tables), checked here on a synthetic benchmark list: no benchmark runs."""
import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_conftest = _import("sagan_ext_benchmarks_conftest", BENCHMARKS / "conftest.py")  # puts benchmarks/ on sys.path
report = bench_conftest.report

MACHINE = dict(cpu_model="Test CPU", cpu_cores=2, torch="2.x", torch_threads=2, measured_matmul_gflops=100.0,
               cuda_device=None)


class FakeBenchmark:
    """What pytest-benchmark's session holds per case: as_dict() as in its JSON."""

    def __init__(self, name, params, median_s, **extra_info):
        self.record = dict(name=name, params=params, extra_info=extra_info, stats=dict(median=median_s))

    def __bool__(self):
        return True

    def as_dict(self, include_data=False):
        return self.record


def synthetic_run():
    shape = (8, 64, 32)
    cases = []
    for contender, ms in (("eager", 40.0), ("sdpa", 30.0), ("fused", 10.0)):
        cases.append(FakeBenchmark(f"test_forward_backward[B8-C64-32x32-sagan-{contender}]",
                                   dict(contender=contender, variant="sagan", shape=shape), ms / 1e3,
                                   mode="fwd+bwd", variant="sagan", gflops_per_s=25.0 if contender == "fused" else 6.0))
    cases.append(FakeBenchmark("test_forward_backward_compiled_eager[B8-C64-32x32]", dict(shape=shape), 0.02,
                               mode="fwd+bwd", variant="sagan", gflops_per_s=12.0))
    for contender, mib in (("eager", 4143.0), ("sdpa", 3120.0), ("fused", 48.0)):
        cases.append(FakeBenchmark(f"test_peak_memory[B1-C64-128x128-{contender}]",
                                   dict(contender=contender, shape=(1, 64, 128)), 18.258, peak_extra_mib=mib))
    return cases


class FakeSession:
    disabled = False

    def __init__(self, benchmarks):
        self.benchmarks = benchmarks

    def get_machine_info(self):
        return dict(MACHINE)


class FakeTerminal:
    def __init__(self):
        self.lines = []

    def write_sep(self, sep, title):
        self.lines.append(f"{sep * 3} {title} {sep * 3}")

    def write_line(self, text):
        self.lines.extend(text.splitlines())


def test_run_ends_with_the_comparison_table():
    config = type("Config", (), {"_benchmarksession": FakeSession(synthetic_run())})()
    terminal = FakeTerminal()
    bench_conftest.pytest_terminal_summary(terminal, config)
    text = "\n".join(terminal.lines)
    assert "Device: Test CPU, 2 cores; torch 2.x, 2 threads; measured fp32 matmul peak 100 GFLOP/s" in text
    older = {k: v for k, v in MACHINE.items() if k != "cpu_cores"} | {"cpu": {"count": 2}}  # JSON before cpu_cores
    assert report.device_line(older) == report.device_line(MACHINE) == "Test CPU, 2 cores; torch 2.x, 2 threads"
    assert "| mode | variant | (B, C, H=W) | eager ms | SDPA ms | compiled eager ms | fused ms | fused vs eager | " \
           "fused vs SDPA | fused GFLOP/s | % of matmul peak |" in text
    # medians in ms, fused against eager (4x) and SDPA (3x), GFLOP/s and its share of the measured peak
    assert "| fwd+bwd | sagan | (8, 64, 32) | 40.0 | 30.0 | 20.0 | 10.0 | 4.00x | 3.00x | 25 | 25% |" in text
    # the memory probes: MiB in their own table, never as times
    assert "| (1, 64, 128) | 1024 | 4143 | 3120 | 48 | 86.3x |" in text
    assert "18258" not in text.replace(",", "") and "18.3" not in text


def test_nothing_printed_without_benchmarks():
    terminal = FakeTerminal()
    config = type("Config", (), {"_benchmarksession": FakeSession([])})()
    bench_conftest.pytest_terminal_summary(terminal, config)
    assert terminal.lines == []


def test_pytest_benchmark_table_grouped_per_shape_without_memory_probes():
    flat = [dict(case.as_dict(), **case.record["stats"]) for case in synthetic_run()]
    groups = dict(bench_conftest.pytest_benchmark_group_stats(None, flat, "group"))
    assert set(groups) == {"test_forward_backward B8-C64-32x32", "test_forward_backward_compiled_eager B8-C64-32x32"}
    assert len(groups["test_forward_backward B8-C64-32x32"]) == 3
    assert bench_conftest.pytest_benchmark_group_stats(None, flat, "param:shape") is None  # the user's grouping wins


def test_report_reads_json_files_the_same_way(tmp_path):
    import json
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": MACHINE, "benchmarks": [c.as_dict() for c in synthetic_run()]}))
    from_file = report.markdown(*report.load(path))
    from_session = report.markdown(*report.parse({"machine_info": MACHINE,
                                                  "benchmarks": [c.as_dict() for c in synthetic_run()]}))
    assert from_file == from_session


def test_gpu_grid_is_one_skip_on_cpu():
    """The whole GPU grid module skips at import (one skip line), not case by case (171 lines)."""
    if torch.cuda.is_available():
        assert _import("gpu_grid", BENCHMARKS / "test_attention_gpu.py").CONTENDERS
        return
    with pytest.raises(pytest.skip.Exception, match="the GPU grid needs a CUDA GPU"):
        _import("gpu_grid", BENCHMARKS / "test_attention_gpu.py")
