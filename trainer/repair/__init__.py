"""Post-deployment repair rounds: the generic runner and NNoculation's CycleGAN repairer.

- ``config``: the run's hyperparameters (``RepairConfig``);
- ``selection``: which quarantined samples a round learns from;
- ``treatment``: clean images carrying each learned trigger;
- ``finetune``: the members' fine-tuning;
- ``nnoculation``: the CycleGAN repairer that composes them;
- ``gate``: may a candidate pair replace the one that serves;
- ``runner``: claim -> repair -> gate -> publish, for every repairer.
"""

from trainer.repair.base import Repaired, Repairer, RoundContext
from trainer.repair.config import RepairConfig, load_repair_config, with_preset
from trainer.repair.gate import describe_gate, gate_round
from trainer.repair.runner import RepairOutcome, run_claimed_round, run_repair_round
from trainer.repair.selection import confident_mask

__all__ = [
    "RepairConfig",
    "RepairOutcome",
    "Repaired",
    "Repairer",
    "RoundContext",
    "confident_mask",
    "describe_gate",
    "gate_round",
    "load_repair_config",
    "run_claimed_round",
    "run_repair_round",
    "with_preset",
]
