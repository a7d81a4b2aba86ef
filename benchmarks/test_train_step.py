"""One full training step of the trainer's SAGAN (a D step on real + fake images, then a G step),
fused operators against the same models on eager PyTorch (`sagan-train --ops eager`). CPU: the
README's digits configuration (32 x 32, batch 32); GPU: 128 x 128, batch 64, bf16 autocast."""
import pytest
import torch

import blocks
from sagan_ext import train

CUDA = torch.cuda.is_available()
CONFIG = dict(image_size=128, batch_size=64, ch=64, amp="bf16") if CUDA else dict(image_size=32, batch_size=32, ch=16)


@pytest.mark.parametrize("ops", ["eager", "fused"])
def test_train_step(benchmark, ops, tmp_path):
    blocks.skip_past_deadline(20)
    options = {**train.DEFAULTS, **CONFIG, "ops": ops, "out": str(tmp_path), "progress": False}
    trainer = train.Trainer(options)

    def step():
        trainer.train_step()
        if CUDA:
            torch.cuda.synchronize()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update(ops=ops, **CONFIG, images_per_s=CONFIG["batch_size"] / benchmark.stats.stats.median,
                                peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None)
