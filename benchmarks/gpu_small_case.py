"""One small case of every GPU kernel of the named backends (default: cuda and triton): attention
forward and backward, both variants, each dtype, fp32 with and without TF32; spectral norm
forward, eval and backward. For compute-sanitizer (benchmarks/gpu_check.sh runs the triton ones
under memcheck, with SAGAN_EXT_TRITON_TMA=1 so that the aligned case takes the TMA forward; the
CUDA kernels have their own torch-free program, sanitizer_cases.cu).
    python benchmarks/gpu_small_case.py [cuda] [triton]"""
import sys

import torch

import sagan_ext

backends = sys.argv[1:] or ["cuda", "triton"]
for backend in backends:
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for dtype in (torch.float32,) if tf32 else (torch.float32, torch.bfloat16, torch.float16):
            # ragged (N = 63, 60); N = 64 has the 16-byte strides the Triton forward's TMA path needs
            for variant, shape in (("sagan", (2, 64, 7, 9)), ("biggan", (1, 32, 6, 10)), ("sagan", (2, 64, 8, 8))):
                torch.manual_seed(0)
                block = sagan_ext.FusedSelfAttention(shape[1], variant, backend=backend).to("cuda", dtype)
                x = torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
                block(x).float().square().sum().backward()
            conv = sagan_ext.spectral_norm(torch.nn.Conv2d(16, 33, 3), backend=backend).to("cuda", dtype)
            conv(torch.randn(2, 16, 5, 5, device="cuda", dtype=dtype)).float().sum().backward()
            conv.eval()(torch.randn(2, 16, 5, 5, device="cuda", dtype=dtype))
torch.cuda.synchronize()
print(f"gpu_small_case ({', '.join(backends)}): done")
