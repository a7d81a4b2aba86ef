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
    machine_info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                      if ln.startswith("model name")), platform.processor())
