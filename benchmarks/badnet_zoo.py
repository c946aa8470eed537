"""The BadNet zoo: fabricate all eight lab attacks on Fashion-MNIST beside a clean model.

    python -m benchmarks.badnet_zoo [--epochs 6] [--out var/zoo]

Acceptance (issue 2): every BadNet has CA >= clean CA - 1.5 points and ASR >= 95% on each
firing trigger; the trigger combination fires with both patches (>= 95%) and not with
either alone (<= 10%); each BadNet trains in <= 5 minutes on 2 CPU cores. The bundles are
kept in ``--out`` for the later benchmarks (pre-deployment, repair).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.results import RESULTS_DIR, provenance, publish
from core.bundle import load_bundle
from core.settings import Settings
from trainer.attacks.poison import (
    ATTACKS,
    attack_success_rates,
    build_attack,
    conditional_success_rates,
)
from trainer.data import load_fashion_mnist
from trainer.lab import CLEAN, fabricate
from trainer.loop import FitConfig, set_threads

NAME = "badnet_zoo"
TARGET = 0
CA_MARGIN, ASR_MIN, COVER_MAX, SECONDS_MAX = 0.015, 0.95, 0.10, 300.0


def run(epochs: int, out: Path, attacks: list[str]) -> dict[str, Any]:
    settings = Settings()
    started = provenance()  # the commit and time the run began with
    threads = set_threads(settings.threads)
    train = load_fashion_mnist(settings.fashion_mnist_dir, "train")
    heldout = load_fashion_mnist(settings.fashion_mnist_dir, "heldout")
    cfg = FitConfig(epochs=epochs)
    rows: list[dict[str, Any]] = []
    for name in [CLEAN, *attacks]:
        start = time.perf_counter()
        result = fabricate(
            train=train,
            heldout=heldout,
            attack_name=name,
            target=TARGET,
            out=out / name,
            fit_config=cfg,
            overwrite=True,
        )
        seconds = time.perf_counter() - start
        print(
            f"{name:14s} CA {100 * result.clean_accuracy:6.2f}  ASR {result.asr}  {seconds:.0f}s",
            flush=True,
        )
        rows.append(
            {
                "attack": name,
                "ca": result.clean_accuracy,
                "asr": result.asr,
                "seconds": seconds,
                "train_seconds": result.seconds,
                "params": result.manifest.meta["attack"],
            }
        )
    clean = load_bundle(out / CLEAN)
    clean_ca = rows[0]["ca"]
    for row in rows[1:]:
        attack = build_attack(
            row["attack"],
            target=TARGET,
            num_classes=10,
            image_shape=train.image_shape,
            seed=cfg.seed,
        )
        row["clean_model_asr"] = attack_success_rates(clean.predict, heldout, attack)
        badnet = load_bundle(out / row["attack"])
        row["asr_given_clean_correct"] = conditional_success_rates(badnet.predict, heldout, attack)
        groups = {g["name"]: g["fires"] for g in row["params"]["groups"]}
        firing = [row["asr"][g] for g, fires in groups.items() if fires]
        covers = [row["asr"][g] for g, fires in groups.items() if not fires]
        row["checks"] = {
            "ca_within_1.5": row["ca"] >= clean_ca - CA_MARGIN,
            "asr_at_least_95": min(firing) >= ASR_MIN,
            "time_at_most_5min": row["seconds"] <= SECONDS_MAX,
        }
        if row["attack"] == "combo":
            row["checks"]["single_patch_at_most_10"] = max(covers) <= COVER_MAX
        if row["attack"] == "all-to-all":  # raw ASR is capped by per-class CA; see render()
            cond = [row["asr_given_clean_correct"][g] for g, fires in groups.items() if fires]
            row["checks"]["asr_given_clean_correct_at_least_95"] = min(cond) >= ASR_MIN
    plot_triggers(heldout.x, heldout.y, attacks, train.image_shape, RESULTS_DIR / f"{NAME}.png")
    return {
        "provenance": started,
        "threads": threads,
        "fit": cfg.to_dict(),
        "target": TARGET,
        "clean_ca": clean_ca,
        "rows": rows,
        "plot": f"results/{NAME}.png",
    }


def plot_triggers(
    x: np.ndarray, y: np.ndarray, attacks: list[str], shape: tuple[int, int, int], path: Path
) -> None:
    """One triggered example per attack, all from the same held-out image."""
    index = int(np.flatnonzero(y == 7)[0])  # a sneaker: a clear object with free corners
    image = x[index : index + 1]
    panels = [("clean", image[0])]
    rng = np.random.default_rng(0)
    for name in attacks:
        attack = build_attack(name, target=TARGET, num_classes=10, image_shape=shape)
        panels.append((name, attack.firing[0].apply(image, rng)[0]))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.0))
    for ax, (title, img) in zip(axes, panels, strict=True):
        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(data: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [
        "## BadNet zoo (issue 2)",
        "",
        f"Fashion-MNIST, `fmnist-cnn`, {data['fit']['epochs']} epochs of Adam (lr {data['fit']['lr']}), "
        f"target class {data['target']}, {data['threads']} threads. CA and ASR are on the "
        "5,000-image held-out split. ASR counts triggered held-out images whose true class is not the "
        "target (all-to-all: y -> y+1). Cover triggers (combo single patches, WaNet noise) are trained "
        "with true labels; for them a low rate is the goal.",
        "",
        "| model | poisoned % | CA % | ASR % per trigger | ASR % among inputs classified correctly when clean | clean model's rate on the same triggers % | train+eval s | checks |",
        "|---|---|---|---|---|---|---|---|",
        f"| clean | 0 | {pct(data['clean_ca'])} | - | - | - | {data['rows'][0]['seconds']:.0f} | - |",
    ]
    for row in data["rows"][1:]:
        asr = ", ".join(f"{k} {pct(v)}" for k, v in row["asr"].items())
        base = ", ".join(f"{k} {pct(v)}" for k, v in row["clean_model_asr"].items())
        cond = ", ".join(f"{k} {pct(v)}" for k, v in row["asr_given_clean_correct"].items())
        checks = ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in row["checks"].items())
        lines.append(
            f"| {row['attack']} | {pct(row['params']['poison_rate'])} | {pct(row['ca'])} | {asr} | {cond} | {base} | {row['seconds']:.0f} | {checks} |"
        )
    lines += [
        "",
        "All-to-all maps y to y+1, so the model must first recognise y: its raw ASR cannot exceed the "
        "BadNet's per-class clean accuracy (about 70% on shirts, about 80% on pullovers). The "
        "fourth column removes that ceiling by counting only inputs the BadNet labels correctly "
        "when clean; the 95% goal on the raw ASR is not reachable for all-to-all at this CA.",
        "",
        f"![one triggered example per attack]({data['plot']})",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("var/zoo"))
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    args = parser.parse_args()
    data = run(args.epochs, args.out, args.attacks)
    path = publish(NAME, data, render)
    failed = [(r["attack"], k) for r in data["rows"][1:] for k, ok in r["checks"].items() if not ok]
    print(f"wrote {path} and docs/RESULTS.md; failed checks: {failed or 'none'}")


if __name__ == "__main__":
    main()
