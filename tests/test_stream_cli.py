"""`continuity produce` and `continuity record` end to end against the embedded broker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from continuity.cli import main
from continuity.stream import Batcher, FeatureSpec, FileSource, Ingest, KafkaSettings, KafkaSource, make_codec
from continuity.stream.ingest import batches
from continuity.stream.scenarios import make_scenario

pytestmark = pytest.mark.slow  # produce, record and replay through the CLI


@pytest.mark.parametrize("codec", ["binary", "json"])
def test_produce_a_scenario_then_record_and_replay_it(broker, topic_name, tmp_path, capsys, codec):
    topic = topic_name()
    assert (
        main(
            [
                "produce",
                "--bootstrap",
                broker.bootstrap,
                "--topic",
                topic,
                "--scenario",
                "split-digits",
                "--codec",
                codec,
                "--partitions",
                "1",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scenario = make_scenario("split-digits", seed=3)
    expected_y = np.concatenate([s.train_y for s in scenario.segments])
    assert report["records"] == len(expected_y)
    out = tmp_path / "split.parquet"
    assert (
        main(
            [
                "record",
                "--bootstrap",
                broker.bootstrap,
                "--topic",
                topic,
                "--out",
                str(out),
                "--from-beginning",
                "--until-end",
            ]
        )
        == 0
    )
    spec = FeatureSpec(scenario.example_shape, "float32", scenario.num_classes)
    for source in (FileSource(out), KafkaSource(KafkaSettings(broker.bootstrap, (topic,)))):
        batcher = Batcher(spec, 64, ownership=source.ownership)
        with Ingest(source, make_codec(codec, spec)) as ingest:
            got = list(batches(ingest, batcher, idle_timeout_s=2.0))
        assert np.array_equal(np.concatenate([b.y[b.mask] for b in got]), expected_y)
        assert batcher.segment_names == [s.name for s in scenario.segments]


def test_cli_usage_errors_are_one_line(broker, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: the scenarios are listed in --help
        main(["produce", "--bootstrap", broker.bootstrap, "--topic", "t", "--scenario", "no-such"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'no-such'" in err and "'agrawal'" in err
    assert (
        main(
            [
                "produce",
                "--bootstrap",
                broker.bootstrap,
                "--topic",
                "t",
                "--scenario",
                "split-digits",
                "--codec",
                "json",
                "--examples-per-record",
                "4",
            ]
        )
        == 2
    )
    assert "binary" in capsys.readouterr().err
