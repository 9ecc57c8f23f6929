"""Named-field events through `serve` (embedded broker) and `replay` end to end: the `fields` codec in the service."""

from __future__ import annotations

import json

import jax
import numpy as np
import orjson
import pytest
from test_fields import SPEC_TABLE, _fields_toml, events, record
from test_service import _serve, _stop, _wait

from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.config import load_config
from continuity.service import build_learner
from continuity.stream import Positions, create_topic, free_port, produce_records
from continuity.stream.broker import SHORT_SESSION_TIMEOUT_MS

pytestmark = pytest.mark.slow  # serve and replay end to end

BROKEN = {  # record index -> what breaks it, and the field its dead letter names
    100: ({"salary": "lots"}, "field 'salary'"),
    200: ({"words": "cheap"}, "field 'words'"),
    300: ({"label": 5}, "field 'label'"),
    700: ({"elevel": None}, "field 'elevel'"),
}


def _values(n: int) -> list[bytes]:
    sample = events(n, seed=3)
    for i, (change, _) in BROKEN.items():
        sample[i].update(change)
    return [orjson.dumps(e) for e in sample]


def _config(path, *, extra: str = "", tail: str = "") -> None:
    path.write_text(
        f"""
[stream]
codec = "fields"
num_classes = 2
{extra}
[model]
hidden = [32]

[replay]
capacity = 128
batch_size = 16

[probe]
every_examples = 300

[checkpoints]
every_seconds = 0
{tail}"""
        + _fields_toml(SPEC_TABLE)
    )


def test_named_field_events_train_through_serve_and_bad_records_are_dead_lettered_by_field(
    broker, topic_name, tmp_path
):
    topic = topic_name()
    values = _values(800)
    create_topic(broker.bootstrap, topic, 1)
    produce_records(broker.bootstrap, topic, ((None, v) for v in values))
    directory = tmp_path / "run"
    config = tmp_path / "serve.toml"
    _config(
        config,
        extra=f'bootstrap = "{broker.bootstrap}"\ntopics = ["{topic}"]\ngroup = "{topic}-group"\n'
        f"session_timeout_ms = {SHORT_SESSION_TIMEOUT_MS}\n",
        tail=f'dir = "{directory}"\n\n[service]\nhttp_port = {free_port()}\nprogress_every_s = 1.0\n',
    )
    process = _serve(config)
    try:
        _wait(
            lambda: (
                (directory / "ledger.jsonl").exists()
                and any(
                    # accepted, or quarantined should a window regress: either way the checkpoint is there
                    e["event"] in ("accept", "quarantine")
                    and Positions.from_json(e.get("positions") or e.get("to") or []).offset(topic, 0) == len(values)
                    for e in CheckpointStore(directory, create=False).ledger.read()
                )
            ),
            300,  # generous: this machine is shared and loaded
            "the whole topic trained",
            process,
        )
    finally:
        status, _, err = _stop(process)
    assert status == 0, err[-3000:]
    letters = [json.loads(line) for line in (directory / "dead-letters.jsonl").read_text().splitlines()]
    assert sorted(letter["offset"] for letter in letters) == sorted(BROKEN)
    for letter in letters:
        assert BROKEN[letter["offset"]][1] in letter["reason"]
    store = CheckpointStore(directory, create=False)
    restored = store.restore(store.last_good(), state_like=build_learner(load_config(config)).init(0))
    codec_state = restored.metadata["codec"]  # the standardisation statistics travel with the checkpoint
    (partition,) = codec_state["partitions"]
    assert partition["offset"] == len(values) and partition["count"] > 0
    assert int(restored.state.step) > 0
    assert any(e["event"] == "accept" for e in store.ledger.read())


def test_replay_of_recorded_events_twice_gives_bit_identical_checkpoints_decoded_in_a_thread_or_a_process(
    tmp_path, capsys
):
    recording = tmp_path / "events.parquet"
    record(recording, _values(800))
    config = tmp_path / "replay.toml"
    _config(config)
    for out, decoder in (("a", "thread"), ("b", "process")):  # the statistics live in the child for "b"
        argv = ["replay", str(recording), "--config", str(config), "--out", str(tmp_path / out)]
        assert main([*argv, "--set", f'stream.decoder="{decoder}"']) == 0
    capsys.readouterr()
    stores = [CheckpointStore(tmp_path / out, create=False) for out in ("a", "b")]
    assert [i.number for i in stores[0].list()] == [i.number for i in stores[1].list()]
    like = build_learner(load_config(config)).init(0)
    a, b = (s.restore(s.last_good(), state_like=like) for s in stores)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda m: {k: v for k, v in m.items() if k != "saved_at"}  # noqa: E731
    assert strip(a.metadata) == strip(b.metadata) and "codec" in a.metadata
