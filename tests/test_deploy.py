"""deploy/ against the real tools: promtool checks the Prometheus config and unit-tests the alert
rules, and a real Prometheus server scrapes a running service and holds every metric the Grafana
dashboard and the alert rules use.

promtool and prometheus come from Debian's `prometheus` package (`make test` installs it when
missing, as root: `make prometheus-tools`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import SHORT_SESSION_SET
from prometheus_client.parser import text_string_to_metric_families

from continuity.config import load_config
from continuity.metrics import METRICS
from continuity.service import Service
from continuity.stream import FeatureSpec, ScenarioSource, create_topic, free_port, make_codec, produce_records
from continuity.stream.scenarios import make_scenario

pytestmark = pytest.mark.slow  # promtool and a Prometheus server as subprocesses, a service training

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "continuity.json"
RULES_TEST = REPO / "tests" / "prometheus" / "alerts_test.yml"
# Exported by every service, but with samples only for regression tasks (this one classifies).
REGRESSION_ONLY = {"continuity_probe_loss"}
# What Grafana substitutes in the dashboard's queries, as a query on the server needs it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "continuity", "$instance": ".*"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make prometheus-tools` installs Debian's prometheus package (as root)")
    return path


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, template variables, annotations."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))  # a row's collapsed panels
        queries += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        # label_values(METRIC_SELECTOR, label) is Grafana's, not PromQL: its selector is.
        queries.append(re.fullmatch(r"label_values\((.*), *\w+\)", variable["query"]["query"]).group(1))
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(queries: list[str]) -> set[str]:
    """The service's metrics a set of PromQL expressions reads (ours all start `continuity_`)."""
    return {name for query in queries for name in re.findall(r"\bcontinuity_[a-z0-9_]+\b", query)}


def _grafana_to_promql(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"a Grafana variable the test does not know: {query}"
    return query


def test_promtool_accepts_the_prometheus_config_and_the_alert_rules_it_loads():
    out = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out
    rules = _run(_tool("promtool"), "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert f"SUCCESS: {len(rule_queries())} rules found" in rules


def test_every_alert_fires_on_its_synthetic_series_and_not_on_a_healthy_service():
    out = _run(_tool("promtool"), "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    defined = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert tested == defined  # every alert has a unit test


def test_the_dashboard_and_the_alert_rules_use_only_metrics_the_collector_defines():
    used = metric_names(dashboard_queries()) | metric_names(rule_queries())
    assert len(used) >= 15  # the parse found the queries (one that finds nothing proves nothing)
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families <= {spec.name for spec in METRICS}, sorted(families - {spec.name for spec in METRICS})


class _Prometheus:
    """A Prometheus server on loopback, scraping one target every second, with the deploy's alert rules."""

    def __init__(self, tmp_path: Path, target: str):
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (tmp_path / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # a bad query is 400 with a JSON error
            return json.loads(error.read())

    def query(self, promql: str) -> list:
        answer = self.api("query", query=promql)
        assert answer["status"] == "success", f"{promql}: {answer.get('error')}"
        return answer["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def _wait(condition, what: str, timeout_s: float, alive) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except OSError:  # not listening yet
            pass
        assert alive(), f"ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_real_prometheus_scrapes_a_running_service_and_holds_every_metric_the_dashboard_and_alerts_use(
    broker, topic_name, tmp_path
):
    topic = topic_name()
    spec = FeatureSpec((8, 8, 1), "float32", 10)
    source = ScenarioSource(
        make_scenario("permuted-digits", segments=2, seed=5), make_codec("binary", spec), topic=topic
    )
    create_topic(broker.bootstrap, topic, 1)
    produce_records(broker.bootstrap, topic, (source.encode_record(i) for i in range(1500)))
    config = load_config(
        None,
        [
            f'stream.bootstrap="{broker.bootstrap}"',
            f'stream.topics=["{topic}"]',
            SHORT_SESSION_SET,
            f'checkpoints.dir="{tmp_path / "run"}"',
            "model.hidden=[32]",
            "probe.every_examples=500",
            "checkpoints.every_seconds=0",
            "service.http_port=0",
            "service.progress_every_s=0.5",
        ],
    )
    started = time.time()
    service = Service(config)
    urls: list[str] = []
    thread = threading.Thread(target=service.run, args=(urls.append,), daemon=True)
    thread.start()
    prometheus = None
    try:

        def scraped() -> str:
            with urllib.request.urlopen(urls[0] + "/metrics", timeout=5) as response:
                return response.read().decode()

        def sample(text: str, name: str) -> float | None:
            families = text_string_to_metric_families(text)
            return next((s.value for f in families for s in f.samples if s.name == name), None)

        # Trained, judged and checkpointed, and a progress report has seen the checkpoint.
        _wait(
            lambda: urls and (sample(scraped(), "continuity_checkpoint_timestamp_seconds") or 0) > 0,
            "a first checkpoint on /metrics",
            120,
            thread.is_alive,
        )
        text = scraped()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        exported = {s.name for f in families.values() for s in f.samples}
        used = metric_names(dashboard_queries()) | metric_names(rule_queries())
        assert used - REGRESSION_ONLY <= exported, f"used but not exported: {sorted(used - REGRESSION_ONLY - exported)}"
        assert REGRESSION_ONLY <= set(families)  # declared; samples only in regression tasks
        assert started <= sample(text, "continuity_checkpoint_timestamp_seconds") <= time.time()
        assert sample(text, "continuity_ready") == 1 and sample(text, "continuity_stream_up") == 1

        prometheus = _Prometheus(tmp_path, urls[0].removeprefix("http://"))
        alive = lambda: thread.is_alive() and prometheus.process.poll() is None  # noqa: E731
        stored = lambda name: prometheus.query(f'count({{__name__="{name}", job="continuity"}})')  # noqa: E731
        _wait(
            lambda: all(stored(name) for name in used - REGRESSION_ONLY), "Prometheus to store every metric", 60, alive
        )
        assert prometheus.query('up{job="continuity"}')[0]["value"][1] == "1"
        trained = prometheus.query("continuity_examples_trained_total")
        assert float(trained[0]["value"][1]) > 0

        # Every dashboard query is PromQL the server evaluates (Grafana's variables filled in).
        for query in dashboard_queries():
            prometheus.query(_grafana_to_promql(query))
        # The alert rules were loaded and evaluate on the real series without errors.
        _wait(
            lambda: all(
                rule["health"] == "ok" and rule["lastEvaluation"][:4] != "0001"
                for group in prometheus.api("rules")["data"]["groups"]
                for rule in group["rules"]
            ),
            "every alert rule evaluated",
            30,
            alive,
        )
        groups = prometheus.api("rules")["data"]["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} == {
            rule["alert"] for rule in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
        }
    finally:
        if prometheus is not None:
            prometheus.stop()
        service.stop_event.set()
        thread.join(60)
    assert not thread.is_alive()
