"""Where benchmarks put their numbers.

Each benchmark writes its raw numbers as ``docs/results/<name>.json`` (with the command,
the date, the machine and the git commit) and its human table as one section of
``docs/RESULTS.md``, rendered from that same JSON. Nothing here is typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
HEADER = """# Results

Every number here was produced by a benchmark in `benchmarks/` and is rendered from the raw
JSON beside it in `docs/results/`. Each section names the command that produced it, the
machine, the date and the git commit. Do not edit numbers by hand: rerun the command.
"""


def machine() -> str:
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cores} CPU cores, {gpu}, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            # the results the benchmarks write themselves do not make the code dirty
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!docs/results",
                ":!docs/RESULTS.md",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict[str, str]:
    return {
        "command": " ".join(
            [
                "python",
                "-m",
                sys.modules["__main__"].__spec__.name
                if sys.modules["__main__"].__spec__
                else sys.argv[0],
                *sys.argv[1:],
            ]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": git_commit(),
    }


def publish(name: str, data: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> Path:
    """Write ``data`` as JSON, then (re)place this benchmark's section of RESULTS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    saved = json.loads(path.read_text())  # render from what was written, not from memory
    prov = saved["provenance"]
    section = (
        f"<!-- begin {name} -->\n"
        f"{render(saved).rstrip()}\n\n"
        f"Command: `{prov['command']}`  \n"
        f"Machine: {prov['machine']}  \n"
        f"Date: {prov['date']}, commit `{prov['commit']}`. Raw numbers: `docs/results/{name}.json`.\n"
        f"<!-- end {name} -->\n"
    )
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else HEADER
    pattern = re.compile(
        rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n", re.S
    )
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    RESULTS_MD.write_text(text)
    return path


def checks_line(checks: dict[str, bool]) -> str:
    """``name: PASS, name: FAIL`` for a benchmark's goals."""
    return ", ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in checks.items())


def trigger_images(rows: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> list[str]:
    """Markdown images of the rows' recovered-trigger PNGs (those that have one)."""
    return [f"![{label(r)}](results/{r['trigger_png']})" for r in rows if "trigger_png" in r]


def defender_data(*splits: str) -> tuple[Any, dict[str, Any], int]:
    """A benchmark's start: settings, the defender's Fashion-MNIST splits, torch threads."""
    from core.settings import Settings
    from trainer.data import load_fashion_mnist
    from trainer.loop import set_threads

    settings = Settings()
    threads = set_threads(settings.threads)
    data = {s: load_fashion_mnist(settings.fashion_mnist_dir, s) for s in splits}
    return settings, data, threads
