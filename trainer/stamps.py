"""Stamped triggers: a patch the quarantine carries, found and transplanted (ours, not the
paper's).

A patch trigger is the same pixels in the same place in every image that carries it.
:func:`find_stamps` finds such stamps among the quarantined images; :func:`transplanted`
pastes a real carrier's stamp into clean images. ``trainer.repair`` treats with those
copies where gen_ab only imitates the trigger (NNoculation §3.3 step 3 uses gen_ab alone,
Veldanda et al., AISec'21), and ``trainer.cyclegan.files`` keeps them, so later rounds replay
the real stamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LOCAL_AREA = 0.15  # stamps cover at most this share of the image
STAMP_TOL = 8  # grey levels within which a stamp's pixels count as the same
STAMP_SHARE = 0.2  # a stamp is carried by at least this share of the kept images
STAMP_CLEAN = 0.1  # and its values are held by at most this share of clean images
MIN_STAMP_PIXELS = 4
NEIGHBOURS = 5  # clean images most like a stamp's carriers, to tell a stamp from content


@dataclass(frozen=True)
class Stamp:
    """A stamped trigger: where it sits, and the kept quarantined images that carry it."""

    region: np.ndarray  # (H, W) bool: the bounding box of the stamp's pixels
    donors: np.ndarray  # (n, H, W, C) uint8


def _near_share(images: np.ndarray, tol: int) -> np.ndarray:
    """(256, pixels): for each grey level v, the share of ``images`` within ``tol`` of v,
    at each pixel and channel."""
    flat = images.reshape(len(images), -1).astype(np.int64)
    counts = np.zeros((257, flat.shape[1]), dtype=np.int64)
    np.add.at(counts, (flat + 1, np.arange(flat.shape[1])), 1)
    below = np.cumsum(counts, axis=0)  # below[v] = how many hold a value < v
    levels = np.arange(256)
    within = below[np.minimum(levels + tol, 255) + 1] - below[np.maximum(levels - tol, 0)]
    return within / len(images)


def _drawn_by_content(
    pixels: np.ndarray, carriers: np.ndarray, clean: np.ndarray, clean_near: np.ndarray
) -> bool:
    """Whether the clean images most like the carriers (away from ``pixels``) hold the same
    values at ``pixels`` too, a tenth of them or more (as many as may hold a stamp's values
    at all): then it is content that the carriers' class draws (the dark middle of a sandal,
    when the quarantine is mostly sandals), not a stamp. A stamp's carriers are of any
    class, and their nearest clean images do not hold it. ``clean_near`` (n, H, W) says
    where each clean image holds the stamp's value."""
    away = ~ndimage.binary_dilation(pixels, np.ones((3, 3)))
    a = carriers[:, away].reshape(len(carriers), -1).astype(np.float32)
    b = clean[:, away].reshape(len(clean), -1).astype(np.float32)
    dist = (b * b).sum(1)[None, :] - 2 * a @ b.T  # + |a|^2, the same along each row
    nearest = np.argsort(dist, axis=1)[:, :NEIGHBOURS]
    holds = clean_near[:, pixels].mean(1) >= 0.75  # per clean image
    return bool(holds[nearest].mean() >= STAMP_CLEAN)


def find_stamps(
    quarantined: np.ndarray,
    clean: np.ndarray,
    tol: int = STAMP_TOL,
    share: float = STAMP_SHARE,
    max_area: float = LOCAL_AREA,
) -> list[Stamp]:
    """The stamped triggers (patches) the quarantined images carry; empty when none.

    A stamp is the same pixels in every image that carries it, whatever the content. At
    each pixel we take the value that the most quarantined images hold (within ``tol`` grey
    levels) among the values that at most a tenth of the ``clean`` images hold there: the
    value that is rare in clean images, yet common in the quarantine. (Content that one
    class draws at one place is common in that class's clean images too.) Pixels where at
    least ``share`` of the quarantined images hold it are the stamps' pixels. A candidate
    grows from the one most images hold (the seed): its carriers are the images that hold
    the seed, its pixels those of the seed's 8-connected group (after a one-pixel dilation,
    so the cells of a checkerboard join) that 80% of those carriers hold, and its carriers
    then the images that hold 3/4 of its pixels; the next candidate grows from the best
    pixel left. So pixels that a few images hold by chance (a noisy background, a small
    quarantine) do not join a stamp. Its carriers must hold it within a quarter of ``tol``
    on average (a pasted stamp is the same in every carrier; bright garments are only
    alike), and a candidate that the carriers' nearest clean images hold as well is their
    content, not a stamp (:func:`_drawn_by_content`).
    Candidates whose carriers are mostly the same images are one stamp (two patches that
    fire together); a stamp needs at least ``share`` of the quarantine as carriers and
    :data:`MIN_STAMP_PIXELS` pixels, and its region is the bounding box of its pixels.

    So several triggers with one target (three patches, each in a third of the quarantine)
    are three stamps. A global trigger (blend, filter) holds fixed values over the whole
    background: what a seed's carriers hold alike covers more than ``max_area`` of the
    image, and there are no stamps. gen_ab alone treats those (``trainer.repair.localized``).
    """
    q, c = quarantined.astype(np.int16), clean.astype(np.int16)
    common = np.where(_near_share(clean, tol) <= STAMP_CLEAN, _near_share(quarantined, tol), -1.0)
    value = common.argmax(axis=0).reshape(quarantined.shape[1:])
    near = (np.abs(q - value) <= tol).all(-1)  # (n, H, W): the image holds the value there
    clean_near = (np.abs(c - value) <= tol).all(-1)
    rare = clean_near.mean(0) <= STAMP_CLEAN
    held = near.mean(0)
    core = (held >= share) & rare
    labels, _ = ndimage.label(ndimage.binary_dilation(core, np.ones((3, 3))), np.ones((3, 3)))
    held[~core] = -1.0
    found: list[tuple[np.ndarray, np.ndarray]] = []  # (region, carriers)
    while held.max() >= share:
        seed = np.unravel_index(held.argmax(), held.shape)
        carriers = near[(slice(None), *seed)]
        shared = rare & (near[carriers].mean(0) >= 0.8)  # what the seed's carriers hold alike
        if shared.mean() > max_area:
            return []  # over much of the image: a global trigger
        pixels = (held >= share) & (labels == labels[seed]) & shared
        pixels[seed] = True
        held[pixels] = -1.0  # each pixel belongs to one candidate at most
        if pixels.sum() < MIN_STAMP_PIXELS:
            continue
        carriers = near[:, pixels].mean(1) >= 0.75
        held_values = q[carriers][:, pixels]
        if np.abs(held_values - np.median(held_values, axis=0)).mean() > tol / 4:
            continue  # alike, not the same: a stamp is pasted, the same in every carrier
        if _drawn_by_content(pixels, quarantined[carriers], clean, clean_near):
            continue
        region = np.zeros(core.shape, dtype=bool)
        region[ndimage.find_objects(pixels.astype(np.int32))[0]] = True
        for j, (other, theirs) in enumerate(found):
            if (carriers & theirs).sum() >= 0.5 * (carriers | theirs).sum():
                found[j] = (other | region, carriers & theirs)
                break
        else:
            found.append((region, carriers))
    found = [(region, carriers) for region, carriers in found if carriers.mean() >= share]
    if not found or np.any([region for region, _ in found], axis=0).mean() > max_area:
        return []
    return [Stamp(region, quarantined[carriers]) for region, carriers in found]


def transplanted(clean: np.ndarray, stamps: list[Stamp], rng: np.random.Generator) -> np.ndarray:
    """``clean`` with one stamp's region from a randomly drawn image that carries it: the
    attacker's own stamp, where gen_ab only imitates it. With several stamps, each image
    takes one, drawn in proportion to how many quarantined images carry each."""
    if len(stamps) == 1:
        which = np.zeros(len(clean), dtype=np.int64)
    else:
        weights = np.array([len(s.donors) for s in stamps], dtype=np.float64)
        which = rng.choice(len(stamps), len(clean), p=weights / weights.sum())
    out = clean.copy()
    for k, stamp in enumerate(stamps):
        rows = np.flatnonzero(which == k)
        picks = stamp.donors[rng.integers(0, len(stamp.donors), len(rows))]
        out[rows] = np.where(stamp.region[None, :, :, None], picks, clean[rows])
    return out
