"""sagan-sample: a grid of samples from a sagan-train checkpoint's EMA G."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .evaluation import grid, sample, save_png
from .files import WriteError
from .models import build_models, has_conv_bias
from .run_folder import checkpoints, load_checkpoint
from .train_config import ArgumentParser, TrainConfig, UsageError, version_line


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="sagan-sample", description=main.__doc__)
    p.add_argument("--version", action="version", version=version_line("sagan-sample"))
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint file")
    p.add_argument("--output", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class, or per row if unconditional")
    p.add_argument("--classes", type=int, nargs="*", help="which classes (default: all, up to 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise: the same seed draws the same grid "
                                                        "(default 0)")
    p.add_argument("--device", default="cpu", help="where G runs: cpu (default), cuda, cuda:1, ...")
    return p


def main(argv: list[str] | None = None) -> int:
    """sagan-sample RUN_OR_CHECKPOINT: a grid of samples from G's EMA (one row per class)."""
    a = parser().parse_args(argv)
    try:
        path = Path(a.checkpoint)
        if path.is_dir():
            found = checkpoints(path)
            if not found:
                raise UsageError(f"{path}: no checkpoints in {path / 'checkpoints'}")
            path = found[-1]
        elif not path.is_file():
            raise UsageError(f"{path}: no such run folder or checkpoint")
        state = load_checkpoint(path, torch.device(a.device))
        config = TrainConfig.from_saved(state["config"])
        g_state = state["G_ema"] or state["G"]
        g, _ = build_models(config.image_size, state["channels"], state["num_classes"], **config.model_options(),
                            g_conv_bias=has_conv_bias(g_state))
        g.load_state_dict(g_state)
        g = g.to(a.device).eval()
        num_classes = state["num_classes"]
        classes = a.classes if a.classes else list(range(min(num_classes, 10)))
        if num_classes and any(not 0 <= c < num_classes for c in classes):
            raise UsageError(f"--classes must be in [0, {num_classes}), got {classes}")
        rows = len(classes) if num_classes else 8
        gen = torch.Generator(a.device).manual_seed(a.seed)
        z = torch.randn(rows * a.per_class, config.z_dim, device=a.device, generator=gen)
        y = torch.tensor(classes, device=a.device).repeat_interleave(a.per_class) if num_classes else None
        save_png(grid(sample(g, z, y), rows), Path(a.output))
    except (UsageError, WriteError) as e:
        print(f"sagan-sample: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output} ({rows} rows of {a.per_class}) from {path} (step {state['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
