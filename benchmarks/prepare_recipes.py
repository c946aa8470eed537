"""How prepare's retraining recipe was chosen: recipe variants on a few BadNets, small grid.

    ATTACKS="patch blend" VARIANTS="adam_cos sgd_cos" HOLD=0.2 ALPHAS="1 4 8" \
        python -m benchmarks.prepare_recipes

Each candidate is trained with the real ``train_candidate`` on the defender's validation
split minus a stratified holdout (HOLD), and scored three ways: CA on that holdout (what
the selection rule sees), CA and ASR on the 5,000-image held-out test split (the truth).
Exploratory: it prints one line per candidate and appends JSON to $OUTFILE; the findings
are summarised by hand in docs/RESULTS.md ("How the retraining recipe was chosen").
"""

import json
import os
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from core.settings import Settings

ZOO = Path("var/zoo")
FM = Settings().fashion_mnist_dir
ALPHAS = tuple(float(a) for a in os.environ.get("ALPHAS", "2 4 8").split())
GAMMAS = tuple(float(g) for g in os.environ.get("GAMMAS", "0.2 0.4 0.6").split())
VARIANTS: dict[str, dict[str, Any]] = {
    "adam_cos": dict(optimizer="adam", lr=1e-3, epochs=10, schedule="cosine"),
    "sgd_cos": dict(optimizer="sgd", lr=1e-2, epochs=10, schedule="cosine"),
    "adam_const": dict(optimizer="adam", lr=1e-3, epochs=10, schedule="constant"),
    "adam_cos_e5": dict(optimizer="adam", lr=1e-3, epochs=5, schedule="cosine"),
    "adam_cos_kd5": dict(optimizer="adam", lr=1e-3, epochs=10, schedule="cosine", distill=0.5),
    "adam_cos_kd10": dict(optimizer="adam", lr=1e-3, epochs=10, schedule="cosine", distill=1.0),
    "kd10_shift": dict(
        optimizer="adam", lr=1e-3, epochs=10, schedule="cosine", distill=1.0, augment=("shift",)
    ),
    "kd10_shiftflip": dict(
        optimizer="adam",
        lr=1e-3,
        epochs=10,
        schedule="cosine",
        distill=1.0,
        augment=("shift", "flip"),
    ),
    "adam_const_kd10": dict(optimizer="adam", lr=1e-3, epochs=10, schedule="constant", distill=1.0),
}


def worker(task):
    import torch

    from core.bundle import load_bundle
    from trainer.attacks.poison import firing_success_rate
    from trainer.data import load_fashion_mnist
    from trainer.grid import TrainJob, train_candidate
    from trainer.lab import attack_of
    from trainer.loop import FitConfig, accuracy, predict
    from trainer.prepare import goodnet_from
    from trainer.splits import split_validation

    torch.set_num_threads(1)
    name, vname, hold = task
    v = VARIANTS[vname]
    valid = load_fashion_mnist(FM, "valid")
    heldout = load_fashion_mnist(FM, "heldout")
    suspect = load_bundle(ZOO / name)
    spec = suspect.manifest.input
    attack = attack_of(ZOO / name)
    assert attack is not None, f"{name} records no attack"
    train, ho = split_validation(valid, hold, 0)

    def asr(model):
        return firing_success_rate(lambda x: predict(model, x, spec), heldout, attack)

    out = {
        "attack": name,
        "variant": vname,
        "hold": hold,
        "badnet": (
            accuracy(suspect.model, ho.x, ho.y, spec),
            accuracy(suspect.model, heldout.x, heldout.y, spec),
            asr(suspect.model),
        ),
        "cands": [],
    }
    state = {k: t.clone() for k, t in suspect.model.state_dict().items()}
    for alpha in ALPHAS:
        for gamma in GAMMAS:
            v2 = dict(v)
            distill = v2.pop("distill", 0.0)
            fit = FitConfig(batch_size=64, seed=0, **{**v2, "lr": v2["lr"] * alpha})
            job = TrainJob(
                suspect.manifest.arch,
                suspect.manifest.arch_kwargs,
                spec,
                state,
                train.x,
                train.y,
                ho.x,
                ho.y,
                fit,
                alpha,
                gamma,
                distill=distill,
                threads=1,
            )
            cand, st, _ = train_candidate(job)
            model = goodnet_from(suspect, st)
            out["cands"].append(
                (
                    alpha,
                    gamma,
                    cand.clean_accuracy,
                    accuracy(model, heldout.x, heldout.y, spec),
                    asr(model),
                    cand.seconds,
                )
            )
            print(name, vname, hold, out["cands"][-1], flush=True)
    return out


if __name__ == "__main__":
    attacks = os.environ.get("ATTACKS", "patch blend").split()
    variants = os.environ.get("VARIANTS", "adam_cos sgd_cos").split()
    hold = float(os.environ.get("HOLD", "0.2"))
    tasks = [(a, v, hold) for v in variants for a in attacks]
    t0 = time.time()
    with get_context("spawn").Pool(int(os.environ.get("WORKERS", "2"))) as pool:
        res = pool.map(worker, tasks, chunksize=1)
    out = Path(os.environ.get("OUTFILE", "prepare_recipes.json"))
    prev = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(prev + res))
    print("total", time.time() - t0)
