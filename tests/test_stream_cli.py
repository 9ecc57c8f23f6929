"""`continuity produce` and `continuity record` end to end against the embedded broker."""

from __future__ import annotations

import json
import re

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


def test_a_record_that_cannot_reach_its_broker_gives_up_in_time_in_one_line_and_leaves_the_file_as_it_was(
    tmp_path, capsys
):
    import time

    out = tmp_path / "earlier.parquet"
    out.write_bytes(b"an earlier recording")
    started = time.monotonic()
    argv = ["record", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--out", str(out), "--connect-timeout", "2"]
    assert main([*argv, "--until-end"]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "continuity: error: could not start reading 't' from 127.0.0.1:1 within 2 s: is the broker running, and "
        "does the topic exist?"
    )
    assert out.read_bytes() == b"an earlier recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.parquet"]  # nothing half-written beside it


def test_a_recording_that_fails_half_way_leaves_the_file_there_as_it_was_and_a_finished_one_replaces_it(tmp_path):
    from continuity.stream import PartitionRecords, RecordingWriter

    out = tmp_path / "stream.parquet"
    out.write_bytes(b"an earlier recording")
    run = PartitionRecords("t", 0, [b"v"], [None], np.array([0]), np.array([0]))
    with pytest.raises(RuntimeError), RecordingWriter(out) as writer:
        writer.write(run)
        raise RuntimeError("the broker went away")
    assert out.read_bytes() == b"an earlier recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.parquet"]
    with RecordingWriter(out) as writer:
        writer.write(run)
    assert len(FileSource(out).poll()[0]) == 1


def test_a_recording_the_disk_cannot_finish_leaves_no_temporary_file_behind(tmp_path, monkeypatch):
    """A full disk refusing the last row group (at `close`): the temporary file would otherwise
    keep the space it took, on the disk that is full."""
    import errno

    import pyarrow.parquet as pq

    from continuity.stream import PartitionRecords, RecordingWriter

    out = tmp_path / "stream.parquet"
    out.write_bytes(b"an earlier recording")

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = RecordingWriter(out)
    writer.write(PartitionRecords("t", 0, [b"v"], [None], np.array([0]), np.array([0])))
    monkeypatch.setattr(pq.ParquetWriter, "write_table", no_space)  # the last row group, written at close
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert out.read_bytes() == b"an earlier recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.parquet"]


def test_a_recording_onto_a_pipe_or_device_is_refused_and_leaves_it_there(tmp_path):
    import os
    import stat

    from continuity.stream import PartitionRecords, RecordingWriter

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # finishing renames onto the path: it would replace the pipe (as root, /dev/null too)
    with pytest.raises(FileExistsError, match="is not a regular file"), RecordingWriter(fifo) as writer:
        writer.write(PartitionRecords("t", 0, [b"v"], [None], np.array([0]), np.array([0])))
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_a_recording_through_a_symbolic_link_is_written_where_it_points_and_the_link_stays(tmp_path):
    import pyarrow.parquet as pq

    from continuity.stream import PartitionRecords, RecordingWriter

    target, link = tmp_path / "data" / "stream.parquet", tmp_path / "latest.parquet"
    target.parent.mkdir()
    target.write_bytes(b"an older recording")
    link.symlink_to(target)
    with RecordingWriter(link) as writer:
        writer.write(PartitionRecords("t", 0, [b"v"], [None], np.array([7]), np.array([0])))
    assert link.is_symlink() and link.resolve() == target
    assert pq.read_table(target).column("offset").to_pylist() == [7]


def test_produce_refuses_a_partition_count_beyond_int32_and_more_examples_than_memory_in_one_line(capsys):
    argv = ["produce", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--scenario", "sea"]
    with pytest.raises(SystemExit) as exit_info:  # Kafka's protocol carries the count as an int32
        main([*argv, "--partitions", str(2**31)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith("expected a partition count in 1..2147483647, got 2147483648\n")
    assert main([*argv, "--examples", str(10**13)]) == 2  # hundreds of TB, before the broker is asked
    err = capsys.readouterr().err
    assert err.startswith("continuity: error: --examples 10,000,000,000,000: the 'sea' stream is drawn whole")
    assert err.count("\n") == 1 and "produce fewer" in err


def test_produce_refuses_a_drift_stream_whose_draw_would_not_fit_in_memory_before_drawing_it(capsys, monkeypatch):
    """Arrays each small enough for numpy's own check can still add up past memory, where the
    kernel kills the draw partway: the draw's size is measured on a sample and refused first."""
    from continuity.stream.drift import DriftGenerator, make_generator

    need = make_generator("rbf-drift").peak_bytes(1_000_000)
    monkeypatch.setattr("continuity.memory.host_memory", lambda: need // 2)
    drawn = []  # the lengths of the streams drawn
    draw = DriftGenerator.stream
    monkeypatch.setattr(
        DriftGenerator, "stream", lambda self, examples, **kw: drawn.append(examples) or draw(self, examples, **kw)
    )
    argv = ["produce", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--scenario", "rbf-drift"]
    assert main([*argv, "--examples", "1000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--examples 1,000,000: the 'rbf-drift' stream is drawn whole before it is sent" in err
    fills = int(re.search(r"the draw alone fills it at ~([\d,]+)\)", err).group(1).replace(",", ""))
    assert 490_000 <= fills <= 510_000  # half the memory the draw needs: about half the examples
    assert drawn and max(drawn) < 1_000_000  # only the samples were drawn


def test_a_rate_of_one_record_an_age_sleeps_a_minute_at_a_time_not_an_overflowing_sleep(
    broker, topic_name, monkeypatch
):
    from continuity.stream import kafka

    slept = []

    def sleep(seconds):
        slept.append(seconds)
        raise KeyboardInterrupt  # Ctrl-C at the first wait

    monkeypatch.setattr(kafka.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        kafka.produce_records(broker.bootstrap, topic_name(), [(None, b"1"), (None, b"2")], rate=1e-300)
    assert slept == [60.0]


@pytest.mark.parametrize("name", ["", "bad topic/name", "..", "x" * 250])
def test_a_topic_name_kafka_cannot_read_is_refused_in_one_line(name, capsys, tmp_path):
    for argv in (
        ["produce", "--bootstrap", "127.0.0.1:1", "--topic", name, "--scenario", "split-digits"],
        ["record", "--bootstrap", "127.0.0.1:1", "--topic", name, "--out", str(tmp_path / "r.parquet"), "--until-end"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert (
            err.strip()
            .splitlines()[-1]
            .endswith("is not a Kafka topic name: 1 to 249 characters of a-z A-Z 0-9 . _ - (not '.' or '..')")
        )
    assert main(["config", "check", "--set", f"stream.topics=[{name!r}]".replace("'", '"')]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("is not a Kafka topic name" in err or (not name and "non-empty list" in err))


def test_a_recording_whose_offsets_go_back_is_refused_before_anything_trains_and_by_the_file_source(tmp_path, capsys):
    """Positions saved from it would send the next replay back over records already trained."""
    from continuity.stream import PartitionRecords, RecordingWriter, SourceError

    codec = make_codec("binary", FeatureSpec((2,), "float32", 10))
    values = [codec.encode(np.array([i, i]), i % 10) for i in range(6)]
    path = tmp_path / "edited.parquet"
    with RecordingWriter(path) as writer:
        for offsets in ([0, 1, 2], [5, 4, 3]):  # the second run goes back: 2 -> 5 -> 4
            writer.write(PartitionRecords("t", 0, values[:3], [None] * 3, np.array(offsets), np.zeros(3, np.int64)))
    argv = ["replay", str(path), "--set", "stream.feature_shape=[2]", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"continuity: error: recorded stream '{path}': t/0 goes back from offset 5 to 4 at row 4; a log's offsets "
        "only rise (a damaged or edited file?)"
    )
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    source = FileSource(path, read_rows=2)
    with pytest.raises(SourceError, match="t/0 goes back from offset 5 to 4"):
        while not source.finished:
            source.poll()


def test_a_byte_changed_in_a_recorded_page_is_found_by_its_crc_not_trained_on(tmp_path):
    """`record` writes each page's CRC and the file source checks it: without it a changed byte in
    a value can decompress without error into other features, trained on as if recorded."""
    import pyarrow.parquet as pq

    from continuity.stream import PartitionRecords, RecordingWriter, SourceError

    codec = make_codec("binary", FeatureSpec((64,), "float32", 10))
    values = [codec.encode(np.full(64, i, np.float32), i % 10) for i in range(200)]
    path = tmp_path / "stream.parquet"
    with RecordingWriter(path) as writer:
        writer.write(PartitionRecords("t", 0, values, [None] * 200, np.arange(200), np.zeros(200, np.int64)))
    group = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(c for c in (group.column(i) for i in range(group.num_columns)) if c.path_in_schema == "value")
    data = bytearray(path.read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start + chunk.total_compressed_size // 2] ^= 0x01  # one bit, mid-chunk
    path.write_bytes(bytes(data))
    source = FileSource(path)
    with pytest.raises(SourceError, match=r"is damaged after its first 0 records: .*CRC checksum verification failed"):
        while not source.finished:
            source.poll()


@pytest.mark.parametrize(
    "argv",
    [
        ["produce", "--topic", "t"],
        ["record", "--topic", "t", "--out", "r.parquet"],
        ["inspect", "--topic", "t"],
        ["bench", "ingest"],
    ],
    ids=["produce", "record", "inspect", "bench-ingest"],
)
@pytest.mark.parametrize("bootstrap", ["notaport", "host:", "host:99999", "a:9092,"])
def test_a_bootstrap_that_is_not_host_port_is_refused_at_once_as_the_config_refuses_it(argv, bootstrap, capsys):
    # Without the check, a typo waited out kafka-python's ~30 s timeout before one line said so.
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--bootstrap", bootstrap])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            f'argument --bootstrap: must be "host:port", or several joined by commas (e.g. "10.0.0.1:9092"). '
            f"Got {bootstrap!r}."
        )
    )


def test_produce_to_an_existing_topic_says_its_partitions_stay_as_they_are(broker, topic_name, capsys):
    topic = topic_name()
    argv = ["produce", "--bootstrap", broker.bootstrap, "--topic", topic, "--scenario", "sea", "--examples", "20"]
    assert main([*argv, "--partitions", "2"]) == 0
    assert f"created topic {topic!r};" in capsys.readouterr().err
    assert main([*argv, "--partitions", "3"]) == 0
    assert (
        f"using existing topic {topic!r} (its partitions as they are: --partitions 3 applies to a new topic);"
        in capsys.readouterr().err
    )
