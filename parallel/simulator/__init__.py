"""Cluster-scale simulator of MoE-layer training: EP vs FSSDP (Hecate) vs FasterMoE vs ZeRO-3.

`moeforge simulate CONFIG.yaml [flags]` runs it, so that we can say what moeforge's planner does
at 8-256 GPUs we cannot run. Nothing here touches a GPU or torch: it draws the expert loads of
every iteration (synthetic Zipf with a drifting ranking, or a trace of a real run's
`metrics.jsonl`), plans every policy with the planner the training code uses
(`parallel.placement`, Hecate Algorithms 1 and 2, and `parallel.copy_schedule`'s chains), and
prices the result per MoE layer with the alpha-beta cost model of methods.md section 1
(T = 4*T_all2all + T_compute + the exposed collectives; docs/simulator.md: every choice).

Files: `config` (the YAML config; its model section is the training `ModelConfig`), `loads`
(traces, the load generator), `network` (alpha-beta links, copy messages), `derived` (per-config
constants), `engine` (the simulation loop, `simulate`, `sweep`), `summary` (per-policy sums and
the result dict), `report` (text tables).
"""
from parallel.simulator.config import (MODEL_DEFAULTS, POLICIES, ClusterConfig, CostModelConfig, FSSDPKnobs,
                                       LoadConfig, RunConfig, SimConfig, config_from_dict, load_config,
                                       moe_spacing)
from parallel.simulator.derived import Derived, derive
from parallel.simulator.engine import Simulator, simulate, straggler, sweep, token_matrix
from parallel.simulator.loads import LoadGenerator, read_trace
from parallel.simulator.network import Network, copy_hops, copy_traffic, layer_chains, round_arrays
from parallel.simulator.report import format_result, format_sweep

__all__ = [
    "MODEL_DEFAULTS", "POLICIES", "ClusterConfig", "CostModelConfig", "Derived", "FSSDPKnobs", "LoadConfig",
    "LoadGenerator", "Network", "RunConfig",
    "SimConfig", "Simulator", "config_from_dict", "copy_hops", "copy_traffic", "derive", "layer_chains", "round_arrays",
    "format_result", "format_sweep", "load_config", "moe_spacing", "read_trace", "simulate", "straggler",
    "sweep", "token_matrix",
]
