"""Multi-stage pipelines: pretrain -> continual (replay, re-warm, evaluation of forgetting) ->
distill (online and offline teacher), each stage run by the real stage runner and DeepSpeed."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from parallel.testing import run_distributed
from tests.helpers import tiny_spec

pytestmark = pytest.mark.slow

A = {"name": "english_docs", "max_documents": 30}
B = {"name": "python_code", "max_documents": 30}
BASE = {"micro_batch_size": 4, "checkpoint_every": 100, "optimizer": {"lr": 3e-3},
        "lr_schedule": {"kind": "cosine", "warmup_steps": 1}}


def pipeline_spec(tmp_path: Path, name: str, distill: dict, world_continual: int = 2) -> dict:
    spec = tiny_spec(tmp_path, run={"name": name}, data={"sources": [A]}, stages=[])
    spec["stages"] = [
        {"name": "pretrain", **BASE, "steps": 8, "eval_every": 4},
        {"name": "continual", "kind": "continual", "init_from": "pretrain", **BASE, "steps": 6,
         "eval_every": 3, "world_size": world_continual,
         "data": {"sources": [B], "replay": {"fraction": 0.25}}},
        {"name": "distill", "kind": "distill", **BASE, "steps": 4, "eval_every": 2,
         "data": {"sources": [A, B]},
         "model": {"d_model": 16, "n_heads": 2, "d_expert": 16, "d_ff": 32},
         "distill": {"teacher": "continual", **distill}},
    ]
    return spec


def _stage(rank: int, world: int, spec: dict, i: int) -> None:
    from jobs.stage_runner import run_stage
    run_stage(spec, i)


def run_pipeline(spec: dict) -> list[dict]:
    from jobs.plan import plan_job
    from jobs.spec import parse_spec
    from system.metrics import read_jsonl

    plan = plan_job(parse_spec(spec))
    for st in plan.stages:
        if not (plan.run_dir / "stages" / st.name / "DONE.json").is_file():
            run_distributed(_stage, st.world_size, spec, st.index)
    return read_jsonl(plan.run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    spec = pipeline_spec(tmp, "pipe", {"mode": "offline", "top_k": 8, "divergence": "forward_kl"})
    return spec, run_pipeline(spec)


def test_continual_stage_replays_only_consumed_samples_and_logs_the_fraction(offline_run):
    from system.data.replay import load_consumed

    spec, recs = offline_run
    run = Path(spec["run"]["output_dir"]) / "pipe"
    pre, _ = load_consumed(run / "stages" / "pretrain" / "consumed.npz")
    cont, meta = load_consumed(run / "stages" / "continual" / "consumed.npz")
    assert set(pre) == {"english_docs"} and len(pre["english_docs"]) > 0
    # Every English sample the continual stage saw is one the pretraining stage consumed.
    assert "english_docs" in cont and np.isin(cont["english_docs"], pre["english_docs"]).all()
    assert len(cont["python_code"]) > 0
    steps = [r for r in recs if r["stage"] == "continual" and "data/replay_fraction" in r]
    assert len(steps) == 6
    tot = steps[-1]["data/replay_fraction_total"]
    # 6 steps x 8 samples: the block shuffle makes the prefix random; the share is near r.
    assert 0.05 <= tot <= 0.5, tot
    n_replay = sum(r["data/replay_fraction"] * 8 for r in steps)
    assert abs(n_replay / 48 - tot) < 1e-9


def test_continual_stage_evaluates_old_and_new_domains_from_step_zero(offline_run):
    _, recs = offline_run
    cont = [r for r in recs if r["stage"] == "continual" and "eval/english_docs/loss" in r]
    assert [r["step"] for r in cont] == [0, 3, 6]
    first, last = cont[0], cont[-1]
    assert first["cl/forgetting"] == 0.0 and first["cl/adaptation"] == 0.0
    assert last["cl/forgetting"] == pytest.approx(last["eval/english_docs/loss"] - first["eval/english_docs/loss"])
    assert last["cl/adaptation"] == pytest.approx(first["eval/python_code/loss"] - last["eval/python_code/loss"])
    # Training on code lowers the code loss from where the English model started.
    assert last["cl/adaptation"] > 0
    assert "cl/old/gap_depth" in last and "cl/new/gap_depth" in last
    # The pretraining stage evaluated the code domain too (every source of the job).
    pre = [r for r in recs if r["stage"] == "pretrain" and "eval/python_code/loss" in r]
    assert [r["step"] for r in pre] == [0, 4, 8]


def test_offline_distill_stage_trains_from_the_cache(offline_run):
    spec, recs = offline_run
    run = Path(spec["run"]["output_dir"]) / "pipe"
    caches = list((run / "stages" / "distill" / "teacher_topk").glob("*/manifest.json"))
    assert len(caches) == 1
    d = [r for r in recs if r["stage"] == "distill" and "kd" in r]
    assert len(d) == 4
    assert all(r["kd"] > 0 and 0 <= r["agreement"] <= 1 and 0 < r["teacher_missing_mass"] < 1 for r in d)
    ev = [r for r in recs if r["stage"] == "distill" and "eval/python_code/teacher_agreement" in r]
    assert [r["step"] for r in ev] == [0, 2, 4]
    done = json.loads((run / "stages" / "distill" / "DONE.json").read_text())
    assert done["step"] == 4
    from system.checkpoint import read_manifest
    man = read_manifest(Path(done["checkpoint"]))
    assert man["lr_phase"] == "done" and man["lr"] == pytest.approx(3e-4)  # cosine ended at peak/10


def test_offline_cache_holds_exactly_what_the_online_teacher_computes(offline_run):
    """The cache's top-k ids, log-probs and missing mass per chunk equal the online teacher's on
    the same tokens (training and held-out splits), so offline and online train alike."""
    import torch

    from jobs.layout import RunLayout
    from jobs.plan import plan_job
    from jobs.sources import resolve_teacher
    from jobs.spec import parse_spec
    from parallel.teacher import OfflineTeacher, OnlineTeacher, load_teacher
    from system.data import PackedCorpus

    spec, _ = offline_run
    plan = plan_job(parse_spec(spec))
    layout = RunLayout(plan.run_dir)
    corpus = PackedCorpus.build(plan.corpus)
    teacher = resolve_teacher(plan, plan.stages[2], layout)
    model, what = load_teacher(teacher, corpus.tokenizer.vocab_size, corpus.tokenizer.fingerprint,
                               torch.device("cpu"), "distill.teacher")
    assert "continual" in what
    cache = next((layout.stage_dir("distill") / "teacher_topk").glob("*/manifest.json")).parent
    cfg = plan.stages[2].distill
    names = list(corpus.domains)
    off = OfflineTeacher(cfg, names, corpus.train, cache)
    on = OnlineTeacher(cfg, names, model)
    cached_ids = np.asarray(off.arrays[("train", "python_code")]["ids"][:4])
    tokens = torch.from_numpy(np.asarray(corpus.train["python_code"][cached_ids], dtype=np.int64))
    batch = {"input_ids": tokens[:, :-1], "domain": torch.full((4,), names.index("python_code")),
             "chunk": torch.from_numpy(cached_ids)}
    a, b = off.train_teacher(batch), on.train_teacher(batch)
    assert torch.equal(a.idx_NK, b.idx_NK)
    torch.testing.assert_close(a.logp_NK, b.logp_NK, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.rest_logp_N, b.rest_logp_N, rtol=1e-5, atol=1e-5)
    held = next(iter(__import__("system.data", fromlist=["holdout_batches"]).holdout_batches(
        corpus.holdout, "english_docs", 4, 1)))
    student = torch.randn(*held["labels"].shape, corpus.tokenizer.vocab_size)
    assert off.eval_agreement("english_docs", held, student) == on.eval_agreement("english_docs", held, student)


def test_interrupted_continual_stage_resumes_exactly(offline_run, tmp_path, monkeypatch):
    """The continual stage (2 ranks, replay, evaluations) crashes after step 4, the job is run again:
    the finished pretraining is skipped, the stage resumes from its step-3 checkpoint and ends with
    the uninterrupted run's losses, replay share and forgetting / stability-gap metrics."""
    import shutil

    spec, recs = offline_run
    src = Path(spec["run"]["output_dir"]) / "pipe"
    again = copy.deepcopy(spec)
    again["run"].update(name="pipe_resume", output_dir=str(tmp_path / "runs"))
    again["stages"] = again["stages"][:2]
    again["stages"][1]["checkpoint_every"] = 3
    run = tmp_path / "runs" / "pipe_resume"
    shutil.copytree(src / "stages" / "pretrain", run / "stages" / "pretrain")  # finished: skipped
    monkeypatch.setenv("MOEFORGE_FAULT_AT_STEP", "4")
    with pytest.raises(RuntimeError, match="injected fault after step 4"):
        run_pipeline(again)
    monkeypatch.delenv("MOEFORGE_FAULT_AT_STEP")
    got = [r for r in run_pipeline(again) if r["stage"] == "continual"]
    # steps 4.. redone from step 3; the record of the first step 4 is superseded (each step once)
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4, 5, 6]
    want = {r["step"]: r for r in recs if r["stage"] == "continual" and "loss" in r}
    last = got[-1]
    for key in ("loss", "ce", "data/replay_fraction_total", "eval/english_docs/loss", "cl/forgetting",
                "cl/adaptation", "cl/old/gap_depth", "cl/old/gap_step"):
        assert last[key] == pytest.approx(want[6][key], rel=1e-5), key
