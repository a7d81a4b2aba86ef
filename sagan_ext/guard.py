"""The guard that stops a sagan-train run gone bad (exit status 3) before it writes a checkpoint
that holds a NaN or an inf."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor


class TrainingDiverged(Exception):
    """A NaN/inf loss, parameter, buffer or optimizer state, or a loss beyond --max-loss: exit
    status 3; the last checkpoint, which is finite, is kept."""


class Guard:
    """Stops a run that went bad (TrainingDiverged): a NaN/inf loss; a NaN/inf parameter, buffer
    or optimizer state of G, D or G's EMA (so no checkpoint ever holds one); or |loss D| or
    |loss G| above max_loss for divergence_steps steps in a row (WGAN-GP: |loss D| only, as its G
    loss has no fixed offset). record() runs every step without a device sync; check() syncs
    once, at every log, evaluation and checkpoint step. `trainer`: train.Trainer (its step,
    world size, device and first_nonfinite())."""

    def __init__(self, trainer, max_loss: float, loss: str, divergence_steps: int):
        self.t, self.max_loss, self.divergence_steps = trainer, max_loss, divergence_steps
        self.bounded = {"loss_d": "|loss D|", "loss_g": "|loss G|"}
        if loss == "wgan-gp":
            del self.bounded["loss_g"]
        device = trainer.device
        self.first_nonfinite_loss = torch.full((), -1, dtype=torch.long, device=device)  # first such step
        self.first_diverged = torch.full((), -1, dtype=torch.long, device=device)  # first step of such a run
        self.steps_above = torch.zeros((), dtype=torch.long, device=device)

    def record(self, losses: dict[str, Tensor]) -> None:
        loss_d, loss_g, step = losses["loss_d"], losses["loss_g"], self.t.step
        finite = torch.isfinite(loss_d) & torch.isfinite(loss_g)
        seen = self.first_nonfinite_loss
        self.first_nonfinite_loss = torch.where(finite | (seen >= 0), seen, step)
        if self.max_loss:
            above = torch.stack([losses[k].abs() > self.max_loss for k in self.bounded]).any()
            self.steps_above = torch.where(above, self.steps_above + 1, 0)
            started = (self.steps_above >= self.divergence_steps) & (self.first_diverged < 0)
            self.first_diverged = torch.where(started, step - self.divergence_steps + 1, self.first_diverged)

    def check(self, last_checkpoint: Path | None) -> None:
        t = self.t
        bad_tensor = t.first_nonfinite()
        flags = torch.stack([self.first_nonfinite_loss, self.first_diverged,
                             torch.tensor(int(bad_tensor is not None), device=t.device)])
        if t.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite_loss, diverged, nonfinite_tensor = flags.tolist()
        if nonfinite_loss >= 0:
            problem = f"a loss became NaN or inf at step {nonfinite_loss}"
        elif nonfinite_tensor:
            problem = (f"{bad_tensor or 'a parameter, buffer or optimizer state (on another rank)'} became NaN or inf "
                       f"by step {t.step}")
        elif diverged >= 0:
            problem = (f"the run diverged: {' or '.join(self.bounded.values())} stayed above --max-loss "
                       f"{self.max_loss:g} for {self.divergence_steps} steps from step {diverged}")
        else:
            return
        raise TrainingDiverged(f"{problem}; training stopped. The last checkpoint, all finite, is "
                               f"{last_checkpoint or '(none yet)'}; try a lower learning rate or --amp none, then "
                               f"--resume.")
