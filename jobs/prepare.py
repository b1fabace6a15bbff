"""`moeforge prepare SPEC`: the job's corpus tokenized once into token shards, in parallel Ray
Data tasks on the same embedded or cluster Ray as training (`system.data.prepare` does the work
of each unit). `moeforge run` calls it on the driver before the first stage, so workers only
open the shards (a check by stat)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from system.data.config import DataConfig


def ray_data_units(concurrency: Optional[int] = None, progress: bool = True) -> Callable[[list], list]:
    """A `run_units` for `system.data.prepare`: each unit a Ray Data task (one CPU each, at most
    `concurrency` at once, default: the cluster's CPUs). Finished units are skipped inside the task
    (their markers), so a rerun after a crash redoes only the rest."""

    def run(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import logging

        import ray
        import ray.data
        from tqdm import tqdm

        from system.data.prepare import run_unit

        if len(tasks) == 1:  # no parallelism to gain: skip the dataset's start-up
            return [run_unit(tasks[0])]
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-operator chatter
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours below counts units and input bytes
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = max(1, min(len(tasks), concurrency or cpus))
        tasks = [{**t, "threads": 1} for t in tasks]  # one CPU each (see run_unit)
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(run_unit, concurrency=n, num_cpus=1)
        out = []
        with tqdm(total=len(tasks), unit="shard", disable=not progress, dynamic_ncols=True,
                  desc=f"prepare {Path(tasks[0]['dir']).name.rsplit('-', 1)[0]} ({n} tasks)") as bar:
            for r in ds.iter_rows():
                out.append(r)
                bar.update(1)
                bar.set_postfix_str(f"{sum(x['input_bytes'] for x in out) / 2 ** 20:.0f} MiB in")
        return out

    return run


def prepare_corpus(cfg: DataConfig, *, use_ray: bool = True, concurrency: Optional[int] = None,
                   progress: bool = True, log: Callable[[str], None] = print):
    """Prepare (or check, by stat) every source of `cfg`; returns the opened PackedCorpus."""
    from system.data.dataset import PackedCorpus

    t0 = time.perf_counter()
    run_units = ray_data_units(concurrency, progress) if use_ray else None
    corpus = PackedCorpus.build(cfg, run_units=run_units, log=lambda m: log(f"[moeforge] prepare: {m}"))
    log(f"[moeforge] prepare: {len(corpus.domains)} sources ready in {time.perf_counter() - t0:.1f}s "
        f"({', '.join(f'{d}: {len(corpus.train[d])} train chunks' for d in corpus.domains)})")
    return corpus

