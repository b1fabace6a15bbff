"""The monitoring and deployment files in infra/ parse, and the Grafana dashboard only queries
metrics that jobs/ray_metrics.py exports (under Ray's `ray_` prefix). Fast; no network, no Ray."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DASHBOARD = INFRA / "grafana" / "moeforge-dashboard.json"
PROMETHEUS = INFRA / "prometheus" / "prometheus.yml"
CLUSTER = INFRA / "ray-cluster.yaml"
RAYJOB = INFRA / "kuberay-rayjob.yaml"
RAY_METRICS_SRC = ROOT / "jobs" / "ray_metrics.py"
RAY_PREFIX = "ray_"  # Ray's metrics agent exports every application metric as ray_<name>
SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"


# --- what jobs/ray_metrics.py defines -----------------------------------------------------

def defined_gauges(source: str) -> dict[str, tuple[str, ...]]:
    """Name -> tag keys of every `Gauge("name", ..., tag_keys=...)` call in the source.

    Read from the syntax tree rather than by importing, so the test needs no Ray runtime;
    tag keys written as `keys + ("x",)` with `keys = (...)` assigned in the same function
    are resolved too.
    """
    tree = ast.parse(source)
    tuples: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                tuples[node.targets[0].id] = value

    def tag_tuple(expr: ast.expr) -> tuple[str, ...]:
        if isinstance(expr, ast.Name):
            return tuples.get(expr.id, ())
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return tag_tuple(expr.left) + tag_tuple(expr.right)
        try:
            return tuple(ast.literal_eval(expr))
        except ValueError:
            return ()

    gauges = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Gauge":
            name = node.args[0]
            assert isinstance(name, ast.Constant) and isinstance(name.value, str), \
                "Gauge names must be string literals for this check"
            tags = next((tag_tuple(k.value) for k in node.keywords if k.arg == "tag_keys"), ())
            gauges[name.value] = tags
    return gauges


GAUGES = defined_gauges(RAY_METRICS_SRC.read_text())
EXPORTED = {RAY_PREFIX + name: tags for name, tags in GAUGES.items()}


# --- PromQL: which metric names does an expression read? ------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless", "atan2", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords, labels or strings).

    Good enough for dashboard queries: strips Grafana variables, string literals, label
    matchers, range/subquery brackets and grouping clauses, then keeps the bare identifiers
    that are not followed by `(` (a function or aggregation call).
    """
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "0", expr)                    # Grafana variables
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)  # string literals
    names = set(re.findall(r"__name__\s*=\s*\"([^\"]*)\"", expr))    # {__name__="x"} selectors
    s = re.sub(r"\{[^}]*\}", " ", s)                                   # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?!\w)(\s*\()?", s):
        ident, is_call = m.group(1), m.group(2)
        if is_call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def variable_query_metrics(query: Any) -> set[str]:
    """Metric names in a Grafana Prometheus variable query (`label_values(metric{...}, label)`, ...)."""
    text = query.get("query", "") if isinstance(query, dict) else str(query or "")
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text)
    if m:
        return promql_metric_names(m.group(1))
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", text)
    if m:
        return promql_metric_names(m.group(1))
    m = re.fullmatch(r"\s*(label_names|metrics)\((.*)\)\s*", text)
    if m:
        return promql_metric_names(m.group(2)) if m.group(2).strip() else set()
    return promql_metric_names(text) if text.strip() else set()


def unknown_metrics(names: set[str]) -> set[str]:
    return {n for n in names if n not in EXPORTED}


# --- the dashboard ------------------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # rows, collapsed or not


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, str, set[str]]]:
    """(where, query text, metric names it reads) for every panel target and query variable."""
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            yield f"panel {p.get('title')!r} target {t.get('refId')}", expr, promql_metric_names(expr)
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            text = q.get("query", "") if isinstance(q, dict) else str(q)
            yield f"variable {v['name']!r}", text, variable_query_metrics(q)


def test_gauges_are_found_in_the_source():
    assert "moeforge_loss" in GAUGES and GAUGES["moeforge_loss"] == ("run", "stage", "part")
    assert GAUGES["moeforge_expert_tokens"] == ("run", "stage", "layer", "expert")
    assert len(GAUGES) >= 8


def test_dashboard_is_valid_json_with_expected_shape():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(dash["panels"]):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p.get("title")
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p.get('title')!r} has no query"


def test_template_variables_datasource_run_stage():
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("run", "stage"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert "$run" in json.dumps(variables["stage"]["query"]), "stage values should follow the chosen run"


def test_every_query_uses_the_datasource_variable():
    for p in all_panels(load_dashboard()["panels"]):
        for t in p.get("targets", []):
            assert t.get("datasource", p.get("datasource", {})).get("uid") == "${datasource}", p.get("title")


def test_dashboard_queries_only_exported_metrics():
    bad = []
    seen = set()
    for where, expr, names in queries(load_dashboard()):
        assert names, f"{where}: no metric found in {expr!r}"
        seen |= names
        bad += [f"{where}: {n}" for n in sorted(unknown_metrics(names))]
    assert not bad, "dashboard queries metrics that jobs/ray_metrics.py does not export:\n" + "\n".join(bad)
    assert seen == set(EXPORTED), f"gauges without a panel: {sorted(set(EXPORTED) - seen)}"


def test_dashboard_filters_use_defined_labels():
    """`{label=...}` matchers and `by (...)` clauses only name tags the gauge has."""
    bad = []
    for where, expr, _ in queries(load_dashboard()):
        for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                if metric in EXPORTED and label not in EXPORTED[metric]:
                    bad.append(f"{where}: {metric} has no label {label!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("expr, expected", [
    ('max by (run, stage) (ray_moeforge_step{run=~"$run"})', {"ray_moeforge_step"}),
    ('rate(ray_moeforge_step[$__rate_interval]) / on(run) group_left ray_moeforge_grad_norm',
     {"ray_moeforge_step", "ray_moeforge_grad_norm"}),
    ('label_replace(ray_moeforge_expert_tokens{layer="1"}, "le", "$1", "expert", "(.*)")',
     {"ray_moeforge_expert_tokens"}),
    ('sum without (expert) (ray_moeforge_expert_tokens) > bool 2e3', {"ray_moeforge_expert_tokens"}),
    ('{__name__="ray_moeforge_loss", part="ce"}', {"ray_moeforge_loss"}),
    ('avg_over_time(ray_moeforge_loss[5m:1m] offset 1h)', {"ray_moeforge_loss"}),
])
def test_promql_name_extraction(expr, expected):
    assert promql_metric_names(expr) == expected


@pytest.mark.parametrize("expr, missing", [
    ('max by (run) (ray_moeforge_perplexity{run=~"$run"})', "ray_moeforge_perplexity"),
    ('max(moeforge_loss)', "moeforge_loss"),                       # forgot Ray's prefix
    ('ray_moeforge_loss / ray_moeforge_tokens', "ray_moeforge_tokens"),
])
def test_check_catches_unknown_metrics(expr, missing):
    assert unknown_metrics(promql_metric_names(expr)) == {missing}


def test_check_catches_an_unknown_metric_in_a_dashboard(tmp_path):
    dash = load_dashboard()
    panel = next(p for p in all_panels(dash["panels"]) if p.get("targets"))
    panel["targets"][0]["expr"] = 'max by (run) (ray_moeforge_no_such_metric{run=~"$run"})'
    found = {n for _, _, names in queries(dash) for n in unknown_metrics(names)}
    assert found == {"ray_moeforge_no_such_metric"}


# --- Prometheus, cluster launcher, KubeRay ---------------------------------------------------

def test_prometheus_config_scrapes_ray_service_discovery():
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    files = [f for job in cfg["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert SD_FILE in files


def test_ray_cluster_config_parses_and_matches_ray_schema():
    cfg = yaml.safe_load(CLUSTER.read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    gpu_families = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")
    assert any(t["node_config"].get("InstanceType", "").startswith(gpu_families) or t.get("resources", {}).get("GPU")
               for t in workers), "a GPU worker node type"
    setup = "\n".join(cfg["setup_commands"])
    assert setup.index("torch") < setup.index("DS_BUILD_OPS=0") < setup.index("ray[default,train]")
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--metrics-export-port" in head and "--dashboard-host=0.0.0.0" in head
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(cfg))  # Ray's own JSON schema for cluster configs


def test_kuberay_rayjob_parses():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m jobs.cli run examples/quickstart.yaml --output-dir /mnt/shared/runs"
    assert (ROOT / "examples" / "quickstart.yaml").is_file()
    from jobs.cli import parser
    args = parser().parse_args(spec["entrypoint"].split()[3:])  # what jobs.cli will parse
    assert args.command == "run" and args.output_dir == "/mnt/shared/runs"
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/mnt/shared") in claims, "every pod mounts the shared PVC at /mnt/shared"
    for key in ("headGroupSpec",):
        assert all(isinstance(v, str) for v in cluster[key]["rayStartParams"].values())
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert gpu_groups, "a GPU worker group"
    for g in cluster["workerGroupSpecs"]:
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values())
