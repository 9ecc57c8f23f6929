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
    assert set(compose["services"]) == {"kafka", "continuity"}
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
    published = [str(p).rsplit(":", 1)[-1] for p in service["ports"]]
    assert published == [str(http_port)]
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
    packages = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()} | {"continuity"}
    assert packages <= code, f"not copied into the image: {packages - code}"
    (install,) = [(i, args) for i, args in runs if "pip install --no-deps ." in args]
    assert install[0] > max(i for i, _ in copies)
    assert "constraints.txt" not in (REPO / ".dockerignore").read_text().split()
