"""The trainer under faults: kills while it rewrites its files, NaN/inf weights, a full disk, a
read-only run folder, bad image files, and a fresh run aimed at an existing one. A kill at a chosen
point is an exception raised there by a monkeypatched writer (Killed: not an Exception, so nothing
in the trainer catches it); disk and permission errors are OSErrors raised the same way."""
import builtins
import csv
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sagan_ext import data, files, run_folder, sample, train, train_config
from sagan_ext_testing import ROOT, TINY, free_port, metrics, run

QUICK = ["--eval-every", "100", "--checkpoint-every", "1"]


class Killed(BaseException):
    """Stands in for kill -9 at the point where it is raised."""


def kill(*_):
    raise Killed


class FullDisk:
    """A file on a disk with `left` bytes free: writes past them fail with ENOSPC."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def write(self, b):
        if len(b) > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(out: Path) -> list[int]:
    return [int(r["step"]) for r in metrics(out)]


def console(*args: str) -> subprocess.CompletedProcess:
    """The sagan-train command of this checkout (the installed console script imports site-packages')."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "sagan_ext.train", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_atomic_writer_keeps_the_old_file_and_names_the_os_error(tmp_path):
    path = tmp_path / "state.pt"
    files.write_text_atomically(path, "old")

    def dies_half_way(f):
        f.write(b"ne")
        raise Killed

    with pytest.raises(Killed):
        files.write_atomically(path, dies_half_way)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]

    # torch.save reports the failed write as "RuntimeError: ... unexpected pos"; the writer finds the OSError
    with pytest.raises(files.WriteError, match=r"cannot write .*state.pt: \[Errno 28\] No space left on device"):
        files.write_atomically(path, lambda f: torch.save({"w": torch.zeros(1000)}, FullDisk(f, 100)))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_kill_while_starting_loses_no_run_and_no_metrics_row(tmp_path, classifier_file, monkeypatch, capsys):
    assert run(tmp_path, classifier_file, "--steps", "2", *QUICK) == 0
    assert steps(tmp_path) == [1, 2]
    resume = ["--resume", str(tmp_path), "--steps", "3"]

    # killed while the resumed run rewrites metrics.csv: before its rows, then before the rename
    with monkeypatch.context() as m:
        m.setattr(csv.DictWriter, "writerows", kill)
        with pytest.raises(Killed):
            train.main(resume)
    assert steps(tmp_path) == [1, 2]
    replace = os.replace
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda a, b: kill() if str(b).endswith("metrics.csv") else replace(a, b))
        with pytest.raises(Killed):
            train.main(resume)
    assert steps(tmp_path) == [1, 2]

    # what a kill -9 mid-write leaves: a temporary file (today's name and the old one); and an empty
    # config.json, as a version that rewrote it in place left it: the checkpoints hold the options
    (tmp_path / "checkpoints" / ".step_0000003.pt.4242.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "step_0000003.tmp").write_bytes(b"partial")
    (tmp_path / "config.json").write_text("")
    capsys.readouterr()
    assert train.main(resume) == 0
    assert "config.json is unreadable" in capsys.readouterr().err
    assert steps(tmp_path) == [1, 2, 3]
    assert not list(tmp_path.rglob("*.tmp"))
    assert train.resolve_options(["--resume", str(tmp_path)])["steps"] == 3  # config.json whole again


def test_nonfinite_weights_stop_the_run_and_no_checkpoint_holds_them(tmp_path, classifier_file, monkeypatch, capsys):
    # a BN statistic becomes inf while the losses stay finite (what --lr 1e11 did first)
    step = train.Trainer.train_step
    poisoned_name = []

    def poisoned(self):
        losses = step(self)
        if self.step == 3:
            name, running_var = next((n, b) for n, b in self.G.named_buffers() if n.endswith("running_var"))
            running_var.fill_(float("inf"))
            poisoned_name.append(name)
        return losses

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "train_step", poisoned)
        assert run(tmp_path / "bn", classifier_file, "--steps", "5", *QUICK) == 3
    err = capsys.readouterr().err
    assert f"G.{poisoned_name[0]} became NaN or inf by step 3" in err and "step_0000002.pt" in err
    assert [p.name for p in train.checkpoints(tmp_path / "bn")] == ["step_0000001.pt", "step_0000002.pt"]

    # huge learning rates: weights and Adam states overflow at the first step; the run exited 0 before
    assert run(tmp_path / "lr", classifier_file, "--steps", "3", *QUICK, "--lr-g", "1e10", "--lr-d", "1e10") == 3
    assert "became NaN or inf" in capsys.readouterr().err
    for path in train.checkpoints(tmp_path / "lr"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for k in ("G", "D", "G_ema") for v in state[k].values()), path

    # the divergence guard: |loss D| (about 2 here) above --max-loss for DIVERGENCE_STEPS steps
    monkeypatch.setattr(train, "DIVERGENCE_STEPS", 2)
    assert run(tmp_path / "diverged", classifier_file, "--steps", "4", *QUICK, "--max-loss", "0.5") == 3
    err = capsys.readouterr().err
    assert "diverged: |loss D| or |loss G| stayed above --max-loss 0.5 for 2 steps from step 1" in err
    assert "step_0000001.pt" in err


def test_full_disk_and_read_only_folder_get_one_message_and_touch_no_earlier_file(tmp_path, classifier_file,
                                                                                  monkeypatch, capsys):
    assert run(tmp_path, classifier_file, "--steps", "1", *QUICK) == 0
    before = digests(tmp_path / "checkpoints")
    real_save = torch.save

    def fills_the_disk(obj, f, *args, **kwargs):  # the disk fills up half-way through step 2's checkpoint
        on_disk = "step_0000002" in getattr(f, "name", str(f))
        return real_save(obj, FullDisk(f, 200_000) if on_disk else f, *args, **kwargs)

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", fills_the_disk)
        assert train.main(["--resume", str(tmp_path), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "step_0000002.pt: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert "last checkpoint is " + str(tmp_path / "checkpoints" / "step_0000001.pt") in err
    assert digests(tmp_path / "checkpoints") == before and not list(tmp_path.rglob("*.tmp"))
    assert steps(tmp_path) == [1, 2]

    # a read-only run folder: nothing can be created or written in it
    real_open, real_mkdir = builtins.open, os.mkdir

    def read_only(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def no_writes(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and set(mode) & set("wax+"):
            raise read_only(path)
        return real_open(path, mode, *args, **kwargs)

    def no_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) if os.path.exists(path) else read_only(path)
        return real_mkdir(path, *args, **kwargs)

    snapshot = digests(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_writes)
        m.setattr(os, "mkdir", no_mkdir)
        assert train.main(["--resume", str(tmp_path), "--steps", "3"]) == 2
        assert train.main(["--out", str(tmp_path / "new"), *TINY, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sagan-train: error: cannot write {tmp_path / 'config.json'}: [Errno 30] Read-only file system "
                   f"(EROFS)",
                   f"sagan-train: error: cannot write {tmp_path / 'new' / 'samples'}: [Errno 30] Read-only file system "
                   f"(EROFS)"]
    assert digests(tmp_path) == snapshot

    assert train.main(["--resume", str(tmp_path), "--steps", "3"]) == 0  # space freed: the run continues
    assert steps(tmp_path) == [1, 2, 3]


# rank 0 of a 2-process run whose writes to one file fail with ENOSPC; each rank leaves its exit status
_RANK0_FULL_DISK = r"""
import errno, os, sys
from pathlib import Path
from sagan_ext import evaluation, files, train
real = files.write_atomically
def failing(path, write):
    if os.environ["RANK"] == "0" and Path(path).name == os.environ["FAILING_FILE"]:
        raise files.WriteError(Path(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return real(path, write)
train.write_atomically = evaluation.write_atomically = files.write_atomically = failing
status = train.main(sys.argv[1:])
Path(os.environ["STATUS_DIR"], os.environ["RANK"]).write_text(str(status))
sys.exit(status)
"""


@pytest.mark.parametrize("failing_file", ["config.json", "step_0000002.pt"])
def test_a_write_error_on_rank_zero_stops_every_rank(tmp_path, classifier_file, failing_file):
    """Rank 0 alone writes the run folder. When it cannot (here while starting, or at a checkpoint),
    the other ranks must stop with it, exit status 2, rather than wait for it in their next
    collective (or die there with a traceback)."""
    out, status = tmp_path / "run", tmp_path / "status"
    out.mkdir(), status.mkdir()
    (out / "classifier.pt").write_bytes(classifier_file.read_bytes())
    script = tmp_path / "rank0_full_disk.py"
    script.write_text(_RANK0_FULL_DISK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAILING_FILE": failing_file, "STATUS_DIR": str(status),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), "--out", str(out), *TINY, "--steps", "4",
                           "--checkpoint-every", "2", "--eval-every", "100"],
                          env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert {p.name: p.read_text() for p in status.iterdir()} == {"0": "2", "1": "2"}, log[-4000:]
    assert f"sagan-train: error: cannot write {out}" in log and "No space left on device" in log
    assert "rank 1: rank 0 could not write the run folder" in log
    assert "[rank1]:" not in log, log[-4000:]  # no traceback from the rank that waited


def test_a_classifier_of_other_data_in_a_fresh_out_is_trained_again(tmp_path, classifier_file, capsys):
    """classifier.pt is a cache of what the run would train: one from another dataset (other
    classes and channels: its weights do not fit; or the same shapes and other labels: its record
    says so) is trained again and replaced, with a line saying so, instead of a traceback or a
    metric computed in the wrong feature space."""
    rng = np.random.default_rng(0)
    for name, labels in (("a", np.arange(12) % 3), ("b", np.arange(12) % 3 == 0)):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
                 labels=labels.astype(np.int64) + (name == "b"))
    args = [*TINY, "--steps", "1", "--eval-every", "1", "--checkpoint-every", "1", "--batch-size", "4"]
    first = tmp_path / "first"
    first.mkdir()
    digits = torch.load(classifier_file, weights_only=True)  # 1 channel, 10 classes; saved as before records
    torch.save({"model": digits["model"], "accuracy": digits["accuracy"]}, first / "classifier.pt")
    assert train.main(["--out", str(first), "--dataset", str(tmp_path / "a.npz"), *args]) == 0
    said = capsys.readouterr().out
    assert f"{first / 'classifier.pt'}: it cannot be used for this dataset (RuntimeError" in said
    saved = torch.load(first / "classifier.pt", weights_only=True)
    assert saved["data"]["dataset"] == "a" and saved["data"]["num_classes"] == 3

    second = tmp_path / "second"  # a's classifier (3 channels, 3 classes) beside b, whose labels differ
    second.mkdir()
    (second / "classifier.pt").write_bytes((first / "classifier.pt").read_bytes())
    assert train.main(["--out", str(second), "--dataset", str(tmp_path / "b.npz"), *args]) == 0
    said = capsys.readouterr().out
    assert f"{second / 'classifier.pt'}: it was trained on other data (dataset 'a' here 'b'" in said
    assert torch.load(second / "classifier.pt", weights_only=True)["data"]["dataset"] == "b"

    third = tmp_path / "third"  # b's own classifier in a fresh --out for b: used as it is
    third.mkdir()
    (third / "classifier.pt").write_bytes((second / "classifier.pt").read_bytes())
    assert train.main(["--out", str(third), "--dataset", str(tmp_path / "b.npz"), *args]) == 0
    assert "training a new one" not in capsys.readouterr().out
    assert (third / "classifier.pt").read_bytes() == (second / "classifier.pt").read_bytes()


def test_fresh_run_into_an_existing_run_is_refused_without_overwrite(tmp_path, classifier_file, capsys):
    assert run(tmp_path, classifier_file, "--steps", "2", *QUICK) == 0
    snapshot = digests(tmp_path)
    refused = console("--out", str(tmp_path), *TINY, "--steps", "1")  # the README's command, run again
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [
        f"sagan-train: error: --out {tmp_path} already holds a run; continue it with --resume {tmp_path}, start a new "
        f"run with another --out, or delete that run and start afresh with --overwrite"]
    assert digests(tmp_path) == snapshot  # no file of the earlier run changed, and none added
    version = console("--version")
    assert version.returncode == 0 and version.stdout.startswith(f"sagan-train (sagan_ext) {train.__version__}")
    assert train.main(["--resume", str(tmp_path), "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err

    # --overwrite replaces the run; the classifier (same data and seed) is kept, not trained again
    old_threads = torch.get_num_threads()
    try:
        assert train.main(["--out", str(tmp_path), *TINY, "--steps", "1", "--eval-every", "1", "--overwrite",
                           "--threads", "1", "--keep-checkpoints", "1"]) == 0
    finally:
        torch.set_num_threads(old_threads)
    out = capsys.readouterr().out
    assert steps(tmp_path) == [1] and [p.name for p in train.checkpoints(tmp_path)] == ["step_0000001.pt"]
    assert (tmp_path / "classifier.pt").read_bytes() == classifier_file.read_bytes()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    # what it is doing while it starts, then the summary with the thread count, then where things went
    lines = out.splitlines()
    assert lines[:3] == ["sagan-train: reading the dataset (digits)...",
                         f"sagan-train: --overwrite: deleting the run in {tmp_path}",
                         f"sagan-train: loading the proxy classifier for the quality metrics "
                         f"({tmp_path / 'classifier.pt'})..."]
    assert lines[3].startswith("sagan-train: computing the real images' statistics")
    assert lines[4].startswith("sagan-train: digits (1797 images") and "(1 CPU threads)" in lines[4]
    assert lines[-1].endswith("last checkpoint checkpoints/step_0000001.pt.")

    # TensorBoard gets the attention overlays besides the sample grids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"samples", "attention/G", "attention/D"} <= set(events.Tags()["images"])


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for step in (1, 2, 3, 9):  # 9: a later checkpoint that is not this run's
        (tmp_path / "checkpoints" / f"step_{step:07d}.pt").write_bytes(b"")
    run_folder.prune_checkpoints(tmp_path, 1, tmp_path / "checkpoints" / "step_0000003.pt")
    assert [p.name for p in train.checkpoints(tmp_path)] == ["step_0000003.pt", "step_0000009.pt"]


def test_every_option_says_what_it_does():
    for parser in (train_config.parser(), sample.parser()):
        for action in parser._actions:
            text = (action.help or "").replace("%(default)s", "")
            assert len(text.split()) >= 3 and not text.startswith("(default"), (parser.prog, action.option_strings)


def write_bad_and_good_images(root: Path) -> list[Path]:
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    png = (root / "a" / "0.png").read_bytes()
    bad = [root / "a" / "truncated.png", root / "b" / "empty.jpg", root / "b" / "text.jpg"]
    bad[0].write_bytes(png[:len(png) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    return bad


def test_bad_image_files_are_named_and_skipped(tmp_path, capsys):
    bad = write_bad_and_good_images(tmp_path / "set")
    dataset = data.load_dataset(str(tmp_path / "set"), 32)
    assert len(dataset) == 4 and dataset.labels.tolist() == [0, 0, 1, 1]
    assert [s.split(": ")[0] for s in dataset.skipped] == [str(p) for p in bad]
    assert "OSError" in dataset.skipped[0].split(": ", 1)[1]

    # through the trainer: warned by name while starting, counted in the closing line
    assert train.main(["--out", str(tmp_path / "run"), "--dataset", str(tmp_path / "set"), *TINY, "--steps", "1",
                       "--eval-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipped 3 unreadable image file(s):\n  " + str(bad[0]) in out
    assert "done: 1 steps. 3 unreadable image file(s) were skipped." in out

    only_bad = tmp_path / "only_bad" / "x"
    only_bad.mkdir(parents=True)
    (only_bad / "empty.png").write_bytes(b"")
    assert train.main(["--out", str(tmp_path / "run2"), "--dataset", str(only_bad.parent), *TINY]) == 2
    assert "no readable images" in (err := capsys.readouterr().err) and str(only_bad / "empty.png") in err


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    cases = {"i16.png": (Image.fromarray((ramp * 65535).astype(np.uint16)), ramp),
             "i32.tif": (Image.fromarray((ramp * 4000).astype(np.int32), mode="I"), ramp * 4000 / 65535),
             "f01.tif": (Image.fromarray(ramp.astype(np.float32), mode="F"), ramp),
             "f_range.tif": (Image.fromarray((ramp * 5 - 2).astype(np.float32), mode="F"), ramp)}
    (tmp_path / "set" / "only").mkdir(parents=True)
    for name, (image, _) in cases.items():
        image.save(tmp_path / "set" / "only" / name)
    dataset = data.load_dataset(str(tmp_path / "set"), 32)
    assert not dataset.skipped and dataset.images.shape == (4, 3, 32, 32)
    for image, (name, (_, expected)) in zip(dataset.images, sorted(cases.items())):
        want = torch.from_numpy(np.round(expected * 255)).to(torch.uint8)
        assert (image[0].int() - want.int()).abs().max() <= 1, name
        assert torch.equal(image[0], image[2])
