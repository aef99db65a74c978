"""The three learning-rate schedules of CompVis ``ldm/lr_scheduler.py``, as multipliers for ``LambdaLR``.

Each object is called with the optimizer step ``n`` and returns a factor (``LambdaWarmUpCosineScheduler`` returns
the rate itself, as in CompVis, and is used with base lr 1).
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max``, then half a cosine down to ``lr_min`` at ``max_decay_steps``."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        if max_decay_steps <= warm_up_steps:
            raise ValueError("max_decay_steps must be larger than warm_up_steps")
        self.warm_up_steps, self.lr_min, self.lr_max, self.lr_start = warm_up_steps, lr_min, lr_max, lr_start
        self.max_decay_steps, self.verbosity_interval = max_decay_steps, verbosity_interval

    def schedule(self, n: int) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}")
        if n < self.warm_up_steps:
            return (self.lr_max - self.lr_start) / self.warm_up_steps * n + self.lr_start
        t = min((n - self.warm_up_steps) / (self.max_decay_steps - self.warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class LambdaWarmUpCosineScheduler2:
    """Several cycles, each a linear warm-up ``f_start → f_max`` and a cosine ``f_max → f_min``."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[float], verbosity_interval: int = 0):
        lists = (warm_up_steps, f_min, f_max, f_start, cycle_lengths)
        if len({len(x) for x in lists}) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        self.lr_warm_up_steps, self.f_min, self.f_max, self.f_start = warm_up_steps, f_min, f_max, f_start
        self.cycle_lengths, self.verbosity_interval = cycle_lengths, verbosity_interval
        self.cum_cycles = [0.0]
        for length in cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.last_f = 0.0

    def find_in_interval(self, n: int) -> int:
        # the first cycle whose cumulative end is >= n (CompVis compares with <=)
        return min(bisect.bisect_left(self.cum_cycles[1:], n), len(self.cycle_lengths) - 1)

    def decay(self, cycle: int, n: int) -> float:
        t = min((n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]), 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(t * math.pi))

    def schedule(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {self.last_f}, current cycle {cycle}")
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            f = self.decay(cycle, n)
        self.last_f = f
        return f

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """As above, with a linear decay ``f_max → f_min`` over each cycle (SD v1: warm-up 10k, then constant 1)."""

    def decay(self, cycle: int, n: int) -> float:
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (self.cycle_lengths[cycle] - n) \
            / self.cycle_lengths[cycle]
