"""Defenses as named stacks (DESIGN.md): the registry, the policy seam, and the built-ins.

Importing this package registers the built-in defenses; adding one is a module that calls
:func:`register_defense`, imported below (or named in ``BQG_DEFENSE_MODULES``).
"""

from core.defenses import bbd, nnoculation, strip
from core.defenses.policy import Decision, Members, Policy, Verdict, decide_batch, served_rates
from core.defenses.registry import (
    Defense,
    defense_names,
    get_defense,
    load_defense_modules,
    register_defense,
    with_policy,
)

__all__ = [
    "Decision",
    "Defense",
    "Members",
    "Policy",
    "Verdict",
    "bbd",
    "decide_batch",
    "defense_names",
    "get_defense",
    "load_defense_modules",
    "nnoculation",
    "register_defense",
    "served_rates",
    "strip",
    "with_policy",
]
