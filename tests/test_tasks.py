"""Every task end to end: multi-label in the library, then each task through the guarded loop.

Multi-label (independent sigmoid outputs, multi-hot labels) is checked like the others
were: its loss, prediction and Fisher against the formulas, and a learner that fits it.
Then each task runs the same stream shape through the training loop: two clean segments
and a broken upstream that relabels inputs like the first one's. The guard must pair the
task's outcome (right/wrong for classification, losses otherwise), roll the poisoned
window back, and two runs of one stream must leave identical checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from continuity.checkpoints import CheckpointStore
from continuity.factory import build_learner
from continuity.guard import GuardConfig
from continuity.learner import (
    Batch,
    Classification,
    EWCConfig,
    LearnerConfig,
    ModelConfig,
    MultiLabel,
    Regression,
    ReplayConfig,
    compilation_count,
    ewc,
)
from continuity.loop import StreamInput, TrainingLoop, params_digest
from continuity.probe import ProbeConfig
from continuity.report import write_markdown
from continuity.stream import MemoryDeadLetters, ScenarioSource
from continuity.stream.scenarios import Scenario, Segment

sys.path.insert(0, str(Path(__file__).parent))
from named_codec import NamedFeaturesCodec

FEATURES, LABELS, B = 8, 5, 32
INPUTS = jax.ShapeDtypeStruct((FEATURES,), jnp.float32)
CONFIG = LearnerConfig(
    model=ModelConfig(hidden=(32,)),
    learning_rate=3e-3,
    batch_size=B,
    replay=ReplayConfig(kind="reservoir", capacity=256, batch_size=32),
    ewc=EWCConfig(enabled=True, strength=10.0, strength_min=1.0, fisher_samples=64),
)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _multi_hot(x: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    return (x @ teacher > 0).astype(np.int32)


# ---- multi-label in the library ------------------------------------------------------------


def test_multi_label_loss_is_the_summed_binary_cross_entropy_and_a_label_is_predicted_above_one_half():
    task = MultiLabel(3)
    outputs = np.array([[2.0, -1.0, 0.0], [-3.0, 0.5, 4.0]], np.float32)
    y = np.array([[1, 0, 1], [0, 0, 1]], np.int32)
    p = _sigmoid(outputs.astype(np.float64))
    by_hand = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1)
    np.testing.assert_allclose(
        np.asarray(task.example_losses(jnp.asarray(outputs), jnp.asarray(y))), by_hand, rtol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(task.nll(outputs, y)), np.asarray(task.example_losses(outputs, y)))
    np.testing.assert_array_equal(np.asarray(task.predict(outputs)), [[1, 0, 0], [0, 1, 1]])  # sigmoid(0) = 0.5: no
    assert task.labels.shape == (3,) and task.outputs == 3 and task.outcome.kind == "loss"
    assert task.classes_present(jnp.asarray(y), jnp.ones(2, bool)) is None  # ER-ACE does not apply
    with pytest.raises(ValueError, match="`num_labels` must be an integer >= 1"):
        MultiLabel(0)


def _multi_label_batches(n, teacher, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.normal(size=(B, FEATURES)).astype(np.float32)
        mask = np.arange(B) < B - i % 3
        y = _multi_hot(x, teacher)
        y[~mask] = 7  # padding may hold anything
        yield Batch(x, y, mask)


@pytest.mark.slow  # a model trained to a target figure
def test_a_multi_label_learner_fits_a_seeded_problem_with_replay_and_ewc_in_one_compilation():
    teacher = np.random.default_rng(1).normal(size=(FEATURES, LABELS))
    learner = build_learner(CONFIG, inputs=INPUTS, task=MultiLabel(LABELS))
    rng = np.random.default_rng(2)
    test_x = rng.normal(size=(500, FEATURES)).astype(np.float32)
    test_y = _multi_hot(test_x, teacher)
    state = learner.init(0)
    before = learner.evaluate(state.params, test_x, test_y)
    batches = _multi_label_batches(400, teacher, seed=3)
    state, _ = learner.train_step(state, next(batches))  # warm-up compiles the step
    state = learner.consolidate(state)  # ... and the Fisher from replayed multi-hot labels
    compiled = compilation_count()
    for i, batch in enumerate(batches):
        state, metrics = learner.train_step(state, batch)
        if i % 100 == 99:
            state = learner.consolidate(state)
    jax.block_until_ready(state)
    assert compilation_count() == compiled
    after = learner.evaluate(state.params, test_x, test_y)
    assert after.mean_loss < 0.3 * before.mean_loss
    assert np.mean(after.predicted == test_y) > 0.9  # per-label accuracy (0.5 untrained)
    assert after.predicted.shape == (500, LABELS) and after.predicted.dtype == np.int32
    assert after.correct is None and after.outcome.dtype == np.float32  # the guard pairs losses
    np.testing.assert_array_equal(after.outcome, after.loss)
    assert state.replay.y.shape == (256, LABELS) and state.replay.y.dtype == np.int32
    assert set(np.unique(np.asarray(state.replay.y))) <= {0, 1}  # padding rows never entered
    assert bool(metrics["finite"]) and float(metrics["ewc_penalty"]) > 0


def test_the_bernoulli_fisher_equals_squared_per_example_gradients_of_the_summed_cross_entropy():
    learner = build_learner(CONFIG, inputs=INPUTS, task=MultiLabel(LABELS))
    params = learner.init(0).params
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, FEATURES)).astype(np.float32)
    y = rng.integers(0, 2, (64, LABELS)).astype(np.int32)
    mask = rng.random(64) < 0.7
    fisher = learner.fisher(params, x, y, mask)

    def nll(p, xi, yi):
        z = learner.logits(p, xi[None])[0]
        return jnp.sum(optax.sigmoid_binary_cross_entropy(z, yi.astype(jnp.float32)))

    total = jax.tree.map(np.zeros_like, params)
    for i in np.flatnonzero(mask):
        g = jax.grad(nll)(params, x[i], y[i])
        total = jax.tree.map(lambda t, gi: t + np.square(np.asarray(gi, np.float64)), total, g)
    for got, want in zip(jax.tree.leaves(fisher), jax.tree.leaves(total)):
        np.testing.assert_allclose(np.asarray(got), want / mask.sum(), rtol=1e-4, atol=1e-8)
    vmapped = ewc.fisher_diagonal(learner.logits, learner.task.nll, params, x, y, mask, chunk=32)
    for got, want in zip(jax.tree.leaves(vmapped), jax.tree.leaves(total)):
        np.testing.assert_allclose(np.asarray(got), want / mask.sum(), rtol=1e-4, atol=1e-8)


# ---- each task through the guarded loop -----------------------------------------------------

TASKS = {"classification": Classification(4), "regression": Regression(), "multi-label": MultiLabel(LABELS)}


def _labels(task_name: str, x: np.ndarray, teacher: np.ndarray, *, broken: bool) -> np.ndarray:
    """The teacher's labels, or a broken upstream's: a shifted class, a flipped sign, flipped tags."""
    if task_name == "classification":
        y = np.argmax(x @ teacher[:, :4], axis=1)
        return ((y + 1) % 4 if broken else y).astype(np.int32)
    if task_name == "regression":
        y = (x @ teacher[:, 0]) / np.sqrt(FEATURES)
        return (-y if broken else y).astype(np.float32)
    y = _multi_hot(x, teacher)
    return 1 - y if broken else y


def task_scenario(task_name: str, seed: int = 0) -> Scenario:
    """Segments "a" and "b" (inputs around +1 and -1), then "c": inputs like a's, labels broken."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(FEATURES, LABELS))
    segments = []
    for name, center, broken in (("a", 1.0, False), ("b", -1.0, False), ("c", 1.0, True)):
        train_x = (center + rng.normal(size=(800, FEATURES))).astype(np.float32)
        test_x = (center + rng.normal(size=(200, FEATURES))).astype(np.float32)
        segments.append(
            Segment(
                name,
                train_x,
                _labels(task_name, train_x, teacher, broken=broken),
                test_x,
                _labels(task_name, test_x, teacher, broken=False),
                poisoned=broken,
            )
        )
    return Scenario(f"tasks-{task_name}", tuple(segments), None, (FEATURES,), seed)


def _run(task_name: str, directory: Path) -> dict:
    task = TASKS[task_name]
    scenario = task_scenario(task_name)
    codec = NamedFeaturesCodec(INPUTS, task.labels)
    stream = StreamInput(
        open_source=lambda positions: ScenarioSource(scenario, codec, start=positions),
        codec=codec,
        dead_letters=MemoryDeadLetters(),
        quarantine=MemoryDeadLetters(),
    )
    learner = build_learner(CONFIG, inputs=INPUTS, task=task)
    store = CheckpointStore(directory)
    progress: list = []
    loop = TrainingLoop(
        stream,
        learner,
        store,
        probe=ProbeConfig(holdout_fraction=0.1),
        guard=GuardConfig(every_examples=400),
        seed=0,
        on_progress=progress.append,
        progress_every_s=0.01,
    )
    summary = loop.run()
    store.close()
    reader = CheckpointStore(directory, create=False)
    restored = reader.restore(reader.last_good(), state_like=learner.init(0))
    return {
        "summary": summary,
        "ledger": reader.ledger.read(),
        "digest": params_digest(loop.final_state),
        "checkpoint": [np.asarray(leaf) for leaf in jax.tree.leaves(restored.state)],
        "probe": [np.asarray(leaf) for leaf in jax.tree.leaves(restored.probe)],
        "progress": progress,
        "totals kept": [jax.tree.leaves(loop.guard.last_good.totals), jax.tree.leaves(restored.state.totals)],
    }


@pytest.fixture(scope="module", params=list(TASKS))
def task_runs(request, tmp_path_factory):
    """The poisoned stream of one task, trained twice into two directories."""
    root = tmp_path_factory.mktemp(request.param)
    return request.param, _run(request.param, root / "first"), _run(request.param, root / "second")


@pytest.mark.slow  # three tasks through the loop, twice each
def test_each_task_replays_to_bit_identical_checkpoints(task_runs):
    _, first, second = task_runs
    assert first["digest"] == second["digest"]
    for a, b in zip(first["checkpoint"] + first["probe"], second["checkpoint"] + second["probe"]):
        np.testing.assert_array_equal(a, b)
    # Saves finish in the background, and retention deletes after them: where a `save` or a
    # `delete` lands among the decisions is timing, which checkpoints were saved and deleted is not.
    background = ("save", "delete")
    decisions = [
        [(e["event"], e.get("checkpoint")) for e in run["ledger"] if e["event"] not in ("stop", *background)]
        for run in (first, second)
    ]
    assert decisions[0] == decisions[1]
    for event in background:
        done = [sorted(e["checkpoint"] for e in run["ledger"] if e["event"] == event) for run in (first, second)]
        assert done[0] == done[1]


@pytest.mark.slow  # three tasks through the loop
def test_each_task_rolls_back_a_poisoned_window_pairing_its_own_outcome(task_runs, tmp_path):
    task_name, run, _ = task_runs
    figure = TASKS[task_name].outcome.figure
    summary = run["summary"]
    assert summary.rollbacks >= 1 and summary.quarantined_records > 0
    rollbacks = [e for e in run["ledger"] if e["event"] == "rollback"]
    # The segment whose inputs the broken upstream reused, or (right/wrong tasks) a window check
    # that saw the damage in the window's own rows before the probe did.
    assert all("a" in e["scopes"] or any(s.startswith("window.") for s in e["scopes"]) for e in rollbacks)
    probes = [e for e in run["ledger"] if e["event"] == "probe"]
    assert all(figure in e["probe"] for e in probes)
    assert all(e["verdict"].get("metric", "accuracy") == figure for e in probes)
    assert summary.accepted >= 3  # the clean segments were learned and kept
    report = write_markdown(run["ledger"], tmp_path / "report.md", title=task_name, summary=summary.to_json())
    assert f"## Probe {figure} at the last judged window" in report.read_text()


@pytest.mark.slow  # three tasks through the loop
def test_the_loop_reports_the_steps_figures_summed_on_the_device(task_runs):
    _, run, _ = task_runs
    reported = [p for p in run["progress"] if p.train_loss is not None]
    assert reported and all(p.train_loss > 0 and p.grad_norm > 0 for p in reported)
    # 32 replayed rows a step once the buffer holds any, beside up to 32 fresh ones (the probe's
    # ~10% are held out, not trained): a little over half the rows replayed.
    shares = [p.replay_share for p in reported if p.replay_share is not None]
    assert all(0 <= share < 0.6 for share in shares) and 0.5 < max(shares)
    assert run["progress"][-1].skipped_updates == run["summary"].skipped_updates == 0
    # Judgements take the totals out of the state: what the guard keeps and checkpoints holds zeros.
    for leaves in run["totals kept"]:
        assert all(float(leaf) == 0 for leaf in leaves)


def test_a_multilabel_config_builds_its_task_which_only_the_json_wire_format_carries(tmp_path, capsys):
    # learner.task = "multilabel" with stream.num_labels loads and builds MultiLabel; JSON carries its
    # multi-hot labels, the one-label binary format cannot, which `config check` says in one line (exit 2).
    from continuity import factory
    from continuity.cli import main
    from continuity.config import load_config

    config = load_config(None, ['learner.task="multilabel"', f"stream.num_labels={LABELS}"], environ={})
    assert config.stream.num_classes is None and factory.task_for(config) == MultiLabel(LABELS)
    with pytest.raises(ValueError, match=r"`learner.task` 'multilabel' has labels of shape \(5,\)"):
        factory.feature_spec(config)
    json_config = load_config(
        None, ['learner.task="multilabel"', f"stream.num_labels={LABELS}", 'stream.codec="json"'], environ={}
    )
    assert factory.feature_spec(json_config).label_shape == (LABELS,)
    path = tmp_path / "multilabel.toml"
    path.write_text(f'[learner]\ntask = "multilabel"\n[stream]\nnum_labels = {LABELS}\n')
    assert main(["config", "check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "[learner] task: " in err and "has labels of shape (5,)" in err
