"""Tests of the learning-rate schedules against hand-computed multipliers."""
from __future__ import annotations

import math

import pytest

from system.schedules import ScheduleConfig, lr_multiplier

KINDS = ["constant", "cosine", "linear", "wsd"]


def lr(kind, step, total, **kw) -> float:
    return lr_multiplier(ScheduleConfig(kind=kind, **kw), step, total)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_warmup(kind):
    # warmup 4: updates 0..3 get 1/4, 2/4, 3/4, 4/4 of the peak
    got = [lr(kind, s, 100, warmup_steps=4, min_lr_ratio=0.1) for s in range(4)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_no_warmup_starts_at_peak(kind):
    assert lr(kind, 0, 100, warmup_steps=0) == pytest.approx(1.0, abs=1e-12)


def test_constant():
    for s in (0, 5, 50, 99, 150):
        assert lr("constant", s, 100, min_lr_ratio=0.1) == 1.0
    assert lr("constant", 1, 100, warmup_steps=4) == 0.5


@pytest.mark.parametrize("step,expected", [
    (10, 1.0),                                                    # end of warmup: peak
    (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),          # a quarter of the decay
    (60, 0.55),                                                   # half-way: mid point
    (85, 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4))),
    (109, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100))),  # last update
    (110, 0.1),                                                   # the end (and beyond)
    (500, 0.1),
])
def test_cosine(step, expected):
    assert lr("cosine", step, 110, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(expected, abs=1e-12)


def test_cosine_values_rounded():
    assert lr("cosine", 35, 110, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.868198, abs=1e-6)


@pytest.mark.parametrize("step,expected,ratio", [
    (0, 1.0, 0.0), (25, 0.75, 0.0), (50, 0.5, 0.0), (99, 0.01, 0.0), (100, 0.0, 0.0),
    (0, 1.0, 0.2), (50, 0.6, 0.2), (75, 0.4, 0.2), (100, 0.2, 0.2), (120, 0.2, 0.2),
])
def test_linear(step, expected, ratio):
    assert lr("linear", step, 100, min_lr_ratio=ratio) == pytest.approx(expected, abs=1e-12)


def test_linear_with_warmup():
    # warmup 20 of 120: decay spans steps 20..120
    assert lr("linear", 20, 120, warmup_steps=20, min_lr_ratio=0.0) == pytest.approx(1.0)
    assert lr("linear", 70, 120, warmup_steps=20, min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr("linear", 95, 120, warmup_steps=20, min_lr_ratio=0.2) == pytest.approx(1 - 0.8 * 0.75)


@pytest.mark.parametrize("step,expected", [
    (0, 0.2), (4, 1.0),                      # warmup 5
    (5, 1.0), (40, 1.0), (79, 1.0),          # stable phase
    (80, 1 - 0.9 * 1 / 20),                  # first decay update
    (89, 1 - 0.9 * 10 / 20),                 # half-way through the decay
    (99, 0.1),                               # last update reaches the floor
    (130, 0.1),
])
def test_wsd(step, expected):
    cfg = dict(warmup_steps=5, min_lr_ratio=0.1, decay_fraction=0.2)  # 20 decay steps: 80..99
    assert lr("wsd", step, 100, **cfg) == pytest.approx(expected, abs=1e-12)


def test_wsd_decay_rounds_and_has_at_least_one_step():
    # 0.1 of 7 steps rounds to 1 decay step: the last update alone decays, straight to the floor
    got = [lr("wsd", s, 7, min_lr_ratio=0.0, decay_fraction=0.1) for s in range(7)]
    assert got == pytest.approx([1, 1, 1, 1, 1, 1, 0.0])
    # 0.25 of 10 steps rounds to 2: steps 8, 9 decay by halves
    got = [lr("wsd", s, 10, min_lr_ratio=0.5, decay_fraction=0.25) for s in range(10)]
    assert got[:8] == pytest.approx([1.0] * 8)
    assert got[8:] == pytest.approx([0.75, 0.5])


def test_wsd_full_decay_fraction_is_linear_from_the_start():
    got = [lr("wsd", s, 4, min_lr_ratio=0.0, decay_fraction=1.0) for s in range(4)]
    assert got == pytest.approx([0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("total,warmup,ratio,frac", [
    (100, 0, 0.1, 0.1), (100, 10, 0.0, 0.3), (37, 5, 0.25, 0.5), (10, 10, 0.1, 0.1),
    (5, 8, 0.3, 1.0), (1, 0, 0.5, 0.1), (250, 25, 1.0, 0.2),
])
def test_never_below_floor_after_warmup(kind, total, warmup, ratio, frac):
    cfg = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=ratio, decay_fraction=frac)
    values = [lr_multiplier(cfg, s, total) for s in range(total + 20)]
    after = values[warmup:]
    assert after, "nothing after warmup"
    assert min(after) >= ratio - 1e-12
    assert max(values) <= 1.0 + 1e-12
    assert all(v > 0 for v in values[:warmup])
    # non-increasing after warmup
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    # and it does reach the floor once the stage is over
    assert values[-1] == pytest.approx(ratio, abs=1e-12)


def test_warmup_is_increasing_and_ends_at_peak():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=7)
    w = [lr_multiplier(cfg, s, 50) for s in range(7)]
    assert all(b > a for a, b in zip(w, w[1:]))
    assert w[-1] == 1.0
    assert w[0] == pytest.approx(1 / 7)


@pytest.mark.parametrize("kw,key", [
    (dict(warmup_steps=-1), "warmup_steps"), (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
    (dict(min_lr_ratio=1.1), "min_lr_ratio"), (dict(decay_fraction=0.0), "decay_fraction"),
    (dict(decay_fraction=1.5), "decay_fraction"),
])
def test_schedule_config_check(kw, key):
    assert [k for k, _ in ScheduleConfig(**kw).check()] == [key]
    assert list(ScheduleConfig().check()) == []
