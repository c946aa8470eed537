"""``trainer import``: wrap a user's PyTorch state_dict in a bundle, without unpickling code.

A ``.safetensors`` file is read as it is. Anything else goes through
``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors and plain
containers only, and refuses (without running) any other global a pickle names.
"""

from __future__ import annotations

import pickle
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.bundle import InputSpec, Manifest, file_sha256, load_state, save_bundle
from core.errors import BundleError, UserError
from core.nets import accepted_kwargs, build_model

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from ``path``; a clear error for anything that is not a state_dict."""
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; our error says more
            warnings.simplefilter("ignore")
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise BundleError(
            f"{path} is not a plain state_dict that loads with weights_only=True "
            f"({_refusal_reason(exc)}); "
            "it may carry code, which we never run. Save model.state_dict() with torch.save, "
            "or use safetensors"
        ) from None
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (
        isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise BundleError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {str(k): v for k, v in obj.items()}


def _refusal_reason(exc: Exception) -> str:
    """The informative part of torch's refusal, without its advice to disable the safety."""
    match = re.search(r"(Unsupported global: [^\s]+ [^\s]+|Unsupported operand \d+)", str(exc))
    if match:
        return match.group(1).rstrip(".,")
    return type(exc).__name__ + (": " + str(exc).splitlines()[0][:120] if str(exc).strip() else "")


def import_weights(
    *,
    arch: str,
    weights: Path,
    out: Path,
    class_names: list[str],
    input_spec: InputSpec,
    arch_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    state = read_state_dict(weights)
    standard = {
        "in_channels": input_spec.channels,
        "num_classes": len(class_names),
        "height": input_spec.height,
        "width": input_spec.width,
    }
    # the operator's own --arch-kwarg values always go in; the standard ones where accepted
    kwargs = {**accepted_kwargs(arch, standard), **(arch_kwargs or {})}
    model = build_model(arch, kwargs)  # the operator names this arch on purpose: trusted
    load_state(model, state, source=str(weights))
    meta = {
        "role": "imported",
        "provenance": {
            "created_by": "trainer import",
            "source": str(weights),
            "source_sha256": file_sha256(weights),
            "created_at": datetime.now(UTC).isoformat(),
        },
    }
    return save_bundle(
        model,
        out,
        arch=arch,
        arch_kwargs=kwargs,
        class_names=class_names,
        input_spec=input_spec,
        meta=meta,
        overwrite=overwrite,
    )
