"""What one rank holds while it trains, part by part, in bytes: the formulas behind
`moeforge estimate` (docs/memory.md). Pure arithmetic on a `Layout` (no torch, no spec): the
caller (`jobs.estimate`) fills the layout from a job spec and the command line's overrides.

Dtypes follow what the trainer does (docs/gpu.md): on a GPU stage the model trains in bf16
(parameters, activations, logits), DeepSpeed keeps fp32 masters and AdamW moments, reduces dense
gradients in fp32 and, under ZeRO 1/2, accumulates them in fp32. The expert pool of ep/fssdp is
fp32 (weights, gradients, moments) at `parallel.expert_sharding` 0; at 1 and 2 its working
weights are in the training dtype and fp32 masters, moments and gradient sums of 1/EDP of each
owned row live on the rank (`parallel/expert_shards.py`). A CPU stage is fp32 throughout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DS_BUCKET = 500_000_000  # DeepSpeed's default reduce / allgather bucket (elements)
CE_CHUNK_BYTES = 256 << 20  # system.chunked_ce.CHUNK_BYTES: one chunk's fp32 work
PARTS = ("dense_weights", "dense_grads", "dense_optimizer", "expert_weights", "expert_grads",
         "expert_optimizer", "fssdp_copies", "dispatch", "activations", "logits", "comm_buffers", "expert_step")


@dataclass(frozen=True)
class Layout:
    """Everything the formulas read: the model's shape, the batch and the parallel layout."""

    d_model: int
    n_layers: int
    moe_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    num_experts: int
    top_k: int
    d_expert: int
    vocab: int
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: str = "none"
    d_shared: int = 0
    shared_gate: bool = False
    # batch
    micro_batch: int = 1
    seq_len: int = 128
    # parallel layout
    world: int = 1
    strategy: str = "replicated"  # replicated | ep | fssdp | deepspeed_moe
    ep_size: int = 1  # P
    zero: int = 0
    gpu: bool = False  # bf16 training (GPU) or fp32 (CPU)
    checkpointing: str = "none"  # none | moe | full
    memory_cap: int = 2  # FSSDP m
    rematerialize: bool = False
    sprs_overlap: bool = False  # FSSDP: each layer's copy gradients leave during the backward
    tolerance: float = 0.05
    imbalance: Optional[float] = None  # busiest expert's load / mean; None: 1 + memory_cap
    expert_sharding: int = 0  # parallel.expert_sharding (0|1|2): expert state over the EDP group
    reduce_bucket: int = DS_BUCKET  # DeepSpeed's zero_optimization.reduce_bucket_size (elements)
    grad_accum: int = 1  # micro-batches per step: > 1 keeps the gradients alive through the forwards

    @property
    def act_bytes(self) -> int:
        return 2 if self.gpu else 4

    @property
    def edp(self) -> int:
        return max(1, self.world // max(1, self.ep_size))

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def sharding(self) -> int:
        """The expert sharding level in force: the trainer ignores it with one expert-parallel
        group (EDP = 1: nothing to shard over) and outside ep/fssdp."""
        return self.expert_sharding if self.strategy in ("ep", "fssdp") and self.edp > 1 else 0

    def resolved_imbalance(self) -> float:
        return float(self.imbalance) if self.imbalance is not None else 1.0 + self.memory_cap


@dataclass
class Estimate:
    layout: Layout
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=dict)  # parameter counts and load factors
    moments: dict[str, int] = field(default_factory=dict)  # bytes over the held state at each moment
    total: int = 0  # the step's peak (`peak`), not the sum of the parts

    @property
    def sum_of_parts(self) -> int:
        return sum(self.parts.values())


def expert_params(lay: Layout) -> int:
    """Parameters of one expert (SwiGLU: w1, w3 of D x F and w2 of F x D)."""
    return 3 * lay.d_model * lay.d_expert


def dense_param_counts(lay: Layout) -> dict[str, int]:
    """Non-expert parameters: embeddings, attention, norms, dense FFNs, routers, shared experts."""
    D, H, G, d = lay.d_model, lay.n_heads, lay.n_kv_heads, lay.head_dim
    attn = D * (H + 2 * G) * d + H * d * D + (H + 2 * G) * d * lay.qkv_bias
    attn += {"none": 0, "head": 2 * d, "full": (H + G) * d}[lay.qk_norm]
    per_block = attn + 2 * D
    dense_blocks = lay.n_layers - lay.moe_layers
    moe_extra = D * lay.num_experts + (3 * D * lay.d_shared if lay.d_shared else 0) + D * lay.shared_gate
    embed = lay.vocab * D * (1 if lay.tie_embeddings else 2)
    return {"embed": embed, "blocks": lay.n_layers * per_block + dense_blocks * 3 * D * lay.d_ff
            + lay.moe_layers * moe_extra + D}


def deepspeed_params(lay: Layout) -> int:
    """Parameters DeepSpeed's optimizer owns on a rank: the dense ones, plus the experts when
    they are replicated (every rank, every expert) or DeepSpeed's MoE layer's E/P local experts."""
    n = sum(dense_param_counts(lay).values())
    if lay.strategy == "replicated":
        n += lay.moe_layers * lay.num_experts * expert_params(lay)
    return n


def owned_experts(lay: Layout) -> int:
    """Expert rows (layer, expert) a rank owns under ep/fssdp/deepspeed_moe: E/P per MoE layer
    (rounded up: the placement's uneven split gives some ranks one more)."""
    if lay.strategy == "replicated":
        return 0
    return lay.moe_layers * -(-lay.num_experts // lay.ep_size)


def zero_state(lay: Layout, n: int, dp: int) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer state, buckets) bytes for n parameters under DeepSpeed's
    ZeRO stage, partitioned over dp ranks. bf16: ZeRO 0 is BF16_Optimizer (bf16 weights and
    `.grad`, its own flat gradient buffer in bf16, fp32 master + moments partitioned over dp);
    ZeRO 1 keeps each parameter's fp32 `grad_accum` in full plus an fp32 partition; ZeRO 2 only
    the fp32 partition. fp32: ZeRO 0 is torch's AdamW (weights, `.grad`, two moments); ZeRO 1/2
    add an fp32 master partition (a copy, not the weights). Buckets: ZeRO 1/2 allocate a whole
    `reduce_bucket_size` buffer at each backward whatever the model's size (contiguous
    gradients: fp32 at ZeRO 1, the training dtype at ZeRO 2; two with overlap_comm, which GPU
    stages turn on); ZeRO 0 flattens each all-reduce bucket (fp32 under bf16)."""
    part = -(-n // dp)
    bucket = lay.reduce_bucket
    if lay.gpu:
        weights, opt = 2 * n, 12 * part  # bf16 weights; fp32 master + exp_avg + exp_avg_sq of the partition
        if lay.zero == 0:
            return weights, 2 * n + 2 * n, opt, (4 * min(bucket, n) if dp > 1 else 0)
        grads = 4 * n + 4 * part if lay.zero == 1 else 4 * part
        return weights, grads, opt, 2 * (4 if lay.zero == 1 else 2) * bucket
    weights = 4 * n
    if lay.zero == 0:
        return weights, 4 * n, 8 * n, 4 * min(bucket, n) if dp > 1 else 0
    grads = 4 * n + 4 * part if lay.zero == 1 else 4 * part
    return weights, grads, 12 * part, 4 * bucket


def piece(lay: Layout) -> int:
    """Elements of one weight's piece per pool slot under expert sharding: the D x F elements cut
    into EDP pieces of ceil(D*F / EDP) (`ExpertShards.c`)."""
    return -(-lay.d_model * lay.d_expert // lay.edp)


def expert_state(lay: Layout) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes of the rank's owned expert rows (n parameters).
    Sharding 0: the fp32 pool is its own master: 4n weights, 4n gradients, 8n moments.
    Sharding 1 and 2 (shard = n / EDP: 3 pieces per owned row): working weights in the training
    dtype (fp32 on CPU) plus separate fp32 masters of the shard, moments of the shard; gradients:
    level 1 sums the step's whole gradient in an fp32 pool-sized buffer (4n), which the step
    reduce-scatters weight by weight into the shard's sums, freeing each weight's third as it
    goes (never more than 4n at once); level 2 keeps only the shard's sums (4 shard)."""
    n = owned_experts(lay) * expert_params(lay)
    if lay.strategy == "deepspeed_moe":  # DeepSpeed's MoE: its ZeRO over the expert-data-parallel group
        w, g, o, _ = zero_state(lay, n, lay.edp)
        return w, g, o
    if lay.sharding == 0:
        return 4 * n, 4 * n, 8 * n
    shard = owned_experts(lay) * 3 * piece(lay)
    grads = 4 * n if lay.sharding == 1 else 4 * shard
    return lay.act_bytes * n + 4 * shard, grads, 8 * shard


def expert_grads_held(lay: Layout) -> int:
    """Expert gradient bytes alive through the forwards when a step accumulates micro-batches:
    sharding 0 the pool's `.grad` (4n), 1 its fp32 whole-gradient buffer (4n), 2 the shard's
    sums only (no pool-sized gradient exists): `expert_state`'s gradients in each case."""
    return expert_state(lay)[1]


def scatter_bytes(lay: Layout, k: int, weights: int) -> int:
    """One `ExpertShards.scatter` of k slots of `weights` weights: its member-major fp32 send
    buffer (EDP pieces of c per slot and weight, built in place), the received pieces (k x c per
    weight) and, on CPU, gloo's copy of the send buffer (measured: gloo's reduce-scatter works
    on a copy of its input; NCCL's does not)."""
    c = piece(lay)
    return 4 * weights * k * c * ((1 if lay.gpu else 2) * lay.edp + 1)


def sharding_buffers(lay: Layout) -> tuple[int, int]:
    """(at a layer's backward end, at the step): transient bytes of the expert sharding's
    reduce-scatters (`scatter_bytes`). Level 1 scatters the pool's whole gradient at the step
    weight by weight (`ExpertShards.reduce_pool_grads`): the first weight's scatter, while the
    whole gradient (in `expert_grads`) is still alive, is the largest moment. Level 2 scatters
    one layer's owned rows (k) at the end of its backward, all three weights in one collective,
    after summing them into fp32 rows (4 x 3kDF) from the backward's gradients (the last one,
    in the training dtype, still referenced); fssdp also scatters its copies' fp32 sums at the
    step (their stack, 4 x 3C x DF, then the scatter)."""
    lvl = lay.sharding
    if not lvl:
        return 0, 0
    DF = lay.d_model * lay.d_expert
    if lvl == 1:
        return 0, scatter_bytes(lay, owned_experts(lay), 1)
    k = owned_experts(lay) // max(1, lay.moe_layers)
    layer_end = 4 * 3 * k * DF + scatter_bytes(lay, k, 3) + lay.act_bytes * k * DF
    copies = lay.memory_cap * lay.moe_layers if lay.strategy == "fssdp" and lay.ep_size > 1 else 0
    return layer_end, (4 * 3 * copies * DF + scatter_bytes(lay, copies, 3) if copies else 0)


def expert_step_buffers(lay: Layout) -> tuple[int, int]:
    """ep/fssdp: (AdamW, all-gather) transient bytes of the expert step. AdamW: the pool's own
    (sharding 0) is torch's foreach version on a GPU, one fp32 temporary as large as everything
    it steps (`_foreach_sqrt` of the second moments); the shards' (1, 2) is the fused one on a
    GPU, no temporary. On CPU both are the single-tensor version: weight by weight, the square
    root, its quotient and the previous weight's still bound denominator (3 x one weight;
    measured). Sharded, once the step's sums are dropped, the updated pieces are all-gathered
    into the working pool weight by weight (`ExpertShards.gather_into`): the weight's gathered
    pieces (S x EDP x c in the pool's dtype), the previous weight's still bound by the copy
    loop's last block, and the master cast to the pool's dtype (S x c) on a GPU; on CPU (fp32:
    no cast) gloo's copy of the gathered output instead (measured)."""
    if lay.strategy not in ("ep", "fssdp"):
        return 0, 0
    S, DF = owned_experts(lay), lay.d_model * lay.d_expert
    if not lay.sharding:
        return 4 * 3 * S * DF, 0
    c, G = piece(lay), lay.edp
    adam = 0 if lay.gpu else 4 * 3 * S * c
    return adam, lay.act_bytes * (2 * S * G * c + (S * c if lay.gpu else S * G * c))


def load_factor(lay: Layout) -> float:
    """Rows a rank's experts receive over the mean (N * k): the busiest expert carries
    `imbalance` x the mean. ep: it sits with e - 1 mean-loaded experts on its owner; fssdp: the
    planner spreads it over its owner and up to m copies, and keeps every rank within
    `tolerance` of the mean when it can; replicated: every token's rows are local (1)."""
    if lay.strategy == "replicated":
        return 1.0
    e = lay.num_experts / lay.ep_size
    imb = lay.resolved_imbalance()
    if lay.strategy == "fssdp":
        holders = min(lay.ep_size, 1 + lay.memory_cap)
        return max(1.0 + lay.tolerance, (max(e, 1) - 1 + imb / holders) / max(e, 1))
    return min(float(lay.ep_size), (max(e, 1) - 1 + imb) / max(e, 1))


def fssdp_copies(lay: Layout) -> int:
    """Copies at the memory cap: m per MoE layer. Each holds its weights in the communication
    dtype, its `.grad` in that dtype and the fp32 sum of its gradients (ExpertStore's
    `_keep_copy_grad`). Without re-materialization every layer's copies live from the forward to
    the backward; with it, two layers' weights at a time (the one computing, the one arriving).
    The fp32 gradient sums of every layer live to the end of the backward (SparseReduceScatter
    at the optimizer step), or two layers' with `sprs_overlap`."""
    if lay.strategy != "fssdp" or lay.ep_size < 2:
        return 0
    per = expert_params(lay) * lay.memory_cap
    live_layers = min(2, lay.moe_layers) if lay.rematerialize else lay.moe_layers
    grad_layers = min(2, lay.moe_layers) if lay.sprs_overlap else lay.moe_layers
    return per * live_layers * lay.act_bytes + per * lay.act_bytes + per * grad_layers * 4


def block_activations(lay: Layout, moe: bool, rows: float) -> float:
    """Bytes autograd keeps for one block per token (rows: expert rows per token on this rank,
    k x the load factor), counted from system/model.py's forward and checked tensor by tensor
    with saved-tensor hooks (bench/estimate_vs_measured.py). RMSNorm keeps its input in fp32
    (a copy in bf16), the rsqrt and the normed output, and the next linear its weighted output;
    attention the qkv output, the rotated q/k (and their fp32 copies in bf16), SDPA's output and
    log-sum-exp and the projection's input; a SwiGLU FFN its two hidden projections, the SiLU and
    the product; the MoE layer the router's fp32 input, logits and probabilities, the rows going
    into the experts and, in the combine, the k rows coming back (in their own dtype: the combine
    keeps no fp32 copy of them)."""
    a, D, H, G, d = lay.act_bytes, lay.d_model, lay.n_heads, lay.n_kv_heads, lay.head_dim
    full = lay.checkpointing == "full"
    norm = 4 * D + 4 + a * D
    rope_fp32 = 4 * (H + G) * d if lay.gpu else 0
    attn = norm + a * D + a * (H + 2 * G) * d + a * (H + G) * d + rope_fp32 + 2 * a * H * d + 4 * H
    if full:
        attn = a * D  # the checkpoint keeps the block's input; the rest is recomputed
    if not moe:
        return attn + norm + (a * D if full else a * D + 4 * a * lay.d_ff)
    router = 4 * D + 3 * 4 * lay.num_experts + 24 * lay.top_k
    shared = 0 if not lay.d_shared else (a * D + 4 * a * lay.d_shared if lay.checkpointing == "none" else a * D)
    return attn + norm + router + routed_activations(lay, rows) + shared


def routed_activations(lay: Layout, rows: float) -> float:
    """A MoE layer's routed rows, per token: the rows going into the experts (with their hidden
    activations unless recomputed) and the k rows the combine keeps."""
    a, D = lay.act_bytes, lay.d_model
    return rows * (a * D + (4 * a * lay.d_expert if lay.checkpointing == "none" else 0)) + lay.top_k * a * D


def activations(lay: Layout, rows: float) -> int:
    n_moe = lay.moe_layers
    per_tok = n_moe * block_activations(lay, True, rows) + (lay.n_layers - n_moe) * block_activations(lay, False, rows)
    per_tok += 4 * lay.d_model + 4 + 2 * lay.act_bytes * lay.d_model + 16  # final norm, head input, ids
    return int(per_tok * lay.tokens)


def logits_peak(lay: Layout) -> int:
    """The loss's peak: bf16 logits go through the chunked cross-entropy (the logits, their
    gradient during the backward and one chunk's fp32 work); fp32 logits through torch's
    cross-entropy (the logits, its saved log-softmax, the gradient arriving at the log-softmax
    and the logits' gradient)."""
    nv = lay.tokens * lay.vocab
    if lay.gpu:
        return 2 * nv * 2 + min(CE_CHUNK_BYTES, 4 * nv)
    return 4 * 4 * nv


def dispatch_buffers(lay: Layout, rows: float) -> int:
    """One MoE layer's transient bytes at the busiest rank's load, on top of what autograd keeps:
    the larger of the all-to-all buffers (rows out, rows in, expert output, rows back) and the
    experts' FFN working set in the backward: the gradients of the hidden projections, and for
    a recomputed layer (activation checkpointing) the recomputed h1, h3, SiLU and product too,
    while every earlier layer's activations are still saved (measured: 6 rows of d_expert
    values per routed row when recomputing)."""
    if lay.moe_layers == 0:
        return 0
    a, N, k = lay.act_bytes, lay.tokens, lay.top_k
    working = rows * N * a * lay.d_expert * (6 if lay.checkpointing != "none" else 3)
    a2a = 0 if lay.strategy == "replicated" else a * lay.d_model * N * (2 * k + 2 * rows)
    return int(max(working, a2a))


def edp_buffer(lay: Layout) -> int:
    """ep/fssdp at sharding 0: one MoE layer's owned expert gradients flattened in fp32 for their
    sum over the expert-data-parallel group (sharded: `sharding_buffers`)."""
    if lay.strategy not in ("ep", "fssdp") or lay.edp < 2 or not lay.moe_layers or lay.sharding:
        return 0
    return 4 * (owned_experts(lay) // lay.moe_layers) * expert_params(lay)


def estimate(lay: Layout) -> Estimate:
    out = Estimate(lay)
    n_ds = deepspeed_params(lay)
    dp_dense = lay.world
    w, g, o, buckets = zero_state(lay, n_ds, dp_dense)
    early = buckets if lay.zero else 0  # ZeRO 1/2: allocated as the backward starts
    ew, eg, eo = expert_state(lay)
    rows = lay.top_k * load_factor(lay)
    layer_end, at_step = sharding_buffers(lay)
    adam, gather = expert_step_buffers(lay)
    edp = edp_buffer(lay)
    out.parts = {
        "dense_weights": w, "dense_grads": g, "dense_optimizer": o,
        "expert_weights": ew, "expert_grads": eg, "expert_optimizer": eo,
        "fssdp_copies": fssdp_copies(lay),
        "dispatch": dispatch_buffers(lay, rows),
        "activations": activations(lay, rows),
        "logits": logits_peak(lay),
        "comm_buffers": buckets + edp + max(layer_end, at_step),
        "expert_step": max(adam, gather),
    }
    p = out.parts
    # gradients alive through the forward: BF16_Optimizer's flat buffer (made at start-up), and
    # every gradient when a step accumulates several micro-batches (sharding 2: only the shard's)
    held_grads = g + expert_grads_held(lay) if lay.grad_accum > 1 else (2 * n_ds if lay.gpu and lay.zero == 0 else 0)
    grads, comm = g + eg, buckets + edp
    step_grads = 4 * owned_experts(lay) * 3 * piece(lay) if lay.sharding else eg  # the sums AdamW reads
    # the moments the peak can be at, each as bytes on top of the state held all step (`peak`)
    out.moments = {
        "loss": held_grads + p["activations"] + max(p["logits"], p["dispatch"]) + early,
        # sharding 2, the last MoE layer's end: every activation saved but its routed rows (its
        # norm and router are not through their backward yet)
        "layer_end": (held_grads + p["activations"] - int(routed_activations(lay, rows) * lay.tokens)
                      + layer_end + early) if layer_end else 0,
        # sharding 1, the last MoE layer's expert backward: its first gradient allocates the
        # whole fp32 gradient (unless accumulation already holds it) amid the experts' working set
        # and every activation but that layer's routed rows (measured)
        "first_expert_grad": (held_grads + p["activations"] - int(routed_activations(lay, rows) * lay.tokens)
                              + p["dispatch"] + early + (0 if lay.grad_accum > 1 else eg))
        if lay.sharding == 1 else 0,
        "backward_end": grads + comm + max(p["dispatch"], layer_end),
        "step_scatter": grads + comm + at_step if at_step else 0,
        "expert_adam": g + step_grads + comm + adam if lay.strategy in ("ep", "fssdp") else 0,
        "expert_gather": g + comm + gather if gather else 0,
    }
    out.total = peak(p, out.moments)
    out.counts = {"deepspeed_params": n_ds, "expert_params_total": lay.moe_layers * lay.num_experts * expert_params(lay),
                  "owned_expert_params": owned_experts(lay) * expert_params(lay),
                  "load_factor": load_factor(lay), "imbalance": lay.resolved_imbalance()}
    if lay.expert_sharding and not lay.sharding:
        out.notes.append(f"expert sharding {lay.expert_sharding} has no effect with one expert-parallel group "
                         f"(P = {lay.ep_size} = the world): nothing to shard over, level 0 is in force")
    return out


def peak(parts: dict[str, int], moments: dict[str, int]) -> int:
    """The step's peak: the state held all step (weights, optimizer state, the expert pool's
    weights, masters and moments, FSSDP copies) plus the largest of the moments: the loss (the
    gradients held through the forwards, every activation saved, the larger of the logits' peak
    and a layer's dispatch buffers, the ZeRO buckets the backward allocates first); under expert
    sharding 1 the last MoE layer's expert backward (the whole fp32 gradient allocated), under
    2 the end of the last MoE layer's backward (its reduce-scatter); the end of the
    backward (activations freed, every gradient and communication buffer, a layer's dispatch
    buffers or reduce-scatter); level 1's reduce-scatter at the step; the expert AdamW's
    temporaries (with the gradient sums it reads); sharded, the all-gather after it (the expert
    gradients dropped by then)."""
    held = sum(parts[p] for p in ("dense_weights", "dense_optimizer", "expert_weights", "expert_optimizer",
                                  "fssdp_copies"))
    return held + max(moments.values())


def largest_micro_batch(lay: Layout, budget: int, limit: int = 1 << 20) -> int:
    """The largest micro-batch whose peak fits `budget` bytes (0: not even one sequence). The
    peak grows with the micro-batch (a max of sums of linear terms): a binary search."""
    from dataclasses import replace

    def fits(b: int) -> bool:
        return estimate(replace(lay, micro_batch=b)).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
