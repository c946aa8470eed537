"""``trainer``: the operator's command line (typer).

Bad input ends with one line on stderr saying what to fix, and exit status 2. Any other
exception is a bug and keeps its traceback. The commands live by topic in this package.
"""

from __future__ import annotations

from core.ray_auth import token_auth_by_default

token_auth_by_default()  # before any module below imports ray

from core.errors import UserError
from trainer.cli import lab, prepare, rounds
from trainer.cli.common import app, err_console

__all__ = ["app", "lab", "main", "prepare", "rounds"]


def main() -> None:
    """Console-script entry: user errors become one line and exit status 2."""
    try:
        app()
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
