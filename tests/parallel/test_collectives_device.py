"""Every collective goes through parallel/dist.py, which hands each backend tensors on a device it
carries: a host tensor (a flag, a count) on a pure NCCL group is staged on the GPU and its result
copied back; p2p and all-to-all buffers on the host are refused there with a clear error. The
backend of a Ray Train job is decided from the workers' resources; DeepSpeed must compute on the
model's device. (NCCL itself runs only on a GPU: here the staging is checked with the GPU's place
taken by a host copy, and the architecture test checks no other module calls torch.distributed.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from parallel import dist as pdist
from parallel.engine import check_engine_device


@pytest.mark.parametrize("name, host", [("gloo", True), ("nccl", False), ("cpu:gloo,cuda:nccl", True),
                                        ("cuda:nccl", False), ("mpi", True)])
def test_which_backends_carry_host_tensors(name, host):
    assert pdist.takes_host_tensors(name) is host


def _fake_nccl(monkeypatch, seen: list):
    monkeypatch.setattr(pdist, "is_dist", lambda: True)
    monkeypatch.setattr(pdist, "backend", lambda group=None: "nccl")
    monkeypatch.setattr(pdist, "_nccl_device", lambda: torch.device("cpu"))  # the GPU's place

    def all_reduce(t, op=None, group=None):
        seen.append((t, op, group))
        t.mul_(3)  # what the other ranks would add

    monkeypatch.setattr(pdist.dist, "all_reduce", all_reduce)


def test_a_host_flag_on_an_nccl_group_is_staged_and_its_result_copied_back(monkeypatch):
    seen: list = []
    _fake_nccl(monkeypatch, seen)
    flag = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = pdist.all_reduce_(flag, "max", group="g")
    assert out is flag and flag.tolist() == [3.0, 6.0]  # the reduced values, in the caller's tensor
    (t, op, group), = seen
    assert t is not flag and op == pdist.dist.ReduceOp.MAX and group == "g"  # the collective saw the copy
    total = pdist.all_reduce_sum(torch.tensor([2.0]))
    assert total.tolist() == [6.0]


def test_an_nccl_group_refuses_host_buffers_for_p2p_and_all_to_all(monkeypatch):
    _fake_nccl(monkeypatch, [])
    with pytest.raises(ValueError, match="p2p send: a host tensor on a nccl group; its buffers must live on the GPU"):
        pdist.p2p_op("send", torch.zeros(3), 1)
    with pytest.raises(ValueError, match="all_to_all_single: a host tensor on a nccl group"):
        pdist.all_to_all_single(torch.zeros(2), torch.zeros(2), [1, 1], [1, 1])


def test_gloo_takes_host_tensors_as_they_are(monkeypatch):
    seen: list = []
    _fake_nccl(monkeypatch, seen)
    monkeypatch.setattr(pdist, "backend", lambda group=None: "gloo")
    t = torch.ones(2)
    pdist.all_reduce_(t)
    assert seen[0][0] is t and t.tolist() == [3.0, 3.0]


def test_a_ray_train_job_lets_the_workers_resources_pick_the_backend():
    assert pdist.ray_train_backend("auto") is None  # Ray Train: NCCL for workers holding a GPU, else gloo
    assert pdist.ray_train_backend("gloo") == "gloo" and pdist.ray_train_backend("nccl") == "nccl"


def test_deepspeed_must_compute_on_the_models_device():
    check_engine_device(SimpleNamespace(device="cpu"), torch.device("cpu"))
    check_engine_device(SimpleNamespace(device=torch.device("cuda", 1)), torch.device("cuda", 1))
    with pytest.raises(RuntimeError, match=r"DeepSpeed bound this rank to cuda:0 but its model is on cuda:1 .*"
                                           r"one device per worker is required"):
        check_engine_device(SimpleNamespace(device=torch.device("cuda", 0)), torch.device("cuda", 1))
