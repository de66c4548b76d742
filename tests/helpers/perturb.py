"""Move every parameter off its init (ones / zeros), so a gradient check exercises every path."""
from __future__ import annotations

import numpy as np


def perturb(module, seed: int = 0, scale: float = 0.3) -> None:
    rng = np.random.default_rng(seed)
    for _, p in module.named_params():
        p.data += scale * rng.standard_normal(p.shape)
