"""The service's one TOML config file: typed, validated on load, overridable with `--set`.

A config file has ten sections: [stream], [model], [learner], [replay], [ewc], [probe],
[checkpoints], [service], [publish], [scale]. [model] [learner] [replay] [ewc] fill the learner
library's `LearnerConfig` (learner/config.py); [probe] fills both `ProbeConfig` (what is
held out) and `GuardConfig` (how candidates are judged): for a user they are one thing,
the continuity probe. Every section is a pydantic dataclass (learner/schema.py): each
field's type, bounds, default and description are declared once, and the loader,
`continuity config example` and the README's reference (`make config-reference`) are
made from them.

Loading is strict, because a typo that is silently ignored is a service that runs with a
setting nobody chose: an unknown section or key, a value of the wrong type, a value out
of range, settings that contradict each other (a CNN over flat features, a regression
with classes), a bad TOML file or a missing one is a `ConfigError` whose one-line message
names the key, what was expected and what was received. The CLI prints it alone and
exits with status 2. What only the model's code can tell (does an import path resolve,
does optax have that optimizer) is checked by the application (`factory.check`), since
this module imports no JAX.

Secrets (Kafka SASL/SSL passwords, the admin token) come from the environment only:
`<name>_env = "VAR"` in the file means "read <name> from environment variable VAR". A
secret given as a value, in the file (readable by whoever reads the file) or by `--set`
(visible in the process list), is a ConfigError naming the `_env` form. A secret's value
never appears in an error message, a repr or `Config.to_toml()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from continuity.errors import UsageError
from continuity.learner.config import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig
from continuity.learner.schema import (
    SECTION_CONFIG,
    Bool,
    ConfigProblem,
    Count,
    Finite,
    Float,
    Int,
    OptionalStr,
    PositiveInts,
    Str,
    describe,
    fields,
    is_secret,
    key_text,
    received,
    section,
    suggest,
)
from continuity.stream.codecs import DTYPE_CODES, FeatureSpec, FieldSpec
from continuity.stream.decoder_process import Decoder
from continuity.stream.kafka import (
    KAFKA_SESSION_TIMEOUT_MS,
    SECURITY_OPTIONS,
    KafkaSettings,
    redact,
    topic_name_problem,
)

if TYPE_CHECKING:
    from continuity.detectors import WindowCheckConfig

SOURCES = ("kafka", "file")
DEAD_LETTER_SINKS = ("file", "topic")
OFFSET_RESETS = ("earliest", "latest")
WIRE_DTYPES = tuple(DTYPE_CODES.values())
INPUT_DTYPES = ("float32", "int32")
ON_REGRESSION = ("retry", "quarantine", "halt")
ENV_SUFFIX = "_env"  # `<name>_env = "VAR"`: the value of <name> is read from environment variable VAR

# Security options that are Python objects (an SSLContext, a token provider): a text file cannot give them.
_OBJECT_SECURITY_OPTIONS = frozenset({"ssl_context", "sasl_oauth_token_provider"})
_BOOL_SECURITY_OPTIONS = frozenset({"ssl_check_hostname"})
# Which security options are secrets: exactly those stream.kafka redacts in its own logs.
SECRET_SECURITY_OPTIONS = frozenset(k for k in SECURITY_OPTIONS if redact({k: ""})[k] == "***")
REDACTED = "***"
_SECRET: Any = {"secret": True}  # Field(json_schema_extra=...): a value never shown


class ConfigError(UsageError):
    """The config file or a `--set` override is invalid; the one-line message names the key."""


class _Keep(enum.Enum):
    """A sentinel of its own type, so `group: str | None` can still say "not given"."""

    GROUP = enum.auto()  # kafka_settings(group=...) not given: use StreamConfig.group


MAX_CONFIG_BYTES = 1 << 20  # a config holding more is not one a person wrote: refused before it is read


def checked_bootstrap(value):
    """`bootstrap` as given: "host:port", or several joined by commas (what kafka-python takes).
    Also the `--bootstrap` arguments' check (commands.arguments.bootstrap)."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if all(_is_host_port(part) for part in parts):
            return value
    raise ValueError(f'must be "host:port", or several joined by commas (e.g. "10.0.0.1:9092"). Got {value!r}.')


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host.strip() and port.isdigit() and 0 < int(port) < 65536)


def _one_topic(value):
    return (value,) if isinstance(value, str) else value  # `--set stream.topics=digits` means one topic


def _no_group(value):
    return None if value == "" else value


@section("stream.inputs")
class InputSpec:
    """One named feature of an example: its shape and dtype (integer features stay integers)."""

    shape: PositiveInts = Field(min_length=1, max_length=8, description="the feature's shape (1 to 8 positive sizes)")
    dtype: Literal["float32", "int32"] = Field(default="float32", description='"float32" or "int32" (token ids)')


@section("stream")
class StreamConfig:
    """Where records come from and what a valid example looks like.

    `dead_letter_path` and `quarantine_path` are relative to the checkpoint directory
    (see `Config.dead_letter_file`), so one run's artefacts stay together.
    """

    source: Literal["kafka", "file"] = Field(
        default="kafka", description='"kafka", or "file" for a recorded Parquet stream (`continuity replay FILE`)'
    )
    bootstrap: Annotated[Str, BeforeValidator(checked_bootstrap)] = Field(
        default="127.0.0.1:9092",
        description="host:port[,host:port]; `continuity broker --port 9092` runs the embedded broker",
    )
    topics: Annotated[tuple[Str, ...], BeforeValidator(_one_topic)] = Field(
        default=("digits",),
        min_length=1,
        description="`continuity produce --bootstrap 127.0.0.1:9092 --topic digits --scenario permuted-digits`",
    )
    group: Annotated[Str | None, BeforeValidator(_no_group)] = Field(
        default="continuity",
        description='consumer group: offsets are committed after each checkpoint; "" = no group, read every partition',
    )
    codec: Literal["binary", "json", "fields"] = Field(
        default="binary",
        description='"binary", "json" or "fields" (named-field events, [stream.fields]; wire formats: see README)',
    )
    # stream/decoder_process.py: JSON parsing in the ingest thread shares the interpreter lock
    # with kafka-python's record parsing; a process of its own runs beside it.
    decoder: Decoder = Field(
        default="auto",
        description='where records are decoded: "thread" (the ingest thread), "process" (a child process, off the '
        'consumer\'s interpreter lock) or "auto" (a process for "json" and "fields" given 2+ cores, else the thread)',
    )
    feature_shape: PositiveInts = Field(
        default=(8, 8, 1), min_length=1, max_length=8, description="one example's features"
    )
    dtype: Literal["float32", "float16", "float64", "uint8"] = Field(
        default="float32", description="wire dtype of the features: " + ", ".join(f'"{d}"' for d in WIRE_DTYPES)
    )
    num_classes: Annotated[Int | None, BeforeValidator(_no_group)] = Field(
        default=10,
        ge=1,
        description='classification: labels are integers in [0, num_classes); left out for "regression", "multilabel"',
    )
    num_labels: Annotated[Int | None, BeforeValidator(_no_group)] = Field(
        default=None, ge=1, description='learner.task = "multilabel": labels per example (multi-hot)', examples=[5]
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description='where a partition without a checkpointed position starts: "earliest" or "latest"',
    )
    # A checkpointed position the broker no longer has (topic recreated, log lost or truncated):
    # "halt" (exit status 4, an operator decides), "earliest" or "latest" (see README).
    on_lost_positions: Literal["halt", "earliest", "latest"] = Field(
        default="halt",
        description="a checkpointed position the broker no longer has (topic recreated, log lost): "
        '"halt" (exit 4, an operator decides), "earliest" (records may be trained twice) or "latest" (records in '
        "between are never trained)",
    )
    # Kafka's own default. The embedded broker holds a group join for about half of it, so the
    # demo and the tests use its short one (stream.broker.SHORT_SESSION_TIMEOUT_MS).
    session_timeout_ms: Int = Field(
        default=KAFKA_SESSION_TIMEOUT_MS,
        ge=1000,
        description="Kafka's default; the embedded broker holds a group join ~half of it: use 6000 there",
    )
    dead_letters: Literal["file", "topic"] = Field(
        default="file", description='undecodable records go to "file" (dead_letter_path) or "topic" (<topic>.dlq)'
    )
    dead_letter_path: Str = Field(
        default="dead-letters.jsonl",
        min_length=1,
        description="JSON lines; a relative path is relative to checkpoints.dir",
    )
    quarantine_path: Str = Field(
        default="quarantine.jsonl",
        min_length=1,
        description="records of quarantined windows, JSON lines; relative to checkpoints.dir",
    )
    inputs: dict[str, InputSpec] = Field(
        default_factory=dict,
        description="named features of an example, instead of one feature_shape array (needs model.factory)",
        examples=[{"tokens": {"shape": [32], "dtype": "int32"}, "numeric": {"shape": [8], "dtype": "float32"}}],
    )
    # Checked and normalised by its own module (continuity/stream/fields.py), which also encodes
    # the events; {}: none.
    fields: dict[str, Any] = Field(
        default_factory=dict,
        description='named-field JSON events (codec = "fields"): which fields become which model inputs '
        '(README, "Named-field events"); `continuity inspect` drafts one from a topic',
        examples=[
            {
                "label": "clicked",
                "label_classes": ["no", "yes"],
                "standardize_every": 512,
                "amount": {"kind": "numeric", "standardize": True, "default": 0.0},
                "device": {"kind": "categorical", "vocabulary": ["ios", "android", "web"], "encoding": "one_hot"},
                "city": {"kind": "categorical", "buckets": 1024},
                "tags": {"kind": "tokens", "length": 16, "buckets": 4096, "optional": True},
            }
        ],
    )
    # kafka-python SASL/SSL options; may hold secrets (never in a repr).
    security: dict[str, Str | Bool] = Field(
        default_factory=dict, repr=False, description="kafka-python SASL/SSL options"
    )

    def __post_init__(self):
        unknown = sorted(set(self.security) - SECURITY_OPTIONS)
        if unknown:
            raise ConfigProblem(f"has unknown option(s) {unknown}; allowed: {sorted(SECURITY_OPTIONS)}.", "security")
        # These fields' checks the loader runs with the file's names (topics, bootstrap).
        if not all(self.topics):
            raise ConfigProblem(f"must be a non-empty list of topic names. Got {list(self.topics)!r}.", "topics")
        for name in self.topics:
            if topic_name_problem(name) is not None:
                raise ConfigProblem(f"must hold Kafka topic names. {topic_name_problem(name)}.", "topics")
        if self.fields:
            from continuity.stream.fields import FieldSpec as EventSpec  # numpy only: no JAX here

            try:
                normalised = EventSpec.from_dict(self.fields).to_dict()
            except ValueError as error:
                raise ConfigProblem(" ".join(str(error).split()), "fields") from None
            object.__setattr__(self, "fields", normalised)
        if (self.codec == "fields") != bool(self.fields):
            raise ConfigProblem(
                'must be "fields" when a [stream.fields] table describes the events, and only then. '
                f"Got {self.codec!r} with {'a' if self.fields else 'no'} [stream.fields] table.",
                "codec",
            )
        events = self.field_spec()
        if events is not None and events.label_classes is not None and self.num_classes != len(events.label_classes):
            raise ConfigProblem(
                f"must be {len(events.label_classes)}, the labels [stream.fields] label_classes lists. "
                f"Got {self.num_classes!r}.",
                "num_classes",
            )

    def field_spec(self):
        """The stream.fields.FieldSpec of [stream.fields] (codec "fields"), or None without one."""
        from continuity.stream.fields import FieldSpec as EventSpec

        return EventSpec.from_dict(self.fields) if self.fields else None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "security"
        )
        return f"StreamConfig({shown}, security={redact(self.security)!r})"

    def input_fields(self) -> tuple[FieldSpec, ...]:
        """The named inputs as the codecs take them (empty: one array of feature_shape)."""
        return tuple(FieldSpec(name, tuple(spec.shape), spec.dtype) for name, spec in self.inputs.items())

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(
            shape=self.feature_shape, dtype=self.dtype, num_classes=self.num_classes, inputs=self.input_fields()
        )

    def kafka_settings(self, *, group: str | Literal[_Keep.GROUP] | None = _Keep.GROUP) -> KafkaSettings:
        """The stream.kafka.KafkaSettings for these options; `group` overrides `self.group` (None: no group)."""
        group_id = self.group if group is _Keep.GROUP else (group or None)
        return KafkaSettings(
            bootstrap=self.bootstrap,
            topics=self.topics,
            group_id=group_id,
            auto_offset_reset=self.auto_offset_reset,
            on_lost_positions=self.on_lost_positions,
            session_timeout_ms=self.session_timeout_ms,
            # Kafka wants heartbeats well inside the session timeout; a sixth gives 1 s at the
            # short 6 s timeout the embedded broker needs, and Kafka's usual 3 s at 18 s and above.
            heartbeat_interval_ms=max(100, min(3000, self.session_timeout_ms // 6)),
            security=dict(self.security),
        )


@section("probe")
class ProbeConfig:
    """How much of the stream is held out and how much of it is kept."""

    holdout_fraction: Float = Field(
        default=0.1,  # ~140 probe examples per digits segment: enough for the paired test
        gt=0,
        lt=1,
        description="share of the stream held out for the probe (chosen by hashing the record key)",
    )
    per_segment: Count = Field(default=200, ge=1, description="probe examples kept per segment (reservoir)")
    max_segments: Count = Field(default=64, ge=1, description="beyond this the oldest segment is dropped")
    # At the default holdout (10%) and cadence (probe.every_examples 50,000) that is one segment
    # per judged window, so the probe reaches back 64 windows and the reference models meet few
    # rows they have not seen.
    window_examples: Int = Field(
        default=5_000,
        ge=1,
        description="records without a segment: held-out examples per window segment (5,000: one per default window)",
    )
    golden: OptionalStr = Field(
        default=None, description="optional .npz with arrays x, y: a fixed probe segment", examples=["golden-probe.npz"]
    )
    # Reporting only: it decides no model, so it is left out of the config digest.
    prequential_window: Count = Field(
        default=1_000,
        ge=1,
        description="prequential (test-then-train) accuracy: also shown over the last this many trained examples",
    )


@section("probe")
class GuardConfig:
    """When candidates are judged, how strictly, and what happens to a regression."""

    # A judgement (the candidate on the whole probe, up to 64 x 200 examples, plus a Fisher
    # refresh) costs about as much as training 600-1,700 examples (MLPs to the CNN):
    # judging every 50,000 keeps the guard under 3% of wall time (BENCHMARKS.md, "Guard
    # costs"). Smaller windows catch damage sooner and quarantine less with it, at that
    # price: the digits scenarios, whose segments last ~1,400 examples, use 1,000.
    every_examples: Int = Field(
        default=50_000,
        ge=1,
        description="trained examples per window (judged, EWC consolidated on accept); "
        "judging costs what training 600-1,700 examples does",
    )
    # Recorded streams (replay) close windows by count only, so the same records always make
    # the same windows.
    every_seconds: Annotated[Float, Finite()] = Field(
        default=60.0,
        ge=0,
        description="serve: a window also closes after this long, so a slow stream is judged "
        "regularly (replay: by count only); 0 = by count only",
    )
    # The accuracy a scope (overall, a segment) may lose in a window: drift's price. Tested, not
    # compared: Tango's test rejects "lost at most this much" (BENCHMARKS.md, "Guard": clean
    # streams' worst drops 0.26-0.30 pass, a broken labeler's 0.44-0.85 do not).
    tolerance: Float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="accuracy drop (overall or one segment) a regression must exceed: Tango's test at alpha",
    )
    # candidate mean > good mean * (1 + loss_tolerance)
    loss_tolerance: Annotated[Float, Finite()] = Field(
        default=0.2,
        ge=0,
        description="tasks judged on losses (regression, multilabel): relative rise of the mean probe loss "
        "that may count as a regression (0.2 = +20%)",
    )
    # Half to the probe's paired tests (Bonferroni-corrected over scopes), half to the window
    # checks (corrected over their tests); tasks judged on losses give all of it to the probe.
    alpha: Float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="false alarms per window: half to the probe's paired tests (Tango; Wilcoxon on losses), "
        "half to window checks",
    )
    # quarantine, not retry, by default: a retry with boosted lambda hides each poisoned window's
    # damage just under the tolerance, and the damage compounds window after window (measured).
    on_regression: Literal["retry", "quarantine", "halt"] = Field(
        default="quarantine",
        description='"quarantine" (the damaged span; the rest is trained again), "retry" (stronger lambda) or "halt"',
    )
    max_retries: Int = Field(default=2, ge=0, description="retries of a window before it is quarantined")
    min_examples: Int = Field(default=20, description="probe examples a segment needs before it is tested")
    # Damage that seeps in a little per window (each step under the tolerance) adds up and is caught.
    anchor_windows: Int = Field(
        default=3,
        ge=0,
        description="also judge against the good model of up to this many windows ago (catches slow seepage); 0 = off",
    )
    enabled: Bool = Field(
        default=True, description="false: accept every candidate (to measure what the guard prevents)"
    )
    # The window checks (continuity.detectors): rows of each window sampled and tested for damage
    # against accepted windows.
    window_sample: Count = Field(
        default=512, ge=0, description="rows of each window the window checks test (damage in the data itself); 0 = off"
    )
    # Measured: clean windows rise at most ~0.2, damaged blocks 0.5-0.9.
    window_tolerance: Float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="rise over accepted windows' share of contradicted, unlearned, out-of-scale, repeated or "
        "same-label rows that counts as damage",
    )
    confidence: Float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="the last good model's probability for its prediction that makes a row known to it",
    )
    golden_tolerance: Float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="the golden segment is a hard constraint: never this far below its best accuracy",
    )
    sustained_windows: Int = Field(
        default=3, ge=1, description="windows regressed in a row that make a sustained regression"
    )
    on_sustained_regression: Literal["quarantine", "accept", "halt"] = Field(
        default="quarantine",
        description='"quarantine" on (and warn), "accept" as a new baseline (never past golden) or "halt"',
    )

    @property
    def window_checks(self) -> WindowCheckConfig:
        """The window checks' settings; they test at half of `alpha`, the probe at the other half."""
        from continuity.detectors import WindowCheckConfig  # numpy and scipy only: no JAX in the config

        return WindowCheckConfig(
            tolerance=self.window_tolerance,
            confidence=self.confidence,
            alpha=self.alpha / 2,
            min_rows=self.min_examples,
            # Half a window, and never under 500 rows: a clean window of 500 on a live stream (the
            # broker-outage test) was judged unlearned at a horizon of 250 before its new permutation was learned.
            horizon=max(500, self.every_examples // 2),
        )


@section("checkpoints")
class CheckpointsConfig:
    """Where checkpoints (and the ledger inside the store) live, and how many ordinary ones are kept."""

    dir: Str = Field(default="runs/continuity", min_length=1, description="checkpoint store directory")
    keep_last: Int = Field(default=3, ge=1, description="ordinary checkpoints kept (pinned ones are kept too)")
    # Every window is judged; this only bounds how much a crash re-trains. Saving every
    # window of a fast stream would spend the service's time writing checkpoints.
    every_seconds: Float = Field(
        default=10.0,
        ge=0,
        description="at most one checkpoint per this many seconds (every window is still judged); "
        "0 = every accepted window",
    )
    # A failing save (a full disk) never stops training; this bounds how long the service
    # trains on without a checkpoint before it stops (exit status 5) for an operator.
    max_unsaved_seconds: Float = Field(
        default=3600.0,
        ge=0,
        description="saves failing this long in a row (a full disk): stop with exit status 5; 0 = never",
    )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@section("service")
class ServiceConfig:
    """The running service: HTTP endpoints, progress reports, shutdown, seed."""

    http_host: Str = Field(
        default="127.0.0.1", min_length=1, description="a non-loopback address requires an admin token"
    )
    http_port: Int = Field(default=8080, ge=0, le=65535, description="0 = pick a free port")
    admin_token: Annotated[Str | None, BeforeValidator(_no_group)] = Field(
        default=None,
        repr=False,
        description='bearer token for POST /admin/*; give it as admin_token_env = "VAR"',
        json_schema_extra=_SECRET,
    )
    progress_every_s: Float = Field(default=5.0, gt=0, description="seconds between one-line progress reports")
    shutdown_timeout_s: Float = Field(
        default=10.0, gt=0, description="SIGTERM/SIGINT: finish, check, checkpoint and exit within this"
    )
    seed: Int = Field(
        default=0,
        ge=0,
        lt=2**32,
        description="model init and probe selection; same records + config + seed = same checkpoints",
    )
    predict_max_rows: Count = Field(default=256, ge=1, description="rows (instances) one POST /predict may carry")

    def __post_init__(self):
        # The admin endpoints roll the model back: anyone who can reach them controls the service.
        if self.admin_token is None and not is_loopback(self.http_host):
            raise ConfigProblem(
                f"refusing to expose admin endpoints on {self.http_host} without service.admin_token "
                '(set admin_token_env = "VAR" in [service], or bind 127.0.0.1).',
                "http_host",
            )


def _device_count(value):
    """`devices` as given: "all", or a count >= 1 (a clear error for anything else)."""
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f'must be "all" or an integer >= 1. Got {value!r}.')


def _host_port(value):
    """`coordinator` as given: "host:port" with a port number, or none."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and _is_host_port(value):
        return value
    raise ValueError(f'must be "host:port" (process 0\'s address, e.g. "10.0.0.1:1234"). Got {value!r}.')


# Where the processes' keys come from when the file leaves them out: the coordinator's is the
# variable jax.distributed.initialize reads itself; the others follow its naming.
SCALE_ENVIRONMENT = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def sharded_replay_problem(learner: LearnerConfig, layout: str, devices: int) -> ConfigProblem | None:
    """A replay buffer split over `devices` devices ([scale] replay = "sharded") needs its capacity and
    its per-step draw to divide by them: each device holds and replays an equal share."""
    replay = learner.replay
    if layout != "sharded" or devices == 1 or not replay.enabled:
        return None
    for key, value, what in (("capacity", replay.capacity, "examples"), ("batch_size", replay.batch_size, "rows")):
        if value % devices:
            return ConfigProblem(
                f'must divide by the {devices} devices with scale.replay_layout = "sharded" (each holds and replays '
                f"{key} / devices {what}). Got {value}.",
                f"learner.replay.{key}",
            )
    return None


@section("scale")
class ScaleConfig:
    """How many devices and processes train the one model (data-parallel: each step's batch split over them)."""

    # learner/devices.py: the batch's rows are split over a mesh of the devices, the state
    # (parameters, optimizer, EWC) is replicated, and XLA sums the gradient.
    devices: Annotated[Literal["all"] | Int, BeforeValidator(_device_count)] = Field(
        default="all",
        description='local devices to train over: "all", or a count (learner.batch_size must divide by it)',
    )
    # replay/sharded.py. "replicated": every device holds the whole buffer and the fresh rows are
    # gathered into every copy, so N devices train the same model as one. "sharded": each device
    # holds capacity / devices examples, inserts its own rows and replays its share from them (no
    # collective, 1/N of the memory), but replays other rows than one device would. One device:
    # no difference. Default replicated: the cost it saves was within noise here (BENCHMARKS.md).
    replay_layout: Literal["replicated", "sharded"] = Field(
        default="replicated",
        description='"replicated" (every device holds all of replay.capacity) or "sharded" (capacity / devices each)',
    )
    # Several processes (hosts) start jax.distributed with these before the learner is built;
    # the mesh then spans every process's devices (README, "Scaling out").
    coordinator: Annotated[Str | None, BeforeValidator(_host_port)] = Field(
        default=None,
        description="process 0's host:port for jax.distributed (or $JAX_COORDINATOR_ADDRESS); none = one process",
        examples=["10.0.0.1:1234"],
    )
    num_processes: Int = Field(default=1, ge=1, description="processes training the one model (or $JAX_NUM_PROCESSES)")
    process_id: Int = Field(
        default=0, ge=0, description="this process, 0 .. num_processes - 1 (or serve --process-id, $JAX_PROCESS_ID)"
    )
    # continuity/peerwatch.py: a peer alive but stuck (a hung disk; its heartbeats still come)
    # would hold the others at their next collective for ever. Must exceed the slowest checkpoint
    # save or restore, which the others wait out at their next collective too.
    peer_timeout_s: Annotated[Float, Finite()] = Field(
        default=600.0,
        gt=0,
        description="several processes: how long one waits at a collective for a peer that does not come, "
        "then exits 6 naming it",
    )

    def __post_init__(self):
        if self.process_id >= self.num_processes:
            raise ConfigProblem(
                f"must be below num_processes = {self.num_processes} (processes count from 0). Got {self.process_id}.",
                "process_id",
            )
        if self.num_processes > 1 and self.coordinator is None:
            raise ConfigProblem(
                f"is required when num_processes > 1 (process 0's host:port, every process the same). "
                f"Got none, with num_processes = {self.num_processes}.",
                "coordinator",
            )


@section("publish")
class PublishConfig:
    """Where each accepted model is published for a separate serving process."""

    dir: Str = Field(default="", description='directory of published models (a "latest" pointer moves last); "" = off')


# Where the service's defaults differ from the learner library's neutral ones (which leave
# replay and EWC off): the settings the guard was measured with (BENCHMARKS.md, "Guard").
SERVICE_DEFAULTS: dict[tuple[str, str], Any] = {
    ("replay", "capacity"): 1000,
    ("replay", "batch_size"): 32,
    ("ewc", "enabled"): True,
    ("ewc", "strength"): 100.0,
    ("ewc", "strength_min"): 10.0,
}


def _service_learner() -> LearnerConfig:
    table = {section: {k: v for (s, k), v in SERVICE_DEFAULTS.items() if s == section} for section in ("replay", "ewc")}
    return LearnerConfig(replay=ReplayConfig(**table["replay"]), ewc=EWCConfig(**table["ewc"]))


# Which labels each task reads from [stream]: the key it needs, and the label keys it must not have.
TASK_LABELS = {"classification": "num_classes", "regression": None, "multilabel": "num_labels"}
_LABEL_KEYS = ("num_classes", "num_labels")


def labels_problem(task: str, num_classes: int | None, num_labels: int | None) -> ConfigProblem | None:
    """What is wrong with the stream's label keys for `learner.task`, naming the [stream] key; None: nothing."""
    needed = TASK_LABELS[task]
    given = {"num_classes": num_classes, "num_labels": num_labels}
    for key in _LABEL_KEYS:
        if key != needed and given[key] is not None:
            what = "float targets" if task == "regression" else "multi-hot vectors of num_labels"
            if key == "num_labels":
                what = "not multi-hot vectors"
            return ConfigProblem(
                f'must be left out when learner.task is "{task}" (labels are {what}). Got {given[key]!r}.',
                f"stream.{key}",
            )
    if needed is not None and given[needed] is None:
        return ConfigProblem(f'is required when learner.task is "{task}". Got None.', f"stream.{needed}")
    if needed == "num_classes" and num_classes is not None and num_classes < 2:
        return ConfigProblem(f'must be >= 2 when learner.task is "{task}". Got {num_classes!r}.', "stream.num_classes")
    return None


def replay_problem(learner: LearnerConfig) -> ConfigProblem | None:
    """Class-balanced replay shares its memory out by class: only a task with classes has them."""
    replay = learner.replay
    if replay.enabled and replay.kind == "class_balanced" and TASK_LABELS[learner.task] != "num_classes":
        return ConfigProblem(
            f"{replay.kind!r} shares memory out by class, and learner.task {learner.task!r} has no classes: "
            f"use 'reservoir' or 'fifo'. Got {replay.kind!r}.",
            "learner.replay.kind",
        )
    return None


@dataclass(frozen=True, config=SECTION_CONFIG)
class Config:
    """The whole resolved configuration; `load_config` builds it, `Config()` is the defaults.

    Building one checks what no single section can: the stream's labels against the task,
    the model preset against the features, the replay policy against the task.
    """

    stream: StreamConfig = Field(default_factory=StreamConfig)
    learner: LearnerConfig = Field(default_factory=_service_learner)  # [model] [learner] [replay] [ewc]
    probe: ProbeConfig = Field(default_factory=ProbeConfig)  # [probe]: what is held out
    guard: GuardConfig = Field(default_factory=GuardConfig)  # [probe]: how candidates are judged
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    source_path: str | None = dataclasses.field(default=None, compare=False)  # the file it came from

    def __post_init__(self):
        stream, learner = self.stream, self.learner
        problem = labels_problem(learner.task, stream.num_classes, stream.num_labels) or replay_problem(learner)
        if problem is not None:
            raise problem
        model = learner.model
        if model.factory is None:
            if stream.codec == "fields" and model.kind != "mlp":
                raise ConfigProblem(
                    "named-field events (codec = \"fields\") need the 'mlp' preset, which embeds their ids, or "
                    f"model.factory. Got kind = {model.kind!r}.",
                    "learner.model.kind",
                )
            if stream.inputs:
                raise ConfigProblem(
                    f"the {model.kind!r} preset takes one feature array; named inputs ([stream.inputs]) need "
                    "model.factory. Got kind = " + repr(model.kind) + ".",
                    "learner.model.kind",
                )
            if model.kind == "cnn" and len(stream.feature_shape) != 3:
                raise ConfigProblem(
                    "'cnn' needs image-shaped features: stream.feature_shape = [height, width, channels]. "
                    f"Got feature_shape = {list(stream.feature_shape)}.",
                    "learner.model.kind",
                )
        devices, processes = self.scale.devices, self.scale.num_processes
        if learner.batch_size % processes:
            raise ConfigProblem(
                f"must divide by scale.num_processes = {processes} (each process feeds batch_size / processes "
                f"rows of every step). Got {learner.batch_size}.",
                "learner.batch_size",
            )
        if devices != "all" and learner.batch_size % devices:
            raise ConfigProblem(
                f"must divide by scale.devices = {devices} (each device trains batch_size / devices rows). "
                f"Got {learner.batch_size}.",
                "learner.batch_size",
            )
        if processes > 1 and self.scale.replay_layout == "sharded" and learner.replay.enabled:
            raise ConfigProblem(
                'is "sharded", which serve does not run over several processes yet (process 0 saves the model '
                'alone and cannot read the other processes\' shards): use "replicated" with scale.num_processes = '
                f"{processes}.",
                "scale.replay_layout",
            )
        if devices != "all":
            problem = sharded_replay_problem(learner, self.scale.replay_layout, devices * processes)
            if problem is not None:
                raise problem
        if stream.inputs and stream.codec == "binary":
            raise ConfigProblem(
                'named inputs need codec = "json" (the binary wire format carries one array). Got codec = "binary".',
                "stream.codec",
            )

    @property
    def model(self) -> ModelConfig:
        return self.learner.model

    def resolve(self, path: str | Path) -> Path:
        """A path from the config: relative ones are relative to the checkpoint directory."""
        return Path(self.checkpoints.dir) / Path(path)

    @property
    def dead_letter_file(self) -> Path:
        return self.resolve(self.stream.dead_letter_path)

    @property
    def quarantine_file(self) -> Path:
        return self.resolve(self.stream.quarantine_path)

    def to_dict(self, *, redact: bool = True) -> dict:
        """{section: {key: value}} as in the file (unset optional values None, empty tables left out,
        secrets '***' unless redact=False)."""
        return {name: _table(self, name, redact) for name in SECTIONS}

    def to_toml(self, *, redact: bool = True) -> str:
        """The resolved config as TOML that `load_config` reads back; secrets shown as '***'.

        A config with secrets reads back only once they are given as `<key>_env` again.
        """
        lines = []
        if self.source_path:
            lines.append(f"# resolved from {self.source_path}")
        lines.append(f"# digest {self.digest()}")
        for name, table in self.to_dict(redact=redact).items():
            lines += ["", *_toml_table([name], table)]
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        """A short digest of what decides the training result (16 hex digits).

        Paths, addresses, ports, timeouts and secrets are left out, so replaying the same
        stream into another directory, or serving it from another broker, gives the same
        digest (and, with it, bit-identical checkpoint metadata). So are
        `learner.steps_per_dispatch` (K updates per dispatch train the same model as one),
        `stream.decoder` (a decoder process decodes every record as the ingest thread would) and
        `[scale]` (a batch split over devices trains it too, up to the order of float sums; a
        replay buffer sharded over them replays other rows, but its checkpoints restore onto any
        device count and layout, the held examples re-dealt).
        `config check` prints it; the service saves it in every checkpoint.
        """
        stream = self.stream
        learner = dataclasses.asdict(self.learner)
        del learner["steps_per_dispatch"]
        training: dict[str, Any] = {
            "stream": {
                "codec": stream.codec,
                "feature_shape": list(stream.feature_shape),
                "dtype": stream.dtype,
                "num_classes": stream.num_classes,
                "num_labels": stream.num_labels,
                "inputs": {name: dataclasses.asdict(spec) for name, spec in sorted(stream.inputs.items())},
            },
            "learner": learner,
            "probe": {k: v for k, v in dataclasses.asdict(self.probe).items() if k != "prequential_window"},
            "guard": dataclasses.asdict(self.guard),
            "seed": self.service.seed,
        }
        if stream.fields:  # only then, so configs without a feature spec keep their digests
            training["stream"]["fields"] = stream.fields
        text = json.dumps(training, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the file's layout over the sections ------------------------------------------------------

SECTIONS = ("stream", "model", "learner", "replay", "ewc", "probe", "checkpoints", "service", "publish", "scale")
# Each file section: the fields of Config it fills (a path), in the order the file shows them.
_SECTION_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "stream": (("stream",),),
    "model": (("learner", "model"),),
    "learner": (("learner",),),
    "replay": (("learner", "replay"),),
    "ewc": (("learner", "ewc"),),
    "probe": (("probe",), ("guard",)),
    "checkpoints": (("checkpoints",),),
    "service": (("service",),),
    "publish": (("publish",),),
    "scale": (("scale",),),
}
_NESTED_SECTIONS = {path[-1] for paths in _SECTION_PATHS.values() for path in paths if len(path) == 2}
_SECRET_KEYS = {("service", "admin_token")}  # besides [stream.security]'s; each may be given as <key>_env


_MOVED = {
    ("learner", "model"): "model",
    ("learner", "replay"): "replay",
    ("learner", "ewc"): "ewc",
    ("guard",): "probe",
}


def _file_key(path: tuple[str, ...]) -> tuple[str, ...]:
    """A path of Config fields -> the file's key: ("learner", "model", "kind") -> ("model", "kind")."""
    for prefix, name in _MOVED.items():
        if path[: len(prefix)] == prefix:
            return (name, *path[len(prefix) :])
    return path


def _section_classes(name: str) -> list[type]:
    classes: dict[str, list[type]] = {
        "stream": [StreamConfig],
        "model": [ModelConfig],
        "learner": [LearnerConfig],
        "replay": [ReplayConfig],
        "ewc": [EWCConfig],
        "probe": [ProbeConfig, GuardConfig],
        "checkpoints": [CheckpointsConfig],
        "service": [ServiceConfig],
        "publish": [PublishConfig],
        "scale": [ScaleConfig],
    }
    return classes[name]


def _section_keys(name: str) -> list[str]:
    """The keys a section's table may hold, in the file's order (scalars, then tables)."""
    keys = [key for cls in _section_classes(name) for key in fields(cls) if key not in _NESTED_SECTIONS]
    keys += [key + ENV_SUFFIX for (section_name, key) in sorted(_SECRET_KEYS) if section_name == name]
    return keys


def _objects(config: Config, name: str) -> list[Any]:
    out = []
    for path in _SECTION_PATHS[name]:
        obj: Any = config
        for part in path:
            obj = getattr(obj, part)
        out.append(obj)
    return out


def _table(config: Config, name: str, redact: bool) -> dict:
    values: dict[str, Any] = {}
    for obj in _objects(config, name):
        for key, info in fields(type(obj)).items():
            if key in _NESTED_SECTIONS:
                continue
            value = getattr(obj, key)
            if key == "security":
                value = {k: (REDACTED if redact and k in SECRET_SECURITY_OPTIONS else v) for k, v in value.items()}
            elif is_secret(info) and redact and value is not None:
                value = REDACTED
            values[key] = _plain(value)
    return {k: v for k, v in values.items() if v != {}}


def _plain(value):
    """A section's value as TOML data: tuples as lists, nested sections as tables."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _toml_table(name: list[str], table: dict) -> list[str]:
    """[name] with its scalars, then its sub-tables as [name.sub] (TOML's order)."""
    lines = [f"[{'.'.join(name)}]"]
    subtables = []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append((key, value))
        else:
            # An optional value left unset reads back from "" (the file's way to say none).
            lines.append(f"{key} = {_toml_value('' if value is None else value)}")
    for key, value in subtables:
        lines += ["", *_toml_table([*name, _toml_key(key)], value)]
    return lines


def _fields_toml(fields: dict) -> list[str]:
    """A [stream.fields] feature spec (its plain table) as TOML lines: the table, then a table per field."""
    return _toml_table(["stream", "fields"], _plain(fields))


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _toml_string(key)


# ---- loading ------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_value(text: str):
    """A `--set` value: a TOML value if it parses as one (1, 0.5, true, [1, 2], "x"), else the text itself."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except (tomllib.TOMLDecodeError, RecursionError):  # RecursionError: arrays nested thousands deep
        return text.strip()
    if set(parsed) != {"value"}:  # `1\nother = 2`: not one value
        return text.strip()
    return parsed["value"]


_CONFIG = TypeAdapter(Config)


class _Loader:
    """One load: the raw tables, which keys `--set` gave, and the error messages' wording."""

    def __init__(self, path: Path | None, environ: Mapping[str, str]):
        self.path = path
        self.environ = environ
        self.overridden: set[tuple[str, ...]] = set()  # file keys given by --set
        self.prefix = f"config {path}" if path is not None else "config"

    def label(self, key: tuple[str, ...]) -> str:
        text = key_text(key)
        if len(key) > 1 and key in self.overridden:
            text += " (from --set)"
        return text

    def error(self, key: tuple[str, ...], detail: str) -> ConfigError:
        return ConfigError(f"{self.prefix}: {self.label(key)}: {detail}")

    def _fail(self, detail: str):
        raise ConfigError(f"{self.prefix}: {detail}")

    # -- reading
    def read(self) -> dict:
        if self.path is None:
            return {}
        if self.path.exists() and not self.path.is_dir() and not self.path.is_file():
            # A FIFO would block the read for ever, /dev/zero would fill the memory.
            return self._fail("is not a regular file (a pipe or device?), expected a TOML file")
        if self.path.is_file() and self.path.stat().st_size > MAX_CONFIG_BYTES:
            return self._fail(f"is {self.path.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self._fail("no such file")
        except IsADirectoryError:
            return self._fail("is a directory, expected a TOML file")
        except OSError as error:
            return self._fail(f"cannot read: {error.strerror or error}")
        try:
            # utf-8-sig: a byte order mark (as some Windows editors save) is not part of the text
            return tomllib.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as error:
            return self._fail(f"not UTF-8 text (byte {error.start})")
        except tomllib.TOMLDecodeError as error:
            return self._fail(f"invalid TOML: {_one_line(str(error))}")
        except RecursionError:  # tomllib parses nested arrays and inline tables by recursion
            return self._fail("invalid TOML: arrays or inline tables nested too deeply")

    def unknown_section(self, name: str, prefix: str) -> ConfigError:
        return ConfigError(
            f"{prefix}: [{name}]: unknown section; expected one of: {', '.join(SECTIONS)}{suggest(name, SECTIONS)}"
        )

    def check_sections(self, raw: dict) -> None:
        for name, table in raw.items():
            if name not in SECTIONS:
                raise self.unknown_section(name, self.prefix)
            if not isinstance(table, dict):
                raise ConfigError(f"{self.prefix}: {name}: expected a [{name}] table, got {received(table, True)}")
            allowed = _section_keys(name)
            for key in table:
                if key not in allowed:
                    raise self.error(
                        (name, key), f"unknown key; expected one of: {', '.join(allowed)}{suggest(key, allowed)}"
                    )

    # -- overrides
    def apply(self, raw: dict, overrides: Sequence[str]) -> None:
        for item in overrides:
            key_path, sep, text = item.partition("=")
            parts = key_path.strip().split(".")
            if not sep or not all(parts) or len(parts) < 2:
                raise ConfigError(
                    f"--set {_one_line(key_path)}: expected SECTION.KEY=VALUE (e.g. learner.batch_size=64)"
                )
            name, key = parts[0], parts[1]
            if name not in SECTIONS:
                raise self.unknown_section(name, f"--set {key_path}")
            allowed = _section_keys(name)
            if key not in allowed:
                raise ConfigError(
                    f"--set {key_path}: [{name}] {key}: unknown key; expected one of: "
                    f"{', '.join(allowed)}{suggest(key, allowed)}"
                )
            table = raw.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{self.prefix}: {name}: expected a [{name}] table")
            for depth, part in enumerate(parts[1:-1], start=1):  # SECTION.TABLE[.NAME].KEY: into the table
                inner = table.setdefault(part, {})
                if not isinstance(inner, dict):
                    raise self.error(tuple(parts[: depth + 1]), f"expected a [{'.'.join(parts[: depth + 1])}] table")
                table = inner
            last = parts[-1]
            # A value replaces its environment indirection, and the other way round.
            other = last[: -len(ENV_SUFFIX)] if last.endswith(ENV_SUFFIX) else last + ENV_SUFFIX
            table.pop(other, None)
            table[last] = _parse_value(text)
            self.overridden.add(tuple(parts))

    # -- the processes' environment
    def scale_environment(self, raw: dict) -> None:
        """Fill the [scale] process keys the file and --set leave out from their environment variables."""
        table = raw.setdefault("scale", {})
        if not isinstance(table, dict):
            return  # build names the section
        for key, variable in SCALE_ENVIRONMENT.items():
            value = self.environ.get(variable, "").strip()
            if key in table or not value:
                continue
            if key == "coordinator":
                table[key] = value
            elif value.isdigit():
                table[key] = int(value)
            else:
                raise self.error(("scale", key), f"environment variable {variable}: expected an integer, got {value!r}")

    # -- secrets
    def secrets(self, raw: dict) -> None:
        """Resolve `<key>_env` indirections in place; a secret given as a value is an error."""
        for name, key in sorted(_SECRET_KEYS):
            table = raw.get(name, {})
            self.secret(table, (name,), key)
        stream = raw.get("stream", {})
        if "security" in stream:
            stream["security"] = self.security(stream["security"])

    def secret(self, table: dict, where: tuple[str, ...], name: str, *, flag: bool = False) -> None:
        env = name + ENV_SUFFIX
        if env in table:
            if name in table:
                raise self.error((*where, env), f"give either {name} or {env}, not both")
            value = self.from_env((*where, env), table.pop(env))
            if flag:
                lowered = value.strip().lower()
                if lowered not in ("true", "false"):
                    raise self.error(
                        (*where, env), f"expected true or false in the environment variable, got {value!r}"
                    )
                table[name] = lowered == "true"
            else:
                table[name] = value
        elif table.get(name, "") != "" and not flag:
            what = "password" if "password" in name else "token"
            raise self.error(
                (*where, name),
                f"a secret is read from the environment only (a file or the command line shows it to others): "
                f'give {env} = "VAR" and put the {what} in $VAR',
            )

    def from_env(self, key: tuple[str, ...], variable) -> str:
        if not isinstance(variable, str) or not variable:
            raise self.error(key, f"expected the name of an environment variable, got {received(variable)}")
        value = self.environ.get(variable)
        if not value:
            state = "is empty" if value == "" else "is not set"
            raise self.error(key, f"environment variable {variable} {state}")
        return value

    def security(self, table) -> dict:
        where = ("stream", "security")
        if not isinstance(table, dict):
            raise self.error(where, f"expected a [stream.security] table, got {received(table, True)}")
        options = sorted(SECURITY_OPTIONS - _OBJECT_SECURITY_OPTIONS)
        allowed = options + [o + ENV_SUFFIX for o in options]
        table = dict(table)
        for key in list(table):
            if key not in allowed:
                hint = " (a Python object: it cannot be given in a file)" if key in _OBJECT_SECURITY_OPTIONS else ""
                raise self.error(
                    (*where, key),
                    f"unknown security option{hint}; expected one of: "
                    f'{", ".join(options)} (or <option>{ENV_SUFFIX} = "VAR"){suggest(key, allowed)}',
                )
        for name in options:
            if name in SECRET_SECURITY_OPTIONS or name + ENV_SUFFIX in table:
                self.secret(table, where, name, flag=name in _BOOL_SECURITY_OPTIONS)
        for key, value in table.items():
            want, what = (bool, "a boolean (true or false)") if key in _BOOL_SECURITY_OPTIONS else (str, "a string")
            if not isinstance(value, want):
                raise self.error(
                    (*where, key), f"expected {what}, got {received(value, key in SECRET_SECURITY_OPTIONS)}"
                )
        return table

    # -- building
    def shape(self, raw: dict) -> dict:
        """The file's tables as Config's fields: [model] [replay] [ewc] into learner, [probe] split in two."""
        tables = {name: dict(raw.get(name, {})) for name in SECTIONS}
        for (name, key), default in SERVICE_DEFAULTS.items():
            tables[name].setdefault(key, default)
        task = tables["learner"].get("task", "classification")
        if TASK_LABELS.get(task, "num_classes") != "num_classes":
            tables["stream"].setdefault("num_classes", None)  # a task without classes: none to count
        guard_keys = set(fields(GuardConfig))
        probe = tables.pop("probe")
        return {
            "stream": tables["stream"],
            "learner": {
                **tables["learner"],
                "model": tables["model"],
                "replay": tables["replay"],
                "ewc": tables["ewc"],
            },
            "probe": {k: v for k, v in probe.items() if k not in guard_keys},
            "guard": {k: v for k, v in probe.items() if k in guard_keys},
            "checkpoints": tables["checkpoints"],
            "service": tables["service"],
            "publish": tables["publish"],
            "scale": tables["scale"],
        }

    def build(self, data: dict, source_path: str | None) -> Config:
        try:
            return _CONFIG.validate_python({**data, "source_path": source_path})
        except ValidationError as error:
            path, detail = describe(error, Config, data, _file_key, allowed_keys=self.allowed)
            if len(path) == 1:  # a section as a whole
                raise ConfigError(f"{self.prefix}: [{path[0]}]: {detail}") from None
            raise self.error(path, detail) from None

    @staticmethod
    def allowed(path: tuple[str, ...]) -> list[str]:
        """The keys a did-you-mean may suggest for an unknown key inside `path` (Config fields)."""
        key = _file_key(path)
        if len(key) == 1 and key[0] in SECTIONS:
            return _section_keys(key[0])
        from continuity.learner.schema import field_at

        owner, _ = field_at(Config, path + ("",))
        return list(fields(owner)) if owner is not None else []


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, environ: Mapping[str, str] = os.environ
) -> Config:
    """Read, override, type-check and validate a config; path None -> the defaults (plus overrides).

    Raises ConfigError (a UsageError: one line, exit status 2) naming the key, what was
    expected and what was received; never with a secret's value in it.
    """
    loader = _Loader(Path(path) if path is not None else None, environ)
    raw = loader.read()
    loader.check_sections(raw)
    loader.apply(raw, overrides or ())
    loader.scale_environment(raw)
    loader.secrets(raw)
    return loader.build(loader.shape(raw), str(path) if path is not None else None)


# ---- rendering ----------------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


_SECTION_NOTES = {
    "stream": "Where records come from, and what a valid example looks like.",
    "model": "The network: a preset (an MLP, or a small CNN over images), or a factory of your own\n"
    "# (an import path) mapping an example to the task's outputs.",
    "learner": "The task, the optimizer (any optax one, by name) and the micro-batch of fresh examples per step.",
    "replay": "Rehearsal: stored examples mixed into every step (capacity 0 turns it off).",
    "ewc": "Online EWC (Schwarz et al. 2018): holds important weights near the last good model,\n"
    "# with a strength lambda that decays on accepted windows and is boosted on regressions.",
    "probe": "The continuity probe: held-out examples (never trained on), and how every candidate\n"
    "# model is judged against the last good one.",
    "checkpoints": "The Orbax checkpoint store (the ledger of decisions lives inside it).",
    "service": "The running service: HTTP endpoints (/healthz, /readyz, /metrics, /status, /predict, /admin/*).",
    "publish": "Accepted models, published for a separate serving process.",
    "scale": "One model over several devices (GPUs), of one process or several: each step's batch split\n"
    "# over them, the state (parameters, optimizer, EWC) replicated on each, the replay buffer too\n"
    '# unless replay_layout = "sharded".',
}
_SECURITY_EXAMPLE = """\
# SASL/SSL options for kafka-python (none for the embedded broker). A secret is read from
# the environment: <option>_env = "VAR" reads <option> from $VAR; it is never printed.
# [stream.security]
# security_protocol = "SASL_SSL"
# sasl_mechanism = "PLAIN"
# sasl_plain_username = "continuity"
# sasl_plain_password_env = "KAFKA_PASSWORD"
# ssl_cafile = "/etc/ssl/certs/kafka-ca.pem"
"""


_HEADER = """\
# Continuity configuration. Every key is shown with its default; unknown keys are errors.
# Check a file with `continuity config check --config FILE`; override one value on any
# command that takes --config with `--set section.key=value` (e.g. --set learner.batch_size=64).
# Try it: `continuity broker --port 9092`, then
# `continuity produce --bootstrap 127.0.0.1:9092 --topic digits --scenario permuted-digits`,
# and serve with --set probe.every_examples=1000 (digits segments last ~1,400 examples)
# --set stream.session_timeout_ms=6000 (the embedded broker holds a group join ~half of it)."""


def _commented(key: str, value, comment: str) -> str:
    entry = f"{key} = {_toml_value(value)}"
    return f"{entry:<40}  # {comment}" if comment else entry


def example_config() -> str:
    """A complete, commented config: every section and key at its default, its description as the comment.

    It runs as is against the embedded broker (`continuity broker --port 9092`) and the
    topic `continuity produce --bootstrap 127.0.0.1:9092 --topic digits --scenario
    permuted-digits` creates; its defaults are for Apache Kafka, so its header says which
    overrides make the embedded broker quick (a short session timeout). Values and comments
    are rendered from the sections' declarations, so the example cannot drift from them;
    optional keys and empty tables are shown commented out, with their declared example.
    """
    defaults = Config()
    lines = [_HEADER]
    for name in SECTIONS:
        lines += ["", f"# {_SECTION_NOTES[name]}", f"[{name}]"]
        tables: list[str] = []
        for obj in _objects(defaults, name):
            for key, info in fields(type(obj)).items():
                if key in _NESTED_SECTIONS:
                    continue
                value, comment = getattr(obj, key), info.description or ""
                if key == "security":
                    tables += ["", _SECURITY_EXAMPLE.rstrip("\n")]
                elif dataclasses.is_dataclass(value):  # a table of its own, shown at its defaults
                    tables += ["", f"# {(type(value).__doc__ or '').splitlines()[0]}", f"[{name}.{key}]"]
                    for field_name, field_info in fields(type(value)).items():
                        tables.append(
                            _commented(field_name, _plain(getattr(value, field_name)), field_info.description or "")
                        )
                elif isinstance(value, dict):  # an open table, empty by default: its example, commented out
                    sample = _toml_table([name, key], _plain(info.examples[0] if info.examples else {}))
                    tables += ["", f"# {comment}", *("# " + line if line else "#" for line in sample)]
                elif value is None and is_secret(info):
                    lines.append(
                        f"{'# ' + key + ENV_SUFFIX + ' = ' + _toml_value('CONTINUITY_' + key.upper()):<40}  # {comment}"
                    )
                elif value is None:
                    entry = f"# {key} = {_toml_value(info.examples[0] if info.examples else '')}"
                    lines.append(f"{entry:<40}  # {comment}")
                else:
                    lines.append(_commented(key, _plain(value), comment))
        lines += tables
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- config reference: generated by `make config-reference`; edit the sections' descriptions -->"
README_END = "<!-- end of config reference -->"


def readme_reference() -> str:
    """The README's config reference: `continuity config example`'s output in a TOML block."""
    return f"{README_BEGIN}\n```toml\n{example_config()}```\n{README_END}"


def update_readme(path: str | Path = "README.md") -> None:
    """Rewrite the README's config reference from the sections' declarations (`make config-reference`)."""
    path = Path(path)
    text = path.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    path.write_text(text[:start] + readme_reference() + text[end:])


# ---- command-line glue --------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set SECTION.KEY=VALUE, for every command that takes a config."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML config file (`continuity config example` prints one); default: built-in defaults",
    )
    from continuity.commands.arguments import add_set_argument

    add_set_argument(parser, "override one config value, e.g. --set learner.batch_size=64 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set or ())
