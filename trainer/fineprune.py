"""Fine-Pruning (Liu et al., RAID'18, §4): prune the last convolution's dormant channels,
then fine-tune on clean data with the pruned channels held at zero.

A backdoor hides in channels that clean inputs leave dormant (Liu et al. §4.1), so the
channels are pruned in increasing order of their mean post-ReLU activation on the
defender's clean validation images, until that accuracy has dropped by ``prune_drop``
points (4 in the original). Pruning zeroes a channel's weights and bias, and those of a
BatchNorm that directly follows it, so the channel outputs exactly zero; the saved bundle
holds the zeros and loads like any other. Fine-tuning keeps them at zero through a
weight mask (``torch.nn.utils.prune``), removed before saving.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from core.bundle import InputSpec, batched_logits
from core.errors import UserError
from trainer.data import Dataset
from trainer.loop import FitConfig, accuracy, fit, predict


def conv_layers(model: nn.Module, spec: InputSpec) -> list[str]:
    """The names of ``model``'s 2-D convolutions in the order a forward pass runs them."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[id(mod)]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, spec.channels, spec.height, spec.width))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def resolve_layer(model: nn.Module, spec: InputSpec, layer: str | None) -> str:
    """The convolution to prune: ``layer`` when named (it must be a Conv2d), else the last
    one the forward pass runs (Liu et al. prune the last convolutional layer)."""
    found = conv_layers(model, spec)
    if layer is None:
        if not found:
            raise UserError(
                f"{type(model).__name__} runs no 2-D convolution, so Fine-Pruning has no "
                "layer to prune; name one with --layer, or choose another defense"
            )
        return found[-1]
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        known = ", ".join(found) or "none"
        raise UserError(
            f"--layer {layer!r} is not a module of {type(model).__name__}; its convolutions: "
            f"{known}"
        ) from None
    if not isinstance(module, nn.Conv2d):
        raise UserError(f"--layer {layer!r} is a {type(module).__name__}, not a Conv2d")
    return layer


def follower_norm(model: nn.Module, layer: str) -> nn.BatchNorm2d | None:
    """A BatchNorm2d that directly follows ``layer`` in its parent Sequential, if any."""
    parent_name, _, child = layer.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    i = names.index(child)
    nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
    return nxt if isinstance(nxt, nn.BatchNorm2d) else None


def mean_activations(model: nn.Module, spec: InputSpec, layer: str, x: np.ndarray) -> np.ndarray:
    """Each channel's mean post-ReLU activation of ``layer`` over ``x`` (Liu et al. §4.1)."""
    module = model.get_submodule(layer)
    norm = follower_norm(model, layer)
    tap = norm if norm is not None else module  # the channel as the next ReLU sees it
    sums: list[torch.Tensor] = []
    hook = tap.register_forward_hook(lambda _m, _i, out: sums.append(out.relu().sum((0, 2, 3))))
    try:
        batched_logits(model, spec, x)
    finally:
        hook.remove()
    total = torch.stack(sums).sum(0)
    return (total / max(1, len(x))).numpy()


def zero_channels(model: nn.Module, layer: str, channels: list[int]) -> None:
    """Make ``channels`` of ``layer`` output zero: its weights and bias, and those of a
    BatchNorm that directly follows it."""
    with torch.no_grad():
        for module in _masked_modules(model, layer):
            for name in ("weight", "bias"):
                tensor = getattr(module, name, None)
                if tensor is not None:
                    tensor[channels] = 0


def pruned_channels(model: nn.Module, layer: str) -> list[int]:
    """The channels of ``layer`` whose weights are all zero: pruned, and kept so by every
    later fine-tuning (a twin's repair, or Fine-Pruning again)."""
    weight = torch.as_tensor(model.get_submodule(layer).weight).detach()
    return [c for c in range(weight.shape[0]) if not bool(weight[c].any())]


def _masked_modules(model: nn.Module, layer: str) -> list[nn.Module]:
    norm = follower_norm(model, layer)
    return [model.get_submodule(layer), *([norm] if norm is not None else [])]


def held_at_zero(model: nn.Module, layer: str, channels: list[int]) -> Callable[[], None]:
    """Mask ``channels`` of ``layer`` (and its BatchNorm) so training cannot revive them;
    returns the function that makes the zeros permanent and removes the masks."""
    masked: list[tuple[nn.Module, str]] = []
    for module in _masked_modules(model, layer):
        for name in ("weight", "bias"):
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            mask = torch.ones_like(tensor)
            mask[channels] = 0
            prune.custom_from_mask(module, name, mask)
            masked.append((module, name))

    def remove() -> None:
        for module, name in masked:
            prune.remove(module, name)

    return remove


def _channel_values(
    model: nn.Module, layer: str, c: int
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Channel ``c``'s weights and biases, to put back if pruning it costs too much."""
    out = []
    for module in _masked_modules(model, layer):
        for name in ("weight", "bias"):
            tensor = getattr(module, name, None)
            if tensor is not None:
                out.append((tensor, c, tensor.detach()[c].clone()))
    return out


def _restore(saved: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, c, value in saved:
            tensor[c] = value


@dataclass
class Pruned:
    """A Fine-Pruned model and what its manifest records."""

    model: nn.Module
    layer: str
    channels: list[int]  # the pruned channels, in pruning order
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """Where pruning stops, measured on clean validation data after each channel.

    By default the accuracy may drop ``drop`` points (Liu et al. §4.2: 4). With ``frr``
    set (BBD's targeted rule), the share of clean inputs the rule would reject instead
    (the suspect answers one of ``targets`` and the pruned model disagrees) may reach
    ``frr``: that rejection is the rule's whole clean cost (paper 004 §3), so the twin
    is pruned as deep as the operator's false-rejection budget allows.
    """

    drop: float = 4.0
    frr: float | None = None
    targets: tuple[int, ...] = ()

    def check(self) -> None:
        if not 0 <= self.drop <= 100:
            raise UserError(f"--prune-drop is in accuracy points, 0 to 100; got {self.drop:g}")
        if self.frr is not None and not 0 <= self.frr < 1:
            raise UserError(f"--prune-frr is a rate in [0, 1), got {self.frr:g}")

    def describe(self) -> str:
        if self.frr is None:
            return f"validation CA within {self.drop:g} points"
        return f"targeted rejections of clean validation inputs within {100 * self.frr:g}%"


def prune_until(
    model: nn.Module, spec: InputSpec, layer: str, valid: Dataset, budget: Budget
) -> tuple[list[int], dict[str, Any]]:
    """Prune ``layer``'s channels of ``model`` in place, least active first, while the
    ``budget`` holds on ``valid``; returns the pruned channels and the accuracies along the
    way. Channels already at zero (an earlier round's) stay pruned and are not counted."""
    acts = mean_activations(model, spec, layer, valid.x)
    suspect = predict(model, valid.x, spec)
    base = float(np.mean(suspect == valid.y))
    watched = np.isin(suspect, budget.targets)
    already = pruned_channels(model, layer)
    order = [int(c) for c in np.argsort(acts, kind="stable") if int(c) not in already]
    pruned, curve = list(already), []
    for c in order[:-1]:  # never the last channel: the layer must still pass something on
        saved = _channel_values(model, layer, c)
        zero_channels(model, layer, [c])
        now = predict(model, valid.x, spec)
        acc, rejected = float(np.mean(now == valid.y)), float(np.mean(watched & (now != suspect)))
        curve.append([round(acc, 5), round(rejected, 5)])
        over = 100 * (base - acc) > budget.drop if budget.frr is None else rejected > budget.frr
        if over:
            _restore(saved)
            break
        pruned.append(c)
    record = {
        "channels_total": len(acts),
        "accuracy_before": base,
        "accuracy_pruned": accuracy(model, valid.x, valid.y, spec),
        "curve": curve,  # per channel tried: accuracy, targeted rejection rate
    }
    return pruned, record


def fine_prune(
    model: nn.Module,
    spec: InputSpec,
    valid: Dataset,
    *,
    layer: str | None,
    budget: Budget,
    fit_cfg: FitConfig,
    progress: Callable[[str], None] = lambda message: None,
) -> Pruned:
    """A copy of ``model`` Fine-Pruned on the clean ``valid`` data: pruned while ``budget``
    holds, then fine-tuned on ``valid`` with the pruned channels held at zero."""
    budget.check()
    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    name = resolve_layer(model, spec, layer)
    channels, record = prune_until(model, spec, name, valid, budget)
    total = record["channels_total"]
    progress(
        f"fine-pruning: pruned {len(channels)} of {total} channels of {name!r} with "
        f"{budget.describe()} (validation CA {100 * record['accuracy_before']:.2f}% -> "
        f"{100 * record['accuracy_pruned']:.2f}%); fine-tuning {fit_cfg.epochs} epochs"
    )
    remove = held_at_zero(model, name, channels)
    fit(model, valid.x, valid.y, spec, fit_cfg, progress=False)
    remove()
    record.update(
        layer=name,
        pruned=len(channels),
        prune_ratio=len(channels) / total,
        accuracy_after=accuracy(model, valid.x, valid.y, spec),
        budget={"drop": budget.drop, "frr": budget.frr, "targets": list(budget.targets)},
        finetune=fit_cfg.to_dict(),
        seconds=time.perf_counter() - start,
    )
    return Pruned(model.eval(), name, channels, record)
