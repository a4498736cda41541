"""deploy/: the Prometheus rules and scrape configuration, the Grafana dashboard, the example
configuration file.

The rules and every dashboard query go through Prometheus's own parser and evaluator (``promtool``,
Debian package ``prometheus``; without it these tests skip naming the install command, and CI fails
on any skip, METRICSD_NO_SKIPS=1). Every metric they name must be in the series contract,
deploy/metrics.txt, which the exporter implements.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
CONTRACT = DEPLOY / "metrics.txt"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus makes itself, which the rules may use besides the contract's.
BUILTIN = {"up"}
# Grafana's variables, replaced by a value of their kind before a query is parsed.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "${run_id}": "r1", "$run_id": "r1"}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool is not installed, the rules and dashboard queries were not checked; install "
            "it with: sudo apt-get install -y --no-install-recommends prometheus"
        )
    return tool


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _contract() -> dict[str, tuple[str, tuple[str, ...]]]:
    """deploy/metrics.txt: name -> (type, labels)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in CONTRACT.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, *labels = line.split()
        found[name] = (kind, tuple(labels[0].split(",")) if labels else ())
    return found


def _series_names() -> set[str]:
    """Every series name a query may use: the contract's, with a histogram's three series."""
    names = set(BUILTIN)
    for name, (kind, _) in _contract().items():
        names |= {name + s for s in HISTOGRAM_SUFFIXES} if kind == "histogram" else {name}
    return names


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found += [panel, *panel.get("panels", [])]  # a collapsed row holds its panels
    return found


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel id + refId, expression) of every query of every panel."""
    return [
        (f"panel_{panel['id']}_{target['refId']}", target["expr"])
        for panel in _panels(_dashboard())
        for target in panel.get("targets", [])
    ]


def _names_in(expr: str) -> set[str]:
    """The metric names of an expression: identifiers with the project's prefix, and ``up``."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\b(?:metricsd_\w+|up)\b(?!\s*\()", without_strings))


def test_contract_lists_the_series_of_metrics_md() -> None:
    """deploy/metrics.txt names each series once, with the project prefix, a known type, and
    per-run series labelled by run_id."""
    lines = [
        line.split()[0]
        for line in CONTRACT.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == len(set(lines)) == 21
    for name, (kind, labels) in _contract().items():
        assert name.startswith("metricsd_") and kind in ("counter", "gauge", "histogram")
        assert name.endswith("_total") == (kind == "counter"), name
        assert name.startswith("metricsd_run_") == ("run_id" in labels), name


def test_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the rules file (syntax, expressions, templates)."""
    result = _run("check", "rules", str(RULES), cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_rules_pass_their_unit_tests() -> None:
    """`promtool test rules` runs rules_test.yml: every alert fires on its bad series and stays
    silent on the healthy ones."""
    result = _run("test", "rules", str(RULES_TEST), cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    """Each alert of rules.yml is tested at least once expecting alerts and once expecting none."""
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in _rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never silent"


def test_alerts_are_routable_and_say_which_run() -> None:
    """Every alert waits (``for:``) unless a single event is already the incident, carries a
    severity, a summary and a description; per-run alerts name the run in both."""
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert "for" in rule or rule["alert"] == "MetricsdPublishDropped", rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        if "metricsd_run_" in rule["expr"]:
            for text in (annotations["summary"], annotations["description"]):
                assert "{{ $labels.run_id }}" in text, rule["alert"]


def test_rules_and_dashboard_use_only_contract_series() -> None:
    """Every metric name in the rules and the dashboard is a series of the contract: a typo or a
    renamed series would give an alert that never fires and an empty panel."""
    known = _series_names()
    exprs = [(rule["alert"], rule["expr"]) for rule in _rules()] + _dashboard_queries()
    used: set[str] = set()
    for where, expr in exprs:
        names = _names_in(expr)
        assert names, f"{where} names no metric: {expr}"
        assert names <= known, f"{where} uses {sorted(names - known)}"
        used |= names
    variable = _dashboard()["templating"]["list"][1]
    assert _names_in(variable["definition"]) <= known
    # the dashboard shows every series of the contract
    dashboard_names = {n for _, expr in _dashboard_queries() for n in _names_in(expr)}
    shown = {
        n.removesuffix(s) for n in dashboard_names for s in HISTOGRAM_SUFFIXES if n.endswith(s)
    }
    assert set(_contract()) <= dashboard_names | shown


def test_dashboard_is_well_formed() -> None:
    """Valid JSON with unique panel ids, a grid position per panel, a current schema version and
    the run_id variable from the runs' throughput series."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39
    panels = _panels(dashboard)
    ids = Counter(panel["id"] for panel in panels)
    assert all(count == 1 for count in ids.values()), ids
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["id"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["id"]
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["id"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    run_id = variables["run_id"]
    assert run_id["type"] == "query"
    assert run_id["query"]["query"] == "label_values(metricsd_run_steps_per_second, run_id)"
    run_panels = [expr for _, expr in _dashboard_queries() if "metricsd_run_" in expr]
    assert run_panels and all('run_id=~"$run_id"' in expr for expr in run_panels)


def _input_series() -> list[dict[str, str]]:
    """Series shaped like the exporter's for every contract metric, for ten minutes: counters
    rising, gauges steady, a histogram with three buckets; each label of each name once, ``name``
    with a loss and a non-loss scalar."""
    values = {"quantile": ["0.5", "0.95", "0.99"], "name": ["loss", "lr"], "split": ["val"]}
    series: list[dict[str, str]] = [
        {"series": 'up{job="metricsd",instance="d:9464"}', "values": "1x20"}
    ]
    for name, (kind, labels) in _contract().items():
        combos: list[dict[str, str]] = [{}]
        for label in labels:
            options = values.get(label, {"run_id": ["r1"], "metric": ["f1"]}.get(label, ["x"]))
            combos = [{**combo, label: option} for combo in combos for option in options]
        for combo in combos:
            base = {"job": "metricsd", "instance": "d:9464", **combo}
            text = ",".join(f'{k}="{v}"' for k, v in base.items())
            if kind == "histogram":
                for le, step in (("0.1", 5), ("1", 9), ("+Inf", 10)):
                    series.append(
                        {"series": f'{name}_bucket{{{text},le="{le}"}}', "values": f"0+{step}x20"}
                    )
                series.append({"series": f"{name}_sum{{{text}}}", "values": "0+3x20"})
                series.append({"series": f"{name}_count{{{text}}}", "values": "0+10x20"})
            else:
                pattern = (
                    "0+10x20" if kind == "counter" else "0+60x20" if "timestamp" in name else "1x20"
                )
                series.append({"series": f"{name}{{{text}}}", "values": pattern})
    return series


def test_every_dashboard_query_parses_and_returns_data(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, becomes a recording rule: `promtool
    check rules` parses it with Prometheus's parser, and `promtool test rules` evaluates it on
    series shaped like the exporter's and finds a result (an empty panel would fail)."""
    queries = _dashboard_queries()
    rules = []
    for record, expr in queries:
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{record}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:{record}", "expr": expr})
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    checked = _run("check", "rules", "queries.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = {
        "rule_files": ["queries.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _input_series(),
                # absent(x) is empty exactly when x has a sample
                "promql_expr_test": [
                    {"expr": f"absent(dashboard:{record})", "eval_time": "10m", "exp_samples": []}
                    for record, _ in queries
                ],
            }
        ],
    }
    (tmp_path / "queries_test.yml").write_text(yaml.safe_dump(tests))
    result = _run("test", "rules", "queries_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid_and_loads_the_rules() -> None:
    """`promtool check config` accepts prometheus.yml, which scrapes job metricsd (the name the
    rules match on) at metricsd:9464 and loads rules.yml."""
    result = _run("check", "config", str(PROMETHEUS_YML), cwd=PROMETHEUS_YML.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["rules.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "metricsd"]
    assert job["static_configs"][0]["targets"] == ["metricsd:9464"]
    assert any('job="metricsd"' in rule["expr"] for rule in _rules())
