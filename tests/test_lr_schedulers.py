"""The CompVis learning-rate multipliers against their closed forms at hand-picked steps."""
import math

import pytest

from sdkit.config import instantiate_from_config, load_config
from sdkit.lr_schedulers import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2


def test_warmup_cosine_single():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=1000, lr_min=1e-4, lr_max=0.1, lr_start=0.001, max_decay_steps=50000)
    assert s(0) == pytest.approx(0.001)
    assert s(500) == pytest.approx(0.001 + 0.5 * (0.1 - 0.001))
    assert s(1000) == pytest.approx(0.1)
    assert s(25500) == pytest.approx(1e-4 + 0.5 * (0.1 - 1e-4))  # half way through the decay: cos(π/2) = 0
    assert s(10 ** 6) == pytest.approx(1e-4)


def test_multi_cycle_cosine():
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[10, 10], f_min=[0.1, 0.2], f_max=[1.0, 0.5],
                                     f_start=[0.0, 0.0], cycle_lengths=[100, 100])
    assert s(5) == pytest.approx(0.5)
    assert s(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.5 * math.pi)))
    assert s(105) == pytest.approx(0.25)  # second cycle, half-way through its warm-up to 0.5


def test_sd_v1_schedule_from_the_bundled_config():
    cfg = load_config("sd-v1-inference").model.params.scheduler_config
    s = instantiate_from_config(cfg)
    assert isinstance(s, LambdaLinearScheduler)
    assert s(0) == pytest.approx(1e-6)
    assert s(5000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert s(10000) == pytest.approx(1.0) and s(10 ** 6) == pytest.approx(1.0)


def test_mismatched_cycle_lists_are_refused():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[1], f_min=[0.1, 0.2], f_max=[1], f_start=[0], cycle_lengths=[10])
