"""Every random draw of a training step derives from (seed, counters...), never from a running RNG."""

from __future__ import annotations

import numpy as np
import torch


def step_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed mixed from (seed, counters...): all randomness of a step derives from
    (seed, step, rank), never from a running RNG state, so a resumed run draws exactly what an
    uninterrupted one would."""
    state = np.random.SeedSequence([seed, *counters]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) >> 1


def step_generator(seed: int, *counters: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, *counters))
