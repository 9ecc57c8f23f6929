"""Regression targets end to end: the learner, the paired loss test, the config, and the guarded loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.stats import wilcoxon

from continuity.checkpoints import CheckpointStore
from continuity.config import ConfigError, load_config
from continuity.factory import build_task, feature_spec, learner_for
from continuity.guard import GuardConfig
from continuity.learner import (
    Batch,
    EWCConfig,
    LearnerConfig,
    ModelConfig,
    Regression,
    ReplayConfig,
    compilation_count,
    ewc,
)
from continuity.loop import Progress, StreamInput, TrainingLoop, params_digest
from continuity.metrics import ServiceMetrics
from continuity.probe import ProbeConfig, ProbeStore
from continuity.regression import judge, judge_losses, wilcoxon_one_sided
from continuity.report import write_markdown
from continuity.stream import FeatureSpec, MemoryDeadLetters, Positions, ScenarioSource, make_codec
from continuity.stream.scenarios import make_scenario

FEATURES, B = 6, 16


def _regression_config(**overrides) -> LearnerConfig:
    options = dict(
        model=ModelConfig(hidden=(32,)),
        learning_rate=1e-2,
        batch_size=B,
        task="regression",
        replay=ReplayConfig(kind="reservoir", capacity=64, batch_size=16),
        ewc=EWCConfig(enabled=True, strength=1.0, strength_min=0.1, fisher_samples=32),
    )
    return LearnerConfig(**{**options, **overrides})


def _linear_batches(n, seed=0):
    """A seeded linear target y = x.w + 0.5; each batch has 0..B valid rows (padding rows are garbage)."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=FEATURES).astype(np.float32)
    for i in range(n):
        x = rng.normal(size=(B, FEATURES)).astype(np.float32)
        y = (x @ w + 0.5).astype(np.float32)
        mask = np.arange(B) < (B - i % 5)
        y[~mask] = np.nan  # padding may hold anything
        yield Batch(x, y, mask)


# ---- the learner ----------------------------------------------------------------------------------
@pytest.mark.slow  # a model trained to a target figure
def test_learner_fits_a_seeded_linear_regression_with_replay_and_ewc_in_one_compilation():
    learner = learner_for(_regression_config(), (FEATURES,), None)
    test = list(_linear_batches(8, seed=1))
    test_x = np.concatenate([b.x[b.mask] for b in test])
    test_y = np.concatenate([b.y[b.mask] for b in test])
    state = learner.init(0)
    before = learner.evaluate(state.params, test_x, test_y).mean_loss
    batches = _linear_batches(400)
    state, metrics = learner.train_step(state, next(batches))  # warm-up compiles the step once
    state = learner.consolidate(state)  # ... and the Fisher refresh from replayed float targets
    compiled = compilation_count()
    for i, batch in enumerate(batches):
        state, metrics = learner.train_step(state, batch)
        if i % 100 == 99:
            state = learner.consolidate(state)
    jax.block_until_ready(state)
    assert compilation_count() == compiled
    assert learner.train_step._cache_size() == 1
    evaluation = learner.evaluate(state.params, test_x, test_y)
    assert evaluation.mean_loss < 0.02 * before
    assert bool(metrics["finite"]) and int(state.skipped_updates) == 0
    assert float(metrics["replay_loss"]) > 0 and float(metrics["ewc_penalty"]) > 0
    # The step's outcome sum is the task's outcome, squared errors: the fresh loss times the fresh rows.
    assert float(metrics["outcomes"]) == pytest.approx(float(metrics["fresh_loss"]) * int(metrics["examples"]))
    assert state.replay.y.dtype == np.float32 and int(state.replay.size) == 64
    assert evaluation.correct is None and evaluation.predicted.dtype == np.float32
    np.testing.assert_allclose(evaluation.loss, (evaluation.predicted - test_y) ** 2, rtol=1e-5)
    with pytest.raises(ValueError, match="undefined for a task whose outcome is a loss"):
        _ = evaluation.accuracy


def test_gaussian_fisher_equals_squared_gradients_of_half_the_squared_error():
    learner = learner_for(_regression_config(), (FEATURES,), None)
    params = learner.init(0).params
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, FEATURES)).astype(np.float32)
    y = rng.normal(size=32).astype(np.float32)
    mask = rng.random(32) < 0.7
    fisher = ewc.fisher_diagonal(learner.logits, learner.task.nll, params, x, y, mask, chunk=32)

    def nll(p, xi, yi):
        return 0.5 * (learner.logits(p, xi[None])[0, 0] - yi) ** 2

    total = jax.tree.map(np.zeros_like, params)
    for i in np.flatnonzero(mask):
        g = jax.grad(nll)(params, x[i], y[i])
        total = jax.tree.map(lambda t, gi: t + np.square(np.asarray(gi, np.float64)), total, g)
    for got, want in zip(jax.tree.leaves(fisher), jax.tree.leaves(total)):
        np.testing.assert_allclose(np.asarray(got), want / mask.sum(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: LearnerConfig(task="forecast"),
            "`learner.task` must be one of 'classification', 'regression', 'multilabel'. Got 'forecast'.",
        ),
        (
            lambda: build_task(_regression_config(replay=ReplayConfig(kind="class_balanced", capacity=8)), None),
            "`replay.kind` 'class_balanced' shares memory out by class",
        ),
        (lambda: build_task(_regression_config(), 10), "`stream.num_classes` must be left out"),
        (lambda: build_task(LearnerConfig(), None), "`stream.num_classes` is required"),
        (lambda: build_task(LearnerConfig(), 1), "`stream.num_classes` must be >= 2"),
        (lambda: GuardConfig(loss_tolerance=-0.1), "`probe.loss_tolerance` must be a finite number >= 0"),
    ],
)
def test_bad_regression_settings_name_the_field(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


# ---- the paired test on losses ----------------------------------------------------------------------


def test_wilcoxon_one_sided_counts_changes_and_matches_scipy():
    rng = np.random.default_rng(0)
    good = rng.exponential(size=60)
    candidate = good + rng.normal(0.2, 0.5, size=60)
    worse, better, p = wilcoxon_one_sided(good, candidate)
    assert (worse, better) == (int(np.sum(candidate > good)), int(np.sum(candidate < good)))
    assert p == pytest.approx(wilcoxon(candidate - good, alternative="greater").pvalue)
    assert wilcoxon_one_sided(good, good) == (0, 0, 1.0)  # no loss changed: no evidence


@pytest.mark.slow  # a Monte-Carlo estimate of a false-alarm rate
def test_noise_alone_rarely_triggers_a_loss_regression():
    """Two equally good models (exchangeable squared errors): fires at most ~alpha, even at tolerance 0."""
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(8)]
    ids = np.repeat(np.arange(8), 100)
    fired = 0
    for _ in range(300):
        good, candidate = rng.normal(size=(2, 800)) ** 2
        fired += judge_losses(good, candidate, ids, names, tolerance=0.0, alpha=0.01).regressed
    assert fired / 300 <= 0.01


def _one_segment_hurt(rise: float):
    """Losses on three segments of 150; the candidate's losses on segment 1 are (1 + rise) times larger."""
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(3), 150)
    good = rng.normal(size=450) ** 2
    candidate = good * np.exp(rng.normal(0, 0.1, size=450))  # jitter, no trend
    candidate[ids == 1] *= 1 + rise
    return good, candidate, ids


def test_a_real_loss_increase_on_one_segment_is_a_regression_and_named():
    good, candidate, ids = _one_segment_hurt(1.0)  # segment b's losses double: about +33% overall
    verdict = judge_losses(good, candidate, ids, ["a", "b", "c"], tolerance=0.4, alpha=0.01)
    assert verdict.regressed and verdict.regressed_scopes == ["b"]
    assert verdict.overall.p_value < 0.01 / 4 and not verdict.overall.regressed  # significant, under tolerance
    report = verdict.segments["b"]
    assert report.metric == "loss" and report.candidate == pytest.approx(candidate[ids == 1].mean())
    assert report.drop == pytest.approx(report.candidate - report.good)  # mean loss gained
    figures = verdict.to_json()
    assert figures["metric"] == "loss" and figures["tolerance"] == 0.4
    assert {"good_loss", "candidate_loss", "p_value"} <= set(figures["segments"]["b"])
    # Classification verdicts keep their JSON: no metric key, accuracies.
    accuracy = judge(np.ones(40, bool), np.ones(40, bool), np.zeros(40, int), ["a"], tolerance=0.1, alpha=0.01)
    assert "metric" not in accuracy.to_json() and "good_accuracy" in accuracy.to_json()["overall"]


def test_the_loss_tolerance_is_relative_and_respected():
    """A 15% rise on a segment is highly significant, yet only a regression under a tolerance below 0.15."""
    good, candidate, ids = _one_segment_hurt(0.15)
    strict = judge_losses(good, candidate, ids, ["a", "b", "c"], tolerance=0.1, alpha=0.01)
    assert strict.regressed_scopes == ["b"] and strict.segments["b"].p_value < 1e-6
    assert not judge_losses(good, candidate, ids, ["a", "b", "c"], tolerance=0.2, alpha=0.01).regressed


def test_a_probe_of_float_targets_keeps_its_dtype_through_checkpoint_arrays():
    inputs, labels = jax.ShapeDtypeStruct((2,), np.float32), Regression().labels
    store = ProbeStore(inputs, labels, per_segment=10)
    store.add("a", np.ones((4, 2), np.float32), np.array([0.25, -1.5, 2.75, 3.0], np.float32))
    arrays, meta = store.to_arrays()
    assert meta["label_dtype"] == "float32"
    restored = ProbeStore.from_arrays(arrays, meta, inputs, labels)
    assert restored.label_dtype == np.float32
    np.testing.assert_array_equal(restored.examples()[1], [0.25, -1.5, 2.75, 3.0])


# ---- configuration ------------------------------------------------------------------------------------


def _write(tmp_path, text):
    path = tmp_path / "continuity.toml"
    path.write_text(text)
    return path


def test_config_chooses_regression_and_builds_a_regression_stream_and_learner(tmp_path):
    from continuity.service import build_learner

    text = '[stream]\nfeature_shape = [8]\n[learner]\ntask = "regression"\n[probe]\nloss_tolerance = 0.5\n'
    config = load_config(_write(tmp_path, text), environ={})
    assert config.learner.task == "regression" and config.guard.loss_tolerance == 0.5
    assert config.stream.num_classes is None and feature_spec(config).label_dtype == np.float32
    learner = build_learner(config)
    assert learner.task == Regression() and learner.label_dtype == np.float32
    # The resolved config round-trips through its TOML (num_classes unset is written as "").
    again = load_config(_write(tmp_path, config.to_toml()), environ={})
    assert again == config


@pytest.mark.parametrize(
    "text, pieces",
    [
        (
            '[stream]\nnum_classes = 10\n[learner]\ntask = "regression"\n',
            ["[stream] num_classes", 'must be left out when learner.task is "regression"', "Got 10"],
        ),
        (
            '[learner]\ntask = "regression"\n[replay]\nkind = "class_balanced"\n',
            ["[replay] kind", "'class_balanced' shares memory out by class"],
        ),
        ('[stream]\nnum_classes = ""\n', ["[stream] num_classes", 'required when learner.task is "classification"']),
        ("[probe]\nloss_tolerance = -1\n", ["[probe] loss_tolerance", "finite number >= 0"]),
    ],
)
def test_a_contradictory_regression_config_is_a_one_line_error(tmp_path, text, pieces):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text), environ={})
    message = str(caught.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message


# ---- the guarded loop -----------------------------------------------------------------------------------

LOOP_LEARNER = LearnerConfig(
    model=ModelConfig(hidden=(64, 64)),
    learning_rate=3e-3,
    task="regression",
    replay=ReplayConfig(kind="reservoir", capacity=500, batch_size=32),
    ewc=EWCConfig(enabled=True, strength=100.0, strength_min=10.0),
)
LOOP_GUARD = GuardConfig(every_examples=800)


def _run(scenario, learner, directory, guard=LOOP_GUARD):
    codec = make_codec("binary", FeatureSpec(scenario.example_shape, "float32", None))
    stream = StreamInput(
        open_source=lambda positions: ScenarioSource(scenario, codec, start=positions),
        codec=codec,
        dead_letters=MemoryDeadLetters(),
        quarantine=MemoryDeadLetters(),
    )
    store = CheckpointStore(directory)
    loop = TrainingLoop(stream, learner, store, probe=ProbeConfig(holdout_fraction=0.1), guard=guard, seed=0)
    summary = loop.run()
    store.close()
    test_loss = [learner.evaluate(loop.final_state.params, s.test_x, s.test_y).mean_loss for s in scenario.segments]
    return {
        "loop": loop,
        "summary": summary,
        "ledger": CheckpointStore(directory, create=False).ledger.read(),
        "test_loss": test_loss,
        "stream": stream,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """drifting-regression (4 segments) clean, poisoned (segment 3 relabels region 0) guarded and unguarded."""
    learner = learner_for(LOOP_LEARNER, (8,), None)  # one learner: its step compiles once for all runs
    clean = make_scenario("drifting-regression", seed=0)
    poisoned = make_scenario("drifting-regression", seed=0, poison=3)
    root = tmp_path_factory.mktemp("regression-runs")
    return {
        "learner": learner,
        "scenario": clean,
        "directory": root / "clean",
        "clean": _run(clean, learner, root / "clean"),
        "guarded": _run(poisoned, learner, root / "guarded"),
        "unguarded": _run(poisoned, learner, root / "unguarded", GuardConfig(every_examples=800, enabled=False)),
    }


@pytest.mark.slow  # a regression stream through the loop
def test_a_regression_stream_trains_judges_on_losses_and_checkpoints(runs):
    clean = runs["clean"]
    summary = clean["summary"]
    assert summary.rollbacks == 0 and summary.quarantined_records == 0 and summary.accepted == summary.windows >= 4
    assert summary.probe_accuracy is None and 0 < summary.probe_loss < 0.5
    first, last = clean["ledger"][0], clean["ledger"][-1]
    probes = [e for e in clean["ledger"] if e["event"] == "probe"]
    for event in probes:
        assert "accuracy" not in event["probe"] and set(event["probe"]) == {"examples", "loss", "segments"}
        assert event["verdict"]["metric"] == "loss" and "good_loss" in event["verdict"]["overall"]
    assert probes[-1]["probe"]["segments"].keys() == {f"region-{k}" for k in range(4)}
    # Learning happened: every region's test loss is far below the targets' variance (~1).
    assert max(clean["test_loss"]) < 0.3
    assert first["event"] == "start" and last["event"] == "stop"


@pytest.mark.slow  # a regression stream through the loop
def test_a_restart_restores_the_float32_probe_and_the_state(runs):
    first = runs["clean"]["loop"]
    codec = make_codec("binary", FeatureSpec((8,), "float32", None))
    stream = StreamInput(
        open_source=lambda positions: ScenarioSource(runs["scenario"], codec, start=positions),
        codec=codec,
        dead_letters=MemoryDeadLetters(),
        quarantine=MemoryDeadLetters(),
    )
    store = CheckpointStore(runs["directory"], create=False)
    second = TrainingLoop(
        stream, runs["learner"], store, probe=ProbeConfig(holdout_fraction=0.1), guard=LOOP_GUARD, seed=0
    )
    state, good = second._restore_or_start()
    saved = store.info(store.last_good()).metadata
    store.close()
    assert params_digest(state) == params_digest(first.final_state)
    assert state.replay.y.dtype == np.float32
    probe = good.probe
    assert probe.label_dtype == np.float32
    x, y, ids = probe.examples()
    assert y.dtype == np.float32 and len(y) > 200
    assert np.any(y != np.round(y))  # real-valued targets, not truncated to integers
    assert good.positions == Positions.from_json(saved["positions"])
    assert saved["probe_store"]["label_dtype"] == "float32"


@pytest.mark.slow  # a regression stream through the loop
def test_the_guard_quarantines_a_poisoned_regression_segment(runs):
    guarded, unguarded = runs["guarded"], runs["unguarded"]
    assert guarded["summary"].rollbacks >= 1 and guarded["summary"].quarantined_records > 0
    rollbacks = [e for e in guarded["ledger"] if e["event"] == "rollback"]
    assert all("region-0" in e["scopes"] for e in rollbacks)
    assert unguarded["summary"].rollbacks == 0
    # Without the guard, region 0 (whose inputs the broken labeler reused) is wrecked.
    assert guarded["test_loss"][0] < 0.6 * unguarded["test_loss"][0]


@pytest.mark.slow  # a regression stream through the loop
def test_reports_and_metrics_show_losses_for_a_regression_run(runs, tmp_path):
    guarded = runs["guarded"]
    path = write_markdown(
        guarded["ledger"], tmp_path / "report.md", title="regression", summary=guarded["summary"].to_json()
    )
    text = path.read_text()
    assert "## Probe loss at the last judged window" in text and "region-0 loss " in text
    metrics = ServiceMetrics()
    metrics.observe(
        Progress(
            examples_trained=10,
            examples_per_second=1.0,
            lineage_examples=10,
            rollbacks=0,
            dead_letters=0,
            quarantined_records=0,
            probe_accuracy=None,
            probe_segments={"region-0": 0.25},
            ewc_strength=1.0,
            checkpoint=1,
            positions=Positions(),
            step_seconds=[],
            probe_loss=0.2,
        )
    )
    sample = metrics.registry.get_sample_value
    assert sample("continuity_probe_loss", {"segment": "region-0"}) == 0.25
    assert sample("continuity_probe_loss", {"segment": "overall"}) == 0.2
    assert sample("continuity_probe_accuracy", {"segment": "region-0"}) is None


def test_progress_summary_and_checkpoint_table_show_the_probe_loss_for_regression():
    import dataclasses

    from continuity.checkpoints import CheckpointInfo
    from continuity.commands.checkpoints import format_table
    from continuity.loop import Progress, RunSummary
    from continuity.service import format_progress, format_summary
    from continuity.stream import Positions

    progress = Progress(
        examples_trained=10,
        examples_per_second=5.0,
        lineage_examples=10,
        rollbacks=0,
        dead_letters=0,
        quarantined_records=0,
        probe_accuracy=None,
        probe_segments={},
        ewc_strength=1.0,
        checkpoint=3,
        positions=Positions(),
        step_seconds=[],
        probe_loss=0.04125,
    )
    assert "probe loss 0.04125" in format_progress(progress, None)
    classification = dataclasses.replace(progress, probe_accuracy=0.9, probe_loss=None)
    assert "probe 0.900" in format_progress(classification, None)
    assert "probe loss" in format_summary(RunSummary(probe_loss=0.5))
    table = format_table(
        [
            CheckpointInfo(number=1, metadata={"probe": {"loss": 0.25}}, pinned=False, abandoned=False),
            CheckpointInfo(number=2, metadata={"probe": {"accuracy": 0.5}}, pinned=False, abandoned=False),
        ]
    )
    assert "loss 0.25" in table and "0.5000" in table
