"""Ray's token authentication stays on unless the environment says otherwise.

Ray reads ``RAY_AUTH_MODE`` when it is first imported, so this default must be in place
before anything imports ray: each console script calls :func:`token_auth_by_default` before
its other imports. ``make test`` sets ``RAY_AUTH_MODE=disabled`` for its one shared cluster.
"""

from __future__ import annotations

import os


def token_auth_by_default() -> None:
    """Token authentication for every Ray cluster this process starts or joins, unless
    ``RAY_AUTH_MODE`` is set (anyone who reaches an open Ray port can run code)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
