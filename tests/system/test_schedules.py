"""Tests of the learning-rate schedules against hand-computed multipliers."""
from __future__ import annotations

import math

import pytest

from system.schedules import ANNEAL_ZERO_FLOOR, ScheduleConfig, lr_multiplier, lr_phase

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


# ---------------------------------------------------------------------------------------------
# kind "infinite" (Ibrahim et al., arXiv 2403.08763): warmup, cooldown to eta_const, constant,
# optional exponential anneal to eta_min over the last anneal_steps updates.

def inf(step, total, **kw) -> float:
    return lr_multiplier(ScheduleConfig(kind="infinite", **kw), step, total)


SQ2 = math.sqrt(2.0)


@pytest.mark.parametrize("shape,expected", [
    # c = 0.5, N_cool = 4, warmup 2: cooldown updates are steps 2..5 (n = 1..4)
    ("cosine", [0.5 + 0.25 * (1 + SQ2 / 2), 0.75, 0.5 + 0.25 * (1 - SQ2 / 2), 0.5]),
    ("linear", [0.875, 0.75, 0.625, 0.5]),
    # inv_sqrt, alpha 10: 1 + (c-1) g(n/4)/g(1), g(x) = 1/sqrt(1+10x) - 1
    ("inv_sqrt", [1 - 0.5 * (1 / math.sqrt(3.5) - 1) / (1 / math.sqrt(11) - 1),
                  1 - 0.5 * (1 / math.sqrt(6) - 1) / (1 / math.sqrt(11) - 1),
                  1 - 0.5 * (1 / math.sqrt(8.5) - 1) / (1 / math.sqrt(11) - 1),
                  0.5]),
])
def test_infinite_cooldown_shapes(shape, expected):
    kw = dict(warmup_steps=2, cooldown=shape, cooldown_steps=4, const_lr_ratio=0.5)
    assert [inf(s, 100, **kw) for s in range(2)] == pytest.approx([0.5, 1.0], abs=1e-12)  # warmup
    assert [inf(s, 100, **kw) for s in range(2, 6)] == pytest.approx(expected, abs=1e-12)
    assert inf(5, 100, **kw) == 0.5  # the last cooldown update lands exactly on eta_const
    for s in (6, 7, 50, 99, 100, 10_000):  # then the constant phase, for ever without an anneal
        assert inf(s, 100, **kw) == 0.5


def test_infinite_cooldown_rounded_values():
    kw = dict(cooldown_steps=4, const_lr_ratio=0.5)
    assert inf(1, 100, cooldown="cosine", **kw) == pytest.approx(0.75, abs=1e-12)
    assert inf(0, 100, cooldown="cosine", **kw) == pytest.approx(0.926777, abs=1e-6)
    assert inf(0, 100, cooldown="inv_sqrt", **kw) == pytest.approx(0.666796, abs=1e-6)
    assert inf(1, 100, cooldown="inv_sqrt", **kw) == pytest.approx(0.576406, abs=1e-6)
    assert inf(2, 100, cooldown="inv_sqrt", **kw) == pytest.approx(0.529697, abs=1e-6)


def test_infinite_inv_sqrt_alpha():
    # alpha 3, c 0.2, N 3, n 1: g(1/3) = 1/sqrt(2) - 1, g(1) = 1/2 - 1
    got = inf(0, 10, cooldown="inv_sqrt", inv_sqrt_alpha=3.0, cooldown_steps=3, const_lr_ratio=0.2)
    assert got == pytest.approx(1 - 0.8 * (1 / SQ2 - 1) / -0.5, abs=1e-12)


def test_infinite_warmup_cooldown_boundaries():
    kw = dict(warmup_steps=4, cooldown="linear", cooldown_steps=5, const_lr_ratio=0.5)
    got = [inf(s, 100, **kw) for s in range(11)]
    # warmup 0..3, cooldown 4..8 (n = 1..5: 1 - 0.5 n/5), constant from 9
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5], abs=1e-12)
    assert [lr_phase(ScheduleConfig(kind="infinite", **kw), s, 100) for s in range(11)] == (
        ["warmup"] * 4 + ["cooldown"] * 5 + ["constant"] * 2)


@pytest.mark.parametrize("shape", ["cosine", "linear", "inv_sqrt"])
def test_infinite_no_cooldown_is_constant_straight_after_warmup(shape):
    got = [inf(s, 50, warmup_steps=3, cooldown=shape, const_lr_ratio=0.55) for s in range(6)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.55, 0.55, 0.55], abs=1e-12)
    # no warmup either: the very first update is already at eta_const
    assert inf(0, 50, cooldown=shape, const_lr_ratio=0.55) == 0.55
    assert lr_phase(ScheduleConfig(kind="infinite", cooldown=shape), 0, 50) == "constant"


def test_infinite_continue_from_constant_phase_without_rewarming():
    # stage 1 ends in the constant phase; its checkpoint records that phase ...
    first = ScheduleConfig(kind="infinite", warmup_steps=5, cooldown_steps=10, const_lr_ratio=0.4)
    assert lr_phase(first, 40, 40) == "constant"
    # ... so stage 2 continues at eta_const from its first update, without re-warming
    second = ScheduleConfig(kind="infinite", const_lr_ratio=0.4)
    assert lr_multiplier(second, 0, 30) == lr_multiplier(first, 39, 40) == 0.4
    assert lr_phase(second, 0, 30) == "constant"


def test_infinite_without_anneal_does_not_depend_on_total_steps():
    cfg = ScheduleConfig(kind="infinite", warmup_steps=3, cooldown="inv_sqrt", cooldown_steps=7)
    for s in range(30):
        assert lr_multiplier(cfg, s, 10) == lr_multiplier(cfg, s, 1000)


@pytest.mark.parametrize("step,expected", [
    (0, 0.5), (1, 1.0),              # warmup 2
    (2, 0.9), (3, 0.8),              # linear cooldown, N 2: n = 1 -> 0.9, n = 2 -> c = 0.8
    (4, 0.8), (15, 0.8),             # constant phase up to the anneal
    (16, 0.4), (17, 0.2), (18, 0.1), # anneal over 16..19: 0.8 * (0.05/0.8)^(n'/4) = 0.8 * 2^-n'
    (19, 0.05),                      # final update: exactly eta_min
    (20, 0.05), (1000, 0.05),        # beyond the end: stays there
])
def test_infinite_anneal(step, expected):
    kw = dict(warmup_steps=2, cooldown="linear", cooldown_steps=2, const_lr_ratio=0.8,
              anneal_steps=4, min_lr_ratio=0.05)
    assert inf(step, 20, **kw) == pytest.approx(expected, abs=1e-12)


def test_infinite_anneal_final_update_is_exact():
    for c, lo, n in ((0.55, 0.1, 7), (0.3, 0.03, 13), (1.0, 0.01, 3), (0.5, 0.5, 5)):
        kw = dict(const_lr_ratio=c, min_lr_ratio=lo, anneal_steps=n)
        assert inf(99, 100, **kw) == lo
        assert inf(100, 100, **kw) == lo
        assert inf(99 - n, 100, **kw) == c  # last update of the constant phase
    # a one-update anneal goes straight to eta_min
    assert inf(9, 10, const_lr_ratio=0.5, min_lr_ratio=0.1, anneal_steps=1) == 0.1
    assert inf(8, 10, const_lr_ratio=0.5, min_lr_ratio=0.1, anneal_steps=1) == 0.5


def test_infinite_anneal_middle_is_geometric_mean():
    # n' = N/2: c * (lo/c)^(1/2) = sqrt(c * lo)
    kw = dict(const_lr_ratio=0.5, min_lr_ratio=0.02, anneal_steps=10)
    assert inf(94, 100, **kw) == pytest.approx(0.1, abs=1e-12)  # anneal 90..99, n' = 5


def test_infinite_anneal_before_cooldown_end_takes_precedence():
    # cooldown would cover steps 2..11, but the anneal covers the last 4 of 10 updates: 6..9
    kw = dict(warmup_steps=2, cooldown="linear", cooldown_steps=10, const_lr_ratio=0.8,
              anneal_steps=4, min_lr_ratio=0.05)
    got = [inf(s, 10, **kw) for s in range(10)]
    assert got == pytest.approx([0.5, 1.0, 0.98, 0.96, 0.94, 0.92, 0.4, 0.2, 0.1, 0.05], abs=1e-12)
    phases = [lr_phase(ScheduleConfig(kind="infinite", **kw), s, 10) for s in range(11)]
    assert phases == ["warmup"] * 2 + ["cooldown"] * 4 + ["anneal"] * 4 + ["done"]


def test_infinite_anneal_with_zero_min_ratio_uses_a_floor():
    kw = dict(const_lr_ratio=0.5, min_lr_ratio=0.0, anneal_steps=4)
    got = [inf(s, 10, **kw) for s in range(6, 12)]
    assert got[-2:] == [ANNEAL_ZERO_FLOOR * 0.5] * 2
    assert all(v > 0 for v in got)
    assert all(b < a for a, b in zip(got[:4], got[1:4]))
    assert got[1] == pytest.approx(0.5 * ANNEAL_ZERO_FLOOR ** 0.5, abs=1e-12)  # n' = 2 of 4
    assert inf(5, 10, **kw) == 0.5


@pytest.mark.parametrize("shape", ["cosine", "linear", "inv_sqrt"])
@pytest.mark.parametrize("total,warmup,cool,ann,c,lo", [
    (100, 0, 0, 0, 0.55, 0.1), (100, 10, 30, 20, 0.55, 0.1), (40, 5, 50, 10, 0.3, 0.01),
    (10, 10, 5, 5, 1.0, 0.5), (1, 0, 0, 1, 0.5, 0.05), (250, 25, 100, 0, 0.7, 0.1),
])
def test_infinite_bounded_and_non_increasing_after_warmup(shape, total, warmup, cool, ann, c, lo):
    cfg = ScheduleConfig(kind="infinite", warmup_steps=warmup, cooldown=shape, cooldown_steps=cool,
                         const_lr_ratio=c, anneal_steps=ann, min_lr_ratio=lo)
    assert list(cfg.check()) == []
    values = [lr_multiplier(cfg, s, total) for s in range(total + 20)]
    after = values[warmup:]
    assert max(values) <= 1.0 + 1e-12
    end = lo if ann else c
    assert min(after) >= end - 1e-12
    if not (ann and total - ann < warmup + cool):  # a pre-empted cooldown jumps down to c
        assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert values[-1] == end


@pytest.mark.parametrize("kind,kw,total,expected", [
    ("constant", dict(warmup_steps=2), 10,
     {0: "warmup", 1: "warmup", 2: "constant", 9: "constant", 10: "constant", 500: "constant"}),
    ("constant", dict(), 10, {0: "constant", 10: "constant"}),
    ("cosine", dict(warmup_steps=3), 10,
     {0: "warmup", 2: "warmup", 3: "decay", 9: "decay", 10: "done", 99: "done"}),
    ("cosine", dict(), 10, {0: "decay", 9: "decay", 10: "done"}),
    ("linear", dict(warmup_steps=1), 10, {0: "warmup", 1: "decay", 9: "decay", 10: "done"}),
    # wsd, 20 updates, decay_fraction 0.25: stable until 14, decay 15..19
    ("wsd", dict(warmup_steps=2, decay_fraction=0.25), 20,
     {0: "warmup", 1: "warmup", 2: "stable", 14: "stable", 15: "decay", 19: "decay", 20: "done"}),
    ("infinite", dict(warmup_steps=2, cooldown_steps=3, anneal_steps=4), 20,
     {0: "warmup", 1: "warmup", 2: "cooldown", 4: "cooldown", 5: "constant", 15: "constant",
      16: "anneal", 19: "anneal", 20: "done", 100: "done"}),
    ("infinite", dict(warmup_steps=2, cooldown_steps=3), 20,
     {1: "warmup", 4: "cooldown", 5: "constant", 19: "constant", 20: "constant", 10_000: "constant"}),
    ("infinite", dict(cooldown_steps=50), 20,
     {0: "cooldown", 19: "cooldown", 20: "cooldown", 50: "constant"}),
])
def test_lr_phase(kind, kw, total, expected):
    cfg = ScheduleConfig(kind=kind, **kw)
    assert {s: lr_phase(cfg, s, total) for s in expected} == expected


@pytest.mark.parametrize("kind", KINDS + ["infinite"])
def test_lr_phase_agrees_with_multiplier(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=4, decay_fraction=0.3, cooldown="linear",
                         cooldown_steps=6, const_lr_ratio=0.5, anneal_steps=5, min_lr_ratio=0.1)
    for s in range(40):
        phase, v = lr_phase(cfg, s, 40), lr_multiplier(cfg, s, 40)
        assert phase in {"warmup", "stable", "decay", "constant", "cooldown", "anneal"}
        if phase == "warmup":
            assert v == (s + 1) / 4
        elif phase in ("stable",) or (phase == "constant" and kind == "constant"):
            assert v == 1.0
        elif phase == "constant":
            assert v == 0.5
        elif phase == "cooldown":
            assert 0.5 <= v < 1.0  # the last cooldown update is at c
        elif phase == "anneal":
            assert 0.1 <= v < 0.5
    assert lr_phase(cfg, 40, 40) == ("constant" if kind == "constant" else "done")


@pytest.mark.parametrize("kw,keys", [
    (dict(cooldown_steps=-1), ["cooldown_steps"]),
    (dict(anneal_steps=-2), ["anneal_steps"]),
    (dict(const_lr_ratio=0.0), ["const_lr_ratio"]),
    (dict(const_lr_ratio=-0.5), ["const_lr_ratio"]),
    (dict(const_lr_ratio=1.01), ["const_lr_ratio"]),
    (dict(inv_sqrt_alpha=0.0), ["inv_sqrt_alpha"]),
    (dict(inv_sqrt_alpha=-1.0), ["inv_sqrt_alpha"]),
    (dict(anneal_steps=10, min_lr_ratio=0.0), ["min_lr_ratio"]),
    (dict(anneal_steps=10, min_lr_ratio=0.6, const_lr_ratio=0.5), ["min_lr_ratio"]),
])
def test_infinite_config_check(kw, keys):
    assert [k for k, _ in ScheduleConfig(kind="infinite", **kw).check()] == keys


def test_infinite_config_check_valid():
    assert list(ScheduleConfig(kind="infinite").check()) == []
    assert list(ScheduleConfig(kind="infinite", const_lr_ratio=1.0).check()) == []
    assert list(ScheduleConfig(kind="infinite", anneal_steps=10, min_lr_ratio=0.5,
                               const_lr_ratio=0.5).check()) == []
    # without an anneal, min_lr_ratio 0 (or above c) is irrelevant and fine
    assert list(ScheduleConfig(kind="infinite", min_lr_ratio=0.0).check()) == []
    assert list(ScheduleConfig(kind="infinite", min_lr_ratio=0.9).check()) == []
    # anneal fields do not concern the other kinds
    assert list(ScheduleConfig(kind="cosine", anneal_steps=10, min_lr_ratio=0.0).check()) == []
