"""Resume a ZeRO 1/2 checkpoint on another data-parallel world size, optimizer state included.

DeepSpeed refuses to load ZeRO 1/2 optimizer partitions written by a different number of ranks
(its universal-checkpoint conversion is an offline step). The partitions are plain, though: each
rank's `zero_pp_rank_R_mp_rank_00_optim_states.pt` holds, per parameter group, its slice of the
flat fp32 master weights and of Adam's `exp_avg` / `exp_avg_sq`, and `param_slice_mappings`
says which parameter each piece of the slice belongs to. This module reassembles every dense
parameter's full fp32 weight and moments from all the old ranks' files (each a contiguous piece,
in rank order), and writes into this rank's new partition the fragment it now owns (DeepSpeed's
`_hp_mapping` of each parameter gives it), with the group's step count and hyper-parameters.
Weights, LR schedule and client state come from DeepSpeed's own loader
(`load_optimizer_states=False`). ZeRO 0 needs none
of this: its optimizer state is whole in the model-state file on any world size. Experts of
ep/fssdp live in their own files and reshard by themselves (`parallel.expert_pool`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OPTIM_FILES = "zero_pp_rank_*_mp_rank_00_optim_states.pt"


def saved_dp_world(ckpt: Path) -> int:
    """How many data-parallel ranks wrote the checkpoint's ZeRO partitions (0: none, ZeRO 0)."""
    return len(list(Path(ckpt).glob(OPTIM_FILES)))


def _rank_of(f: Path) -> int:
    return int(f.name.split("_")[3])  # zero_pp_rank_R_mp_rank_00_optim_states.pt


def full_dense_state(ckpt: Path) -> tuple[list[dict[str, dict[str, torch.Tensor]]], list[torch.Tensor],
                                          list[dict]]:
    """Per parameter group: {name: {"fp32", "exp_avg", "exp_avg_sq"}} (flat tensors, whole),
    each group's Adam step count and its hyper-parameters (the LR the next step uses among them),
    from every old rank's partition file."""
    from system.safe_load import load_tensors

    files = sorted(Path(ckpt).glob(OPTIM_FILES), key=_rank_of)
    if not files or [_rank_of(f) for f in files] != list(range(len(files))):
        raise ValueError(f"checkpoint {ckpt}: ZeRO partition files {[f.name for f in files]} are not ranks 0..N-1")
    groups: list[dict[str, dict[str, list[torch.Tensor]]]] = []
    steps: list[torch.Tensor] = []
    hyper: list[dict] = []
    for f in files:
        sd = load_tensors(f, allow_deepspeed=True)["optimizer_state_dict"]
        fp32 = sd["single_partition_of_fp32_groups"]
        state = sd["base_optimizer_state"]["state"]
        maps = sd["param_slice_mappings"]
        if not groups:
            groups = [{} for _ in fp32]
            steps = [state[g]["step"] for g in range(len(fp32))]
            hyper = [{k: v for k, v in pg.items() if k != "params"}
                     for pg in sd["base_optimizer_state"]["param_groups"]]
        for g, mapping in enumerate(maps):
            for name, frag in mapping.items():
                sl = slice(frag.start, frag.start + frag.numel)
                rec = groups[g].setdefault(name, {"fp32": [], "exp_avg": [], "exp_avg_sq": []})
                rec["fp32"].append(fp32[g].detach()[sl])
                rec["exp_avg"].append(state[g]["exp_avg"][sl])
                rec["exp_avg_sq"].append(state[g]["exp_avg_sq"][sl])
    full = [{name: {k: torch.cat(v) for k, v in rec.items()} for name, rec in grp.items()} for grp in groups]
    return full, steps, hyper


@torch.no_grad()
def load_resharded_zero_state(engine, model: nn.Module, ckpt: Path) -> None:
    """Fill this rank's ZeRO 1/2 partitions (fp32 master weights, Adam moments, step) from a
    checkpoint written at another data-parallel world size. Call after DeepSpeed loaded the
    weights with `load_optimizer_states=False`."""
    opt = engine.optimizer
    full, steps, hyper = full_dense_state(ckpt)
    if len(full) != len(opt.bit16_groups):
        raise ValueError(f"checkpoint {ckpt}: {len(full)} ZeRO parameter groups, this model has "
                         f"{len(opt.bit16_groups)}")
    names = {id(p): n for n, p in model.named_parameters()}
    for g, params in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[g]
        moments = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        for p in params:
            name = names.get(id(p))
            if name not in full[g]:
                raise ValueError(f"checkpoint {ckpt}: no ZeRO state for parameter {name!r} (group {g})")
            want = full[g][name]
            if want["fp32"].numel() != p.numel():
                raise ValueError(f"checkpoint {ckpt}: {name} has {want['fp32'].numel()} elements saved, "
                                 f"{p.numel()} now")
            hp = getattr(p, "_hp_mapping", None)
            if hp is None:  # no fragment of this parameter lives on this rank
                continue
            lp, mine = hp.lp_fragment_address, hp.hp_fragment_address
            src = slice(lp.start, lp.start + lp.numel)
            dst = slice(mine.start, mine.start + mine.numel)
            flat.data[dst] = want["fp32"][src].to(flat.dtype)
            for k in moments:
                moments[k][dst] = want[k][src].to(flat.dtype)
        opt.optimizer.state[flat] = {"step": steps[g].clone(), **moments}
        group = opt.optimizer.param_groups[g]
        if group.get("name") != hyper[g].get("name"):
            raise ValueError(f"checkpoint {ckpt}: parameter group {g} is {hyper[g].get('name')!r}, "
                             f"now {group.get('name')!r}")
        group.update(hyper[g])  # lr (where the schedule stood), betas, eps, weight decay
    if hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()  # re-point DeepSpeed's per-parameter views at the new state
