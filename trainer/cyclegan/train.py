"""Train a CycleGAN between clean images (domain A) and quarantined images (domain B).

NNoculation §3.3 and Appendix A.3 (Veldanda et al., AISec'21), after Zhu et al. (CycleGAN):
the generator ``gen_ab`` learns to add what the quarantined inputs have and clean ones do
not, which is the attacker's trigger. Losses, with G = gen_ab, F = gen_ba:

- adversarial, least squares (LSGAN): L_GAN(G, D_B) = E_b[(D_B(b) - 1)^2] + E_a[D_B(G(a))^2]
  for the discriminator, and E_a[(D_B(G(a)) - 1)^2] for the generator; likewise F, D_A;
- cycle consistency (lambda 10): L_cyc = E_a[|F(G(a)) - a|_1] + E_b[|G(F(b)) - b|_1];
- identity (optional, weight lambda_identity * lambda): E_b[|G(b) - b|_1] + E_a[|F(a) - a|_1];
- the discriminators' objective is halved, and they see fakes from a 50-image history pool;
- Adam, lr 2e-4, beta1 0.5, constant for the first half of the epochs, then linear to 0.

The paper's full size (ngf 64, 9 residual blocks, 200 epochs, batch 1) takes hours on a
CPU. ``DEFAULT_PRESET`` is "fast" (ngf 4, 1 residual block, 5 epochs), the smallest that
repaired the blend and filter BadNets (``python -m benchmarks.cyclegan_size``; docs/RESULTS.md,
"CycleGAN size and epoch budget"): a repair round treats a stamped trigger (a patch, several
patches) with the stamp itself and trains no CycleGAN for it (``trainer.repair``), so
gen_ab matters only for a global trigger, and there the round fits gen_ab's change as a
curve per pixel, which a small generator learns as well as a large one.
History: "small" (ngf 16, 2 blocks, 10 epochs) repaired all 8 zoo attacks through the live
gateway (the NNoculation table as of commit 155e1e2) and was the default until the stamp
transplant; "compact" (ngf 8, 1 block, 10 epochs) was the default for a while before that,
but failed the multi-trigger and combo BadNets, whose patches its gen_ab blurred: then every
trigger went through gen_ab. A size is only as good as the hardest attack it was tried on.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from trainer.cyclegan.models import PatchDiscriminator, ResnetGenerator


@dataclass(frozen=True)
class CycleGANConfig:
    ngf: int = 16  # generator width
    ndf: int = 16  # discriminator width
    n_blocks: int = 2  # residual blocks
    disc_layers: int = 2  # stride-2 layers in the PatchGAN
    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # times lambda_cycle; 0 turns the identity loss off
    pool_size: int = 50
    seed: int = 0

    def validate(self) -> None:
        if min(self.ngf, self.ndf, self.epochs, self.batch_size) < 1 or self.n_blocks < 0:
            raise ValueError(f"CycleGAN sizes must be positive: {asdict(self)}")
        if self.disc_layers < 1:
            raise ValueError("the PatchGAN needs at least one stride-2 layer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, CycleGANConfig] = {
    "fast": CycleGANConfig(ngf=4, ndf=4, n_blocks=1, epochs=5),
    "compact": CycleGANConfig(ngf=8, ndf=8, n_blocks=1),
    "small": CycleGANConfig(),
    # seconds, for tests and smoke runs; too small to learn a real trigger
    "tiny": CycleGANConfig(ngf=8, ndf=8, n_blocks=1, epochs=2, batch_size=16),
    "paper": CycleGANConfig(
        ngf=64, ndf=64, n_blocks=9, disc_layers=3, epochs=200, batch_size=1, lambda_identity=0.5
    ),
}

DEFAULT_PRESET = "fast"


class ImagePool:
    """Zhu et al.'s history buffer: half the time a fake is swapped for an older one."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.images: list[torch.Tensor] = []

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for image in batch.detach():
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i])
                self.images[i] = image
            else:
                out.append(image)
        return torch.stack(out)


def to_unit(x: NDArray[np.uint8]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def from_unit(t: torch.Tensor) -> NDArray[np.uint8]:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    x = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def translate(gen: nn.Module, x: NDArray[np.uint8], batch_size: int = 256) -> NDArray[np.uint8]:
    """Run a generator over uint8 images, batched; returns uint8 images of the same shape."""
    gen.eval()
    device = next(gen.parameters()).device
    parts = [
        from_unit(gen(to_unit(x[i : i + batch_size]).to(device)).cpu())
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts) if parts else x.copy()


@dataclass
class CycleGANResult:
    gen_ab: ResnetGenerator  # clean -> triggered: the recovered poisoning function
    gen_ba: ResnetGenerator
    disc_a: PatchDiscriminator
    disc_b: PatchDiscriminator
    history: list[dict[str, float]]
    seconds: float
    config: CycleGANConfig


def _check_domains(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> None:
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both domains need images: clean validation (A) and quarantined (B)")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"domain shapes differ: A {a.shape[1:]}, B {b.shape[1:]}")
    h, w = a.shape[1:3]
    if h % 4 or w % 4:
        raise ValueError(f"the generator downsamples twice: {h}x{w} must be divisible by 4")


def train_cyclegan(
    a: NDArray[np.uint8],
    b: NDArray[np.uint8],
    cfg: CycleGANConfig | None = None,
    *,
    on_epoch: Callable[[dict[str, float]], None] = lambda record: None,
) -> CycleGANResult:
    """Train gen_ab (A -> B), gen_ba, disc_a, disc_b on uint8 images (N, H, W, C)."""
    cfg = cfg or PRESETS[DEFAULT_PRESET]
    cfg.validate()
    _check_domains(a, b)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    c = a.shape[3]
    gen_ab, gen_ba = (
        ResnetGenerator(c, cfg.ngf, cfg.n_blocks),
        ResnetGenerator(c, cfg.ngf, cfg.n_blocks),
    )
    disc_a, disc_b = (PatchDiscriminator(c, cfg.ndf, cfg.disc_layers) for _ in range(2))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when present
    for m in (gen_ab, gen_ba, disc_a, disc_b):
        m.to(device)
    betas = (cfg.beta1, 0.999)
    opt_g = torch.optim.Adam([*gen_ab.parameters(), *gen_ba.parameters()], cfg.lr, betas=betas)
    opt_d = torch.optim.Adam([*disc_a.parameters(), *disc_b.parameters()], cfg.lr, betas=betas)
    half = cfg.epochs / 2

    def factor(epoch: int) -> float:  # constant, then linear decay to 0 over the second half
        return 1.0 if epoch < half else max(0.0, 1.0 - (epoch - half + 1) / (cfg.epochs - half + 1))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_g, opt_d)]
    pool_a, pool_b = ImagePool(cfg.pool_size, rng), ImagePool(cfg.pool_size, rng)
    ta, tb = to_unit(a).to(device), to_unit(b).to(device)
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    steps = max(len(ta), len(tb)) // cfg.batch_size or 1
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        for m in (gen_ab, gen_ba, disc_a, disc_b):
            m.train()
        ia = torch.randperm(len(ta), generator=gen).repeat(steps * cfg.batch_size // len(ta) + 1)
        ib = torch.randperm(len(tb), generator=gen).repeat(steps * cfg.batch_size // len(tb) + 1)
        t0, sums = time.perf_counter(), {"g": 0.0, "cycle": 0.0, "d": 0.0}
        for step in range(steps):
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            real_a, real_b = ta[ia[sl].to(device)], tb[ib[sl].to(device)]
            # generators: fool both discriminators, close both cycles, keep identities
            fake_b, fake_a = gen_ab(real_a), gen_ba(real_b)
            pred_b, pred_a = disc_b(fake_b), disc_a(fake_a)
            adv = mse(pred_b, torch.ones_like(pred_b)) + mse(pred_a, torch.ones_like(pred_a))
            cycle = l1(gen_ba(fake_b), real_a) + l1(gen_ab(fake_a), real_b)
            loss_g = adv + cfg.lambda_cycle * cycle
            if cfg.lambda_identity > 0:
                ident = l1(gen_ab(real_b), real_b) + l1(gen_ba(real_a), real_a)
                loss_g = loss_g + cfg.lambda_identity * cfg.lambda_cycle * ident
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            # discriminators, objective halved; fakes from the history pools
            loss_d = torch.zeros((), device=device)
            for disc, real, fake, pool in (
                (disc_b, real_b, fake_b, pool_b),
                (disc_a, real_a, fake_a, pool_a),
            ):
                p_real, p_fake = disc(real), disc(pool.query(fake))
                loss_d = loss_d + 0.5 * (
                    mse(p_real, torch.ones_like(p_real)) + mse(p_fake, torch.zeros_like(p_fake))
                )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            sums["g"] += loss_g.item()
            sums["cycle"] += cycle.item()
            sums["d"] += loss_d.item()
        for s in scheds:
            s.step()
        record = {
            "epoch": epoch + 1,
            **{f"loss_{k}": v / steps for k, v in sums.items()},
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        on_epoch(record)
    for m in (gen_ab, gen_ba, disc_a, disc_b):
        m.eval().cpu()
    return CycleGANResult(
        gen_ab, gen_ba, disc_a, disc_b, history, time.perf_counter() - start, replace(cfg)
    )
