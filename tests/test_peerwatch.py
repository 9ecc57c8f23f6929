"""The watch on waits for other processes (continuity/peerwatch.py): a stuck or stopped peer is named and
ends the wait; a wait that ends in time, and this process's own work, never do.

The coordination service is a dict here and the clock is hand-moved; tests/test_procs.py runs it
between two real processes, one of which hangs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from continuity import peerwatch
from continuity.peerwatch import CHECK_AFTER_S, STATUS_DIRECTORY, PeerWatch, Word


class Store:
    """JAX's coordination key-value store, in a dict."""

    def __init__(self):
        self.values: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        if key in self.values and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: {key}")
        self.values[key] = value

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.values.items() if k.startswith(key)]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _says(store: Store, process: int, word: Word) -> None:
    store.key_value_set(f"{STATUS_DIRECTORY}{process}", word.to_text(), allow_overwrite=True)


def _watch(store: Store, clock: Clock, *, me: int = 0, count: int = 3, timeout_s: float = 60.0) -> PeerWatch:
    return PeerWatch(timeout_s, me=me, count=count, store=store, clock=clock, on_stuck=pytest.fail)


def test_a_peer_that_has_not_reached_the_collective_by_the_timeout_is_named_with_its_last_word():
    store, clock = Store(), Clock()
    watch = _watch(store, clock)
    _says(store, 1, Word(7, "round 3's agreement"))
    _says(store, 2, Word(6, "the window's positions", busy="saving a checkpoint"))
    for _ in range(6):
        with watch.waiting("a collective before"):
            pass
    with watch.waiting("round 3's agreement"):
        clock.now += 59
        assert watch.check() is None  # within the timeout
        clock.now += 2
        line = watch.check()
    assert line is not None
    assert line.startswith(
        "process 0 of 3: process 2 (the last collective it reached was #6, the window's positions, then it was "
        "saving a checkpoint) has not reached round 3's agreement (collective #7) in 61 s"
    )
    assert "process 1" not in line  # it is waiting at the same collective
    assert line.endswith(
        "raise [scale] peer_timeout_s (now 60 s); stopping without saving: the last checkpoint is the resume point. "
        "Restart every process."
    )


def test_a_peer_that_never_said_anything_is_named_as_having_reached_no_collective():
    store, clock = Store(), Clock()
    watch = _watch(store, clock, count=2, timeout_s=5)
    with watch.waiting("process 0's restored checkpoint"):
        clock.now += 6
        line = watch.check()
    assert line is not None and "process 1 (it has reached no collective yet) has not reached" in line


def test_a_peer_that_stopped_on_its_own_ends_the_wait_at_once_not_at_the_timeout():
    store, clock = Store(), Clock()
    watch = _watch(store, clock, timeout_s=600)
    _says(store, 2, Word(3, "round 1's agreement", stopped="saved positions the broker no longer has"))
    with watch.waiting("round 2's agreement"):
        clock.now += CHECK_AFTER_S / 2
        assert watch.check() is None  # a round's wait is short: the others' words are not read yet
        clock.now += CHECK_AFTER_S
        line = watch.check()
    assert line is not None
    assert line.startswith(
        "process 0 of 3: process 2 stopped (saved positions the broker no longer has) while this one waited at "
        "round 2's agreement; stopping without saving"
    )


def test_time_spent_on_this_process_s_own_work_is_never_counted():
    store, clock = Store(), Clock()
    watch = _watch(store, clock, timeout_s=5)
    with watch.waiting("round 1's agreement"):
        pass
    watch.busy("saving a checkpoint")
    clock.now += 3600
    assert watch.check() is None
    with watch.waiting("round 2's agreement"):
        clock.now += 1
        assert watch.check() is None  # the wait is counted from its own start


def test_this_process_s_word_is_what_it_last_entered_and_is_busy_with_and_garbage_reads_as_nothing_said():
    store, clock = Store(), Clock()
    watch = _watch(store, clock, me=1)
    with watch.waiting("round 1's agreement"):
        pass
    watch.busy("restoring its store's newest good checkpoint")
    watch._publish()
    assert Word.from_text(store.values[f"{STATUS_DIRECTORY}1"]) == Word(
        1, "round 1's agreement", "restoring its store's newest good checkpoint"
    )
    watch.stopped("an error")  # published at once, without the watch thread
    assert Word.from_text(store.values[f"{STATUS_DIRECTORY}1"]).stopped == "an error"
    for garbage in ["", "{", "[]", '{"entered": "x"}', '{"entered": 1}']:
        assert Word.from_text(garbage) == Word()
    _says(store, 0, Word(1, "x"))
    store.values[f"{STATUS_DIRECTORY}other"] = "not a process"  # another program's key under the directory
    assert watch._read() == ({0: Word(1, "x"), 2: Word()}, "")


def test_a_wait_whose_peers_cannot_be_read_ends_at_the_timeout_saying_so_not_blaming_a_peer():
    class Gone(Store):
        def key_value_dir_get(self, key):
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")

    clock = Clock()
    watch = _watch(Gone(), clock, count=2, timeout_s=30)
    with watch.waiting("round 4's agreement"):
        clock.now += 10
        assert watch.check() is None
        clock.now += 21
        line = watch.check()
    assert line is not None and line.startswith(
        "process 0 of 2: no answer from every process at round 4's agreement (collective #1) in 31 s, and the "
        "others' words could not be read (UNAVAILABLE: failed to connect to all addresses)"
    )


def test_the_watch_thread_ends_a_wait_on_a_stuck_peer_and_leaves_one_that_ends_in_time_alone(monkeypatch):
    monkeypatch.setattr(peerwatch, "CHECK_AFTER_S", 0.05)
    monkeypatch.setattr(peerwatch, "CHECK_EVERY_S", 0.02)
    store = Store()
    ended: list[str] = []
    released = threading.Event()  # the collective: it returns when every process has come

    def on_stuck(line: str) -> None:
        ended.append(line)
        released.set()  # in `serve` the process exits here (status 6)

    watch = PeerWatch(0.3, me=0, count=2, store=store, on_stuck=on_stuck)
    try:
        with watch.waiting("round 1's agreement"):
            threading.Timer(0.1, lambda: (_says(store, 1, Word(1, "round 1's agreement")), released.set())).start()
            assert released.wait(5)
        released.clear()
        assert ended == []  # the peer came in time
        with watch.waiting("round 2's agreement"):  # process 1 never comes
            assert released.wait(5)
        assert len(ended) == 1 and "process 1 (the last collective it reached was #1, round 1's agreement)" in ended[0]
        assert Word.from_text(store.values[f"{STATUS_DIRECTORY}0"]) == Word(2, "round 2's agreement")  # published
    finally:
        watch.close()


def test_lockstep_s_collectives_are_waits_on_every_process_each_named_in_the_same_order():
    import jax

    from continuity.factory import build_learner
    from continuity.learner import Classification, LearnerConfig, ModelConfig
    from continuity.lockstep import Lockstep

    config = LearnerConfig(model=ModelConfig(kind="mlp", hidden=(8,)), batch_size=4, steps_per_dispatch=2)
    learner = build_learner(config, inputs=jax.ShapeDtypeStruct((2,), np.float32), task=Classification(10))
    store, clock = Store(), Clock()
    watch = _watch(store, clock)
    seen: list[str] = []

    def gather(values):
        seen.append(watch._word.at)
        return np.stack([values] * 3)

    lockstep = Lockstep(learner, gather=gather, watch=watch)
    lockstep.agree(2, 8, ended=False, stop=False)
    lockstep.gather_rows({"x": np.zeros((2, 3), np.float32)})
    lockstep.gather_json("{}", what="the window's positions")
    assert seen == [
        "round 1's agreement",
        "the window's held-out rows",
        "the window's held-out rows",
        "the window's positions",
        "the window's positions",
    ]
    assert watch._word.entered == 3 and watch._waiting is None


@pytest.mark.parametrize(
    ("ending", "said"),
    [
        ("lost positions", "saved positions the broker no longer has, with stream.on_lost_positions = 'halt'"),
        ("unsaved", "checkpoint saves kept failing: the disk is full"),
        ("error", "OSError: read-only file system"),
        ("agreed end", ""),
    ],
)
def test_a_process_that_stops_alone_says_why_before_it_goes_and_an_agreed_end_says_nothing(monkeypatch, ending, said):
    from continuity.lockstep import Lockstep, LockstepLoop
    from continuity.loop import RunSummary, TrainingLoop

    store, clock = Store(), Clock()
    watch = _watch(store, clock, me=1, count=2)

    def run(self):
        if ending == "error":
            raise OSError("read-only  file system")
        return RunSummary(
            stopped_on_lost_positions=ending == "lost positions",
            unsaved="the disk is full" if ending == "unsaved" else None,
        )

    monkeypatch.setattr(TrainingLoop, "run", run)
    loop = object.__new__(LockstepLoop)  # only its run's ending is under test
    loop.lockstep = object.__new__(Lockstep)
    loop.lockstep.watch = watch
    if ending == "error":
        with pytest.raises(OSError):
            loop.run()
    else:
        loop.run()
    published = store.values.get(f"{STATUS_DIRECTORY}1")
    assert (Word.from_text(published).stopped if published else "") == said
