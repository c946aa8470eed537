"""The treatment set: clean validation images carrying each learned trigger, true labels.

NNoculation (Veldanda et al., AISec'21, §3.3, step 3) fine-tunes on gen_ab(validation
images) with the clean labels. Our additions, each with its measurements in
docs/DECISIONS.md: several jittered views of each image, a stamped trigger transplanted
from real carriers ("Stamp transplant"), a global trigger fitted as a curve per pixel
("Pixel curves"), and real quarantined images with targets that never name the trigger
("Quarantine views").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.bundle import Bundle
from trainer.cyclegan import translate
from trainer.data import Dataset
from trainer.loop import MAX_SHIFT
from trainer.repair.config import RepairConfig
from trainer.stamps import Stamp, transplanted

CURVE_RIDGE = 1e-3  # on the curve's non-constant terms, for values in [0, 1]


def views_of(x: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` views of the images ``x``: themselves, then ``n - 1`` jittered copies."""
    return [x] + [jitter(x, rng) for _ in range(n - 1)]


def jitter(x: np.ndarray, rng: np.random.Generator, shift: int = MAX_SHIFT) -> np.ndarray:
    """Each image mirrored at random and shifted up to ``shift`` pixels (edges repeated): the
    fine-tuning's own augmentation (``trainer.loop``), drawn per image rather than per batch."""
    n, h, w, _ = x.shape
    x = np.where(rng.random(n)[:, None, None, None] < 0.5, x[:, :, ::-1], x)
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * shift + 1, (2, n))
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def localized(clean: np.ndarray, translated: np.ndarray) -> np.ndarray:
    """``clean`` plus gen_ab's change only where that change is concentrated.

    gen_ab adds the trigger but also redraws the whole image (blur, texture). The mask is
    the mean |gen_ab(x) - x| per pixel over the images, scaled from its median (0) to its
    99th percentile (1): for a patch trigger it is the patch, for a global one (blend,
    filter) it spreads over the image.
    """
    diff = translated.astype(np.float32) - clean.astype(np.float32)
    d = np.abs(diff).mean(axis=(0, 3))
    lo, hi = np.median(d), np.quantile(d, 0.99)
    mask = np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1)[None, :, :, None]
    return np.clip(clean + mask * diff, 0, 255).round().astype(np.uint8)


def pixel_curve(clean: np.ndarray, translated: np.ndarray, degree: int) -> np.ndarray:
    """gen_ab's change as one curve per pixel: at each pixel and channel, the polynomial of
    ``degree`` in the clean value that best predicts gen_ab's value there (least squares over
    the images, a little ridge on the non-constant terms), applied to ``clean``.

    A blend (x' = (1 - alpha) x + alpha n) and a tone filter are each such a curve, a
    different one at each pixel; the fit keeps it and averages out gen_ab's redrawing of
    each image. Where the images never vary (a border always black) the curve is gen_ab's
    mean there.
    """
    n = len(clean)
    x = clean.reshape(n, -1).astype(np.float64) / 255
    y = translated.reshape(n, -1).astype(np.float64) / 255
    powers = np.stack([x**k for k in range(degree + 1)], axis=-1)  # (n, pixels, degree + 1)
    gram = np.einsum("npi,npj->pij", powers, powers) / n
    gram += CURVE_RIDGE * np.diag((np.arange(degree + 1) > 0).astype(np.float64))
    coef = np.linalg.solve(gram, np.einsum("npi,np->pi", powers, y)[..., None] / n)[..., 0]
    out = np.einsum("npi,pi->np", powers, coef) * 255
    return np.clip(out, 0, 255).round().astype(np.uint8).reshape(clean.shape)


def _treated_part(
    gen: Any,
    views: list[np.ndarray],
    part: np.ndarray,
    found: list[Stamp],
    cfg: RepairConfig,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One trigger's two copies of its share ``part`` of every view: (first, second)."""
    clean = np.concatenate([view[part] for view in views])
    if found:  # the attacker's own stamp in both copies, from two draws of carriers
        outs = np.split(transplanted(clean, found, rng), len(views))
        return outs, np.split(transplanted(clean, found, rng), len(views))
    if cfg.pixel_curve:  # gen_ab's change as a curve per pixel, in both copies
        made = np.concatenate([translate(gen, v[part]) for v in views])
        fitted = np.split(pixel_curve(clean, made, cfg.pixel_curve), len(views))
        return fitted, fitted
    outs = [translate(gen, view[part]) for view in views]
    return outs, np.split(localized(clean, np.concatenate(outs)), len(views))


def treat(
    gens: list[Any],
    parts: list[np.ndarray],
    train: Dataset,
    cfg: RepairConfig,
    rng: np.random.Generator,
    stamps: list[list[Stamp]] | None = None,
) -> tuple[Dataset, np.ndarray]:
    """The fine-tuning set: (clean views, their treated copies, view after view).

    Each image is seen in ``cfg.views`` views. ``parts[i]`` are the images that trigger
    ``i`` treats (earlier rounds' and this round's, each on its share). Per view, the first
    copy is gen_ab's and the second its localized part (:func:`localized`); a stamped
    trigger (``stamps[i]``) takes the attacker's real pixels in both, and a global one
    gen_ab's change fitted as a curve per pixel (``cfg.pixel_curve``). ``cfg.treatment``
    keeps the first copy ("gan"), the second ("masked"), or both.
    """
    views = views_of(train.x, cfg.views, rng)
    translated = [view.copy() for view in views]
    masked = [view.copy() for view in views]
    for gen, part, found in zip(gens, parts, stamps or [[]] * len(gens), strict=True):
        outs, loc = _treated_part(gen, views, part, found, cfg, rng)
        for k in range(len(views)):  # one mask per generator: its own trigger
            translated[k][part], masked[k][part] = outs[k], loc[k]
    copies = {"gan": translated, "masked": masked, "both": translated + masked}
    clean_set = Dataset(
        np.concatenate(views), np.tile(train.y, len(views)), train.class_names, train.source
    )
    return clean_set, np.concatenate(copies[cfg.treatment])


def counter_targets(goodnet: Bundle, suspect: Bundle, images: np.ndarray) -> np.ndarray:
    """Soft targets for real quarantined images: the GoodNet's answer with the suspect's
    label on the image (the trigger's target) taken out and the rest renormalised.

    A kept sample is one the suspect answers with certainty and the GoodNet contradicts, so
    the target is the one class these targets never name.
    """
    soft = goodnet.logits(images).softmax(1).numpy().astype(np.float64)
    soft[np.arange(len(soft)), suspect.predict(images)] = 0.0
    soft = np.maximum(soft, 1e-12)
    return (soft / soft.sum(1, keepdims=True)).astype(np.float32)
