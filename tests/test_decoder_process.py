"""Decoding in a process of its own (stream/decoder_process.py): the in-process codec's results and
order, its state across the pipe, and what happens when either process dies."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future

import numpy as np
import orjson
import pytest

from continuity.stream import FeatureSpec, Positions, encode_json, make_codec
from continuity.stream import decoder_process as decoder_module
from continuity.stream.decoder_process import DecoderProcessError, ProcessCodec, decoding_codec
from continuity.stream.fields import FieldsCodec, FieldSpec
from continuity.stream.ingest import Ingest
from continuity.stream.records import PartitionRecords
from continuity.stream.sources import Source

SPEC = FeatureSpec((2, 3), "float32", 4)
FIELDS = {
    "label": "label",
    "standardize_every": 4,
    "amount": {"kind": "numeric", "standardize": True},
    "country": {"kind": "categorical", "buckets": 16},
    "tags": {"kind": "tokens", "length": 3, "buckets": 32},
}
EVENT_SPEC = FeatureSpec((1,), "float32", 2)


def run_of(values: list, first_offset: int = 0) -> PartitionRecords:
    n = len(values)
    offsets = np.arange(first_offset, first_offset + n, dtype=np.int64)
    return PartitionRecords("t", 0, list(values), [None] * n, offsets, np.zeros(n, np.int64))


def json_records(n: int, seed: int = 0) -> list:
    """Valid records with every kind of bad one among them."""
    rng = np.random.default_rng(seed)
    values = [encode_json(rng.random((2, 3), dtype=np.float32), int(rng.integers(4))) for _ in range(n)]
    values[3] = b"{not json"
    values[5] = b'{"x": [[1, 2, 3], [4, 5]], "y": 1}'  # a ragged shape
    values[7] = b'{"x": [[1, 2, 3], [4, 5, 6]], "y": 9}'  # a label out of range
    values[8] = None  # a tombstone
    return values


def events(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        orjson.dumps(
            {
                "amount": float(rng.normal(1e4, 3e3)),
                "country": str(rng.choice(["DE", "FR", "US"])),
                "tags": [f"t{int(t)}" for t in rng.integers(0, 9, int(rng.integers(0, 5)))],
                "label": int(rng.integers(2)),
            }
        )
        for _ in range(n)
    ]


def same_decoding(a, b) -> None:
    (block_a, letters_a), (block_b, letters_b) = a, b
    assert [(letter.record.position, letter.reason) for letter in letters_a] == [
        (letter.record.position, letter.reason) for letter in letters_b
    ]
    xa, xb = (block_a.x, block_b.x) if isinstance(block_a.x, dict) else ({"x": block_a.x}, {"x": block_b.x})
    assert xa.keys() == xb.keys()
    for name in xa:
        np.testing.assert_array_equal(xa[name], xb[name], err_msg=name)
    np.testing.assert_array_equal(block_a.y, block_b.y)
    np.testing.assert_array_equal(block_a.offsets, block_b.offsets)
    assert block_a.segments == block_b.segments and block_a.keys == block_b.keys


@pytest.fixture
def json_process():
    codec = ProcessCodec("json", SPEC)
    yield codec
    codec.close()


def test_a_decoder_process_gives_the_in_process_blocks_and_dead_letters_in_submission_order(json_process):
    here = make_codec("json", SPEC)
    runs = [run_of(json_records(40, seed), first_offset=40 * seed) for seed in range(6)]
    futures = [json_process.submit(run) for run in runs]  # all in flight at once
    for run, future in zip(runs, futures):
        same_decoding(here.decode(run), future.result(timeout=30))
    assert len(future.result()[1]) == 4  # the bad records above, each with its reason


def test_a_fields_codec_keeps_its_statistics_in_the_child_and_restores_them_across_the_pipe():
    spec = FieldSpec.from_dict(FIELDS)
    values = events(60)
    here, there = FieldsCodec(spec, EVENT_SPEC), ProcessCodec("fields", EVENT_SPEC, fields=spec)
    try:
        for a, b in ((0, 25), (25, 40)):  # decoded ahead of what is trained, as the ingest thread does
            same_decoding(here.decode(run_of(values[a:b], a)), there.decode(run_of(values[a:b], a)))
        at = Positions({("t", 0): 30})
        state = there.state(at)
        assert state is not None and state == here.state(at)
        restarted = ProcessCodec("fields", EVENT_SPEC, fields=spec)
        try:
            restarted.restore(json.loads(json.dumps(state)))  # through a checkpoint's metadata
            same_decoding(here.decode(run_of(values[30:], 30)), restarted.decode(run_of(values[30:], 30)))
        finally:
            restarted.close()
    finally:
        there.close()


def test_an_error_in_the_child_is_raised_in_the_caller_with_the_childs_traceback():
    codec = ProcessCodec("fields", EVENT_SPEC, fields=FieldSpec.from_dict(FIELDS))
    try:
        with pytest.raises(Exception, match="partitions") as raised:  # not a state this codec ever wrote
            codec.restore({"standardize_every": 4, "no_partitions": []})
        assert any("in the decoder process" in note for note in raised.value.__notes__)
        block, letters = codec.decode(run_of(events(3)))  # the child serves on
        assert len(block) == 3 and not letters
    finally:
        codec.close()


def test_submits_beyond_the_socket_return_while_the_child_is_busy_up_to_the_send_ahead_bound(json_process):
    json_process.start()
    here = make_codec("json", SPEC)
    big = run_of(json_records(2000) * 20)  # ~3 MB of records: far beyond a socket's buffer
    os.kill(json_process.pid, signal.SIGSTOP)  # busy: reading nothing
    try:
        started = time.monotonic()
        futures = [json_process.submit(big) for _ in range(decoder_module.SEND_AHEAD)]
        assert time.monotonic() - started < 2.0  # the ingest thread is not held until the child reads
        one_more: Future = Future()
        threading.Thread(target=lambda: one_more.set_result(json_process.submit(big)), daemon=True).start()
        with pytest.raises(TimeoutError):  # beyond the bound it waits: memory holds a few polls at most
            one_more.result(timeout=1.0)
    finally:
        os.kill(json_process.pid, signal.SIGCONT)
    futures.append(one_more.result(timeout=60))
    for future in futures:
        same_decoding(future.result(timeout=60), here.decode(big))


def test_a_request_that_cannot_be_pickled_fails_alone_and_the_next_gets_its_own_answer(json_process):
    here = make_codec("json", SPEC)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        json_process.restore({"unpicklable": lambda: None})
    run = run_of(json_records(20))
    same_decoding(json_process.decode(run), here.decode(run))


class _ExitedPopen(subprocess.Popen):
    """A Popen that returns only once its process has exited: a child dead before its first message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wait()


@pytest.mark.parametrize("dead_before_the_recipe", [False, True])
def test_start_waits_for_the_child_and_fails_when_it_cannot_start(monkeypatch, dead_before_the_recipe):
    """`start` returns once the child answers, so a broken install fails there, not at the first decode,
    with the child's exit status, also when the child is gone before the codec's recipe is sent."""
    monkeypatch.setattr(decoder_module.sys, "executable", "/bin/false")  # an interpreter that exits at once
    if dead_before_the_recipe:
        monkeypatch.setattr(decoder_module.subprocess, "Popen", _ExitedPopen)
    broken = ProcessCodec("json", SPEC)
    try:
        with pytest.raises(DecoderProcessError, match=r"died \(exit status 1\)"):
            broken.start()
    finally:
        broken.close()


def test_a_killed_decoder_process_fails_pending_and_later_decodes_with_a_clear_error(json_process):
    json_process.decode(run_of(json_records(10)))
    os.kill(json_process.pid, signal.SIGKILL)
    with pytest.raises(DecoderProcessError, match=r"decoder process \d+ \('json' codec\) died \(killed by SIGKILL\)"):
        json_process.decode(run_of(json_records(10)))
    with pytest.raises(DecoderProcessError, match="died"):
        json_process.submit(run_of(json_records(10))).result(timeout=10)


def test_a_stopped_decoder_process_is_killed_and_its_decodes_fail_instead_of_waiting_forever():
    codec = ProcessCodec("json", SPEC, answer_within_s=1.5)
    try:
        codec.decode(run_of(json_records(10)))
        pid = codec.pid
        os.kill(pid, signal.SIGSTOP)  # alive, never answering: as a wedged child would be
        started = time.monotonic()
        with pytest.raises(DecoderProcessError, match=r"\('json' codec\) answered nothing for 1.5 s and was killed"):
            codec.submit(run_of(json_records(10))).result(timeout=30)
        assert time.monotonic() - started < 15
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(pid, 0)
    finally:
        codec.close()


def test_the_hang_clock_runs_from_the_childs_last_answer_not_from_when_a_queued_request_was_sent():
    codec = ProcessCodec("json", SPEC, answer_within_s=3.0)
    try:
        codec.start()
        child = codec._child
        assert child is not None
        queued: Future = Future()
        # A request sent 10 s ago that waited behind others, the last of which was answered just now.
        with child.ending:
            child.pending.append((queued, time.monotonic() - 10))
        child.answered_at = time.monotonic()
        child._kill_if_wedged()
        assert not child.wedged and child.process.poll() is None  # busy, not wedged
        child.answered_at -= 10  # nothing answered for 10 s while it waited
        child._kill_if_wedged()
        with pytest.raises(DecoderProcessError, match="answered nothing for 3 s and was killed"):
            queued.result(timeout=30)
    finally:
        codec.close()


def test_the_decoder_process_exits_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from continuity.stream import FeatureSpec
                from continuity.stream.decoder_process import ProcessCodec
                codec = ProcessCodec("json", FeatureSpec((2,), "float32", 2))
                codec.start()
                print(codec.pid, flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"decoder process {child} outlived its killed parent"
    finally:
        parent.kill()
        parent.stdout.close()


def _alive(pid: int) -> bool:
    """A running process (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_auto_decodes_text_codecs_in_a_process_given_two_cores_and_binary_in_the_thread(monkeypatch):
    monkeypatch.setattr(decoder_module, "usable_cores", lambda: 2)
    assert isinstance(decoding_codec("json", SPEC), ProcessCodec)
    assert isinstance(decoding_codec("fields", EVENT_SPEC, fields=FieldSpec.from_dict(FIELDS)), ProcessCodec)
    assert not isinstance(decoding_codec("binary", SPEC), ProcessCodec)
    assert not isinstance(decoding_codec("json", SPEC, decoder="thread"), ProcessCodec)
    monkeypatch.setattr(decoder_module, "usable_cores", lambda: 1)
    assert not isinstance(decoding_codec("json", SPEC), ProcessCodec)
    assert isinstance(decoding_codec("json", SPEC, decoder="process"), ProcessCodec)  # asked for: given
    with pytest.raises(ValueError, match="`decoder` must be one of"):
        decoding_codec("json", SPEC, decoder="gpu")


class _Runs(Source):
    """Hands out the given runs, one per poll, then ends."""

    def __init__(self, runs):
        super().__init__()
        self._runs = list(runs)

    def poll(self, timeout_s: float = 0.1):
        return [self._runs.pop(0)] if self._runs else []

    @property
    def finished(self) -> bool:
        return not self._runs


def test_ingest_through_a_decoder_process_delivers_the_thread_decoders_blocks_and_dead_letters(json_process):
    runs = [run_of(json_records(30, seed), first_offset=30 * seed) for seed in range(5)]

    def delivered(codec):
        ingest = Ingest(_Runs(runs), codec)
        blocks = []
        with ingest:
            while (block := ingest.get(timeout_s=30)) is not None or not ingest.ended:
                if block is not None:
                    blocks.append(block)
        letters = [(letter.record.position.offset, letter.reason) for letter in ingest.dead_letters.letters]
        return blocks, letters, (ingest.stats.records, ingest.stats.examples, ingest.stats.dead_letters)

    here, there = delivered(make_codec("json", SPEC)), delivered(json_process)
    assert here[1] == there[1] and len(there[1]) == 4 * len(runs)
    assert here[2] == there[2] == (150, 130, 20)
    for a, b in zip(here[0], there[0], strict=True):
        same_decoding((a, []), (b, []))
        assert (a.generation, a.end) == (b.generation, b.end)


@pytest.mark.parametrize(
    "signal_number, said",
    [(signal.SIGKILL, "died (killed by SIGKILL)"), (signal.SIGSTOP, "answered nothing for 2 s and was killed")],
)
def test_replay_stops_with_status_7_and_one_line_when_its_decoder_process_dies_or_hangs(
    tmp_path, capsys, monkeypatch, signal_number, said
):
    from test_fields import SPEC_TABLE, _fields_toml, record
    from test_fields import events as agrawal_events

    from continuity.cli import main

    recording = tmp_path / "events.parquet"
    record(recording, [orjson.dumps(e) for e in agrawal_events(200)])
    config = tmp_path / "replay.toml"
    config.write_text(
        '[stream]\ncodec = "fields"\nnum_classes = 2\ndecoder = "process"\n\n[model]\nhidden = [8]\n'
        + _fields_toml(SPEC_TABLE)
    )
    submit = ProcessCodec.submit

    def submit_to_a_signalled_child(self, records):
        if self._child is None:
            self._answer_within_s = 2.0
            self.start()
            os.kill(self.pid, signal_number)
        return submit(self, records)

    monkeypatch.setattr(ProcessCodec, "submit", submit_to_a_signalled_child)
    assert main(["replay", str(recording), "--config", str(config), "--out", str(tmp_path / "out")]) == 7
    lines = capsys.readouterr().err.strip().splitlines()
    assert "decoder process" in lines[-1] and f"('fields' codec) {said}" in lines[-1]
