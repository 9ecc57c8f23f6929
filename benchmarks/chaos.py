"""`make chaos`: SIGKILL a running `continuity serve` at random moments, rot a checkpoint, cut its broker; then check.

The claim under test (README, "Checkpoints and rollback"): whatever stops the service, in
the surviving lineage every record is trained exactly once (or quarantined), and the
model ends bit-identical to an uninterrupted run over the same records.

One run, seeded (`--seed` fixes the stream, the kill moments and the flipped byte):

1. The uninterrupted run: `continuity replay` of the stream recorded in advance (the
   records the topic will hold, at the offsets it will give them). Its ledger gives the
   windows, its final checkpoint the params SHA-256 to match.
2. The embedded broker behind a TCP proxy. Tansu keeps its log in memory, so a broker
   stopped and started again is a broker that lost its data, not an outage: the proxy is
   cut instead (as tests/test_service_outage.py does). The stream is permuted-digits with a
   broken upstream labeler's segment after the outage (the guard quarantines its windows
   when it sees the damage: ChaosPlan.poison); its first part is produced to a one-partition topic.
3. `continuity serve` runs as a subprocess and is SIGKILLed N times, restarted each time,
   at random moments: during start-up, or once it reads, after zero to two newly accepted
   windows plus up to a second (mid-window, mid-save, mid-quarantine copy).
4. While it is down after one kill, one byte of a state file of the newest checkpoint is
   flipped (same size): the next start must find it corrupt and restore the one before.
5. Once the first part is trained, the proxy cuts the service's consumer off for a while:
   /readyz must answer 503; the rest of the stream is produced meanwhile; one of the kills
   lands in the outage, so the service also restarts against an unreachable broker.
6. The remaining kills; then the service finishes the stream and stops on SIGTERM (exit 0).
7. The checks. Exactly once: the ledger's accepted chain covers the partition from offset
   0 to its end without gaps or overlaps, each window of it trained exactly its records'
   examples that are not held out for the probe, less its quarantined spans (a whole window, or
   a damaged span the guard cut out of it), and the
   quarantine file holds exactly the quarantined records (a kill between a
   quarantine copy and its checkpoint copies it again: counted, not an error). The same
   decisions: the windows and their verdicts are the uninterrupted run's. The final params
   are bit-identical to its ones. The corrupted checkpoint was skipped, /readyz answered 503
   in the outage, and the topic holds the recorded records.

What "uninterrupted" means here: the same batches and the same windows. Windows close by
count only (`probe.every_seconds = 0`) and every accepted window is checkpointed
(`checkpoints.every_seconds = 0`), so a restart re-trains exactly what the killed run had
not checkpointed. Two things still close on time in a live stream (stream/ingest.py,
continuity/service.py): a partial batch is trained (padded) when nothing arrives for 0.2 s,
and a window closes after 3 s of quiet. Batches of one record (`learner.batch_size = 1`;
one example per record) are never partial, so a slow fetch on a loaded machine cannot
change them. The stream comes in two parts, split on a window boundary of the uninterrupted
run, and the outage comes between them: the quiet spell leaves no window half trained.

The guard's anchor (`probe.anchor_windows`, an older good model it also judges against) is
not saved in checkpoints: a restart anchors at the restored model, so a later verdict can
differ from an uninterrupted run's. The default run leaves it out (`--anchor-windows 0`,
judging against the last good model, which a checkpoint holds); `--anchor-windows 3` is the
service's default (BENCHMARKS.md, "Reliability").

Usage: python -m continuity.benchmarks.chaos [--kills 20] [--seed 0] [--segments 20]
[--poison 15] [--outage 15] [--anchor-windows 0] [--work DIR]. Exit status 0 when every check holds, 1
otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from continuity.benchmarks.tcp_proxy import TcpProxy

TOPIC = "chaos"
CLIENT_ID = "continuity"  # the service's Kafka client id (KafkaSettings' default): what the proxy cuts
SHORT_SESSION_TIMEOUT_MS = 6000  # the embedded broker holds a group join for about half of it
HOLDOUT_FRACTION = 0.1  # probe.holdout_fraction: the share of examples held out, never trained
SERVICE_SEED = 0  # service.seed: with the record keys, it decides which examples are held out
STALL_S = 180.0  # no progress for this long is a failure, not a slow machine


@dataclass(frozen=True)
class ChaosPlan:
    """What one chaos run does; the defaults are `make chaos`'s."""

    kills: int = 20
    seed: int = 0
    segments: int = 20  # permuted-digits segments (~1,440 examples each): ~50 windows, enough for 20 kills
    # A broken upstream labeler's segment (after the outage). Where the guard sees its damage, its
    # windows are quarantined and kills also land mid-quarantine (the reduced run in the tests:
    # segment 2 of 3). In the 20-segment stream, with batches of one, the small model knows
    # segment 14 too little for its flipped labels to regress the probe: nothing is quarantined.
    poison: int | None = 15
    window: int = 500  # probe.every_examples: trained examples per window
    # learner.batch_size. A live stream that keeps nothing in flight for 0.2 s trains the partial
    # batch it holds (padded): with batches of one record there is never a partial batch, so a
    # slow fetch on a loaded machine cannot change the batches, hence the windows, of a run.
    batch_size: int = 1
    outage_s: float = 15.0  # how long the proxy cuts the service off
    hidden: tuple[int, ...] = (64,)  # a small MLP: the run is about restarts, not accuracy
    learning_rate: float = 0.005  # high enough that the small MLP learns the poisoned labels within a window
    max_delay_s: float = 1.0  # a kill lands up to this long after the accepted windows it waited for
    # The consumer group; "" reads the partition without one: each restart then skips the
    # group join (the embedded broker holds it for seconds while the killed member's session lasts).
    group: str = TOPIC
    # probe.anchor_windows: the guard also judges against the good model of up to this many
    # windows ago (the service's default, 3). That anchor is not saved in checkpoints: a restart
    # anchors at the restored model, so a later verdict can differ from an uninterrupted run's
    # (BENCHMARKS.md, "Reliability"). 0 judges against the last good model only, which a
    # checkpoint does hold.
    anchor_windows: int = 0


@dataclass
class ChaosReport:
    """What happened and what was found; `violations` is empty when every check held."""

    records: int = 0
    split: int = 0  # records produced before the outage (a window boundary)
    kills: int = 0
    restarts: int = 0
    corrupted: str | None = None  # "checkpoint 7 (state/...), byte 1234"
    corruption_detected: bool = False
    outage_s: float = 0.0
    unready_in_outage: bool = False
    windows: int = 0
    quarantined_windows: int = 0
    quarantine_copies_repeated: int = 0
    examples_trained: int = 0
    digest: str | None = None
    reference_digest: str | None = None
    seconds: float = 0.0
    checked: bool = False  # the run got to its checks (False: it stopped early, see violations)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        def verdict(prefix: str) -> str:
            if not self.checked:
                return "NOT CHECKED"
            return "VIOLATED" if any(v.startswith(prefix) for v in self.violations) else "OK"

        equal = self.digest is not None and self.digest == self.reference_digest
        lines = [
            f"chaos: {self.kills} SIGKILLs, {self.restarts} restarts, {self.records:,} records "
            f"({self.split:,} before the outage), {self.seconds:.0f} s",
            f"  checkpoint corrupted: {self.corrupted or 'none'}; "
            f"{'detected and skipped' if self.corruption_detected else 'NOT detected'}",
            f"  broker outage: {self.outage_s:.0f} s; "
            f"/readyz 503 during it: {'yes' if self.unready_in_outage else 'NO'}",
            f"  exactly once {verdict('lineage')}: {self.windows} windows chained from offset 0 to {self.records:,}, "
            f"{self.examples_trained:,} examples trained, {self.quarantined_windows} windows quarantined "
            f"({self.quarantine_copies_repeated} records copied again after a kill)",
            f"  the uninterrupted run's windows and verdicts: {verdict('decisions')}",
            f"  params SHA-256 {self.digest or '-'}: {'equal to' if equal else 'DIFFERENT from'} the "
            f"uninterrupted run's ({self.reference_digest or '-'})",
        ]
        lines += [f"  violation: {v}" for v in self.violations]
        lines.append("OK" if self.ok else f"FAILED: {len(self.violations)} violation(s)")
        return "\n".join(lines)


class ChaosFailure(Exception):
    """The run cannot go on (the service died, or made no progress): a violation, reported as such."""


# ---------------------------------------------------------------------------- the stream


def make_records(plan: ChaosPlan) -> list[tuple[bytes, bytes]]:
    """(key, value) of every record: permuted-digits (with a poisoned segment), one example per binary record."""
    from continuity.stream import FeatureSpec, ScenarioSource, make_codec
    from continuity.stream.scenarios import make_scenario

    codec = make_codec("binary", FeatureSpec((8, 8, 1), "float32", 10))
    scenario = make_scenario(
        "permuted-digits",
        segments=plan.segments,
        seed=plan.seed,
        poison=plan.poison,
        # Every label of the segment it knows best made wrong the same way: damage the guard sees.
        poison_source=0 if plan.poison is None else plan.poison - 1,
        poison_mode="flip",
    )
    source = ScenarioSource(scenario, codec)
    return [source.encode_record(i) for i in range(len(source))]


def _run_of(records: list[tuple[bytes, bytes]]):
    from continuity.stream import PartitionRecords

    n = len(records)
    offsets = np.arange(n, dtype=np.int64)
    return PartitionRecords(TOPIC, 0, [v for _, v in records], [k for k, _ in records], offsets, np.zeros(n, np.int64))


def write_recording(records: list[tuple[bytes, bytes]], path: Path) -> Path:
    """The records as `continuity record` writes the topic they will be produced to (offsets 0..n-1)."""
    from continuity.stream import RecordingWriter

    with RecordingWriter(path) as writer:
        writer.write(_run_of(records))
    return path


def trainable(records: list[tuple[bytes, bytes]], *, holdout_fraction: float, seed: int) -> np.ndarray:
    """Per record (one example each): True when its example is trained, False when held out for the probe."""
    from continuity.stream import FeatureSpec, Holdout, make_codec

    block, letters = make_codec("binary", FeatureSpec((8, 8, 1), "float32", 10)).decode(_run_of(records))
    if letters or len(block) != len(records):
        raise ChaosFailure(f"the chaos stream itself does not decode ({len(letters)} dead letters)")
    return ~Holdout(holdout_fraction, salt=seed).select(block)


# ---------------------------------------------------------------------------- the ledger


def read_ledger(directory: Path) -> list[dict]:
    """The ledger's events; a line being written (or cut by a kill) is left out."""
    path = directory / "ledger.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return events


def _offset(positions) -> int:
    """The offset of partition 0 of the chaos topic in a ledger's positions (0 when absent)."""
    for entry in positions or ():
        if entry.get("topic") == TOPIC and entry.get("partition") == 0:
            if entry.get("skip"):
                raise ChaosFailure(f"a position inside a record ({entry}): the stream has one example per record")
            return int(entry["offset"])
    return 0


def accepted_chain(events: list[dict], final: int | None) -> list[dict]:
    """The "accept" events of the surviving lineage, oldest first: parent links back from checkpoint `final`."""
    accepts = {e["checkpoint"]: e for e in events if e["event"] == "accept"}
    chain, number = [], final
    while number is not None:
        chain.append(accepts[number])
        number = accepts[number]["parent"]
    return chain[::-1]


def windows_of(chain: list[dict]) -> list[tuple[int, int, bool]]:
    """(from offset, to offset, quarantined) of each window of a chain."""
    return [(_offset(e["from"]), _offset(e["positions"]), bool(e.get("quarantined"))) for e in chain]


def quarantined_spans(events: list[dict], chain: list[dict]) -> list[tuple[int, int]]:
    """(from offset, to offset) of each span the ledger quarantined inside a window of the chain.

    A quarantined window is one span; the guard may also cut a damaged span out of a window
    and train the rest of it (an excision). A kill between a quarantine and its checkpoint
    repeats the same span (the same records make the same decisions): counted once.
    """
    windows = windows_of(chain)
    spans = {(_offset(e["from"]), _offset(e["to"])) for e in events if e["event"] == "quarantine"}
    return sorted(s for s in spans if any(start <= s[0] and s[1] <= end for start, end, _ in windows))


def lineage_violations(chain: list[dict], trained: np.ndarray, spans: Sequence[tuple[int, int]] = ()) -> list[str]:
    """What breaks "every record trained exactly once, or quarantined" in an accepted chain; [] when nothing.

    `trained[offset]`: whether the record at that offset (one example) is trained rather than
    held out for the probe; `spans`: the quarantined spans (`quarantined_spans`). The chain must
    span offsets 0..len(trained), each window starting where the one before ended, and each
    window's `lineage_examples` must grow by exactly the trained examples of its records outside
    the quarantined spans (not at all when the whole window was quarantined: one span).
    """
    quarantined = np.zeros(len(trained), bool)
    for start, end in spans:
        quarantined[start:end] = True
    windows = windows_of(chain)
    if not windows or windows[0][0] != 0 or windows[-1][1] != len(trained):
        span = f"{windows[0][0]}..{windows[-1][1]}" if windows else "nothing"
        return [f"lineage: the chain spans {span}, the stream 0..{len(trained)}"]
    violations = []
    for (_, end, _), (start, _, _) in zip(windows, windows[1:]):
        if start != end:
            violations.append(f"lineage: {'a gap' if start > end else 'an overlap'} between offsets {end} and {start}")
    lineage = 0
    for entry, (start, end, _) in zip(chain, windows):
        expected = int((trained[start:end] & ~quarantined[start:end]).sum())
        if entry["lineage_examples"] - lineage != expected:
            violations.append(
                f"lineage: window {start}..{end} (checkpoint {entry['checkpoint']}) trained "
                f"{entry['lineage_examples'] - lineage} examples; {expected} once each"
            )
        lineage = entry["lineage_examples"]
    return violations


def _first_difference(windows: list, reference: list, events: list[dict]) -> str:
    """Where the chaos run's windows first part from the uninterrupted run's, and the verdict there."""
    index = next((i for i, (a, b) in enumerate(zip(windows, reference)) if a != b), min(len(windows), len(reference)))
    if index == min(len(windows), len(reference)):
        return f"{len(windows)} windows, the uninterrupted run {len(reference)}"

    def decision(window) -> str:
        start, end, quarantined = window
        return f"{start}..{end} {'quarantined' if quarantined else 'accepted'}"

    start = windows[index][0]
    judged = [e for e in events if e["event"] == "probe" and _offset(e["from"]) == start]
    verdict = judged[-1]["verdict"] if judged else {}
    why = ""
    if verdict.get("regressed"):
        why = f" (regressed against the {verdict.get('against')} on {', '.join(verdict.get('regressed_scopes', []))})"
    return (
        f"window {index + 1} differs from the uninterrupted run's: {decision(windows[index])}{why} here, "
        f"{decision(reference[index])} there"
    )


def _quarantined_offsets(directory: Path) -> list[int]:
    path = directory / "quarantine.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["offset"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _final(directory: Path) -> tuple[int | None, dict]:
    """The newest good checkpoint of a stopped run and its metadata, its digests checked."""
    from continuity.checkpoints import CheckpointStore

    with CheckpointStore(directory, create=False) as store:
        number = store.last_good()
        if number is None:
            return None, {}
        verification = store.verify(number)
        if verification.result != "ok":
            raise ChaosFailure(f"the final checkpoint {number} does not verify: {verification.detail}")
        return number, store.info(number).metadata


# ---------------------------------------------------------------------------- the service


def write_config(path: Path, *, plan: ChaosPlan, bootstrap: str, directory: Path, http_port: int) -> Path:
    """The service's config: count-only windows, every accepted window checkpointed (see the module docstring).

    A small model and a cheaper guard (a smaller probe and Fisher sample) than the defaults:
    the run is about restarts, and judging a window of 500 at the defaults costs more than
    training it.
    """
    path.write_text(
        f"""[stream]
bootstrap = "{bootstrap}"
topics = ["{TOPIC}"]
group = "{plan.group}"
session_timeout_ms = {SHORT_SESSION_TIMEOUT_MS}

[model]
hidden = {list(plan.hidden)}

[learner]
learning_rate = {plan.learning_rate}
batch_size = {plan.batch_size}

[replay]
capacity = 256
batch_size = 16

[ewc]
fisher_samples = 64

[probe]
holdout_fraction = {HOLDOUT_FRACTION}
per_segment = 100
anchor_windows = {plan.anchor_windows}
every_examples = {plan.window}
every_seconds = 0.0

[checkpoints]
dir = "{directory}"
every_seconds = 0.0

[service]
seed = {SERVICE_SEED}
http_port = {http_port}
progress_every_s = 2.0
""",
        encoding="utf-8",
    )
    return path


class ServeProcess:
    """One `continuity serve` subprocess, its output in a log file."""

    def __init__(self, config: Path, log: Path):
        self.log = log
        self._out = log.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "continuity.cli", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise ChaosFailure(f"serve exited with status {self.process.returncode} while {what}; log tail:\n{tail}")

    def kill(self) -> bool:
        """SIGKILL; False when it had already exited."""
        alive = self.alive()
        if alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._out.close()
        return alive

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: its exit status (a kill after `timeout_s`, reported as a violation by the caller)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self._out.close()
        return status


def _ready(http_port: int) -> bool | None:
    """/readyz: True (200), False (503), None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as answer:
            return answer.status == 200
    except urllib.error.HTTPError as error:
        return False if error.code == 503 else None
    except OSError:
        return None


def _wait(condition: Callable[[], bool], what: str, serve: ServeProcess | None, timeout_s: float = STALL_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if serve is not None:
            serve.check_alive(f"waiting for {what}")
        if time.monotonic() > deadline:
            raise ChaosFailure(f"no progress for {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the run


class ChaosRun:
    """One chaos run in `work`; `run()` returns its report. See the module docstring."""

    def __init__(self, plan: ChaosPlan, work: Path, *, say: Callable[[str], None] = print):
        self.plan, self.work, self.say = plan, work, say
        self.random = random.Random(plan.seed)
        self.report = ChaosReport()
        self.directory = work / "serve" / "checkpoints"
        self.http_port = 0
        self.config: Path | None = None
        self.serve: ServeProcess | None = None
        self.corrupted_number: int | None = None
        self._started: list[ServeProcess] = []

    # ---- the uninterrupted run

    def reference(self, records: list[tuple[bytes, bytes]]) -> tuple[list[tuple[int, int, bool]], dict]:
        """`continuity replay` of the recorded stream: its windows and its final checkpoint's metadata."""
        directory = self.work / "reference" / "checkpoints"
        directory.parent.mkdir(parents=True)
        recording = write_recording(records, self.work / "reference" / "stream.parquet")
        config = write_config(
            self.work / "reference" / "continuity.toml",
            plan=self.plan,
            bootstrap="127.0.0.1:9",  # never contacted: a replay reads the recording
            directory=directory,
            http_port=0,
        )
        log = self.work / "reference" / "replay.log"
        with log.open("w", encoding="utf-8") as out:
            status = subprocess.run(
                [sys.executable, "-m", "continuity.cli", "replay", str(recording), "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
        if status != 0:
            raise ChaosFailure(f"the uninterrupted run (replay) exited {status}: see {log}")
        final, metadata = _final(directory)
        return windows_of(accepted_chain(read_ledger(directory), final)), metadata

    # ---- the faults

    def start(self) -> ServeProcess:
        if self.config is None:
            raise RuntimeError("start() before the config is written")
        self.serve = ServeProcess(self.config, self.work / "serve" / f"serve-{len(self._started) + 1:02d}.log")
        self._started.append(self.serve)
        return self.serve

    def kill(self) -> None:
        if self.serve is not None and self.serve.kill():
            self.report.kills += 1
        self.serve = None

    def _accepts(self) -> int:
        return sum(e["event"] == "accept" for e in read_ledger(self.directory))

    def _accepted_end(self) -> int:
        return max((_offset(e["positions"]) for e in read_ledger(self.directory) if e["event"] == "accept"), default=0)

    def kill_at_random(self, produced: int, *, windows: int = 0) -> None:
        """Start serve, let it get somewhere, SIGKILL it: during start-up, or once it reads, after 0-2 new
        accepted windows and up to `max_delay_s` more (mid-window, mid-save, mid-quarantine copy).

        `windows`: at least this many new accepted windows first (never during start-up). A
        service already running (restarted in the outage) is the one killed.
        """
        serve = self.serve or self.start()

        def caught_up() -> bool:  # with what is produced: nothing more will be accepted; kill it as it waits
            return self._accepted_end() >= produced

        if not windows and self.random.random() < 0.2:  # start-up: imports, restore, group join, first batches
            time.sleep(self.random.uniform(0.0, 6.0))
        else:
            _wait(lambda: _ready(self.http_port) is True or caught_up(), "the service to be reading", serve)
            target = self._accepts() + max(windows, self.random.randint(0, 2))
            _wait(lambda: self._accepts() >= target or caught_up(), "accepted windows", serve)
            time.sleep(self.random.uniform(0.0, self.plan.max_delay_s))
        serve.check_alive("running between kills")
        self.kill()

    def corrupt_newest(self) -> None:
        """Flip one byte of a state file of the newest good checkpoint, while no service runs."""
        from continuity.checkpoints import CheckpointStore

        # The one the next start restores: a save the kill cut off right after Orbax finalized it
        # has no files manifest yet ("unverified", not "intact") and is still what a start reads.
        with CheckpointStore(self.directory, create=False) as store:
            newest = store.last_good()
            good = [info.number for info in store.list() if info.status == "good" and info.condition != "corrupt"]
        if newest is None or not any(number < newest for number in good):  # the one before must be there to restore
            raise ChaosFailure(f"too few checkpoints to corrupt one ({good}): make the stream longer")
        files = sorted(
            (p for p in (self.directory / str(newest) / "state").rglob("*") if p.is_file()),
            key=lambda p: (p.stat().st_size, str(p)),
        )
        target = files[-1]  # the largest: the array data
        original = target.read_bytes()
        # OCDBT keeps the B-tree nodes of a save's earlier commits in its data files, never read
        # again: a flip there changes nothing a restore returns. Flip bytes until one does (as
        # `checkpoints verify` reads it, without recording it), so the next start has rot to find.
        for _ in range(50):
            data = bytearray(original)
            where = self.random.randrange(len(data) // 4, len(data))  # past the headers: a flip in the data
            data[where] ^= 0xFF
            target.write_bytes(bytes(data))
            with CheckpointStore(self.directory, create=False) as store:
                if store._verify(newest).result == "corrupt":
                    break
        else:
            raise ChaosFailure(f"no flipped byte of {target} changed what checkpoint {newest} restores")
        self.corrupted_number = newest
        name = target.relative_to(self.directory / str(newest))
        self.report.corrupted = f"checkpoint {newest} ({name}, byte {where} of {len(data):,})"
        self.say(f"  corrupted {self.report.corrupted}")

    def outage(self, proxy: TcpProxy, produce: Callable[[], object]) -> None:
        """Cut the service's consumer off, produce the rest meanwhile, kill and restart it inside the outage."""
        serve = self.serve
        if serve is None:
            raise RuntimeError("outage() needs a running service")
        proxy.cut(CLIENT_ID)
        started = time.monotonic()
        self.say(f"  proxy cut for {self.plan.outage_s:.0f} s")
        _wait(lambda: _ready(self.http_port) is False, "/readyz to answer 503 in the outage", serve, timeout_s=60)
        self.report.unready_in_outage = True
        produce()
        kill_at = started + self.random.uniform(0.3, 0.6) * self.plan.outage_s
        time.sleep(max(0.0, kill_at - time.monotonic()))
        serve.check_alive("the broker was unreachable")
        self.kill()
        self.start()  # against an unreachable broker
        time.sleep(max(0.0, started + self.plan.outage_s - time.monotonic()))
        proxy.restore()
        self.report.outage_s = time.monotonic() - started
        self.say(f"  proxy restored after {self.report.outage_s:.1f} s")

    # ---- the whole run

    def run(self) -> ChaosReport:
        # Reading checkpoints imports JAX here, and every later Popen then warns that forking a
        # threaded process may deadlock: not this one, whose child execs at once.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
            return self._run()

    def _run(self) -> ChaosReport:
        from continuity.stream import EmbeddedBroker, create_topic, free_port, produce_records

        started = time.monotonic()
        plan, report = self.plan, self.report
        try:
            records = make_records(plan)
            report.records = len(records)
            self.say(f"chaos: {len(records):,} records; the uninterrupted run (replay) first")
            reference_windows, reference = self.reference(records)
            report.reference_digest = reference["integrity"]["params_sha256"]
            report.split = self._split(reference_windows)
            self.say(f"  {len(reference_windows)} windows; the outage comes after record {report.split:,}")
            self.directory.parent.mkdir(parents=True)
            proxy_port = free_port()
            self.http_port = free_port()
            with EmbeddedBroker(advertised_port=proxy_port) as broker:
                proxy = TcpProxy(proxy_port, broker.port).start()
                try:
                    self.config = write_config(
                        self.work / "serve" / "continuity.toml",
                        plan=plan,
                        bootstrap=broker.bootstrap,
                        directory=self.directory,
                        http_port=self.http_port,
                    )
                    create_topic(broker.bootstrap, TOPIC, 1)
                    produce_records(broker.bootstrap, TOPIC, records[: report.split])
                    self._faults(proxy, lambda: produce_records(broker.bootstrap, TOPIC, records[report.split :]))
                    self._finish()
                    self._check_topic(broker.bootstrap, records)
                finally:
                    for serve in self._started:  # after a failure: none may outlive the run
                        if serve.alive():
                            serve.kill()
                    proxy.cut()
            self._check(records, reference_windows, reference)
        except ChaosFailure as failure:
            report.violations.append(str(failure))
        report.restarts = max(0, len(self._started) - 1)
        report.seconds = time.monotonic() - started
        return report

    def _split(self, windows: list[tuple[int, int, bool]]) -> int:
        """A window boundary of the uninterrupted run near the stream's middle (see the module docstring)."""
        ends = [end for _, end, _ in windows[:-1]]
        if not ends:
            raise ChaosFailure("the uninterrupted run has a single window: make the stream longer")
        middle = self.report.records * self.random.uniform(0.4, 0.6)
        return min(ends, key=lambda end: abs(end - middle))

    def _faults(self, proxy: TcpProxy, produce_rest: Callable[[], object]) -> None:
        plan, report = self.plan, self.report
        before = (plan.kills - 1) // 2  # kills before the outage; one in it; the rest after
        corrupt_after = self.random.randint(1, before)  # the kill after which the newest checkpoint is corrupted
        for index in range(1, before + 1):
            self.kill_at_random(report.split, windows=3 if index == corrupt_after else 0)
            self.say(f"  kill {report.kills}/{plan.kills} at accepted offset {self._accepted_end():,}")
            if index == corrupt_after:
                self.corrupt_newest()
        # Let it train the whole first part: the window that ends it is the uninterrupted run's.
        self.start()
        _wait(lambda: self._accepted_end() >= report.split, "the first part to be trained", self.serve)
        self.outage(proxy, produce_rest)
        self.say(f"  kill {report.kills}/{plan.kills} in the outage")
        while report.kills < plan.kills:
            self.kill_at_random(report.records)
            self.say(f"  kill {report.kills}/{plan.kills} at accepted offset {self._accepted_end():,}")

    def _finish(self) -> None:
        """Let the service train to the end of the stream, then stop it as an operator would (SIGTERM: exit 0)."""
        serve = self.start() if self.serve is None else self.serve
        # Ready first: the ledger may show the whole stream accepted by a run killed since.
        _wait(lambda: _ready(self.http_port) is True, "the service to be reading", serve)
        _wait(lambda: self._accepted_end() >= self.report.records, "the whole stream to be trained", serve)
        status = serve.stop()
        self.serve = None
        if status != 0:
            raise ChaosFailure(f"serve exited {status} on SIGTERM at the end of the stream (see {serve.log})")

    def _check_topic(self, bootstrap: str, records: list[tuple[bytes, bytes]]) -> None:
        """The topic holds exactly the records the uninterrupted run replayed, at the same offsets."""
        import pyarrow.parquet as pq

        from continuity.stream import KafkaSettings, record_topic

        path = self.work / "serve" / "topic.parquet"
        record_topic(KafkaSettings(bootstrap=bootstrap, topics=(TOPIC,)), path, from_beginning=True, until_end=True)
        table = pq.read_table(path, columns=["offset", "key", "value"]).to_pydict()
        if table["offset"] != list(range(len(records))) or list(zip(table["key"], table["value"])) != records:
            raise ChaosFailure(f"the topic does not hold the recorded stream ({len(table['offset'])} records)")

    def _check(self, records, reference_windows, reference: dict) -> None:
        report, violations = self.report, self.report.violations
        events = read_ledger(self.directory)
        final, metadata = _final(self.directory)
        chain = accepted_chain(events, final)
        windows = windows_of(chain)
        report.windows = len(windows)
        report.quarantined_windows = sum(q for _, _, q in windows)
        report.digest = (metadata.get("integrity") or {}).get("params_sha256")
        report.examples_trained = metadata.get("lineage_examples", 0)

        spans = quarantined_spans(events, chain)
        violations += lineage_violations(
            chain, trainable(records, holdout_fraction=HOLDOUT_FRACTION, seed=SERVICE_SEED), spans
        )
        if windows != reference_windows:
            violations.append(f"decisions: {_first_difference(windows, reference_windows, events)}")
        quarantined = _quarantined_offsets(self.directory)
        report.quarantine_copies_repeated = len(quarantined) - len(set(quarantined))
        expected_quarantine = {o for start, end in spans for o in range(start, end)}
        if set(quarantined) != expected_quarantine:
            violations.append("lineage: the quarantine file holds other records than the quarantined windows'")
        if expected_quarantine != set(_quarantined_offsets(self.work / "reference" / "checkpoints")):
            violations.append("decisions: other records were quarantined than in the uninterrupted run")
        # The corrupted checkpoint was found on the next start, skipped, and is not in the lineage.
        number = self.corrupted_number
        report.corruption_detected = any(e["event"] == "skip" and e.get("checkpoint") == number for e in events)
        if not report.corruption_detected:
            violations.append(f"corruption: checkpoint {number} was not found corrupt on the next start")
        if number in {e["checkpoint"] for e in chain}:
            violations.append(f"corruption: the corrupted checkpoint {number} is in the surviving lineage")
        if report.digest != report.reference_digest:
            violations.append("params: the final params differ from the uninterrupted run's")
        if report.examples_trained != reference.get("lineage_examples"):
            violations.append(
                f"decisions: {report.examples_trained} examples trained, the uninterrupted run "
                f"{reference.get('lineage_examples')}"
            )
        if report.kills < self.plan.kills:
            violations.append(f"kills: {report.kills} of {self.plan.kills}")
        report.checked = True


def run_chaos(plan: ChaosPlan, work: Path, *, say: Callable[[str], None] = print) -> ChaosReport:
    """One chaos run in `work` (a fresh directory); see the module docstring."""
    return ChaosRun(plan, work, say=say).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m continuity.benchmarks.chaos", description=__doc__.splitlines()[0])
    defaults = ChaosPlan()
    parser.add_argument("--kills", type=int, default=defaults.kills, help=f"SIGKILLs (default {defaults.kills})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="stream, kill moments, flipped byte")
    parser.add_argument(
        "--segments",
        type=int,
        default=defaults.segments,
        help=f"permuted-digits segments (default {defaults.segments})",
    )
    parser.add_argument(
        "--poison",
        type=int,
        default=defaults.poison,
        help=f"index of the segment a broken labeler replaces (default {defaults.poison}; -1: none)",
    )
    parser.add_argument(
        "--outage",
        type=float,
        default=defaults.outage_s,
        help=f"seconds the broker is cut off (default {defaults.outage_s:.0f})",
    )
    parser.add_argument(
        "--anchor-windows",
        type=int,
        default=defaults.anchor_windows,
        help=f"probe.anchor_windows (default {defaults.anchor_windows}; the service's is 3: see ChaosPlan)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the run's files here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # this process's producers: the summary says what matters
    if args.kills < 3:
        parser.error("--kills must be at least 3 (before, in and after the outage)")
    plan = ChaosPlan(
        kills=args.kills,
        seed=args.seed,
        segments=args.segments,
        poison=None if args.poison < 0 else args.poison,
        outage_s=args.outage,
        anchor_windows=args.anchor_windows,
    )
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=False)
        report = run_chaos(plan, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="continuity-chaos-") as work:
            report = run_chaos(plan, Path(work))
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
