"""sagan-train: a class-conditional SAGAN (Zhang et al. 2019) on sagan_ext's fused attention and
spectral norm, with hinge loss and TTUR. Runs on a CPU with the embedded digits dataset, on a GPU,
and data-parallel on many through `torchrun --nproc_per_node K -m sagan_ext.train`.

Read top to bottom: options; setting up (devices, data, models, optimizers, resume); one training
step; what is written to the run folder; the loop; the command lines (sagan-train, sagan-sample).

Run folder (--out): config.json, metrics.csv, tensorboard/, samples/ (fixed-noise grids, one row
per class), attention/ (where a few query points of G's and D's attention look), checkpoints/
(the last --keep-checkpoints kept), classifier.pt (the proxy metric's network). Every file is
replaced atomically (sagan_ext/files.py) and metrics.csv only ever gains rows, so a kill at any
moment leaves a run that --resume continues; a fresh run never starts in a folder that holds one.
"""
from __future__ import annotations

import argparse
import copy
import csv
import difflib
import io
import json
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .backends import select, tf32_allowed
from .data import DatasetError, ImageDataset, batch_indices, load_dataset, to_float
from .evaluation import (InceptionFID, attention_overlays, feature_statistics, frechet_distance, grid,
                         load_or_train_classifier, sample, save_png)
from .files import WriteError, remove_temporary_files, write_atomically, write_text_atomically
from .models import (IMAGE_SIZES, build_models, default_attention_resolution, has_conv_bias, layer_sigmas,
                     sync_batch_norm)

# ---------------------------------------------------------------------------------------------
# Options: defaults < --config file < the run's saved config (--resume) < the command line.

DEFAULTS = dict(
    dataset="digits", image_size=32, steps=1500, batch_size=32, out="runs/sagan", resume=None, device="auto",
    ops="fused", attention="sagan", attention_res=None, unconditional=False, ch=16, d_ch=None, z_dim=128,
    loss="hinge", gp_weight=10.0, lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9, d_steps=1,
    ema_decay=0.999, amp="none", channels_last=False, compile=False, seed=0,
    sync_bn=False,
    log_every=25, eval_every=250, eval_samples=1000, checkpoint_every=250, keep_checkpoints=3,
    inception=None, progress=True, threads=None, max_loss=1e4, overwrite=False,
)
# what a resumed run may change; anything else would make it a different run
RUNTIME_OPTIONS = {"steps", "resume", "out", "device", "log_every", "eval_every", "eval_samples", "checkpoint_every",
                   "keep_checkpoints", "inception", "progress", "compile", "threads", "max_loss", "overwrite"}
# a folder holding any of these (or a checkpoint) holds a run: a fresh run refuses to start there
RUN_MARKERS = ("config.json", "metrics.csv", "tensorboard")
# what --overwrite deletes of an earlier run (classifier.pt too, unless it was trained on the same data)
RUN_CONTENTS = ("config.json", "metrics.csv", "tensorboard", "samples", "attention", "checkpoints")
DIVERGENCE_STEPS = 100  # |loss| above --max-loss for this many steps in a row stops the run


class UsageError(Exception):
    """Bad options, data, checkpoint or run folder: one clear message, exit status 2."""


class StoppedWithRankZero(UsageError):
    """Another rank's side of a failure on rank 0 (a file it could not write): every rank stops
    with exit status 2 at the same point instead of waiting for rank 0 in the next collective."""


class TrainingDiverged(Exception):
    """A NaN/inf loss, parameter, buffer or optimizer state, or a loss beyond --max-loss: exit
    status 3; the last checkpoint, which is finite, is kept."""


def closest(given: str, known) -> str | None:
    """The known option (or config key) closest to a mistyped one: --lr_g -> --lr-g, --lrg -> --lr-g."""
    normal = lambda o: o.lower().replace("_", "-")  # noqa: E731
    by_normal = {normal(k): k for k in known}
    if normal(given) in by_normal:
        return by_normal[normal(given)]
    match = difflib.get_close_matches(normal(given), list(by_normal), n=1, cutoff=0.7)
    return by_normal[match[0]] if match else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a suggestion for an unknown option: "--lr_g (did you mean --lr-g?)"."""

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            options = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
            guesses = [(o, closest(o, known)) for o in options]
            guesses = [f"{guess} for {o}" if len(options) > 1 else guess for o, guess in guesses if guess]
            self.error(f"unrecognized arguments: {' '.join(unknown)}"
                       + (f" (did you mean {', '.join(guesses)}?)" if guesses else ""))
        return parsed


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="sagan-train", argument_default=argparse.SUPPRESS,
        description="Train a class-conditional SAGAN with sagan_ext's fused attention and spectral norm. "
                    "The defaults train on the embedded handwritten digits on this machine.",
        epilog="Any option can also be set in a --config file (JSON or TOML, keys as the option names with "
               "underscores). Data-parallel: torchrun --nproc_per_node K -m sagan_ext.train ...")
    d = DEFAULTS
    p.add_argument("--version", action="version", version=version_line("sagan-train"))
    p.add_argument("--config", help="JSON or TOML file of options")
    p.add_argument("--dataset", help="'digits' (embedded, default), an image folder with one sub-folder per class, "
                                     "a CIFAR-10 python folder (data_batch_1..5) or an .npz file (images, labels)")
    p.add_argument("--image-size", type=int, help=f"one of {IMAGE_SIZES} (default {d['image_size']})")
    p.add_argument("--steps", type=int, help=f"total G steps; with --resume, continue up to it (default {d['steps']})")
    p.add_argument("--batch-size", type=int, help=f"per process (default {d['batch_size']})")
    p.add_argument("--out", help=f"run folder (default {d['out']})")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out folder that holds one, deleting that run's files (without it, "
                        "sagan-train refuses)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--ops", choices=["fused", "eager"], help="fused: sagan_ext's operators (default); eager: the same "
                                                             "models on bmm/softmax attention and torch's spectral_norm")
    p.add_argument("--attention", choices=["sagan", "biggan"], help="attention variant (default sagan)")
    p.add_argument("--attention-res", type=int, help="feature-map size of the attention blocks (default: 32, or 16 "
                                                      "for 32-pixel images)")
    p.add_argument("--unconditional", action="store_true", help="ignore labels (plain BN in G, no projection in D)")
    p.add_argument("--ch", type=int, help=f"base channel width of G (and D) (default {d['ch']})")
    p.add_argument("--d-ch", type=int, help="base channel width of D (default: --ch)")
    p.add_argument("--z-dim", type=int, help=f"noise size (default {d['z_dim']})")
    p.add_argument("--loss", choices=["hinge", "ns", "wgan-gp"], help="hinge (default), non-saturating, or WGAN-GP "
                                                                       "(its penalty runs a double backward)")
    p.add_argument("--gp-weight", type=float, help=f"WGAN-GP penalty weight (default {d['gp_weight']})")
    p.add_argument("--lr-g", type=float, help=f"G learning rate (default {d['lr_g']}, the paper's TTUR)")
    p.add_argument("--lr-d", type=float, help=f"D learning rate (default {d['lr_d']}, the paper's TTUR)")
    p.add_argument("--beta1", type=float, help=f"Adam beta1 (default {d['beta1']})")
    p.add_argument("--beta2", type=float, help=f"Adam beta2 (default {d['beta2']}, the paper's; the official code "
                                                f"used 0.999)")
    p.add_argument("--d-steps", type=int, help=f"D steps per G step (default {d['d_steps']})")
    p.add_argument("--ema-decay", type=float, help=f"EMA of G's weights, used for samples and metrics "
                                                    f"(default {d['ema_decay']}; 0 turns it off)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast mixed precision (default none)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    p.add_argument("--sync-bn", action="store_true", help="with many processes, G's batch norm takes its statistics "
                                                          "over the global batch (cross-replica BN), so that the run "
                                                          "is the single-process run")
    p.add_argument("--seed", type=int, help=f"seed of the weights, the noise, the batch order and the fixed sample "
                                             f"noise: the same seed and options give the same run "
                                             f"(default {d['seed']})")
    p.add_argument("--threads", type=int, help="CPU threads for torch's operators (default: torch's, usually one per "
                                               "core); fewer helps on a shared machine")
    p.add_argument("--log-every", type=int, help=f"steps between metrics rows (default {d['log_every']})")
    p.add_argument("--eval-every", type=int, help=f"steps between samples, attention maps and metrics "
                                                   f"(default {d['eval_every']})")
    p.add_argument("--eval-samples", type=int, help=f"samples for the quality metrics (default {d['eval_samples']})")
    p.add_argument("--checkpoint-every", type=int, help=f"steps between checkpoints; the last step always writes one "
                                                        f"(default {d['checkpoint_every']})")
    p.add_argument("--keep-checkpoints", type=int, help=f"how many of the latest checkpoints to keep; older ones are "
                                                        f"deleted (default {d['keep_checkpoints']})")
    p.add_argument("--max-loss", type=float, help=f"stop (exit status 3) when |loss D| or |loss G| (WGAN-GP: |loss D|) "
                                                  f"stays above this for {DIVERGENCE_STEPS} steps in a row: the run "
                                                  f"has diverged (default {d['max_loss']:g}; 0 turns this off)")
    p.add_argument("--inception", metavar="FILE", help="TorchScript Inception-v3 (StyleGAN's inception-2015-12-05.pt) "
                                                       "to report FID besides the built-in proxy")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def version_line(prog: str) -> str:
    return f"{prog} (sagan_ext) {__version__}, torch {torch.__version__}"


def read_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
        if path.endswith(".toml"):
            import tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except Exception as e:
        raise UsageError(f"--config {path}: cannot read it ({e})") from e
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        guesses = [f"{k} (did you mean {closest(k, DEFAULTS).replace('-', '_')}?)" if closest(k, DEFAULTS) else k
                   for k in unknown]
        raise UsageError(f"--config {path}: unknown options: {', '.join(guesses)}")
    return values


def resolve_options(argv: list[str] | None) -> dict:
    given = vars(parser().parse_args(argv))
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    explicit = {**from_file, **given}
    options = {**DEFAULTS, **explicit}
    if options["resume"]:
        run = Path(options["resume"])
        if explicit.get("overwrite"):
            raise UsageError(f"--resume {run} continues a run; --overwrite would delete it: give one of them")
        saved = saved_options(run)
        changed = sorted(k for k, v in explicit.items() if k not in RUNTIME_OPTIONS and saved.get(k) != v)
        if changed:
            raise UsageError(f"--resume {run}: cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} "
                             f"of an existing run (start a new one with --out)")
        options = {**options, **saved, **{k: v for k, v in explicit.items() if k in RUNTIME_OPTIONS}}
        options.update(out=str(run), overwrite=False)
    elif not options["overwrite"] and holds_run(Path(options["out"])) and int(os.environ.get("RANK", "0")) == 0:
        # rank 0 alone decides: it may already have started writing when another rank looks
        out = options["out"]
        raise UsageError(f"--out {out} already holds a run; continue it with --resume {out}, start a new run with "
                         f"another --out, or delete that run and start afresh with --overwrite")
    check_options(options)
    return options


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS) or bool(checkpoints(folder))


def delete_run(run: Path, o: dict) -> None:
    """--overwrite: delete the earlier run's files (RUN_CONTENTS), and its classifier.pt unless that
    was trained on the same dataset, image size and seed (this run would train it again identically)."""
    try:
        earlier = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        earlier = None
    same_data = isinstance(earlier, dict) and all(earlier.get(k) == o[k] for k in ("dataset", "image_size", "seed"))
    for name in RUN_CONTENTS + (() if same_data else ("classifier.pt",)):
        path = run / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            raise WriteError(Path(e.filename or path), e) from e


def saved_options(run: Path) -> dict:
    """A run's options: its config.json or, if that is unreadable (damaged by a kill or a disk
    error), the copy that every checkpoint holds, from the newest readable one."""
    try:
        saved = json.loads((run / "config.json").read_text())
        if isinstance(saved, dict):
            return saved
        problem: Exception = ValueError(f"holds {type(saved).__name__}, not the options")
    except (OSError, ValueError) as e:
        problem = e
    for path in reversed(checkpoints(run)):
        try:
            saved = load_checkpoint(path, torch.device("cpu"))["config"]
        except (UsageError, KeyError):
            continue
        print(f"sagan-train: warning: {run / 'config.json'} is unreadable ({problem}); using the options saved in "
              f"{path}", file=sys.stderr, flush=True)
        return saved
    raise UsageError(f"--resume {run}: not a run folder: no readable config.json ({problem}) and no readable "
                     f"checkpoint in {run / 'checkpoints'}")


def check_options(o: dict) -> None:
    if o["image_size"] not in IMAGE_SIZES:
        raise UsageError(f"--image-size must be one of {IMAGE_SIZES}, got {o['image_size']}")
    positive = ["steps", "batch_size", "ch", "z_dim", "d_steps", "log_every", "eval_every", "eval_samples",
                "checkpoint_every", "keep_checkpoints"]
    for k in positive:
        if not isinstance(o[k], int) or o[k] <= 0:
            raise UsageError(f"--{k.replace('_', '-')} must be a positive integer, got {o[k]!r}")
    if o["threads"] is not None and (not isinstance(o["threads"], int) or o["threads"] <= 0):
        raise UsageError(f"--threads must be a positive integer, got {o['threads']!r}")
    if not isinstance(o["max_loss"], (int, float)) or not o["max_loss"] >= 0:
        raise UsageError(f"--max-loss must be a number >= 0 (0: off), got {o['max_loss']!r}")
    if not 0 <= o["ema_decay"] < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {o['ema_decay']}")
    if o["inception"] and not Path(o["inception"]).is_file():
        raise UsageError(f"--inception {o['inception']}: no such file")


# ---------------------------------------------------------------------------------------------
# Setting up: processes and devices, data, models, optimizers, the checkpoint to resume from.

def setup_distributed(device_option: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_option == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_option)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device_option}: this torch has no CUDA device")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = [p for p in (run / "checkpoints").glob("step_*.pt") if p.stem[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[5:]))


def prune_checkpoints(run: Path, keep: int, newest: Path) -> None:
    """Keep `newest` (just written) and the keep - 1 checkpoints before it; any later one (from no
    run this code writes) is left alone, so pruning never deletes the checkpoint it was given."""
    step = int(newest.stem[5:])
    older = [p for p in checkpoints(run) if int(p.stem[5:]) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or "G" not in state or "step" not in state:
            raise ValueError("not a sagan-train checkpoint")
        return state
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}). Delete it to "
                         f"resume from the one before it.") from e


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
# One training step: d_steps D updates on real and fake images in one D call, then one G update.

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


class Trainer:
    def __init__(self, o: dict):
        self.o = o
        self.rank, self.world, self.device = setup_distributed(o["device"])
        self.main = self.rank == 0
        self.say = (lambda text: print(f"sagan-train: {text}", flush=True)) if self.main else (lambda text: None)
        self.run = Path(o["out"])
        if o["threads"]:
            torch.set_num_threads(o["threads"])
        self.say(f"reading the dataset ({o['dataset']})...")
        try:
            self.data: ImageDataset = load_dataset(o["dataset"], o["image_size"])
        except DatasetError as e:
            raise UsageError(str(e)) from e
        if self.data.skipped:
            shown = "\n  ".join(self.data.skipped[:10])
            more = f"\n  ... and {len(self.data.skipped) - 10} more" if len(self.data.skipped) > 10 else ""
            self.say(f"warning: skipped {len(self.data.skipped)} unreadable image file(s):\n  {shown}{more}")
        self.num_classes = 0 if o["unconditional"] else self.data.num_classes
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[o["amp"]]
        self.memory_format = torch.channels_last if o["channels_last"] else torch.contiguous_format

        torch.manual_seed(o["seed"])
        resume_from = self.latest_checkpoint() if o["resume"] else None
        g_conv_bias = resume_from is not None and has_conv_bias(resume_from[1]["G"])
        if g_conv_bias:
            self.say("this run's G has biases in its block convs (written by an earlier sagan_ext): it continues "
                     "with them; a new run's G has none")
        try:
            g, d = build_models(o["image_size"], self.data.channels, self.num_classes, ch=o["ch"], d_ch=o["d_ch"],
                                z_dim=o["z_dim"], attention_res=o["attention_res"], attention=o["attention"],
                                ops=o["ops"], g_conv_bias=g_conv_bias)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if o["sync_bn"]:
            g = sync_batch_norm(g)  # D has no batch norm
        if o["ops"] == "fused":  # the kernels now: a first build takes a while (and says so) before the
            for dtype in {torch.float32, self.amp_dtype or torch.float32}:  # progress bar starts, not in its ETA
                select("auto", self.device, dtype, tf32_allowed())
        self.G = g.to(self.device, memory_format=self.memory_format)
        self.D = d.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.G, o["ema_decay"]) if o["ema_decay"] > 0 else None
        betas = (o["beta1"], o["beta2"])
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=o["lr_g"], betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=o["lr_d"], betas=betas)
        fp16 = o["amp"] == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.step = 0
        if resume_from:
            self.restore(*resume_from)

        self.G_run, self.D_run, self.D_ddp = self.G, self.D, None  # what the step calls: DDP-wrapped, compiled
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_run = nn.parallel.DistributedDataParallel(self.G, device_ids=ids)
            self.D_run = self.D_ddp = nn.parallel.DistributedDataParallel(self.D, device_ids=ids)
        if o["compile"]:
            self.G_run, self.D_run = torch.compile(self.G_run), torch.compile(self.D_run)
        self.noise = torch.Generator(self.device)

    # -- resume and checkpoints ------------------------------------------------------------------
    def latest_checkpoint(self) -> tuple[Path, dict]:
        found = checkpoints(self.run)
        if not found:
            raise UsageError(f"--resume {self.run}: no checkpoints in {self.run / 'checkpoints'}")
        self.say(f"resuming from {found[-1]}...")
        return found[-1], load_checkpoint(found[-1], self.device)

    def restore(self, path: Path, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.step = state["step"]
        self.resumed_from = path

    def save_checkpoint(self) -> Path:
        """Rank 0's, after check_replicas and after Guard.check at the same step, which stops the run
        if any tensor saved here is not finite: every checkpoint is one a run can continue from."""
        state = dict(step=self.step, G=self.G.state_dict(), D=self.D.state_dict(),
                     G_ema=self.ema.model.state_dict() if self.ema else None,
                     opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(),
                     scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict(),
                     config=self.o, channels=self.data.channels, num_classes=self.num_classes,
                     class_names=self.data.class_names, version=__version__)
        path = self.run / "checkpoints" / f"step_{self.step:07d}.pt"
        write_atomically(path, lambda f: torch.save(state, f))
        prune_checkpoints(self.run, self.o["keep_checkpoints"], path)
        return path

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
        """After rank 0 wrote (or failed to write) the run folder: raise `failure` on the rank that
        had it, and StoppedWithRankZero on every other rank, so that all stop together (exit
        status 2) rather than the others waiting for rank 0 in their next collective."""
        if self.world > 1:
            flag = torch.tensor([int(failure is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and failure is None:
                raise StoppedWithRankZero(f"rank {self.rank}: rank 0 could not write the run folder (its message "
                                          f"says why); every rank stopped at step {self.step}")
        if failure is not None:
            raise failure

    def check_replicas(self) -> None:
        """Every rank must hold the same weights and spectral-norm vectors u, v. (BN running
        statistics are not checked: without --sync-bn each rank's are its own, and DDP
        re-broadcasts rank 0's at every forward.)"""
        tensors = [t for m in (self.G, self.D) for t in m.parameters()]
        tensors += [b for m in (self.G, self.D) for name, b in m.named_buffers() if name.endswith(("_u", "_v"))]
        local = torch.stack([t.detach().double().sum() for t in tensors])
        everyone = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(everyone, local)
        if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
            raise RuntimeError(f"step {self.step}: the data-parallel replicas hold different weights or SN vectors")

    # -- the step --------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def seed_noise(self, *stream: int) -> torch.Generator:
        """Noise as a function of (seed, step, sub-step), the same on every rank: exact resume with
        no RNG state to save. (The trailing 0 keeps the stream that single-process runs drew when
        the rank was part of the key.)"""
        key = self.o["seed"]
        for s in (*stream, 0):
            key = (key * 1_000_003 + s) % (2 ** 63)
        return self.noise.manual_seed(key)

    def rank_share(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch (the same slice batch_indices takes of the data)."""
        b = self.o["batch_size"]
        return batch[self.rank * b:(self.rank + 1) * b]

    def latent(self, noise: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """This rank's share of noise and labels drawn for the whole global batch, so that K
        processes train on exactly the batch one process would."""
        n = self.o["batch_size"] * self.world
        z = torch.randn(n, self.o["z_dim"], device=self.device, generator=noise)
        y = torch.randint(self.num_classes, (n,), device=self.device, generator=noise) if self.num_classes else None
        return self.rank_share(z), None if y is None else self.rank_share(y)

    def real_batch(self, data_step: int) -> tuple[Tensor, Tensor | None]:
        idx = batch_indices(len(self.data), self.o["batch_size"], data_step, self.o["seed"], self.rank, self.world)
        images = to_float(self.data.images[idx]).to(self.device, memory_format=self.memory_format)
        y = self.data.labels[idx].to(self.device) if self.num_classes else None
        return images, y

    def train_step(self) -> dict[str, Tensor]:
        o, b = self.o, self.o["batch_size"]
        for j in range(o["d_steps"]):
            noise = self.seed_noise(self.step, j)
            real, y_real = self.real_batch(self.step * o["d_steps"] + j)
            z, y_fake = self.latent(noise)
            with torch.no_grad(), self.autocast():
                fake = self.G_run(z, y_fake).contiguous(memory_format=self.memory_format)
            images, labels = [real, fake.to(real.dtype)], [y_real, y_fake]
            if o["loss"] == "wgan-gp":  # the interpolates go through the same D call (one DDP forward)
                alpha = self.rank_share(torch.rand(b * self.world, 1, 1, 1, device=self.device, generator=noise))
                images.append((alpha * real + (1 - alpha) * images[1]).requires_grad_(True))
                labels.append(y_real)
            y = None if y_real is None else torch.cat(labels)
            with self.autocast():
                logits = self.D_run(torch.cat(images), y).float()
                d_real, d_fake = logits[:b], logits[b:2 * b]
                loss_d = discriminator_loss(d_real, d_fake, o["loss"])
                if o["loss"] == "wgan-gp":
                    loss_d = loss_d + o["gp_weight"] * gradient_penalty(logits[2 * b:], images[2])
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler_d.scale(loss_d).backward()
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()

        z, y_fake = self.latent(self.seed_noise(self.step, o["d_steps"]))
        self.D.requires_grad_(False)  # G's step needs no D weight gradients (nor their all-reduce)
        with (self.D_ddp.no_sync() if self.D_ddp else nullcontext()), self.autocast():
            loss_g = generator_loss(self.D_run(self.G_run(z, y_fake), y_fake).float(), o["loss"])
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)
        if self.ema is not None:
            self.ema.update(self.G, self.step)
        self.step += 1
        return dict(loss_d=loss_d.detach(), loss_g=loss_g.detach(), d_real=d_real.detach().mean(),
                    d_fake=d_fake.detach().mean())


# ---------------------------------------------------------------------------------------------
# What goes into the run folder: metrics (CSV and TensorBoard), sample grids, attention maps.

class Outputs:
    """Rank 0's writer of everything in the run folder but the checkpoints."""

    def __init__(self, trainer: Trainer):
        t, o = trainer, trainer.o
        self.t, self.run = t, t.run
        if o["overwrite"] and holds_run(self.run):
            t.say(f"--overwrite: deleting the run in {self.run}")
            delete_run(self.run, o)
        for sub in ("samples", "attention", "checkpoints"):
            try:
                (self.run / sub).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WriteError(Path(e.filename or self.run / sub), e) from e
            remove_temporary_files(self.run / sub)
        remove_temporary_files(self.run)
        write_text_atomically(self.run / "config.json", json.dumps(o, indent=1))
        g_eval = t.ema.model if t.ema else t.G
        self.g_eval = g_eval
        self.gammas = {"gamma/G.attention": t.G.attention.gamma, "gamma/D.attention": t.D.attention.gamma}
        self.sigma_names = [f"sigma/G.{n}" for n in layer_sigmas(t.G)] + [f"sigma/D.{n}" for n in layer_sigmas(t.D)]
        self.columns = (["step", "images_per_s", "loss_d", "loss_g", "d_real", "d_fake", "fd_proxy",
                         "class_consistency", "fid"] + list(self.gammas) + self.sigma_names)
        self.metrics_path = self.run / "metrics.csv"
        self._start_csv(t.step)
        self.tensorboard = self._tensorboard(t.step)

        # the fixed inputs of every grid, map and metric (own generator: the training noise is untouched)
        fixed = torch.Generator(t.device).manual_seed(o["seed"] + 12345)
        rows = max(min(t.num_classes, 10), 1) if t.num_classes else 8
        self.grid_rows = rows
        self.grid_z = torch.randn(rows * 8, o["z_dim"], device=t.device, generator=fixed)
        self.grid_y = (torch.arange(rows * 8, device=t.device) // 8) if t.num_classes else None
        self.eval_z = torch.randn(o["eval_samples"], o["z_dim"], device=t.device, generator=fixed)
        self.eval_y = (torch.arange(o["eval_samples"], device=t.device) % t.num_classes) if t.num_classes else None
        self.real_for_maps = to_float(t.data.images[torch.linspace(0, len(t.data) - 1, 4).long()]).to(t.device)
        self.y_for_maps = t.data.labels[torch.linspace(0, len(t.data) - 1, 4).long()].to(t.device) if t.num_classes else None

        started = time.perf_counter()
        classifier = self.run / "classifier.pt"
        t.say(f"loading the proxy classifier for the quality metrics ({classifier})..." if classifier.exists() else
              "training the proxy classifier for the quality metrics (once per run folder; about a minute on a CPU)...")
        self.classifier, self.classifier_accuracy = load_or_train_classifier(classifier, t.data, t.device, o["seed"],
                                                                             say=t.say)
        t.say("computing the real images' statistics" + (" and Inception features..." if o["inception"] else "..."))
        real = to_float(t.data.images[:10000]).to(t.device)
        with torch.no_grad():
            self.real_stats = feature_statistics(torch.cat([self.classifier(real[i:i + 500])[0] for i in range(0, len(real), 500)]))
        try:
            self.inception = InceptionFID(o["inception"], t.device) if o["inception"] else None
        except ValueError as e:
            raise UsageError(str(e)) from e
        if self.inception:
            self.real_inception = feature_statistics(self.inception.features(real))
        self.setup_seconds = time.perf_counter() - started

    def _start_csv(self, step: int) -> None:
        """A resumed run keeps the rows up to its checkpoint and drops those past it, which it is
        about to compute again (and a last row torn by a kill). The file is replaced atomically:
        killed here, the run keeps every row it had."""
        kept = []
        if step > 0 and self.metrics_path.exists():
            with open(self.metrics_path, newline="") as f:
                whole_lines = [line for line in f if line.endswith("\n")]
            for row in csv.DictReader(whole_lines):
                try:
                    if int(row["step"]) <= step:
                        kept.append(row)
                except (KeyError, TypeError, ValueError):
                    continue
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomically(self.metrics_path, text.getvalue())

    def _tensorboard(self, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("TensorBoard logs skipped: pip install tensorboard", stacklevel=2)
            return None
        return SummaryWriter(str(self.run / "tensorboard"), purge_step=step or None)

    def log(self, row: dict) -> None:
        t = self.t
        row.update({k: float(v.detach()) for k, v in self.gammas.items()})
        sigmas = [*layer_sigmas(t.G).values(), *layer_sigmas(t.D).values()]
        row.update(zip(self.sigma_names, torch.stack(sigmas).tolist()))
        try:  # appended, not rewritten: a kill can tear only this row, which a resume drops
            with open(self.metrics_path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        except OSError as e:
            raise WriteError(self.metrics_path, e) from e
        if self.tensorboard:
            for k, v in row.items():
                if k != "step" and v == v and v != "":
                    self.tensorboard.add_scalar(k, v, row["step"])

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Metrics, samples and attention maps, with G (or its EMA) and D in eval mode: no BN
        statistics or SN power iteration, so evaluating never changes the training state."""
        modes = [(m, m.training) for m in (self.g_eval, self.t.D)]
        for m, _ in modes:
            m.eval()
        try:
            return self._evaluate(step)
        finally:
            for m, mode in modes:
                m.train(mode)

    def _evaluate(self, step: int) -> dict:
        t = self.t
        fake = sample(self.g_eval, self.eval_z, self.eval_y)
        features, logits = zip(*(self.classifier(fake[i:i + 500]) for i in range(0, len(fake), 500)))
        result = dict(fd_proxy=frechet_distance(self.real_stats, feature_statistics(torch.cat(features))))
        if t.num_classes:
            result["class_consistency"] = (torch.cat(logits).argmax(1) == self.eval_y).float().mean().item()
        if self.inception:
            result["fid"] = frechet_distance(self.real_inception, feature_statistics(self.inception.features(fake)))
        self.draw(step)
        return result

    def draw(self, step: int) -> None:
        t = self.t
        images = sample(self.g_eval, self.grid_z, self.grid_y)
        save_png(grid(images, self.grid_rows), self.run / "samples" / f"step_{step:07d}.png")
        save_png(grid(images, self.grid_rows), self.run / "samples" / "latest.png")
        if self.tensorboard:
            self.tensorboard.add_image("samples", grid(images, self.grid_rows), step)
        g_images, g_attention = self.g_eval(self.grid_z[::8][:4], None if self.grid_y is None else self.grid_y[::8][:4],
                                            return_attention=True)
        _, d_attention = t.D(self.real_for_maps, self.y_for_maps, return_attention=True)
        for name, images, attention in (("G", g_images, g_attention), ("D", self.real_for_maps, d_attention)):
            overlay = attention_overlays(images.float(), attention)
            save_png(overlay, self.run / "attention" / f"{name}_step_{step:07d}.png")
            save_png(overlay, self.run / "attention" / f"{name}_latest.png")
            if self.tensorboard:
                self.tensorboard.add_image(f"attention/{name}", overlay, step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


# ---------------------------------------------------------------------------------------------
# The loop.

class Guard:
    """Stops a run that went bad (TrainingDiverged, exit status 3): a NaN/inf loss; a NaN/inf
    parameter, buffer or optimizer state of G, D or G's EMA (so no checkpoint ever holds one); or
    |loss D| or |loss G| above --max-loss for DIVERGENCE_STEPS steps in a row (WGAN-GP: |loss D|
    only, as its G loss has no fixed offset). record() runs every step without a device sync;
    check() syncs once, at every log, evaluation and checkpoint step."""

    def __init__(self, t: Trainer):
        self.t, self.max_loss = t, t.o["max_loss"]
        self.bounded = {"loss_d": "|loss D|", "loss_g": "|loss G|"}
        if t.o["loss"] == "wgan-gp":
            del self.bounded["loss_g"]
        self.first_nonfinite_loss = torch.full((), -1, dtype=torch.long, device=t.device)  # first such step
        self.first_diverged = torch.full((), -1, dtype=torch.long, device=t.device)  # first step of such a run
        self.steps_above = torch.zeros((), dtype=torch.long, device=t.device)

    def record(self, losses: dict[str, Tensor]) -> None:
        loss_d, loss_g, step = losses["loss_d"], losses["loss_g"], self.t.step
        finite = torch.isfinite(loss_d) & torch.isfinite(loss_g)
        seen = self.first_nonfinite_loss
        self.first_nonfinite_loss = torch.where(finite | (seen >= 0), seen, step)
        if self.max_loss:
            above = torch.stack([losses[k].abs() > self.max_loss for k in self.bounded]).any()
            self.steps_above = torch.where(above, self.steps_above + 1, 0)
            started = (self.steps_above >= DIVERGENCE_STEPS) & (self.first_diverged < 0)
            self.first_diverged = torch.where(started, step - DIVERGENCE_STEPS + 1, self.first_diverged)

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
                       f"{self.max_loss:g} for {DIVERGENCE_STEPS} steps from step {diverged}")
        else:
            return
        raise TrainingDiverged(f"{problem}; training stopped. The last checkpoint, all finite, is "
                               f"{last_checkpoint or '(none yet)'}; try a lower learning rate or --amp none, then "
                               f"--resume.")


def train(o: dict) -> dict:
    """Train to o['steps'] G steps; returns a summary (the last metrics, paths)."""
    t = Trainer(o)
    out, failure = None, None
    if t.main:
        try:
            out = Outputs(t)
        except (UsageError, WriteError) as e:  # the other ranks must not wait for rank 0 (nor at a barrier)
            failure = e
    t.agree(failure)
    if out and o["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=o["steps"], initial=t.step, unit="step", dynamic_ncols=True)
    else:
        bar = None
    say = (bar.write if bar else print) if t.main else (lambda *_: None)
    if out:
        say(f"sagan-train: {o['dataset']} ({len(t.data)} images, {t.num_classes or 'no'} classes) at "
            f"{o['image_size']}x{o['image_size']}, {o['ops']} ops, {o['attention']} attention at "
            f"{o['attention_res'] or default_attention_resolution(o['image_size'])}x"
            f"{o['attention_res'] or default_attention_resolution(o['image_size'])}, {t.world} process(es) on "
            f"{t.device}"
            + (f" ({torch.get_num_threads()} CPU threads)" if t.device.type == "cpu" else "")
            + f"; proxy classifier accuracy {out.classifier_accuracy:.3f}"
            + (f"; resumed from {t.resumed_from} at step {t.step}" if o["resume"] else ""))

    guard = Guard(t)
    last_checkpoint, last_metrics = (t.resumed_from if o["resume"] else None), {}
    sums, since, clock = {}, 0, time.perf_counter()
    images_per_step = o["batch_size"] * t.world * o["d_steps"]

    try:
        while t.step < o["steps"]:
            losses = t.train_step()
            guard.record(losses)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v
            since += 1
            if bar:
                bar.update(1)
            at_log, at_eval = t.step % o["log_every"] == 0, t.step % o["eval_every"] == 0 or t.step == o["steps"]
            at_checkpoint = t.step % o["checkpoint_every"] == 0 or t.step == o["steps"]
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
                    t.check_replicas()
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


def closing_message(t: Trainer, last_checkpoint: Path | None) -> str:
    """What the run folder holds, naming only files that exist."""
    named = [("samples/latest.png", "samples, one row per class"),
             ("attention/G_latest.png", "where G's query points attend"),
             ("attention/D_latest.png", "where D's query points attend"), ("metrics.csv", None),
             ("tensorboard", f"tensorboard --logdir {t.run}")]
    parts = [name + (f" ({what})" if what else "") for name, what in named if (t.run / name).exists()]
    if last_checkpoint is not None and Path(last_checkpoint).exists():
        parts.append(f"last checkpoint {Path(last_checkpoint).relative_to(t.run)}")
    skipped = f" {len(t.data.skipped)} unreadable image file(s) were skipped." if t.data.skipped else ""
    return f"done: {t.step} steps.{skipped} Run folder {t.run}/: " + ", ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Command lines.

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


def sample_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sagan-sample", description=sample_main.__doc__)
    p.add_argument("--version", action="version", version=version_line("sagan-sample"))
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint file")
    p.add_argument("--output", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class, or per row if unconditional")
    p.add_argument("--classes", type=int, nargs="*", help="which classes (default: all, up to 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise: the same seed draws the same grid "
                                                        "(default 0)")
    p.add_argument("--device", default="cpu", help="where G runs: cpu (default), cuda, cuda:1, ...")
    return p


def sample_main(argv: list[str] | None = None) -> int:
    """sagan-sample RUN_OR_CHECKPOINT: a grid of samples from G's EMA (one row per class)."""
    a = sample_parser().parse_args(argv)
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
        o = state["config"]
        g_state = state["G_ema"] or state["G"]
        g, _ = build_models(o["image_size"], state["channels"], state["num_classes"], ch=o["ch"], d_ch=o["d_ch"],
                            z_dim=o["z_dim"], attention_res=o["attention_res"], attention=o["attention"],
                            ops=o["ops"], g_conv_bias=has_conv_bias(g_state))
        g.load_state_dict(g_state)
        g = g.to(a.device).eval()
        num_classes = state["num_classes"]
        classes = a.classes if a.classes else list(range(min(num_classes, 10)))
        if num_classes and any(not 0 <= c < num_classes for c in classes):
            raise UsageError(f"--classes must be in [0, {num_classes}), got {classes}")
        rows = len(classes) if num_classes else 8
        gen = torch.Generator(a.device).manual_seed(a.seed)
        z = torch.randn(rows * a.per_class, o["z_dim"], device=a.device, generator=gen)
        y = torch.tensor(classes, device=a.device).repeat_interleave(a.per_class) if num_classes else None
        save_png(grid(sample(g, z, y), rows), Path(a.output))
    except (UsageError, WriteError) as e:
        print(f"sagan-sample: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output} ({rows} rows of {a.per_class}) from {path} (step {state['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
