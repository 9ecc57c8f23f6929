"""The accepted model, served and published: POST /predict and [publish] dir.

Each task's poisoned stream (tests/test_tasks.py: two clean segments, then a broken
upstream) runs through the loop, its records through the real JSON codec (multi-hot
labels for multi-label), with a Predictor fed by the loop. /predict must answer with the
checkpoint it names, never with the candidate of a window the guard rolls back.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest

from continuity.checkpoints import CheckpointStore
from continuity.factory import build_learner
from continuity.guard import GuardConfig
from continuity.http import ServiceHTTP
from continuity.loop import StreamInput, TrainingLoop
from continuity.metrics import ServiceMetrics
from continuity.probe import ProbeConfig
from continuity.serving import KEEP_PUBLISHED, LATEST, AcceptedModel, Predictor, Publisher, published_spec
from continuity.stream import MemoryDeadLetters, ScenarioSource, make_codec
from continuity.stream.codecs import FeatureSpec

sys.path.insert(0, str(Path(__file__).parent))
from test_tasks import CONFIG, FEATURES, INPUTS, TASKS, task_scenario

REPO = Path(__file__).resolve().parent.parent


def _run(task_name: str, directory: Path) -> dict:
    task = TASKS[task_name]
    scenario = task_scenario(task_name)
    codec = make_codec("json", FeatureSpec((FEATURES,), "float32", task.label_classes, label_shape=task.labels.shape))
    stream = StreamInput(
        open_source=lambda positions: ScenarioSource(scenario, codec, start=positions),
        codec=codec,
        dead_letters=MemoryDeadLetters(),
        quarantine=MemoryDeadLetters(),
    )
    learner = build_learner(CONFIG, inputs=INPUTS, task=task)
    predictor = Predictor(learner, max_rows=64)
    served: list[AcceptedModel] = []
    store = CheckpointStore(directory, keep_last=100)  # every served checkpoint stays to be compared with

    def on_accepted(model: AcceptedModel) -> None:
        served.append(model)
        predictor.accept(model)

    loop = TrainingLoop(
        stream,
        learner,
        store,
        probe=ProbeConfig(holdout_fraction=0.1),
        guard=GuardConfig(every_examples=400),
        seed=0,
        checkpoint_every_s=0.0,
        on_accepted=on_accepted,
    )
    instances = scenario.segments[0].test_x[:40]
    at_rollback: list[tuple[dict, np.ndarray, int | None]] = []
    roll_back = loop.guard.roll_back

    def answer_then_roll_back(**options):
        # The window was just judged regressed: its candidate is what the guard judged last.
        candidate = loop.guard._judged[0]
        answer = predictor.predict({"instances": instances.tolist()})
        candidate_says = learner.evaluate(candidate.params, instances, _labels(task_name, len(instances))).predicted
        finalized = loop._finalized.number if loop._finalized is not None else None
        at_rollback.append((answer, candidate_says, finalized))
        return roll_back(**options)

    loop.guard.roll_back = answer_then_roll_back
    summary = loop.run()
    store.close()
    return {
        "learner": learner,
        "predictor": predictor,
        "served": served,
        "summary": summary,
        "instances": instances,
        "at_rollback": at_rollback,
        "directory": directory,
    }


def _labels(task_name: str, n: int) -> np.ndarray:
    task = TASKS[task_name]
    return np.zeros((n, *task.labels.shape), task.label_dtype)


def _evaluate_checkpoint(run: dict, task_name: str, number: int) -> np.ndarray:
    learner = run["learner"]
    store = CheckpointStore(run["directory"], create=False)
    restored = store.restore(number, state_like=learner.init(0))
    return learner.evaluate(
        restored.state.params, run["instances"], _labels(task_name, len(run["instances"]))
    ).predicted


def _same(task_name: str, answer, expected: np.ndarray) -> None:
    got = np.asarray(answer)
    if task_name == "regression":  # another batch size may round the last bit differently
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module", params=list(TASKS))
def served_run(request, tmp_path_factory):
    return request.param, _run(request.param, tmp_path_factory.mktemp(f"predict-{request.param}") / "store")


@pytest.mark.slow  # each task's stream through the loop
def test_predict_answers_with_the_params_of_the_accepted_checkpoint_it_names(served_run):
    task_name, run = served_run
    store = CheckpointStore(run["directory"], create=False)
    accepted = {e["checkpoint"] for e in store.ledger.read() if e["event"] in ("accept", "restore")}
    assert run["served"] and {m.checkpoint for m in run["served"]} <= accepted | set(store.numbers())
    answer = run["predictor"].predict({"instances": run["instances"].tolist()})
    assert answer["checkpoint"] == run["summary"].last_checkpoint == run["served"][-1].checkpoint
    _same(task_name, answer["predictions"], _evaluate_checkpoint(run, task_name, answer["checkpoint"]))
    if task_name == "multi-label":
        assert np.asarray(answer["predictions"]).shape == (len(run["instances"]), TASKS[task_name].outputs)


@pytest.mark.slow  # each task's stream through the loop
def test_predict_during_a_window_later_rolled_back_answers_with_the_last_accepted_model(served_run):
    task_name, run = served_run
    assert run["summary"].rollbacks >= 1 and run["at_rollback"]
    differs = False
    for answer, candidate_says, finalized in run["at_rollback"]:
        # The last accepted model whose checkpoint is on disk (a newer one is served once its save finalizes).
        assert answer["checkpoint"] == finalized
        expected = _evaluate_checkpoint(run, task_name, answer["checkpoint"])
        _same(task_name, answer["predictions"], expected)
        differs |= not np.allclose(np.asarray(candidate_says, np.float64), expected)
    assert differs  # the candidates rolled back would have answered otherwise


# ---- malformed requests, over HTTP ------------------------------------------------------------------


class _Controller:
    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def status(self) -> dict:
        return {}

    def ready(self) -> bool:
        return True

    def predict(self, body) -> dict:
        return self.predictor.predict(body)


def _post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_malformed_prediction_requests_get_400_with_a_one_line_reason_and_503_before_a_model():
    import jax.numpy as jnp
    import optax

    from continuity.learner import Classification, Learner
    from examples.tokens.model import build

    inputs = {"tokens": jax.ShapeDtypeStruct((6,), jnp.int32), "numeric": jax.ShapeDtypeStruct((2,), jnp.float32)}
    learner = Learner(
        lambda **kw: build(**kw, vocab=32, dim=4, hidden=8),
        optax.sgd(0.1),
        Classification(3),
        inputs=inputs,
        batch_size=4,
    )
    predictor = Predictor(learner, max_rows=8)
    good = {"tokens": [1, 2, 3, 0, 0, 0], "numeric": [0.5, 1.0]}
    with ServiceHTTP(_Controller(predictor), ServiceMetrics(), port=0) as http:
        url = f"{http.url}/predict"
        status, body = _post(url, json.dumps({"instances": [good]}).encode())
        assert status == 503 and "no accepted model yet" in body["error"]
        predictor.accept(AcceptedModel(learner.init(0).params, 7))
        status, body = _post(url, json.dumps({"instances": [good, good]}).encode())
        assert status == 200 and body["checkpoint"] == 7 and len(body["predictions"]) == 2
        assert all(isinstance(p, int) and 0 <= p < 3 for p in body["predictions"])
        cases = {
            b"not json": "must be a JSON object",
            b"[1, 2]": "must be a JSON object",
            b"{}": 'the body must be a JSON object {"instances": [...]}',
            json.dumps({"instances": []}).encode(): "non-empty list",
            json.dumps({"instances": [good], "extra": 1}).encode(): "unknown keys ['extra']",
            json.dumps({"instances": [good] * 9}).encode(): "9 instances is more than service.predict_max_rows = 8",
            json.dumps(
                {"instances": [good, {"tokens": [1, 2]}]}
            ).encode(): "instances[1]: bad JSON: missing field(s) ['x.numeric']",
            json.dumps(
                {"instances": [{**good, "tokens": [1, 2, 3]}]}
            ).encode(): "instances[0]: bad shape: x.tokens (3,) != configured (6,)",
            json.dumps(
                {"instances": [{**good, "tokens": [1, 2, 3.5, 0, 0, 0]}]}
            ).encode(): "x.tokens must hold integers (int32)",
            json.dumps({"instances": [{**good, "tokens": [2**40, 2, 3, 0, 0, 0]}]}).encode(): "beyond int32",
            json.dumps({"instances": [{**good, "numeric": [1e300, 0]}]}).encode(): "non-finite: x.numeric",
            json.dumps({"instances": [{**good, "numeric": ["a", 0]}]}).encode(): "x.numeric is not a rectangular array",
        }
        for data, words in cases.items():
            status, body = _post(url, data)
            assert status == 400, data
            assert words in body["error"] and "\n" not in body["error"], (data, body)


def test_requests_of_any_size_up_to_the_limit_reuse_a_few_padded_shapes():
    from continuity.learner import Classification, compilation_count

    learner = build_learner(CONFIG, inputs=INPUTS, task=Classification(4))
    predictor = Predictor(learner, max_rows=20)
    assert predictor.buckets == [1, 2, 4, 8, 16, 20]
    predictor.accept(AcceptedModel(learner.init(0).params, 1))
    x = np.random.default_rng(0).normal(size=(20, FEATURES)).astype(np.float32)
    for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 20):  # warms every bucket
        predictor.predict({"instances": x[:n].tolist()})
    before = compilation_count()
    answers = [predictor.predict({"instances": x[:n].tolist()}) for n in range(1, 21)]
    assert compilation_count() == before
    expected = learner.evaluate(learner.init(0).params, x, np.zeros(20, np.int32)).predicted
    for n, answer in enumerate(answers, start=1):
        np.testing.assert_array_equal(answer["predictions"], expected[:n])


# ---- publishing ------------------------------------------------------------------------------------


def _published_learner():
    from continuity.learner import Classification

    return build_learner(CONFIG, inputs=INPUTS, task=Classification(4))


def test_publish_is_atomic_a_reader_never_sees_a_partial_latest_and_only_the_newest_are_kept(tmp_path):
    learner = _published_learner()
    spec = published_spec(
        learner, model={"factory": "continuity.learner:mlp", "kwargs": {"hidden": [32]}}, config_digest="d"
    )
    publisher = Publisher(tmp_path / "published", spec)
    params = [learner.init(seed).params for seed in range(3)]
    stop = threading.Event()
    seen, problems = set(), []

    def read_latest():
        latest = tmp_path / "published" / LATEST
        while not stop.is_set():
            try:
                with open(latest / "spec.json") as file:
                    spec = json.load(file)
                with np.load(latest / "params.npz") as arrays:
                    names = set(arrays.files)
                    first = np.asarray(arrays[sorted(names)[0]])
            except FileNotFoundError:
                continue  # before the first publish, or a directory pruned between the two opens
            except Exception as error:  # noqa: BLE001 - anything else is a partial file
                problems.append(repr(error))
                continue
            seen.add(spec["checkpoint"])
            want = {k for k in _keys(params[0])}
            if names != want or first.size == 0:
                problems.append(f"checkpoint {spec['checkpoint']}: {sorted(names)}")

    reader = threading.Thread(target=read_latest)
    reader.start()
    for number in range(1, 31):
        publisher.submit(AcceptedModel(params[number % 3], number))
        publisher.flush()
    stop.set()
    reader.join()
    publisher.close()
    root = tmp_path / "published"
    assert problems == [] and seen
    assert (root / LATEST).resolve().name == "30"
    kept = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    assert kept == list(range(31 - KEEP_PUBLISHED, 31))
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no partial directory or link left
    spec = json.loads((root / LATEST / "spec.json").read_text())
    assert spec["checkpoint"] == 30 and spec["config_digest"] == "d" and spec["task"]["args"] == {"num_classes": 4}
    assert spec["inputs"] == {"shape": [FEATURES], "dtype": "float32"}


def _keys(params) -> set[str]:
    from continuity.serving import param_key

    return {param_key(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_the_readmes_snippet_loads_a_published_model_without_the_service_and_predicts_as_it_does(tmp_path):
    learner = _published_learner()
    spec = published_spec(
        learner, model={"factory": "continuity.learner:mlp", "kwargs": {"hidden": [32]}}, config_digest="d"
    )
    params = learner.init(3).params
    Publisher(tmp_path / "published", spec).write(AcceptedModel(params, 12))
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"<!-- published-model-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    x = np.random.default_rng(1).normal(size=(10, FEATURES)).astype(np.float32)
    namespace = {"PUBLISHED": str(tmp_path / "published"), "x": x}
    exec(compile(snippet, "README.md", "exec"), namespace)  # the documented snippet, run as a user runs it
    assert namespace["checkpoint"] == 12
    np.testing.assert_array_equal(
        namespace["predictions"], learner.evaluate(params, x, np.zeros(10, np.int32)).predicted
    )
