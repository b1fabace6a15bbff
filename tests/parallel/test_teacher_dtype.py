"""The online distillation teacher's dtype: the student's compute dtype on CUDA, fp32 on CPU (CPU
results unchanged); the cast touches parameters only, as the student's does."""
from __future__ import annotations

from pathlib import Path

import torch

import parallel.teacher as T
from experts.config import ExpertsConfig
from parallel.teacher import OnlineTeacher, ResolvedTeacher, compute_dtype, load_teacher, teacher_dtype
from system.model import ModelConfig, Transformer

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, moe_layers="all", num_experts=4, top_k=2,
                  d_expert=32, vocab_size=40)


def test_the_dtype_decision():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert teacher_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert teacher_dtype(cuda, torch.float16) == torch.float16
    assert teacher_dtype(cuda, torch.float32) == torch.float32
    assert teacher_dtype("cuda", torch.bfloat16) == torch.bfloat16
    for student in (torch.float32, torch.bfloat16):  # a CPU stage's teacher is fp32, as before
        assert teacher_dtype(cpu, student) == torch.float32


def test_the_students_compute_dtype_ignores_fp32_expert_masters():
    model = Transformer(CFG, ExpertsConfig())
    assert compute_dtype(model) == torch.float32
    for p in model.parameters():
        if not getattr(p, "moeforge_expert", False):
            p.data = p.data.bfloat16()
    assert compute_dtype(model) == torch.bfloat16


def test_a_bf16_teacher_casts_its_parameters_only(monkeypatch):
    monkeypatch.setattr(T, "init_model_from", lambda model, source: None)  # no checkpoint to read
    teacher = ResolvedTeacher(Path("/nowhere"), CFG, ExpertsConfig(), "test")
    model, what = load_teacher(teacher, 40, "any", torch.device("cpu"), "s.distill.teacher", dtype=torch.bfloat16)
    assert "bfloat16" in what and not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64, torch.bool) for b in model.buffers() if b.is_floating_point())
    assert any(b.dtype == torch.float32 for b in model.buffers())  # e.g. the routers' expert_bias
    cfg = type("Distill", (), {"top_k": None, "temperature": 1.0})()
    logits = OnlineTeacher(cfg, ["d"], model).train_teacher({"input_ids": torch.randint(0, 40, (2, 8))})
    assert logits.dtype == torch.float32 and logits.shape == (2, 8, 40) and torch.isfinite(logits).all()
    fp32, what32 = load_teacher(teacher, 40, "any", torch.device("cpu"), "s.distill.teacher")
    assert all(p.dtype == torch.float32 for p in fp32.parameters()) and "float" not in what32
