"""Datasets and training augmentation.

A data SPEC is one of:
  fashion-mnist[:train|:test]   the Debian package's idx files (labels available)
  synthetic[:N]                 N generated images of shapes (default 512; labels = shape kind)
  PATH                          a folder of images, searched recursively; subfolder = label
`image(i)` gives a PIL image for augmentation; `encoded(i)` what the one preprocessing function
takes (the file for a folder), so evaluation decodes exactly as the service does.
Augmentation is seeded per (seed, epoch, index), so a resumed run sees exactly the same pixels.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from simmim_core.preprocess import (
    IMAGE_SUFFIXES,
    INTERPOLATIONS,
    ImageDecodeError,
    normalize,
    open_image,
    to_color_mode,
)

FMNIST_DIR = Path(os.environ.get("SIMMIM_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (FMNIST_DIR / name).exists():
            return FMNIST_DIR / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem} not found under {FMNIST_DIR} "
        "(apt-get install dataset-fashion-mnist, or set SIMMIM_FMNIST_DIR)"
    )


class ArrayImages:
    """uint8 arrays [N, H, W] (+ labels) served as gray PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], "L")

    def encoded(self, i: int) -> Image.Image:
        """What preprocess_image takes for image i (here the in-memory image itself)."""
        return self.image(i)


class FolderImages:
    """Every readable image under a folder; the first-level subfolder names the class."""

    def __init__(self, root: Path):
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.files, self.skipped = [], 0
        for p in files:  # reading the header is cheap; unreadable files are counted, not fatal
            try:
                open_image(p).close()
                self.files.append(p)
            except ImageDecodeError:
                self.skipped += 1
        if not self.files:
            raise ValueError(f"no readable images under {root} ({self.skipped} unreadable)")
        names = [
            p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else ""
            for p in self.files
        ]
        self.classes = sorted(set(names))
        self.labels = np.array([self.classes.index(n) for n in names])

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        return open_image(self.files[i])

    def encoded(self, i: int) -> Path:
        """What preprocess_image takes for image i: the file, decoded exactly as the service
        decodes its bytes (JPEG draft scale included)."""
        return self.files[i]


def synthetic_images(n: int, size: int = 64, seed: int = 0) -> ArrayImages:
    """n gray images of one filled shape (ellipse, rectangle or triangle) on a noisy background."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 3, size=n)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 60, (size, size), dtype=np.uint8), "L")
        d = ImageDraw.Draw(img)
        x0, y0 = rng.integers(2, size // 2, 2)
        x1, y1 = x0 + rng.integers(size // 4, size // 2), y0 + rng.integers(size // 4, size // 2)
        fill = int(rng.integers(150, 256))
        if labels[i] == 0:
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif labels[i] == 1:
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
        images[i] = np.asarray(img)
    return ArrayImages(images, labels, ["ellipse", "rectangle", "triangle"])


def open_dataset(spec: str, split: str = "train"):
    """Resolve a data SPEC (see the module docstring) to an image source with `image(i)`."""
    name, _, arg = spec.partition(":")
    if name == "fashion-mnist":
        split = arg or split
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"fashion-mnist split must be train or test, not {split!r}")
        classes = [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]
        return ArrayImages(
            _read_idx(_find(f"{prefix}-images-idx3-ubyte")),
            _read_idx(_find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64),
            classes,
        )
    if name == "synthetic":
        n = int(arg) if arg else 512
        return synthetic_images(n, seed={"train": 0, "test": 1}.get(split, 0))
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"data {spec!r} is neither fashion-mnist, synthetic[:N] nor a folder")
    return FolderImages(path)


class SubsetImages:
    """Images `idx` of another source, with its classes."""

    def __init__(self, source, idx: np.ndarray):
        self.source, self.idx = source, np.asarray(idx)
        self.labels = np.asarray(source.labels)[self.idx]
        self.classes, self.skipped = source.classes, 0

    def __len__(self) -> int:
        return len(self.idx)

    def image(self, i: int):
        return self.source.image(int(self.idx[i]))

    def encoded(self, i: int):
        return self.source.encoded(int(self.idx[i]))


def split_holdout(source, fraction: float, seed: int = 0) -> tuple[SubsetImages, SubsetImages]:
    """(train, held out): a seeded `fraction` of every class held out (at least one image of a
    class with two or more)."""
    rng = np.random.default_rng([seed, 3])
    labels = np.asarray(source.labels)
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.extend(members[:take].tolist())
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return SubsetImages(source, np.flatnonzero(~mask)), SubsetImages(source, np.flatnonzero(mask))


def looks_colour(source, n: int = 16) -> bool:
    """True when any of the first n images has channels that differ (a colour photograph)."""
    for i in range(min(n, len(source))):
        img = source.image(i)
        if img.mode in ("L", "LA", "1", "I", "I;16", "F"):
            continue
        rgb = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.int16)
        if np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max() > 8:
            return True
    return False


def random_resized_crop(
    img: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    interpolation: str,
) -> Image.Image:
    """torchvision's RandomResizedCrop, drawn from `rng` so that it is reproducible."""
    W, H = img.size
    area = W * H
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            break
    else:  # fall back to a center crop at the nearest allowed aspect
        aspect = min(max(W / H, ratio[0]), ratio[1])
        w, h = (W, round(W / aspect)) if W / H < aspect else (round(H * aspect), H)
        w, h = min(w, W), min(h, H)
        left, top = (W - w) // 2, (H - h) // 2
    return img.resize(
        (size, size), INTERPOLATIONS[interpolation], box=(left, top, left + w, top + h)
    )


class AugmentedViews(torch.utils.data.Dataset):
    """Augmented training views: item i is (view,), (view, view2) with two_views, or
    (view, label) with labels; each view float32 [C, S, S], S = spec.crop_size.

    RandomResizedCrop(crop_scale, crop_ratio) to S (spec's interpolation), a horizontal flip
    when hflip, normalised by spec's mean and std; drawn from rng(seed, epoch, i), so a resumed
    run sees exactly the same pixels (set `epoch` before each epoch).
    """

    def __init__(
        self,
        source,
        spec,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        hflip: bool,
        seed: int,
        two_views: bool = False,
        labels: bool = False,
    ):
        self.source, self.spec = source, spec
        self.crop_scale, self.crop_ratio, self.hflip, self.seed = (
            crop_scale,
            crop_ratio,
            hflip,
            seed,
        )
        self.two_views, self.labels = two_views, labels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def _view(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        view = random_resized_crop(
            img, rng, self.spec.crop_size, self.crop_scale, self.crop_ratio, self.spec.interpolation
        )
        if self.hflip and rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(normalize(np.asarray(view), self.spec))

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = to_color_mode(self.source.image(i), self.spec.color_mode)
        first = self._view(img, rng)
        if self.labels:
            return first, int(self.source.labels[i])
        return (first, self._view(img, rng)) if self.two_views else (first,)


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, split across ranks, full batches
    only (drop_last, as SimMIM)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n)
    per_rank = n // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    k = len(mine) // batch_size
    return [mine[j * batch_size : (j + 1) * batch_size].tolist() for j in range(k)]
