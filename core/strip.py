"""STRIP's entropy test and its fitted values (Gao et al., ACSAC'19; CoDefend, paper 000,
Algorithm 1 and Eq. 4), Ray-free so the gateway's policy and the trainer's fit share it.

Superimpose N clean overlay images on an input and average the Shannon entropy (base 2)
of the model's softmax over the N blends. A trigger keeps forcing its target whatever is
laid over it, so a triggered input's mean entropy is low; flag the input when it is at or
below sigma. Sigma is a percentile of clean entropies at a target false-rejection rate,
fitted on the defender's clean validation data only (``trainer.strip``), and travels with
the overlay pool in the round's manifest, so a swap carries both.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from core.errors import UserError

MODES = ("add", "blend")  # add: the official code's saturating sum; blend: 0.5/0.5
STAGES = ("disagreements", "all")  # where a two-model stack runs STRIP as a second stage
MAX_BLENDS = 4096  # blends per call: bounds memory when fitting on thousands of images


def superimpose(images: NDArray[np.uint8], pool: NDArray[np.uint8], mode: str) -> NDArray[np.uint8]:
    """Every input blended with every overlay: (B, H, W, C) x (N, H, W, C) -> (B*N, H, W, C),
    input-major (rows i*N .. i*N+N-1 belong to input i)."""
    a = images[:, None].astype(np.uint16)
    b = pool[None].astype(np.uint16)
    if mode == "add":  # Gao et al.'s code: cv2.add, which saturates at 255
        out = np.minimum(a + b, 255)
    elif mode == "blend":
        out = (a + b + 1) // 2  # the 0.5/0.5 blend, rounded half up
    else:
        raise UserError(f"unknown STRIP overlay mode {mode!r}; use one of {', '.join(MODES)}")
    return out.reshape(-1, *images.shape[1:]).astype(np.uint8)


def entropy_bits(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row of a softmax (M, K); 0 log 0 counts as 0."""
    p = probs.double()
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)


def entropy_matrix(
    run: Callable[[NDArray[np.uint8]], torch.Tensor],
    images: NDArray[np.uint8],
    pool: NDArray[np.uint8],
    mode: str,
) -> NDArray[np.float64]:
    """(B, N): each input's entropy against each overlay, from one call on all B*N blends
    when they number at most ``MAX_BLENDS``, else from calls of that size (``run``: images
    -> softmax)."""
    if len(images) == 0:
        return np.zeros((0, len(pool)))
    step = max(1, MAX_BLENDS // len(pool))  # a request batch (32 x 128 at most) is one call
    parts = []
    for i in range(0, len(images), step):
        part = images[i : i + step]
        probs = run(superimpose(part, pool, mode))
        parts.append(entropy_bits(probs).reshape(len(part), len(pool)).numpy())
    return np.concatenate(parts)


def mean_entropy(
    run: Callable[[NDArray[np.uint8]], torch.Tensor],
    images: NDArray[np.uint8],
    pool: NDArray[np.uint8],
    mode: str,
) -> NDArray[np.float64]:
    """H_t for each input (B,): the entropy of ``run``'s softmax averaged over the N blends
    (:func:`entropy_matrix`)."""
    out: NDArray[np.float64] = entropy_matrix(run, images, pool, mode).mean(1)
    return out


def _encode(pool: NDArray[np.uint8]) -> dict[str, Any]:
    return {"shape": list(pool.shape), "uint8_base64": base64.b64encode(pool.tobytes()).decode()}


def _decode(data: Mapping[str, Any]) -> NDArray[np.uint8]:
    shape = tuple(int(s) for s in data["shape"])
    raw = base64.b64decode(data["uint8_base64"], validate=True)
    if len(shape) != 4 or int(np.prod(shape)) != len(raw):
        raise ValueError(f"the overlay pool's {len(raw)} bytes do not fill shape {shape}")
    return np.frombuffer(raw, np.uint8).reshape(shape).copy()


@dataclass(frozen=True)
class StripParams:
    """What a round's manifest keeps of STRIP: the overlay pool, sigma and how it was fitted.

    ``stage`` matters only beside a second model: run on the pair's disagreements alone, or
    on every input (where a low entropy also makes an input suspect).
    """

    pool: NDArray[np.uint8]  # (N, H, W, C) clean overlays, at least one per class
    sigma: float  # flag when the mean entropy is at or below this
    mode: str = "add"
    frr: float = 0.01  # the clean false-rejection rate sigma was fitted to
    stage: str = "disagreements"

    @property
    def n(self) -> int:
        return len(self.pool)

    def entropies(
        self, run: Callable[[NDArray[np.uint8]], torch.Tensor], images: NDArray[np.uint8]
    ) -> NDArray[np.float64]:
        return mean_entropy(run, images, self.pool, self.mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "mode": self.mode,
            "frr": self.frr,
            "stage": self.stage,
            "n": self.n,
            "pool": _encode(self.pool),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, max_overlays: int | None = None) -> StripParams:
        """Read a manifest's STRIP values; a bad or oversized one raises ValueError, which
        keeps the round from serving."""
        pool = _decode(data["pool"])
        params = cls(
            pool, float(data["sigma"]), str(data["mode"]), float(data["frr"]), str(data["stage"])
        )
        if params.mode not in MODES or params.stage not in STAGES:
            raise ValueError(f"STRIP mode {params.mode!r} or stage {params.stage!r} is unknown")
        if params.n < 1 or params.n != int(data["n"]):
            raise ValueError(
                f"the overlay pool holds {params.n} images, the manifest says {data['n']}"
            )
        if max_overlays is not None and params.n > max_overlays:
            raise ValueError(
                f"the round's STRIP uses {params.n} overlays, above the configured maximum "
                f"of {max_overlays} (BQG_STRIP_MAX_OVERLAYS)"
            )
        return params
