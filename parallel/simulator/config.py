"""The simulator's typed config: the YAML sections cluster, model, load, fssdp and sim.

Built with the project's `system.configtree` (unknown keys, wrong types and out-of-range values
are `SpecError`s naming the dotted field, e.g. `cluster.gpus: 300 is outside 8..256`).

The `model` section is `SimModelConfig`, not the training `system.model.ModelConfig`: its keys
describe a layer count and a cost model (`moe_layers` is the number of MoE layers L and
`moe_every` their spacing, where the training config's `moe_layers` selects layer indices;
`experts`, `matrices`, byte sizes, `seq_len`, `attention_time_ms`), and `system.model` imports
torch, which this GPU-free simulator must not need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from system.configtree import SpecError, build_dataclass

POLICIES = ("ep", "fssdp", "fssdp_remat", "fastermoe", "zero3")


@dataclass
class ClusterConfig:
    gpus: int = 32  # N, 8..256
    gpus_per_node: int = 8  # G
    nvlink_bandwidth: float = 150e9  # bytes/s a GPU sends (and receives) inside its node
    internode_bandwidth: float = 25e9  # bytes/s a GPU sends (and receives) across nodes (its NIC)
    nvlink_alpha: float = 5e-6  # seconds per message inside a node
    internode_alpha: float = 10e-6  # seconds per message across nodes
    flops: float = 150e12  # sustained dense flop/s of one GPU

    def check(self):
        if not 8 <= self.gpus <= 256:
            yield "gpus", f"{self.gpus} is outside 8..256"
        if self.gpus_per_node < 1:
            yield "gpus_per_node", f"{self.gpus_per_node} must be >= 1"
        elif self.gpus % min(self.gpus, self.gpus_per_node):
            yield "gpus_per_node", f"gpus={self.gpus} is not a multiple of gpus_per_node={self.gpus_per_node}"
        for k in ("nvlink_bandwidth", "internode_bandwidth", "flops"):
            if getattr(self, k) <= 0:
                yield k, f"{getattr(self, k)} must be > 0"
        for k in ("nvlink_alpha", "internode_alpha"):
            if getattr(self, k) < 0:
                yield k, f"{getattr(self, k)} must be >= 0"


@dataclass
class SimModelConfig:
    """The simulated MoE layers and the shape of the compute around them (see the module doc)."""

    d_model: int = 1024  # H
    d_expert: int = 4096  # F, hidden size of one expert
    experts: int = 64  # E per MoE layer
    top_k: int = 2
    moe_layers: int = 12  # L
    matrices: int = 3  # 3: SwiGLU expert (gate, up, down); 2: GELU expert
    bytes_per_param: int = 2  # bf16 parameters and gradients
    bytes_per_activation: int = 2  # bf16 tokens in the all-to-all
    seq_len: int = 1024  # for the attention flops when attention_time_ms is null
    attention_time_ms: Optional[float] = None  # forward time of the non-MoE compute before each MoE layer
    moe_every: int = 1  # a MoE layer every k transformer blocks (the others have a dense FFN)
    d_ffn_dense: Optional[int] = None  # hidden size of those dense FFNs (null: d_expert)

    def check(self):
        for k in ("d_model", "d_expert", "experts", "top_k", "moe_layers", "bytes_per_param",
                  "bytes_per_activation", "seq_len", "moe_every"):
            if getattr(self, k) < 1:
                yield k, f"{getattr(self, k)} must be >= 1"
        if self.top_k > self.experts:
            yield "top_k", f"{self.top_k} is more than experts={self.experts}"
        if self.matrices not in (2, 3):
            yield "matrices", f"{self.matrices} is not 2 or 3"
        if self.attention_time_ms is not None and self.attention_time_ms < 0:
            yield "attention_time_ms", f"{self.attention_time_ms} must be >= 0"
        if self.d_ffn_dense is not None and self.d_ffn_dense < 1:
            yield "d_ffn_dense", f"{self.d_ffn_dense} must be >= 1"


@dataclass
class LoadConfig:
    kind: str = "zipf"  # zipf | uniform | trace
    tokens_per_gpu: int = 8192  # tokens each GPU routes per MoE layer and iteration (each to top_k experts)
    zipf_s: float = 1.0  # expert of popularity rank j gets a share proportional to (j+1)^-s
    drift: float = 0.5  # mean number of adjacent swaps in each layer's expert ranking per iteration
    trace: Optional[str] = None  # metrics.jsonl (or its run directory) with moe/<i>/tokens_per_expert
    trace_scale: bool = True  # rescale trace counts to tokens_per_gpu; false: split the trace's own counts
    seed: int = 0

    def check(self):
        if self.kind not in ("zipf", "uniform", "trace"):
            yield "kind", f"{self.kind!r} is not one of ['zipf', 'uniform', 'trace']"
        if self.kind == "trace" and not self.trace:
            yield "trace", "load.kind is 'trace' but no trace file is given"
        if self.tokens_per_gpu < 1:
            yield "tokens_per_gpu", f"{self.tokens_per_gpu} must be >= 1"
        if self.zipf_s < 0:
            yield "zipf_s", f"{self.zipf_s} must be >= 0"
        if self.drift < 0:
            yield "drift", f"{self.drift} must be >= 0"


@dataclass
class FSSDPKnobs:
    window: int = 5  # w: iterations the load prediction averages
    overlap_budget: Optional[int] = None  # t; null: placement.overlap_budget(attention, bandwidth, expert bytes)
    overlap_bandwidth: Optional[float] = None  # bytes/s for that derivation; null: see docs/simulator.md
    memory_cap: int = 2  # m: extra experts a rank may hold per layer
    reshard_every: int = 100  # heterogeneous sharding (Algorithm 2) period in iterations; 0: never
    rematerialize: bool = True  # also simulate fssdp_remat when sim.policies is not given
    tolerance: Optional[float] = None  # no copies while owners are within this of the mean load; null: planner default
    spag: str = "p2p"  # p2p: owner sends to every holder (parallel/collectives.py); broadcast: pipelined chain (Hecate)
    sprs_overlap: bool = True  # spRS hidden behind the backward attention (Hecate); false: after the backward

    def check(self):
        if self.window < 1:
            yield "window", f"{self.window} must be >= 1"
        if self.overlap_budget is not None and self.overlap_budget < 0:
            yield "overlap_budget", f"{self.overlap_budget} must be >= 0"
        if self.overlap_bandwidth is not None and self.overlap_bandwidth <= 0:
            yield "overlap_bandwidth", f"{self.overlap_bandwidth} must be > 0"
        if self.memory_cap < 0:
            yield "memory_cap", f"{self.memory_cap} must be >= 0"
        if self.reshard_every < 0:
            yield "reshard_every", f"{self.reshard_every} must be >= 0"
        if self.tolerance is not None and self.tolerance < 0:
            yield "tolerance", f"{self.tolerance} must be >= 0"
        if self.spag not in ("p2p", "broadcast"):
            yield "spag", f"{self.spag!r} is not one of ['p2p', 'broadcast']"


@dataclass
class RunConfig:
    iterations: int = 50
    policies: Optional[list[str]] = None  # null: all (fssdp_remat only if fssdp.rematerialize)

    def check(self):
        if self.iterations < 1:
            yield "iterations", f"{self.iterations} must be >= 1"
        for i, p in enumerate(self.policies or []):
            if p not in POLICIES:
                yield f"policies[{i}]", f"{p!r} is not one of {list(POLICIES)}"


@dataclass
class SimConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: SimModelConfig = field(default_factory=SimModelConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    fssdp: FSSDPKnobs = field(default_factory=FSSDPKnobs)
    sim: RunConfig = field(default_factory=RunConfig)

    def check(self):
        N, E = self.cluster.gpus, self.model.experts
        if self.load.kind != "trace" and E % N and N % E:
            yield "model.experts", (f"experts={E} and gpus={N}: one must divide the other "
                                    f"(E/N experts per GPU, or expert groups of E GPUs)")

    def policies(self) -> list[str]:
        if self.sim.policies:
            return list(dict.fromkeys(self.sim.policies))
        return [p for p in POLICIES if p != "fssdp_remat" or self.fssdp.rematerialize]


def config_from_dict(data: Any, overrides: Optional[dict[str, Any]] = None, source: str = "simulate config") -> SimConfig:
    """Validated config from plain data; `overrides` maps dotted paths ("cluster.gpus") to values.

    Raises `SpecError` (a ValueError) whose message names every bad field's dotted path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([("", f"the config must be a mapping, not {type(data).__name__}")], source)
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for path, value in (overrides or {}).items():
        d = data
        *parents, leaf = path.split(".")
        for p in parents:
            if not isinstance(d.get(p), dict):
                d[p] = {}
            d = d[p]
        d[leaf] = value
    problems: list[tuple[str, str]] = []
    cfg = build_dataclass(SimConfig, data, "", problems)
    if problems:
        raise SpecError(problems, source)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> SimConfig:
    import yaml

    data: Any = {}
    source = "simulate config"
    if path:
        p = Path(path)
        if not p.is_file():
            raise SpecError([("", f"config file {path!r} does not exist")], path)
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError([("", f"YAML syntax error: {e}")], path) from None
        source = path
    return config_from_dict(data, overrides, source)
