"""The simulator's typed config: the YAML sections cluster, model, cost_model, load, fssdp and sim.

Built with the project's `system.configtree` (unknown keys, wrong types and out-of-range values
are `SpecError`s naming the dotted field, e.g. `cluster.gpus: 300 is outside 8..256`).

The `model` section is the training model config, `system.model_config.ModelConfig` (torch-free):
the simulator reads its d_model, num_experts, top_k, d_expert, d_ff (the dense blocks' FFN) and
n_layers with the moe_layers pattern, which must space the MoE layers evenly (`moe_spacing`: L
MoE layers, one closing every k-th block); its other keys are validated and otherwise unused.
Keys the model section leaves out take `MODEL_DEFAULTS` (a Hecate-like GPT-MoE), not the
training defaults. What only the cost model needs is `cost_model` (`CostModelConfig`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from system.configtree import SpecError, build_dataclass
from system.model_config import ModelConfig

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
    # P: ranks of one expert-parallel group (groups of P consecutive ranks, each holding every expert
    # once; the N/P groups average expert gradients). null: all GPUs, or E when gpus > num_experts
    expert_parallel_size: Optional[int] = None

    def check(self):
        if not 8 <= self.gpus <= 256:
            yield "gpus", f"{self.gpus} is outside 8..256"
        if self.gpus_per_node < 1:
            yield "gpus_per_node", f"{self.gpus_per_node} must be >= 1"
        elif self.gpus % min(self.gpus, self.gpus_per_node):
            yield "gpus_per_node", f"gpus={self.gpus} is not a multiple of gpus_per_node={self.gpus_per_node}"
        P, G = self.expert_parallel_size, self.gpus_per_node
        if P is not None:
            if P < 1:
                yield "expert_parallel_size", f"{P} must be >= 1"
            elif self.gpus % P:
                yield "expert_parallel_size", f"{P} does not divide gpus={self.gpus} (groups of P consecutive GPUs)"
            elif G >= 1 and P % G and G % P:
                yield "expert_parallel_size", (f"{P} is neither a divisor nor a multiple of gpus_per_node={G}: "
                                               f"the groups would not all have the same node layout")
        for k in ("nvlink_bandwidth", "internode_bandwidth", "flops"):
            if getattr(self, k) <= 0:
                yield k, f"{getattr(self, k)} must be > 0"
        for k in ("nvlink_alpha", "internode_alpha"):
            if getattr(self, k) < 0:
                yield k, f"{getattr(self, k)} must be >= 0"


# the simulated model where the config's model section is silent (ModelConfig's own defaults are
# a toy training model)
MODEL_DEFAULTS: dict[str, Any] = {"d_model": 1024, "n_layers": 12, "moe_layers": "all", "num_experts": 64,
                                  "top_k": 2, "d_expert": 4096, "d_ff": 4096}

# keys of the former simulator-only model section, and where they went
RENAMED = {
    "experts": "model.num_experts",
    "moe_every": "model.moe_layers: every_K, with model.n_layers = (MoE layers) x K",
    "d_ffn_dense": "model.d_ff",
    **{k: f"cost_model.{k}" for k in ("matrices", "bytes_per_param", "bytes_per_activation", "seq_len",
                                      "attention_time_ms")},
}


def moe_spacing(model: ModelConfig) -> tuple[int, int]:
    """(L, k): the number of MoE layers and their spacing, a MoE layer closing every k-th block.

    The cost model prices every MoE layer alike, behind k blocks of attention and k-1 dense FFNs,
    so the pattern must be 'all', 'every_k' with n_layers a multiple of k, or the same as a list.
    Raises ValueError otherwise (and for a pattern ModelConfig.check rejects).
    """
    ids = model.moe_layer_ids()
    n, spec = model.n_layers, model.moe_layers
    if not ids:
        raise ValueError(f"{spec!r} leaves no MoE layer to simulate")
    k = n // len(ids)
    if n == k * len(ids) and ids == list(range(k - 1, n, k)):
        return len(ids), k
    if isinstance(spec, str):  # every_k with n_layers not a multiple of k
        k = int(spec[6:])
        raise ValueError(f"{spec} with n_layers={n} ends in {n % k} dense block(s) after the last MoE layer; "
                         f"the simulator prices {k} blocks per MoE layer: make n_layers a multiple of {k}")
    raise ValueError(f"MoE layers {ids} of n_layers={n} are not evenly spaced with one closing every k-th "
                     f"block ('all', 'every_k' or that list), and the simulator prices every MoE layer alike")


DTYPE_BYTES = {"bf16": 2, "fp32": 4}
SPAG_MODES = ("chain", "p2p", "broadcast")
GATHER_OVERLAP = ("first_round", "full")


@dataclass
class CostModelConfig:
    """What the cost model needs besides the model's shapes (see docs/simulator.md)."""

    matrices: int = 3  # 3: SwiGLU expert (gate, up, down); 2: GELU expert
    # the training dtype: what spAG/spRS, the expert-data-parallel all-reduce and the all-to-all send
    # (training keeps fp32 masters on the owner and sends bf16 when it trains in bf16)
    dtype: str = "bf16"  # bf16 | fp32
    bytes_per_param: Optional[int] = None  # parameters and gradients on the wire; null: from dtype (2 | 4)
    bytes_per_activation: Optional[int] = None  # tokens in the all-to-all; null: from dtype (2 | 4)
    seq_len: int = 1024  # for the attention flops when attention_time_ms is null
    attention_time_ms: Optional[float] = None  # forward time of the non-MoE compute before each MoE layer

    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    def param_bytes(self) -> int:
        """Bytes of one expert parameter (and of its gradient) as training sends it."""
        return self.bytes_per_param if self.bytes_per_param is not None else self.dtype_bytes()

    def activation_bytes(self) -> int:
        return self.bytes_per_activation if self.bytes_per_activation is not None else self.dtype_bytes()

    def check(self):
        if self.dtype not in DTYPE_BYTES:
            yield "dtype", f"{self.dtype!r} is not one of {list(DTYPE_BYTES)}"
        for k in ("bytes_per_param", "bytes_per_activation", "seq_len"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                yield k, f"{getattr(self, k)} must be >= 1"
        if self.matrices not in (2, 3):
            yield "matrices", f"{self.matrices} is not 2 or 3"
        if self.attention_time_ms is not None and self.attention_time_ms < 0:
            yield "attention_time_ms", f"{self.attention_time_ms} must be >= 0"


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
    # chain: parallel.copy_schedule's pipelined chains, round by round (what training does);
    # p2p: the owner sends to every holder at once (the former flat training schedule);
    # broadcast: the same chains as an ideal deep-pipelined NCCL broadcast (bytes only, as Hecate)
    spag: str = "chain"
    max_chunks: int = 4  # chain: pieces per message (copy_schedule.num_chunks; training's default 4)
    # first_round: as ExpertStore: only the spAG's first round is posted before the attention, the
    # rest runs at the layer, and remat's backward gather is not prefetched; full: all of it prefetched
    gather_overlap: str = "first_round"
    # false: as ExpertStore.reduce_grads: spRS of all layers and the expert-data-parallel all-reduce
    # after the backward pass; true: each layer's under the backward attention before it (Hecate)
    sprs_overlap: bool = False

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
        if self.spag not in SPAG_MODES:
            yield "spag", f"{self.spag!r} is not one of {list(SPAG_MODES)}"
        if self.max_chunks < 1:
            yield "max_chunks", f"{self.max_chunks} must be >= 1"
        if self.gather_overlap not in GATHER_OVERLAP:
            yield "gather_overlap", f"{self.gather_overlap!r} is not one of {list(GATHER_OVERLAP)}"


def expert_group_problems(N: int, E: int, P: Optional[int]) -> list[tuple[str, str]]:
    """Why E experts cannot be sharded over expert-parallel groups of P of the N GPUs."""
    if P is None:
        if E % N and N % E:
            return [("model.num_experts", f"num_experts={E} and gpus={N}: one must divide the other "
                                          f"(E/N experts per GPU, or expert groups of E GPUs), or set "
                                          f"cluster.expert_parallel_size")]
        return []
    if P >= 1 and E % P:
        return [("cluster.expert_parallel_size", f"{P} does not divide num_experts={E} (each of the P ranks "
                                                 f"of a group owns E/P experts of every layer)")]
    return []


def expert_parallel_size(N: int, E: int, P: Optional[int]) -> int:
    """P, with null meaning all N GPUs (groups of E when N > E)."""
    return P if P is not None else min(N, E)


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
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**MODEL_DEFAULTS))
    cost_model: CostModelConfig = field(default_factory=CostModelConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    fssdp: FSSDPKnobs = field(default_factory=FSSDPKnobs)
    sim: RunConfig = field(default_factory=RunConfig)

    def check(self):
        N, E, P = self.cluster.gpus, self.model.num_experts, self.cluster.expert_parallel_size
        if self.load.kind != "trace":  # a trace sets E: derive() checks it then
            for k, msg in expert_group_problems(N, E, P):
                yield k, msg
        try:
            self.model.moe_layer_ids()
        except ValueError:
            return  # ModelConfig.check reported it
        try:
            moe_spacing(self.model)
        except ValueError as e:
            yield "model.moe_layers", str(e)

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
    problems = _old_model_keys(data)
    if data.get("model") is None:
        data["model"] = {}
    if isinstance(data["model"], dict):
        data["model"] = {**MODEL_DEFAULTS, **data["model"]}
    cfg = build_dataclass(SimConfig, data, "", problems)
    if problems:
        raise SpecError(problems, source)
    return cfg


def _old_model_keys(data: dict) -> list[tuple[str, str]]:
    """Problems for keys of the former simulator model section, which are removed from `data`
    (the builder would call them unknown without saying where they went)."""
    model = data.get("model")
    if not isinstance(model, dict):
        return []
    out = [(f"model.{k}", f"no longer a key: the model section is the training ModelConfig; use {RENAMED[k]}")
           for k in model if k in RENAMED]
    for k in RENAMED:
        model.pop(k, None)
    if isinstance(model.get("moe_layers"), int) and not isinstance(model["moe_layers"], bool):
        L = model.pop("moe_layers")
        out.append(("model.moe_layers", f"{L} is a count; moe_layers now selects MoE layers of model.n_layers "
                                        f"blocks as the training config does: 'all', 'every_K' or a list "
                                        f"(e.g. n_layers: {L} with moe_layers: all)"))
    return out


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
