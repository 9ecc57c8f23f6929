"""Drift streams (stream.drift): deterministic per seed, true to their definitions, usable as events and arrays."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from continuity.cli import main
from continuity.stream import FeatureSpec, ScenarioSource, make_codec
from continuity.stream.drift import (
    DRIFT_SCENARIOS,
    SEA,
    Agrawal,
    Hyperplane,
    RandomRBF,
    agrawal_label,
    drift_probability,
    drift_scenario,
    make_drift_stream,
    make_generator,
)

AGRAWAL_ATTRIBUTES = ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan")

# Hand-computed from the paper's definitions (Agrawal et al. 1993, functions 1..10; group A = class 0),
# each checked against MOA's AgrawalGenerator as read (River's synth.Agrawal gives the opposite class
# for functions 1-6, and in function 5 tests salary where the paper and MOA test loan).
#   salary, commission, age, elevel, car, zipcode, hvalue, hyears, loan -> class under functions 1..10
AGRAWAL_ROWS = [
    # Under 40, salary 60K in [50K, 100K], loan 150K in [100K, 300K]: group A everywhere; disposable
    # 53,333 - 30,000 - 20,000 > 0 (f7), and equity 500K * 5 / 10 lifts f10.
    ((60_000.0, 20_000.0, 30, 1, 5, 2, 500_000.0, 25, 150_000.0), (0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    # 40..59 with salary 130K outside [75K, 125K] and elevel 4 outside 1..3: group B for 1-4 and 6;
    # f5 takes the loan 450K in [300K, 500K]: A. f7: 86,667 - 90,000 - 20,000 < 0: B; f8: 86,667 -
    # 20,000 - 20,000 > 0: A; f9 subtracts the loan too: B; f10 (no equity before 20 years): A.
    ((130_000.0, 0.0, 45, 4, 12, 7, 150_000.0, 10, 450_000.0), (1, 1, 1, 1, 0, 1, 1, 0, 1, 0)),
    # 60 and over, salary 40K in [25K, 75K], elevel 0 outside 2..4: f3 B, f4 A (salary band), f5 B
    # (loan 50K outside [300K, 500K]); total 70K in [25K, 75K] (f6 A); disposable positive for 7-10.
    ((40_000.0, 30_000.0, 70, 0, 1, 0, 900_000.0, 30, 50_000.0), (0, 0, 1, 0, 1, 0, 0, 0, 0, 0)),
    # Under 40, salary 21K: f2, f3 (elevel 4), f4 B; f5: loan 260K in [200K, 400K]: A; total 33K: f6 B;
    # disposable 22,000 - 20,000 - 10,000 < 0 even for f10 (5 years held: no equity).
    ((21_000.0, 12_000.0, 35, 4, 7, 5, 300_000.0, 5, 260_000.0), (0, 1, 1, 1, 0, 1, 1, 1, 1, 1)),
    # The boundaries: age 40 is the middle band (f1 B), salary 100K lies inside [75K, 125K] and the
    # closed [50K, 100K]; loan 300K inside [200K, 400K]; hyears exactly 20 gives no equity.
    ((100_000.0, 0.0, 40, 1, 20, 8, 100_000.0, 20, 300_000.0), (1, 0, 0, 0, 0, 0, 1, 0, 1, 0)),
]


def _columns_of(rows) -> dict[str, np.ndarray]:
    table = np.array([row for row, _ in rows], dtype=np.float64)
    return {name: table[:, i] for i, name in enumerate(AGRAWAL_ATTRIBUTES)}


@pytest.mark.parametrize("name", DRIFT_SCENARIOS)
def test_every_drift_stream_is_the_same_bit_for_bit_for_the_same_seed_and_another_for_another(name):
    first = make_drift_stream(name, examples=3_000, seed=7)
    again = make_drift_stream(name, examples=3_000, seed=7)
    other = make_drift_stream(name, examples=3_000, seed=8)
    assert list(first.records()) == list(again.records())
    for a, b in zip(first.arrays(), again.arrays()):
        assert a.tobytes() == b.tobytes()
    assert first.truth.tobytes() == again.truth.tobytes()
    for k in range(len(first.blocks)):
        assert first.held_out(k, 50).truth.tobytes() == again.held_out(k, 50).truth.tobytes()
    assert first.arrays().x.tobytes() != other.arrays().x.tobytes()


@pytest.mark.parametrize("name", DRIFT_SCENARIOS)
def test_peak_bytes_is_within_a_tenth_of_what_drawing_the_stream_takes_at_its_peak(name):
    """`produce` refuses a draw past memory on this estimate (test_stream_cli), so it must be near."""
    generator = make_generator(name, drift="gradual") if name in ("sea", "agrawal") else make_generator(name)
    estimate = generator.peak_bytes(200_000)
    tracemalloc.start()
    try:
        generator.stream(200_000, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.9 * peak <= estimate <= 1.1 * peak


def test_sea_labels_class_0_exactly_when_f1_plus_f2_is_at_most_the_concepts_theta_before_noise():
    stream = make_drift_stream("sea", examples=20_000, seed=1)
    f1, f2 = stream.columns["f1"], stream.columns["f2"]
    assert stream.blocks == ((0, 5_000), (5_000, 10_000), (10_000, 15_000), (15_000, 20_000))
    for k, theta in enumerate((8.0, 9.0, 7.0, 9.5)):
        rows = slice(*stream.blocks[k])
        assert (stream.concept[rows] == k).all()
        assert np.array_equal(stream.truth[rows] == 0, f1[rows] + f2[rows] <= theta)
    for name in ("f1", "f2", "f3"):
        assert 0.0 <= stream.columns[name].min() and stream.columns[name].max() < 10.0


def test_sea_flips_ten_percent_of_labels_by_default_and_the_rate_it_is_given():
    stream = make_drift_stream("sea", examples=20_000, seed=2)
    assert abs(np.mean(stream.label != stream.truth) - 0.10) < 0.01  # sd 0.0021 over 20k examples
    noisier = make_drift_stream("sea", examples=20_000, seed=2, noise=0.3)
    assert abs(np.mean(noisier.label != noisier.truth) - 0.30) < 0.015
    assert np.array_equal(noisier.columns["f1"], stream.columns["f1"])  # noise draws from its own stream
    clean = make_drift_stream("sea", examples=2_000, seed=2, noise=0.0)
    assert np.array_equal(clean.label, clean.truth)


def test_hyperplane_labels_agree_with_its_current_weights_which_drift_by_magnitude_and_reverse_with_sigma():
    generator = Hyperplane(features=6, drift_features=3, magnitude=0.01, sigma=0.1)
    stream = generator.stream(20_000, seed=3)
    weights = stream.state["weights"]
    start = Hyperplane(features=6, drift_features=3, magnitude=0.0).stream(10, seed=3).state["weights"]
    assert np.array_equal(weights[0], start[0]) and (start == start[0]).all()  # the first example sees w(0)
    assert 0.0 <= start.min() and start.max() < 1.0
    x = np.stack([stream.columns[f"f{i + 1}"] for i in range(6)], axis=1)
    assert np.array_equal(stream.truth, ((x * weights).sum(axis=1) >= weights.sum(axis=1) / 2).astype(np.int32))
    step = np.diff(weights, axis=0)
    assert np.allclose(np.abs(step[:, :3]), 0.01, rtol=0, atol=1e-9)  # every example moves each drifting weight
    assert (step[:, 3:] == 0).all()
    reversed_share = np.mean(np.sign(step[1:, :3]) != np.sign(step[:-1, :3]))
    assert abs(reversed_share - 0.1) < 0.01  # sd 0.0012 over 60k steps
    assert np.sign(step[0, :3]).tolist() == [1.0, 1.0, 1.0]  # every direction starts positive (MOA)
    assert abs(np.mean(stream.label != stream.truth) - 0.05) < 0.008  # MOA's default 5% noise
    # A held-out split is labelled by the weights at the end of its block.
    held = stream.held_out(1, 500)
    last = weights[stream.blocks[1][1] - 1]
    hx = np.stack([held.columns[f"f{i + 1}"] for i in range(6)], axis=1)
    assert np.array_equal(held.truth, (hx @ last >= last.sum() / 2).astype(np.int32))


def test_rbf_examples_carry_their_centroids_class_and_lie_a_gaussian_distance_from_its_moving_centre():
    generator = RandomRBF(features=5, classes=3, centroids=20, drift_centroids=10, speed=0.001)
    stream = generator.stream(20_000, seed=4)
    model = generator.model(4)
    centroid = stream.state["centroid"]
    assert np.array_equal(stream.label, model.classes[centroid]) and np.array_equal(stream.label, stream.truth)
    x = np.stack([stream.columns[f"f{i + 1}"] for i in range(5)], axis=1)
    centre = stream.state["centre"]
    # |distance| / sd is |N(0, 1)|, whose mean is sqrt(2 / pi).
    assert abs(np.mean(np.linalg.norm(x - centre, axis=1) / model.deviations[centroid]) - np.sqrt(2 / np.pi)) < 0.02
    chosen = np.bincount(centroid, minlength=20) / len(centroid)
    assert np.abs(chosen - model.weights / model.weights.sum()).max() < 0.01
    # Moving centroids advance by `speed` per example inside the unit cube; the others stay put.
    t = np.arange(20_000)
    for c in (0, 15):
        path = generator.centres_at(model, np.full(20_000, c), t)
        assert 0.0 <= path.min() and path.max() <= 1.0
        steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
        if c < 10:
            assert steps.max() <= 0.001 + 1e-12 and np.median(steps) == pytest.approx(0.001)
            assert not np.allclose(path[0], path[-1])
        else:
            assert (steps == 0).all()


def test_agrawal_functions_give_the_hand_computed_classes_of_the_papers_definitions():
    columns = _columns_of(AGRAWAL_ROWS)
    for function in range(1, 11):
        expected = [classes[function - 1] for _, classes in AGRAWAL_ROWS]
        assert agrawal_label(function, columns).tolist() == expected, f"function {function}"


def test_agrawal_applicants_follow_the_papers_attribute_distributions():
    stream = make_drift_stream("agrawal", examples=20_000, seed=5, perturbation=0.0)
    c = stream.columns
    assert 20_000 <= c["salary"].min() and c["salary"].max() < 150_000
    assert (c["commission"][c["salary"] >= 75_000] == 0).all()
    low = c["commission"][c["salary"] < 75_000]
    assert 10_000 <= low.min() and low.max() < 75_000
    assert set(np.unique(c["age"])) == set(range(20, 81))
    assert set(np.unique(c["elevel"])) == set(range(5))
    assert set(np.unique(c["car"])) == set(range(1, 21))
    assert set(np.unique(c["zipcode"])) == set(range(9))
    k = 9 - c["zipcode"]
    assert (k * 50_000 <= c["hvalue"]).all() and (c["hvalue"] < k * 150_000).all()
    assert set(np.unique(c["hyears"])) == set(range(1, 31))
    assert 0 <= c["loan"].min() and c["loan"].max() < 500_000


def test_agrawal_labels_each_applicant_by_its_concepts_function_and_drifts_abruptly_at_each_position():
    stream = make_drift_stream("agrawal", examples=8_000, seed=6, functions=(1, 5, 7, 10), perturbation=0.0)
    assert stream.blocks == ((0, 2_000), (2_000, 4_000), (4_000, 6_000), (6_000, 8_000))
    for k, function in enumerate((1, 5, 7, 10)):
        rows = stream.concept == k
        assert np.array_equal(np.flatnonzero(rows), np.arange(*stream.blocks[k]))  # exactly its block
        subset = {name: values[rows] for name, values in stream.columns.items()}
        assert np.array_equal(stream.label[rows], agrawal_label(function, subset))
        assert (stream.state["function"][rows] == function).all()
    assert np.array_equal(stream.label, stream.truth)  # Agrawal flips no labels


def test_agrawal_perturbation_moves_numbers_within_its_share_of_their_range_and_keeps_the_labels():
    clean = make_drift_stream("agrawal", examples=5_000, seed=7, perturbation=0.0)
    moved = make_drift_stream("agrawal", examples=5_000, seed=7, perturbation=0.05)
    assert np.array_equal(clean.label, moved.label)
    for name, span in (("salary", 130_000), ("loan", 500_000), ("age", 60), ("hyears", 29)):
        shift = np.abs(moved.columns[name] - clean.columns[name])
        assert shift.max() <= 0.05 * span + 0.5 and shift.mean() > 0  # + 0.5: whole numbers are rounded
    assert moved.columns["age"].dtype == np.int64 and 20 <= moved.columns["age"].min() <= 80
    assert np.array_equal(moved.columns["commission"] == 0, clean.columns["commission"] == 0)
    k = 9 - clean.columns["zipcode"]
    assert (k * 50_000 <= moved.columns["hvalue"]).all() and (moved.columns["hvalue"] <= k * 150_000).all()
    for name in ("elevel", "car", "zipcode"):
        assert np.array_equal(moved.columns[name], clean.columns[name])


def test_sea_drifts_abruptly_exactly_at_each_position():
    stream = make_drift_stream("sea", examples=1_000, seed=8)
    assert stream.concept[[0, 249, 250, 499, 500, 749, 750, 999]].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("name", ["sea", "agrawal"])
def test_gradual_drift_passes_to_the_next_concept_with_the_sigmoid_probability(name):
    width = 2_000
    stream = make_drift_stream(name, examples=60_000, seed=9, drift="gradual", width=width)
    positions = [start for start, _ in stream.blocks[1:]]  # 15,000, 30,000, 45,000
    t = np.arange(len(stream))

    def moa(p: int) -> np.ndarray:  # ConceptDriftStream: 1 / (1 + e^(-4 (t - p) / w))
        return 1.0 / (1.0 + np.exp(-4.0 * (t - p) / width))

    assert np.allclose(drift_probability(t, positions[0], width), moa(positions[0]), rtol=0, atol=1e-12)
    for k, position in enumerate(positions, start=1):
        # Chained drifts: concept k needs drifts 1..k passed.
        expected = np.prod([moa(p) for p in positions[:k]], axis=0)
        for lo in range(position - 3 * width, position + 3 * width, 500):
            bin_ = slice(lo, lo + 500)
            share = np.mean(stream.concept[bin_] >= k)
            sd = np.sqrt(max(expected[bin_].mean() * (1 - expected[bin_].mean()), 1e-4) / 500)
            assert abs(share - expected[bin_].mean()) < 5 * sd + 1e-9, (k, lo)
    assert drift_probability(positions[0], positions[0], width) == 0.5
    # The concept that labels an example is the one it reports.
    if name == "sea":
        theta = np.asarray(stream.generator.thetas)[stream.concept]
        assert np.array_equal(stream.truth, (stream.columns["f1"] + stream.columns["f2"] > theta).astype(np.int32))


def test_events_are_named_field_json_records_with_the_label_and_the_concept():
    sea = make_drift_stream("sea", examples=400, seed=10)
    events = list(sea.events())
    assert len(events) == 400 and list(events[0]) == ["f1", "f2", "f3", "label", "concept"]
    assert [e["label"] for e in events] == sea.label.tolist()
    assert [e["concept"] for e in events[99:101] + events[-1:]] == ["concept-1", "concept-2", "concept-4"]
    records = list(sea.records())
    assert records[5][0] == b"sea/5" and [json.loads(value) for _, value in records] == events
    applicant = next(make_drift_stream("agrawal", examples=4, seed=10).events())
    assert list(applicant) == [*AGRAWAL_ATTRIBUTES, "label", "concept"]
    for name in ("age", "elevel", "car", "zipcode", "hyears", "label"):
        assert type(applicant[name]) is int
    for name in ("salary", "commission", "hvalue", "loan"):
        assert type(applicant[name]) is float


def test_arrays_scale_numbers_by_their_documented_range_and_one_hot_the_categories():
    stream = make_drift_stream("agrawal", examples=2_000, seed=11)
    x, y, concept = stream.arrays()
    assert x.dtype == np.float32 and x.shape == (2_000, 6 + 5 + 20 + 9) and len(stream.feature_names) == 40
    assert y.dtype == np.int32 and concept.dtype == np.int32 and np.array_equal(y, stream.label)
    names = stream.feature_names
    salary = x[:, names.index("salary")]
    assert np.array_equal(salary, ((stream.columns["salary"] - 20_000) / 130_000).astype(np.float32))
    for attribute, values in (("elevel", range(5)), ("car", range(1, 21)), ("zipcode", range(9))):
        block = x[:, [names.index(f"{attribute}={v}") for v in values]]
        assert (block.sum(axis=1) == 1).all()
        assert np.array_equal(np.asarray(list(values))[block.argmax(axis=1)], stream.columns[attribute])
    sea = make_drift_stream("sea", examples=100, seed=11)
    assert np.array_equal(sea.arrays().x[:, 0], (sea.columns["f1"] / 10).astype(np.float32))


def test_a_drift_scenario_has_one_segment_per_concept_with_noise_free_tests_and_reads_through_scenario_source():
    stream = make_drift_stream("sea", examples=2_000, seed=12)
    scenario = drift_scenario(stream, test_examples=300)
    x, y, _ = stream.arrays()
    assert [s.name for s in scenario.segments] == ["concept-1", "concept-2", "concept-3", "concept-4"]
    assert scenario.num_classes == 2 and scenario.example_shape == (3,)
    for k, segment in enumerate(scenario.segments):
        start, stop = stream.blocks[k]
        assert np.array_equal(segment.train_x, x[start:stop]) and np.array_equal(segment.train_y, y[start:stop])
        held = stream.held_out(k, 300)
        theta = (8.0, 9.0, 7.0, 9.5)[k]
        assert np.array_equal(held.truth, (held.columns["f1"] + held.columns["f2"] > theta).astype(np.int32))
        assert np.array_equal(segment.test_y, held.truth) and segment.test_x.shape == (300, 3)
    codec = make_codec("binary", FeatureSpec(scenario.example_shape, "float32", scenario.num_classes))
    source = ScenarioSource(scenario, codec)
    got_x, got_y, got_segments = [], [], []
    while not source.finished:
        for run in source.poll():
            block, dead = codec.decode(run)
            assert not dead
            got_x.append(block.x)
            got_y.append(block.y)
            got_segments.extend(block.segments)
    assert np.array_equal(np.concatenate(got_x), x) and np.array_equal(np.concatenate(got_y), y)
    assert got_segments[0] == "concept-1" and got_segments[-1] == "concept-4"


def test_invalid_drift_options_are_errors_that_name_the_option_and_the_value():
    with pytest.raises(ValueError, match="drift stream must be one of 'sea'.*Got 'stagger'"):
        make_drift_stream("stagger")
    with pytest.raises(ValueError, match="'sea' takes no option 'speed'; its options are thetas, noise, drift, width"):
        make_generator("sea", speed=0.1)
    with pytest.raises(ValueError, match=r"noise must be a number in \[0, 1\]. Got 1.5"):
        SEA(noise=1.5)
    with pytest.raises(ValueError, match="drift must be one of 'abrupt', 'gradual'. Got 'sudden'"):
        Agrawal(drift="sudden")
    with pytest.raises(ValueError, match=r"functions must be integers in \[1, 10\]"):
        Agrawal(functions=(0, 1))
    with pytest.raises(ValueError, match=r"drift_features must be an integer in \[0, 10\]. Got 11"):
        Hyperplane(drift_features=11)
    with pytest.raises(ValueError, match="examples must be an integer >= 4. Got 3"):
        make_drift_stream("sea", examples=3)
    with pytest.raises(ValueError, match="seed must be a non-negative integer. Got -1"):
        make_drift_stream("rbf-drift", examples=10, seed=-1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--scenario", "sea", "--speed", "0.1"],
            "--speed does not apply to 'sea' (it takes --drift, --width, --noise)",
        ),
        (["--scenario", "hyperplane", "--noise", "2"], "noise must be a number in [0, 1]. Got 2.0."),
        (["--scenario", "split-digits", "--examples", "10"], "--examples applies to the drift streams only"),
        (["--scenario", "split-digits", "--codec", "events"], "--codec events applies to the drift streams only"),
        (["--scenario", "agrawal", "--poison", "1"], "--poison applies to the digits scenarios only"),
        (["--scenario", "sea", "--examples-per-record", "4"], "--examples-per-record > 1 needs --codec binary"),
    ],
)
def test_produce_refuses_drift_options_that_do_not_fit_in_one_line_before_reaching_kafka(capsys, arguments, message):
    assert main(["produce", "--bootstrap", "127.0.0.1:1", "--topic", "t", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_produce_writes_n_sea_events_as_json_records_to_the_broker(broker, topic_name, capsys):
    topic = topic_name()
    argv = ["produce", "--bootstrap", broker.bootstrap, "--topic", topic, "--scenario", "sea", "--examples", "400"]
    assert main([*argv, "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == {
        "topic": topic,
        "records": 400,
        "codec": "events",
        "scenario": "sea",
        "segments": ["concept-1", "concept-2", "concept-3", "concept-4"],
    }
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(topic, 0)])
    got = [(m.key, json.loads(m.value)) for m in consumer]
    consumer.close()
    expected = make_drift_stream("sea", examples=400, seed=3)
    assert got == [(key, json.loads(value)) for key, value in expected.records()]


@pytest.mark.slow  # the real training loop, compiled once
def test_the_guard_benchmark_trains_a_sea_scenario_through_the_real_loop_and_learns_its_newest_concept():
    from continuity.benchmarks.guard import DIGITS_GUARD, run_scenario_through_loop

    scenario = drift_scenario(make_drift_stream("sea", examples=4_000, seed=0), test_examples=500)
    result = run_scenario_through_loop(scenario, guard=DIGITS_GUARD, seed=0)
    assert result["segments"] == ["concept-1", "concept-2", "concept-3", "concept-4"]
    assert result["examples_trained"] + result["quarantined_records"] > 3_000  # all but the probe's share
    # The newest concept (theta 9.5) is 55% class 1: the model has learned it, not the majority.
    assert result["test_accuracy"][-1] > 0.7
