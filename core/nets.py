"""Built-in classifier architectures, a registry of them, and ``module:Class`` import.

Every architecture takes the same keyword arguments, so that a bundle's manifest can
rebuild it: ``in_channels``, ``num_classes``, ``height``, ``width``, plus its own extras.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from core.errors import BundleError


def _flat_size(features: nn.Module, in_channels: int, height: int, width: int) -> int:
    """Number of features ``features`` produces for one image, found by a dry run."""
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, height, width)).flatten(1).shape[1])


class FashionCNN(nn.Module):
    """Two conv blocks and two dense layers: about 91% clean accuracy on Fashion-MNIST."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        height: int = 28,
        width: int = 28,
        width_mult: int = 1,
    ) -> None:
        super().__init__()
        c1, c2 = 32 * width_mult, 64 * width_mult
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c2, H/4, W/4)
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_channels, height, width), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x).flatten(1))  # (B, num_classes)
        return logits


class NNoculationCNN(nn.Module):
    """The clean-label-attack BadNet of NNoculation, Table 10 (Veldanda et al., AISec'21).

    conv16 5x5 - pool - conv4 5x5 - pool - fc512 - fc(num_classes).
    """

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 10, height: int = 28, width: int = 28
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 4, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 4, 4, 4) on 28x28
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_channels, height, width), 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x).flatten(1))
        return logits


class SmallColorCNN(nn.Module):
    """A small VGG-style CNN for 32x32 colour images (CIFAR-10, GTSRB sized inputs)."""

    def __init__(
        self, *, in_channels: int = 3, num_classes: int = 10, height: int = 32, width: int = 32
    ) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(in_channels, 32), *block(32, 64), *block(64, 128))
        self.classifier = nn.Sequential(
            nn.Dropout(0.3),
            nn.Linear(_flat_size(self.features, in_channels, height, width), 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x).flatten(1))
        return logits


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fmnist-cnn": FashionCNN,
    "nnoculation-cla": NNoculationCNN,
    "color-cnn": SmallColorCNN,
}


def is_import_path(arch: str) -> bool:
    return ":" in arch


def resolve_arch(arch: str, *, trusted_modules: Sequence[str] | None = None) -> type[nn.Module]:
    """The class (or factory) for ``arch``: a registry name or ``package.module:Class``.

    ``trusted_modules`` limits which modules an import path may name. ``None`` means the
    caller is the operator naming code on purpose (``trainer import --arch``); bundles pass
    the configured allow-list, because a manifest from an untrusted party must not make us
    import and run arbitrary code.
    """
    if not is_import_path(arch):
        try:
            return ARCHITECTURES[arch]  # type: ignore[return-value]
        except KeyError:
            known = ", ".join(sorted(ARCHITECTURES))
            raise BundleError(
                f"unknown architecture {arch!r}; use one of {known} or 'package.module:Class'"
            ) from None
    module_name, _, class_name = arch.partition(":")
    if trusted_modules is not None and module_name not in trusted_modules:
        raise BundleError(
            f"architecture {arch!r} imports code from module {module_name!r}, which is not "
            "trusted; add it to BQG_TRUSTED_ARCH_MODULES if you trust it"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BundleError(
            f"cannot import module {module_name!r} for arch {arch!r}: {exc}"
        ) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BundleError(f"{arch!r} is not a torch.nn.Module subclass")
    return cls


def build_model(
    arch: str, arch_kwargs: dict[str, Any], *, trusted_modules: Sequence[str] | None = None
) -> nn.Module:
    """Instantiate ``arch`` with ``arch_kwargs``; a clear error when they do not fit."""
    cls = resolve_arch(arch, trusted_modules=trusted_modules)
    try:
        return cls(**arch_kwargs)
    except TypeError as exc:
        raise BundleError(f"arch {arch!r} does not accept {sorted(arch_kwargs)}: {exc}") from None


def accepted_kwargs(arch: str, offered: dict[str, Any]) -> dict[str, Any]:
    """The part of ``offered`` that ``arch``'s constructor takes by name (all of it when the
    constructor takes ``**kwargs``): most user models take ``num_classes`` but not the
    input's ``height`` and ``width``, which the bundle's input spec records anyway."""
    cls = resolve_arch(arch)
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: offer everything
        return dict(offered)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(offered)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in offered.items() if k in names}
