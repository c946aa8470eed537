"""Learned triggers on disk: a round's gen_ab generators and stamps, so later rounds can
treat with them.

NNoculation's sequential attacker (§4.2.3, Table 8) is repaired round after round, each round
learning the trigger its own quarantine holds. A round fine-tunes only on what it treats, so
without the earlier triggers a later round lets them come back (docs/RESULTS.md, "The
sequential attacker"). Each succeeded round therefore writes every generator it treated
with: its own and the ones it inherited, each with the stamps its quarantine carried
(``trainer.stamps``: region and carriers), so a later round replays the attacker's own patch
and not only gen_ab's imitation of it. A stamped trigger's round trains no CycleGAN for it
(``trainer.repair``), so its entry names stamps and no weights. Weights and stamps are
safetensors and the index is JSON; nothing here unpickles. The index holds each file's
sha256, and ``save_triggers`` returns the index's own, which the round registers in the
store, so a file altered on disk after its round is refused as bundles are
(``core.bundle``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file, save_file

from core.bundle import file_sha256
from core.errors import DataError
from trainer.cyclegan.models import ResnetGenerator
from trainer.stamps import Stamp

INDEX = "triggers.json"


@dataclass
class LearnedTrigger:
    """One learned trigger: gen_ab, the round that learned it, the suspect's label on its
    quarantine (None when one CycleGAN learned from the whole quarantine), and the stamps
    that quarantine carried (none for a global trigger). A stamped trigger is treated with
    its stamps alone, so its round trains no CycleGAN for it and ``gen`` is None."""

    gen: ResnetGenerator | None
    round: int
    suspect_label: int | None
    stamps: list[Stamp] = field(default_factory=list)

    @property
    def file(self) -> str:
        return f"gen_ab_{self._key}.safetensors"

    @property
    def stamps_file(self) -> str:
        return f"stamps_{self._key}.safetensors"

    @property
    def _key(self) -> str:
        label = "" if self.suspect_label is None else f"_label{self.suspect_label}"
        return f"round{self.round}{label}"

    @property
    def name(self) -> str:
        label = "" if self.suspect_label is None else f", suspect label {self.suspect_label}"
        return f"round {self.round}{label}"


def save_triggers(directory: Path, triggers: list[LearnedTrigger]) -> str:
    """Write each generator's weights and stamps, and the index that says how to rebuild
    them with each file's sha256; returns the index's sha256."""
    for t in triggers:  # checked before anything is written
        if t.gen is None and not t.stamps:
            raise ValueError(f"learned trigger {t.name} has neither a generator nor stamps")
    entries = []
    for t in triggers:
        if t.gen is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in t.gen.state_dict().items()}
            save_file(state, str(directory / t.file))
        if t.stamps:
            arrays = {}
            for i, stamp in enumerate(t.stamps):
                arrays[f"region{i}"] = stamp.region.astype(np.uint8)
                arrays[f"donors{i}"] = np.ascontiguousarray(stamp.donors, dtype=np.uint8)
            save_arrays(arrays, str(directory / t.stamps_file))
        gen = t.gen  # narrowed for the entry below
        entries.append(
            {
                "file": None if gen is None else t.file,
                "round": t.round,
                "suspect_label": t.suspect_label,
                "channels": None if gen is None else gen.channels,
                "ngf": None if gen is None else gen.ngf,
                "n_blocks": None if gen is None else gen.n_blocks,
                "stamps": t.stamps_file if t.stamps else None,
                "sha256": None if gen is None else file_sha256(directory / t.file),
                "stamps_sha256": file_sha256(directory / t.stamps_file) if t.stamps else None,
            }
        )
    (directory / INDEX).write_text(json.dumps({"triggers": entries}, indent=2) + "\n")
    return file_sha256(directory / INDEX)


def _checked(path: Path, sha256: str | None) -> Path:
    """``path`` if its sha256 is the one recorded (None: written before digests were)."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path.name} does not match the sha256 recorded for it: altered")
    return path


def load_triggers(directory: Path, index_sha256: str | None = None) -> list[LearnedTrigger]:
    """The generators a round directory lists; [] when it lists none (round 0, or a round
    written before rounds kept their triggers). ``index_sha256``, the digest the store
    registered for the round, is checked when given, and every file against the digest the
    index records. A damaged or altered file raises DataError."""
    index = directory / INDEX
    if not index.exists() and index_sha256 is None:
        return []
    try:
        text = _checked(index, index_sha256).read_text()
        entries: list[dict[str, Any]] = json.loads(text)["triggers"]
        triggers = []
        for e in entries:
            gen = None
            if e["file"] is not None:
                gen = ResnetGenerator(int(e["channels"]), int(e["ngf"]), int(e["n_blocks"]))
                path = _checked(directory / e["file"], e.get("sha256"))
                gen.load_state_dict(load_file(str(path)))
                gen.eval()
            label = None if e["suspect_label"] is None else int(e["suspect_label"])
            stamps = []
            if e.get("stamps"):
                stamps = _load_stamps(_checked(directory / e["stamps"], e.get("stamps_sha256")))
            if gen is None and not stamps:
                raise ValueError(f"entry {e} names neither a generator file nor stamps")
            triggers.append(LearnedTrigger(gen, int(e["round"]), label, stamps))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise DataError(
            f"the learned triggers in {directory} cannot be read ({type(exc).__name__}: {exc}); "
            "restore the round's files, or run the round with replay off (--no-replay)"
        ) from exc
    return triggers


def _load_stamps(path: Path) -> list[Stamp]:
    """The stamps ``save_triggers`` wrote: each a (H, W) region and (n, H, W, C) carriers of
    that size, n >= 1 (ValueError otherwise)."""
    arrays = load_arrays(str(path))
    stamps = []
    for i in range(len(arrays) // 2):
        region, donors = arrays[f"region{i}"], arrays[f"donors{i}"]
        if region.ndim != 2 or donors.ndim != 4 or donors.shape[1:3] != region.shape:
            raise ValueError(f"stamp {i} has region {region.shape} and carriers {donors.shape}")
        if not len(donors) or donors.dtype != np.uint8:
            raise ValueError(f"stamp {i} has no uint8 carriers")
        stamps.append(Stamp(region.astype(bool), donors))
    if len(arrays) != 2 * len(stamps) or not stamps:
        raise ValueError(f"{path.name} holds {sorted(arrays)}, not region/donors pairs")
    return stamps
