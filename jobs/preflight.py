"""Pre-flight: the checks of a job spec that read files, run before anything launches.

`jobs.validate` holds the pure cross-field rules; this module looks at the disk: data files and
a sample of each source's documents (read by prepare's own reader), the tokenizer directory (it
must load), `init_from` and teacher directories, a Hugging Face `config.json`'s compatibility
with the stage's model, and a teacher checkpoint's vocabulary from its manifest.
`moeforge validate` and `moeforge run` run it on the driver; workers do not repeat it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from jobs.schema import JobSpec
from jobs.spec_build import parse_offline
from jobs.validate import stage_cfgs, stage_vocab_size, vocab_problem
from system.configtree import SpecError
from system.data.config import SourceConfig, TokenizerConfig

Problems = Iterator[tuple[str, str]]


def preflight(spec: JobSpec) -> Problems:
    """Every problem the files show: per stage its init_from, data sources and teacher, then the
    top-level sources and the tokenizer directory."""
    names = [s.name for s in spec.stages]
    for i, st in enumerate(spec.stages):
        p = f"stages[{i}]"
        earlier = names[:i]
        if st.init_from is not None and st.init_from not in names and not Path(st.init_from).is_dir():
            yield f"{p}.init_from", (f"{st.init_from!r} is neither an earlier stage "
                                     f"({earlier or 'none'}) nor an existing checkpoint directory")
        if st.data.sources is not None:
            yield from _check_sources(st.data.sources, f"{p}.data.sources")
        if st.init_from is not None and st.init_from not in names:
            yield from _check_hf_init(spec, i)
        t = st.distill.teacher if st.kind == "distill" else None
        if t and t not in names:
            if not Path(t).is_dir():
                yield f"{p}.distill.teacher", (f"{t!r} is neither an earlier stage ({earlier or 'none'}) "
                                               "nor an existing checkpoint or Hugging Face model directory")
            else:
                yield from _check_teacher_dir(spec, i, t)
    yield from _check_sources(spec.data.sources, "data.sources")
    tok = spec.data.tokenizer
    if tok.kind == "hf" and tok.path:
        if not Path(tok.path).is_dir():
            yield "data.tokenizer.path", f"{tok.path!r} is not a directory"
        else:
            yield from _check_tokenizer(tok)


def _check_sources(sources: list[SourceConfig], path: str) -> Problems:
    for j, src in enumerate(sources):
        problems = list(_check_paths(src, f"{path}[{j}]"))
        yield from problems
        if not problems:
            yield from _check_sample(src, f"{path}[{j}]")


def _check_paths(src: SourceConfig, p: str) -> Problems:
    for k, f in enumerate(src.paths):
        if not Path(f).exists():
            yield f"{p}.paths[{k}]", f"{f!r} does not exist"
        elif src.kind == "hf_dataset" and not (Path(f) / "state.json").is_file():
            yield f"{p}.paths[{k}]", f"{f!r} is not a Hugging Face save_to_disk directory (no state.json)"
        elif src.kind == "tokens" and Path(f).suffix != ".npy" and Path(f).stat().st_size % \
                np.dtype(src.token_dtype).itemsize:
            yield f"{p}.paths[{k}]", (f"{f!r} has {Path(f).stat().st_size} bytes, not a whole "
                                      f"number of {src.token_dtype} tokens (token_dtype)")
    for k, f in enumerate(src.doc_offsets or []):
        if not Path(f).is_file():
            yield f"{p}.doc_offsets[{k}]", f"{f!r} does not exist"


def _check_sample(src: SourceConfig, p: str) -> Problems:
    """The first documents of the source's first file, read by prepare's own reader (bounded:
    `system.data.units.sample_documents`), so a wrong kind or text_field, non-string values or
    an empty file is a spec error here rather than a traceback once the job has started."""
    from system.data.corpus import SourceFormatError
    from system.data.units import sample_documents

    try:
        sample_documents(src)
    except SourceFormatError as e:
        yield f"{p}.{'paths[0]' if e.field == 'paths' else e.field}", str(e)
    except Exception as e:  # noqa: BLE001 - whatever stops the reader would stop prepare: report it
        yield f"{p}.paths[0]", f"{src.paths[0]!r} cannot be read as {src.kind} ({type(e).__name__}: {e})"


def _check_tokenizer(tok: TokenizerConfig) -> Problems:
    """The tokenizer directory loads as prepare will load it (and defines an eos token)."""
    from system.data.tokenizer import build_tokenizer

    try:
        build_tokenizer(tok, lambda: (), Path("."))  # kind hf: loads the directory; nothing is trained or cached
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad directory
        msg = str(e) if isinstance(e, ValueError) else (f"{tok.path!r}: cannot load a tokenizer from it "
                                                        f"({type(e).__name__}: {e})")
        yield "data.tokenizer.path", (f"{msg} (expected a directory written by save_pretrained: "
                                      "tokenizer.json or tokenizer_config.json with its vocabulary)")


def _check_hf_init(spec: JobSpec, i: int) -> Problems:
    from system.hf_import import check_hf_compat, is_hf_model_dir

    ref = spec.stages[i].init_from
    mcfg, ecfg = stage_cfgs(spec, i)
    if mcfg is None or not (Path(ref).is_dir() and is_hf_model_dir(ref)):
        return
    from jobs.validate import stage_strategy
    from system.hf_import import is_hf_moe_dir

    if stage_strategy(spec, i) == "deepspeed_moe" and is_hf_moe_dir(ref):
        yield f"stages[{i}].init_from", (f"{ref} is a Hugging Face MoE model: import it with expert_strategy "
                                         f"replicated, ep or fssdp (DeepSpeed's MoE layer names its experts its own way)")
        return
    try:
        hf_problems = check_hf_compat(ref, mcfg, ecfg)
    except ValueError as e:
        hf_problems = [("", str(e))]
    for _key, msg in hf_problems:
        yield f"stages[{i}].init_from", msg


def teacher_dir_vocab(ref: str) -> tuple[Optional[int], str]:
    """(vocabulary, where it was read) of a teacher directory: a HF model's config.json or a
    checkpoint's manifest spec; raises ValueError/KeyError/OSError/SpecError when unreadable."""
    from system.checkpoint import read_manifest, resolve_checkpoint
    from system.hf_import import hf_model_config_fields, is_hf_model_dir

    if is_hf_model_dir(ref):
        return hf_model_config_fields(ref).get("vocab_size"), f"{ref}/config.json"
    ck = resolve_checkpoint(ref)
    man = read_manifest(ck)
    tspec = parse_offline(man["spec"], f"{ck}/manifest spec")  # its data may have moved since
    tnames = [s.name for s in tspec.stages]
    if man.get("stage") not in tnames:
        return None, ""
    return stage_vocab_size(tspec, tnames.index(man["stage"])), f"checkpoint {ck}"


def _check_teacher_dir(spec: JobSpec, i: int, ref: str) -> Problems:
    try:
        teacher, where = teacher_dir_vocab(ref)
    except (ValueError, KeyError, OSError, SpecError) as e:
        yield f"stages[{i}].distill.teacher", f"{ref!r} cannot be read as a teacher: {e}"
        return
    yield from vocab_problem(spec, i, teacher, where)
