"""Elastic stages (`parallel.elastic`): the world sizes a stage may run at, and its plan at each.

`parallel.world_size` is the size asked for; `parallel.elastic.sizes` lists every size the stage
may run at (the largest is world_size). Ray Train starts between the smallest and the largest
number of workers that live nodes allow (`ScalingConfig(num_workers=(min, max))`); the stage
then runs at the largest allowed size not above the workers it got (`run_size`), keeps the
global batch by changing gradient accumulation, and takes its expert-parallel size from the
rule (`parallel.plan.ep_size`). Every restart resumes from the stage's last checkpoint, which
reshards experts, FSSDP ownership, expert sharding and ZeRO state onto the new size.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from jobs.plan import StagePlan, ep_size


def is_elastic(stage: StagePlan) -> bool:
    return bool(stage.parallel.elastic.sizes)


def run_size(sizes: list[int], workers: int) -> int:
    """The largest allowed size not above `workers` (3 workers with sizes [2, 4] run at 2)."""
    fit = [s for s in sizes if s <= workers]
    if not fit:
        raise ValueError(f"parallel.elastic.sizes {list(sizes)}: {workers} worker(s) are fewer than the smallest size")
    return max(fit)


def stage_at(stage: StagePlan, size: int) -> StagePlan:
    """`stage` at world size `size`: the same global batch (gradient accumulation changes), the
    expert-parallel size by the rule. The stage's own size gives the stage unchanged."""
    if size == stage.world_size:
        return stage
    per = stage.micro_batch_size * size
    if stage.global_batch_size % per:
        raise ValueError(f"stages[{stage.index}]: the global batch of {stage.global_batch_size} sequences does not "
                         f"divide into micro-batches of {stage.micro_batch_size} on {size} ranks")
    par = replace(stage.parallel, world_size=size)
    return replace(stage, parallel=par, world_size=size, ep_size=ep_size(par, size),
                   grad_accum_steps=stage.global_batch_size // per)


def size_problems(stage: StagePlan, max_failures: int) -> Iterator[tuple[str, str]]:
    """Why an elastic stage cannot run at one of its sizes (field, message), and the restarts it
    needs: a lost node is a failure of the worker group, so max_failures must allow one."""
    par = stage.parallel
    where = f"stages[{stage.index}]" if stage.index else "parallel"
    if not par.elastic.sizes:
        return
    if par.elastic.sizes[-1] != stage.world_size:
        yield f"{where}.elastic.sizes", (f"{par.elastic.sizes}: the largest must be the world size asked for "
                                         f"({stage.world_size})")
        return
    if max_failures == 0:
        yield "ray.failure_config.max_failures", ("0: an elastic stage resizes by restarting its workers after a "
                                                  "failure; set it >= 1 (or -1: unlimited)")
    for size in par.elastic.sizes:
        per = stage.micro_batch_size * size
        if stage.global_batch_size % per:
            yield f"{where}.elastic.sizes", (f"size {size}: the global batch of {stage.global_batch_size} sequences "
                                             f"(micro_batch_size {stage.micro_batch_size} x grad_accum_steps "
                                             f"{stage.grad_accum_steps} x {stage.world_size}) does not divide into "
                                             f"micro-batches of {stage.micro_batch_size} on {size} ranks")
            continue
        p = ep_size(replace(par, world_size=size), size)
        if size % p:
            yield f"{where}.expert_parallel_size", f"{p} does not divide elastic size {size}"
        elif stage.model.num_experts % p:
            yield f"{where}.elastic.sizes", (f"size {size}: {stage.model.num_experts} experts do not divide over "
                                             f"its {p} expert-parallel ranks")
