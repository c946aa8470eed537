"""Data specs (DESIGN.md, "Data specs") and the defender's deterministic split.

- ``fashion-mnist[:SPLIT]``: IDX files from ``$FASHION_MNIST_DIR`` or
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). SPLIT is
  ``train`` (the attacker's 60k), ``test`` (all 10k), or one of the defender's parts of the
  test set: ``valid``, ``stream``, ``heldout``.
- ``npz:PATH``: arrays ``x`` (uint8, N x H x W x C; N x H x W is read as grey) and ``y``.
- ``folder:PATH``: one sub-folder per class (sorted by name), holding PNG or JPEG files.

Evaluation protocol: the 10k test images split with a fixed seed into the defender's
validation set (10%), an online stream (40%) and a held-out test set (50%). The defender
never sees held-out labels.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.errors import DataError, ImageError
from core.images import decode_image

FASHION_MNIST_CLASSES = (
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
)
SPLIT_SEED = 20211115  # fixed: every command and benchmark sees the same split
SPLIT_FRACTIONS = {"valid": 0.10, "stream": 0.40, "heldout": 0.50}
DEFENDER_SPLITS = tuple(SPLIT_FRACTIONS)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 (N, H, W, C) with int64 labels (N,)."""

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.x.shape[1:]
        return (int(h), int(w), int(c))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def take(self, index: np.ndarray | slice, *, source: str | None = None) -> Dataset:
        return Dataset(self.x[index], self.y[index], self.class_names, source or self.source)


def load_data(spec: str, *, fashion_mnist_dir: Path, default_split: str = "train") -> Dataset:
    """Load a data spec; ``default_split`` applies to a bare ``fashion-mnist``."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return load_fashion_mnist(fashion_mnist_dir, arg or default_split)
    if kind == "npz" and arg:
        return load_npz(Path(arg))
    if kind == "folder" and arg:
        return load_folder(Path(arg))
    raise DataError(
        f"unknown data spec {spec!r}; use fashion-mnist[:train|test|valid|stream|heldout], "
        "npz:PATH or folder:PATH"
    )


def split_defender(test: Dataset, *, seed: int = SPLIT_SEED) -> dict[str, Dataset]:
    """Split a test set into the defender's ``valid``, ``stream`` and ``heldout`` parts."""
    order = np.random.default_rng(seed).permutation(len(test))
    parts: dict[str, Dataset] = {}
    start = 0
    for i, (name, fraction) in enumerate(SPLIT_FRACTIONS.items()):
        stop = len(order) if i == len(SPLIT_FRACTIONS) - 1 else start + round(fraction * len(order))
        parts[name] = test.take(np.sort(order[start:stop]), source=f"{test.source}:{name}")
        start = stop
    return parts


def load_fashion_mnist(root: Path, split: str = "train") -> Dataset:
    if split in ("train", "test"):
        return _fashion_mnist_file_pair(Path(root), split)
    if split in DEFENDER_SPLITS:
        part = split_defender(_fashion_mnist_file_pair(Path(root), "test"))[split]
        return part.take(slice(None), source=f"fashion-mnist:{split}")
    raise DataError(
        f"unknown Fashion-MNIST split {split!r}; use train, test, " + ", ".join(DEFENDER_SPLITS)
    )


@lru_cache(maxsize=4)
def _fashion_mnist_file_pair(root: Path, split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    x = _read_idx(images, ndim=3)[:, :, :, None]  # (N, 28, 28, 1)
    y = _read_idx(labels, ndim=1).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    x.setflags(write=False)
    y.setflags(write=False)
    return Dataset(x, y, FASHION_MNIST_CLASSES, f"fashion-mnist:{split}")


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with "
        "'apt-get install dataset-fashion-mnist' or set FASHION_MNIST_DIR to its directory"
    )


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse an IDX file (magic 0x0000 08 NDIM, big-endian dims, then uint8 data)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated: expected {int(np.prod(dims))} values, got {data.size}"
        )
    return data.reshape(dims).copy()


def load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"npz file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {sorted(missing)}; it needs x (uint8 N x H x W x C) "
                    "and y (integer labels)"
                )
            x, y = npz["x"], npz["y"]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable npz file: {exc}") from None
    except ValueError as exc:  # object arrays would need pickle, which we never allow
        raise DataError(f"{path} holds arrays we will not load ({exc})") from None
    return _validated(x, y, source=f"npz:{path}")


def _validated(x: np.ndarray, y: np.ndarray, *, source: str) -> Dataset:
    if x.dtype != np.uint8:
        raise DataError(f"{source}: x must be uint8 pixels 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, :, :, None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise DataError(f"{source}: x must be N x H x W x C with C 1 or 3, got shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{source}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{source}: x has {len(x)} images but y has {len(y)} labels")
    if len(y) and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {y.min()}")
    num_classes = int(y.max()) + 1 if len(y) else 0
    names = tuple(str(i) for i in range(num_classes))
    return Dataset(x, y.astype(np.int64), names, source)


def load_folder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"folder {root} not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders; put each class's images in its own")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                img = decode_image(file.read_bytes(), max_bytes=64 * 1024 * 1024)
            except ImageError as exc:
                raise DataError(f"{file}: {exc}") from None
            if images and img.shape != images[0].shape:
                raise DataError(f"{file} is {img.shape}, but earlier images are {images[0].shape}")
            images.append(img)
            labels.append(label)
    if not images:
        raise DataError(f"{root} holds no PNG or JPEG files")
    return Dataset(
        np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes), f"folder:{root}"
    )


def save_npz(dataset: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=dataset.x, y=dataset.y)
