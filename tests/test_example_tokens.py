"""examples/tokens end to end: its producer, its config and its model of one's own, through `serve` as it is."""

from __future__ import annotations

import json
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np

from continuity.config import load_config
from continuity.service import Service
from continuity.stream import create_topic, free_port, produce_records
from continuity.stream.broker import SHORT_SESSION_TIMEOUT_MS
from examples.tokens.produce import LENGTH, generate, records

REPO = Path(__file__).resolve().parent.parent


def test_the_token_example_trains_through_serve_publishes_and_answers_predict(broker, topic_name, tmp_path):
    topic = topic_name()
    create_topic(broker.bootstrap, topic)
    produce_records(broker.bootstrap, topic, records(examples=3000, segments=3, seed=0))
    # The example's own file, with only where things are changed.
    example = tomllib.loads((REPO / "examples/tokens/config.toml").read_text())
    assert example["model"]["factory"] == "examples.tokens.model:build"
    config = load_config(
        REPO / "examples/tokens/config.toml",
        [
            f"stream.bootstrap={broker.bootstrap}",
            f"stream.topics={topic}",
            f"stream.group={topic}-group",
            f"stream.session_timeout_ms={SHORT_SESSION_TIMEOUT_MS}",
            f'checkpoints.dir="{tmp_path / "run"}"',
            f'publish.dir="{tmp_path / "published"}"',
            f"service.http_port={free_port()}",
        ],
        environ={},
    )
    service = Service(config, max_examples=2700)
    urls: list[str] = []
    summary: list = []
    runner = threading.Thread(target=lambda: summary.append(service.run(announce=urls.append)))
    runner.start()
    instances = [
        {"tokens": x["tokens"].tolist(), "numeric": x["numeric"].tolist()}
        for x, _, _ in generate(examples=3000, segments=3, seed=0)
    ][:32]
    answer = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and runner.is_alive():
        if urls and service.predictor.model is not None:
            request = urllib.request.Request(
                f"{urls[0]}/predict", data=json.dumps({"instances": instances}).encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
            break
        time.sleep(0.2)
    runner.join(timeout=240)
    assert not runner.is_alive()
    assert answer is not None, "no accepted model was served while the service ran"
    assert len(answer["predictions"]) == 32 and all(p in range(4) for p in answer["predictions"])
    assert isinstance(answer["checkpoint"], int)
    run = summary[0]
    assert run.examples_trained >= 2700 and run.accepted >= 1 and run.dead_letters == 0
    assert run.probe_accuracy is not None and run.probe_accuracy > 0.5  # four classes: chance is 0.25
    latest = tmp_path / "published" / "latest"
    spec = json.loads((latest / "spec.json").read_text())
    assert spec["checkpoint"] == run.last_checkpoint
    assert spec["inputs"]["tokens"] == {"shape": [LENGTH], "dtype": "int32"}
    assert spec["model"] == {
        "factory": "examples.tokens.model:build",
        "kwargs": {"vocab": 512, "dim": 32, "hidden": 64},
    }
    with np.load(latest / "params.npz") as params:
        assert params["embed/embedding"].shape == (512, 32)
