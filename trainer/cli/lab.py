"""``trainer fabricate``, ``evaluate`` and ``import``: the lab and user models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.bundle import InputSpec, load_bundle
from core.errors import UserError
from trainer.attacks.poison import ATTACKS, Attack, build_attack
from trainer.cli.common import (
    DbOpt,
    ParamOpt,
    StoreOpt,
    _load,
    _metrics_table,
    _parse_params,
    _settings,
    app,
    out_console,
)
from trainer.importer import import_weights
from trainer.lab import CLEAN, attack_of, evaluate, fabricate
from trainer.loop import FitConfig


@app.command("fabricate")
def fabricate_cmd(
    out: Annotated[Path, typer.Option(help="Directory for the new bundle.")],
    attack: Annotated[
        str, typer.Option(help=f"Attack: {', '.join(ATTACKS)}, or '{CLEAN}' for a clean model.")
    ] = "patch",
    target: Annotated[
        int, typer.Option(help="Attacker's target class (all-to-all: ignored, y -> y+1).")
    ] = 0,
    dataset: Annotated[
        str,
        typer.Option(help="Training data spec; bare fashion-mnist means its 60k training images."),
    ] = "fashion-mnist",
    heldout: Annotated[
        str | None,
        typer.Option(
            help=(
                "Evaluation data spec. Default: fashion-mnist:heldout for "
                "fashion-mnist, else 10% of --dataset."
            )
        ),
    ] = None,
    poison_rate: Annotated[
        float, typer.Option(help="Fraction of training samples that carry a firing trigger.")
    ] = 0.1,
    param: ParamOpt = None,
    arch: Annotated[
        str,
        typer.Option(
            help="Architecture: fmnist-cnn, nnoculation-cla, color-cnn, or package.module:Class."
        ),
    ] = "fmnist-cnn",
    epochs: Annotated[int, typer.Option(min=1)] = FitConfig.epochs,
    lr: Annotated[float, typer.Option(min=0.0)] = FitConfig.lr,
    batch_size: Annotated[int, typer.Option(min=1)] = FitConfig.batch_size,
    seed: Annotated[int, typer.Option()] = FitConfig.seed,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Train on the first N images only (quick runs).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Train a BadNet with the chosen attack and save it as a bundle (the BadNet lab)."""
    settings = _settings(db, store)
    train = _load(dataset, settings, "train")
    if heldout is not None:
        held = _load(heldout, settings, "heldout")
    elif dataset.partition(":")[0] == "fashion-mnist":
        held = _load("fashion-mnist:heldout", settings, "heldout")
    else:
        cut = max(1, len(train) // 10)
        train, held = (
            train.take(slice(cut, None)),
            train.take(slice(0, cut), source=f"{train.source}[:{cut}]"),
        )
    if limit:
        train = train.take(slice(0, limit))
    result = fabricate(
        train=train,
        heldout=held,
        attack_name=attack,
        target=target,
        out=out,
        arch=arch,
        poison_rate=poison_rate,
        params=_parse_params(param),
        fit_config=FitConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
        overwrite=overwrite,
        progress=sys.stderr.isatty(),
    )
    out_console.print(
        _metrics_table(
            f"{attack} model on {held.source} ({result.seconds:.0f}s training)",
            result.clean_accuracy,
            result.asr,
        )
    )
    out_console.print(f"saved bundle {out}")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Option(help="Bundle directory to evaluate.")],
    data: Annotated[
        str, typer.Option(help="Data spec; bare fashion-mnist means the held-out test split.")
    ] = "fashion-mnist",
    attack_from: Annotated[
        Path | None,
        typer.Option(
            help="Take the triggers from this bundle's recorded attack (e.g. the BadNet)."
        ),
    ] = None,
    attack: Annotated[
        str | None, typer.Option(help="Or build this attack with its defaults.")
    ] = None,
    target: Annotated[int, typer.Option(help="Target class for --attack.")] = 0,
    param: ParamOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Print clean accuracy (CA) and attack success rate (ASR) per trigger."""
    settings = _settings(db, store)
    bundle = load_bundle(model, trusted_modules=settings.trusted_arch_modules)
    dataset = _load(data, settings, "heldout")
    chosen: Attack | None
    if attack:
        chosen = build_attack(
            attack,
            target=target,
            num_classes=bundle.manifest.num_classes,
            image_shape=bundle.manifest.input.shape,
            params=_parse_params(param),
        )
    else:
        chosen = attack_of(attack_from or model)
    result = evaluate(bundle, dataset, chosen)
    if as_json:
        out_console.print_json(json.dumps(result))
    else:
        out_console.print(
            _metrics_table(
                f"{model} on {dataset.source}", result["clean_accuracy"], result.get("asr", {})
            )
        )


@app.command("import")
def import_cmd(
    arch: Annotated[str, typer.Option(help="Registered architecture or package.module:Class.")],
    weights: Annotated[
        Path,
        typer.Option(
            help="state_dict file (.pt/.pth via torch.load(weights_only=True), or .safetensors)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory for the new bundle.")],
    num_classes: Annotated[int, typer.Option(min=2)] = 10,
    class_names: Annotated[
        str | None, typer.Option(help="Comma-separated class names. Default: 0..K-1.")
    ] = None,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB).")] = 1,
    height: Annotated[int, typer.Option(min=1)] = 28,
    width: Annotated[int, typer.Option(min=1)] = 28,
    scale: Annotated[float, typer.Option(help="Pixels are divided by this first.")] = 255.0,
    mean: Annotated[
        str, typer.Option(help="Per-channel mean after scaling, comma-separated.")
    ] = "0.0",
    std: Annotated[
        str, typer.Option(help="Per-channel std after scaling, comma-separated.")
    ] = "1.0",
    arch_kwargs: Annotated[str, typer.Option(help="Extra constructor arguments as JSON.")] = "{}",
    overwrite: Annotated[bool, typer.Option()] = False,
    db: DbOpt = None,
    store: StoreOpt = None,
) -> None:
    """Wrap a PyTorch state_dict as a bundle. Never unpickles code."""
    _settings(db, store)
    names = (
        [n.strip() for n in class_names.split(",")]
        if class_names
        else [str(i) for i in range(num_classes)]
    )
    if len(names) != num_classes:
        raise UserError(f"--class-names has {len(names)} names for --num-classes {num_classes}")
    try:
        spec = InputSpec(
            channels=channels,  # type: ignore[arg-type]
            height=height,
            width=width,
            scale=scale,
            mean=[float(v) for v in mean.split(",")] * (channels if "," not in mean else 1),
            std=[float(v) for v in std.split(",")] * (channels if "," not in std else 1),
        )
        extra = json.loads(arch_kwargs)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"bad input description: {exc}") from None
    if not isinstance(extra, dict):
        raise UserError("--arch-kwargs must be a JSON object")
    import_weights(
        arch=arch,
        weights=weights,
        out=out,
        class_names=names,
        input_spec=spec,
        arch_kwargs=extra,
        overwrite=overwrite,
    )
    out_console.print(f"saved bundle {out}")
