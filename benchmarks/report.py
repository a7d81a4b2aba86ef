"""The comparison tables (and PNG plots) from pytest-benchmark's results. `pytest benchmarks/
--benchmark-only` prints the tables at the end of its run (benchmarks/conftest.py); from a saved JSON:

    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json      # -> cpu.md, cpu_time.png, cpu_memory.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

def _shape(params):
    b, c, s = params["shape"]
    return b, c, s


def load(path: Path):
    return parse(json.loads(path.read_text()))


def parse(data: dict):
    """pytest-benchmark's {"machine_info": ..., "benchmarks": [...]} (its JSON, or its session's
    benchmarks as dicts) -> (machine info, {case: {contender: timing}}, {shape: {contender: MiB}})."""
    timing, memory = defaultdict(dict), defaultdict(dict)  # key -> contender -> record
    for bench in data["benchmarks"]:
        params, info = bench.get("params") or {}, bench.get("extra_info", {})
        name = bench["name"].split("[")[0]
        if name.startswith("test_gpu_"):  # test_gpu_headline*, test_gpu_grid*
            table = "gpu headline" if name.startswith("test_gpu_headline") else "gpu grid"
            key = (table, info["mode"], info["variant"], info["dtype"], _shape(params))
            ok = info.get("status") == "ok"
            timing[key][info["contender"]] = dict(ms=bench["stats"]["median"] * 1e3 if ok else None,
                                                  status=info.get("status"), tflops=info.get("tflops_per_s"),
                                                  peak_mib=info.get("peak_extra_mib"))
        elif name == "test_peak_memory":
            memory[_shape(params)][params["contender"]] = info.get("peak_extra_mib")
        elif name.startswith("test_forward"):
            contender = params.get("contender", "compiled_eager")
            key = (info.get("mode"), info.get("variant"), _shape(params))
            timing[key][contender] = dict(ms=bench["stats"]["median"] * 1e3, gflops=info.get("gflops_per_s"))
        elif name == "test_train_step":
            timing[("train step", "", (0, 0, 0))][params["ops"]] = dict(
                ms=bench["stats"]["median"] * 1e3, images_per_s=info.get("images_per_s"),
                peak_mib=info.get("peak_memory_mib"),
                config=f"{info.get('image_size')}px, batch {info.get('batch_size')}, ch {info.get('ch')}, "
                       f"{info.get('amp') or 'fp32'}")
        elif name == "test_all_layers_forward_backward":
            timing[("spectral norm", "all SAGAN layers", (0, 0, 0))][params["impl"]] = dict(
                ms=bench["stats"]["median"] * 1e3, gflops=None)
    return data["machine_info"], timing, memory


def device_line(machine) -> str:
    """The machine the figures came from, as the README names it: the GPU, or the CPU model and its
    cores; torch and its threads."""
    cores = machine.get("cpu_cores") or (machine.get("cpu") or {}).get("count")  # older JSON: py-cpuinfo's count
    device = machine.get("cuda_device") or f"{machine.get('cpu_model')}" + (f", {cores} cores" if cores else "")
    return f"{device}; torch {machine.get('torch')}, {machine.get('torch_threads')} threads"


def markdown(machine, timing, memory) -> str:
    peak = machine.get("measured_matmul_gflops")
    lines = [f"Device: {device_line(machine)}; measured fp32 matmul peak {peak:.0f} GFLOP/s" if peak else "", ""]
    cpu_rows = {k: v for k, v in timing.items()
                if not str(k[0]).startswith("gpu") and k[0] not in ("spectral norm", "train step")}
    if cpu_rows:
        lines += ["| mode | variant | (B, C, H=W) | eager ms | SDPA ms | compiled eager ms | fused ms | fused vs eager | "
                  "fused vs SDPA | fused GFLOP/s | % of matmul peak |", "|" + " --- |" * 11]
    for (mode, variant, shape), runs in sorted(cpu_rows.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2])):
        fused = runs.get("fused")
        cell = lambda k: f"{runs[k]['ms']:.1f}" if k in runs else "-"  # noqa: E731
        ratio = lambda k: f"{runs[k]['ms'] / fused['ms']:.2f}x" if fused and k in runs else "-"  # noqa: E731
        gf = fused["gflops"] if fused else None
        lines.append(f"| {mode} | {variant} | {shape} | {cell('eager')} | {cell('sdpa')} | {cell('compiled_eager')} | "
                     f"{cell('fused')} | {ratio('eager')} | {ratio('sdpa')} | {gf:.0f} | "
                     f"{100 * gf / peak:.0f}% |" if gf and peak else f"| {mode} | {variant} | {shape} | {cell('eager')} | "
                     f"{cell('sdpa')} | {cell('compiled_eager')} | {cell('fused')} | {ratio('eager')} | {ratio('sdpa')} | - | - |")
    sn = timing.get(("spectral norm", "all SAGAN layers", (0, 0, 0)))
    if sn and "torch" in sn and "sagan_ext" in sn:
        lines += ["", f"Spectral norm, every SN layer of the trainer's SAGAN-128 G and D, forward+backward: "
                      f"torch {sn['torch']['ms']:.1f} ms, sagan_ext {sn['sagan_ext']['ms']:.1f} ms "
                      f"({sn['torch']['ms'] / sn['sagan_ext']['ms']:.2f}x)."]
    step = timing.get(("train step", "", (0, 0, 0)))
    if step and "eager" in step and "fused" in step:
        e, f = step["eager"], step["fused"]
        memory_note = (f"; peak memory {f['peak_mib']:.0f} MiB vs {e['peak_mib']:.0f} MiB "
                       f"({f['peak_mib'] / e['peak_mib']:.2f}x)" if f.get("peak_mib") and e.get("peak_mib") else "")
        lines += ["", f"Trainer step (D step + G step, {f['config']}): fused {f['ms']:.0f} ms, "
                      f"--ops eager {e['ms']:.0f} ms ({e['ms'] / f['ms']:.2f}x the steps/s){memory_note}."]
    for table in ("gpu headline", "gpu grid"):
        lines += gpu_markdown(machine, table, {k[1:]: v for k, v in timing.items() if k[0] == table})
    if memory:
        lines += ["", "Peak memory above the inputs, one forward+backward (MiB; OOM/failed shown as -):", "",
                  "| (B, C, H=W) | N x N map | eager | SDPA | fused | eager / fused |", "|" + " --- |" * 6]
        for shape, runs in sorted(memory.items()):
            n = shape[2] ** 2
            fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            ratio = f"{runs['eager'] / runs['fused']:.1f}x" if runs.get("eager") and runs.get("fused") else "-"
            lines.append(f"| {shape} | {shape[0] * n * n * 4 / 2**20:.0f} | {fmt(runs.get('eager'))} | "
                         f"{fmt(runs.get('sdpa'))} | {fmt(runs.get('fused'))} | {ratio} |")
    return "\n".join(lines) + "\n"


BF16_DENSE_PEAK_GFLOPS = 989e3  # H100/H200 SXM datasheet, dense bf16


def gpu_markdown(machine, title, grid) -> list[str]:
    """One row per (mode, variant, precision, shape): each contender's median ms (OOM, or err when
    it could not run the case), the best sagan_ext kernel backend (cuda or triton) against eager,
    the best SDPA and flex, its TFLOP/s, % of the bf16 datasheet peak and of the measured matmul
    rate in the row's precision, and peak memory above the inputs."""
    if not grid:
        return []
    peaks = machine.get("measured_matmul_gflops_by_dtype") or {}
    order = ["eager", "sdpa", "flex", "compiled_eager", "reference", "cuda", "triton"]
    contenders = sorted({c for runs in grid.values() for c in runs}, key=lambda c: (order.index(c) if c in order else 3, c))
    copy = machine.get("measured_copy_gb_per_s")
    ceilings = ", ".join(f"{k} {v / 1e3:.0f}" for k, v in peaks.items())
    lines = ["", f"{title[4:].capitalize()} ({machine.get('cuda_device')}; measured matmul TFLOP/s: {ceilings}"
                 + (f"; copy {copy:.0f} GB/s" if copy else "") + "). Median ms; OOM: out of memory; err: the contender "
                 "cannot run the case (its message is in the JSON):", "",
             "| mode | variant | precision | (B, C, H=W) | " + " | ".join(contenders) +
             " | best fused | vs eager | vs best SDPA | vs flex | TFLOP/s | % of 989 | % of measured | peak MiB fused / eager |",
             "|" + " --- |" * (len(contenders) + 12)]

    def cell(runs, c):
        if c not in runs:
            return "-"
        if runs[c]["ms"] is None:
            return "OOM" if runs[c].get("status") == "OOM" else "err"
        return f"{runs[c]['ms']:.2f}"

    for (mode, variant, dtype, shape), runs in sorted(grid.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        ms = {c: r["ms"] for c, r in runs.items() if r["ms"]}
        fused = min((c for c in ("cuda", "triton") if c in ms), key=lambda c: ms[c], default=None)
        sdpa = min((c for c in ms if c.startswith("sdpa")), key=lambda c: ms[c], default=None)
        ratio = lambda other: f"{ms[other] / ms[fused]:.2f}x" if fused and other in ms else "-"  # noqa: E731
        tflops = runs[fused]["tflops"] if fused else None
        peak = peaks.get(dtype)
        memory = (f"{runs[fused]['peak_mib']:.0f} / {runs['eager']['peak_mib']:.0f}"
                  if fused and (runs.get("eager") or {}).get("peak_mib") else "-")
        lines.append(f"| {mode} | {variant} | {dtype} | {shape} | " + " | ".join(cell(runs, c) for c in contenders) +
                     f" | {fused or '-'} | {ratio('eager')} | {ratio(sdpa)} | {ratio('flex')} | "
                     f"{f'{tflops:.1f}' if tflops else '-'} | "
                     f"{f'{100 * tflops * 1e3 / BF16_DENSE_PEAK_GFLOPS:.1f}%' if tflops else '-'} | "
                     f"{f'{100 * tflops * 1e3 / peak:.0f}%' if tflops and peak else '-'} | {memory} |")
    return lines


def plots(timing, memory, stem: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    written = []
    series = defaultdict(list)  # fwd+bwd, sagan, C=64: time against N
    for key, runs in timing.items():
        if str(key[0]).startswith("gpu") or len(key) != 3:
            continue
        mode, variant, (b, c, s) = key
        if mode == "fwd+bwd" and variant == "sagan" and c == 64:
            for contender, rec in runs.items():
                series[contender].append((s * s, rec["ms"] / b))
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for contender, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=contender)
        ax.set(xscale="log", yscale="log", xlabel="N = H*W", ylabel="ms per image (fwd+bwd)",
               title="SAGAN block, C=64, fp32")
        ax.legend(), ax.grid(True, which="both", alpha=0.3)
        written.append(stem.with_name(stem.name + "_time.png"))
        fig.tight_layout(), fig.savefig(written[-1], dpi=120), plt.close(fig)
    if memory:
        fig, ax = plt.subplots(figsize=(6, 4))
        for contender in ("eager", "sdpa", "fused"):
            points = sorted((s[2] ** 2, runs[contender] / s[0]) for s, runs in memory.items() if runs.get(contender))
            if points:
                ax.plot(*zip(*points), marker="o", label=contender)
        ax.set(xscale="log", yscale="log", xlabel="N = H*W", ylabel="peak extra MiB per image", title="Peak memory, fwd+bwd")
        ax.legend(), ax.grid(True, which="both", alpha=0.3)
        written.append(stem.with_name(stem.name + "_memory.png"))
        fig.tight_layout(), fig.savefig(written[-1], dpi=120), plt.close(fig)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON files of one machine (merged)")
    parser.add_argument("--output", type=Path, help="the tables' file (default: the first JSON's name, .md)")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.json]
    machine, timing, memory = parse({"machine_info": runs[0]["machine_info"],
                                     "benchmarks": [bench for run in runs for bench in run["benchmarks"]]})
    md = args.output or args.json[0].with_suffix(".md")
    stem = md.with_suffix("")
    md.write_text(markdown(machine, timing, memory))
    for path in [md, *plots(timing, memory, stem)]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
