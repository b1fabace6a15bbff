"""The package layering of docs/architecture.md, checked on the source: which package may import
which, no library module imports test helpers, files stay small, and the trainer and the model
hold no expert-strategy branches."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("experts", "system", "parallel", "jobs")
# what each package may import of the project (besides itself)
ALLOWED = {"experts": set(), "system": {"experts"}, "parallel": {"experts", "system"},
           "jobs": {"experts", "system", "parallel"}}
TEST_HELPERS = ("tests", "parallel.testing")


def _modules(pkg: str):
    for f in sorted((ROOT / pkg).rglob("*.py")):
        yield f, ast.parse(f.read_text(), str(f))


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("pkg", LIBRARY)
def test_package_imports_follow_the_layering(pkg):
    bad = []
    for f, tree in _modules(pkg):
        for name in _imports(tree):
            top = name.split(".")[0]
            if top in LIBRARY and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
            if f.name != "testing.py" and any(name == h or name.startswith(h + ".") for h in TEST_HELPERS):
                bad.append(f"{f.relative_to(ROOT)} imports the test helper {name}")
    assert not bad, "\n".join(bad)


def test_experts_is_single_device():
    for f, tree in _modules("experts"):
        names = _imports(tree)
        assert not {n for n in names if n.split(".")[0] in ("ray", "deepspeed")}, f
        assert "torch.distributed" not in names, f


@pytest.mark.parametrize("pkg", LIBRARY)
def test_library_files_stay_small(pkg):
    big = [f"{f.relative_to(ROOT)}: {n} lines" for f in (ROOT / pkg).rglob("*.py")
           if (n := len(f.read_text().splitlines())) > 500]
    assert not big, big


@pytest.mark.parametrize("path", ["parallel/trainer.py", "system/model.py"])
def test_trainer_and_model_have_no_strategy_branches(path):
    src = (ROOT / path).read_text()
    for word in ("expert_strategy", "expert_store", "store", "has_moe_layers", "deepspeed_moe", "fssdp",
                 "import deepspeed", "ds_moe"):
        assert not re.search(rf"\b{word}\b", src), \
            f"{path} mentions {word!r}: strategy-specific code belongs in parallel/strategy*"


def test_only_parallel_dist_calls_torch_distributed():
    """Every collective, group and rank query goes through parallel/dist.py, which stages host
    tensors on the device an NCCL group needs: any other call site could hand NCCL a CPU tensor."""
    bad = []
    for pkg in LIBRARY:
        for f, tree in _modules(pkg):
            if f == ROOT / "parallel" / "dist.py":
                continue
            names = _imports(tree)
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                bad.append(f"{f.relative_to(ROOT)} imports torch.distributed")
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                        isinstance(node.value, ast.Name) and node.value.id == "torch":
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} uses torch.distributed")
    assert not bad, "\n".join(bad)


def test_no_import_circles_in_the_library():
    """Module A importing B (lazily too) while B imports A: neither reads alone (issue 31)."""
    mods = {}
    for pkg in LIBRARY:
        for f, tree in _modules(pkg):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = tree
    graph = {m: {n for n in _imports(t) if n in mods and n != m} for m, t in mods.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    assert not circles, circles


@pytest.mark.procs
def test_the_spec_and_the_cli_import_no_torch():
    """Reading and checking a spec (`moeforge validate`, a refused `run`, `submit`, `status`) is a
    fraction of a second: the spec layer's configs live in torch-free modules (`experts.config`,
    `system.model_config`, `system.upcycle_config`, `system.data.config`), and `experts` and
    `system.data` load their torch code on first use."""
    import subprocess
    import sys

    probe = ("import sys; from jobs.cli import main; rc = main(['validate', sys.argv[1]]); "
             "import jobs.plan, jobs.run_record, jobs.orchestrate, jobs.estimate, jobs.memory_model, jobs.jobs_api; "
             "assert rc == 0, rc; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'ray')); "
             "assert not bad, bad[:5]")
    res = subprocess.run([sys.executable, "-c", probe, str(ROOT / "examples" / "quickstart.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
