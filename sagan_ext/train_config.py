"""sagan-train's options. Each is declared once, as a field of TrainConfig: its default, its help,
its check, and whether a resumed run may change it. The command line (parser), config files
(read_config_file: JSON or TOML, keys as the field names) and a run's saved options are read
through those declarations. Precedence, lowest first: the defaults, a --config file, the run's
saved options (--resume), the command line (run_folder.resolve_options)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import __version__
from .models import IMAGE_SIZES

DIVERGENCE_STEPS = 100  # |loss| above --max-loss for this many steps in a row stops the run


class UsageError(Exception):
    """Bad options, data, checkpoint or run folder: one clear message, exit status 2."""


# ---------------------------------------------------------------------------------------------
# checks: each returns what is wrong with an option's value, or None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value) -> Optional[str]:
    if not isinstance(value, int) or value <= 0:
        return f"{flag(name)} must be a positive integer, got {value!r}"
    return None


def optional_positive_int(name: str, value) -> Optional[str]:
    return None if value is None else positive_int(name, value)


def one_of_image_sizes(name: str, value) -> Optional[str]:
    return None if value in IMAGE_SIZES else f"{flag(name)} must be one of {IMAGE_SIZES}, got {value}"


def non_negative_number(name: str, value) -> Optional[str]:
    if not is_number(value) or not value >= 0:
        return f"{flag(name)} must be a number >= 0 (0: off), got {value!r}"
    return None


def unit_interval(name: str, value) -> Optional[str]:
    return None if is_number(value) and 0 <= value < 1 else f"{flag(name)} must be in [0, 1), got {value!r}"


def existing_file(name: str, value) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        return None  # of_declared_type reports it
    return None if not value or Path(value).is_file() else f"{flag(name)} {value}: no such file"


# an option's declared type -> (what a value of it is called, whether a value is one); bool is an
# int to Python, but not to an option; a float option takes an int too
_TYPES = {bool: ("true or false", lambda v: isinstance(v, bool)),
          int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number", is_number), str: ("a string", lambda v: isinstance(v, str)),
          type(None): ("none", lambda v: v is None)}


def of_declared_type(name: str, value, declared) -> Optional[str]:
    """What is wrong with the type of an option's value (a config file's values arrive as written:
    "0.99" for a number, 1 for a flag), or None."""
    allowed = typing.get_args(declared) if typing.get_origin(declared) is typing.Union else (declared,)
    if any(_TYPES[kind][1](value) for kind in allowed):
        return None
    return f"{flag(name)} must be {' or '.join(_TYPES[kind][0] for kind in allowed)}, got {value!r}"


def option(default, help: str, *, check: Optional[Callable[[str, Any], Optional[str]]] = None,
           runtime: bool = False, choices: Optional[list] = None, metavar: Optional[str] = None,
           cli_flag: Optional[str] = None):
    """A TrainConfig field. help: its --help text ({default} and {divergence_steps} filled in);
    check(name, value): what is wrong with a value, or None; runtime: a resumed run may change it
    (any other change would make it a different run); choices, metavar: as argparse's;
    cli_flag: the flag if not --<name> (a bool whose flag turns it off, as --no-progress)."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=check, runtime=runtime, choices=choices,
                                                            metavar=metavar, cli_flag=cli_flag))


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a sagan-train run (in the order --help lists them)."""

    dataset: str = option("digits", "'digits' (embedded, default), an image folder with one sub-folder per class, a "
                          "CIFAR-10 python folder (data_batch_1..5) or an .npz file (images, labels)")
    image_size: int = option(32, f"one of {IMAGE_SIZES} (default {{default}})", check=one_of_image_sizes)
    steps: int = option(1500, "total G steps; with --resume, continue up to it (default {default})",
                        check=positive_int, runtime=True)
    batch_size: int = option(32, "per process (default {default})", check=positive_int)
    out: str = option("runs/sagan", "run folder (default {default})", runtime=True)
    resume: Optional[str] = option(None, "continue the run in this folder from its latest checkpoint", runtime=True,
                                   metavar="RUN")
    overwrite: bool = option(False, "start a fresh run in an --out folder that holds one, deleting that run's files "
                             "(without it, sagan-train refuses)", runtime=True)
    device: str = option("auto", "auto (default), cpu, cuda, cuda:1, ...", runtime=True)
    ops: str = option("fused", "fused: sagan_ext's operators (default); eager: the same models on bmm/softmax "
                      "attention and torch's spectral_norm", choices=["fused", "eager"])
    attention: str = option("sagan", "attention variant (default sagan)", choices=["sagan", "biggan"])
    attention_res: Optional[int] = option(None, "feature-map size of the attention blocks (default: 32, or 16 for "
                                          "32-pixel images)")
    unconditional: bool = option(False, "ignore labels (plain BN in G, no projection in D)")
    ch: int = option(16, "base channel width of G (and D) (default {default})", check=positive_int)
    d_ch: Optional[int] = option(None, "base channel width of D (default: --ch)")
    z_dim: int = option(128, "noise size (default {default})", check=positive_int)
    loss: str = option("hinge", "hinge (default), non-saturating, or WGAN-GP (its penalty runs a double backward)",
                       choices=["hinge", "ns", "wgan-gp"])
    gp_weight: float = option(10.0, "WGAN-GP penalty weight (default {default})")
    lr_g: float = option(1e-4, "G learning rate (default {default}, the paper's TTUR)")
    lr_d: float = option(4e-4, "D learning rate (default {default}, the paper's TTUR)")
    beta1: float = option(0.0, "Adam beta1 (default {default})")
    beta2: float = option(0.9, "Adam beta2 (default {default}, the paper's; the official code used 0.999)")
    d_steps: int = option(1, "D steps per G step (default {default})", check=positive_int)
    ema_decay: float = option(0.999, "EMA of G's weights, used for samples and metrics (default {default}; 0 turns "
                              "it off)", check=unit_interval)
    amp: str = option("none", "autocast mixed precision (default none)", choices=["none", "bf16", "fp16"])
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile G and D", runtime=True)
    sync_bn: bool = option(False, "with many processes, G's batch norm takes its statistics over the global batch "
                           "(cross-replica BN), so that the run is the single-process run")
    seed: int = option(0, "seed of the weights, the noise, the batch order and the fixed sample noise: the same seed "
                       "and options give the same run (default {default})")
    threads: Optional[int] = option(None, "CPU threads for torch's operators (default: torch's, usually one per "
                                    "core); fewer helps on a shared machine", check=optional_positive_int, runtime=True)
    log_every: int = option(25, "steps between metrics rows (default {default})", check=positive_int, runtime=True)
    eval_every: int = option(250, "steps between samples, attention maps and metrics (default {default})",
                             check=positive_int, runtime=True)
    eval_samples: int = option(1000, "samples for the quality metrics (default {default})", check=positive_int,
                               runtime=True)
    checkpoint_every: int = option(250, "steps between checkpoints; the last step always writes one "
                                   "(default {default})", check=positive_int, runtime=True)
    keep_checkpoints: int = option(3, "how many of the latest checkpoints to keep; older ones are deleted "
                                   "(default {default})", check=positive_int, runtime=True)
    max_loss: float = option(1e4, "stop (exit status 3) when |loss D| or |loss G| (WGAN-GP: |loss D|) stays above "
                             "this for {divergence_steps} steps in a row: the run has diverged (default {default:g}; "
                             "0 turns this off)", check=non_negative_number, runtime=True)
    inception: Optional[str] = option(None, "TorchScript Inception-v3 (StyleGAN's inception-2015-12-05.pt) to report "
                                      "FID besides the built-in proxy", check=existing_file, runtime=True,
                                      metavar="FILE")
    progress: bool = option(True, "no progress bar", runtime=True, cli_flag="--no-progress")

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in cls.fields()]

    @classmethod
    def known(cls, saved: dict) -> dict:
        """A run's saved options (its config.json's, a checkpoint's) less any option since removed."""
        return {k: v for k, v in saved.items() if k in cls.names()}

    @classmethod
    def from_saved(cls, saved: dict) -> TrainConfig:
        """A run's saved options; those added since it was written take their defaults."""
        return cls(**cls.known(saved))

    @classmethod
    def runtime_names(cls) -> set[str]:
        """What a resumed run may change."""
        return {f.name for f in cls.fields() if f.metadata["runtime"]}

    def check(self) -> None:
        """UsageError naming the first option whose value its declared check, type or choices refuse
        (argparse checks the command line's; a config file's and a saved run's arrive as written)."""
        types = typing.get_type_hints(TrainConfig)
        for f in self.fields():
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            problem = ((f.metadata["check"] and f.metadata["check"](f.name, value))
                       or of_declared_type(f.name, value, types[f.name])
                       or (choices and value not in choices and f"{flag(f.name)} must be one of {choices}, got {value!r}"))
            if problem:
                raise UsageError(problem)

    def as_dict(self) -> dict:
        """The options as config.json and checkpoints store them."""
        return dataclasses.asdict(self)

    def __getitem__(self, name: str):
        """config["steps"]: the options as older code read them, from a dict."""
        return getattr(self, name)

    def model_options(self) -> dict:
        """models.build_models' keyword arguments that these options set."""
        return dict(ch=self.ch, d_ch=self.d_ch, z_dim=self.z_dim, attention_res=self.attention_res,
                    attention=self.attention, ops=self.ops)


DEFAULTS = TrainConfig().as_dict()


# ---------------------------------------------------------------------------------------------
# the command line and config files


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


def version_line(prog: str) -> str:
    return f"{prog} (sagan_ext) {__version__}, torch {torch.__version__}"


def parser() -> ArgumentParser:
    """sagan-train's command line, one flag per TrainConfig field: only the options given are in
    the parsed namespace (argparse.SUPPRESS), so that the defaults, a config file and a resumed
    run's options can sit below them."""
    p = ArgumentParser(
        prog="sagan-train", argument_default=argparse.SUPPRESS,
        description="Train a class-conditional SAGAN with sagan_ext's fused attention and spectral norm. "
                    "The defaults train on the embedded handwritten digits on this machine.",
        epilog="Any option can also be set in a --config file (JSON or TOML, keys as the option names with "
               "underscores). Data-parallel: torchrun --nproc_per_node K -m sagan_ext.train ...")
    p.add_argument("--version", action="version", version=version_line("sagan-train"))
    p.add_argument("--config", help="JSON or TOML file of options")
    types = typing.get_type_hints(TrainConfig)
    for f in TrainConfig.fields():
        meta = f.metadata
        kwargs = dict(dest=f.name, help=meta["help"].format(default=f.default, divergence_steps=DIVERGENCE_STEPS))
        if types[f.name] is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            value_type = typing.get_args(types[f.name])[0] if typing.get_args(types[f.name]) else types[f.name]
            if value_type is not str:
                kwargs["type"] = value_type
            kwargs.update({k: meta[k] for k in ("choices", "metavar") if meta[k]})
        p.add_argument(meta["cli_flag"] or flag(f.name), **kwargs)
    return p


def read_config_file(path: str) -> dict:
    """A JSON or TOML file's options, keys as the field names ('-' taken for '_'); its values as
    written (checked with the rest by TrainConfig.check)."""
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
    known = TrainConfig.names()
    unknown = sorted(set(values) - set(known))
    if unknown:
        guesses = [f"{k} (did you mean {closest(k, known).replace('-', '_')}?)" if closest(k, known) else k
                   for k in unknown]
        raise UsageError(f"--config {path}: unknown options: {', '.join(guesses)}")
    return values


def explicit_options(argv: list[str] | None) -> dict:
    """The options the command line gives, directly or through its --config file (the command
    line's own win)."""
    given = vars(parser().parse_args(argv))
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    return {**from_file, **given}
