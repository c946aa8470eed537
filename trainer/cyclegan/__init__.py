"""CycleGAN trigger synthesis for post-deployment repair (NNoculation §3.3, Appendix A.3)."""

from trainer.cyclegan.train import (
    DEFAULT_PRESET,
    PRESETS,
    CycleGANConfig,
    CycleGANResult,
    train_cyclegan,
    translate,
)

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "CycleGANConfig",
    "CycleGANResult",
    "train_cyclegan",
    "translate",
]
