"""The run folder (--out): what marks one as holding a run, the options a run keeps there
(config.json, and a copy in every checkpoint), its checkpoints, and the options of the run a
command starts or continues (resolve_options).

  config.json  metrics.csv  tensorboard/  samples/  attention/  checkpoints/step_NNNNNNN.pt  classifier.pt

Every file is replaced atomically (files.py), so a kill at any moment leaves a run that --resume
continues; a fresh run never starts in a folder that holds one."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from . import files
from .train_config import TrainConfig, UsageError, explicit_options

# a folder holding any of these (or a checkpoint) holds a run: a fresh run refuses to start there
RUN_MARKERS = ("config.json", "metrics.csv", "tensorboard")
# what --overwrite deletes of an earlier run (classifier.pt too, unless it was trained on the same data)
RUN_CONTENTS = ("config.json", "metrics.csv", "tensorboard", "samples", "attention", "checkpoints")


def resolve_options(argv: list[str] | None) -> TrainConfig:
    """The checked options of the run that `argv` starts, or continues (--resume RUN: the run's
    saved options, less what a resumed run may change)."""
    explicit = explicit_options(argv)
    options = {**TrainConfig().as_dict(), **explicit}
    if options["resume"]:
        run = Path(options["resume"])
        if explicit.get("overwrite"):
            raise UsageError(f"--resume {run} continues a run; --overwrite would delete it: give one of them")
        saved = TrainConfig.known(saved_options(run))
        runtime = TrainConfig.runtime_names()
        changed = sorted(k for k, v in explicit.items() if k not in runtime and saved.get(k) != v)
        if changed:
            raise UsageError(f"--resume {run}: cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} "
                             f"of an existing run (start a new one with --out)")
        options = {**options, **saved, **{k: v for k, v in explicit.items() if k in runtime}}
        options.update(out=str(run), overwrite=False)
    elif not options["overwrite"] and holds_run(Path(options["out"])) and int(os.environ.get("RANK", "0")) == 0:
        # rank 0 alone decides: it may already have started writing when another rank looks
        out = options["out"]
        raise UsageError(f"--out {out} already holds a run; continue it with --resume {out}, start a new run with "
                         f"another --out, or delete that run and start afresh with --overwrite")
    config = TrainConfig(**options)
    config.check()
    return config


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS) or bool(checkpoints(folder))


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


def prepare(run: Path, config: TrainConfig, say: Callable[[str], None]) -> None:
    """Make `run` ready for this run to write: --overwrite's deletion of an earlier run, the
    sub-folders, no temporary files a kill left behind, config.json."""
    if config.overwrite and holds_run(run):
        say(f"--overwrite: deleting the run in {run}")
        delete_run(run, config)
    for sub in ("samples", "attention", "checkpoints"):
        try:
            (run / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise files.WriteError(Path(e.filename or run / sub), e) from e
        files.remove_temporary_files(run / sub)
    files.remove_temporary_files(run)
    files.write_text_atomically(run / "config.json", json.dumps(config.as_dict(), indent=1))


def delete_run(run: Path, config: TrainConfig) -> None:
    """--overwrite: delete the earlier run's files (RUN_CONTENTS), and its classifier.pt unless that
    was trained on the same dataset, image size and seed (this run would train it again identically)."""
    try:
        earlier = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        earlier = None
    same_data = isinstance(earlier, dict) and all(earlier.get(k) == getattr(config, k)
                                                     for k in ("dataset", "image_size", "seed"))
    for name in RUN_CONTENTS + (() if same_data else ("classifier.pt",)):
        path = run / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            raise files.WriteError(Path(e.filename or path), e) from e


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = [p for p in (run / "checkpoints").glob("step_*.pt") if p.stem[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[5:]))


def save_checkpoint(run: Path, step: int, state: dict, keep: int) -> Path:
    """Write step's checkpoint, then keep it and the keep - 1 before it."""
    path = run / "checkpoints" / f"step_{step:07d}.pt"
    files.write_atomically(path, lambda f: torch.save(state, f))
    prune_checkpoints(run, keep, path)
    return path


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
