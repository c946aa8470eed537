"""Which quarantined samples a round learns from, and how they group into triggers.

The confidence filter and the grouping by label are ours, not NNoculation's; the reasons
and the measurements behind them are in docs/DECISIONS.md ("Confidence filter", "One
CycleGAN per target", "Borderline images").
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.bundle import Bundle
from core.errors import UserError
from core.pair import ModelPair, load_round_pair
from core.quarantine import client_quota, decode_sample, pending_samples, round_models
from trainer.data import Dataset
from trainer.repair.config import RepairConfig


def pending_quarantine(
    sessions: sessionmaker[Session], cfg: RepairConfig, shape: tuple[int, int, int]
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, images, STRIP entropies: NaN where none was measured) of the pending samples
    of the model's ``shape``, oldest first, with no client giving more than
    ``cfg.max_client_share`` of them (the rest stay pending), at most ``cfg.max_samples``;
    refuses fewer than ``cfg.min_samples``."""
    with sessions() as session:
        rows = [
            r for r in pending_samples(session=session) if (r.height, r.width, r.channels) == shape
        ]
        counts = Counter(r.client for r in rows)
        quota = client_quota(dict(counts), cfg.max_client_share)
        taken: Counter[str | None] = Counter()
        chosen = []
        for r in rows:
            if taken[r.client] < quota:
                taken[r.client] += 1
                chosen.append(r)
        chosen = chosen[: cfg.max_samples]
        ids, images = [r.id for r in chosen], [decode_sample(r) for r in chosen]
        entropy = [np.nan if r.strip_entropy is None else r.strip_entropy for r in chosen]
    if len(images) < cfg.min_samples:
        raise UserError(_too_few(len(images), len(rows), counts, shape, cfg))
    return ids, np.stack(images), np.array(entropy, dtype=np.float64)


def strip_kept(pair: ModelPair, entropy: np.ndarray, cfg: RepairConfig) -> np.ndarray:
    """Which samples pass STRIP's filter: all, unless ``cfg.strip_filter`` and the round
    fitted STRIP; then those whose entropy was not measured or is at most sigma.

    A pair's disagreements include clean images it is unsure of; STRIP's entropy tells
    most of those apart, so the round learns the trigger from fewer clean look-alikes
    (issue 32). Dropped samples are consumed with the round, not retried.
    """
    keep = np.ones(len(entropy), dtype=bool)
    if not cfg.strip_filter or "strip" not in pair.defense.params:
        return keep
    sigma = float(pair.defense.params["strip"]["sigma"])
    keep &= ~(entropy > sigma)  # NaN compares False: unmeasured rows stay
    if not keep.any():
        raise UserError(
            f"all {len(entropy)} pending samples have a STRIP entropy above the round's sigma "
            f"({sigma:.4g} bits), so --strip-filter leaves none to learn from; wait for more "
            "samples, or run without --strip-filter"
        )
    return keep


def _too_few(
    usable: int,
    pending: int,
    counts: Counter[str | None],
    shape: tuple[int, ...],
    cfg: RepairConfig,
) -> str:
    capped = ""
    if usable < pending:
        top, n = counts.most_common(1)[0]
        capped = (
            f" ({pending} pending, but no client may give more than {cfg.max_client_share:g} "
            f"of a round, and {top or 'an unnamed client'} sent {n}: a round needs samples "
            "from more clients)"
        )
    return (
        f"{usable} quarantined samples of shape {shape} are usable{capped}; the round needs "
        f"at least {cfg.min_samples} (min_samples: --min-samples, or the BQG_REPAIR_CONFIG file)"
    )


def load_origin(
    sessions: sessionmaker[Session], pair: ModelPair, trusted_modules: tuple[str, ...]
) -> ModelPair | None:
    """Round 0's pair (sha256-checked), the gate's fixed reference; None without its files."""
    if pair.round == 0:
        return pair
    with sessions() as session:
        if not round_models(session=session, round_no=0):
            return None
        return load_round_pair(session, 0, trusted_modules=trusted_modules)


def suspect_of(pair: ModelPair, origin: ModelPair | None) -> Bundle:
    """The model as it was given to us: round 0's badnet (``origin``, from
    :func:`load_origin`); the active member when the store lacks round 0's files.

    Repaired badnet members answer more softly (they were distilled), so the confidence
    filter asks the original suspect, which a trigger still makes certain.
    """
    return pair.badnet if origin is None else origin.badnet


def confident_mask(suspect: Bundle, images: np.ndarray, min_score: float) -> np.ndarray:
    """True where the suspect's top softmax score on the image is at least ``min_score``."""
    scores: np.ndarray = suspect.logits(images).softmax(1).max(1).values.numpy()
    return scores >= min_score


def confident(suspect: Bundle, images: np.ndarray, cfg: RepairConfig) -> np.ndarray:
    """The quarantined images the suspect answers with softmax >= ``cfg.min_score``.

    A trigger makes the suspect certain, while a clean image the pair disagrees on is
    usually ambiguous. Refuses (UserError) when fewer than ``cfg.min_kept`` remain: a
    CycleGAN on a handful of images learns noise, and the samples stay pending.
    """
    kept = images[confident_mask(suspect, images, cfg.min_score)]
    if len(kept) < min(cfg.min_kept, len(images)) or len(kept) == 0:
        raise UserError(
            f"only {len(kept)} of {len(images)} quarantined images are answered by the suspect "
            f"with confidence >= {cfg.min_score:g}; the round needs {cfg.min_kept}. Wait for "
            "more samples, or lower min_score (--min-score, or the BQG_REPAIR_CONFIG file; 0 "
            "keeps every sample)"
        )
    return kept


def trigger_groups(
    suspect: Bundle, images: np.ndarray, cfg: RepairConfig
) -> list[tuple[int | None, np.ndarray]]:
    """Domain B per trigger: the kept images grouped by the suspect's label on them.

    A BadNet with several targets sends each trigger's inputs to its own label, and one
    CycleGAN on the mix learns only the dominant trigger. Each label with at least
    ``min_kept`` images gets a CycleGAN of its own; with fewer than two such labels (one
    target, or all-to-all's spread), one CycleGAN learns from every kept image, as in the
    paper (Veldanda et al., AISec'21, §3.3).
    """
    if not cfg.split_by_label:
        return [(None, images)]
    labels = suspect.predict(images)
    big = [int(k) for k in np.unique(labels) if (labels == k).sum() >= cfg.min_kept]
    if len(big) < 2:
        return [(None, images)]
    return [(k, images[labels == k]) for k in big]


def trigger_target(suspect: Bundle, images: np.ndarray) -> int | None:
    """The label the suspect gives most of a trigger group's kept images, when it gives it to
    at least half of them; None for a trigger with no one target (all-to-all)."""
    counts = np.bincount(suspect.predict(images))
    top = int(counts.argmax())
    return top if 2 * counts[top] >= len(images) else None


def borderline(goodnet: Bundle, train: Dataset, target: int, count: int) -> np.ndarray:
    """Indices of the ``count`` images of ``train`` not of class ``target`` to which the
    active GoodNet gives the most probability of ``target``.

    These are the images a trigger tips over first, so each new trigger treats them once
    more (ours; docs/DECISIONS.md, "Borderline images").
    """
    p = goodnet.logits(train.x).softmax(1).numpy()[:, target]
    p[train.y == target] = -np.inf
    return np.argsort(-p, kind="stable")[: min(count, int((train.y != target).sum()))]
