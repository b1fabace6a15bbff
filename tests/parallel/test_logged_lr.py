"""The logged `lr` of a step is the rate that step's update used (issue 27): read before the
engine's step moves the scheduler on, so warmup 3 at peak 3e-4 logs 1e-4, 2e-4, 3e-4, and every
optimizer's param groups (dense, and an ep/fssdp expert pool's own AdamW) held that rate when it
stepped. In the trainer's process with a DeepSpeed-like engine (fast), then through the stage
runner on DeepSpeed itself."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from experts.config import BalancingConfig
from parallel.strategy import ExpertStrategy
from parallel.testing import run_distributed
from parallel.trainer import Trainer
from system.model import Transformer
from system.model_config import ModelConfig
from system.schedules import ScheduleConfig, lr_multiplier

PEAK = 3e-4
WARMUP = ScheduleConfig(kind="cosine", warmup_steps=3)
STEPS = 5


def _expected() -> list[float]:
    """The schedule's rate of updates 1..STEPS, computed as the engine's LambdaLR does."""
    return [PEAK * lr_multiplier(WARMUP, s, STEPS) for s in range(STEPS)]


class _Engine:
    """The trainer's duck-typed engine, stepping as DeepSpeed does: at each accumulation
    boundary the optimizer, then the LR scheduler (micro-steps before it do nothing)."""

    def __init__(self, model: torch.nn.Module, accum: int):
        self.model, self.accum, self.micro = model, accum, 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(WARMUP, s, STEPS))
        self._config = SimpleNamespace(gradient_clipping=0.0)

    def __call__(self, ids):
        return self.model(ids)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return None

    def zero_optimization_stage(self):
        return 0


class _Stream:
    """Random token micro-batches (the trainer reads `position` and `state_dict` only)."""

    def __init__(self, vocab: int):
        self.position, self.vocab = 0, vocab

    def next_microbatch(self):
        self.position += 1
        ids = torch.randint(0, self.vocab, (2, 9))
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def state_dict(self):
        return {"position": self.position}


def test_logged_lr_is_the_rate_of_the_steps_own_update(monkeypatch):
    """Two micro-batches a step; step 4's loss is made infinite, so its update is skipped and
    logs the rate it would have used while the schedule still moves on."""
    monkeypatch.setenv("MOEFORGE_FAULT_NONFINITE", "4")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=2, top_k=1,
                                    d_expert=16, vocab_size=50))
    engine = _Engine(model, accum=2)
    used = []  # the param groups' rates at each optimizer update, as the update reads them
    engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(
        {g["lr"] for g in opt.param_groups}))
    stage = SimpleNamespace(grad_accum_steps=2, steps=STEPS, lr_schedule=WARMUP)
    trainer = Trainer(engine=engine, model=model, strategy=ExpertStrategy(None, 1, 0.0), stream=_Stream(50),
                      holdout_batches=dict, stage=stage, balancing=BalancingConfig(), stage_name="s", sinks=[],
                      ckpt=None, manifest_base={})
    recs = [trainer.train_step() for _ in range(STEPS)]
    logged = [r["lr"] for r in recs]
    assert logged[:3] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-12)
    assert logged == _expected()
    assert [r["step_skipped"] for r in recs] == [0, 0, 0, 1, 0]
    # the skipped update never reaches the optimizer (parallel/numerics.py); the others used the logged rate
    assert used == [{lr} for lr, r in zip(logged, recs) if not r["step_skipped"]]


def _run_spying(rank: int, world: int, spec: dict) -> tuple[list[dict], list[tuple[str, float]]]:
    """Run the stage; return rank 0's metric lines and every optimizer update's (group, rate)."""
    from jobs.stage_runner import run_stage
    from system.metrics import read_jsonl

    used: list[tuple[str, float]] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.extend((g.get("name", ""), g["lr"]) for g in opt.param_groups))
    try:  # a kept rank process runs other tests afterwards: the global hook goes
        run_stage(spec, 0)
    finally:
        hook.remove()
    recs = read_jsonl(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "metrics.jsonl") if rank == 0 else []
    return recs, used


@pytest.mark.procs
@pytest.mark.parametrize("strategy,world,zero", [("replicated", 1, 0), ("fssdp", 2, 1)])
def test_deepspeed_stage_logs_the_rate_its_updates_used(tmp_path, strategy, world, zero):
    """DeepSpeed steps the scheduler inside `engine.step()`; with fssdp the expert pool's AdamW
    takes the same rate as the dense groups for the same update."""
    from tests.helpers import tiny_spec

    spec = tiny_spec(tmp_path, run={"name": f"lr-{strategy}"},
                     parallel={"world_size": world, "zero_stage": zero, "expert_strategy": strategy},
                     stages=[{"name": "pretrain", "steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 2,
                              "checkpoint_every": 100, "optimizer": {"lr": PEAK},
                              "lr_schedule": {"kind": "cosine", "warmup_steps": 3}}])
    results = run_distributed(_run_spying, world, spec, timeout_s=240)
    logged = [r["lr"] for r in results[0][0] if "loss" in r]
    assert logged[:3] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-12)
    assert logged == _expected()
    for _, used in results:
        names = {n for n, _ in used}
        for name in names:  # each group (dense ones; fssdp: "expert_sharded") once per update
            assert [lr for n, lr in used if n == name] == logged, name
        assert ("expert_sharded" in names) == (strategy == "fssdp")
