"""Trainer callbacks (parallel/callbacks.py): a user's callback sees every hook of a step in the
documented order, can replace the loss before the backward (an Inf one skips the update), adds its
figures to the record after the built-in ones, and can ask every rank to stop."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from experts.config import BalancingConfig
from parallel.callbacks import Callback, FaultInjection
from parallel.moe_callback import MoEBalancing
from parallel.strategy import ExpertStrategy
from parallel.trainer import Trainer
from system.model import Transformer
from system.model_config import ModelConfig
from tests.parallel.test_logged_lr import _Engine, _Stream


class _Recorder(Callback):
    def __init__(self):
        self.calls: list[str] = []
        self.stop = False

    def begin_step(self, ctx):
        self.calls.append(f"begin {ctx.step} {len(ctx.batches)}")

    def loss_inputs(self, ctx, batch):
        self.calls.append("loss_inputs")
        return {}

    def before_backward(self, ctx, loss, parts):
        self.calls.append("before_backward")
        if ctx.step == 2:  # an Inf loss: the update must be skipped on this step
            return loss * math.inf, {**parts, "loss": (loss * math.inf).detach()}
        return loss, parts

    def after_micro_batch(self, ctx):
        self.calls.append("after_micro_batch")

    def after_optimizer_step(self, ctx):
        self.calls.append(f"after_optimizer_step skipped={ctx.skipped} counts={ctx.step_counts_LE is not None}")

    def stop_requested(self):
        self.calls.append("stop_requested")
        return self.stop

    def step_metrics(self, ctx):
        return {"mine/tokens": float(ctx.tokens_local)}


def test_a_callback_sees_the_step_in_order_and_shapes_it():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=2, top_k=1,
                                    d_expert=16, vocab_size=50))
    rec_cb = _Recorder()
    trainer = Trainer(engine=_Engine(model, accum=2), model=model, strategy=ExpertStrategy(None, 1, 0.0),
                      stream=_Stream(50), holdout_batches=dict, stage=SimpleNamespace(grad_accum_steps=2, steps=3),
                      balancing=BalancingConfig(), stage_name="s", sinks=[], ckpt=None, manifest_base={},
                      callbacks=[rec_cb])
    assert [type(c) for c in trainer.callbacks] == [MoEBalancing, FaultInjection, _Recorder]

    first = trainer.train_step()
    micro = ["loss_inputs", "before_backward", "after_micro_batch"]
    assert rec_cb.calls == ["begin 1 2", *micro, *micro, "after_optimizer_step skipped=False counts=True",
                            "stop_requested"]
    keys = list(first)
    assert keys[-1] == "mine/tokens" and first["mine/tokens"] == 2 * 2 * 8  # 2 micro x batch 2 x 8 tokens
    assert keys.index("moe/0/max_over_mean") < keys.index("mine/tokens")  # built-in figures first
    assert not trainer.stop_agreed

    weights = [p.detach().clone() for p in model.parameters()]
    second = trainer.train_step()
    assert second["step_skipped"] == 1.0 and math.isinf(second["loss"])
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))  # nothing moved
    assert rec_cb.calls[-2] == "after_optimizer_step skipped=True counts=True"

    rec_cb.stop = True
    third = trainer.train_step()
    assert trainer.stop_agreed and third["step_skipped"] == 0.0 and trainer.state.step == 3
