"""`moeforge export RUN_DIR [--stage NAME] [--step N] --to DIR`: a run's checkpoint as a Hugging
Face directory (`system.hf.export` writes it; this module finds the checkpoint, the model it
holds and the run's tokenizer)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from jobs.layout import RunLayout
from jobs.plan import StagePlan, plan_job
from system.checkpoint import (CheckpointTensors, is_complete, latest_checkpoint, read_manifest, require_intact,
                               tag_for, valid_checkpoint)


def find_checkpoint(run_dir: Path, stage: Optional[str], step: Optional[int]) -> Path:
    layout = RunLayout(Path(run_dir))
    stages_root = layout.root / "stages"
    if not stages_root.is_dir():
        raise ValueError(f"{run_dir} is not a moeforge run directory (no stages/ in it)")
    names = sorted(p.name for p in stages_root.iterdir() if p.is_dir())
    if stage is None:
        spec_order = _spec_stage_order(layout)
        have = [s for s in spec_order if latest_checkpoint(layout.checkpoints(s)) is not None] or \
            [s for s in names if latest_checkpoint(layout.checkpoints(s)) is not None]
        if not have:
            raise ValueError(f"{run_dir}: no stage has a complete checkpoint")
        stage = have[-1]
    elif stage not in names:
        raise ValueError(f"--stage {stage!r}: the run has stages {names}")
    root = layout.checkpoints(stage)
    if step is None:
        # The newest intact one: a damaged newer checkpoint is named in a warning and skipped.
        ck = valid_checkpoint(root, warn=lambda m: print(f"[moeforge] warning: {m}", flush=True))
        if ck is None:
            raise ValueError(f"stage {stage!r} has no complete checkpoint under {root}")
        return ck
    ck = root / tag_for(step)
    if not is_complete(ck):
        have = sorted(int(p.name[5:]) for p in root.glob("step_*") if is_complete(p))
        raise ValueError(f"--step {step}: stage {stage!r} has no complete checkpoint at that step (it has {have})")
    return require_intact(ck)


def _spec_stage_order(layout: RunLayout) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(layout.spec_file.read_text())
        return [s["name"] for s in data.get("stages", [])]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return []


def _stage_of(ckpt: Path) -> tuple[StagePlan, Any, dict]:
    from jobs.spec import parse_spec

    man = read_manifest(ckpt)
    plan = plan_job(parse_spec(man["spec"], f"{ckpt} manifest", preflight=False))
    return plan.stage(man["stage"]), plan, man


def tokenizer_writer(plan, fingerprint: Optional[str]):
    """A function that saves the run's tokenizer into a directory as a transformers tokenizer."""
    tcfg = plan.corpus.tokenizer

    def write(d: Path) -> dict:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if tcfg.kind == "hf":
            tok = AutoTokenizer.from_pretrained(tcfg.path, local_files_only=True)
        elif tcfg.kind == "byte":
            tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token="<|eos|>")
        else:
            from tokenizers import Tokenizer

            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json(plan, fingerprint)),
                                          eos_token="<|eos|>")
        tok.save_pretrained(str(d))
        return {"bos": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                "eos": tok.eos_token_id}
    return write


def byte_tokenizer():
    """Our byte tokenizer (ids 0-255 the UTF-8 bytes, 256 `<|eos|>`) as a `tokenizers` object:
    a byte-level BPE with the 256 byte symbols and no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|eos|>", special=True)])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _bpe_json(plan, fingerprint: Optional[str]) -> str:
    """The run's trained BPE (cached by the data pipeline), found by its fingerprint."""
    from system.data.dataset import PackedCorpus, default_cache_dir

    want = (fingerprint or "")[4:]
    for f in sorted(default_cache_dir(plan.corpus).glob("tokenizer-bpe-*.json")):
        text = f.read_text(encoding="utf-8")
        if hashlib.sha256(text.encode("utf-8")).hexdigest()[:24] == want:
            return text
    tok = PackedCorpus.build(plan.corpus).tokenizer  # not cached here: rebuild it (deterministic)
    if tok.fingerprint != fingerprint:
        raise ValueError(f"the run's BPE tokenizer {fingerprint} cannot be rebuilt from its data "
                         f"(got {tok.fingerprint}); the data or cache changed since the run")
    return tok.to_json()


def export_run(run_dir: str | Path, to: str | Path, *, stage: Optional[str] = None, step: Optional[int] = None,
               dtype: Optional[str] = None, max_shard_bytes: Optional[int] = None, overwrite: bool = False
               ) -> dict[str, Any]:
    """Export a run's checkpoint (the last stage with one, its newest intact checkpoint, unless
    `stage` / `step` say otherwise) to the Hugging Face directory `to`; the report of
    `system.hf.export.export_tensors`."""
    with _no_accelerator_guess():
        return _export(run_dir, to, stage=stage, step=step, dtype=dtype, max_shard_bytes=max_shard_bytes,
                       overwrite=overwrite)


def _export(run_dir, to, *, stage, step, dtype, max_shard_bytes, overwrite) -> dict[str, Any]:
    from system.hf.export import DEFAULT_MAX_SHARD_BYTES, export_tensors

    ckpt = find_checkpoint(Path(run_dir), stage, step)
    st, plan, man = _stage_of(ckpt)
    if st.parallel.expert_strategy == "deepspeed_moe":
        raise ValueError(f"{ckpt}: export of deepspeed_moe checkpoints is not supported (DeepSpeed's MoE layer "
                         f"keeps its experts under its own names and files); train with replicated, ep or fssdp")
    src = CheckpointTensors(ckpt)
    vocab = int(src.get("embed.weight").shape[0])
    mcfg = replace(st.model, vocab_size=vocab)
    prov = {"run_dir": str(Path(run_dir).absolute()), "stage": st.name, "checkpoint": str(ckpt),
            "expert_strategy": st.parallel.expert_strategy, "tokenizer": man.get("tokenizer")}
    return export_tensors(src.get, mcfg, st.experts.router, to, step=man.get("step"),
                          tokenizer_writer=tokenizer_writer(plan, man.get("tokenizer")), dtype=dtype,
                          max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, provenance=prov,
                          overwrite=overwrite)


class _AcceleratorGuessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


@contextlib.contextmanager
def _no_accelerator_guess():
    """Drop DeepSpeed's one warning that it guessed the CPU accelerator: loading a checkpoint
    imports DeepSpeed's checkpoint classes (`system.safe_load`'s allow-list), whose package
    picks an accelerator at import. Export never uses one (it reads tensors on the CPU)."""
    ds_logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logger configures
    quiet = _AcceleratorGuessFilter()
    ds_logger.addFilter(quiet)
    try:
        yield
    finally:
        ds_logger.removeFilter(quiet)
