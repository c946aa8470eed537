"""Tables for the terminal and PNG plots for people: the CA/ASR grid heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table


def grid_table(
    rows: Sequence[dict[str, float]],
    *,
    chosen: tuple[float, float],
    threshold: float,
    margin_se: float = 0.0,
) -> Table:
    """One row per candidate: alpha, gamma, lr, estimated CA (+- its drop's standard error),
    whether it qualifies under the rule, seconds; the chosen one starred."""
    margin = f", margin {margin_se:g} SE" if margin_se else ""
    table = Table(title=f"GoodNet candidates (CA threshold {100 * threshold:.2f}%{margin})")
    for name in ("alpha", "gamma", "lr", "CA %", "+- SE", "qualifies", "s"):
        table.add_column(name, justify="right")
    for r in rows:
        star = " *" if (r["alpha"], r["gamma"]) == chosen else ""
        se = r.get("drop_se", 0.0)
        table.add_row(
            f"{r['alpha']:g}x",
            f"{r['gamma']:.1f}",
            f"{r['lr']:.2g}",
            f"{100 * r['clean_accuracy']:.2f}{star}",
            f"{100 * se:.2f}",
            "yes" if r["clean_accuracy"] - margin_se * se >= threshold - 1e-12 else "no",
            f"{r['seconds']:.1f}",
        )
    return table


def grid_heatmap(
    values: dict[tuple[float, float], float],
    path: Path,
    *,
    title: str,
    chosen: tuple[float, float] | None = None,
    cmap: str = "viridis",
) -> Path:
    """A gamma x alpha heatmap of percentages (as the paper's Figure 4), chosen cell starred."""
    alphas = sorted({a for a, _ in values})
    gammas = sorted({g for _, g in values})
    grid = np.full((len(gammas), len(alphas)), np.nan)
    for (a, g), v in values.items():
        grid[gammas.index(g), alphas.index(a)] = 100 * v
    fig, ax = plt.subplots(
        figsize=(max(4.5, 1.2 + 0.9 * len(alphas)), max(2.5, 1.0 + 0.5 * len(gammas)))
    )
    im = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower", vmin=0, vmax=100)
    for i, g in enumerate(gammas):
        for j, a in enumerate(alphas):
            mark = "*" if chosen == (a, g) else ""
            ax.text(
                j,
                i,
                f"{grid[i, j]:.1f}{mark}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if grid[i, j] < 60 else "black",
            )
    ax.set_xticks(range(len(alphas)), [f"{a:g}x" for a in alphas])
    ax.set_yticks(range(len(gammas)), [f"{g:.1f}" for g in gammas])
    ax.set_xlabel("learning rate alpha (x base)")
    ax.set_ylabel("noise fraction gamma")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trigger_figure(
    clean: np.ndarray,
    translated: np.ndarray,
    quarantined: np.ndarray,
    path: Path,
    made_by: str = "gen_ab",
) -> Path:
    """Rows: clean images, their triggered copies (``made_by``: gen_ab, or the "stamp" found
    in the quarantine), quarantined examples; beside them the mean difference copy - clean
    over the shown images (the recovered trigger)."""
    n = len(clean)
    fig, axes = plt.subplots(3, n + 1, figsize=(1.3 * (n + 1), 4.2))
    grey = clean.shape[-1] == 1

    def show(ax: plt.Axes, img: np.ndarray, **kw: object) -> None:
        ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, **kw)  # type: ignore[arg-type]
        ax.set_xticks([])
        ax.set_yticks([])

    for row, (name, images) in enumerate(
        (("clean", clean), (f"{made_by}(clean)", translated), ("quarantined", quarantined))
    ):
        axes[row, 0].set_ylabel(name, fontsize=8)
        for i in range(n):
            if i < len(images):
                show(axes[row, i], images[i], vmin=0, vmax=255)
            else:
                axes[row, i].axis("off")
    diff = (translated.astype(float) - clean.astype(float)).mean(axis=0)
    show(axes[0, n], np.abs(diff).mean(axis=-1, keepdims=True) if not grey else np.abs(diff))
    axes[0, n].set_title("mean |diff|", fontsize=8)
    axes[1, n].axis("off")
    axes[2, n].axis("off")
    fig.suptitle(f"Recovered trigger: what {made_by} adds to clean images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reversed_trigger_figure(
    mask: np.ndarray, pattern: np.ndarray, path: Path, target: int, l1: float
) -> None:
    """One Neural Cleanse class: its mask, its pattern, and the two laid together."""
    gray = pattern.shape[-1] == 1
    shown = pattern[..., 0] if gray else pattern
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.3))
    panels = [
        (mask, "mask"),
        (shown, "pattern"),
        (mask[..., None] * pattern if not gray else mask * shown, "mask x pattern"),
    ]
    for ax, (img, title) in zip(axes, panels, strict=True):
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"class {target}: mask L1 {l1:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
