"""sagan-train: a class-conditional SAGAN (Zhang et al. 2019) on sagan_ext's fused attention and
spectral norm, with hinge loss and TTUR. Runs on a CPU with the embedded digits dataset, on a GPU,
and data-parallel on many through `torchrun --nproc_per_node K -m sagan_ext.train`.

This file is the training loop, top to bottom: the losses; the Trainer, which sets up a run
(processes, data, models, optimizers, the checkpoint to resume from) and takes its steps (D steps,
then a G step); train(), the loop; main(), the command line. Beside it: train_config.py (every
option, declared once), run_folder.py (the run folder, its checkpoints, --resume), outputs.py
(metrics, samples, attention maps), guard.py (stopping a run gone bad), distributed.py (DDP),
sample.py (sagan-sample), and models.py, data.py, evaluation.py.
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, run_folder
from .backends import select, tf32_allowed
from .data import DatasetError, ImageDataset, batch_indices, load_dataset, to_float
from .distributed import StoppedWithRankZero, agree, check_replicas, setup_distributed
from .files import WriteError
from .guard import Guard, TrainingDiverged
from .models import build_models, default_attention_resolution, has_conv_bias, sync_batch_norm
from .outputs import Outputs, closing_message
from .run_folder import checkpoints, load_checkpoint, resolve_options
from .sample import main as sample_main  # noqa: F401  (sagan-sample's entry point before sample.py)
from .train_config import DEFAULTS, DIVERGENCE_STEPS, TrainConfig, UsageError  # noqa: F401  (DEFAULTS: benchmarks)

# ---------------------------------------------------------------------------------------------
# Losses


def discriminator_loss(real: Tensor, fake: Tensor, loss: str) -> Tensor:
    if loss == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if loss == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return fake.mean() - real.mean()  # wgan-gp, plus the penalty


def generator_loss(fake: Tensor, loss: str) -> Tensor:
    return F.softplus(-fake).mean() if loss == "ns" else -fake.mean()


def gradient_penalty(logits_mixed: Tensor, mixed: Tensor) -> Tensor:
    """WGAN-GP: (||grad_x D(x_hat)|| - 1)^2 at random interpolates x_hat; a double backward."""
    (grad,) = torch.autograd.grad(logits_mixed.sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


class EMA:
    """Exponential moving average of G's parameters (buffers copied: BN statistics, SN vectors);
    the decay ramps up as (1 + t) / (10 + t) so that short runs are not dominated by the init."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# ---------------------------------------------------------------------------------------------
# The trainer: setting up a run, and one training step (d_steps D updates, then a G update).

class Trainer:
    def __init__(self, config: TrainConfig | Mapping):
        if not isinstance(config, TrainConfig):  # the options dict older code (and the benchmarks) pass
            config = TrainConfig(**config)
        self.config = c = config
        self.rank, self.world, self.device = setup_distributed(c.device)
        self.main = self.rank == 0
        self.say = (lambda text: print(f"sagan-train: {text}", flush=True)) if self.main else (lambda text: None)
        self.run = Path(c.out)
        if c.threads:
            torch.set_num_threads(c.threads)
        self.say(f"reading the dataset ({c.dataset})...")
        try:
            self.data: ImageDataset = load_dataset(c.dataset, c.image_size)
        except DatasetError as e:
            raise UsageError(str(e)) from e
        if self.data.skipped:
            shown = "\n  ".join(self.data.skipped[:10])
            more = f"\n  ... and {len(self.data.skipped) - 10} more" if len(self.data.skipped) > 10 else ""
            self.say(f"warning: skipped {len(self.data.skipped)} unreadable image file(s):\n  {shown}{more}")
        self.num_classes = 0 if c.unconditional else self.data.num_classes
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[c.amp]
        self.memory_format = torch.channels_last if c.channels_last else torch.contiguous_format

        torch.manual_seed(c.seed)
        resume_from = self.latest_checkpoint() if c.resume else None
        g_conv_bias = resume_from is not None and has_conv_bias(resume_from[1]["G"])
        if g_conv_bias:
            self.say("this run's G has biases in its block convs (written by an earlier sagan_ext): it continues "
                     "with them; a new run's G has none")
        try:
            g, d = build_models(c.image_size, self.data.channels, self.num_classes, **c.model_options(),
                                g_conv_bias=g_conv_bias)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if c.sync_bn:
            g = sync_batch_norm(g)  # D has no batch norm
        if c.ops == "fused":  # the kernels now: a first build takes a while (and says so) before the
            for dtype in {torch.float32, self.amp_dtype or torch.float32}:  # progress bar starts, not in its ETA
                select("auto", self.device, dtype, tf32_allowed())
        self.G = g.to(self.device, memory_format=self.memory_format)
        self.D = d.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.G, c.ema_decay) if c.ema_decay > 0 else None
        betas = (c.beta1, c.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=c.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=c.lr_d, betas=betas)
        fp16 = c.amp == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.step = 0
        if resume_from:
            self.load_state_dict(resume_from[1])
            self.resumed_from = resume_from[0]

        self.G_run, self.D_run, self.D_ddp = self.G, self.D, None  # what the step calls: DDP-wrapped, compiled
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_run = nn.parallel.DistributedDataParallel(self.G, device_ids=ids)
            self.D_run = self.D_ddp = nn.parallel.DistributedDataParallel(self.D, device_ids=ids)
        if c.compile:
            self.G_run, self.D_run = torch.compile(self.G_run), torch.compile(self.D_run)
        self.noise = torch.Generator(self.device)

    # -- resume and checkpoints ------------------------------------------------------------------
    def latest_checkpoint(self) -> tuple[Path, dict]:
        found = checkpoints(self.run)
        if not found:
            raise UsageError(f"--resume {self.run}: no checkpoints in {self.run / 'checkpoints'}")
        self.say(f"resuming from {found[-1]}...")
        return found[-1], load_checkpoint(found[-1], self.device)

    def state_dict(self) -> dict:
        return dict(step=self.step, G=self.G.state_dict(), D=self.D.state_dict(),
                    G_ema=self.ema.model.state_dict() if self.ema else None,
                    opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(),
                    scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict(),
                    config=self.config.as_dict(), channels=self.data.channels, num_classes=self.num_classes,
                    class_names=self.data.class_names, version=__version__)

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.step = state["step"]

    def save_checkpoint(self) -> Path:
        """Rank 0's, after check_replicas and after Guard.check at the same step, which stops the run
        if any tensor saved here is not finite: every checkpoint is one a run can continue from."""
        return run_folder.save_checkpoint(self.run, self.step, self.state_dict(), self.config.keep_checkpoints)

    def first_nonfinite(self) -> str | None:
        """The name of the first parameter, buffer or optimizer state of G, D or G's EMA that holds
        a NaN or inf (this rank's: BN statistics are per rank), or None."""
        nets = [("G", self.G), ("D", self.D)] + ([("G_ema", self.ema.model)] if self.ema else [])
        named = [(f"{net}.{k}", v) for net, model in nets for k, v in model.state_dict().items()]
        for net, model, opt in (("G", self.G, self.opt_g), ("D", self.D, self.opt_d)):
            names = {p: n for n, p in model.named_parameters()}
            named += [(f"{net}'s Adam {k} of {names.get(p, '?')}", v) for p, state in opt.state.items()
                      for k, v in state.items() if torch.is_tensor(v)]
        floats = [(k, v) for k, v in named if v.is_floating_point()]
        finite = torch.stack([torch.isfinite(v).all().to(self.device) for _, v in floats])
        if bool(finite.all()):
            return None
        return floats[int((~finite).nonzero()[0])][0]

    def agree(self, failure: Exception | None) -> None:
        """Every rank stops with rank 0's failure to write the run folder (distributed.agree)."""
        agree(failure, self.rank, self.world, self.device, self.step)

    # -- the step --------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def seed_noise(self, *stream: int) -> torch.Generator:
        """Noise as a function of (seed, step, sub-step), the same on every rank: exact resume with
        no RNG state to save. (The trailing 0 keeps the stream that single-process runs drew when
        the rank was part of the key.)"""
        key = self.config.seed
        for s in (*stream, 0):
            key = (key * 1_000_003 + s) % (2 ** 63)
        return self.noise.manual_seed(key)

    def rank_share(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch (the same slice batch_indices takes of the data)."""
        b = self.config.batch_size
        return batch[self.rank * b:(self.rank + 1) * b]

    def latent(self, noise: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """This rank's share of noise and labels drawn for the whole global batch, so that K
        processes train on exactly the batch one process would."""
        n = self.config.batch_size * self.world
        z = torch.randn(n, self.config.z_dim, device=self.device, generator=noise)
        y = torch.randint(self.num_classes, (n,), device=self.device, generator=noise) if self.num_classes else None
        return self.rank_share(z), None if y is None else self.rank_share(y)

    def real_batch(self, data_step: int) -> tuple[Tensor, Tensor | None]:
        c = self.config
        idx = batch_indices(len(self.data), c.batch_size, data_step, c.seed, self.rank, self.world)
        images = to_float(self.data.images[idx]).to(self.device, memory_format=self.memory_format)
        y = self.data.labels[idx].to(self.device) if self.num_classes else None
        return images, y

    def d_step(self, j: int) -> tuple[Tensor, Tensor, Tensor]:
        """The j-th D update of this step, on real and fake images in one D call: (loss, D's logits
        on the real images, on the fake ones)."""
        c, b = self.config, self.config.batch_size
        noise = self.seed_noise(self.step, j)
        real, y_real = self.real_batch(self.step * c.d_steps + j)
        z, y_fake = self.latent(noise)
        with torch.no_grad(), self.autocast():
            fake = self.G_run(z, y_fake).contiguous(memory_format=self.memory_format)
        images, labels = [real, fake.to(real.dtype)], [y_real, y_fake]
        if c.loss == "wgan-gp":  # the interpolates go through the same D call (one DDP forward)
            alpha = self.rank_share(torch.rand(b * self.world, 1, 1, 1, device=self.device, generator=noise))
            images.append((alpha * real + (1 - alpha) * images[1]).requires_grad_(True))
            labels.append(y_real)
        y = None if y_real is None else torch.cat(labels)
        with self.autocast():
            logits = self.D_run(torch.cat(images), y).float()
            d_real, d_fake = logits[:b], logits[b:2 * b]
            loss_d = discriminator_loss(d_real, d_fake, c.loss)
            if c.loss == "wgan-gp":
                loss_d = loss_d + c.gp_weight * gradient_penalty(logits[2 * b:], images[2])
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss_d).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        return loss_d, d_real, d_fake

    def g_step(self) -> Tensor:
        """This step's G update, through a D that gets no weight gradients; returns G's loss."""
        z, y_fake = self.latent(self.seed_noise(self.step, self.config.d_steps))
        self.D.requires_grad_(False)  # G's step needs no D weight gradients (nor their all-reduce)
        with (self.D_ddp.no_sync() if self.D_ddp else nullcontext()), self.autocast():
            loss_g = generator_loss(self.D_run(self.G_run(z, y_fake), y_fake).float(), self.config.loss)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)
        return loss_g

    def train_step(self) -> dict[str, Tensor]:
        for j in range(self.config.d_steps):
            loss_d, d_real, d_fake = self.d_step(j)
        loss_g = self.g_step()
        if self.ema is not None:
            self.ema.update(self.G, self.step)
        self.step += 1
        return dict(loss_d=loss_d.detach(), loss_g=loss_g.detach(), d_real=d_real.detach().mean(),
                    d_fake=d_fake.detach().mean())


# ---------------------------------------------------------------------------------------------
# The loop.

def train(config: TrainConfig) -> dict:
    """Train to config.steps G steps; returns a summary (the last metrics, paths)."""
    c = config
    t = Trainer(c)
    out, failure = None, None
    if t.main:
        try:
            out = Outputs(t)
        except (UsageError, WriteError) as e:  # the other ranks must not wait for rank 0 (nor at a barrier)
            failure = e
    t.agree(failure)
    if out and c.progress:
        from tqdm import tqdm
        bar = tqdm(total=c.steps, initial=t.step, unit="step", dynamic_ncols=True)
    else:
        bar = None
    say = (bar.write if bar else print) if t.main else (lambda *_: None)
    if out:
        attention_res = c.attention_res or default_attention_resolution(c.image_size)
        say(f"sagan-train: {c.dataset} ({len(t.data)} images, {t.num_classes or 'no'} classes) at "
            f"{c.image_size}x{c.image_size}, {c.ops} ops, {c.attention} attention at {attention_res}x{attention_res}, "
            f"{t.world} process(es) on {t.device}"
            + (f" ({torch.get_num_threads()} CPU threads)" if t.device.type == "cpu" else "")
            + f"; proxy classifier accuracy {out.classifier_accuracy:.3f}"
            + (f"; resumed from {t.resumed_from} at step {t.step}" if c.resume else ""))

    guard = Guard(t, c.max_loss, c.loss, DIVERGENCE_STEPS)
    last_checkpoint, last_metrics = (t.resumed_from if c.resume else None), {}
    sums, since, clock = {}, 0, time.perf_counter()
    images_per_step = c.batch_size * t.world * c.d_steps

    try:
        while t.step < c.steps:
            losses = t.train_step()
            guard.record(losses)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v
            since += 1
            if bar:
                bar.update(1)
            at_log, at_eval = t.step % c.log_every == 0, t.step % c.eval_every == 0 or t.step == c.steps
            at_checkpoint = t.step % c.checkpoint_every == 0 or t.step == c.steps
            if not (at_log or at_eval or at_checkpoint):
                continue
            guard.check(last_checkpoint)
            failure = None  # rank 0's write error: every rank takes part in the same collectives, then stops
            if at_log or at_eval:
                means = torch.stack(list(sums.values())) / since
                if t.world > 1:  # the global batch's: the mean of the ranks' means over equal shares
                    dist.all_reduce(means)
                    means /= t.world
                means = dict(zip(sums, means.tolist()))
                row = dict(step=t.step, images_per_s=images_per_step * since / (time.perf_counter() - clock), **means)
                try:
                    if out and at_eval:
                        row.update(out.evaluate(t.step))
                        say(f"step {t.step}: " + ", ".join(f"{k} {row[k]:.4g}" for k in ("loss_d", "loss_g", "fd_proxy",
                                                                                           "class_consistency", "fid")
                                                           if k in row))
                    if out:
                        out.log(row)
                except WriteError as e:
                    failure = e
                last_metrics = row
                if bar:
                    bar.set_postfix({"img/s": f"{row['images_per_s']:.0f}", "D": f"{means['loss_d']:.3f}",
                                     "G": f"{means['loss_g']:.3f}"})
                sums, since, clock = {}, 0, time.perf_counter()
            if at_checkpoint:
                if t.world > 1:
                    check_replicas([t.G, t.D], t.world, t.step)
                if t.main and failure is None:
                    try:
                        last_checkpoint = t.save_checkpoint()
                    except WriteError as e:
                        failure = e
            t.agree(failure)
    except WriteError as e:
        raise UsageError(f"{e}. Training stopped at step {t.step}; the run's other files are as they were, its last "
                         f"checkpoint is {last_checkpoint or '(none yet)'}. Free space or make the folder writable, "
                         f"then continue with --resume {t.run}") from e
    finally:
        if bar:
            bar.close()
        if out:
            out.close()
    summary = dict(run=str(t.run), step=t.step, checkpoint=str(last_checkpoint), metrics=last_metrics,
                   skipped_images=len(t.data.skipped))
    if out:
        print(closing_message(t, last_checkpoint))
    if t.world > 1:
        dist.barrier()
    return summary


# ---------------------------------------------------------------------------------------------
# The command line (sagan-sample: sample.py).

def main(argv: list[str] | None = None) -> int:
    try:
        train(resolve_options(argv))
    except StoppedWithRankZero as e:  # rank 0 printed the reason
        print(f"sagan-train: stopped: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"sagan-train: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # while starting: the run folder or its config cannot be written
        print(f"sagan-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"sagan-train: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _moved() -> dict:
    """{name this module had before its concerns moved out: (where it is now, its value)}."""
    from . import sample, train_config
    as_config = lambda o: o if isinstance(o, TrainConfig) else TrainConfig(**o)  # noqa: E731  (they took dicts)
    moved = {name: (f"sagan_ext.train_config.{name}", getattr(train_config, name))
             for name in ("closest", "ArgumentParser", "parser", "version_line", "read_config_file")}
    moved.update({name: (f"sagan_ext.run_folder.{name}", getattr(run_folder, name))
                  for name in ("RUN_MARKERS", "RUN_CONTENTS", "holds_run", "saved_options", "prune_checkpoints")})
    moved.update(
        sample_parser=("sagan_ext.sample.parser", sample.parser),
        RUNTIME_OPTIONS=("sagan_ext.train_config.TrainConfig.runtime_names()", TrainConfig.runtime_names()),
        check_options=("sagan_ext.train_config.TrainConfig.check", lambda o: as_config(o).check()),
        delete_run=("sagan_ext.run_folder.delete_run", lambda run, o: run_folder.delete_run(run, as_config(o))))
    return moved


def __getattr__(name: str):
    moved = _moved()
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where, value = moved[name]
    warnings.warn(f"sagan_ext.train.{name} is deprecated: use {where}", DeprecationWarning, stacklevel=2)
    return value


if __name__ == "__main__":
    sys.exit(main())
