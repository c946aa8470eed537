"""Learned triggers on disk: a round's gen_ab generators, so later rounds can treat with them.

NNoculation's sequential attacker (§4.2.3, Table 8) is repaired round after round, each round
learning the trigger its own quarantine holds. A round fine-tunes only on what it treats, so
without the earlier triggers a later round lets them come back (docs/RESULTS.md, "The
sequential attacker"). Each succeeded round therefore writes every generator it treated
with: its own and the ones it inherited. Weights are safetensors and the index is JSON; nothing
here unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import DataError
from trainer.cyclegan.models import ResnetGenerator

INDEX = "triggers.json"


@dataclass
class LearnedTrigger:
    """One gen_ab: the round that learned it, and the suspect's label on its quarantine
    (None when one CycleGAN learned from the whole quarantine)."""

    gen: ResnetGenerator
    round: int
    suspect_label: int | None

    @property
    def file(self) -> str:
        label = "" if self.suspect_label is None else f"_label{self.suspect_label}"
        return f"gen_ab_round{self.round}{label}.safetensors"

    @property
    def name(self) -> str:
        label = "" if self.suspect_label is None else f", suspect label {self.suspect_label}"
        return f"round {self.round}{label}"


def save_triggers(directory: Path, triggers: list[LearnedTrigger]) -> None:
    """Write each generator's weights and the index that says how to rebuild it."""
    entries = []
    for t in triggers:
        state = {k: v.detach().cpu().contiguous() for k, v in t.gen.state_dict().items()}
        save_file(state, str(directory / t.file))
        entries.append(
            {
                "file": t.file,
                "round": t.round,
                "suspect_label": t.suspect_label,
                "channels": t.gen.channels,
                "ngf": t.gen.ngf,
                "n_blocks": t.gen.n_blocks,
            }
        )
    (directory / INDEX).write_text(json.dumps({"triggers": entries}, indent=2) + "\n")


def load_triggers(directory: Path) -> list[LearnedTrigger]:
    """The generators a round directory lists; [] when it lists none (round 0, or a round
    written before rounds kept their triggers). A damaged file raises DataError."""
    index = directory / INDEX
    if not index.exists():
        return []
    try:
        entries: list[dict[str, Any]] = json.loads(index.read_text())["triggers"]
        triggers = []
        for e in entries:
            gen = ResnetGenerator(int(e["channels"]), int(e["ngf"]), int(e["n_blocks"]))
            gen.load_state_dict(load_file(str(directory / e["file"])))
            label = None if e["suspect_label"] is None else int(e["suspect_label"])
            triggers.append(LearnedTrigger(gen.eval(), int(e["round"]), label))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise DataError(
            f"the learned triggers in {directory} cannot be read ({type(exc).__name__}: {exc}); "
            "restore the round's files, or run the round with replay off (--no-replay)"
        ) from exc
    return triggers
