"""What sagan-train writes to the run folder besides its checkpoints (rank 0 only): metrics.csv
and TensorBoard (losses, D's logits, every gamma and sigma, images/s, the quality metrics),
samples/ (fixed-noise grids, one row per class) and attention/ (where a few query points of G's
and D's attention look), and the closing message that names them."""
from __future__ import annotations

import csv
import io
import time
import warnings
from pathlib import Path

import torch

from . import run_folder
from .data import to_float
from .evaluation import (InceptionFID, attention_overlays, feature_statistics, frechet_distance, grid,
                         load_or_train_classifier, sample, save_png)
from .files import WriteError, write_text_atomically
from .models import layer_sigmas
from .train_config import UsageError


class Outputs:
    """Rank 0's writer of everything in the run folder but the checkpoints. `trainer`:
    train.Trainer (its models, data, device, step and options)."""

    def __init__(self, trainer):
        t, config = trainer, trainer.config
        self.t, self.run = t, t.run
        run_folder.prepare(self.run, config, t.say)
        self.g_eval = t.ema.model if t.ema else t.G
        self.gammas = {"gamma/G.attention": t.G.attention.gamma, "gamma/D.attention": t.D.attention.gamma}
        self.sigma_names = [f"sigma/G.{n}" for n in layer_sigmas(t.G)] + [f"sigma/D.{n}" for n in layer_sigmas(t.D)]
        self.columns = (["step", "images_per_s", "loss_d", "loss_g", "d_real", "d_fake", "fd_proxy",
                         "class_consistency", "fid"] + list(self.gammas) + self.sigma_names)
        self.metrics_path = self.run / "metrics.csv"
        self._start_csv(t.step)
        self.tensorboard = self._tensorboard(t.step)

        # the fixed inputs of every grid, map and metric (own generator: the training noise is untouched)
        fixed = torch.Generator(t.device).manual_seed(config.seed + 12345)
        rows = max(min(t.num_classes, 10), 1) if t.num_classes else 8
        self.grid_rows = rows
        self.grid_z = torch.randn(rows * 8, config.z_dim, device=t.device, generator=fixed)
        self.grid_y = (torch.arange(rows * 8, device=t.device) // 8) if t.num_classes else None
        self.eval_z = torch.randn(config.eval_samples, config.z_dim, device=t.device, generator=fixed)
        self.eval_y = (torch.arange(config.eval_samples, device=t.device) % t.num_classes) if t.num_classes else None
        for_maps = torch.linspace(0, len(t.data) - 1, 4).long()
        self.real_for_maps = to_float(t.data.images[for_maps]).to(t.device)
        self.y_for_maps = t.data.labels[for_maps].to(t.device) if t.num_classes else None

        started = time.perf_counter()
        classifier = self.run / "classifier.pt"
        t.say(f"loading the proxy classifier for the quality metrics ({classifier})..." if classifier.exists() else
              "training the proxy classifier for the quality metrics (once per run folder; about a minute on a CPU)...")
        self.classifier, self.classifier_accuracy = load_or_train_classifier(classifier, t.data, t.device, config.seed,
                                                                             say=t.say)
        t.say("computing the real images' statistics" + (" and Inception features..." if config.inception else "..."))
        real = to_float(t.data.images[:10000]).to(t.device)
        with torch.no_grad():
            self.real_stats = feature_statistics(torch.cat([self.classifier(real[i:i + 500])[0]
                                                            for i in range(0, len(real), 500)]))
        try:
            self.inception = InceptionFID(config.inception, t.device) if config.inception else None
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


def closing_message(t, last_checkpoint: Path | None) -> str:
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
