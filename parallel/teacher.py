"""The teacher of a `distill` stage: loaded once, run without gradients (online), or run once over
the stage's samples to write its top-k log-probs to disk (offline) and then dropped.

Teacher sources: an earlier stage of the job (its final checkpoint and that stage's model and
experts config), a moeforge checkpoint directory (the config comes from its manifest's spec), or
a local Hugging Face Llama/Qwen2 directory (converted to our dense Transformer).
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from experts.config import ExpertsConfig
from parallel import dist as pdist
from parallel.engine import cast_like_engine
from system.checkpoint import atomic_write_text
from system.distill import TopKTeacher, agreement, teacher_topk
from system.model import ModelConfig, Transformer
from system.upcycle import init_model_from


@dataclass(frozen=True)
class ResolvedTeacher:
    """A distill stage's teacher, resolved by the job: what to load and the model it is.

    `source`: a checkpoint directory (an earlier stage's final one, or a user's) or a Hugging
    Face model directory; `key_ref`: what names it in the offline cache's key; `tokenizer`: the
    tokenizer fingerprint a user checkpoint was trained with (None: this job's, or a HF dir)."""

    source: Path
    model: ModelConfig
    experts: ExpertsConfig
    key_ref: str
    tokenizer: Optional[str] = None


def teacher_dtype(device: torch.device, student_dtype: torch.dtype) -> torch.dtype:
    """The dtype an online teacher runs in: on CUDA the student's compute dtype (bf16 when the stage
    trains in bf16: an fp32 teacher forward, TF32 off as it is by default, would run its matmuls far
    below the GPU's bf16 rate, every micro-batch, for logits the objective reads in fp32 anyway);
    on CPU fp32 whatever the student, so CPU runs (and their golden curves) do not change.
    The offline teacher stays fp32: it runs once, and its cache is reused."""
    return student_dtype if torch.device(device).type == "cuda" else torch.float32


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in: its first floating non-expert parameter's (experts may keep
    fp32 masters in an expert store while the rest trains in bf16)."""
    for p in model.parameters():
        if p.is_floating_point() and not getattr(p, "moeforge_expert", False):
            return p.dtype
    return torch.float32


def load_teacher(teacher: ResolvedTeacher, vocab_size: int, tokenizer_fp: str, device: torch.device,
                 where: str, document_sep_id: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Transformer, str]:
    """The teacher model (eval mode, no gradients) and a string naming exactly what was loaded.
    `dtype`: its parameters' dtype (cast on the host, before the move; buffers stay as they are,
    as in the student: `parallel.engine.cast_like_engine`)."""
    routing_step = 1 << 30  # a DTS teacher routes with its final, hard gate
    if teacher.tokenizer is not None and teacher.tokenizer != tokenizer_fp:
        raise ValueError(f"{where}: {teacher.source} was trained with tokenizer {teacher.tokenizer!r}, this job "
                         f"uses {tokenizer_fp!r}; the teacher must share the student's vocabulary")
    mcfg = teacher.model
    if mcfg.vocab_size is None:
        mcfg = replace(mcfg, vocab_size=vocab_size)
    if mcfg.vocab_size != vocab_size:
        raise ValueError(f"{where}: the teacher predicts over {mcfg.vocab_size} ids, the student over "
                         f"{vocab_size}; distillation compares them token by token")
    model = Transformer(mcfg, teacher.experts, document_sep_id=document_sep_id)  # masked as the student is
    init_model_from(model, teacher.source)
    model.set_routing_step(routing_step)
    cast_like_engine(model, None if dtype == torch.float32 else dtype, keep_experts=False)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return model, (f"{teacher.source} ({n / 1e6:.2f}M parameters, "
                   f"{mcfg.num_experts if mcfg.moe_layer_ids() else 0} experts"
                   + (f", {str(dtype).removeprefix('torch.')}" if dtype != torch.float32 else "") + ")")


class TeacherSource(ABC):
    """What the trainer asks a distill stage's teacher for: the objective's teacher for a
    training micro-batch, and the top-1 agreement of the student on a held-out batch."""

    def __init__(self, cfg, domains: list[str]):
        self.cfg = cfg  # the stage's DistillSection
        self.domains = domains  # the sampler's domain names (batch["domain"] indexes them)

    def objective(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        c = self.cfg
        teacher = self.train_teacher(batch) if c.alpha > 0 else None
        return {"teacher": teacher, "alpha": c.alpha, "temperature": c.temperature,
                "kind": c.divergence, "beta": c.beta}

    @abstractmethod
    def train_teacher(self, batch):
        """The teacher for a training micro-batch: full logits or a TopKTeacher."""

    @abstractmethod
    def eval_agreement(self, domain: str, batch, student_logits: torch.Tensor) -> float:
        """Share of the held-out batch's tokens where the student's top-1 is the teacher's."""


class OnlineTeacher(TeacherSource):
    """Runs the teacher on each batch (full logits, or its top-k when `top_k` is set)."""

    def __init__(self, cfg, domains: list[str], model: Transformer):
        super().__init__(cfg, domains)
        self.model = model
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _teacher(self, input_ids: torch.Tensor):
        logits = self.model(input_ids.to(self.device)).logits_BTV.float()
        if self.cfg.top_k is not None:
            return teacher_topk(logits, min(self.cfg.top_k, logits.shape[-1]), self.cfg.temperature)
        return logits

    def train_teacher(self, batch):
        return self._teacher(batch["input_ids"])

    def eval_agreement(self, domain: str, batch, student_logits: torch.Tensor) -> float:
        return float(agreement(student_logits, self._teacher(batch["input_ids"])))


_FIELDS = ("ids", "idx", "logp", "rest")


class OfflineTeacher(TeacherSource):
    """Teacher top-k log-probs read from a cache written once for the stage's samples.

    The cache holds, per (split, source), the sorted chunk ids it covers and for each chunk the
    teacher's top-k ids (int32), their log-probs and the log of the missing mass (float32), at
    the stage's temperature. Training batches map (sampler domain, chunk) to a source's chunk
    (replay pools through their ids); held-out batches index the holdout split directly.
    """

    def __init__(self, cfg, domains: list[str], views: Mapping[str, Any], cache_dir: Path):
        super().__init__(cfg, domains)
        self.views = views
        self.arrays: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for f in sorted(cache_dir.glob("*__ids.npy")):
            split, src, _ = f.name.split("__")
            self.arrays[(split, src)] = {k: np.load(cache_dir / f"{split}__{src}__{k}.npy", mmap_mode="r")
                                         for k in _FIELDS}

    def _lookup(self, split: str, src: str, chunks: np.ndarray) -> dict[str, np.ndarray]:
        arr = self.arrays.get((split, src))
        if arr is None:
            raise ValueError(f"offline teacher cache has no {split} entries for source {src!r}")
        pos = np.searchsorted(arr["ids"], chunks)
        pos = np.minimum(pos, len(arr["ids"]) - 1)
        if not np.array_equal(arr["ids"][pos], chunks):
            missing = chunks[arr["ids"][pos] != chunks][:5]
            raise ValueError(f"offline teacher cache: {split} chunks {missing.tolist()} of {src!r} are not "
                             "cached (the cache does not match this stage's data)")
        return {k: np.asarray(arr[k][pos]) for k in ("idx", "logp", "rest")}

    def _to_teacher(self, parts: dict[str, np.ndarray]) -> TopKTeacher:
        return TopKTeacher(torch.from_numpy(parts["idx"].astype(np.int64)), torch.from_numpy(parts["logp"]),
                           torch.from_numpy(parts["rest"]), temperature=self.cfg.temperature)

    def train_teacher(self, batch):
        doms = batch["domain"].numpy()
        chunks = batch["chunk"].numpy()
        out: Optional[dict[str, np.ndarray]] = None
        for d in np.unique(doms):
            sel = doms == d
            name = self.domains[int(d)]
            view = self.views[name]
            ids = view.ids[chunks[sel]] if hasattr(view, "ids") else chunks[sel]
            src = getattr(view, "base_name", name)
            got = self._lookup("train", src, ids)
            if out is None:
                out = {k: np.empty((len(doms),) + v.shape[1:], dtype=v.dtype) for k, v in got.items()}
            for k, v in got.items():
                out[k][sel] = v
        return self._to_teacher(out)

    def eval_agreement(self, domain: str, batch, student_logits: torch.Tensor) -> float:
        t = self._to_teacher(self._lookup("holdout", domain, batch["chunk"].numpy()))
        return float(agreement(student_logits, t))


def stage_samples(sampler, views: Mapping[str, Any], total_positions: int) -> dict[str, np.ndarray]:
    """Per source, the sorted chunk ids a stage will draw in its first `total_positions` positions."""
    from system.data.replay import base_chunks

    doms, idxs = sampler.lookup_range(0, total_positions)
    return base_chunks(sampler.domains, views, doms, idxs)


def write_teacher_cache(model: Transformer, cache_dir: Path, work: dict[tuple[str, str], np.ndarray],
                        arrays: Mapping[tuple[str, str], np.ndarray], cfg, batch_size: int, key: str) -> None:
    """Run the teacher over `work` {(split, source): chunk ids} on every rank (rank r takes every
    world-th chunk), gather the parts and write the cache atomically (manifest last)."""
    rank, world = pdist.rank(), pdist.world_size()
    parts_dir = cache_dir.parent / f".{cache_dir.name}.parts"
    if rank == 0:
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True, exist_ok=True)
    pdist.barrier()
    device = next(model.parameters()).device
    mine: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for (split, src), ids in work.items():
            ids = np.asarray(ids, dtype=np.int64)[rank::world]
            acc = {k: [] for k in _FIELDS}
            for b in range(0, len(ids), batch_size):
                sel = ids[b:b + batch_size]
                tokens = torch.from_numpy(np.asarray(arrays[(split, src)][sel], dtype=np.int64))[:, :-1]
                logits = model(tokens.to(device)).logits_BTV.float()
                t = teacher_topk(logits, min(cfg.top_k, logits.shape[-1]), cfg.temperature)
                acc["ids"].append(sel)
                acc["idx"].append(t.idx_NK.to(torch.int32).cpu().numpy())
                acc["logp"].append(t.logp_NK.float().cpu().numpy())
                acc["rest"].append(t.rest_logp_N.float().cpu().numpy())
            for k, v in acc.items():
                if v:
                    mine[f"{split}__{src}__{k}"] = np.concatenate(v)
    np.savez(parts_dir / f"rank{rank}.npz", **mine)
    pdist.barrier()
    if rank == 0:
        tmp = cache_dir.parent / f".{cache_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        loaded = [np.load(parts_dir / f"rank{r}.npz") for r in range(world)]
        for (split, src) in work:
            base = f"{split}__{src}__"
            got = [z for z in loaded if base + "ids" in z.files]
            ids = np.concatenate([z[base + "ids"] for z in got])
            order = np.argsort(ids, kind="stable")
            for k in _FIELDS:
                np.save(tmp / f"{base}{k}.npy", np.concatenate([z[base + k] for z in got])[order])
        for z in loaded:
            z.close()
        atomic_write_text(tmp / "manifest.json", json.dumps({"key": key, "top_k": cfg.top_k,
                                                             "temperature": cfg.temperature}))
        shutil.rmtree(cache_dir, ignore_errors=True)
        tmp.rename(cache_dir)
        shutil.rmtree(parts_dir, ignore_errors=True)
    pdist.barrier()


def cache_is_complete(cache_dir: Path, key: str) -> bool:
    try:
        return json.loads((cache_dir / "manifest.json").read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def build_teacher_source(stage, teacher: ResolvedTeacher, cache_root: Path, corpus, views: Mapping[str, Any],
                         sampler, student: Transformer, eval_domains: list[str]) -> TeacherSource:
    """The stage's teacher: online, or offline with its cache (under `cache_root`) written first
    when missing. `stage` gives the name, steps, batch sizes and the `distill` section."""
    cfg = stage.distill
    device = next(student.parameters()).device
    rank = pdist.rank()
    where = f"stages[{stage.index}].distill.teacher"
    sep = student.document_sep_id
    if cfg.mode == "online":
        model, what = load_teacher(teacher, corpus.tokenizer.vocab_size, corpus.tokenizer.fingerprint, device, where,
                                   sep, dtype=teacher_dtype(device, compute_dtype(student)))
        if rank == 0:
            print(f"[moeforge] stage {stage.name}: teacher {what}, online, {cfg.divergence}"
                  + (f", top-{cfg.top_k}" if cfg.top_k else ", full logits"), flush=True)
        return OnlineTeacher(cfg, sampler.domains, model)
    total = stage.steps * stage.grad_accum_steps * stage.micro_batch_size * pdist.world_size()
    work = {("train", src): ids for src, ids in stage_samples(sampler, views, total).items()}
    for d in eval_domains:
        n = min(len(corpus.holdout[d]), stage.eval_batches * stage.micro_batch_size)
        work[("holdout", d)] = np.arange(n, dtype=np.int64)
    arrays = {("train", s): corpus.train[s] for s in corpus.domains}
    arrays.update({("holdout", s): corpus.holdout[s] for s in corpus.domains})
    key = hashlib.sha256(json.dumps(
        {"teacher": teacher.key_ref, "k": cfg.top_k, "T": cfg.temperature, "tok": corpus.tokenizer.fingerprint,
         "seq": corpus.seq_len, "work": {f"{a}/{b}": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                                         for (a, b), v in sorted(work.items())},
         **({"document_sep_id": sep} if sep is not None else {})}, sort_keys=True).encode()
    ).hexdigest()[:20]
    cache_dir = cache_root / key
    if not cache_is_complete(cache_dir, key):
        model, what = load_teacher(teacher, corpus.tokenizer.vocab_size, corpus.tokenizer.fingerprint, device, where,
                                   sep)
        n = sum(len(v) for v in work.values())
        if rank == 0:
            print(f"[moeforge] stage {stage.name}: writing the teacher's top-{cfg.top_k} log-probs for {n} "
                  f"chunks to {cache_dir} (teacher {what})", flush=True)
        write_teacher_cache(model, cache_dir, work, arrays, cfg, stage.micro_batch_size, key)
        del model
    elif rank == 0:
        print(f"[moeforge] stage {stage.name}: teacher top-{cfg.top_k} log-probs from {cache_dir}", flush=True)
    return OfflineTeacher(cfg, sampler.domains, views, cache_dir)
