"""Datasets for the trainer, held in memory as uint8 (N, C, S, S) images and int64 labels:
the embedded digits (scikit-learn's bundled 1,797 handwritten 8 x 8 digits, no download), an image
folder with one sub-folder per class (unreadable files skipped and listed; 16-bit, 32-bit and float
images scaled, not clipped), an .npz file, and CIFAR-10's python batches. Also the batch
order: a function of (seed, step, rank) alone, so a resumed or data-parallel run sees exactly the
batches an uninterrupted single run would."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that cannot be used, with a message for the user."""


@dataclass
class ImageDataset:
    name: str
    images: Tensor  # uint8 (N, C, S, S)
    labels: Tensor  # int64 (N,), all zero when unlabelled
    num_classes: int  # 0: unconditional
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out, as 'path: why'

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1] (G's tanh range)."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    return images.detach().float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def _resize(images: Tensor, size: int) -> Tensor:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, C, size, size): centre crop to square, then resize."""
    h, w = images.shape[2:]
    s = min(h, w)
    images = images[:, :, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=s > size, align_corners=False)
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def load_digits(image_size: int) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise DatasetError("the embedded 'digits' dataset comes with scikit-learn: pip install scikit-learn "
                           "(or pip install 'sagan_ext[train]')") from e
    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(digits.target).long()
    return ImageDataset("digits", _resize(images, image_size), labels, 10, [str(i) for i in range(10)])


def _pixels(image) -> np.ndarray:
    """A PIL image -> float32 (H, W, 3) in [0, 1]. 8-bit modes go through convert("RGB"); that would
    clip higher bit depths to white, so single-channel 16-bit (I;16), 32-bit integer (I) and float
    (F) images are scaled here: I;16 by 65535; I by the smallest bit depth (8, 16 or 31 bits) that
    holds its largest value, or by its range if it has negative values; F kept if it lies in
    [0, 1], else scaled by its range."""
    if image.mode.startswith("I;16"):
        gray = np.asarray(image, dtype=np.float64) / 65535.0
    elif image.mode in ("I", "F"):
        gray = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = gray.min(), gray.max()
        if image.mode == "I" and low >= 0:
            gray = gray / next(depth for depth in (255.0, 65535.0, 2.0 ** 31 - 1) if high <= depth)
        elif image.mode == "I" or low < 0 or high > 1:
            gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    else:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(gray.astype(np.float32)[:, :, None], 3, axis=2)


def load_folder(root: Path, image_size: int) -> ImageDataset:
    """Unreadable image files (truncated, empty, not an image) are skipped and listed in the
    dataset's `skipped`, each as 'path: why'."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DatasetError("image folders are read with Pillow: pip install pillow") from e
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"folder {root} has no sub-folders; expected one sub-folder of images per class")
    images, labels, skipped = [], [], []
    for label, folder in enumerate(classes):
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(path) as im:
                    array = _pixels(im)
            except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ... for bad files
                skipped.append(f"{path}: {type(e).__name__}: {e}")
                continue
            images.append(_resize(torch.from_numpy(array).permute(2, 0, 1)[None], image_size))
            labels.append(label)
    if not images:
        detail = f" ({len(skipped)} unreadable, e.g. {skipped[0]})" if skipped else ""
        raise DatasetError(f"folder {root}: no readable images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its "
                           f"sub-folders{detail}")
    num_classes = len(classes) if len(classes) > 1 else 0
    return ImageDataset(root.name, torch.cat(images), torch.tensor(labels), num_classes, [p.name for p in classes],
                        skipped)


def _images_from_array(array: np.ndarray, image_size: int, source: str) -> Tensor:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DatasetError(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {array.shape}")
    if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(array)).float()
    if array.dtype == np.uint8 or images.max() > 1.0:
        images = images / 255.0
    return _resize(images, image_size)


def load_npz(path: Path, image_size: int) -> ImageDataset:
    try:
        arrays = np.load(path)
    except Exception as e:
        raise DatasetError(f"{path} is not a readable .npz file: {e}") from e
    key = next((k for k in ("images", "x", "arr_0") if k in arrays), None)
    if key is None:
        raise DatasetError(f"{path}: expected an array named 'images' (or 'x'), found {list(arrays)}")
    images = _images_from_array(arrays[key], image_size, str(path))
    label_key = next((k for k in ("labels", "y") if k in arrays), None)
    if label_key is None:
        return ImageDataset(path.stem, images, torch.zeros(len(images), dtype=torch.long), 0, [])
    labels = torch.from_numpy(np.asarray(arrays[label_key])).long().flatten()
    if len(labels) != len(images):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(images)} images")
    num_classes = int(labels.max()) + 1
    return ImageDataset(path.stem, images, labels, num_classes, [str(i) for i in range(num_classes)])


def load_cifar10(root: Path, image_size: int) -> ImageDataset:
    data, labels = [], []
    for i in range(1, 6):
        with open(root / f"data_batch_{i}", "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(batch[b"data"])
        labels += batch[b"labels"]
    images = np.concatenate(data).reshape(-1, 3, 32, 32)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return ImageDataset("cifar10", _images_from_array(images, image_size, str(root)), torch.tensor(labels), 10, names)


def load_dataset(spec: str, image_size: int) -> ImageDataset:
    """'digits', a folder with one sub-folder per class, a CIFAR-10 python folder (data_batch_1..5),
    or an .npz file."""
    if spec == "digits":
        return load_digits(image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(f"unknown dataset {spec!r}: expected 'digits', an image folder, a CIFAR-10 python "
                           f"folder or an .npz file, and there is no such file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise DatasetError(f"dataset file {path} is not an .npz file")
        return load_npz(path, image_size)
    if (path / "data_batch_1").exists() or (path / "cifar-10-batches-py" / "data_batch_1").exists():
        return load_cifar10(path if (path / "data_batch_1").exists() else path / "cifar-10-batches-py", image_size)
    return load_folder(path, image_size)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Indices of this rank's share of global batch number `step`: epochs are seeded permutations
    of the dataset (the last partial global batch dropped), split across ranks like a
    DistributedSampler."""
    global_batch = batch_size * world_size
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise DatasetError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = index * global_batch + rank * batch_size
    return order[start:start + batch_size]
