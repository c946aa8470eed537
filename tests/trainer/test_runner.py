"""The generic round runner with plain repairers: it gates under the round's own policy,
publishes the base round's defense, and fails or refuses the same way for every repairer."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from core.errors import UserError
from core.pair import ModelPair
from core.quarantine import active_round, list_rounds, pending_count
from tests.helpers import Lab, lab_store, make_blobs, quarantine_lab
from trainer.repair import RepairConfig, Repaired, RoundContext, run_repair_round

CFG = RepairConfig(min_score=0.0, min_kept=1, max_clean_suspect=100.0)


class Constant(nn.Module):
    """Answers one label for every input: a repair that wrecked the model."""

    def __init__(self, label: int, classes: int = 4) -> None:
        super().__init__()
        self.label, self.classes = label, classes
        self.weight = nn.Parameter(torch.zeros(1))  # a bundle needs at least one tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.classes)
        out[:, self.label] = 10.0
        return out


class Plain:
    """A repairer in test code: copies the members, or wrecks the GoodNet, or fails."""

    def __init__(self, cfg: RepairConfig, mode: str = "copy") -> None:
        self.mode, self.contexts, self.written = mode, [], []
        self.checked: list[int] = []

    def check(self, pair: ModelPair, sessions: sessionmaker[Session]) -> None:
        if self.mode == "refuse":
            raise UserError("the plain repairer refuses this round")
        self.checked.append(pair.round)

    def repair(self, ctx: RoundContext) -> Repaired:
        self.contexts.append(ctx)
        if self.mode == "crash":
            raise RuntimeError("the plain repairer crashed")
        models = {r: copy.deepcopy(ctx.pair.member(r).model) for r in ("badnet", "goodnet")}
        if self.mode == "wreck":
            models["goodnet"] = Constant(label=3)

        def write(out: Path) -> dict[str, Any]:
            (out / "plain.txt").write_text("made by the plain repairer\n")
            self.written.append(out)
            return {"plain_files": 1}

        metrics = {"gate_passed": True} if self.mode == "clash" else {"plain": True}
        return Repaired(models, metrics, write)


def run(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    repairer: Plain,
    cfg: RepairConfig = CFG,
    round_no: int = 1,
) -> Any:
    seen: list[str] = []

    def make(defense: str, cfg: RepairConfig) -> Plain:
        seen.append(defense)
        return repairer

    outcome = run_repair_round(
        sessions=sessions,
        store=tmp_path,
        round_no=round_no,
        valid=make_blobs(200, shape=(28, 28, 1), classes=4, seed=21),
        cfg=cfg,
        make_repairer=make,
    )
    return outcome, seen


def test_a_round_carries_its_base_rounds_defense_and_the_repairers_files(
    tmp_path: Path, lab: Lab
) -> None:
    sessions = lab_store(tmp_path, lab, defense="nnoculation-reject")
    quarantine_lab(sessions, lab, 20)
    plain = Plain(CFG)
    outcome, seen = run(sessions, tmp_path, plain)
    assert seen == ["nnoculation-reject"] and plain.checked == [0]
    ctx = plain.contexts[0]
    assert len(ctx.kept) == 20 and len(ctx.gate) == 40 and len(ctx.train) == 160
    assert outcome.status == "succeeded" and outcome.path is not None
    manifest = json.loads((outcome.path / "round.json").read_text())
    assert manifest == {"defense": "nnoculation-reject", "params": {}}
    assert (outcome.path / "plain.txt").exists()
    report = json.loads((outcome.path / "report.json").read_text())
    assert (
        report["defense"] == "nnoculation-reject" and report["plain"] and report["plain_files"] == 1
    )
    gate = report["gate"]["served clean accuracy"]
    assert gate["before"] == gate["after"]  # the same models, under the same reject rule
    with sessions() as s:
        assert active_round(session=s).round == 1  # type: ignore[union-attr]
        assert pending_count(session=s) == 0


def test_the_gate_rejects_under_the_rounds_policy_and_nothing_changes(
    tmp_path: Path, lab: Lab
) -> None:
    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 20)
    strict = RepairConfig(min_score=0.0, min_kept=1, ca_drop=3.0, max_clean_suspect=100.0)
    outcome, _ = run(sessions, tmp_path, Plain(strict, "wreck"), strict)
    assert outcome.status == "rejected" and outcome.path is None
    served = outcome.metrics["gate"]["served clean accuracy"]
    assert served["after"] < served["before"] - 0.03  # the GoodNet's answers are served
    with sessions() as s:
        assert active_round(session=s).round == 0  # type: ignore[union-attr]
        assert pending_count(session=s) == 0  # set aside with the rejected round
        assert list_rounds(session=s)[1].status == "rejected"
        assert list_rounds(session=s)[1].samples_used == 20


def test_a_repairer_that_refuses_crashes_or_overwrites_the_verdict_changes_nothing(
    tmp_path: Path, lab: Lab
) -> None:
    sessions = lab_store(tmp_path, lab)
    quarantine_lab(sessions, lab, 20)
    with pytest.raises(UserError, match="refuses this round"):
        run(sessions, tmp_path, Plain(CFG, "refuse"))
    with sessions() as s:
        assert [r.round for r in list_rounds(session=s)] == [0]  # refused before it existed
    with pytest.raises(RuntimeError, match="crashed"):
        run(sessions, tmp_path, Plain(CFG, "crash"))
    with pytest.raises(ValueError, match=r"\['gate_passed'\] would overwrite"):
        run(sessions, tmp_path, Plain(CFG, "clash"), round_no=2)
    with sessions() as s:
        r1, r2 = list_rounds(session=s)[1:]
        assert r1.status == "failed" and "crashed" in (r1.error or "")
        assert r2.status == "failed" and "gate_passed" in (r2.error or "")
        assert active_round(session=s).round == 0  # type: ignore[union-attr]
        assert pending_count(session=s) == 20


def test_a_defense_without_a_repairer_says_so(tmp_path: Path, lab: Lab) -> None:
    """The test-code defense registers a policy only: its rounds are not repaired."""
    import tests.plugins.mirror_defense  # noqa: F401  (registers mirror-check)

    sessions = lab_store(tmp_path, lab, defense="mirror-check")
    quarantine_lab(sessions, lab, 20)
    with pytest.raises(UserError, match="'mirror-check' has no repairer"):
        run_repair_round(
            sessions=sessions,
            store=tmp_path,
            round_no=1,
            valid=make_blobs(200, shape=(28, 28, 1), classes=4, seed=21),
            cfg=CFG,
        )
