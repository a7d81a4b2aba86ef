import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_benchmark_update_machine_info(config, machine_info):
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
