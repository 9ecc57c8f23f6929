"""The service around the training loop: built from a Config, with signals, progress, HTTP and metrics.

`continuity serve` and `continuity replay` both run a `Service`; they differ only in the
source (a Kafka topic or a recorded Parquet file) and in what they print. The loop
itself (continuity/loop.py) is the same code.

Shutdown: SIGTERM or SIGINT sets the stop flag. The loop finishes the batch in hand,
judges and checkpoints the partial window (if good), waits for the save, commits the
offsets and returns; the HTTP server stops last. A second signal exits at once.

The service owns its checkpoint directory for as long as it runs (the store's lock,
opened before anything else touches the directory): a second service on it is refused,
and operator actions on it come through the admin endpoints, on the loop's thread.

The model it serves (POST /predict) and publishes (`[publish] dir`) is the last accepted
one, handed over by the loop as each checkpoint of it is finalized (continuity/serving.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from continuity.config import Config
from continuity.errors import UsageError
from continuity.loop import Progress, RunSummary, StreamInput, TrainingLoop
from continuity.metrics import ServiceMetrics, ServiceState
from continuity.prequential import PrequentialFigures
from continuity.serving import AcceptedModel, Predictor, Publisher

if TYPE_CHECKING:
    from continuity.http import ServiceHTTP

log = logging.getLogger(__name__)


def build_learner(config: Config):
    from continuity.factory import learner_from_config

    return learner_from_config(config)


def build_stream(config: Config, *, recording: Path | None = None, idle_timeout_s: float | None = None) -> StreamInput:
    """The StreamInput a config describes; `recording` reads a recorded file instead of Kafka."""
    from continuity.factory import feature_spec
    from continuity.stream import (
        DeadLetterSink,
        FileSource,
        JsonLinesDeadLetters,
        KafkaDeadLetters,
        KafkaSource,
        ProcessShare,
    )
    from continuity.stream.decoder_process import decoding_codec

    # Labels as the task has them; the "fields" codec also takes the [stream.fields] spec.
    codec = decoding_codec(
        config.stream.codec, feature_spec(config), fields=config.stream.field_spec(), decoder=config.stream.decoder
    )
    Path(config.checkpoints.dir).mkdir(parents=True, exist_ok=True)
    dead_letters: DeadLetterSink
    if config.stream.dead_letters == "topic":
        settings = config.stream.kafka_settings()
        dead_letters = KafkaDeadLetters(settings.bootstrap, **settings.security)
    else:
        dead_letters = JsonLinesDeadLetters(config.dead_letter_file)
    quarantine = JsonLinesDeadLetters(config.quarantine_file, noun="quarantined record")
    if recording is not None:

        def open_file(positions):
            return FileSource(recording, start=positions)

        return StreamInput(
            open_source=open_file,
            codec=codec,
            dead_letters=dead_letters,
            quarantine=quarantine,
            idle_timeout_s=idle_timeout_s,
        )
    settings = config.stream.kafka_settings()
    assigned = config.stream.kafka_settings(group=None)  # re-reading a range must not join the group
    scale = config.scale
    if scale.num_processes > 1:
        # One of several processes: its share of the partitions, by assignment (stream/shares.py).
        share = ProcessShare(scale.process_id, scale.num_processes)

        def open_kafka(positions):
            return KafkaSource(assigned, start=positions, share=share)

    else:

        def open_kafka(positions):
            return KafkaSource(settings, start=positions)

    def open_range(positions):
        return KafkaSource(assigned, start=positions)

    return StreamInput(
        open_source=open_kafka,
        open_reader=open_range,
        codec=codec,
        dead_letters=dead_letters,
        quarantine=quarantine,
        idle_timeout_s=idle_timeout_s,
        flush_idle=True,
        judge_idle_s=3.0,
        live=True,
    )


def process_config(config: Config) -> Config:
    """The config of process `scale.process_id` of several: process i serves HTTP on `service.http_port
    + i` (0 stays 0: a free port), so processes sharing a host never collide; process 0 keeps
    `checkpoints.dir` (so a restart as one process resumes from it); process i > 0 keeps its store,
    dead letters and quarantine beside it, in `<dir>.process-<i>` (its store holds its ledger of
    decisions only)."""
    scale = config.scale
    if scale.process_id == 0:
        return config
    port = config.service.http_port
    service = dataclasses.replace(config.service, http_port=port + scale.process_id if port else 0)
    directory = f"{config.checkpoints.dir.rstrip('/')}.process-{scale.process_id}"
    return dataclasses.replace(
        config, service=service, checkpoints=dataclasses.replace(config.checkpoints, dir=directory)
    )


def process_zero_url(config: Config) -> str:
    """Where process 0 of several serves /status, /predict and the admin endpoints, as process i > 0
    names it in a refusal: process 0 listens on `service.http_port` of its own host."""
    port = config.service.http_port
    return f"process 0 of {config.scale.num_processes} serves it, on port {port or '(a free one)'} of its host"


def open_store(config: Config, *, command: str = "continuity serve"):
    """The service's checkpoint store, owned (locked) by this process; a garbled store.json is rebuilt.
    `command` is what another process refused the directory is told holds it.

    Another live process owning the directory is a UsageError naming it (pid, host).
    """
    from continuity.checkpoints import CheckpointStore, StoreAccessError, StoreLockedError

    try:
        store = CheckpointStore(config.checkpoints.dir, keep_last=config.checkpoints.keep_last, repair=True)
    except StoreAccessError as error:
        raise UsageError(f"{error.strerror} (checkpoints.dir)") from None
    except StoreLockedError as error:
        raise UsageError(
            f"{error}; stop it first, or give this service another checkpoints.dir "
            "(operator actions on a running service go through it: `continuity rollback --url ...`)"
        ) from None
    store.describe_owner(command=command)  # what a refused process names (not "cli.py")
    return store


class CheckpointClock:
    """When the newest good checkpoint was saved, followed from the progress reports, for its age on /metrics.

    A number newer than the last one reported was saved since that report: now is close
    enough (within `progress_every_s`). Any other (the restored one, a rollback's target)
    has its time read from the store, unless a save is being written: the store's reads
    wait for it, and the loop, whose thread this runs on, must not.
    """

    def __init__(self, store):
        self.store = store
        self.number: int | None = None
        self.saved_at: float | None = None  # Unix time; None while unknown

    def note(self, number: int | None) -> None:
        if number == self.number:
            return
        newer = self.number is not None and number is not None and number > self.number
        self.number, self.saved_at = number, None if number is None else time.time()
        if number is not None and not newer and not self.store.saving:
            try:
                self.saved_at = self.store.info(number).saved_at
            except Exception as error:  # noqa: BLE001 - a metric's timestamp must never stop training
                log.warning("cannot read when checkpoint %s was saved (%s); its age is unknown", number, error)
                self.saved_at = None


class Service:
    """One run of the loop with signals, a progress line, metrics and (optionally) HTTP endpoints.

    Implements the HTTP server's controller (status, ready, request_rollback,
    request_checkpoint); those are called from HTTP threads and hand work to the loop.
    """

    def __init__(
        self,
        config: Config,
        *,
        recording: Path | None = None,
        idle_timeout_s: float | None = None,
        max_seconds: float | None = None,
        max_examples: int | None = None,
        http: bool = True,
        progress=None,
        progress_every_s: float | None = None,
        start_fresh: bool = False,
    ):
        scale = config.scale
        self._refer_to = None  # process i > 0 of several: where /status, /predict and admin are served
        if scale.num_processes > 1:
            self._refer_to = process_zero_url(config) if scale.process_id else None
            config = process_config(config)
        self.config = config
        self.stop_event = threading.Event()
        labels = {"process": str(scale.process_id)} if scale.num_processes > 1 else None
        self.metrics = ServiceMetrics(self.metrics_state, labels=labels)
        self._deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self._progress_printer = progress
        self._last_progress: Progress | None = None
        # First: nothing else may touch a directory another process owns.
        self.store = open_store(config, command="continuity replay" if recording is not None else "continuity serve")
        self.checkpoint_clock = CheckpointClock(self.store)
        try:
            self._build(recording, idle_timeout_s, max_examples, http, progress_every_s, start_fresh)
        except BaseException:
            self.store.close()
            raise

    def _build(self, recording, idle_timeout_s, max_examples, http, progress_every_s, start_fresh) -> None:
        config = self.config
        self.learner = build_learner(config)
        self.stream = build_stream(config, recording=recording, idle_timeout_s=idle_timeout_s)
        self.predictor = Predictor(self.learner, max_rows=config.service.predict_max_rows)
        self.publisher: Publisher | None = None
        if config.publish.dir:
            from continuity.factory import service_model
            from continuity.serving import published_spec

            spec = published_spec(self.learner, model=service_model(config)[1], config_digest=config.digest())
            self.publisher = Publisher(config.publish.dir, spec)
        loop_class: Callable[..., TrainingLoop] = TrainingLoop
        if config.scale.num_processes > 1:  # one of several processes: the same loop, in lockstep rounds
            from continuity.lockstep import Lockstep, LockstepLoop
            from continuity.peerwatch import PeerWatch
            from continuity.stream import ProcessShare

            share = ProcessShare(config.scale.process_id, config.scale.num_processes)
            lockstep = Lockstep(self.learner, watch=PeerWatch(config.scale.peer_timeout_s))
            loop_class = functools.partial(LockstepLoop, lockstep=lockstep, share=share)
        self.loop = loop_class(
            self.stream,
            self.learner,
            self.store,
            probe=config.probe,
            guard=config.guard,
            seed=config.service.seed,
            stop=self._should_stop,
            on_progress=self._on_progress,
            progress_every_s=config.service.progress_every_s if progress_every_s is None else progress_every_s,
            max_examples=max_examples,
            checkpoint_every_s=config.checkpoints.every_seconds,
            max_unsaved_s=config.checkpoints.max_unsaved_seconds,
            start_fresh=start_fresh,
            digest=config.digest(),
            on_accepted=self._on_accepted,
        )
        self.http: ServiceHTTP | None = None
        if http:
            from continuity.http import ServiceHTTP

            self.http = ServiceHTTP(
                self,
                self.metrics,
                host=config.service.http_host,
                port=config.service.http_port,
                admin_token=config.service.admin_token,
                refer_to=self._refer_to,
            )

    # ---- running ---------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.stop_event.set()
        return self.stop_event.is_set()

    def run(self, announce=None) -> RunSummary:
        """Run until the stream ends, a stop signal, or the time limit; `announce(url)` once HTTP is up."""
        restore = self._install_signal_handlers()
        try:
            if self.http is not None:
                try:
                    self.http.start()
                except OSError as error:  # the port taken, the host unknown: what the config said
                    raise UsageError(
                        f"{error.strerror} (service.http_host, service.http_port; port 0 picks a free one)"
                    ) from None
                self.store.describe_owner(url=self.http.url)  # so a refused `continuity rollback --dir` can say where
                log.info("HTTP on %s", self.http.url)
                if announce is not None:
                    announce(self.http.url)
            return self.loop.run()
        finally:
            if self.http is not None:
                self.http.stop()
            if self.publisher is not None:
                self.publisher.close()  # the last accepted model is published before the run returns
            self.stream.codec.close()  # a decoder process ends with the run
            self.store.close()
            restore()

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum, _frame):
            if self.stop_event.is_set():
                raise SystemExit(128 + signum)  # a second signal: stop now
            print(
                f"continuity: {signal.Signals(signum).name}: finishing the batch, judging and checkpointing",
                file=sys.stderr,
                flush=True,
            )
            self.stop_event.set()

        for sig in previous:
            signal.signal(sig, on_signal)

        def restore():
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _on_accepted(self, model: AcceptedModel) -> None:
        self.predictor.accept(model)
        if self.publisher is not None:
            self.publisher.submit(model)

    def _on_progress(self, progress: Progress) -> None:
        self._last_progress = progress
        self.checkpoint_clock.note(progress.checkpoint)
        lag = self.lag(progress)
        self.metrics.observe(progress, lag)
        if self._progress_printer is not None:
            self._progress_printer(progress, sum(lag.values()) if lag else None)

    def metrics_state(self) -> ServiceState:
        """What /metrics reads live besides the loop's snapshot (called from HTTP threads)."""
        reader = self.loop.reader
        return ServiceState(
            ready=self.ready(),
            stream_reading=reader is not None and reader.source.state_note() is None,
            checkpoint_saved_at=self.checkpoint_clock.saved_at,
        )

    def lag(self, progress: Progress) -> dict[str, int]:
        """Records between the newest good checkpoint and each partition's end (Kafka only)."""
        reader = self.loop.reader
        highwater = getattr(reader.source, "highwater", None) if reader is not None else None
        if highwater is None:
            return {}
        return {
            f"{key.topic}/{key.partition}": max(0, mark - (progress.positions.offset(key.topic, key.partition) or 0))
            for key, mark in highwater().items()
        }

    # ---- the HTTP controller ---------------------------------------------------------------

    def status(self) -> dict:
        progress = self._last_progress
        summary = self.loop.summary
        return {
            "ready": self.ready(),
            "checkpoint": self.loop.good_number,
            "examples_trained": summary.examples_trained,
            "windows": summary.windows,
            "rollbacks": summary.rollbacks,
            "regressions_in_a_row": None if progress is None else progress.regressions_in_a_row,
            "quarantined_records": summary.quarantined_records,
            "dead_letters": self.stream.dead_letters.total,
            "checkpoint_failures": summary.checkpoint_failures,
            "probe_accuracy": None if progress is None else progress.probe_accuracy,
            "probe_segments": {} if progress is None else progress.probe_segments,
            # Test-then-train figures of the lineage: {figure, total, window, examples, window_size, segments}.
            "prequential": None if progress is None or progress.prequential is None else progress.prequential.to_json(),
            "ewc_lambda": None if progress is None else progress.ewc_strength,
            "examples_per_second": None if progress is None else progress.examples_per_second,
            "train_loss": None if progress is None else progress.train_loss,
            "grad_norm": None if progress is None else progress.grad_norm,
            "replay_share": None if progress is None else progress.replay_share,
            "skipped_updates": 0 if progress is None else progress.skipped_updates,
            "positions": None if progress is None else progress.positions.to_json(),
            "stream": self.stream_note() or "reading",
            "lost_positions": list(summary.lost_positions),
            "stopping": self.stop_event.is_set(),
        }

    def stream_note(self) -> str | None:
        """What keeps the source from reading now ("broker unreachable for 42 s"); None while it reads."""
        reader = self.loop.reader
        return None if reader is None else reader.source.state_note()

    def ready(self) -> bool:
        """Restored, reading, not stopping, and the source can read (Kafka: broker reachable, partitions assigned)."""
        reader = self.loop.reader
        return self.loop.ready.is_set() and not self.stop_event.is_set() and reader is not None and reader.source.ready

    def request_rollback(self, to: int | None, reason: str) -> dict:
        from continuity.checkpoints import CheckpointNotFoundError

        try:
            return self.loop.request("rollback", to=to, reason=reason)
        except CheckpointNotFoundError as error:
            raise LookupError(str(error)) from None

    def request_checkpoint(self) -> dict:
        return self.loop.request("checkpoint")

    def predict(self, body) -> dict:
        return self.predictor.predict(body)

    def request_pin(self, checkpoint: int, pinned: bool) -> dict:
        from continuity.checkpoints import CheckpointNotFoundError

        try:
            return self.loop.request("pin" if pinned else "unpin", checkpoint=checkpoint)
        except CheckpointNotFoundError as error:
            raise LookupError(str(error)) from None


def format_progress(progress: Progress, lag: int | None) -> str:
    """The one-line progress report of `serve`."""

    def fmt(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    # What keeps the stream from being read ("broker unreachable for 42 s") stands where the lag would.
    stream = progress.stream_note or f"lag {fmt(lag, '{:,}')}"
    return (
        f"{progress.examples_trained:>9,} examples  {progress.examples_per_second:>7,.0f}/s  "
        f"{stream}  {_probe_figure(progress.probe_accuracy, progress.probe_loss)}  "
        f"{_prequential_figure(progress.prequential)}  "
        f"train loss {fmt(progress.train_loss, '{:.3g}')}  grad {fmt(progress.grad_norm, '{:.3g}')}  "
        f"replay {fmt(progress.replay_share, '{:.0%}')}  "
        + (f"skipped {progress.skipped_updates}  " if progress.skipped_updates else "")
        + f"lambda {fmt(progress.ewc_strength, '{:.3g}')}  rollbacks {progress.rollbacks}  "
        f"quarantined {progress.quarantined_records}  dead letters {progress.dead_letters}  "
        f"checkpoint {fmt(progress.checkpoint, '{}')}"
    )


def _probe_figure(accuracy: float | None, loss: float | None) -> str:
    """ "probe 0.912" for a task judged on accuracy, "probe loss 0.0412" for one judged on losses."""
    if accuracy is None and loss is not None:
        return f"probe loss {loss:.4g}"
    return f"probe {'n/a' if accuracy is None else f'{accuracy:.3f}'}"


def _prequential_figure(figures: PrequentialFigures | None) -> str:
    """ "prequential 0.913 (last 1,000: 0.941)"; "prequential loss 0.0412 (...)" for a task judged on losses."""
    if figures is None or figures.total is None:
        return "prequential n/a"
    pattern = "{:.3f}" if figures.figure == "accuracy" else "{:.4g}"
    name = "prequential" if figures.figure == "accuracy" else f"prequential {figures.figure}"
    window = "n/a" if figures.window is None else pattern.format(figures.window)
    return f"{name} {pattern.format(figures.total)} (last {figures.window_size:,}: {window})"


def describe_lost(lost: dict) -> str:
    """A RunSummary.lost_positions entry as LostPosition.describe() says it."""
    from continuity.stream import LostPosition

    return LostPosition(**{k: v for k, v in lost.items() if k != "action"}).describe()


def format_summary(summary: RunSummary) -> str:
    rows = [
        ("examples trained", f"{summary.examples_trained:,}"),
        ("windows judged", f"{summary.windows} ({summary.accepted} accepted)"),
        ("rollbacks", f"{summary.rollbacks} ({summary.retries} retried)"),
        ("quarantined records", f"{summary.quarantined_records:,}"),
        ("dead letters", f"{summary.dead_letters:,}"),
        ("non-finite rows (masked)", f"{summary.nonfinite_rows:,}"),
        ("skipped updates (non-finite)", f"{summary.skipped_updates:,}"),
        ("last good checkpoint", str(summary.last_checkpoint)),
        ("positions", ", ".join(f"{k}@{v}" for k, v in summary.positions.items()) or "-"),
        ("probe accuracy", "n/a" if summary.probe_accuracy is None else f"{summary.probe_accuracy:.3f}")
        if summary.probe_loss is None
        else ("probe loss", f"{summary.probe_loss:.4g}"),
        (
            "prequential accuracy",
            "n/a" if summary.prequential_accuracy is None else f"{summary.prequential_accuracy:.3f}",
        )
        if summary.prequential_loss is None
        else ("prequential loss", f"{summary.prequential_loss:.4g}"),
        ("EWC lambda", "n/a" if summary.ewc_strength is None else f"{summary.ewc_strength:.3g}"),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
    ]
    if summary.checkpoint_failures:
        rows.append(("checkpoint failures", f"{summary.checkpoint_failures:,} (saves that failed and were retried)"))
    if summary.halted:
        rows.append(("halted", "yes: a regression with on_regression = 'halt'"))
    for lost in summary.lost_positions:
        rows.append(("lost position", f"{describe_lost(lost)} [{lost['action']}]"))
    if summary.stopped_on_lost_positions:
        rows.append(("halted", "yes: saved positions the broker no longer has (stream.on_lost_positions = 'halt')"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
