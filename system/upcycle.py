"""Initialise a model from another one's weights: plain loading, sparse upcycling, diversification.

`init_model_from` loads a moeforge checkpoint, a local Hugging Face directory or a state dict
into a `system.model.Transformer`. Equal shapes load as they are. A target MoE layer whose source
is a dense FFN (or a one-expert MoE layer) gets E copies of it as experts and keeps its fresh
router: sparse upcycling (Komatsuzaki et al., arXiv 2212.05055), which starts exactly where the
dense model was. Identical copies only drift apart through the router, so `UpcycleConfig`
can diversify them at initialisation: `copy` (none), `mask` (Drop-Upcycling, arXiv 2502.19261;
also our EvoMoE "expert-diversify") or `noise`. docs/routing.md ("EvoMoE and upcycling as
recipes") has the details and the experiment.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from system.upcycle_config import UpcycleConfig

Source = Union[str, Path, Mapping[str, torch.Tensor]]

_OPTIONAL_MOE_KEYS = ("expert_bias",)  # MoELayer state a source may lack (older checkpoints): keep the init
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def num_reinit_units(d_hidden: int, fraction: float) -> int:
    """Hidden units re-initialised per expert copy by `mask`: round(fraction * F)."""
    return int(round(fraction * d_hidden))


def _normal_like(shape, ref: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mean, std = ref.mean(), ref.std()
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean


@torch.no_grad()
def diversify_experts(w1_DF: torch.Tensor, w3_DF: torch.Tensor, w2_FD: torch.Tensor, num_experts: int,
                      cfg: UpcycleConfig, generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E experts spawned from one SwiGLU FFN: (w1_EDF, w3_EDF, w2_EFD), in the input dtype.

    Inputs are in the experts' layout (x @ w1_DF), i.e. the transposes of nn.Linear weights.
    Randomness comes only from `generator` (a CPU generator; default: a fresh unseeded one)
    and is drawn on the CPU in float32, so every rank given the same seed builds the same experts.
    """
    D, F = w1_DF.shape
    if w3_DF.shape != (D, F) or w2_FD.shape != (F, D):
        raise ValueError(f"FFN shapes disagree: w1 {tuple(w1_DF.shape)}, w3 {tuple(w3_DF.shape)}, "
                         f"w2 {tuple(w2_FD.shape)} (expected (D, F), (D, F), (F, D))")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if cfg.diversify not in ("copy", "mask", "noise"):
        raise ValueError(f"upcycle.diversify {cfg.diversify!r} is not one of ['copy', 'mask', 'noise']")
    _check_config(cfg)
    gen = generator if generator is not None else torch.Generator()
    dtype, E = w1_DF.dtype, num_experts
    src = [w.detach().to("cpu", torch.float32) for w in (w1_DF, w3_DF, w2_FD)]
    w1, w3, w2 = (w.unsqueeze(0).repeat(E, 1, 1) for w in src)
    first = 1 if cfg.keep_first else 0
    if cfg.diversify == "mask":
        n = num_reinit_units(F, cfg.fraction)
        if n:
            for e in range(first, E):
                idx = torch.randperm(F, generator=gen)[:n]
                w1[e][:, idx] = _normal_like((D, n), src[0], gen)
                w3[e][:, idx] = _normal_like((D, n), src[1], gen)
                w2[e][idx, :] = _normal_like((n, D), src[2], gen)
    elif cfg.diversify == "noise" and cfg.noise_std > 0:
        for w, ref in zip((w1, w3, w2), src):
            sd = cfg.noise_std * ref.std()
            for e in range(first, E):
                w[e] += torch.randn(ref.shape, generator=gen, dtype=torch.float32) * sd
    return w1.to(dtype), w3.to(dtype), w2.to(dtype)


def _layer_seed(seed: int, layer: int) -> int:
    # Independent of which other layers are upcycled, and of the order they are visited in.
    return (seed * 1_000_003 + layer * 7919 + 1) % (2 ** 63)


def _load_source(source: Source) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict in our naming, kind, description) of a checkpoint dir, HF dir or state dict."""
    if isinstance(source, Mapping):
        return dict(source), "state_dict", "the given state dict"
    from system.checkpoint import CheckpointCorrupt, is_complete, load_module_weights, resolve_checkpoint
    from system.hf_import import is_hf_model_dir, load_hf_dense_state_dict

    p = Path(source)
    if not is_complete(p) and is_hf_model_dir(p):
        return load_hf_dense_state_dict(p), "huggingface", str(p)
    if not p.exists():
        raise ValueError(f"init source {str(p)!r} does not exist")
    try:
        ckpt = resolve_checkpoint(p)
    except CheckpointCorrupt:
        raise
    except ValueError as e:
        raise ValueError(f"init source {str(p)!r} is neither a moeforge checkpoint nor a Hugging Face "
                         f"model directory (config.json with model_type and weights): {e}") from None
    sd = load_module_weights(ckpt)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd, "moeforge", str(ckpt)


def _expert_rows(blocks, i: int) -> Optional[list[int]]:
    """The experts block i's MoE layer holds when it was built with only some (an ep/fssdp
    rank's own, `GroupedExperts.rows`); None when it holds all of them."""
    ex = getattr(getattr(blocks[i], "ffn", None), "experts", None)
    return list(ex.rows) if getattr(ex, "partial", False) else None


_EXPERT_WEIGHTS = ("experts.w1", "experts.w3", "experts.w2")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_config(cfg: UpcycleConfig) -> None:
    problems = list(cfg.check())
    if problems:
        raise ValueError("invalid upcycle config: " + "; ".join(f"{k}: {m}" for k, m in problems))


@torch.no_grad()
def init_model_from(model: nn.Module, source: Source, upcycle: Optional[UpcycleConfig] = None,
                    seed: int = 0, want_expert=None) -> dict[str, Any]:
    """Load `source` into `model` (a `system.model.Transformer`), upcycling where needed; return
    a JSON-able report (source, kind, loaded keys, upcycled layers and their origin, MoE layers
    loaded as is, keys left at their init, the diversification and seed).

    `source`: a moeforge checkpoint (a directory with moeforge.json, or a root holding them), a
    local Hugging Face directory or a state dict in our naming. A Hugging Face MoE model streams
    into a model of its own shape (`system.hf_import.load_hf_into_model`; `want_expert(layer, e)`
    limits which experts are read). Anything else is matched key by key (`_StateLoader`): equal
    shapes load as is; an MoE layer whose source is a dense FFN or a one-expert MoE gets E experts
    from `diversify_experts` and keeps its fresh router and expert_bias; an MoE source with the
    target's E loads as is. Any other mismatch raises ValueError naming the key, the source and
    the shapes, before anything is written into `model`.
    """
    cfg = upcycle or UpcycleConfig()
    _check_config(cfg)
    seed = cfg.seed if cfg.seed is not None else seed
    if _is_hf_moe_dir(source):
        from system.hf_import import load_hf_into_model

        return load_hf_into_model(model, source, want_expert)
    src, kind, where = _load_source(source)
    loader = _StateLoader(model, src, where)
    loader.load_outside_moe_layers()
    for i in loader.moe_layers:
        loader.load_moe_layer(i, cfg, seed)
    loader.check_every_source_tensor_used()
    model.load_state_dict(loader.state_dict(), strict=True)
    return loader.report(kind, cfg, seed)


def _is_hf_moe_dir(source: Source) -> bool:
    if isinstance(source, Mapping):
        return False
    from system.checkpoint import is_complete
    from system.hf_import import is_hf_moe_dir

    return not is_complete(Path(source)) and is_hf_moe_dir(source)


@dataclass(frozen=True)
class _MoETarget:
    """A target MoE layer: its keys and full shapes. A layer built with only some experts (an
    ep/fssdp rank's own, `rows`) compares full shapes and keeps its rows of what it loads."""

    index: int
    keys: list[str]  # every target key of the layer's FFN, sorted
    E: int
    D: int
    F: int
    rows: Optional[list[int]]
    shapes: dict[str, tuple[int, ...]]  # key -> full shape

    @classmethod
    def of(cls, target: Mapping[str, torch.Tensor], blocks, i: int) -> "_MoETarget":
        pre = f"blocks.{i}.ffn."
        rows = _expert_rows(blocks, i)
        E, D, F = target[pre + "experts.w1"].shape
        if rows is not None:
            E = blocks[i].ffn.experts.num_experts
        full = {pre + w: (E,) + _shape(target[pre + w])[1:] for w in _EXPERT_WEIGHTS}
        keys = sorted(k for k in target if k.startswith(pre))
        return cls(i, keys, E, D, F, rows, {k: full.get(k, _shape(target[k])) for k in keys})

    @property
    def prefix(self) -> str:
        return f"blocks.{self.index}.ffn."

    def mine(self, k: str, t: torch.Tensor) -> torch.Tensor:
        """What this layer keeps of a full tensor for key `k`: its rows of an expert weight."""
        expert_key = k.startswith(self.prefix) and k[len(self.prefix):] in _EXPERT_WEIGHTS
        return t[self.rows] if self.rows is not None and expert_key else t


class _StateLoader:
    """The state dict `init_model_from` builds from one source, step by step, and its report.
    Every check raises before anything is written into the model."""

    def __init__(self, model: nn.Module, src: dict[str, torch.Tensor], where: str):
        self.src, self.where = src, where
        self.target = model.state_dict()
        self.blocks = getattr(model, "blocks", [])
        self.moe_layers = sorted(i for i, b in enumerate(self.blocks) if getattr(b, "is_moe", False))
        self.new: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()  # source keys placed (or deliberately dropped)
        self.loaded: list[str] = []
        self.fresh: list[str] = []  # target keys that keep their init
        self.upcycled: dict[str, str] = {}  # layer index -> "dense" | "moe_1_expert"
        self.moe_as_is: list[int] = []

    def bad(self, key: str, msg: str) -> ValueError:
        return ValueError(f"init from {self.where}: {key}: {msg}")

    def src_has_moe(self, i: int) -> bool:
        return any(k.startswith(f"blocks.{i}.ffn.experts.") or k == f"blocks.{i}.ffn.router.weight"
                   for k in self.src)

    def src_has_dense(self, i: int) -> bool:
        return f"blocks.{i}.ffn.w1.weight" in self.src

    def take(self, k: str, t: torch.Tensor) -> None:
        self.new[k] = t
        self.loaded.append(k)
        self.used.add(k)

    def load_outside_moe_layers(self) -> None:
        """Everything but the MoE layers' FFNs: equal shapes, nothing missing."""
        for k, t in self.target.items():
            m = _BLOCK_RE.match(k)
            if m and int(m.group(1)) in self.moe_layers and m.group(2).startswith("ffn."):
                continue
            if m and m.group(2).startswith("ffn.") and self.src_has_moe(int(m.group(1))):
                raise self.bad(k, f"target layer {m.group(1)} is dense but the source layer is MoE "
                               f"(MoE-to-dense is not supported)")
            if k not in self.src:
                raise self.bad(k, f"missing from the source (target shape {_shape(t)})")
            if _shape(self.src[k]) != _shape(t):
                raise self.bad(k, f"source shape {_shape(self.src[k])} != target shape {_shape(t)}"
                               f"{_shape_hint(k, m)}")
            self.take(k, self.src[k])

    def load_moe_layer(self, i: int, cfg: UpcycleConfig, seed: int) -> None:
        """MoE layer i, whole: loaded as is from an MoE source with the same E, else upcycled."""
        layer = _MoETarget.of(self.target, self.blocks, i)
        spawn = self.spawn_source(layer)
        if spawn is None:
            self.load_moe_as_is(layer)
        else:
            self.upcycle(layer, *spawn, cfg, seed)

    def spawn_source(self, layer: _MoETarget) -> Optional[tuple[tuple[torch.Tensor, ...], str]]:
        """((w1_DF, w3_DF, w2_FD), origin) the layer's experts are spawned from, or None when
        the source layer is an MoE with the target's E > 1 experts (loaded as is)."""
        i, pre, (E, D, F) = layer.index, layer.prefix, (layer.E, layer.D, layer.F)
        if self.src_has_dense(i):
            return self.dense_source(layer), "dense"
        if not self.src_has_moe(i):
            raise self.bad(pre + "experts.w1", f"source has no FFN for layer {i} (neither {pre}w1.weight nor "
                           f"{pre}experts.w1); target shape {(E, D, F)}")
        sk = pre + "experts.w1"
        if sk not in self.src:
            raise self.bad(sk, f"source MoE layer {i} has no stacked expert weights")
        es = self.src[sk].shape[0]
        if es == E and es > 1:
            return None
        if es == 1:
            return self.one_expert_source(layer), "moe_1_expert"
        raise self.bad(sk, f"source has {es} experts {_shape(self.src[sk])}, target has {E} {(E, D, F)}: "
                       f"only a dense FFN, a one-expert MoE or an MoE with the same number of experts "
                       f"can initialise an MoE layer")

    def dense_source(self, layer: _MoETarget) -> tuple[torch.Tensor, ...]:
        """The source's dense FFN of the layer, in the experts' layout (the nn.Linear transposes)."""
        i, pre, (E, D, F) = layer.index, layer.prefix, (layer.E, layer.D, layer.F)
        dense = {n: pre + f"{n}.weight" for n in ("w1", "w3", "w2")}
        for n, k in dense.items():
            if k not in self.src:
                raise self.bad(k, f"the dense source layer {i} has no {n}")
        s1, s3, s2 = (self.src[dense[n]] for n in ("w1", "w3", "w2"))
        if _shape(s1)[1:] != (D,) or _shape(s3) != _shape(s1) or _shape(s2) != (D, _shape(s1)[0]):
            raise self.bad(pre + "w1.weight", f"source dense FFN shapes w1 {_shape(s1)}, w3 {_shape(s3)}, "
                           f"w2 {_shape(s2)} do not fit d_model {D} of target {pre}experts.w1 {(E, D, F)}")
        if s1.shape[0] != F:
            raise self.bad(pre + "w1.weight", f"source shape {_shape(s1)} (d_ff {s1.shape[0]}) cannot be "
                           f"upcycled into target {pre}experts.w1 {(E, D, F)}: dense-to-MoE upcycling needs "
                           f"d_ff of the source == d_expert of the target ({s1.shape[0]} != {F})")
        self.used.update(dense.values())
        extra = [k for k in self.src if k.startswith(pre) and k not in dense.values()]
        if extra:
            raise self.bad(extra[0], f"source layer {i} mixes a dense FFN with other ffn tensors {extra}")
        return s1.t(), s3.t(), s2.t()

    def one_expert_source(self, layer: _MoETarget) -> tuple[torch.Tensor, ...]:
        """The one expert of the source's MoE layer; its router and bias are dropped."""
        i, pre, (E, D, F) = layer.index, layer.prefix, (layer.E, layer.D, layer.F)
        s = {n: self.src.get(pre + f"experts.{n}") for n in ("w1", "w3", "w2")}
        for n, t in s.items():
            if t is None:
                raise self.bad(pre + f"experts.{n}", f"missing from source MoE layer {i}")
        if _shape(s["w1"]) != (1, D, F) or _shape(s["w3"]) != (1, D, F) or _shape(s["w2"]) != (1, F, D):
            raise self.bad(pre + "experts.w1", f"source one-expert shapes w1 {_shape(s['w1'])}, w3 "
                           f"{_shape(s['w3'])}, w2 {_shape(s['w2'])} do not fit target {(E, D, F)} / {(E, F, D)}")
        self.used.update(k for k in self.src if k.startswith(pre))
        return s["w1"][0], s["w3"][0], s["w2"][0]

    def load_moe_as_is(self, layer: _MoETarget) -> None:
        """An MoE source layer with the target's E: every tensor of equal (full) shape."""
        for k in layer.keys:
            if k in self.src:
                if _shape(self.src[k]) != layer.shapes[k]:
                    raise self.bad(k, f"source shape {_shape(self.src[k])} != target shape {layer.shapes[k]}")
                self.take(k, layer.mine(k, self.src[k]))
            elif k.rsplit(".", 1)[-1] in _OPTIONAL_MOE_KEYS:
                self.fresh.append(k)
            else:
                raise self.bad(k, f"missing from the source (target shape {layer.shapes[k]})")
        extra = [k for k in self.src if k.startswith(layer.prefix) and k not in self.target]
        if extra:
            raise self.bad(extra[0], f"source tensor has no counterpart in the target MoE layer {layer.index}")
        self.moe_as_is.append(layer.index)

    def upcycle(self, layer: _MoETarget, ws: tuple[torch.Tensor, ...], origin: str, cfg: UpcycleConfig,
                seed: int) -> None:
        """E experts from one FFN (`diversify_experts`); router, expert_bias, ... keep their init."""
        gen = torch.Generator().manual_seed(_layer_seed(seed, layer.index))
        w1, w3, w2 = diversify_experts(*ws, layer.E, cfg, gen)  # all E (the same draws on every rank)
        for w, t in zip(_EXPERT_WEIGHTS, (w1, w3, w2)):
            self.new[layer.prefix + w] = layer.mine(layer.prefix + w, t)
        self.fresh.extend(k for k in layer.keys if k not in self.new)
        self.upcycled[str(layer.index)] = origin

    def check_every_source_tensor_used(self) -> None:
        unused = sorted(set(self.src) - self.used)
        if unused:
            k = unused[0]
            raise self.bad(k, f"source tensor {_shape(self.src[k])} has no place in the target model"
                           + (f" (and {len(unused) - 1} more: {unused[1:6]})" if len(unused) > 1 else "")
                           + (" -- set model.qkv_bias: true" if k.endswith("attn.qkv.bias") else ""))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict to load: what was placed, and the target's own init elsewhere."""
        for k in self.fresh:
            self.new[k] = self.target[k]
        missing = set(self.target) - set(self.new)
        assert not missing, missing  # every target key was handled above
        return self.new

    def report(self, kind: str, cfg: UpcycleConfig, seed: int) -> dict[str, Any]:
        return {
            "source": self.where,
            "kind": kind,
            "loaded": self.loaded,
            "upcycled_layers": self.upcycled,
            "moe_layers_loaded": self.moe_as_is,
            "kept_init": sorted(self.fresh),
            "num_experts": {str(i): int(getattr(self.blocks[i].ffn.experts, "num_experts", None)
                                        or self.target[f"blocks.{i}.ffn.experts.w1"].shape[0])
                            for i in self.moe_layers},
            "upcycle": asdict(cfg),
            "seed": seed,
        }


def _shape_hint(k: str, m: Optional[re.Match]) -> str:
    """Which model fields to check when a non-MoE tensor's shape differs."""
    if k.endswith("attn.qkv.weight"):
        return " (check d_model, n_heads and n_kv_heads)"
    if m and m.group(2).startswith("ffn.w"):
        return " (check d_ff)"
    return ""
