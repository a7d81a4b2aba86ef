"""python -m sagan_ext.demo: run the fused block next to the eager heykeetae-style block on this
machine and print how they compare (agreement, time, backend)."""
from __future__ import annotations

import argparse
import time

import torch

import sagan_ext


def _eager_block(x, m):
    """heykeetae's Self_Attn: bmm -> softmax -> bmm, the N x N map in memory."""
    b, c, h, w = x.shape
    q = m.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
    k = m.key_conv(x).view(b, -1, h * w)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    v = m.value_conv(x).view(b, -1, h * w)
    return m.gamma * torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w) + x


def _time(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="feature map height = width")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"sagan_ext {sagan_ext.__version__}, torch {torch.__version__}, device {device}")
    for name, why in sagan_ext.available_backends().items():
        print(f"  backend {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    torch.manual_seed(0)
    block = sagan_ext.FusedSelfAttention(args.channels).to(device)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    chosen = sagan_ext.backends.select("auto", x.device, x.dtype).name

    fused_out = block(x)
    eager_out = _eager_block(x, block)
    err = ((fused_out - eager_out).norm() / eager_out.norm()).item()

    def step(forward):
        def run():
            forward().backward(grad)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    t_fused = _time(step(lambda: block(x)), args.repeat)
    t_eager = _time(step(lambda: _eager_block(x, block)), args.repeat)
    n = args.size * args.size
    print(f"\nSAGAN block (B, C, H, W) = ({args.batch}, {args.channels}, {args.size}, {args.size}), N = {n}; "
          f"fused backend: {chosen}")
    print(f"  output agrees with the eager block: relative error {err:.1e}")
    print(f"  forward+backward: fused {t_fused * 1e3:.1f} ms, eager {t_eager * 1e3:.1f} ms "
          f"-> {t_eager / t_fused:.2f}x faster")
    print(f"  attention map the eager block keeps per image: {n * n * 4 / 2**20:.1f} MiB; "
          f"the fused block keeps O(N*C): {n * (args.channels + 1) * 4 / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
