"""Cluster-scale simulator of MoE-layer training: EP vs FSSDP (Hecate) vs FasterMoE vs ZeRO-3.

`moeforge simulate CONFIG.yaml [flags]` runs it. Nothing here touches a GPU or torch: it draws the
expert loads of every iteration (synthetic Zipf with a drifting ranking, or a trace of a real
run's `metrics.jsonl`), plans every policy with the planner the training code uses
(`parallel.placement`: `Ownership`, `LoadPredictor`, `overlap_budget`, `plan_iteration`
= Hecate Algorithm 1, `assign_tokens`, `heterogeneous_sharding` = Algorithm 2), and prices the
result with the alpha-beta cost model of methods.md section 1:

    per MoE layer  T = 4*T_all2all + T_compute + exposed(parameter/gradient collectives)
    T_compute      = 6 * matrices * H * F * max_rank(expert tokens) / flops
    T_all2all      = alpha_nvlink*(G-1) + alpha_ib*(N-G) + max_rank(intra/nvlink + inter/ib)
    spAG / spRS    = max_rank(alpha * messages + intra/nvlink + inter/ib)

where a rank's intra/inter bytes are the larger of what it sends and receives over that link
class. docs/simulator.md states every modelling choice; the short version:

* spAG is a chained (pipelined) broadcast per copied expert, as NCCL's broadcast is: the owner,
  then the other holders in its node, then one node after another; a node's first holder rotates
  with the expert so that the inter-node receives spread over the node's NICs. spRS is the same
  chain reversed (reduce), so it costs the same.
* The forward spAG hides behind the non-MoE forward compute before the layer (attention, and the
  dense blocks when MoE is every k-th layer); spRS (and, with re-materialization, the second spAG
  of the previous layer) behind the backward of that compute (2x forward). Only the excess counts.
* With more GPUs than experts (N > E), every policy but ZeRO-3 runs in expert groups of E ranks
  (EP+DP, as DeepSpeed's ep_size <= E); one group is simulated, the N/E replicas of each expert
  all-reduce their gradients (a ring across the groups, hidden behind the backward like spRS).
  ZeRO-3 shards over all N ranks.

Files: `config` (the YAML config; its model section is the training `ModelConfig`), `loads`
(traces, the load generator), `network` (alpha-beta links, copy messages), `derived` (per-config
constants: MoE layers and spacing, expert size, overlap window, t), `engine` (the simulation
loop, `simulate`, `sweep`), `report` (text tables).
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
