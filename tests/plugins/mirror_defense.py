"""A defense that lives in test code: the whole of what adding one takes.

``mirror-check``: answer the BadNet's label unless the GoodNet, run on the input mirrored left
to right (a transformed batch, one forward), disagrees; then answer null and flag it. It
exists to show the registry and the policy seam host a new defense with no other change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from core.defenses import Defense, Members, Verdict, register_defense


class MirrorCheckPolicy:
    """BadNet's label; null and suspect when the GoodNet on the mirrored input disagrees."""

    name: ClassVar[str] = "mirror-check"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.runs = 0

    def decide(self, members: Members) -> Verdict:
        bad = members.probs("badnet").argmax(1)
        mirrored = members.run("goodnet", members.images[:, :, ::-1].copy()).argmax(1)
        suspect = (bad != mirrored).tolist()
        return Verdict([None if s else int(b) for b, s in zip(bad, suspect, strict=True)], suspect)


MIRROR_CHECK = register_defense(
    Defense(
        name="mirror-check",
        summary="test-only: the BadNet's answer, withheld when the GoodNet on the mirror disagrees",
        policy=MirrorCheckPolicy,
    )
)
