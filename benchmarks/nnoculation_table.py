"""The NNoculation evaluation through the live gateway (issue 8): Table 5, Figure 4c, Table 8.

    python -m benchmarks.nnoculation_table [--zoo var/zoo] [--work var/table]
        [--attacks patch ...] [--sweep 0.02 0.06 0.5] [--sequential multi-target]
        [--prepare grid|one] [--threshold 200] [--preset fast]

For each BadNet of the zoo (``python -m benchmarks.badnet_zoo`` fabricates them):
1. Round 0: ``prepare_round_zero`` in a fresh SQLite store (``--prepare one``: the single
   candidate alpha 2, gamma 0.3, instead of the default grid; about 40 s against 3 minutes).
2. A local Ray with the gateway app and the repair watcher: ``local_gateway``, the code
   ``gateway serve`` and ``gateway demo`` run.
3. The attacker: the stream split (looped, each pass stamped afresh) with a fraction p
   triggered (default 10%), sent over HTTP until the gateway answers from round 1, and
   ``AFTER`` requests more for the quarantine-rate plot. The watcher repairs on its own at N
   pending samples and the replicas hot-swap.
4. CA and ASR on the held-out split through the gateway's HTTP answers: a second Serve app
   (``/shadow``) serves a copy of the store's database, taken at each stage, so held-out
   traffic never feeds the live quarantine. "BadNet alone" is the suspect bundle's own
   answers (the gateway never serves it alone).
5. Quarantine precision and recall over the requests served by the previous round, the
   precision of the samples the round consumed, the requests until the swap, the round's
   wall time, and per trigger the clean-to-target rate (untriggered held-out images whose
   true class is not the target, answered with the target): the floor under ASR.

The sweep (Figure 4c) runs the patch BadNet's round 0 again at other poison fractions (its
10% point is the table's patch run). The sequential attacker (Table 8) streams triggers 1
and 2 of the multi-target BadNet until round 1, then trigger 3 until round 2.
Goal (better than the paper): final ASR <= 2% with a CA drop <= 2 points, every attack.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from benchmarks.results import RESULTS_DIR, checks_line, defender_data, provenance, publish
from core.bundle import load_bundle
from core.db import open_store, session_factory
from core.defenses import decide_batch, with_policy
from core.errors import UserError
from core.images import encode_png
from core.pair import load_round_pair
from core.quarantine import list_rounds
from core.settings import Settings
from gateway.config import GatewayArgs
from local.demo import Traffic, stream_until_swap
from trainer.attacks.poison import Attack, TriggerGroup, attack_success_rates, attacker_stream
from trainer.cyclegan import DEFAULT_PRESET
from trainer.data import Dataset
from trainer.lab import attack_of
from trainer.prepare import PrepareConfig, prepare_round_zero
from trainer.repair import RepairConfig, with_preset
from trainer.strip import StripConfig, prepare_strip_round

NAME = "nnoculation_table"


def result_name(preset: str) -> str:
    """The run's name in docs/results: the default preset's table is the headline one, and
    a run with another preset gets files and a RESULTS.md section of its own."""
    return NAME if preset == DEFAULT_PRESET else f"{NAME}_{preset}"


ATTACKS = [
    "patch",
    "all-to-all",
    "multi-trigger",
    "multi-target",
    "combo",
    "filter",
    "blend",
    "warp",
]
ASR_GOAL, CA_DROP_GOAL = 0.02, 2.0
AFTER = 1000  # requests streamed after the swap, for the quarantine-rate plot
PASSES = 4  # the 4,000-image stream split, stamped afresh on each pass
REPAIR_RATE = 2.0  # requests/s while a round trains (it has the 2 cores), so that few
# samples wait when the round lands: the next round then learns from the next traffic
BATCH = 64  # instances per KServe request when measuring
ONE_CANDIDATE = PrepareConfig(alphas=(2.0,), gammas=(0.3,), ca_drop=100.0)
# The paper's own row (NNoculation, Table 5, MNIST-AAA), typed from the paper for reference.
PAPER_MNIST_AAA = {"badnet": (97.76, 95.91), "pre": (95.3, 0.0), "post": (96.21, 0.0)}


@dataclass(frozen=True)
class Phase:
    """One stretch of the attacker's stream, and the round it should bring."""

    images: NDArray[Any]
    groups: Sequence[TriggerGroup]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite store (the backup API, not a file copy)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


class HttpModel:
    """``predict(x)`` through a gateway's KServe endpoint, ``BATCH`` images a request."""

    def __init__(self, url: str, model_name: str, clients: int = 4) -> None:
        self.url = f"{url}/v1/models/{model_name}:predict"
        self.clients = clients
        self.rounds: set[int] = set()
        self.requests = 0

    def _post(self, chunk: NDArray[Any]) -> list[dict[str, Any]]:
        import base64

        body = {"instances": [{"b64": base64.b64encode(encode_png(i)).decode()} for i in chunk]}
        r = httpx.post(self.url, json=body, timeout=120)
        r.raise_for_status()
        predictions: list[dict[str, Any]] = r.json()["predictions"]
        return predictions

    def predict(self, x: NDArray[Any]) -> NDArray[Any]:
        chunks = [x[i : i + BATCH] for i in range(0, len(x), BATCH)]
        with ThreadPoolExecutor(self.clients) as pool:
            answers = [a for part in pool.map(self._post, chunks) for a in part]
        self.requests += len(chunks)
        self.rounds.update(a["round"] for a in answers)
        return np.array([-1 if a["label"] is None else a["label"] for a in answers])


def floors(clean_pred: NDArray[Any], heldout: Dataset, attack: Attack) -> dict[str, float]:
    """Per firing group: clean held-out images, true class not the target, answered with it."""
    out = {}
    for g in attack.firing:
        targets = g.target_of(heldout.y, attack.num_classes)
        mask = targets != heldout.y
        out[g.name] = float((clean_pred[mask] == targets[mask]).mean())
    return out


def measure(
    predict: Callable[[NDArray[Any]], NDArray[Any]], heldout: Dataset, attack: Attack
) -> dict[str, Any]:
    clean = predict(heldout.x)
    asr = attack_success_rates(predict, heldout, attack)
    return {
        "clean_answers": clean,
        "ca": float((clean == heldout.y).mean()),
        "asr": float(np.mean([asr[g.name] for g in attack.firing])),
        "asr_by_trigger": asr,
        "floor": floors(clean, heldout, attack),
    }


def through_shadow(
    url: str, store: Path, shadow: Path, round_no: int, heldout: Dataset, attack: Attack
) -> dict[str, Any]:
    """Measure the round the live store has active, on a Serve app over a copy of it."""
    from ray import serve

    from gateway.app import build_app

    copy_db(store / "quarantine.db", shadow / "quarantine.db")
    args = GatewayArgs(store=str(shadow))
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.run(build_app(args), name="shadow", route_prefix="/shadow", logging_config=quiet)
    try:
        model = HttpModel(f"{url}/shadow", args.settings().model_name)
        start = time.perf_counter()
        row = measure(model.predict, heldout, attack)
        if model.rounds != {round_no}:
            raise RuntimeError(f"the shadow answered from rounds {model.rounds}, not {round_no}")
        sessions = session_factory(open_store(args.settings().db_url))
        with sessions() as s:
            pair = with_policy(load_round_pair(s, round_no))
        # The same answers from the policy code, offline: a check on the HTTP path.
        assert pair.policy is not None
        offline = np.array(
            [-1 if d.label is None else d.label for d in decide_batch(pair, heldout.x, pair.policy)]
        )
        clean = row.pop("clean_answers")
        row |= {
            "stage": f"round {round_no}",
            "http_requests": model.requests,
            "http_seconds": time.perf_counter() - start,
            "offline_agreement": float((offline == clean).mean()),
        }
    finally:
        serve.delete("shadow")
    print(
        f"  round {round_no} through the gateway: CA {100 * row['ca']:.2f}  ASR "
        f"{100 * row['asr']:.2f}  ({row['http_requests']} requests, {row['http_seconds']:.0f} s)",
        flush=True,
    )
    return row


class Every:
    """A status-line sink for logs: one line per ``seconds`` instead of a redrawn line."""

    def __init__(self, seconds: float = 20.0) -> None:
        self.seconds, self.last = seconds, 0.0

    def write(self, text: str) -> None:
        now = time.monotonic()
        if text.strip() and now - self.last >= self.seconds:
            self.last = now
            print("  " + text.strip(), flush=True)

    def flush(self) -> None:
        pass


def stream_of(images: NDArray[Any], groups: Sequence[TriggerGroup], p: float) -> Any:
    parts = [attacker_stream(images, groups, p, seed) for seed in range(PASSES)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([m for _, m in parts])


def round_record(
    sessions: Any, store: Path, round_no: int, traffic: Traffic, poisoned: set[str]
) -> dict[str, Any]:
    """What round ``round_no`` did, and how well the previous round's quarantine worked."""
    from sqlalchemy import select

    from core.schema import QuarantineSample
    from trainer.rounds import round_dir

    with sessions() as s:
        r = next(r for r in list_rounds(session=s) if r.round == round_no)
        used = s.scalars(
            select(QuarantineSample.pixel_sha256).where(
                QuarantineSample.consumed_by_round == round_no
            )
        ).all()
        status, metrics = r.status, dict(r.metrics or {})
    served = [e for e in traffic.log if e[2] == round_no - 1]
    triggered = sum(e[0] for e in served)
    suspect = sum(e[1] for e in served)
    both = sum(e[0] and e[1] for e in served)
    pngs = sorted(round_dir(store, round_no).glob("trigger*.png"))
    return {
        "round": round_no,
        "status": status,
        "seconds": float(metrics.get("seconds", 0.0)),
        "cyclegan_seconds": float(metrics.get("cyclegan_seconds", 0.0)),
        "samples": len(used),
        "samples_triggered": sum(h in poisoned for h in used),
        "kept": metrics.get("samples_kept"),
        "trigger_groups": metrics.get("trigger_groups"),
        "requests_until_swap": traffic.swapped_after,
        "errors": traffic.errors,
        "precision": both / max(suspect, 1),
        "recall": both / max(triggered, 1),
        "pngs": [str(p) for p in pngs],
    }


def curve(traffic: Traffic, window: int = 250, every: int = 50) -> dict[str, Any]:
    """The quarantine rate over the stream: suspect share of the last ``window`` answers."""
    log = np.array(traffic.log, dtype=np.int64).reshape(-1, 3)
    if not len(log):
        return {"x": [], "suspect": [], "triggered": [], "round": []}
    cum = np.cumsum(log[:, :2], axis=0)
    ends = np.arange(window, len(log) + 1, every)
    starts = ends - window
    pad = np.vstack([np.zeros((1, 2), np.int64), cum])
    rate = (pad[ends] - pad[starts]) / window
    return {
        "x": ends.tolist(),
        "triggered": rate[:, 0].tolist(),
        "suspect": rate[:, 1].tolist(),
        "round": log[ends - 1, 2].tolist(),
    }


@dataclass
class Options:
    work: Path
    prepare: PrepareConfig
    threshold: int
    preset: str
    timeout: float
    clients: int = 8
    rate: float = 80.0
    repair_rate: float = REPAIR_RATE
    defense: str = "nnoculation"  # codefend: round 0 fits STRIP beside the suspect alone
    strip: StripConfig | None = None


def one_run(
    label: str,
    zoo_dir: Path,
    data: dict[str, Dataset],
    phases: Sequence[Phase],
    poison: float,
    opts: Options,
    round0_from: Path | None = None,
) -> dict[str, Any]:
    """Round 0, then the live gateway through ``phases``; rates at every stage."""
    from core.quarantine import pixel_sha256
    from local.cli import local_gateway

    attack = attack_of(zoo_dir)
    assert attack is not None
    run_dir = opts.work / label
    shutil.rmtree(run_dir, ignore_errors=True)
    store = run_dir / "store"
    store.mkdir(parents=True)
    heldout = data["heldout"]
    print(f"== {label}: {zoo_dir}, {100 * poison:g}% of the stream triggered", flush=True)
    suspect = load_bundle(zoo_dir)
    alone = measure(suspect.predict, heldout, attack)
    del alone["clean_answers"]
    result: dict[str, Any] = {
        "label": label,
        "attack": attack.name,
        "poison": poison,
        "stages": [{"stage": "BadNet alone"} | alone],
        "rounds": [],
        "curves": [],
    }
    start = time.perf_counter()
    if round0_from is None:
        sessions = session_factory(open_store(f"sqlite:///{store / 'quarantine.db'}"))
        if opts.defense == "nnoculation":
            prepare_round_zero(
                suspect_dir=zoo_dir,
                suspect=suspect,
                valid=data["valid"],
                cfg=opts.prepare,
                sessions=sessions,
                store=store,
            )
        else:
            prepare_strip_round(
                defense=opts.defense,
                suspect_dir=zoo_dir,
                suspect=suspect,
                valid=data["valid"],
                strip=opts.strip or StripConfig(),
                sessions=sessions,
                store=store,
            )
        copy_db(store / "quarantine.db", run_dir / "round0.db")
    else:
        copy_db(round0_from, store / "quarantine.db")
        sessions = session_factory(open_store(f"sqlite:///{store / 'quarantine.db'}"))
    result["prepare_seconds"] = time.perf_counter() - start
    env = Settings()
    settings = env.model_copy(
        update={
            "store": store,
            "quarantine_threshold": opts.threshold,
            "http_port": free_port(),
            "metrics_port": free_port(),
            "watcher_metrics_port": free_port(),
        }
    )
    url = f"http://{settings.http_host}:{settings.http_port}"
    with local_gateway(
        GatewayArgs(store=str(store)),
        settings,
        settings.http_host,
        settings.http_port,
        watch=True,
        watcher_cfg=with_preset(RepairConfig(), opts.preset),
        quiet=True,
    ):

        def stage(k: int) -> dict[str, Any]:
            return through_shadow(url, store, run_dir / f"shadow{k}", k, heldout, attack)

        result["stages"].append(stage(0))
        for k, phase in enumerate(phases, start=1):
            x, poisoned = stream_of(phase.images, phase.groups, poison)
            keys = {pixel_sha256(img) for img in x[poisoned]}
            try:
                traffic = stream_until_swap(
                    url,
                    x,
                    poisoned,
                    sessions,
                    threshold=opts.threshold,
                    clients=opts.clients,
                    rate=opts.rate,
                    timeout=opts.timeout,
                    serving_round=k - 1,
                    after=AFTER,
                    repair_rate=opts.repair_rate,
                    out=Every(),
                )
            except UserError as exc:
                print(f"  no swap to round {k}: {exc}", flush=True)
                with sessions() as s:
                    result["rounds"].append(
                        {"round": k, "status": "no swap", "reason": str(exc)}
                        | {
                            "store_rounds": {
                                r.round: r.status for r in list_rounds(session=s) if r.round >= k
                            }
                        }
                    )
                break
            result["curves"].append(curve(traffic))
            result["rounds"].append(round_record(sessions, store, k, traffic, keys))
            print(f"  round {k}: {result['rounds'][-1]}", flush=True)
            result["stages"].append(stage(k))
    result["run"] = {k: v for k, v in provenance().items() if k in ("date", "commit")}
    result["run"]["preset"] = opts.preset
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(
    zoo: Path,
    attacks: list[str],
    sweep: list[float],
    sequential: str | None,
    opts: Options,
    resume: bool,
) -> dict[str, Any]:
    started = provenance()
    published = RESULTS_DIR / f"{result_name(opts.preset)}.json"
    earlier: dict[str, Any] = {}  # label -> the run that measured the published row
    if resume and published.exists():
        before = json.loads(published.read_text())
        for r in [
            *before["rows"],
            *before["sweep"],
            *([before["sequential"]] if before["sequential"] else []),
        ]:
            when = r.get("run") or before["provenance"]
            earlier[r["label"]] = {k: when[k] for k in ("date", "commit")}
    _, data, threads = defender_data("valid", "stream", "heldout")
    stream = data["stream"].x

    def go(label: str, name: str, phases: Any, poison: float, reuse: str | None = None) -> Any:
        saved = opts.work / label / "result.json"
        if resume and saved.exists():
            print(f"== {label}: kept from {saved}", flush=True)
            kept = json.loads(saved.read_text())
            measured = (kept.get("run") or {}).get("preset", opts.preset)
            if measured != opts.preset:
                raise UserError(
                    f"{saved} was measured with CycleGAN preset {measured!r}, not {opts.preset!r}: "
                    f"pass --preset {measured} to keep it, or run without --resume"
                )
            if "run" not in kept:  # measured before rows carried their own run
                kept["run"] = earlier.get(label)
                saved.write_text(json.dumps(kept, indent=2) + "\n")
            return kept
        r0 = opts.work / reuse / "round0.db" if reuse else None
        if r0 is not None and not r0.exists():
            r0 = None  # no earlier round 0 to reuse: prepare one
        return one_run(label, zoo / name, data, phases(attack_of(zoo / name)), poison, opts, r0)

    for name in [*attacks, *([sequential] if sequential else [])]:
        if attack_of(zoo / name) is None:
            raise UserError(f"{zoo / name} is not a BadNet; run 'python -m benchmarks.badnet_zoo'")

    def everything(a: Attack) -> list[Phase]:
        return [Phase(stream, a.firing)]

    rows = [go(name, name, everything, 0.10) for name in attacks]
    sweep_rows = [
        go(f"patch-p{round(100 * p)}", "patch", everything, p, reuse="patch") for p in sweep
    ]
    half = len(stream) // 2
    seq = (
        go(
            "sequential",
            sequential,
            lambda a: [Phase(stream[:half], a.firing[:2]), Phase(stream[half:], a.firing[2:3])],
            0.10,
            reuse=sequential,
        )
        if sequential
        else None
    )
    data_out: dict[str, Any] = {
        "provenance": started,
        "threads": threads,
        "prepare": "one candidate (alpha 2, gamma 0.3)"
        if opts.prepare == ONE_CANDIDATE
        else "default grid",
        "threshold": opts.threshold,
        "preset": opts.preset,
        "passes": PASSES,
        "after": AFTER,
        "rate": opts.rate,
        "repair_rate": opts.repair_rate,
        "rows": rows,
        "sweep": sweep_rows,
        "sequential": seq,
    }
    data_out["figures"] = figures(data_out)
    data_out["checks"] = checks(rows)
    return data_out


def final(row: dict[str, Any]) -> dict[str, Any]:
    return dict(row["stages"][-1])


def checks(rows: list[dict[str, Any]]) -> dict[str, bool]:
    swapped = [r for r in rows if len(r["stages"]) > 2]
    all_swapped = len(swapped) == len(rows) == len(ATTACKS)
    return {
        "all_attacks_swapped": all_swapped,
        # repaired: the round swapped in answers the triggers less often than round 0 did
        "all_attacks_repaired": all_swapped
        and all(r["stages"][2]["asr"] < r["stages"][1]["asr"] for r in swapped),
        "final_asr_at_most_2": bool(rows) and all(final(r)["asr"] <= ASR_GOAL for r in rows),
        "ca_drop_at_most_2": bool(rows)
        and all(100 * (r["stages"][0]["ca"] - final(r)["ca"]) <= CA_DROP_GOAL for r in rows),
        # a round that was never swapped in has no swap to count failures over
        "no_request_failed": all(
            rd["errors"] == 0 for r in rows for rd in r["rounds"] if "errors" in rd
        ),
    }


def figures(data: dict[str, Any]) -> dict[str, Any]:
    """The PNGs: ASR per stage, quarantine rate over the stream, the sweep, the triggers."""
    base = result_name(data["preset"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Any] = {"triggers": {}}
    rows, sweep = data["rows"], data["sweep"]
    if rows:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        names = ["BadNet alone", "round 0", "round 1"]
        width = 0.27
        for i, stage in enumerate(names):
            values = [100 * s["asr"] for r in rows for s in r["stages"] if s["stage"] == stage]
            labels = [r["label"] for r in rows if any(s["stage"] == stage for s in r["stages"])]
            xs = [rows.index(next(r for r in rows if r["label"] == lb)) for lb in labels]
            ax.bar(np.array(xs) + (i - 1) * width, values, width, label=stage)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20)
        ax.axhline(100 * ASR_GOAL, color="k", lw=0.8, ls="--", label="goal 2%")
        ax.set_ylabel("ASR % (held-out, through the gateway)")
        ax.set_yscale("symlog", linthresh=2)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["asr"] = _save(fig, f"{base}_asr.png")
        curves = [(r["label"], c) for r in rows for c in r["curves"][:1]]
        if curves:
            cols = 4
            nrows = -(-len(curves) // cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(12, 2.6 * nrows), squeeze=False)
            for ax, (label, c) in zip(axes.flat, curves, strict=False):
                ax.plot(c["x"], [100 * v for v in c["suspect"]], label="quarantined")
                ax.plot(c["x"], [100 * v for v in c["triggered"]], lw=0.8, label="triggered")
                swap = next((x for x, k in zip(c["x"], c["round"], strict=True) if k > 0), None)
                if swap is not None:
                    ax.axvline(swap, color="r", ls="--", lw=1, label="swap to round 1")
                ax.set_title(label, fontsize=9)
                ax.set_xlabel("requests", fontsize=8)
                ax.set_ylabel("% of last 250", fontsize=8)
            axes.flat[0].legend(fontsize=7)
            for ax in list(axes.flat)[len(curves) :]:
                ax.axis("off")
            fig.tight_layout()
            out["quarantine_rate"] = _save(fig, f"{base}_quarantine_rate.png")
    patch10 = [r for r in rows if r["label"] == "patch" and r["poison"] == 0.10]
    points = sorted(
        (r for r in [*sweep, *patch10] if len(r["stages"]) > 2), key=lambda r: r["poison"]
    )
    if points:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ps = [100 * r["poison"] for r in points]
        ax.plot(ps, [100 * final(r)["ca"] for r in points], "o-", label="CA after repair")
        ax.plot(ps, [100 * final(r)["asr"] for r in points], "s-", label="ASR after repair")
        ax.plot(ps, [100 * r["stages"][1]["asr"] for r in points], "^:", label="ASR at round 0")
        ax.set_xscale("log")
        ax.set_xticks(ps, [f"{p:g}" for p in ps])
        ax.set_xlabel("poisoned share of the stream, %")
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["sweep"] = _save(fig, f"{base}_sweep.png")
    for r in [*rows, *sweep, *([data["sequential"]] if data["sequential"] else [])]:
        for rd in r["rounds"]:
            for src in rd.get("pngs", []):
                name = f"{base}_{r['label']}_round{rd['round']}_{Path(src).name}"
                if Path(src).exists():
                    shutil.copy(src, RESULTS_DIR / name)
                    out["triggers"].setdefault(r["label"], []).append(name)
    return out


def _save(fig: Any, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(RESULTS_DIR / name, dpi=110)
    plt.close(fig)
    return name


# The paper's Table 8 (BadNet-MTMTA, YouTube Face), typed from the paper for reference.
PAPER_TABLE8 = [
    ("pre-", 92.13, (30, 7.12, 13.77)),
    ("stage 1", 91.51, (0, 0, 6.67)),
    ("stage 2", 91.31, (0, 0, 0)),
]


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _asr(stage: dict[str, Any], firing: Sequence[str]) -> str:
    if len(firing) == 1:
        return _pct(stage["asr"])
    each = ", ".join(_pct(stage["asr_by_trigger"][g]) for g in firing)
    return f"{_pct(stage['asr'])} {{{each}}}"


def _runs_line(data: dict[str, Any]) -> list[str]:
    """Which commit ran which row, when ``--resume`` kept rows from an earlier run."""
    runs: dict[str, list[str]] = {}
    for r in [*data["rows"], *data["sweep"], *([data["sequential"]] if data["sequential"] else [])]:
        run = r.get("run") or data["provenance"]
        runs.setdefault(f"commit `{run['commit']}`, {run['date']}", []).append(r["label"])
    this = f"commit `{data['provenance']['commit']}`, {data['provenance']['date']}"
    if list(runs) == [this]:
        return []
    return [
        "Rows by the run that measured them (`--resume` keeps earlier runs' rows): "
        + "; ".join(f"{', '.join(labels)}: {when}" for when, labels in runs.items())
        + ".",
        "",
    ]


def _no_swap_reason(rd: dict[str, Any]) -> str:
    return str(rd.get("reason") or f"rounds in the store: {rd.get('store_rounds')}")


def _first_round(r: dict[str, Any]) -> dict[str, Any]:
    return dict(r["rounds"][0]) if r["rounds"] else {"status": "not run"}


def _firing(r: dict[str, Any]) -> list[str]:
    return list(r["stages"][0]["floor"])


def render(data: dict[str, Any]) -> str:
    rows, base = data["rows"], result_name(data["preset"])
    lines = [
        "## The NNoculation table through the live gateway (issue 8)"
        + ("" if base == NAME else f", CycleGAN preset `{data['preset']}`"),
        "",
        f"Per attack: round 0 from `prepare` ({data['prepare']}), then a local Ray with the gateway app and the "
        f"repair watcher (`gateway serve`'s code, SQLite store), and the stream split ({data['passes']} passes, each "
        f"stamped afresh) with 10% triggered inputs sent over HTTP ({data['rate']:g} requests/s, "
        f"{data['repair_rate']:g}/s while a round trains on the same 2 cores) until the watcher's round 1 (N = "
        f"{data['threshold']}, CycleGAN preset `{data['preset']}`) is hot-swapped in, and {data['after']} requests "
        "more. CA and ASR on the 5,000-image held-out split are the gateway's own HTTP answers, from a second Serve "
        "app over a copy of the store's database taken at each stage (so held-out traffic never feeds the live "
        "quarantine); `BadNet alone` is the suspect bundle's answers. For several triggers, ASR is the mean "
        "{per trigger}. The floor is the share of clean held-out images (true class not the target) that the "
        "repaired gateway answers with the target: an ASR cannot be told apart from it. Precision and recall "
        "count the requests round 0 answered (triggered and quarantined / quarantined, / triggered); "
        "`samples (triggered)` is what round 1 consumed.",
        "",
        "| BadNet | BadNet CA | BadNet ASR | pre- CA | pre- ASR | post- CA | post- ASR | CA drop | floor | "
        "precision / recall % | samples (triggered) | requests to swap | round s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st, firing = r["stages"], _firing(r)
        post = st[2] if len(st) > 2 else None
        rd = _first_round(r)
        cells = [
            r["label"],
            _pct(st[0]["ca"]),
            _asr(st[0], firing),
            _pct(st[1]["ca"]),
            _asr(st[1], firing),
        ]
        if post is None:
            why = _no_swap_reason(rd)
            cells += [f"no round 1 ({why})", "-", "-", "-", "-", "-", "-", "-"]
        else:
            cells += [
                _pct(post["ca"]),
                _asr(post, firing),
                f"{100 * (st[0]['ca'] - post['ca']):.2f}",
                ", ".join(_pct(post["floor"][g]) for g in firing),
                f"{_pct(rd['precision'])} / {_pct(rd['recall'])}",
                f"{rd['samples']} ({rd['samples_triggered']})",
                str(rd["requests_until_swap"]),
                f"{rd['seconds']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    p = PAPER_MNIST_AAA
    lines += [
        f"| MNIST-AAA (the paper's Table 5, for reference) | {p['badnet'][0]} | {p['badnet'][1]} | "
        f"{p['pre'][0]} | {p['pre'][1]} | {p['post'][0]} | {p['post'][1]} | "
        f"{p['badnet'][0] - p['post'][0]:.2f} | - | - | - | - | - |",
        "",
        checks_line(data["checks"]),
        "",
        *_runs_line(data),
    ]
    misses = [r for r in rows if len(r["stages"]) > 2 and final(r)["asr"] > ASR_GOAL]
    if misses:
        lines.append("Where the 2% goal is missed, what the round had to learn from:")
        lines.append("")
        for r in misses:
            f, rd = final(r), r["rounds"][0]
            lines.append(
                f"- {r['label']}: final ASR {_pct(f['asr'])}% against a floor of "
                f"{', '.join(_pct(v) for v in f['floor'].values())}%; round 0's quarantine was "
                f"{_pct(rd['precision'])}% triggered, round 1 consumed {rd['samples']} samples "
                f"({rd['samples_triggered']} triggered) and kept {rd['kept']} by confidence."
            )
        lines.append("")
    figs = data["figures"]
    for key, caption in (
        ("asr", "ASR per stage per attack"),
        (
            "quarantine_rate",
            "Quarantine rate over the stream (share of the last 250 answers), swap marked",
        ),
    ):
        if key in figs:
            lines += [f"![{caption}](results/{figs[key]})", ""]
    lines += _render_sweep(data) + _render_sequential(data)
    if figs["triggers"]:
        lines += [
            "Recovered triggers (clean, gen_ab(clean), quarantined examples, mean difference):",
            "",
        ]
        for label, names in figs["triggers"].items():
            lines += [
                f"![{label}, {n.removeprefix(f'{base}_{label}_').removesuffix('.png')}](results/{n})"
                for n in names
            ]
        lines.append("")
    return "\n".join(lines)


def _render_sweep(data: dict[str, Any]) -> list[str]:
    patch10 = [r for r in data["rows"] if r["label"] == "patch"]
    points = sorted([*data["sweep"], *patch10], key=lambda r: r["poison"])
    if not data["sweep"]:
        return []
    lines = [
        "### Poison fraction sweep (the paper's Figure 4c), patch BadNet",
        "",
        "The sweep reuses the patch run's round 0 (a copy of its store); its 10% point is the table's patch row.",
        "",
        "| poisoned % | requests to swap | precision / recall % | samples (triggered) | pre- ASR | post- CA | post- ASR | round s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in points:
        rd = _first_round(r)
        if len(r["stages"]) < 3:
            lines.append(f"| {100 * r['poison']:g} | no round 1 ({rd['status']}) | | | | | | |")
            continue
        lines.append(
            f"| {100 * r['poison']:g} | {rd['requests_until_swap']} | {_pct(rd['precision'])} / "
            f"{_pct(rd['recall'])} | {rd['samples']} ({rd['samples_triggered']}) | "
            f"{_pct(r['stages'][1]['asr'])} | {_pct(final(r)['ca'])} | {_pct(final(r)['asr'])} | "
            f"{rd['seconds']:.0f} |"
        )
    if "sweep" in data["figures"]:
        lines += [
            "",
            f"![CA and ASR against the poisoned share](results/{data['figures']['sweep']})",
        ]
    return [*lines, ""]


def _render_sequential(data: dict[str, Any]) -> list[str]:
    r = data["sequential"]
    if not r:
        return []
    firing = _firing(r)
    lines = [
        "### The sequential attacker (the paper's Table 8), multi-target BadNet, through the gateway",
        "",
        f"Phase 1 streams triggers {firing[0]} and {firing[1]} (first half of the stream split, 10% triggered) "
        f"until the watcher's round 1 is swapped in; phase 2 streams {firing[2]} alone (second half) until round 2. "
        "Round 0 is the multi-target row's (a copy of its store). ASR per trigger, held-out split, through the gateway.",
        "",
        "| stage | CA % | "
        + " | ".join(f"{g} ASR %" for g in firing)
        + " | samples (triggered) | round s |",
        "|---|---|" + "---|" * len(firing) + "---|---|",
    ]
    for i, st in enumerate(r["stages"]):
        rd = r["rounds"][i - 2] if i >= 2 and i - 2 < len(r["rounds"]) else None
        extra = (
            f"{rd['samples']} ({rd['samples_triggered']}) | {rd['seconds']:.0f}" if rd else "- | -"
        )
        lines.append(
            f"| {st['stage']} | {_pct(st['ca'])} | "
            + " | ".join(_pct(st["asr_by_trigger"][g]) for g in firing)
            + f" | {extra} |"
        )
    for stage, ca, asr in PAPER_TABLE8:
        lines.append(
            f"| paper, YouTube MTMTA, {stage} | {ca} | "
            + " | ".join(str(a) for a in asr)
            + " | - | - |"
        )
    for rd in r["rounds"]:
        if rd.get("status") == "no swap":
            lines.append(f"\nRound {rd['round']} was not swapped in: {_no_swap_reason(rd)}.")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("var/zoo"))
    parser.add_argument("--work", type=Path, default=Path("var/table"))
    parser.add_argument("--attacks", nargs="*", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--sweep", nargs="*", type=float, default=[0.02, 0.06, 0.5])
    parser.add_argument("--sequential", default="multi-target", help="'' to skip")
    parser.add_argument("--prepare", choices=["grid", "one"], default="grid")
    parser.add_argument("--threshold", type=int, default=200, help="N: pending samples a round")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="CycleGAN preset")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds to wait a swap")
    parser.add_argument("--resume", action="store_true", help="keep runs whose result exists")
    args = parser.parse_args()
    opts = Options(
        work=args.work.resolve(),
        prepare=PrepareConfig() if args.prepare == "grid" else ONE_CANDIDATE,
        threshold=args.threshold,
        preset=args.preset,
        timeout=args.timeout,
    )
    try:
        data = run(args.zoo, args.attacks, args.sweep, args.sequential or None, opts, args.resume)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    path = publish(result_name(args.preset), data, render)
    print(f"wrote {path} and docs/RESULTS.md; checks: {data['checks']}")


if __name__ == "__main__":
    main()
