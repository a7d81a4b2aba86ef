"""What the trainer measures and draws: a quality metric that works offline (the Frechet distance
in the feature space of a small classifier trained on the same dataset, and the share of
conditional samples the classifier labels with their class), FID when the user supplies Inception
weights, sample grids and attention-map overlays."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ImageDataset, to_float, to_uint8
from .files import write_atomically

FEATURE_SIZE = 32  # the classifier sees every dataset at 32 x 32


class FeatureClassifier(nn.Module):
    """A small CNN; its 128-d penultimate layer is the proxy metric's feature space."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, max(num_classes, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images in [-1, 1] at any size -> (features, logits)."""
        if images.shape[-1] != FEATURE_SIZE:
            images = F.interpolate(images, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear",
                                   antialias=images.shape[-1] > FEATURE_SIZE, align_corners=False)
        features = self.features(images)
        return features, self.head(features)


def train_classifier(dataset: ImageDataset, device: torch.device, seed: int = 0,
                     epochs: int = 20) -> tuple[FeatureClassifier, float]:
    """Train on 90% of the dataset (random shifts of up to 2 pixels) and return it with its accuracy
    on the held-out 10%. Unlabelled data keeps the fixed random-init network: Frechet distances in a
    random conv feature space still rank samples, but say less."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(dataset.channels, dataset.num_classes).to(device)
    if dataset.num_classes < 2:
        return model.eval(), float("nan")
    order = torch.randperm(len(dataset), generator=generator)
    held = max(len(order) // 10, 1)  # at least one image, or a tiny dataset has no accuracy to report
    held_out, train = order[:held], order[held:]
    images = to_float(dataset.images).to(device)
    images = F.interpolate(images, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear",
                           antialias=images.shape[-1] > FEATURE_SIZE, align_corners=False)
    labels = dataset.labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = 128
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=generator)]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch].to(device)
            dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[held_out[i:i + 512].to(device)])[1].argmax(1)
                               for i in range(0, len(held_out), 512)])
    return model, (predicted == labels[held_out.to(device)]).float().mean().item()


def data_record(dataset: ImageDataset) -> dict:
    """What a classifier was trained on, stored beside its weights to know that data again: the
    dataset's name, image count, channels, classes and labels (a hash). Not the image size: the
    classifier sees every dataset at 32 x 32."""
    labels = hashlib.sha256(dataset.labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return dict(dataset=dataset.name, images=len(dataset), channels=dataset.channels,
                num_classes=dataset.num_classes, class_names=list(dataset.class_names), labels=labels)


def load_or_train_classifier(path: Path, dataset: ImageDataset, device: torch.device, seed: int = 0,
                             say: Callable[[str], None] = print):
    """The classifier cached in the run folder (trained once per run). One found there that was
    trained on other data (its record differs, or, from before records, its weights do not fit
    this dataset's classes and channels) or that cannot be read is trained again and replaced,
    with a line saying so: it is a cache of what this run would train."""
    record = data_record(dataset)
    if path.exists():
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            saved = state.get("data")
            if saved is not None and saved != record:
                differ = ", ".join(f"{k} {saved.get(k)!r} here {record[k]!r}" for k in record
                                   if saved.get(k) != record[k])
                problem = f"it was trained on other data ({differ[:300]})"
            else:
                model = FeatureClassifier(dataset.channels, dataset.num_classes).to(device)
                model.load_state_dict(state["model"])
                return model.eval(), state["accuracy"]
        except Exception as e:  # not a classifier file, damaged, or weights of another shape
            problem = f"it cannot be used for this dataset ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        say(f"{path}: {problem}; training a new one for {dataset.name} and replacing it...")
    model, accuracy = train_classifier(dataset, device, seed)
    write_atomically(path, lambda f: torch.save({"model": model.state_dict(), "accuracy": accuracy, "data": record}, f))
    return model, accuracy


@torch.no_grad()
def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(stats_a: tuple[Tensor, Tensor], stats_b: tuple[Tensor, Tensor]) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace of the square root from the
    eigenvalues of the symmetric S_a^(1/2) S_b S_a^(1/2)."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    eigenvalues, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


class InceptionFID:
    """FID with a user-supplied TorchScript Inception-v3 feature extractor called as
    `model(uint8 images (N, 3, H, W), return_features=True) -> (N, 2048)`; this is the calling
    convention of the `inception-2015-12-05.pt` file that StyleGAN2-ADA/3's metrics use."""

    def __init__(self, path: str, device: torch.device):
        import zipfile
        if not zipfile.is_zipfile(path):  # checked first: torch.jit.load of a non-archive can corrupt memory
            raise ValueError(f"--inception {path}: not a TorchScript archive (expected a file saved by torch.jit.save)")
        try:
            self.model = torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise ValueError(f"--inception {path}: not a loadable TorchScript Inception model ({e})") from e

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        uint8 = to_uint8(images)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        return torch.cat([self.model(uint8[i:i + 100], return_features=True) for i in range(0, len(uint8), 100)])


@torch.no_grad()
def sample(generator: nn.Module, z: Tensor, y: Tensor | None, batch: int = 250) -> Tensor:
    return torch.cat([generator(z[i:i + batch], None if y is None else y[i:i + batch]).float()
                      for i in range(0, len(z), batch)])


def grid(images: Tensor, rows: int) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> one uint8 (C, rows*(H+2), cols*(W+2)) image with 2-pixel gaps."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.full((c, rows * (h + 2), cols * (w + 2)), 255, dtype=torch.uint8)
    for i, image in enumerate(to_uint8(images.cpu())):
        r, k = divmod(i, cols)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = image
    return canvas


def save_png(image: Tensor, path: Path) -> None:
    """uint8 (C, H, W) -> PNG, replaced atomically (a reader never sees half a file)."""
    from PIL import Image
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    write_atomically(path, lambda f: picture.save(f, format="PNG"))


QUERY_POINTS = ((0.3, 0.3), (0.5, 0.65), (0.7, 0.4))  # (row, col) as fractions of the map
QUERY_COLOURS = ((0.0, 1.0, 0.0), (0.0, 1.0, 1.0), (1.0, 0.0, 1.0))  # each point's marker: green, cyan, magenta
LEGEND_TOP, LEGEND_BOTTOM = 16, 18  # pixels above the tiles (column titles) and below them (the colour scale)


def _hot(heat: Tensor) -> Tensor:
    """[0, 1] -> RGB, black through red and yellow to white."""
    return torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)])


def attention_overlays(images: Tensor, attention: Tensor) -> Tensor:
    """One row per image: the image with the query points marked, then, per query point, where
    that position attends (the attention row upsampled to the image, a heat map over a grey copy),
    with a legend: column titles naming each query point by its marker's colour above, and the
    heat map's colour scale below (0 to the largest weight in that query's row).
    images: (B, C, S, S) in [-1, 1]; attention: (B, N, N_keys) for a square query map."""
    b, _, s, _ = images.shape
    side = int(round(attention.shape[1] ** 0.5))
    key_side = int(round(attention.shape[2] ** 0.5))
    grey = to_uint8(images.cpu()).float().mean(1, keepdim=True).div(255).expand(-1, 3, -1, -1)
    rgb = (to_uint8(images.cpu()).float() / 255).expand(-1, 3, -1, -1) if images.shape[1] == 3 else grey
    tiles = []
    for i in range(b):
        marked = rgb[i].clone()
        row = [marked]
        for (qr, qc), colour in zip(QUERY_POINTS, QUERY_COLOURS):
            r, c = int(qr * side), int(qc * side)
            heat = attention[i, r * side + c].float().cpu().view(1, 1, key_side, key_side)
            heat = F.interpolate(heat / heat.max().clamp(min=1e-12), size=(s, s), mode="nearest")[0, 0]
            overlay = 0.45 * grey[i] + 0.55 * _hot(heat)
            y, x = int((r + 0.5) * s / side), int((c + 0.5) * s / side)
            for canvas in (marked, overlay):  # the query point as a small square in its colour
                canvas[:, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = torch.tensor(colour)[:, None, None]
            row.append(overlay)
        tiles += row
    tiles = torch.stack(tiles)
    if s < 64:  # small maps: enlarge (nearest) so that the overlays can be read
        tiles = F.interpolate(tiles, scale_factor=64 // s, mode="nearest")
    return _with_legend(grid(tiles * 2 - 1, rows=b), tiles.shape[-1] + 2)


def _with_legend(body: Tensor, column: int) -> Tensor:
    """body: uint8 (3, H, W) of columns `column` pixels wide -> (3, LEGEND_TOP + H + LEGEND_BOTTOM, W)."""
    from PIL import Image, ImageDraw, ImageFont
    _, h, w = body.shape
    canvas = Image.new("RGB", (w, LEGEND_TOP + h + LEGEND_BOTTOM), (255, 255, 255))
    canvas.paste(Image.fromarray(body.permute(1, 2, 0).numpy()), (0, LEGEND_TOP))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((3, 2), "image", fill=(0, 0, 0), font=font)
    for k, colour in enumerate(QUERY_COLOURS, start=1):  # a swatch of the marker's colour, then its name
        x = k * column + 3
        draw.rectangle([x, 4, x + 7, 11], fill=tuple(int(255 * v) for v in colour), outline=(0, 0, 0))
        draw.text((x + 11, 2), f"query {k}", fill=(0, 0, 0), font=font)
    top, length = LEGEND_TOP + h + 4, min(96, max(w // 3, 16))  # the colour scale, 0 to the row's largest weight
    draw.text((3, top - 2), "0", fill=(0, 0, 0), font=font)
    ramp = (_hot(torch.linspace(0, 1, length)) * 255).round().to(torch.uint8)  # (3, length)
    canvas.paste(Image.fromarray(ramp.T[None].expand(10, -1, -1).contiguous().numpy()), (14, top))
    draw.text((18 + length, top - 2), "max attention of the query", fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()
