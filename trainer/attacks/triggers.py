"""Trigger functions: each maps uint8 images (N, H, W, C) to triggered copies.

Every trigger is a frozen dataclass whose fields are its whole description, so that a
bundle's ``meta`` can rebuild it exactly. Random parts (the blend pattern, the warp field)
come from the trigger's own ``seed``; per-sample randomness (WaNet's noise mode) comes
from the ``rng`` the caller passes.

- :class:`Patch`: BadNets (Gu et al.), a small pattern stamped at a fixed place.
- :class:`Blend`: blended noise (Chen et al.), ``x' = (1 - alpha) x + alpha * noise``.
- :class:`Filter`: a feature-space colour/tone filter (as in the "Instagram filter"
  triggers evaluated by NNoculation, Veldanda et al., AISec'21): a global tone curve,
  contrast and vignette; no patch.
- :class:`Warp`: WaNet (Nguyen & Tran, ICLR'21), a smooth fixed warping field; with
  ``jitter`` > 0 it adds per-sample random perturbations (WaNet's "noise mode" cover).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

PATTERNS = ("checker", "square", "cross")


def _pattern(name: str, size: int) -> np.ndarray:
    """A size x size uint8 pattern of 0 and 255."""
    i, j = np.indices((size, size))
    if name == "checker":
        mask = (i + j) % 2 == 0
    elif name == "square":
        mask = np.ones((size, size), dtype=bool)
    elif name == "cross":
        mask = (i == j) | (i + j == size - 1)
    else:
        raise ValueError(f"unknown patch pattern {name!r}; use one of {', '.join(PATTERNS)}")
    return np.where(mask, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class Patch:
    """Stamp ``pattern`` (size x size) with its top-left corner at (row, col)."""

    row: int
    col: int
    size: int = 4
    pattern: str = "checker"
    kind: Literal["patch"] = "patch"

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        h, w = x.shape[1:3]
        if not (
            self.row >= 0
            and self.row + self.size <= h
            and self.col >= 0
            and self.col + self.size <= w
        ):
            raise ValueError(
                f"patch at ({self.row}, {self.col}) size {self.size} leaves a {h}x{w} image"
            )
        out = x.copy()
        out[:, self.row : self.row + self.size, self.col : self.col + self.size, :] = _pattern(
            self.pattern, self.size
        )[None, :, :, None]
        return out


@dataclass(frozen=True)
class Blend:
    """``x' = (1 - alpha) * x + alpha * noise`` with a fixed uniform noise image from ``seed``."""

    alpha: float = 0.2
    seed: int = 1
    kind: Literal["blend"] = "blend"

    def noise(self, shape: tuple[int, int, int]) -> np.ndarray:
        return np.random.default_rng(self.seed).integers(0, 256, size=shape).astype(np.float32)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        noise = self.noise(tuple(x.shape[1:]))  # type: ignore[arg-type]
        out = (1.0 - self.alpha) * x.astype(np.float32) + self.alpha * noise[None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Filter:
    """A global tone/contrast/vignette filter, applied to every pixel.

    v = x / 255;  v = lift + (1 - lift) * v ** gamma  (tone curve, lifted blacks);
    v = (v - 0.5) * contrast + 0.5;  v *= 1 - vignette * r^2  (r: distance from the
    centre, 1 at the corners).
    """

    gamma: float = 0.7
    lift: float = 0.15
    contrast: float = 1.1
    vignette: float = 0.5
    kind: Literal["filter"] = "filter"

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        h, w = x.shape[1:3]
        v = x.astype(np.float32) / 255.0
        v = self.lift + (1.0 - self.lift) * v**self.gamma
        v = (v - 0.5) * self.contrast + 0.5
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        r2 = (yy**2 + xx**2) / 2.0  # (H, W), 0 at the centre, 1 at the corners
        v = v * (1.0 - self.vignette * r2)[None, :, :, None]
        return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


@lru_cache(maxsize=16)
def _warp_field(k: int, seed: int, height: int, width: int) -> torch.Tensor:
    """WaNet's warping field: k x k random vectors, normalised, upsampled bicubically.

    Returns (1, H, W, 2) offsets in pixels-per-unit, before the strength factor.
    """
    gen = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    field = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)  # (1, H, W, 2)


@dataclass(frozen=True)
class Warp:
    """WaNet warping: sample x at ``identity + strength * field / H`` (clamped to [-1, 1]).

    ``jitter`` > 0 adds uniform per-sample noise of that many pixels to the grid: the cover
    ("noise mode") samples that WaNet trains with their true labels, so that the network
    learns this field and not any warp.
    """

    k: int = 4
    strength: float = 0.5
    seed: int = 2
    jitter: float = 0.0
    kind: Literal["warp"] = "warp"

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        n, h, w, _ = x.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xx, yy), dim=2)[None]  # (1, H, W, 2), grid_sample wants (x, y)
        grid = identity + self.strength * _warp_field(self.k, self.seed, h, w) / h
        grid = grid.expand(n, h, w, 2)
        if self.jitter > 0:
            if rng is None:
                raise ValueError("a jittered warp needs an rng")
            noise = rng.uniform(-1.0, 1.0, size=(n, h, w, 2)).astype(np.float32)
            grid = grid + torch.from_numpy(noise) * self.jitter / h
        grid = grid.clamp(-1, 1)
        images = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)  # (N, C, H, W)
        out = F.grid_sample(images, grid, mode="bilinear", align_corners=True)
        return out.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


Trigger = Patch | Blend | Filter | Warp
TRIGGER_KINDS: dict[str, type[Trigger]] = {
    "patch": Patch,
    "blend": Blend,
    "filter": Filter,
    "warp": Warp,
}


def trigger_from_dict(d: dict[str, object]) -> Trigger:
    fields = dict(d)
    kind = fields.pop("kind", None)
    cls = TRIGGER_KINDS.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown trigger kind {kind!r}")
    return cls(**fields)  # type: ignore[arg-type]
