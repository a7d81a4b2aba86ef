"""One small case of every GPU kernel (attention forward and backward, both variants, each
dtype, fp32 with and without TF32; spectral norm forward, eval and backward) for
compute-sanitizer memcheck / racecheck."""
import torch

import sagan_ext

for backend, tf32 in (("cuda", False), ("cuda", True), ("triton", False)):
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the cuda backend's tensor-core path for fp32
    for dtype in (torch.float32,) if tf32 else (torch.float32, torch.bfloat16, torch.float16):
        for variant, shape in (("sagan", (2, 64, 7, 9)), ("biggan", (1, 32, 6, 10))):
            torch.manual_seed(0)
            block = sagan_ext.FusedSelfAttention(shape[1], variant, backend=backend).to("cuda", dtype)
            x = torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
            block(x).float().square().sum().backward()
        conv = sagan_ext.spectral_norm(torch.nn.Conv2d(16, 33, 3), backend=backend).to("cuda", dtype)
        conv(torch.randn(2, 16, 5, 5, device="cuda", dtype=dtype)).float().sum().backward()
        conv.eval()(torch.randn(2, 16, 5, 5, device="cuda", dtype=dtype))
torch.cuda.synchronize()
print("gpu_small_case: done")
