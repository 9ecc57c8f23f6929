"""docker-compose.yml, the Dockerfile and deploy/continuity.toml agree (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    with open(REPO / "deploy" / "continuity.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def entrypoint() -> list:
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1, "the Dockerfile needs exactly one ENTRYPOINT"
    return json.loads(lines[0].removeprefix("ENTRYPOINT"))  # exec form: a JSON list


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _mounts(service: dict) -> list[dict]:
    """Volume entries in long form: {"type", "source", "target", "read_only"}."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):  # short form SOURCE:TARGET[:ro]
            source, target, *mode = entry.split(":")
            kind = "bind" if source.startswith((".", "/")) else "volume"
            entry = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        mounts.append(entry)
    return mounts


def test_services_and_kafka_in_kraft_mode(compose):
    assert set(compose["services"]) == {"kafka", "continuity", "prometheus", "grafana"}
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    controller_port = re.search(r"CONTROLLER://[^,]*:(\d+)", env["KAFKA_LISTENERS"]).group(1)
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:{controller_port}"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # one node: the group offsets topic must fit


def test_bootstrap_matches_the_kafka_service_and_its_advertised_listener(compose, config):
    env = _env(compose["services"]["kafka"])
    advertised = re.search(r"PLAINTEXT://([^,:]+):(\d+)", env["KAFKA_ADVERTISED_LISTENERS"])
    listening = re.search(r"(?:^|,)PLAINTEXT://[^,:]*:(\d+)", env["KAFKA_LISTENERS"])
    host, port = config["stream"]["bootstrap"].rsplit(":", 1)
    assert host == "kafka" and host in compose["services"]
    assert (host, port) == advertised.groups()
    assert port == listening.group(1)


def test_continuity_service_serves_the_configured_port(compose, config):
    service = compose["services"]["continuity"]
    assert service["build"]["dockerfile"] == "Dockerfile" and (REPO / service["build"]["dockerfile"]).is_file()
    http_port = config["service"]["http_port"]
    assert service["ports"] == [f"127.0.0.1:{http_port}:{http_port}"]  # the host's loopback only
    assert f"EXPOSE {http_port}" in (REPO / "Dockerfile").read_text()
    assert f"127.0.0.1:{http_port}/" in " ".join(service["healthcheck"]["test"])
    # 0.0.0.0 in a container needs the admin token, which compose passes through from the host.
    assert config["service"]["http_host"] == "0.0.0.0"
    token_env = config["service"]["admin_token_env"]
    assert _env(service)[token_env].startswith("${" + token_env)
    assert "kafka" in service["depends_on"]


def test_the_mounted_config_is_the_one_serve_reads(compose, entrypoint):
    service = compose["services"]["continuity"]
    assert entrypoint[:2] == ["continuity", "serve"]
    config_path = entrypoint[entrypoint.index("--config") + 1]
    (mount,) = [m for m in _mounts(service) if m["type"] == "bind"]
    assert mount["target"] == config_path and mount["read_only"] is True
    assert (REPO / mount["source"]).resolve() == REPO / "deploy" / "continuity.toml"


def test_checkpoints_live_in_a_named_volume(compose, config):
    (mount,) = [m for m in _mounts(compose["services"]["continuity"]) if m["type"] == "volume"]
    assert mount["target"] == config["checkpoints"]["dir"]
    assert mount["source"] in compose["volumes"]


def test_the_deploy_config_loads_with_the_token_from_the_environment():
    config_module = pytest.importorskip("continuity.config")
    path = REPO / "deploy" / "continuity.toml"
    config = config_module.load_config(path, environ={"CONTINUITY_ADMIN_TOKEN": "t0ken"})
    assert config.service.admin_token == "t0ken" and config.stream.bootstrap == "kafka:9092"
    # Apache Kafka's session timeout, not the embedded broker's short one.
    assert config.stream.session_timeout_ms == 45000
    with pytest.raises(config_module.ConfigError, match="CONTINUITY_ADMIN_TOKEN"):
        config_module.load_config(path, environ={})  # 0.0.0.0 without a token does not start


# ---------------------------------------------------------------------------- Prometheus and Grafana


def _bind(service: dict, target: str) -> dict:
    (mount,) = [m for m in _mounts(service) if m["type"] == "bind" and m["target"] == target]
    return mount


def test_prometheus_and_grafana_images_are_pinned_to_a_release(compose):
    for name in ("prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned to a release"


def test_prometheus_reads_the_deploy_config_read_only_and_scrapes_the_service(compose, config):
    prometheus = compose["services"]["prometheus"]
    (flag,) = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config_file = Path(flag.split("=", 1)[1])
    mount = _bind(prometheus, str(config_file.parent))
    assert mount["read_only"] is True
    local = (REPO / mount["source"]).resolve()
    assert local == REPO / "deploy" / "prometheus" and (local / config_file.name).is_file()
    scrape = yaml.safe_load((local / config_file.name).read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"continuity:{config['service']['http_port']}"]}]
    assert all((local / rules).is_file() for rules in scrape["rule_files"])  # relative to the mounted config
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard_read_only(compose):
    grafana = compose["services"]["grafana"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]  # loopback, like the service
    provisioning = _bind(grafana, "/etc/grafana/provisioning")
    assert provisioning["read_only"] is True
    local = (REPO / provisioning["source"]).resolve()
    (datasource,) = yaml.safe_load((local / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((local / "dashboards" / "continuity.yml").read_text())["providers"]
    dashboards = _bind(grafana, provider["options"]["path"])
    assert dashboards["read_only"] is True
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards["target"] + "/")
    dashboard_file = (REPO / dashboards["source"]).resolve() / Path(home).name
    dashboard = json.loads(dashboard_file.read_text())
    uids = set()
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        uids |= {panel["datasource"]["uid"]} if "datasource" in panel else set()
        uids |= {target["datasource"]["uid"] for target in panel.get("targets", [])}
    assert uids == {datasource["uid"]}  # every query goes to the provisioned Prometheus
    assert _env(grafana)["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_installs_the_pinned_dependencies_in_a_layer_before_the_code():
    # Layer caching: a change to the code must not reinstall the dependencies, so nothing but the
    # packaging is copied before they are installed, and the code is installed without them.
    steps = _instructions()
    copies = [(i, args.split()[:-1]) for i, (op, args) in enumerate(steps) if op == "COPY"]
    runs = [(i, args) for i, (op, args) in enumerate(steps) if op == "RUN"]
    (dependencies,) = [(i, args) for i, args in runs if "-c constraints.txt" in args]
    assert "-r requirements.txt" in dependencies[1] and "['project']['dependencies']" in dependencies[1]
    before = [source for i, sources in copies if i < dependencies[0] for source in sources]
    assert before == ["pyproject.toml", "constraints.txt"]
    code = {source for i, sources in copies if i > dependencies[0] for source in sources}
    # What the wheel packs: continuity and the libraries its symlinks reach (not examples/, tests/).
    packages = {p.name for p in (REPO / "continuity").iterdir() if p.is_symlink()} | {"continuity"}
    assert packages <= code, f"not copied into the image: {packages - code}"
    (install,) = [(i, args) for i, args in runs if "pip install --no-deps ." in args]
    assert install[0] > max(i for i, _ in copies)
    assert "constraints.txt" not in (REPO / ".dockerignore").read_text().split()


# ---------------------------------------------------------------------------- two processes, one model


@pytest.fixture(scope="module")
def scale_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.scale.yml").read_text())


def test_the_scale_file_runs_two_processes_of_one_config_instead_of_the_single_service(compose, scale_compose):
    services = scale_compose["services"]
    assert services["continuity"]["profiles"] == ["single"]  # off unless asked for
    processes = [services["continuity-0"], services["continuity-1"]]
    assert [s["command"] for s in processes] == [["--process-id", "0"], ["--process-id", "1"]]
    assert {s["image"] for s in processes} == {compose["services"]["continuity"]["image"]}  # one image, built once
    assert processes[0]["build"] == compose["services"]["continuity"]["build"] and "build" not in processes[1]
    configs = [[m for m in _mounts(s) if m["type"] == "bind"] for s in processes]
    assert configs[0] == configs[1] and configs[0][0]["read_only"] is True
    assert (REPO / configs[0][0]["source"]).resolve() == REPO / "deploy" / "continuity.scale.toml"
    assert "continuity-0" in services["continuity-1"]["depends_on"]
    assert int(services["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"]) % 2 == 0  # as many for each process


def test_the_scale_config_loads_as_either_process_and_each_serves_its_port_and_keeps_its_store(scale_compose):
    from continuity.config import load_config
    from continuity.service import process_config

    path = REPO / "deploy" / "continuity.scale.toml"
    services = scale_compose["services"]
    for i in (0, 1):
        config = process_config(
            load_config(path, [f"scale.process_id={i}"], environ={"CONTINUITY_ADMIN_TOKEN": "t0ken"})
        )
        assert config.scale.num_processes == 2 and config.scale.coordinator.split(":")[0] == "continuity-0"
        service = services[f"continuity-{i}"]
        port = config.service.http_port
        assert port == 8080 + i and service["ports"] == [f"127.0.0.1:{port}:{port}"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])
        (store,) = [m for m in _mounts(service) if m["type"] == "volume"]
        assert store["target"] == config.checkpoints.dir  # process 0: the model; process 1: its ledger
    assert services["continuity-0"]["hostname"] == "continuity-0"
    volumes = {m["source"] for i in (0, 1) for m in _mounts(services[f"continuity-{i}"]) if m["type"] == "volume"}
    assert volumes == {"checkpoints", "checkpoints-1"}


def test_prometheus_scrapes_both_processes_in_the_scale_file(scale_compose):
    (flag,) = [a for a in scale_compose["services"]["prometheus"]["command"] if a.startswith("--config.file=")]
    local = REPO / "deploy" / "prometheus" / Path(flag.split("=", 1)[1]).name
    scrape = yaml.safe_load(local.read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["continuity-0:8080", "continuity-1:8081"]}]
    assert all((local.parent / rules).is_file() for rules in scrape["rule_files"])
