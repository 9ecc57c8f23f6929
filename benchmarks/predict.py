"""POST /predict latency: the default model answering 32-row requests over in-process HTTP.

The service's HTTP endpoints (continuity/http.py) and its Predictor (continuity/serving.py)
with the default config's model, answering from its initial params (an accepted model is
the same computation), on one kept-alive connection from the same process: what a client
next to the service sees, without the network. Requests are sent one after another;
the figures are the median and tail of many, after a warm-up that compiles the padded
shapes. Run: `continuity bench predict [--rows 32] [--requests 1000]`.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from typing import cast
from urllib.parse import urlparse

import numpy as np

from continuity.config import Config
from continuity.factory import learner_from_config
from continuity.http import ServiceController, ServiceHTTP
from continuity.metrics import ServiceMetrics
from continuity.serving import AcceptedModel, Predictor


class _Controller:
    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def status(self) -> dict:
        return {}

    def ready(self) -> bool:
        return True

    def predict(self, body) -> dict:
        return self.predictor.predict(body)


def run_predict_benchmark(*, rows: int = 32, requests: int = 1000, warmup: int = 50, seed: int = 0) -> dict:
    """Latency of POST /predict with `rows` instances of the default model, in milliseconds."""
    config = Config()
    learner = learner_from_config(config)
    predictor = Predictor(learner, max_rows=config.service.predict_max_rows)
    predictor.accept(AcceptedModel(learner.init(seed).params, 0))
    x = np.random.default_rng(seed).random((rows, *config.stream.feature_shape), np.float32)
    body = json.dumps({"instances": x.tolist()}).encode()
    in_process: list[float] = []
    over_http: list[float] = []
    controller = cast(ServiceController, _Controller(predictor))  # /predict only: no admin actions here
    with ServiceHTTP(controller, ServiceMetrics(), port=0) as server:
        url = urlparse(server.url)
        connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
        try:
            for i in range(warmup + requests):
                started = time.perf_counter()
                connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                elapsed = time.perf_counter() - started
                if response.status != 200 or len(answer["predictions"]) != rows:
                    raise RuntimeError(f"/predict answered {response.status}: {answer}")
                if i >= warmup:
                    over_http.append(elapsed * 1000)
        finally:
            connection.close()
    parsed = json.loads(body)
    for i in range(warmup + requests):
        started = time.perf_counter()
        predictor.predict(parsed)
        if i >= warmup:
            in_process.append((time.perf_counter() - started) * 1000)

    def figures(samples: list[float]) -> dict:
        ordered = sorted(samples)
        return {
            "median_ms": statistics.median(ordered),
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
        }

    return {
        "rows": rows,
        "requests": requests,
        "model": learner.describe()["model"][0],
        "body_bytes": len(body),
        "http": figures(over_http),
        "predictor_only": figures(in_process),
    }
